//! Whether this replica makes progress, and what `/healthz` and `/readyz` say about it.
//!
//! A watchdog reads, every `liveness.check_interval_ms`, each assigned partition's committed
//! offset, position and end offset from Kafka, independently of the consume loop (a loop that
//! hangs cannot vouch for itself). A partition progresses when its committed offset moves or it is
//! caught up. A partition with lag that has not progressed for `liveness.stall_after_ms` makes the
//! replica stuck: `/healthz` fails, so that Kubernetes restarts the pod, and the reason is logged
//! at `error`. While Kafka or ClickHouse does not answer the replica is waiting, not stuck: a
//! restart would not help, `/readyz` says what it waits for, and the stall clock stops.
//!
//! Longer than most modules: the watchdog's verdicts are one state machine, kept whole with the
//! partition-by-partition evidence they read.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use audit_store::clickhouse;
use rdkafka::consumer::Consumer;
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::LivenessConfig;
use crate::kafka::{IngestConsumer, PartitionKey};
use crate::locked;
use crate::metrics::IngestMetrics;

/// What the replica says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// Not checked yet, or not in the consumer group yet.
    Starting,
    /// Every assigned partition progressed within `stall_after` (or none is assigned).
    Progressing,
    /// Kafka or ClickHouse does not answer; nothing counts as a stall meanwhile.
    Waiting { reason: String },
    /// Partitions with lag made no progress for `stall_after`.
    Stuck { reason: String },
    /// Partitions stopped at a record batch the consumer cannot decode: a restart cannot help,
    /// so `/healthz` stays up and `/readyz` names them.
    Blocked { reason: String },
}

/// One assigned partition as the watchdog read it from Kafka.
#[derive(Debug, Clone)]
pub struct PartitionReading {
    pub partition: PartitionKey,
    /// When this member was last given the partition.
    pub assigned_at: Instant,
    /// The group's committed offset; None when nothing was ever committed.
    pub committed: Option<i64>,
    /// The next offset the consume loop will receive (librdkafka's position, which also moves
    /// past transaction markers); None when nothing was received since the assignment.
    pub position: Option<i64>,
    /// The first offset still in the log (older ones were deleted by retention).
    pub start: i64,
    /// The end offset a `read_committed` consumer can reach (the last stable offset).
    pub end: i64,
}

/// A record batch the consumer could not decode, as the consume loop reported it (librdkafka
/// names the error, not the partition: the watchdog finds the partition that stopped).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Undecodable {
    pub cause: String,
}

impl PartitionReading {
    /// How far everything is durable: the committed offset, or the start of the log when
    /// nothing (still retained) was committed.
    fn durable_to(&self) -> i64 {
        self.committed.unwrap_or(self.start).max(self.start)
    }

    /// Caught up: nothing left to read and nothing read left to commit. `holding` says whether
    /// the consume loop holds messages not committed yet; when it holds none, a position at the
    /// end counts too (the committed offset of a transactional topic stops before the final
    /// commit marker, which the position steps over).
    fn caught_up(&self, holding: bool) -> bool {
        self.durable_to() >= self.end
            || (!holding && self.position.is_some_and(|position| position >= self.end))
    }

    fn lag(&self) -> i64 {
        let read_to = self.durable_to().max(self.position.unwrap_or(0));
        (self.end - read_to).max(0)
    }

    fn name(&self) -> String {
        let (topic, partition) = &self.partition;
        format!("{topic}[{partition}]")
    }

    fn describe(&self) -> String {
        let (topic, partition) = &self.partition;
        format!(
            "{topic}[{partition}] (committed {}, position {}, end {}, lag {})",
            self.committed.map_or("none".to_owned(), |c| c.to_string()),
            self.position.map_or("none".to_owned(), |p| p.to_string()),
            self.end,
            self.lag()
        )
    }
}

/// One reading of the whole assignment.
#[derive(Debug, Clone)]
pub struct Reading {
    pub at: Instant,
    pub partitions: Vec<PartitionReading>,
    /// The consume loop holds messages not committed yet (a batch filling or a flush under way).
    pub holding: bool,
    /// A batch could not be decoded since the previous reading.
    pub undecodable: Option<Undecodable>,
}

