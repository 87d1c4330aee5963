// Helpers of the NAT end-to-end test (tests/nat.spec.ts): the namespace topology of netns.sh, a
// server started inside the "public" namespace with a config file of its own, Chromium instances
// started inside the host namespaces, and the selected ICE candidate pair read from the pages.
import { chromium, expect, type Browser, type Page } from '@playwright/test';
import { spawn, execFile, execFileSync, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdtempSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { CHROMIUM_ARGS } from '../tests/browsers';
export { download } from '../tests/browsers';

export const ROOT = path.join(__dirname, '..', '..');
export const NETNS_SH = path.join(__dirname, 'netns.sh');
export const CHROMIUM_IN_NETNS = path.join(__dirname, 'chromium-in-netns.sh');
export const SERVER_BIN = path.join(ROOT, 'target', 'release', 'beamdrop');

/** The server's address inside the topology (public namespace), and its HTTP port there. */
export const SERVER_IP = '198.18.0.1';
export const HTTP_PORT = 8080;
export const ORIGIN = `http://${SERVER_IP}:${HTTP_PORT}`;

/** Opens the server's /metrics to the test (which reaches it from outside loopback). */
const METRICS_TOKEN = randomBytes(16).toString('hex');

export type NatCase = 'cone' | 'symmetric' | 'udp-blocked';

/** ip, nft and curl live in /usr/sbin and /usr/bin; make sure both are searched. */
const PATH_WITH_SBIN = [process.env.PATH ?? '', '/usr/sbin', '/sbin', '/usr/bin', '/bin'].filter(Boolean).join(':');
const TOOL_ENV = { ...process.env, PATH: PATH_WITH_SBIN };

export class Topology {
  readonly pub: string;
  readonly senderHost: string;
  readonly receiverHost: string;

  /** `prefix` makes every namespace name unique to this run (e.g. `bdnat-<pid>-`). */
  constructor(readonly prefix: string) {
    this.pub = `${prefix}pub`;
    this.senderHost = `${prefix}hs`;
    this.receiverHost = `${prefix}hr`;
  }

  up(kase: NatCase): void {
    execFileSync(NETNS_SH, ['up', this.prefix, kase], { env: TOOL_ENV, timeout: 30_000, stdio: ['ignore', 'ignore', 'pipe'] });
  }

  /** The receiver's router changes its public address mid-flight (see `move` in netns.sh). */
  moveReceiver(): void {
    execFileSync(NETNS_SH, ['move', this.prefix], { env: TOOL_ENV, timeout: 10_000, stdio: ['ignore', 'ignore', 'pipe'] });
  }

  /** Idempotent; also ends whatever still runs inside the namespaces. Never throws. */
  down(): void {
    try {
      execFileSync(NETNS_SH, ['down', this.prefix], { env: TOOL_ENV, timeout: 30_000, stdio: ['ignore', 'ignore', 'pipe'] });
    } catch (e) {
      console.log(`[nat] netns.sh down ${this.prefix} failed: ${(e as Error).message}`);
    }
  }

  /** Runs a command inside one of the namespaces; resolves with stdout (rejects on failure or timeout). */
  exec(ns: string, cmd: string, args: string[], timeoutMs = 10_000): Promise<string> {
    return new Promise((resolve, reject) => {
      execFile('ip', ['netns', 'exec', ns, cmd, ...args], { env: TOOL_ENV, timeout: timeoutMs, maxBuffer: 16 << 20 }, (err, stdout, stderr) =>
        err ? reject(new Error(`${cmd} ${args.join(' ')} in ${ns}: ${err.message} ${stderr}`)) : resolve(stdout),
      );
    });
  }

  /** GET on the server from inside the public namespace (the test itself runs in the root one). */
  async get(urlPath: string): Promise<{ status: number; body: string }> {
    // Reached from the public namespace, not loopback: /metrics wants the token.
    const auth = `Authorization: Bearer ${METRICS_TOKEN}`;
    const out = await this.exec(this.pub, 'curl', ['-s', '-m', '5', '-H', auth, '-w', '\n%{http_code}', `${ORIGIN}${urlPath}`], 10_000);
    const cut = out.lastIndexOf('\n');
    return { status: Number(out.slice(cut + 1)), body: out.slice(0, cut) };
  }
}

/**
 * Tears down what an earlier run left behind when its test process was killed outright (so its
 * exit handler never ran): namespaces named `<base><pid>-...` whose pid no longer exists.
 */
export function removeStale(base: string): void {
  let names: string[] = [];
  try {
    names = readdirSync('/run/netns');
  } catch {
    return; // no namespaces at all
  }
  const prefixes = new Set<string>();
  for (const name of names) {
    const m = name.match(/^(.+-(\d+)-)(pub|rs|rr|hs|hr)$/);
    if (m && m[1].startsWith(base) && m[1] === `${base}${m[2]}-` && !existsSync(`/proc/${m[2]}`)) prefixes.add(m[1]);
  }
  for (const prefix of prefixes) {
    console.log(`[nat] removing namespaces left by an earlier run: ${prefix}*`);
    new Topology(prefix).down();
  }
}

/** Fails (not skips) when the machine cannot run the NAT test, saying why. */
export function checkPrerequisites(): void {
  if (process.getuid?.() !== 0) {
    throw new Error(
      'nat.spec.ts must run as root: it creates network namespaces (ip netns) and nftables NAT routers. Run it as root (CI does).',
    );
  }
  for (const tool of ['ip', 'nft', 'curl']) {
    try {
      execFileSync('sh', ['-c', `command -v ${tool}`], { env: TOOL_ENV, stdio: 'ignore' });
    } catch {
      throw new Error(`nat.spec.ts needs '${tool}' (scripts/setup.sh: need_netns_tools installs iproute2, nftables and curl)`);
    }
  }
  if (!existsSync(SERVER_BIN)) throw new Error(`no server binary at ${SERVER_BIN}: build it first (cargo leptos build --release)`);
}

/** The server's config file: `turn` = the [turn] section's body, or undefined for none. */
export function serverConfig(turn: string | undefined, extra = ''): string {
  let toml = `listen = "${SERVER_IP}:${HTTP_PORT}"\nbroker = "memory://"\nmetrics_token = "${METRICS_TOKEN}"\n${extra}\n`;
  if (turn !== undefined) toml += `\n[turn]\n${turn}\n`;
  return toml;
}

export function builtInTurn(secret: string): string {
  return [
    `listen = "${SERVER_IP}:3478"`,
    `public_ip = "${SERVER_IP}"`,
    'relay_ports = [50000, 50999]',
    `secret = "${secret}"`,
    'allow_private_peers = false',
  ].join('\n');
}

export class Server {
  private stderr = '';
  private constructor(
    readonly child: ChildProcess,
    readonly topology: Topology,
  ) {
    child.stderr?.on('data', (d: Buffer) => {
      this.stderr = (this.stderr + d.toString()).slice(-20_000);
    });
  }

  /** Starts target/release/beamdrop in the public namespace and waits for /healthz (≤ 30 s). */
  static async start(topology: Topology, configToml: string, extraEnv: NodeJS.ProcessEnv = {}): Promise<Server> {
    const dir = mkdtempSync(path.join(tmpdir(), 'beamdrop-nat-'));
    const file = path.join(dir, 'beamdrop.toml');
    writeFileSync(file, configToml);
    const env: NodeJS.ProcessEnv = { ...TOOL_ENV };
    for (const key of Object.keys(env)) if (key.startsWith('BEAMDROP_')) delete env[key];
    Object.assign(env, { LEPTOS_SITE_ROOT: 'target/site', LEPTOS_SITE_PKG_DIR: 'pkg', LEPTOS_ENV: 'PROD', RUST_LOG: 'warn' }, extraEnv);
    // `ip netns exec` execs in place: the child's pid is the server's own (checked below).
    const child = spawn('ip', ['netns', 'exec', topology.pub, SERVER_BIN, '--config', file], {
      cwd: ROOT,
      env,
      stdio: ['ignore', 'ignore', 'pipe'],
    });
    const server = new Server(child, topology);
    try {
      const deadline = Date.now() + 30_000;
      for (;;) {
        if (child.exitCode !== null || child.signalCode !== null) {
          throw new Error(`server exited (${child.exitCode ?? child.signalCode}) before answering /healthz:\n${server.log()}`);
        }
        const ok = await topology.get('/healthz').then((r) => r.status === 200, () => false);
        if (ok) break;
        if (Date.now() > deadline) throw new Error(`server did not answer /healthz within 30 s:\n${server.log()}`);
        await new Promise((r) => setTimeout(r, 200));
      }
      const comm = readFileSync(`/proc/${child.pid}/comm`, 'utf8').trim();
      if (comm !== 'beamdrop') throw new Error(`pid ${child.pid} is '${comm}', not the server`);
    } catch (e) {
      await server.stop();
      throw e;
    }
    return server;
  }

  log(): string {
    return this.stderr.trim() || '(no stderr)';
  }

  /** SIGTERM, then SIGKILL after 5 s. */
  async stop(): Promise<void> {
    const child = this.child;
    if (child.exitCode !== null || child.signalCode !== null) return;
    const gone = new Promise<void>((resolve) => child.once('exit', () => resolve()));
    child.kill('SIGTERM');
    const timer = setTimeout(() => child.kill('SIGKILL'), 5_000);
    await Promise.race([gone, new Promise((r) => setTimeout(r, 10_000))]);
    clearTimeout(timer);
  }

  /** Sums of each named metric over its label sets; a metric the server lacks is absent. */
  async metrics(): Promise<Map<string, number>> {
    const { status, body } = await this.topology.get('/metrics');
    if (status !== 200) throw new Error(`/metrics answered ${status}`);
    const out = new Map<string, number>();
    for (const line of body.split('\n')) {
      const m = line.match(/^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)/);
      if (m) out.set(m[1], (out.get(m[1]) ?? 0) + Number(m[3]));
    }
    return out;
  }

  async metric(name: string): Promise<number> {
    const v = (await this.metrics()).get(name);
    if (v === undefined) throw new Error(`the server's /metrics has no ${name} (is the built-in TURN server in this build?)`);
    return v;
  }

  /** CPU time (user + system) the server process has used, in ms. */
  cpuMs(): number {
    const stat = readFileSync(`/proc/${this.child.pid}/stat`, 'utf8');
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    // After "pid (comm) ": state is field 3 of stat(5), so utime (14) and stime (15) are at 11, 12.
    return ((Number(fields[11]) + Number(fields[12])) * 1000) / clockTicks();
  }
}

