//! Model-based randomized test of the VHDX engine.
//!
//! A chain of real files (base dynamic disk plus differencing children) is driven by a
//! seeded random sequence of operations, and a flat in-memory copy of the virtual disk (the
//! oracle) is updated alongside. The operations are: writes at sector-aligned and unaligned
//! byte offsets with small, medium and multi-block lengths (random, zero and constant
//! data), write-zeroes (partial and whole blocks), flushes, close and reopen, new
//! differencing children (1 and 2 MiB blocks) up to a depth of 50, merges of the top file
//! with its parent in both directions, and merges of a middle layer (into its child, which
//! keeps the upper layers linked, or into its parent followed by a relink). Disks are
//! 33 MiB + 20 KiB with 512-byte sectors (every file's last block is partial) and 64 MiB
//! with 4096-byte sectors, with 1 MiB base blocks, so writes touch many blocks.
//!
//! What it proves:
//! * after every step, random ranges of the chain read exactly as the oracle (and every
//!   write reads back at once), and the whole disk does every 25 steps, after every merge
//!   and after the final reopen;
//! * write-zeroes in a child reads as zeros, never as the parent's data;
//! * after every close the top file (the only one a chain writes), and after every merge,
//!   every fifth close and at the end every file of the chain, passes `check` with no
//!   errors and no log left to replay;
//! * sub-sector writes and write-zeroes into a child keep the parent's data in the rest of
//!   the sector;
//! * merges report the right result and removed file, leave the chain linked as expected
//!   (an into-child merge of a child of the base makes it a standalone dynamic disk), and
//!   keep the virtual size, sector size, block size and virtual disk id of the result;
//! * a chain 50 files deep reads correctly, reopens, checks clean, and merges down.
//!
//! Reproduce one seed with `SNAPVISOR_MODEL_SEED=<seed>`; `SNAPVISOR_MODEL_STEPS` changes
//! the number of steps per seed.

use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use std::path::{Path, PathBuf};
use vhdx::{Chain, CreateParams, DiskKind, OpenOptions, VhdxFile, check};
use vhdx::{MergeDirection, merge, merge_unchecked, relink};

const MIB: u64 = 1 << 20;
/// Longest single write or write-zeroes.
const MAX_WRITE: u64 = 4 * MIB;

#[derive(Clone, Copy, Debug)]
struct Config {
    virtual_size: u64,
    base_block: u32,
    logical_sector: u32,
    max_depth: usize,
}

/// 33 MiB and 20 KiB: the last block of every file is partial.
const CONFIG_512: Config = Config {
    virtual_size: 33 * MIB + 20 * 1024,
    base_block: MIB as u32,
    logical_sector: 512,
    max_depth: 50,
};

const CONFIG_4096: Config = Config {
    virtual_size: 64 * MIB,
    base_block: MIB as u32,
    logical_sector: 4096,
    max_depth: 50,
};

/// A test directory on tmpfs when there is one: this test checks logic, not durability,
/// and every close, create and merge syncs.
fn test_dir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir()
        && let Ok(d) = tempfile::Builder::new()
            .prefix("vhdx-model-")
            .tempdir_in(shm)
    {
        return d;
    }
    tempfile::Builder::new()
        .prefix("vhdx-model-")
        .tempdir()
        .unwrap()
}

/// What the model knows about each file of the chain.
#[derive(Clone, Debug)]
struct Layer {
    path: PathBuf,
    block_size: u32,
}

struct Model {
    seed: u64,
    cfg: Config,
    dir: tempfile::TempDir,
    /// Base first, top last.
    layers: Vec<Layer>,
    chain: Option<Chain>,
    oracle: Vec<u8>,
    scratch: Vec<u8>,
    data: Vec<u8>,
    log: Vec<String>,
    step: usize,
    next_name: usize,
    closes: usize,
    disk_id: uuid::Uuid,
}

impl Model {
    fn new(seed: u64, cfg: Config) -> Model {
        let dir = test_dir();
        let base = dir.path().join("base.vhdx");
        vhdx::create(
            &base,
            &CreateParams {
                virtual_size: cfg.virtual_size,
                kind: DiskKind::Dynamic,
                block_size: Some(cfg.base_block),
                logical_sector_size: cfg.logical_sector,
                physical_sector_size: 4096,
            },
        )
        .unwrap();
        let chain = Chain::open(&base, true).unwrap();
        let disk_id = chain.top().virtual_disk_id();
        Model {
            seed,
            cfg,
            dir,
            layers: vec![Layer {
                path: base,
                block_size: cfg.base_block,
            }],
            chain: Some(chain),
            oracle: vec![0; cfg.virtual_size as usize],
            scratch: vec![0; cfg.virtual_size as usize],
            data: vec![0; MAX_WRITE as usize],
            log: Vec::new(),
            step: 0,
            next_name: 0,
            closes: 0,
            disk_id,
        }
    }

