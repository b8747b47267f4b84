//! `--only backup`: the backup repository against restic and borg, all three with
//! encryption on, on the same 4 GiB ext4 image with about 2.5 GiB of mixed data.
//!
//! The image is built reproducibly: a folder of generated incompressible files (seeded),
//! generated text, and the machine's own binaries (`/usr/lib/x86_64-linux-gnu` and
//! `/usr/bin`, in path order), turned into an ext4 image by `mkfs.ext4 -d`. Each side runs
//! as its own process (ours: this binary's hidden `backup-op` command, process start and
//! key derivation included), under `/usr/bin/time` for its peak memory, followed by `sync`,
//! so every side pays for writing its repository to the disk.
//!
//! The incremental changes 1% of the image (ten runs of about 4.1 MiB of new random data
//! at random 4 KiB-aligned offsets); ours is told the changed ranges, as change tracking
//! would tell it; restic and borg reread the whole image, as they must.
//!
//! With `SNAPVISOR_BENCH_TUNE=1`, one full backup and one incremental per chunk size and
//! zstd level follow (the measurements behind the defaults, `docs/repository-format.md`).

use crate::{GIB, MIB, Row, median, secs, sh};
use anyhow::{Context, Result, bail, ensure};
use backup::{
    EncryptionMode, FileFormat, InitOptions, KdfParams, Method, OpenOptions, PointWriter,
    Repository,
};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const PASSPHRASE: &str = "bench-passphrase";
const IMAGE_SIZE: u64 = 4 * GIB;

/// The hidden `backup-op` command: one repository operation as its own process.
///
/// `backup-op init REPO CHUNK_SIZE LEVEL`, `backup-op backup REPO IMAGE GROUP
/// full|express|incremental:RANGES_JSON`, `backup-op restore REPO GROUP OUT`,
/// `backup-op verify REPO`. Prints a JSON line of figures.
pub fn op(args: &[String]) -> Result<()> {
    let open = |repo: &str| {
        Repository::open(
            Path::new(repo),
            &OpenOptions {
                passphrase: Some(PASSPHRASE.as_bytes().to_vec()),
                key_file: None,
            },
        )
    };
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["init", repo, chunk_size, level] => {
            Repository::init(
                Path::new(repo),
                &InitOptions {
                    encryption: EncryptionMode::Repokey,
                    passphrase: Some(PASSPHRASE.as_bytes().to_vec()),
                    chunk_size: chunk_size.parse()?,
                    zstd_level: level.parse()?,
                    kdf: KdfParams::default(),
                    key_file: None,
                },
            )?;
        }
        ["backup", repo, image, group, method] => {
            let repo = open(repo)?;
            let src = disk::RawDisk::open(Path::new(image), false)?;
            let base = if method == "full" {
                None
            } else {
                let id = repo.resolve(&format!("{group}@latest"))?;
                Some(repo.load_point(&id)?)
            };
            let ranges: Vec<std::ops::Range<u64>>;
            let m = match (method, &base) {
                ("full", _) => Method::Full,
                ("express", Some(b)) => Method::ExpressFull { base: &b.disks[0] },
                (m, Some(b)) if m.starts_with("incremental:") => {
                    let pairs: Vec<(u64, u64)> =
                        serde_json::from_str(&fs::read_to_string(&m["incremental:".len()..])?)?;
                    ranges = pairs.into_iter().map(|(s, e)| s..e).collect();
                    Method::Incremental {
                        base: &b.disks[0],
                        changed: &ranges,
                    }
                }
                _ => bail!("unknown method {method}"),
            };
            let mut w = PointWriter::begin(&repo, group)?;
            let s = w.add_disk("disk0", &src, m, BTreeMap::new(), &|_, _| {})?;
            w.commit()?;
            println!(
                "{}",
                serde_json::json!({
                    "bytes_read": s.bytes_read, "bytes_stored": s.bytes_stored,
                    "chunks_new": s.chunks_new, "chunks_reused": s.chunks_reused,
                })
            );
        }
        ["restore", repo, group, out] => {
            let repo = open(repo)?;
            let p = repo.load_point(&repo.resolve(&format!("{group}@latest"))?)?;
            backup::restore_to_file(&repo, &p, 0, Path::new(out), FileFormat::Raw, &|_, _| {})?;
        }
        ["build-image", dir] => {
            println!("{}", build_image(Path::new(dir))?.display());
        }
        ["verify", repo] => {
            let r = backup::verify(&open(repo)?, None, &|_, _| {})?;
            ensure!(r.is_clean(), "verify found damage: {:?}", r.damaged);
        }
        _ => bail!("usage: backup-op init|backup|restore|verify ..."),
    }
    Ok(())
}

