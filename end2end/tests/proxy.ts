// A man-in-the-middle between a browser and the server, for the tamper test: plain HTTP is passed
// through; on /ws it relays frames and flips one character inside every relayed signaling payload
// the server sends to the browser.
import http from 'node:http';
import { WebSocketServer, WebSocket } from 'ws';
import type { AddressInfo } from 'node:net';

export interface Proxy {
  url: string;
  tampered: () => number;
  close: () => Promise<void>;
}

export async function tamperingProxy(upstream: string): Promise<Proxy> {
  const target = new URL(upstream);
  let tampered = 0;
  const server = http.createServer((req, res) => {
    const forward = http.request(
      { host: target.hostname, port: target.port, path: req.url, method: req.method, headers: req.headers },
      (up) => {
        res.writeHead(up.statusCode ?? 502, up.headers);
        up.pipe(res);
      },
    );
    forward.on('error', () => res.destroy());
    req.pipe(forward);
  });
  const wss = new WebSocketServer({ server, path: '/ws' });
  wss.on('connection', (client) => {
    const up = new WebSocket(`ws://${target.host}/ws`);
    const pending: string[] = [];
    up.on('open', () => pending.splice(0).forEach((m) => up.send(m)));
    client.on('message', (data) => {
      const text = data.toString();
      if (up.readyState === WebSocket.OPEN) up.send(text);
      else pending.push(text);
    });
    up.on('message', (data) => {
      let text = data.toString();
      const msg = JSON.parse(text);
      if (msg.type === 'signal' && typeof msg.payload === 'string' && msg.payload.length > 20) {
        const i = msg.payload.length - 5;
        const c = msg.payload[i] === 'A' ? 'B' : 'A';
        msg.payload = msg.payload.slice(0, i) + c + msg.payload.slice(i + 1);
        text = JSON.stringify(msg);
        tampered += 1;
      }
      client.send(text);
    });
    client.on('close', () => up.close());
    up.on('close', () => client.close());
    up.on('error', () => client.close());
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as AddressInfo).port;
  return {
    url: `http://127.0.0.1:${port}`,
    tampered: () => tampered,
    close: () =>
      new Promise<void>((resolve) => {
        wss.clients.forEach((c) => c.terminate());
        wss.close();
        server.close(() => resolve());
      }),
  };
}
