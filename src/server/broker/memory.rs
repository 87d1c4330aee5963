//! In-process broker: a sharded concurrent table (DashMap) of per-peer inboxes is the topic table.
//! Each operation touches one shard for one lookup; no lock is held across an `.await`.
//!
//! A share's record outlives its lease by the reclaim window (holding only the hash of its claim
//! token), so that its sender can take it back after a reconnect; a FIFO of released shares
//! forgets them afterwards.

use super::{
    claim_digest, deliver, topic, Broker, BrokerError, BrokerLimits, InboxLimits, Outbox,
    Registration, ShareLease, RECLAIM_WINDOW,
};
use crate::protocol::{ClaimToken, PeerId, ServerMsg, ShareId};
use dashmap::{mapref::entry::Entry, DashMap};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Clone)]
pub struct MemoryBroker {
    tables: Arc<Tables>,
    inbox: InboxLimits,
}

struct Tables {
    /// `peer:<id>` → the inbox of the task registered as `peer_state:<id>`.
    peers: DashMap<PeerId, Outbox>,
    shares: DashMap<ShareId, ShareRecord>,
    /// Set by [`Broker::close`].
    closed: AtomicBool,
    /// Identifies leases, so that a lease taken over by a reclaim cannot withdraw its successor.
    next_lease: AtomicU64,
    /// Shares whose lease ended, in the order they ended (so by expiry): (when, share, lease).
    released: Mutex<VecDeque<(Instant, ShareId, u64)>>,
    reclaim_window: Duration,
    /// Share records kept at most, live and reclaimable together.
    max_records: usize,
}

struct ShareRecord {
    /// [`claim_digest`] of the share's token.
    claim: [u8; 32],
    /// The owner and the lease that holds the share now; `None` once that lease ended.
    holder: Option<(PeerId, u64)>,
    /// The lease that held it last: a released record is forgotten only if nobody took it since.
    lease: u64,
}

impl Tables {
    fn lease_id(&self) -> u64 {
        self.next_lease.fetch_add(1, Relaxed)
    }

    /// Forgets shares released longer than the reclaim window ago and not reclaimed since.
    fn forget_expired(&self, now: Instant) {
        self.forget_released(|at| now.saturating_duration_since(at) >= self.reclaim_window);
    }

    /// Makes room for a new record at `max_records`: forgets the longest-withdrawn shares even
    /// within their window (under pressure a withdrawn share's link dies sooner, a live one
    /// never).
    fn make_room(&self) {
        self.forget_released(|_| self.shares.len() >= self.max_records);
    }

    /// Forgets released shares, oldest first, while `go(released_at)` says so.
    fn forget_released(&self, go: impl Fn(Instant) -> bool) {
        let Ok(mut released) = self.released.lock() else {
            return;
        };
        while let Some((at, _, _)) = released.front() {
            if !go(*at) {
                break;
            }
            let Some((_, share, lease)) = released.pop_front() else {
                break;
            };
            self.shares
                .remove_if(&share, |_, r| r.holder.is_none() && r.lease == lease);
        }
    }
}

impl MemoryBroker {
    /// Whether `peer_state:<peer>` exists right now (for tests: the server itself never asks).
    #[cfg(test)]
    pub(crate) fn is_registered(&self, peer: PeerId) -> bool {
        self.tables.peers.contains_key(&peer)
    }

    pub fn new(limits: BrokerLimits) -> Self {
        Self::with_reclaim_window(limits, RECLAIM_WINDOW)
    }

    /// A broker that forgets withdrawn shares after `reclaim_window` (tests use a short one).
    pub fn with_reclaim_window(limits: BrokerLimits, reclaim_window: Duration) -> Self {
        let BrokerLimits {
            inbox,
            max_share_records,
        } = limits;
        Self {
            tables: Arc::new(Tables {
                peers: DashMap::new(),
                shares: DashMap::new(),
                closed: AtomicBool::new(false),
                next_lease: AtomicU64::new(1),
                released: Mutex::new(VecDeque::new()),
                reclaim_window,
                max_records: max_share_records.max(1),
            }),
            inbox,
        }
    }

    /// Registered peers right now.
    pub fn peer_count(&self) -> usize {
        self.tables.peers.len()
    }

    /// Share records kept right now: live shares and withdrawn ones still reclaimable.
    pub fn share_records(&self) -> usize {
        self.tables.shares.len()
    }

