//! Accept loops that fail (EMFILE: out of file descriptors, ENFILE, ENOBUFS) must neither spin
//! nor flood the log: wait longer after each failure, log at most once a minute.

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
            wait: Duration::from_millis(10),
            last_log: None,
            suppressed: 0,
        }
    }
}

impl Backoff {
    const MAX: Duration = Duration::from_secs(1);
    const LOG_EVERY: Duration = Duration::from_secs(60);

    /// A failure: log it (rate-limited) and sleep, longer each time up to a second.
    pub async fn wait(&mut self, what: &str, e: &(dyn std::fmt::Display + Sync)) {
        if self.last_log.is_none_or(|t| t.elapsed() >= Self::LOG_EVERY) {
            tracing::warn!(error = %e, suppressed = self.suppressed, retry_in = ?self.wait, "{what} failed");
            self.last_log = Some(Instant::now());
            self.suppressed = 0;
        } else {
            self.suppressed += 1;
        }
        tokio::time::sleep(self.wait).await;
        self.wait = (self.wait * 2).min(Self::MAX);
    }

    pub fn reset(&mut self) {
        self.wait = Duration::from_millis(10);
    }
}
