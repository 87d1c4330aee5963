// Transfer benchmark (not a test): the app against a raw-JS baseline on one RTCDataChannel
// (public/bench/raw.html: same broker, frames and flow control, OPFS sink in a worker, no app code),
// so the app's cost can be read as a ratio to "the channel's own speed".
//
// For each size in BENCH_SIZES_MIB (default 256,1024), BENCH_ROUNDS rounds (default 3); each round
// runs raw and app (order alternating per round), each run in two fresh headless Chromium
// instances (sender, receiver). One random file per size, generated and hashed as a stream.
// Measured from the click on the receiver's download button until the saved file is complete
// (Playwright's download.path() resolved):
//   MB/s               size / seconds (MB = 10^6 bytes)
//   CPU-ms per MB      CPU time of every process of both browsers (CDP SystemInfo.getProcessInfo,
//                      read before the click and after the save; a process that appears in between
//                      counts from 0, one that ends in between is lost), also per browser
//   peak RSS growth    per browser: max over 250 ms samples of the sum of VmRSS of its processes,
//                      minus the sum just before the click (MiB)
// The saved file's SHA-256 must equal the source's. Prints a Markdown table per size (median and
// min–max over rounds, plus app/raw ratios) and writes every run as JSON to BENCH_OUT.
//
// Environment:
//   BENCH_SIZES_MIB   comma-separated sizes in MiB (default 256,1024; 4096 works: nothing is held
//                     in Node's memory, but the disk needs ~3× the size free while a run lasts)
//   BENCH_ROUNDS      rounds per size (default 3)
//   BENCH_ONLY        raw | app: run one side only
//   BENCH_QUERY       query string for both sender pages, e.g. chunk=131072&high=8388608
//   BENCH_SETTLE_MS   pause between "Connected" and the click (default 1000)
//   BENCH_OUT         JSON output (default end2end/bench-results/transfer-<timestamp>.json)
//   BENCH_BASE_URL    measure an already-running server (e.g. http://127.0.0.1:3199) instead of
//                     the one bench.config.ts starts
//   BENCH_PROFILE     persistent (default) | incognito, see below
//
// Profiles: each browser is Chromium with the tests' flags (CHROMIUM_ARGS, CHROMIUM_PATH). By
// default it runs one persistent context in a fresh temporary user-data-dir, deleted after the run,
// like a real user's profile. `launch()` + `newContext()` (as the tests do, BENCH_PROFILE=incognito)
// gives an off-the-record context, where Chromium keeps OPFS in the browser process's memory: the
// receiver's RSS then grows by the file size (measured: +260 MiB for 256 MiB, raw page) and a 4 GiB
// run holds 4 GiB of RAM, which measures incognito storage rather than the page.
import { test, expect, chromium, type Browser, type BrowserContext, type CDPSession, type Page } from '@playwright/test';
import { createHash, randomBytes } from 'node:crypto';
import {
  createReadStream,
  createWriteStream,
  mkdirSync,
  mkdtempSync,
  readFileSync,
  rmSync,
  statSync,
  writeFileSync,
} from 'node:fs';
import { once } from 'node:events';
import os from 'node:os';
import path from 'node:path';
import { CHROMIUM_ARGS, launch, hydrated, shareLink, tempDir } from '../tests/browsers';
import { BASE_URL } from '../playwright.config';

type Side = 'raw' | 'app';

const MiB = 1024 * 1024;
const SIZES_MIB = (process.env.BENCH_SIZES_MIB ?? '256,1024')
  .split(',')
  .map((s) => Number(s.trim()))
  .filter((n) => Number.isFinite(n) && n > 0);
const ROUNDS = Number(process.env.BENCH_ROUNDS ?? 3);
const ONLY = process.env.BENCH_ONLY ?? '';
if (!['', 'raw', 'app'].includes(ONLY)) throw new Error(`BENCH_ONLY must be raw or app, not ${ONLY}`);
const SIDES: Side[] = ONLY ? [ONLY as Side] : ['raw', 'app'];
const BASE = (process.env.BENCH_BASE_URL ?? BASE_URL).replace(/\/+$/, '');
const QUERY = process.env.BENCH_QUERY ?? '';
const SETTLE_MS = Number(process.env.BENCH_SETTLE_MS ?? 1000);
const PROFILE = process.env.BENCH_PROFILE ?? 'persistent';
if (!['persistent', 'incognito'].includes(PROFILE)) throw new Error(`BENCH_PROFILE must be persistent or incognito`);
const OUT =
  process.env.BENCH_OUT ??
  path.join(__dirname, '..', 'bench-results', `transfer-${new Date().toISOString().replace(/[:.]/g, '-')}.json`);
