//! # disk: virtual disks as one trait
//!
//! [`Disk`] is what everything above the format layer uses: the NBD server, conversion,
//! backups. It is implemented for raw image files ([`RawDisk`]) and for VHDX chains
//! ([`VhdxDisk`]); [`open`] picks the right one by looking at the file.
//!
//! All methods take `&self` and may run concurrently from many threads: implementations use
//! positional I/O. Write semantics are those of a disk with a volatile write cache: a write
//! is durable once a later [`Disk::flush`] returns.
//!
//! [`convert()`] copies any disk into a new raw or VHDX file, skipping ranges that read as
//! zeros so they stay unallocated in the destination.
//!
//! With the `testing` feature, `conformance` is the suite every backend (this crate's, and
//! the served disk of a running VM in `host`) must pass.

#![forbid(unsafe_code)]

#[cfg(feature = "testing")]
pub mod conformance;
pub mod convert;
pub mod raw;

pub use convert::{ConvertOptions, OutputFormat, convert};
pub use raw::RawDisk;
pub use vhdx::{ErrorKind, Extent};

use std::path::{Path, PathBuf};

/// An error from a disk backend.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A VHDX error.
    #[error(transparent)]
    Vhdx(#[from] vhdx::Error),
    /// An I/O error on a raw file.
    #[error("i/o error on {}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A request beyond the end of the disk.
    #[error("range {offset}+{len} is beyond the end of the disk ({size} bytes)")]
    OutOfRange {
        /// Offset requested.
        offset: u64,
        /// Length requested.
        len: u64,
        /// Disk size.
        size: u64,
    },
    /// A write to a read-only disk.
    #[error("{} is open read-only", path.display())]
    ReadOnly {
        /// The file.
        path: PathBuf,
    },
    /// The destination of a conversion already exists.
    #[error("{} already exists", path.display())]
    Exists {
        /// The file.
        path: PathBuf,
    },
    /// The file is an image in a format Snapvisor does not read (it would otherwise be
    /// taken for a raw image of its own metadata).
    #[error(
        "{} is a {} image; snapvisor reads vhdx and raw images: convert it first with `qemu-img convert -O vhdx {} {}`",
        path.display(), format.name(), shell_quote(path), shell_quote(&path.with_extension("vhdx"))
    )]
    ForeignFormat {
        /// The file.
        path: PathBuf,
        /// What it is.
        format: ForeignFormat,
    },
}

/// Quotes a path for a POSIX shell when it needs it, for commands suggested in messages.
pub fn shell_quote(p: &Path) -> String {
    let s = p.to_string_lossy();
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+:,@%=".contains(&b))
    {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

impl Error {
    /// What kind of failure this is (see [`ErrorKind`]).
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Vhdx(e) => e.kind(),
            Error::Io { source, .. } => ErrorKind::of_io(source),
            Error::OutOfRange { .. } | Error::Exists { .. } => ErrorKind::Invalid,
            Error::ReadOnly { .. } => ErrorKind::ReadOnly,
            Error::ForeignFormat { .. } => ErrorKind::Unsupported,
        }
    }
}

/// Result of disk operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A virtual disk.
pub trait Disk: Send + Sync {
    /// Guest-visible size in bytes.
    fn size(&self) -> u64;
    /// Logical sector size.
    fn sector_size(&self) -> u32;
    /// Whether writes are refused.
    fn is_read_only(&self) -> bool;
    /// Reads `buf.len()` bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// Writes `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()>;
    /// Makes a range read as zeros, releasing its space where the format can.
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()>;
    /// Discards a range: it reads as zeros afterwards (never as a parent's data).
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.write_zeroes(offset, len)
    }
    /// Makes every completed write durable.
    fn flush(&self) -> Result<()>;
    /// Which parts of a range hold data and which read as zeros without stored data.
    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        check_range(self.size(), offset, len)?;
        Ok(vec![Extent::Data(len)])
    }
    /// Reads like [`Disk::read_at`], except that the parts of `buf` over ranges that read
    /// as zeros without stored data may be left as they were: those ranges are returned as
    /// [`Extent::Zero`], the rest as [`Extent::Data`], in order, covering `buf`. A caller
    /// that can send or store holes without their bytes (NBD's hole chunks) is then spared
    /// filling them; any other caller fills the `Zero` extents itself. The default reads
    /// everything and reports one data extent.
    fn read_sparse(&self, buf: &mut [u8], offset: u64) -> Result<Vec<Extent>> {
        self.read_at(buf, offset)?;
        Ok(vec![Extent::Data(buf.len() as u64)])
    }
}

