//! The guard against a producer publishing a broken format: the service stops when too many
//! messages of a window are invalid, instead of dead-lettering a whole topic.

use crate::config::DeadLetterConfig;

/// Too many invalid messages in a window (see [`InvalidRatioGuard`]).
#[derive(Debug, thiserror::Error)]
#[error(
    "stopping: {invalid} of the last {window} messages were invalid (limit {limit:.0}%); \
     a producer is probably publishing a broken format, see the dead-letter topic"
)]
pub struct TooManyInvalid {
    pub invalid: u64,
    pub window: u64,
    pub limit: f64,
}

/// Stops the service when too many messages in a window are invalid.
#[derive(Debug)]
pub struct InvalidRatioGuard {
    window: u64,
    limit: f64,
    seen: u64,
    invalid: u64,
}

impl InvalidRatioGuard {
    pub fn new(config: &DeadLetterConfig) -> Self {
        Self {
            window: config.window_messages,
            limit: config.max_invalid_ratio,
            seen: 0,
            invalid: 0,
        }
    }

    /// Records one message; errors once the window's invalid share passes the limit.
    pub fn record(&mut self, valid: bool) -> Result<(), TooManyInvalid> {
        self.seen += 1;
        if !valid {
            self.invalid += 1;
        }
        // Tripping early is fine: the window can only get worse than this.
        if self.invalid as f64 > self.limit * self.window as f64 {
            return Err(TooManyInvalid {
                invalid: self.invalid,
                window: self.seen,
                limit: self.limit * 100.0,
            });
        }
        if self.seen >= self.window {
            self.seen = 0;
            self.invalid = 0;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(limit: f64, window: u64) -> InvalidRatioGuard {
        InvalidRatioGuard::new(&DeadLetterConfig {
            topic: "dlq".to_owned(),
            max_invalid_ratio: limit,
            window_messages: window,
        })
    }

    #[test]
    fn trips_when_the_window_has_too_many_invalid_messages() {
        let mut g = guard(0.5, 10);
        for _ in 0..5 {
            g.record(false).unwrap();
        }
        let err = g.record(false).unwrap_err();
        assert!(err.to_string().contains("6 of the last 6"), "{err}");
    }

    #[test]
    fn a_trickle_of_invalid_messages_never_trips() {
        let mut g = guard(0.1, 100);
        for i in 0..10_000 {
            g.record(i % 20 != 0).unwrap();
        }
    }
}
