#!/usr/bin/env bash
# Builds (and tears down) the network-namespace topology of end2end/tests/nat.spec.ts: a server on
# a "public" network and two browsers, each on a private LAN behind a NAT router of its own.
#
#   netns.sh up   <prefix> <case>   # case: cone | symmetric | udp-blocked
#   netns.sh down <prefix>          # idempotent; also kills what still runs in the namespaces
#   netns.sh move <prefix>          # the receiver's router moves to another public address
#   netns.sh names <prefix>         # prints the namespace names (pub sender-router
#                                   # receiver-router sender-host receiver-host)
#
#        sender host                                              receiver host
#   <prefix>hs  192.168.1.2/24                              <prefix>hr  192.168.2.2/24
#        | eth0 (default via .1)                                 | eth0 (default via .1)
#        | lan 192.168.1.1/24                                    | lan 192.168.2.1/24
#   <prefix>rs  sender NAT router                           <prefix>rr  receiver NAT router
#        | wan 198.18.1.2/24 (default via .1)                    | wan 198.18.2.2/24 (default via .1)
#        | s   198.18.1.1/24                                     | r   198.18.2.1/24
#        +--------------------- <prefix>pub --------------------+
#                     public: forwards between the two routers; the server
#                     (HTTP, signaling, STUN/TURN) at 198.18.0.1 on its loopback.
#                     No route to 192.168.0.0/16 (its default route leads to a device that
#                     drops everything): host candidates never connect.
#
# 198.18.0.0/15 is the benchmarking range (RFC 2544), not private: the browsers' ICE sees the
# routers' WAN addresses as public ones. Nothing is added to the root namespace: the tests reach
# the server with `ip netns exec <prefix>pub curl ...`, so two runs with different prefixes never
# collide.
#
# NAT per case, nftables in the routers:
#   cone         both routers `masquerade`: Linux keeps the source port (endpoint-independent
#                mapping; conntrack filters by address and port: "port-restricted cone"); new
#                connections from the WAN side are dropped (see nat_rules for why that matters)
#   symmetric    sender router `masquerade random,fully-random` (a new random port per
#                destination), receiver router `masquerade`
#   udp-blocked  both `masquerade`, and the receiver router drops every UDP packet forwarded
#                to or from its LAN: the receiver reaches the server only over TCP.
set -Eeuo pipefail
case ":$PATH:" in *:/usr/sbin:*) ;; *) PATH="$PATH:/usr/sbin:/sbin" ;; esac

usage() { echo "usage: $0 up <prefix> <cone|symmetric|udp-blocked> | down <prefix> | move <prefix> | names <prefix>" >&2; exit 2; }

[ $# -ge 2 ] || usage
cmd=$1 prefix=$2
case "$prefix" in *[!A-Za-z0-9_.-]* | "") echo "bad prefix: $prefix" >&2; exit 2 ;; esac

PUB=${prefix}pub RS=${prefix}rs RR=${prefix}rr HS=${prefix}hs HR=${prefix}hr
ALL=("$PUB" "$RS" "$RR" "$HS" "$HR")

in_ns() { local ns=$1; shift; ip netns exec "$ns" "$@"; }
sysctl_ns() { # sysctl_ns <ns> <key> <value> (/proc/sys/net belongs to the reader's namespace)
  in_ns "$1" sh -c "echo $3 > /proc/sys/${2//.//}"
}

down() {
  local ns pid
  for ns in "${ALL[@]}"; do
    [ -e "/run/netns/$ns" ] || continue
    # Whatever still runs in it (a server or browser of a test that died) would keep the
    # namespace alive after its name is gone: end those processes, by pid, first.
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -TERM "$pid" 2>/dev/null || true; done
  done
  for ns in "${ALL[@]}"; do
    [ -e "/run/netns/$ns" ] || continue
    for _ in 1 2 3 4 5 6 7 8 9 10; do
      [ -z "$(ip netns pids "$ns" 2>/dev/null)" ] && break
      sleep 0.2
    done
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
  done
  # Deleting a namespace deletes its interfaces, and with them the far ends of its veths.
  for ns in "${ALL[@]}"; do
    [ -e "/run/netns/$ns" ] && ip netns del "$ns" 2>/dev/null || true
  done
  for ns in "${ALL[@]}"; do
    if [ -e "/run/netns/$ns" ]; then echo "netns.sh: could not delete namespace $ns" >&2; return 1; fi
  done
}

nat_rules() { # nat_rules <masquerade flags> <drop udp on lan: 0|1>
  local flags=$1 block=$2
  cat <<EOF
table ip nat {
  chain postrouting {
    type nat hook postrouting priority srcnat; policy accept;
    oifname "wan" masquerade $flags
  }
}
table ip filter {
  chain forward {
    type filter hook forward priority filter; policy accept;
$( [ "$block" = 1 ] && printf '    iifname "lan" meta l4proto udp counter drop\n    oifname "lan" meta l4proto udp counter drop\n' )
    # Nothing from outside starts a connection into the LAN (a NAT's usual behaviour).
    iifname "wan" oifname "lan" ct state new counter drop
  }
  # Unsolicited packets to the router's own WAN address are dropped here, before conntrack
  # confirms an entry for them. Without this, a peer's ICE check arriving before our host's first
  # packet to that peer leaves an entry (peer -> wan:port) behind, and our host's own packet to
  # the peer then clashes with it and is mapped to another port: hole punching between two
  # "cone" routers fails (seen with conntrack -L). Home routers drop such packets too.
  chain input {
    type filter hook input priority filter; policy accept;
    iifname "wan" ct state new counter drop
  }
}
EOF
}

