//! For loops that can fail repeatedly (an accept loop out of file descriptors, a flood of
//! refused connections): wait longer after each failure, and log at most once a minute with
//! the number of failures not logged. Pure: the caller sleeps and logs.

use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct Backoff {
    wait: Duration,
    last_log: Option<Instant>,
    suppressed: u64,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            wait: Backoff::FIRST,
            last_log: None,
            suppressed: 0,
        }
    }
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(10);
    const MAX: Duration = Duration::from_secs(1);
    const LOG_EVERY: Duration = Duration::from_secs(60);

    /// One more failure: how long to wait now, and whether to log it (with how many failures
    /// went unlogged since the last line).
    pub fn failed(&mut self) -> (Duration, Option<u64>) {
        let wait = self.wait;
        self.wait = (self.wait * 2).min(Self::MAX);
        (wait, self.note())
    }

    /// An event to log at a bounded rate (no waiting): `Some(unlogged before it)` when due.
    pub fn note(&mut self) -> Option<u64> {
        if self.last_log.is_none_or(|t| t.elapsed() >= Self::LOG_EVERY) {
            self.last_log = Some(Instant::now());
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }

    /// A success: the next failure waits the shortest time again.
    pub fn reset(&mut self) {
        self.wait = Self::FIRST;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_grow_to_a_second_and_logs_are_bounded() {
        let mut b = Backoff::default();
        let (w, log) = b.failed();
        assert_eq!((w, log), (Duration::from_millis(10), Some(0)));
        let waits: Vec<Duration> = (0..10).map(|_| b.failed().0).collect();
        assert_eq!(waits[0], Duration::from_millis(20));
        assert_eq!(*waits.last().unwrap(), Duration::from_secs(1));
        assert_eq!(b.note(), None, "within the minute: not logged");
        b.reset();
        assert_eq!(b.failed().0, Duration::from_millis(10));
        assert_eq!(b.suppressed, 12);
    }
}
