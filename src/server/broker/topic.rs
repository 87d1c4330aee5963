//! A peer's topic: a bounded queue that many publishers push to through the broker's table and
//! one socket task drains.
//!
//! Why not a channel crate: a node holds tens of thousands of mostly idle peers, and every byte of
//! an idle topic counts (target ≤ 3 kB per idle connection, everything included). Measured with
//! heaptrack at 5,000 idle peers: a tokio channel allocates a 1.6 kB block up front; a flume
//! channel holds 328 B per waiting peer (its shared state, a waiter hook allocated for each wait,
//! and a queue of hooks). This topic is one allocation of about 100 B while idle: a mutex over a
//! `VecDeque` (no buffer until messages queue, and none again once drained) and an
//! [`AtomicWaker`] for the single reader, so waiting allocates nothing.
//!
//! Ends: dropping the [`Outbox`] ends the topic; the [`Inbox`] still yields what was queued, then
//! `None`. The broker's table holds the only `Outbox`, so removing a peer from the table (or the
//! broker closing) ends its inbox. Dropping the `Inbox` refuses further sends.

use crate::protocol::ServerMsg;
use futures::task::AtomicWaker;
use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::Poll;

/// What one peer's topic may hold, and a node-wide count of what all of them hold.
#[derive(Clone, Debug)]
pub struct InboxLimits {
    /// Undelivered messages.
    pub messages: usize,
    /// Undelivered bytes (what each message holds, as [`cost`] counts it). A message alone in
    /// the queue is always taken, so a message up to the frame limit cannot be refused for ever.
    pub bytes: usize,
    /// Bytes queued in every topic made with these limits.
    queued: Arc<AtomicUsize>,
}

impl InboxLimits {
    pub fn new(messages: usize, bytes: usize) -> Self {
        Self {
            messages: messages.max(1),
            bytes,
            queued: Arc::default(),
        }
    }

    /// Bytes queued right now in all the topics made with these limits.
    pub fn queued_bytes(&self) -> usize {
        self.queued.load(Relaxed)
    }
}

impl PartialEq for InboxLimits {
    fn eq(&self, other: &Self) -> bool {
        (self.messages, self.bytes) == (other.messages, other.bytes)
    }
}

impl Eq for InboxLimits {}

/// The memory a queued message holds: the enum itself and the text a client chose (a signal's
/// payload, up to the frame limit); the server's own messages are small and bounded.
pub fn cost(msg: &ServerMsg) -> usize {
    let text = match msg {
        ServerMsg::Signal { payload, .. } => payload.len(),
        ServerMsg::Error { message, .. } => message.len(),
        _ => 0,
    };
    std::mem::size_of::<ServerMsg>() + text
}

/// A peer's topic, holding at most `limits.messages` undelivered messages and `limits.bytes`
/// bytes of them.
pub fn topic(limits: &InboxLimits) -> (Outbox, Inbox) {
    let shared = Arc::new(Shared {
        queue: Mutex::new(Queue {
            msgs: VecDeque::new(),
            bytes: 0,
            ended: false,
        }),
        reader: AtomicWaker::new(),
        capacity: limits.messages.max(1),
        max_bytes: limits.bytes,
        queued: limits.queued.clone(),
    });
    (
        Outbox {
            shared: shared.clone(),
        },
        Inbox { shared },
    )
}

struct Shared {
    queue: Mutex<Queue>,
    /// The reading task, woken by every push and by the end.
    reader: AtomicWaker,
    capacity: usize,
    max_bytes: usize,
    /// The node-wide count this topic's bytes are part of.
    queued: Arc<AtomicUsize>,
}

struct Queue {
    msgs: VecDeque<ServerMsg>,
    /// [`cost`] of everything in `msgs`.
    bytes: usize,
    ended: bool,
}

