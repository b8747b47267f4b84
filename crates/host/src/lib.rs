//! The running-VM machinery: the VM worker (one detached process per running VM), the
//! disks it serves to QEMU, checkpoints and merges under a running guest.

mod live;
mod live_merge;
pub mod served;
pub mod worker;

/// OVMF's firmware code and empty variable store: `SNAPVISOR_OVMF_CODE` and
/// `SNAPVISOR_OVMF_VARS`, else Debian's `ovmf` package.
pub fn ovmf_paths() -> (std::path::PathBuf, std::path::PathBuf) {
    let pick = |var: &str, default: &str| {
        std::env::var_os(var)
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| std::path::PathBuf::from(default))
    };
    (
        pick("SNAPVISOR_OVMF_CODE", "/usr/share/OVMF/OVMF_CODE_4M.fd"),
        pick("SNAPVISOR_OVMF_VARS", "/usr/share/OVMF/OVMF_VARS_4M.fd"),
    )
}
