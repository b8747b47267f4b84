//! The operation journal: `journal.json` in a VM folder, present only while a multi-step
//! operation is unfinished.
//!
//! An operation is planned in full before anything is touched: the steps it will take and
//! every state it will commit. The plan is written atomically as the journal, then the
//! steps run in order, then the journal is removed. Every step is idempotent and can
//! tell when it has already happened, so recovery after a crash is simply running the
//! whole journal again: the operation always rolls forward to its planned end.
//!
//! The order inside each plan is what keeps data safe: new files are created before a
//! commit refers to them, and files are removed only after a commit stopped referring to
//! them. Until its commit, an operation has changed nothing anyone can see; after it, the
//! remaining steps only clean up.

use crate::config::VmConfig;
use crate::error::{Error, Result};
use crate::fsutil::{self, crashpoint};
use crate::state::VmState;
use serde::{Deserialize, Serialize};
use std::path::Path;
use uuid::Uuid;
use vhdx::MergeDirection;
use vhdx::format::KEY_RELATIVE_PATH;
use vhdx::{OpenOptions, VhdxFile};

/// File name of the journal in a VM folder.
pub const JOURNAL_FILE: &str = "journal.json";
/// File name of the committed state in a VM folder.
pub const STATE_FILE: &str = "vm.json";
/// Folder of the disk layers.
pub const DISKS_DIR: &str = "disks";
/// Folder of the checkpoint folders.
pub const CHECKPOINTS_DIR: &str = "checkpoints";
/// A checkpoint's config file inside its folder.
pub const CHECKPOINT_CONFIG_FILE: &str = "config.json";
/// Folder of a running VM's sockets and its worker's record.
pub const RUN_DIR: &str = "run";
/// Folder of the serial console and the worker's and QEMU's logs.
pub const LOG_DIR: &str = "logs";
/// Folder of the saved state.
pub const SAVED_DIR: &str = "saved";
/// Folder of the UEFI variable store the VM runs with.
pub const FIRMWARE_DIR: &str = "firmware";
/// A checkpoint's copy of the UEFI variable store, inside its folder.
pub const CHECKPOINT_NVRAM_FILE: &str = "vars.fd";
/// A standard checkpoint's memory and device state (QEMU's migration stream), inside its
/// folder. Written under a temporary name and renamed once complete and synced: a
/// checkpoint that claims memory but has no such file was interrupted while its memory
/// was being written, and is removed at the next open.
pub const CHECKPOINT_MEMORY_FILE: &str = "memory.vsv";
/// How far an unfinished merge into a parent got ([`MergeProgress`]): everything the child
/// stores below an offset is in the parent and flushed. A merge run again after a crash
/// starts there; the file goes once the child is gone.
pub const MERGE_PROGRESS_FILE: &str = "merge-progress.json";
/// The saved state of a saved VM (`vm save`, or applying a checkpoint with memory): the
/// next start loads it.
pub const SAVED_STATE_FILE: &str = "saved/state.vsv";

/// Which way a journaled merge moves data; fixed when planned, because a merge that has
/// begun must finish in the direction it started.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Direction {
    /// The child's data goes into the parent, which takes the child's place.
    IntoParent,
    /// The parent's data goes into the child, which then skips the parent.
    IntoChild,
}

/// One idempotent step.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "kebab-case")]
pub enum Step {
    /// Write `checkpoints/<id>/config.json`.
    WriteCheckpointConfig {
        /// The checkpoint.
        id: Uuid,
        /// The VM's config as of the checkpoint.
        config: Box<VmConfig>,
    },
    /// Create `disks/<file>` as a differencing child of `disks/<parent>` unless it exists.
    CreateChild {
        /// The new layer.
        file: String,
        /// Its parent layer.
        parent: String,
    },
    /// Merge `disks/<child>` with its parent `disks/<parent>`.
    Merge {
        /// The parent layer.
        parent: String,
        /// The child layer.
        child: String,
        /// The direction chosen when planned.
        direction: Direction,
        /// After an into-parent merge, the child's own children, pointed at the parent.
        relink: Vec<String>,
    },
    /// Remove `disks/<file>` if it exists.
    RemoveLayer {
        /// The layer.
        file: String,
    },
    /// Copy `from` to `to` (both relative to the VM folder) unless `to` exists; the copy
    /// is written under a temporary name, synced and renamed.
    CopyFile {
        /// The source.
        from: String,
        /// The new file.
        to: String,
    },
    /// Hard-link (or, where links are refused, copy) `from` to `to`, both relative to the
    /// VM folder, unless `to` exists.
    LinkFile {
        /// The source.
        from: String,
        /// The new name.
        to: String,
    },
    /// Remove a file (relative to the VM folder) if it exists.
    RemoveFile {
        /// The file.
        path: String,
    },
    /// Remove `checkpoints/<id>/` if it exists.
    RemoveCheckpointDir {
        /// The checkpoint.
        id: Uuid,
    },
    /// Write `vm.json`, then make every layer but Now's read-only.
    Commit {
        /// The state to commit.
        state: Box<VmState>,
    },
}