    fn chain(&self) -> &Chain {
        self.chain.as_ref().expect("chain is open")
    }

    fn top(&self) -> &Path {
        &self.layers.last().unwrap().path
    }

    fn fail(&self, what: &str) -> ! {
        let mut msg = format!(
            "model failure: seed {} ({:?}), step {}: {what}\nchain (base first): {:?}\nop log:\n",
            self.seed,
            self.cfg,
            self.step,
            self.layers.iter().map(|l| &l.path).collect::<Vec<_>>()
        );
        for (i, op) in self.log.iter().enumerate() {
            msg.push_str(&format!("  {i:4}: {op}\n"));
        }
        panic!("{msg}");
    }

    /// Unwraps an engine result, reporting the seed and op log on error.
    fn ok<T>(&self, r: vhdx::Result<T>, what: &str) -> T {
        match r {
            Ok(v) => v,
            Err(e) => self.fail(&format!("{what} failed: {}", vhdx::error_chain(&e))),
        }
    }

    fn compare(&self, got: &[u8], offset: u64, what: &str) {
        let want = &self.oracle[offset as usize..offset as usize + got.len()];
        if got != want {
            let first = got.iter().zip(want).position(|(a, b)| a != b).unwrap();
            let last = got.len()
                - got
                    .iter()
                    .zip(want)
                    .rev()
                    .position(|(a, b)| a != b)
                    .unwrap();
            self.fail(&format!(
                "{what}: read of [{offset:#x}, +{:#x}) differs from the oracle at disk bytes \
                 [{:#x}, {:#x}) (first: got {:#04x}, want {:#04x})",
                got.len(),
                offset + first as u64,
                offset + last as u64,
                got[first],
                want[first]
            ));
        }
    }

    fn verify_full(&mut self, what: &str) {
        let mut buf = std::mem::take(&mut self.scratch);
        let r = self.chain().read_at(&mut buf, 0);
        self.ok(r, "full read");
        self.compare(&buf, 0, what);
        self.scratch = buf;
    }

    fn verify_sample(&mut self, rng: &mut StdRng) {
        let size = self.cfg.virtual_size;
        for _ in 0..3 {
            let len = match rng.random_range(0..3) {
                0 => rng.random_range(1..=4096),
                1 => rng.random_range(1..=256 * 1024),
                _ => rng.random_range(1..=2 * MIB),
            };
            let off = rng.random_range(0..=size - len);
            let mut buf = std::mem::take(&mut self.scratch);
            let r = self.chain().read_at(&mut buf[..len as usize], off);
            self.ok(r, "sample read");
            self.compare(&buf[..len as usize], off, "sample");
            self.scratch = buf;
        }
    }

    fn random_range(&self, rng: &mut StdRng) -> (u64, u64) {
        let size = self.cfg.virtual_size;
        let sector = u64::from(self.cfg.logical_sector);
        let bs = u64::from(self.layers.last().unwrap().block_size);
        let len = match rng.random_range(0..10) {
            0..=3 => rng.random_range(1..=8192),
            4..=6 => rng.random_range(1..=256 * 1024),
            7..=8 => rng.random_range(1..=3 * MIB),
            _ => bs * rng.random_range(1..=2u64),
        };
        let len = len.min(size);
        let aligned = rng.random_bool(0.6);
        if aligned {
            let len = len.div_ceil(sector) * sector;
            let off = if rng.random_bool(0.3) {
                rng.random_range(0..=(size - len) / bs) * bs
            } else {
                rng.random_range(0..=(size - len) / sector) * sector
            };
            (off, len)
        } else {
            let off = if rng.random_bool(0.15) {
                // Close to the end of the disk.
                size - len
            } else {
                rng.random_range(0..=size - len)
            };
            (off, len)
        }
    }

