//! The signaling broker: peers addressed by topic `peer:<id>`, each registered as `peer_state:<id>`
//! for exactly as long as its socket task lives, and shares bound to their sender's peer.
//!
//! One trait, one implementation per backend, chosen from config by URI scheme.

mod memory;
mod redis;
mod topic;

pub use self::redis::{RedisBroker, RedisOptions};
pub use memory::MemoryBroker;
pub use topic::{topic, Inbox, InboxLimits, Outbox, TrySendError};

use crate::protocol::{ClaimToken, PeerId, ServerMsg, ShareId};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::Duration;

/// How long after its lease ends (its socket closed, its node died) a share can still be
/// reclaimed with its token. Longer than any reconnect backoff; the record left behind is a
/// share id and a hash.
pub const RECLAIM_WINDOW: Duration = Duration::from_secs(15 * 60);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BrokerError {
    #[error("no such peer")]
    UnknownPeer,
    #[error("the peer's inbox is full")]
    PeerBusy,
    #[error("peer id already registered")]
    AlreadyRegistered,
    #[error("this node is shutting down")]
    Closed,
    /// The claim token does not match the share's, or the share is unknown (or gone for longer
    /// than the reclaim window).
    #[error("share not reclaimed")]
    ClaimRefused,
    #[error("unsupported broker URI {0:?} (expected memory:// or redis://host:port)")]
    UnsupportedUri(String),
    #[error("backend: {0}")]
    Backend(String),
    /// The node keeps as many share records as it may, every one of them live.
    #[error("this server holds as many shares as it can; try again later")]
    ShareRecordsFull,
}

/// What the broker holds at most.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrokerLimits {
    pub inbox: InboxLimits,
    /// Share records kept on this node (memory backend): live shares and withdrawn ones still
    /// reclaimable. At the cap, the longest-withdrawn are forgotten first; new shares are
    /// refused only when every record is live.
    pub max_share_records: usize,
}

impl BrokerLimits {
    /// Inboxes of `messages` (and 1 MiB) and the default share cap (tests).
    pub fn inbox(messages: usize) -> Self {
        Self {
            inbox: InboxLimits::new(messages, 1 << 20),
            max_share_records: 100_000,
        }
    }
}

/// Drops whatever a backend must undo when a registration or share ends.
pub type Guard = Box<dyn Send + Sync>;

/// Hands `msg` to a local peer's inbox without waiting: a full inbox is [`BrokerError::PeerBusy`],
/// a closed one [`BrokerError::UnknownPeer`].
pub fn deliver(outbox: &Outbox, msg: ServerMsg) -> Result<(), BrokerError> {
    outbox.try_send(msg).map_err(|e| match e {
        TrySendError::Full(_) => BrokerError::PeerBusy,
        TrySendError::Ended(_) => BrokerError::UnknownPeer,
    })
}

/// A peer's subscription to its own topic. Dropping it unregisters the peer, whatever ends the
/// owning task: a clean close, an error, a panic or an abort.
pub struct Registration {
    pub inbox: Inbox,
    guard: Option<Guard>,
}

impl Registration {
    pub fn new(inbox: Inbox, guard: Guard) -> Self {
        Self {
            inbox,
            guard: Some(guard),
        }
    }

    /// Unregisters now. Backends deliver only while the peer is in their table, so once this
    /// returns nothing more arrives: what `inbox.try_recv` still yields is all there was.
    pub fn unregister(&mut self) {
        self.guard = None;
    }
}

/// A live share. Dropping it withdraws the share (unless another peer has reclaimed it since).
pub struct ShareLease {
    pub share: ShareId,
    /// Proves ownership in [`Broker::reclaim_share`]; told only to the owner's socket.
    pub token: ClaimToken,
    _guard: Guard,
}

impl ShareLease {
    pub fn new(share: ShareId, token: ClaimToken, guard: Guard) -> Self {
        Self {
            share,
            token,
            _guard: guard,
        }
    }
}

