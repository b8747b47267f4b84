//! The body of the `open` fuzz target, shared with the stable test suite.
//!
//! `crates/vhdx/tests/corruption.rs` includes this file as a module (`#[path]`), so it must
//! stay a plain module: no crate attributes, no dependencies besides `vhdx` and `std`.
//!
//! [`open_and_exercise`] treats its input as a whole VHDX file held in memory: it opens it
//! read-only (a log is replayed in memory), walks its structures and reads a few ranges,
//! then opens it writable (a log is replayed in place), writes, zeroes, flushes and closes,
//! and finally reopens the result and reads the writes back. Every failure must be a
//! `vhdx::Error`; a panic is a bug. It also panics when an invariant breaks: a file that
//! opened read-only must open writable, and a file this engine wrote and closed cleanly must
//! reopen and read back what was written.

use std::path::Path;
use std::sync::Arc;
use vhdx::MemFile;
use vhdx::{OpenOptions, Segment, VhdxFile};

/// Inputs up to this size also get a writable session (it copies the input and may grow it
/// by a few blocks).
pub const MAX_WRITABLE_INPUT: usize = 64 << 20;
/// Most memory a writable session may add to the input (allocations are whole blocks).
const MAX_GROWTH: u64 = 64 << 20;
/// Blocks walked segment by segment at the start of the disk.
const WALK_BLOCKS: u64 = 64;
/// Byte written by the writable session.
const PATTERN: u8 = 0x5A;
/// Start of the area blocks may live in (after the 1 MiB header section).
const HEADER_SECTION: u64 = 1 << 20;

/// How far an input got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Opened and read; too large for a writable session.
    ReadOnly,
    /// Opened, written, closed, reopened and read back.
    Written,
}

/// Opens `data` as a VHDX file and exercises it; see the module documentation.
pub fn open_and_exercise(data: &[u8]) -> vhdx::Result<Outcome> {
    let path = Path::new("fuzz-input.vhdx");
    let file = VhdxFile::open_io(
        Arc::new(MemFile::new(data.to_vec())),
        path,
        OpenOptions::default(),
    )?;
    walk(&file)?;
    let growth = 3 * u64::from(file.geometry().block_size) + (3 << 20);
    drop(file);
    if data.len() > MAX_WRITABLE_INPUT || growth > MAX_GROWTH {
        return Ok(Outcome::ReadOnly);
    }

    let mem = Arc::new(MemFile::new(data.to_vec()));
    let file = match VhdxFile::open_io(
        mem.clone(),
        path,
        OpenOptions {
            writable: true,
            ..OpenOptions::default()
        },
    ) {
        Ok(f) => f,
        Err(e) => panic!(
            "the input opens read-only but not writable: {}",
            vhdx::error_chain(&e)
        ),
    };
    walk(&file)?;
    let g = file.geometry();
    let size = g.virtual_size;
    let ss = u64::from(g.logical_sector_size);
    let len = (4 * ss).min(size);
    let mid = (size / 2 / ss * ss).min(size - len);
    let writes = [(0, len), (size - len, len), (mid, len)];
    let zero = ((size / 4 / ss * ss).min(size - ss), ss);
    let session = (|| -> vhdx::Result<()> {
        for &(off, n) in &writes {
            file.write_at(&vec![PATTERN; n as usize], off)?;
        }
        file.write_zeroes(zero.0, zero.1)?;
        file.flush()
    })();
    let closed = file.close();
    session?;
    closed?;

    let file = match VhdxFile::open_io(
        Arc::new(MemFile::new(mem.contents())),
        path,
        OpenOptions::default(),
    ) {
        Ok(f) => f,
        Err(e) => panic!(
            "a file written and closed cleanly does not reopen: {}",
            vhdx::error_chain(&e)
        ),
    };
    assert!(
        file.header().log_guid.is_nil(),
        "a clean close leaves no log to replay"
    );
    walk(&file)?;
    // What each range must read: the writes, then the zeroed sector, in that order.
    let ops: Vec<(u64, u64, u8)> = writes
        .iter()
        .map(|&(o, n)| (o, n, PATTERN))
        .chain([(zero.0, zero.1, 0)])
        .collect();
    for (&(off, n, _), what) in ops.iter().zip(["start", "end", "middle", "zeroed"]) {
        let mut want = vec![0u8; n as usize];
        for &(o, l, byte) in &ops {
            let (s, e) = (o.max(off), (o + l).min(off + n));
            if s < e {
                want[(s - off) as usize..(e - off) as usize].fill(byte);
            }
        }
        let mut buf = vec![0u8; n as usize];
        file.read_at(&mut buf, off)?;
        if buf != want {
            let i = buf.iter().zip(&want).position(|(a, b)| a != b).unwrap_or(0);
            panic!("{what} range: byte {} reads back wrong", off + i as u64);
        }
    }
    Ok(Outcome::Written)
}

/// Walks what a check would: accessors, the BAT, the first blocks and the last one segment
/// by segment, and reads at the start, middle and end of the disk.
fn walk(file: &VhdxFile) -> vhdx::Result<()> {
    let g = file.geometry();
    let _ = (
        file.header(),
        file.regions(),
        file.metadata_items(),
        file.parent_locator(),
        file.creator(),
        file.kind(),
        file.log_location(),
        file.metadata_location(),
        file.bat_offset(),
    );
    let _ = file.file_size()?;
    if file.bat_len() <= 1 << 20 {
        let _ = file.allocation();
        for i in 0..file.bat_len() {
            let _ = file.entry(i);
        }
    }
    let bs = u64::from(g.block_size);
    let size = g.virtual_size;
    let last = (size - 1) / bs * bs;
    for (off, len) in [(0, (WALK_BLOCKS * bs).min(size)), (last, size - last)] {
        let mut covered = 0;
        file.resolve(off, len, &mut |seg| {
            if let Segment::Data { file_offset, len } = seg {
                // (The last block of a file may run past its end, so only the start is fixed.)
                assert!(
                    file_offset >= HEADER_SECTION,
                    "data segment at file offset {file_offset} (+{len}) inside the header section"
                );
            }
            covered += seg.len();
            Ok(())
        })?;
        assert_eq!(covered, len, "segments cover the range resolved");
    }
    for block in 0..g.payload_blocks().min(WALK_BLOCKS) {
        let _ = file.block_entry(block);
        let _ = file.block_bitmap(block);
    }
    let n = (64 << 10).min(size);
    let mut buf = vec![0u8; n as usize];
    for off in [0, (size / 2).min(size - n), size - n] {
        file.read_at(&mut buf, off)?;
    }
    assert!(
        file.read_at(&mut [0u8; 1], size).is_err(),
        "a read past the end must fail"
    );
    Ok(())
}