impl Shared {
    /// The queue; a panic elsewhere while it was held leaves it consistent (every change is one
    /// call), so poisoning is ignored.
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Why [`Outbox::try_send`] refused a message (the message is handed back).
#[derive(Debug, PartialEq, Eq)]
pub enum TrySendError {
    /// The topic holds as many messages, or as many bytes, as it may.
    Full(ServerMsg),
    /// The reader is gone.
    Ended(ServerMsg),
}

/// The sending end, held by the broker's table of local peers. Publishers share it by reference.
pub struct Outbox {
    shared: Arc<Shared>,
}

impl Outbox {
    /// Queues `msg` without waiting.
    pub fn try_send(&self, msg: ServerMsg) -> Result<(), TrySendError> {
        {
            let mut queue = self.shared.lock();
            if queue.ended {
                return Err(TrySendError::Ended(msg));
            }
            let cost = cost(&msg);
            let too_many = queue.msgs.len() >= self.shared.capacity;
            let too_big = !queue.msgs.is_empty() && queue.bytes + cost > self.shared.max_bytes;
            if too_many || too_big {
                return Err(TrySendError::Full(msg));
            }
            queue.msgs.push_back(msg);
            queue.bytes += cost;
            self.shared.queued.fetch_add(cost, Relaxed);
        }
        self.shared.reader.wake();
        Ok(())
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        self.shared.lock().ended = true;
        self.shared.reader.wake();
    }
}

/// The receiving end, owned by the peer's socket task.
pub struct Inbox {
    shared: Arc<Shared>,
}

impl Drop for Inbox {
    /// The reader is gone: later sends are refused ([`TrySendError::Ended`]) instead of queueing
    /// for nobody, and what was queued is freed now.
    fn drop(&mut self) {
        let mut queue = self.shared.lock();
        queue.ended = true;
        queue.msgs = VecDeque::new();
        self.shared.queued.fetch_sub(queue.bytes, Relaxed);
        queue.bytes = 0;
    }
}

impl Inbox {
    /// The next message, or `None` once the topic has ended and everything queued was taken.
    pub fn recv(&self) -> impl std::future::Future<Output = Option<ServerMsg>> + '_ {
        poll_fn(move |cx| {
            if let Some(next) = self.take() {
                return Poll::Ready(next);
            }
            // Registered before looking again: a push in between wakes this task.
            self.shared.reader.register(cx.waker());
            match self.take() {
                Some(next) => Poll::Ready(next),
                None => Poll::Pending,
            }
        })
    }

    /// The next queued message, if any (without waiting).
    pub fn try_recv(&self) -> Option<ServerMsg> {
        self.take().flatten()
    }

    /// `Some(Some(msg))`: a message; `Some(None)`: ended and drained; `None`: nothing yet.
    fn take(&self) -> Option<Option<ServerMsg>> {
        let mut queue = self.shared.lock();
        match queue.msgs.pop_front() {
            Some(msg) => {
                let cost = cost(&msg);
                queue.bytes -= cost;
                self.shared.queued.fetch_sub(cost, Relaxed);
                if queue.msgs.is_empty() {
                    // Drained: give the buffer back, an idle topic holds none.
                    queue.msgs = VecDeque::new();
                }
                Some(Some(msg))
            }
            None if queue.ended => Some(None),
            None => None,
        }
    }

