//! Benchmarks on the lab, driving it through the `lab` library: `perf` (the performance
//! baseline, every figure side by side with its peer in one run) and `bench` (EC2 calls by API
//! for a provisioning node), `prefixes` (prefix delegation side by side with secondary IPs) and `soak` (pod churn with faults, checked for duplicates and leaks).

use std::time::{Duration, Instant};

use anyhow::{Result, bail};

pub mod bench;
pub mod perf;
pub mod prefixes;
pub mod soak;

/// Calls `f` until it succeeds, every 200 ms for at most `limit` (a runtime retrying ADD while
/// the pool refills or the agent restarts); the last error when time runs out.
fn retry(what: &str, limit: Duration, mut f: impl FnMut() -> Result<()>) -> Result<()> {
    let t = Instant::now();
    loop {
        match f() {
            Ok(()) => return Ok(()),
            Err(e) if t.elapsed() > limit => bail!("{what} still failing after {limit:?}: {e:#}"),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}
