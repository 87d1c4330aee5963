//! In-process broker: a sharded concurrent table (DashMap) of per-peer inboxes is the topic table.
//! Each operation touches one shard for one lookup; no lock is held across an `.await`.

use super::{deliver, topic, Broker, BrokerError, Outbox, Registration, ShareLease};
use crate::protocol::{PeerId, ServerMsg, ShareId};
use dashmap::{mapref::entry::Entry, DashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(Clone)]
pub struct MemoryBroker {
    tables: Arc<Tables>,
    inbox_capacity: usize,
}

#[derive(Default)]
struct Tables {
    /// `peer:<id>` → the inbox of the task registered as `peer_state:<id>`.
    peers: DashMap<PeerId, Outbox>,
    shares: DashMap<ShareId, PeerId>,
    /// Set by [`Broker::close`].
    closed: AtomicBool,
}

impl MemoryBroker {
    pub fn new(inbox_capacity: usize) -> Self {
        Self {
            tables: Arc::default(),
            inbox_capacity: inbox_capacity.max(1),
        }
    }

    /// Registered peers right now.
    pub fn peer_count(&self) -> usize {
        self.tables.peers.len()
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

struct ShareGuard {
    tables: Arc<Tables>,
    share: ShareId,
}

impl Drop for ShareGuard {
    fn drop(&mut self) {
        self.tables.shares.remove(&self.share);
    }
}

#[async_trait::async_trait]
impl Broker for MemoryBroker {
    async fn register(&self, peer: PeerId) -> Result<Registration, BrokerError> {
        let (tx, rx) = topic(self.inbox_capacity);
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

    async fn is_registered(&self, peer: PeerId) -> Result<bool, BrokerError> {
        Ok(self.tables.peers.contains_key(&peer))
    }

    async fn create_share(&self, owner: PeerId) -> Result<ShareLease, BrokerError> {
        loop {
            let share = ShareId::new_random();
            if let Entry::Vacant(slot) = self.tables.shares.entry(share.clone()) {
                slot.insert(owner);
                let guard = ShareGuard {
                    tables: self.tables.clone(),
                    share: share.clone(),
                };
                return Ok(ShareLease::new(share, Box::new(guard)));
            }
        }
    }

    async fn share_owner(&self, share: &ShareId) -> Result<Option<PeerId>, BrokerError> {
        Ok(self.tables.shares.get(share).map(|e| *e.value()))
    }

    async fn health(&self) -> Result<(), BrokerError> {
        Ok(())
    }

    fn close(&self) {
        self.tables.closed.store(true, Ordering::SeqCst);
        self.tables.peers.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn eventually_unregistered(broker: &MemoryBroker, peer: PeerId) {
        for _ in 0..100 {
            if !broker.is_registered(peer).await.unwrap() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{peer} still registered");
    }

    #[tokio::test]
    async fn publish_reaches_only_the_topic_owner() {
        let broker = MemoryBroker::new(4);
        let (a, b) = (PeerId::new_random(), PeerId::new_random());
        let ra = broker.register(a).await.unwrap();
        let rb = broker.register(b).await.unwrap();
        broker.publish(b, ServerMsg::Pong).await.unwrap();
        assert_eq!(rb.inbox.recv_async().await.ok(), Some(ServerMsg::Pong));
        assert!(ra.inbox.try_recv().is_err());
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
        let broker = MemoryBroker::new(2);
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
        let broker = MemoryBroker::new(4);

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
        assert!(broker.is_registered(peer).await.unwrap());
        task.abort();
        assert!(task.await.unwrap_err().is_cancelled());
        eventually_unregistered(&broker, peer).await;
        assert_eq!(broker.peer_count(), 0);
    }

    #[tokio::test]
    async fn closing_ends_every_inbox_and_refuses_new_peers() {
        let broker = MemoryBroker::new(4);
        let a = PeerId::new_random();
        let ra = broker.register(a).await.unwrap();
        broker.close();
        assert!(ra.inbox.recv_async().await.is_err(), "the inbox ended");
        assert_eq!(
            broker.register(PeerId::new_random()).await.err(),
            Some(BrokerError::Closed)
        );
        assert_eq!(broker.peer_count(), 0);
    }

    #[tokio::test]
    async fn shares_live_as_long_as_their_lease() {
        let broker = MemoryBroker::new(4);
        let owner = PeerId::new_random();
        let lease = broker.create_share(owner).await.unwrap();
        let share = lease.share.clone();
        assert_eq!(broker.share_owner(&share).await.unwrap(), Some(owner));
        drop(lease);
        assert_eq!(broker.share_owner(&share).await.unwrap(), None);
    }
}
