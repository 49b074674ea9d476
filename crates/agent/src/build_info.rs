//! What this binary is: the crate's version and the git commit it was built from (set by
//! `build.rs`; `unknown` outside a git checkout). Shown by `--version`, logged at start and
//! exported as `vpccni_build_info{version,commit} 1`.

/// The crate's version (the workspace's).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The git commit (12 hex digits), or `unknown`.
pub const COMMIT: &str = env!("VPC_CNI_COMMIT");

/// `0.1.0 (commit 0123456789ab)`: what `vpc-cni-agent --version` prints after the name.
pub const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("VPC_CNI_COMMIT"),
    ")"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_commit_is_one_word() {
        // git's hex digits, `unknown`, or what VPC_CNI_COMMIT said: one word either way.
        assert!(
            !COMMIT.is_empty() && !COMMIT.contains(char::is_whitespace),
            "{COMMIT:?}"
        );
        assert_eq!(LONG_VERSION, format!("{VERSION} (commit {COMMIT})"));
    }
}
