//! The receiver's record of a partial file, kept next to its bytes so a download survives a
//! reload, a crash or a new connection: which file it is, and every verified block with its hash.
//!
//! Layout: `BDR1`, the header's length (u32 LE), the header as JSON, then one 36-byte entry per
//! verified block (`index` u32 LE, hash). Append-only: a block verified is one small write at the
//! end, and a torn last entry (a crash mid-write) is ignored on reading.

use super::blocks::BlockHash;
use super::FileMeta;
use serde::{Deserialize, Serialize};

const MAGIC: &[u8; 4] = b"BDR1";
/// Bytes per entry.
pub const ENTRY_LEN: usize = 36;
/// A header longer than this is not ours.
const MAX_HEADER: usize = 64 * 1024;

/// Which file a record belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordHeader {
    /// [`resume_key`] of the file.
    pub key: String,
    pub name: String,
    pub size: u64,
    pub block: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("not a beamdrop record")]
    NotARecord,
    #[error("unreadable record header: {0}")]
    Header(String),
}

/// The bytes a new record starts with.
pub fn encode_header(header: &RecordHeader) -> Vec<u8> {
    let json = serde_json::to_vec(header).unwrap_or_default();
    let mut out = Vec::with_capacity(8 + json.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(json.len() as u32).to_le_bytes());
    out.extend_from_slice(&json);
    out
}

/// The bytes appended when block `index` is verified.
pub fn encode_entry(index: u32, hash: &BlockHash) -> [u8; ENTRY_LEN] {
    let mut out = [0u8; ENTRY_LEN];
    out[..4].copy_from_slice(&index.to_le_bytes());
    out[4..].copy_from_slice(&hash.0);
    out
}

/// A whole record read back: its header and the verified blocks (later entries for the same
/// block win; a torn final entry is dropped).
pub fn decode(bytes: &[u8]) -> Result<(RecordHeader, Vec<(u32, BlockHash)>), RecordError> {
    if bytes.get(..4) != Some(MAGIC.as_slice()) {
        return Err(RecordError::NotARecord);
    }
    let len = bytes
        .get(4..8)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .filter(|&len| len <= MAX_HEADER)
        .ok_or(RecordError::NotARecord)?;
    let json = bytes
        .get(8..8 + len)
        .ok_or_else(|| RecordError::Header("truncated".into()))?;
    let header: RecordHeader =
        serde_json::from_slice(json).map_err(|e| RecordError::Header(e.to_string()))?;
    let entries = bytes[8 + len..]
        .chunks_exact(ENTRY_LEN)
        .map(|e| {
            let mut hash = [0u8; 32];
            hash.copy_from_slice(&e[4..]);
            (
                u32::from_le_bytes([e[0], e[1], e[2], e[3]]),
                BlockHash(hash),
            )
        })
        .collect();
    Ok((header, entries))
}

/// A stable name for a file offered in a share, the same after the sender's or the receiver's
/// page reloads: the share, the file's path, name, size and modification time. 32 hex digits.
pub fn resume_key(share: &str, meta: &FileMeta) -> String {
    let mut h = blake3::Hasher::new();
    for part in [share, &meta.path, &meta.name] {
        h.update(&(part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    h.update(&meta.size.to_le_bytes());
    h.update(&meta.modified.to_le_bytes());
    hex::encode(&h.finalize().as_bytes()[..16])
}

#[cfg(test)]
mod tests {
    use super::super::blocks::file_hash;
    use super::super::FileId;
    use super::*;

    fn header() -> RecordHeader {
        RecordHeader {
            key: "k".into(),
            name: "movie.mkv".into(),
            size: 5 << 20,
            block: 1 << 20,
        }
    }

    #[test]
    fn records_round_trip_and_survive_a_torn_entry() {
        let mut bytes = encode_header(&header());
        bytes.extend_from_slice(&encode_entry(0, &file_hash(b"a")));
        bytes.extend_from_slice(&encode_entry(3, &file_hash(b"b")));
        let (h, entries) = decode(&bytes).unwrap();
        assert_eq!(h, header());
        assert_eq!(entries, vec![(0, file_hash(b"a")), (3, file_hash(b"b"))]);
        bytes.extend_from_slice(&encode_entry(4, &file_hash(b"c"))[..20]);
        assert_eq!(decode(&bytes).unwrap().1.len(), 2);
    }

    #[test]
    fn foreign_or_damaged_records_are_errors() {
        assert_eq!(decode(b""), Err(RecordError::NotARecord));
        assert_eq!(decode(b"PK\x03\x04aaaa"), Err(RecordError::NotARecord));
        let mut bytes = encode_header(&header());
        bytes.truncate(12);
        assert!(matches!(decode(&bytes), Err(RecordError::Header(_))));
        let mut huge = MAGIC.to_vec();
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(decode(&huge), Err(RecordError::NotARecord));
    }

    #[test]
    fn resume_keys_tell_files_apart_and_ignore_the_file_id() {
        let meta = FileMeta {
            id: FileId(1),
            name: "a.bin".into(),
            path: "dir/a.bin".into(),
            size: 10,
            mime: String::new(),
            modified: 5,
            hash: None,
        };
        let key = resume_key("share", &meta);
        assert_eq!(key.len(), 32);
        let same = FileMeta {
            id: FileId(9),
            ..meta.clone()
        };
        assert_eq!(resume_key("share", &same), key);
        for other in [
            FileMeta {
                size: 11,
                ..meta.clone()
            },
            FileMeta {
                modified: 6,
                ..meta.clone()
            },
            FileMeta {
                path: "dir2/a.bin".into(),
                ..meta.clone()
            },
        ] {
            assert_ne!(resume_key("share", &other), key);
        }
        assert_ne!(resume_key("other", &meta), key);
        // Length-prefixed: moving bytes between fields gives another key.
        let shifted = FileMeta {
            path: "dir/a.bi".into(),
            name: "na.bin".into(),
            ..meta.clone()
        };
        assert_ne!(resume_key("share", &shifted), key);
    }
}
