//! Backups checked against a model of the disk, on the real test guest under TCG.
//!
//! The VM has a second disk (`/dev/vdb` in the guest, disk 1) that the test writes through
//! the guest (text blocks that differ by step and place, each write synced), zeroes
//! through the guest (`blkdiscard -z`), and writes offline with `snapvisor disk write`.
//! Between those, seeded at random: checkpoints taken, applied and deleted, VM stops and
//! starts, worker kills, and backups, incremental (whenever tracking allows) or `--full`.
//! The model holds what the disk must read at every instant; each point is restored to a
//! file and compared with the model as it was at the point's instant, byte for byte, so
//! no changed byte is missed whichever way (full, incremental, express full) the point
//! was copied. The counter workload keeps writing to disk 0 all along.
//!
//! `SNAPVISOR_MODEL_STEPS` (default 28) and `SNAPVISOR_MODEL_SEED` (default: random,
//! printed) replay or lengthen a run.

mod support;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::path::Path;
use support::running::*;
use support::{Cli, guest_sh};

const DISK: usize = 32 << 20;
const BLOCK: usize = 4096;

/// The 4 KiB block `n` of a guest write made at `step`: text that names both, so that no
/// two writes store the same chunk by chance.
fn block_text(step: usize, n: usize) -> Vec<u8> {
    let mut b = format!("{:<4095}\n", format!("step {step} block {n}")).into_bytes();
    b.truncate(BLOCK);
    b
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

struct Run {
    cli: Cli,
    vm_dir: std::path::PathBuf,
    running: bool,
    model: Vec<u8>,
    checkpoints: BTreeMap<String, Vec<u8>>,
    points: Vec<(String, Vec<u8>, String)>,
    log: Vec<String>,
}

impl Run {
    fn start(&mut self) {
        if !self.running {
            self.cli.ok(&["vm", "start", "g", "--accel", "tcg"]);
            let cli = &self.cli;
            wait("the guest agent", 180, || status(cli)["agent"] == true);
            self.running = true;
        }
    }

    fn stop(&mut self) {
        if self.running {
            self.cli.ok(&["vm", "stop", "g"]);
            self.running = false;
        }
    }

    fn sh(&self, script: &str) {
        let (code, out) = guest_sh(&self.vm_dir, script);
        assert_eq!(
            code, 0,
            "in the guest: {script}: {out}\nsteps: {:#?}",
            self.log
        );
    }

    fn guest_write(&mut self, step: usize, first: usize, count: usize) {
        self.start();
        self.sh(&format!(
            "i=0; while [ $i -lt {count} ]; do printf '%-4095s\\n' \"step {step} block $(({first} + i))\"; i=$((i+1)); done \
             | dd of=/dev/vdb bs=4096 seek={first} conv=notrunc,fsync 2>/dev/null"
        ));
        for n in first..first + count {
            self.model[n * BLOCK..(n + 1) * BLOCK].copy_from_slice(&block_text(step, n));
        }
    }

    fn guest_zero(&mut self, first: usize, count: usize) {
        self.start();
        // Write-zeroes where the guest can ask for it, else a discard (the served disk
        // reads zeros where it discarded), else zeros written.
        let (off, len) = (first * BLOCK, count * BLOCK);
        let (code, how) = guest_sh(
            &self.vm_dir,
            &format!(
                "if blkdiscard -z -o {off} -l {len} /dev/vdb 2>/dev/null; then echo zeroed; \
                 elif blkdiscard -o {off} -l {len} /dev/vdb 2>/dev/null; then echo discarded; \
                 else dd if=/dev/zero of=/dev/vdb bs=4096 seek={first} count={count} conv=notrunc,fsync 2>/dev/null && echo written; fi; sync"
            ),
        );
        assert_eq!(code, 0, "{how}");
        self.log.push(format!("   ({})", how.trim()));
        self.model[first * BLOCK..(first + count) * BLOCK].fill(0);
    }

    fn offline_write(&mut self, step: usize, offset: usize, len: usize) {
        self.stop();
        let data: Vec<u8> = (0..len).map(|i| (step * 31 + i * 7 + 1) as u8).collect();
        self.cli.write_disk("g", 1, offset as u64, &data);
        self.model[offset..offset + len].copy_from_slice(&data);
    }

    fn backup(&mut self, full: bool, dir: &Path) {
        let mut args = vec!["backup", "create", "g", "--json"];
        if full {
            args.push("--full");
        }
        let p = self.cli.json(&args);
        let id = p["id"].as_str().unwrap().to_owned();
        let method = p["method"].as_str().unwrap().to_owned();
        self.log
            .push(format!("  -> point {} ({method})", &id[..12]));
        // Restored at once and compared with the disk at the point's instant.
        let out = dir.join("restored.raw");
        let _ = std::fs::remove_file(&out);
        self.cli.ok(&[
            "backup",
            "restore",
            &id,
            "--disk",
            "1",
            "--to",
            out.to_str().unwrap(),
        ]);
        let got = std::fs::read(&out).unwrap();
        if let Some(at) = first_difference(&got, &self.model) {
            panic!(
                "point {id} ({method}) differs from the disk at its instant at byte {at}: got {:?}, want {:?}\nsteps: {:#?}",
                &got[at..(at + 40).min(got.len())],
                &self.model[at..(at + 40).min(DISK)],
                self.log
            );
        }
        assert_eq!(got.len(), DISK);
        self.points.push((id, self.model.clone(), method));
    }
}

#[test]
fn every_point_restores_the_disk_as_it_was_whatever_happened_between() {
    let seed: u64 = std::env::var("SNAPVISOR_MODEL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap();
            (t.as_nanos() as u64 ^ u64::from(std::process::id()) << 20) % 1_000_000_000
        });
    let steps: usize = std::env::var("SNAPVISOR_MODEL_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(28);
    eprintln!("backup model: seed {seed} ({steps} steps; SNAPVISOR_MODEL_SEED={seed} replays it)");
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    // The data disk: imported after the guest's own, so that it is /dev/vdb.
    let blank = dir.path().join("data.raw");
    std::fs::File::create(&blank)
        .unwrap()
        .set_len(DISK as u64)
        .unwrap();
    let mut cli = setup_with(dir.path(), &["--import-disk", blank.to_str().unwrap()]);
    let repo = dir.path().join("repo");
    cli.env
        .push(("SNAPVISOR_REPO".into(), repo.to_str().unwrap().into()));
    cli.ok(&["backup", "init"]);
    let vm_dir = dir.path().join("store/g");
    let mut run = Run {
        cli,
        vm_dir,
        running: false,
        model: vec![0; DISK],
        checkpoints: BTreeMap::new(),
        points: Vec::new(),
        log: Vec::new(),
    };
    let blocks = DISK / BLOCK;
    // A first point, so that later ones have a base.
    run.guest_write(0, 0, 64);
    run.backup(false, dir.path());
    for step in 1..=steps {
        let pick = rng.random_range(0..100);
        let first = rng.random_range(0..blocks - 300);
        let count = rng.random_range(1..=256);
        let what = match pick {
            0..=29 => {
                run.guest_write(step, first, count);
                format!("guest write blocks {first}..{}", first + count)
            }
            30..=36 => {
                run.guest_zero(first, count);
                format!("guest zeroes blocks {first}..{}", first + count)
            }
            37..=42 => {
                let offset = rng.random_range(0..DISK - (1 << 20));
                let len = rng.random_range(1..(1 << 20));
                run.offline_write(step, offset, len);
                format!("offline write {len} bytes at {offset}")
            }
            43..=64 => {
                let full = rng.random_range(0..5) == 0;
                run.log.push(format!(
                    "{step}: backup{}",
                    if full { " --full" } else { "" }
                ));
                run.backup(full, dir.path());
                continue;
            }
            65..=71 => {
                let id = run.cli.json(&["checkpoint", "create", "g", "--json"])["id"]
                    .as_str()
                    .unwrap()
                    .to_owned();
                run.checkpoints.insert(id.clone(), run.model.clone());
                format!("checkpoint {} taken", &id[..8])
            }
            72..=77 if !run.checkpoints.is_empty() => {
                let i = rng.random_range(0..run.checkpoints.len());
                let (id, data) = run.checkpoints.iter().nth(i).unwrap();
                let (id, data) = (id.clone(), data.clone());
                run.stop();
                run.cli.ok(&["checkpoint", "apply", "g", &id]);
                run.model = data;
                format!("checkpoint {} applied", &id[..8])
            }
            78..=83 if !run.checkpoints.is_empty() => {
                let i = rng.random_range(0..run.checkpoints.len());
                let id = run.checkpoints.keys().nth(i).unwrap().clone();
                run.cli.ok(&["checkpoint", "delete", "g", &id]);
                run.checkpoints.remove(&id);
                format!("checkpoint {} deleted (merged)", &id[..8])
            }
            84..=91 => {
                if run.running {
                    run.stop();
                    "VM stopped".to_owned()
                } else {
                    run.start();
                    "VM started".to_owned()
                }
            }
            _ => {
                run.start();
                kill_worker(&run.cli);
                run.running = false;
                "worker killed".to_owned()
            }
        };
        run.log.push(format!("{step}: {what}"));
    }
    run.log.push("last: backup".to_owned());
    run.backup(false, dir.path());
    run.stop();
    // The disk itself, read offline, is the model too.
    let show = run.cli.json(&["vm", "show", "g", "--json"]);
    let file = show["disks"][1]["file"].as_str().unwrap();
    let now = support::read_disk(Path::new(file));
    assert!(
        first_difference(&now, &run.model).is_none(),
        "the disk differs from the model\nsteps: {:#?}",
        run.log
    );
    // Every point still restores, and verify is clean.
    for (id, data, method) in &run.points {
        let out = dir.path().join("again.raw");
        let _ = std::fs::remove_file(&out);
        run.cli.ok(&[
            "backup",
            "restore",
            id,
            "--disk",
            "1",
            "--to",
            out.to_str().unwrap(),
        ]);
        assert!(
            std::fs::read(&out).unwrap() == *data,
            "point {id} ({method}) restored differently at the end"
        );
    }
    let v = run.cli.json(&["backup", "verify", "--json"]);
    assert_eq!(v["clean"], true, "{v}");
    let methods: Vec<&str> = run.points.iter().map(|p| p.2.as_str()).collect();
    eprintln!(
        "backup model: {} points, methods {methods:?}",
        run.points.len()
    );
}
