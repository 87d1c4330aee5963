// Things between a browser and the server. `tamperingProxy`, for the tamper test: a
// man-in-the-middle that passes plain HTTP through and, on /ws, relays frames and flips one
// character inside every relayed signaling payload the server sends to the browser. `frontDoor`,
// for the multi-node test: a TCP load balancer in front of the nodes.
import http from 'node:http';
import { WebSocketServer, WebSocket } from 'ws';
import net, { type AddressInfo } from 'node:net';

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

export interface FrontDoor {
  url: string;
  /** Where new connections go: the first port listed (none: refused, as a balancer with no
   * healthy node refuses). Connections already open stay where they are. */
  route: (ports: number[]) => void;
  close: () => Promise<void>;
}

/** A TCP-level stand-in for the load balancer in front of several nodes: the page, its assets and
 * its WebSocket all come through one address, so the page reconnects to the same URL and lands
 * on whichever node the balancer picks. */
export async function frontDoor(ports: number[]): Promise<FrontDoor> {
  let backends = [...ports];
  const open = new Set<net.Socket>();
  const server = net.createServer((client) => {
    open.add(client);
    client.on('close', () => open.delete(client));
    client.on('error', () => client.destroy());
    const port = backends[0];
    if (port === undefined) {
      client.destroy();
      return;
    }
    const upstream = net.connect(port, '127.0.0.1');
    open.add(upstream);
    upstream.on('close', () => open.delete(upstream));
    upstream.on('error', () => client.destroy());
    client.on('close', () => upstream.destroy());
    upstream.on('close', () => client.destroy());
    client.pipe(upstream);
    upstream.pipe(client);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as AddressInfo).port;
  return {
    url: `http://127.0.0.1:${port}`,
    route: (ports) => {
      backends = [...ports];
    },
    close: () =>
      new Promise<void>((resolve) => {
        open.forEach((s) => s.destroy());
        server.close(() => resolve());
      }),
  };
}
