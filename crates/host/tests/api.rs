//! The operation API as a program (backups, the service) meets it, on a stopped VM in a
//! real store: typed results that say what happened, and errors whose kind says what went
//! wrong, the same kinds the CLI maps to exit codes.

use host::{ApplyOptions, Host, RunState, StopOptions, no_progress};
use std::time::Duration;
use vhdx::ErrorKind;

fn host(dir: &std::path::Path) -> Host {
    Host::open(vm::Store::open(&dir.join("store"), Duration::ZERO).unwrap())
}

#[test]
fn checkpoint_operations_of_a_stopped_vm_return_what_they_did() {
    let dir = tempfile::tempdir().unwrap();
    let host = host(dir.path());
    let mut spec = vm::NewVm::new("web");
    spec.new_disks = vec![4 << 20];
    let web = host.create_vm(&spec).unwrap();
    assert_eq!(web.info().unwrap().run, RunState::Off);

    let a = web.checkpoint(Some("a")).unwrap();
    assert!(
        a.capture.is_none(),
        "a stopped VM's checkpoint captures nothing live"
    );
    assert_eq!(a.checkpoint.name, "a");
    assert_eq!(a.checkpoint.consistency, vm::Consistency::VmOff);
    assert!(a.checkpoint.disks[0].file.exists());
    let b = web.checkpoint(Some("b")).unwrap();

    let tree = web.checkpoints().unwrap();
    assert_eq!(tree.children(None).len(), 1);
    assert_eq!(tree.children(Some(a.checkpoint.id))[0].id, b.checkpoint.id);
    assert_eq!(tree.now_parent, Some(b.checkpoint.id));

    let applied = web
        .apply(
            "a",
            &ApplyOptions {
                save_current: true,
                start: false,
                accel: None,
            },
            no_progress(),
        )
        .unwrap();
    assert_eq!(applied.id, a.checkpoint.id);
    assert!(applied.saved_current.is_some());
    assert_eq!(applied.run, RunState::Off);

    assert_eq!(web.rename_checkpoint("b", "b2").unwrap(), b.checkpoint.id);
    let deleted = web.delete_checkpoint("b2", false, no_progress()).unwrap();
    assert_eq!((deleted.id, deleted.name.as_str()), (b.checkpoint.id, "b2"));
    assert!(deleted.live.is_none());
    assert!(deleted.reconciled.failed.is_none());
    let exported = dir.path().join("exported");
    assert_eq!(
        web.export_checkpoint("a", &exported, no_progress())
            .unwrap(),
        a.checkpoint.id
    );
    assert!(exported.join("vm.json").exists());
}

#[test]
fn errors_say_what_kind_of_failure_they_are() {
    let dir = tempfile::tempdir().unwrap();
    let host = host(dir.path());
    let mut spec = vm::NewVm::new("web");
    spec.new_disks = vec![1 << 20];
    let web = host.create_vm(&spec).unwrap();

    let kind = |r: host::Result<()>| r.unwrap_err().kind();
    assert_eq!(
        kind(host.vm("nope").checkpoint(None).map(drop)),
        ErrorKind::NotFound
    );
    assert_eq!(
        kind(web.rename_checkpoint("nothing", "x").map(drop)),
        ErrorKind::NotFound
    );
    assert_eq!(kind(host.create_vm(&spec).map(drop)), ErrorKind::Invalid);
    // Not running: pause, resume, save, stop are refused as invalid requests.
    assert_eq!(kind(web.pause()), ErrorKind::Invalid);
    let stop = web.stop(StopOptions {
        force: true,
        timeout: Duration::from_secs(1),
    });
    assert_eq!(kind(stop.map(drop)), ErrorKind::Invalid);
    let e = web.console().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Invalid);
    assert_eq!(
        e.to_string(),
        "VM \"web\" is not running: start it with snapvisor vm start web"
    );
    assert!(web.serial_log().unwrap().ends_with("web/logs/serial.log"));
    // Another command holds the VM.
    let held = host
        .store()
        .open_vm("web", "a test holding the VM")
        .unwrap();
    let e = web.checkpoint(None).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Busy, "{}", e.chain());
    assert!(e.chain().contains("a test holding the VM"), "{}", e.chain());
    drop(held);
    web.checkpoint(None).unwrap();
}
