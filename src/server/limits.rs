//! Admission and pacing for hostile clients: the Origin check and the per-IP connection cap (both
//! before the WebSocket upgrade), and the per-connection token bucket on client messages.

use dashmap::{mapref::entry::Entry, DashMap};
use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use std::net::{IpAddr, Ipv6Addr};
use std::num::NonZeroU32;
use std::sync::Arc;

/// A connection's message allowance: `burst` messages at once, refilled at `per_sec` (governor's
/// GCRA: one atomic word of state). Owned by one socket task. `per_sec == 0` (or `burst == 0`)
/// disables it. Generic over the clock so tests can move time by hand.
pub struct TokenBucket<C: Clock = DefaultClock> {
    limiter: Option<RateLimiter<NotKeyed, InMemoryState, C, NoOpMiddleware<C::Instant>>>,
}

impl TokenBucket {
    pub fn new(burst: u32, per_sec: u32) -> Self {
        Self::with_clock(burst, per_sec, DefaultClock::default())
    }
}

impl<C: Clock> TokenBucket<C> {
    pub fn with_clock(burst: u32, per_sec: u32, clock: C) -> Self {
        let limiter = NonZeroU32::new(burst)
            .zip(NonZeroU32::new(per_sec))
            .map(|(burst, rate)| {
                RateLimiter::direct_with_clock(Quota::per_second(rate).allow_burst(burst), clock)
            });
        Self { limiter }
    }

    /// Takes one message's allowance if there is one.
    pub fn try_take(&self) -> bool {
        self.limiter.as_ref().is_none_or(|l| l.check().is_ok())
    }
}

/// Concurrent sockets per client address, capped. One sharded map; each acquire and release is
/// one entry operation, so the check and the increment cannot race.
#[derive(Debug)]
pub struct IpConnections {
    cap: usize,
    counts: DashMap<IpAddr, usize>,
}

/// One counted connection (nothing, when the cap is off); dropping it gives the slot back.
#[derive(Debug)]
pub struct IpSlot(Option<(Arc<IpConnections>, IpAddr)>);

impl IpConnections {
    /// `cap == 0` means unlimited (nothing is tracked).
    pub fn new(cap: usize) -> Arc<Self> {
        Arc::new(Self {
            cap,
            counts: DashMap::new(),
        })
    }

    /// A slot for `ip`, or `None` when it already has `cap` sockets open.
    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Option<IpSlot> {
        if self.cap == 0 {
            return Some(IpSlot(None));
        }
        let key = ip_key(ip);
        match self.counts.entry(key) {
            Entry::Occupied(mut e) => {
                if *e.get() >= self.cap {
                    return None;
                }
                *e.get_mut() += 1;
            }
            Entry::Vacant(e) => {
                e.insert(1);
            }
        }
        Some(IpSlot(Some((self.clone(), key))))
    }

    /// Open sockets counted for `ip` right now.
    pub fn count(&self, ip: IpAddr) -> usize {
        self.counts.get(&ip_key(ip)).map_or(0, |c| *c)
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let Some((table, key)) = &self.0 else {
            return;
        };
        if let Entry::Occupied(mut e) = table.counts.entry(*key) {
            if *e.get() <= 1 {
                e.remove();
            } else {
                *e.get_mut() -= 1;
            }
        }
    }
}

/// The address a cap applies to: IPv4 as is (IPv4-mapped IPv6 too), IPv6 by its /64, since one
/// host commonly holds a whole /64.
pub(crate) fn ip_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(prefix))
        }
        v4 => v4,
    }
}

/// Whether a browser page from `origin` may open the socket.
///
/// No `Origin` header: not a browser (or a same-origin request from an old one), allowed. Else the
/// origin's `host[:port]` must equal the request's `Host` (the page was served by this server,
/// whatever the scheme a TLS proxy put in front), or the origin must be listed in `allowed`
/// (exactly, ignoring case and a trailing `/`), or `allowed` contains `"*"`.
pub fn origin_allowed(origin: Option<&str>, host: Option<&str>, allowed: &[String]) -> bool {
    let Some(origin) = origin else {
        return true;
    };
    let origin = origin.trim().trim_end_matches('/');
    if allowed
        .iter()
        .any(|a| a == "*" || a.trim().trim_end_matches('/').eq_ignore_ascii_case(origin))
    {
        return true;
    }
    let Some((scheme, authority)) = origin.split_once("://") else {
        return false; // "null" (sandboxed frames, file://) and garbage
    };
    if authority.is_empty() || authority.contains(['/', '@', '?', '#']) {
        return false;
    }
    let Some(host) = host.map(str::trim).filter(|h| !h.is_empty()) else {
        return false;
    };
    let default_port = match scheme.to_ascii_lowercase().as_str() {
        "http" | "ws" => ":80",
        "https" | "wss" => ":443",
        _ => return false,
    };
    let normalize = |s: &str| {
        let s = s.to_ascii_lowercase();
        match s.strip_suffix(default_port) {
            Some(bare) => bare.to_owned(),
            None => s,
        }
    };
    normalize(authority) == normalize(host)
}

