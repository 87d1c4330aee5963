//! The transfer engine: pure Rust, shared by both sides of a DataChannel and tested natively.
//!
//! - [`PeerMsg`]: JSON control messages (file list, requests by byte range with a transfer id,
//!   block hashes, acknowledgements, cancel, end of a request).
//! - [`frame`]: binary data frames `[transfer id][offset][bytes]`.
//! - [`blocks`]: BLAKE3 per-block hashes and the file's root hash from them.
//! - [`incoming`]: the receiver writes by offset, checks every block as it completes, and knows
//!   what is still missing (after a break, a reload, or a bad block).
//! - [`outgoing`]: the sender's queue of requests, cancellation and flow window per receiver.
//! - [`record`]: the receiver's on-disk record of verified blocks, so a partial file survives.
//! - [`sink`]: the receiver's storage side (a Worker writing to OPFS, or memory), fed frames and
//!   block hashes by the page, answering with verified progress.
//! - [`downloads`]: the receiver's downloads and what each needs next (open, ask, wait, fail).
//! - [`hello`]: the sender's answer to a receiver's hello (connect, ignore, or make it wait).
//! - [`paths`]: relative paths from a sender made safe to write under a chosen folder.
//! - [`archive`]: "Download all" as one ZIP made of the received files, never whole in memory.

pub mod archive;
pub mod blocks;
pub mod downloads;
pub mod frame;
pub mod hello;
pub mod incoming;
pub mod outgoing;
pub mod paths;
pub mod progress;
pub mod ranges;
pub mod record;
pub mod sink;

use blocks::BlockHash;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Flow-control settings for one DataChannel. Chosen by measurement (see README "Benchmarks").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowControl {
    /// Payload bytes per binary frame (capped by the connection's max message size).
    pub chunk_size: usize,
    /// Stop sending while the channel's `bufferedAmount` is above this.
    pub high_water: u32,
    /// `bufferedAmountLowThreshold`: resume when the queue drains to this.
    pub low_water: u32,
    /// Bytes of one transfer that may be sent but not yet stored and verified by the receiver
    /// ([`PeerMsg::Ack`]): the receiver's disk gives backpressure through this window.
    pub window: u64,
}

impl FlowControl {
    /// Measured with `scripts/bench-transfer` (docs/bench/transfer.md): chunk size between 32 KiB
    /// and 256 KiB made no clear difference; marks of 4 MiB / 1 MiB beat 8 MiB / 2 MiB (1.32×) and
    /// 1 MiB / 256 KiB (1.12×) in the same run. The window is 6 blocks: the channel's own queue
    /// (up to the high-water mark) plus 2 MiB on the way or being written, so it binds only when
    /// the receiver's disk lags; and what a broken connection wastes (sent, never stored) stays
    /// under 7 MiB.
    pub const DEFAULT: FlowControl = FlowControl {
        chunk_size: 64 * 1024,
        high_water: 4 * 1024 * 1024,
        low_water: 1024 * 1024,
        window: 6 * blocks::BLOCK_SIZE,
    };

    /// Overrides from a URL query (`?chunk=…&high=…&low=…&window=…`, bytes), for benchmarking.
    /// Unknown keys and unparsable values are ignored; the marks stay ordered (low ≤ high) and
    /// the window holds at least one block.
    pub fn with_query(self, query: &str) -> Self {
        let mut fc = self;
        for (key, value) in query_pairs(query) {
            let Ok(n) = value.parse::<u32>() else {
                continue;
            };
            if n == 0 {
                continue;
            }
            match key {
                "chunk" => fc.chunk_size = n as usize,
                "high" => fc.high_water = n,
                "low" => fc.low_water = n,
                "window" => fc.window = u64::from(n).max(blocks::BLOCK_SIZE),
                _ => {}
            }
        }
        fc.low_water = fc.low_water.min(fc.high_water);
        fc
    }

