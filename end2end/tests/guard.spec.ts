// What a sender spends on strangers and on a change of mind: joins without the link's secret
// cost it no connection at all, and a cancelled download stops its sending within a second
// (downloading again picks up where it stopped).
import { test, expect } from '@playwright/test';
import { launch, openPage, hydrated, tempDir, randomFile, sha256, shareLink, until, trackPeerConnections, peerConnections, bytesSent } from './browsers';
import { BASE_URL } from '../playwright.config';

const MiB = 1024 * 1024;

test('200 joins without the secret leave the sender with no peer connection', async () => {
  const dir = tempDir();
  const file = randomFile(dir, 'guarded.bin', 256 * 1024);
  const [senderBrowser, strangerBrowser] = await Promise.all([launch(), launch()]);
  try {
    const senderContext = await senderBrowser.newContext({ baseURL: BASE_URL });
    await trackPeerConnections(senderContext);
    const sender = await senderContext.newPage();
    await sender.goto('/');
    await hydrated(sender);
    await sender.getByTestId('file-input').setInputFiles([file]);
    const link = await shareLink(sender);
    const share = new URL(link).pathname.split('/').pop()!;

    // A stranger who knows the share id (it is in the URL path, so in proxy logs) but not the
    // secret after '#': it joins, and sends the sender a "hello" it cannot seal.
    const stranger = await openPage(strangerBrowser, '/healthz');
    const t0 = Date.now();
    // 20 strangers, 10 joins each (Chromium opens WebSockets to one host one at a time, slowly
    // when many wait, so fewer sockets keep the test short; the sender sees 200 joins either way).
    const joined = await stranger.evaluate(async (share) => {
      const url = location.origin.replace(/^http/, 'ws') + '/ws';
      let joined = 0;
      await Promise.all(
        Array.from(
          { length: 20 },
          () =>
            new Promise<void>((resolve) => {
              const ws = new WebSocket(url);
              let left = 10;
              ws.onmessage = (e) => {
                const m = JSON.parse(e.data);
                if (m.type === 'welcome') ws.send(JSON.stringify({ type: 'join', share }));
                else if (m.type === 'joined') {
                  joined += 1;
                  ws.send(JSON.stringify({ type: 'signal', to: m.sender, payload: 'a hello not sealed with the secret' }));
                  left -= 1;
                  if (left > 0) ws.send(JSON.stringify({ type: 'join', share }));
                  else setTimeout(() => (ws.close(), resolve()), 50);
                } else if (m.type === 'error') {
                  ws.close();
                  resolve();
                }
              };
              ws.onerror = () => resolve();
            }),
        ),
      );
      return joined;
    }, share);
    expect(joined).toBe(200);
    console.log(`joins took ${((Date.now() - t0) / 1000).toFixed(1)} s`);
    // Give the sender time to (wrongly) react, then count.
    await sender.waitForTimeout(2_000);
    expect(await peerConnections(sender)).toBe(0);
    await expect(sender.getByTestId('receiver')).toHaveCount(0);
    console.log(`${joined} joins without the secret: the sender made ${await peerConnections(sender)} peer connections`);

    // The count is live: a receiver with the link gets one.
    const t1 = Date.now();
    const receiver = await openPage(strangerBrowser, link);
    await expect(receiver.getByTestId('status')).toContainText('Connected to the sender');
    console.log(`the receiver connected in ${((Date.now() - t1) / 1000).toFixed(1)} s`);
    expect(await peerConnections(sender)).toBe(1);
  } finally {
    await senderBrowser.close();
    await strangerBrowser.close();
  }
});

test('a cancelled download stops the sender within a second; downloading again resumes and verifies', async () => {
  const size = 64 * MiB;
  const dir = tempDir();
  const file = randomFile(dir, 'cancel-64MiB.bin', size);
  const [senderBrowser, receiverBrowser] = await Promise.all([launch(), launch()]);
  try {
    const sender = await openPage(senderBrowser, '/');
    await hydrated(sender);
    await sender.getByTestId('file-input').setInputFiles([file]);
    const receiver = await openPage(receiverBrowser, await shareLink(sender));
    await expect(receiver.getByTestId('status')).toContainText('Connected to the sender');
    const item = receiver.getByTestId('file-item').filter({ hasText: 'cancel-64MiB.bin' });
    await item.getByTestId('download').click();
    await until('a quarter of the file sent', async () => (await bytesSent(sender)) >= size / 4, 60_000, 50);

    await item.getByTestId('cancel').click();
    await expect(item.getByTestId('file-status')).toHaveText('ready');
    // The sender's count is redrawn twice a second: read it a second and a half after the
    // click (the stop plus a redraw), and again later.
    await sender.waitForTimeout(1_500);
    const stopped = await bytesSent(sender);
    await sender.waitForTimeout(2_000);
    const later = await bytesSent(sender);
    console.log(`cancel at ≥25 %: the sender had sent ${(stopped / MiB).toFixed(1)} MiB 1.5 s after, ${(later / MiB).toFixed(1)} MiB 3.5 s after`);
    expect(later).toBe(stopped);
    expect(stopped).toBeLessThan(size);

    // Downloading again asks only for what is missing, and the file verifies.
    const [dl] = await Promise.all([receiver.waitForEvent('download', { timeout: 120_000 }), item.getByTestId('download').click()]);
    expect(sha256(await dl.path())).toBe(sha256(file));
    await expect(item.getByTestId('file-status')).toHaveText('verified');
    const total = await bytesSent(sender);
    console.log(`downloaded again: ${(total / MiB).toFixed(1)} MiB sent in all for ${size / MiB} MiB`);
    expect(total).toBeLessThan(size + 8 * MiB);
  } finally {
    await senderBrowser.close();
    await receiverBrowser.close();
  }
});
