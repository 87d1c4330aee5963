// Pairing without the server (issue 11): the sender's offer code is pasted at /pair, the answer's
// code is pasted back, and the files cross as they do through a link: listed, downloaded, verified.
import { test, expect, type Page } from '@playwright/test';
import { spawn, type ChildProcess } from 'node:child_process';
import path from 'node:path';
import { launch, openPage, hydrated, tempDir, randomFile, sha256, download, until, freePort } from './browsers';

const ROOT = path.join(__dirname, '..', '..');

/** Starts a pairing on the sender's page and returns its offer code. */
async function offerCode(sender: Page): Promise<string> {
  await sender.getByTestId('pair-start').click();
  const offer = sender.getByTestId('pair-offer');
  await expect(offer).toHaveValue(/^bd1o\.[A-Za-z0-9_-]+$/, { timeout: 15_000 });
  return offer.inputValue();
}

/** Pastes `offer` at /pair on the receiver's page and returns the answer's code. */
async function answerCode(receiver: Page, offer: string): Promise<string> {
  await receiver.getByTestId('pair-offer-input').fill(offer);
  await receiver.getByTestId('pair-accept').click();
  const answer = receiver.getByTestId('pair-answer-code');
  await expect(answer).toHaveValue(/^bd1a\.[A-Za-z0-9_-]+$/, { timeout: 15_000 });
  return answer.inputValue();
}

test('two codes copied between the pages pair them without the server, and a file crosses verified', async () => {
  const dir = tempDir();
  const file = randomFile(dir, 'paired-8MiB.bin', 8 * 1024 * 1024);
  const [senderBrowser, receiverBrowser] = await Promise.all([launch(), launch()]);
  try {
    const sender = await openPage(senderBrowser, '/');
    await hydrated(sender);
    await sender.getByTestId('file-input').setInputFiles([file]);
    const offer = await offerCode(sender);
    console.log(`offer code: ${offer.length} characters`);

    const receiver = await openPage(receiverBrowser, '/pair');
    await hydrated(receiver);
    const answer = await answerCode(receiver, offer);
    console.log(`answer code: ${answer.length} characters`);

    await sender.getByTestId('pair-answer').fill(answer);
    await sender.getByTestId('pair-connect').click();
    await expect(receiver.getByTestId('status')).toContainText('Connected to the sender');
    // The pairing is done: its codes are gone from the sender's page, and it counts a receiver.
    await expect(sender.getByTestId('pair-offer')).toHaveCount(0);
    await expect(sender.getByTestId('pair-error')).toHaveCount(0);
    const { saved } = await download(receiver, path.basename(file));
    expect(sha256(saved)).toBe(sha256(file));
    await expect(receiver.getByTestId('file-item').getByTestId('file-status')).toHaveText('verified');
    // No server to find the sender again through: a broken pairing says so at once.
    await sender.close();
    await expect(receiver.getByTestId('error')).toContainText('cannot be mended', { timeout: 15_000 });
  } finally {
    await senderBrowser.close();
    await receiverBrowser.close();
  }
});

test('a pairing code in the wrong place, damaged or answering another offer is refused with a clear message', async () => {
  const dir = tempDir();
  const file = randomFile(dir, 'refused.bin', 64 * 1024);
  const [senderBrowser, receiverBrowser] = await Promise.all([launch(), launch()]);
  try {
    const sender = await openPage(senderBrowser, '/');
    await hydrated(sender);
    await sender.getByTestId('file-input').setInputFiles([file]);
    const first = await offerCode(sender);

    const receiver = await openPage(receiverBrowser, '/pair');
    await hydrated(receiver);
    // Not a code, then a damaged one: refused on the spot.
    await receiver.getByTestId('pair-offer-input').fill('https://example.com/s/123');
    await receiver.getByTestId('pair-accept').click();
    await expect(receiver.getByTestId('error')).toContainText('not a beamdrop pairing code');
    await receiver.getByTestId('pair-offer-input').fill(first.slice(0, first.length / 2));
    await receiver.getByTestId('pair-accept').click();
    await expect(receiver.getByTestId('error')).toContainText('damaged or incomplete');
    const staleAnswer = await answerCode(receiver, first);

    // The sender starts over: the answer to the first offer no longer fits.
    const second = await offerCode(sender);
    expect(second).not.toBe(first);
    await sender.getByTestId('pair-answer').fill(staleAnswer);
    await sender.getByTestId('pair-connect').click();
    await expect(sender.getByTestId('pair-error')).toContainText('belongs to another pairing code');
    // An offer pasted where the answer goes says so.
    await sender.getByTestId('pair-answer').fill(second);
    await sender.getByTestId('pair-connect').click();
    await expect(sender.getByTestId('pair-error')).toContainText('this is an offer code');
    await expect(receiver.getByTestId('status')).not.toContainText('Connected to the sender');
  } finally {
    await senderBrowser.close();
    await receiverBrowser.close();
  }
});

/** Waits until the page's service worker controls it and keeps the WASM for offline use. */
async function keptOffline(page: Page): Promise<void> {
  await page.evaluate(() => navigator.serviceWorker.ready.then(() => undefined));
  // What this first load fetched went by before the worker existed: load once more through it.
  await page.reload();
  await hydrated(page);
  await until('the offline copy of the app', () =>
    page.evaluate(async () => {
      const kept = await (await caches.open('beamdrop-shell-v1')).keys();
      return ['.wasm', '.js', '.css'].every((ext) => kept.some((r) => new URL(r.url).pathname.endsWith(ext)));
    }),
  );
}

test('with the server stopped, both pages open from their offline copy, pair by hand, and a file crosses verified', async () => {
  const port = await freePort();
  const base = `http://127.0.0.1:${port}`;
  const server: ChildProcess = spawn(path.join(ROOT, 'target', 'release', 'beamdrop'), ['--listen', `127.0.0.1:${port}`], {
    cwd: ROOT,
    stdio: 'ignore',
    env: { ...process.env, LEPTOS_SITE_ROOT: 'target/site', LEPTOS_SITE_PKG_DIR: 'pkg', LEPTOS_ENV: 'PROD', RUST_LOG: 'warn' },
  });
  const dir = tempDir();
  const file = randomFile(dir, 'offline-4MiB.bin', 4 * 1024 * 1024 + 17);
  const [senderBrowser, receiverBrowser] = await Promise.all([launch(), launch()]);
  try {
    await until('the server', async () => (await fetch(`${base}/healthz`)).ok);
    // One visit each while the server is up.
    const sender = await openPage(senderBrowser, `${base}/`);
    await hydrated(sender);
    await keptOffline(sender);
    const receiver = await openPage(receiverBrowser, `${base}/pair`);
    await hydrated(receiver);
    await keptOffline(receiver);

    // The server goes away; both pages are opened again.
    const gone = new Promise((resolve) => server.once('exit', resolve));
    server.kill('SIGKILL');
    await gone;
    await expect(fetch(`${base}/healthz`)).rejects.toThrow();
    await sender.reload();
    await hydrated(sender);
    await receiver.reload();
    await hydrated(receiver);

    await sender.getByTestId('file-input').setInputFiles([file]);
    const answer = await answerCode(receiver, await offerCode(sender));
    await sender.getByTestId('pair-answer').fill(answer);
    await sender.getByTestId('pair-connect').click();
    await expect(receiver.getByTestId('status')).toContainText('Connected to the sender');
    const { saved } = await download(receiver, path.basename(file));
    expect(sha256(saved)).toBe(sha256(file));
  } finally {
    server.kill('SIGKILL');
    await senderBrowser.close();
    await receiverBrowser.close();
  }
});