/// What a backend stores instead of a claim token: SHA-256 over a domain tag, the share id and
/// the token. Comparing digests reveals nothing usable about the token, whatever the timing.
pub fn claim_digest(share: &ShareId, token: &ClaimToken) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"beamdrop share claim v1\0");
    h.update(share.as_str().as_bytes());
    h.update(b"\0");
    h.update(token.as_str().as_bytes());
    h.finalize().into()
}

#[async_trait::async_trait]
pub trait Broker: Send + Sync + 'static {
    /// Registers `peer_state:<peer>` and subscribes to `peer:<peer>`.
    async fn register(&self, peer: PeerId) -> Result<Registration, BrokerError>;
    /// Publishes to `peer:<to>`; never waits on the receiver.
    async fn publish(&self, to: PeerId, msg: ServerMsg) -> Result<(), BrokerError>;
    /// A fresh share bound to `owner`, with a fresh claim token.
    async fn create_share(&self, owner: PeerId) -> Result<ShareLease, BrokerError>;
    /// Binds `share` to `owner` if `token` is the share's claim token, whoever owned it before
    /// (a socket that has ended, or one about to): the same share id under a new peer. A share
    /// whose lease ended less than [`RECLAIM_WINDOW`] ago is revived. Otherwise
    /// [`BrokerError::ClaimRefused`] and nothing changes. Atomic with respect to other reclaims
    /// and to the previous lease's refresh and withdrawal.
    async fn reclaim_share(
        &self,
        share: &ShareId,
        token: &ClaimToken,
        owner: PeerId,
    ) -> Result<ShareLease, BrokerError>;
    /// The share's sender, if the share is live.
    async fn share_owner(&self, share: &ShareId) -> Result<Option<PeerId>, BrokerError>;
    /// Ok when the backend (e.g. the backplane) is reachable: drives `/healthz` readiness.
    async fn health(&self) -> Result<(), BrokerError>;
    /// The node is shutting down: ends the inbox of every peer registered here (their socket
    /// tasks then close with "reconnect") and refuses new registrations with
    /// [`BrokerError::Closed`]. One signal through the table the node already has, instead of a
    /// shutdown listener in every socket task.
    fn close(&self);
    /// Bytes waiting in this node's inboxes.
    fn queued_bytes(&self) -> usize;
    /// Share records this node keeps (`None`: they live in the backend, with their own expiry).
    fn share_records(&self) -> Option<usize>;
}

pub type DynBroker = Arc<dyn Broker>;

/// The backend named by `uri`: `memory://`, or `redis://host:port[/db]` or
/// `redis+unix:///path/to/socket` (connects before it returns, so an unreachable Redis fails
/// startup).
pub async fn from_uri(uri: &str, limits: BrokerLimits) -> Result<DynBroker, BrokerError> {
    match uri.split_once("://") {
        Some(("memory", "")) => Ok(Arc::new(MemoryBroker::new(limits))),
        Some(("redis" | "redis+unix", rest)) if !rest.is_empty() => {
            let options = RedisOptions {
                inbox: limits.inbox,
                ..Default::default()
            };
            Ok(Arc::new(RedisBroker::connect(uri, options).await?))
        }
        _ => Err(BrokerError::UnsupportedUri(uri.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn backend_is_chosen_by_scheme() {
        assert!(from_uri("memory://", BrokerLimits::inbox(8)).await.is_ok());
        for uri in [
            "carrier-pigeon://x",
            "redis://",
            "redis+unix://",
            "memory://x",
            "rediss://h:1",
        ] {
            assert_eq!(
                from_uri(uri, BrokerLimits::inbox(8)).await.err(),
                Some(BrokerError::UnsupportedUri(uri.into())),
                "{uri}"
            );
        }
        // A redis URI is accepted by scheme, then must connect: nothing listens on port 1.
        assert!(matches!(
            from_uri("redis://127.0.0.1:1", BrokerLimits::inbox(8))
                .await
                .err(),
            Some(BrokerError::Backend(_))
        ));
    }
}
