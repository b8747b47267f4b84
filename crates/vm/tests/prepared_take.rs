//! A live checkpoint is prepared while the guest runs and committed with it paused: a
//! worker that dies before the commit has taken nothing (the next open undoes what was
//! prepared), one that dies after it has taken the checkpoint (the next open finishes it).
//! The worker's part (creating each new layer from the file it serves, with its
//! DataWriteGuid settled) is played here by the same engine call on the open Now layer.

use std::path::Path;
use std::time::Duration;
use vm::{CheckpointKind, Consistency, NewVm, Store, Taken, Vm};

const TAKEN: Taken = Taken {
    kind: CheckpointKind::Production,
    consistency: Consistency::ApplicationConsistent,
    has_memory: false,
};

fn store_with_vm(dir: &Path) -> Store {
    let store = Store::open(&dir.join("store"), Duration::ZERO).unwrap();
    let mut spec = NewVm::new("g");
    spec.new_disks = vec![16 << 20, 8 << 20];
    store.create(&spec).unwrap();
    store
}

/// Prepares a take of `vm`, creating each child from the open, writable Now layer (as the
/// worker does from the file it serves) after writing to it.
fn prepare(vm: &mut Vm) -> vm::PreparedTake {
    let tops: Vec<vhdx::VhdxFile> = vm
        .state()
        .now
        .disks
        .iter()
        .map(|f| {
            let options = vhdx::OpenOptions {
                writable: true,
                ..Default::default()
            };
            vhdx::VhdxFile::open(&vm.layer_path(f), options).unwrap()
        })
        .collect();
    for t in &tops {
        t.settle_data_write_guid().unwrap();
        t.write_at(&[7u8; 4096], 0).unwrap();
        t.flush().unwrap();
    }
    let take = vm
        .prepare_checkpoint(Some("c"), TAKEN, &mut |i, path| {
            vhdx::create_differencing_of(path, &tops[i], None)?;
            Ok(())
        })
        .unwrap();
    for t in tops {
        // Written after the children were made: the children must still link up.
        t.write_at(&[8u8; 4096], 1 << 20).unwrap();
        t.close().unwrap();
    }
    take
}

fn layer_files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir.join("store/g/disks"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    v.sort();
    v
}

#[test]
fn a_take_that_dies_before_its_commit_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with_vm(dir.path());
    let before = layer_files(dir.path());
    {
        let mut vm = store.open_vm("g", "test").unwrap();
        let take = prepare(&mut vm);
        assert_eq!(layer_files(dir.path()).len(), before.len() + 2);
        // The worker dies here: neither committed nor abandoned.
        std::mem::forget(take);
    }
    let vm = store.open_vm("g", "test").unwrap();
    assert!(vm.state().checkpoints.is_empty(), "{:?}", vm.state());
    assert_eq!(
        layer_files(dir.path()),
        before,
        "the prepared layers are removed"
    );
    assert!(!dir.path().join("store/g/journal.json").exists());
    let checkpoints = dir.path().join("store/g/checkpoints");
    assert!(
        !checkpoints.exists() || std::fs::read_dir(&checkpoints).unwrap().next().is_none(),
        "the prepared checkpoint's folder is removed"
    );
}

#[test]
fn a_take_that_dies_after_its_commit_is_taken() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with_vm(dir.path());
    let id;
    {
        let mut vm = store.open_vm("g", "test").unwrap();
        let take = prepare(&mut vm);
        id = vm.commit_prepared(&take).unwrap();
        assert!(dir.path().join("store/g/journal.json").exists());
        std::mem::forget(take);
    }
    let vm = store.open_vm("g", "test").unwrap();
    assert_eq!(vm.state().checkpoints.len(), 1);
    assert_eq!(vm.state().checkpoints[0].id, id);
    assert!(!dir.path().join("store/g/journal.json").exists());
    // Now's new layers link up to the old ones, which hold what was written, even after
    // the children were created.
    for f in &vm.state().now.disks {
        let chain = vhdx::Chain::open(&vm.layer_path(f), false).unwrap();
        assert_eq!(chain.layers().len(), 2);
        let mut buf = vec![0u8; 4096];
        chain.read_at(&mut buf, 1 << 20).unwrap();
        assert!(buf.iter().all(|&b| b == 8));
    }
}

#[test]
fn an_abandoned_take_leaves_nothing_and_a_committed_one_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with_vm(dir.path());
    let before = layer_files(dir.path());
    let mut vm = store.open_vm("g", "test").unwrap();
    let take = prepare(&mut vm);
    vm.abandon_prepared(take).unwrap();
    assert_eq!(layer_files(dir.path()), before);
    assert!(vm.state().checkpoints.is_empty());
    assert!(!dir.path().join("store/g/journal.json").exists());

    let take = prepare(&mut vm);
    vm.commit_prepared(&take).unwrap();
    // Abandoning after the commit keeps the checkpoint: it exists from the commit on.
    vm.abandon_prepared(take).unwrap();
    assert_eq!(vm.state().checkpoints.len(), 1);
    assert!(!dir.path().join("store/g/journal.json").exists());
    drop(vm);
    let vm = store.open_vm("g", "test").unwrap();
    assert_eq!(vm.state().checkpoints.len(), 1);
}

#[test]
fn a_take_prepared_before_another_change_is_refused_and_undone() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with_vm(dir.path());
    let before = layer_files(dir.path());
    let mut vm = store.open_vm("g", "test").unwrap();
    let take = prepare(&mut vm);
    // Another operation commits meanwhile (the worker's exclusive lock normally forbids it).
    vm.set(&vm::Settings {
        max_checkpoints: Some(7),
        ..Default::default()
    })
    .unwrap();
    let e = vm.commit_prepared(&take).unwrap_err();
    assert!(e.to_string().contains("changed the VM"), "{e}");
    assert!(vm.state().checkpoints.is_empty());
    assert_eq!(vm.state().config.max_checkpoints, 7);
    assert_eq!(layer_files(dir.path()), before);
    assert!(!dir.path().join("store/g/journal.json").exists());
    // The worker abandons it after the refusal: nothing more to undo.
    vm.abandon_prepared(take).unwrap();
    assert_eq!(vm.state().config.max_checkpoints, 7);
}
