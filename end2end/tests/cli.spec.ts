// The terminal peer (`beamdrop send` / `beamdrop receive`, the same binary as the server) with a
// browser on the other side, both ways: a folder with subfolders, a 0-byte file, a file of several
// blocks, each verified against the original.
import { test, expect } from '@playwright/test';
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdirSync, readdirSync } from 'node:fs';
import path from 'node:path';
import { launch, hydrated, tempDir, randomFile, writeFile, sha256, shareLink, noFolderPicker, zipContents } from './browsers';
import { BASE_URL } from '../playwright.config';

const BINARY = path.join(__dirname, '..', '..', 'target', 'release', 'beamdrop');

/** A tree to share: album/{a/same.txt, b/deep/big.bin (3 blocks and a bit), empty.bin}. */
function album(): { root: string; dir: string; want: Record<string, string> } {
  const dir = tempDir();
  const root = path.join(dir, 'album');
  mkdirSync(path.join(root, 'a'), { recursive: true });
  mkdirSync(path.join(root, 'b', 'deep'), { recursive: true });
  const files = {
    'album/a/same.txt': writeFile(path.join(root, 'a'), 'same.txt', Buffer.from('in a\n')),
    'album/b/deep/big.bin': randomFile(path.join(root, 'b', 'deep'), 'big.bin', 3 * 1024 * 1024 + 7),
    'album/empty.bin': writeFile(root, 'empty.bin', Buffer.alloc(0)),
  };
  return { root, dir, want: Object.fromEntries(Object.entries(files).map(([k, p]) => [k, sha256(p)])) };
}

/** Every file under `dir` (relative path → SHA-256). */
function tree(dir: string, prefix = ''): Record<string, string> {
  const out: Record<string, string> = {};
  for (const e of readdirSync(dir, { withFileTypes: true })) {
    const rel = `${prefix}${e.name}`;
    if (e.isDirectory()) Object.assign(out, tree(path.join(dir, e.name), `${rel}/`));
    else out[rel] = sha256(path.join(dir, e.name));
  }
  return out;
}

/** Runs the CLI to its end: exit code, stdout, stderr. */
function run(args: string[], timeoutMs = 120_000): Promise<{ code: number | null; out: string; err: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(BINARY, args, { env: { ...process.env, RUST_LOG: 'warn' } });
    let out = '';
    let err = '';
    child.stdout.on('data', (d) => (out += d));
    child.stderr.on('data', (d) => (err += d));
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`beamdrop ${args[0]} did not finish: ${err}`));
    }, timeoutMs);
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code, out, err });
    });
  });
}

/** Starts `beamdrop send` and waits for the link it prints. */
async function startSend(paths: string[]): Promise<{ child: ChildProcess; link: string }> {
  const child = spawn(BINARY, ['send', '--server', BASE_URL, '--no-qr', ...paths], {
    env: { ...process.env, RUST_LOG: 'warn' },
  });
  const link = await new Promise<string>((resolve, reject) => {
    let out = '';
    const timer = setTimeout(() => reject(new Error(`no link printed: ${out}`)), 20_000);
    child.stdout!.on('data', (d) => {
      out += d;
      const m = out.match(/https?:\/\/\S+\/s\/[0-9a-f]{32}#[0-9a-f]{32}/);
      if (m) {
        clearTimeout(timer);
        resolve(m[0]);
      }
    });
    child.on('exit', (code) => reject(new Error(`beamdrop send exited (${code}): ${out}`)));
  });
  return { child, link };
}

test('a browser sends a folder tree and a loose file; beamdrop receive saves them verified', async () => {
  const { root, dir, want } = album();
  const loose = randomFile(dir, 'loose.bin', 300_000);
  const browser = await launch();
  try {
    const sender = await (await browser.newContext({ baseURL: BASE_URL })).newPage();
    await sender.goto('/');
    await hydrated(sender);
    await sender.getByTestId('folder-input').setInputFiles(root);
    await sender.getByTestId('file-input').setInputFiles([loose]);
    await expect(sender.getByTestId('file-item')).toHaveCount(4);
    const link = await shareLink(sender);

    const out = path.join(tempDir(), 'received');
    const got = await run(['receive', link, '-o', out, '--quiet']);
    expect(got.err).toBe('');
    expect(got.code).toBe(0);
    expect(tree(out)).toEqual({ ...want, 'loose.bin': sha256(loose) });
    // It says where each file went.
    expect(got.out.trim().split('\n').sort()).toEqual(
      Object.keys({ ...want, 'loose.bin': '' }).map((k) => path.join(out, k)).sort(),
    );
    await expect(sender.getByTestId('peer-count')).toHaveText('0');
  } finally {
    await browser.close();
  }
});

test('beamdrop send shares a folder tree and a loose file; a browser receives them all as one ZIP, verified', async () => {
  const { root, dir, want } = album();
  const loose = randomFile(dir, 'loose.bin', 300_000);
  const { child, link } = await startSend([root, loose]);
  const browser = await launch();
  try {
    const context = await browser.newContext({ acceptDownloads: true });
    await noFolderPicker(context);
    const receiver = await context.newPage();
    await receiver.goto(link);
    await hydrated(receiver);
    await expect(receiver.getByTestId('status')).toContainText('Connected');
    await expect(receiver.getByTestId('file-item')).toHaveCount(4);

    const [zip] = await Promise.all([receiver.waitForEvent('download'), receiver.getByTestId('download-all').click()]);
    const statuses = receiver.getByTestId('file-status');
    for (let i = 0; i < 4; i++) await expect(statuses.nth(i)).toHaveText('verified');
    // Loose files and a folder together: the ZIP holds them all, each under its own path.
    expect(zipContents(await zip.path())).toEqual({ ...want, 'loose.bin': sha256(loose) });
  } finally {
    await browser.close();
    child.kill('SIGINT');
  }
});

test('beamdrop receive refuses a link whose secret is wrong, with a clear message and exit code 2', async () => {
  const dir = tempDir();
  const file = randomFile(dir, 'x.bin', 1000);
  const { child, link } = await startSend([file]);
  try {
    const wrong = link.replace(/#.*/, `#${'ab'.repeat(16)}`);
    const out = path.join(dir, 'out');
    const got = await run(['receive', wrong, '-o', out, '--quiet'], 30_000);
    expect(got.code).toBe(2);
    expect(got.err).toContain('this link is incomplete or damaged');
    expect(readdirSync(out)).toEqual([]);
  } finally {
    child.kill('SIGINT');
  }
});
