//! A differencing chain: the top file and every parent down to a base file, read as one
//! virtual disk.
//!
//! Reads cost the same at any depth. A read resolves in the top file first (its BAT is
//! where every write lands); what the top leaves to its parents continues at the highest
//! layer below that holds anything in that *unit* (the smallest block size in the chain),
//! found in a map built at open, instead of walking down layer by layer. Only units that a
//! layer holds partly (sector bitmaps) continue to the layers below it. Writes go to the
//! top file only. Parents are opened read-only.
//!
//! The map costs what the chain holds: the layers below the top do not change while the
//! chain is open, so it is an immutable sorted list of runs of units, built from the blocks
//! each middle layer stores (its sparse BAT, see [`crate::VhdxFile::for_each_block_entry`]);
//! every unit outside the runs reads from the base. Over a 64 TiB disk an empty map is
//! empty whatever the depth, and opening costs what the layers store.

use crate::create::absolute;
use crate::error::{Error, Result};
use crate::file::{DiskKind, OpenOptions, Segment, VhdxFile};
use crate::format::{
    KEY_ABSOLUTE_WIN32_PATH, KEY_PARENT_LINKAGE, KEY_PARENT_LINKAGE2, KEY_RELATIVE_PATH,
    PAYLOAD_BLOCK_NOT_PRESENT, ParentLocator, parse_braced_guid,
};
use std::path::{Path, PathBuf};

/// Deepest chain this implementation opens.
pub const MAX_CHAIN_DEPTH: usize = 1024;

/// How a range of the chain reads, for block-status queries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Extent {
    /// Stored data (may still contain zero bytes).
    Data(u64),
    /// Reads as zeros without stored data.
    Zero(u64),
}

impl Extent {
    /// Length of the extent.
    pub fn len(self) -> u64 {
        match self {
            Extent::Data(l) | Extent::Zero(l) => l,
        }
    }
    /// Whether the extent is empty.
    pub fn is_empty(self) -> bool {
        self.len() == 0
    }
}

/// An open chain; `layers()[0]` is the top file.
pub struct Chain {
    layers: Vec<VhdxFile>,
    lower: LowerMap,
    virtual_size: u64,
}

/// Below the top: per unit, the highest layer (index 1 up) that holds anything there, as
/// sorted, disjoint runs; units outside every run read from the base.
struct LowerMap {
    unit_shift: u32,
    /// `(first unit, end unit, layer)`.
    runs: Vec<(u64, u64, u16)>,
    base: u16,
}

impl LowerMap {
    /// Builds the map of `layers` (top first) from what each middle layer stores.
    fn build(layers: &[VhdxFile], unit_shift: u32, base: u16) -> LowerMap {
        let mut units: Vec<(u64, u16)> = Vec::new();
        for (i, layer) in layers.iter().enumerate().take(base as usize).skip(1) {
            let g = layer.geometry();
            let per_block = u64::from(g.block_size) >> unit_shift;
            layer.for_each_block_entry(|block, e| {
                if e.state() != PAYLOAD_BLOCK_NOT_PRESENT {
                    let first = block * per_block;
                    units.extend((first..first + per_block).map(|u| (u, i as u16)));
                }
            });
        }
        // Per unit, the smallest index: the highest layer.
        units.sort_unstable();
        units.dedup_by_key(|(u, _)| *u);
        let mut runs: Vec<(u64, u64, u16)> = Vec::new();
        for (u, layer) in units {
            match runs.last_mut() {
                Some((_, end, l)) if *end == u && *l == layer => *end += 1,
                _ => runs.push((u, u + 1, layer)),
            }
        }
        runs.shrink_to_fit();
        LowerMap {
            unit_shift,
            runs,
            base,
        }
    }

