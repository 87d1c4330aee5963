//! The receiving side of one file: write each frame at its offset, track which bytes arrived, and
//! say "verified" only when every byte is there and the SHA-256 matches the sender's.

use super::TransferError;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

/// Where received bytes go. Memory for small files; a disk-backed sink can implement the same.
pub trait Sink {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), TransferError>;
    /// SHA-256 of the whole content, computed streaming.
    fn sha256(&mut self) -> Result<[u8; 32], TransferError>;
}

/// A preallocated in-memory buffer.
#[derive(Debug)]
pub struct MemorySink {
    buf: Vec<u8>,
}

impl MemorySink {
    /// Largest file received in memory (disk sinks take larger ones).
    pub const MAX: u64 = 1 << 30;

    /// A zeroed buffer of `size` bytes; refused (not aborted) when it cannot be had.
    pub fn new(size: u64) -> Result<Self, TransferError> {
        let too_big = || TransferError::Sink(format!("{size} bytes do not fit in memory"));
        if size > Self::MAX {
            return Err(too_big());
        }
        let len = usize::try_from(size).map_err(|_| too_big())?;
        let mut buf = Vec::new();
        buf.try_reserve_exact(len).map_err(|_| too_big())?;
        buf.resize(len, 0);
        Ok(Self { buf })
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }
}

impl Sink for MemorySink {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), TransferError> {
        let start = offset as usize;
        self.buf[start..start + data.len()].copy_from_slice(data);
        Ok(())
    }

    fn sha256(&mut self) -> Result<[u8; 32], TransferError> {
        let mut h = Sha256::new();
        for block in self.buf.chunks(1 << 20) {
            h.update(block);
        }
        Ok(h.finalize().into())
    }
}

/// Disjoint, merged byte ranges `start → end`.
#[derive(Debug, Default, Clone)]
struct RangeSet {
    ranges: BTreeMap<u64, u64>,
    total: u64,
}

impl RangeSet {
    /// Adds `[start, end)`; false (and nothing added) if it overlaps a range already present.
    fn insert(&mut self, start: u64, end: u64) -> bool {
        if start == end {
            return true;
        }
        let prev = self
            .ranges
            .range(..=start)
            .next_back()
            .map(|(&s, &e)| (s, e));
        if matches!(prev, Some((_, e)) if e > start) {
            return false;
        }
        let next = self.ranges.range(start..).next().map(|(&s, &e)| (s, e));
        if matches!(next, Some((s, _)) if s < end) {
            return false;
        }
        let (mut new_start, mut new_end) = (start, end);
        if let Some((s, e)) = prev.filter(|&(_, e)| e == start) {
            self.ranges.remove(&s);
            new_start = s;
            debug_assert_eq!(e, start);
        }
        if let Some((s, e)) = next.filter(|&(s, _)| s == end) {
            self.ranges.remove(&s);
            new_end = e;
        }
        self.ranges.insert(new_start, new_end);
        self.total += end - start;
        true
    }
}

/// Which bytes of a file have arrived: frames are accepted once, inside the file, in any order.
/// Sink-agnostic, so a browser sink that writes straight from JS memory can use it too.
#[derive(Debug, Clone)]
pub struct Coverage {
    size: u64,
    covered: RangeSet,
}

impl Coverage {
    pub fn new(size: u64) -> Self {
        Self {
            size,
            covered: RangeSet::default(),
        }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Bytes received so far (each byte counted once).
    pub fn received(&self) -> u64 {
        self.covered.total
    }

    pub fn is_complete(&self) -> bool {
        self.covered.total == self.size
    }

    /// Records `len` bytes at `offset`; an error (and no change) if they fall outside the file or
    /// overlap bytes already received.
    pub fn accept(&mut self, offset: u64, len: u64) -> Result<(), TransferError> {
        let end = offset
            .checked_add(len)
            .filter(|&end| end <= self.size)
            .ok_or(TransferError::OutOfBounds {
                offset,
                end: offset.saturating_add(len),
                size: self.size,
            })?;
        if self.covered.insert(offset, end) {
            Ok(())
        } else {
            Err(TransferError::Overlap { offset, end })
        }
    }

    /// Every byte arrived, and the sender's announced size is the one the file list gave.
    pub fn check_complete(&self, announced: u64) -> Result<(), TransferError> {
        if announced != self.size {
            return Err(TransferError::SizeMismatch {
                announced,
                expected: self.size,
            });
        }
        if !self.is_complete() {
            return Err(TransferError::Incomplete {
                received: self.received(),
                size: self.size,
            });
        }
        Ok(())
    }
}

/// Compares a computed digest with the sender's hex SHA-256.
pub fn verify_digest(digest: [u8; 32], sha256_hex: &str) -> Result<(), TransferError> {
    if hex::encode(digest).eq_ignore_ascii_case(sha256_hex) {
        Ok(())
    } else {
        Err(TransferError::Integrity)
    }
}

/// One file being received into a [`Sink`].
#[derive(Debug)]
pub struct Reassembly<S: Sink> {
    coverage: Coverage,
    sink: S,
}

impl<S: Sink> Reassembly<S> {
    pub fn new(size: u64, sink: S) -> Self {
        Self {
            coverage: Coverage::new(size),
            sink,
        }
    }

