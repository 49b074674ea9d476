//! One deadline per call. It starts when the process starts and covers everything: reading
//! stdin, the netns probe, the agent conversation (connect, each write, each read), the
//! wiring, the logs on stderr. Every wait is for at most the time left, never a fixed timeout
//! per step, so no input, file or agent can stretch a call past its budget.

use std::ffi::OsStr;
use std::time::{Duration, Instant};

/// ADD, DEL, CHECK and GC (and any command not known yet) answer within this.
pub const CALL_BUDGET: Duration = Duration::from_secs(10);
/// STATUS answers within this.
pub const STATUS_BUDGET: Duration = Duration::from_secs(3);
/// Kept back from the budget for printing the answer and exiting.
pub const EXIT_MARGIN: Duration = Duration::from_millis(250);
/// Kept back from the agent conversation of ADD, DEL, CHECK and GC for the local work that
/// follows the answer: wiring the pod (and releasing the address when that fails), tearing
/// it down, checking it, removing garbage-collected routes.
pub const LOCAL_WORK_RESERVE: Duration = Duration::from_secs(2);

/// By when a call must be done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline {
    start: Instant,
    at: Instant,
}

impl Deadline {
    /// The budget of `CNI_COMMAND` (raw: the deadline is set before anything is validated).
    pub fn budget(command: Option<&OsStr>) -> Duration {
        match command {
            Some(c) if c == "STATUS" => STATUS_BUDGET,
            _ => CALL_BUDGET,
        }
    }

    /// The deadline of a call of `command` that started at `start`: its budget less
    /// [`EXIT_MARGIN`].
    pub fn for_command(command: Option<&OsStr>, start: Instant) -> Deadline {
        Deadline::new(start, Deadline::budget(command))
    }

    /// `budget` after `start`, less [`EXIT_MARGIN`].
    pub fn new(start: Instant, budget: Duration) -> Deadline {
        Deadline {
            start,
            at: start + budget.saturating_sub(EXIT_MARGIN),
        }
    }

    /// The instant everything must be done by.
    pub fn at(&self) -> Instant {
        self.at
    }

    /// The time left at `now` (zero once passed).
    pub fn remaining_at(&self, now: Instant) -> Duration {
        self.at.saturating_duration_since(now)
    }

    pub fn remaining(&self) -> Duration {
        self.remaining_at(Instant::now())
    }

    pub fn is_past(&self) -> bool {
        self.remaining().is_zero()
    }

    /// A deadline `reserve` earlier, keeping that much for work after the step it bounds
    /// (never before the start: a reserve larger than the budget leaves nothing).
    pub fn reserving(&self, reserve: Duration) -> Deadline {
        Deadline {
            start: self.start,
            at: self
                .at
                .checked_sub(reserve)
                .map_or(self.start, |at| at.max(self.start)),
        }
    }

    /// The time since the call started, at `now`.
    pub fn elapsed_at(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets() {
        assert_eq!(Deadline::budget(Some(OsStr::new("STATUS"))), STATUS_BUDGET);
        for c in ["ADD", "DEL", "CHECK", "GC", "VERSION", "status", "BOGUS"] {
            assert_eq!(Deadline::budget(Some(OsStr::new(c))), CALL_BUDGET, "{c}");
        }
        assert_eq!(Deadline::budget(None), CALL_BUDGET);
    }

    #[test]
    fn arithmetic() {
        let t0 = Instant::now();
        let d = Deadline::for_command(Some(OsStr::new("ADD")), t0);
        assert_eq!(d.at(), t0 + Duration::from_millis(9750));
        assert_eq!(d.remaining_at(t0), Duration::from_millis(9750));
        assert_eq!(
            d.remaining_at(t0 + Duration::from_secs(9)),
            Duration::from_millis(750)
        );
        assert_eq!(d.remaining_at(t0 + Duration::from_secs(11)), Duration::ZERO);
        assert_eq!(
            d.elapsed_at(t0 + Duration::from_secs(3)),
            Duration::from_secs(3)
        );

        let s = Deadline::for_command(Some(OsStr::new("STATUS")), t0);
        assert_eq!(s.remaining_at(t0), Duration::from_millis(2750));

        // the agent's share of an ADD keeps the reserve for the wiring
        let agent = d.reserving(LOCAL_WORK_RESERVE);
        assert_eq!(agent.at(), t0 + Duration::from_millis(7750));
        assert_eq!(agent.elapsed_at(t0), Duration::ZERO);
        // a reserve larger than the budget leaves nothing, and never goes before the start
        let none = s.reserving(Duration::from_secs(60));
        assert_eq!(none.at(), t0);
        assert_eq!(none.remaining_at(t0), Duration::ZERO);
        // a budget smaller than the exit margin is already over
        assert_eq!(
            Deadline::new(t0, Duration::from_millis(100)).remaining_at(t0),
            Duration::ZERO
        );
    }

    #[test]
    fn a_past_deadline_is_past() {
        let d = Deadline::new(Instant::now(), Duration::ZERO);
        assert!(d.is_past());
        assert_eq!(d.remaining(), Duration::ZERO);
        assert!(!Deadline::new(Instant::now(), CALL_BUDGET).is_past());
    }

    #[test]
    fn poll_timeouts_round_up() {
        use nix::poll::PollTimeout;
        let t = |d| i32::from(proto::poll_timeout(d));
        assert_eq!(t(Duration::ZERO), 0);
        assert_eq!(t(Duration::from_nanos(1)), 1);
        assert_eq!(t(Duration::from_micros(1500)), 2);
        assert_eq!(t(Duration::from_millis(7)), 7);
        assert_eq!(
            proto::poll_timeout(Duration::from_secs(u64::MAX)),
            PollTimeout::MAX
        );
    }
}