/** Slowest rate the timeouts allow for (bytes/s); the bench expects ~5–20 MB/s. */
const FLOOR_BYTES_PER_SEC = 2e6;

interface Run {
  size_mib: number;
  side: Side;
  round: number;
  /** 0: first in its round, 1: second. */
  position: number;
  started_at: string;
  seconds?: number;
  mb_per_s?: number;
  cpu_ms?: { sender: number; receiver: number; total: number };
  /** Diagnostic: CPU ms per Chromium process type (browser, renderer, utility, gpu…). */
  cpu_ms_by_type?: { sender: Record<string, number>; receiver: Record<string, number> };
  cpu_ms_per_mb?: { sender: number; receiver: number; total: number };
  rss_before_mib?: { sender: number; receiver: number };
  rss_peak_growth_mib?: { sender: number; receiver: number };
  rss_samples?: number;
  processes?: { sender: number; receiver: number };
  saved_bytes?: number;
  sha256_ok?: boolean;
  error?: string;
}

const runs: Run[] = [];
const meta = {
  started_at: new Date().toISOString(),
  base_url: BASE,
  sizes_mib: SIZES_MIB,
  rounds: ROUNDS,
  sides: SIDES,
  query: QUERY,
  settle_ms: SETTLE_MS,
  profile: PROFILE,
  host: { cpus: os.cpus().length, mem_gib: +(os.totalmem() / 2 ** 30).toFixed(1), loadavg_at_start: os.loadavg() },
  chromium: '',
  units: 'MB = 10^6 bytes; RSS in MiB; CPU in ms',
};

function saveJson(): void {
  mkdirSync(path.dirname(OUT), { recursive: true });
  writeFileSync(OUT, JSON.stringify({ meta, runs }, null, 2) + '\n');
}

// ---------------------------------------------------------------------------------------------
// Files, streamed: nothing of size proportional to the file is held in memory.

/** Writes `size` random bytes to `file` and returns their SHA-256 (hex). */
async function randomFileStreamed(file: string, size: number): Promise<string> {
  const out = createWriteStream(file);
  const hash = createHash('sha256');
  for (let done = 0; done < size; ) {
    const buf = randomBytes(Math.min(8 * MiB, size - done));
    hash.update(buf);
    if (!out.write(buf)) await once(out, 'drain');
    done += buf.length;
  }
  await new Promise<void>((resolve, reject) => out.end((err?: Error | null) => (err ? reject(err) : resolve())));
  return hash.digest('hex');
}

async function sha256File(file: string): Promise<string> {
  const hash = createHash('sha256');
  for await (const chunk of createReadStream(file, { highWaterMark: 4 * MiB })) hash.update(chunk as Buffer);
  return hash.digest('hex');
}

// ---------------------------------------------------------------------------------------------
// Per-browser CPU and memory

/** pid → cumulative CPU seconds and process type (browser, renderer, utility, gpu…), for every
 * process of one browser. */
async function processCpu(session: CDPSession): Promise<Map<number, { cpu: number; type: string }>> {
  const { processInfo } = await session.send('SystemInfo.getProcessInfo');
  return new Map(processInfo.map((p) => [p.id, { cpu: p.cpuTime, type: p.type }]));
}

/** Sum of VmRSS (MiB) of these processes; ones that ended meanwhile count 0. */
function rssMiB(pids: Iterable<number>): number {
  let kib = 0;
  for (const pid of pids) {
    try {
      const m = readFileSync(`/proc/${pid}/status`, 'utf8').match(/^VmRSS:\s+(\d+) kB/m);
      if (m) kib += Number(m[1]);
    } catch {
      // gone
    }
  }
  return kib / 1024;
}

