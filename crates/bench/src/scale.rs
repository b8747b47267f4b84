//! Chains at Hyper-V scale: a 64 TiB disk, fifty layers, 10 GiB of data across them. Every
//! figure is a whole process as a user runs it (`snapvisor disk ...` against `qemu-img` or
//! `qemu-io` on the equivalent qcow2 chain), with its wall time and peak memory.

use crate::{GIB, MIB, Opts, Row, sh, snapvisor_bin};
use anyhow::{Context, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use vhdx::{Chain, CreateParams};

const TIB: u64 = 1 << 40;
const SIZE: u64 = 64 * TIB;
const DEPTH: usize = 50;
/// Data written across the layers: 2 MiB blocks at random places of the 64 TiB disk, so
/// that every block needs BAT entries of its own (the worst case for tables).
const DATA: u64 = 10 * GIB;
const BLOCK: u64 = 2 * MIB;

/// Wall time and peak resident memory of one command, as `/usr/bin/time` reports it.
fn measure(cmd: &str) -> Result<(Duration, u64)> {
    let out_file = tempfile_path("time");
    let t = Instant::now();
    let out = Command::new("/usr/bin/time")
        .args(["-f", "%M", "-o"])
        .arg(&out_file)
        .args(["sh", "-c", cmd])
        .output()?;
    let took = t.elapsed();
    anyhow::ensure!(
        out.status.success(),
        "`{cmd}` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let kib: u64 = fs::read_to_string(&out_file)?
        .lines()
        .last()
        .context("/usr/bin/time output")?
        .trim()
        .parse()?;
    let _ = fs::remove_file(&out_file);
    Ok((took, kib * 1024))
}

fn tempfile_path(what: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("snapvisor-bench-{what}-{}", std::process::id()))
}

/// Median time and the largest peak memory of `runs` runs of `cmd`.
fn measure_runs(runs: usize, cmd: &str) -> Result<(Duration, u64)> {
    let mut times = Vec::new();
    let mut peak = 0;
    for _ in 0..runs.max(1) {
        let (t, m) = measure(cmd)?;
        times.push(t);
        peak = peak.max(m);
    }
    Ok((crate::median(times), peak))
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / MIB as f64)
}

/// The figures of issue 9, section 2.
pub(crate) fn bench_scale(o: &Opts) -> Result<Vec<Row>> {
    let bin = snapvisor_bin()?;
    let bin = bin.display();
    // SNAPVISOR_BENCH_SCALE_DIR keeps the chains between runs (they take minutes to build).
    let keep = std::env::var_os("SNAPVISOR_BENCH_SCALE_DIR");
    let dir = keep
        .as_ref()
        .map_or_else(|| o.dir.join("scale"), std::path::PathBuf::from);
    if keep.is_none() {
        let _ = fs::remove_dir_all(&dir);
    }
    fs::create_dir_all(&dir)?;
    let d = dir.display();
    let mut rows = Vec::new();

    eprintln!("scale: a child of an empty 64 TiB disk");
    let _ = fs::remove_file(dir.join("empty.vhdx"));
    vhdx::create(&dir.join("empty.vhdx"), &CreateParams::dynamic(SIZE))?;
    sh(&format!("qemu-img create -q -f qcow2 {d}/empty.qcow2 64T"))?;
    let mut ours = Vec::new();
    let mut peer = Vec::new();
    let mut ours_mem = 0;
    let mut peer_mem = 0;
    for i in 0..o.runs.max(3) {
        let _ = fs::remove_file(dir.join(format!("c{i}.avhdx")));
        let (t, m) = measure(&format!(
            "{bin} disk create {d}/c{i}.avhdx --parent {d}/empty.vhdx >/dev/null"
        ))?;
        ours.push(t);
        ours_mem = ours_mem.max(m);
        let (t, m) = measure(&format!(
            "qemu-img create -q -f qcow2 -b {d}/empty.qcow2 -F qcow2 {d}/c{i}.qcow2"
        ))?;
        peer.push(t);
        peer_mem = peer_mem.max(m);
    }
    let (ours, peer) = (crate::median(ours), crate::median(peer));
    rows.push(Row {
        name: "disk create --parent of an empty 64 TiB disk (whole process)".into(),
        ours: format!("{}, {}", ms(ours), mib(ours_mem)),
        peer: format!(
            "{}, {} (qemu-img create -b, qcow2)",
            ms(peer),
            mib(peer_mem)
        ),
        ratio: format!("{:.2}x", ours.as_secs_f64() / peer.as_secs_f64()),
        target: "< 20 ms".into(),
        met: ours < Duration::from_millis(20),
    });

    eprintln!(
        "scale: a chain of {DEPTH} layers over 64 TiB with {} GiB written across them (VHDX and qcow2)",
        DATA / GIB
    );
    if !dir.join(format!("l{}.qcow2", DEPTH - 1)).exists() {
        build_chains(&dir)?;
    }
    let top = DEPTH - 1;
    let mut rng = StdRng::seed_from_u64(9);
    let offset = rng.random_range(0..SIZE / 4096) * 4096;
    let (ours, ours_mem) = measure_runs(
        o.runs,
        &format!("{bin} disk read {d}/l{top}.avhdx --offset {offset} --length 4096 >/dev/null"),
    )?;
    let (peer, peer_mem) = measure_runs(
        o.runs,
        &format!("qemu-io -r -f qcow2 -c 'read {offset} 4096' {d}/l{top}.qcow2 >/dev/null"),
    )?;
    rows.push(Row {
        name: format!(
            "open a depth-{DEPTH} chain over 64 TiB ({} GiB written) and read 4 KiB (whole process)",
            DATA / GIB
        ),
        ours: format!("{}, {}", ms(ours), mib(ours_mem)),
        peer: format!("{}, {} (qemu-io -r, qcow2 chain)", ms(peer), mib(peer_mem)),
        ratio: format!(
            "{:.2}x time, {:.2}x memory",
            ours.as_secs_f64() / peer.as_secs_f64(),
            ours_mem as f64 / peer_mem as f64
        ),
        target: "< 50 ms and < 64 MiB; <= 2x qemu-io".into(),
        met: ours < Duration::from_millis(50)
            && ours_mem < 64 * MIB
            && ours.as_secs_f64() <= 2.0 * peer.as_secs_f64()
            && ours_mem <= 2 * peer_mem,
    });
    let (ours, ours_mem) = measure_runs(
        o.runs,
        &format!("{bin} disk info {d}/l{top}.avhdx >/dev/null"),
    )?;
    let (peer, peer_mem) = measure_runs(
        o.runs,
        &format!("qemu-img info --backing-chain {d}/l{top}.qcow2 >/dev/null"),
    )?;
    rows.push(Row {
        name: format!("disk info of that depth-{DEPTH} chain (whole process)"),
        ours: format!("{}, {}", ms(ours), mib(ours_mem)),
        peer: format!(
            "{}, {} (qemu-img info --backing-chain)",
            ms(peer),
            mib(peer_mem)
        ),
        ratio: format!("{:.2}x", ours.as_secs_f64() / peer.as_secs_f64()),
        target: "-".into(),
        met: true,
    });
    if keep.is_none() {
        let _ = fs::remove_dir_all(&dir);
    }
    Ok(rows)
}

