//! The store: a folder with one folder per VM (or a symlink to a VM folder registered in
//! place), and the operations on whole VMs.

use crate::config::{
    CheckpointType, DEFAULT_MAX_CHECKPOINTS, DirectBoot, DiskConfig, Firmware, Hardware, VmConfig,
    validate_settings, validate_vm_name,
};
use crate::error::{Error, Result};
use crate::fsutil::{self, copy_file, copy_tree, crashpoint, write_folder_atomically};
use crate::journal::{CHECKPOINTS_DIR, DISKS_DIR, FIRMWARE_DIR, JOURNAL_FILE, Journal, STATE_FILE};
use crate::lock::Lock;
use crate::state::{Layer, Now, STATE_FORMAT, VmState};
use crate::vm::Vm;
use std::path::{Path, PathBuf};
use std::time::Duration;
use uuid::Uuid;

/// What `vm create` makes.
#[derive(Clone, Debug)]
pub struct NewVm {
    /// The VM's name.
    pub name: String,
    /// Memory in bytes.
    pub memory: u64,
    /// Virtual processors.
    pub cpus: u32,
    /// New empty dynamic disks, by virtual size.
    pub new_disks: Vec<u64>,
    /// Existing disks (VHDX chains or raw images) copied into the VM as dynamic VHDX.
    pub import_disks: Vec<PathBuf>,
    /// Direct kernel boot.
    pub boot: Option<DirectBoot>,
    /// Checkpoint type.
    pub checkpoint_type: CheckpointType,
    /// Checkpoint limit.
    pub max_checkpoints: u32,
    /// Automatic checkpoints.
    pub automatic_checkpoints: bool,
    /// BIOS or UEFI.
    pub firmware: Firmware,
    /// For UEFI: the empty variable store (OVMF's `OVMF_VARS.fd`) the VM's own starts from.
    pub uefi_vars_template: Option<PathBuf>,
    /// More files the VM's folder holds from the instant it appears (names relative to
    /// it): a restore's marker, so that no instant shows the VM without it.
    pub files: Vec<(String, Vec<u8>)>,
}

impl NewVm {
    /// A VM with the defaults: 1 GiB, 1 CPU, no disks, production checkpoints, limit 50.
    pub fn new(name: &str) -> NewVm {
        NewVm {
            name: name.to_owned(),
            memory: 1 << 30,
            cpus: 1,
            new_disks: Vec::new(),
            import_disks: Vec::new(),
            boot: None,
            checkpoint_type: CheckpointType::Production,
            max_checkpoints: DEFAULT_MAX_CHECKPOINTS,
            automatic_checkpoints: false,
            firmware: Firmware::Bios,
            uefi_vars_template: None,
            files: Vec::new(),
        }
    }
}

/// One VM as `vm list` sees it: its committed state, or why it cannot be read.
#[derive(Debug)]
pub struct VmEntry {
    /// Folder name (the VM's name).
    pub name: String,
    /// The VM folder (a symlink's target for a VM registered in place).
    pub dir: PathBuf,
    /// The committed state, or the error reading it.
    pub state: Result<VmState>,
    /// An operation is unfinished (journal present).
    pub unfinished: Option<String>,
}

/// The store folder.
#[derive(Clone, Debug)]
pub struct Store {
    root: PathBuf,
    wait: Duration,
}

