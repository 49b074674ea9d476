//! Finding files of the repository (its `.venv`, `.cache`) from a test, the lab or a tool.

use std::path::{Path, PathBuf};

/// The places a repository-relative file is looked for, in order: `$VPC_CNI_REPO`, the current
/// directory and its parents, the parents of this executable (`<repo>/target/…`), and the
/// parents of the crate that was compiled (`CARGO_MANIFEST_DIR` at build time).
fn roots() -> Vec<PathBuf> {
    let mut roots: Vec<PathBuf> = Vec::new();
    if let Some(r) = std::env::var_os("VPC_CNI_REPO") {
        roots.push(PathBuf::from(r));
    }
    if let Ok(cwd) = std::env::current_dir() {
        roots.extend(cwd.ancestors().map(Path::to_path_buf));
    }
    if let Ok(exe) = std::env::current_exe() {
        roots.extend(exe.ancestors().skip(1).map(Path::to_path_buf));
    }
    roots.extend(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .ancestors()
            .map(Path::to_path_buf),
    );
    roots
}

/// Finds `<repo>/<rel>` (for example `.venv/bin/moto_server` or `.cache/bin/cnitool`), or
/// `None` when no root holds it.
pub fn find(rel: &str) -> Option<PathBuf> {
    roots()
        .into_iter()
        .map(|r| r.join(rel))
        .find(|p| p.exists())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_workspace_manifest_and_not_a_missing_file() {
        let p = find("crates/testkit/Cargo.toml").expect("the repository is above this crate");
        assert!(p.is_file());
        assert!(find("crates/testkit/no-such-file").is_none());
    }
}
