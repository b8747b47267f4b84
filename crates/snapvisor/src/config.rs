//! The config file: `$XDG_CONFIG_HOME/snapvisor/config.toml` (else
//! `~/.config/snapvisor/config.toml`), the lowest layer under the environment and flags.
//!
//! ```toml
//! store = "~/vms"                 # as SNAPVISOR_STORE / --store
//! repository = "/backup/repo"     # as SNAPVISOR_REPO (--repo of the backup commands)
//! accelerator = "tcg"             # as SNAPVISOR_ACCEL / vm start --accel: kvm or tcg
//! qemu = "/opt/qemu/bin/qemu-system-x86_64"   # as SNAPVISOR_QEMU
//! ```
//!
//! Each key becomes its environment variable when that variable is not set, before the
//! arguments are parsed. So a flag beats the environment, which beats the file, with one
//! mechanism everywhere, and the VM workers this binary starts inherit the values.
//!
//! The parser takes the subset of TOML these keys need (`key = "string"` or
//! `key = 'literal'`, comments, blank lines); anything else is refused with its line, so a
//! typo is never silently ignored.

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};

/// The keys, and the environment variable each stands for.
const KEYS: [(&str, &str); 4] = [
    ("store", "SNAPVISOR_STORE"),
    ("repository", "SNAPVISOR_REPO"),
    ("accelerator", "SNAPVISOR_ACCEL"),
    ("qemu", "SNAPVISOR_QEMU"),
];

/// Where the config file is looked for.
pub fn path() -> Option<PathBuf> {
    let nonempty = |v: &str| std::env::var_os(v).filter(|d| !d.is_empty());
    if let Some(d) = nonempty("XDG_CONFIG_HOME") {
        return Some(PathBuf::from(d).join("snapvisor/config.toml"));
    }
    nonempty("HOME").map(|h| PathBuf::from(h).join(".config/snapvisor/config.toml"))
}

/// Reads the config file, when there is one, into `(variable, value)` pairs.
pub fn load() -> Result<Vec<(&'static str, String)>> {
    let Some(path) = path() else {
        return Ok(Vec::new());
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    parse(&text, &path)
}

/// Sets each configured variable the environment does not already set.
///
/// Must run before any other thread exists (first thing in `main`): changing the
/// environment is only sound while nothing else can read it concurrently.
#[allow(unsafe_code)]
pub fn apply(values: &[(&'static str, String)]) {
    for (var, value) in values {
        if std::env::var_os(var).is_none() {
            // SAFETY: called at the start of `main`, before any thread is spawned.
            unsafe { std::env::set_var(var, value) };
        }
    }
}

fn parse(text: &str, path: &Path) -> Result<Vec<(&'static str, String)>> {
    let mut out: Vec<(&'static str, String)> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let at = || format!("{} line {}", path.display(), i + 1);
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((key, rest)) = line.split_once('=') else {
            bail!("{}: expected key = \"value\", found {line:?}", at());
        };
        let key = key.trim();
        let Some(&(_, var)) = KEYS.iter().find(|(k, _)| *k == key) else {
            bail!(
                "{}: unknown key {key:?} (the keys are store, repository, accelerator, qemu)",
                at()
            );
        };
        let mut value = string_value(rest.trim()).with_context(at)?;
        if key == "accelerator" && value != "kvm" && value != "tcg" {
            bail!(
                "{}: accelerator must be \"kvm\" or \"tcg\", not {value:?}",
                at()
            );
        }
        if value.is_empty() {
            bail!("{}: {key} is empty", at());
        }
        if let Some(rest) = value.strip_prefix("~/")
            && let Some(home) = std::env::var_os("HOME")
        {
            value = PathBuf::from(home)
                .join(rest)
                .to_string_lossy()
                .into_owned();
        }
        if out.iter().any(|(v, _)| *v == var) {
            bail!("{}: {key} is set twice", at());
        }
        out.push((var, value));
    }
    Ok(out)
}

/// A TOML basic (`"..."`) or literal (`'...'`) string, then only a comment.
fn string_value(s: &str) -> Result<String> {
    let mut chars = s.chars();
    let quote = chars.next();
    let mut value = String::new();
    let mut closed = false;
    match quote {
        Some('\'') => {
            for c in chars.by_ref() {
                if c == '\'' {
                    closed = true;
                    break;
                }
                value.push(c);
            }
        }
        Some('"') => {
            while let Some(c) = chars.next() {
                match c {
                    '"' => {
                        closed = true;
                        break;
                    }
                    '\\' => match chars.next() {
                        Some('\\') => value.push('\\'),
                        Some('"') => value.push('"'),
                        Some('n') => value.push('\n'),
                        Some('t') => value.push('\t'),
                        other => bail!("unsupported escape \\{}", other.unwrap_or(' ')),
                    },
                    c => value.push(c),
                }
            }
        }
        _ => bail!("the value must be a quoted string, e.g. store = \"/srv/vms\""),
    }
    if !closed {
        bail!("the string is not closed");
    }
    let rest = chars.as_str().trim();
    if !rest.is_empty() && !rest.starts_with('#') {
        bail!("unexpected {rest:?} after the value");
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Result<Vec<(&'static str, String)>> {
        parse(text, Path::new("config.toml"))
    }

    #[test]
    fn parses_the_keys_and_refuses_what_it_does_not_know() {
        let v = p("# mine\nstore = \"/srv/vms\"  # the store\n\naccelerator='tcg'\nqemu = \"/a \\\"b\\\"\"\n")
            .unwrap();
        assert_eq!(
            v,
            vec![
                ("SNAPVISOR_STORE", "/srv/vms".to_owned()),
                ("SNAPVISOR_ACCEL", "tcg".to_owned()),
                ("SNAPVISOR_QEMU", "/a \"b\"".to_owned()),
            ]
        );
        let e = p("stor = \"x\"").unwrap_err().to_string();
        assert!(
            e.contains("config.toml line 1: unknown key \"stor\""),
            "{e}"
        );
        let e = format!("{:#}", p("\nstore = /x").unwrap_err());
        assert!(e.contains("line 2") && e.contains("quoted string"), "{e}");
        let e = p("accelerator = \"hvf\"").unwrap_err().to_string();
        assert!(e.contains("kvm"), "{e}");
        assert!(p("store = \"a\"\nstore = \"b\"").is_err());
        assert!(p("[section]").is_err());
        assert!(p("store = \"open").is_err());
    }
}