/// [`client_ip`] of a request: its socket's peer and its `X-Forwarded-For` headers.
pub fn request_client_ip(
    peer: IpAddr,
    headers: &axum::http::HeaderMap,
    trusted: &[ipnet::IpNet],
) -> IpAddr {
    let forwarded_for: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    client_ip(peer, &forwarded_for, trusted)
}

/// The client's address: the socket's peer, unless that is a trusted reverse proxy, in which case
/// the rightmost `X-Forwarded-For` entry that is not a trusted proxy (each proxy appends the
/// address it heard from; entries left of the first untrusted one are the client's to forge).
/// A header that cannot be read leaves the proxy's own address, never an error.
pub fn client_ip(peer: IpAddr, forwarded_for: &[&str], trusted: &[ipnet::IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let hops = forwarded_for
        .iter()
        .flat_map(|header| header.split(','))
        .map(|hop| hop.trim().parse::<IpAddr>());
    let mut client = peer;
    for hop in hops.rev() {
        match hop {
            Ok(ip) if is_trusted(&ip) => client = ip,
            Ok(ip) => return ip,
            Err(_) => return client,
        }
    }
    client
}

/// How often an address may do something costly (create a share, look one up), per minute with
/// the same burst; governor's keyed limiter, keyed by [`ip_key`]. Addresses quiet for a while are
/// forgotten as the table grows, so it holds only recent ones.
pub struct PerIpRate {
    limiter: governor::DefaultKeyedRateLimiter<IpAddr>,
}

/// Addresses tracked before quiet ones are swept out.
const RATE_SWEEP_AT: usize = 4096;

impl PerIpRate {
    /// `None` for 0 (unlimited).
    pub fn per_minute(n: u32) -> Option<Arc<Self>> {
        let n = NonZeroU32::new(n)?;
        Some(Arc::new(Self {
            limiter: RateLimiter::keyed(Quota::per_minute(n)),
        }))
    }

    /// Takes one from `ip`'s allowance; `false` when it has none left.
    pub fn check(&self, ip: IpAddr) -> bool {
        if self.limiter.len() >= RATE_SWEEP_AT {
            self.limiter.retain_recent();
        }
        self.limiter.check_key(&ip_key(ip)).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;
    use std::time::Duration;

    #[test]
    fn bucket_allows_a_burst_then_the_sustained_rate() {
        let clock = FakeRelativeClock::default();
        let b = TokenBucket::with_clock(5, 2, clock.clone());
        assert!((0..5).all(|_| b.try_take()));
        assert!(!b.try_take());
        // Half a second refills one message at 2/s.
        clock.advance(Duration::from_millis(500));
        assert!(b.try_take());
        assert!(!b.try_take());
        // A long pause refills to the burst, never beyond.
        clock.advance(Duration::from_secs(60));
        assert!((0..5).all(|_| b.try_take()));
        assert!(!b.try_take());
    }

    #[test]
    fn a_zero_rate_or_burst_disables_the_bucket() {
        let b = TokenBucket::new(50, 0);
        assert!((0..1000).all(|_| b.try_take()));
        let b = TokenBucket::new(0, 20);
        assert!((0..1000).all(|_| b.try_take()));
    }

    #[test]
    fn ip_cap_counts_and_releases() {
        let table = IpConnections::new(2);
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let other: IpAddr = "192.0.2.8".parse().unwrap();
        let a = table.try_acquire(ip).unwrap();
        let b = table.try_acquire(ip).unwrap();
        assert!(table.try_acquire(ip).is_none());
        // The IPv4-mapped form is the same client.
        assert!(table
            .try_acquire("::ffff:192.0.2.7".parse().unwrap())
            .is_none());
        let c = table.try_acquire(other).unwrap();
        assert_eq!(table.count(ip), 2);
        drop(a);
        assert_eq!(table.count(ip), 1);
        let a = table.try_acquire(ip).unwrap();
        drop((a, b, c));
        assert_eq!(table.count(ip), 0);
        assert!(table.counts.is_empty(), "released entries are removed");
    }

    #[test]
    fn ipv6_clients_are_capped_per_64() {
        let table = IpConnections::new(1);
        let _a = table
            .try_acquire("2001:db8:1:2::1".parse().unwrap())
            .unwrap();
        assert!(table
            .try_acquire("2001:db8:1:2:ffff::9".parse().unwrap())
            .is_none());
        assert!(table
            .try_acquire("2001:db8:1:3::1".parse().unwrap())
            .is_some());
    }

    #[test]
    fn a_zero_cap_is_unlimited() {
        let table = IpConnections::new(0);
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let slots: Vec<_> = (0..1000).map(|_| table.try_acquire(ip).unwrap()).collect();
        assert!(slots.iter().all(|s| s.0.is_none()));
        assert_eq!(table.count(ip), 0);
    }

    #[test]
    fn origin_rules() {
        let none: &[String] = &[];
        let host = Some("127.0.0.1:3000");
        // Non-browser clients send no Origin.
        assert!(origin_allowed(None, host, none));
        assert!(origin_allowed(None, None, none));
        // Same origin, as the page served by this server sends it.
        assert!(origin_allowed(Some("http://127.0.0.1:3000"), host, none));
        assert!(origin_allowed(Some("HTTP://127.0.0.1:3000/"), host, none));
        // Behind a TLS proxy: the scheme differs, default ports are implied.
        assert!(origin_allowed(
            Some("https://drop.example.org"),
            Some("drop.example.org"),
            none
        ));
        assert!(origin_allowed(
            Some("https://Drop.Example.org"),
            Some("drop.example.org:443"),
            none
        ));
        assert!(origin_allowed(
            Some("http://[::1]:3000"),
            Some("[::1]:3000"),
            none
        ));
        // Other origins.
        assert!(!origin_allowed(Some("http://127.0.0.1:3001"), host, none));
        assert!(!origin_allowed(Some("http://localhost:3000"), host, none));
        assert!(!origin_allowed(Some("https://evil.example"), host, none));
        assert!(!origin_allowed(
            Some("http://127.0.0.1:3000.evil.example"),
            host,
            none
        ));
        assert!(!origin_allowed(
            Some("http://evil@127.0.0.1:3000"),
            host,
            none
        ));
        assert!(!origin_allowed(Some("null"), host, none));
        assert!(!origin_allowed(Some(""), host, none));
        assert!(!origin_allowed(Some("ftp://127.0.0.1:3000"), host, none));
        assert!(!origin_allowed(Some("http://127.0.0.1:3000"), None, none));
        // Listed origins, and the wildcard.
        let listed = vec!["https://drop.example.org/".to_string()];
        assert!(origin_allowed(
            Some("https://drop.example.org"),
            host,
            &listed
        ));
        assert!(!origin_allowed(
            Some("http://drop.example.org"),
            host,
            &listed
        ));
        let any = vec!["*".to_string()];
        assert!(origin_allowed(Some("https://anything.example"), host, &any));
        assert!(origin_allowed(Some("null"), host, &any));
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let trusted: Vec<ipnet::IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        // From a stranger the header is ignored: it is the client's to write.
        assert_eq!(
            client_ip(ip("203.0.113.9"), &["198.51.100.1"], &trusted),
            ip("203.0.113.9")
        );
        // From the proxy: the address it heard from.
        assert_eq!(
            client_ip(ip("10.0.0.2"), &["198.51.100.1"], &trusted),
            ip("198.51.100.1")
        );
        // A forged entry on the left does not help; chained proxies are skipped from the right,
        // across repeated headers too.
        assert_eq!(
            client_ip(
                ip("10.0.0.2"),
                &["1.2.3.4, 198.51.100.1", "10.0.0.3"],
                &trusted
            ),
            ip("198.51.100.1")
        );
        // Nothing usable: the last trusted hop stands (counted as one client).
        assert_eq!(client_ip(ip("10.0.0.2"), &[], &trusted), ip("10.0.0.2"));
        assert_eq!(
            client_ip(ip("10.0.0.2"), &["junk"], &trusted),
            ip("10.0.0.2")
        );
        assert_eq!(
            client_ip(ip("10.0.0.2"), &["10.0.0.5"], &trusted),
            ip("10.0.0.5")
        );
        // No trusted proxies configured: always the socket's peer.
        assert_eq!(
            client_ip(ip("10.0.0.2"), &["198.51.100.1"], &[]),
            ip("10.0.0.2")
        );
    }

    #[test]
    fn a_per_ip_rate_spends_each_addresses_own_allowance() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let rate = PerIpRate::per_minute(3).expect("limited");
        let (a, b) = (ip("198.51.100.1"), ip("198.51.100.2"));
        assert!((0..3).all(|_| rate.check(a)));
        assert!(!rate.check(a), "a fourth within the minute");
        assert!(rate.check(b), "another address has its own");
        // One IPv6 host holds a /64: its addresses share one allowance.
        let (v6a, v6b) = (ip("2001:db8::1"), ip("2001:db8::2"));
        assert!((0..3).all(|_| rate.check(v6a)));
        assert!(!rate.check(v6b));
        assert!(PerIpRate::per_minute(0).is_none(), "0 is unlimited");
    }
}