/// One timed command: wall time and peak memory of the whole process.
struct Measured {
    time: Duration,
    /// User plus system CPU time of the whole process.
    cpu: Duration,
    peak_kib: u64,
    stdout: String,
}

/// Runs `cmd` under `/usr/bin/time`, then `sync`; the time includes the sync.
fn measure(cmd: &str, env: &[(&str, &str)]) -> Result<Measured> {
    let peak = std::env::temp_dir().join(format!("bench-peak-{}", std::process::id()));
    let t = Instant::now();
    let out = Command::new("/usr/bin/time")
        .arg("-f")
        .arg("%M %U %S")
        .arg("-o")
        .arg(&peak)
        .arg("sh")
        .arg("-c")
        .arg(cmd)
        .envs(env.iter().copied())
        .output()?;
    ensure!(
        out.status.success(),
        "`{cmd}` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    sh("sync")?;
    let time = t.elapsed();
    let report = fs::read_to_string(&peak)?;
    let fields: Vec<&str> = report
        .lines()
        .last()
        .context("no peak memory")?
        .split_whitespace()
        .collect();
    ensure!(
        fields.len() == 3,
        "unexpected /usr/bin/time output {report:?}"
    );
    let peak_kib = fields[0].parse()?;
    let cpu = Duration::from_secs_f64(fields[1].parse::<f64>()? + fields[2].parse::<f64>()?);
    let _ = fs::remove_file(&peak);
    Ok(Measured {
        time,
        cpu,
        peak_kib,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
    })
}

fn du(path: &Path) -> Result<u64> {
    Ok(sh(&format!("du -sb {}", path.display()))?
        .split_whitespace()
        .next()
        .context("du")?
        .parse()?)
}

fn gb(b: u64) -> String {
    format!("{:.2} GB", b as f64 / 1e9)
}

fn mib_s(bytes: u64, d: Duration) -> String {
    format!("{:.0} MiB/s", bytes as f64 / MIB as f64 / d.as_secs_f64())
}

/// Builds the 4 GiB ext4 image of mixed data (about 2.5 GiB of files).
fn build_image(dir: &Path) -> Result<PathBuf> {
    let image = dir.join("backup-base.img");
    if image.exists() {
        return Ok(image);
    }
    let src = dir.join("backup-src");
    let _ = fs::remove_dir_all(&src);
    fs::create_dir_all(src.join("random"))?;
    fs::create_dir_all(src.join("text"))?;
    fs::create_dir_all(src.join("bin"))?;
    let mut rng = StdRng::seed_from_u64(42);
    // 1 GiB of incompressible files, 1-48 MiB each.
    let mut left = GIB;
    let mut n = 0;
    while left > 0 {
        let len = (rng.random_range(1..=48) * MIB).min(left);
        let mut buf = vec![0u8; len as usize];
        rng.fill_bytes(&mut buf);
        fs::write(src.join(format!("random/r{n:04}.bin")), &buf)?;
        left -= len;
        n += 1;
    }
    // 800 MiB of text: log-like lines from a vocabulary of generated words.
    let vocab: Vec<String> = (0..4000)
        .map(|_| {
            let len = rng.random_range(2..10);
            (0..len)
                .map(|_| (b'a' + rng.random_range(0..26u8)) as char)
                .collect()
        })
        .collect();
    let mut left = 800 * MIB;
    let mut n = 0;
    while left > 0 {
        let len = (rng.random_range(1..=16) * MIB).min(left);
        let mut f =
            std::io::BufWriter::new(fs::File::create(src.join(format!("text/t{n:04}.log")))?);
        let mut written = 0u64;
        while written < len {
            let line = format!(
                "2026-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z {} [{}] {} {} {} id={} took {} ms\n",
                rng.random_range(1..13),
                rng.random_range(1..29),
                rng.random_range(0..24),
                rng.random_range(0..60),
                rng.random_range(0..60),
                rng.random_range(0..1000),
                ["INFO", "WARN", "DEBUG", "ERROR"][rng.random_range(0..4)],
                vocab[rng.random_range(0..64)],
                vocab[rng.random_range(0..vocab.len())],
                vocab[rng.random_range(0..vocab.len())],
                vocab[rng.random_range(0..vocab.len())],
                rng.random_range(0..1_000_000u32),
                rng.random_range(0..5000),
            );
            f.write_all(line.as_bytes())?;
            written += line.len() as u64;
        }
        f.flush()?;
        left -= len;
        n += 1;
    }
    // 700 MiB of the machine's binaries, in path order.
    let mut files = Vec::new();
    for root in ["/usr/lib/x86_64-linux-gnu", "/usr/bin"] {
        collect_files(Path::new(root), &mut files);
    }
    files.sort();
    let mut left = 700 * MIB;
    let mut n = 0;
    'outer: for round in 0u8.. {
        for f in &files {
            let Ok(mut data) = fs::read(f) else { continue };
            if data.is_empty() {
                continue;
            }
            // A second round (a machine with fewer binaries) changes every byte the same way,
            // keeping the data's structure but not its duplicates.
            if round > 0 {
                data.iter_mut().for_each(|b| *b ^= round);
            }
            data.truncate(left as usize);
            fs::write(src.join(format!("bin/b{n:05}")), &data)?;
            left -= data.len() as u64;
            n += 1;
            if left == 0 {
                break 'outer;
            }
        }
        ensure!(round < 8, "not enough binaries on this machine");
    }
    let tmp = dir.join("backup-base.img.tmp");
    let _ = fs::remove_file(&tmp);
    sh(&format!(
        "mkfs.ext4 -q -F -b 4096 -E root_owner=0:0,lazy_itable_init=0 -U 4ff6c1a0-0000-4000-8000-000000000001 -d {} {} {}K",
        src.display(),
        tmp.display(),
        IMAGE_SIZE >> 10
    ))?;
    fs::rename(&tmp, &image)?;
    fs::remove_dir_all(&src)?;
    Ok(image)
}