    /// Calls `f(layer, offset, len)` for the pieces of `[offset, offset + len)` by the
    /// layer they start at.
    fn for_each_run(
        &self,
        offset: u64,
        len: u64,
        mut f: impl FnMut(usize, u64, u64) -> Result<()>,
    ) -> Result<()> {
        let end = offset + len;
        let mut pos = offset;
        let mut i = self
            .runs
            .partition_point(|&(_, e, _)| e << self.unit_shift <= offset);
        while pos < end {
            let (layer, stop) = match self.runs.get(i) {
                Some(&(s, e, l)) if s << self.unit_shift <= pos => {
                    i += 1;
                    (l, e << self.unit_shift)
                }
                Some(&(s, _, _)) => (self.base, s << self.unit_shift),
                None => (self.base, end),
            };
            let stop = stop.min(end);
            f(usize::from(layer), pos, stop - pos)?;
            pos = stop;
        }
        Ok(())
    }
}

impl std::fmt::Debug for Chain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chain")
            .field("layers", &self.paths())
            .finish_non_exhaustive()
    }
}

/// Candidate paths of the parent named by `locator`, in the order the spec tries them.
pub fn parent_candidates(child: &Path, locator: &ParentLocator) -> Vec<PathBuf> {
    let child_abs = absolute(child).unwrap_or_else(|_| child.to_owned());
    let dir = child_abs.parent().unwrap_or(Path::new("/")).to_owned();
    let mut out = Vec::new();
    if let Some(rel) = locator.get(KEY_RELATIVE_PATH) {
        let rel = rel.replace('\\', "/");
        if let Ok(p) = absolute(&dir.join(rel.trim_start_matches("./"))) {
            out.push(p);
        }
    }
    if let Some(abs) = locator.get(KEY_ABSOLUTE_WIN32_PATH) {
        let stripped = abs.strip_prefix("\\\\?\\").unwrap_or(abs);
        if let Some(rest) = stripped
            .strip_prefix("UNC\\localhost")
            .filter(|r| r.starts_with('\\'))
        {
            out.push(PathBuf::from(rest.replace('\\', "/")));
        } else if stripped.starts_with('\\') || stripped.starts_with('/') {
            out.push(PathBuf::from(stripped.replace('\\', "/")));
        } else if stripped.len() > 2 && stripped.as_bytes()[1] == b':' {
            // A drive-letter path cannot be mapped here; try its file name beside the child.
            if let Some(name) = stripped.rsplit('\\').next() {
                out.push(dir.join(name));
            }
        }
    }
    out.dedup();
    out
}

/// Finds and opens (read-only) the parent of a differencing file, verifying that its
/// DataWriteGuid matches the child's linkage and that sizes agree.
pub fn open_parent(child: &VhdxFile) -> Result<VhdxFile> {
    open_parent_with(child, OpenOptions::default())
}

/// Like [`open_parent`] with explicit open options (a merge opens the parent writable).
pub fn open_parent_with(child: &VhdxFile, options: OpenOptions) -> Result<VhdxFile> {
    let locator = child.parent_locator().ok_or_else(|| Error::Unsupported {
        path: child.path().to_owned(),
        reason: "not a differencing file".into(),
    })?;
    let linkage = locator.get(KEY_PARENT_LINKAGE).and_then(parse_braced_guid);
    let linkage2 = locator
        .get(KEY_PARENT_LINKAGE2)
        .and_then(parse_braced_guid)
        .filter(|g| !g.is_nil());
    let candidates = parent_candidates(child.path(), &locator);
    let mut mismatch: Option<Error> = None;
    for candidate in &candidates {
        if !candidate.exists() {
            continue;
        }
        let parent = VhdxFile::open(candidate, options.clone())?;
        let dwg = parent.data_write_guid();
        if Some(dwg) != linkage && Some(dwg) != linkage2 {
            mismatch.get_or_insert(Error::ParentLinkageMismatch {
                child: child.path().to_owned(),
                parent: candidate.clone(),
                expected: locator.get(KEY_PARENT_LINKAGE).unwrap_or("").to_owned(),
                actual: dwg,
            });
            continue;
        }
        let (cg, pg) = (child.geometry(), parent.geometry());
        let what = if cg.virtual_size != pg.virtual_size {
            Some("virtual size")
        } else if cg.logical_sector_size != pg.logical_sector_size {
            Some("logical sector size")
        } else {
            None
        };
        if let Some(what) = what {
            return Err(Error::ParentMismatch {
                child: child.path().to_owned(),
                parent: candidate.clone(),
                what,
            });
        }
        return Ok(parent);
    }
    Err(mismatch.unwrap_or_else(|| Error::ParentNotFound {
        child: child.path().to_owned(),
        tried: if candidates.is_empty() {
            "no usable path in the parent locator".into()
        } else {
            candidates
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        },
    }))
}