    /// The same settings with the chunk shrunk to fit a connection's `maxMessageSize`, and never
    /// larger than a block (a frame never spans two blocks).
    pub fn fitted_to(self, max_message_size: Option<usize>) -> Self {
        let mut chunk_size = self.chunk_size.min(blocks::BLOCK_SIZE as usize);
        if let Some(max) = max_message_size.filter(|&max| max > frame::HEADER_LEN) {
            chunk_size = chunk_size.min(max - frame::HEADER_LEN);
        }
        Self { chunk_size, ..self }
    }
}

/// `key=value` pairs of a URL query (with or without its `?`).
pub fn query_pairs(query: &str) -> impl Iterator<Item = (&str, &str)> {
    query
        .trim_start_matches('?')
        .split('&')
        .filter_map(|pair| pair.split_once('='))
}

/// A file's id within one share (assigned by the sender, never reused while its page lives).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct FileId(pub u32);

impl fmt::Display for FileId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// One request's id, chosen by the receiver and unique on its connection: every frame carries
/// it, so bytes of a cancelled or superseded request are told apart from the current one's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TransferId(pub u32);

impl fmt::Display for TransferId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// What a receiver learns about a file before any byte moves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileMeta {
    pub id: FileId,
    pub name: String,
    /// Path relative to a dropped folder, file name included ("" for a loose file). As sent:
    /// the receiver makes it safe ([`paths`]) before using it.
    #[serde(default)]
    pub path: String,
    pub size: u64,
    #[serde(default)]
    pub mime: String,
    /// Last modification, ms since the epoch (0 when unknown): with path, name and size it tells
    /// a receiver whether a partial download belongs to this file.
    #[serde(default)]
    pub modified: u64,
    /// The file's BLAKE3 hash, once the sender knows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<BlockHash>,
}

/// A half-open byte range `[start, end)`, `[start, end]` in JSON.
pub type ByteRange = (u64, u64);

/// Control messages on the DataChannel (text frames). Data moves in binary [`frame`]s.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum PeerMsg {
    /// Sender → receiver: the whole current file list (sent again on every change).
    Manifest { files: Vec<FileMeta> },
    /// Receiver → sender: send these byte ranges of `file` (whole blocks, the last may end at
    /// the end of the file) as `transfer`. Requests are served in order, one at a time.
    Request {
        transfer: TransferId,
        file: FileId,
        ranges: Vec<ByteRange>,
    },
    /// Receiver → sender: stop `transfer` (queued or running); its frames are not wanted.
    Cancel { transfer: TransferId },
    /// Receiver → sender: `stored` bytes of `transfer` are on disk and verified.
    Ack { transfer: TransferId, stored: u64 },
    /// Sender → receiver: the hash of block `index`, sent before the block's bytes.
    Block {
        transfer: TransferId,
        index: u32,
        hash: BlockHash,
    },
    /// Sender → receiver: every byte `transfer` asked for has been queued; the file's size and
    /// BLAKE3 root hash.
    End {
        transfer: TransferId,
        file: FileId,
        size: u64,
        hash: BlockHash,
    },
    /// Sender → receiver: `transfer` cannot be served (file removed, unreadable, bad request).
    Refused {
        transfer: TransferId,
        file: FileId,
        message: String,
    },
}

/// Everything that can go wrong receiving one file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransferError {
    #[error("frame too short ({0} bytes)")]
    ShortFrame(usize),
    #[error("bytes {offset}..{end} are beyond the file's {size} bytes")]
    OutOfBounds { offset: u64, end: u64, size: u64 },
    #[error("bytes {offset}..{end} overlap data already received")]
    Overlap { offset: u64, end: u64 },
    #[error("bytes {offset}..{end} span two blocks")]
    SpansBlocks { offset: u64, end: u64 },
    #[error("byte range {start}..{end} is not whole blocks of the file")]
    BadRange { start: u64, end: u64 },
    #[error("incomplete: {received} of {size} bytes verified")]
    Incomplete { received: u64, size: u64 },
    #[error("size mismatch: sender says {announced} bytes, the file list said {expected}")]
    SizeMismatch { announced: u64, expected: u64 },
    #[error("integrity: the file's BLAKE3 hash does not match the sender's")]
    Integrity,
    #[error("storage: {0}")]
    Storage(String),
}

