//! The disk conformance suite ([`disk::conformance`]) on the disk a running VM's guest is
//! actually served: a [`ServedDisk`] over a differencing chain three files deep, as QEMU
//! meets it through the worker's NBD export. Three ways: as served between operations;
//! with a live merge's stripe locks on (every write then takes them, as while a merge's
//! copier runs); and after the worker switched it (closed, reopened), as after a live
//! checkpoint. A read-only open is the chain read after the worker let go of it.

use disk::Disk;
use disk::conformance::{self, Backend, FileBackend};
use host::served::ServedDisk;
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug)]
enum Served {
    Idle,
    Merging,
    Switched,
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
        let d = ServedDisk::open(path).unwrap();
        match self {
            Served::Idle => {}
            Served::Merging => d.begin_merge(None),
            Served::Switched => {
                d.close().unwrap();
                d.reopen(path).unwrap();
            }
        }
        Box::new(d)
    }

    fn check(&self, path: &Path) {
        FileBackend::Chain.check(path)
    }
}

const ALL: [Served; 3] = [Served::Idle, Served::Merging, Served::Switched];

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