pub(crate) fn check_range(size: u64, offset: u64, len: u64) -> Result<()> {
    if offset.checked_add(len).is_none_or(|e| e > size) {
        return Err(Error::OutOfRange { offset, len, size });
    }
    Ok(())
}

/// A VHDX chain as a [`Disk`].
#[derive(Debug)]
pub struct VhdxDisk {
    chain: vhdx::Chain,
    writable: bool,
}

impl VhdxDisk {
    /// Opens a VHDX file and its parents.
    pub fn open(path: &Path, writable: bool) -> Result<VhdxDisk> {
        Ok(VhdxDisk {
            chain: vhdx::Chain::open(path, writable)?,
            writable,
        })
    }
    /// Wraps an open chain.
    pub fn from_chain(chain: vhdx::Chain, writable: bool) -> VhdxDisk {
        VhdxDisk { chain, writable }
    }
    /// The chain.
    pub fn chain(&self) -> &vhdx::Chain {
        &self.chain
    }
    /// The chain, for a caller that rebuilds it (the VM worker, after a live merge).
    pub fn into_chain(self) -> vhdx::Chain {
        self.chain
    }
    /// Closes the chain cleanly.
    pub fn close(self) -> Result<()> {
        Ok(self.chain.close()?)
    }
}

impl Disk for VhdxDisk {
    fn size(&self) -> u64 {
        self.chain.virtual_size()
    }
    fn sector_size(&self) -> u32 {
        self.chain.logical_sector_size()
    }
    fn is_read_only(&self) -> bool {
        !self.writable
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        Ok(self.chain.read_at(buf, offset)?)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        Ok(self.chain.write_at(buf, offset)?)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        Ok(self.chain.write_zeroes(offset, len)?)
    }
    fn flush(&self) -> Result<()> {
        Ok(self.chain.flush()?)
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        Ok(self.chain.block_status(offset, len)?)
    }
    /// The chain's own sparse read: one walk of the block map, holes reported, not filled.
    fn read_sparse(&self, buf: &mut [u8], offset: u64) -> Result<Vec<Extent>> {
        Ok(self.chain.read_sparse(buf, offset)?)
    }
}

/// Image formats [`probe`] recognises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Raw bytes.
    Raw,
    /// VHDX.
    Vhdx,
    /// A format of another tool, recognised by its signature so that it is never read as
    /// a raw image.
    Foreign(ForeignFormat),
}

/// Image formats of other tools, recognised so that they are refused with what to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ForeignFormat {
    /// QEMU copy-on-write v2/v3.
    Qcow2,
    /// QEMU copy-on-write v1.
    Qcow,
    /// QEMU enhanced disk.
    Qed,
    /// Virtual PC / Hyper-V's older VHD (qemu-img's `vpc`).
    Vhd,
    /// VMware.
    Vmdk,
    /// VirtualBox.
    Vdi,
    /// LUKS-encrypted volume.
    Luks,
}

