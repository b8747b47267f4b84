//! A VM's definition: identity, management settings, and the virtual hardware a
//! checkpoint captures.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use uuid::Uuid;

/// Default checkpoint limit (Hyper-V's).
pub const DEFAULT_MAX_CHECKPOINTS: u32 = 50;
/// Longest VM or checkpoint name, in characters.
pub const MAX_NAME_CHARS: usize = 100;

/// What kind of checkpoint `checkpoint create` takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum CheckpointType {
    /// Quiesce the guest through its agent; fall back to standard when it does not answer.
    #[default]
    Production,
    /// Quiesce the guest or fail.
    ProductionOnly,
    /// Keep memory and device state with the checkpoint.
    Standard,
    /// Refuse checkpoints.
    Disabled,
}

impl CheckpointType {
    /// The name used on the command line and in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            CheckpointType::Production => "production",
            CheckpointType::ProductionOnly => "production-only",
            CheckpointType::Standard => "standard",
            CheckpointType::Disabled => "disabled",
        }
    }
}

/// One virtual disk of a VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskConfig {
    /// Stable name (`disk0`, `disk1`, ...), the stem of every layer file of this disk.
    pub name: String,
    /// The VHDX virtual disk id (page 83 data) that every layer of this disk carries; a file
    /// with another id is not this disk.
    pub disk_id: Uuid,
}

/// Direct kernel boot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectBoot {
    /// Kernel image (absolute path).
    pub kernel: PathBuf,
    /// Initial ramdisk (absolute path).
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub append: String,
}

/// The firmware the VM boots with, fixed when the VM is created (as a Hyper-V VM's
/// generation is).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Firmware {
    /// SeaBIOS, QEMU's default.
    #[default]
    Bios,
    /// UEFI (OVMF), with a variable store of the VM's own that each checkpoint keeps a
    /// copy of.
    Uefi,
}

impl Firmware {
    /// The name used on the command line and in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Firmware::Bios => "bios",
            Firmware::Uefi => "uefi",
        }
    }
}

/// The virtual hardware: what a checkpoint captures and applying it brings back.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hardware {
    /// Guest memory in bytes.
    pub memory: u64,
    /// Virtual processors.
    pub cpus: u32,
    /// Disks, in the order the guest sees them.
    pub disks: Vec<DiskConfig>,
    /// Direct kernel boot, if any.
    pub boot: Option<DirectBoot>,
    /// BIOS or UEFI.
    #[serde(default)]
    pub firmware: Firmware,
}

/// A VM's whole definition.
///
/// Identity (`name`, `uuid`) and the management settings (checkpoint type, limit,
/// automatic checkpoints) belong to the VM and survive an apply; `hardware` belongs to each
/// checkpoint and comes back with it; `generation_id` changes whenever the guest's view of
/// time could go backwards (apply, import as a copy).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    /// The VM's name, also the name of its folder in the store.
    pub name: String,
    /// Stable identity.
    pub uuid: Uuid,
    /// The 128-bit VM generation ID given to the guest.
    pub generation_id: Uuid,
    /// The virtual hardware.
    pub hardware: Hardware,
    /// What `checkpoint create` takes.
    pub checkpoint_type: CheckpointType,
    /// Most checkpoints the VM may have.
    pub max_checkpoints: u32,
    /// Take a checkpoint at start when there is none, delete it after a clean shutdown.
    pub automatic_checkpoints: bool,
}

