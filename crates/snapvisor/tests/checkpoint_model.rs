//! Model-based test of the checkpoint tree through the CLI: random sequences of take,
//! write (through `snapvisor disk write` on the file `vm show --json` names), apply (with
//! and without `--save-current`), delete, delete `--subtree`, rename, consolidate,
//! checkpoint export, and VM export/import. After every step, every checkpoint's data and
//! Now's equal the oracle's, the tree has the oracle's shape, no file in `disks/` is stray,
//! and the engine's check is clean on every file.

mod support;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::path::Path;
use support::{Cli, Model, check_all_files, observe_list, read_disk, stray_layers};

const DISKS: [u64; 2] = [3 << 20, 1 << 20];

fn run_seed(seed: u64, steps: usize) {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let cli = Cli::new(&store);
    cli.ok(&[
        "vm",
        "create",
        "m",
        "--disk",
        "3M",
        "--disk",
        "1M",
        "--max-checkpoints",
        "12",
    ]);
    let vm_dir = store.join("m");
    let mut model = Model::new(&DISKS);
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut log = Vec::new();
    for step in 0..steps {
        let ids: Vec<String> = model.cps.keys().cloned().collect();
        let pick = |rng: &mut SmallRng| ids[rng.random_range(0..ids.len())].clone();
        let roll = rng.random_range(0..100);
        let what;
        if roll < 30 {
            let disk = rng.random_range(0..DISKS.len());
            let size = DISKS[disk];
            let len = rng.random_range(1..=256u64 << 10).min(size);
            let offset = rng.random_range(0..=size - len);
            let byte = rng.random::<u8>() | 1;
            let data = vec![byte; len as usize];
            cli.write_disk("m", disk, offset, &data);
            model.write(disk, offset, &data);
            what = format!("write disk{disk} {offset}+{len}");
        } else if roll < 50 || ids.is_empty() {
            // Names repeat on purpose: duplicates are allowed, ids tell them apart.
            let name = format!("cp{}", rng.random_range(0..6));
            if model.cps.len() >= 12 {
                let err = cli.fails(&["checkpoint", "create", "m", "--name", &name]);
                assert!(err.contains("limit"), "{err}");
                what = "take refused at the limit".into();
            } else {
                let c = cli.json(&["checkpoint", "create", "m", "--name", &name, "--json"]);
                model.take(c["id"].as_str().unwrap(), &name);
                what = format!("take {name}");
            }
        } else if roll < 65 {
            let target = pick(&mut rng);
            let save = rng.random_bool(0.3) && model.cps.len() < 12;
            let mut args = vec!["checkpoint", "apply", "m", target.as_str(), "--json"];
            if save {
                args.push("--save-current");
            }
            let r = cli.json(&args);
            let saved = r["saved_current"].as_str().map(str::to_owned);
            let saved_name = saved.as_ref().map(|_| {
                let list = cli.json(&["checkpoint", "list", "m", "--json"]);
                list["checkpoints"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|c| c["id"].as_str() == saved.as_deref())
                    .unwrap()["name"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            });
            model.apply(&target, saved.as_deref().zip(saved_name.as_deref()));
            what = format!("apply {target} save={save}");
        } else if roll < 80 {
            let target = pick(&mut rng);
            let subtree = rng.random_bool(0.25);
            let mut args = vec!["checkpoint", "delete", "m", target.as_str()];
            if subtree {
                args.push("--subtree");
            }
            cli.ok(&args);
            model.delete(&target, subtree);
            what = format!("delete {target} subtree={subtree}");
        } else if roll < 87 {
            let target = pick(&mut rng);
            let name = format!("renamed{}", rng.random_range(0..4));
            cli.ok(&["checkpoint", "rename", "m", &target, &name]);
            model.cps.get_mut(&target).unwrap().name = name.clone();
            what = format!("rename {target} {name}");
        } else if roll < 91 {
            cli.ok(&["vm", "consolidate", "m"]);
            what = "consolidate".into();
        } else if roll < 95 {
            let target = pick(&mut rng);
            let out = dir.path().join(format!("cpexport{step}"));
            cli.ok(&["checkpoint", "export", "m", &target, out.to_str().unwrap()]);
            for (i, want) in model.cps[&target].data.iter().enumerate() {
                let got = read_disk(&out.join(format!("disks/disk{i}.vhdx")));
                assert!(
                    got == *want,
                    "seed {seed}: exported checkpoint disk{i} differs"
                );
            }
            std::fs::remove_dir_all(&out).unwrap();
            what = format!("checkpoint export {target}");
        } else {
            let out = dir.path().join(format!("vmexport{step}"));
            cli.ok(&["vm", "export", "m", out.to_str().unwrap()]);
            cli.ok(&[
                "vm",
                "import",
                out.to_str().unwrap(),
                "--copy",
                "--name",
                "copy",
            ]);
            let list = cli.json(&["checkpoint", "list", "copy", "--json"]);
            let copy = observe_list(&list);
            assert!(
                copy == model,
                "seed {seed}: imported copy differs: {}",
                copy.diff(&model)
            );
            let show = cli.json(&["vm", "show", "copy", "--json"]);
            let orig = cli.json(&["vm", "show", "m", "--json"]);
            assert_ne!(show["uuid"], orig["uuid"]);
            assert_ne!(show["generation_id"], orig["generation_id"]);
            check_all_files(&store.join("copy"));
            cli.ok(&["vm", "delete", "copy"]);
            std::fs::remove_dir_all(&out).unwrap();
            what = "vm export + import --copy".into();
        }
        log.push(what);
        verify(&cli, &vm_dir, &model, seed, &log);
    }
}

fn verify(cli: &Cli, vm_dir: &Path, model: &Model, seed: u64, log: &[String]) {
    let list = cli.json(&["checkpoint", "list", "m", "--json"]);
    let seen = observe_list(&list);
    assert!(
        seen == *model,
        "seed {seed} after {log:?}: {}",
        seen.diff(model)
    );
    let stray = stray_layers(&list, vm_dir);
    assert!(
        stray.is_empty(),
        "seed {seed} after {log:?}: stray files {stray:?}"
    );
    // Hidden layers exist only while two or more layers depend on them.
    for h in list["hidden_layers"].as_array().unwrap() {
        assert!(
            h["dependants"].as_array().unwrap().len() >= 2,
            "seed {seed}: hidden layer with one dependant left unmerged: {h}"
        );
    }
    let show = cli.json(&["vm", "show", "m", "--json"]);
    assert_eq!(show["checkpoint_count"], model.cps.len());
    check_all_files(vm_dir);
}

fn seeds(from: u64, count: u64, steps: usize) {
    let extra: u64 = std::env::var("SNAPVISOR_MODEL_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    for seed in from..from + count + extra {
        run_seed(seed, steps);
    }
}

#[test]
fn model_seeds_0_to_2() {
    seeds(0, 3, 60);
}

#[test]
fn model_seeds_100_to_102() {
    seeds(100, 3, 60);
}
