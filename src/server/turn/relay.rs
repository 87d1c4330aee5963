//! Relay sockets, one UDP port per allocation, each wrapped in a guard: no traffic to or from
//! addresses that are not public (unless allowed), a byte rate per allocation, a longest life,
//! and every relayed byte counted.

use super::auth::Admission;
use crate::server::metrics::{Gauge, GaugeGuard, Metrics, TurnRefusal};
use async_trait::async_trait;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use rand::Rng;
use std::any::Any;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::UdpSocket;
use tokio::time::Instant;
use turn::relay::RelayAddressGenerator;
use webrtc_util::Conn;

/// Whether the relay may exchange packets with `ip`: a public unicast address, or anything when
/// `allow_private` (tests on one machine).
pub fn peer_allowed(ip: IpAddr, allow_private: bool) -> bool {
    allow_private || is_public(ip)
}

fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => is_public_v4(v4),
            None => is_public_v6(v6),
        },
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    let shared = a == 100 && (64..128).contains(&b); // 100.64.0.0/10, carrier-grade NAT
    let this_network = a == 0;
    !(ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || shared
        || this_network)
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let first = ip.segments()[0];
    let unique_local = first & 0xfe00 == 0xfc00; // fc00::/7
    let link_local = first & 0xffc0 == 0xfe80; // fe80::/10
    !(ip.is_loopback() || ip.is_unspecified() || ip.is_multicast() || unique_local || link_local)
}

/// What every relay socket of one server obeys.
#[derive(Debug)]
pub struct Policy {
    pub allow_private: bool,
    /// Bytes per second per allocation and direction; `None`: no limit.
    pub bytes_per_sec: Option<NonZeroU32>,
    pub max_lifetime: Duration,
    pub metrics: Arc<Metrics>,
}

/// Makes the relay sockets: a free port in the range, bound on `bind_ip`, advertised at
/// `public_ip`.
pub struct GuardedRelays {
    pub bind_ip: IpAddr,
    pub public_ip: IpAddr,
    pub ports: [u16; 2],
    pub policy: Arc<Policy>,
    /// The per-peer quota, taken here: only a request that passed the integrity check gets here.
    pub admission: Arc<Admission>,
}

/// Random ports tried per allocation before giving up (the range is mostly free).
const PORT_TRIES: usize = 32;

#[async_trait]
impl RelayAddressGenerator for GuardedRelays {
    fn validate(&self) -> Result<(), turn::Error> {
        if self.ports[0] == 0 || self.ports[0] > self.ports[1] {
            return Err(turn::Error::Other("bad relay port range".into()));
        }
        Ok(())
    }

    async fn allocate_conn(
        &self,
        _use_ipv4: bool,
        _requested_port: u16,
    ) -> Result<(Arc<dyn Conn + Send + Sync>, SocketAddr), turn::Error> {
        self.admission.admit()?;
        for _ in 0..PORT_TRIES {
            let port = rand::rng().random_range(self.ports[0]..=self.ports[1]);
            let Ok(socket) = UdpSocket::bind(SocketAddr::new(self.bind_ip, port)).await else {
                continue;
            };
            let conn = GuardedConn::new(socket, self.policy.clone());
            return Ok((Arc::new(conn), SocketAddr::new(self.public_ip, port)));
        }
        self.policy.metrics.turn_refuse(TurnRefusal::NoRelayPort);
        Err(turn::Error::Other("no free relay port".into()))
    }
}

/// One allocation's relay socket.
pub struct GuardedConn {
    socket: UdpSocket,
    policy: Arc<Policy>,
    deadline: Instant,
    /// Peer → client and client → peer, each its own budget (in KiB cells).
    inbound: Option<DefaultDirectRateLimiter>,
    outbound: Option<DefaultDirectRateLimiter>,
    _live: GaugeGuard,
}

impl GuardedConn {
    pub fn new(socket: UdpSocket, policy: Arc<Policy>) -> Self {
        let limiter = || {
            policy.bytes_per_sec.map(|rate| {
                let kib = NonZeroU32::new(rate.get().div_ceil(1024)).unwrap_or(NonZeroU32::MIN);
                RateLimiter::direct(Quota::per_second(kib))
            })
        };
        policy.metrics.turn_allocation();
        Self {
            socket,
            deadline: Instant::now() + policy.max_lifetime,
            inbound: limiter(),
            outbound: limiter(),
            _live: policy.metrics.track(Gauge::TurnAllocations),
            policy,
        }
    }

    /// Whether a packet of `len` bytes to or from `addr` may pass; counts what it refuses.
    fn admit(
        &self,
        addr: SocketAddr,
        len: usize,
        limiter: &Option<DefaultDirectRateLimiter>,
    ) -> bool {
        if !peer_allowed(addr.ip(), self.policy.allow_private) {
            self.policy.metrics.turn_refuse(TurnRefusal::PrivatePeer);
            return false;
        }
        if let Some(limiter) = limiter {
            let cells = u32::try_from(len.div_ceil(1024))
                .ok()
                .and_then(NonZeroU32::new)
                .unwrap_or(NonZeroU32::MIN);
            if !matches!(limiter.check_n(cells), Ok(Ok(()))) {
                self.policy.metrics.turn_refuse(TurnRefusal::RateLimited);
                return false;
            }
        }
        self.policy.metrics.turn_relayed(len);
        true
    }

    fn expired(&self) -> webrtc_util::Error {
        self.policy.metrics.turn_refuse(TurnRefusal::Lifetime);
        webrtc_util::Error::Other("allocation reached its longest life".into())
    }
}

#[async_trait]
impl Conn for GuardedConn {
    async fn connect(&self, _addr: SocketAddr) -> Result<(), webrtc_util::Error> {
        Err(webrtc_util::Error::Other(
            "relay sockets do not connect".into(),
        ))
    }