    /// How many messages the queue's buffer has room for (for tests).
    #[cfg(test)]
    fn buffer_capacity(&self) -> usize {
        self.shared.lock().msgs.capacity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::PeerId;
    use futures::FutureExt;
    use std::time::Duration;

    fn signal(n: usize) -> ServerMsg {
        ServerMsg::Signal {
            from: PeerId::new_random(),
            payload: n.to_string(),
        }
    }

    #[test]
    fn delivers_in_order_up_to_capacity_and_refuses_more() {
        let (tx, rx) = topic(&InboxLimits::new(3, usize::MAX));
        for n in 0..3 {
            tx.try_send(signal(n)).expect("room");
        }
        let refused = tx.try_send(signal(3));
        assert!(
            matches!(refused, Err(TrySendError::Full(ServerMsg::Signal { ref payload, .. })) if payload == "3")
        );
        for n in 0..3 {
            match rx.try_recv() {
                Some(ServerMsg::Signal { payload, .. }) => assert_eq!(payload, n.to_string()),
                other => panic!("expected signal {n}, got {other:?}"),
            }
        }
        assert_eq!(rx.try_recv(), None);
        // Room again once drained.
        tx.try_send(signal(4)).expect("room after draining");
    }

    fn big_signal(bytes: usize) -> ServerMsg {
        ServerMsg::Signal {
            from: PeerId::new_random(),
            payload: "x".repeat(bytes),
        }
    }

    #[test]
    fn holds_no_more_than_its_bytes_and_counts_them_node_wide() {
        const KIB: usize = 1024;
        let limits = InboxLimits::new(1000, 256 * KIB);
        let (tx, rx) = topic(&limits);
        let (other_tx, other_rx) = topic(&limits);
        // A flood of 64 KiB signals: what is taken stays under the bytes, whatever the count.
        let taken = (0..100)
            .take_while(|_| tx.try_send(big_signal(64 * KIB)).is_ok())
            .count();
        assert_eq!(
            taken, 3,
            "256 KiB hold three 64 KiB signals and their envelopes"
        );
        assert!(limits.queued_bytes() <= 256 * KIB);
        assert!(matches!(
            tx.try_send(big_signal(64 * KIB)),
            Err(TrySendError::Full(_))
        ));
        // Small messages still fit in what is left...
        tx.try_send(ServerMsg::Pong).expect("room for a small one");
        // ...and one message alone is always taken, even over the bytes.
        other_tx
            .try_send(big_signal(300 * KIB))
            .expect("a lone message");
        assert_eq!(
            limits.queued_bytes(),
            3 * cost(&big_signal(64 * KIB)) + cost(&ServerMsg::Pong) + cost(&big_signal(300 * KIB))
        );
        // Taking gives the bytes back; a reader leaving gives back what it left.
        rx.try_recv().expect("first");
        tx.try_send(big_signal(64 * KIB)).expect("room again");
        drop(other_rx);
        drop(rx);
        assert_eq!(limits.queued_bytes(), 0, "every byte given back");
        drop((tx, other_tx));
        assert_eq!(limits.queued_bytes(), 0);
    }

    #[test]
    fn holds_no_buffer_while_idle() {
        let (tx, rx) = topic(&InboxLimits::new(8, usize::MAX));
        assert_eq!(rx.buffer_capacity(), 0);
        tx.try_send(signal(1)).expect("room");
        tx.try_send(signal(2)).expect("room");
        assert!(rx.buffer_capacity() >= 2);
        rx.try_recv().expect("first");
        assert!(rx.buffer_capacity() >= 1, "still holding one message");
        rx.try_recv().expect("second");
        assert_eq!(rx.buffer_capacity(), 0, "drained topic kept its buffer");
    }

    #[test]
    fn dropping_the_outbox_ends_the_inbox_after_what_was_queued() {
        let (tx, rx) = topic(&InboxLimits::new(4, usize::MAX));
        tx.try_send(ServerMsg::Pong).expect("room");
        drop(tx);
        assert_eq!(rx.recv().now_or_never(), Some(Some(ServerMsg::Pong)));
        assert_eq!(rx.recv().now_or_never(), Some(None));
    }

    #[test]
    fn sending_after_the_reader_left_is_refused_and_frees_what_was_queued() {
        let (tx, rx) = topic(&InboxLimits::new(4, usize::MAX));
        tx.try_send(ServerMsg::Pong).expect("room");
        drop(rx);
        assert_eq!(tx.shared.lock().msgs.capacity(), 0, "queued messages kept");
        assert_eq!(
            tx.try_send(ServerMsg::Pong),
            Err(TrySendError::Ended(ServerMsg::Pong))
        );
    }

    #[tokio::test]
    async fn a_waiting_reader_is_woken_by_a_push_and_by_the_end() {
        let (tx, rx) = topic(&InboxLimits::new(4, usize::MAX));
        let reader = tokio::spawn(async move {
            let first = rx.recv().await;
            let second = rx.recv().await;
            (first, second)
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        tx.try_send(ServerMsg::Pong).expect("room");
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(tx);
        let got = tokio::time::timeout(Duration::from_secs(5), reader)
            .await
            .expect("reader woken")
            .expect("reader task");
        assert_eq!(got, (Some(ServerMsg::Pong), None));
    }

    #[test]
    fn many_publishers_at_once_lose_nothing_and_keep_each_ones_order() {
        const PUBLISHERS: usize = 4;
        const EACH: usize = 5_000;
        let (tx, rx) = topic(&InboxLimits::new(PUBLISHERS * EACH, usize::MAX));
        let tx = Arc::new(tx);
        let threads: Vec<_> = (0..PUBLISHERS)
            .map(|p| {
                let tx = tx.clone();
                std::thread::spawn(move || {
                    for n in 0..EACH {
                        let msg = ServerMsg::Error {
                            code: crate::protocol::ErrorCode::PeerBusy,
                            message: format!("{p}:{n}"),
                        };
                        tx.try_send(msg).expect("capacity covers everything");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("publisher");
        }
        let mut next = [0usize; PUBLISHERS];
        while let Some(msg) = rx.try_recv() {
            let ServerMsg::Error { message, .. } = msg else {
                panic!("unexpected {msg:?}");
            };
            let (p, n) = message.split_once(':').expect("p:n");
            let (p, n): (usize, usize) = (p.parse().expect("p"), n.parse().expect("n"));
            assert_eq!(n, next[p], "publisher {p} out of order");
            next[p] += 1;
        }
        assert_eq!(next, [EACH; PUBLISHERS]);
    }
}
