//! The body of the `journal` fuzz target, shared with the stable test suite
//! (`crates/vm/tests/fuzz_bodies.rs` includes this file with `#[path]`), so it uses nothing
//! but `vm`, `serde_json` and `std`.
//!
//! [`load_journal`] treats its input as the `journal.json` of a VM folder, which the next
//! command on the VM runs to its end. Loading must return the journal or an error string,
//! never panic. A journal that loads must be safe to run: no step names a file outside the
//! VM folder, a state it commits keeps its invariants, and written back out it loads as
//! the same journal.

/// Loads `data` as a `journal.json`; see the module doc.
pub fn load_journal(data: &[u8]) {
    let Ok(journal) = vm::journal::Journal::from_slice(data) else {
        return;
    };
    assert!(journal.format <= vm::journal::JOURNAL_FORMAT);
    for step in &journal.steps {
        if let Err(e) = step.validate() {
            panic!("a loaded journal has a step that fails validation: {e}");
        }
    }
    let bytes = serde_json::to_vec_pretty(&journal).expect("a journal serializes");
    match vm::journal::Journal::from_slice(&bytes) {
        Ok(again) => assert_eq!(again, journal, "a journal changed through a round trip"),
        Err(e) => panic!("a journal written back does not load: {e}"),
    }
}