/// Copies an image keeping its holes (as a VM's disk image has them).
fn copy_sparse(from: &Path, to: &Path) -> Result<()> {
    let _ = fs::remove_file(to);
    sh(&format!(
        "cp --sparse=always {} {}",
        from.display(),
        to.display()
    ))?;
    Ok(())
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let Ok(t) = e.file_type() else { continue };
        if t.is_dir() {
            collect_files(&e.path(), out);
        } else if t.is_file() {
            out.push(e.path());
        }
    }
}

/// Changes 1% of the image: ten runs of ~4.1 MiB of random data. Returns the ranges.
fn change_one_percent(image: &Path, seed: u64) -> Result<Vec<(u64, u64)>> {
    let f = fs::OpenOptions::new().write(true).open(image)?;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut ranges = Vec::new();
    for _ in 0..10 {
        let len = 4 * MIB + rng.random_range(0..64) * 4096;
        let off = rng.random_range(0..(IMAGE_SIZE - len) / 4096) * 4096;
        let mut buf = vec![0u8; len as usize];
        rng.fill_bytes(&mut buf);
        f.write_all_at(&buf, off)?;
        ranges.push((off, off + len));
    }
    f.sync_all()?;
    Ok(ranges)
}

struct Sides {
    ours: PathBuf,
    restic: PathBuf,
    borg: PathBuf,
}

fn env(o: &Path) -> Vec<(&'static str, String)> {
    vec![
        ("SNAPVISOR_PASSPHRASE", PASSPHRASE.into()),
        ("RESTIC_PASSWORD", PASSPHRASE.into()),
        ("BORG_PASSPHRASE", PASSPHRASE.into()),
        (
            "RESTIC_CACHE_DIR",
            o.join("restic-cache").display().to_string(),
        ),
        ("BORG_BASE_DIR", o.join("borg-base").display().to_string()),
        ("BORG_RELOCATED_REPO_ACCESS_IS_OK", "yes".into()),
    ]
}