let ticks: number | undefined;
function clockTicks(): number {
  if (ticks === undefined) {
    try {
      ticks = Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).trim()) || 100;
    } catch {
      ticks = 100;
    }
  }
  return ticks;
}

/** A fresh headless Chromium inside network namespace `ns`, with the tests' flags. */
export async function launchIn(ns: string): Promise<Browser> {
  const args = CHROMIUM_ARGS.map((a) =>
    a.startsWith('--host-resolver-rules=') ? `${a} , EXCLUDE ${SERVER_IP}` : a,
  );
  // Plain http to a non-localhost address is not a secure context: OPFS, crypto.subtle and the
  // rest would be missing. The flag makes this one origin count as secure.
  args.push(`--unsafely-treat-insecure-origin-as-secure=${ORIGIN}`);
  return chromium.launch({
    executablePath: CHROMIUM_IN_NETNS,
    args,
    env: { ...TOOL_ENV, BEAMDROP_NETNS: ns },
    timeout: 60_000,
  });
}

/**
 * A page whose every RTCPeerConnection (made by the WASM client) lands in `window.__pcs`, so the
 * test can read the selected candidate pair from the page's own connection; offers made with
 * `iceRestart` are counted in `window.__iceRestarts`.
 */
export async function openTracked(browser: Browser, urlPath: string): Promise<Page> {
  const context = await browser.newContext({ baseURL: ORIGIN, acceptDownloads: true });
  await context.addInitScript(() => {
    const w = window as unknown as { RTCPeerConnection?: typeof RTCPeerConnection; __pcs?: RTCPeerConnection[] };
    const Original = w.RTCPeerConnection;
    if (!Original || w.__pcs) return;
    const pcs: RTCPeerConnection[] = [];
    w.__pcs = pcs;
    const counts = { restarts: 0 };
    Object.defineProperty(window, '__iceRestarts', { get: () => counts.restarts });
    class Tracked extends Original {
      constructor(config?: RTCConfiguration) {
        super(config);
        pcs.push(this);
      }
      // eslint-disable-next-line @typescript-eslint/no-explicit-any
      createOffer(options?: any): Promise<any> {
        if (options?.iceRestart) counts.restarts += 1;
        return super.createOffer(options);
      }
    }
    Object.defineProperty(window, 'RTCPeerConnection', { value: Tracked, writable: true, configurable: true });
  });
  const page = await context.newPage();
  page.on('pageerror', (e) => console.log(`[pageerror] ${e.message}`));
  await page.goto(urlPath);
  return page;
}