    fn op_write(&mut self, rng: &mut StdRng) {
        let (off, len) = self.random_range(rng);
        let fill = rng.random_range(0..10);
        let data = &mut self.data[..len as usize];
        let kind = match fill {
            0 => {
                data.fill(0);
                "zero-data"
            }
            1 => {
                data.fill(rng.random::<u8>() | 1);
                "constant"
            }
            _ => {
                rng.fill_bytes(data);
                "random"
            }
        };
        self.log.push(format!("write {kind} [{off:#x}, +{len:#x})"));
        let data = &self.data[..len as usize];
        let r = self.chain().write_at(data, off);
        self.ok(r, "write_at");
        self.oracle[off as usize..(off + len) as usize].copy_from_slice(data);
        // The range just written reads back at once.
        let mut buf = std::mem::take(&mut self.scratch);
        let r = self.chain().read_at(&mut buf[..len as usize], off);
        self.ok(r, "read back");
        self.compare(&buf[..len as usize], off, "read back after write");
        self.scratch = buf;
    }

    fn op_zeroes(&mut self, rng: &mut StdRng) {
        let (off, len) = self.random_range(rng);
        self.log.push(format!("write_zeroes [{off:#x}, +{len:#x})"));
        let r = self.chain().write_zeroes(off, len);
        self.ok(r, "write_zeroes");
        self.oracle[off as usize..(off + len) as usize].fill(0);
    }

    fn op_flush(&mut self) {
        self.log.push("flush".into());
        let r = self.chain().flush();
        self.ok(r, "flush");
    }

    /// Closes the chain and checks the top file (the only one a chain writes; every file
    /// is checked after merges and every few closes).
    fn close(&mut self) {
        let chain = self.chain.take().expect("chain is open");
        let r = chain.close();
        self.ok(r, "close");
        self.closes += 1;
        if self.closes.is_multiple_of(5) {
            self.check_files(0);
        } else {
            self.check_files(self.layers.len() - 1);
        }
    }

    fn open(&mut self) {
        let top = self.top().to_owned();
        let r = Chain::open(&top, true);
        let chain = self.ok(r, "open");
        let got: Vec<PathBuf> = chain
            .paths()
            .iter()
            .map(|p| p.canonicalize().unwrap())
            .collect();
        let want: Vec<PathBuf> = self
            .layers
            .iter()
            .rev()
            .map(|l| l.path.canonicalize().unwrap())
            .collect();
        if got != want {
            self.fail(&format!("chain opened as {got:?}, expected {want:?}"));
        }
        let base_index = self.layers.len() - 1;
        for (i, (layer, file)) in self.layers.iter().rev().zip(chain.layers()).enumerate() {
            let g = file.geometry();
            let want_kind = if i == base_index {
                DiskKind::Dynamic
            } else {
                DiskKind::Differencing
            };
            if g.virtual_size != self.cfg.virtual_size
                || g.logical_sector_size != self.cfg.logical_sector
                || g.block_size != layer.block_size
                || file.kind() != want_kind
                || file.virtual_disk_id() != self.disk_id
            {
                self.fail(&format!(
                    "{} has geometry {g:?}, kind {:?}, disk id {}; expected size {}, sector {}, \
                     block {}, kind {want_kind:?}, disk id {}",
                    layer.path.display(),
                    file.kind(),
                    file.virtual_disk_id(),
                    self.cfg.virtual_size,
                    self.cfg.logical_sector,
                    layer.block_size,
                    self.disk_id
                ));
            }
        }
        self.chain = Some(chain);
    }

    /// Every file of the chain from layer `from` (base = 0) up passes `check` with no error
    /// and no log to replay.
    fn check_files(&self, from: usize) {
        for layer in &self.layers[from..] {
            let r = check(&layer.path, false);
            let report = self.ok(r, "check");
            if !report.is_clean() || report.needs_log_replay {
                self.fail(&format!(
                    "check of {} after close: errors {:?}, warnings {:?}",
                    layer.path.display(),
                    report.errors,
                    report.warnings
                ));
            }
        }
    }

    fn op_reopen(&mut self, rng: &mut StdRng) {
        self.log.push("close + reopen".into());
        self.close();
        self.open();
        self.verify_sample(rng);
    }