/// The verdict on one reading.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub health: Health,
    /// The oldest last-progress (or assignment) time over the assigned partitions; the
    /// reading's time when none is assigned or all are caught up.
    pub last_progress: Instant,
    /// Partitions stopped at a batch that cannot be decoded.
    pub blocked: usize,
}

/// Per partition, since when it has gone without progress. A plain struct fed with readings, so
/// that the rule can be tested without Kafka.
#[derive(Debug)]
pub struct ProgressTracker {
    stall_after: Duration,
    partitions: HashMap<PartitionKey, Tracked>,
    /// The end of the last wait for a dependency: no stall clock starts before it, also for a
    /// partition first read after the wait.
    waited_until: Option<Instant>,
}

#[derive(Debug)]
struct Tracked {
    committed: Option<i64>,
    /// The position at the previous reading.
    position: Option<i64>,
    /// The stall clock: last progress, (re)assignment or end of a wait for a dependency.
    stall_since: Instant,
    /// Last progress or (re)assignment: what the metric reports.
    progressed_at: Instant,
}

impl ProgressTracker {
    pub fn new(stall_after: Duration) -> Self {
        Self {
            stall_after,
            partitions: HashMap::new(),
            waited_until: None,
        }
    }

    /// Judges one reading: a partition progressed if its committed offset moved since the last
    /// reading or it is caught up; a (re)assigned partition starts a fresh clock.
    pub fn observe(&mut self, reading: &Reading) -> Verdict {
        self.partitions.retain(|key, _| {
            reading
                .partitions
                .iter()
                .any(|partition| &partition.partition == key)
        });
        let mut stuck = Vec::new();
        let mut blocked = Vec::new();
        let mut last_progress = reading.at;
        for partition in &reading.partitions {
            let tracked = self
                .partitions
                .entry(partition.partition.clone())
                .or_insert(Tracked {
                    committed: partition.committed,
                    position: None,
                    stall_since: partition.assigned_at,
                    progressed_at: partition.assigned_at,
                });
            tracked.stall_since = tracked
                .stall_since
                .max(partition.assigned_at)
                .max(self.waited_until.unwrap_or(partition.assigned_at));
            tracked.progressed_at = tracked.progressed_at.max(partition.assigned_at);
            let moved = partition.committed > tracked.committed;
            let read_on = partition.position != tracked.position;
            tracked.committed = partition.committed;
            tracked.position = partition.position;
            let caught_up = partition.caught_up(reading.holding);
            if moved || caught_up {
                tracked.stall_since = reading.at;
                tracked.progressed_at = reading.at;
            }
            match &reading.undecodable {
                // Batches failed to decode and this partition, with lag, received nothing since
                // the last reading: it is the one stopped at such a batch. Not a stall: a
                // restart would meet the same batch.
                Some(undecodable) if !caught_up && !read_on && !moved => {
                    tracked.stall_since = reading.at;
                    blocked.push(format!(
                        "{} cannot be decoded at offset {}: {}",
                        partition.name(),
                        partition
                            .position
                            .or(partition.committed)
                            .map_or("unknown".to_owned(), |o| o.to_string()),
                        undecodable.cause
                    ));
                }
                _ => {
                    if reading.at.saturating_duration_since(tracked.stall_since) > self.stall_after
                    {
                        stuck.push(partition.describe());
                    }
                }
            }
            last_progress = last_progress.min(tracked.progressed_at);
        }
        let health = if !stuck.is_empty() {
            Health::Stuck {
                reason: format!(
                    "no progress for more than {} s on {} partition(s) with lag: {}",
                    self.stall_after.as_secs(),
                    stuck.len(),
                    stuck.join(", ")
                ),
            }
        } else if !blocked.is_empty() {
            Health::Blocked {
                reason: format!(
                    "{} partition(s) stopped at a record batch that cannot be decoded (nothing behind it is skipped): {}",
                    blocked.len(),
                    blocked.join("; ")
                ),
            }
        } else {
            Health::Progressing
        };
        Verdict {
            health,
            last_progress,
            blocked: blocked.len(),
        }
    }

    /// A dependency does not answer: the time spent waiting for it is not a stall, so every
    /// stall clock starts again from `at`, including those of partitions not read yet. The
    /// last progress stays what it was.
    pub fn wait(&mut self, at: Instant, reason: String) -> Verdict {
        self.waited_until = Some(self.waited_until.map_or(at, |until| until.max(at)));
        let mut last_progress = at;
        for tracked in self.partitions.values() {
            last_progress = last_progress.min(tracked.progressed_at);
        }
        Verdict {
            health: Health::Waiting { reason },
            last_progress,
            blocked: 0,
        }
    }
}