    fn lease(&self, share: ShareId, token: ClaimToken, lease: u64) -> ShareLease {
        let guard = ShareGuard {
            tables: self.tables.clone(),
            share: share.clone(),
            lease,
        };
        ShareLease::new(share, token, Box::new(guard))
    }
}

struct PeerGuard {
    tables: Arc<Tables>,
    peer: PeerId,
}

impl Drop for PeerGuard {
    fn drop(&mut self) {
        self.tables.peers.remove(&self.peer);
    }
}

/// Withdraws the share if this lease still holds it; its record stays reclaimable for the
/// window.
struct ShareGuard {
    tables: Arc<Tables>,
    share: ShareId,
    lease: u64,
}

impl Drop for ShareGuard {
    fn drop(&mut self) {
        let now = Instant::now();
        let released = match self.tables.shares.get_mut(&self.share) {
            Some(mut r) if r.holder.map(|(_, lease)| lease) == Some(self.lease) => {
                r.holder = None;
                true
            }
            _ => false, // reclaimed by another lease: not ours to withdraw
        };
        if released {
            if let Ok(mut queue) = self.tables.released.lock() {
                queue.push_back((now, self.share.clone(), self.lease));
            }
        }
        self.tables.forget_expired(now);
    }
}

/// Equality of two digests in time independent of where they differ.
fn same_digest(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[async_trait::async_trait]
impl Broker for MemoryBroker {
    async fn register(&self, peer: PeerId) -> Result<Registration, BrokerError> {
        let (tx, rx) = topic(&self.inbox);
        match self.tables.peers.entry(peer) {
            Entry::Occupied(_) => return Err(BrokerError::AlreadyRegistered),
            Entry::Vacant(slot) => {
                slot.insert(tx);
            }
        }
        let guard = PeerGuard {
            tables: self.tables.clone(),
            peer,
        };
        // After the insert: either `close` sees this peer in the table, or this sees the flag.
        if self.tables.closed.load(Ordering::SeqCst) {
            return Err(BrokerError::Closed);
        }
        Ok(Registration::new(rx, Box::new(guard)))
    }

    async fn publish(&self, to: PeerId, msg: ServerMsg) -> Result<(), BrokerError> {
        // Delivered under the shard's read lock (a non-blocking send): once the peer's guard has
        // removed it from the table, nothing more can reach its inbox.
        let outbox = self.tables.peers.get(&to).ok_or(BrokerError::UnknownPeer)?;
        deliver(outbox.value(), msg)
    }

    async fn create_share(&self, owner: PeerId) -> Result<ShareLease, BrokerError> {
        self.tables.forget_expired(Instant::now());
        self.tables.make_room();
        if self.tables.shares.len() >= self.tables.max_records {
            // Every record kept is a live share.
            return Err(BrokerError::ShareRecordsFull);
        }
        loop {
            let share = ShareId::new_random();
            if let Entry::Vacant(slot) = self.tables.shares.entry(share.clone()) {
                let token = ClaimToken::new_random();
                let lease = self.tables.lease_id();
                slot.insert(ShareRecord {
                    claim: claim_digest(&share, &token),
                    holder: Some((owner, lease)),
                    lease,
                });
                return Ok(self.lease(share, token, lease));
            }
        }
    }

    async fn reclaim_share(
        &self,
        share: &ShareId,
        token: &ClaimToken,
        owner: PeerId,
    ) -> Result<ShareLease, BrokerError> {
        // Expired records go first, so a share past its window is refused, not revived.
        self.tables.forget_expired(Instant::now());
        let claim = claim_digest(share, token);
        let lease = self.tables.lease_id();
        match self.tables.shares.get_mut(share) {
            Some(mut r) if same_digest(&r.claim, &claim) => {
                r.holder = Some((owner, lease));
                r.lease = lease;
            }
            _ => return Err(BrokerError::ClaimRefused),
        }
        Ok(self.lease(share.clone(), token.clone(), lease))
    }

    async fn share_owner(&self, share: &ShareId) -> Result<Option<PeerId>, BrokerError> {
        Ok(self
            .tables
            .shares
            .get(share)
            .and_then(|e| e.holder.map(|(owner, _)| owner)))
    }

    async fn health(&self) -> Result<(), BrokerError> {
        Ok(())
    }

    fn close(&self) {
        self.tables.closed.store(true, Ordering::SeqCst);
        self.tables.peers.clear();
    }

    fn queued_bytes(&self) -> usize {
        self.inbox.queued_bytes()
    }

    fn share_records(&self) -> Option<usize> {
        Some(self.tables.shares.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn eventually_unregistered(broker: &MemoryBroker, peer: PeerId) {
        for _ in 0..100 {
            if !broker.is_registered(peer) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{peer} still registered");
    }

    #[tokio::test]
    async fn publish_reaches_only_the_topic_owner() {
        let broker = MemoryBroker::new(BrokerLimits::inbox(4));
        let (a, b) = (PeerId::new_random(), PeerId::new_random());
        let ra = broker.register(a).await.unwrap();
        let rb = broker.register(b).await.unwrap();
        broker.publish(b, ServerMsg::Pong).await.unwrap();
        assert_eq!(rb.inbox.recv().await, Some(ServerMsg::Pong));
        assert!(ra.inbox.try_recv().is_none());
        assert_eq!(
            broker.publish(PeerId::new_random(), ServerMsg::Pong).await,
            Err(BrokerError::UnknownPeer)
        );
        assert_eq!(
            broker.register(a).await.err(),
            Some(BrokerError::AlreadyRegistered)
        );
    }

    #[tokio::test]
    async fn a_full_inbox_is_busy_not_blocking() {
        let broker = MemoryBroker::new(BrokerLimits::inbox(2));
        let a = PeerId::new_random();
        let _ra = broker.register(a).await.unwrap();
        broker.publish(a, ServerMsg::Pong).await.unwrap();
        broker.publish(a, ServerMsg::Pong).await.unwrap();
        assert_eq!(
            broker.publish(a, ServerMsg::Pong).await,
            Err(BrokerError::PeerBusy)
        );
    }

    #[tokio::test]
    async fn registration_ends_when_its_task_panics_or_is_aborted() {
        let broker = MemoryBroker::new(BrokerLimits::inbox(4));

        let peer = PeerId::new_random();
        let reg = broker.register(peer).await.unwrap();
        let task = tokio::spawn(async move {
            let _reg = reg;
            panic!("peer task crashed");
        });
        assert!(task.await.unwrap_err().is_panic());
        eventually_unregistered(&broker, peer).await;

        let peer = PeerId::new_random();
        let reg = broker.register(peer).await.unwrap();
        let task = tokio::spawn(async move {
            let _reg = reg;
            std::future::pending::<()>().await;
        });
        assert!(broker.is_registered(peer));
        task.abort();
        assert!(task.await.unwrap_err().is_cancelled());
        eventually_unregistered(&broker, peer).await;
        assert_eq!(broker.peer_count(), 0);
    }

    #[tokio::test]
    async fn closing_ends_every_inbox_and_refuses_new_peers() {
        let broker = MemoryBroker::new(BrokerLimits::inbox(4));
        let a = PeerId::new_random();
        let ra = broker.register(a).await.unwrap();
        broker.close();
        assert!(ra.inbox.recv().await.is_none(), "the inbox ended");
        assert_eq!(
            broker.register(PeerId::new_random()).await.err(),
            Some(BrokerError::Closed)
        );
        assert_eq!(broker.peer_count(), 0);
    }

    #[tokio::test]
    async fn shares_live_as_long_as_their_lease() {
        let broker = MemoryBroker::new(BrokerLimits::inbox(4));
        let owner = PeerId::new_random();
        let lease = broker.create_share(owner).await.unwrap();
        let share = lease.share.clone();
        assert_eq!(broker.share_owner(&share).await.unwrap(), Some(owner));
        drop(lease);
        assert_eq!(broker.share_owner(&share).await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_share_is_reclaimed_with_its_token_only() {
        let broker = MemoryBroker::new(BrokerLimits::inbox(4));
        let (old, new, thief) = (
            PeerId::new_random(),
            PeerId::new_random(),
            PeerId::new_random(),
        );
        let lease = broker.create_share(old).await.unwrap();
        let (share, token) = (lease.share.clone(), lease.token.clone());

        // Wrong token, unknown share: refused, and nothing changes.
        let wrong: ClaimToken = "00000000000000000000000000000000".parse().unwrap();
        assert_eq!(
            broker.reclaim_share(&share, &wrong, thief).await.err(),
            Some(BrokerError::ClaimRefused)
        );
        let unknown = ShareId::new_random();
        assert_eq!(
            broker.reclaim_share(&unknown, &token, thief).await.err(),
            Some(BrokerError::ClaimRefused)
        );
        assert_eq!(broker.share_owner(&unknown).await.unwrap(), None);
        // A token is bound to its share: another share's token does not open this one.
        let other = broker.create_share(thief).await.unwrap();
        assert_eq!(
            broker
                .reclaim_share(&share, &other.token, thief)
                .await
                .err(),
            Some(BrokerError::ClaimRefused)
        );
        assert_eq!(broker.share_owner(&share).await.unwrap(), Some(old));

        // While the old lease still lives (its socket not yet noticed dead): taken over, and the
        // old lease ending does not withdraw it from its new owner.
        let reclaimed = broker.reclaim_share(&share, &token, new).await.unwrap();
        assert_eq!((&reclaimed.share, &reclaimed.token), (&share, &token));
        assert_eq!(broker.share_owner(&share).await.unwrap(), Some(new));
        drop(lease);
        assert_eq!(broker.share_owner(&share).await.unwrap(), Some(new));

        // After the lease ended (the owner's socket closed): revived under the same id.
        drop(reclaimed);
        assert_eq!(broker.share_owner(&share).await.unwrap(), None);
        let again = broker.reclaim_share(&share, &token, old).await.unwrap();
        assert_eq!(broker.share_owner(&share).await.unwrap(), Some(old));
        drop(again);
        assert_eq!(broker.share_owner(&share).await.unwrap(), None);
    }

    #[tokio::test]
    async fn withdrawn_shares_are_forgotten_after_the_reclaim_window() {
        let window = Duration::from_millis(100);
        let broker = MemoryBroker::with_reclaim_window(BrokerLimits::inbox(4), window);
        let owner = PeerId::new_random();
        let live = broker.create_share(owner).await.unwrap();
        let lease = broker.create_share(owner).await.unwrap();
        let (share, token) = (lease.share.clone(), lease.token.clone());
        drop(lease);
        assert_eq!(broker.share_records(), 2);
        tokio::time::sleep(window * 2).await;
        assert_eq!(
            broker.reclaim_share(&share, &token, owner).await.err(),
            Some(BrokerError::ClaimRefused)
        );
        // Only the withdrawn record went; the live share (never released) stays, however old.
        assert_eq!(broker.share_records(), 1);
        assert_eq!(broker.share_owner(&live.share).await.unwrap(), Some(owner));

        // A share reclaimed within the window is not forgotten by its earlier release.
        let lease = broker.create_share(owner).await.unwrap();
        let (share, token) = (lease.share.clone(), lease.token.clone());
        drop(lease);
        let back = broker.reclaim_share(&share, &token, owner).await.unwrap();
        tokio::time::sleep(window * 2).await;
        broker.create_share(owner).await.unwrap(); // runs the expiry
        assert_eq!(broker.share_owner(&share).await.unwrap(), Some(owner));
        drop(back);
    }

    #[tokio::test]
    async fn at_the_record_cap_withdrawn_shares_go_first_and_live_ones_are_never_dropped() {
        let limits = BrokerLimits {
            max_share_records: 3,
            ..BrokerLimits::inbox(4)
        };
        let broker = MemoryBroker::new(limits);
        let owner = PeerId::new_random();
        let first = broker.create_share(owner).await.unwrap();
        let second = broker.create_share(owner).await.unwrap();
        let third = broker.create_share(owner).await.unwrap();
        // All three live: a fourth is refused, and nobody loses a share.
        assert_eq!(
            broker.create_share(owner).await.err(),
            Some(BrokerError::ShareRecordsFull)
        );
        assert_eq!(broker.share_records(), 3);

        // Two withdrawn, well inside the 15-minute window. Under pressure the one withdrawn
        // longest is forgotten for a new share; the other stays reclaimable.
        let (old, old_token) = (first.share.clone(), first.token.clone());
        let (newer, newer_token) = (second.share.clone(), second.token.clone());
        drop(first);
        drop(second);
        let fourth = broker.create_share(owner).await.unwrap();
        assert_eq!(broker.share_records(), 3);
        assert_eq!(
            broker.reclaim_share(&old, &old_token, owner).await.err(),
            Some(BrokerError::ClaimRefused)
        );
        let back = broker
            .reclaim_share(&newer, &newer_token, owner)
            .await
            .unwrap();
        assert_eq!(broker.share_owner(&third.share).await.unwrap(), Some(owner));
        assert_eq!(
            broker.share_owner(&fourth.share).await.unwrap(),
            Some(owner)
        );
        assert_eq!(broker.share_owner(&back.share).await.unwrap(), Some(owner));
        assert_eq!(
            broker.create_share(owner).await.err(),
            Some(BrokerError::ShareRecordsFull)
        );
    }
}
