//! The sender's side of one receiver's connection: requests queue up and are served one at a
//! time, in order; a cancelled one stops (queued: dropped; running: at the next frame); and the
//! running one may be at most a window ahead of what the receiver acknowledged as stored.

use super::blocks::Layout;
use super::ranges::requested_blocks;
use super::{ByteRange, FileId, TransferError, TransferId};
use std::collections::VecDeque;

/// Most requests one receiver may have queued; more are refused (a receiver asks for a few
/// files at a time, plus a re-request per bad block).
pub const MAX_QUEUED: usize = 1024;

/// One accepted request: the blocks to send, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Job {
    pub transfer: TransferId,
    pub file: FileId,
    pub blocks: Vec<u32>,
}

/// Why a request is refused at once.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{0}")]
    Range(#[from] TransferError),
    #[error("transfer id {0} is already in use")]
    DuplicateId(TransferId),
    #[error("too many requests queued")]
    QueueFull,
}

#[derive(Debug, Default)]
pub struct Outgoing {
    queue: VecDeque<Job>,
    /// The request being sent: its id, and the bytes of it the receiver has stored.
    current: Option<(TransferId, u64)>,
    /// The running request was cancelled: its sender stops at the next frame.
    current_cancelled: bool,
}

impl Outgoing {
    /// Queues a request after checking its ranges against the file's layout.
    pub fn push(
        &mut self,
        transfer: TransferId,
        file: FileId,
        layout: &Layout,
        ranges: &[ByteRange],
    ) -> Result<(), Refusal> {
        if self.current.is_some_and(|(id, _)| id == transfer)
            || self.queue.iter().any(|j| j.transfer == transfer)
        {
            return Err(Refusal::DuplicateId(transfer));
        }
        if self.queue.len() >= MAX_QUEUED {
            return Err(Refusal::QueueFull);
        }
        let blocks = requested_blocks(layout, ranges)?;
        self.queue.push_back(Job {
            transfer,
            file,
            blocks,
        });
        Ok(())
    }

    /// The next request to send, which becomes the current one. `None` while one is running or
    /// nothing is queued.
    pub fn start_next(&mut self) -> Option<Job> {
        if self.current.is_some() {
            return None;
        }
        let job = self.queue.pop_front()?;
        self.current = Some((job.transfer, 0));
        self.current_cancelled = false;
        Some(job)
    }

    /// The current request is done (or abandoned).
    pub fn finish_current(&mut self) {
        self.current = None;
        self.current_cancelled = false;
    }

    /// Cancels `transfer`, queued or running. False if it is unknown (finished already).
    pub fn cancel(&mut self, transfer: TransferId) -> bool {
        if self.current.is_some_and(|(id, _)| id == transfer) {
            self.current_cancelled = true;
            return true;
        }
        let before = self.queue.len();
        self.queue.retain(|j| j.transfer != transfer);
        self.queue.len() != before
    }

    /// Whether the sender of `transfer` should stop now.
    pub fn is_cancelled(&self, transfer: TransferId) -> bool {
        match self.current {
            Some((id, _)) if id == transfer => self.current_cancelled,
            _ => true,
        }
    }

    /// The receiver has stored `stored` bytes of `transfer` (acks only grow).
    pub fn ack(&mut self, transfer: TransferId, stored: u64) {
        if let Some((id, acked)) = &mut self.current {
            if *id == transfer {
                *acked = (*acked).max(stored);
            }
        }
    }

    /// Whether `sent` bytes of `transfer` are within `window` of what the receiver stored.
    pub fn within_window(&self, transfer: TransferId, sent: u64, window: u64) -> bool {
        match self.current {
            Some((id, acked)) if id == transfer => sent.saturating_sub(acked) < window,
            _ => true,
        }
    }

    /// Requests waiting behind the current one.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Layout {
        Layout::with_block(10_000, 1024)
    }

    #[test]
    fn requests_are_served_in_order_one_at_a_time() {
        let mut o = Outgoing::default();
        o.push(TransferId(1), FileId(0), &layout(), &[(0, 2048)])
            .unwrap();
        o.push(TransferId(2), FileId(1), &layout(), &[(9216, 10_000)])
            .unwrap();
        let first = o.start_next().unwrap();
        assert_eq!(first.blocks, vec![0, 1]);
        assert_eq!(o.start_next(), None, "one at a time");
        o.finish_current();
        let second = o.start_next().unwrap();
        assert_eq!((second.transfer, second.blocks), (TransferId(2), vec![9]));
        o.finish_current();
        assert_eq!(o.start_next(), None);
    }

    #[test]
    fn bad_or_duplicate_requests_are_refused() {
        let mut o = Outgoing::default();
        assert_eq!(
            o.push(TransferId(1), FileId(0), &layout(), &[(0, 100)]),
            Err(Refusal::Range(TransferError::BadRange {
                start: 0,
                end: 100
            }))
        );
        o.push(TransferId(1), FileId(0), &layout(), &[(0, 1024)])
            .unwrap();
        assert_eq!(
            o.push(TransferId(1), FileId(0), &layout(), &[(0, 1024)]),
            Err(Refusal::DuplicateId(TransferId(1)))
        );
        o.start_next();
        assert_eq!(
            o.push(TransferId(1), FileId(0), &layout(), &[(0, 1024)]),
            Err(Refusal::DuplicateId(TransferId(1)))
        );
        for i in 0..MAX_QUEUED as u32 {
            o.push(TransferId(100 + i), FileId(0), &layout(), &[(0, 1024)])
                .unwrap();
        }
        assert_eq!(
            o.push(TransferId(99), FileId(0), &layout(), &[(0, 1024)]),
            Err(Refusal::QueueFull)
        );
    }

    #[test]
    fn cancel_stops_the_running_request_and_drops_queued_ones() {
        let mut o = Outgoing::default();
        for t in 1..=3 {
            o.push(TransferId(t), FileId(0), &layout(), &[(0, 1024)])
                .unwrap();
        }
        let job = o.start_next().unwrap();
        assert!(!o.is_cancelled(job.transfer));
        assert!(o.cancel(TransferId(2)));
        assert_eq!(o.queued(), 1);
        assert!(o.cancel(TransferId(1)));
        assert!(o.is_cancelled(TransferId(1)));
        assert!(!o.cancel(TransferId(42)));
        o.finish_current();
        assert_eq!(o.start_next().unwrap().transfer, TransferId(3));
        assert!(!o.is_cancelled(TransferId(3)));
    }

    #[test]
    fn the_window_follows_acks_of_the_current_request() {
        let mut o = Outgoing::default();
        o.push(TransferId(1), FileId(0), &layout(), &[(0, 10_000)])
            .unwrap();
        o.start_next();
        assert!(o.within_window(TransferId(1), 4095, 4096));
        assert!(!o.within_window(TransferId(1), 4096, 4096));
        o.ack(TransferId(1), 2048);
        o.ack(TransferId(7), 1 << 30); // another transfer's ack changes nothing
        o.ack(TransferId(1), 1024); // acks never go back
        assert!(o.within_window(TransferId(1), 6143, 4096));
        assert!(!o.within_window(TransferId(1), 6144, 4096));
    }
}
