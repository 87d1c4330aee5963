// Browsers behind NATs, in network namespaces (root only; it fails, never skips, without root).
// The server runs in a "public" namespace with its built-in STUN/TURN server (a `[turn]` section
// in its config file); each browser runs in a host namespace of its own, on a private LAN behind
// a NAT router (nftables), so the two can reach each other only the way real ones would: directly
// through both NATs when the mappings allow hole punching, else through the server's relay.
//
//   sender host 192.168.1.2                               receiver host 192.168.2.2
//   (Chromium, <p>hs)                                      (Chromium, <p>hr)
//         | LAN 192.168.1.0/24                                   | LAN 192.168.2.0/24
//   sender NAT router (<p>rs)                              receiver NAT router (<p>rr)
//   198.18.1.2 on its WAN                                  198.18.2.2 on its WAN
//         |                                                      |
//         +----------- public (<p>pub), forwards ----------------+
//                198.18.0.1: beamdrop (HTTP :8080, STUN/TURN :3478 UDP+TCP,
//                relays 50000-50999). 192.168.0.0/16 leads nowhere (a default route to a
//                device that drops everything).
//
// <p> = `bdnat-<pid>-`. 198.18.0.0/15 is the benchmarking range, not private, so ICE treats the
// routers' WAN addresses as public. end2end/nat/netns.sh builds it (the NAT rules per case are
// described there; end2end/nat/check-topology.sh checks them with plain sockets) and tears it
// down: after each test, after all of them, and at process exit. The test process stays in the
// root namespace and reaches the server with `ip netns exec <p>pub curl`; nothing is added to
// the root namespace.
//
// Cases:
//   1. both routers cone (`masquerade`)         → direct pair, no relayed bytes, "Direct"
//   2. sender symmetric (`random,fully-random`) → a relay candidate in the pair on both sides,
//                                                 relayed bytes ≥ the file, "Relayed through the server"
//   3. receiver's UDP dropped                   → the receiver's local candidate is a relay over TCP
//   4. no [turn] section, sender symmetric      → the receiver says it could not connect, and that
//                                                 the server offers no relay, within ~60 s
//   5. both cone, and mid-transfer the receiver's router moves to another public address (a
//      phone leaving Wi-Fi for cellular: every NAT mapping, the WebSocket's too, breaks at once)
//                                               → the receiver notices the stall, its socket
//                                                 comes back under a new peer id and tells the
//                                                 sender (`moved`), which restarts ICE on the same
//                                                 connection: the download carries on where it
//                                                 was (little sent twice), over the new address
// Cases 1-3 move a 16 MiB random file and check its SHA-256; each prints a `NAT:` line (MB/s,
// relayed bytes, and for relayed paths the server's CPU-ms per relayed MB).
import { test, expect, type Browser, type Page } from '@playwright/test';
import { randomBytes } from 'node:crypto';
import { rmSync, statSync } from 'node:fs';
import path from 'node:path';
import { hydrated, tempDir, randomFile, sha256, shareLink } from './browsers';
import {
  Topology,
  ORIGIN,
  Server,
  checkPrerequisites,
  removeStale,
  serverConfig,
  builtInTurn,
  launchIn,
  openTracked,
  waitSelectedPair,
  selectedPair,
  restarts,
  pcStates,
  describePair,
  download,
  type NatCase,
  type SelectedPair,
} from '../nat/harness';

const FILE_MIB = 16;
const FILE_BYTES = FILE_MIB * 1024 * 1024;
const MB = 1e6;
const RELAYED = 'beamdrop_turn_relayed_bytes_total';
const ALLOCATIONS = 'beamdrop_turn_allocations';

const topology = new Topology(`bdnat-${process.pid}-`);
const atExit = () => topology.down();

test.beforeAll(() => {
  checkPrerequisites();
  removeStale('bdnat-');
  process.once('exit', atExit);
});
test.afterEach(() => topology.down());
test.afterAll(() => {
  topology.down();
  process.removeListener('exit', atExit);
});

interface Run {
  server: Server;
  sender: Page;
  /** The receiver's browser (in the receiver host namespace); `share` opens the page in it. */
  receiverBrowser: Browser;
}

