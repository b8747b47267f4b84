//! The QEMU command line for a VM whose disks are served over NBD.

use std::ffi::OsString;
use std::path::PathBuf;

/// How the guest's instructions run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualization.
    Kvm,
    /// QEMU's emulator (works everywhere, slower).
    Tcg,
}

impl Accel {
    /// QEMU's name for it (`-accel kvm`), also used on Snapvisor's command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }

    /// The accelerator of that name.
    pub fn from_name(name: &str) -> Option<Accel> {
        match name {
            "kvm" => Some(Accel::Kvm),
            "tcg" => Some(Accel::Tcg),
            _ => None,
        }
    }
}

/// One disk, served over NBD on a unix socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NbdDisk {
    /// The server's socket.
    pub socket: PathBuf,
    /// The export name.
    pub export: String,
}

/// Everything the command line says about a VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MachineSpec {
    /// Shown as the process name and in QEMU's own messages.
    pub name: String,
    /// SMBIOS UUID.
    pub uuid: String,
    /// The 128-bit VM generation ID given to the guest through `vmgenid`.
    pub generation_id: String,
    /// Machine type (store the versioned name, `pc-i440fx-7.2`: a saved state records it).
    pub machine: String,
    /// Accelerator.
    pub accel: Accel,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Virtual processors.
    pub cpus: u32,
    /// Direct kernel boot: kernel, initrd, command line.
    pub kernel: Option<(PathBuf, Option<PathBuf>, String)>,
    /// UEFI: OVMF's code (read-only) and the VM's own variable store (written by the
    /// guest); `None` boots SeaBIOS.
    pub uefi: Option<(PathBuf, PathBuf)>,
    /// Disks in the order the guest sees them (virtio-blk).
    pub disks: Vec<NbdDisk>,
    /// The QMP socket QEMU listens on.
    pub qmp_socket: PathBuf,
    /// The host side of the guest-agent channel, if any.
    pub agent_socket: Option<PathBuf>,
    /// Where the serial console's output is logged (all of it, whether or not a client
    /// is attached to `console_socket`).
    pub serial_log: PathBuf,
    /// A unix socket QEMU listens on for one client of the serial console (input and
    /// output); `None` writes the console to `serial_log` only.
    pub console_socket: Option<PathBuf>,
    /// Start paused (`-S`).
    pub paused: bool,
    /// Wait for a saved state (`-incoming defer`, then `migrate-incoming`).
    pub incoming: bool,
}

impl MachineSpec {
    /// The arguments after the program name.
    pub fn args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        push(&mut a, "-name");
        push(
            &mut a,
            &format!(
                "{},process=snapvisor-{}",
                self.name.replace(',', ",,"),
                self.name.replace(',', ",,")
            ),
        );
        push(&mut a, "-uuid");
        push(&mut a, &self.uuid);
        push(&mut a, "-machine");
        push(&mut a, &self.machine);
        push(&mut a, "-accel");
        push(&mut a, self.accel.as_str());
        push(&mut a, "-m");
        push(&mut a, &format!("{}M", self.memory_mib));
        push(&mut a, "-smp");
        push(&mut a, &self.cpus.to_string());
        for s in [
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ] {
            push(&mut a, s);
        }
        if self.paused {
            push(&mut a, "-S");
        }
        if self.incoming {
            push(&mut a, "-incoming");
            push(&mut a, "defer");
        }
        match &self.console_socket {
            Some(sock) => {
                // QEMU logs every byte the guest writes to `logfile`, also while no client
                // is connected (the socket write fails, the log write does not), and
                // listens again when a client goes: the guest never waits for a reader.
                a.push("-chardev".into());
                let mut c = opt("socket,id=serial0,server=on,wait=off,path=", sock);
                c.push(",logfile=");
                c.push(escape_commas(&self.serial_log));
                c.push(",logappend=on");
                a.push(c);
                push(&mut a, "-serial");
                push(&mut a, "chardev:serial0");
            }
            None => {
                push(&mut a, "-serial");
                a.push(opt("file:", &self.serial_log));
            }
        }
        push(&mut a, "-qmp");
        let mut q = opt("unix:", &self.qmp_socket);
        q.push(",server=on,wait=off");
        a.push(q);
        if let Some((code, vars)) = &self.uefi {
            a.push("-drive".into());
            let mut d = OsString::from("if=pflash,format=raw,unit=0,readonly=on,file=");
            d.push(escape_commas(code));
            a.push(d);
            a.push("-drive".into());
            let mut d = OsString::from("if=pflash,format=raw,unit=1,file=");
            d.push(escape_commas(vars));
            a.push(d);
        }
        if let Some((kernel, initrd, append)) = &self.kernel {
            a.push("-kernel".into());
            a.push(kernel.into());
            if let Some(i) = initrd {
                a.push("-initrd".into());
                a.push(i.into());
            }
            a.push("-append".into());
            a.push(append.into());
        }
        for (i, d) in self.disks.iter().enumerate() {
            a.push("-blockdev".into());
            let mut b = OsString::from("driver=nbd,server.type=unix,server.path=");
            b.push(escape_commas(&d.socket));
            b.push(format!(
                ",export={},node-name=nbd{i},discard=unmap",
                d.export
            ));
            a.push(b);
            a.push("-blockdev".into());
            a.push(format!("driver=raw,file=nbd{i},node-name=disk{i},discard=unmap").into());
            a.push("-device".into());
            a.push(format!("virtio-blk-pci,drive=disk{i},id=vblk{i}").into());
        }
        if let Some(agent) = &self.agent_socket {
            a.push("-device".into());
            a.push("virtio-serial-pci,id=vser0".into());
            a.push("-chardev".into());
            let mut c = OsString::from("socket,id=qga0,server=on,wait=off,path=");
            c.push(escape_commas(agent));
            a.push(c);
            a.push("-device".into());
            a.push("virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0".into());
        }
        a.push("-device".into());
        a.push(format!("vmgenid,id=vgid0,guid={}", self.generation_id).into());
        a
    }
}