export interface SelectedPair {
  local: string;
  remote: string;
  localProtocol: string;
  relayProtocol: string | null;
  localAddress: string;
  remoteAddress: string;
  bytesSent: number;
  bytesReceived: number;
  /** How many of the page's peer connections are connected. */
  connected: number;
}

/** The selected ICE candidate pair of the page's (last) connected peer connection, or null. */
export async function selectedPair(page: Page): Promise<SelectedPair | null> {
  return page.evaluate(async () => {
    const pcs = ((window as unknown as { __pcs?: RTCPeerConnection[] }).__pcs ?? []).filter(
      (pc) => pc.connectionState === 'connected',
    );
    let found: Record<string, unknown> | null = null;
    for (const pc of pcs) {
      const stats = await pc.getStats();
      // eslint-disable-next-line @typescript-eslint/no-explicit-any
      let pair: any;
      // eslint-disable-next-line @typescript-eslint/no-explicit-any
      stats.forEach((s: any) => {
        if (s.type === 'transport' && s.selectedCandidatePairId) pair = stats.get(s.selectedCandidatePairId);
      });
      if (!pair) {
        // eslint-disable-next-line @typescript-eslint/no-explicit-any
        stats.forEach((s: any) => {
          if (!pair && s.type === 'candidate-pair' && s.nominated && s.state === 'succeeded') pair = s;
        });
      }
      if (!pair) continue;
      const local = stats.get(pair.localCandidateId) ?? {};
      const remote = stats.get(pair.remoteCandidateId) ?? {};
      found = {
        local: local.candidateType,
        remote: remote.candidateType,
        localProtocol: local.protocol,
        relayProtocol: local.relayProtocol ?? null,
        localAddress: `${local.address}:${local.port}`,
        remoteAddress: `${remote.address}:${remote.port}`,
        bytesSent: pair.bytesSent ?? 0,
        bytesReceived: pair.bytesReceived ?? 0,
        connected: pcs.length,
      };
    }
    return found as unknown as SelectedPair | null;
  });
}

