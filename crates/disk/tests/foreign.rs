//! Images made by other tools are recognised by their signatures and refused with the
//! command that converts them, never read as raw images of their own metadata.

use disk::{ForeignFormat, Format};
use std::path::Path;
use std::process::Command;

fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img runs");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn foreign_images_are_recognised_and_refused_with_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, &[&str], ForeignFormat)] = &[
        ("q.qcow2", &["-f", "qcow2"], ForeignFormat::Qcow2),
        ("q.qed", &["-f", "qed"], ForeignFormat::Qed),
        ("d.vhd", &["-f", "vpc"], ForeignFormat::Vhd),
        // A fixed VHD keeps its only footer at the end of the file.
        (
            "f.vhd",
            &["-f", "vpc", "-o", "subformat=fixed"],
            ForeignFormat::Vhd,
        ),
        ("v.vmdk", &["-f", "vmdk"], ForeignFormat::Vmdk),
        ("v.vdi", &["-f", "vdi"], ForeignFormat::Vdi),
        (
            "l.luks",
            &[
                "-f",
                "luks",
                "--object",
                "secret,id=sec0,data=secret",
                "-o",
                "key-secret=sec0,iter-time=10",
            ],
            ForeignFormat::Luks,
        ),
        // No extension that says what it is: the signature still does.
        ("noext", &["-f", "qcow2"], ForeignFormat::Qcow2),
    ];
    for (name, args, want) in cases {
        let path = dir.path().join(name);
        let mut a = vec!["create", "-q"];
        a.extend_from_slice(args);
        a.push(path.to_str().unwrap());
        a.push("64M");
        qemu_img(&a);
        assert_eq!(
            disk::probe(&path).unwrap(),
            Format::Foreign(*want),
            "{name}"
        );
        let err = disk::open(&path, false)
            .err()
            .expect("a foreign image is refused");
        let msg = err.to_string();
        assert!(
            msg.contains(want.name()) && msg.contains("qemu-img convert -O vhdx"),
            "{name}: {msg}"
        );
        assert_eq!(err.kind(), disk::ErrorKind::Unsupported);
        // The user can still insist that it is raw.
        let raw = disk::open_as(&path, false, Some(Format::Raw)).unwrap();
        assert_eq!(raw.size(), std::fs::metadata(&path).unwrap().len());
    }
    // A raw file stays raw, a VHDX stays VHDX.
    let raw = dir.path().join("plain.img");
    std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
    assert_eq!(disk::probe(&raw).unwrap(), Format::Raw);
    let vhdx = dir.path().join("d.vhdx");
    vhdx::create(&vhdx, &vhdx::CreateParams::dynamic(1 << 26)).unwrap();
    assert_eq!(disk::probe(&vhdx).unwrap(), Format::Vhdx);
    let suggested = disk::open(Path::new(&dir.path().join("q.qcow2")), false)
        .err()
        .unwrap()
        .to_string();
    assert!(suggested.ends_with(".vhdx`"), "{suggested}");
}
