//! The bodies of the `vm_state` and `journal` fuzz targets (`fuzz/src/vm_state.rs`,
//! `fuzz/src/journal.rs`) on stable Rust: the `vm.json` of a real VM with checkpoints on
//! two branches and a hidden layer, journals of the operations the store plans, then each
//! mutated (bytes flipped, cut short, names given paths, numbers changed),
//! deterministically. Loading must never panic, and what loads must be safe to act on.

#[path = "../../../fuzz/src/journal.rs"]
mod journal_body;
#[path = "../../../fuzz/src/vm_state.rs"]
mod state_body;

use std::time::Duration;
use vm::journal::{Journal, Step};

/// A VM with two disks, checkpoints on two branches and a hidden layer.
fn a_real_state(dir: &std::path::Path) -> Vec<u8> {
    let store = vm::Store::open(dir, Duration::ZERO).unwrap();
    let mut spec = vm::NewVm::new("web");
    spec.new_disks = vec![1 << 20, 2 << 20];
    store.create(&spec).unwrap();
    let mut v = store.open_vm("web", "test").unwrap();
    v.create_checkpoint(Some("a")).unwrap();
    v.create_checkpoint(Some("b")).unwrap();
    v.apply("a", false).unwrap();
    v.create_checkpoint(Some("c")).unwrap();
    v.delete_checkpoint("a", false).unwrap();
    drop(v);
    std::fs::read(dir.join("web").join(vm::journal::STATE_FILE)).unwrap()
}

fn journals(state: &[u8]) -> Vec<Vec<u8>> {
    let state: vm::VmState = serde_json::from_slice(state).unwrap();
    let mut take = Journal::new("checkpoint create \"x\"");
    take.steps = vec![
        Step::WriteCheckpointConfig {
            id: uuid::Uuid::from_u128(7),
            config: Box::new(state.config.clone()),
        },
        Step::CreateChild {
            file: "disk0_aaaaaaaaaaaa.avhdx".into(),
            parent: state.now.disks[0].clone(),
        },
        Step::Commit {
            state: Box::new(state.clone()),
        },
    ];
    let mut merge = Journal::new("merge layer x with y");
    merge.steps = vec![
        Step::Merge {
            parent: "disk0.vhdx".into(),
            child: "disk0_b.avhdx".into(),
            direction: vm::journal::Direction::IntoParent,
            relink: vec!["disk0_c.avhdx".into()],
        },
        Step::Commit {
            state: Box::new(state),
        },
        Step::RemoveLayer {
            file: "disk0_b.avhdx".into(),
        },
        Step::CopyFile {
            from: "checkpoints/x/vars.fd".into(),
            to: "firmware/vars_1.fd".into(),
        },
        Step::LinkFile {
            from: "checkpoints/x/memory.vsv".into(),
            to: "saved/state.vsv".into(),
        },
        Step::RemoveFile {
            path: "firmware/vars.fd".into(),
        },
        Step::RemoveCheckpointDir {
            id: uuid::Uuid::from_u128(8),
        },
    ];
    [take, merge]
        .iter()
        .map(|j| serde_json::to_vec_pretty(j).unwrap())
        .collect()
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// `seed` and `count` mutations of it.
fn mutants(seed: &[u8], count: usize, rng: &mut Rng) -> Vec<Vec<u8>> {
    let text = String::from_utf8_lossy(seed).into_owned();
    let mut out = vec![seed.to_vec()];
    for _ in 0..count {
        let mut m = seed.to_vec();
        match rng.below(5) {
            0 => {
                let i = rng.below(m.len());
                m[i] ^= 1 << rng.below(8);
            }
            1 => m.truncate(rng.below(m.len())),
            2 => {
                // A file name turned into a path that leaves its folder.
                let names: Vec<usize> = text.match_indices(".avhdx\"").map(|(i, _)| i).collect();
                if !names.is_empty() {
                    let at = names[rng.below(names.len())];
                    let start = text[..at].rfind('"').map_or(0, |q| q + 1);
                    let evil = ["../", "/", "a/", ".", ""][rng.below(5)];
                    m.splice(start..start, evil.bytes());
                }
            }
            3 => {
                if let Some(i) = m.iter().position(u8::is_ascii_digit) {
                    m[i] = b'0' + rng.below(10) as u8;
                }
            }
            _ => {
                // A value swapped for another of the same document.
                let i = rng.below(m.len());
                let j = rng.below(m.len());
                let (a, b) = (i.min(j), i.max(j));
                let piece: Vec<u8> = m[a..b.min(a + 40)].to_vec();
                let k = rng.below(m.len());
                m.splice(k..k, piece);
            }
        }
        out.push(m);
    }
    out
}

#[test]
fn the_vm_state_body_holds_on_a_real_state_and_its_mutations() {
    let dir = tempfile::tempdir().unwrap();
    let state = a_real_state(dir.path());
    assert!(vm::VmState::from_slice(&state).is_ok());
    let mut rng = Rng(0x2545_F491_4F6C_DD1D);
    let mut loaded = 0;
    for m in mutants(&state, 3000, &mut rng) {
        state_body::load_vm_state(&m);
        loaded += usize::from(vm::VmState::from_slice(&m).is_ok());
    }
    // Mutations of bytes that do not matter (spacing, names) still load.
    assert!(loaded > 1, "only {loaded} inputs loaded");
}

#[test]
fn the_journal_body_holds_on_planned_journals_and_their_mutations() {
    let dir = tempfile::tempdir().unwrap();
    let state = a_real_state(dir.path());
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut loaded = 0;
    for seed in journals(&state) {
        assert!(Journal::from_slice(&seed).is_ok());
        for m in mutants(&seed, 2000, &mut rng) {
            journal_body::load_journal(&m);
            loaded += usize::from(Journal::from_slice(&m).is_ok());
        }
    }
    assert!(loaded > 2, "only {loaded} inputs loaded");
}
