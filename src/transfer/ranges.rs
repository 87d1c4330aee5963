//! Byte ranges: disjoint merged sets (what arrived inside a block) and request ranges (which
//! blocks a receiver asks for, checked by the sender before it reads a byte).

use super::blocks::Layout;
use super::{ByteRange, TransferError};
use std::collections::BTreeMap;

/// Disjoint, merged byte ranges `start → end`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RangeSet {
    ranges: BTreeMap<u64, u64>,
    total: u64,
}

impl RangeSet {
    /// Bytes covered.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Adds `[start, end)`; false (and nothing added) if it overlaps a range already present.
    pub fn insert(&mut self, start: u64, end: u64) -> bool {
        if start >= end {
            return start == end;
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
        if let Some((s, _)) = prev.filter(|&(_, e)| e == start) {
            self.ranges.remove(&s);
            new_start = s;
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

/// Merges sorted-or-not ranges into a sorted list of disjoint ones; empty ranges vanish.
pub fn merged(mut ranges: Vec<ByteRange>) -> Vec<ByteRange> {
    ranges.retain(|&(s, e)| s < e);
    ranges.sort_unstable();
    let mut out: Vec<ByteRange> = Vec::with_capacity(ranges.len());
    for (s, e) in ranges {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// Total bytes of disjoint ranges.
pub fn total(ranges: &[ByteRange]) -> u64 {
    ranges.iter().map(|&(s, e)| e - s).sum()
}

/// The blocks a request covers, in order, each once. Every range must be whole blocks of the
/// file (its end may be the end of the file); anything else is refused before a byte is read.
pub fn requested_blocks(layout: &Layout, ranges: &[ByteRange]) -> Result<Vec<u32>, TransferError> {
    let mut blocks = Vec::new();
    for &(start, end) in ranges {
        let whole = start < end
            && end <= layout.size
            && start % layout.block == 0
            && (end % layout.block == 0 || end == layout.size);
        if !whole {
            return Err(TransferError::BadRange { start, end });
        }
        blocks.extend(layout.index_of(start)..layout.index_of(end - 1) + 1);
    }
    blocks.sort_unstable();
    blocks.dedup();
    Ok(blocks)
}

/// Block indices back to merged byte ranges (what a receiver requests).
pub fn ranges_of_blocks(layout: &Layout, blocks: impl IntoIterator<Item = u32>) -> Vec<ByteRange> {
    merged(blocks.into_iter().map(|i| layout.range(i)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_set_merges_neighbours_and_refuses_overlaps() {
        let mut r = RangeSet::default();
        assert!(r.insert(10, 20));
        assert!(!r.insert(15, 25));
        assert!(!r.insert(0, 11));
        assert!(r.insert(20, 30));
        assert!(r.insert(0, 10));
        assert!(r.insert(5, 5));
        assert_eq!(r.total(), 30);
        assert_eq!(r.ranges.len(), 1);
    }

    #[test]
    fn merging_sorts_and_joins() {
        assert_eq!(
            merged(vec![(5, 7), (0, 2), (2, 3), (6, 9), (4, 4)]),
            vec![(0, 3), (5, 9)]
        );
        assert_eq!(total(&[(0, 3), (5, 9)]), 7);
    }

    #[test]
    fn requests_must_be_whole_blocks_inside_the_file() {
        let l = Layout::with_block(5000, 1024);
        assert_eq!(
            requested_blocks(&l, &[(0, 1024), (3072, 5000), (1024, 2048)]).unwrap(),
            vec![0, 1, 3, 4]
        );
        assert_eq!(
            requested_blocks(&l, &[(0, 5000)]).unwrap(),
            vec![0, 1, 2, 3, 4]
        );
        for bad in [
            (0, 1000),
            (100, 1024),
            (4096, 5001),
            (2048, 2048),
            (3000, 1000),
        ] {
            assert_eq!(
                requested_blocks(&l, &[bad]),
                Err(TransferError::BadRange {
                    start: bad.0,
                    end: bad.1
                }),
                "{bad:?}"
            );
        }
        assert_eq!(requested_blocks(&l, &[]).unwrap(), Vec::<u32>::new());
        assert_eq!(
            ranges_of_blocks(&l, [4, 0, 1, 3]),
            vec![(0, 2048), (3072, 5000)]
        );
    }
}
