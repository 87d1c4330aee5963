// HTTPS for LAN use. A page reached by a LAN name or address over plain http is not a secure
// context, so it has no OPFS, clipboard or service worker; `beamdrop --self-signed` serves HTTPS
// with a certificate made at start and prints its fingerprint for a person to compare.
//
// "beamdrop.lan" stands in for a LAN address: the browsers resolve it to 127.0.0.1 (so every
// packet stays on this machine), and since it is not "localhost" or a loopback literal, Chromium
// treats it like any other host. The browsers skip certificate checks (a person would accept the
// certificate after comparing fingerprints); the test compares the fingerprint the server printed
// with the certificate it serves.
import { test, expect, chromium, type Browser } from '@playwright/test';
import { spawn, type ChildProcess } from 'node:child_process';
import path from 'node:path';
import tls from 'node:tls';
import { CHROMIUM_ARGS, openPage, hydrated, tempDir, randomFile, sha256, shareLink, until, freePort } from './browsers';
import { PORT } from '../playwright.config';

const ROOT = path.join(__dirname, '..', '..');
const LAN_NAME = 'beamdrop.lan';

function launchLan(): Promise<Browser> {
  const args = CHROMIUM_ARGS.filter((a) => !a.startsWith('--host-resolver-rules=')).concat([
    `--host-resolver-rules=MAP ${LAN_NAME} 127.0.0.1 , MAP * ~NOTFOUND , EXCLUDE localhost , EXCLUDE 127.0.0.1`,
    '--ignore-certificate-errors',
  ]);
  return chromium.launch({ executablePath: process.env.CHROMIUM_PATH ?? '/usr/bin/chromium', args });
}

/** The certificate's SHA-256 fingerprint as a TLS client sees it. */
function servedFingerprint(port: number): Promise<string> {
  return new Promise((resolve, reject) => {
    const socket = tls.connect({ host: '127.0.0.1', port, rejectUnauthorized: false, servername: 'localhost' }, () => {
      resolve(socket.getPeerCertificate().fingerprint256);
      socket.destroy();
    });
    socket.once('error', reject);
  });
}

test('over a LAN name: http is no secure context; --self-signed HTTPS is, prints the served fingerprint, and a file crosses', async () => {
  const port = await freePort();
  let stdout = '';
  const server: ChildProcess = spawn(
    path.join(ROOT, 'target', 'release', 'beamdrop'),
    ['--listen', `127.0.0.1:${port}`, '--self-signed'],
    { cwd: ROOT, stdio: ['ignore', 'pipe', 'ignore'], env: { ...process.env, LEPTOS_SITE_ROOT: 'target/site', RUST_LOG: 'warn' } },
  );
  server.stdout!.on('data', (d) => (stdout += d.toString()));
  const browsers = [await launchLan(), await launchLan()];
  try {
    await until('the fingerprint line', async () => /fingerprint: ([0-9A-F:]{95})/.test(stdout), 30_000);
    const printed = stdout.match(/fingerprint: ([0-9A-F:]{95})/)![1];
    expect(await servedFingerprint(port)).toBe(printed);

    // Plain http by the same name (the test suite's server): the page loads but is not a secure context.
    const plain = await openPage(browsers[0], `http://${LAN_NAME}:${PORT}/`);
    expect(await plain.evaluate(() => window.isSecureContext)).toBe(false);
    await plain.context().close();

    const dir = tempDir();
    const file = randomFile(dir, 'over-https.bin', 8 * 1024 * 1024 + 5);
    const sender = await openPage(browsers[0], `https://${LAN_NAME}:${port}/`);
    expect(await sender.evaluate(() => window.isSecureContext)).toBe(true);
    await hydrated(sender);
    await sender.getByTestId('file-input').setInputFiles([file]);
    const link = await shareLink(sender);
    expect(link.startsWith(`https://${LAN_NAME}:${port}/s/`)).toBe(true);

    const receiver = await openPage(browsers[1], link);
    expect(await receiver.evaluate(() => window.isSecureContext && typeof navigator.storage.getDirectory === 'function')).toBe(true);
    await expect(receiver.getByTestId('status')).toContainText('Connected');
    const item = receiver.getByTestId('file-item').filter({ hasText: 'over-https.bin' });
    const [dl] = await Promise.all([receiver.waitForEvent('download'), item.getByTestId('download').click()]);
    expect(sha256(await dl.path())).toBe(sha256(file));
    await expect(item.getByTestId('file-status')).toHaveText('verified');
  } finally {
    await Promise.all(browsers.map((b) => b.close()));
    server.kill('SIGKILL');
  }
});