/// Runs the backup benchmark.
pub fn bench(dir: &Path, runs: usize) -> Result<Vec<Row>> {
    for tool in ["restic", "borg", "mkfs.ext4"] {
        ensure!(
            sh(&format!("command -v {tool}")).is_ok(),
            "{tool} is missing: scripts/bench.sh installs it"
        );
    }
    let o = dir.join("backup");
    fs::create_dir_all(&o)?;
    eprintln!("backup: building the 4 GiB ext4 image of mixed data");
    let base_image = build_image(dir)?;
    let image = o.join("disk.img");
    let me = std::env::current_exe()?;
    let me = me.display();
    let env_owned = env(&o);
    let envs: Vec<(&str, &str)> = env_owned.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let run = |cmd: &str| measure(cmd, &envs);
    let sides = Sides {
        ours: o.join("repo-ours"),
        restic: o.join("repo-restic"),
        borg: o.join("repo-borg"),
    };
    let (ours_r, restic_r, borg_r) = (
        sides.ours.display().to_string(),
        sides.restic.display().to_string(),
        sides.borg.display().to_string(),
    );
    let img = image.display().to_string();
    let init_all = |chunk_size: u64, level: i32| -> Result<()> {
        for p in [&sides.ours, &sides.restic, &sides.borg] {
            let _ = fs::remove_dir_all(p);
        }
        let _ = fs::remove_dir_all(o.join("restic-cache"));
        let _ = fs::remove_dir_all(o.join("borg-base"));
        run(&format!(
            "{me} backup-op init {ours_r} {chunk_size} {level}"
        ))?;
        run(&format!("restic init -q --repo {restic_r}"))?;
        run(&format!("borg init -e repokey {borg_r}"))?;
        Ok(())
    };
    let ours_full = format!("{me} backup-op backup {ours_r} {img} vm full");
    let restic_backup = format!(
        "cd {} && restic -q -r {restic_r} backup disk.img",
        o.display()
    );
    let borg_create = |name: &str| {
        format!(
            "cd {} && borg create --chunker-params fixed,4194304 --compression zstd,3 {borg_r}::{name} disk.img",
            o.display()
        )
    };

    let mut t: BTreeMap<&str, Vec<Duration>> = BTreeMap::new();
    let mut cpu: BTreeMap<&str, Vec<Duration>> = BTreeMap::new();
    let mut peak: BTreeMap<&str, u64> = BTreeMap::new();
    let mut sizes: BTreeMap<&str, u64> = BTreeMap::new();
    let mut ours_incr_read = 0u64;
    let mut ours_express_stored = 0u64;
    let mut clone_growth = (0u64, 0u64, 0u64);
    let mut rec = |name: &'static str, m: &Measured, t: &mut BTreeMap<&str, Vec<Duration>>| {
        t.entry(name).or_default().push(m.time);
        cpu.entry(name).or_default().push(m.cpu);
        let p = peak.entry(name).or_default();
        *p = (*p).max(m.peak_kib);
    };
    for r in 0..runs {
        eprintln!("backup: run {}/{runs}", r + 1);
        copy_sparse(&base_image, &image)?;
        sh(&format!("cat {img} > /dev/null"))?;
        init_all(4 * MIB, 2)?;
        // Full backups, turn by turn.
        let full: [(&'static str, String); 3] = [
            ("ours full", ours_full.clone()),
            ("restic full", restic_backup.clone()),
            ("borg full", borg_create("a1")),
        ];
        for k in 0..3 {
            let (name, cmd) = &full[(r + k) % 3];
            sh("sync")?;
            let m = run(cmd)?;
            rec(name, &m, &mut t);
        }
        sizes.insert("ours", du(&sides.ours)?);
        sizes.insert("restic", du(&sides.restic)?);
        sizes.insert("borg", du(&sides.borg)?);
        // Reading the image once, for the express full's target.
        let m = run(&format!("cat {img} > /dev/null"))?;
        rec("read once", &m, &mut t);

        // 1% changed: ours incremental, then restic and borg (which reread everything).
        let ranges = change_one_percent(&image, 1000 + r as u64)?;
        let ranges_file = o.join("ranges.json");
        fs::write(&ranges_file, serde_json::to_vec(&ranges)?)?;
        let m = run(&format!(
            "{me} backup-op backup {ours_r} {img} vm incremental:{}",
            ranges_file.display()
        ))?;
        let v: serde_json::Value = serde_json::from_str(m.stdout.trim())?;
        ours_incr_read = v["bytes_read"].as_u64().unwrap_or(0);
        rec("ours incremental", &m, &mut t);
        let m = run(&restic_backup)?;
        rec("restic incremental", &m, &mut t);
        let m = run(&borg_create("a2"))?;
        rec("borg incremental", &m, &mut t);
        // Another 1% changed: express full (no change tracking).
        change_one_percent(&image, 2000 + r as u64)?;
        let m = run(&format!("{me} backup-op backup {ours_r} {img} vm express"))?;
        let v: serde_json::Value = serde_json::from_str(m.stdout.trim())?;
        ours_express_stored = v["bytes_stored"].as_u64().unwrap_or(0);
        rec("ours express", &m, &mut t);

        // Every repository warm in the page cache, as the image is: ours was written with
        // O_DIRECT and would otherwise be read from the device while the peers' are cached.
        for p in [&sides.ours, &sides.restic, &sides.borg] {
            sh(&format!(
                "find {} -type f -exec cat {{}} + > /dev/null",
                p.display()
            ))?;
        }
        // Restore the latest point, turn by turn.
        let outs = [
            o.join("restore-ours.img"),
            o.join("restore-restic"),
            o.join("restore-borg"),
        ];
        for p in &outs {
            let _ = fs::remove_file(p);
            let _ = fs::remove_dir_all(p);
        }
        fs::create_dir_all(&outs[1])?;
        fs::create_dir_all(&outs[2])?;
        let restores: [(&'static str, String); 3] = [
            (
                "ours restore",
                format!("{me} backup-op restore {ours_r} vm {}", outs[0].display()),
            ),
            (
                "restic restore",
                format!(
                    "restic -q -r {restic_r} restore latest --target {}",
                    outs[1].display()
                ),
            ),
            (
                "borg restore",
                format!("cd {} && borg extract {borg_r}::a2", outs[2].display()),
            ),
        ];
        for k in 0..3 {
            let (name, cmd) = &restores[(r + k) % 3];
            sh("sync")?;
            let m = run(cmd)?;
            rec(name, &m, &mut t);
        }
        // Ours restores the express-full point; restic's and borg's latest is the
        // incremental one: compare each with what it should be.
        sh(&format!("cmp {} {img}", outs[0].display()))?;
        for p in &outs {
            let _ = fs::remove_file(p);
            let _ = fs::remove_dir_all(p);
        }
        // Verify every chunk.
        let verifies: [(&'static str, String); 2] = [
            ("ours verify", format!("{me} backup-op verify {ours_r}")),
            (
                "restic check",
                format!("restic -q -r {restic_r} check --read-data"),
            ),
        ];
        for k in 0..2 {
            let (name, cmd) = &verifies[(r + k) % 2];
            let m = run(cmd)?;
            rec(name, &m, &mut t);
        }
        // A clone of the same base: the base image with 0.1% of its own changes.
        if r == 0 {
            let before = du(&sides.ours)?;
            let borg_before = du(&sides.borg)?;
            let clone = o.join("clone.img");
            copy_sparse(&base_image, &clone)?;
            {
                let f = fs::OpenOptions::new().write(true).open(&clone)?;
                let mut rng = StdRng::seed_from_u64(7);
                for _ in 0..40 {
                    let off = rng.random_range(0..IMAGE_SIZE / 4096) * 4096;
                    let mut b = vec![0u8; 4096];
                    rng.fill_bytes(&mut b);
                    f.write_all_at(&b, off)?;
                }
            }
            run(&format!(
                "{me} backup-op backup {ours_r} {} clone full",
                clone.display()
            ))?;
            run(&format!(
                "cd {} && borg create --chunker-params fixed,4194304 --compression zstd,3 {borg_r}::clone clone.img",
                o.display()
            ))?;
            clone_growth = (
                du(&sides.ours)? - before,
                sizes["ours"],
                du(&sides.borg)? - borg_before,
            );
            fs::remove_file(&clone)?;
        }
    }
    // The tuning rows (one run per chunk size and level) on request: they add five full
    // backups to the run.
    let tuning = if std::env::var("SNAPVISOR_BENCH_TUNE").is_ok_and(|v| v == "1") {
        tune(&o, &base_image, &envs, &me.to_string())?
    } else {
        Vec::new()
    };
    for p in [&sides.ours, &sides.restic, &sides.borg] {
        let _ = fs::remove_dir_all(p);
    }
    let _ = fs::remove_file(&image);

    let m = |k: &str| median(t[k].clone());
    let c = |k: &str| format!("{:.1}", median(cpu[k].clone()).as_secs_f64());
    let (full, rfull, bfull) = (m("ours full"), m("restic full"), m("borg full"));
    let data = IMAGE_SIZE;
    let mut rows = vec![Row {
        name: "full backup of a 4 GiB ext4 image, 2.5 GiB mixed data (encrypted, synced)".into(),
        ours: format!(
            "{} ({}; CPU {} s)",
            secs(full),
            mib_s(data, full),
            c("ours full")
        ),
        peer: format!(
            "restic {} (CPU {} s); borg zstd,3 {} (CPU {} s)",
            secs(rfull),
            c("restic full"),
            secs(bfull),
            c("borg full")
        ),
        ratio: format!(
            "{:.2}x restic's throughput; {:.2}x borg's",
            rfull.as_secs_f64() / full.as_secs_f64(),
            bfull.as_secs_f64() / full.as_secs_f64()
        ),
        target: ">= 2x both".into(),
        met: rfull.as_secs_f64() / full.as_secs_f64() >= 2.0
            && bfull.as_secs_f64() / full.as_secs_f64() >= 2.0,
    }];
    let (inc, rinc, binc) = (
        m("ours incremental"),
        m("restic incremental"),
        m("borg incremental"),
    );
    let read_share = ours_incr_read as f64 / data as f64;
    let time_share = inc.as_secs_f64() / full.as_secs_f64();
    rows.push(Row {
        name: "incremental after 1% of the disk changed".into(),
        ours: format!(
            "{} (read {:.2}% of the disk)",
            secs(inc),
            read_share * 100.0
        ),
        peer: format!(
            "restic {}; borg {} (both reread the whole image)",
            secs(rinc),
            secs(binc)
        ),
        ratio: format!("{:.1}% of our full's time", time_share * 100.0),
        target: "reads <= 2% of the disk, <= 10% of the full's time".into(),
        met: read_share <= 0.02 && time_share <= 0.10,
    });
    let (exp, once) = (m("ours express"), m("read once"));
    rows.push(Row {
        name: "express full after 1% changed (no tracking: read, hash, compare)".into(),
        ours: format!("{} (stored {})", secs(exp), gb(ours_express_stored)),
        peer: format!("reading the image once (cat > /dev/null): {}", secs(once)),
        ratio: format!("{:.2}x the read", exp.as_secs_f64() / once.as_secs_f64()),
        target: "no slower than reading the disk once".into(),
        met: exp <= once,
    });
    let (res, rres, bres) = (m("ours restore"), m("restic restore"), m("borg restore"));
    rows.push(Row {
        name: "restore the latest point to a new raw file (synced)".into(),
        ours: format!(
            "{} ({}; CPU {} s)",
            secs(res),
            mib_s(data, res),
            c("ours restore")
        ),
        peer: format!(
            "restic {} (CPU {} s); borg {} (CPU {} s)",
            secs(rres),
            c("restic restore"),
            secs(bres),
            c("borg restore")
        ),
        ratio: format!(
            "{:.2}x restic's speed; {:.2}x borg's",
            rres.as_secs_f64() / res.as_secs_f64(),
            bres.as_secs_f64() / res.as_secs_f64()
        ),
        target: ">= 2x restic".into(),
        met: rres.as_secs_f64() / res.as_secs_f64() >= 2.0,
    });
    let (ver, rver) = (m("ours verify"), m("restic check"));
    rows.push(Row {
        name: "verify every chunk (3 points)".into(),
        ours: format!("{} (CPU {} s)", secs(ver), c("ours verify")),
        peer: format!(
            "restic check --read-data {} (CPU {} s)",
            secs(rver),
            c("restic check")
        ),
        ratio: format!(
            "{:.2}x restic's speed",
            rver.as_secs_f64() / ver.as_secs_f64()
        ),
        target: ">= 2x restic check --read-data".into(),
        met: rver.as_secs_f64() / ver.as_secs_f64() >= 2.0,
    });
    let (so, sr, sb) = (sizes["ours"], sizes["restic"], sizes["borg"]);
    rows.push(Row {
        name: "repository size after the full backup".into(),
        ours: gb(so),
        peer: format!("restic {}; borg zstd,3 {}", gb(sr), gb(sb)),
        ratio: format!("{:.3}x borg's", so as f64 / sb as f64),
        target: "within 5% of borg's".into(),
        met: (so as f64 / sb as f64) <= 1.05,
    });
    let (grow, first, bgrow) = clone_growth;
    rows.push(Row {
        name: "a second image cloned from the same base (40 blocks changed)".into(),
        ours: format!("+{:.1} MB", grow as f64 / 1e6),
        peer: format!("borg +{:.1} MB", bgrow as f64 / 1e6),
        ratio: format!("{:.2}% of the first", grow as f64 * 100.0 / first as f64),
        target: "< 5%".into(),
        met: (grow as f64 / first as f64) < 0.05,
    });
    let (po, pr, pb) = (peak["ours full"], peak["restic full"], peak["borg full"]);
    rows.push(Row {
        name: "peak memory of the full backup (whole process)".into(),
        ours: format!("{} MiB", po / 1024),
        peer: format!("restic {} MiB; borg {} MiB", pr / 1024, pb / 1024),
        ratio: format!("{:.2}x restic's", po as f64 / pr as f64),
        target: "<= restic's".into(),
        met: po <= pr,
    });
    let po = [
        "ours incremental",
        "ours restore",
        "ours verify",
        "ours express",
    ]
    .iter()
    .map(|k| format!("{} {} MiB", k.trim_start_matches("ours "), peak[k] / 1024))
    .collect::<Vec<_>>()
    .join(", ");
    let pr = ["restic restore", "restic check", "borg restore"]
        .iter()
        .map(|k| format!("{k} {} MiB", peak[k] / 1024))
        .collect::<Vec<_>>()
        .join(", ");
    rows.push(Row {
        name: "peak memory of the other operations".into(),
        ours: po,
        peer: pr,
        ratio: "-".into(),
        target: "-".into(),
        met: true,
    });
    rows.extend(tuning);
    Ok(rows)
}

/// One full backup and one incremental per chunk size and zstd level, for the choice of
/// the defaults (single runs; the table above has the medians).
fn tune(o: &Path, base_image: &Path, envs: &[(&str, &str)], me: &str) -> Result<Vec<Row>> {
    let image = o.join("tune.img");
    let repo = o.join("repo-tune");
    let mut rows = Vec::new();
    for (cs, level) in [
        (4 * MIB, 1),
        (4 * MIB, 2),
        (4 * MIB, 3),
        (MIB, 2),
        (512 << 10, 2),
    ] {
        eprintln!("backup: tuning, chunk size {} KiB, zstd {level}", cs >> 10);
        copy_sparse(base_image, &image)?;
        sh(&format!("cat {} > /dev/null", image.display()))?;
        let _ = fs::remove_dir_all(&repo);
        let (r, i) = (repo.display(), image.display());
        measure(&format!("{me} backup-op init {r} {cs} {level}"), envs)?;
        let full = measure(&format!("{me} backup-op backup {r} {i} vm full"), envs)?;
        let size = du(&repo)?;
        let ranges = change_one_percent(&image, 1000)?;
        let rf = o.join("tune-ranges.json");
        fs::write(&rf, serde_json::to_vec(&ranges)?)?;
        let inc = measure(
            &format!(
                "{me} backup-op backup {r} {i} vm incremental:{}",
                rf.display()
            ),
            envs,
        )?;
        let v: serde_json::Value = serde_json::from_str(inc.stdout.trim())?;
        let read = v["bytes_read"].as_u64().unwrap_or(0);
        let stored = v["bytes_stored"].as_u64().unwrap_or(0);
        rows.push(Row {
            name: format!("tuning: {} KiB chunks, zstd {level}", cs >> 10),
            ours: format!(
                "full {} (peak {} MiB), repo {}",
                secs(full.time),
                full.peak_kib / 1024,
                gb(size)
            ),
            peer: format!(
                "incremental {}: read {:.2}%, stored {:.0} MB",
                secs(inc.time),
                read as f64 * 100.0 / IMAGE_SIZE as f64,
                stored as f64 / 1e6
            ),
            ratio: "-".into(),
            target: "-".into(),
            met: true,
        });
    }
    let _ = fs::remove_dir_all(&repo);
    let _ = fs::remove_file(&image);
    Ok(rows)
}
