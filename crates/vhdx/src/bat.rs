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
//! Lookups are lock-free: a fixed top-level array of groups (64 leaves each, i.e. 4096
//! entries), each group and leaf (64 entries, 512 bytes) created once (`OnceLock`) and never
//! freed while the table lives; entries are atomics. A file with a thousand blocks spread
//! over a 64 TiB disk costs about a megabyte, not the 256 MiB its whole BAT would.
//! Writers that change entries serialise among themselves (the file's state lock);
//! readers may run concurrently with them.

use crate::format::BatEntry;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// Entries in one leaf.
const LEAF_ENTRIES: u64 = 64;
const LEAVES_PER_GROUP: u64 = 64;
const GROUP_ENTRIES: u64 = LEAF_ENTRIES * LEAVES_PER_GROUP;
/// Entries in one 4 KiB BAT sector: the unit in which the file is read.
pub(crate) const PAGE_ENTRIES: u64 = 512;

type Leaf = [AtomicU64; LEAF_ENTRIES as usize];
type Group = [OnceLock<Box<Leaf>>; LEAVES_PER_GROUP as usize];

/// A sparse, concurrently readable BAT of `len` entries.
pub(crate) struct Bat {
    len: u64,
    groups: Box<[OnceLock<Box<Group>>]>,
}

fn new_leaf() -> Box<Leaf> {
    Box::new(std::array::from_fn(|_| AtomicU64::new(0)))
}

fn new_group() -> Box<Group> {
    Box::new(std::array::from_fn(|_| OnceLock::new()))
}

impl Bat {
    /// An all-zero table of `len` entries.
    pub(crate) fn new(len: u64) -> Bat {
        let groups = (0..len.div_ceil(GROUP_ENTRIES))
            .map(|_| OnceLock::new())
            .collect();
        Bat { len, groups }
    }

    /// Number of entries.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    fn group(&self, index: u64) -> Option<&Group> {
        self.groups
            .get((index / GROUP_ENTRIES) as usize)?
            .get()
            .map(|g| &**g)
    }

    fn leaf(&self, index: u64) -> Option<&Leaf> {
        self.group(index)?[((index / LEAF_ENTRIES) % LEAVES_PER_GROUP) as usize]
            .get()
            .map(|l| &**l)
    }

    fn leaf_or_create(&self, index: u64) -> &Leaf {
        let group = self.groups[(index / GROUP_ENTRIES) as usize].get_or_init(new_group);
        group[((index / LEAF_ENTRIES) % LEAVES_PER_GROUP) as usize].get_or_init(new_leaf)
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

    /// The end of the run of entries known to be zero (no leaf holds them) that contains
    /// `index`; `index + 1` when `index` lies in a leaf.
    pub(crate) fn absent_until(&self, index: u64) -> u64 {
        let end = match self.group(index) {
            None => (index / GROUP_ENTRIES + 1) * GROUP_ENTRIES,
            Some(g)
                if g[((index / LEAF_ENTRIES) % LEAVES_PER_GROUP) as usize]
                    .get()
                    .is_none() =>
            {
                (index / LEAF_ENTRIES + 1) * LEAF_ENTRIES
            }
            Some(_) => index + 1,
        };
        end.min(self.len).max(index + 1)
    }

    /// Loads entries from BAT bytes that start at entry `first` (a multiple of the leaf
    /// size); leaves whose entries are all zero are not created.
    pub(crate) fn load(&self, first: u64, bytes: &[u8]) {
        debug_assert!(first.is_multiple_of(LEAF_ENTRIES));
        for (i, leaf) in bytes.chunks(LEAF_ENTRIES as usize * 8).enumerate() {
            if leaf.iter().all(|&b| b == 0) {
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
    pub(crate) fn for_each_nonzero_in(&self, from: u64, to: u64, mut f: impl FnMut(u64, BatEntry)) {
        let to = to.min(self.len);
        let mut index = from;
        while index < to {
            match self.leaf(index) {
                None => index = self.absent_until(index),
                Some(leaf) => {
                    let leaf_end = ((index / LEAF_ENTRIES + 1) * LEAF_ENTRIES).min(to);
                    for i in index..leaf_end {
                        let v = leaf[(i % LEAF_ENTRIES) as usize].load(Ordering::Acquire);
                        if v != 0 {
                            f(i, BatEntry(v));
                        }
                    }
                    index = leaf_end;
                }
            }
        }
    }

    /// Leaves held in memory (for tests).
    #[cfg(test)]
    pub(crate) fn resident_leaves(&self) -> usize {
        self.groups
            .iter()
            .filter_map(|g| g.get())
            .map(|g| g.iter().filter(|l| l.get().is_some()).count())
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
        assert_eq!(bat.absent_until(0), 4096);
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
