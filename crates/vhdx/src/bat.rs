//! The block allocation table in memory, sized by what the file holds.
//!
//! A 64 TiB differencing file with 2 MiB blocks has a 256 MiB BAT, almost all of it zero
//! (`NOT_PRESENT`) in a young checkpoint layer, and a chain can stack fifty of them. So
//! the table is kept in leaves of 64 entries, and only leaves that hold a non-zero entry
//! exist: an absent leaf reads as zeros. Opening a file reads only the parts of its BAT
//! region the file system stores (`SEEK_DATA`, see [`crate::FileIo::data_extents`]), and
//! keeps only leaves with a non-zero entry, so the cost of an open follows the data a file
//! holds, never the size its disk could reach.
//!
//! Lookups are lock-free: a radix tree of three levels under a fixed top-level array, each
//! node holding 64 slots created once (`OnceLock`) and never freed while the table lives,
//! with a bit mask of the slots in use so that walking the table visits only what exists;
//! entries are atomics. A file with a thousand blocks spread over a 64 TiB disk costs about
//! a megabyte, not the 256 MiB its whole BAT would. Writers that change entries serialise
//! among themselves (the file's state lock); readers may run concurrently with them.

use crate::format::BatEntry;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

const FANOUT: u64 = 64;
/// Entries in one leaf, one middle node, one top node.
const LEAF_ENTRIES: u64 = FANOUT;
const MID_ENTRIES: u64 = LEAF_ENTRIES * FANOUT;
const TOP_ENTRIES: u64 = MID_ENTRIES * FANOUT;
/// Entries in one 4 KiB BAT sector: the unit in which the file is read.
pub(crate) const PAGE_ENTRIES: u64 = 512;

type Leaf = [AtomicU64; FANOUT as usize];

/// An inner node: 64 children, and a mask of those that exist.
struct Node<T> {
    mask: AtomicU64,
    slots: [OnceLock<Box<T>>; FANOUT as usize],
}

impl<T> Node<T> {
    fn new() -> Box<Node<T>> {
        Box::new(Node {
            mask: AtomicU64::new(0),
            slots: std::array::from_fn(|_| OnceLock::new()),
        })
    }
    fn get(&self, i: u64) -> Option<&T> {
        self.slots[i as usize].get().map(|b| &**b)
    }
    fn get_or_create(&self, i: u64, make: impl FnOnce() -> Box<T>) -> &T {
        self.slots[i as usize].get_or_init(|| {
            self.mask.fetch_or(1 << i, Ordering::AcqRel);
            make()
        })
    }
    /// Indices of the children that exist, from `from` on, in order.
    fn present_from(&self, from: u64) -> impl Iterator<Item = u64> {
        let mut m = self.mask.load(Ordering::Acquire) & (u64::MAX << from);
        std::iter::from_fn(move || {
            (m != 0).then(|| {
                let i = u64::from(m.trailing_zeros());
                m &= m - 1;
                i
            })
        })
    }
}

type Mid = Node<Leaf>;
type Top = Node<Mid>;

/// A sparse, concurrently readable BAT of `len` entries.
pub(crate) struct Bat {
    len: u64,
    tops: Box<[OnceLock<Box<Top>>]>,
}

fn new_leaf() -> Box<Leaf> {
    Box::new(std::array::from_fn(|_| AtomicU64::new(0)))
}

impl Bat {
    /// An all-zero table of `len` entries.
    pub(crate) fn new(len: u64) -> Bat {
        let tops = (0..len.div_ceil(TOP_ENTRIES))
            .map(|_| OnceLock::new())
            .collect();
        Bat { len, tops }
    }

