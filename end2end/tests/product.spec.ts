import { test, expect, type Page, type Download } from '@playwright/test';
import { mkdirSync, statSync } from 'node:fs';
import path from 'node:path';
import { launch, openPage, hydrated, tempDir, randomFile, writeFile, sha256, shareLink, browserRssMiB } from './browsers';
import { tamperingProxy } from './proxy';

const MiB = 1024 * 1024;

/** Collects `count` downloads on a page; resolves with the suggested name and SHA-256 of each. */
function collectDownloads(page: Page, count: number): Promise<{ name: string; sha: string }[]> {
  return new Promise((resolve, reject) => {
    const got: Download[] = [];
    const timer = setTimeout(() => reject(new Error(`only ${got.length}/${count} downloads`)), 150_000);
    page.on('download', async (d) => {
      got.push(d);
      if (got.length === count) {
        clearTimeout(timer);
        const out = [];
        for (const dl of got) out.push({ name: dl.suggestedFilename(), sha: sha256(await dl.path()) });
        resolve(out);
      }
    });
  });
}

test('one sender, two receivers at once: every file verified, list live, MB/s and memory reported', async () => {
  const dir = tempDir();
  mkdirSync(path.join(dir, 'sub'));
  const sources = [
    writeFile(dir, 'empty.bin', Buffer.alloc(0)),
    randomFile(dir, 'one.bin', 1),
    randomFile(dir, 'mib.bin', MiB),
    randomFile(dir, 'big.bin', 48 * MiB),
    writeFile(dir, 'naïve résumé ✓.txt', Buffer.from('ünïcödé\n'.repeat(100), 'utf8')),
    randomFile(path.join(dir, 'sub'), 'one.bin', 7), // same name as another file
  ];
  const expected = sources.map((p) => ({ name: path.basename(p), sha: sha256(p) }));
  const key = (f: { name: string; sha: string }) => `${f.name}:${f.sha}`;

  const browsers = await Promise.all([launch(), launch(), launch()]);
  const [senderBrowser, aBrowser, bBrowser] = browsers;
  try {
    const sender = await openPage(senderBrowser, '/');
    await hydrated(sender);
    await sender.getByTestId('file-input').setInputFiles(sources);
    await expect(sender.getByTestId('file-item')).toHaveCount(6);
    const url = await shareLink(sender);

    const [a, b] = await Promise.all([openPage(aBrowser, url), openPage(bBrowser, url)]);
    for (const r of [a, b]) {
      await expect(r.getByTestId('status')).toContainText('Connected');
      await expect(r.getByTestId('file-item')).toHaveCount(6);
    }
    await expect(sender.getByTestId('peer-count')).toHaveText('2');

    // One receiver alone: the 48 MiB file.
    const before = { sender: await browserRssMiB(senderBrowser), receiver: await browserRssMiB(aBrowser) };
    const bigItem = a.getByTestId('file-item').filter({ hasText: 'big.bin' });
    const t0 = Date.now();
    const [single] = await Promise.all([a.waitForEvent('download', { timeout: 120_000 }), bigItem.getByTestId('download').click()]);
    expect(sha256(await single.path())).toBe(sha256(sources[3]));
    const singleSecs = (Date.now() - t0) / 1000;
    await expect(bigItem.getByTestId('file-status')).toHaveText('verified');
    const rss = { sender: await browserRssMiB(senderBrowser), receiver: await browserRssMiB(aBrowser) };

    // Both receivers press "download all" at the same time: B fetches all six files, A the five it
    // has not downloaded yet.
    const totalBytes = sources.reduce((n, p) => n + statSync(p).size, 0);
    const t1 = Date.now();
    const gotA = collectDownloads(a, 5);
    const gotB = collectDownloads(b, 6);
    await Promise.all([a.getByTestId('download-all').click(), b.getByTestId('download-all').click()]);
    const [filesA, filesB] = await Promise.all([gotA, gotB]);
    const bothSecs = (Date.now() - t1) / 1000;
    expect(filesB.map(key).sort()).toEqual(expected.map(key).sort());
    expect(filesA.map(key).sort()).toEqual(expected.filter((f) => f.name !== 'big.bin').map(key).sort());
    for (const r of [a, b]) {
      const statuses = r.getByTestId('file-status');
      for (let i = 0; i < 6; i++) await expect(statuses.nth(i)).toHaveText('verified');
    }

    // The sender adds another file: it appears on a watching receiver without reload.
    const late = randomFile(dir, 'late.bin', 4096);
    await sender.getByTestId('file-input').setInputFiles([late]);
    await expect(a.getByTestId('file-item').filter({ hasText: 'late.bin' })).toHaveCount(1);
    // ... and removing one makes it disappear.
    await sender.getByTestId('file-item').filter({ hasText: 'mib.bin' }).getByTestId('remove').click();
    await expect(a.getByTestId('file-item').filter({ hasText: 'mib.bin' })).toHaveCount(0);
    await expect(b.getByTestId('file-item')).toHaveCount(6);

    const mb = (bytes: number, s: number) => (bytes / 1e6 / s).toFixed(1);
    console.log(`one receiver, 48 MiB: ${singleSecs.toFixed(2)} s = ${mb(48 * MiB, singleSecs)} MB/s`);
    const bothBytes = 2 * totalBytes - 48 * MiB;
    console.log(`two receivers at once (A: 5 files, B: 6 files): ${bothSecs.toFixed(2)} s = ${mb(bothBytes, bothSecs)} MB/s aggregate`);
    console.log(
      `browser RSS (all processes) before → after the 48 MiB transfer: sender ${before.sender.toFixed(0)} → ${rss.sender.toFixed(0)} MiB, ` +
        `receiver ${before.receiver.toFixed(0)} → ${rss.receiver.toFixed(0)} MiB`,
    );
  } finally {
    await Promise.all(browsers.map((b) => b.close()));
  }
});

