// Screenshots of both pages at desktop and phone widths, light and dark, into docs/screenshots/.
// Run: cd end2end && npx playwright test --config bench.config.ts screenshots
import { test, expect, type Browser } from '@playwright/test';
import path from 'node:path';
import { launch, hydrated, tempDir, randomFile, writeFile, shareLink } from '../tests/browsers';
import { BASE_URL } from '../playwright.config';

const OUT = path.join(__dirname, '..', '..', 'docs', 'screenshots');
const VIEWPORTS = { desktop: { width: 1280, height: 900 }, phone: { width: 390, height: 844 } };

async function page(browser: Browser, url: string, viewport: { width: number; height: number }, dark: boolean) {
  const context = await browser.newContext({ baseURL: BASE_URL, viewport, colorScheme: dark ? 'dark' : 'light' });
  const p = await context.newPage();
  await p.goto(url);
  return p;
}

test('screenshots', async () => {
  const dir = tempDir();
  const files = [
    randomFile(dir, 'holiday-photos.zip', 3 * 1024 * 1024),
    writeFile(dir, 'Grüße — notes.txt', Buffer.from('hello\n'.repeat(300))),
    randomFile(dir, 'slides.pdf', 700 * 1024),
  ];
  const [senderBrowser, receiverBrowser] = await Promise.all([launch(), launch()]);
  try {
    for (const dark of [false, true]) {
      for (const [name, viewport] of Object.entries(VIEWPORTS)) {
        const suffix = `${name}${dark ? '-dark' : ''}`;
        const sender = await page(senderBrowser, '/', viewport, dark);
        await hydrated(sender);
        await sender.screenshot({ path: path.join(OUT, `send-empty-${suffix}.png`), fullPage: true });
        await sender.getByTestId('file-input').setInputFiles(files);
        const link = await shareLink(sender);
        const receiver = await page(receiverBrowser, link, viewport, dark);
        await expect(receiver.getByTestId('status')).toContainText('Connected');
        const item = receiver.getByTestId('file-item').filter({ hasText: 'slides.pdf' });
        await Promise.all([receiver.waitForEvent('download'), item.getByTestId('download').click()]);
        await expect(item.getByTestId('file-status')).toHaveText('verified');
        await expect(sender.getByTestId('peer-count')).toHaveText('1');
        await sender.screenshot({ path: path.join(OUT, `send-shared-${suffix}.png`), fullPage: true });
        await receiver.screenshot({ path: path.join(OUT, `receive-${suffix}.png`), fullPage: true });
        await receiver.context().close();
        await sender.context().close();
      }
    }
    // A well-formed link to a share nobody holds: the page says so and keeps checking a while.
    const gone = await page(
      receiverBrowser,
      '/s/0123456789abcdef0123456789abcdef#00112233445566778899aabbccddeeff',
      VIEWPORTS.desktop,
      false,
    );
    await hydrated(gone);
    await expect(gone.getByTestId('error')).toContainText('not available');
    await gone.screenshot({ path: path.join(OUT, 'receive-unavailable-desktop.png'), fullPage: true });
  } finally {
    await senderBrowser.close();
    await receiverBrowser.close();
  }
});