/** Brings case `kase` up, starts the server with the built-in TURN server or none, opens the sender's page, runs `body`, tears all down. */
async function inTopology(kase: NatCase, turn: boolean, body: (run: Run) => Promise<void>): Promise<void> {
  const browsers: Browser[] = [];
  let server: Server | undefined;
  topology.up(kase);
  try {
    const config = serverConfig(turn ? builtInTurn(randomBytes(16).toString('hex')) : undefined);
    server = await Server.start(topology, config);
    // One browser per host namespace: the sender's behind the sender NAT, the receiver's behind its own.
    browsers.push(await launchIn(topology.senderHost));
    browsers.push(await launchIn(topology.receiverHost));
    const sender = await openTracked(browsers[0], '/');
    await hydrated(sender);
    await body({ server, sender, receiverBrowser: browsers[1] });
  } catch (e) {
    if (server) console.log(`[nat] server log (${kase}):\n${server.log()}`);
    throw e;
  } finally {
    await Promise.all(browsers.map((b) => b.close().catch(() => undefined)));
    await server?.stop();
    topology.down();
  }
}

/** The sender shares one random file; the receiver opens the link in its own browser. */
async function share(run: Run, dir: string): Promise<{ file: string; receiver: Page }> {
  const file = randomFile(dir, `nat-${FILE_MIB}MiB.bin`, FILE_BYTES);
  await run.sender.getByTestId('file-input').setInputFiles([file]);
  const link = new URL(await shareLink(run.sender), ORIGIN);
  const receiver = await openTracked(run.receiverBrowser, `${link.pathname}${link.hash}`);
  await hydrated(receiver);
  return { file, receiver };
}

interface Measured {
  receiver: Page;
  seconds: number;
  relayedBytes: number;
  cpuMs: number;
  senderPair: SelectedPair;
  receiverPair: SelectedPair;
}

