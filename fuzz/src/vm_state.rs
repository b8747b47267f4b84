//! The body of the `vm_state` fuzz target, shared with the stable test suite
//! (`crates/vm/tests/fuzz_bodies.rs` includes this file with `#[path]`), so it uses nothing
//! but `vm`, `serde_json` and `std`.
//!
//! [`load_vm_state`] treats its input as the `vm.json` of a VM folder, as the store reads
//! it back after a crash, a copy or a foreign tool. Loading must return the state or an
//! error string, never panic. A state that loads must be safe to act on: it keeps the
//! invariants its validation promises, every file name in it is a plain name inside its
//! folder, and written back out it loads as the same state.

/// Loads `data` as a `vm.json`; see the module doc.
pub fn load_vm_state(data: &[u8]) {
    let Ok(state) = vm::VmState::from_slice(data) else {
        return;
    };
    assert!(
        state.validate().is_ok(),
        "a loaded state fails its validation"
    );
    for (name, layer) in &state.layers {
        assert!(
            vm::state::is_plain_file_name(name),
            "layer {name:?} escapes disks/"
        );
        if let Some(p) = &layer.parent {
            assert!(
                state.layers.contains_key(p),
                "layer {name} has an unknown parent"
            );
        }
    }
    for d in &state.config.hardware.disks {
        assert!(
            vm::state::is_plain_file_name(&d.name),
            "disk {:?} escapes disks/",
            d.name
        );
    }
    if let Some(n) = &state.now.nvram {
        assert!(
            vm::state::is_plain_file_name(n),
            "nvram {n:?} escapes firmware/"
        );
    }
    let bytes = serde_json::to_vec_pretty(&state).expect("a state serializes");
    match vm::VmState::from_slice(&bytes) {
        Ok(again) => assert_eq!(again, state, "a state changed through a round trip"),
        Err(e) => panic!("a state written back does not load: {e}"),
    }
}