impl ForeignFormat {
    /// The name qemu-img uses for it.
    pub fn name(self) -> &'static str {
        match self {
            ForeignFormat::Qcow2 => "qcow2",
            ForeignFormat::Qcow => "qcow",
            ForeignFormat::Qed => "qed",
            ForeignFormat::Vhd => "vhd (vpc)",
            ForeignFormat::Vmdk => "vmdk",
            ForeignFormat::Vdi => "vdi",
            ForeignFormat::Luks => "luks",
        }
    }

    /// The format name to give `qemu-img -f`.
    pub fn qemu_name(self) -> &'static str {
        match self {
            ForeignFormat::Vhd => "vpc",
            other => other.name(),
        }
    }
}

impl Format {
    /// The lowercase name shown to users (`raw`, `vhdx`, `qcow2`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Vhdx => "vhdx",
            Format::Foreign(f) => f.name(),
        }
    }
}

/// Recognises the format of a file's first bytes (and of its last 512 bytes, where a
/// fixed VHD keeps its only footer).
fn signature_format(head: &[u8], tail: &[u8]) -> Format {
    let at = |off: usize, sig: &[u8]| head.get(off..off + sig.len()) == Some(sig);
    if at(0, vhdx::format::FILE_IDENTIFIER_SIGNATURE) {
        Format::Vhdx
    } else if at(0, b"QFI\xfb") {
        let version = head
            .get(4..8)
            .map(|v| u32::from_be_bytes(v.try_into().unwrap()));
        Format::Foreign(if version == Some(1) {
            ForeignFormat::Qcow
        } else {
            ForeignFormat::Qcow2
        })
    } else if at(0, b"QED\0") {
        Format::Foreign(ForeignFormat::Qed)
    } else if at(0, b"conectix") || tail.starts_with(b"conectix") {
        Format::Foreign(ForeignFormat::Vhd)
    } else if at(0, b"KDMV") || at(0, b"COWD") || at(0, b"# Disk DescriptorFile") {
        Format::Foreign(ForeignFormat::Vmdk)
    } else if at(0x40, &0xbeda_107f_u32.to_le_bytes()) {
        Format::Foreign(ForeignFormat::Vdi)
    } else if at(0, b"LUKS\xba\xbe") {
        Format::Foreign(ForeignFormat::Luks)
    } else {
        Format::Raw
    }
}

/// Recognises a file's format: `.vhdx` and `.avhdx` files are VHDX whatever their first
/// bytes say (so a damaged one is reported as damaged, never written as a raw image);
/// otherwise the signature decides, and a file is raw only when no known signature matches.
pub fn probe(path: &Path) -> Result<Format> {
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase());
    if matches!(ext.as_deref(), Some("vhdx" | "avhdx")) {
        return Ok(Format::Vhdx);
    }
    probe_content(path)
}

/// [`probe`] by the file's signatures alone, whatever its name says.
pub fn probe_content(path: &Path) -> Result<Format> {
    let io = |e| Error::Io {
        path: path.to_owned(),
        source: e,
    };
    let f = std::fs::File::open(path).map_err(io)?;
    let len = f.metadata().map_err(io)?.len();
    let mut head = vec![0u8; 512];
    vhdx::FileIo::read_at(&f, &mut head, 0).map_err(io)?;
    let mut tail = vec![0u8; 512];
    if len >= 1024 {
        vhdx::FileIo::read_at(&f, &mut tail, len - 512).map_err(io)?;
    }
    Ok(signature_format(&head, &tail))
}

/// Opens a raw or VHDX disk, recognising the format; an image of another tool is refused
/// with the command that converts it.
pub fn open(path: &Path, writable: bool) -> Result<Box<dyn Disk>> {
    open_as(path, writable, None)
}

