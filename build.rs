//! Records what a binary was built from, for `sluice -V`: the git commit, the compiler and the
//! target. Nothing here depends on the time or the directory of the build, so two checkouts of
//! one commit still build byte-identical binaries (`make repro`); outside a git tree the commit
//! is "unknown".

use std::path::Path;
use std::process::Command;

fn main() {
    let commit = git(&["rev-parse", "HEAD"]).unwrap_or_else(|| "unknown".to_string());
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_string());
    let compiler = run(Command::new(rustc).arg("-V")).unwrap_or_else(|| "unknown".to_string());
    let target = std::env::var("TARGET").unwrap_or_else(|_| "unknown".to_string());
    println!("cargo:rustc-env=SLUICE_GIT_COMMIT={commit}");
    println!("cargo:rustc-env=SLUICE_RUSTC={compiler}");
    println!("cargo:rustc-env=SLUICE_TARGET={target}");
    // Rebuilt when the checked-out commit moves, not on every source change.
    for name in ["HEAD", "packed-refs"] {
        if let Some(path) = git(&["rev-parse", "--git-path", name]) {
            if Path::new(&path).exists() {
                println!("cargo:rerun-if-changed={path}");
            }
        }
    }
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        if let Some(path) = git(&["rev-parse", "--git-path", &branch]) {
            if Path::new(&path).exists() {
                println!("cargo:rerun-if-changed={path}");
            }
        }
    }
    println!("cargo:rerun-if-changed=build.rs");
}

/// A git query about this crate's own tree; None outside one, without git, or when the crate
/// sits unpacked inside some other project's tree (that commit would not be sluice's).
fn git(args: &[&str]) -> Option<String> {
    let dir = std::env::var("CARGO_MANIFEST_DIR").ok()?;
    let ask = |args: &[&str]| run(Command::new("git").arg("-C").arg(&dir).args(args));
    let top = ask(&["rev-parse", "--show-toplevel"])?;
    let same = Path::new(&top).canonicalize().ok()? == Path::new(&dir).canonicalize().ok()?;
    if !same {
        return None;
    }
    ask(args)
}

fn run(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let text = text.trim();
    (out.status.success() && !text.is_empty()).then(|| text.to_string())
}
