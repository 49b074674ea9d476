//! Small helpers shared by the modules: namespace paths, the repository's `.cache`, latency
//! statistics (on `testkit::stats`, the one percentile definition).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::Serialize;
use testkit::stats::Summary;

/// Where `ip netns add NAME` puts a named network namespace.
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// Where libcni (containerd's CRI plugin, cnitool) caches ADD results; no option changes it.
pub const CNI_RESULTS_DIR: &str = "/var/lib/cni/results";

/// The sandbox image name `scripts/setup-clients.sh` gives the pause image.
pub const PAUSE_IMAGE: &str = "localhost/pause:lab";

/// Resolves a network namespace given as a name (`vpclab-instance1` → `/run/netns/vpclab-instance1`)
/// or as a path (anything containing `/`), and checks that it exists.
pub fn netns_path(ns: &str) -> Result<PathBuf> {
    if ns.is_empty() {
        bail!("empty network namespace name; give a name under {NETNS_RUN_DIR} or a path");
    }
    let p = if ns.contains('/') {
        PathBuf::from(ns)
    } else {
        Path::new(NETNS_RUN_DIR).join(ns)
    };
    if !p.exists() {
        bail!(
            "network namespace {ns:?} does not exist ({} is missing); create it first (ip netns add NAME) or pass an existing path",
            p.display()
        );
    }
    Ok(p)
}

/// Finds `<repo>/.cache/<rel>` for a file `scripts/setup-clients.sh` builds, looking where
/// [`testkit::repo::find`] looks: `$VPC_CNI_REPO`, the current directory and its parents, then
/// the parents of this executable (`<repo>/target/debug/vpc-cni-conformance`).
pub fn find_cache_file(rel: &str) -> Result<PathBuf> {
    match testkit::repo::find(&format!(".cache/{rel}")) {
        Some(p) => Ok(p),
        None => bail!(
            ".cache/{rel} not found under $VPC_CNI_REPO, the current directory, or this executable's parents; \
             run `bash scripts/setup-clients.sh` (as root) in the repository, or pass its path explicitly"
        ),
    }
}

/// Lists the file names in a directory (empty when it does not exist).
pub fn list_dir(dir: &Path) -> Result<Vec<String>> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("cannot list {}", dir.display())),
    };
    let mut out = Vec::new();
    for e in rd {
        let e = e.with_context(|| format!("cannot list {}", dir.display()))?;
        out.push(e.file_name().to_string_lossy().into_owned());
    }
    out.sort();
    Ok(out)
}

/// Latency statistics over a set of samples, in milliseconds rounded to microseconds (the
/// JSON shape of `cri burst`'s report).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Stats {
    pub count: usize,
    pub min_ms: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

impl Stats {
    /// Statistics of the samples; `None` when there are none.
    pub fn of(samples: &[Duration]) -> Option<Stats> {
        if samples.is_empty() {
            return None;
        }
        let ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        Some(Stats::from(&Summary::of(&ms)))
    }
}

impl From<&Summary> for Stats {
    /// A summary of millisecond samples, rounded to microseconds.
    fn from(s: &Summary) -> Stats {
        let round = |x: f64| (x * 1000.0).round() / 1000.0;
        Stats {
            count: s.n,
            min_ms: round(s.min),
            p50_ms: round(s.median),
            p99_ms: round(s.p99),
            max_ms: round(s.max),
            mean_ms: round(s.mean),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let samples: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        let s = Stats::of(&samples).unwrap();
        assert_eq!(s.count, 100);
        assert_eq!(s.min_ms, 1.0);
        assert_eq!(s.p50_ms, 50.0);
        assert_eq!(s.p99_ms, 99.0);
        assert_eq!(s.max_ms, 100.0);
        assert_eq!(s.mean_ms, 50.5);
        let one = Stats::of(&[Duration::from_millis(7)]).unwrap();
        assert_eq!((one.p50_ms, one.p99_ms), (7.0, 7.0));
        assert!(Stats::of(&[]).is_none());
    }

    #[test]
    fn netns_names_resolve_under_run_netns() {
        let err = netns_path("vpccni-rc-does-not-exist-xyz")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/run/netns/vpccni-rc-does-not-exist-xyz"),
            "{err}"
        );
        assert!(netns_path("").is_err());
        assert_eq!(
            netns_path("/proc/self/ns/net").unwrap(),
            PathBuf::from("/proc/self/ns/net")
        );
    }
}
