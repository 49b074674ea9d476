//! The one root check.

/// Whether this process runs as root (euid 0).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Panics with a clear message unless this process is root. Root-only tests are
/// `#[ignore = "root: …"]`; this catches `--include-ignored` without root, which must fail
/// rather than pass.
#[track_caller]
pub fn require_root() {
    assert!(
        is_root(),
        "this test needs root (it creates network namespaces or starts system services); \
         run `make test` as root, or `cargo test` without --include-ignored to skip it"
    );
}