    fn op_new_child(&mut self, rng: &mut StdRng) {
        let block = if rng.random_bool(0.5) { MIB } else { 2 * MIB } as u32;
        self.next_name += 1;
        let path = self
            .dir
            .path()
            .join(format!("child-{:03}.avhdx", self.next_name));
        self.log.push(format!(
            "new child {} ({} MiB blocks) of {}",
            path.file_name().unwrap().to_string_lossy(),
            block / MIB as u32,
            self.top().file_name().unwrap().to_string_lossy()
        ));
        self.close();
        let top = self.top().to_owned();
        let r = vhdx::create_differencing(&path, &top, Some(block));
        self.ok(r, "create_differencing");
        self.layers.push(Layer {
            path,
            block_size: block,
        });
        self.open();
        self.verify_sample(rng);
    }

    /// Merges layer `index` (base = 0; must be a child) with its parent.
    fn op_merge(&mut self, index: usize, direction: MergeDirection) {
        let n = self.layers.len();
        assert!(index >= 1 && index < n);
        let child = self.layers[index].path.clone();
        let parent = self.layers[index - 1].path.clone();
        self.log.push(format!(
            "merge {} {direction:?} (layer {index} of {n})",
            child.file_name().unwrap().to_string_lossy()
        ));
        self.close();
        let mut last = (0, 0);
        // A middle layer has dependants this test relinks itself, as the checkpoint tree
        // will; the top layer has none, so the checked merge must accept it.
        let r = if index < n - 1 {
            merge_unchecked(&child, direction, &mut |done, total| last = (done, total))
        } else {
            merge(&child, direction, &mut |done, total| last = (done, total))
        };
        let outcome = self.ok(r, "merge");
        let into_parent = outcome.direction == MergeDirection::IntoParent;
        if direction != MergeDirection::Auto && outcome.direction != direction {
            self.fail(&format!("merge went {:?}", outcome.direction));
        }
        if into_parent {
            if !outcome.removed
                || outcome.result != parent
                || outcome.merged_away != child
                || child.exists()
            {
                self.fail(&format!("bad into-parent outcome {outcome:?}"));
            }
            self.layers.remove(index);
            if index < n - 1 {
                // The layer above read the removed child; the parent now holds the same.
                let above = self.layers[index].path.clone();
                self.log.push(format!(
                    "relink {} to {}",
                    above.file_name().unwrap().to_string_lossy(),
                    parent.file_name().unwrap().to_string_lossy()
                ));
                let r = relink(&above, &parent);
                self.ok(r, "relink");
            }
        } else {
            if outcome.removed
                || outcome.result != child
                || !canon_eq(&outcome.merged_away, &parent)
                || !parent.exists()
            {
                self.fail(&format!("bad into-child outcome {outcome:?}"));
            }
            // The old parent is no longer needed by anything: removing it proves it.
            std::fs::remove_file(&parent).unwrap();
            self.layers.remove(index - 1);
        }
        if self.layers.len() == 1 {
            let base = &self.layers[0].path;
            let f = self.ok(VhdxFile::open(base, OpenOptions::default()), "open base");
            if f.kind() != DiskKind::Dynamic {
                self.fail(&format!("merged base is {:?}", f.kind()));
            }
        }
        self.check_files(0);
        self.open();
        self.verify_full("after merge");
    }

    fn step(&mut self, rng: &mut StdRng) {
        let depth = self.layers.len();
        loop {
            match rng.random_range(0..100) {
                0..=34 => self.op_write(rng),
                35..=46 => self.op_zeroes(rng),
                47..=54 => self.op_flush(),
                55..=64 => self.op_reopen(rng),
                65..=80 if depth < self.cfg.max_depth => self.op_new_child(rng),
                81..=93 if depth >= 2 => {
                    let dir = random_direction(rng);
                    self.op_merge(depth - 1, dir);
                }
                94..=99 if depth >= 3 => {
                    let index = rng.random_range(1..depth - 1);
                    let dir = random_direction(rng);
                    self.op_merge(index, dir);
                }
                _ => continue,
            }
            break;
        }
    }
}

fn canon_eq(a: &Path, b: &Path) -> bool {
    a.canonicalize().ok() == b.canonicalize().ok()
}

fn random_direction(rng: &mut StdRng) -> MergeDirection {
    match rng.random_range(0..10) {
        0 => MergeDirection::Auto,
        1..=5 => MergeDirection::IntoParent,
        _ => MergeDirection::IntoChild,
    }
}