/// What the consume loop, the watchdog and the ops listener share.
#[derive(Debug)]
pub struct LivenessState {
    health: Mutex<Health>,
    holding: AtomicBool,
    /// The last undecodable batch the consume loop reported since the watchdog last looked.
    undecodable: Mutex<Option<Undecodable>>,
    undecodable_logged: Mutex<Option<Instant>>,
}

impl Default for LivenessState {
    fn default() -> Self {
        Self {
            health: Mutex::new(Health::Starting),
            holding: AtomicBool::new(false),
            undecodable: Mutex::new(None),
            undecodable_logged: Mutex::new(None),
        }
    }
}

impl LivenessState {
    pub fn health(&self) -> Health {
        locked(&self.health).clone()
    }

    fn set_health(&self, health: Health) {
        *locked(&self.health) = health;
    }

    /// Called by the consume loop: whether it holds messages whose offsets are not committed.
    pub fn set_holding(&self, holding: bool) {
        self.holding.store(holding, Ordering::Relaxed);
    }

    fn holding(&self) -> bool {
        self.holding.load(Ordering::Relaxed)
    }

    /// Called by the consume loop when librdkafka could not decode a record batch. Returns
    /// whether to log it (librdkafka retries the batch every fetch: once a minute is enough).
    pub fn note_undecodable(&self, cause: String) -> bool {
        *locked(&self.undecodable) = Some(Undecodable { cause });
        let mut logged = locked(&self.undecodable_logged);
        let due = logged.is_none_or(|at| at.elapsed() >= Duration::from_secs(60));
        if due {
            *logged = Some(Instant::now());
        }
        due
    }

    fn take_undecodable(&self) -> Option<Undecodable> {
        locked(&self.undecodable).take()
    }
}

/// How long each Kafka or ClickHouse question of the watchdog may take.
const QUESTION_TIMEOUT: Duration = Duration::from_secs(5);

/// Reads the assignment's offsets from Kafka (blocking calls: run on a blocking thread).
fn read_partitions(
    consumer: &IngestConsumer,
    assigned: &[(PartitionKey, Instant)],
) -> Result<Vec<PartitionReading>, rdkafka::error::KafkaError> {
    let list = |offset: Option<Offset>| -> Result<TopicPartitionList, rdkafka::error::KafkaError> {
        let mut list = TopicPartitionList::new();
        for ((topic, partition), _) in assigned {
            match offset {
                Some(offset) => list.add_partition_offset(topic, *partition, offset)?,
                None => {
                    list.add_partition(topic, *partition);
                }
            }
        }
        Ok(list)
    };
    if assigned.is_empty() {
        return Ok(Vec::new());
    }
    let committed = consumer.committed_offsets(list(None)?, QUESTION_TIMEOUT)?;
    let position = consumer.position()?;
    // ListOffsets with the special timestamps -2 (earliest) and -1 (latest), in the consumer's
    // isolation level: one request per leader for the whole assignment.
    let starts = consumer.offsets_for_times(list(Some(Offset::Beginning))?, QUESTION_TIMEOUT)?;
    let ends = consumer.offsets_for_times(list(Some(Offset::End))?, QUESTION_TIMEOUT)?;
    let offset_in = |list: &TopicPartitionList, (topic, partition): &PartitionKey| {
        list.find_partition(topic, *partition)
            .and_then(|element| match element.offset() {
                Offset::Offset(offset) => Some(offset),
                _ => None,
            })
    };
    let mut readings = Vec::with_capacity(assigned.len());
    for (key, assigned_at) in assigned {
        let (Some(start), Some(end)) = (offset_in(&starts, key), offset_in(&ends, key)) else {
            // No answer for this partition (its leader is moving): judge it next time.
            continue;
        };
        readings.push(PartitionReading {
            partition: key.clone(),
            assigned_at: *assigned_at,
            committed: offset_in(&committed, key),
            position: offset_in(&position, key),
            start,
            end,
        });
    }
    Ok(readings)
}

