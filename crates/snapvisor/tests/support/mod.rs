//! Shared by the checkpoint tests: running the CLI against a store, and an oracle of a
//! VM's checkpoint tree (every checkpoint's data and Now's) to compare the real VM with.

#![allow(dead_code)]

pub mod kill;
pub mod running;

use serde_json::Value;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// A store folder and the CLI pointed at it.
pub struct Cli {
    pub store: PathBuf,
    pub env: Vec<(String, String)>,
    /// A VM to turn off when the test ends, passed or failed, so that no worker and QEMU
    /// outlive a failed test.
    pub stop_on_drop: Option<String>,
}

impl Drop for Cli {
    fn drop(&mut self) {
        if let Some(vm) = self.stop_on_drop.take() {
            let _ = self
                .command(&["vm", "stop", &vm, "--force"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

impl Cli {
    pub fn new(store: &Path) -> Cli {
        Cli {
            store: store.to_owned(),
            env: Vec::new(),
            stop_on_drop: None,
        }
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_snapvisor"));
        c.args(args)
            .env("SNAPVISOR_STORE", &self.store)
            .env_remove("SNAPVISOR_CRASH_AT")
            .env_remove("RUST_LOG");
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run snapvisor")
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "snapvisor {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn json(&self, args: &[&str]) -> Value {
        let out = self.ok(args);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: bad JSON {e}: {out}"))
    }

    /// Runs a command that must fail; returns its first stderr line.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            !out.status.success(),
            "snapvisor {args:?} should have failed"
        );
        let err = String::from_utf8(out.stderr).unwrap();
        err.lines()
            .find(|l| !l.trim().is_empty())
            .unwrap_or_else(|| panic!("no error message for {args:?}"))
            .to_owned()
    }

    /// Writes `data` at `offset` of a VM disk through `snapvisor disk write`, on the file
    /// `vm show --json` names.
    pub fn write_disk(&self, vm: &str, disk: usize, offset: u64, data: &[u8]) {
        let show = self.json(&["vm", "show", vm, "--json"]);
        let file = show["disks"][disk]["file"].as_str().unwrap().to_owned();
        let mut child = self
            .command(&["disk", "write", &file, "--offset", &offset.to_string()])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(data).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "disk write: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// One checkpoint in the oracle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cp {
    pub name: String,
    pub parent: Option<String>,
    pub data: Vec<Vec<u8>>,
}

/// What a VM's tree holds: each checkpoint (by id) with its data, Now's place and data.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Model {
    pub cps: BTreeMap<String, Cp>,
    pub now_parent: Option<String>,
    pub now: Vec<Vec<u8>>,
}

impl Model {
    pub fn new(disk_sizes: &[u64]) -> Model {
        Model {
            cps: BTreeMap::new(),
            now_parent: None,
            now: disk_sizes.iter().map(|&s| vec![0u8; s as usize]).collect(),
        }
    }

    pub fn take(&mut self, id: &str, name: &str) {
        self.cps.insert(
            id.to_owned(),
            Cp {
                name: name.to_owned(),
                parent: self.now_parent.clone(),
                data: self.now.clone(),
            },
        );
        self.now_parent = Some(id.to_owned());
    }

    pub fn write(&mut self, disk: usize, offset: u64, bytes: &[u8]) {
        let o = offset as usize;
        self.now[disk][o..o + bytes.len()].copy_from_slice(bytes);
    }

    pub fn apply(&mut self, id: &str, saved: Option<(&str, &str)>) {
        if let Some((sid, sname)) = saved {
            self.take(sid, sname);
        }
        self.now = self.cps[id].data.clone();
        self.now_parent = Some(id.to_owned());
    }

    pub fn delete(&mut self, id: &str, subtree: bool) {
        let parent = self.cps[id].parent.clone();
        let mut gone = vec![id.to_owned()];
        if subtree {
            let mut i = 0;
            while i < gone.len() {
                let at = gone[i].clone();
                gone.extend(
                    self.cps
                        .iter()
                        .filter(|(_, c)| c.parent.as_deref() == Some(&at))
                        .map(|(k, _)| k.clone()),
                );
                i += 1;
            }
        }
        for g in &gone {
            self.cps.remove(g);
        }
        for c in self.cps.values_mut() {
            if c.parent.as_ref().is_some_and(|p| gone.contains(p)) {
                c.parent = parent.clone();
            }
        }
        if self.now_parent.as_ref().is_some_and(|p| gone.contains(p)) {
            self.now_parent = parent;
        }
    }

    /// The same model with every id not in `known` replaced by `NEW<n>` (in name order)
    /// and the names of those checkpoints dropped: for comparing states whose new ids are
    /// random.
    pub fn canonical(&self, known: &Model) -> Model {
        let mut rename = BTreeMap::new();
        let mut fresh: Vec<(&String, &Cp)> = self
            .cps
            .iter()
            .filter(|(k, _)| !known.cps.contains_key(*k))
            .collect();
        fresh.sort_by(|a, b| a.1.name.cmp(&b.1.name));
        for (i, (k, _)) in fresh.iter().enumerate() {
            rename.insert((*k).clone(), format!("NEW{i}"));
        }
        let map = |id: &String| rename.get(id).cloned().unwrap_or_else(|| id.clone());
        Model {
            cps: self
                .cps
                .iter()
                .map(|(k, c)| {
                    (
                        map(k),
                        Cp {
                            name: if rename.contains_key(k) {
                                String::new()
                            } else {
                                c.name.clone()
                            },
                            parent: c.parent.as_ref().map(map),
                            data: c.data.clone(),
                        },
                    )
                })
                .collect(),
            now_parent: self.now_parent.as_ref().map(map),
            now: self.now.clone(),
        }
    }

    /// A short description of how two models differ.
    pub fn diff(&self, other: &Model) -> String {
        let mut out = Vec::new();
        if self.now_parent != other.now_parent {
            out.push(format!(
                "Now's parent {:?} vs {:?}",
                self.now_parent, other.now_parent
            ));
        }
        if self.now != other.now {
            out.push("Now's data differs".into());
        }
        let a: Vec<_> = self.cps.keys().collect();
        let b: Vec<_> = other.cps.keys().collect();
        if a != b {
            out.push(format!("checkpoints {a:?} vs {b:?}"));
        }
        for (k, c) in &self.cps {
            if let Some(o) = other.cps.get(k) {
                if c.name != o.name || c.parent != o.parent {
                    out.push(format!(
                        "checkpoint {k}: {c:?} vs {o:?}",
                        c = (&c.name, &c.parent),
                        o = (&o.name, &o.parent)
                    ));
                }
                if c.data != o.data {
                    out.push(format!("checkpoint {k} ({}): data differs", c.name));
                }
            }
        }
        out.join("; ")
    }
}

/// Reads a disk chain whole.
pub fn read_disk(path: &Path) -> Vec<u8> {
    let d = disk::VhdxDisk::open(path, false)
        .unwrap_or_else(|e| panic!("open {}: {}", path.display(), vhdx::error_chain(&e)));
    let mut buf = vec![0u8; disk::Disk::size(&d) as usize];
    disk::Disk::read_at(&d, &mut buf, 0).unwrap();
    d.close().unwrap();
    buf
}

/// What the VM really holds, through `checkpoint list --json` and its layer files.
pub fn observe(cli: &Cli, vm: &str) -> Model {
    let list = cli.json(&["checkpoint", "list", vm, "--json"]);
    observe_list(&list)
}

pub fn observe_list(list: &Value) -> Model {
    let files = |v: &Value| -> Vec<Vec<u8>> {
        v["disks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| read_disk(Path::new(d["file"].as_str().unwrap())))
            .collect()
    };
    let mut m = Model {
        now_parent: list["now"]["parent"].as_str().map(str::to_owned),
        now: files(&list["now"]),
        ..Model::default()
    };
    for c in list["checkpoints"].as_array().unwrap() {
        m.cps.insert(
            c["id"].as_str().unwrap().to_owned(),
            Cp {
                name: c["name"].as_str().unwrap().to_owned(),
                parent: c["parent"].as_str().map(str::to_owned),
                data: files(c),
            },
        );
    }
    m
}

/// Runs the engine's check on every file of the VM's `disks/` folder; panics on errors.
pub fn check_all_files(vm_dir: &Path) {
    for e in std::fs::read_dir(vm_dir.join("disks")).unwrap() {
        let path = e.unwrap().path();
        let report = vhdx::check(&path, false)
            .unwrap_or_else(|e| panic!("check {}: {}", path.display(), vhdx::error_chain(&e)));
        assert!(
            report.errors.is_empty(),
            "{}: {:?}",
            path.display(),
            report.errors
        );
    }
}

/// Files in `disks/` that `checkpoint list --json` does not name (must be none).
pub fn stray_layers(list: &Value, vm_dir: &Path) -> Vec<String> {
    let mut named = std::collections::BTreeSet::new();
    let mut add = |v: &Value| {
        for d in v["disks"].as_array().unwrap() {
            named.insert(d["file"].as_str().unwrap().to_owned());
        }
    };
    add(&list["now"]);
    for c in list["checkpoints"].as_array().unwrap() {
        add(c);
    }
    for h in list["hidden_layers"].as_array().unwrap() {
        named.insert(h["file"].as_str().unwrap().to_owned());
    }
    let mut out = Vec::new();
    for e in std::fs::read_dir(vm_dir.join("disks")).unwrap() {
        let p = e.unwrap().path();
        let s = p.to_string_lossy().into_owned();
        if !named.contains(&s) {
            out.push(s);
        }
    }
    out
}

/// Runs a shell command inside a running VM's guest through its agent (`guest-exec`) and
/// returns its exit code and stdout.
#[allow(dead_code)]
pub fn guest_sh(vm_dir: &Path, script: &str) -> (i64, String) {
    let mut agent = qemu::GuestAgent::connect(
        &vm_dir.join("run/qga.sock"),
        std::time::Duration::from_secs(10),
    )
    .expect("the guest agent answers");
    let (code, out) = agent
        .exec(
            "/bin/sh",
            &["-c", script],
            std::time::Duration::from_secs(30),
        )
        .expect("guest-exec");
    (code, String::from_utf8_lossy(&out).into_owned())
}
