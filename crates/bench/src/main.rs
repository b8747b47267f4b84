//! `snapvisor-bench`: the disk engine's figures, each measured against its peer in the same
//! run, printed as the Markdown table kept in `docs/benchmarks.md`.
//!
//! Every figure is the median of several runs on files warm in the page cache; every
//! command that writes a file ends with that file synced (ours, `cp`, `qemu-img` alike), so
//! all sides pay for durability equally.
//!
//! Usage: `snapvisor-bench [--dir DIR] [--runs N] [--only NAME]...` where NAME is one of
//! `create-child`, `scale`, `seq-write`, `convert`, `random-read`, `merge`, `checkpoints`, `nbd`,
//! `vm`, `live`, `live-merge`, `backup` (the backup repository against restic and borg, in
//! `backup_bench.rs`).
//!
//! The checkpoint figures run the `snapvisor` binary as a user does (process start
//! included) on a store under `--dir`.

mod scale;

use anyhow::{Context, Result, bail, ensure};
use disk::{Disk, VhdxDisk};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use vhdx::{Chain, CreateParams};

mod backup_bench;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

struct Opts {
    dir: PathBuf,
    runs: usize,
    only: Vec<String>,
}

struct Row {
    name: String,
    ours: String,
    peer: String,
    ratio: String,
    target: String,
    met: bool,
}

fn main() -> Result<()> {
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("backup-op") {
        return backup_bench::op(&argv[2..]);
    }
    let mut args = std::env::args().skip(1);
    let mut opts = Opts {
        dir: PathBuf::from("target/bench-data"),
        runs: 3,
        only: Vec::new(),
    };
    while let Some(a) = args.next() {
        match a.as_str() {
            "--dir" => opts.dir = PathBuf::from(args.next().context("--dir needs a value")?),
            "--runs" => opts.runs = args.next().context("--runs needs a value")?.parse()?,
            "--only" => opts.only.push(args.next().context("--only needs a value")?),
            other => bail!("unknown argument {other}"),
        }
    }
    fs::create_dir_all(&opts.dir)?;
    opts.dir = std::path::absolute(&opts.dir)?;
    let want = |n: &str| opts.only.is_empty() || opts.only.iter().any(|o| o == n);
    let mut rows = Vec::new();
    if want("create-child") {
        rows.extend(bench_create_child(&opts)?);
    }
    if want("scale") {
        rows.extend(scale::bench_scale(&opts)?);
    }
    if want("seq-write") {
        rows.extend(bench_seq_write(&opts)?);
    }
    if want("convert") {
        rows.extend(bench_convert(&opts)?);
    }
    if want("random-read") {
        rows.extend(bench_random_read(&opts)?);
    }
    if want("merge") {
        rows.extend(bench_merge(&opts)?);
    }
    if want("checkpoints") {
        rows.extend(bench_checkpoints(&opts)?);
    }
    if want("nbd") {
        rows.extend(bench_nbd(&opts)?);
    }
    if want("vm") {
        rows.extend(bench_vm(&opts)?);
    }
    if want("live") {
        rows.extend(bench_live(&opts)?);
    }
    if want("live-merge") {
        rows.extend(bench_live_merge(&opts)?);
    }
    if want("backup-live") {
        rows.extend(bench_backup_live(&opts)?);
    }
    if want("backup") {
        rows.extend(backup_bench::bench(&opts.dir, opts.runs)?);
    }
    println!();
    println!("| benchmark | snapvisor | peer | ratio | target | met |");
    println!("|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            r.name,
            r.ours,
            r.peer,
            r.ratio,
            r.target,
            if r.met { "yes" } else { "**no**" }
        );
    }
    let _ = fs::remove_dir_all(&opts.dir);
    Ok(())
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn timed(f: impl FnOnce() -> Result<()>) -> Result<Duration> {
    let t = Instant::now();
    f()?;
    Ok(t.elapsed())
}

/// Times each command once per run, rotating which goes first and writing back the page
/// cache (`sync`) before every timed command, so that no command pays for write-back or
/// discards left by another. Returns each command's median.
fn rotate(
    runs: usize,
    mut setup: impl FnMut() -> Result<()>,
    cmds: &mut [&mut dyn FnMut() -> Result<()>],
) -> Result<Vec<Duration>> {
    let mut times = vec![Vec::new(); cmds.len()];
    for run in 0..runs {
        setup()?;
        for k in 0..cmds.len() {
            let i = (run + k) % cmds.len();
            sh("sync")?;
            times[i].push(timed(&mut *cmds[i])?);
        }
    }
    Ok(times.into_iter().map(median).collect())
}

