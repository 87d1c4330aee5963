// Pairing without the server (issue 11): the sender's offer code is pasted at /pair, the answer's
// code is pasted back, and the files cross as they do through a link: listed, downloaded, verified.
import { test, expect, type Page } from '@playwright/test';
import path from 'node:path';
import { launch, openPage, hydrated, tempDir, randomFile, sha256, download } from './browsers';

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
