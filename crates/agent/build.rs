//! Build script: the git commit the agent is built from, for `--version`, the start-up log
//! line and the `vpccni_build_info` metric (`agent::build_info::COMMIT`).
//!
//! `VPC_CNI_COMMIT` in the build's environment wins (a build from a source tree without
//! `.git`, such as an image build, can pass it); else `git rev-parse --short=12 HEAD` in this
//! crate's directory; else `unknown`. The script runs again when the variable changes or HEAD
//! moves.

use std::path::{Path, PathBuf};
use std::process::Command;

fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .current_dir(dir)
        .args(args)
        .output()
        .ok()?;
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && !s.is_empty()).then_some(s)
}

fn main() {
    let dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=VPC_CNI_COMMIT");
    let from_env = std::env::var("VPC_CNI_COMMIT")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty());
    let commit = from_env
        .or_else(|| git(&dir, &["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".to_string());
    // HEAD, the branch it names and packed-refs: whichever of them moves with a commit.
    let mut watched = vec!["HEAD".to_string(), "packed-refs".to_string()];
    if let Some(branch) = git(&dir, &["symbolic-ref", "-q", "HEAD"]) {
        watched.push(branch);
    }
    for name in watched {
        if let Some(path) = git(&dir, &["rev-parse", "--git-path", &name]) {
            let path = dir.join(path);
            // A path that does not exist would make cargo run the script on every build.
            if path.exists() {
                println!("cargo:rerun-if-changed={}", path.display());
            }
        }
    }
    println!("cargo:rustc-env=VPC_CNI_COMMIT={commit}");
}
