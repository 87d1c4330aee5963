//! Per-block integrity with BLAKE3's own tree.
//!
//! A file is cut into blocks of [`BLOCK_SIZE`] bytes (the last one shorter). Because the block
//! size is a power-of-two number of BLAKE3 chunks, every block is a whole subtree of the file's
//! BLAKE3 tree: its *chaining value* ([`BlockHash`]) can be computed from the block alone, and the
//! file's ordinary BLAKE3 hash (what `b3sum` prints) follows from the blocks' chaining values by
//! merging them up the same left-balanced tree. So:
//!
//! - the sender announces each block's hash before the block's bytes, and the receiver checks a
//!   block the moment its last byte arrives, re-requesting that block alone if it is wrong;
//! - the whole-file digest costs the receiver 32-byte merges, not a second pass over the data,
//!   whatever order blocks arrived in and however many sessions they took (resume);
//! - BLAKE3 in WASM (with SIMD128) hashes several times faster than SHA-256 does: on a box where
//!   CPU per MB is the transfer speed, that is the difference between verifying and not.
//!
//! A file of at most one block has no tree: its block hash *is* the file's root hash.

use blake3::hazmat::{
    left_subtree_len, merge_subtrees_non_root, merge_subtrees_root, ChainingValue, HasherExt, Mode,
};
use serde::{Deserialize, Serialize};
use std::fmt;

/// Bytes per integrity block: 1 MiB = 1024 BLAKE3 chunks. Small enough that a bad block costs
/// little to fetch again and a resumed transfer loses at most one block; large enough that a
/// 4 GiB file has 4096 hashes (128 KiB), announced one at a time.
pub const BLOCK_SIZE: u64 = 1 << 20;

/// A block's BLAKE3 chaining value, or a file's root hash: 32 bytes, hex on the wire.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct BlockHash(pub [u8; 32]);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a hash is 64 hex digits")]
pub struct BadHash;

impl TryFrom<String> for BlockHash {
    type Error = BadHash;
    fn try_from(s: String) -> Result<Self, BadHash> {
        s.parse()
    }
}

impl std::str::FromStr for BlockHash {
    type Err = BadHash;
    fn from_str(s: &str) -> Result<Self, BadHash> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|_| BadHash)?;
        Ok(Self(out))
    }
}

impl From<BlockHash> for String {
    fn from(h: BlockHash) -> String {
        hex::encode(h.0)
    }
}

impl fmt::Display for BlockHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for BlockHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlockHash({})", &hex::encode(self.0)[..16])
    }
}

/// How a file of `size` bytes divides into blocks of `block` bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub size: u64,
    pub block: u64,
}

impl Layout {
    /// The production layout.
    pub fn new(size: u64) -> Self {
        Self::with_block(size, BLOCK_SIZE)
    }

    /// `block` must be a power-of-two multiple of BLAKE3's 1 KiB chunk (tests use small ones).
    pub fn with_block(size: u64, block: u64) -> Self {
        assert!(
            block.is_power_of_two() && block >= blake3::CHUNK_LEN as u64,
            "block size must be a power-of-two number of BLAKE3 chunks"
        );
        Self { size, block }
    }

    /// Number of blocks (0 for an empty file).
    pub fn count(&self) -> u32 {
        u32::try_from(self.size.div_ceil(self.block)).unwrap_or(u32::MAX)
    }

    /// Byte range `[start, end)` of block `index`.
    pub fn range(&self, index: u32) -> (u64, u64) {
        let start = u64::from(index) * self.block;
        (start, (start + self.block).min(self.size))
    }

    /// Length of block `index`.
    pub fn len(&self, index: u32) -> u64 {
        let (start, end) = self.range(index);
        end.saturating_sub(start)
    }

    /// The block holding byte `offset`.
    pub fn index_of(&self, offset: u64) -> u32 {
        u32::try_from(offset / self.block).unwrap_or(u32::MAX)
    }

    /// Whether the file is one block (or empty): its block hash is its root hash.
    pub fn single(&self) -> bool {
        self.size <= self.block
    }
}

/// Hashes one block streaming, in order: feed its bytes, then [`BlockHasher::finish`].
#[derive(Clone)]
pub struct BlockHasher {
    hasher: blake3::Hasher,
    single: bool,
}