    pub fn size(&self) -> u64 {
        self.coverage.size()
    }

    pub fn received(&self) -> u64 {
        self.coverage.received()
    }

    pub fn is_complete(&self) -> bool {
        self.coverage.is_complete()
    }

    /// Writes one frame's payload at its offset, in whatever order frames arrive. A rejected
    /// frame changes nothing; after a sink error the file is lost anyway.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), TransferError> {
        self.coverage.accept(offset, data.len() as u64)?;
        self.sink.write_at(offset, data)
    }

    /// Checks the announced size and SHA-256 (hex) against what arrived; hands back the sink.
    pub fn finish(mut self, size: u64, sha256_hex: &str) -> Result<S, TransferError> {
        self.coverage.check_complete(size)?;
        verify_digest(self.sink.sha256()?, sha256_hex)?;
        Ok(self.sink)
    }
}

#[cfg(test)]
mod tests {
    use super::super::{frame, sha256_hex, FileId};
    use super::*;

    /// Deterministic pseudo-random bytes (xorshift), so tests need no fixtures.
    fn data(len: usize, seed: u64) -> Vec<u8> {
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

    /// Encodes `src` into frames, then feeds them to a reassembly in the order `order` gives.
    fn deliver(
        src: &[u8],
        chunk: usize,
        order: impl Fn(&mut Vec<Vec<u8>>),
    ) -> Reassembly<MemorySink> {
        let mut frames: Vec<Vec<u8>> = frame::chunks(src.len() as u64, chunk)
            .map(|(off, len)| frame::encode(FileId(3), off, &src[off as usize..off as usize + len]))
            .collect();
        order(&mut frames);
        let mut r = Reassembly::new(src.len() as u64, MemorySink::new(src.len() as u64).unwrap());
        for f in &frames {
            let (file, offset) = frame::decode_header(f).unwrap();
            assert_eq!(file, FileId(3));
            r.write(offset, &f[frame::HEADER_LEN..]).unwrap();
        }
        r
    }

    #[test]
    fn in_order_frames_rebuild_the_file() {
        let src = data(1_000_003, 1);
        let r = deliver(&src, 65_536, |_| {});
        assert!(r.is_complete());
        let out = r.finish(src.len() as u64, &sha256_hex(&src)).unwrap();
        assert_eq!(out.into_bytes(), src);
    }

    #[test]
    fn out_of_order_frames_still_give_the_right_file() {
        let src = data(512 * 1024 + 17, 2);
        // Neighbours swapped (the FilePizza failure), then fully reversed.
        let r = deliver(&src, 16 * 1024, |f| {
            for pair in f.chunks_mut(2) {
                pair.reverse();
            }
        });
        assert_eq!(
            r.finish(src.len() as u64, &sha256_hex(&src))
                .unwrap()
                .into_bytes(),
            src
        );
        let r = deliver(&src, 16 * 1024, |f| f.reverse());
        assert_eq!(
            r.finish(src.len() as u64, &sha256_hex(&src))
                .unwrap()
                .into_bytes(),
            src
        );
    }

    #[test]
    fn empty_file_verifies() {
        let r = Reassembly::new(0, MemorySink::new(0).unwrap());
        assert!(r.is_complete());
        assert!(r.finish(0, &sha256_hex(b"")).is_ok());
    }

    #[test]
    fn wrong_hash_is_an_integrity_error() {
        let src = data(1000, 3);
        let r = deliver(&src, 100, |_| {});
        assert_eq!(
            r.finish(1000, &sha256_hex(b"something else")).unwrap_err(),
            TransferError::Integrity
        );
    }

    #[test]
    fn corrupted_byte_is_an_integrity_error() {
        let src = data(1000, 4);
        let mut r = Reassembly::new(1000, MemorySink::new(1000).unwrap());
        let mut bad = src.clone();
        bad[500] ^= 1;
        r.write(0, &bad).unwrap();
        assert_eq!(
            r.finish(1000, &sha256_hex(&src)).unwrap_err(),
            TransferError::Integrity
        );
    }

    #[test]
    fn missing_frame_is_incomplete_not_verified() {
        let src = data(300, 5);
        let mut r = Reassembly::new(300, MemorySink::new(300).unwrap());
        r.write(0, &src[..100]).unwrap();
        r.write(200, &src[200..]).unwrap();
        assert_eq!(r.received(), 200);
        assert_eq!(
            r.finish(300, &sha256_hex(&src)).unwrap_err(),
            TransferError::Incomplete {
                received: 200,
                size: 300
            }
        );
    }

    #[test]
    fn overlap_and_out_of_bounds_are_rejected_without_effect() {
        let mut r = Reassembly::new(100, MemorySink::new(100).unwrap());
        r.write(10, &[1; 20]).unwrap();
        assert_eq!(
            r.write(25, &[2; 10]),
            Err(TransferError::Overlap {
                offset: 25,
                end: 35
            })
        );
        assert_eq!(
            r.write(0, &[2; 11]),
            Err(TransferError::Overlap { offset: 0, end: 11 })
        );
        assert!(matches!(
            r.write(95, &[0; 6]),
            Err(TransferError::OutOfBounds { .. })
        ));
        assert!(matches!(
            r.write(u64::MAX, &[0; 6]),
            Err(TransferError::OutOfBounds { .. })
        ));
        assert_eq!(r.received(), 20);
        // Adjacent ranges merge.
        r.write(0, &[3; 10]).unwrap();
        r.write(30, &[4; 70]).unwrap();
        assert!(r.is_complete());
    }

    #[test]
    fn coverage_alone_tracks_out_of_order_frames() {
        let mut c = Coverage::new(10);
        c.accept(5, 5).unwrap();
        assert_eq!(
            c.check_complete(10),
            Err(TransferError::Incomplete {
                received: 5,
                size: 10
            })
        );
        assert_eq!(
            c.accept(4, 2),
            Err(TransferError::Overlap { offset: 4, end: 6 })
        );
        c.accept(0, 5).unwrap();
        assert!(c.check_complete(10).is_ok());
        assert!(c.check_complete(11).is_err());
        assert!(verify_digest([0; 32], &"00".repeat(32)).is_ok());
        assert_eq!(
            verify_digest([0; 32], &"01".repeat(32)),
            Err(TransferError::Integrity)
        );
    }

    #[test]
    fn oversized_memory_sinks_are_refused_not_aborted() {
        assert!(matches!(
            MemorySink::new(MemorySink::MAX + 1),
            Err(TransferError::Sink(_))
        ));
        assert!(matches!(
            MemorySink::new(u64::MAX),
            Err(TransferError::Sink(_))
        ));
        assert!(MemorySink::new(1024).is_ok());
    }

    #[test]
    fn announced_size_must_match() {
        let r = Reassembly::new(3, MemorySink::new(3).unwrap());
        assert_eq!(
            r.finish(4, &sha256_hex(b"abc")).unwrap_err(),
            TransferError::SizeMismatch {
                announced: 4,
                expected: 3
            }
        );
    }

    #[test]
    fn streaming_sha256_equals_one_shot() {
        let src = data(3 * (1 << 20) + 5, 6);
        let mut sink = MemorySink::new(src.len() as u64).unwrap();
        sink.write_at(0, &src).unwrap();
        assert_eq!(hex::encode(sink.sha256().unwrap()), sha256_hex(&src));
        let mut h = Sha256::new();
        for piece in src.chunks(12_345) {
            h.update(piece);
        }
        assert_eq!(hex::encode(h.finalize()), sha256_hex(&src));
    }
}