/** Connects, downloads the file, checks it, and measures the transfer (relayed bytes and server CPU over it). */
async function transfer(run: Run, label: string, settled?: (pair: SelectedPair) => boolean): Promise<Measured> {
  const dir = tempDir();
  try {
    const { file, receiver } = await share(run, dir);
    await expect(receiver.getByTestId('status')).toContainText('Connected', { timeout: 60_000 });
    await expect(run.sender.getByTestId('peer-count')).toHaveText('1');
    await waitSelectedPair(receiver);
    await waitSelectedPair(run.sender);
    if (settled) {
      // ICE may use the first pair that works (a relay one can answer first) and move to a better
      // one a moment later: give it up to 20 s to get there before measuring. Whatever it ends
      // on is asserted after the transfer.
      const deadline = Date.now() + 20_000;
      while (Date.now() < deadline) {
        const [r, s] = [await selectedPair(receiver), await selectedPair(run.sender)];
        if (r && s && settled(r) && settled(s)) break;
        await receiver.waitForTimeout(250);
      }
    }

    const relayedBefore = await run.server.metric(RELAYED);
    const cpuBefore = run.server.cpuMs();
    const got = await download(receiver, path.basename(file));
    const cpuMs = run.server.cpuMs() - cpuBefore;
    const relayedBytes = (await run.server.metric(RELAYED)) - relayedBefore;

    expect(statSync(got.saved).size).toBe(FILE_BYTES);
    expect(sha256(got.saved)).toBe(sha256(file));
    // The pairs that carried the file (read after it, while the connection is still up).
    const receiverPair = (await selectedPair(receiver))!;
    const senderPair = (await selectedPair(run.sender))!;
    expect(receiverPair, 'receiver: a connected peer connection with a selected pair').toBeTruthy();
    expect(senderPair, 'sender: a connected peer connection with a selected pair').toBeTruthy();
    const allocations = (await run.server.metrics()).get(ALLOCATIONS);
    console.log(
      `[nat] ${label}: receiver ${describePair(receiverPair)}; sender ${describePair(senderPair)}; ` +
        `relayed +${relayedBytes} B, ${ALLOCATIONS} ${allocations}, server CPU ${cpuMs.toFixed(0)} ms`,
    );
    return { receiver, seconds: got.seconds, relayedBytes, cpuMs, senderPair, receiverPair };
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

const mbps = (m: Measured) => (FILE_BYTES / MB / m.seconds).toFixed(1);
const isRelay = (p: SelectedPair) => p.local === 'relay' || p.remote === 'relay';
const pathText = (page: Page) => page.getByTestId('path');
const senderPathText = (page: Page) => page.locator('.receiver').getByTestId('path');

test('both behind cone NATs: the browsers connect directly, nothing is relayed', async () => {
  test.setTimeout(240_000);
  await inTopology('cone', true, async (run) => {
    const m = await transfer(run, 'cone/cone', (pair) => !isRelay(pair));
    for (const [side, pair] of [['receiver', m.receiverPair], ['sender', m.senderPair]] as const) {
      expect(['host', 'srflx', 'prflx'], `${side} local candidate type`).toContain(pair.local);
      expect(['host', 'srflx', 'prflx'], `${side} remote candidate type`).toContain(pair.remote);
    }
    // Nothing of the file through the relay. (ICE's own checks on unused relay pairs, should any
    // happen during the transfer, are a few hundred bytes: allowed, the file is 16 MiB.)
    expect(m.relayedBytes, 'relayed bytes during a direct transfer').toBeLessThan(64 * 1024);
    console.log(
      `NAT: cone/cone: direct (receiver ${m.receiverPair.local}⇄${m.receiverPair.remote}), ${FILE_MIB} MiB in ` +
        `${m.seconds.toFixed(2)} s = ${mbps(m)} MB/s, relayed bytes +${m.relayedBytes}`,
    );
    await expect(pathText(m.receiver)).toHaveText('Direct');
    await expect(senderPathText(run.sender)).toHaveText('Direct');
  });
});

test('sender behind a symmetric NAT: the file goes through the server\'s TURN relay', async () => {
  test.setTimeout(240_000);
  await inTopology('symmetric', true, async (run) => {
    const m = await transfer(run, 'symmetric/cone');
    expect(isRelay(m.receiverPair), `receiver pair uses a relay: ${describePair(m.receiverPair)}`).toBe(true);
    expect(isRelay(m.senderPair), `sender pair uses a relay: ${describePair(m.senderPair)}`).toBe(true);
    expect(m.relayedBytes, 'relayed bytes ≥ the file').toBeGreaterThanOrEqual(FILE_BYTES);
    const relayedMb = m.relayedBytes / MB;
    console.log(
      `NAT: symmetric/cone: relayed (sender ${m.senderPair.local}${m.senderPair.relayProtocol ? '/' + m.senderPair.relayProtocol : ''}` +
        `⇄${m.senderPair.remote}), ${FILE_MIB} MiB in ${m.seconds.toFixed(2)} s = ${mbps(m)} MB/s, ` +
        `relayed ${relayedMb.toFixed(1)} MB, server CPU ${m.cpuMs.toFixed(0)} ms = ${(m.cpuMs / relayedMb).toFixed(1)} CPU-ms per relayed MB`,
    );
    await expect(pathText(m.receiver)).toHaveText('Relayed through the server');
    await expect(senderPathText(run.sender)).toHaveText('Relayed through the server');
  });
});

test('receiver\'s UDP blocked: it reaches the relay over TCP', async () => {
  test.setTimeout(240_000);
  await inTopology('udp-blocked', true, async (run) => {
    const m = await transfer(run, 'udp-blocked');
    expect(m.receiverPair.local, `receiver local candidate: ${describePair(m.receiverPair)}`).toBe('relay');
    expect(m.receiverPair.relayProtocol, 'receiver reaches its TURN server over').toBe('tcp');
    expect(isRelay(m.senderPair), `sender pair uses a relay: ${describePair(m.senderPair)}`).toBe(true);
    expect(m.relayedBytes, 'relayed bytes ≥ the file').toBeGreaterThanOrEqual(FILE_BYTES);
    const relayedMb = m.relayedBytes / MB;
    console.log(
      `NAT: udp-blocked receiver: relayed over TCP (receiver relay/${m.receiverPair.relayProtocol}⇄${m.receiverPair.remote}), ` +
        `${FILE_MIB} MiB in ${m.seconds.toFixed(2)} s = ${mbps(m)} MB/s, relayed ${relayedMb.toFixed(1)} MB, ` +
        `server CPU ${m.cpuMs.toFixed(0)} ms = ${(m.cpuMs / relayedMb).toFixed(1)} CPU-ms per relayed MB`,
    );
    await expect(pathText(m.receiver)).toHaveText('Relayed through the server');
    await expect(senderPathText(run.sender)).toHaveText('Relayed through the server');
  });
});

test('no relay offered and a symmetric NAT: the receiver says it cannot connect, and why', async () => {
  test.setTimeout(180_000);
  await inTopology('symmetric', false, async (run) => {
    const dir = tempDir();
    try {
      const { receiver } = await share(run, dir);
      const opened = Date.now();
      const status = receiver.getByTestId('status');
      await expect(status)
        .toContainText('Could not connect', { timeout: 60_000 })
        .catch(async (e) => {
          console.log(`[nat] receiver peer connections: ${JSON.stringify(await pcStates(receiver))}; sender: ${JSON.stringify(await pcStates(run.sender))}`);
          throw e;
        });
      const seconds = (Date.now() - opened) / 1000;
      await expect(status).toContainText(/no relay/i);
      // It stays said (no spinner taking over again) and offers to try again.
      await expect(receiver.getByTestId('retry')).toBeVisible();
      await receiver.waitForTimeout(2_000);
      await expect(status).toContainText('Could not connect');
      expect(await selectedPair(receiver), 'no connected peer connection').toBeNull();
      console.log(`NAT: no relay, symmetric/cone: "${(await status.textContent())?.trim()}" after ${seconds.toFixed(1)} s`);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

test('the receiver\'s network changes mid-transfer: the download carries on where it was, over the new address', async () => {
  test.setTimeout(240_000);
  await inTopology('cone', true, async (run) => {
    const dir = tempDir();
    try {
      const size = 64 * 1024 * 1024;
      const file = randomFile(dir, 'moving-64MiB.bin', size);
      await run.sender.getByTestId('file-input').setInputFiles([file]);
      const link = new URL(await shareLink(run.sender), ORIGIN);
      const receiver = await openTracked(run.receiverBrowser, `${link.pathname}${link.hash}`);
      await hydrated(receiver);
      await expect(receiver.getByTestId('status')).toContainText('Connected', { timeout: 60_000 });
      const before = await waitSelectedPair(receiver);

      const item = receiver.getByTestId('file-item').filter({ hasText: 'moving-64MiB.bin' });
      const started = Date.now();
      const saved = Promise.all([receiver.waitForEvent('download', { timeout: 200_000 }), item.getByTestId('download').click()]);
      const bar = item.locator('progress');
      await expect
        .poll(async () => Number((await bar.getAttribute('value')) ?? 0), { timeout: 60_000, intervals: [100] })
        .toBeGreaterThanOrEqual(0.2);
      const movedAt = Number((await bar.getAttribute('value')) ?? 0);
      const moved = Date.now();
      topology.moveReceiver();

      const [dl] = await saved;
      const got = await dl.path();
      const seconds = (Date.now() - started) / 1000;
      await expect(item.getByTestId('file-status')).toContainText('verified');
      expect(statSync(got).size).toBe(size);
      expect(sha256(got)).toBe(sha256(file));
      // Carried on, not started over: what was there before the move did not cross again.
      const sent = Number(await run.sender.getByTestId('bytes-sent').getAttribute('data-bytes'));
      expect(sent).toBeLessThan(size + 16 * 1024 * 1024);
      // And it did move: the sender now reaches the receiver at its router's new address.
      const after = await waitSelectedPair(run.sender);
      expect(after.remoteAddress).toContain('198.18.2.3');
      const [r, s] = [await restarts(receiver), await restarts(run.sender)];
      // The same connection carried on (an ICE restart once the sender heard where the receiver
      // is now), not a new one.
      expect(s.iceRestarts, 'the sender restarted ICE').toBeGreaterThanOrEqual(1);
      expect([r.connections, s.connections], 'peer connections made (receiver, sender)').toEqual([1, 1]);
      console.log(
        `NAT: receiver moved at ${(movedAt * 100).toFixed(0)} %: was ${describePair(before)}, now sender ${describePair(after)}; ` +
          `${(size / MB / seconds).toFixed(1)} MB/s overall, verified ${((Date.now() - moved) / 1000).toFixed(1)} s after the move, ` +
          `sender sent ${(sent / 1048576).toFixed(1)} MiB for a 64 MiB file; ICE restart offers: receiver ${r.iceRestarts}, sender ${s.iceRestarts}; ` +
          `peer connections made: receiver ${r.connections}, sender ${s.connections}`,
      );
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