/** Connection, ICE and gathering state of each peer connection the page made (for failure messages). */
export async function pcStates(page: Page): Promise<string[]> {
  return page
    .evaluate(() =>
      ((window as unknown as { __pcs?: RTCPeerConnection[] }).__pcs ?? []).map(
        (pc) => `${pc.connectionState}/${pc.iceConnectionState}/${pc.iceGatheringState}`,
      ),
    )
    .catch((e) => [`(could not read: ${(e as Error).message})`]);
}

/** Waits (≤ ms) for a connected peer connection with a selected pair on the page. */
export async function waitSelectedPair(page: Page, ms = 30_000): Promise<SelectedPair> {
  const deadline = Date.now() + ms;
  for (;;) {
    const pair = await selectedPair(page).catch(() => null);
    if (pair) return pair;
    if (Date.now() > deadline) throw new Error(`no connected peer connection with a selected candidate pair within ${ms / 1000} s`);
    await new Promise((r) => setTimeout(r, 250));
  }
}

export function describePair(p: SelectedPair): string {
  const relay = p.relayProtocol ? ` over ${p.relayProtocol}` : '';
  return `local ${p.local}${relay} ${p.localAddress} ⇄ remote ${p.remote} ${p.remoteAddress}`;
}


/** Offers with `iceRestart` the page has made, and how many peer connections it has made. */
export async function restarts(page: Page): Promise<{ iceRestarts: number; connections: number }> {
  return page.evaluate(() => {
    const w = window as unknown as { __iceRestarts?: number; __pcs?: RTCPeerConnection[] };
    return { iceRestarts: w.__iceRestarts ?? 0, connections: (w.__pcs ?? []).length };
  });
}