test('the sender closing mid-transfer is shown to the receiver within 5 s, and the download pauses', async () => {
  const dir = tempDir();
  const big = randomFile(dir, 'big.bin', 48 * MiB);
  const [senderBrowser, receiverBrowser] = await Promise.all([launch(), launch()]);
  try {
    const sender = await openPage(senderBrowser, '/');
    await hydrated(sender);
    await sender.getByTestId('file-input').setInputFiles([big]);
    const receiver = await openPage(receiverBrowser, await shareLink(sender));
    await expect(receiver.getByTestId('status')).toContainText('Connected');
    const item = receiver.getByTestId('file-item');
    await item.getByTestId('download').click();
    await expect(item.getByTestId('file-status')).toHaveText('transferring');
    await sender.close();
    await expect(receiver.getByTestId('status')).toContainText('sender went away', { timeout: 5_000 });
    // Not failed: what arrived is kept, and the page waits for the sender to come back.
    await expect(item.getByTestId('file-status')).toHaveText('paused — reconnecting', { timeout: 5_000 });
    await expect(item.getByTestId('cancel')).toBeVisible();
  } finally {
    await senderBrowser.close();
    await receiverBrowser.close();
  }
});

test('a link with a missing or wrong secret says it is incomplete or damaged, and connects nothing', async () => {
  const dir = tempDir();
  const file = randomFile(dir, 'secret.bin', 1000);
  const [senderBrowser, receiverBrowser] = await Promise.all([launch(), launch()]);
  try {
    const sender = await openPage(senderBrowser, '/');
    await hydrated(sender);
    await sender.getByTestId('file-input').setInputFiles([file]);
    const url = await shareLink(sender);

    const missing = await openPage(receiverBrowser, url.split('#')[0]);
    await expect(missing.getByTestId('error')).toContainText('incomplete or damaged');

    const wrongSecret = url.replace(/#([0-9a-f]{32})$/, (_, s: string) => '#' + (s[0] === '0' ? '1' : '0') + s.slice(1));
    expect(wrongSecret).not.toBe(url);
    const wrong = await openPage(receiverBrowser, wrongSecret);
    await expect(wrong.getByTestId('error')).toContainText('incomplete or damaged');
    await expect(wrong.getByTestId('file-item')).toHaveCount(0);
    await expect(sender.getByTestId('peer-count')).toHaveText('0');
  } finally {
    await senderBrowser.close();
    await receiverBrowser.close();
  }
});

test('a signaling payload altered in transit is refused and the error is shown', async ({ baseURL }) => {
  const proxy = await tamperingProxy(baseURL!);
  const dir = tempDir();
  const file = randomFile(dir, 'tamper.bin', 1000);
  const [senderBrowser, receiverBrowser] = await Promise.all([launch(), launch()]);
  try {
    const sender = await openPage(senderBrowser, '/');
    await hydrated(sender);
    await sender.getByTestId('file-input').setInputFiles([file]);
    const link = new URL(await shareLink(sender));
    // The receiver reaches the server only through the man in the middle.
    const receiver = await openPage(receiverBrowser, `${proxy.url}${link.pathname}${link.hash}`);
    await expect(receiver.getByTestId('error')).toContainText('incomplete or damaged');
    expect(proxy.tampered()).toBeGreaterThan(0);
    await expect(receiver.getByTestId('file-item')).toHaveCount(0);
    await expect(sender.getByTestId('peer-count')).toHaveText('0');
  } finally {
    await senderBrowser.close();
    await receiverBrowser.close();
    await proxy.close();
  }
});

test('a chosen folder keeps its relative paths; a dropped file is added too', async () => {
  const dir = tempDir();
  const album = path.join(dir, 'album');
  mkdirSync(path.join(album, 'deep'), { recursive: true });
  const inner = randomFile(album, 'one.bin', 300);
  const deeper = writeFile(path.join(album, 'deep'), 'x.txt', Buffer.from('deep file\n'));
  const [senderBrowser, receiverBrowser] = await Promise.all([launch(), launch()]);
  try {
    const sender = await openPage(senderBrowser, '/');
    await hydrated(sender);
    await sender.getByTestId('folder-input').setInputFiles(album);
    // A file dropped on the drop zone (a synthetic drop carrying a File).
    const dataTransfer = await sender.evaluateHandle(() => {
      const dt = new DataTransfer();
      dt.items.add(new File(['dropped bytes'], 'dropped.txt', { type: 'text/plain' }));
      return dt;
    });
    await sender.getByTestId('drop-zone').dispatchEvent('drop', { dataTransfer });
    await expect(sender.getByTestId('file-item')).toHaveCount(3);

    const receiver = await openPage(receiverBrowser, await shareLink(sender));
    await expect(receiver.getByTestId('status')).toContainText('Connected');
    await expect(receiver.getByTestId('file-item').filter({ hasText: 'album/one.bin' })).toHaveCount(1);
    await expect(receiver.getByTestId('file-item').filter({ hasText: 'album/deep/x.txt' })).toHaveCount(1);
    await expect(receiver.getByTestId('file-item').filter({ hasText: 'dropped.txt' })).toHaveCount(1);

    const item = receiver.getByTestId('file-item').filter({ hasText: 'album/deep/x.txt' });
    const [dl] = await Promise.all([receiver.waitForEvent('download'), item.getByTestId('download').click()]);
    expect(dl.suggestedFilename()).toBe('x.txt');
    expect(sha256(await dl.path())).toBe(sha256(deeper));
    const one = receiver.getByTestId('file-item').filter({ hasText: 'album/one.bin' });
    const [dl2] = await Promise.all([receiver.waitForEvent('download'), one.getByTestId('download').click()]);
    expect(sha256(await dl2.path())).toBe(sha256(inner));
  } finally {
    await senderBrowser.close();
    await receiverBrowser.close();
  }
});