/// Checks progress every `check_interval` until `shutdown`; publishes the verdict to `state`
/// and the metrics, and logs every change of it.
pub async fn watch(
    consumer: Arc<IngestConsumer>,
    clickhouse: clickhouse::Client,
    state: Arc<LivenessState>,
    metrics: IngestMetrics,
    config: LivenessConfig,
    shutdown: CancellationToken,
) {
    let mut tracker = ProgressTracker::new(config.stall_after());
    let mut interval = tokio::time::interval(config.check_interval());
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_stuck_log: Option<Instant> = None;
    // The clock starts with the process: until the first verdict, the start is the last progress.
    metrics.last_progress.set(unix_seconds(Instant::now()));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = interval.tick() => {}
        }
        let context = consumer.context();
        if !context.joined() {
            continue;
        }
        let verdict = match check_dependencies(&consumer, &clickhouse, &state).await {
            Ok(reading) => tracker.observe(&reading),
            Err(reason) => tracker.wait(Instant::now(), reason),
        };
        let previous = state.health();
        // A stuck or blocked verdict is logged when it starts and then once a minute.
        let changed = std::mem::discriminant(&verdict.health) != std::mem::discriminant(&previous);
        let due =
            changed || last_stuck_log.is_none_or(|at| at.elapsed() >= Duration::from_secs(60));
        match (&verdict.health, &previous) {
            (Health::Stuck { reason }, _) if due => {
                error!(
                    %reason,
                    "ingest is stuck: partitions with lag made no progress; /healthz fails so that the replica is restarted"
                );
                last_stuck_log = Some(Instant::now());
            }
            (Health::Blocked { reason }, _) if due => {
                error!(
                    %reason,
                    "ingest cannot decode a record batch; the partition waits at it and /readyz fails until the batch is dealt with (README: a batch that cannot be decoded)"
                );
                last_stuck_log = Some(Instant::now());
            }
            (Health::Waiting { reason }, Health::Waiting { reason: before })
                if reason == before => {}
            (Health::Waiting { reason }, _) => {
                warn!(%reason, "ingest is waiting for a dependency; not counted as a stall")
            }
            (
                Health::Progressing,
                Health::Stuck { .. } | Health::Waiting { .. } | Health::Blocked { .. },
            ) => {
                info!("ingest is making progress again")
            }
            _ => {}
        }
        metrics
            .stalled
            .set(i64::from(matches!(verdict.health, Health::Stuck { .. })));
        metrics
            .blocked_partitions
            .set(i64::try_from(verdict.blocked).unwrap_or(i64::MAX));
        metrics
            .last_progress
            .set(unix_seconds(verdict.last_progress));
        state.set_health(verdict.health);
    }
}

/// Reads the assignment from Kafka and pings ClickHouse; Err names what does not answer.
async fn check_dependencies(
    consumer: &Arc<IngestConsumer>,
    clickhouse: &clickhouse::Client,
    state: &LivenessState,
) -> Result<Reading, String> {
    if let Err(err) = audit_store::ping(clickhouse, QUESTION_TIMEOUT).await {
        return Err(format!("clickhouse unreachable: {err}"));
    }
    let assigned = consumer.context().assigned();
    let reader = Arc::clone(consumer);
    let read = tokio::task::spawn_blocking(move || read_partitions(&reader, &assigned));
    match read.await {
        Ok(Ok(partitions)) => Ok(Reading {
            at: Instant::now(),
            partitions,
            // Read after the positions: if the loop holds nothing now, every message up to
            // them was committed (read before, a message received in between would count as
            // caught up).
            holding: state.holding(),
            undecodable: state.take_undecodable(),
        }),
        Ok(Err(err)) => Err(format!("kafka unreachable: {err}")),
        Err(err) => Err(format!("kafka offsets could not be read: {err}")),
    }
}