/// Layout version of `journal.json` this crate writes. A journal without the field was
/// written before versions and has the same layout; a newer one is refused (its steps
/// may mean something this build does not do), naming the build that can finish it.
/// Format 2 added [`Journal::tentative`].
pub const JOURNAL_FORMAT: u32 = 2;

impl Step {
    /// Checks what a step read from disk names: layer files are plain names inside
    /// `disks/`, other paths stay inside the VM folder, and a committed state keeps its
    /// invariants. A damaged journal must not make recovery touch files elsewhere.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let layer = |name: &str| {
            if crate::state::is_plain_file_name(name) {
                Ok(())
            } else {
                Err(format!(
                    "the journal names the layer {name:?}, which is not a plain file name"
                ))
            }
        };
        let inside = |path: &str| {
            let p = Path::new(path);
            let plain = !path.is_empty()
                && p.components()
                    .all(|c| matches!(c, std::path::Component::Normal(_)));
            if plain {
                Ok(())
            } else {
                Err(format!(
                    "the journal names the path {path:?}, which is not inside the VM folder"
                ))
            }
        };
        match self {
            Step::WriteCheckpointConfig { .. } | Step::RemoveCheckpointDir { .. } => Ok(()),
            Step::CreateChild { file, parent } => layer(file).and(layer(parent)),
            Step::Merge {
                parent,
                child,
                relink,
                ..
            } => {
                layer(parent)?;
                layer(child)?;
                relink.iter().try_for_each(|r| layer(r))
            }
            Step::RemoveLayer { file } => layer(file),
            Step::CopyFile { from, to } | Step::LinkFile { from, to } => {
                inside(from).and(inside(to))
            }
            Step::RemoveFile { path } => inside(path),
            Step::Commit { state } => state
                .validate()
                .map_err(|e| format!("the journal commits an inconsistent state: {e}")),
        }
    }
}

/// A planned operation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Journal {
    /// Layout version ([`JOURNAL_FORMAT`]; 0 when absent).
    #[serde(default)]
    pub format: u32,
    /// What the user asked for, for messages (`checkpoint delete "x"`).
    pub op: String,
    /// When it started, seconds since the Unix epoch.
    pub started: u64,
    /// The steps, run in order.
    pub steps: Vec<Step>,
    /// Undone, not finished, when found before its first commit: a live checkpoint
    /// prepares its layers while the guest still runs, and only its commit (with the guest
    /// paused) is the checkpoint's instant; one whose worker died before that instant was
    /// never taken.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tentative: bool,
}

/// Progress of long steps: `(what, done, total)`.
pub type Progress<'a> = &'a mut dyn FnMut(&str, u64, u64);

impl Journal {
    /// A journal for `op`.
    pub fn new(op: impl Into<String>) -> Journal {
        Journal {
            format: JOURNAL_FORMAT,
            op: op.into(),
            started: fsutil::now_unix(),
            steps: Vec::new(),
            tentative: false,
        }
    }

