//! When the consume loop starts a flush, stops taking messages, pauses and resumes its
//! partitions: the decisions of [`crate::pipeline::Pipeline::run`], made here without Kafka or
//! a clock of their own, so that they are tested turn by turn.
//!
//! One flush runs while the next batch fills (up to `batch.max_in_flight`). When that batch is
//! full too, the loop stops taking messages (librdkafka's bounded prefetch queue fills, then
//! fetching stops); if that lasts [`FlowControl::new`]'s `pause_after` (ClickHouse slow or
//! down), the partitions are paused and the loop polls again, so that the group membership
//! and rebalances keep working. Once a flush slot frees, the partitions are resumed.

use std::time::Duration;

use tokio::time::Instant;

/// The batch being filled, at the start of a turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchState {
    pub empty: bool,
    /// At its row or byte limit.
    pub full: bool,
    /// Older than its age limit.
    pub expired: bool,
}

impl BatchState {
    /// Whether the batch should be flushed now, a flush slot permitting.
    pub fn due(&self) -> bool {
        !self.empty && (self.full || self.expired)
    }
}

/// What the loop does in one turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Turn {
    /// Hand the batch to a new flush (the next batch starts empty).
    pub start_flush: bool,
    /// Resume the partitions: they were paused, and the loop is no longer blocked.
    pub resume: bool,
    /// Wait for messages (false: back-pressure).
    pub take_messages: bool,
    /// Pause the partitions at this time unless a flush completes first.
    pub pause_at: Option<Instant>,
    /// A flush slot is free, so a batch reaching its age limit starts one: only then may the
    /// loop wait for that age. With every slot taken, an expired batch would wake the loop at
    /// once on every turn, a busy loop for as long as the flush ahead waits for ClickHouse.
    pub flush_slot_free: bool,
    /// The loop was blocked this long and no longer is (the back-pressure metric).
    pub unblocked_after: Option<Duration>,
}

#[derive(Debug)]
pub struct FlowControl {
    max_in_flight: usize,
    pause_after: Duration,
    blocked_since: Option<Instant>,
    paused: bool,
}

impl FlowControl {
    pub fn new(max_in_flight: usize, pause_after: Duration) -> Self {
        Self {
            max_in_flight,
            pause_after,
            blocked_since: None,
            paused: false,
        }
    }

    /// Whether the loop holds its partitions paused (a new assignment is paused too).
    pub fn paused(&self) -> bool {
        self.paused
    }

    /// Decides a turn, given the batch and the number of flushes under way.
    pub fn turn(&mut self, now: Instant, batch: BatchState, in_flight: usize) -> Turn {
        let start_flush = batch.due() && in_flight < self.max_in_flight;
        let in_flight = in_flight + usize::from(start_flush);
        let blocked = in_flight >= self.max_in_flight && batch.full && !start_flush;
        let mut resume = false;
        let mut unblocked_after = None;
        if !blocked {
            unblocked_after = self.blocked_since.take().map(|since| now - since);
            if self.paused {
                self.paused = false;
                resume = true;
            }
        } else if self.blocked_since.is_none() {
            self.blocked_since = Some(now);
        }
        Turn {
            start_flush,
            resume,
            take_messages: !blocked || self.paused,
            pause_at: match self.blocked_since {
                Some(since) if blocked && !self.paused => Some(since + self.pause_after),
                _ => None,
            },
            flush_slot_free: in_flight < self.max_in_flight,
            unblocked_after,
        }
    }

    /// The pause time came while still blocked: the loop pauses its partitions.
    pub fn pause(&mut self) {
        self.paused = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAUSE_AFTER: Duration = Duration::from_secs(5);
    const FILLING: BatchState = BatchState {
        empty: false,
        full: false,
        expired: false,
    };
    const FULL: BatchState = BatchState {
        empty: false,
        full: true,
        expired: false,
    };
    const EXPIRED: BatchState = BatchState {
        empty: false,
        full: false,
        expired: true,
    };
    const EMPTY: BatchState = BatchState {
        empty: true,
        full: false,
        expired: true,
    };

    #[test]
    fn a_full_or_expired_batch_flushes_while_a_slot_is_free() {
        let mut flow = FlowControl::new(1, PAUSE_AFTER);
        let now = Instant::now();
        for batch in [FULL, EXPIRED] {
            let turn = flow.turn(now, batch, 0);
            assert!(turn.start_flush && turn.take_messages, "{batch:?}");
            assert_eq!(turn.pause_at, None);
            // The slot is taken by the flush just started.
            assert!(!turn.flush_slot_free);
        }
        let turn = flow.turn(now, FILLING, 0);
        assert!(!turn.start_flush && turn.take_messages && turn.flush_slot_free);
        assert!(!flow.turn(now, EMPTY, 0).start_flush, "nothing to flush");
    }

    /// A flush in the only slot and the next batch full: stop taking messages; after
    /// `pause_after` pause the partitions and poll again; when the flush completes, resume and
    /// say how long the loop was blocked.
    #[test]
    fn a_full_batch_behind_a_slow_flush_stops_then_pauses_then_resumes() {
        let mut flow = FlowControl::new(1, PAUSE_AFTER);
        let start = Instant::now();
        let turn = flow.turn(start, FULL, 1);
        assert!(!turn.start_flush && !turn.take_messages);
        assert_eq!(turn.pause_at, Some(start + PAUSE_AFTER));
        // Later turns keep the first blocked time.
        let turn = flow.turn(start + Duration::from_secs(2), FULL, 1);
        assert_eq!(turn.pause_at, Some(start + PAUSE_AFTER));
        flow.pause();
        assert!(flow.paused());
        let turn = flow.turn(start + Duration::from_secs(6), FULL, 1);
        assert!(
            turn.take_messages,
            "paused partitions: poll for the group's sake"
        );
        assert_eq!(turn.pause_at, None);
        assert!(!turn.resume);
        // The flush completed: the full batch flushes at once, and the partitions resume.
        let turn = flow.turn(start + Duration::from_secs(9), FULL, 0);
        assert!(turn.start_flush && turn.resume && turn.take_messages);
        assert_eq!(turn.unblocked_after, Some(Duration::from_secs(9)));
        assert!(!flow.paused());
        assert_eq!(
            flow.turn(start + Duration::from_secs(9), FILLING, 1)
                .unblocked_after,
            None
        );
    }

    #[test]
    fn an_expired_batch_with_every_slot_taken_waits_for_a_flush_not_for_its_age() {
        let mut flow = FlowControl::new(2, PAUSE_AFTER);
        let turn = flow.turn(Instant::now(), EXPIRED, 2);
        assert!(!turn.start_flush && !turn.flush_slot_free);
        // Not full: messages keep coming.
        assert!(turn.take_messages && turn.pause_at.is_none());
    }

    #[test]
    fn a_blocked_spell_that_ends_before_the_pause_never_pauses() {
        let mut flow = FlowControl::new(1, PAUSE_AFTER);
        let start = Instant::now();
        assert!(!flow.turn(start, FULL, 1).take_messages);
        let turn = flow.turn(start + Duration::from_secs(1), FULL, 0);
        assert!(turn.start_flush && !turn.resume);
        assert_eq!(turn.unblocked_after, Some(Duration::from_secs(1)));
        assert!(!flow.paused());
    }
}
