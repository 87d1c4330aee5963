// "Download all" on a share with folders: the tree arrives as a tree, into a chosen folder where
// the browser has a folder picker, else as one ZIP; and a hostile sender's paths stay inside.
// Into a chosen folder, or a file chosen with "Save as…", bytes are written straight there.
import { test, expect, type BrowserContext, type Page } from '@playwright/test';
import { mkdirSync } from 'node:fs';
import path from 'node:path';
import { launch, hydrated, tempDir, randomFile, writeFile, sha256, shareLink, until, bytesSent, noFolderPicker, zipContents } from './browsers';
import { BASE_URL } from '../playwright.config';

/** Headless Chromium cannot show a folder picker: stand one in that "picks" an OPFS folder,
 * which has the same FileSystemDirectoryHandle interface as a folder on disk. */
async function pickOpfsFolder(context: BrowserContext): Promise<void> {
  await context.addInitScript(() => {
    (window as unknown as { showDirectoryPicker: () => Promise<FileSystemDirectoryHandle> }).showDirectoryPicker =
      async () => (await navigator.storage.getDirectory()).getDirectoryHandle('picked', { create: true });
  });
}

/** The same for the save dialog ("Save as…"): it "picks" `saved-<suggested name>` in OPFS. */
async function pickOpfsFile(context: BrowserContext): Promise<void> {
  await context.addInitScript(() => {
    (window as unknown as { showSaveFilePicker: (o: { suggestedName: string }) => Promise<FileSystemFileHandle> }).showSaveFilePicker =
      async (options) => (await navigator.storage.getDirectory()).getFileHandle(`saved-${options.suggestedName}`, { create: true });
  });
}

/** Every file under the OPFS folder `picked` (name → SHA-256), the top-level OPFS entries, and
 * every file the app keeps in OPFS itself (under `beamdrop/`: partial downloads it stages). */
async function pickedTree(page: Page): Promise<{ files: Record<string, string>; top: string[]; staged: string[] }> {
  return page.evaluate(async () => {
    const hex = (buf: ArrayBuffer) => [...new Uint8Array(buf)].map((b) => b.toString(16).padStart(2, '0')).join('');
    const files: Record<string, string> = {};
    const walk = async (dir: FileSystemDirectoryHandle, prefix: string) => {
      // @ts-expect-error: async iteration over a directory handle
      for await (const [name, handle] of dir.entries()) {
        if (handle.kind === 'directory') await walk(handle, `${prefix}${name}/`);
        else files[`${prefix}${name}`] = hex(await crypto.subtle.digest('SHA-256', await (await handle.getFile()).arrayBuffer()));
      }
    };
    const root = await navigator.storage.getDirectory();
    const top: string[] = [];
    // @ts-expect-error: async iteration over a directory handle
    for await (const name of root.keys()) top.push(name);
    await walk(await root.getDirectoryHandle('picked'), '');
    const staged: string[] = [];
    const list = async (dir: FileSystemDirectoryHandle, prefix: string) => {
      // @ts-expect-error: async iteration over a directory handle
      for await (const [name, handle] of dir.entries()) {
        if (handle.kind === 'directory') await list(handle, `${prefix}${name}/`);
        else staged.push(`${prefix}${name}`);
      }
    };
    if (top.includes('beamdrop')) await list(await root.getDirectoryHandle('beamdrop'), '');
    return { files, top, staged };
  });
}