    /// Reads `journal.json` of a VM folder, if there is one.
    pub fn load(vm_dir: &Path) -> Result<Option<Journal>> {
        let path = vm_dir.join(JOURNAL_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(&path, e)),
        };
        Journal::from_slice(&bytes)
            .map(Some)
            .map_err(|reason| Error::Corrupt {
                path: path.clone(),
                reason,
            })
    }

    /// Parses a journal; `Err` says what is wrong with it and what to do.
    pub fn from_slice(bytes: &[u8]) -> std::result::Result<Journal, String> {
        let journal: Journal = serde_json::from_slice(bytes).map_err(|e| {
            format!(
                "unreadable operation journal ({e}); the last committed state in vm.json is intact: move the journal away, then run `snapvisor vm consolidate` to list files the unfinished operation left"
            )
        })?;
        if journal.format > JOURNAL_FORMAT {
            return Err(format!(
                "the operation journal has format {}, newer than this snapvisor reads (format {JOURNAL_FORMAT}); finish the operation ({}) with the snapvisor that started it",
                journal.format, journal.op
            ));
        }
        for step in &journal.steps {
            step.validate()?;
        }
        Ok(journal)
    }

    /// What tells this plan from any other (progress records carry it).
    pub fn token(&self) -> String {
        format!("{} {}", self.started, self.op)
    }

    /// Writes the journal, runs every step, removes the journal.
    pub fn run(&self, vm_dir: &Path, progress: Progress<'_>) -> Result<()> {
        self.write(vm_dir)?;
        self.replay(vm_dir, progress)
    }

    /// Writes the journal (atomically): from now on the operation finishes, whatever
    /// happens.
    pub fn write(&self, vm_dir: &Path) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(self).expect("journal serializes");
        fsutil::atomic_write(&vm_dir.join(JOURNAL_FILE), &bytes)?;
        crashpoint("journal written");
        Ok(())
    }

    /// Runs the steps up to and including the first commit, leaving the journal (and the
    /// steps after the commit, which only clean up) for a later [`Journal::replay`].
    pub fn replay_through_commit(&self, vm_dir: &Path, progress: Progress<'_>) -> Result<()> {
        for step in &self.steps {
            run_step(vm_dir, self, step, progress)?;
            crashpoint("journal step done");
            if matches!(step, Step::Commit { .. }) {
                break;
            }
        }
        Ok(())
    }

    /// Runs the steps after the first commit and removes the journal: the end of an
    /// operation whose steps through the commit ran ([`Journal::replay_through_commit`]).
    pub fn replay_after_commit(&self, vm_dir: &Path, progress: Progress<'_>) -> Result<()> {
        let after = self
            .steps
            .iter()
            .position(|s| matches!(s, Step::Commit { .. }))
            .map_or(self.steps.len(), |i| i + 1);
        for step in &self.steps[after..] {
            run_step(vm_dir, self, step, progress)?;
            crashpoint("journal step done");
        }
        fsutil::remove_file(&vm_dir.join(JOURNAL_FILE))
    }

    /// Runs one of the journal's steps (a caller running them one by one).
    pub(crate) fn run_one(&self, vm_dir: &Path, step: &Step, progress: Progress<'_>) -> Result<()> {
        run_step(vm_dir, self, step, progress)?;
        crashpoint("journal step done");
        Ok(())
    }

    /// Runs every step (again) and removes the journal: the recovery path.
    pub fn replay(&self, vm_dir: &Path, progress: Progress<'_>) -> Result<()> {
        for step in &self.steps {
            run_step(vm_dir, self, step, progress)?;
            crashpoint("journal step done");
        }
        fsutil::remove_file(&vm_dir.join(JOURNAL_FILE))
    }
}

fn run_step(vm_dir: &Path, journal: &Journal, step: &Step, progress: Progress<'_>) -> Result<()> {
    let disks = vm_dir.join(DISKS_DIR);
    match step {
        Step::WriteCheckpointConfig { id, config } => {
            let dir = vm_dir.join(CHECKPOINTS_DIR).join(id.to_string());
            std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
            let bytes = crate::config::checkpoint_config_bytes(config);
            fsutil::atomic_write(&dir.join(CHECKPOINT_CONFIG_FILE), &bytes)?;
            fsutil::sync_dir_of(&dir)
        }
        Step::CreateChild { file, parent } => {
            let path = disks.join(file);
            if !path.exists() {
                vhdx::create_differencing(&path, &disks.join(parent), None)?;
            }
            Ok(())
        }
        Step::Merge {
            parent,
            child,
            direction,
            relink,
        } => run_merge(
            &disks,
            &journal.token(),
            parent,
            child,
            *direction,
            relink,
            progress,
        ),
        Step::RemoveLayer { file } => {
            let path = disks.join(file);
            if path.exists() {
                fsutil::set_read_only(&path, false)?;
            }
            fsutil::remove_file(&path)
        }
        Step::CopyFile { from, to } => {
            let to = vm_dir.join(to);
            if to.exists() {
                return Ok(());
            }
            let from = vm_dir.join(from);
            let bytes = std::fs::read(&from).map_err(|e| Error::io(&from, e))?;
            if let Some(dir) = to.parent() {
                std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
            }
            fsutil::atomic_write(&to, &bytes)
        }
        Step::LinkFile { from, to } => {
            let to = vm_dir.join(to);
            if to.exists() {
                return Ok(());
            }
            let from = vm_dir.join(from);
            if let Some(dir) = to.parent() {
                std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
            }
            if std::fs::hard_link(&from, &to).is_err() {
                let tmp = to.with_extension("partial");
                std::fs::copy(&from, &tmp).map_err(|e| Error::io(&from, e))?;
                std::fs::File::open(&tmp)
                    .and_then(|f| f.sync_all())
                    .map_err(|e| Error::io(&tmp, e))?;
                std::fs::rename(&tmp, &to).map_err(|e| Error::io(&to, e))?;
            }
            fsutil::sync_dir_of(&to)
        }
        Step::RemoveFile { path } => fsutil::remove_file(&vm_dir.join(path)),
        Step::RemoveCheckpointDir { id } => {
            fsutil::remove_dir_all(&vm_dir.join(CHECKPOINTS_DIR).join(id.to_string()))
        }
        Step::Commit { state } => {
            state.save(&vm_dir.join(STATE_FILE))?;
            crashpoint("state committed");
            for name in state.layers.keys() {
                let path = disks.join(name);
                if path.exists() {
                    fsutil::set_read_only(&path, !state.now.disks.contains(name))?;
                }
            }
            Ok(())
        }
    }
}

