//! Who may allocate. The TURN server asks [`RestAuth`] for the key of every authenticated
//! request and checks the message integrity against it; a request from a new client address
//! needs an unexpired username, while one from an address that already holds an allocation
//! (refreshes, permissions, channel binds) only needs it well formed, so a transfer outlives its
//! credential's expiry.
//!
//! The per-peer allocation quota is taken when the relay socket is made ([`Admission::admit`]),
//! that is after the integrity check passed: a wrong password costs the peer nothing. The `turn`
//! crate handles one request at a time per listening socket and, for an Allocate, looks up the
//! key, checks integrity, then asks for the relay socket; so with one server per listening
//! socket, the last (peer, address) its key lookup saw is the one the relay socket is for.

use super::credentials::{self, Issuer, UsernameError};
use crate::protocol::PeerId;
use crate::server::metrics::{Metrics, TurnRefusal};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use turn::auth::{generate_auth_key, AuthHandler};

/// An address that authenticated but has no allocation yet is forgotten after this long.
pub const PENDING_GRACE: Duration = Duration::from_secs(30);

/// The client addresses each peer allocates from. Entries come from successful key lookups
/// and go when the allocation closes (or, for one never made, after [`PENDING_GRACE`]).
#[derive(Debug, Default)]
pub struct Allocations {
    by_peer: Mutex<HashMap<PeerId, HashMap<SocketAddr, Entry>>>,
}

#[derive(Clone, Copy, Debug)]
enum Entry {
    /// Authenticated at this instant; no allocation seen yet.
    Pending(Instant),
    Live,
}

impl Allocations {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PeerId, HashMap<SocketAddr, Entry>>> {
        // A panic while holding this lock leaves plain data behind: keep using it.
        self.by_peer.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn knows(&self, peer: PeerId, addr: SocketAddr) -> bool {
        self.lock()
            .get(&peer)
            .is_some_and(|m| m.contains_key(&addr))
    }

    /// Admits `addr` for `peer` unless the peer already has `max` addresses.
    pub(super) fn admit(&self, peer: PeerId, addr: SocketAddr, max: usize, now: Instant) -> bool {
        let mut map = self.lock();
        let addrs = map.entry(peer).or_default();
        if addrs.contains_key(&addr) {
            return true;
        }
        if addrs.len() >= max {
            return false;
        }
        addrs.insert(addr, Entry::Pending(now));
        true
    }

    /// The allocations that exist now (from the server), as of `now`: pending entries that
    /// became allocations turn live, live ones that are gone and stale pending ones are dropped.
    pub fn reconcile(&self, live: &HashSet<(PeerId, SocketAddr)>, now: Instant) {
        let mut map = self.lock();
        map.retain(|peer, addrs| {
            addrs.retain(|addr, entry| {
                if live.contains(&(*peer, *addr)) {
                    *entry = Entry::Live;
                    return true;
                }
                match entry {
                    Entry::Live => false,
                    Entry::Pending(at) => now.duration_since(*at) < PENDING_GRACE,
                }
            });
            !addrs.is_empty()
        });
    }

    /// One allocation closed.
    pub fn closed(&self, peer: PeerId, addr: SocketAddr) {
        let mut map = self.lock();
        if let Some(addrs) = map.get_mut(&peer) {
            addrs.remove(&addr);
            if addrs.is_empty() {
                map.remove(&peer);
            }
        }
    }

    #[cfg(test)]
    /// Addresses held for `peer` (live or pending).
    pub fn count(&self, peer: PeerId) -> usize {
        self.lock().get(&peer).map_or(0, HashMap::len)
    }
}

/// The quota check for one listening socket's server: its key lookup notes who asked, its relay
/// factory admits that one (see the module's note on the order).
#[derive(Debug)]
pub struct Admission {
    last: Mutex<Option<(PeerId, SocketAddr)>>,
    pub allocations: Arc<Allocations>,
    pub max_per_peer: usize,
    pub metrics: Arc<Metrics>,
}

impl Admission {
    pub fn new(allocations: Arc<Allocations>, max_per_peer: usize, metrics: Arc<Metrics>) -> Self {
        Self {
            last: Mutex::new(None),
            allocations,
            max_per_peer: max_per_peer.max(1),
            metrics,
        }
    }

    fn note(&self, peer: PeerId, addr: SocketAddr) {
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some((peer, addr));
    }

    /// Takes a quota slot for the request whose key was looked up last; a refusal is counted.
    pub fn admit(&self) -> Result<(), turn::Error> {
        let last = self.last.lock().unwrap_or_else(|e| e.into_inner()).take();
        let admitted = last.is_some_and(|(peer, addr)| {
            self.allocations
                .admit(peer, addr, self.max_per_peer, Instant::now())
        });
        if admitted {
            Ok(())
        } else {
            Err(refuse(&self.metrics, TurnRefusal::AllocationQuota))
        }
    }
}

fn refuse(metrics: &Metrics, why: TurnRefusal) -> turn::Error {
    metrics.turn_refuse(why);
    turn::Error::Other(why.label().into())
}

/// The `turn` crate's key lookup, with our credentials.
pub struct RestAuth {
    pub issuer: Issuer,
    pub admission: Arc<Admission>,
}

impl RestAuth {
    fn refuse(&self, why: TurnRefusal) -> turn::Error {
        refuse(&self.admission.metrics, why)
    }
}

impl AuthHandler for RestAuth {
    fn auth_handle(
        &self,
        username: &str,
        realm: &str,
        src_addr: SocketAddr,
    ) -> Result<Vec<u8>, turn::Error> {
        let peer = match credentials::parse_username(username, SystemTime::now()) {
            Ok(peer) => peer,
            Err(UsernameError::Expired) => match credentials::username_peer(username) {
                // An allocation made in time keeps being refreshed.
                Some(peer) if self.admission.allocations.knows(peer, src_addr) => peer,
                _ => return Err(self.refuse(TurnRefusal::Expired)),
            },
            Err(UsernameError::Malformed) => return Err(self.refuse(TurnRefusal::BadUsername)),
        };
        self.admission.note(peer, src_addr);
        let password = self.issuer.credential(username);
        Ok(generate_auth_key(username, realm, &password))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([198, 18, 1, 2], port))
    }

