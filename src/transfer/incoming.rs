//! The receiving side of one file: write each frame at its offset, check every block against the
//! hash the sender announced for it the moment the block is complete, and know at all times which
//! blocks are verified and which are still missing.
//!
//! Nothing here trusts arrival order or the sender: a frame outside the file, across a block
//! boundary or over bytes already received changes nothing and is an error; a block whose bytes
//! do not hash to the announced value is forgotten and reported, so it alone is fetched again.
//! The file's root hash comes from the verified blocks' hashes (see [`super::blocks`]): no second
//! pass over the data, and a file received across several sessions verifies the same way.
//!
//! Storage is abstract ([`Storage`]): the browser's worker writes to OPFS, tests and the
//! in-memory fallback to a `Vec`.

use super::blocks::{root_hash, BlockHash, BlockHasher, Layout};
use super::ranges::{ranges_of_blocks, RangeSet};
use super::{ByteRange, TransferError};

/// Where a file's bytes go, by offset.
pub trait Storage {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), TransferError>;
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), TransferError>;
}

/// A file held in memory (small files where no disk is available, and tests).
#[derive(Debug, Default)]
pub struct MemoryStorage {
    buf: Vec<u8>,
}

impl MemoryStorage {
    /// Largest file received in memory: beyond this a browser tab risks running out.
    pub const MAX: u64 = 512 * 1024 * 1024;

