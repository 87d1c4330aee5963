// Transfers that survive: a reloaded receiver, a cut connection and a damaged block all end in a
// verified file, and only what was missing crosses again.
import { test, expect, type Page, type BrowserContext } from '@playwright/test';
import { launch, openPage, hydrated, tempDir, randomFile, sha256, shareLink, until, trackPeerConnections, bytesSent } from './browsers';
import { BASE_URL } from '../playwright.config';

const MiB = 1024 * 1024;

/** Records every text the status line and the file statuses show, in every page of a context
 * (including after reloads), so a state that lasts a moment is still seen. */
async function recordStatuses(context: BrowserContext): Promise<void> {
  await context.addInitScript(() => {
    const seen: string[] = [];
    (window as unknown as { __seen: string[] }).__seen = seen;
    const record = () =>
      document.querySelectorAll('[data-testid="status"], [data-testid="file-status"]').forEach((e) => {
        const text = e.textContent ?? '';
        if (seen[seen.length - 1] !== text && !seen.includes(text)) seen.push(text);
      });
    new MutationObserver(record).observe(document, { subtree: true, childList: true, characterData: true });
  });
}

async function seen(page: Page): Promise<string[]> {
  return page.evaluate(() => (window as unknown as { __seen: string[] }).__seen ?? []);
}

/** The fraction (0..1) of a file row's progress bar. */
async function fraction(page: Page, name: string): Promise<number> {
  const bar = page.getByTestId('file-item').filter({ hasText: name }).locator('progress');
  return Number((await bar.getAttribute('value')) ?? 0);
}


test('a receiver reloaded mid-transfer resumes where it stopped: verified, and little sent twice', async () => {
  const size = 64 * MiB;
  const dir = tempDir();
  const file = randomFile(dir, 'resume-64MiB.bin', size);
  const [senderBrowser, receiverBrowser] = await Promise.all([launch(), launch()]);
  try {
    const sender = await openPage(senderBrowser, '/');
    const complaints: string[] = [];
    sender.on('console', (m) => {
      if (m.type() === 'error' || m.type() === 'warning') complaints.push(`sender: ${m.text()}`);
    });
    await hydrated(sender);
    await sender.getByTestId('file-input').setInputFiles([file]);
    const url = await shareLink(sender);

    const context = await receiverBrowser.newContext({ acceptDownloads: true });
    await recordStatuses(context);
    const receiver = await context.newPage();
    receiver.on('console', (m) => {
      if (m.type() === 'error' || m.type() === 'warning') complaints.push(`receiver: ${m.text()}`);
    });
    await receiver.goto(url);
    await expect(receiver.getByTestId('status')).toContainText('Connected');
    const item = receiver.getByTestId('file-item').filter({ hasText: 'resume-64MiB.bin' });
    await item.getByTestId('download').click();
    await until('a third of the file', async () => (await fraction(receiver, 'resume-64MiB.bin')) >= 0.33, 60_000, 50);

    // Reload: the page starts from nothing but what it left in OPFS.
    const download = receiver.waitForEvent('download', { timeout: 120_000 });
    download.catch(() => {}); // awaited below; an earlier failure is the one to report
    await receiver.reload();
    const saved = await download
      .then((d) => d.path())
      .catch(async (e) => {
        // Say where it stood, so a failure here can be told apart from the others.
        const rows = await item.textContent({ timeout: 2000 }).catch(() => '(no row)');
        const senderSide = await sender.locator('main').textContent({ timeout: 2000 }).catch(() => '(no page)');
        throw new Error(`${e}\nstatuses seen after the reload: ${(await seen(receiver)).join(' → ')}\nrow: ${rows}\nsender page: ${senderSide}\nconsole: ${complaints.join(' | ')}`);
      });
    expect(sha256(saved)).toBe(sha256(file));
    await expect(item.getByTestId('file-status')).toHaveText('verified');
    const statuses = await seen(receiver);
    const resumed = statuses.find((s) => /^resuming at \d+ %$/.test(s));
    expect(resumed, statuses.join(' | ')).toBeTruthy();
    expect(Number(resumed!.match(/\d+/)![0])).toBeGreaterThanOrEqual(20);

    // Only what was not stored crossed again.
    const sent = await bytesSent(sender);
    console.log(`reload at ≥33 %: sender sent ${(sent / MiB).toFixed(1)} MiB for a ${size / MiB} MiB file (${statuses.join(' → ')})`);
    expect(sent).toBeGreaterThanOrEqual(size);
    expect(sent).toBeLessThan(size + 8 * MiB);
  } finally {
    await senderBrowser.close();
    await receiverBrowser.close();
  }
});

