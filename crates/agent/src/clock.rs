//! The agent's clock: the `now` the pool's cooldowns, allocation ages, ENI ages and intents are
//! measured with.
//!
//! Those times are checkpointed, so they must mean something across restarts, and they must
//! not move when the wall clock is stepped (NTP, an operator's `date -s`): a step backwards
//! would stretch every cooldown by the step, a step forwards would end them at once and hand
//! out an address other nodes still route to the old pod.
//!
//! - Within a process, time advances with `CLOCK_BOOTTIME` (the kernel's monotonic clock, which
//!   also counts suspend) from the wall clock's reading at start: a wall-clock step changes
//!   nothing.
//! - Each checkpoint records the agent's time with `CLOCK_BOOTTIME` and the kernel's boot id
//!   ([`ClockRecord`]). A restart within the same boot knows exactly how long the agent was
//!   down, whatever the wall clock did meanwhile, and shifts every restored time onto its own
//!   clock ([`Carry`]).
//! - Across a reboot (or from a checkpoint without the record: the reference's, or an older
//!   agent's) only the wall clock relates the two: restored times later than now (the wall
//!   clock went back) are clamped to now, so a cooldown lasts at most its full period. A wall
//!   clock that went forward across a reboot ends cooldowns early; pods do not survive a
//!   reboot, and `/var/run` (the checkpoint's home) is emptied by one.

use std::fmt;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::checkpoint::ClockRecord;

/// Where the clock's readings come from (the system's, or a test's).
pub trait TimeSource: Send + Sync + fmt::Debug {
    /// Wall clock: milliseconds since the Unix epoch.
    fn wall_ms(&self) -> u64;
    /// A clock that is never stepped (`CLOCK_BOOTTIME`), in milliseconds.
    fn mono_ms(&self) -> u64;
    /// The boot whose `mono_ms` readings compare (Linux: the kernel's boot id).
    fn boot_id(&self) -> Option<String>;
}

/// The system's clocks.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClocks;

impl TimeSource for SystemClocks {
    fn wall_ms(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }

    fn mono_ms(&self) -> u64 {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes one timespec through a valid pointer.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
        if rc != 0 {
            // Not on Linux ≥ 2.6.39; CLOCK_MONOTONIC is never stepped either.
            // SAFETY: as above.
            unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        }
        (ts.tv_sec as u64) * 1000 + (ts.tv_nsec as u64) / 1_000_000
    }

    fn boot_id(&self) -> Option<String> {
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    }
}

/// The agent's clock: the wall clock at start, advanced by the monotonic clock since.
#[derive(Clone)]
pub struct Clock {
    src: Arc<dyn TimeSource>,
    /// Agent time at `base_mono`.
    base_ms: u64,
    base_mono: u64,
    boot_id: Option<String>,
}

impl fmt::Debug for Clock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Clock")
            .field("now", &self.now())
            .field("boot_id", &self.boot_id)
            .finish()
    }
}

impl Clock {
    pub fn system() -> Clock {
        Clock::new(Arc::new(SystemClocks))
    }

    pub fn new(src: Arc<dyn TimeSource>) -> Clock {
        Clock {
            base_ms: src.wall_ms(),
            base_mono: src.mono_ms(),
            boot_id: src.boot_id(),
            src,
        }
    }

    /// Milliseconds, Unix epoch based; never goes back and ignores wall-clock steps.
    pub fn now(&self) -> u64 {
        self.base_ms
            .saturating_add(self.src.mono_ms().saturating_sub(self.base_mono))
    }

    /// The record a checkpoint carries.
    pub fn record(&self) -> ClockRecord {
        let mono = self.src.mono_ms();
        ClockRecord {
            agent_ms: self
                .base_ms
                .saturating_add(mono.saturating_sub(self.base_mono)),
            boot_ms: mono,
            boot_id: self.boot_id.clone(),
        }
    }

    /// How times written by an earlier process (with `saved` as its clock record) map onto
    /// this clock.
    pub fn carry(&self, saved: Option<&ClockRecord>) -> Carry {
        let now = self.now();
        let mono = self.src.mono_ms();
        match saved {
            Some(r) if r.boot_id.is_some() && r.boot_id == self.boot_id && mono >= r.boot_ms => {
                let down_ms = mono - r.boot_ms;
                // The earlier process's clock reads `r.agent_ms + down_ms` now.
                let then_now = i128::from(r.agent_ms) + i128::from(down_ms);
                Carry {
                    shift: i128::from(now) - then_now,
                    now,
                    how: CarryKind::SameBoot { down_ms },
                }
            }
            Some(r) => Carry {
                shift: 0,
                now,
                how: CarryKind::WallClock {
                    why: if r.boot_id.is_some() && r.boot_id == self.boot_id {
                        "the boot clock went backwards"
                    } else {
                        "written before a reboot"
                    },
                },
            },
            None => Carry {
                shift: 0,
                now,
                how: CarryKind::WallClock {
                    why: "the checkpoint has no clock record",
                },
            },
        }
    }
}