/// Checks a VM name: it names the VM's folder, so it must be a plain file name.
pub fn validate_vm_name(name: &str) -> Result<()> {
    let bad = |reason| {
        Err(Error::InvalidName {
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() || name.chars().count() > MAX_NAME_CHARS {
        return bad("a VM name has 1 to 100 characters");
    }
    if name.starts_with('.') {
        return bad("a VM name cannot start with '.'");
    }
    if name.contains('/') || name.chars().any(char::is_control) {
        return bad("a VM name cannot contain '/' or control characters");
    }
    if name.trim() != name {
        return bad("a VM name cannot start or end with spaces");
    }
    Ok(())
}

/// Checks a checkpoint name: 1 to 100 characters, no control characters.
pub fn validate_checkpoint_name(name: &str) -> Result<()> {
    let bad = |reason| {
        Err(Error::InvalidName {
            name: name.to_owned(),
            reason,
        })
    };
    if name.trim().is_empty() || name.chars().count() > MAX_NAME_CHARS {
        return bad("a checkpoint name has 1 to 100 characters, not all spaces");
    }
    if name.chars().any(char::is_control) {
        return bad("a checkpoint name cannot contain control characters");
    }
    Ok(())
}

/// Checks the values a user can set.
pub fn validate_settings(config: &VmConfig) -> Result<()> {
    let hw = &config.hardware;
    if hw.memory < (16 << 20) || !hw.memory.is_multiple_of(1 << 20) {
        return Err(Error::InvalidArgument(format!(
            "memory must be a whole number of MiB, at least 16 MiB (got {} bytes)",
            hw.memory
        )));
    }
    if hw.cpus == 0 || hw.cpus > 255 {
        return Err(Error::InvalidArgument(format!(
            "cpus must be 1 to 255 (got {})",
            hw.cpus
        )));
    }
    if config.max_checkpoints == 0 || config.max_checkpoints > 1000 {
        return Err(Error::InvalidArgument(format!(
            "the checkpoint limit must be 1 to 1000 (got {})",
            config.max_checkpoints
        )));
    }
    if let Some(boot) = &hw.boot {
        for (what, p) in [
            ("kernel", Some(&boot.kernel)),
            ("initrd", boot.initrd.as_ref()),
        ] {
            let Some(p) = p else { continue };
            if !p.is_file() {
                return Err(Error::InvalidArgument(format!(
                    "the {what} {} does not exist or is not a file",
                    p.display()
                )));
            }
        }
    }
    Ok(())
}

/// Layout version of a checkpoint's `config.json` (the VM's [`VmConfig`] as the checkpoint
/// was taken, with `"format"` beside its fields). A file without the field was written
/// before versions and has the same layout.
pub const CHECKPOINT_CONFIG_FORMAT: u32 = 1;

#[derive(Serialize, Deserialize)]
struct CheckpointConfigFile {
    #[serde(default)]
    format: u32,
    #[serde(flatten)]
    config: VmConfig,
}

/// A checkpoint's `config.json`.
pub fn checkpoint_config_bytes(config: &VmConfig) -> Vec<u8> {
    let mut bytes = serde_json::to_vec_pretty(&CheckpointConfigFile {
        format: CHECKPOINT_CONFIG_FORMAT,
        config: config.clone(),
    })
    .expect("config serializes");
    bytes.push(b'\n');
    bytes
}

/// Reads a checkpoint's `config.json`; `Err` says what is wrong with it.
pub fn parse_checkpoint_config(bytes: &[u8]) -> std::result::Result<VmConfig, String> {
    let file: CheckpointConfigFile = serde_json::from_slice(bytes)
        .map_err(|e| format!("not a valid checkpoint config ({e})"))?;
    if file.format > CHECKPOINT_CONFIG_FORMAT {
        return Err(format!(
            "checkpoint config format {} is newer than this snapvisor reads (format {CHECKPOINT_CONFIG_FORMAT})",
            file.format
        ));
    }
    Ok(file.config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_configs_without_a_format_are_read() {
        let config = VmConfig {
            name: "web".into(),
            uuid: Uuid::nil(),
            generation_id: Uuid::nil(),
            hardware: Hardware {
                memory: 1 << 30,
                cpus: 1,
                disks: Vec::new(),
                boot: None,
                firmware: Firmware::Bios,
            },
            checkpoint_type: CheckpointType::Production,
            max_checkpoints: 50,
            automatic_checkpoints: false,
        };
        let old = serde_json::to_vec(&config).unwrap();
        assert_eq!(parse_checkpoint_config(&old).unwrap(), config);
        let new = checkpoint_config_bytes(&config);
        let v: serde_json::Value = serde_json::from_slice(&new).unwrap();
        assert_eq!(v["format"], CHECKPOINT_CONFIG_FORMAT);
        assert_eq!(v["name"], "web");
        assert_eq!(parse_checkpoint_config(&new).unwrap(), config);
        let mut newer = v.clone();
        newer["format"] = 2.into();
        let e = parse_checkpoint_config(&serde_json::to_vec(&newer).unwrap()).unwrap_err();
        assert!(e.contains("newer"), "{e}");
    }

    #[test]
    fn names() {
        assert!(validate_vm_name("web-1 (test)").is_ok());
        assert!(validate_vm_name("").is_err());
        assert!(validate_vm_name(".hidden").is_err());
        assert!(validate_vm_name("a/b").is_err());
        assert!(validate_vm_name(&"x".repeat(101)).is_err());
        assert!(validate_vm_name(&"é".repeat(100)).is_ok());
        assert!(validate_checkpoint_name(&"x".repeat(100)).is_ok());
        assert!(validate_checkpoint_name(&"x".repeat(101)).is_err());
        assert!(validate_checkpoint_name("  ").is_err());
        assert!(validate_checkpoint_name("a\nb").is_err());
    }
}