test('a connection cut mid-transfer comes back by itself and the file completes', async () => {
  const size = 48 * MiB;
  const dir = tempDir();
  const file = randomFile(dir, 'cut-48MiB.bin', size);
  const [senderBrowser, receiverBrowser] = await Promise.all([launch(), launch()]);
  try {
    const senderContext = await senderBrowser.newContext();
    await trackPeerConnections(senderContext);
    const sender = await senderContext.newPage();
    await sender.goto('/');
    await hydrated(sender);
    await sender.getByTestId('file-input').setInputFiles([file]);
    const url = await shareLink(sender);

    const context = await receiverBrowser.newContext({ acceptDownloads: true });
    await recordStatuses(context);
    const receiver = await context.newPage();
    await receiver.goto(url);
    await expect(receiver.getByTestId('status')).toContainText('Connected');
    const item = receiver.getByTestId('file-item').filter({ hasText: 'cut-48MiB.bin' });
    const download = receiver.waitForEvent('download', { timeout: 120_000 });
    download.catch(() => {}); // awaited below; an earlier failure is the one to report
    await item.getByTestId('download').click();
    await until('a quarter of the file', async () => (await fraction(receiver, 'cut-48MiB.bin')) >= 0.25, 60_000, 50);

    // Cut it: the sender's peer connection to this receiver closes under it.
    const closed = await sender.evaluate(() => {
      const pcs = (window as unknown as { __pcs: RTCPeerConnection[] }).__pcs;
      pcs.forEach((pc) => pc.close());
      return pcs.length;
    });
    expect(closed).toBeGreaterThan(0);

    const saved = await (await download).path();
    expect(sha256(saved)).toBe(sha256(file));
    await expect(item.getByTestId('file-status')).toHaveText('verified');
    await expect(receiver.getByTestId('status')).toContainText('Connected');
    const statuses = await seen(receiver);
    expect(statuses.some((s) => s.startsWith('Paused — reconnecting')), statuses.join(' | ')).toBe(true);
    expect(statuses.some((s) => /^resuming at \d+ %$/.test(s)), statuses.join(' | ')).toBe(true);
    const sent = await bytesSent(sender);
    console.log(`cut at ≥25 %: sender sent ${(sent / MiB).toFixed(1)} MiB for ${size / MiB} MiB (${statuses.join(' → ')})`);
    expect(sent).toBeLessThan(size + 8 * MiB);
  } finally {
    await senderBrowser.close();
    await receiverBrowser.close();
  }
});

test('a block damaged on the way is fetched again alone and the file verifies', async () => {
  const size = 8 * MiB + 12345;
  const dir = tempDir();
  const file = randomFile(dir, 'damaged.bin', size);
  const [senderBrowser, receiverBrowser] = await Promise.all([launch(), launch()]);
  try {
    // Test hook: the sender flips a byte of block 3 (after hashing it) the first time it sends it.
    const sender = await openPage(senderBrowser, '/?corrupt_block=3');
    await hydrated(sender);
    await sender.getByTestId('file-input').setInputFiles([file]);
    const receiver = await openPage(receiverBrowser, await shareLink(sender));
    await expect(receiver.getByTestId('status')).toContainText('Connected');
    const item = receiver.getByTestId('file-item').filter({ hasText: 'damaged.bin' });
    const [dl] = await Promise.all([receiver.waitForEvent('download'), item.getByTestId('download').click()]);
    expect(sha256(await dl.path())).toBe(sha256(file));
    await expect(item.getByTestId('file-status')).toHaveText('verified');
    // Exactly one block (1 MiB) crossed twice.
    expect(await bytesSent(sender)).toBe(size + MiB);
  } finally {
    await senderBrowser.close();
    await receiverBrowser.close();
  }
});

test('a sender that reloads keeps its link; the receiver resumes once the file is added again', async () => {
  const size = 40 * MiB;
  const dir = tempDir();
  const file = randomFile(dir, 'sender-reload.bin', size);
  const [senderBrowser, receiverBrowser] = await Promise.all([launch(), launch()]);
  try {
    const sender = await openPage(senderBrowser, '/');
    const consoles: string[] = [];
    sender.on('console', (m) => consoles.push(`sender ${m.type()}: ${m.text()}`));
    await hydrated(sender);
    await sender.getByTestId('file-input').setInputFiles([file]);
    const link = await shareLink(sender);

    const context = await receiverBrowser.newContext({ acceptDownloads: true });
    await recordStatuses(context);
    const receiver = await context.newPage();
    receiver.on('console', (m) => consoles.push(`receiver ${m.type()}: ${m.text()}`));
    await receiver.goto(link);
    await expect(receiver.getByTestId('status')).toContainText('Connected');
    const item = receiver.getByTestId('file-item').filter({ hasText: 'sender-reload.bin' });
    const download = receiver.waitForEvent('download', { timeout: 120_000 });
    download.catch(() => {}); // awaited below; an earlier failure is the one to report
    await item.getByTestId('download').click();
    await until('a third of the file', async () => (await fraction(receiver, 'sender-reload.bin')) >= 0.33, 60_000, 50);

    // The sender's tab reloads: same link, and the page asks for the file it lost.
    await sender.reload();
    await hydrated(sender);
    expect(await shareLink(sender)).toBe(link);
    await expect(sender.getByTestId('missing-files')).toContainText('sender-reload.bin');
    // The receiver said so (the words may already have given way to its rejoining).
    await until('the receiver to say the sender went away', async () => (await seen(receiver)).some((s) => s.includes('sender went away')), 30_000);
    await sender.getByTestId('file-input').setInputFiles([file]);
    await expect(sender.getByTestId('missing-files')).toHaveCount(0);

    const saved = await download.then((d) => d.path()).catch(async (e) => {
      // What each side said, to tell a stall from a slow machine.
      console.log(`receiver statuses: ${(await seen(receiver)).join(' → ')}`);
      console.log(`receiver now: ${await item.getByTestId('file-status').textContent()}; sender: ${await sender.locator('.receiver').allTextContents()}`);
      console.log(consoles.join('\n'));
      throw e;
    });
    expect(sha256(saved)).toBe(sha256(file));
    await expect(item.getByTestId('file-status')).toHaveText('verified');
    const statuses = await seen(receiver);
    expect(statuses.some((s) => /^resuming at [1-9]\d* %$/.test(s)), statuses.join(' | ')).toBe(true);
    // The reloaded page sent only the rest (plus what the break lost).
    const sent = await bytesSent(sender);
    console.log(`sender reload at ≥33 %: the reloaded sender sent ${(sent / MiB).toFixed(1)} MiB of ${size / MiB} MiB`);
    expect(sent).toBeLessThan(size * 0.67 + 8 * MiB);
  } finally {
    await senderBrowser.close();
    await receiverBrowser.close();
  }
});