    async fn recv(&self, buf: &mut [u8]) -> Result<usize, webrtc_util::Error> {
        self.recv_from(buf).await.map(|(n, _)| n)
    }

    async fn recv_from(&self, buf: &mut [u8]) -> Result<(usize, SocketAddr), webrtc_util::Error> {
        loop {
            let (n, from) = tokio::select! {
                got = self.socket.recv_from(buf) => got?,
                _ = tokio::time::sleep_until(self.deadline) => return Err(self.expired()),
            };
            if self.admit(from, n, &self.inbound) {
                return Ok((n, from));
            }
        }
    }

    async fn send(&self, _buf: &[u8]) -> Result<usize, webrtc_util::Error> {
        Err(webrtc_util::Error::Other(
            "relay sockets send to an address".into(),
        ))
    }

    async fn send_to(&self, buf: &[u8], target: SocketAddr) -> Result<usize, webrtc_util::Error> {
        if Instant::now() >= self.deadline {
            return Err(self.expired());
        }
        if !self.admit(target, buf.len(), &self.outbound) {
            // Dropped, as a congested or filtering network would.
            return Ok(buf.len());
        }
        Ok(self.socket.send_to(buf, target).await?)
    }

    fn local_addr(&self) -> Result<SocketAddr, webrtc_util::Error> {
        Ok(self.socket.local_addr()?)
    }

    fn remote_addr(&self) -> Option<SocketAddr> {
        None
    }

    async fn close(&self) -> Result<(), webrtc_util::Error> {
        // The socket closes when the allocation lets go of its last handle.
        Ok(())
    }

    fn as_any(&self) -> &(dyn Any + Send + Sync) {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_public_unicast_addresses_are_relayed_to() {
        for public in ["198.18.0.1", "8.8.8.8", "2001:4860::8888", "::ffff:8.8.8.8"] {
            assert!(peer_allowed(public.parse().unwrap(), false), "{public}");
        }
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "0.1.2.3",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
        ] {
            assert!(!peer_allowed(private.parse().unwrap(), false), "{private}");
            assert!(peer_allowed(private.parse().unwrap(), true), "{private}");
        }
    }

    fn policy(rate: Option<u32>, allow_private: bool, life: Duration) -> Arc<Policy> {
        Arc::new(Policy {
            allow_private,
            bytes_per_sec: rate.and_then(NonZeroU32::new),
            max_lifetime: life,
            metrics: Arc::default(),
        })
    }

    async fn pair(policy: Arc<Policy>) -> (GuardedConn, UdpSocket) {
        let relay = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        (GuardedConn::new(relay, policy), peer)
    }

    #[tokio::test]
    async fn private_peers_are_refused_both_ways_unless_allowed() {
        let p = policy(None, false, Duration::from_secs(60));
        let (relay, peer) = pair(p.clone()).await;
        let to = peer.local_addr().unwrap();
        // Out: dropped, counted, nothing arrives.
        assert_eq!(relay.send_to(b"hello", to).await.unwrap(), 5);
        let mut buf = [0u8; 16];
        let got = tokio::time::timeout(Duration::from_millis(200), peer.recv_from(&mut buf)).await;
        assert!(got.is_err(), "a packet reached a loopback peer");
        // In: dropped, counted, never handed to the allocation.
        peer.send_to(b"knock", relay.local_addr().unwrap())
            .await
            .unwrap();
        let got = tokio::time::timeout(Duration::from_millis(200), relay.recv_from(&mut buf)).await;
        assert!(got.is_err(), "a loopback packet was relayed");
        assert_eq!(p.metrics.turn_refusals(TurnRefusal::PrivatePeer), 2);
        assert_eq!(p.metrics.turn_relayed_bytes(), 0);
        assert_eq!(p.metrics.gauge_value(Gauge::TurnAllocations), 1);
        drop(relay);
        assert_eq!(p.metrics.gauge_value(Gauge::TurnAllocations), 0);

        let p = policy(None, true, Duration::from_secs(60));
        let (relay, peer) = pair(p.clone()).await;
        relay
            .send_to(b"hello", peer.local_addr().unwrap())
            .await
            .unwrap();
        let (n, _) = peer.recv_from(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"hello");
        assert_eq!(p.metrics.turn_relayed_bytes(), 5);
    }

    #[tokio::test]
    async fn the_rate_is_capped_per_allocation() {
        // 64 KiB/s: a burst of 200 KiB gets about 64 KiB through, the rest is dropped.
        let p = policy(Some(64 * 1024), true, Duration::from_secs(60));
        let (relay, peer) = pair(p.clone()).await;
        let to = peer.local_addr().unwrap();
        let packet = [7u8; 1024];
        for _ in 0..200 {
            relay.send_to(&packet, to).await.unwrap();
        }
        let sent = p.metrics.turn_relayed_bytes();
        assert!((60 * 1024..=70 * 1024).contains(&sent), "{sent}");
        assert!(p.metrics.turn_refusals(TurnRefusal::RateLimited) >= 130);
    }

    #[tokio::test]
    async fn an_allocation_ends_at_its_longest_life() {
        let p = policy(None, true, Duration::from_millis(100));
        let (relay, peer) = pair(p.clone()).await;
        let mut buf = [0u8; 16];
        let err = tokio::time::timeout(Duration::from_secs(5), relay.recv_from(&mut buf))
            .await
            .expect("recv_from should end at the deadline");
        assert!(err.is_err());
        assert!(relay
            .send_to(b"late", peer.local_addr().unwrap())
            .await
            .is_err());
        assert_eq!(p.metrics.turn_refusals(TurnRefusal::Lifetime), 2);
    }
}
