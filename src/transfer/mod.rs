//! The transfer engine: pure Rust, shared by both sides of a DataChannel and tested natively.
//!
//! - [`PeerMsg`]: JSON control messages (file list, requests, end-of-file with SHA-256).
//! - [`frame`]: binary data frames `[file id][offset][bytes]`.
//! - [`reassembly`]: the receiver writes by offset, tracks coverage, and verifies size and SHA-256.

pub mod frame;
pub mod progress;
pub mod reassembly;

use serde::{Deserialize, Serialize};
use std::fmt;

/// Flow-control settings for one DataChannel. Chosen by measurement (see README "Benchmarks").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowControl {
    /// Payload bytes per binary frame (capped by the connection's max message size).
    pub chunk_size: usize,
    /// Bytes read from the file per read, split into frames.
    pub read_block: usize,
    /// Stop sending while the channel's `bufferedAmount` is above this.
    pub high_water: u32,
    /// `bufferedAmountLowThreshold`: resume when the queue drains to this.
    pub low_water: u32,
}

impl FlowControl {
    /// Measured with `scripts/bench-transfer` (docs/bench/transfer.md): chunk size between 32 KiB
    /// and 256 KiB made no clear difference; marks of 4 MiB / 1 MiB beat 8 MiB / 2 MiB (1.32×) and
    /// 1 MiB / 256 KiB (1.12×) in the same run.
    pub const DEFAULT: FlowControl = FlowControl {
        chunk_size: 64 * 1024,
        read_block: 1024 * 1024,
        high_water: 4 * 1024 * 1024,
        low_water: 1024 * 1024,
    };

    /// Overrides from a URL query (`?chunk=…&block=…&high=…&low=…`, bytes), for benchmarking.
    /// Unknown keys and unparsable values are ignored; the marks stay ordered (low ≤ high).
    pub fn with_query(self, query: &str) -> Self {
        let mut fc = self;
        for pair in query.trim_start_matches('?').split('&') {
            let Some((key, value)) = pair.split_once('=') else {
                continue;
            };
            let Ok(n) = value.parse::<u32>() else {
                continue;
            };
            if n == 0 {
                continue;
            }
            match key {
                "chunk" => fc.chunk_size = n as usize,
                "block" => fc.read_block = n as usize,
                "high" => fc.high_water = n,
                "low" => fc.low_water = n,
                _ => {}
            }
        }
        fc.low_water = fc.low_water.min(fc.high_water);
        fc
    }

    /// The same settings with the chunk shrunk to fit a connection's `maxMessageSize`.
    pub fn fitted_to(self, max_message_size: Option<usize>) -> Self {
        let chunk_size = match max_message_size {
            Some(max) if max > frame::HEADER_LEN => self.chunk_size.min(max - frame::HEADER_LEN),
            _ => self.chunk_size,
        };
        Self { chunk_size, ..self }
    }
}

/// A file's id within one share (assigned by the sender, never reused while the share lives).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct FileId(pub u32);

impl fmt::Display for FileId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// What a receiver learns about a file before any byte moves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileMeta {
    pub id: FileId,
    pub name: String,
    /// Path relative to a dropped folder ("" for a loose file).
    #[serde(default)]
    pub path: String,
    pub size: u64,
    #[serde(default)]
    pub mime: String,
    /// Hex SHA-256 when the sender already knows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

/// Control messages on the DataChannel (text frames). Data moves in binary [`frame`]s.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum PeerMsg {
    /// Sender → receiver: the whole current file list (sent again on every change).
    Manifest { files: Vec<FileMeta> },
    /// Receiver → sender: send me this file from the start.
    Request { file: FileId },
    /// Sender → receiver: every frame of `file` has been queued; its size and SHA-256.
    FileEnd {
        file: FileId,
        size: u64,
        sha256: String,
    },
    /// Sender → receiver: this file cannot be sent (removed, unreadable).
    FileError { file: FileId, message: String },
}

/// Everything that can go wrong receiving one file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransferError {
    #[error("frame too short ({0} bytes)")]
    ShortFrame(usize),
    #[error("frame for byte {offset}..{end} is beyond the file's {size} bytes")]
    OutOfBounds { offset: u64, end: u64, size: u64 },
    #[error("frame for byte {offset}..{end} overlaps data already received")]
    Overlap { offset: u64, end: u64 },
    #[error("incomplete: {received} of {size} bytes arrived")]
    Incomplete { received: u64, size: u64 },
    #[error("size mismatch: sender says {announced} bytes, the file list said {expected}")]
    SizeMismatch { announced: u64, expected: u64 },
    #[error("integrity: SHA-256 of the received bytes does not match the sender's")]
    Integrity,
    #[error("storage: {0}")]
    Sink(String),
}

/// Hex SHA-256 of a byte slice in one shot (tests and small inputs).
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn peer_messages_golden_json() {
        let msg = PeerMsg::Manifest {
            files: vec![FileMeta {
                id: FileId(7),
                name: "a.txt".into(),
                path: "dir/a.txt".into(),
                size: 3,
                mime: "text/plain".into(),
                sha256: None,
            }],
        };
        assert_eq!(
            serde_json::to_value(&msg).unwrap(),
            json!({"type": "manifest", "files": [{"id": 7, "name": "a.txt", "path": "dir/a.txt",
                   "size": 3, "mime": "text/plain"}]})
        );
        let end = PeerMsg::FileEnd {
            file: FileId(1),
            size: 0,
            sha256: sha256_hex(b""),
        };
        let text = serde_json::to_string(&end).unwrap();
        assert_eq!(serde_json::from_str::<PeerMsg>(&text).unwrap(), end);
        assert_eq!(
            serde_json::to_value(PeerMsg::Request { file: FileId(2) }).unwrap(),
            json!({"type": "request", "file": 2})
        );
    }

    #[test]
    fn query_overrides_apply_and_keep_marks_ordered() {
        let fc = FlowControl::DEFAULT.with_query("?chunk=16384&high=1000&low=5000&x=1&block=bad");
        assert_eq!(fc.chunk_size, 16384);
        assert_eq!(fc.high_water, 1000);
        assert_eq!(fc.low_water, 1000);
        assert_eq!(fc.read_block, FlowControl::DEFAULT.read_block);
        assert_eq!(FlowControl::DEFAULT.with_query(""), FlowControl::DEFAULT);
        assert_eq!(
            FlowControl::DEFAULT.with_query("chunk=0"),
            FlowControl::DEFAULT
        );
    }

    #[test]
    fn chunk_is_fitted_to_max_message_size() {
        let fc = FlowControl::DEFAULT.fitted_to(Some(16 * 1024));
        assert_eq!(fc.chunk_size, 16 * 1024 - frame::HEADER_LEN);
        assert_eq!(FlowControl::DEFAULT.fitted_to(None), FlowControl::DEFAULT);
        assert_eq!(
            FlowControl::DEFAULT.fitted_to(Some(1 << 30)).chunk_size,
            FlowControl::DEFAULT.chunk_size
        );
    }
}