impl Chain {
    /// Opens `path` and every parent below it. Only the top file is opened writable, and
    /// only if `writable`.
    pub fn open(path: &Path, writable: bool) -> Result<Chain> {
        let top = VhdxFile::open(
            path,
            OpenOptions {
                writable,
                ..OpenOptions::default()
            },
        )?;
        Chain::from_top(top)
    }

    /// Opens the parents of an already open top file.
    pub fn from_top(top: VhdxFile) -> Result<Chain> {
        let mut layers = vec![top];
        let mut seen = vec![absolute(layers[0].path())?];
        while layers.last().unwrap().kind() == DiskKind::Differencing {
            if layers.len() >= MAX_CHAIN_DEPTH {
                return Err(Error::BadChain {
                    path: layers[0].path().to_owned(),
                    reason: format!("is deeper than {MAX_CHAIN_DEPTH} files"),
                });
            }
            let parent = open_parent(layers.last().unwrap())?;
            let abs = absolute(parent.path())?;
            if seen.contains(&abs) {
                return Err(Error::BadChain {
                    path: layers[0].path().to_owned(),
                    reason: format!("loops back to {}", abs.display()),
                });
            }
            seen.push(abs);
            layers.push(parent);
        }
        Chain::from_layers(layers)
    }

    /// Builds a chain from files already opened and verified, top first.
    pub fn from_layers(layers: Vec<VhdxFile>) -> Result<Chain> {
        let virtual_size = layers[0].geometry().virtual_size;
        let unit = layers
            .iter()
            .map(|l| l.geometry().block_size)
            .min()
            .unwrap();
        let unit_shift = unit.trailing_zeros();
        let base_index = u16::try_from(layers.len() - 1).map_err(|_| Error::BadChain {
            path: layers[0].path().to_owned(),
            reason: "has too many files".into(),
        })?;
        let lower = LowerMap::build(&layers, unit_shift, base_index);
        Ok(Chain {
            layers,
            lower,
            virtual_size,
        })
    }

    /// The files, top first.
    pub fn layers(&self) -> &[VhdxFile] {
        &self.layers
    }
    /// The top (writable) file.
    pub fn top(&self) -> &VhdxFile {
        &self.layers[0]
    }
    /// Paths of the files, top first.
    pub fn paths(&self) -> Vec<PathBuf> {
        self.layers.iter().map(|l| l.path().to_owned()).collect()
    }
    /// Guest-visible size.
    pub fn virtual_size(&self) -> u64 {
        self.virtual_size
    }
    /// Logical sector size.
    pub fn logical_sector_size(&self) -> u32 {
        self.layers[0].geometry().logical_sector_size
    }
    /// Takes the chain apart, top first.
    pub fn into_layers(self) -> Vec<VhdxFile> {
        self.layers
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        if offset
            .checked_add(len)
            .is_none_or(|e| e > self.virtual_size)
        {
            return Err(Error::OutOfRange {
                offset,
                len,
                size: self.virtual_size,
            });
        }
        Ok(())
    }