/// [`open`], or with the format the user named (`--format raw` reads any file as raw).
pub fn open_as(path: &Path, writable: bool, format: Option<Format>) -> Result<Box<dyn Disk>> {
    let format = match format {
        Some(f) => f,
        None => probe(path)?,
    };
    Ok(match format {
        Format::Vhdx => Box::new(VhdxDisk::open(path, writable)?),
        Format::Raw => Box::new(RawDisk::open(path, writable)?),
        Format::Foreign(format) => {
            return Err(Error::ForeignFormat {
                path: path.to_owned(),
                format,
            });
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe_bytes(head: &[u8], tail: &[u8]) -> Format {
        let mut h = head.to_vec();
        h.resize(512, 0);
        let mut t = tail.to_vec();
        t.resize(512, 0);
        signature_format(&h, &t)
    }

    #[test]
    fn signatures() {
        assert_eq!(probe_bytes(b"vhdxfile", b""), Format::Vhdx);
        assert_eq!(
            probe_bytes(b"QFI\xfb\0\0\0\x03", b""),
            Format::Foreign(ForeignFormat::Qcow2)
        );
        assert_eq!(
            probe_bytes(b"QFI\xfb\0\0\0\x01", b""),
            Format::Foreign(ForeignFormat::Qcow)
        );
        assert_eq!(
            probe_bytes(b"", b"conectix"),
            Format::Foreign(ForeignFormat::Vhd)
        );
        assert_eq!(
            probe_bytes(b"KDMV", b""),
            Format::Foreign(ForeignFormat::Vmdk)
        );
        assert_eq!(probe_bytes(b"", b""), Format::Raw);
        assert_eq!(shell_quote(Path::new("/a/b.vhdx")), "/a/b.vhdx");
        assert_eq!(
            shell_quote(Path::new("my disk's.img")),
            "'my disk'\\''s.img'"
        );
    }

    const MIB: u64 = 1 << 20;

    /// What `read_sparse` must give: the bytes of `read_at` once its `Zero` extents are
    /// filled with zeros, and extents that cover the range.
    fn check_sparse(d: &dyn Disk, offset: u64, len: u64) -> Vec<Extent> {
        let mut want = vec![0u8; len as usize];
        d.read_at(&mut want, offset).unwrap();
        // A buffer full of something else, as a reused one would be.
        let mut buf = vec![0xee; len as usize];
        let extents = d.read_sparse(&mut buf, offset).unwrap();
        assert_eq!(extents.iter().map(|x| x.len()).sum::<u64>(), len);
        let mut at = 0usize;
        for x in &extents {
            if let Extent::Zero(n) = x {
                buf[at..at + *n as usize].fill(0);
            }
            at += x.len() as usize;
        }
        assert!(buf == want, "{offset}+{len}");
        extents
    }

    #[test]
    fn read_sparse_reads_what_read_at_reads_and_reports_the_holes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.vhdx");
        let params = vhdx::CreateParams {
            block_size: Some(MIB as u32),
            ..vhdx::CreateParams::dynamic(8 * MIB)
        };
        vhdx::create(&path, &params).unwrap();
        let d = VhdxDisk::open(&path, true).unwrap();
        d.write_at(&vec![0x5a; MIB as usize], MIB).unwrap();
        d.write_at(&[0x33; 3584], 3 * MIB + 512).unwrap();
        let x = check_sparse(&d, 0, 5 * MIB);
        assert_eq!(
            x,
            [
                Extent::Zero(MIB),
                Extent::Data(MIB),
                Extent::Zero(MIB),
                Extent::Data(MIB),
                Extent::Zero(MIB)
            ]
        );
        assert_eq!(x, d.block_status(0, 5 * MIB).unwrap());
        check_sparse(&d, MIB - 512, 1024);
        check_sparse(&d, 3 * MIB + 100, 4000);
        assert!(matches!(
            d.read_sparse(&mut [0u8; 512], 8 * MIB),
            Err(e) if e.kind() == ErrorKind::Invalid
        ));
        d.close().unwrap();

        // The default: everything read, one data extent.
        let raw_path = dir.path().join("d.raw");
        std::fs::write(&raw_path, vec![0x44; 64 << 10]).unwrap();
        let raw = RawDisk::open(&raw_path, false).unwrap();
        assert_eq!(check_sparse(&raw, 512, 4096), [Extent::Data(4096)]);
    }
}