up() {
  local case=$1 sender_flags receiver_flags block=0
  case "$case" in
    cone) sender_flags="" receiver_flags="" ;;
    symmetric) sender_flags="random,fully-random" receiver_flags="" ;;
    udp-blocked) sender_flags="" receiver_flags="" block=1 ;;
    *) usage ;;
  esac
  for tool in ip nft; do
    command -v "$tool" >/dev/null || { echo "netns.sh: '$tool' missing (scripts/setup.sh need_netns_tools installs it)" >&2; exit 1; }
  done
  [ "$(id -u)" = 0 ] || { echo "netns.sh: must run as root (network namespaces)" >&2; exit 1; }

  down # a leftover of an earlier run with the same prefix
  trap 'trap - ERR; echo "netns.sh: setup failed (line $LINENO); tearing down" >&2; down' ERR

  local ns
  for ns in "${ALL[@]}"; do
    ip netns add "$ns"
    # IPv4 only: no link-local IPv6 candidates, nothing but the paths drawn above.
    sysctl_ns "$ns" net.ipv6.conf.all.disable_ipv6 1
    sysctl_ns "$ns" net.ipv6.conf.default.disable_ipv6 1
    in_ns "$ns" ip link set lo up
  done

  # Public: the server's address on its loopback, a link to each router, forwarding between them.
  in_ns "$PUB" ip addr add 198.18.0.1/32 dev lo
  ip link add s netns "$PUB" type veth peer name wan netns "$RS"
  ip link add r netns "$PUB" type veth peer name wan netns "$RR"
  in_ns "$PUB" ip addr add 198.18.1.1/24 dev s
  in_ns "$PUB" ip addr add 198.18.2.1/24 dev r
  in_ns "$PUB" ip link set s up
  in_ns "$PUB" ip link set r up
  # Everything else (the 192.168 addresses of host candidates above all) goes to a device that
  # drops it, as the internet would lose it. With no route at all, a TURN server relaying to a
  # host candidate would get ENETUNREACH from sendto() at once (coturn then drops the
  # allocation: seen with a packet capture), which real servers never see. The device is one end
  # of a veth whose other end stays down (no "dummy" driver in this kernel): sends succeed, and
  # the packets are counted as dropped.
  in_ns "$PUB" ip link add void type veth peer name void-end
  in_ns "$PUB" ip link set void up
  in_ns "$PUB" ip route add default dev void
  sysctl_ns "$PUB" net.ipv4.ip_forward 1

  # Routers: WAN towards public (default route), LAN towards their host, NAT between.
  local router host lan_net flags
  for side in sender receiver; do
    if [ $side = sender ]; then router=$RS host=$HS lan_net=192.168.1 flags=$sender_flags
    else router=$RR host=$HR lan_net=192.168.2 flags=$receiver_flags; fi
    local wan_net=198.18.1; [ $side = receiver ] && wan_net=198.18.2
    ip link add lan netns "$router" type veth peer name eth0 netns "$host"
    in_ns "$router" ip addr add "$wan_net.2/24" dev wan
    in_ns "$router" ip addr add "$lan_net.1/24" dev lan
    in_ns "$router" ip link set wan up
    in_ns "$router" ip link set lan up
    in_ns "$router" ip route add default via "$wan_net.1"
    sysctl_ns "$router" net.ipv4.ip_forward 1
    local b=0; [ $side = receiver ] && b=$block
    in_ns "$router" nft -f - <<<"$(nat_rules "$flags" "$b")"
    in_ns "$host" ip addr add "$lan_net.2/24" dev eth0
    in_ns "$host" ip link set eth0 up
    in_ns "$host" ip route add default via "$lan_net.1"
  done
  trap - ERR
  echo "netns.sh: $case topology up (prefix $prefix)" >&2
}

# The receiver's network changes under it, as when a phone leaves Wi-Fi for cellular: its router's
# public address goes from 198.18.2.2 to 198.18.2.3. Removing the address makes the kernel drop
# every masquerade mapping made with it (conntrack entries), so every flow through the router (the
# signaling WebSocket, the ICE pair) breaks at once and new packets leave from the new address.
move() {
  sysctl_ns "$RR" net.ipv4.conf.wan.promote_secondaries 1
  in_ns "$RR" ip addr add 198.18.2.3/24 dev wan
  in_ns "$RR" ip addr del 198.18.2.2/24 dev wan
  in_ns "$RR" ip route replace default via 198.18.2.1
  echo "netns.sh: receiver router moved to 198.18.2.3 (prefix $prefix)" >&2
}

case "$cmd" in
  up) [ $# -eq 3 ] || usage; up "$3" ;;
  down) down ;;
  move) move ;;
  names) echo "${ALL[*]}" ;;
  *) usage ;;
esac