test('a sender that reloads reads its dropped files again by itself where the browser keeps their handles', async () => {
  const size = 24 * MiB;
  const [senderBrowser, receiverBrowser] = await Promise.all([launch(), launch()]);
  try {
    const senderContext = await senderBrowser.newContext({ baseURL: BASE_URL });
    // Headless drops carry no File System Access handles; stand them in with OPFS files, which
    // have the same interface (and are always readable, as a granted handle is).
    await senderContext.addInitScript(() => {
      const handles = new Map<string, FileSystemFileHandle>();
      (window as unknown as { __handles: typeof handles }).__handles = handles;
      Object.defineProperty(DataTransferItem.prototype, 'getAsFileSystemHandle', {
        configurable: true,
        value: function (this: DataTransferItem) {
          const file = this.getAsFile();
          return Promise.resolve((file && handles.get(file.name)) ?? null);
        },
      });
    });
    const sender = await senderContext.newPage();
    await sender.goto('/');
    await hydrated(sender);
    // The "file on disk": 24 MiB of random bytes in an OPFS file, and its SHA-256.
    const digest = await sender.evaluate(async (size) => {
      const root = await navigator.storage.getDirectory();
      const handle = await root.getFileHandle('dropped-24MiB.bin', { create: true });
      const writable = await handle.createWritable();
      const chunk = new Uint8Array(65536);
      for (let at = 0; at < size; at += chunk.length) {
        crypto.getRandomValues(chunk);
        await writable.write(chunk);
      }
      await writable.close();
      (window as unknown as { __handles: Map<string, FileSystemFileHandle> }).__handles.set('dropped-24MiB.bin', handle);
      const bytes = await (await handle.getFile()).arrayBuffer();
      return [...new Uint8Array(await crypto.subtle.digest('SHA-256', bytes))].map((b) => b.toString(16).padStart(2, '0')).join('');
    }, size);
    const dataTransfer = await sender.evaluateHandle(async () => {
      const root = await navigator.storage.getDirectory();
      const file = await (await root.getFileHandle('dropped-24MiB.bin')).getFile();
      const dt = new DataTransfer();
      dt.items.add(file);
      return dt;
    });
    await sender.getByTestId('drop-zone').dispatchEvent('drop', { dataTransfer });
    await expect(sender.getByTestId('file-item')).toHaveCount(1);
    const link = await shareLink(sender);

    const receiver = await openPage(receiverBrowser, link);
    await expect(receiver.getByTestId('status')).toContainText('Connected');
    const item = receiver.getByTestId('file-item').filter({ hasText: 'dropped-24MiB.bin' });
    const download = receiver.waitForEvent('download', { timeout: 120_000 });
    download.catch(() => {}); // awaited below; an earlier failure is the one to report
    await item.getByTestId('download').click();
    await until('a third of the file', async () => (await fraction(receiver, 'dropped-24MiB.bin')) >= 0.33, 60_000, 50);

    // Reload: the page reads the dropped file again through its kept handle, unasked.
    await sender.reload();
    await hydrated(sender);
    await expect(sender.getByTestId('file-item')).toHaveCount(1);
    await expect(sender.getByTestId('missing-files')).toHaveCount(0);
    const saved = await (await download).path();
    expect(sha256(saved)).toBe(digest);
    await expect(item.getByTestId('file-status')).toHaveText('verified');
    expect(await bytesSent(sender)).toBeLessThan(size * 0.67 + 8 * MiB);
  } finally {
    await senderBrowser.close();
    await receiverBrowser.close();
  }
});
