// A server that answers "busy": a receiver whose join is refused (the sender's inbox full, a rate
// limit, a backend failure) asks again and reaches the sender, or, refused every time, says so
// and offers to try again; a sender refused a link says why. The refusals are made by the test
// between the page and the server (Playwright's WebSocket routing), exactly as the server words
// them.
import { test, expect, type BrowserContext } from '@playwright/test';
import { launch, openPage, hydrated, tempDir, randomFile, sha256, shareLink, download } from './browsers';
import { BASE_URL } from '../playwright.config';

const WS_URL = BASE_URL.replace(/^http/, 'ws') + '/ws';

/** Routes the context's signaling socket through the test: client messages of `type` are
 * answered with an error `code` while `refuse()` says so; everything else passes untouched.
 * Returns how many were refused so far. */
async function refuseFromServer(
  context: BrowserContext,
  type: string,
  code: string,
  refuse: (n: number) => boolean,
): Promise<() => number> {
  let refused = 0;
  await context.routeWebSocket(WS_URL, (ws) => {
    const server = ws.connectToServer();
    ws.onMessage((message) => {
      const text = typeof message === 'string' ? message : message.toString();
      let kind = '';
      try {
        kind = JSON.parse(text).type;
      } catch {
        // not JSON: the server's business
      }
      if (kind === type && refuse(refused)) {
        refused += 1;
        ws.send(JSON.stringify({ type: 'error', code, message: `refused by the test (${code})` }));
        return;
      }
      server.send(message);
    });
  });
  return () => refused;
}

test('a join answered busy, rate limited or failed is asked again and reaches the sender', async () => {
  const dir = tempDir();
  const file = randomFile(dir, 'busy.bin', 2 * 1024 * 1024);
  const [senderBrowser, receiverBrowser] = await Promise.all([launch(), launch()]);
  try {
    const sender = await openPage(senderBrowser, '/');
    await hydrated(sender);
    await sender.getByTestId('file-input').setInputFiles([file]);
    const link = await shareLink(sender);

    for (const code of ['peer_busy', 'rate_limited', 'internal']) {
      const context = await receiverBrowser.newContext({ acceptDownloads: true });
      // The first two joins are refused.
      const refused = await refuseFromServer(context, 'join', code, (n) => n < 2);
      const receiver = await context.newPage();
      await receiver.goto(link);
      await expect(receiver.getByTestId('status')).toContainText('Connected to the sender', { timeout: 30_000 });
      expect(refused(), code).toBe(2);
      const { saved } = await download(receiver, 'busy.bin');
      expect(sha256(saved), code).toBe(sha256(file));
      console.log(`join refused twice with ${code}: asked again, connected, file verified`);
      await context.close();
    }
  } finally {
    await senderBrowser.close();
    await receiverBrowser.close();
  }
});

test('a join refused every time ends in a clear message, and trying again connects', async () => {
  const dir = tempDir();
  const file = randomFile(dir, 'busy-always.bin', 1024 * 1024);
  const [senderBrowser, receiverBrowser] = await Promise.all([launch(), launch()]);
  try {
    const sender = await openPage(senderBrowser, '/');
    await hydrated(sender);
    await sender.getByTestId('file-input').setInputFiles([file]);
    const link = await shareLink(sender);

    const context = await receiverBrowser.newContext({ acceptDownloads: true });
    let busy = true;
    const refused = await refuseFromServer(context, 'join', 'peer_busy', () => busy);
    const receiver = await context.newPage();
    const started = Date.now();
    await receiver.goto(link);
    await expect(receiver.getByTestId('status')).toContainText('server is too busy', { timeout: 60_000 });
    const gaveUpAfter = (Date.now() - started) / 1000;
    console.log(`every join refused (${refused()} times): the page said so after ${gaveUpAfter.toFixed(1)} s`);
    expect(refused()).toBeGreaterThan(2);
    // It stopped asking.
    const asked = refused();
    await receiver.waitForTimeout(3_000);
    expect(refused()).toBe(asked);

    busy = false;
    await receiver.getByTestId('retry').click();
    await expect(receiver.getByTestId('status')).toContainText('Connected to the sender', { timeout: 30_000 });
    const { saved } = await download(receiver, 'busy-always.bin');
    expect(sha256(saved)).toBe(sha256(file));
  } finally {
    await senderBrowser.close();
    await receiverBrowser.close();
  }
});

test('a sender refused a link is told why', async () => {
  const browser = await launch();
  try {
    const context = await browser.newContext({ baseURL: BASE_URL });
    await refuseFromServer(context, 'create_share', 'too_many_shares', () => true);
    const sender = await context.newPage();
    await sender.goto('/');
    await hydrated(sender);
    await expect(sender.getByTestId('error')).toContainText('Could not make a link: refused by the test');
  } finally {
    await browser.close();
  }
});
