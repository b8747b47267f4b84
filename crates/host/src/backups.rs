//! Backups of VMs into a repository (the `backup` crate), and restores out of it.
//!
//! The repository knows disks and named blobs; this module knows VMs. A recovery point's
//! group is the VM's name; it holds one disk stream per virtual disk (in the config's
//! order, so `--disk N` is the store's `diskN`), the VM's configuration as the blob
//! [`CONFIG_BLOB`] (the checkpoint config format of the `vm` crate), its UEFI variable
//! store as [`NVRAM_BLOB`] when it has one, the guest's memory and device state as
//! [`STATE_BLOB`] in a `saved-state` point, and the fields [`FIELDS`] name.
//!
//! | VM | what [`VmHandle::backup`] does | consistency |
//! |---|---|---|
//! | off | holds the VM's lock, copies Now's chain of each disk (read through the chain, holes skipped), whatever the mode (`saved-state` too: there is no memory to save) | `offline` |
//! | saved | the same, with its `saved/state.vsv` as [`STATE_BLOB`] (it belongs to the disks as they are), whatever the mode | `saved-state` |
//! | running | a recovery checkpoint through the worker (`Request::RecoveryCheckpoint`: frozen through the agent as the mode says, switched, thawed), its layers copied read-only while the guest runs, then the checkpoint deleted live (merged away) | `application` (the agent froze the guest) or `crash` (`--mode crash`, or `auto` without an answering agent) |
//! | running, `--mode saved-state` | the same, never frozen, with the guest's memory and device state as of the switch kept in the recovery checkpoint (QEMU's background snapshot: the guest runs on while its memory is written, or stays paused where that is not available) and streamed into the point as [`STATE_BLOB`] | `saved-state` |
//!
//! A restore (as a new VM or in place) of a `saved-state` point writes the state to the
//! VM's `saved/state.vsv` last, so the VM is `saved` and `vm start` resumes the guest
//! from the point's instant (the same machinery as the apply of a checkpoint with
//! memory), with the VM's generation ID on its `vmgenid` device.
//!
//! A disk is copied in full when the VM has no earlier point, or with `full`. Otherwise,
//! when its change tracking ([`vm::tracking`]) is valid and relative to the VM's last
//! point in this repository, it is copied **incrementally**: only the regions marked
//! changed are read, the rest is the last point's. Else it is an **express full** against
//! the VM's last point (every block read and hashed, only chunks that differ stored). The
//! point's `method` is the weakest of its disks' (`full`, then `express-full`, then
//! `incremental`).
//!
//! Tracking of a running VM is the worker's: the recovery checkpoint's switch freezes the
//! changed set, this module reads it from the tracking file, and tells the worker at the
//! end whether a point was committed (the set becomes relative to it) or not (the set goes
//! back), before the checkpoint is deleted. A stopped VM's tracking is checked against its
//! chains here, and after the point commits it starts over relative to the point.
//!
//! A restore into a VM's disks ([`VmHandle::restore_in_place`], [`Host::restore_as`])
//! brackets its writes with the VM folder's [`RESTORE_MARKER`]: a restore killed half way
//! leaves a VM that refuses to start or be backed up and says how to finish (run the
//! restore again, which reuses the checkpoint the first run kept, or apply that checkpoint).
//! A restore as a new VM creates the VM folder already carrying the marker, so a kill at
//! any instant leaves no VM or one marked incomplete, which a rerun of the restore
//! replaces.
//!
//! # Crash model
//!
//! A point is listed only once committed (the `backup` crate). A `backup create` of a
//! running VM holds a lease (`lease.rs`) from before it asks for the recovery
//! checkpoint until that checkpoint is deleted: killed at any instant, the worker has
//! already thawed the guest (the freeze never outlives the request), and the recovery
//! checkpoint it left is removed by the worker before the next backup's, or at the VM's
//! next open. A worker killed mid-backup takes QEMU with it; the next open removes the
//! recovery checkpoint.

use crate::error::{Context, Error, Result};
use crate::host::{Host, VmHandle};
use crate::protocol::{Quiesce, Reply, Request};
use crate::record::RunStatus;
use crate::restore_marker::{
    RESTORE_MARKER, RESTORE_MARKER_VERSION, RestoreMarker, interrupted_restore, mark_restoring,
    marker_bytes, unfinished_new_vm, unmark_restoring,
};
use crate::run_state::RunState;
use backup::{Method, Point, Repository};
use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;
use std::time::{Duration, Instant};
use uuid::Uuid;
use vhdx::ErrorKind;

