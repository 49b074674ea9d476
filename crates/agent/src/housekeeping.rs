//! The agent's background upkeep and memory habits: a thread that deletes the pod veths DEL
//! retired and returns free malloc memory to the kernel (beating its liveness heartbeat each
//! round), and the glibc malloc tuning applied before any thread starts.

use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, warn};

use crate::health::{Health, Loop};

/// How often the agent deletes the pod veths that DEL retired.
const VETH_REAP_INTERVAL: Duration = Duration::from_secs(1);

/// The plugin's DEL leaves the pod's veth pair down in `dataplane::RETIRED_LINK_GROUP`
/// (deleting it would make the runtime wait ~20 ms for the kernel); this thread deletes that
/// group in one batch every [`VETH_REAP_INTERVAL`], starting now (leftovers of a previous run),
/// then returns free malloc memory to the kernel and beats [`Loop::Housekeeping`].
pub fn spawn(health: Arc<Health>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("housekeeping".into())
        .stack_size(64 * 1024)
        .spawn(move || {
            let mut last_error = None;
            loop {
                match dataplane::reap_retired_links() {
                    Ok(deleted) => {
                        if deleted {
                            debug!("deleted the retired pod veths");
                        }
                        last_error = None;
                    }
                    Err(e) => {
                        let msg = e.to_string();
                        if last_error.as_ref() != Some(&msg) {
                            warn!("deleting retired pod veths: {msg}; retrying every second");
                        }
                        last_error = Some(msg);
                    }
                }
                trim_malloc();
                health.beat(Loop::Housekeeping);
                std::thread::sleep(VETH_REAP_INTERVAL);
            }
        })
        .map(|_| ())
}

/// glibc malloc tuning. By default glibc gives each thread that allocates concurrently its own
/// arena (up to 8 per core), each keeping what is freed in it; the agent's allocations are
/// small and mostly serialised by the state's lock, so two arenas cost nothing in speed.
/// Blocks of 64 KiB and more (the checkpoint's JSON grows with the pods) are mmapped, so
/// freeing them returns them to the kernel. Call it first thing, before any thread exists.
#[cfg(target_env = "gnu")]
pub fn tune_malloc() {
    // SAFETY: mallopt only sets allocator parameters; called before any thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 * 1024);
    }
}

/// Returns the free memory of the malloc arenas to the kernel.
#[cfg(target_env = "gnu")]
fn trim_malloc() {
    // SAFETY: malloc_trim is thread-safe and only releases free memory.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// glibc malloc tuning (nothing to tune with another libc).
#[cfg(not(target_env = "gnu"))]
pub fn tune_malloc() {}

#[cfg(not(target_env = "gnu"))]
fn trim_malloc() {}
