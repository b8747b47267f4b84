//! The disk conformance suite ([`disk::conformance`]) on the disk a running VM's guest is
//! actually served: a [`ServedDisk`] over a differencing chain three files deep, as QEMU
//! meets it through the worker's NBD export. Three ways: as served between operations;
//! with a live merge's stripe locks on (every write then takes them, as while a merge's
//! copier runs); and after the worker switched it (closed, reopened), as after a live
//! checkpoint; and with change tracking marking every change in a worker session. A
//! read-only open is the chain read after the worker let go of it.

use disk::Disk;
use disk::conformance::{self, Backend, FileBackend};
use host::served::ServedDisk;
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug)]
enum Served {
    Idle,
    Merging,
    Switched,
    Tracked,
}

impl Backend for Served {
    fn name(&self) -> String {
        format!("served disk ({self:?})")
    }

    fn create(&self, dir: &Path, oracle: &mut [u8]) -> PathBuf {
        FileBackend::Chain.create(dir, oracle)
    }

    fn open(&self, path: &Path, writable: bool) -> Box<dyn Disk> {
        if !writable {
            return FileBackend::Chain.open(path, false);
        }
        if let Served::Tracked = self {
            let d = ServedDisk::open_in_session(path, Some(uuid::Uuid::new_v4())).unwrap();
            let seen = d.with_chain(vm::tracking::chain_seen).unwrap();
            let t = vm::tracking::Tracking::new(d.size(), None, seen);
            let file = vm::tracking::Tracking::path(path.parent().unwrap(), "disk");
            let live = vm::tracking::LiveTracker::start(&file, t).unwrap();
            d.track(std::sync::Arc::new(live));
            return Box::new(d);
        }
        let d = ServedDisk::open(path).unwrap();
        match self {
            Served::Idle => {}
            Served::Merging => d.begin_merge(None),
            Served::Switched => {
                d.close().unwrap();
                d.reopen(path).unwrap();
            }
            Served::Tracked => unreachable!(),
        }
        Box::new(d)
    }

    fn check(&self, path: &Path) {
        FileBackend::Chain.check(path)
    }
}

const ALL: [Served; 4] = [
    Served::Idle,
    Served::Merging,
    Served::Switched,
    Served::Tracked,
];

fn each(case: fn(&dyn Backend)) {
    for backend in ALL {
        case(&backend);
    }
}

#[test]
fn reads_back_writes_at_any_offset_and_length() {
    each(conformance::reads_back_writes_at_any_offset_and_length);
}

#[test]
fn end_of_disk_and_out_of_range_requests() {
    each(conformance::end_of_disk_and_out_of_range_requests);
}

#[test]
fn zeroed_and_discarded_ranges_read_as_zeros() {
    each(conformance::zeroed_and_discarded_ranges_read_as_zeros);
}

#[test]
fn flushed_data_survives_reopen() {
    each(conformance::flushed_data_survives_reopen);
}

#[test]
fn concurrent_writers_on_disjoint_ranges() {
    each(conformance::concurrent_writers_on_disjoint_ranges);
}

#[test]
fn flushes_while_writers_allocate_lose_nothing() {
    each(conformance::flushes_while_writers_allocate_lose_nothing);
}
