#!/usr/bin/env python3
"""Small UDP/TCP probes for checking the NAT topology of netns.sh (stdlib only, every wait bounded).

  probe.py echo <ip> <seconds> <port>...          UDP and TCP: answer each datagram / connection
                                                   with the "ip:port" it came from (a STUN stand-in)
  probe.py ask udp|tcp <local port> <ip> <port>... print {"dst port": "seen as ip:port" | null}
  probe.py punch <local port> <me> <peer> <dir> <seconds>
        learn this socket's public mapping from the echo at 198.18.0.1:3478 (like a srflx
        candidate), write it to <dir>/<me>, wait for <dir>/<peer>, then send to the peer's mapping
        every 100 ms (like ICE checks); print what was received and from where.
"""
import json
import os
import select
import socket
import sys
import time


def echo(ip, seconds, ports):
    deadline = time.time() + seconds
    udp, tcp = [], []
    for p in ports:
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        u.bind((ip, p))
        udp.append(u)
        t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        t.bind((ip, p))
        t.listen(16)
        tcp.append(t)
    print("ready", flush=True)
    while time.time() < deadline:
        r, _, _ = select.select(udp + tcp, [], [], 0.2)
        for s in r:
            if s in udp:
                data, addr = s.recvfrom(2048)
                s.sendto(f"{addr[0]}:{addr[1]}".encode(), addr)
            else:
                c, addr = s.accept()
                c.settimeout(1)
                try:
                    c.sendall(f"{addr[0]}:{addr[1]}".encode())
                finally:
                    c.close()


def ask(proto, local_port, ip, ports):
    seen = {}
    if proto == "udp":
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("0.0.0.0", local_port))
        s.settimeout(1.5)
        for p in ports:
            seen[p] = None
            for _ in range(2):
                s.sendto(b"?", (ip, p))
                try:
                    data, _ = s.recvfrom(2048)
                    seen[p] = data.decode()
                    break
                except OSError:
                    pass
    else:
        for p in ports:
            seen[p] = None
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("0.0.0.0", local_port))
            s.settimeout(2)
            try:
                s.connect((ip, p))
                seen[p] = s.recv(2048).decode()
            except OSError as e:
                seen[p] = None
                sys.stderr.write(f"tcp {ip}:{p}: {e}\n")
            finally:
                s.close()
    print(json.dumps(seen))


def punch(local_port, me, peer, directory, seconds):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", local_port))
    s.settimeout(1.5)
    mine = None
    for _ in range(3):
        s.sendto(b"?", ("198.18.0.1", 3478))
        try:
            mine = s.recvfrom(2048)[0].decode()
            break
        except OSError:
            pass
    if mine is None:
        print(json.dumps({"error": "no answer from 198.18.0.1:3478"}))
        return
    with open(os.path.join(directory, me + ".tmp"), "w") as f:
        f.write(mine)
    os.rename(os.path.join(directory, me + ".tmp"), os.path.join(directory, me))
    deadline = time.time() + seconds
    peer_file = os.path.join(directory, peer)
    while not os.path.exists(peer_file):
        if time.time() > deadline:
            print(json.dumps({"mapped": mine, "error": "peer never wrote its mapping"}))
            return
        time.sleep(0.05)
    with open(peer_file) as f:
        pip, pport = f.read().split(":")
    target = (pip, int(pport))
    got = {}
    s.setblocking(False)
    while time.time() < deadline:
        try:
            s.sendto(me.encode(), target)
        except OSError:
            pass
        end = time.time() + 0.1
        while time.time() < end:
            r, _, _ = select.select([s], [], [], max(0, end - time.time()))
            if not r:
                break
            try:
                data, addr = s.recvfrom(2048)
            except OSError:
                break
            key = f"{addr[0]}:{addr[1]}"
            got[key] = got.get(key, 0) + 1
    print(json.dumps({"mapped": mine, "peer_mapped": f"{pip}:{pport}", "received_from": got}))


def main():
    a = sys.argv[1:]
    if a[:1] == ["echo"]:
        echo(a[1], float(a[2]), [int(p) for p in a[3:]])
    elif a[:1] == ["ask"]:
        ask(a[1], int(a[2]), a[3], [int(p) for p in a[4:]])
    elif a[:1] == ["punch"]:
        punch(int(a[1]), a[2], a[3], a[4], float(a[5]))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