fn run_merge(
    disks: &Path,
    token: &str,
    parent: &str,
    child: &str,
    direction: Direction,
    relink: &[String],
    progress: Progress<'_>,
) -> Result<()> {
    let parent_path = disks.join(parent);
    let child_path = disks.join(child);
    let what = format!("merging {child} and {parent}");
    let mut report = |done, total| progress(&what, done, total);
    match direction {
        Direction::IntoParent => {
            // The engine removes the child only once the parent holds all of its data; a run
            // interrupted before that resumes where its last flush left it.
            let vm_dir = disks.parent().unwrap_or(disks);
            if child_path.exists() {
                fsutil::set_read_only(&parent_path, false)?;
                fsutil::set_read_only(&child_path, false)?;
                crashpoint("merge into parent: starting");
                let start = merge_progress(vm_dir, token, child);
                vhdx::merge_into_parent_from(&child_path, start, &mut report, &mut |d| {
                    if let Err(e) = record_merge_progress(vm_dir, token, child, d) {
                        tracing::warn!("recording the progress of merging {child}: {e}");
                    }
                    crashpoint("merge into parent: progress recorded");
                })?;
            }
            fsutil::remove_file(&vm_dir.join(MERGE_PROGRESS_FILE))?;
            for r in relink {
                let path = disks.join(r);
                fsutil::set_read_only(&path, false)?;
                vhdx::relink(&path, &parent_path)?;
                crashpoint("merge into parent: relinked a dependant");
            }
        }
        Direction::IntoChild => {
            // Done once the child no longer names the parent (it then names the grandparent,
            // or nothing when the parent was a base disk).
            if parent_path.exists() && locator_parent_name(&child_path)?.as_deref() == Some(parent)
            {
                fsutil::set_read_only(&child_path, false)?;
                crashpoint("merge into child: starting");
                vhdx::merge_unchecked(&child_path, MergeDirection::IntoChild, &mut report)?;
            }
        }
    }
    Ok(())
}

/// The file name a differencing file's locator gives as its parent's relative path.
pub fn locator_parent_name(path: &Path) -> Result<Option<String>> {
    let file = VhdxFile::open(path, OpenOptions::default())?;
    Ok(file
        .parent_locator()
        .and_then(|l| l.get(KEY_RELATIVE_PATH).map(str::to_owned))
        .and_then(|p| p.rsplit(['\\', '/']).next().map(str::to_owned)))
}

/// Layout version of `merge-progress.json`. A record without the field was written before
/// versions and has the same layout; a newer one is ignored (the merge starts over, which
/// is always safe).
pub const MERGE_PROGRESS_FORMAT: u32 = 1;

/// `merge-progress.json`: how far a merge into a parent got.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MergeProgress {
    /// Layout version ([`MERGE_PROGRESS_FORMAT`]; 0 when absent).
    #[serde(default)]
    pub format: u32,
    /// The journal that planned the merge ([`Journal::token`]).
    pub journal: String,
    /// The child being merged into its parent.
    pub child: String,
    /// Everything the child stores below this offset is in the parent and flushed.
    pub durable: u64,
}

