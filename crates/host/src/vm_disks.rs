//! A VM's disks through its [`VmHandle`]: list, add, remove (the semantics are the `vm`
//! crate's, `vm::disks`). Adding and removing change the hardware, so the VM must be off:
//! a running (or paused) VM is refused with what to do, and a saved one too (its saved
//! memory belongs to its disks). Hot-plugging into a running guest is not done yet.

use crate::error::{Context, Result};
use crate::host::VmHandle;
use vm::{DiskEntry, DiskRemoval, DiskSource, Reconciled};

impl VmHandle<'_> {
    /// Now's disks in the guest's order, with the checkpoints that have each (read
    /// without a lock, whether the VM runs or not).
    pub fn disks(&self) -> Result<Vec<DiskEntry>> {
        let (dir, state, _) = self
            .store()
            .read_vm(&self.name)
            .with_context(|| format!("cannot read VM \"{}\"", self.name))?;
        Ok(vm::disks::list_disks(&dir, &state))
    }

    /// Adds a disk to the stopped VM's Now (appended: the guest sees it last); returns it.
    pub fn add_disk(&self, source: &DiskSource) -> Result<DiskEntry> {
        let what = || format!("cannot add a disk to VM \"{}\"", self.name);
        self.refuse_live().with_context(what)?;
        let mut vm = self.open_offline("vm disk add").with_context(what)?;
        vm.add_disk(source).with_context(what)
    }

    /// What removing disk `number` would delete and keep (`--dry-run`); reads only.
    pub fn preview_remove_disk(&self, number: u32) -> Result<DiskRemoval> {
        let what = || format!("cannot remove disk {number} of VM \"{}\"", self.name);
        let (dir, state, _) = self.store().read_vm(&self.name).with_context(what)?;
        vm::disks::preview_remove_disk(&dir, &state, number).with_context(what)
    }

    /// Removes disk `number` from the stopped VM's Now: its layers that checkpoints use
    /// stay, the others are deleted.
    pub fn remove_disk(&self, number: u32) -> Result<(DiskRemoval, Reconciled)> {
        let what = || format!("cannot remove disk {number} of VM \"{}\"", self.name);
        self.refuse_live().with_context(what)?;
        let mut vm = self.open_offline("vm disk remove").with_context(what)?;
        vm.remove_disk(number).with_context(what)
    }

    /// Refuses a VM whose worker runs it (running or paused): its disks are served to the
    /// guest.
    fn refuse_live(&self) -> Result<()> {
        let Some(dir) = self.live_dir() else {
            return Ok(());
        };
        if crate::record::RunStatus::read(&dir).state == crate::RunState::Paused {
            return Err(crate::Error::Refused {
                kind: vhdx::ErrorKind::Busy,
                reason: format!(
                    "VM \"{}\" is paused; stop it first: `snapvisor vm stop {}`",
                    self.name,
                    disk::shell_quote(std::path::Path::new(&self.name))
                ),
            });
        }
        Err(vm::Error::Running {
            vm: self.name.clone(),
        }
        .into())
    }
}