    /// Number of entries.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    fn top(&self, index: u64) -> Option<&Top> {
        self.tops
            .get((index / TOP_ENTRIES) as usize)?
            .get()
            .map(|t| &**t)
    }

    fn mid(&self, index: u64) -> Option<&Mid> {
        self.top(index)?.get((index / MID_ENTRIES) % FANOUT)
    }

    fn leaf(&self, index: u64) -> Option<&Leaf> {
        self.mid(index)?.get((index / LEAF_ENTRIES) % FANOUT)
    }

    fn leaf_or_create(&self, index: u64) -> &Leaf {
        self.tops[(index / TOP_ENTRIES) as usize]
            .get_or_init(Node::new)
            .get_or_create((index / MID_ENTRIES) % FANOUT, Node::new)
            .get_or_create((index / LEAF_ENTRIES) % FANOUT, new_leaf)
    }

    /// The entry at `index` (zero where no leaf exists).
    pub(crate) fn get(&self, index: u64) -> BatEntry {
        BatEntry(self.leaf(index).map_or(0, |l| {
            l[(index % LEAF_ENTRIES) as usize].load(Ordering::Acquire)
        }))
    }

    /// Sets the entry at `index`, creating its leaf if needed (a zero value into an absent
    /// leaf creates nothing).
    pub(crate) fn set(&self, index: u64, entry: BatEntry) {
        assert!(index < self.len, "bat index {index} out of range");
        if entry.0 == 0 && self.leaf(index).is_none() {
            return;
        }
        self.leaf_or_create(index)[(index % LEAF_ENTRIES) as usize]
            .store(entry.0, Ordering::Release);
    }

    /// The end of the run of entries known to be zero (no node holds them) that contains
    /// `index`; `index + 1` when `index` lies in a leaf.
    pub(crate) fn absent_until(&self, index: u64) -> u64 {
        let next = |unit: u64| (index / unit + 1) * unit;
        let end = match self.top(index) {
            None => next(TOP_ENTRIES),
            Some(top) => match top.get((index / MID_ENTRIES) % FANOUT) {
                None => next(MID_ENTRIES),
                Some(mid) if mid.get((index / LEAF_ENTRIES) % FANOUT).is_none() => {
                    next(LEAF_ENTRIES)
                }
                Some(_) => index + 1,
            },
        };
        end.min(self.len).max(index + 1)
    }

    /// Loads entries from BAT bytes that start at entry `first` (a multiple of the leaf
    /// size); leaves whose entries are all zero are not created.
    pub(crate) fn load(&self, first: u64, bytes: &[u8]) {
        debug_assert!(first.is_multiple_of(LEAF_ENTRIES));
        for (i, leaf) in bytes.chunks(LEAF_ENTRIES as usize * 8).enumerate() {
            // Without an early exit the check vectorises; most leaves of a sparse file's
            // pages are zero and this loop is most of an open's work.
            if leaf.iter().fold(0u8, |acc, &b| acc | b) == 0 {
                continue;
            }
            let base = first + i as u64 * LEAF_ENTRIES;
            for (j, e) in leaf.chunks_exact(8).enumerate() {
                let index = base + j as u64;
                if index >= self.len {
                    return;
                }
                let v = u64::from_le_bytes(e.try_into().unwrap());
                if v != 0 {
                    self.leaf_or_create(index)[j].store(v, Ordering::Release);
                }
            }
        }
    }

    /// Calls `f(index, entry)` for every non-zero entry, in index order.
    pub(crate) fn for_each_nonzero(&self, f: impl FnMut(u64, BatEntry)) {
        self.for_each_nonzero_in(0, self.len, f)
    }

    /// Calls `f(index, entry)` for every non-zero entry in `[from, to)`, in index order.
    /// Visits only the nodes that exist.
    pub(crate) fn for_each_nonzero_in(&self, from: u64, to: u64, mut f: impl FnMut(u64, BatEntry)) {
        let to = to.min(self.len);
        if from >= to {
            return;
        }
        for t in from / TOP_ENTRIES..=(to - 1) / TOP_ENTRIES {
            let Some(top) = self.tops[t as usize].get() else {
                continue;
            };
            let t_start = t * TOP_ENTRIES;
            let first_mid = from.saturating_sub(t_start) / MID_ENTRIES;
            for m in top.present_from(first_mid.min(FANOUT - 1)) {
                let m_start = t_start + m * MID_ENTRIES;
                if m_start >= to {
                    break;
                }
                let mid = top.get(m).expect("mask names existing nodes");
                let first_leaf = from.saturating_sub(m_start) / LEAF_ENTRIES;
                if first_leaf >= FANOUT {
                    continue;
                }
                for l in mid.present_from(first_leaf) {
                    let l_start = m_start + l * LEAF_ENTRIES;
                    if l_start >= to {
                        break;
                    }
                    let leaf = mid.get(l).expect("mask names existing nodes");
                    for i in from.max(l_start)..to.min(l_start + LEAF_ENTRIES) {
                        let v = leaf[(i - l_start) as usize].load(Ordering::Acquire);
                        if v != 0 {
                            f(i, BatEntry(v));
                        }
                    }
                }
            }
        }
    }

    /// Leaves held in memory (for tests).
    #[cfg(test)]
    pub(crate) fn resident_leaves(&self) -> usize {
        self.tops
            .iter()
            .filter_map(|t| t.get())
            .map(|t| {
                t.present_from(0)
                    .map(|m| t.get(m).unwrap().present_from(0).count())
                    .sum::<usize>()
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absent_pages_read_zero_and_cost_nothing() {
        let bat = Bat::new(40_000_000);
        assert_eq!(bat.get(39_999_999).0, 0);
        bat.set(7, BatEntry(0));
        assert_eq!(bat.resident_leaves(), 0);
        bat.set(30_000_123, BatEntry(0x6_0000_0006));
        assert_eq!(bat.get(30_000_123).0, 0x6_0000_0006);
        assert_eq!(bat.resident_leaves(), 1);
        assert_eq!(bat.absent_until(30_000_100), 30_000_101);
        assert_eq!(bat.absent_until(0), 262_144);
        assert_eq!(bat.absent_until(30_000_000), 30_000_064);
        let mut seen = Vec::new();
        bat.for_each_nonzero(|i, e| seen.push((i, e.0)));
        assert_eq!(seen, vec![(30_000_123, 0x6_0000_0006)]);
        let mut seen = Vec::new();
        bat.for_each_nonzero_in(30_000_124, 40_000_000, |i, e| seen.push((i, e.0)));
        assert!(seen.is_empty());
    }

    #[test]
    fn load_keeps_only_pages_with_entries() {
        let bat = Bat::new(2048);
        let mut bytes = vec![0u8; 2048 * 8];
        bytes[1030 * 8] = 6;
        bat.load(0, &bytes);
        assert_eq!(bat.resident_leaves(), 1);
        assert_eq!(bat.get(1030).0, 6);
        let mut seen = Vec::new();
        bat.for_each_nonzero_in(0, 2048, |i, _| seen.push(i));
        assert_eq!(seen, vec![1030]);
    }
}
