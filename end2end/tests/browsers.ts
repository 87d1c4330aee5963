// Two separate headless Chromium instances (sender, receiver) with flags that keep every packet on
// this machine: host candidates with real addresses, no STUN/TURN, no calls home.
import { chromium, expect, type Browser, type BrowserContext, type Page } from '@playwright/test';
import { execFileSync } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { mkdtempSync, writeFileSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import net from 'node:net';
import path from 'node:path';
import { BASE_URL } from '../playwright.config';

export const CHROMIUM_ARGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  '--disable-features=WebRtcHideLocalIpsWithMdns',
  '--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE localhost , EXCLUDE 127.0.0.1',
];

/** A fresh browser (Playwright gives each launch its own temporary user-data-dir). */
export async function launch(): Promise<Browser> {
  return chromium.launch({
    executablePath: process.env.CHROMIUM_PATH ?? '/usr/bin/chromium',
    args: CHROMIUM_ARGS,
  });
}

export async function openPage(browser: Browser, url: string, javaScriptEnabled = true): Promise<Page> {
  const context = await browser.newContext({ baseURL: BASE_URL, acceptDownloads: true, javaScriptEnabled });
  const page = await context.newPage();
  page.on('pageerror', (e) => console.log(`[pageerror] ${e.message}`));
  await page.goto(url);
  return page;
}

/** Waits until the WASM client has hydrated the page. */
export async function hydrated(page: Page): Promise<void> {
  await page.locator('[data-hydrated="true"]').first().waitFor({ timeout: 30_000 });
}

export function tempDir(): string {
  return mkdtempSync(path.join(tmpdir(), 'beamdrop-e2e-'));
}

export function writeFile(dir: string, name: string, data: Buffer): string {
  const p = path.join(dir, name);
  writeFileSync(p, data);
  return p;
}

export function randomFile(dir: string, name: string, size: number): string {
  return writeFile(dir, name, randomBytes(size));
}

export function sha256(file: string): string {
  return createHash('sha256').update(readFileSync(file)).digest('hex');
}

/** Resident memory (MiB) of every process of one browser instance, from /proc via CDP's pids. */
export async function browserRssMiB(browser: Browser): Promise<number> {
  const session = await browser.newBrowserCDPSession();
  const info = (await session.send('SystemInfo.getProcessInfo')) as { processInfo: { id: number }[] };
  await session.detach();
  let kib = 0;
  for (const { id } of info.processInfo) {
    try {
      const status = readFileSync(`/proc/${id}/status`, 'utf8');
      const m = status.match(/^VmRSS:\s+(\d+) kB/m);
      if (m) kib += Number(m[1]);
    } catch {
      // the process ended meanwhile
    }
  }
  return kib / 1024;
}

/** Share link from a sender page that has files. */
export async function shareLink(sender: Page): Promise<string> {
  const link = sender.getByTestId('share-link');
  await link.waitFor();
  return (await link.getAttribute('href'))!;
}

/** Polls `check` until it holds (errors count as not yet), or fails after `ms`. */
export async function until(what: string, check: () => Promise<boolean>, ms = 20_000, every = 100): Promise<void> {
  const deadline = Date.now() + ms;
  while (Date.now() < deadline) {
    if (await check().catch(() => false)) return;
    await new Promise((r) => setTimeout(r, every));
  }
  throw new Error(`timed out waiting for ${what}`);
}

/** A loopback port free right now. */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.on('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(port));
    });
  });
}

/** Clicks a file's download button and waits until it is saved and verified: the saved path,
 * the seconds from click to saved, and the name the browser suggested. */
export async function download(
  receiver: Page,
  name: string,
  timeoutMs = 150_000,
): Promise<{ saved: string; seconds: number; suggested: string }> {
  const item = receiver.getByTestId('file-item').filter({ hasText: name });
  const button = item.getByTestId('download');
  await expect(button).toBeEnabled();
  const started = Date.now();
  const [dl] = await Promise.all([receiver.waitForEvent('download', { timeout: timeoutMs }), button.click()]);
  const saved = await dl.path();
  const seconds = (Date.now() - started) / 1000;
  await expect(item.getByTestId('file-status')).toContainText('verified');
  return { saved, seconds, suggested: dl.suggestedFilename() };
}

/** Keeps every RTCPeerConnection a page makes reachable from the test. */
export async function trackPeerConnections(context: BrowserContext): Promise<void> {
  await context.addInitScript(() => {
    const Native = window.RTCPeerConnection;
    const all: RTCPeerConnection[] = [];
    (window as unknown as { __pcs: RTCPeerConnection[] }).__pcs = all;
    window.RTCPeerConnection = class extends Native {
      constructor(config?: RTCConfiguration) {
        super(config);
        all.push(this);
      }
    } as typeof RTCPeerConnection;
  });
}

/** How many RTCPeerConnections a page of a tracked context has made. */
export async function peerConnections(page: Page): Promise<number> {
  return page.evaluate(() => (window as unknown as { __pcs: RTCPeerConnection[] }).__pcs.length);
}

/** The bytes the sender's page says it has sent. */
export async function bytesSent(sender: Page): Promise<number> {
  return Number(await sender.getByTestId('bytes-sent').getAttribute('data-bytes'));
}

/** A browser without a folder picker (Firefox, Safari). */
export async function noFolderPicker(context: BrowserContext): Promise<void> {
  await context.addInitScript(() => {
    Object.defineProperty(window, 'showDirectoryPicker', { value: undefined, configurable: true });
  });
}

/** Entry name → SHA-256 of every file in a ZIP (Python's zipfile checks each CRC as it reads). */
export function zipContents(zip: string): Record<string, string> {
  const script = [
    'import hashlib, json, sys, zipfile',
    'z = zipfile.ZipFile(sys.argv[1])',
    'print(json.dumps({i.filename: hashlib.sha256(z.read(i)).hexdigest() for i in z.infolist()}))',
  ].join('\n');
  return JSON.parse(execFileSync('python3', ['-c', script, zip]).toString());
}
