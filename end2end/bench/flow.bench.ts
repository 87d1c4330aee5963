// Flow-control benchmark: one 64 MiB file, sender → receiver in two Chromium instances, for several
// chunk sizes and water marks (set through the sender page's `?chunk=&high=&low=` overrides).
// Settings run interleaved, round after round, so a noisy machine affects them alike; the table
// gives the median MB/s of each and its ratio to the default.
import { test, expect } from '@playwright/test';
import { launch, openPage, hydrated, tempDir, randomFile, sha256, shareLink } from '../tests/browsers';

const MiB = 1024 * 1024;
const SIZE_MIB = Number(process.env.BENCH_MIB ?? 64);
const ROUNDS = Number(process.env.BENCH_ROUNDS ?? 3);

const SETTINGS: { name: string; query: string }[] = [
  { name: 'default (64K, 4M/1M)', query: '' },
  { name: 'chunk 16K', query: 'chunk=16384' },
  { name: 'chunk 32K', query: 'chunk=32768' },
  { name: 'chunk 128K', query: 'chunk=131072' },
  { name: 'chunk 256K-12', query: 'chunk=262132' },
  { name: 'marks 1M/256K', query: 'high=1048576&low=262144' },
  { name: 'marks 8M/2M', query: 'high=8388608&low=2097152' },
  { name: 'marks 14M/4M', query: 'high=14680064&low=4194304' },
];

test('flow control: chunk size and water marks', async () => {
  const dir = tempDir();
  const file = randomFile(dir, 'bench.bin', SIZE_MIB * MiB);
  const digest = sha256(file);
  const results = new Map<string, number[]>(SETTINGS.map((s) => [s.name, []]));
  const [senderBrowser, receiverBrowser] = await Promise.all([launch(), launch()]);
  try {
    for (let round = 0; round < ROUNDS; round++) {
      for (const setting of SETTINGS) {
        const sender = await openPage(senderBrowser, `/?${setting.query}`);
        await hydrated(sender);
        await sender.getByTestId('file-input').setInputFiles([file]);
        const receiver = await openPage(receiverBrowser, await shareLink(sender));
        await expect(receiver.getByTestId('status')).toContainText('Connected');
        const started = Date.now();
        const [dl] = await Promise.all([
          receiver.waitForEvent('download', { timeout: 300_000 }),
          receiver.getByTestId('download').click(),
        ]);
        const saved = await dl.path();
        const secs = (Date.now() - started) / 1000;
        expect(sha256(saved)).toBe(digest);
        results.get(setting.name)!.push((SIZE_MIB * MiB) / 1e6 / secs);
        await receiver.context().close();
        await sender.context().close();
      }
    }
  } finally {
    await senderBrowser.close();
    await receiverBrowser.close();
  }
  const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
  const base = median(results.get(SETTINGS[0].name)!);
  console.log(`\n${SIZE_MIB} MiB, ${ROUNDS} rounds, median MB/s (click to verified download):`);
  console.log('| setting | MB/s (median) | runs | ratio to default |');
  console.log('|---|---|---|---|');
  for (const s of SETTINGS) {
    const xs = results.get(s.name)!;
    const m = median(xs);
    console.log(`| ${s.name} | ${m.toFixed(1)} | ${xs.map((x) => x.toFixed(1)).join(', ')} | ${(m / base).toFixed(2)} |`);
  }
});
