//! `snapvisor demo`: the disk engine's story on embedded defaults, verified at each step.

use crate::disk_cmd::gather_info;
use crate::units::human;
use anyhow::{Context, Result, ensure};
use clap::Args;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;
use vhdx::MergeDirection;
use vhdx::{Chain, CreateParams};

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Folder for the demo's files (default: a new folder under the temp directory).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Virtual size of the demo disk.
    #[arg(long, value_parser = crate::units::parse_size, default_value = "4G")]
    size: u64,
}

fn pattern(tag: u8, len: usize, offset: u64) -> Vec<u8> {
    (0..len)
        .map(|i| tag ^ ((offset as usize + i) / 512) as u8)
        .collect()
}

struct Step(Instant);
impl Step {
    fn start(text: &str) -> Step {
        println!("==> {text}");
        Step(Instant::now())
    }
    fn done(self, detail: &str) {
        println!(
            "    {detail} ({:.1} ms)",
            self.0.elapsed().as_secs_f64() * 1e3
        );
    }
}

pub fn run(args: DemoArgs) -> Result<ExitCode> {
    let dir = match args.dir {
        Some(d) => d,
        None => std::env::temp_dir().join(format!("snapvisor-demo-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let base = dir.join("disk.vhdx");
    let child = dir.join("disk_checkpoint1.avhdx");
    for p in [&base, &child] {
        let _ = std::fs::remove_file(p);
    }
    println!("snapvisor disk demo in {}", dir.display());

    let s = Step::start(&format!("create a {} dynamic VHDX", human(args.size)));
    vhdx::create(&base, &CreateParams::dynamic(args.size))?;
    s.done(&base.display().to_string());

    // The "before" state: 64 MiB of data spread over the disk.
    let writes_a: Vec<(u64, usize)> = vec![
        (0, 16 << 20),
        (args.size / 2, 16 << 20),
        (args.size - (32 << 20), 32 << 20),
    ];
    let s = Step::start("write 64 MiB into the base disk");
    let mut expected: Vec<(u64, Vec<u8>)> = Vec::new();
    {
        let chain = Chain::open(&base, true)?;
        for &(off, len) in &writes_a {
            let data = pattern(0xA0, len, off);
            chain.write_at(&data, off)?;
            expected.push((off, data));
        }
        chain.flush()?;
        chain.close()?;
    }
    s.done("flushed and closed");

    let s = Step::start("take a differencing child (what a checkpoint does)");
    vhdx::create_differencing(&child, &base, None)?;
    s.done(&child.display().to_string());

    let s = Step::start("write 8 MiB into the child, partly over the base's data");
    let writes_b: Vec<(u64, usize)> =
        vec![(4 << 20, 4 << 20), (args.size / 2 + 1000 * 512, 4 << 20)];
    let base_before = read_all_ranges(&base, &expected)?;
    {
        let chain = Chain::open(&child, true)?;
        for &(off, len) in &writes_b {
            let data = pattern(0xB0, len, off);
            chain.write_at(&data, off)?;
            apply(&mut expected, off, &data);
        }
        chain.flush()?;
        chain.close()?;
    }
    s.done("flushed and closed");

    let s = Step::start("show the chain");
    let info = gather_info(&child)?;
    for (i, p) in info.chain.iter().enumerate() {
        let layer = gather_info(p)?;
        println!(
            "    {}{} ({}, {} of data)",
            "  ".repeat(i),
            p.display(),
            layer.disk_type_name(),
            human(layer.allocated_bytes())
        );
    }
    s.done("child on top, base below");

    let s = Step::start("verify: the chain reads the new data, the base is unchanged");
    verify(&child, &expected)?;
    ensure!(
        read_all_ranges(&base, &expected)? == base_before,
        "the base disk changed while the child was written"
    );
    s.done("all ranges match");

    let s = Step::start("merge the child with its parent (direction chosen by bytes to copy)");
    let outcome = vhdx::merge(&child, MergeDirection::Auto, &mut |_, _| {})?;
    let direction = match outcome.direction {
        MergeDirection::IntoChild => "into the child",
        _ => "into the parent",
    };
    s.done(&format!(
        "merged {direction}: {} now holds the disk ({} copied)",
        outcome.result.display(),
        human(outcome.bytes_copied)
    ));

    let s = Step::start("verify the merged disk and check its structure");
    verify(&outcome.result, &expected)?;
    let report = vhdx::check(&outcome.result, false)?;
    ensure!(report.is_clean(), "check found errors: {:?}", report.errors);
    s.done("data matches; check is clean");

    if which("qemu-img") && gather_info(&outcome.result)?.disk_type_name() != "differencing" {
        let s = Step::start("let qemu-img check the result");
        let out = Command::new("qemu-img")
            .args(["check", "-f", "vhdx"])
            .arg(&outcome.result)
            .output()?;
        ensure!(
            out.status.success(),
            "qemu-img check failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        s.done(String::from_utf8_lossy(&out.stdout).trim());
    }
    checkpoint_demo(&dir, &outcome.result, &expected)?;
    println!("demo finished: every step verified");
    Ok(ExitCode::SUCCESS)
}

/// The checkpoint tree of a stopped VM: a VM built on the merged disk, checkpoints on two
/// branches, apply, and deletes that merge layers away, verified at each step.
fn checkpoint_demo(dir: &Path, disk: &Path, expected: &[(u64, Vec<u8>)]) -> Result<()> {
    let store_dir = dir.join("store");
    let _ = std::fs::remove_dir_all(&store_dir);
    let store = vm::Store::open(&store_dir, std::time::Duration::ZERO)?;

    let s = Step::start("create VM \"demo\" in a store, importing the merged disk");
    let mut spec = vm::NewVm::new("demo");
    spec.import_disks.push(disk.to_owned());
    store.create(&spec)?;
    let now_file = |store: &vm::Store| -> Result<PathBuf> {
        let (d, st, _) = store.read_vm("demo")?;
        Ok(d.join("disks").join(&st.now.disks[0]))
    };
    verify(&now_file(&store)?, expected)?;
    s.done(&store.vm_path("demo").display().to_string());

    let s = Step::start("checkpoint \"before\", write, checkpoint \"after\", write again");
    let mut v = store.open_vm("demo", "demo")?;
    v.create_checkpoint(Some("before"))?;
    drop(v);
    let mut after = expected.to_vec();
    let write = |after: &mut Vec<(u64, Vec<u8>)>, tag: u8| -> Result<()> {
        let chain = Chain::open(&now_file(&store)?, true)?;
        let data = pattern(tag, 1 << 20, 8 << 20);
        chain.write_at(&data, 8 << 20)?;
        chain.close()?;
        apply(after, 8 << 20, &data);
        Ok(())
    };
    write(&mut after, 0xC0)?;
    let mut v = store.open_vm("demo", "demo")?;
    v.create_checkpoint(Some("after"))?;
    drop(v);
    let mut latest = after.clone();
    write(&mut latest, 0xD0)?;
    s.done("Now holds the latest writes");

    let s = Step::start("apply \"before\": the disk reads as it did then");
    let mut v = store.open_vm("demo", "demo")?;
    let gen_before = v.state().config.generation_id;
    v.apply("before", false)?;
    ensure!(
        v.state().config.generation_id != gen_before,
        "generation ID unchanged"
    );
    drop(v);
    verify(&now_file(&store)?, expected)?;
    s.done("data as of \"before\"; new generation ID");

    let s = Step::start("apply \"after\", keeping the current state as a checkpoint");
    let mut v = store.open_vm("demo", "demo")?;
    v.apply("after", true)?;
    drop(v);
    verify(&now_file(&store)?, &after)?;
    print_tree(&store)?;
    s.done("data as of \"after\"");

    let s = Step::start("delete \"before\" and \"after\": their layers merge away");
    let mut v = store.open_vm("demo", "demo")?;
    v.delete_checkpoint("after", false)?;
    v.delete_checkpoint("before", false)?;
    drop(v);
    verify(&now_file(&store)?, &after)?;
    print_tree(&store)?;
    let (d, st, _) = store.read_vm("demo")?;
    for f in st.layers.keys() {
        ensure!(
            vhdx::check(&d.join("disks").join(f), false)?.is_clean(),
            "check found errors in {f}"
        );
    }
    s.done(&format!(
        "{} layer files left; data and check clean",
        st.layers.len()
    ));
    Ok(())
}

fn print_tree(store: &vm::Store) -> Result<()> {
    let (_, st, _) = store.read_vm("demo")?;
    fn walk(st: &vm::VmState, parent: Option<uuid::Uuid>, depth: usize) {
        for c in st.children(parent) {
            println!("    {}{}", "  ".repeat(depth), c.name);
            walk(st, Some(c.id), depth + 1);
        }
        if st.now.parent == parent {
            println!("    {}> Now", "  ".repeat(depth));
        }
    }
    walk(&st, None, 0);
    Ok(())
}

fn which(cmd: &str) -> bool {
    Command::new(cmd)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn apply(expected: &mut Vec<(u64, Vec<u8>)>, off: u64, data: &[u8]) {
    for (o, d) in expected.iter_mut() {
        let s = off.max(*o);
        let e = (off + data.len() as u64).min(*o + d.len() as u64);
        if s < e {
            d[(s - *o) as usize..(e - *o) as usize]
                .copy_from_slice(&data[(s - off) as usize..(e - off) as usize]);
        }
    }
    let covered = expected
        .iter()
        .any(|(o, d)| *o <= off && off + data.len() as u64 <= *o + d.len() as u64);
    if !covered {
        expected.push((off, data.to_vec()));
    }
}

fn read_all_ranges(path: &Path, ranges: &[(u64, Vec<u8>)]) -> Result<Vec<Vec<u8>>> {
    let chain = Chain::open(path, false)?;
    ranges
        .iter()
        .map(|(o, d)| {
            let mut buf = vec![0u8; d.len()];
            chain.read_at(&mut buf, *o)?;
            Ok(buf)
        })
        .collect()
}

fn verify(path: &Path, expected: &[(u64, Vec<u8>)]) -> Result<()> {
    let got = read_all_ranges(path, expected)?;
    for ((off, want), have) in expected.iter().zip(got) {
        // Later writes overlap earlier ranges; the newest data is applied to every range.
        ensure!(
            &have == want,
            "data at offset {off} of {} does not match",
            path.display()
        );
    }
    Ok(())
}