test('a folder with subfolders and same-named files arrives as a tree: into a chosen folder, or as one ZIP', async () => {
  const dir = tempDir();
  const album = path.join(dir, 'album');
  mkdirSync(path.join(album, 'a'), { recursive: true });
  mkdirSync(path.join(album, 'b', 'deep'), { recursive: true });
  const files = {
    'album/a/same.txt': writeFile(path.join(album, 'a'), 'same.txt', Buffer.from('in a\n')),
    'album/b/same.txt': writeFile(path.join(album, 'b'), 'same.txt', Buffer.from('in b, longer\n')),
    'album/b/deep/big.bin': randomFile(path.join(album, 'b', 'deep'), 'big.bin', 3 * 1024 * 1024 + 7),
    'album/empty.bin': writeFile(album, 'empty.bin', Buffer.alloc(0)),
  };
  const want = Object.fromEntries(Object.entries(files).map(([k, p]) => [k, sha256(p)]));
  const browsers = await Promise.all([launch(), launch(), launch()]);
  try {
    const sender = await (await browsers[0].newContext({ baseURL: BASE_URL })).newPage();
    await sender.goto('/');
    await hydrated(sender);
    await sender.getByTestId('folder-input').setInputFiles(album);
    await expect(sender.getByTestId('file-item')).toHaveCount(4);
    const link = await shareLink(sender);

    // A browser with a folder picker: the tree is written into the chosen folder.
    const pickerContext = await browsers[1].newContext({ acceptDownloads: true });
    await pickOpfsFolder(pickerContext);
    const picker = await pickerContext.newPage();
    await picker.goto(link);
    await expect(picker.getByTestId('status')).toContainText('Connected');
    await picker.getByTestId('download-all').click();
    const statuses = picker.getByTestId('file-status');
    for (let i = 0; i < 4; i++) await expect(statuses.nth(i)).toHaveText('verified');
    const tree = await pickedTree(picker);
    expect(tree.files).toEqual(want);
    // Written straight into the folder: nothing was staged in the app's own OPFS space first.
    expect(tree.staged).toEqual([]);

    // Without one: one ZIP, named after the folder, holding the same tree.
    const zipContext = await browsers[2].newContext({ acceptDownloads: true });
    await noFolderPicker(zipContext);
    const zipper = await zipContext.newPage();
    await zipper.goto(link);
    await expect(zipper.getByTestId('status')).toContainText('Connected');
    const [zip] = await Promise.all([zipper.waitForEvent('download'), zipper.getByTestId('download-all').click()]);
    expect(zip.suggestedFilename()).toBe('album.zip');
    expect(zipContents(await zip.path())).toEqual(want);
    for (let i = 0; i < 4; i++) await expect(zipper.getByTestId('file-status').nth(i)).toHaveText('verified');
  } finally {
    await Promise.all(browsers.map((b) => b.close()));
  }
});

test('a hostile sender naming paths with ../ cannot write outside the chosen folder', async () => {
  const dir = tempDir();
  const file = randomFile(dir, 'payload.bin', 5000);
  const [senderBrowser, receiverBrowser] = await Promise.all([launch(), launch()]);
  try {
    const senderContext = await senderBrowser.newContext({ baseURL: BASE_URL });
    // The sender's page is tampered with: every file list it sends names a path outside.
    await senderContext.addInitScript(() => {
      const send = RTCDataChannel.prototype.send;
      RTCDataChannel.prototype.send = function (this: RTCDataChannel, data: unknown) {
        if (typeof data === 'string' && data.startsWith('{"type":"manifest"')) {
          const msg = JSON.parse(data);
          for (const f of msg.files) f.path = `../../../../etc/cron.d/${f.name}`;
          data = JSON.stringify(msg);
        }
        return send.call(this, data as string);
      } as typeof RTCDataChannel.prototype.send;
    });
    const sender = await senderContext.newPage();
    await sender.goto('/');
    await hydrated(sender);
    await sender.getByTestId('file-input').setInputFiles([file]);
    const link = await shareLink(sender);

    const context = await receiverBrowser.newContext({ acceptDownloads: true });
    await pickOpfsFolder(context);
    const receiver = await context.newPage();
    await receiver.goto(link);
    await expect(receiver.getByTestId('status')).toContainText('Connected');
    const item = receiver.getByTestId('file-item');
    await expect(item.getByTestId('file-name')).toHaveText('etc/cron.d/payload.bin');

    // One file: a plain download, under its bare name.
    const [dl] = await Promise.all([receiver.waitForEvent('download'), item.getByTestId('download').click()]);
    expect(dl.suggestedFilename()).toBe('payload.bin');
    expect(sha256(await dl.path())).toBe(sha256(file));

    // "Download all" into a folder: it lands inside it, at the made-safe path.
    const fresh = await context.newPage();
    await fresh.goto(link);
    await expect(fresh.getByTestId('status')).toContainText('Connected');
    await fresh.getByTestId('download-all').click();
    await expect(fresh.getByTestId('file-status')).toHaveText('verified');
    const tree = await pickedTree(fresh);
    expect(tree.files).toEqual({ 'etc/cron.d/payload.bin': sha256(file) });
    expect(tree.top.sort()).toEqual(['beamdrop', 'picked']);
  } finally {
    await senderBrowser.close();
    await receiverBrowser.close();
  }
});