/// Deterministic pseudo-random bytes (xorshift), so tests need no fixtures.
#[cfg(test)]
pub(crate) fn test_data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn peer_messages_golden_json() {
        let hash = blocks::file_hash(b"");
        let msg = PeerMsg::Manifest {
            files: vec![FileMeta {
                id: FileId(7),
                name: "a.txt".into(),
                path: "dir/a.txt".into(),
                size: 3,
                mime: "text/plain".into(),
                modified: 1_700_000_000_000,
                hash: None,
            }],
        };
        assert_eq!(
            serde_json::to_value(&msg).unwrap(),
            json!({"type": "manifest", "files": [{"id": 7, "name": "a.txt", "path": "dir/a.txt",
                   "size": 3, "mime": "text/plain", "modified": 1_700_000_000_000u64}]})
        );
        assert_eq!(
            serde_json::to_value(PeerMsg::Request {
                transfer: TransferId(4),
                file: FileId(2),
                ranges: vec![(0, 1 << 20), (3 << 20, 3_500_000)],
            })
            .unwrap(),
            json!({"type": "request", "transfer": 4, "file": 2,
                   "ranges": [[0, 1048576], [3145728, 3500000]]})
        );
        assert_eq!(
            serde_json::to_value(PeerMsg::Block {
                transfer: TransferId(4),
                index: 9,
                hash,
            })
            .unwrap(),
            json!({"type": "block", "transfer": 4, "index": 9, "hash": hash.to_string()})
        );
        for msg in [
            PeerMsg::End {
                transfer: TransferId(1),
                file: FileId(1),
                size: 0,
                hash,
            },
            PeerMsg::Cancel {
                transfer: TransferId(3),
            },
            PeerMsg::Ack {
                transfer: TransferId(3),
                stored: 1 << 20,
            },
            PeerMsg::Refused {
                transfer: TransferId(3),
                file: FileId(0),
                message: "no longer shared".into(),
            },
        ] {
            let text = serde_json::to_string(&msg).unwrap();
            assert_eq!(serde_json::from_str::<PeerMsg>(&text).unwrap(), msg);
        }
        // A manifest from an older sender (no modified time, no hash) still reads.
        let old: PeerMsg = serde_json::from_value(
            json!({"type": "manifest", "files": [{"id": 1, "name": "x", "size": 1}]}),
        )
        .unwrap();
        assert!(matches!(old, PeerMsg::Manifest { files } if files[0].modified == 0));
    }

    #[test]
    fn query_overrides_apply_and_keep_marks_ordered() {
        let fc = FlowControl::DEFAULT.with_query("?chunk=16384&high=1000&low=5000&x=1&window=bad");
        assert_eq!(fc.chunk_size, 16384);
        assert_eq!(fc.high_water, 1000);
        assert_eq!(fc.low_water, 1000);
        assert_eq!(fc.window, FlowControl::DEFAULT.window);
        assert_eq!(FlowControl::DEFAULT.with_query(""), FlowControl::DEFAULT);
        assert_eq!(
            FlowControl::DEFAULT.with_query("chunk=0"),
            FlowControl::DEFAULT
        );
        assert_eq!(
            FlowControl::DEFAULT.with_query("window=5").window,
            blocks::BLOCK_SIZE
        );
    }

    #[test]
    fn chunk_is_fitted_to_max_message_size_and_to_a_block() {
        let fc = FlowControl::DEFAULT.fitted_to(Some(16 * 1024));
        assert_eq!(fc.chunk_size, 16 * 1024 - frame::HEADER_LEN);
        assert_eq!(FlowControl::DEFAULT.fitted_to(None), FlowControl::DEFAULT);
        assert_eq!(
            FlowControl::DEFAULT.fitted_to(Some(1 << 30)).chunk_size,
            FlowControl::DEFAULT.chunk_size
        );
        let huge = FlowControl {
            chunk_size: 8 << 20,
            ..FlowControl::DEFAULT
        };
        assert_eq!(huge.fitted_to(None).chunk_size, blocks::BLOCK_SIZE as usize);
    }
}