    /// A zeroed buffer of `size` bytes; refused (not aborted) when it cannot be had.
    pub fn new(size: u64) -> Result<Self, TransferError> {
        let too_big = || {
            TransferError::Storage(format!(
                "{} do not fit in memory here (at most {} without disk storage)",
                human_bytes(size),
                human_bytes(Self::MAX)
            ))
        };
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

fn human_bytes(n: u64) -> String {
    format!("{} MiB", n.div_ceil(1 << 20))
}

impl Storage for MemoryStorage {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), TransferError> {
        let start = usize::try_from(offset).map_err(|e| TransferError::Storage(e.to_string()))?;
        let dest = self
            .buf
            .get_mut(start..start + data.len())
            .ok_or_else(|| TransferError::Storage("write past the end".into()))?;
        dest.copy_from_slice(data);
        Ok(())
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), TransferError> {
        let start = usize::try_from(offset).map_err(|e| TransferError::Storage(e.to_string()))?;
        let src = self
            .buf
            .get(start..start + buf.len())
            .ok_or_else(|| TransferError::Storage("read past the end".into()))?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

/// What a write or an announced hash settled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockEvent {
    /// Block `index` is complete and matches its announced hash.
    Verified { index: u32, hash: BlockHash },
    /// Block `index` is complete and does not: its bytes were forgotten; fetch it again.
    Bad { index: u32 },
}

#[derive(Clone)]
enum Block {
    Missing,
    /// Boxed: a block hasher is ~2 KB and a 30 GB file has 30,000 blocks, nearly all of them
    /// missing or verified at any moment.
    Receiving(Box<Partial>),
    Verified(BlockHash),
}

#[derive(Clone)]
struct Partial {
    /// What the sender says the block hashes to (it precedes the bytes on the wire).
    expected: Option<BlockHash>,
    /// Offsets (relative to the block) that arrived.
    covered: RangeSet,
    /// Hash of the block's prefix `[0, hashed)`, while bytes arrive in order; `None` once they
    /// did not (the block is then hashed from storage when complete).
    hasher: Option<(BlockHasher, u64)>,
    /// The block's hash, once complete, while its announced hash is still unknown.
    computed: Option<BlockHash>,
}

/// One file being received.
pub struct Incoming {
    layout: Layout,
    blocks: Vec<Block>,
    verified: u64,
}

/// Bytes hashed per read when a block has to be hashed from storage.
const READ_BACK: usize = 64 * 1024;

impl Incoming {
    pub fn new(layout: Layout) -> Self {
        Self {
            layout,
            blocks: vec![Block::Missing; layout.count() as usize],
            verified: 0,
        }
    }

    /// A file whose blocks `verified` were checked earlier (from its [`super::record`]). Entries
    /// outside the file are ignored.
    pub fn resume(layout: Layout, verified: impl IntoIterator<Item = (u32, BlockHash)>) -> Self {
        let mut me = Self::new(layout);
        for (index, hash) in verified {
            if let Some(block) = me.blocks.get_mut(index as usize) {
                if !matches!(block, Block::Verified(_)) {
                    *block = Block::Verified(hash);
                    me.verified += layout.len(index);
                }
            }
        }
        me
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// Bytes in verified blocks.
    pub fn verified_bytes(&self) -> u64 {
        self.verified
    }

    pub fn is_complete(&self) -> bool {
        self.verified == self.layout.size
    }

    /// The byte ranges of every block not verified yet, merged: what to request.
    pub fn missing(&self) -> Vec<ByteRange> {
        ranges_of_blocks(
            &self.layout,
            self.blocks
                .iter()
                .enumerate()
                .filter(|(_, b)| !matches!(b, Block::Verified(_)))
                .map(|(i, _)| i as u32),
        )
    }

    /// Verified blocks with their hashes (what a record keeps).
    pub fn verified_blocks(&self) -> impl Iterator<Item = (u32, BlockHash)> + '_ {
        self.blocks.iter().enumerate().filter_map(|(i, b)| match b {
            Block::Verified(h) => Some((i as u32, *h)),
            _ => None,
        })
    }

    /// Forgets every block that is not verified (partial blocks restart from their first byte:
    /// a new request asks for whole blocks).
    pub fn forget_partial(&mut self) {
        for b in &mut self.blocks {
            if matches!(b, Block::Receiving(_)) {
                *b = Block::Missing;
            }
        }
    }

    /// Forgets everything (the sender's file turned out to be another one).
    pub fn forget_all(&mut self) {
        *self = Self::new(self.layout);
    }

    /// The sender's hash for block `index`, announced before its bytes. A block already
    /// complete is settled now.
    pub fn expect(
        &mut self,
        index: u32,
        hash: BlockHash,
    ) -> Result<Option<BlockEvent>, TransferError> {
        let (start, end) = self.layout.range(index);
        let Some(block) = self.blocks.get_mut(index as usize) else {
            return Err(TransferError::OutOfBounds {
                offset: start,
                end,
                size: self.layout.size,
            });
        };
        match block {
            Block::Verified(_) => Ok(None),
            Block::Missing => {
                *block = Block::Receiving(Box::new(Partial::new(&self.layout, index, Some(hash))));
                Ok(None)
            }
            Block::Receiving(p) => {
                p.expected = Some(hash);
                Ok(p.computed
                    .map(|computed| self.settle(index, computed, hash)))
            }
        }
    }

    /// Writes one frame's payload at its offset. A rejected frame changes nothing.
    pub fn write(
        &mut self,
        storage: &mut impl Storage,
        offset: u64,
        data: &[u8],
    ) -> Result<Option<BlockEvent>, TransferError> {
        let len = data.len() as u64;
        let end = offset
            .checked_add(len)
            .filter(|&end| end <= self.layout.size)
            .ok_or(TransferError::OutOfBounds {
                offset,
                end: offset.saturating_add(len),
                size: self.layout.size,
            })?;
        if len == 0 {
            return Ok(None);
        }
        let index = self.layout.index_of(offset);
        let (block_start, block_end) = self.layout.range(index);
        if end > block_end {
            return Err(TransferError::SpansBlocks { offset, end });
        }
        let layout = self.layout;
        let block = &mut self.blocks[index as usize];
        if matches!(block, Block::Missing) {
            *block = Block::Receiving(Box::new(Partial::new(&layout, index, None)));
        }
        let Block::Receiving(p) = block else {
            return Err(TransferError::Overlap { offset, end });
        };
        let rel = offset - block_start;
        // Checked before writing: an overlapping frame must not touch stored bytes.
        if !p.covered.insert(rel, rel + len) {
            return Err(TransferError::Overlap { offset, end });
        }
        if let Err(e) = storage.write_at(offset, data) {
            // Whatever reached storage is unknown now: the block starts over.
            *block = Block::Missing;
            return Err(e);
        }
        match &mut p.hasher {
            Some((h, hashed)) if *hashed == rel => {
                h.update(data);
                *hashed += len;
            }
            _ => p.hasher = None,
        }
        if p.covered.total() < block_end - block_start {
            return Ok(None);
        }
        let computed = match &p.hasher {
            Some((h, _)) => h.finish(),
            None => hash_from_storage(storage, &layout, index)?,
        };
        match p.expected {
            Some(expected) => Ok(Some(self.settle(index, computed, expected))),
            None => {
                p.computed = Some(computed);
                Ok(None)
            }
        }
    }

    fn settle(&mut self, index: u32, computed: BlockHash, expected: BlockHash) -> BlockEvent {
        if computed == expected {
            self.blocks[index as usize] = Block::Verified(computed);
            self.verified += self.layout.len(index);
            BlockEvent::Verified {
                index,
                hash: computed,
            }
        } else {
            self.blocks[index as usize] = Block::Missing;
            BlockEvent::Bad { index }
        }
    }

    /// The file's root hash, once every block is verified.
    pub fn root(&self) -> Option<BlockHash> {
        let hashes: Option<Vec<BlockHash>> = self
            .blocks
            .iter()
            .map(|b| match b {
                Block::Verified(h) => Some(*h),
                _ => None,
            })
            .collect();
        root_hash(&self.layout, &hashes?)
    }

    /// Whether the file is whole and is the sender's: its size is the announced one, every block
    /// is verified and the root of their hashes is the announced file hash.
    pub fn check(&self, size: u64, hash: BlockHash) -> Result<(), TransferError> {
        if size != self.layout.size {
            return Err(TransferError::SizeMismatch {
                announced: size,
                expected: self.layout.size,
            });
        }
        match self.root() {
            None => Err(TransferError::Incomplete {
                received: self.verified,
                size: self.layout.size,
            }),
            Some(root) if root == hash => Ok(()),
            Some(_) => Err(TransferError::Integrity),
        }
    }
}

impl Partial {
    fn new(layout: &Layout, index: u32, expected: Option<BlockHash>) -> Self {
        Self {
            expected,
            covered: RangeSet::default(),
            hasher: Some((BlockHasher::new(layout, index), 0)),
            computed: None,
        }
    }
}

fn hash_from_storage(
    storage: &mut impl Storage,
    layout: &Layout,
    index: u32,
) -> Result<BlockHash, TransferError> {
    let (start, end) = layout.range(index);
    let mut h = BlockHasher::new(layout, index);
    let mut buf = vec![0u8; READ_BACK];
    let mut at = start;
    while at < end {
        let n = ((end - at) as usize).min(READ_BACK);
        storage.read_at(at, &mut buf[..n])?;
        h.update(&buf[..n]);
        at += n as u64;
    }
    Ok(h.finish())
}

#[cfg(test)]
mod tests {
    use super::super::blocks::{block_hash, file_hash};
    use super::super::frame;
    use super::super::test_data as data;
    use super::*;

    const BLOCK: u64 = 4096;

    /// A sender's view of `src`: every block's hash, and its frames block by block.
    struct Source {
        layout: Layout,
        src: Vec<u8>,
    }

    impl Source {
        fn new(len: usize, seed: u64) -> Self {
            Self {
                layout: Layout::with_block(len as u64, BLOCK),
                src: data(len, seed),
            }
        }
        fn hash(&self, index: u32) -> BlockHash {
            let (s, e) = self.layout.range(index);
            block_hash(&self.layout, index, &self.src[s as usize..e as usize])
        }
        fn frames(&self, index: u32, chunk: usize) -> Vec<(u64, Vec<u8>)> {
            let (s, e) = self.layout.range(index);
            frame::chunks(s, e, chunk)
                .map(|(off, len)| (off, self.src[off as usize..off as usize + len].to_vec()))
                .collect()
        }
        fn root(&self) -> BlockHash {
            file_hash(&self.src)
        }
    }

    fn receive_block(
        inc: &mut Incoming,
        mem: &mut MemoryStorage,
        src: &Source,
        index: u32,
        reorder: bool,
    ) -> Vec<BlockEvent> {
        let mut events = Vec::new();
        events.extend(inc.expect(index, src.hash(index)).unwrap());
        let mut frames = src.frames(index, 1000);
        if reorder {
            frames.reverse();
        }
        for (off, bytes) in frames {
            events.extend(inc.write(mem, off, &bytes).unwrap());
        }
        events
    }

    #[test]
    fn blocks_in_any_order_and_frames_in_any_order_verify() {
        let src = Source::new(5 * BLOCK as usize + 123, 1);
        let mut inc = Incoming::new(src.layout);
        let mut mem = MemoryStorage::new(src.layout.size).unwrap();
        for (i, index) in [3u32, 0, 5, 1, 4, 2].into_iter().enumerate() {
            let events = receive_block(&mut inc, &mut mem, &src, index, i % 2 == 1);
            assert_eq!(
                events,
                vec![BlockEvent::Verified {
                    index,
                    hash: src.hash(index)
                }]
            );
        }
        assert!(inc.is_complete());
        assert_eq!(inc.root(), Some(src.root()));
        assert!(inc.check(src.layout.size, src.root()).is_ok());
        assert_eq!(mem.into_bytes(), src.src);
    }

    #[test]
    fn a_corrupted_block_is_reported_forgotten_and_fetched_alone() {
        let src = Source::new(3 * BLOCK as usize, 2);
        let mut inc = Incoming::new(src.layout);
        let mut mem = MemoryStorage::new(src.layout.size).unwrap();
        receive_block(&mut inc, &mut mem, &src, 0, false);
        inc.expect(1, src.hash(1)).unwrap();
        let mut events = Vec::new();
        for (off, mut bytes) in src.frames(1, 1000) {
            if off == BLOCK + 1000 {
                bytes[7] ^= 0x40;
            }
            events.extend(inc.write(&mut mem, off, &bytes).unwrap());
        }
        assert_eq!(events, vec![BlockEvent::Bad { index: 1 }]);
        receive_block(&mut inc, &mut mem, &src, 2, false);
        assert_eq!(inc.missing(), vec![(BLOCK, 2 * BLOCK)]);
        assert_eq!(
            inc.check(src.layout.size, src.root()),
            Err(TransferError::Incomplete {
                received: 2 * BLOCK,
                size: 3 * BLOCK
            })
        );
        // Fetched again: now it verifies, and so does the file.
        assert_eq!(
            receive_block(&mut inc, &mut mem, &src, 1, false),
            vec![BlockEvent::Verified {
                index: 1,
                hash: src.hash(1)
            }]
        );
        assert!(inc.check(src.layout.size, src.root()).is_ok());
    }

    #[test]
    fn a_hash_announced_after_the_bytes_still_settles_the_block() {
        let src = Source::new(2 * BLOCK as usize, 3);
        let mut inc = Incoming::new(src.layout);
        let mut mem = MemoryStorage::new(src.layout.size).unwrap();
        for (off, bytes) in src.frames(1, 4096) {
            assert_eq!(inc.write(&mut mem, off, &bytes).unwrap(), None);
        }
        assert_eq!(
            inc.expect(1, src.hash(1)).unwrap(),
            Some(BlockEvent::Verified {
                index: 1,
                hash: src.hash(1)
            })
        );
        let mut wrong = src.hash(0);
        wrong.0[0] ^= 1;
        for (off, bytes) in src.frames(0, 4096) {
            inc.write(&mut mem, off, &bytes).unwrap();
        }
        assert_eq!(
            inc.expect(0, wrong).unwrap(),
            Some(BlockEvent::Bad { index: 0 })
        );
    }

    #[test]
    fn resumed_files_only_miss_what_was_not_verified() {
        let src = Source::new(4 * BLOCK as usize + 1, 4);
        let mut inc = Incoming::new(src.layout);
        let mut mem = MemoryStorage::new(src.layout.size).unwrap();
        receive_block(&mut inc, &mut mem, &src, 0, false);
        receive_block(&mut inc, &mut mem, &src, 2, false);
        // Half of block 3 arrived before the break.
        inc.expect(3, src.hash(3)).unwrap();
        let (off, bytes) = &src.frames(3, 2048)[0];
        inc.write(&mut mem, *off, bytes).unwrap();
        let record: Vec<_> = inc.verified_blocks().collect();
        assert_eq!(record.len(), 2);

        // Reload: only the record survives (and the bytes on disk).
        let mut inc = Incoming::resume(src.layout, record.into_iter().chain([(99, src.hash(0))]));
        assert_eq!(inc.verified_bytes(), 2 * BLOCK);
        assert_eq!(
            inc.missing(),
            vec![(BLOCK, 2 * BLOCK), (3 * BLOCK, 4 * BLOCK + 1)]
        );
        for index in [1, 3, 4] {
            receive_block(&mut inc, &mut mem, &src, index, false);
        }
        assert!(inc.check(src.layout.size, src.root()).is_ok());
        assert_eq!(mem.into_bytes(), src.src);
    }

    #[test]
    fn partial_blocks_restart_after_a_break() {
        let src = Source::new(2 * BLOCK as usize, 5);
        let mut inc = Incoming::new(src.layout);
        let mut mem = MemoryStorage::new(src.layout.size).unwrap();
        inc.expect(0, src.hash(0)).unwrap();
        let frames = src.frames(0, 1000);
        inc.write(&mut mem, frames[0].0, &frames[0].1).unwrap();
        inc.forget_partial();
        assert_eq!(inc.missing(), vec![(0, 2 * BLOCK)]);
        // The new request sends the block from its start: no overlap error.
        assert_eq!(
            receive_block(&mut inc, &mut mem, &src, 0, false),
            vec![BlockEvent::Verified {
                index: 0,
                hash: src.hash(0)
            }]
        );
    }

    #[test]
    fn bad_frames_are_refused_without_effect() {
        let src = Source::new(2 * BLOCK as usize + 10, 6);
        let mut inc = Incoming::new(src.layout);
        let mut mem = MemoryStorage::new(src.layout.size).unwrap();
        inc.write(&mut mem, 100, &[1; 50]).unwrap();
        assert_eq!(
            inc.write(&mut mem, 120, &[2; 50]),
            Err(TransferError::Overlap {
                offset: 120,
                end: 170
            })
        );
        assert_eq!(
            inc.write(&mut mem, BLOCK - 10, &[0; 20]),
            Err(TransferError::SpansBlocks {
                offset: BLOCK - 10,
                end: BLOCK + 10
            })
        );
        assert!(matches!(
            inc.write(&mut mem, 2 * BLOCK + 5, &[0; 6]),
            Err(TransferError::OutOfBounds { .. })
        ));
        assert!(matches!(
            inc.write(&mut mem, u64::MAX, &[0; 6]),
            Err(TransferError::OutOfBounds { .. })
        ));
        assert!(matches!(
            inc.expect(3, src.hash(0)),
            Err(TransferError::OutOfBounds { .. })
        ));
        // Nothing of the refused frames reached storage.
        assert_eq!(
            &mem.buf[120..170],
            &[1; 30].iter().chain(&[0; 20]).copied().collect::<Vec<_>>()[..]
        );
        // Bytes for a verified block are refused too.
        receive_block(&mut inc, &mut mem, &src, 2, false);
        assert_eq!(
            inc.write(&mut mem, 2 * BLOCK, &[0; 5]),
            Err(TransferError::Overlap {
                offset: 2 * BLOCK,
                end: 2 * BLOCK + 5
            })
        );
    }

    #[test]
    fn whole_file_check_catches_size_and_hash() {
        let src = Source::new(BLOCK as usize / 2, 7);
        let mut inc = Incoming::new(src.layout);
        let mut mem = MemoryStorage::new(src.layout.size).unwrap();
        assert_eq!(
            receive_block(&mut inc, &mut mem, &src, 0, false),
            vec![BlockEvent::Verified {
                index: 0,
                hash: src.hash(0)
            }]
        );
        assert!(inc.check(src.layout.size, src.root()).is_ok());
        assert_eq!(
            inc.check(src.layout.size + 1, src.root()),
            Err(TransferError::SizeMismatch {
                announced: src.layout.size + 1,
                expected: src.layout.size
            })
        );
        assert_eq!(
            inc.check(src.layout.size, file_hash(b"other")),
            Err(TransferError::Integrity)
        );
        // A one-block file's block hash is its root.
        assert_eq!(src.hash(0), src.root());
    }

    #[test]
    fn empty_files_are_complete_at_once() {
        let inc = Incoming::new(Layout::with_block(0, BLOCK));
        assert!(inc.is_complete());
        assert!(inc.missing().is_empty());
        assert!(inc.check(0, file_hash(b"")).is_ok());
    }

    #[test]
    fn memory_storage_refuses_what_it_cannot_hold() {
        assert!(matches!(
            MemoryStorage::new(MemoryStorage::MAX + 1),
            Err(TransferError::Storage(m)) if m.contains("at most 512 MiB")
        ));
        assert!(MemoryStorage::new(u64::MAX).is_err());
        let mut m = MemoryStorage::new(10).unwrap();
        assert!(m.write_at(8, &[1, 2, 3]).is_err());
        assert!(m.read_at(9, &mut [0; 2]).is_err());
    }
}