/// Where an interrupted merge of `child` into its parent, planned by the journal that
/// `token` names ([`Journal::token`]), can resume (0: from the start). Progress of any
/// other plan says nothing: the child may have been written since.
pub fn merge_progress(vm_dir: &Path, token: &str, child: &str) -> u64 {
    std::fs::read(vm_dir.join(MERGE_PROGRESS_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice::<MergeProgress>(&b).ok())
        .filter(|p| p.format <= MERGE_PROGRESS_FORMAT && p.child == child && p.journal == token)
        .map_or(0, |p| p.durable)
}

/// Records that everything `child` stores below `durable` is in its parent and flushed,
/// for the journal that `token` names.
pub fn record_merge_progress(vm_dir: &Path, token: &str, child: &str, durable: u64) -> Result<()> {
    let bytes = serde_json::to_vec(&MergeProgress {
        format: MERGE_PROGRESS_FORMAT,
        journal: token.to_owned(),
        child: child.to_owned(),
        durable,
    })
    .expect("serializes");
    fsutil::atomic_write(&vm_dir.join(MERGE_PROGRESS_FILE), &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journals_without_a_format_are_read_and_newer_ones_refused() {
        let old = br#"{"op": "checkpoint delete \"a\"", "started": 5, "steps": [{"step": "remove-layer", "file": "disk0_abc.avhdx"}]}"#;
        let j = Journal::from_slice(old).unwrap();
        assert_eq!((j.format, j.steps.len()), (0, 1));
        let newer = br#"{"format": 3, "op": "x", "started": 5, "steps": []}"#;
        let e = Journal::from_slice(newer).unwrap_err();
        assert!(
            e.contains("format 3") && e.contains("snapvisor that started it"),
            "{e}"
        );
        let format_1 = br#"{"format": 1, "op": "x", "started": 5, "steps": []}"#;
        assert!(!Journal::from_slice(format_1).unwrap().tentative);
        let mut fresh = Journal::new("checkpoint create");
        fresh.steps.push(Step::RemoveFile {
            path: "firmware/vars_1.fd".into(),
        });
        let bytes = serde_json::to_vec(&fresh).unwrap();
        assert_eq!(Journal::from_slice(&bytes).unwrap(), fresh);
        assert_eq!(fresh.format, JOURNAL_FORMAT);
    }

    #[test]
    fn journals_naming_files_outside_the_vm_folder_are_refused() {
        for step in [
            r#"{"step": "remove-file", "path": "../../etc/passwd"}"#,
            r#"{"step": "remove-file", "path": "/etc/passwd"}"#,
            r#"{"step": "remove-layer", "file": "../disk0.vhdx"}"#,
            r#"{"step": "copy-file", "from": "firmware/a", "to": "saved/../../x"}"#,
            r#"{"step": "create-child", "file": "a/b.avhdx", "parent": "disk0.vhdx"}"#,
        ] {
            let j = format!(r#"{{"format": 1, "op": "x", "started": 1, "steps": [{step}]}}"#);
            let e = Journal::from_slice(j.as_bytes()).unwrap_err();
            assert!(e.contains("not"), "{step}: {e}");
        }
    }

    #[test]
    fn merge_progress_without_a_format_is_read_and_a_newer_one_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let progress = dir.path().join(MERGE_PROGRESS_FILE);
        std::fs::write(
            &progress,
            br#"{"journal": "1 op", "child": "c.avhdx", "durable": 4096}"#,
        )
        .unwrap();
        assert_eq!(merge_progress(dir.path(), "1 op", "c.avhdx"), 4096);
        assert_eq!(merge_progress(dir.path(), "2 op", "c.avhdx"), 0);
        std::fs::write(
            &progress,
            br#"{"format": 9, "journal": "1 op", "child": "c.avhdx", "durable": 4096}"#,
        )
        .unwrap();
        assert_eq!(merge_progress(dir.path(), "1 op", "c.avhdx"), 0);
        record_merge_progress(dir.path(), "1 op", "c.avhdx", 8192).unwrap();
        let written: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&progress).unwrap()).unwrap();
        assert_eq!(written["format"], MERGE_PROGRESS_FORMAT);
        assert_eq!(merge_progress(dir.path(), "1 op", "c.avhdx"), 8192);
    }
}