/// Layer `i` of both chains: `l0.vhdx`/`l0.qcow2` a 64 TiB dynamic base, each next layer a
/// child of the previous one; every layer receives `DATA / DEPTH` in whole 2 MiB blocks at
/// random block-aligned offsets (the same in both chains).
fn build_chains(dir: &Path) -> Result<()> {
    let d = dir.display();
    let vpath = |i: usize| {
        dir.join(if i == 0 {
            "l0.vhdx".to_string()
        } else {
            format!("l{i}.avhdx")
        })
    };
    for i in 0..DEPTH {
        let _ = fs::remove_file(vpath(i));
    }
    vhdx::create(
        &vpath(0),
        &CreateParams {
            block_size: Some(BLOCK as u32),
            ..CreateParams::dynamic(SIZE)
        },
    )?;
    sh(&format!(
        "qemu-img create -q -f qcow2 -o cluster_size=2M {d}/l0.qcow2 64T"
    ))?;
    let per_layer = DATA / BLOCK / DEPTH as u64;
    let mut rng = StdRng::seed_from_u64(7);
    for i in 0..DEPTH {
        if i > 0 {
            vhdx::create_differencing(&vpath(i), &vpath(i - 1), None)?;
            sh(&format!(
                "qemu-img create -q -f qcow2 -o cluster_size=2M -b {d}/l{}.qcow2 -F qcow2 {d}/l{i}.qcow2",
                i - 1
            ))?;
        }
        let fill = (i % 250 + 1) as u8;
        let data = vec![fill; BLOCK as usize];
        let picks: Vec<u64> = (0..per_layer)
            .map(|_| rng.random_range(0..SIZE / BLOCK) * BLOCK)
            .collect();
        let chain = Chain::open(&vpath(i), true)?;
        let mut script = String::new();
        for off in &picks {
            chain.write_at(&data, *off)?;
            script.push_str(&format!("write -P {fill} {off} 2M\n"));
        }
        chain.close()?;
        let script_path = dir.join("qemu-io.script");
        fs::write(&script_path, script)?;
        sh(&format!(
            "qemu-io -f qcow2 {d}/l{i}.qcow2 < {}",
            script_path.display()
        ))?;
    }
    sh("sync")?;
    Ok(())
}
