#!/usr/bin/env bash
# Checks the topology of netns.sh without browsers or the app (root; needs python3):
#   end2end/nat/check-topology.sh [cone|symmetric|udp-blocked ...]   (default: all three)
# For each case: brings it up under a prefix of its own, runs the probes of probe.py, prints what
# it saw, judges it, and tears everything down (also on failure or Ctrl-C). Exit status 0 when
# every case behaved as netns.sh says.
#   (a) both hosts reach 198.18.0.1 (UDP unless blocked, TCP always)
#   (b) source port seen by the public side from one host socket towards two server ports:
#       cone: the socket's own port both times; symmetric (sender): two different ports
#   (c) the receiver host cannot reach the sender host's private address 192.168.1.2
#   (d) udp-blocked: the receiver's UDP gets nowhere, its TCP does
#   (e) hole punching between the two hosts' mapped addresses (the sender starts 1 s first, as one
#       ICE agent usually does): works for cone/cone, fails with the symmetric sender
set -Eeuo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
NETNS="$HERE/netns.sh"
PROBE="$HERE/probe.py"
cases=("$@"); [ ${#cases[@]} -gt 0 ] || cases=(cone symmetric udp-blocked)

prefix="bdchk-$$-"
work=$(mktemp -d)
bg_pids=()
cleanup() {
  local pid
  for pid in "${bg_pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  "$NETNS" down "$prefix" || true
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

fail=0
judge() { # judge <ok?> <text>
  if [ "$1" = 1 ]; then echo "  ok   $2"; else echo "  FAIL $2"; fail=1; fi
}
field() { python3 -c 'import json,sys; d=json.loads(sys.argv[1]); v=d.get(sys.argv[2]); print("" if v is None else v)' "$1" "$2"; }

for case in "${cases[@]}"; do
  echo "== $case"
  "$NETNS" up "$prefix" "$case"
  pub=${prefix}pub hs=${prefix}hs hr=${prefix}hr
  timeout 40 ip netns exec "$pub" python3 "$PROBE" echo 198.18.0.1 35 3478 3479 >"$work/echo.out" 2>&1 &
  bg_pids+=($!)
  timeout 40 ip netns exec "$hs" python3 "$PROBE" echo 192.168.1.2 35 5000 >"$work/hs-echo.out" 2>&1 &
  bg_pids+=($!)
  for _ in $(seq 50); do
    grep -q ready "$work/echo.out" 2>/dev/null && grep -q ready "$work/hs-echo.out" 2>/dev/null && break
    sleep 0.1
  done

  s_udp=$(timeout 10 ip netns exec "$hs" python3 "$PROBE" ask udp 40000 198.18.0.1 3478 3479)
  s_tcp=$(timeout 10 ip netns exec "$hs" python3 "$PROBE" ask tcp 40002 198.18.0.1 3478 2>/dev/null)
  r_udp=$(timeout 10 ip netns exec "$hr" python3 "$PROBE" ask udp 41000 198.18.0.1 3478 3479)
  r_tcp=$(timeout 10 ip netns exec "$hr" python3 "$PROBE" ask tcp 41002 198.18.0.1 3478 2>/dev/null)
  echo "  sender host   UDP from :40000 seen as $s_udp; TCP from :40002 seen as $s_tcp"
  echo "  receiver host UDP from :41000 seen as $r_udp; TCP from :41002 seen as $r_tcp"
  s1=$(field "$s_udp" 3478) s2=$(field "$s_udp" 3479) r1=$(field "$r_udp" 3478) r2=$(field "$r_udp" 3479)

  judge "$([ -n "$s1" ] && [ -n "$(field "$s_tcp" 3478)" ] && echo 1)" "(a) sender host reaches 198.18.0.1 over UDP and TCP (as ${s1%:*}, its router's WAN address)"
  if [ "$case" = udp-blocked ]; then
    judge "$([ -z "$r1" ] && [ -z "$r2" ] && echo 1)" "(d) receiver host's UDP to 198.18.0.1 is dropped"
    judge "$([ -n "$(field "$r_tcp" 3478)" ] && echo 1)" "(d) receiver host's TCP to 198.18.0.1:3478 passes"
  else
    judge "$([ -n "$r1" ] && [ -n "$(field "$r_tcp" 3478)" ] && echo 1)" "(a) receiver host reaches 198.18.0.1 over UDP and TCP"
    judge "$([ "${r1#*:}" = 41000 ] && [ "${r2#*:}" = 41000 ] && echo 1)" "(b) receiver NAT is cone: port 41000 kept for both destinations (${r1#*:}, ${r2#*:})"
  fi
  if [ "$case" = symmetric ]; then
    judge "$([ -n "$s1" ] && [ -n "$s2" ] && [ "${s1#*:}" != "${s2#*:}" ] && echo 1)" "(b) sender NAT is symmetric: a port per destination (${s1#*:}, ${s2#*:})"
  else
    judge "$([ "${s1#*:}" = 40000 ] && [ "${s2#*:}" = 40000 ] && echo 1)" "(b) sender NAT is cone: port 40000 kept for both destinations (${s1#*:}, ${s2#*:})"
  fi

  c_udp=$(timeout 10 ip netns exec "$hr" python3 "$PROBE" ask udp 41004 192.168.1.2 5000)
  c_tcp=$(timeout 10 ip netns exec "$hr" python3 "$PROBE" ask tcp 41005 192.168.1.2 5000 2>&1 | tr '\n' ' ')
  c_local=$(timeout 10 ip netns exec "$hs" python3 "$PROBE" ask udp 40006 192.168.1.2 5000)
  judge "$([ -z "$(field "$c_udp" 5000)" ] && [[ "$c_tcp" == *'"5000": null'* ]] && [ -n "$(field "$c_local" 5000)" ] && echo 1)" \
    "(c) receiver host cannot reach 192.168.1.2:5000 (UDP $c_udp; TCP $c_tcp), the sender host itself can"

  if [ "$case" != udp-blocked ]; then
    mkdir -p "$work/punch"; rm -f "$work/punch"/*
    timeout 20 ip netns exec "$hs" python3 "$PROBE" punch 42000 s r "$work/punch" 6 >"$work/punch-s.out" &
    bg_pids+=($!); ps=$!
    sleep 1
    timeout 20 ip netns exec "$hr" python3 "$PROBE" punch 43000 r s "$work/punch" 5 >"$work/punch-r.out" &
    bg_pids+=($!); pr=$!
    wait "$ps" "$pr" || true
    ps_out=$(cat "$work/punch-s.out") pr_out=$(cat "$work/punch-r.out")
    echo "  punch: sender $ps_out"
    echo "  punch: receiver $pr_out"
    both=$(python3 -c 'import json,sys; a=json.loads(sys.argv[1]); b=json.loads(sys.argv[2]); print(1 if a.get("received_from") and b.get("received_from") else 0)' "$ps_out" "$pr_out")
    if [ "$case" = cone ]; then
      judge "$both" "(e) hole punching between the mapped addresses works both ways"
    else
      judge "$([ "$both" = 0 ] && echo 1)" "(e) hole punching fails (symmetric sender): only a relay can connect them"
    fi
  fi
  for pid in "${bg_pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  bg_pids=()
  "$NETNS" down "$prefix"
  ls /run/netns 2>/dev/null | grep -q "^$prefix" && { echo "  FAIL namespaces left"; fail=1; }
done
exit $fail
