# Sourced by scripts/run and scripts/test: installs what this machine lacks (each step only when
# missing, so it is quick the second time) and puts the project's tools first on PATH.
# Debian 12 + rustup stable + Node 20 is the assumed base; no prebuilt-binary downloads.

set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PATH="$ROOT/end2end/node_modules/.bin:$HOME/.cargo/bin:$PATH"

CARGO_LEPTOS_VERSION=0.3.10
say() { printf '\033[1m[setup]\033[0m %s\n' "$*" >&2; }

need_rust_tools() {
  # The server's allocator (jemalloc) is built from C source.
  need_apt cc gcc
  need_apt make make
  if ! rustup target list --installed | grep -qx wasm32-unknown-unknown; then
    say "adding the wasm32-unknown-unknown target"
    rustup target add wasm32-unknown-unknown
  fi
  if ! cargo leptos --version >/dev/null 2>&1; then
    say "installing cargo-leptos $CARGO_LEPTOS_VERSION (takes ~10 min once)"
    CARGO_PROFILE_RELEASE_LTO=off CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 \
      cargo install --locked cargo-leptos --version "$CARGO_LEPTOS_VERSION"
  fi
  # The wasm-bindgen CLI must equal the crate version in Cargo.lock exactly.
  local want have
  want=$(awk '/^name = "wasm-bindgen"$/ {getline; gsub(/version = |"/, ""); print; exit}' "$ROOT/Cargo.lock")
  have=$(wasm-bindgen --version 2>/dev/null | awk '{print $2}' || true)
  if [ "$have" != "$want" ]; then
    say "installing wasm-bindgen-cli $want (found: ${have:-none})"
    cargo install wasm-bindgen-cli --version "$want" --force
  fi
}

need_rust_lint_tools() {
  local component
  for component in rustfmt clippy; do
    if ! rustup component list --installed | grep -q "^$component"; then
      say "adding the $component component"
      rustup component add "$component"
    fi
  done
}

# The layers depend one way only: the transfer engine on nothing of the app, the client and the
# view state on no component, the components only through the client, the view state and server
# functions. Fails on an import against that direction.
check_layering() {
  local bad
  bad=$(grep -rnE 'crate::(client|components|server|app)\b' "$ROOT/src/transfer" || true)
  bad+=$(grep -rnE 'crate::components\b|super::components\b' "$ROOT/src/client" "$ROOT/src/view.rs" "$ROOT/src/server" || true)
  if [ -n "$bad" ]; then
    echo "layering broken (see check_layering in scripts/setup.sh):" >&2
    echo "$bad" >&2
    return 1
  fi
}

apt_updated=0
need_apt() { # need_apt <command> <package>...
  local cmd=$1; shift
  command -v "$cmd" >/dev/null 2>&1 && return 0
  if [ "$apt_updated" = 0 ]; then
    say "apt-get update"
    apt-get update -qq
    apt_updated=1
  fi
  say "installing $*"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

need_node_modules() {
  # end2end/ holds Playwright and binaryen (wasm-opt: Debian's is too old and breaks the wasm).
  local stamp="$ROOT/end2end/node_modules/.package-lock.json"
  if [ ! -f "$stamp" ] || [ "$ROOT/end2end/package-lock.json" -nt "$stamp" ]; then
    say "npm ci in end2end/"
    (cd "$ROOT/end2end" && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund)
  fi
}

need_chromium() {
  need_apt chromium chromium chromium-driver
}

# A free loopback port for the end-to-end server (unless E2E_PORT is set), so a running app or a
# second run on this machine does not collide with the tests.
pick_e2e_port() {
  if [ -z "${E2E_PORT:-}" ]; then
    E2E_PORT=$(node -e 'const s=require("net").createServer();s.listen(0,"127.0.0.1",()=>{console.log(s.address().port);s.close()})')
  fi
  export E2E_PORT
}

need_redis() {
  # redis-server for the multi-node broker tests (each test starts its own on a free port).
  need_apt redis-server redis-server
}

need_coturn() {
  # coturn's turnserver: tests/turn.rs checks that the credentials we hand out work against it.
  need_apt turnserver coturn
}

need_netns_tools() {
  # The NAT end-to-end test (end2end/tests/nat.spec.ts, topology in end2end/nat/netns.sh) builds
  # network namespaces with `ip` and NAT routers with `nft`, and reaches the server inside its
  # namespace with curl. Both tools live in /usr/sbin.
  case ":$PATH:" in *:/usr/sbin:*) ;; *) export PATH="$PATH:/usr/sbin:/sbin" ;; esac
  need_apt ip iproute2
  need_apt nft nftables
  need_apt curl curl
}
