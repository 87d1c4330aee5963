#!/usr/bin/env bash
# Playwright's `executablePath` for the NAT test: Chromium run inside the network namespace named
# by BEAMDROP_NETNS (passed in launch's `env`). `ip netns exec` execs in place (no fork), so the pid
# Playwright holds is Chromium's own, and the control pipe (fds 3 and 4) is inherited unchanged:
# the namespace changes what the browser's network sees, not how Playwright drives it.
set -euo pipefail
: "${BEAMDROP_NETNS:?BEAMDROP_NETNS must name the network namespace to run Chromium in}"
case ":$PATH:" in *:/usr/sbin:*) ;; *) PATH="$PATH:/usr/sbin:/sbin" ;; esac
exec ip netns exec "$BEAMDROP_NETNS" "${CHROMIUM_PATH:-/usr/bin/chromium}" "$@"