impl BlockHasher {
    pub fn new(layout: &Layout, index: u32) -> Self {
        let mut hasher = blake3::Hasher::new();
        let (start, _) = layout.range(index);
        if start > 0 {
            hasher.set_input_offset(start);
        }
        Self {
            hasher,
            single: layout.single(),
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        self.hasher.update(data);
    }

    /// The block's hash: its chaining value, or the root hash for a one-block file.
    pub fn finish(&self) -> BlockHash {
        if self.single {
            BlockHash(*self.hasher.finalize().as_bytes())
        } else {
            BlockHash(self.hasher.finalize_non_root())
        }
    }
}

/// The hash of block `index` holding `data`, in one call.
pub fn block_hash(layout: &Layout, index: u32, data: &[u8]) -> BlockHash {
    let mut h = BlockHasher::new(layout, index);
    h.update(data);
    h.finish()
}

/// The file's BLAKE3 hash from the hashes of all its blocks, in order (no data needed).
/// `None` if the count does not match the layout.
pub fn root_hash(layout: &Layout, blocks: &[BlockHash]) -> Option<BlockHash> {
    if blocks.len() != layout.count() as usize {
        return None;
    }
    match blocks {
        [] => Some(BlockHash(*blake3::hash(b"").as_bytes())),
        [only] => Some(*only),
        _ => {
            let left_len = left_subtree_len(layout.size);
            let left_blocks = (left_len / layout.block) as usize;
            let left = subtree_cv(layout, &blocks[..left_blocks], left_len);
            let right = subtree_cv(layout, &blocks[left_blocks..], layout.size - left_len);
            Some(BlockHash(
                *merge_subtrees_root(&left, &right, Mode::Hash).as_bytes(),
            ))
        }
    }
}

/// The chaining value of the subtree made of `blocks`, `len` bytes long. BLAKE3 splits a subtree
/// at the largest power-of-two number of chunks below its length; since a block is a power-of-two
/// number of chunks, that split always falls on a block boundary.
fn subtree_cv(layout: &Layout, blocks: &[BlockHash], len: u64) -> ChainingValue {
    if let [only] = blocks {
        return only.0;
    }
    let left_len = left_subtree_len(len);
    let left_blocks = (left_len / layout.block) as usize;
    let left = subtree_cv(layout, &blocks[..left_blocks], left_len);
    let right = subtree_cv(layout, &blocks[left_blocks..], len - left_len);
    merge_subtrees_non_root(&left, &right, Mode::Hash)
}

/// The ordinary BLAKE3 hash of `data` (what `b3sum` prints), for tests and small inputs.
pub fn file_hash(data: &[u8]) -> BlockHash {
    BlockHash(*blake3::hash(data).as_bytes())
}

#[cfg(test)]
mod tests {
    use super::super::test_data as data;
    use super::*;

    fn hashes(layout: &Layout, src: &[u8]) -> Vec<BlockHash> {
        (0..layout.count())
            .map(|i| {
                let (s, e) = layout.range(i);
                block_hash(layout, i, &src[s as usize..e as usize])
            })
            .collect()
    }

    #[test]
    fn root_from_block_hashes_equals_blake3_of_the_whole_file() {
        for block in [1024u64, 2048, 8192] {
            let b = block as usize;
            let sizes = [
                0,
                1,
                1023,
                1024,
                1025,
                b - 1,
                b,
                b + 1,
                2 * b,
                2 * b + 1,
                3 * b + 5,
                4 * b,
                5 * b - 1,
                7 * b + 3,
                8 * b,
                8 * b + 1,
                13 * b + 1000,
                16 * b,
                17 * b + 1,
            ];
            for size in sizes {
                let src = data(size, size as u64 + block);
                let layout = Layout::with_block(size as u64, block);
                let root = root_hash(&layout, &hashes(&layout, &src)).unwrap();
                assert_eq!(root, file_hash(&src), "size {size}, block {block}");
            }
        }
    }

    #[test]
    fn production_block_size_matches_too() {
        let src = data(3 * BLOCK_SIZE as usize + 12_345, 9);
        let layout = Layout::new(src.len() as u64);
        assert_eq!(layout.count(), 4);
        assert_eq!(
            root_hash(&layout, &hashes(&layout, &src)),
            Some(file_hash(&src))
        );
    }

    #[test]
    fn streaming_equals_one_shot_and_one_block_files_hash_to_their_root() {
        let layout = Layout::with_block(5000, 2048);
        let src = data(5000, 3);
        let (s, e) = layout.range(1);
        let mut h = BlockHasher::new(&layout, 1);
        for piece in src[s as usize..e as usize].chunks(300) {
            h.update(piece);
        }
        assert_eq!(
            h.finish(),
            block_hash(&layout, 1, &src[s as usize..e as usize])
        );
        let one = Layout::with_block(700, 2048);
        assert_eq!(block_hash(&one, 0, &src[..700]), file_hash(&src[..700]));
    }

    #[test]
    fn a_changed_or_missing_block_changes_the_root() {
        let layout = Layout::with_block(10_000, 1024);
        let src = data(10_000, 4);
        let mut hs = hashes(&layout, &src);
        let good = root_hash(&layout, &hs).unwrap();
        hs[3].0[0] ^= 1;
        assert_ne!(root_hash(&layout, &hs).unwrap(), good);
        hs.pop();
        assert_eq!(root_hash(&layout, &hs), None);
    }

    #[test]
    fn layout_arithmetic() {
        let l = Layout::with_block(2500, 1024);
        assert_eq!(l.count(), 3);
        assert_eq!(l.range(2), (2048, 2500));
        assert_eq!(l.len(2), 452);
        assert_eq!(l.index_of(2047), 1);
        assert!(!l.single());
        assert_eq!(Layout::new(0).count(), 0);
        assert!(Layout::new(BLOCK_SIZE).single());
    }

    #[test]
    fn hashes_read_and_write_as_hex() {
        let h = file_hash(b"abc");
        let text = serde_json::to_string(&h).unwrap();
        assert_eq!(
            text,
            "\"6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85\""
        );
        assert_eq!(serde_json::from_str::<BlockHash>(&text).unwrap(), h);
        assert!(serde_json::from_str::<BlockHash>("\"00\"").is_err());
    }
}