fn push(a: &mut Vec<OsString>, s: &str) {
    a.push(s.into());
}

fn escape_commas(p: &std::path::Path) -> OsString {
    // QEMU option values escape a comma by doubling it.
    p.as_os_str().to_string_lossy().replace(',', ",,").into()
}

fn opt(prefix: &str, p: &std::path::Path) -> OsString {
    let mut s = OsString::from(prefix);
    s.push(escape_commas(p));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_disks_agent_and_generation_id() {
        let spec = MachineSpec {
            name: "web".into(),
            uuid: "6f1d1a2e-0000-4000-8000-000000000001".into(),
            generation_id: "5a9e1f00-1234-4cde-8f00-0123456789ab".into(),
            machine: "pc".into(),
            accel: Accel::Tcg,
            memory_mib: 256,
            cpus: 2,
            kernel: Some(("/k".into(), None, "console=ttyS0".into())),
            uefi: Some(("/fw/code.fd".into(), "/vm/firmware/vars,1.fd".into())),
            disks: vec![NbdDisk {
                socket: "/run/a,b.sock".into(),
                export: "disk0".into(),
            }],
            qmp_socket: "/run/qmp.sock".into(),
            agent_socket: Some("/run/qga.sock".into()),
            serial_log: "/log/serial.log".into(),
            console_socket: Some("/run/console.sock".into()),
            paused: false,
            incoming: false,
        };
        let args: Vec<String> = spec
            .args()
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        let joined = args.join(" ");
        assert!(joined.contains("-accel tcg -m 256M -smp 2"), "{joined}");
        assert!(
            joined.contains("server.path=/run/a,,b.sock,export=disk0,node-name=nbd0"),
            "{joined}"
        );
        assert!(joined.contains("vmgenid,id=vgid0,guid=5a9e1f00-1234-4cde-8f00-0123456789ab"));
        assert!(joined.contains("name=org.qemu.guest_agent.0"));
        assert!(joined.contains("if=pflash,format=raw,unit=0,readonly=on,file=/fw/code.fd"));
        assert!(joined.contains("if=pflash,format=raw,unit=1,file=/vm/firmware/vars,,1.fd"));
        assert!(joined.contains(
            "-chardev socket,id=serial0,server=on,wait=off,path=/run/console.sock,logfile=/log/serial.log,logappend=on -serial chardev:serial0"
        ), "{joined}");
        assert!(!args.contains(&"-initrd".to_string()));
        assert!(!args.contains(&"-S".to_string()));
    }
}