/** CPU deltas and peak RSS growth of several browsers between start() and stop(). */
class Monitor {
  private before: Map<number, { cpu: number; type: string }>[] = [];
  private rssBefore: number[] = [];
  private rssMax: number[] = [];
  private timer?: NodeJS.Timeout;
  private inFlight: Promise<void> = Promise.resolve();
  samples = 0;

  constructor(private sessions: CDPSession[]) {}

  async start(): Promise<void> {
    this.before = await Promise.all(this.sessions.map(processCpu));
    this.rssBefore = this.before.map((procs) => rssMiB(procs.keys()));
    this.rssMax = [...this.rssBefore];
    this.timer = setInterval(() => {
      // Skip a tick rather than pile up if CDP is slow to answer.
      this.inFlight = this.inFlight.then(() => this.sample()).catch(() => {});
    }, 250);
  }

  private async sample(): Promise<void> {
    const now = await Promise.all(this.sessions.map(processCpu));
    now.forEach((procs, i) => {
      this.rssMax[i] = Math.max(this.rssMax[i], rssMiB(procs.keys()));
    });
    this.samples++;
  }

  async stop(): Promise<{
    cpuMs: number[];
    cpuMsByType: Record<string, number>[];
    rssBefore: number[];
    rssGrowth: number[];
    processes: number[];
  }> {
    clearInterval(this.timer);
    await this.inFlight;
    await this.sample(); // the moment the file is saved counts too
    const after = await Promise.all(this.sessions.map(processCpu));
    const cpuMsByType = after.map((procs, i) => {
      const byType: Record<string, number> = {};
      for (const [pid, { cpu, type }] of procs) {
        byType[type] = (byType[type] ?? 0) + (cpu - (this.before[i].get(pid)?.cpu ?? 0)) * 1000;
      }
      return byType;
    });
    return {
      cpuMs: cpuMsByType.map((t) => Object.values(t).reduce((a, b) => a + b, 0)),
      cpuMsByType,
      rssBefore: this.rssBefore,
      rssGrowth: this.rssMax.map((m, i) => m - this.rssBefore[i]),
      processes: after.map((p) => p.size),
    };
  }
}

// ---------------------------------------------------------------------------------------------
// One run: two fresh browsers, sender page → file → link → receiver page → click → saved file

/** One fresh Chromium instance with one context (see "Profiles" at the top). */
interface Instance {
  browser: Browser;
  context: BrowserContext;
  close(): Promise<void>;
}