/// The blob holding the VM's configuration.
pub const CONFIG_BLOB: &str = "config.json";
/// The blob holding the VM's UEFI variable store.
pub const NVRAM_BLOB: &str = "nvram.fd";
/// The blob holding the guest's memory and device state, in a `saved-state` point (QEMU's
/// migration stream, as in `saved/state.vsv`).
pub const STATE_BLOB: &str = "state.vsv";

/// The point fields this module writes: `vm`, `vm_uuid`, `consistency`, `method`,
/// `duration_ms`, `freeze_ms`, `pause_ms`.
pub const FIELDS: [&str; 7] = [
    "vm",
    "vm_uuid",
    "consistency",
    "method",
    "duration_ms",
    "freeze_ms",
    "pause_ms",
];

/// How `backup create` treats a running VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum BackupMode {
    /// Application-consistent if the guest agent answers, else crash-consistent.
    #[default]
    Auto,
    /// Application-consistent, or refuse.
    Online,
    /// Crash-consistent, without asking the agent.
    Crash,
    /// Memory and device state saved into the point.
    SavedState,
}

impl BackupMode {
    /// The name used on the command line and in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            BackupMode::Auto => "auto",
            BackupMode::Online => "online",
            BackupMode::Crash => "crash",
            BackupMode::SavedState => "saved-state",
        }
    }
}

/// What `backup create` asks for.
#[derive(Clone, Copy, Debug, Default)]
pub struct BackupOptions {
    /// How a running VM is captured.
    pub mode: BackupMode,
    /// Store every chunk read, without comparing with the last point.
    pub full: bool,
}

/// What `backup create` did.
#[derive(Clone, Debug)]
pub struct BackedUp {
    /// The committed point.
    pub point: Point,
    /// `offline`, `application`, `crash` or `saved-state`.
    pub consistency: String,
    /// `full`, `express-full` or `incremental` (the weakest method of the disks).
    pub method: String,
    /// Bytes read from the disks and blobs.
    pub bytes_read: u64,
    /// Bytes the repository stored for new chunks.
    pub bytes_stored: u64,
    /// Wall time of the whole backup.
    pub duration: Duration,
    /// How long the guest's file systems were frozen, in milliseconds.
    pub freeze_ms: f64,
    /// How long the guest was paused, in milliseconds.
    pub pause_ms: f64,
    /// A running VM's longest guest write (or discard) during the copy, waits included,
    /// in milliseconds.
    pub longest_write_ms: Option<f64>,
}

/// What a restore as a new VM made.
#[derive(Clone, Debug)]
pub struct RestoredVm {
    /// The new VM's name.
    pub name: String,
    /// Its new identity.
    pub uuid: Uuid,
    /// Its new generation ID.
    pub generation_id: Uuid,
    /// Its disks' new ids.
    pub disk_ids: Vec<Uuid>,
    /// Bytes written into its disks.
    pub bytes_written: u64,
}

/// What a restore in place did.
#[derive(Clone, Debug)]
pub struct RestoredInPlace {
    /// The checkpoint that keeps what the VM had, when one was taken.
    pub kept_as: Option<(Uuid, String)>,
    /// Bytes written into the disks.
    pub bytes_written: u64,
    /// The VM's new generation ID.
    pub generation_id: Uuid,
}

/// Progress of a copy: `(bytes done, bytes in all)`.
pub type CopyProgress<'a> = &'a (dyn Fn(u64, u64) + Sync);