impl Store {
    /// The default store: `$XDG_DATA_HOME/snapvisor` or `~/.local/share/snapvisor`.
    pub fn default_root() -> PathBuf {
        if let Some(d) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
            return PathBuf::from(d).join("snapvisor");
        }
        let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
        PathBuf::from(home).join(".local/share/snapvisor")
    }

    /// Opens (creating if needed) the store at `root`. Commands wait up to `wait` for a
    /// VM another command holds.
    pub fn open(root: &Path, wait: Duration) -> Result<Store> {
        std::fs::create_dir_all(root).map_err(|e| Error::io(root, e))?;
        let root = std::fs::canonicalize(root).map_err(|e| Error::io(root, e))?;
        let store = Store { root, wait };
        store.remove_leftovers();
        Ok(store)
    }

    /// The store folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The folder of a VM (a symlink for one registered in place).
    pub fn vm_path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    fn existing_vm_path(&self, name: &str) -> Result<PathBuf> {
        let path = self.vm_path(name);
        if validate_vm_name(name).is_err() || !path.join(STATE_FILE).exists() {
            return Err(Error::NoSuchVm {
                name: name.to_owned(),
                store: self.root.clone(),
            });
        }
        Ok(path)
    }

    /// Opens a VM for a command that changes it (`what` names the command for others).
    pub fn open_vm(&self, name: &str, what: &str) -> Result<Vm> {
        let path = self.existing_vm_path(name)?;
        let mut vm = Vm::open(&path, what, self.wait)?;
        vm.check_layers_present()?;
        let r = vm.reconcile();
        if let Some(e) = &r.failed {
            tracing::warn!("hidden layers of {name} stay unmerged for now: {e}");
        }
        vm.reconciled_at_open = r;
        Ok(vm)
    }

    /// Reads a VM's committed state for a command that only looks. When an operation is
    /// unfinished and nobody is running it, it is finished first (its files may not read
    /// consistently before); when a command is running it, the last committed state is
    /// returned with the operation's name.
    pub fn read_vm(&self, name: &str) -> Result<(PathBuf, VmState, Option<String>)> {
        let path = self.existing_vm_path(name)?;
        if path.join(JOURNAL_FILE).exists() && Lock::is_free(&path) {
            // Another command may take the lock first: then it finishes the journal.
            match Vm::open(&path, "recover", Duration::ZERO) {
                Ok(vm) => drop(vm),
                Err(Error::Busy { .. } | Error::Running { .. }) => {}
                // The committed state is still shown, with the operation named unfinished.
                Err(e) => tracing::warn!("cannot finish the unfinished operation on {name}: {e}"),
            }
        }
        let state = VmState::load(&path.join(STATE_FILE))?;
        let unfinished = Journal::load(&path).ok().flatten().map(|j| j.op);
        Ok((path, state, unfinished))
    }

    /// Every VM in the store, in name order.
    pub fn list(&self) -> Result<Vec<VmEntry>> {
        let mut out = Vec::new();
        let rd = std::fs::read_dir(&self.root).map_err(|e| Error::io(&self.root, e))?;
        for e in rd {
            let e = e.map_err(|e| Error::io(&self.root, e))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || !e.path().join(STATE_FILE).exists() {
                continue;
            }
            let dir = std::fs::canonicalize(e.path()).unwrap_or_else(|_| e.path());
            let state = match self.read_vm(&name) {
                Ok((_, s, _)) => Ok(s),
                Err(err) => Err(err),
            };
            let unfinished = Journal::load(&dir).ok().flatten().map(|j| j.op);
            out.push(VmEntry {
                name,
                dir,
                state,
                unfinished,
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Creates a VM folder with its disks; the folder appears whole or not at all.
    pub fn create(&self, spec: &NewVm) -> Result<VmState> {
        validate_vm_name(&spec.name)?;
        for p in &spec.import_disks {
            if !p.exists() {
                return Err(Error::InvalidArgument(format!(
                    "the disk to import {} does not exist",
                    p.display()
                )));
            }
        }
        let _store_lock = self.lock_names("vm create")?;
        let dest = self.vm_path(&spec.name);
        if std::fs::symlink_metadata(&dest).is_ok() {
            return Err(Error::VmExists(spec.name.clone()));
        }
        let config = VmConfig {
            name: spec.name.clone(),
            uuid: Uuid::new_v4(),
            generation_id: Uuid::new_v4(),
            hardware: Hardware {
                memory: spec.memory,
                cpus: spec.cpus,
                disks: Vec::new(),
                boot: spec.boot.clone(),
                firmware: spec.firmware,
            },
            checkpoint_type: spec.checkpoint_type,
            max_checkpoints: spec.max_checkpoints,
            automatic_checkpoints: spec.automatic_checkpoints,
        };
        validate_settings(&config)?;
        let template = match (spec.firmware, &spec.uefi_vars_template) {
            (Firmware::Bios, _) => None,
            (Firmware::Uefi, Some(t)) if t.is_file() => Some(t.clone()),
            (Firmware::Uefi, Some(t)) => {
                return Err(Error::InvalidArgument(format!(
                    "the UEFI variable store template {} does not exist (install Debian's ovmf package)",
                    t.display()
                )));
            }
            (Firmware::Uefi, None) => {
                return Err(Error::InvalidArgument(
                    "a UEFI VM needs a variable store template (OVMF_VARS.fd)".into(),
                ));
            }
        };
        let tmp = self
            .root
            .join(format!(".creating-{}.{}", spec.name, std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        let build = || -> Result<VmState> {
            let disks_dir = tmp.join(DISKS_DIR);
            std::fs::create_dir_all(&disks_dir).map_err(|e| Error::io(&disks_dir, e))?;
            std::fs::create_dir_all(tmp.join(CHECKPOINTS_DIR))
                .map_err(|e| Error::io(tmp.join(CHECKPOINTS_DIR), e))?;
            let mut config = config.clone();
            let mut layers = std::collections::BTreeMap::new();
            let mut now = Vec::new();
            let count = spec.new_disks.len() + spec.import_disks.len();
            for i in 0..count {
                let name = format!("disk{i}");
                let file = format!("{name}.vhdx");
                let path = disks_dir.join(&file);
                if i < spec.new_disks.len() {
                    vhdx::create(&path, &vhdx::CreateParams::dynamic(spec.new_disks[i]))?;
                } else {
                    let src = &spec.import_disks[i - spec.new_disks.len()];
                    crate::disks::import_as_dynamic_vhdx(&*disk::open(src, false)?, &path)?;
                }
                let id =
                    vhdx::VhdxFile::open(&path, vhdx::OpenOptions::default())?.virtual_disk_id();
                config.hardware.disks.push(DiskConfig {
                    name: name.clone(),
                    disk_id: id,
                });
                layers.insert(
                    file.clone(),
                    Layer {
                        disk: name,
                        parent: None,
                    },
                );
                now.push(file);
            }
            let nvram = match &template {
                Some(t) => {
                    let fw = tmp.join(FIRMWARE_DIR);
                    std::fs::create_dir_all(&fw).map_err(|e| Error::io(&fw, e))?;
                    let bytes = std::fs::read(t).map_err(|e| Error::io(t, e))?;
                    fsutil::atomic_write(&fw.join("vars.fd"), &bytes)?;
                    Some("vars.fd".to_owned())
                }
                None => None,
            };
            let state = VmState {
                format: STATE_FORMAT,
                seq: 1,
                config,
                now: Now {
                    parent: None,
                    disks: now,
                    nvram,
                },
                checkpoints: Vec::new(),
                layers,
            };
            state.save(&tmp.join(STATE_FILE))?;
            for (name, bytes) in &spec.files {
                fsutil::atomic_write(&tmp.join(name), bytes)?;
            }
            fsutil::sync_dir(&disks_dir)?;
            fsutil::sync_dir(&tmp)?;
            crashpoint("vm create: folder built");
            std::fs::rename(&tmp, &dest).map_err(|e| Error::io(&dest, e))?;
            fsutil::sync_dir(&self.root)?;
            Ok(state)
        };
        let result = build();
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        result
    }

    /// Deletes a VM: its folder goes away as a whole (renamed aside first, then removed).
    pub fn delete(&self, name: &str) -> Result<()> {
        let _store_lock = self.lock_names("vm delete")?;
        let link = self.existing_vm_path(name)?;
        let vm = Vm::open(&link, "vm delete", self.wait)?;
        let target = std::fs::canonicalize(&link).map_err(|e| Error::io(&link, e))?;
        let is_link = std::fs::symlink_metadata(&link)
            .map(|m| m.file_type().is_symlink())
            .unwrap_or(false);
        let aside = self
            .root
            .join(format!(".deleting-{name}.{}", std::process::id()));
        if is_link {
            // Registered in place: unregister first, then remove its folder.
            let folder_aside = target.with_file_name(format!(
                ".deleting-{}.{}",
                fsutil::folder_name(&target),
                std::process::id()
            ));
            std::fs::rename(&target, &folder_aside).map_err(|e| Error::io(&target, e))?;
            fsutil::sync_dir_of(&target)?;
            std::fs::remove_file(&link).map_err(|e| Error::io(&link, e))?;
            fsutil::sync_dir(&self.root)?;
            drop(vm);
            fsutil::remove_dir_all(&folder_aside)
        } else {
            std::fs::rename(&link, &aside).map_err(|e| Error::io(&link, e))?;
            fsutil::sync_dir(&self.root)?;
            crashpoint("vm delete: folder set aside");
            drop(vm);
            fsutil::remove_dir_all(&aside)
        }
    }

    /// Renames a VM and its folder.
    pub fn rename(&self, name: &str, new_name: &str) -> Result<()> {
        validate_vm_name(new_name)?;
        let _store_lock = self.lock_names("vm set --name")?;
        let path = self.existing_vm_path(name)?;
        let dest = self.vm_path(new_name);
        if std::fs::symlink_metadata(&dest).is_ok() {
            return Err(Error::VmExists(new_name.to_owned()));
        }
        let mut vm = Vm::open(&path, "vm set --name", self.wait)?;
        vm.rename_vm(&dest)
    }

    /// Copies a whole VM (config, disks, checkpoint tree) into a new folder `dest`.
    pub fn export(&self, name: &str, dest: &Path) -> Result<()> {
        self.check_export_destination(dest)?;
        let vm = self.open_vm(name, "vm export")?;
        let src = vm.dir().to_owned();
        write_folder_atomically(dest, |tmp| {
            copy_file(&src.join(STATE_FILE), &tmp.join(STATE_FILE))?;
            for sub in [DISKS_DIR, CHECKPOINTS_DIR] {
                copy_tree(&src.join(sub), &tmp.join(sub))?;
            }
            // A UEFI VM's variable store too: an import checks that Now's is there.
            if src.join(FIRMWARE_DIR).is_dir() {
                copy_tree(&src.join(FIRMWARE_DIR), &tmp.join(FIRMWARE_DIR))?;
            }
            Ok(())
        })
    }

    /// Exports a running VM as `vm export` does a stopped one, as of checkpoint `id`: a
    /// recovery checkpoint its worker just took (the worker holds the VM's lock; this reads
    /// without it). The export's Now is that checkpoint's disks (its layers copied,
    /// writable) and UEFI variables; the other checkpoints come along, the running
    /// layers above `id` do not, and neither does `id` itself. The files copied are ones
    /// the worker does not write while `id` exists; should the tree change meanwhile
    /// (another checkpoint operation through the worker), the export is refused and
    /// nothing is left at `dest`. Killed half way, it leaves nothing at `dest` either
    /// (a `.NAME.partial-PID` folder beside it, which can be removed).
    pub fn export_running(&self, name: &str, dest: &Path, id: Uuid) -> Result<()> {
        self.check_export_destination(dest)?;
        let (src, state, _) = self.read_vm(name)?;
        let cp = state
            .checkpoint(id)
            .ok_or_else(|| Error::Corrupt {
                path: src.join(STATE_FILE),
                reason: format!("the checkpoint {id} to export from is not in the tree"),
            })?
            .clone();
        let config = crate::vm::read_checkpoint_config(&src, id)?;
        let mut out = state.clone();
        out.seq += 1;
        for live in &state.now.disks {
            out.layers.remove(live);
        }
        // Recovery checkpoints are a backup's or an export's, for the time of a copy: `id`,
        // and any that one which died left (its layers stay behind as hidden layers,
        // which the export's first open merges away).
        let dropped: std::collections::BTreeSet<Uuid> = state
            .checkpoints
            .iter()
            .filter(|c| c.id == id || c.kind == crate::state::CheckpointKind::Recovery)
            .map(|c| c.id)
            .collect();
        let kept_parent = |mut at: Option<Uuid>| {
            while let Some(p) = at.filter(|p| dropped.contains(p)) {
                at = state.checkpoint(p).and_then(|c| c.parent);
            }
            at
        };
        out.checkpoints.retain(|c| !dropped.contains(&c.id));
        for c in &mut out.checkpoints {
            c.parent = kept_parent(c.parent);
        }
        let cp_dir = src.join(CHECKPOINTS_DIR).join(id.to_string());
        let nvram_src = cp_dir.join(crate::journal::CHECKPOINT_NVRAM_FILE);
        let has_nvram = config.hardware.firmware == Firmware::Uefi && nvram_src.is_file();
        out.now = Now {
            parent: kept_parent(cp.parent),
            disks: cp.disks.clone(),
            nvram: has_nvram.then(|| "vars.fd".to_owned()),
        };
        out.config.hardware = config.hardware;
        out.validate().map_err(|reason| Error::Corrupt {
            path: src.join(STATE_FILE),
            reason: format!("the export of the running VM would be inconsistent: {reason}"),
        })?;
        write_folder_atomically(dest, |tmp| {
            let disks = tmp.join(DISKS_DIR);
            std::fs::create_dir_all(&disks).map_err(|e| Error::io(&disks, e))?;
            for file in out.layers.keys() {
                let to = disks.join(file);
                copy_file(&src.join(DISKS_DIR).join(file), &to)?;
                fsutil::set_read_only(&to, !out.now.disks.contains(file))?;
            }
            fsutil::sync_dir(&disks)?;
            let cps = tmp.join(CHECKPOINTS_DIR);
            std::fs::create_dir_all(&cps).map_err(|e| Error::io(&cps, e))?;
            for c in &out.checkpoints {
                let sub = c.id.to_string();
                copy_tree(&src.join(CHECKPOINTS_DIR).join(&sub), &cps.join(&sub))?;
            }
            fsutil::sync_dir(&cps)?;
            if has_nvram {
                let fw = tmp.join(FIRMWARE_DIR);
                std::fs::create_dir_all(&fw).map_err(|e| Error::io(&fw, e))?;
                copy_file(&nvram_src, &fw.join("vars.fd"))?;
                fsutil::sync_dir(&fw)?;
            }
            out.save(&tmp.join(STATE_FILE))?;
            let (_, after, _) = self.read_vm(name)?;
            if after.seq != state.seq {
                return Err(Error::InvalidArgument(format!(
                    "the checkpoint tree of VM \"{name}\" changed while it was being exported (another checkpoint operation ran); nothing was exported: run the export again"
                )));
            }
            Ok(())
        })
    }

    /// Refuses an export destination inside the store, or inside a VM folder registered in
    /// place: the store would list a copy there as a second VM with the same UUID, or a
    /// VM's folder would hold another VM's files.
    pub fn check_export_destination(&self, dest: &Path) -> Result<()> {
        let resolved = resolve_nonexistent(dest);
        let mut folders = vec![self.root.clone()];
        if let Ok(rd) = std::fs::read_dir(&self.root) {
            folders.extend(
                rd.flatten()
                    .filter_map(|e| std::fs::canonicalize(e.path()).ok())
                    .filter(|p| !p.starts_with(&self.root) && p.is_dir()),
            );
        }
        match folders.into_iter().find(|f| resolved.starts_with(f)) {
            Some(store) => Err(Error::ExportIntoStore {
                path: dest.to_owned(),
                store,
            }),
            None => Ok(()),
        }
    }

    /// Registers the VM folder `dir`: in place (the store links to it), or with `copy` as
    /// a new VM (new UUID and generation ID) copied into the store. `name` renames it.
    pub fn import(&self, dir: &Path, copy: bool, name: Option<&str>) -> Result<String> {
        let dir = std::fs::canonicalize(dir).map_err(|e| Error::io(dir, e))?;
        let state_path = dir.join(STATE_FILE);
        if !state_path.exists() {
            return Err(Error::InvalidArgument(format!(
                "{} is not a VM folder (it has no {STATE_FILE}); export one with `snapvisor vm export`",
                dir.display()
            )));
        }
        let state = VmState::load(&state_path)?;
        let new_name = name.unwrap_or(&state.config.name).to_owned();
        validate_vm_name(&new_name)?;
        if dir.parent() == Some(self.root.as_path()) {
            return Err(Error::InvalidArgument(format!(
                "{} is already a folder of the store",
                dir.display()
            )));
        }
        let _store_lock = self.lock_names("vm import")?;
        let dest = self.vm_path(&new_name);
        if std::fs::symlink_metadata(&dest).is_ok() {
            return Err(Error::ImportNameTaken(new_name));
        }
        if !copy {
            for e in self.list()? {
                if let Ok(s) = &e.state
                    && s.config.uuid == state.config.uuid
                {
                    return Err(Error::DuplicateUuid {
                        path: dir.clone(),
                        uuid: s.config.uuid,
                        existing: e.name,
                    });
                }
            }
        }
        verify_folder(&dir, &state)?;
        if !copy {
            std::os::unix::fs::symlink(&dir, &dest).map_err(|e| Error::io(&dest, e))?;
            fsutil::sync_dir(&self.root)?;
            if new_name != state.config.name {
                let mut vm = Vm::open(&dest, "vm import", self.wait)?;
                let mut next = vm.state().clone();
                next.seq += 1;
                next.config.name = new_name.clone();
                vm.commit(next)?;
            }
            return Ok(new_name);
        }
        let tmp = self
            .root
            .join(format!(".importing-{new_name}.{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        let build = || -> Result<()> {
            std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
            for sub in [DISKS_DIR, CHECKPOINTS_DIR] {
                copy_tree(&dir.join(sub), &tmp.join(sub))?;
            }
            // Now's UEFI variable store, which `verify_folder` found there.
            if let Some(nvram) = &state.now.nvram {
                let fw = tmp.join(FIRMWARE_DIR);
                std::fs::create_dir_all(&fw).map_err(|e| Error::io(&fw, e))?;
                copy_file(&dir.join(FIRMWARE_DIR).join(nvram), &fw.join(nvram))?;
                fsutil::sync_dir(&fw)?;
            }
            let mut next = state.clone();
            next.seq += 1;
            next.config.name = new_name.clone();
            next.config.uuid = Uuid::new_v4();
            next.config.generation_id = Uuid::new_v4();
            // The copies' locators still carry the original folder's absolute paths.
            for (file, layer) in &next.layers {
                if let Some(parent) = &layer.parent {
                    let child = tmp.join(DISKS_DIR).join(file);
                    fsutil::set_read_only(&child, false)?;
                    vhdx::relink(&child, &tmp.join(DISKS_DIR).join(parent))?;
                    fsutil::set_read_only(&child, !next.now.disks.contains(file))?;
                }
            }
            next.save(&tmp.join(STATE_FILE))?;
            fsutil::sync_dir(&tmp)?;
            crashpoint("vm import: copy built");
            std::fs::rename(&tmp, &dest).map_err(|e| Error::io(&dest, e))?;
            fsutil::sync_dir(&self.root)
        };
        let result = build();
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        result.map(|()| new_name)
    }

    fn lock_names(&self, what: &str) -> Result<Lock> {
        Lock::acquire(&self.root, "store", what, self.wait)
    }

    /// Removes folders that a killed create, import or delete left (`.creating-*`,
    /// `.importing-*`, `.deleting-*`), when no other command is using the store.
    fn remove_leftovers(&self) {
        let Ok(_lock) = Lock::acquire(&self.root, "store", "cleanup", Duration::ZERO) else {
            return;
        };
        let Ok(rd) = std::fs::read_dir(&self.root) else {
            return;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(".creating-")
                || name.starts_with(".importing-")
                || name.starts_with(".deleting-")
            {
                tracing::info!("removing {name}, left by an interrupted command");
                let _ = fsutil::remove_dir_all(&e.path());
            }
        }
    }
}

/// Checks that a VM folder's layers exist, open, link up, and carry their disk's id.
/// `path` with symbolic links and `..` resolved as far as it exists, the rest appended.
fn resolve_nonexistent(path: &Path) -> PathBuf {
    let path = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
    for base in path.ancestors() {
        if let Ok(real) = std::fs::canonicalize(base) {
            let rest = path.strip_prefix(base).expect("an ancestor");
            return real.join(rest);
        }
    }
    path
}

fn verify_folder(dir: &Path, state: &VmState) -> Result<()> {
    if let Some(nvram) = &state.now.nvram {
        let path = dir.join(FIRMWARE_DIR).join(nvram);
        if !path.is_file() {
            return Err(Error::Corrupt {
                path,
                reason: "the VM's UEFI variable store is missing".into(),
            });
        }
    }
    let mut ids = std::collections::HashMap::new();
    for d in &state.config.hardware.disks {
        ids.insert(d.name.clone(), d.disk_id);
    }
    for c in &state.checkpoints {
        if let Ok(cfg) = crate::vm::read_checkpoint_config(dir, c.id) {
            for d in cfg.hardware.disks {
                ids.entry(d.name).or_insert(d.disk_id);
            }
        }
    }
    for (file, layer) in &state.layers {
        let path = dir.join(DISKS_DIR).join(file);
        if !path.exists() {
            return Err(Error::MissingLayer { path });
        }
        let chain = vhdx::Chain::open(&path, false)?;
        let found = chain.top().virtual_disk_id();
        if let Some(expected) = ids.get(&layer.disk)
            && *expected != found
        {
            return Err(Error::ForeignDisk {
                path,
                disk: layer.disk.clone(),
                expected: *expected,
                found,
            });
        }
    }
    Ok(())
}
