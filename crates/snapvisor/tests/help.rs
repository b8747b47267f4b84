//! What a user meets around the commands: shell completions, man pages, the config file
//! and `--help`, run through the built binary as a user runs it.

use serde_json::Value;
use std::path::Path;
use std::process::{Command, Output};

/// The binary with a clean environment: no store, accelerator or QEMU from the caller, and
/// HOME and XDG_CONFIG_HOME inside `home`.
fn snapvisor(args: &[&str], home: &Path, env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_snapvisor"));
    cmd.args(args)
        .current_dir(home)
        .env_remove("SNAPVISOR_STORE")
        .env_remove("SNAPVISOR_ACCEL")
        .env_remove("SNAPVISOR_QEMU")
        .env_remove("SNAPVISOR_REPO")
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("XDG_DATA_HOME")
        .env("HOME", home);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run snapvisor")
}

fn ok(args: &[&str], home: &Path, env: &[(&str, &str)]) -> String {
    let out = snapvisor(args, home, env);
    assert!(
        out.status.success(),
        "snapvisor {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn bash_fish_and_zsh_complete_commands_and_values() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let script = ok(&["completions", "bash"], d, &[]);
    std::fs::write(d.join("snapvisor.bash"), &script).unwrap();
    // What bash does on <TAB>: the completion function fills COMPREPLY.
    let complete = |line: &str| -> String {
        let words: Vec<&str> = line.split(' ').collect();
        let program = format!(
            "source snapvisor.bash; COMP_WORDS=({}); COMP_CWORD={}; COMP_LINE='{line}'; \
             COMP_POINT={}; _snapvisor snapvisor '{}' '{}'; echo \"${{COMPREPLY[@]}}\"",
            words
                .iter()
                .map(|w| format!("'{w}'"))
                .collect::<Vec<_>>()
                .join(" "),
            words.len() - 1,
            line.len(),
            words[words.len() - 1],
            words[words.len() - 2],
        );
        let out = Command::new("bash")
            .args(["-c", &program])
            .current_dir(d)
            .output()
            .expect("bash is installed");
        String::from_utf8(out.stdout).unwrap()
    };
    let got = complete("snapvisor disk re");
    assert_eq!(
        got.split_whitespace().collect::<Vec<_>>(),
        ["read", "resize"],
        "{got}"
    );
    let got = complete("snapvisor completions ");
    for shell in ["bash", "zsh", "fish"] {
        assert!(got.split_whitespace().any(|w| w == shell), "{got}");
    }
    let got = complete("snapvisor disk set-parent --ig");
    assert_eq!(got.trim(), "--ignore-id-mismatch");
    // fish completes as a user's <TAB> would (`complete -C` asks for a command line's
    // candidates); zsh loads the script into its completion system and binds it.
    std::fs::write(
        d.join("snapvisor.fish"),
        ok(&["completions", "fish"], d, &[]),
    )
    .unwrap();
    let fish = |line: &str| -> Vec<String> {
        let out = Command::new("fish")
            .args(["-c", &format!("source snapvisor.fish; complete -C'{line}'")])
            .current_dir(d)
            .output()
            .expect("fish is installed (scripts/setup.sh)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| l.split('\t').next().unwrap().to_owned())
            .collect()
    };
    assert_eq!(fish("snapvisor disk re"), ["read", "resize"]);
    assert!(fish("snapvisor checkpoint ").iter().any(|c| c == "apply"));
    assert_eq!(
        fish("snapvisor disk set-parent --ig"),
        ["--ignore-id-mismatch"]
    );
    std::fs::write(d.join("_snapvisor"), ok(&["completions", "zsh"], d, &[])).unwrap();
    let out = Command::new("zsh")
        .args([
            "-f",
            "-c",
            "autoload -U compinit; compinit -u -d ./zcompdump; source ./_snapvisor; \
             print -r -- $_comps[snapvisor]; whence -w _snapvisor",
        ])
        .current_dir(d)
        .output()
        .expect("zsh is installed (scripts/setup.sh)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.starts_with("_snapvisor\n") && text.contains("function"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = snapvisor(&["completions", "tcsh"], d, &[]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "an unknown shell is a usage error"
    );
}

#[test]
fn man_pages_cover_every_visible_command() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = ok(&["man", "--dir", "pages"], d, &[]);
    assert!(out.contains("man pages into pages"), "{out}");
    for page in [
        "snapvisor.1",
        "snapvisor-disk.1",
        "snapvisor-disk-resize.1",
        "snapvisor-disk-set-parent.1",
        "snapvisor-vm-start.1",
        "snapvisor-checkpoint-apply.1",
        "snapvisor-completions.1",
    ] {
        assert!(d.join("pages").join(page).exists(), "{page} missing");
    }
    assert!(
        !d.join("pages/snapvisor-vm-worker.1").exists(),
        "the hidden worker has no page"
    );
    // man renders it (the roff is valid) with the command's description.
    let out = Command::new("man")
        .args(["-l", "pages/snapvisor-disk-set-parent.1"])
        .env("MANPAGER", "cat")
        .env("MANWIDTH", "200")
        .current_dir(d)
        .output()
        .expect("man is installed");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("Set-VHD") && text.contains("--ignore-id-mismatch"),
        "{text}"
    );
}