fn refused(kind: ErrorKind, reason: impl Into<String>) -> Error {
    Error::Refused {
        kind,
        reason: reason.into(),
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The newest point of `vm` (by name and identity), the base of an express full.
fn last_point_of(repo: &Repository, vm: &vm::VmConfig) -> Result<Option<Point>> {
    let uuid = vm.uuid.to_string();
    Ok(repo
        .list_points()?
        .points
        .into_iter()
        .rfind(|p| p.group == vm.name && p.fields.get("vm_uuid") == Some(&uuid)))
}

/// Where a disk of a VM comes from for a backup.
struct DiskSource {
    name: String,
    disk_id: Uuid,
    top: std::path::PathBuf,
    /// What changed since a recovery point, as change tracking says (the point's id).
    changed: Option<(String, Vec<Range<u64>>)>,
}

/// The changes a valid tracking file of a stopped VM's disk records since its reference.
fn offline_changes(vm_dir: &Path, disk: &str, top: &Path) -> Option<(String, Vec<Range<u64>>)> {
    match vm::tracking::check_disk(vm_dir, disk, top) {
        Ok(vm::tracking::Status::Valid(t)) => Some((t.reference()?.to_owned(), t.changed())),
        Ok(vm::tracking::Status::Invalid(why)) => {
            tracing::info!("change tracking of {disk} is invalid: {why}");
            None
        }
        Ok(vm::tracking::Status::None) => None,
        Err(e) => {
            tracing::warn!("change tracking of {disk}: {e}");
            None
        }
    }
}

/// The set a running VM's worker froze for recovery checkpoint `checkpoint`, read from
/// the tracking file the worker keeps marking (a page caught half written fails its
/// checksum: read again).
fn frozen_changes(
    vm_dir: &Path,
    disk: &str,
    checkpoint: Uuid,
) -> Option<(String, Vec<Range<u64>>)> {
    let path = vm::tracking::Tracking::path(vm_dir, disk);
    for _ in 0..5 {
        match vm::tracking::Tracking::load(&path) {
            Ok(vm::tracking::Status::Valid(t)) => {
                return (t.pending() == Some(checkpoint))
                    .then(|| Some((t.reference()?.to_owned(), t.frozen())))
                    .flatten();
            }
            Ok(vm::tracking::Status::Invalid(_)) => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(vm::tracking::Status::None) | Err(_) => return None,
        }
    }
    None
}

/// Copies disks and blobs of one VM into a new point and commits it.
#[allow(clippy::too_many_arguments)]
fn write_point(
    repo: &Repository,
    config: &vm::VmConfig,
    nvram: Option<&Path>,
    state: Option<&Path>,
    disks: &[DiskSource],
    full: bool,
    consistency: &str,
    freeze: Duration,
    pause: Duration,
    started: Instant,
    progress: CopyProgress,
) -> Result<BackedUp> {
    let base = if full {
        None
    } else {
        last_point_of(repo, config)?
    };
    let mut writer = backup::PointWriter::begin(repo, &config.name)?;
    writer.add_blob(CONFIG_BLOB, &vm::config::checkpoint_config_bytes(config))?;
    if let Some(path) = nvram {
        writer.add_blob_file(NVRAM_BLOB, path, progress)?;
    }
    if let Some(path) = state {
        writer.add_blob_file(STATE_BLOB, path, progress)?;
    }
    // The weakest method of the disks names the point's.
    let mut rank = 0;
    for d in disks {
        let source = disk::open(&d.top, false)
            .with_context(|| format!("cannot open {} to back it up", d.top.display()))?;
        let base_stream = base
            .as_ref()
            .and_then(|p| p.disks.iter().find(|s| s.name == d.name))
            .filter(|s| s.size == source.size());
        let changed = d
            .changed
            .as_ref()
            .filter(|(reference, _)| base.as_ref().is_some_and(|p| p.id == *reference));
        let m = match (base_stream, changed) {
            (Some(b), Some((_, ranges))) => Method::Incremental {
                base: b,
                changed: ranges,
            },
            (Some(b), None) => {
                rank = rank.max(1);
                Method::ExpressFull { base: b }
            }
            (None, _) => {
                rank = 2;
                Method::Full
            }
        };
        let mut fields = BTreeMap::new();
        fields.insert("disk_id".to_owned(), d.disk_id.to_string());
        writer.add_disk(&d.name, &*source, m, fields, progress)?;
    }
    let method = ["incremental", "express-full", "full"][rank];
    let stats = writer.stats();
    let duration = started.elapsed();
    writer.set_field("vm", &config.name);
    writer.set_field("vm_uuid", &config.uuid.to_string());
    writer.set_field("consistency", consistency);
    writer.set_field("method", method);
    writer.set_field("duration_ms", &duration.as_millis().to_string());
    writer.set_field("freeze_ms", &format!("{:.1}", ms(freeze)));
    writer.set_field("pause_ms", &format!("{:.1}", ms(pause)));
    let point = writer.commit()?;
    Ok(BackedUp {
        point,
        consistency: consistency.to_owned(),
        method: method.to_owned(),
        bytes_read: stats.bytes_read,
        bytes_stored: stats.bytes_stored,
        duration: started.elapsed(),
        freeze_ms: ms(freeze),
        pause_ms: ms(pause),
        longest_write_ms: None,
    })
}

impl VmHandle<'_> {
    /// Backs the VM up into `repo` as a new recovery point (see the module doc).
    pub fn backup(
        &self,
        repo: &Repository,
        opts: &BackupOptions,
        progress: CopyProgress,
    ) -> Result<BackedUp> {
        let what = || format!("cannot back up VM {:?}", self.name);
        let started = Instant::now();
        if let Some(dir) = self.live_dir() {
            return self
                .backup_live(&dir, repo, opts, started, progress)
                .with_context(what);
        }
        if let Some(e) = self
            .dir()
            .ok()
            .and_then(|dir| interrupted_restore(&dir, &self.name))
        {
            return Err(e).with_context(what);
        }
        // A saved VM is copied with its saved state, which belongs to its disks as they
        // are: restored, it comes back saved, as it was.
        let saved = self
            .dir()
            .is_ok_and(|d| RunStatus::read(&d).state == RunState::Saved);
        let vm = if saved {
            self.store()
                .open_vm(&self.name, "backup create")
                .with_context(what)?
        } else {
            self.open_offline("backup create").with_context(what)?
        };
        let saved_state = vm.dir().join(vm::journal::SAVED_STATE_FILE);
        let saved = saved && saved_state.is_file();
        let state = vm.state();
        let disks: Vec<DiskSource> = state
            .config
            .hardware
            .disks
            .iter()
            .zip(&state.now.disks)
            .map(|(d, layer)| DiskSource {
                name: d.name.clone(),
                disk_id: d.disk_id,
                top: vm.layer_path(layer),
                changed: offline_changes(vm.dir(), &d.name, &vm.layer_path(layer)),
            })
            .collect();
        let nvram = state
            .now
            .nvram
            .as_ref()
            .map(|n| vm.dir().join(vm::journal::FIRMWARE_DIR).join(n));
        // The VM's lock is held (in `vm`) until the point is committed.
        let done = write_point(
            repo,
            &state.config,
            nvram.as_deref(),
            saved.then_some(saved_state.as_path()),
            &disks,
            opts.full,
            if saved { "saved-state" } else { "offline" },
            Duration::ZERO,
            Duration::ZERO,
            started,
            progress,
        )
        .with_context(what)?;
        // Still under the lock: the disks are what the point holds.
        let tops: Vec<_> = disks
            .iter()
            .map(|d| (d.name.clone(), d.top.clone()))
            .collect();
        if let Err(e) = vm::tracking::establish(vm.dir(), &tops, &done.point.id) {
            tracing::warn!(
                "change tracking does not start from point {}: {e}",
                done.point.id
            );
        }
        Ok(done)
    }

    fn backup_live(
        &self,
        dir: &Path,
        repo: &Repository,
        opts: &BackupOptions,
        started: Instant,
        progress: CopyProgress,
    ) -> Result<BackedUp> {
        // saved-state: DPM's offline method for a running VM, without taking it off
        // line: no freeze, the guest paused for the switch while QEMU captures its device
        // state, its memory written as of that instant into the recovery checkpoint.
        let (quiesce, memory) = match opts.mode {
            BackupMode::Auto => (Quiesce::Try, false),
            BackupMode::Online => (Quiesce::Required, false),
            BackupMode::Crash => (Quiesce::Skip, false),
            BackupMode::SavedState => (Quiesce::Skip, true),
        };
        // Held until the recovery checkpoint is gone: if this process dies, the worker
        // removes the checkpoint before the next backup's (`crate::lease`).
        let lease = crate::lease::Lease::take(&dir.join(crate::run_state::RUN_DIR))?;
        vm::fsutil::crashpoint("backup create: lease taken");
        let request = Request::RecoveryCheckpoint {
            name: format!(
                "recovery checkpoint ({})",
                vm::fsutil::format_time(vm::fsutil::now_unix())
            ),
            quiesce,
            memory,
            lease: Some(lease.name().to_owned()),
        };
        let capture = match self
            .call(dir, &request, crate::host::LIVE_OP_TIMEOUT)
            .context("the running VM did not take a recovery checkpoint")?
        {
            Reply::CheckpointTaken(c) => c,
            other => return Err(crate::control::unexpected(&request, &other)),
        };
        vm::fsutil::crashpoint("backup create: recovery checkpoint taken");
        let consistency = match capture.consistency {
            _ if memory => "saved-state",
            vm::Consistency::ApplicationConsistent => "application",
            _ => "crash",
        };
        // The frozen layers are copied while the guest writes to Now's new layers; the
        // worker never changes them until the recovery checkpoint is deleted.
        let result = (|| {
            let (vm_dir, state, _) = self.store().read_vm(&self.name)?;
            let c = state.checkpoint(capture.id).ok_or_else(|| {
                refused(
                    ErrorKind::Corrupt,
                    "the recovery checkpoint is not in the VM's tree",
                )
            })?;
            let config = vm::vm::read_checkpoint_config(&vm_dir, c.id)?;
            let disks: Vec<DiskSource> = config
                .hardware
                .disks
                .iter()
                .zip(&c.disks)
                .map(|(d, layer)| DiskSource {
                    name: d.name.clone(),
                    disk_id: d.disk_id,
                    top: vm_dir.join(vm::journal::DISKS_DIR).join(layer),
                    changed: frozen_changes(&vm_dir, &d.name, capture.id),
                })
                .collect();
            let checkpoint_dir = vm_dir
                .join(vm::journal::CHECKPOINTS_DIR)
                .join(c.id.to_string());
            let nvram = checkpoint_dir.join(vm::journal::CHECKPOINT_NVRAM_FILE);
            let state = checkpoint_dir.join(vm::journal::CHECKPOINT_MEMORY_FILE);
            if memory && !state.is_file() {
                return Err(refused(
                    ErrorKind::Corrupt,
                    "the recovery checkpoint has no saved state",
                ));
            }
            let freeze = Duration::from_secs_f64(capture.frozen_ms.unwrap_or(0.0) / 1000.0);
            let pause = Duration::from_secs_f64(capture.paused_ms / 1000.0);
            write_point(
                repo,
                &config,
                nvram.is_file().then_some(nvram.as_path()),
                memory.then_some(state.as_path()),
                &disks,
                opts.full,
                consistency,
                freeze,
                pause,
                started,
                progress,
            )
        })();
        vm::fsutil::crashpoint("backup create: point written");
        // The tracked sets follow the outcome before the checkpoint goes.
        let settle = Request::TrackingSettle {
            checkpoint: capture.id,
            point: result.as_ref().ok().map(|d| d.point.id.clone()),
        };
        let longest_write_ms = match self.call(dir, &settle, crate::host::LIVE_OP_TIMEOUT) {
            Ok(Reply::TrackingSettled { longest_write_ms }) => Some(longest_write_ms),
            Ok(other) => {
                tracing::warn!("{}", crate::control::unexpected(&settle, &other));
                None
            }
            Err(e) => {
                tracing::warn!(
                    "change tracking did not record the backup's end (the next backup rereads more): {}",
                    e.chain()
                );
                None
            }
        };
        let result = result.map(|done| BackedUp {
            longest_write_ms,
            ..done
        });
        // Merged away under the guest, whether or not the copy worked.
        let deleted = self.delete_checkpoint(&capture.id.to_string(), false, crate::no_progress());
        if deleted.is_ok() {
            lease.release();
        }
        match (result, deleted) {
            (Ok(done), Ok(_)) => Ok(done),
            (Ok(done), Err(e)) => {
                tracing::warn!(
                    "point {} is committed, but its recovery checkpoint {} could not be deleted (delete it with `snapvisor checkpoint delete`): {}",
                    done.point.id,
                    capture.id,
                    e.chain()
                );
                Ok(done)
            }
            (Err(e), _) => Err(e),
        }
    }

    /// Restores `point` over the VM's disks (the VM must be off). Unless `discard`, what
    /// the VM had is kept first as a checkpoint named `before restore (time)`; the VM
    /// gets a new generation ID. A restore that fails or is killed half way leaves Now
    /// partly restored: run it again, or apply the kept checkpoint.
    pub fn restore_in_place(
        &self,
        repo: &Repository,
        point: &Point,
        discard: bool,
        progress: CopyProgress,
    ) -> Result<RestoredInPlace> {
        let what = || format!("cannot restore VM {:?} in place", self.name);
        if let Some(dir) = self.live_dir() {
            let state = RunStatus::read(&dir).state;
            return Err(refused(
                ErrorKind::Busy,
                format!(
                    "VM {:?} is {state}: stop it first (`snapvisor vm stop {}`)",
                    self.name, self.name
                ),
            ))
            .with_context(what);
        }
        let mut vm = self.open_offline("backup restore").with_context(what)?;
        let point_disks = point.disks.len();
        let vm_disks = vm.state().now.disks.len();
        if point_disks != vm_disks {
            return Err(refused(
                ErrorKind::Invalid,
                format!(
                    "the point has {point_disks} disks and the VM {vm_disks}: restore it as a new VM with --as NAME"
                ),
            ))
            .with_context(what);
        }
        // A rerun after an interrupted restore keeps the checkpoint the first run took (a new
        // one would only hold half-restored disks).
        let pending = std::fs::read(vm.dir().join(RESTORE_MARKER))
            .ok()
            .and_then(|b| serde_json::from_slice::<RestoreMarker>(&b).ok())
            .filter(|m| !m.new_vm);
        let kept_before = pending
            .as_ref()
            .and_then(|m| m.kept_checkpoint.as_deref())
            .and_then(|id| id.parse::<Uuid>().ok())
            .and_then(|id| vm.state().checkpoint(id).map(|c| (id, c.name.clone())));
        let kept_as = if let Some(kept) = kept_before {
            Some(kept)
        } else if discard || pending.is_some() {
            None
        } else {
            let name = format!(
                "before restore ({})",
                vm::fsutil::format_time(vm::fsutil::now_unix())
            );
            let id = vm.create_checkpoint(Some(&name)).with_context(what)?;
            Some((id, name))
        };
        mark_restoring(
            vm.dir(),
            &RestoreMarker {
                version: RESTORE_MARKER_VERSION,
                point: point.id.clone(),
                kept_checkpoint: kept_as.as_ref().map(|(id, _)| id.to_string()),
                new_vm: false,
            },
        )
        .with_context(what)?;
        vm::fsutil::crashpoint("backup restore: in place, marked");
        let mut bytes_written = 0;
        for (i, layer) in vm.state().now.disks.clone().iter().enumerate() {
            let target = disk::open(&vm.layer_path(layer), true).with_context(what)?;
            let stats = backup::restore_into(repo, point, i, &*target, false, progress)
                .with_context(what)?;
            bytes_written += stats.bytes_written;
        }
        if let (Some(nvram), Some(_)) = (&vm.state().now.nvram, point.blob(NVRAM_BLOB)) {
            let bytes = backup::read_blob(repo, point, NVRAM_BLOB).with_context(what)?;
            let path = vm.dir().join(vm::journal::FIRMWARE_DIR).join(nvram);
            vm::fsutil::atomic_write(&path, &bytes).with_context(what)?;
        }
        // The guest's disks went back in time, as after an apply.
        let generation_id = vm.renew_generation_id().with_context(what)?;
        restore_saved_state(repo, point, vm.dir(), progress).with_context(what)?;
        unmark_restoring(vm.dir()).with_context(what)?;
        Ok(RestoredInPlace {
            kept_as,
            bytes_written,
            generation_id,
        })
    }
}

/// A `saved-state` point's state becomes the restored VM's `saved/state.vsv` (streamed,
/// written under a temporary name and linked into place last), so the VM is `saved` and
/// `vm start` resumes the guest from the point's instant, as after the apply of a
/// checkpoint with memory. Other points leave the VM off.
fn restore_saved_state(
    repo: &Repository,
    point: &Point,
    vm_dir: &Path,
    progress: CopyProgress,
) -> Result<()> {
    if point.blob(STATE_BLOB).is_none() {
        return Ok(());
    }
    let file = vm_dir.join(vm::journal::SAVED_STATE_FILE);
    let folder = file.parent().expect("in a folder");
    std::fs::create_dir_all(folder).map_err(|e| Error::io(folder, e))?;
    backup::restore_blob_to_file(repo, point, STATE_BLOB, &file, progress)?;
    Ok(())
}

impl Host {
    /// Restores `point` as a new VM named `name`: new VM id, generation ID and disk ids,
    /// so it runs beside the original. A failed restore leaves no VM behind.
    pub fn restore_as(
        &self,
        repo: &Repository,
        point: &Point,
        name: &str,
        progress: CopyProgress,
    ) -> Result<RestoredVm> {
        let what = || format!("cannot restore point {} as VM {name:?}", point.short_id());
        let bytes = backup::read_blob(repo, point, CONFIG_BLOB).with_context(what)?;
        let config = vm::config::parse_checkpoint_config(&bytes)
            .map_err(|reason| refused(ErrorKind::Corrupt, format!("its VM config: {reason}")))
            .with_context(what)?;
        let mut spec = vm::NewVm::new(name);
        spec.memory = config.hardware.memory;
        spec.cpus = config.hardware.cpus;
        spec.new_disks = point.disks.iter().map(|d| d.size).collect();
        spec.boot = config.hardware.boot.clone();
        spec.firmware = config.hardware.firmware;
        spec.checkpoint_type = config.checkpoint_type;
        spec.max_checkpoints = config.max_checkpoints;
        spec.automatic_checkpoints = config.automatic_checkpoints;
        // The VM appears carrying its marker: killed at any instant, the restore leaves no
        // VM, or one that says it is incomplete (never an empty VM that looks whole).
        spec.files.push((
            RESTORE_MARKER.to_owned(),
            marker_bytes(&RestoreMarker {
                version: RESTORE_MARKER_VERSION,
                point: point.id.clone(),
                kept_checkpoint: None,
                new_vm: true,
            }),
        ));
        // A VM left by a restore as a new VM that stopped half way is replaced.
        let existing = self.vm(name);
        if let Ok(dir) = existing.dir()
            && let Some(m) = unfinished_new_vm(&dir)
        {
            tracing::info!(
                "replacing VM {name:?}, left incomplete by a restore of point {}",
                m.point
            );
            existing.delete().with_context(what)?;
        }
        self.create_vm(&spec).with_context(what)?;
        vm::fsutil::crashpoint("backup restore: as a new VM, created and marked");
        let fill = || -> Result<RestoredVm> {
            let vm = self.store().open_vm(name, "backup restore")?;
            let state = vm.state().clone();
            let mut bytes_written = 0;
            for (i, layer) in state.now.disks.iter().enumerate() {
                let target = disk::open(&vm.layer_path(layer), true)?;
                bytes_written +=
                    backup::restore_into(repo, point, i, &*target, true, progress)?.bytes_written;
                vm::fsutil::crashpoint("backup restore: as a new VM, a disk restored");
            }
            if let (Some(nvram), Some(_)) = (&state.now.nvram, point.blob(NVRAM_BLOB)) {
                let bytes = backup::read_blob(repo, point, NVRAM_BLOB)?;
                let path = vm.dir().join(vm::journal::FIRMWARE_DIR).join(nvram);
                vm::fsutil::atomic_write(&path, &bytes)?;
            }
            restore_saved_state(repo, point, vm.dir(), progress)?;
            unmark_restoring(vm.dir())?;
            Ok(RestoredVm {
                name: name.to_owned(),
                uuid: state.config.uuid,
                generation_id: state.config.generation_id,
                disk_ids: state
                    .config
                    .hardware
                    .disks
                    .iter()
                    .map(|d| d.disk_id)
                    .collect(),
                bytes_written,
            })
        };
        match fill() {
            Ok(r) => Ok(r),
            Err(e) => {
                if let Err(cleanup) = self.store().delete(name) {
                    tracing::warn!("cannot remove the half-restored VM {name:?}: {cleanup}");
                }
                Err(e).with_context(what)
            }
        }
    }

    /// Whether `path` (or, when it does not exist yet, its nearest existing ancestor) is on
    /// the same file system as the store: a backup there dies with the VMs' disks.
    pub fn shares_file_system(&self, path: &Path) -> bool {
        use std::os::unix::fs::MetadataExt;
        let dev = |p: &Path| {
            let mut at = std::path::absolute(p).ok()?;
            loop {
                if let Ok(m) = std::fs::metadata(&at) {
                    return Some(m.dev());
                }
                at = at.parent()?.to_owned();
            }
        };
        match (dev(path), dev(self.store().root())) {
            (Some(a), Some(b)) => a == b,
            _ => false,
        }
    }
}
