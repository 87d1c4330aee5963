import { test, expect } from '@playwright/test';
import path from 'node:path';
import { closeSync, openSync, statSync, truncateSync } from 'node:fs';
import { launch, openPage, hydrated, tempDir, randomFile, writeFile, sha256, download, bytesSent } from './browsers';

test('a 32 MiB random file and a non-ASCII name cross between two browsers intact', async () => {
  const dir = tempDir();
  const big = randomFile(dir, 'random-32MiB.bin', 32 * 1024 * 1024);
  const unicodeName = 'Grüße — 日本語 ✓.txt';
  const unicode = writeFile(dir, unicodeName, Buffer.from('héllo wörld\n'.repeat(1000), 'utf8'));

  const senderBrowser = await launch();
  const receiverBrowser = await launch();
  try {
    const sender = await openPage(senderBrowser, '/');
    await hydrated(sender);
    await sender.getByTestId('file-input').setInputFiles([big, unicode]);
    await expect(sender.getByTestId('file-item')).toHaveCount(2);
    const link = sender.getByTestId('share-link');
    await expect(link).toHaveAttribute('href', /\/s\/[0-9a-f]{32}#[0-9a-f]{32}$/);
    const url = (await link.getAttribute('href'))!;

    const receiver = await openPage(receiverBrowser, url);
    await hydrated(receiver);
    await expect(receiver.getByTestId('file-item')).toHaveCount(2);
    await expect(receiver.getByTestId('status')).toContainText('Connected');
    await expect(sender.getByTestId('peer-count')).toHaveText('1');

    const one = await download(receiver, 'random-32MiB.bin');
    expect(one.suggested).toBe('random-32MiB.bin');
    expect(statSync(one.saved).size).toBe(32 * 1024 * 1024);
    expect(sha256(one.saved)).toBe(sha256(big));
    const mbps = 32 * 1.048576 / one.seconds;
    console.log(`32 MiB: ${one.seconds.toFixed(2)} s click-to-verified-download = ${mbps.toFixed(1)} MB/s`);

    const two = await download(receiver, unicodeName);
    expect(two.suggested).toBe(unicodeName);
    expect(sha256(two.saved)).toBe(sha256(unicode));
  } finally {
    await senderBrowser.close();
    await receiverBrowser.close();
  }
});

test('an unknown share says so in the server-rendered page, before any WASM runs', async () => {
  const browser = await launch();
  try {
    const page = await openPage(browser, '/s/0123456789abcdef0123456789abcdef#00', false);
    await expect(page.getByTestId('error')).toContainText('not available');
  } finally {
    await browser.close();
  }
});

test('the sender leaving is shown to the receiver', async () => {
  const dir = tempDir();
  const file = randomFile(dir, 'small.bin', 1000);
  const senderBrowser = await launch();
  const receiverBrowser = await launch();
  try {
    const sender = await openPage(senderBrowser, '/');
    await hydrated(sender);
    await sender.getByTestId('file-input').setInputFiles([file]);
    const url = (await sender.getByTestId('share-link').getAttribute('href'))!;
    const receiver = await openPage(receiverBrowser, url);
    await expect(receiver.getByTestId('status')).toContainText('Connected');
    await sender.close();
    await expect(receiver.getByTestId('status')).toContainText('sender went away', { timeout: 10_000 });
  } finally {
    await senderBrowser.close();
    await receiverBrowser.close();
  }
});

test('a browser with no storage worker receives in memory, still block by block and verified', async () => {
  const dir = tempDir();
  const files = [randomFile(dir, 'in-memory.bin', 3 * 1024 * 1024 + 5), writeFile(dir, 'small.txt', Buffer.from('hello\n'))];
  const senderBrowser = await launch();
  const receiverBrowser = await launch();
  try {
    const sender = await openPage(senderBrowser, '/');
    await hydrated(sender);
    await sender.getByTestId('file-input').setInputFiles(files);
    const url = (await sender.getByTestId('share-link').getAttribute('href'))!;
    const context = await receiverBrowser.newContext({ acceptDownloads: true });
    // No module workers here (as in some embedded browsers): the page must fall back.
    await context.addInitScript(() => Object.defineProperty(window, 'Worker', { value: undefined }));
    const receiver = await context.newPage();
    await receiver.goto(url);
    await expect(receiver.getByTestId('status')).toContainText('Connected');
    for (const file of files) {
      const one = await download(receiver, path.basename(file));
      expect(sha256(one.saved)).toBe(sha256(file));
    }
  } finally {
    await senderBrowser.close();
    await receiverBrowser.close();
  }
});

test('without disk storage a file over 512 MiB is refused with a clear message, and the rest still arrives', async () => {
  const dir = tempDir();
  // Sparse: 513 MiB on paper, nothing on disk (the receiver refuses it before a byte moves).
  const huge = path.join(dir, 'too-big-for-memory.bin');
  closeSync(openSync(huge, 'w'));
  truncateSync(huge, 513 * 1024 * 1024);
  const small = randomFile(dir, 'fits.bin', 256 * 1024);
  const [senderBrowser, receiverBrowser] = await Promise.all([launch(), launch()]);
  try {
    const sender = await openPage(senderBrowser, '/');
    await hydrated(sender);
    await sender.getByTestId('file-input').setInputFiles([huge, small]);
    const url = (await sender.getByTestId('share-link').getAttribute('href'))!;
    const context = await receiverBrowser.newContext({ acceptDownloads: true });
    await context.addInitScript(() => Object.defineProperty(window, 'Worker', { value: undefined }));
    const receiver = await context.newPage();
    await receiver.goto(url);
    await expect(receiver.getByTestId('status')).toContainText('Connected');
    const item = receiver.getByTestId('file-item').filter({ hasText: 'too-big-for-memory.bin' });
    const status = item.getByTestId('file-status');
    // Asked first, while the in-memory sink starts: refused once it is up.
    await item.getByTestId('download').click();
    await expect(status).toContainText('too large to receive here');
    await expect(status).toContainText('512 MiB');
    // The other file arrives, verified.
    const one = await download(receiver, 'fits.bin');
    expect(sha256(one.saved)).toBe(sha256(small));
    // Asked again with the sink running: refused at once, and nothing was received.
    await item.getByTestId('download').click();
    await expect(status).toContainText('too large to receive here');
    expect(await bytesSent(sender)).toBe(256 * 1024);
  } finally {
    await senderBrowser.close();
    await receiverBrowser.close();
  }
});