fn steps() -> usize {
    std::env::var("SNAPVISOR_MODEL_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(150)
}

fn run_seed(seed: u64, cfg: Config) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut m = Model::new(seed, cfg);
    for step in 0..steps() {
        m.step = step;
        m.step(&mut rng);
        m.verify_sample(&mut rng);
        if step % 25 == 24 {
            m.verify_full("periodic");
        }
    }
    m.log.push("final close".into());
    m.close();
    m.check_files(0);
    m.open();
    m.verify_full("after final reopen");
    m.close();
}

fn run_seeds(seeds: std::ops::Range<u64>, cfg: Config) {
    if let Some(seed) = std::env::var("SNAPVISOR_MODEL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        if seeds.contains(&seed) {
            run_seed(seed, cfg);
        }
        return;
    }
    for seed in seeds {
        run_seed(seed, cfg);
    }
}

#[test]
fn model_512_seeds_0_to_6() {
    run_seeds(0..7, CONFIG_512);
}

#[test]
fn model_512_seeds_7_to_13() {
    run_seeds(7..14, CONFIG_512);
}

#[test]
fn model_4096_sector_seeds_100_to_105() {
    run_seeds(100..106, CONFIG_4096);
}

/// A chain 50 files deep, with writes in every layer, reads and checks correctly; then
/// merges take it down in both directions.
#[test]
fn deep_chain_of_50() {
    let seed = 5000;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut m = Model::new(seed, CONFIG_512);
    m.op_write(&mut rng);
    while m.layers.len() < 50 {
        m.step += 1;
        m.op_new_child(&mut rng);
        for _ in 0..3 {
            m.op_write(&mut rng);
        }
        m.op_zeroes(&mut rng);
        m.verify_sample(&mut rng);
    }
    assert_eq!(m.chain().layers().len(), 50);
    m.verify_full("deep chain built");
    m.step += 1;
    m.op_reopen(&mut rng);
    // Merge down: alternate top and middle layers, both directions.
    for i in 0..10 {
        m.step += 1;
        let depth = m.layers.len();
        let dir = if i % 2 == 0 {
            MergeDirection::IntoParent
        } else {
            MergeDirection::IntoChild
        };
        let index = if i % 3 == 0 { depth / 2 } else { depth - 1 };
        m.op_merge(index, dir);
        m.op_write(&mut rng);
    }
    assert_eq!(m.layers.len(), 40);
    m.verify_full("deep chain merged");
    m.close();
}

/// An into-parent merge would change the parent's DataWriteGuid and remove the child, so
/// it is refused while a sibling or a grandchild depends on them; `Auto` then merges into
/// the child, and every file keeps reading what it read before.
#[test]
fn into_parent_is_refused_while_other_files_depend_on_the_pair() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhdx");
    let a = dir.path().join("a.avhdx");
    let b = dir.path().join("b.avhdx");
    let a2 = dir.path().join("a2.avhdx");
    vhdx::create(&base, &CreateParams::dynamic(8 << 20)).unwrap();
    let c = Chain::open(&base, true).unwrap();
    c.write_at(&[1u8; 4096], 0).unwrap();
    c.close().unwrap();
    vhdx::create_differencing(&a, &base, None).unwrap();
    vhdx::create_differencing(&b, &base, None).unwrap();
    let c = Chain::open(&a, true).unwrap();
    c.write_at(&[2u8; 4096], 4096).unwrap();
    c.close().unwrap();
    let read = |p: &Path| {
        let c = Chain::open(p, false).unwrap();
        let mut buf = vec![0u8; 8192];
        c.read_at(&mut buf, 0).unwrap();
        buf
    };
    let (before_a, before_b) = (read(&a), read(&b));
    // A sibling (b) depends on the parent.
    let err = merge(&a, MergeDirection::IntoParent, &mut |_, _| {}).unwrap_err();
    assert!(err.to_string().contains("b.avhdx"), "{err}");
    assert_eq!((read(&a), read(&b)), (before_a.clone(), before_b.clone()));
    // A grandchild (a2) depends on the child.
    vhdx::create_differencing(&a2, &a, None).unwrap();
    std::fs::remove_file(&b).unwrap();
    let err = merge(&a, MergeDirection::IntoParent, &mut |_, _| {}).unwrap_err();
    assert!(err.to_string().contains("a2.avhdx"), "{err}");
    // Auto picks the direction that keeps them linked.
    let out = merge(&a, MergeDirection::Auto, &mut |_, _| {}).unwrap();
    assert_eq!(out.direction, MergeDirection::IntoChild);
    assert_eq!(read(&a), before_a);
    assert_eq!(read(&a2), before_a);
}
