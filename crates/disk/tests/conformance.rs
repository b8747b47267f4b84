//! The conformance suite ([`disk::conformance`]), run against every disk backend of this
//! crate: a raw file, a dynamic VHDX, a fixed VHDX, a 4096-byte-sector VHDX, and a
//! differencing chain three files deep. The served disk a running VM's guest uses runs
//! the same suite in the `host` crate.

use disk::conformance::{self, FileBackend};

fn each_backend(case: fn(&dyn conformance::Backend)) {
    for backend in FileBackend::ALL {
        case(&backend);
    }
}

#[test]
fn reads_back_writes_at_any_offset_and_length() {
    each_backend(conformance::reads_back_writes_at_any_offset_and_length);
}

#[test]
fn end_of_disk_and_out_of_range_requests() {
    each_backend(conformance::end_of_disk_and_out_of_range_requests);
}

#[test]
fn zeroed_and_discarded_ranges_read_as_zeros() {
    each_backend(conformance::zeroed_and_discarded_ranges_read_as_zeros);
}

#[test]
fn flushed_data_survives_reopen() {
    each_backend(conformance::flushed_data_survives_reopen);
}

#[test]
fn concurrent_writers_on_disjoint_ranges() {
    each_backend(conformance::concurrent_writers_on_disjoint_ranges);
}

#[test]
fn flushes_while_writers_allocate_lose_nothing() {
    each_backend(conformance::flushes_while_writers_allocate_lose_nothing);
}