/// Maps times from a checkpoint onto this process's clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Carry {
    shift: i128,
    now: u64,
    pub how: CarryKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CarryKind {
    /// Same boot: the downtime is known exactly.
    SameBoot { down_ms: u64 },
    /// Only the wall clock relates the two processes; future times are clamped to now.
    WallClock { why: &'static str },
}

impl Carry {
    /// `t` (the earlier process's clock) on this clock, never later than now.
    pub fn map(&self, t: u64) -> u64 {
        (i128::from(t) + self.shift).clamp(0, i128::from(self.now)) as u64
    }
}

impl fmt::Display for CarryKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CarryKind::SameBoot { down_ms } => {
                write!(f, "same boot, agent down {down_ms} ms (boot clock)")
            }
            CarryKind::WallClock { why } => {
                write!(
                    f,
                    "by the wall clock ({why}); times in the future clamped to now"
                )
            }
        }
    }
}

/// A clock a test turns by hand.
#[cfg(test)]
pub mod fake {
    use std::sync::Arc;
    use std::sync::Mutex;

    use super::{Clock, TimeSource};

    #[derive(Debug)]
    pub struct FakeTime {
        inner: Mutex<(u64, u64, Option<String>)>,
    }

    impl FakeTime {
        /// Wall clock `wall_ms`, boot clock `mono_ms`, boot `boot`.
        pub fn new(wall_ms: u64, mono_ms: u64, boot: &str) -> Arc<FakeTime> {
            Arc::new(FakeTime {
                inner: Mutex::new((wall_ms, mono_ms, Some(boot.to_string()))),
            })
        }

        /// Real time passes: both clocks advance.
        pub fn advance(&self, ms: u64) {
            let mut g = self.inner.lock().unwrap();
            g.0 += ms;
            g.1 += ms;
        }

        /// The wall clock is stepped (NTP); the boot clock is not.
        pub fn step_wall(&self, delta_ms: i64) {
            let mut g = self.inner.lock().unwrap();
            g.0 = g.0.checked_add_signed(delta_ms).unwrap();
        }

        /// A reboot: a new boot id, the boot clock starts again.
        pub fn reboot(&self, boot: &str, mono_ms: u64) {
            let mut g = self.inner.lock().unwrap();
            g.1 = mono_ms;
            g.2 = Some(boot.to_string());
        }

        pub fn clock(self: &Arc<Self>) -> Clock {
            Clock::new(self.clone())
        }
    }

    impl TimeSource for FakeTime {
        fn wall_ms(&self) -> u64 {
            self.inner.lock().unwrap().0
        }
        fn mono_ms(&self) -> u64 {
            self.inner.lock().unwrap().1
        }
        fn boot_id(&self) -> Option<String> {
            self.inner.lock().unwrap().2.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::FakeTime;
    use super::*;

    const HOUR: i64 = 3_600_000;

    #[test]
    fn wall_clock_steps_do_not_move_the_agent_clock() {
        let t = FakeTime::new(1_700_000_000_000, 5_000, "b1");
        let c = t.clock();
        assert_eq!(c.now(), 1_700_000_000_000);
        t.advance(1_000);
        t.step_wall(-HOUR);
        assert_eq!(c.now(), 1_700_000_001_000);
        t.step_wall(2 * HOUR);
        t.advance(500);
        assert_eq!(c.now(), 1_700_000_001_500);
    }

    #[test]
    fn same_boot_restart_carries_times_by_the_boot_clock() {
        let t = FakeTime::new(1_700_000_000_000, 5_000, "b1");
        let first = t.clock();
        t.advance(10_000);
        let saved = first.record();
        let released = first.now() - 4_000; // released 4 s before the write
        // Down 6 s, and meanwhile the wall clock was stepped back an hour.
        t.advance(6_000);
        t.step_wall(-HOUR);
        let second = t.clock();
        let carry = second.carry(Some(&saved));
        assert_eq!(carry.how, CarryKind::SameBoot { down_ms: 6_000 });
        assert_eq!(second.now() - carry.map(released), 10_000, "4 s + 6 s ago");
        // Same with a forward step of an hour.
        t.step_wall(2 * HOUR);
        let third = t.clock();
        assert_eq!(
            third.now() - third.carry(Some(&saved)).map(released),
            10_000
        );
    }

    #[test]
    fn across_a_reboot_future_times_are_clamped_to_now() {
        let t = FakeTime::new(1_700_000_000_000, 5_000, "b1");
        let first = t.clock();
        let saved = first.record();
        let released = first.now();
        t.reboot("b2", 1_000);
        t.step_wall(-HOUR);
        let second = t.clock();
        let carry = second.carry(Some(&saved));
        assert!(matches!(carry.how, CarryKind::WallClock { .. }));
        assert_eq!(
            carry.map(released),
            second.now(),
            "clamped: at most a full cooldown"
        );
        // Without a record (the reference's checkpoint): the same.
        assert_eq!(second.carry(None).map(released), second.now());
        // A time in the past stays where the wall clock puts it.
        assert_eq!(second.carry(None).map(5), 5);
    }
}