fn unix_seconds(at: Instant) -> f64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    (now.saturating_sub(at.elapsed())).as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    const STALL: Duration = Duration::from_secs(120);

    fn partition(
        assigned_at: Instant,
        committed: Option<i64>,
        position: Option<i64>,
        end: i64,
    ) -> PartitionReading {
        PartitionReading {
            partition: ("t".to_owned(), 0),
            assigned_at,
            committed,
            position,
            start: 0,
            end,
        }
    }

    fn reading(at: Instant, partitions: Vec<PartitionReading>, holding: bool) -> Reading {
        Reading {
            at,
            partitions,
            holding,
            undecodable: None,
        }
    }

    #[test]
    fn a_partition_with_lag_and_no_commit_for_stall_after_is_stuck() {
        let t0 = Instant::now();
        let mut tracker = ProgressTracker::new(STALL);
        let lagging = |at| reading(at, vec![partition(t0, Some(10), Some(10), 500)], false);
        assert_eq!(tracker.observe(&lagging(t0)).health, Health::Progressing);
        let verdict = tracker.observe(&lagging(t0 + Duration::from_secs(119)));
        assert_eq!(verdict.health, Health::Progressing);
        assert_eq!(verdict.last_progress, t0);
        match tracker
            .observe(&lagging(t0 + Duration::from_secs(121)))
            .health
        {
            Health::Stuck { reason } => {
                assert!(reason.contains("t[0]"), "{reason}");
                assert!(reason.contains("lag 490"), "{reason}");
            }
            other => panic!("expected stuck, got {other:?}"),
        }
    }

    #[test]
    fn the_partition_that_stopped_while_batches_failed_to_decode_is_blocked_not_stuck() {
        let t0 = Instant::now();
        let mut tracker = ProgressTracker::new(STALL);
        // Partition 1 reads and commits on; partition 0 stays at offset 5.
        let part = |p: i32, position: i64| PartitionReading {
            partition: ("t".to_owned(), p),
            ..partition(t0, Some(position), Some(position), 500)
        };
        let failing = |at, moving: i64| Reading {
            undecodable: Some(Undecodable {
                cause: "Local: Invalid compressed data".to_owned(),
            }),
            ..reading(at, vec![part(0, 5), part(1, moving)], true)
        };
        assert_eq!(
            tracker.observe(&failing(t0, 10)).health,
            Health::Progressing
        );
        // Past stall_after: partition 0 never moved, partition 1 reads on.
        for step in 1..=30u64 {
            let verdict = tracker.observe(&failing(
                t0 + Duration::from_secs(5 * step),
                10 + step as i64,
            ));
            match verdict.health {
                Health::Blocked { reason } => {
                    assert!(
                        reason.contains("t[0] cannot be decoded at offset 5"),
                        "{reason}"
                    );
                    assert!(reason.contains("Invalid compressed data"), "{reason}");
                    assert!(!reason.contains("t[1]"), "{reason}");
                    assert_eq!(verdict.blocked, 1);
                }
                other => panic!("step {step}: expected blocked, got {other:?}"),
            }
        }
        // The errors stop (the batch was dealt with) and the partition moves: progressing.
        let verdict = tracker.observe(&reading(
            t0 + Duration::from_secs(160),
            vec![part(0, 6), part(1, 50)],
            true,
        ));
        assert_eq!(verdict.health, Health::Progressing);
        assert_eq!(verdict.blocked, 0);
    }

    #[test]
    fn commits_that_move_keep_a_lagging_partition_progressing() {
        let t0 = Instant::now();
        let mut tracker = ProgressTracker::new(STALL);
        for step in 0..10u64 {
            let at = t0 + Duration::from_secs(60 * step);
            let committed = Some(100 * step as i64);
            let verdict = tracker.observe(&reading(
                at,
                vec![partition(t0, committed, committed, 1_000_000)],
                true,
            ));
            assert_eq!(verdict.health, Health::Progressing, "step {step}");
        }
    }

    #[test]
    fn a_caught_up_partition_is_never_stuck_however_long_it_is_quiet() {
        let t0 = Instant::now();
        let mut tracker = ProgressTracker::new(STALL);
        for hours in 0..48u64 {
            let at = t0 + Duration::from_secs(3600 * hours);
            let verdict =
                tracker.observe(&reading(at, vec![partition(t0, Some(42), None, 42)], false));
            assert_eq!(verdict.health, Health::Progressing);
            assert_eq!(verdict.last_progress, at);
        }
    }

    #[test]
    fn a_final_transaction_marker_does_not_count_as_lag_once_nothing_is_held() {
        let t0 = Instant::now();
        let at = t0 + Duration::from_secs(600);
        // Committed up to the last event; the commit marker after it is offset 42.
        let marker = |holding| reading(at, vec![partition(t0, Some(42), Some(43), 43)], holding);
        let mut tracker = ProgressTracker::new(STALL);
        assert_eq!(tracker.observe(&marker(false)).health, Health::Progressing);
        // The same offsets while the loop still holds messages: they may not be committed yet.
        let mut tracker = ProgressTracker::new(STALL);
        assert!(matches!(
            tracker.observe(&marker(true)).health,
            Health::Stuck { .. }
        ));
    }

    #[test]
    fn a_partition_never_committed_whose_messages_expired_is_caught_up() {
        let t0 = Instant::now();
        let mut tracker = ProgressTracker::new(STALL);
        let mut expired = partition(t0, None, None, 7_000);
        expired.start = 7_000;
        let at = t0 + Duration::from_secs(3600);
        assert_eq!(
            tracker.observe(&reading(at, vec![expired], false)).health,
            Health::Progressing
        );
    }

    #[test]
    fn consumed_but_uncommitted_messages_are_lag() {
        // The flush of these messages never completes: the position is at the end, the
        // committed offset is not, and the loop holds them.
        let t0 = Instant::now();
        let mut tracker = ProgressTracker::new(STALL);
        let at = t0 + Duration::from_secs(121);
        let verdict = tracker.observe(&reading(
            at,
            vec![partition(t0, Some(5), Some(90), 90)],
            true,
        ));
        assert!(
            matches!(verdict.health, Health::Stuck { .. }),
            "{verdict:?}"
        );
    }

    #[test]
    fn a_reassigned_partition_starts_a_fresh_clock() {
        let t0 = Instant::now();
        let mut tracker = ProgressTracker::new(STALL);
        tracker.observe(&reading(t0, vec![partition(t0, Some(1), None, 9)], false));
        let again = t0 + Duration::from_secs(100);
        let at = t0 + Duration::from_secs(150);
        let verdict = tracker.observe(&reading(
            at,
            vec![partition(again, Some(1), None, 9)],
            false,
        ));
        assert_eq!(verdict.health, Health::Progressing);
        assert_eq!(verdict.last_progress, again);
    }

    #[test]
    fn waiting_for_a_dependency_stops_the_clock() {
        let t0 = Instant::now();
        let mut tracker = ProgressTracker::new(STALL);
        let lagging = |at| reading(at, vec![partition(t0, Some(10), Some(10), 500)], true);
        tracker.observe(&lagging(t0));
        let outage_end = t0 + Duration::from_secs(300);
        let verdict = tracker.wait(outage_end, "clickhouse unreachable".to_owned());
        assert!(matches!(verdict.health, Health::Waiting { .. }));
        assert_eq!(verdict.last_progress, t0, "waiting is not progress");
        // Back, and 100 s later still no commit: not yet stuck, the outage did not count.
        let verdict = tracker.observe(&lagging(outage_end + Duration::from_secs(100)));
        assert_eq!(verdict.health, Health::Progressing);
        assert!(matches!(
            tracker
                .observe(&lagging(outage_end + Duration::from_secs(121)))
                .health,
            Health::Stuck { .. }
        ));
    }

    #[test]
    fn a_partition_assigned_before_a_wait_and_first_read_after_it_starts_its_clock_there() {
        // Assigned, then ClickHouse went away before the first reading could be taken.
        let t0 = Instant::now();
        let mut tracker = ProgressTracker::new(STALL);
        let back = t0 + Duration::from_secs(200);
        tracker.wait(back, "clickhouse unreachable".to_owned());
        let lagging = |at| reading(at, vec![partition(t0, Some(10), Some(90), 500)], true);
        let verdict = tracker.observe(&lagging(back + Duration::from_secs(5)));
        assert_eq!(verdict.health, Health::Progressing);
        assert!(matches!(
            tracker
                .observe(&lagging(back + Duration::from_secs(121)))
                .health,
            Health::Stuck { .. }
        ));
    }

    #[test]
    fn revoked_partitions_are_forgotten() {
        let t0 = Instant::now();
        let mut tracker = ProgressTracker::new(STALL);
        tracker.observe(&reading(t0, vec![partition(t0, Some(1), None, 9)], false));
        let at = t0 + Duration::from_secs(500);
        let verdict = tracker.observe(&reading(at, Vec::new(), false));
        assert_eq!(verdict.health, Health::Progressing);
        assert_eq!(verdict.last_progress, at);
        assert!(tracker.partitions.is_empty());
    }
}