fn store_of(home: &Path, args: &[&str], env: &[(&str, &str)]) -> String {
    let mut all = args.to_vec();
    all.extend(["vm", "list", "--json"]);
    let v: Value = serde_json::from_str(&ok(&all, home, env)).unwrap();
    v["store"].as_str().unwrap().to_owned()
}

#[test]
fn the_config_file_sits_under_the_environment_and_flags() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path();
    let h = home.to_str().unwrap();
    // No file: the default store under HOME.
    assert_eq!(
        store_of(home, &[], &[]),
        format!("{h}/.local/share/snapvisor")
    );
    // ~/.config/snapvisor/config.toml, with ~ expanded.
    std::fs::create_dir_all(home.join(".config/snapvisor")).unwrap();
    std::fs::write(
        home.join(".config/snapvisor/config.toml"),
        "# my settings\nstore = \"~/vms\"\nqemu = \"/nowhere/qemu-from-config\"\n",
    )
    .unwrap();
    assert_eq!(store_of(home, &[], &[]), format!("{h}/vms"));
    // The environment beats the file, a flag beats both.
    let env = [("SNAPVISOR_STORE", "/tmp/env-store")];
    assert_eq!(store_of(home, &[], &env), "/tmp/env-store");
    let flag = format!("{h}/flag-store");
    assert_eq!(store_of(home, &["--store", &flag], &env), flag);
    // XDG_CONFIG_HOME, when set, is where the file is.
    std::fs::create_dir_all(home.join("xdg/snapvisor")).unwrap();
    std::fs::write(
        home.join("xdg/snapvisor/config.toml"),
        "store = '/tmp/xdg-store'\n",
    )
    .unwrap();
    let xdg = format!("{h}/xdg");
    assert_eq!(
        store_of(home, &[], &[("XDG_CONFIG_HOME", &xdg)]),
        "/tmp/xdg-store"
    );

    // The qemu key reaches `vm start`, and SNAPVISOR_QEMU beats it.
    ok(&["vm", "create", "web", "--disk", "16M"], home, &[]);
    let out = snapvisor(&["vm", "start", "web"], home, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("/nowhere/qemu-from-config"),
        "{err}"
    );
    let out = snapvisor(
        &["vm", "start", "web"],
        home,
        &[("SNAPVISOR_QEMU", "/nowhere/qemu-from-env")],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("/nowhere/qemu-from-env"),
        "{err}"
    );

    // A typo is an error naming the file and line, not ignored.
    std::fs::write(
        home.join(".config/snapvisor/config.toml"),
        "store = \"~/vms\"\naccel = \"tcg\"\n",
    )
    .unwrap();
    let out = snapvisor(&["vm", "list"], home, &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("config.toml line 2: unknown key \"accel\"") && err.lines().count() == 1,
        "{err}"
    );
}

#[test]
fn help_says_what_the_commands_do() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let start = ok(&["vm", "start", "--help"], d, &[]);
    assert!(start.contains("SNAPVISOR_ACCEL"), "{start}");
    let demo = ok(&["demo", "--help"], d, &[]);
    assert!(
        demo.contains("checkpoints on two") && demo.contains("scripts/demo.sh"),
        "{demo}"
    );
    let write = ok(&["disk", "write", "--help"], d, &[]);
    let path_line = write
        .lines()
        .find(|l| l.trim_start().starts_with("<PATH>"))
        .unwrap();
    assert!(path_line.trim().len() > "<PATH>".len() + 5, "{write}");
    // With the store in the environment, a usage error does not show --store as needed.
    let out = snapvisor(&["vm", "start"], d, &[("SNAPVISOR_STORE", "/tmp/s")]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Usage: snapvisor vm start <NAME>") && !err.contains("--store"),
        "{err}"
    );
}