    fn auth(max: usize) -> RestAuth {
        RestAuth {
            issuer: Issuer::new(b"s3cret", Duration::from_secs(600), vec![]),
            admission: Arc::new(Admission::new(Arc::default(), max, Arc::default())),
        }
    }

    /// The key lookup then the relay socket, as the server does for an Allocate.
    fn allocate(a: &RestAuth, user: &str, from: SocketAddr) -> Result<(), turn::Error> {
        a.auth_handle(user, "r", from)?;
        a.admission.admit()
    }

    #[test]
    fn a_fresh_credential_gets_the_key_its_password_makes() {
        let a = auth(2);
        let peer = PeerId::new_random();
        let server = a.issuer.ice_server(peer, SystemTime::now());
        let (user, pass) = (server.username.unwrap(), server.credential.unwrap());
        let key = a.auth_handle(&user, "beamdrop", addr(1)).unwrap();
        assert_eq!(key, generate_auth_key(&user, "beamdrop", &pass));
        assert_eq!(
            a.admission.allocations.count(peer),
            0,
            "no relay socket yet"
        );
        a.admission.admit().unwrap();
        assert_eq!(a.admission.allocations.count(peer), 1);
    }

    #[test]
    fn a_key_lookup_without_a_relay_socket_takes_no_quota() {
        // What a wrong password looks like from here: looked up, never allocated.
        let a = auth(1);
        let peer = PeerId::new_random();
        let user = a
            .issuer
            .ice_server(peer, SystemTime::now())
            .username
            .unwrap();
        for port in 1..=5 {
            assert!(a.auth_handle(&user, "r", addr(port)).is_ok());
        }
        assert!(allocate(&a, &user, addr(9)).is_ok());
        // A relay socket asked for with no lookup before it: refused.
        assert!(a.admission.admit().is_err());
    }

    #[test]
    fn the_quota_counts_client_addresses_per_peer() {
        let a = auth(2);
        let peer = PeerId::new_random();
        let user = a
            .issuer
            .ice_server(peer, SystemTime::now())
            .username
            .unwrap();
        assert!(allocate(&a, &user, addr(1)).is_ok());
        assert!(allocate(&a, &user, addr(2)).is_ok());
        // Again from a known address (a refresh): fine. A third address: refused, and counted.
        assert!(a.auth_handle(&user, "r", addr(1)).is_ok());
        assert!(allocate(&a, &user, addr(3)).is_err());
        let metrics = &a.admission.metrics;
        assert_eq!(metrics.turn_refusals(TurnRefusal::AllocationQuota), 1);
        // Another peer has its own quota.
        let other = a.issuer.ice_server(PeerId::new_random(), SystemTime::now());
        assert!(allocate(&a, &other.username.unwrap(), addr(3)).is_ok());
        // One allocation closes: room again.
        a.admission.allocations.closed(peer, addr(2));
        assert!(allocate(&a, &user, addr(3)).is_ok());
    }

    #[test]
    fn an_expired_credential_only_keeps_what_it_allocated() {
        let a = auth(4);
        let peer = PeerId::new_random();
        let long_ago = SystemTime::now() - Duration::from_secs(3600);
        let user = a.issuer.ice_server(peer, long_ago).username.unwrap();
        assert!(a.auth_handle(&user, "r", addr(1)).is_err());
        assert_eq!(a.admission.metrics.turn_refusals(TurnRefusal::Expired), 1);
        // Had it allocated from addr(1) while valid, refreshes would go on.
        let now = Instant::now();
        assert!(a.admission.allocations.admit(peer, addr(1), 4, now));
        a.admission
            .allocations
            .reconcile(&HashSet::from([(peer, addr(1))]), now);
        assert!(a.auth_handle(&user, "r", addr(1)).is_ok());
        assert!(a.auth_handle(&user, "r", addr(2)).is_err());
        assert!(a.auth_handle("nonsense", "r", addr(1)).is_err());
        assert_eq!(
            a.admission.metrics.turn_refusals(TurnRefusal::BadUsername),
            1
        );
    }

    #[test]
    fn reconcile_keeps_live_allocations_and_forgets_stale_pending_ones() {
        let allocations = Allocations::default();
        let peer = PeerId::new_random();
        let t0 = Instant::now();
        assert!(allocations.admit(peer, addr(1), 8, t0));
        assert!(allocations.admit(peer, addr(2), 8, t0));
        allocations.reconcile(&HashSet::from([(peer, addr(1))]), t0);
        assert_eq!(allocations.count(peer), 2, "pending within its grace");
        allocations.reconcile(&HashSet::from([(peer, addr(1))]), t0 + PENDING_GRACE);
        assert_eq!(allocations.count(peer), 1, "pending past its grace: gone");
        allocations.reconcile(&HashSet::new(), t0 + PENDING_GRACE);
        assert_eq!(allocations.count(peer), 0, "live but closed: gone");
    }
}
