//! TURN REST credentials (draft-uberti-behave-turn-rest, what coturn's `use-auth-secret` checks):
//! `username = <unix expiry>:<peer id>`, `credential = base64(HMAC-SHA1(secret, username))`.
//! Handed to each peer in its `welcome`; nobody can mint one without the secret, and one that
//! leaks stops opening allocations at its expiry.

use crate::protocol::{IceServer, PeerId};
use base64::prelude::{Engine, BASE64_STANDARD};
use hmac::{Hmac, Mac};
use sha1::Sha1;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Why a username was refused before its integrity was even checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum UsernameError {
    #[error("not <expiry>:<peer id>")]
    Malformed,
    #[error("expired")]
    Expired,
}

/// Mints credentials for peers.
#[derive(Clone)]
pub struct Issuer {
    secret: Vec<u8>,
    ttl: Duration,
    urls: Vec<String>,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issuer")
            .field("ttl", &self.ttl)
            .field("urls", &self.urls)
            .finish_non_exhaustive()
    }
}

impl Issuer {
    pub fn new(secret: &[u8], ttl: Duration, urls: Vec<String>) -> Self {
        Self {
            secret: secret.to_vec(),
            ttl,
            urls,
        }
    }

    /// The ICE server entry for `peer`, valid for new allocations until `now + ttl`.
    pub fn ice_server(&self, peer: PeerId, now: SystemTime) -> IceServer {
        let expiry = unix_secs(now) + self.ttl.as_secs();
        let username = format!("{expiry}:{peer}");
        IceServer {
            urls: self.urls.clone(),
            credential: Some(self.credential(&username)),
            username: Some(username),
        }
    }

    /// How often a connected peer gets a fresh credential: halfway through the last one's life.
    pub fn refresh_every(&self) -> Duration {
        self.ttl / 2
    }

    /// The password that goes with `username` (what the TURN server derives its key from).
    pub fn credential(&self, username: &str) -> String {
        // HMAC takes keys of any length: `new_from_slice` cannot fail for it.
        let mut mac = match Hmac::<Sha1>::new_from_slice(&self.secret) {
            Ok(mac) => mac,
            Err(_) => unreachable!("HMAC accepts any key length"),
        };
        mac.update(username.as_bytes());
        BASE64_STANDARD.encode(mac.finalize().into_bytes())
    }
}

/// The peer a username was issued to, if it is well formed; `Expired` once `now` is past it.
pub fn parse_username(username: &str, now: SystemTime) -> Result<PeerId, UsernameError> {
    let (expiry, peer) = username.split_once(':').ok_or(UsernameError::Malformed)?;
    let expiry: u64 = expiry.parse().map_err(|_| UsernameError::Malformed)?;
    let peer = uuid::Uuid::parse_str(peer)
        .map(PeerId)
        .map_err(|_| UsernameError::Malformed)?;
    if expiry < unix_secs(now) {
        return Err(UsernameError::Expired);
    }
    Ok(peer)
}

/// The peer a username names, expired or not (for allocations already made with it).
pub fn username_peer(username: &str) -> Option<PeerId> {
    uuid::Uuid::parse_str(username.split_once(':')?.1)
        .ok()
        .map(PeerId)
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issuer() -> Issuer {
        Issuer::new(
            b"north",
            Duration::from_secs(600),
            vec!["turn:198.18.0.1:3478".into()],
        )
    }

    #[test]
    fn credential_is_the_turn_rest_hmac() {
        // Computed independently: `printf 1433961420:user | openssl dgst -sha1 -hmac north
        // -binary | base64`.
        let c = issuer().credential("1433961420:user");
        let raw = BASE64_STANDARD.decode(&c).unwrap();
        assert_eq!(raw.len(), 20);
        assert_eq!(c, "tC0NI/98GT0u8idtDzLlzWlv2Lk=");
    }

    #[test]
    fn a_peers_entry_names_it_and_expires_after_the_ttl() {
        let peer = PeerId::new_random();
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let server = issuer().ice_server(peer, now);
        let username = server.username.clone().unwrap();
        assert_eq!(username, format!("1000600:{peer}"));
        assert_eq!(server.credential.unwrap(), issuer().credential(&username));
        assert_eq!(server.urls, vec!["turn:198.18.0.1:3478"]);
        assert_eq!(parse_username(&username, now), Ok(peer));
        assert_eq!(
            parse_username(&username, now + Duration::from_secs(600)),
            Ok(peer)
        );
        assert_eq!(
            parse_username(&username, now + Duration::from_secs(601)),
            Err(UsernameError::Expired)
        );
        assert_eq!(username_peer(&username), Some(peer));
    }

    #[test]
    fn malformed_usernames_are_refused() {
        let now = SystemTime::now();
        for bad in [
            "",
            "user",
            "12:",
            ":",
            "x:00000000000000000000000000000000",
            "1:nothex",
        ] {
            assert_eq!(
                parse_username(bad, now),
                Err(UsernameError::Malformed),
                "{bad:?}"
            );
        }
    }
}