    /// Reads the virtual disk.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        self.read_from(0, buf, offset)
    }

    /// Reads through layer `layer` and what it leaves to the layers below.
    fn read_from(&self, layer: usize, buf: &mut [u8], offset: u64) -> Result<()> {
        if layer >= self.layers.len() {
            buf.fill(0);
            return Ok(());
        }
        let file = &self.layers[layer];
        let mut at = 0usize;
        file.resolve(offset, buf.len() as u64, &mut |seg| {
            let n = seg.len() as usize;
            let part = &mut buf[at..at + n];
            match seg {
                Segment::Data { file_offset, .. } => file.read_stored(part, file_offset)?,
                Segment::Zero { .. } => part.fill(0),
                Segment::Parent { .. } => self.read_below(layer, part, offset + at as u64)?,
            }
            at += n;
            Ok(())
        })
    }

    /// Reads what `layer` leaves to its parents: below the top, from the layer the map
    /// names; further down, from the next layer.
    fn read_below(&self, layer: usize, buf: &mut [u8], offset: u64) -> Result<()> {
        if layer > 0 {
            return self.read_from(layer + 1, buf, offset);
        }
        self.lower
            .for_each_run(offset, buf.len() as u64, |layer, pos, n| {
                let start = (pos - offset) as usize;
                self.read_from(layer, &mut buf[start..start + n as usize], pos)
            })
    }

    /// Reads like [`Chain::read_at`] in the same single pass, except that ranges that read
    /// as zeros without stored data are left untouched in `buf` and reported: the result
    /// covers the range, [`Extent::Zero`] for those, [`Extent::Data`] for what was read. For
    /// callers that send or store holes without their bytes (NBD hole chunks, backups).
    pub fn read_sparse(&self, buf: &mut [u8], offset: u64) -> Result<Vec<Extent>> {
        self.check_range(offset, buf.len() as u64)?;
        let mut out = Vec::new();
        self.read_sparse_from(0, buf, offset, &mut out)?;
        Ok(out)
    }

    fn read_sparse_from(
        &self,
        layer: usize,
        buf: &mut [u8],
        offset: u64,
        out: &mut Vec<Extent>,
    ) -> Result<()> {
        let push = |out: &mut Vec<Extent>, e: Extent| match (out.last_mut(), e) {
            (Some(Extent::Data(l)), Extent::Data(n)) | (Some(Extent::Zero(l)), Extent::Zero(n)) => {
                *l += n
            }
            _ => out.push(e),
        };
        if layer >= self.layers.len() {
            push(out, Extent::Zero(buf.len() as u64));
            return Ok(());
        }
        let file = &self.layers[layer];
        let mut at = 0usize;
        file.resolve(offset, buf.len() as u64, &mut |seg| {
            let n = seg.len() as usize;
            let part = &mut buf[at..at + n];
            let pos = offset + at as u64;
            match seg {
                Segment::Data { file_offset, .. } => {
                    file.read_stored(part, file_offset)?;
                    push(out, Extent::Data(n as u64));
                }
                Segment::Zero { .. } => push(out, Extent::Zero(n as u64)),
                Segment::Parent { .. } if layer == 0 => {
                    self.lower.for_each_run(pos, n as u64, |l, p, len| {
                        let start = (p - pos) as usize;
                        self.read_sparse_from(l, &mut part[start..start + len as usize], p, out)
                    })?
                }
                Segment::Parent { .. } => self.read_sparse_from(layer + 1, part, pos, out)?,
            }
            at += n;
            Ok(())
        })
    }

    /// Which parts of a range hold data and which read as zeros.
    pub fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.check_range(offset, len)?;
        let mut out: Vec<Extent> = Vec::new();
        self.status_from(0, offset, len, &mut out)?;
        Ok(out)
    }

    fn status_from(
        &self,
        layer: usize,
        offset: u64,
        len: u64,
        out: &mut Vec<Extent>,
    ) -> Result<()> {
        let push = |out: &mut Vec<Extent>, e: Extent| match (out.last_mut(), e) {
            (Some(Extent::Data(l)), Extent::Data(n)) | (Some(Extent::Zero(l)), Extent::Zero(n)) => {
                *l += n
            }
            _ => out.push(e),
        };
        if layer >= self.layers.len() {
            push(out, Extent::Zero(len));
            return Ok(());
        }
        let mut at = offset;
        self.layers[layer].resolve(offset, len, &mut |seg| {
            match seg {
                Segment::Data { len, .. } => push(out, Extent::Data(len)),
                Segment::Zero { len } => push(out, Extent::Zero(len)),
                Segment::Parent { len } if layer == 0 => {
                    self.lower
                        .for_each_run(at, len, |l, p, n| self.status_from(l, p, n, out))?
                }
                Segment::Parent { len } => self.status_from(layer + 1, at, len, out)?,
            }
            at += seg.len();
            Ok(())
        })
    }

    /// Writes into the top file.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.write_parts(offset, buf.len() as u64, Some(buf))
    }

    /// Makes a range read as zeros (discard / write-zeroes) in the top file.
    ///
    /// What already reads as zeros needs nothing: ranges the top file itself keeps zeroed,
    /// and ranges it leaves to a base that reads as zeros there with no layer between
    /// holding anything. So a guest that discards a fresh 64 TiB disk (`mkfs` does) adds
    /// nothing to the top file's BAT.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.check_range(offset, len)?;
        let base = self.layers.len() - 1;
        let mut todo: Vec<(u64, u64)> = Vec::new();
        let mut add = |pos: u64, n: u64| match todo.last_mut() {
            Some((p, l)) if *p + *l == pos => *l += n,
            _ => todo.push((pos, n)),
        };
        let mut below = Vec::new();
        let mut at = offset;
        self.top().resolve(offset, len, &mut |seg| {
            match seg {
                Segment::Data { len, .. } => add(at, len),
                Segment::Zero { .. } => {}
                Segment::Parent { len } => below.push((at, len)),
            }
            at += seg.len();
            Ok(())
        })?;
        for (pos, n) in below {
            self.lower.for_each_run(pos, n, |layer, pos, n| {
                if layer == base {
                    let mut all_zero = true;
                    self.layers[base].resolve(pos, n, &mut |seg| {
                        all_zero &= matches!(seg, Segment::Zero { .. });
                        Ok(())
                    })?;
                    if all_zero {
                        return Ok(());
                    }
                }
                add(pos, n);
                Ok(())
            })?;
        }
        todo.sort_unstable();
        for (pos, n) in todo {
            self.write_parts(pos, n, None)?;
        }
        Ok(())
    }

    /// Writes `data` (zeros when `None`) at `[offset, offset+len)` of the top file. A
    /// differencing file stores whole logical sectors, so a partial sector at either edge
    /// is completed with what the chain reads there (read-modify-write), or the rest of
    /// that sector would lose the parent's data.
    fn write_parts(&self, offset: u64, len: u64, data: Option<&[u8]>) -> Result<()> {
        self.check_range(offset, len)?;
        let top = self.top();
        let sector = u64::from(self.logical_sector_size());
        let end = offset + len;
        let put = |from: u64, to: u64| match data {
            Some(d) => top.write_at(&d[(from - offset) as usize..(to - offset) as usize], from),
            None => top.write_zeroes(from, to - from),
        };
        if len == 0
            || top.kind() != DiskKind::Differencing
            || (offset.is_multiple_of(sector) && end.is_multiple_of(sector))
        {
            return put(offset, end);
        }
        let patch = |from: u64, to: u64| -> Result<()> {
            let start = from - from % sector;
            let mut buf = vec![0u8; sector as usize];
            self.read_at(&mut buf, start)?;
            let part = &mut buf[(from - start) as usize..(to - start) as usize];
            match data {
                Some(d) => {
                    part.copy_from_slice(&d[(from - offset) as usize..(to - offset) as usize])
                }
                None => part.fill(0),
            }
            top.write_at(&buf, start)
        };
        let head_end = if !offset.is_multiple_of(sector) {
            (offset - offset % sector + sector).min(end)
        } else {
            offset
        };
        let tail_start = if !end.is_multiple_of(sector) {
            (end - end % sector).max(head_end)
        } else {
            end
        };
        if head_end > offset {
            patch(offset, head_end)?;
        }
        if tail_start > head_end {
            put(head_end, tail_start)?;
        }
        if end > tail_start {
            patch(tail_start, end)?;
        }
        Ok(())
    }

    /// Makes all writes durable.
    pub fn flush(&self) -> Result<()> {
        self.top().flush()
    }

    /// Closes every file (the top one cleanly, so that its log is empty).
    pub fn close(self) -> Result<()> {
        let mut result = Ok(());
        for layer in self.layers {
            let r = layer.close();
            if result.is_ok() {
                result = r;
            }
        }
        result
    }
}