async function startBrowser(): Promise<Instance> {
  const options = { baseURL: BASE, acceptDownloads: true };
  if (PROFILE === 'incognito') {
    const browser = await launch();
    const context = await browser.newContext(options);
    return { browser, context, close: () => browser.close() };
  }
  const dir = mkdtempSync(path.join(os.tmpdir(), 'beamdrop-bench-profile-'));
  const context = await chromium.launchPersistentContext(dir, {
    ...options,
    executablePath: process.env.CHROMIUM_PATH ?? '/usr/bin/chromium',
    args: CHROMIUM_ARGS,
  });
  return {
    browser: context.browser()!,
    context,
    close: async () => {
      await context.close();
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

async function openPage(instance: Instance, url: string, label: string): Promise<Page> {
  const page = instance.context.pages()[0] ?? (await instance.context.newPage());
  page.on('pageerror', (e) => console.log(`[${label} pageerror] ${e.message}`));
  page.on('console', (m) => {
    if (m.type() === 'error') console.log(`[${label} console] ${m.text()}`);
  });
  await page.goto(url);
  return page;
}

async function runOnce(run: Run, file: string, digest: string): Promise<void> {
  const bytes = run.size_mib * MiB;
  const name = path.basename(file);
  const [senderChromium, receiverChromium] = await Promise.all([startBrowser(), startBrowser()]);
  try {
    meta.chromium ||= senderChromium.browser.version();
    const sessions = await Promise.all([
      senderChromium.browser.newBrowserCDPSession(),
      receiverChromium.browser.newBrowserCDPSession(),
    ]);
    const query = QUERY ? `?${QUERY}` : '';

    const sender = await openPage(senderChromium, run.side === 'app' ? `/${query}` : `/bench/raw.html${query}`, 'sender');
    if (run.side === 'app') await hydrated(sender);
    await sender.getByTestId('file-input').setInputFiles([file]);
    const link = await shareLink(sender);

    const receiver = await openPage(receiverChromium, link, 'receiver');
    await expect(receiver.getByTestId('status')).toContainText('Connected', { timeout: 60_000 });
    // The app lists files as rows; the raw page has one file and no rows.
    const row = run.side === 'app' ? receiver.getByTestId('file-item').filter({ hasText: name }) : receiver.locator('body');
    const button = row.getByTestId('download');
    await expect(button).toBeEnabled({ timeout: 60_000 });
    await receiver.waitForTimeout(SETTLE_MS); // let page-load work die down before measuring

    const monitor = new Monitor(sessions);
    await monitor.start();
    const started = performance.now();
    const [download] = await Promise.all([
      receiver.waitForEvent('download', { timeout: 120_000 + (bytes / FLOOR_BYTES_PER_SEC) * 1000 }),
      button.click(),
    ]);
    const saved = await download.path();
    const seconds = (performance.now() - started) / 1000;
    const m = await monitor.stop();

    const mb = bytes / 1e6;
    const [cpuSender, cpuReceiver] = m.cpuMs;
    run.seconds = +seconds.toFixed(3);
    run.mb_per_s = +(mb / seconds).toFixed(2);
    run.cpu_ms = { sender: Math.round(cpuSender), receiver: Math.round(cpuReceiver), total: Math.round(cpuSender + cpuReceiver) };
    const rounded = (t: Record<string, number>) =>
      Object.fromEntries(Object.entries(t).map(([k, v]) => [k, Math.round(v)]));
    run.cpu_ms_by_type = { sender: rounded(m.cpuMsByType[0]), receiver: rounded(m.cpuMsByType[1]) };
    run.cpu_ms_per_mb = {
      sender: +(cpuSender / mb).toFixed(2),
      receiver: +(cpuReceiver / mb).toFixed(2),
      total: +((cpuSender + cpuReceiver) / mb).toFixed(2),
    };
    run.rss_before_mib = { sender: +m.rssBefore[0].toFixed(1), receiver: +m.rssBefore[1].toFixed(1) };
    run.rss_peak_growth_mib = { sender: +m.rssGrowth[0].toFixed(1), receiver: +m.rssGrowth[1].toFixed(1) };
    run.rss_samples = monitor.samples;
    run.processes = { sender: m.processes[0], receiver: m.processes[1] };

    // Checks, outside the measured window.
    run.saved_bytes = statSync(saved).size;
    run.sha256_ok = run.saved_bytes === bytes && (await sha256File(saved)) === digest;
    await download.delete(); // a 4 GiB run should not keep a second copy around
    expect(run.saved_bytes, 'saved size').toBe(bytes);
    expect(run.sha256_ok, 'SHA-256 of the saved file equals the source').toBe(true);
    await expect(row.getByTestId('file-status')).toContainText(run.side === 'app' ? 'verified' : 'done');
  } finally {
    await Promise.all([senderChromium.close(), receiverChromium.close()]);
  }
}

// ---------------------------------------------------------------------------------------------
// Table

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const mid = Math.floor(s.length / 2);
  return s.length % 2 ? s[mid] : (s[mid - 1] + s[mid]) / 2;
}

function fmt(x: number): string {
  const a = Math.abs(x);
  return a >= 100 ? x.toFixed(0) : a >= 10 ? x.toFixed(1) : x.toFixed(2);
}

/** "median (min–max)", or the single value. */
function cell(xs: number[]): string {
  if (xs.length === 0) return '—';
  if (xs.length === 1) return fmt(xs[0]);
  return `${fmt(median(xs))} (${fmt(Math.min(...xs))}–${fmt(Math.max(...xs))})`;
}

const METRICS: { head: string; get: (r: Run) => number }[] = [
  { head: 'MB/s', get: (r) => r.mb_per_s! },
  { head: 'CPU-ms/MB both', get: (r) => r.cpu_ms_per_mb!.total },
  { head: 'CPU-ms/MB sender', get: (r) => r.cpu_ms_per_mb!.sender },
  { head: 'CPU-ms/MB receiver', get: (r) => r.cpu_ms_per_mb!.receiver },
  { head: 'peak RSS growth sender MiB', get: (r) => r.rss_peak_growth_mib!.sender },
  { head: 'peak RSS growth receiver MiB', get: (r) => r.rss_peak_growth_mib!.receiver },
];

function table(sizeMib: number): string {
  const ok = runs.filter((r) => r.size_mib === sizeMib && !r.error);
  const failed = runs.filter((r) => r.size_mib === sizeMib && r.error);
  const lines = [
    `\n### ${sizeMib} MiB, ${ROUNDS} round(s): click → saved file; median (min–max); MB = 10^6 bytes`,
    `| side | runs | ${METRICS.map((m) => m.head).join(' | ')} |`,
    `|---|---|${METRICS.map(() => '---|').join('')}`,
  ];
  for (const side of SIDES) {
    const rs = ok.filter((r) => r.side === side);
    lines.push(`| ${side} | ${rs.length} | ${METRICS.map((m) => cell(rs.map(m.get))).join(' | ')} |`);
  }
  if (SIDES.length === 2) {
    // Ratio of the medians; in brackets the range of per-round ratios (rounds where both sides ran).
    const raw = ok.filter((r) => r.side === 'raw');
    const app = ok.filter((r) => r.side === 'app');
    const ratios = METRICS.map((m) => {
      const rawMed = raw.length ? median(raw.map(m.get)) : NaN;
      const appMed = app.length ? median(app.map(m.get)) : NaN;
      if (!(Math.abs(rawMed) > 1e-9) || Number.isNaN(appMed)) return '—';
      const perRound: number[] = [];
      for (const a of app) {
        const r = raw.find((x) => x.round === a.round);
        if (r && Math.abs(m.get(r)) > 1e-9) perRound.push(m.get(a) / m.get(r));
      }
      const range = perRound.length > 1 ? ` (${fmt(Math.min(...perRound))}–${fmt(Math.max(...perRound))})` : '';
      return `${fmt(appMed / rawMed)}${range}`;
    });
    lines.push(`| app/raw | | ${ratios.join(' | ')} |`);
  }
  for (const f of failed) lines.push(`\nFAILED: ${f.side} round ${f.round}: ${f.error}`);
  return lines.join('\n');
}

// ---------------------------------------------------------------------------------------------

for (const sizeMib of SIZES_MIB) {
  test(`transfer ${sizeMib} MiB: app vs raw DataChannel`, async () => {
    const bytes = sizeMib * MiB;
    const perRunMs = 180_000 + (bytes / FLOOR_BYTES_PER_SEC) * 1000 + (bytes / 100e6) * 1000; // setup + transfer + hash
    test.setTimeout(120_000 + (bytes / 50e6) * 1000 + ROUNDS * SIDES.length * perRunMs);

    const dir = tempDir();
    try {
      const file = path.join(dir, `bench-${sizeMib}MiB.bin`);
      const t = performance.now();
      const digest = await randomFileStreamed(file, bytes);
      console.log(`${sizeMib} MiB random file written and hashed in ${((performance.now() - t) / 1000).toFixed(1)} s`);

      for (let round = 0; round < ROUNDS; round++) {
        const order = round % 2 === 0 ? SIDES : [...SIDES].reverse();
        for (const [position, side] of order.entries()) {
          const run: Run = { size_mib: sizeMib, side, round, position, started_at: new Date().toISOString() };
          runs.push(run);
          try {
            await runOnce(run, file, digest);
            console.log(
              `${sizeMib} MiB round ${round} ${side}: ${run.mb_per_s} MB/s, CPU-ms/MB ${run.cpu_ms_per_mb!.total} ` +
                `(sender ${run.cpu_ms_per_mb!.sender}, receiver ${run.cpu_ms_per_mb!.receiver}), ` +
                `RSS growth sender ${run.rss_peak_growth_mib!.sender} MiB, receiver ${run.rss_peak_growth_mib!.receiver} MiB`,
            );
          } catch (e) {
            run.error = String((e as Error)?.message ?? e).split('\n')[0];
            console.log(`${sizeMib} MiB round ${round} ${side}: FAILED: ${run.error}`);
          }
          saveJson();
        }
      }
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }

    console.log(table(sizeMib));
    console.log(`\nruns as JSON: ${OUT}`);
    const failed = runs.filter((r) => r.size_mib === sizeMib && r.error);
    expect(failed.map((r) => `${r.side} round ${r.round}: ${r.error}`)).toEqual([]);
  });
}