test('a download into a chosen folder shows up there only whole: stopped halfway it leaves nothing, then arrives verified', async () => {
  const dir = tempDir();
  const folder = path.join(dir, 'clips');
  mkdirSync(path.join(folder, 'day1'), { recursive: true });
  const big = randomFile(path.join(folder, 'day1'), 'take.bin', 48 * 1024 * 1024);
  const [senderBrowser, receiverBrowser] = await Promise.all([launch(), launch()]);
  try {
    const sender = await (await senderBrowser.newContext({ baseURL: BASE_URL })).newPage();
    await sender.goto('/');
    await hydrated(sender);
    await sender.getByTestId('folder-input').setInputFiles(folder);
    await expect(sender.getByTestId('file-item')).toHaveCount(1);
    const link = await shareLink(sender);

    const context = await receiverBrowser.newContext({ acceptDownloads: true });
    await pickOpfsFolder(context);
    const receiver = await context.newPage();
    await receiver.goto(link);
    await expect(receiver.getByTestId('status')).toContainText('Connected');
    const item = receiver.getByTestId('file-item');
    await receiver.getByTestId('download-all').click();
    await until('a quarter of the file sent', async () => (await bytesSent(sender)) > 12 * 1024 * 1024, 60_000);
    await item.getByTestId('cancel').click();
    await expect(item.getByTestId('file-status')).toHaveText('ready');
    // Stopped: nothing under the file's name, nothing staged.
    await until('the stopped file gone from the folder', async () => {
      const tree = await pickedTree(receiver);
      return Object.keys(tree.files).length === 0 && tree.staged.length === 0;
    }, 10_000);

    // Asked again: it arrives whole, in its place in the tree.
    await item.getByTestId('download').click();
    await expect(item.getByTestId('file-status')).toHaveText('verified', { timeout: 120_000 });
    const tree = await pickedTree(receiver);
    expect(tree.files).toEqual({ 'clips/day1/take.bin': sha256(big) });
    expect(tree.staged).toEqual([]);
  } finally {
    await senderBrowser.close();
    await receiverBrowser.close();
  }
});

test('"Save as…" writes the file straight into the file chosen in the save dialog', async () => {
  const dir = tempDir();
  const file = randomFile(dir, 'report.bin', 20 * 1024 * 1024 + 5);
  const [senderBrowser, receiverBrowser] = await Promise.all([launch(), launch()]);
  try {
    const sender = await (await senderBrowser.newContext({ baseURL: BASE_URL })).newPage();
    await sender.goto('/');
    await hydrated(sender);
    await sender.getByTestId('file-input').setInputFiles([file]);
    const link = await shareLink(sender);

    const context = await receiverBrowser.newContext({ acceptDownloads: true });
    await pickOpfsFile(context);
    const receiver = await context.newPage();
    let downloads = 0;
    receiver.on('download', () => downloads++);
    await receiver.goto(link);
    await expect(receiver.getByTestId('status')).toContainText('Connected');
    const item = receiver.getByTestId('file-item');
    await item.getByTestId('save-as').click();
    await expect(item.getByTestId('file-status')).toHaveText('verified', { timeout: 120_000 });
    const saved = await receiver.evaluate(async () => {
      const hex = (buf: ArrayBuffer) => [...new Uint8Array(buf)].map((b) => b.toString(16).padStart(2, '0')).join('');
      const root = await navigator.storage.getDirectory();
      const top: string[] = [];
      // @ts-expect-error: async iteration over a directory handle
      for await (const name of root.keys()) top.push(name);
      const handle = await root.getFileHandle('saved-report.bin');
      return { top, hash: hex(await crypto.subtle.digest('SHA-256', await (await handle.getFile()).arrayBuffer())) };
    });
    expect(saved.hash).toBe(sha256(file));
    // Nothing staged in the app's OPFS space, and no second copy through the downloads folder.
    expect(saved.top).toEqual(['saved-report.bin']);
    expect(downloads).toBe(0);
  } finally {
    await senderBrowser.close();
    await receiverBrowser.close();
  }
});
