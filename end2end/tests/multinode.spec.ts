// Two server nodes sharing a Redis backplane: the sender's browser talks to node 1, the receiver's
// to node 2, and the file still crosses. Then node 1 gets SIGTERM: it exits 0, and the browsers'
// direct connection is untouched: the receiver downloads another file after the node is gone.
// The sender's page reconnects, takes its share back, and a new receiver in a fresh browser opens
// the very link the sender handed out and downloads from it.
//
// The sender reaches the nodes the way a deployment would put them: through one address (a TCP
// "front door" standing in for the load balancer), so its page, its WebSocket and its share link
// all name that address. The door sends everything to node 1 at first; once node 1 is stopped it
// has no node until the test points it at node 2 (a balancer taking the stopped node out of
// rotation), so the page is seen reconnecting first, then back. A receiver who opens the link
// while the sender is away is told the share is not available, and gets the files anyway once
// the sender is back, without reloading.
import { test, expect } from '@playwright/test';
import { spawn, type ChildProcess } from 'node:child_process';
import net from 'node:net';
import path from 'node:path';
import { launch, openPage, hydrated, tempDir, randomFile, sha256, shareLink, until, freePort } from './browsers';
import { frontDoor, type FrontDoor } from './proxy';

const ROOT = path.join(__dirname, '..', '..');

function exited(child: ChildProcess): Promise<number | null> {
  return new Promise((resolve) => {
    if (child.exitCode !== null) resolve(child.exitCode);
    else child.once('exit', (code) => resolve(code));
  });
}

test('sender on node 1, receiver on node 2, over Redis; SIGTERM exits 0, transfers go on, the link keeps working', async () => {
  const children: ChildProcess[] = [];
  const [port1, port2] = [await freePort(), await freePort()];
  // Redis on a Unix socket of its own: no port to race for.
  const redisDir = tempDir();
  const redisSocket = path.join(redisDir, 'redis.sock');
  const redis = spawn(
    'redis-server',
    ['--port', '0', '--unixsocket', redisSocket, '--unixsocketperm', '700', '--dir', redisDir, '--save', '', '--appendonly', 'no'],
    { stdio: 'ignore' },
  );
  children.push(redis);
  const node = (port: number) => {
    const child = spawn(
      path.join(ROOT, 'target', 'release', 'beamdrop'),
      ['--listen', `127.0.0.1:${port}`, '--broker', `redis+unix://${redisSocket}`],
      { cwd: ROOT, stdio: 'ignore', env: { ...process.env, LEPTOS_SITE_ROOT: 'target/site', RUST_LOG: 'warn' } },
    );
    children.push(child);
    return child;
  };
  const browsers = [await launch(), await launch(), await launch(), await launch()];
  let door: FrontDoor | undefined;
  try {
    await until('redis', async () => {
      const sock = net.connect(redisSocket);
      return new Promise<boolean>((resolve) => {
        sock.once('connect', () => (sock.destroy(), resolve(true)));
        sock.once('error', () => resolve(false));
      });
    });
    const node1 = node(port1);
    node(port2);
    for (const port of [port1, port2]) {
      await until(`node on ${port}`, async () => (await fetch(`http://127.0.0.1:${port}/healthz`)).ok);
    }

    const dir = tempDir();
    const file = randomFile(dir, 'cross-node.bin', 8 * 1024 * 1024 + 3);
    const after = randomFile(dir, 'after-sigterm.bin', 100_000);
    door = await frontDoor([port1]);
    const sender = await openPage(browsers[0], `${door.url}/`);
    await hydrated(sender);
    await sender.getByTestId('file-input').setInputFiles([file, after]);
    const link = new URL(await shareLink(sender));
    // Same share, other node.
    const receiver = await openPage(browsers[1], `http://127.0.0.1:${port2}${link.pathname}${link.hash}`);
    await expect(receiver.getByTestId('status')).toContainText('Connected');
    const item = receiver.getByTestId('file-item').filter({ hasText: 'cross-node.bin' });
    const [dl] = await Promise.all([receiver.waitForEvent('download'), item.getByTestId('download').click()]);
    expect(sha256(await dl.path())).toBe(sha256(file));
    await expect(item.getByTestId('file-status')).toHaveText('verified');

    node1.kill('SIGTERM');
    expect(await exited(node1)).toBe(0);
    // The node is gone; the peer-to-peer connection is not.
    const second = receiver.getByTestId('file-item').filter({ hasText: 'after-sigterm.bin' });
    const [dl2] = await Promise.all([receiver.waitForEvent('download'), second.getByTestId('download').click()]);
    expect(sha256(await dl2.path())).toBe(sha256(after));
    await expect(receiver.getByTestId('status')).toContainText('Connected');

    // The sender's page lost its server and says so; once the door leads to node 2 it is back.
    const away = sender.getByTestId('server-status');
    await expect(away).toBeVisible({ timeout: 10_000 });
    // Opened while the sender is away (once its share has expired in Redis, ≤ 10 s): the page
    // says the share is not available, and keeps checking.
    const onNode2 = `http://127.0.0.1:${port2}${link.pathname}`;
    await until('the share to expire', async () => (await (await fetch(onNode2)).text()).includes('not available'), 15_000);
    const early = await openPage(browsers[3], `${onNode2}${link.hash}`);
    await expect(early.getByTestId('error')).toContainText('not available');
    await hydrated(early);
    door.route([port2]);
    await expect(away).toBeHidden({ timeout: 15_000 });
    await expect(sender.getByTestId('error')).toHaveCount(0);
    // Same link as before; the first receiver never noticed, the one who came meanwhile joins too.
    expect(await shareLink(sender)).toBe(link.href);
    await expect(sender.getByTestId('peer-count')).toHaveText('2', { timeout: 20_000 });

    // The page opened during the outage found the sender once it was back.
    await expect(early.getByTestId('status')).toContainText('Connected', { timeout: 20_000 });
    await expect(early.getByTestId('error')).toHaveCount(0);
    const earlyItem = early.getByTestId('file-item').filter({ hasText: 'after-sigterm.bin' });
    const [dlEarly] = await Promise.all([early.waitForEvent('download'), earlyItem.getByTestId('download').click()]);
    expect(sha256(await dlEarly.path())).toBe(sha256(after));

    // A new receiver, in a browser of its own, opens the link handed out before the restart.
    const late = await openPage(browsers[2], link.href);
    await expect(late.getByTestId('status')).toContainText('Connected');
    const lateItem = late.getByTestId('file-item').filter({ hasText: 'cross-node.bin' });
    const [dl3] = await Promise.all([late.waitForEvent('download'), lateItem.getByTestId('download').click()]);
    expect(sha256(await dl3.path())).toBe(sha256(file));
    await expect(lateItem.getByTestId('file-status')).toHaveText('verified');
    await expect(sender.getByTestId('peer-count')).toHaveText('3');
    await expect(receiver.getByTestId('status')).toContainText('Connected');
  } finally {
    await door?.close();
    await Promise.all(browsers.map((b) => b.close()));
    for (const child of children) child.kill('SIGKILL');
  }
});