fn sh(cmd: &str) -> Result<String> {
    let out = Command::new("sh").arg("-c").arg(cmd).output()?;
    ensure!(
        out.status.success(),
        "`{cmd}` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn snapvisor_bin() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let bin = exe.with_file_name("snapvisor");
    ensure!(
        bin.exists(),
        "{} not found: build it first (cargo build --release -p snapvisor)",
        bin.display()
    );
    Ok(bin)
}

fn rm(paths: &[&Path]) {
    for p in paths {
        let _ = fs::remove_file(p);
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}
fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}
fn mbps(bytes: u64, d: Duration) -> String {
    format!("{:.0} MiB/s", bytes as f64 / MIB as f64 / d.as_secs_f64())
}

fn random_buf(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

/// Creating a child of a 1 TiB parent.
fn bench_create_child(o: &Opts) -> Result<Vec<Row>> {
    eprintln!("create-child: child of a 1 TiB parent");
    let parent = o.dir.join("tib.vhdx");
    rm(&[&parent]);
    vhdx::create(&parent, &CreateParams::dynamic(1 << 40))?;
    let mut times = Vec::new();
    for i in 0..11 {
        let child = o.dir.join(format!("tib-{i}.avhdx"));
        rm(&[&child]);
        times.push(timed(|| {
            vhdx::create_differencing(&child, &parent, None)?;
            Ok(())
        })?);
        rm(&[&child]);
    }
    let qcow = o.dir.join("tib.qcow2");
    let qchild = o.dir.join("tib-child.qcow2");
    rm(&[&qcow, &qchild]);
    sh(&format!(
        "qemu-img create -q -f qcow2 {} 1T",
        qcow.display()
    ))?;
    let mut peer = Vec::new();
    for _ in 0..5 {
        rm(&[&qchild]);
        peer.push(timed(|| {
            sh(&format!(
                "qemu-img create -q -f qcow2 -b {} -F qcow2 {} && sync {}",
                qcow.display(),
                qchild.display(),
                qchild.display()
            ))
            .map(|_| ())
        })?);
    }
    rm(&[&parent, &qcow, &qchild]);
    let m = median(times);
    let p = median(peer);
    Ok(vec![Row {
        name: "create a child of a 1 TiB parent (synced)".into(),
        ours: ms(m),
        peer: format!("{} (qemu-img create -b, qcow2, incl. process start)", ms(p)),
        ratio: "-".into(),
        target: "< 20 ms".into(),
        met: m < Duration::from_millis(20),
    }])
}

/// Sequential 1 MiB writes into a new dynamic VHDX versus a raw file, then flush.
fn bench_seq_write(o: &Opts) -> Result<Vec<Row>> {
    let size = 2 * GIB;
    eprintln!("seq-write: {} GiB in 1 MiB writes", size / GIB);
    let data = random_buf(MIB as usize, 1);
    let vpath = o.dir.join("seq.vhdx");
    let rpath = o.dir.join("seq.raw");
    let mut ours = Vec::new();
    let mut raw = Vec::new();
    for _ in 0..o.runs {
        rm(&[&vpath, &rpath]);
        ours.push(timed(|| {
            vhdx::create(&vpath, &CreateParams::dynamic(size))?;
            let chain = Chain::open(&vpath, true)?;
            for i in 0..size / MIB {
                chain.write_at(&data, i * MIB)?;
            }
            chain.flush()?;
            chain.close()?;
            Ok(())
        })?);
        raw.push(timed(|| {
            let f = OpenOptions::new()
                .create_new(true)
                .write(true)
                .open(&rpath)?;
            for i in 0..size / MIB {
                f.write_all_at(&data, i * MIB)?;
            }
            f.sync_all()?;
            Ok(())
        })?);
        rm(&[&vpath, &rpath]);
    }
    let (m, p) = (median(ours), median(raw));
    let ratio = p.as_secs_f64() / m.as_secs_f64();
    Ok(vec![Row {
        name: "sequential writes into a new dynamic disk (2 GiB, 1 MiB writes, flushed)".into(),
        ours: mbps(size, m),
        peer: format!("{} (raw file, pwrite + fsync)", mbps(size, p)),
        ratio: format!("{ratio:.2}x of raw"),
        target: ">= 0.70x of raw".into(),
        met: ratio >= 0.70,
    }])
}

/// raw -> VHDX and VHDX -> raw of a 2 GiB image, half data and half zeros.
fn bench_convert(o: &Opts) -> Result<Vec<Row>> {
    eprintln!("convert: 2 GiB image, half data, half zeros");
    let bin = snapvisor_bin()?;
    let src = o.dir.join("conv-src.raw");
    rm(&[&src]);
    {
        let f = OpenOptions::new().create_new(true).write(true).open(&src)?;
        let data = random_buf(64 * MIB as usize, 2);
        let zeros = vec![0u8; 64 * MIB as usize];
        // Alternating 64 MiB of data and 64 MiB of zeros, written out (not sparse).
        for i in 0..32u64 {
            let buf = if i % 2 == 0 { &data } else { &zeros };
            f.write_all_at(buf, i * 64 * MIB)?;
        }
        f.sync_all()?;
    }
    let size = 2 * GIB;
    let ours_vhdx = o.dir.join("conv-ours.vhdx");
    let q_vhdx = o.dir.join("conv-qemu.vhdx");
    let cp_out = o.dir.join("conv-cp.raw");
    let ours_raw = o.dir.join("conv-ours.raw");
    let q_raw = o.dir.join("conv-qemu.raw");
    let s = src.display();
    // The VHDX -> raw direction reads a file made by our own raw -> VHDX conversion.
    sh(&format!(
        "{} disk convert {s} {} --format vhdx",
        bin.display(),
        ours_vhdx.display()
    ))?;
    let times = rotate(
        o.runs,
        || {
            rm(&[&q_vhdx, &cp_out, &ours_raw, &q_raw]);
            rm(&[&o.dir.join("conv-ours2.vhdx")]);
            Ok(())
        },
        &mut [
            &mut || {
                sh(&format!(
                    "{} disk convert {s} {} --format vhdx",
                    bin.display(),
                    o.dir.join("conv-ours2.vhdx").display()
                ))
                .map(|_| ())
            },
            &mut || {
                sh(&format!(
                    "qemu-img convert -f raw -O vhdx {s} {q} && sync {q}",
                    q = q_vhdx.display()
                ))
                .map(|_| ())
            },
            &mut || sh(&format!("cp {s} {c} && sync {c}", c = cp_out.display())).map(|_| ()),
            &mut || {
                sh(&format!(
                    "{} disk convert {} {} --format raw",
                    bin.display(),
                    ours_vhdx.display(),
                    ours_raw.display()
                ))
                .map(|_| ())
            },
            &mut || {
                sh(&format!(
                    "qemu-img convert -f vhdx -O raw {} {q} && sync {q}",
                    ours_vhdx.display(),
                    q = q_raw.display()
                ))
                .map(|_| ())
            },
        ],
    )?;
    // Both directions must round-trip exactly.
    sh(&format!(
        "cmp {s} {} && qemu-img compare -q -f raw -F vhdx {s} {}",
        ours_raw.display(),
        o.dir.join("conv-ours2.vhdx").display()
    ))?;
    rm(&[&o.dir.join("conv-ours2.vhdx")]);
    let (to_v, to_v_q, cp, to_r, to_r_q) = (times[0], times[1], times[2], times[3], times[4]);
    rm(&[&ours_vhdx, &q_vhdx, &cp_out, &ours_raw, &q_raw, &src]);
    let mut rows = Vec::new();
    for (name, ours, q) in [
        ("convert raw -> VHDX (2 GiB, half zeros)", to_v, to_v_q),
        ("convert VHDX -> raw (2 GiB, half zeros)", to_r, to_r_q),
    ] {
        let (m, q) = (ours, q);
        let vs_q = m.as_secs_f64() / q.as_secs_f64();
        let vs_cp = m.as_secs_f64() / cp.as_secs_f64();
        rows.push(Row {
            name: name.into(),
            ours: format!("{} ({})", secs(m), mbps(size, m)),
            peer: format!("qemu-img convert {}; cp {}", secs(q), secs(cp)),
            ratio: format!("{vs_q:.2}x qemu-img time; {vs_cp:.2}x cp time"),
            target: "<= 1.00x qemu-img, <= 1.25x cp".into(),
            met: vs_q <= 1.0 && vs_cp <= 1.25,
        });
    }
    Ok(rows)
}

/// 4 KiB random reads with 8 in flight through chains of depth 1, 10 and 50.
fn bench_random_read(o: &Opts) -> Result<Vec<Row>> {
    const DEPTH: usize = 50;
    const THREADS: usize = 8;
    let size = GIB;
    eprintln!("random-read: building a chain of depth {DEPTH} (VHDX and qcow2)");
    let dir = o.dir.join("chain");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    let vpath = |i: usize| {
        dir.join(if i == 0 {
            "l0.vhdx".to_string()
        } else {
            format!("l{i}.avhdx")
        })
    };
    let qpath = |i: usize| dir.join(format!("l{i}.qcow2"));
    let block = 2 * MIB;
    let blocks = size / block;
    let per_layer = (blocks * 2).div_ceil(100);
    let mut rng = StdRng::seed_from_u64(3);
    let data = random_buf(block as usize, 4);
    // Base: every block written. Each child: 2% of the blocks, whole blocks.
    vhdx::create(
        &vpath(0),
        &CreateParams {
            block_size: Some(block as u32),
            ..CreateParams::dynamic(size)
        },
    )?;
    {
        let c = Chain::open(&vpath(0), true)?;
        for b in 0..blocks {
            c.write_at(&data, b * block)?;
        }
        c.close()?;
    }
    sh(&format!(
        "qemu-img create -q -f qcow2 -o cluster_size=2M {q} 1G && qemu-io -f qcow2 -c 'write -P 0x5a 0 1G' {q}",
        q = qpath(0).display()
    ))?;
    for i in 1..DEPTH {
        vhdx::create_differencing(&vpath(i), &vpath(i - 1), None)?;
        sh(&format!(
            "qemu-img create -q -f qcow2 -o cluster_size=2M -b {} -F qcow2 {}",
            qpath(i - 1).display(),
            qpath(i).display()
        ))?;
        let picks: Vec<u64> = (0..per_layer)
            .map(|_| rng.random_range(0..blocks))
            .collect();
        let c = Chain::open(&vpath(i), true)?;
        let mut cmds = String::new();
        for b in &picks {
            c.write_at(&data, b * block)?;
            cmds.push_str(&format!(" -c 'write -P {} {} 2M'", i % 250, b * block));
        }
        c.close()?;
        sh(&format!("qemu-io -f qcow2{cmds} {}", qpath(i).display()))?;
    }
    let ops_per_thread = 40_000u64;
    let mut rows = Vec::new();
    let mut depth1 = 0.0;
    for depth in [1usize, 10, 50] {
        let top = depth - 1;
        let chain = Chain::open(&vpath(top), false)?;
        ensure!(chain.layers().len() == depth);
        let mut results = Vec::new();
        for _ in 0..o.runs {
            let done = AtomicU64::new(0);
            let t = Instant::now();
            std::thread::scope(|s| {
                for t in 0..THREADS {
                    let chain = &chain;
                    let done = &done;
                    s.spawn(move || {
                        let mut rng = StdRng::seed_from_u64(100 + t as u64);
                        let mut buf = vec![0u8; 4096];
                        for _ in 0..ops_per_thread {
                            let off = rng.random_range(0..size / 4096) * 4096;
                            chain.read_at(&mut buf, off).expect("read");
                        }
                        done.fetch_add(ops_per_thread, Ordering::Relaxed);
                    });
                }
            });
            results.push(done.load(Ordering::Relaxed) as f64 / t.elapsed().as_secs_f64());
        }
        results.sort_by(f64::total_cmp);
        let iops = results[results.len() / 2];
        if depth == 1 {
            depth1 = iops;
        }
        // Peer: qemu-img bench has no random mode; a 1 MiB + 4 KiB stride spreads reads
        // over the whole disk and every layer.
        let count = 200_000;
        let out = sh(&format!(
            "qemu-img bench -f qcow2 -t writeback -c {count} -d 8 -s 4096 -S 1052672 {}",
            qpath(top).display()
        ))?;
        let secs_q: f64 = out
            .split("Run completed in ")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .context("qemu-img bench output")?
            .parse()?;
        let q_iops = f64::from(count) / secs_q;
        let vs_depth1 = iops / depth1;
        rows.push(Row {
            name: format!(
                "4 KiB random reads, 8 in flight, chain depth {depth} (2% of blocks per layer)"
            ),
            ours: format!("{:.0} IOPS", iops),
            peer: format!("{:.0} IOPS (qemu-img bench, qcow2 chain, stride)", q_iops),
            ratio: format!("{vs_depth1:.2}x of depth 1; {:.2}x qemu-img", iops / q_iops),
            target: if depth == 50 {
                ">= 0.80x of depth 1".into()
            } else {
                "-".into()
            },
            met: depth != 50 || vs_depth1 >= 0.8,
        });
    }
    let _ = fs::remove_dir_all(&dir);
    Ok(rows)
}

/// Merging 512 MiB of changes into the parent versus `qemu-img commit` on qcow2. Our merge
/// removes the merged child (as Hyper-V does); the peer does the same (`commit -d`, then
/// `rm`), so both pay the file system's cost of freeing the child's space.
/// Syncs, then waits for the disk to go quiet (write-back and discards continue after
/// `sync` returns on this machine).
fn settle() -> Result<()> {
    sh("sync")?;
    std::thread::sleep(Duration::from_secs(3));
    Ok(())
}

fn bench_merge(o: &Opts) -> Result<Vec<Row>> {
    eprintln!("merge: 512 MiB of changes into the parent");
    let bin = snapvisor_bin()?;
    let dir = o.dir.join("merge");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    let base = dir.join("base.vhdx");
    let child = dir.join("child.avhdx");
    let qbase = dir.join("base.qcow2");
    let qchild = dir.join("child.qcow2");
    let data = random_buf(2 * MIB as usize, 5);
    let changes = 512 * MIB;
    let mut ours = Vec::new();
    let mut peer = Vec::new();
    // An even number of rounds, so that each side goes first equally often.
    let runs = o.runs + o.runs % 2;
    for run in 0..runs {
        rm(&[&base, &child, &qbase, &qchild]);
        vhdx::create(&base, &CreateParams::dynamic(4 * GIB))?;
        {
            let c = Chain::open(&base, true)?;
            for i in 0..512u64 {
                c.write_at(&data, i * 4 * MIB)?;
            }
            c.close()?;
        }
        vhdx::create_differencing(&child, &base, None)?;
        let mut rng = StdRng::seed_from_u64(10 + run as u64);
        let mut picks: Vec<u64> = (0..2048u64).collect();
        for i in (1..picks.len()).rev() {
            picks.swap(i, rng.random_range(0..=i));
        }
        picks.truncate((changes / (2 * MIB)) as usize);
        {
            let c = Chain::open(&child, true)?;
            for b in &picks {
                c.write_at(&data, b * 2 * MIB)?;
            }
            c.close()?;
        }
        sh(&format!(
            "qemu-img create -q -f qcow2 -o cluster_size=2M {q} 4G && qemu-io -f qcow2 -c 'write -P 1 0 1G' -c 'write -P 1 1G 1G' {q} && qemu-img create -q -f qcow2 -o cluster_size=2M -b {q} -F qcow2 {c}",
            q = qbase.display(),
            c = qchild.display()
        ))?;
        let cmds: String = picks
            .iter()
            .map(|b| format!(" -c 'write -P 2 {} 2M'", b * 2 * MIB))
            .collect();
        sh(&format!("qemu-io -f qcow2{cmds} {}", qchild.display()))?;
        sh("sync")?;
        // Alternate which side goes first, and let the disk settle before each: write-back
        // and the discards of the files deleted by the setup (the file system is mounted
        // with `discard`) go on after `sync` returns and slow down whatever runs next.
        let run_ours = |ours: &mut Vec<Duration>| -> Result<()> {
            settle()?;
            ours.push(timed(|| {
                sh(&format!(
                    "{} disk merge {} --direction into-parent",
                    bin.display(),
                    child.display()
                ))
                .map(|_| ())
            })?);
            Ok(())
        };
        let run_peer = |peer: &mut Vec<Duration>| -> Result<()> {
            settle()?;
            peer.push(timed(|| {
                sh(&format!(
                    "qemu-img commit -q -d -f qcow2 {c} && rm {c} && sync {}",
                    qbase.display(),
                    c = qchild.display()
                ))
                .map(|_| ())
            })?);
            Ok(())
        };
        if run % 2 == 0 {
            run_ours(&mut ours)?;
            run_peer(&mut peer)?;
        } else {
            run_peer(&mut peer)?;
            run_ours(&mut ours)?;
        }
        eprintln!(
            "  round {}: snapvisor {}, qemu-img {}",
            run + 1,
            secs(ours[ours.len() - 1]),
            secs(peer[peer.len() - 1])
        );
        // The merged base must read the child's data.
        let d = VhdxDisk::open(&base, false)?;
        let mut buf = vec![0u8; 2 * MIB as usize];
        d.read_at(&mut buf, picks[0] * 2 * MIB)?;
        ensure!(buf == data, "merged data differs");
    }
    let _ = fs::remove_dir_all(&dir);
    let (m, p) = (median(ours), median(peer));
    let ratio = m.as_secs_f64() / p.as_secs_f64();
    Ok(vec![Row {
        name: "merge 512 MiB of changes into the parent".into(),
        ours: format!("{} ({})", secs(m), mbps(changes, m)),
        peer: format!(
            "{} (qemu-img commit -d, then rm of the child, qcow2)",
            secs(p)
        ),
        ratio: format!("{ratio:.2}x qemu-img time"),
        target: "<= 1.00x qemu-img".into(),
        met: ratio <= 1.0,
    }])
}

fn snapvisor_in(store: &Path, args: &str) -> Result<String> {
    sh(&format!(
        "SNAPVISOR_STORE='{}' {} {args}",
        store.display(),
        snapvisor_bin()?.display()
    ))
}

fn show_file(store: &Path, vm: &str, disk: usize) -> Result<PathBuf> {
    let out = snapvisor_in(store, &format!("vm show {vm} --json"))?;
    let key = "\"file\": \"";
    let mut at = 0;
    for _ in 0..=disk {
        at += out[at..].find(key).context("no disk file in vm show")? + key.len();
    }
    let end = out[at..].find('"').context("bad JSON")? + at;
    Ok(PathBuf::from(&out[at..end]))
}

fn write_gib(path: &Path, offset: u64, seed: u64) -> Result<()> {
    let c = Chain::open(path, true)?;
    let data = random_buf(4 * MIB as usize, seed);
    for i in 0..256u64 {
        c.write_at(&data, offset + i * 4 * MIB)?;
    }
    c.close()?;
    Ok(())
}

/// Checkpoint operations on stopped VMs, through the CLI.
fn bench_checkpoints(o: &Opts) -> Result<Vec<Row>> {
    eprintln!("checkpoints: take, apply, list, delete");
    let dir = o.dir.join("checkpoints");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    let store = dir.join("store");
    let mut rows = Vec::new();

    // Take and apply with 4 disks of 64 GiB; the peer creates the same four children
    // with qemu-img (what an offline external qcow2 snapshot does).
    snapvisor_in(
        &store,
        "vm create four --disk 64G --disk 64G --disk 64G --disk 64G",
    )?;
    let mut takes = Vec::new();
    for i in 0..o.runs.max(5) {
        sh("sync")?;
        takes.push(timed(|| {
            snapvisor_in(&store, &format!("checkpoint create four --name take{i}")).map(|_| ())
        })?);
    }
    let mut applies = Vec::new();
    for i in 0..o.runs.max(5) {
        sh("sync")?;
        applies.push(timed(|| {
            snapvisor_in(&store, &format!("checkpoint apply four take{}", i % 3)).map(|_| ())
        })?);
    }
    let qdir = dir.join("qcow");
    fs::create_dir_all(&qdir)?;
    for d in 0..4 {
        sh(&format!(
            "qemu-img create -q -f qcow2 {}/base{d}.qcow2 64G",
            qdir.display()
        ))?;
    }
    let mut peer = Vec::new();
    for i in 0..o.runs.max(5) {
        sh("sync")?;
        let cmd: Vec<String> = (0..4)
            .map(|d| {
                format!("qemu-img create -q -f qcow2 -b base{d}.qcow2 -F qcow2 c{i}-{d}.qcow2")
            })
            .collect();
        peer.push(timed(|| {
            sh(&format!(
                "cd {} && {} && sync c{i}-*.qcow2",
                qdir.display(),
                cmd.join(" && ")
            ))
            .map(|_| ())
        })?);
    }
    let (t, a, p) = (median(takes), median(applies), median(peer));
    rows.push(Row {
        name: "take a checkpoint, stopped VM, 4 disks of 64 GiB".into(),
        ours: ms(t),
        peer: format!("{} (4 x qemu-img create -b, qcow2)", ms(p)),
        ratio: format!("{:.2}x", t.as_secs_f64() / p.as_secs_f64()),
        target: "< 100 ms".into(),
        met: t < Duration::from_millis(100),
    });
    rows.push(Row {
        name: "apply a checkpoint, stopped VM, 4 disks of 64 GiB".into(),
        ours: ms(a),
        peer: format!("{} (4 x qemu-img create -b, qcow2)", ms(p)),
        ratio: format!("{:.2}x", a.as_secs_f64() / p.as_secs_f64()),
        target: "< 100 ms".into(),
        met: a < Duration::from_millis(100),
    });

    // Listing a tree of 50 checkpoints.
    let have = o.runs.max(5);
    for i in have..50 {
        if i % 7 == 0 {
            snapvisor_in(&store, &format!("checkpoint apply four take{}", i / 2))?;
        }
        snapvisor_in(&store, &format!("checkpoint create four --name take{i}"))?;
    }
    let mut lists = Vec::new();
    let mut jsons = Vec::new();
    for _ in 0..o.runs.max(5) {
        lists.push(timed(|| {
            snapvisor_in(&store, "checkpoint list four").map(|_| ())
        })?);
        jsons.push(timed(|| {
            snapvisor_in(&store, "checkpoint list four --json").map(|_| ())
        })?);
    }
    let count = snapvisor_in(&store, "checkpoint list four --json")?
        .matches("\"consistency\"")
        .count();
    ensure!(count == 50, "expected 50 checkpoints, listed {count}");
    let (l, j) = (median(lists), median(jsons));
    rows.push(Row {
        name: "list a tree of 50 checkpoints (4 disks)".into(),
        ours: format!("{} (text), {} (--json)", ms(l), ms(j)),
        peer: "-".into(),
        ratio: "-".into(),
        target: "< 50 ms".into(),
        met: l.max(j) < Duration::from_millis(50),
    });

    // Deleting a checkpoint whose layer holds 1 GiB of changes, against the engine's own
    // merge of the same two layers (`snapvisor disk merge`).
    let mut deletes = Vec::new();
    let mut merges = Vec::new();
    for run in 0..o.runs {
        let _ = snapvisor_in(&store, "vm delete one");
        snapvisor_in(&store, "vm create one --disk 8G")?;
        write_gib(&show_file(&store, "one", 0)?, 0, 20 + run as u64)?;
        snapvisor_in(&store, "checkpoint create one --name A")?;
        write_gib(&show_file(&store, "one", 0)?, 2 * GIB, 30 + run as u64)?;
        snapvisor_in(&store, "checkpoint create one --name B")?;
        // The same two layers, alone in a folder, for the engine.
        let eng = dir.join("engine");
        let _ = fs::remove_dir_all(&eng);
        fs::create_dir_all(&eng)?;
        let base = eng.join("base.vhdx");
        let child = eng.join("child.avhdx");
        vhdx::create(&base, &CreateParams::dynamic(8 * GIB))?;
        write_gib(&base, 0, 20 + run as u64)?;
        vhdx::create_differencing(&child, &base, None)?;
        write_gib(&child, 2 * GIB, 30 + run as u64)?;
        let del = || -> Result<()> { snapvisor_in(&store, "checkpoint delete one A").map(|_| ()) };
        let eng_merge = || -> Result<()> {
            sh(&format!(
                "{} disk merge {} --direction auto",
                snapvisor_bin()?.display(),
                child.display()
            ))
            .map(|_| ())
        };
        // Alternate which goes first: write-back left by the setup slows the first one.
        sh("sync")?;
        if run % 2 == 0 {
            deletes.push(timed(del)?);
            sh("sync")?;
            merges.push(timed(eng_merge)?);
        } else {
            merges.push(timed(eng_merge)?);
            sh("sync")?;
            deletes.push(timed(del)?);
        }
        let out = snapvisor_in(&store, "checkpoint list one --json")?;
        ensure!(
            !out.contains("\"name\": \"A\""),
            "checkpoint A still listed after delete"
        );
    }
    let (d, m) = (median(deletes), median(merges));
    let ratio = d.as_secs_f64() / m.as_secs_f64();
    rows.push(Row {
        name: "delete a checkpoint whose layer holds 1 GiB (merge)".into(),
        ours: format!("{} ({})", secs(d), mbps(GIB, d)),
        peer: format!("{} (snapvisor disk merge of the same layers)", secs(m)),
        ratio: format!("{ratio:.2}x engine merge time"),
        target: "engine merge speed (<= 1.10x)".into(),
        met: ratio <= 1.10,
    });
    let _ = fs::remove_dir_all(&dir);
    Ok(rows)
}

/// A server process, stopped (SIGTERM) when dropped.
struct Served(std::process::Child);

impl Drop for Served {
    fn drop(&mut self) {
        let _ = sh(&format!("kill -TERM {}", self.0.id()));
        let _ = self.0.wait();
    }
}

fn wait_for_socket(path: &Path) -> Result<()> {
    for _ in 0..500 {
        if path.exists() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    bail!("{} did not appear", path.display())
}

/// Seconds `qemu-img bench` reports.
fn qemu_bench(uri: &str, args: &str) -> Result<Duration> {
    let out = sh(&format!("qemu-img bench -f raw {args} '{uri}'"))?;
    let secs: f64 = out
        .split("Run completed in ")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .context("no time in qemu-img bench output")?
        .parse()?;
    Ok(Duration::from_secs_f64(secs))
}

/// One `qemu-img bench` case of [`bench_nbd`].
struct NbdCase {
    /// What is read or written, for the row's name.
    what: &'static str,
    /// Request size in bytes.
    size: u64,
    /// Queue depth.
    depth: u32,
    /// Requests per run.
    count: u64,
    /// Further `qemu-img bench` arguments (`-w`, offset, stride).
    args: &'static str,
}

/// The NBD server against `qemu-nbd -f vhdx` serving an identical dynamic VHDX file
/// (4 GiB: data in the first 2 GiB, never written from 3 GiB on), measured with
/// `qemu-img bench` for every request shape: reads of data and of holes and writes, of
/// 4 KiB, 64 KiB and 1 MiB, at queue depth 1 and 16.
fn bench_nbd(o: &Opts) -> Result<Vec<Row>> {
    eprintln!("nbd: snapvisor disk serve vs qemu-nbd -f vhdx");
    let dir = o.dir.join("nbd");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    let ours_file = dir.join("ours.vhdx");
    let peer_file = dir.join("peer.vhdx");
    vhdx::create(&ours_file, &CreateParams::dynamic(4 * GIB))?;
    {
        let c = Chain::open(&ours_file, true)?;
        let data = random_buf(4 * MIB as usize, 40);
        for i in 0..512u64 {
            c.write_at(&data, i * 4 * MIB)?;
        }
        c.close()?;
    }
    fs::copy(&ours_file, &peer_file)?;
    let ours_sock = dir.join("ours.sock");
    let peer_sock = dir.join("peer.sock");
    let _ours = Served(
        Command::new(snapvisor_bin()?)
            .args(["disk", "serve"])
            .arg(&ours_file)
            .arg("--socket")
            .arg(&ours_sock)
            .stdout(std::process::Stdio::null())
            .spawn()?,
    );
    let _peer = Served(
        Command::new("qemu-nbd")
            .args([
                "-f",
                "vhdx",
                "--cache=writeback",
                "--shared=4",
                "--persistent",
                "-x",
                "disk",
                "--socket",
            ])
            .arg(&peer_sock)
            .arg(&peer_file)
            .spawn()?,
    );
    wait_for_socket(&ours_sock)?;
    wait_for_socket(&peer_sock)?;
    let ours_uri = format!("nbd+unix:///disk?socket={}", ours_sock.display());
    let peer_uri = format!("nbd+unix:///disk?socket={}", peer_sock.display());
    // Counts make each run last roughly 0.2-1 s on the slower side. Reads of data stay in
    // the first 2 GiB, reads of holes in the last GiB, and writes below 2.5 GiB, so the
    // holes stay holes whatever order the cases run in. 4 KiB requests use a 128 KiB
    // stride (`qemu-img bench` has no random mode) so that they touch many blocks.
    let k4 = 4096;
    let k64 = 64 << 10;
    const DATA: &str = "reads of data";
    const HOLES: &str = "reads of holes";
    const WRITES: &str = "writes into allocated blocks";
    let cases = [
        (k4, 1, 16384, "-S 128k -o 0", DATA),
        (k4, 16, 16384, "-S 128k -o 0", DATA),
        (k64, 1, 8192, "-o 0", DATA),
        (k64, 16, 16384, "-o 0", DATA),
        (MIB, 1, 1024, "-o 0", DATA),
        (MIB, 16, 2048, "-o 0", DATA),
        (k4, 1, 16384, "-S 64k -o 3G", HOLES),
        (k4, 16, 16384, "-S 64k -o 3G", HOLES),
        (k64, 1, 16384, "-o 3G", HOLES),
        (k64, 16, 16384, "-o 3G", HOLES),
        (MIB, 1, 1024, "-o 3G", HOLES),
        (MIB, 16, 1024, "-o 3G", HOLES),
        (k4, 1, 8192, "-w -S 128k -o 4096", WRITES),
        (k4, 16, 12288, "-w -S 128k -o 4096", WRITES),
        (k64, 1, 4096, "-w -o 256M", WRITES),
        (k64, 16, 8192, "-w -o 256M", WRITES),
        // The warm-up run allocates the blocks from 2 GiB to 2.5 GiB.
        (MIB, 1, 1024, "-w -o 1536M", WRITES),
        (MIB, 16, 1024, "-w -o 1536M", WRITES),
    ]
    .map(|(size, depth, count, args, what)| NbdCase {
        what,
        size,
        depth,
        count,
        args,
    });
    let mut rows = Vec::new();
    for c in &cases {
        let args = format!("-d {} -s {} -c {} {}", c.depth, c.size, c.count, c.args);
        // Warm both once (page cache, and the blocks a first write allocates).
        qemu_bench(&ours_uri, &args)?;
        qemu_bench(&peer_uri, &args)?;
        let mut ours = Vec::new();
        let mut peer = Vec::new();
        for run in 0..o.runs {
            sh("sync")?;
            if run % 2 == 0 {
                ours.push(qemu_bench(&ours_uri, &args)?);
                sh("sync")?;
                peer.push(qemu_bench(&peer_uri, &args)?);
            } else {
                peer.push(qemu_bench(&peer_uri, &args)?);
                sh("sync")?;
                ours.push(qemu_bench(&ours_uri, &args)?);
            }
        }
        let (m, p) = (median(ours), median(peer));
        let speed = p.as_secs_f64() / m.as_secs_f64();
        let rate = |d: Duration| {
            if c.size >= MIB {
                mbps(c.size * c.count, d)
            } else {
                format!("{:.0} IOPS", c.count as f64 / d.as_secs_f64())
            }
        };
        let size = if c.size >= MIB {
            format!("{} MiB", c.size / MIB)
        } else {
            format!("{} KiB", c.size >> 10)
        };
        rows.push(Row {
            name: format!("NBD: {size} {}, depth {}", c.what, c.depth),
            ours: rate(m),
            peer: format!("{} (qemu-nbd -f vhdx)", rate(p)),
            ratio: format!("{speed:.2}x qemu-nbd"),
            target: ">= 1.00x qemu-nbd".into(),
            met: speed >= 1.0,
        });
    }
    drop(_ours);
    drop(_peer);
    let _ = fs::remove_dir_all(&dir);
    Ok(rows)
}

/// The test guest (`scripts/build-guest.sh`) as VM `b` of a new store in `dir` (made
/// afresh): 256 MiB, one 256 MiB ext4 disk, the counter workload. Returns the store.
fn counter_guest_vm(dir: &Path) -> Result<PathBuf> {
    let guest = std::env::current_dir()?.join("target/guest");
    ensure!(
        guest.join("vmlinuz").exists(),
        "no test guest: run ./scripts/build-guest.sh"
    );
    let _ = fs::remove_dir_all(dir);
    fs::create_dir_all(dir)?;
    let store = dir.join("store");
    let fsimg = dir.join("fs.raw");
    sh(&format!(
        "truncate -s 256M {0} && mkfs.ext4 -q -F {0}",
        fsimg.display()
    ))?;
    snapvisor_in(
        &store,
        &format!(
            "vm create b --memory 256M --import-disk {} --kernel {} --initrd {} --append 'console=ttyS0 panic=-1 quiet workload=counter'",
            fsimg.display(),
            guest.join("vmlinuz").display(),
            guest.join("initrd.gz").display()
        ),
    )?;
    Ok(store)
}

/// A running VM's lifecycle with the test guest (256 MiB, TCG): start to guest-agent-ready,
/// save, and start from the saved state. Needs `scripts/build-guest.sh` and a QEMU
/// (`SNAPVISOR_QEMU`, as `scripts/bench.sh` sets it).
fn bench_vm(o: &Opts) -> Result<Vec<Row>> {
    eprintln!("vm: start, save, restore of the test guest (256 MiB, TCG)");
    let dir = o.dir.join("vm");
    let store = counter_guest_vm(&dir)?;
    let agent_ready = |store: &Path| -> Result<bool> {
        Ok(snapvisor_in(store, "vm status b --json")?.contains("\"agent\": true"))
    };
    let mut starts = Vec::new();
    let mut saves = Vec::new();
    let mut restores = Vec::new();
    for _ in 0..o.runs {
        let t = Instant::now();
        snapvisor_in(&store, "vm start b --accel tcg")?;
        while !agent_ready(&store)? {
            ensure!(
                t.elapsed() < Duration::from_secs(120),
                "the agent never answered"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        starts.push(t.elapsed());
        std::thread::sleep(Duration::from_secs(2));
        sh("sync")?;
        saves.push(timed(|| snapvisor_in(&store, "vm save b").map(|_| ()))?);
        sh("sync")?;
        restores.push(timed(|| {
            snapvisor_in(&store, "vm start b --accel tcg").map(|_| ())
        })?);
        snapvisor_in(&store, "vm stop b --force")?;
    }
    let (st, sv, rs) = (median(starts), median(saves), median(restores));
    let _ = fs::remove_dir_all(&dir);
    Ok(vec![
        Row {
            name: "vm start to guest-agent-ready (256 MiB, TCG)".into(),
            ours: secs(st),
            peer: "-".into(),
            ratio: "-".into(),
            target: "-".into(),
            met: true,
        },
        Row {
            name: "vm save, 256 MiB guest (until QEMU exited, state synced)".into(),
            ours: secs(sv),
            peer: "-".into(),
            ratio: "-".into(),
            target: "<= 1 s".into(),
            met: sv <= Duration::from_secs(1),
        },
        Row {
            name: "vm start from the saved state (until the guest runs again)".into(),
            ours: secs(rs),
            peer: "-".into(),
            ratio: "-".into(),
            target: "<= 1 s".into(),
            met: rs <= Duration::from_secs(1),
        },
    ])
}

/// Waits up to 2 minutes for VM `b`'s guest agent to answer.
fn wait_for_agent(store: &Path) -> Result<()> {
    let t = Instant::now();
    while !snapvisor_in(store, "vm status b --json")?.contains("\"agent\": true") {
        ensure!(
            t.elapsed() < Duration::from_secs(120),
            "the agent never answered"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// The median and the largest of `v` (not empty).
fn median_and_max(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[v.len() - 1])
}

/// Checkpoints of the running test guest (256 MiB, TCG) while its workload writes: the
/// window in which its file systems are frozen for a production checkpoint, and how long
/// the guest is paused for production and standard checkpoints (QEMU's STOP and RESUME
/// timestamps; a standard checkpoint writes its memory with the background snapshot after
/// the guest runs again).
fn bench_live(o: &Opts) -> Result<Vec<Row>> {
    eprintln!("live: checkpoints of the running test guest (256 MiB, TCG)");
    let dir = o.dir.join("live");
    let store = counter_guest_vm(&dir)?;
    snapvisor_in(&store, "vm start b --accel tcg")?;
    let _stop = StopOnDrop(store.clone());
    wait_for_agent(&store)?;
    let runs = o.runs.max(5);
    let take = |store: &Path| -> Result<serde_json::Value> {
        let out = snapvisor_in(store, "checkpoint create b --name x --json")?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        snapvisor_in(store, "checkpoint delete b x")?;
        std::thread::sleep(Duration::from_millis(500));
        Ok(v["capture"].clone())
    };
    let ms = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    let (mut frozen, mut prod_pause, mut std_pause, mut mem_ms) = (vec![], vec![], vec![], vec![]);
    let mut whole = vec![];
    let mut background = true;
    for _ in 0..runs {
        let c = take(&store)?;
        ensure!(
            c["fallback"].is_null(),
            "the production checkpoint fell back: {c}"
        );
        frozen.push(ms(&c, "frozen_ms"));
        whole.push(ms(&c, "freeze_to_thaw_ms"));
        prod_pause.push(ms(&c, "paused_ms"));
    }
    snapvisor_in(&store, "vm set b --checkpoint-type standard")?;
    for _ in 0..runs {
        let c = take(&store)?;
        std_pause.push(ms(&c, "paused_ms"));
        mem_ms.push(ms(&c["memory"], "ms"));
        background &= c["memory"]["background"].as_bool() == Some(true);
    }
    snapvisor_in(&store, "vm stop b --force")?;
    let _ = fs::remove_dir_all(&dir);
    let med = median_and_max;
    let (f, fmax) = med(frozen);
    let (w, wmax) = med(whole);
    let (pp, ppmax) = med(prod_pause);
    let (sp, spmax) = med(std_pause);
    let (mm, _) = med(mem_ms);
    Ok(vec![
        Row {
            name: "production checkpoint: guest file systems frozen (freeze returned to thaw returned), writing guest".into(),
            ours: format!("{f:.1} ms (max {fmax:.1} ms)"),
            peer: "-".into(),
            ratio: "-".into(),
            target: "< 100 ms".into(),
            met: fmax < 100.0,
        },
        Row {
            name: "production checkpoint: guest-visible freeze window (freeze requested, guest flushes, to thaw returned)".into(),
            ours: format!("{w:.1} ms (max {wmax:.1} ms)"),
            peer: "-".into(),
            ratio: "-".into(),
            target: "< 100 ms".into(),
            met: wmax < 100.0,
        },
        Row {
            name: "production checkpoint: guest paused (QEMU STOP to RESUME)".into(),
            ours: format!("{pp:.1} ms (max {ppmax:.1} ms)"),
            peer: "-".into(),
            ratio: "-".into(),
            target: "-".into(),
            met: true,
        },
        Row {
            name: format!(
                "standard checkpoint, 256 MiB guest: guest paused ({})",
                if background { "background snapshot" } else { "no background snapshot: paused while memory is written" }
            ),
            ours: format!("{sp:.1} ms (max {spmax:.1} ms)"),
            peer: "-".into(),
            ratio: "-".into(),
            target: "< 50 ms".into(),
            met: sp < 50.0,
        },
        Row {
            name: "standard checkpoint: memory written and synced, guest running".into(),
            ours: format!("{mm:.0} ms"),
            peer: "-".into(),
            ratio: "-".into(),
            target: "-".into(),
            met: true,
        },
    ])
}

/// Online backups of the running test guest (256 MiB, TCG) while its counter workload
/// writes and syncs: how long its file systems stay frozen and how long QEMU keeps it
/// paused for the recovery checkpoint's switch (the change tracking's freeze included),
/// for a first full backup and the incrementals after it.
fn bench_backup_live(o: &Opts) -> Result<Vec<Row>> {
    eprintln!("backup-live: online backups of the running test guest (256 MiB, TCG)");
    let dir = o.dir.join("backup-live");
    let store = counter_guest_vm(&dir)?;
    let repo = dir.join("repo");
    let run = |args: &str| {
        sh(&format!(
            "SNAPVISOR_REPO='{}' SNAPVISOR_STORE='{}' {} {args} 2>/dev/null",
            repo.display(),
            store.display(),
            snapvisor_bin()?.display()
        ))
    };
    run("backup init")?;
    run("vm start b --accel tcg")?;
    let _stop = StopOnDrop(store.clone());
    wait_for_agent(&store)?;
    let runs = o.runs.max(5);
    let (mut frozen, mut paused, mut longest, mut methods) = (vec![], vec![], vec![], vec![]);
    for _ in 0..=runs {
        let v: serde_json::Value =
            serde_json::from_str(&run("backup create b --mode online --json")?)?;
        frozen.push(v["freeze_ms"].as_f64().unwrap_or(f64::NAN));
        paused.push(v["pause_ms"].as_f64().unwrap_or(f64::NAN));
        longest.push(v["longest_write_ms"].as_f64().unwrap_or(f64::NAN));
        methods.push(v["method"].as_str().unwrap_or("?").to_owned());
        std::thread::sleep(Duration::from_millis(500));
    }
    snapvisor_in(&store, "vm stop b --force")?;
    let _ = fs::remove_dir_all(&dir);
    ensure!(
        methods[0] == "full" && methods[1..].iter().all(|m| m == "incremental"),
        "expected a full backup, then incrementals: {methods:?}"
    );
    let med = median_and_max;
    let (f, fmax) = med(frozen);
    let (p, pmax) = med(paused);
    let (w, wmax) = med(longest);
    Ok(vec![
        Row {
            name: format!(
                "online backup of the writing guest (1 full, {runs} incrementals): guest-visible freeze window"
            ),
            ours: format!("{f:.1} ms (max {fmax:.1} ms)"),
            peer: "-".into(),
            ratio: "-".into(),
            target: "< 100 ms".into(),
            met: fmax < 100.0,
        },
        Row {
            name: "online backup: guest paused for the recovery checkpoint (QEMU STOP to RESUME)"
                .into(),
            ours: format!("{p:.1} ms (max {pmax:.1} ms)"),
            peer: "-".into(),
            ratio: "-".into(),
            target: "< 10 ms".into(),
            met: p < 10.0,
        },
        Row {
            name: "online backup: longest guest write during the copy (counter workload, waits included)".into(),
            ours: format!("{w:.1} ms (max {wmax:.1} ms)"),
            peer: "-".into(),
            ratio: "-".into(),
            target: "< 50 ms".into(),
            met: wmax < 50.0,
        },
    ])
}

/// Deleting a checkpoint of the running test guest whose Now layer holds 1 GiB of changes:
/// the merge runs under the guest while the guest writes 4 KiB blocks all over that disk
/// with O_DIRECT and fsync, against the engine's offline merge of a copy of
/// the same two layers. Also the longest any guest write took during the merge and how
/// long the final switch held requests back.
fn bench_live_merge(o: &Opts) -> Result<Vec<Row>> {
    eprintln!("live-merge: 1 GiB merged under the running, writing test guest");
    let guest = std::env::current_dir()?.join("target/guest");
    ensure!(
        guest.join("vmlinuz").exists(),
        "no test guest: run ./scripts/build-guest.sh"
    );
    let dir = o.dir.join("live-merge");
    let mut live = Vec::new();
    let mut offline = Vec::new();
    let mut longest = Vec::new();
    let mut switches = Vec::new();
    for run in 0..o.runs {
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        let store = dir.join("store");
        // One raw 4 GiB disk (no file system: the guest writes to /dev/vda itself).
        snapvisor_in(
            &store,
            &format!(
                "vm create b --memory 256M --disk 4G --kernel {} --initrd {} --append 'console=ttyS0 panic=-1 quiet'",
                guest.join("vmlinuz").display(),
                guest.join("initrd.gz").display()
            ),
        )?;
        // 3 GiB in the checkpoint's layer, 1 GiB of changes after it: the cheaper way is
        // Now's layer into its parent, what Hyper-V does with an .avhdx.
        for g in 0..3 {
            write_gib(&show_file(&store, "b", 0)?, g * GIB, 50 + run as u64 + g)?;
        }
        snapvisor_in(&store, "checkpoint create b --name base")?;
        let now = show_file(&store, "b", 0)?;
        write_gib(&now, GIB, 60 + run as u64)?;
        // The same two layers for the engine, by their own names so the locator resolves.
        let eng = dir.join("engine");
        fs::create_dir_all(&eng)?;
        let parent = store.join("b/disks/disk0.vhdx");
        fs::copy(&parent, eng.join("disk0.vhdx"))?;
        let child = eng.join(now.file_name().context("a file name")?);
        fs::copy(&now, &child)?;
        sh(&format!("chmod u+w {}/*; sync", eng.display()))?;
        offline.push(timed(|| {
            sh(&format!(
                "{} disk merge {} --direction into-parent",
                snapvisor_bin()?.display(),
                child.display()
            ))
            .map(|_| ())
        })?);
        sh("sync")?;
        snapvisor_in(&store, "vm start b --accel tcg")?;
        let _stop = StopOnDrop(store.clone());
        let agent = store.join("b/run/qga.sock");
        let t = Instant::now();
        let mut ga = loop {
            if let Ok(a) = qemu::GuestAgent::connect(&agent, Duration::from_secs(2)) {
                break a;
            }
            ensure!(
                t.elapsed() < Duration::from_secs(120),
                "the agent never answered"
            );
            std::thread::sleep(Duration::from_millis(200));
        };
        // The guest writes 4 KiB blocks all over the second disk, each synced.
        ga.exec(
            "/bin/sh",
            &["-c", "(i=0; while :; do i=$(((i + 7919) % 262144)); dd if=/dev/zero of=/dev/vda bs=4096 count=1 seek=$i oflag=direct conv=notrunc,fsync 2>/dev/null; done) >/dev/null 2>&1 &"],
            Duration::from_secs(10),
        )?;
        drop(ga);
        std::thread::sleep(Duration::from_secs(2));
        let out = snapvisor_in(&store, "checkpoint delete b base --json")?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        let m = v["live_merges"]
            .as_array()
            .and_then(|a| {
                a.iter()
                    .find(|m| m["bytes_copied"].as_u64().unwrap_or(0) >= GIB * 9 / 10)
            })
            .with_context(|| format!("no live merge of 1 GiB: {v}"))?
            .clone();
        live.push(Duration::from_secs_f64(
            m["total_seconds"].as_f64().unwrap_or(0.0),
        ));
        longest.push(m["longest_write_ms"].as_f64().unwrap_or(f64::NAN));
        switches.push(m["switch_ms"].as_f64().unwrap_or(f64::NAN));
        snapvisor_in(&store, "vm stop b --force")?;
    }
    let _ = fs::remove_dir_all(&dir);
    let (l, e) = (median(live), median(offline));
    let speed = e.as_secs_f64() / l.as_secs_f64();
    let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    Ok(vec![
        Row {
            name: "live merge of 1 GiB of changes into the parent, guest writing (plan, copy, switch, layer removed)"
                .into(),
            ours: format!("{} ({})", secs(l), mbps(GIB, l)),
            peer: format!(
                "{} ({}; snapvisor disk merge offline, same layers)",
                secs(e),
                mbps(GIB, e)
            ),
            ratio: format!("{speed:.2}x offline speed"),
            target: ">= 0.70x offline speed".into(),
            met: speed >= 0.7,
        },
        Row {
            name: "live merge: longest guest write (4 KiB, fsync) during the merge, waits included"
                .into(),
            ours: format!("{:.1} ms", max(&longest)),
            peer: "-".into(),
            ratio: "-".into(),
            target: "-".into(),
            met: true,
        },
        Row {
            name: "live merge: requests held back at the final switch".into(),
            ours: format!("{:.1} ms (max)", max(&switches)),
            peer: "-".into(),
            ratio: "-".into(),
            target: "a few ms".into(),
            met: max(&switches) < 50.0,
        },
    ])
}

/// Turns VM `b` of a store off when dropped, so that a failed benchmark leaves no VM
/// running.
struct StopOnDrop(PathBuf);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        let _ = snapvisor_in(&self.0, "vm stop b --force");
    }
}
