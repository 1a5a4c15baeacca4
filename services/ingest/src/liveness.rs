//! Whether this replica makes progress, and what `/healthz` and `/readyz` say about it.
//!
//! A watchdog reads, every `liveness.check_interval_ms`, each assigned partition's committed
//! offset, position and end offset from Kafka, independently of the consume loop (a loop that
//! hangs cannot vouch for itself). A partition progresses when its committed offset moves or it is
//! caught up. A partition with lag that has not progressed for `liveness.stall_after_ms` makes the
//! replica stuck: `/healthz` fails, so that Kubernetes restarts the pod, and the reason is logged
//! at `error`. While Kafka or ClickHouse does not answer the replica is waiting, not stuck: a
//! restart would not help, `/readyz` says what it waits for, and the stall clock stops.

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
}

/// The verdict on one reading.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub health: Health,
    /// The oldest last-progress (or assignment) time over the assigned partitions; the
    /// reading's time when none is assigned or all are caught up.
    pub last_progress: Instant,
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
        let mut last_progress = reading.at;
        for partition in &reading.partitions {
            let tracked = self
                .partitions
                .entry(partition.partition.clone())
                .or_insert(Tracked {
                    committed: partition.committed,
                    stall_since: partition.assigned_at,
                    progressed_at: partition.assigned_at,
                });
            tracked.stall_since = tracked
                .stall_since
                .max(partition.assigned_at)
                .max(self.waited_until.unwrap_or(partition.assigned_at));
            tracked.progressed_at = tracked.progressed_at.max(partition.assigned_at);
            let moved = partition.committed > tracked.committed;
            tracked.committed = partition.committed;
            if moved || partition.caught_up(reading.holding) {
                tracked.stall_since = reading.at;
                tracked.progressed_at = reading.at;
            }
            if reading.at.saturating_duration_since(tracked.stall_since) > self.stall_after {
                stuck.push(partition.describe());
            }
            last_progress = last_progress.min(tracked.progressed_at);
        }
        let health = if stuck.is_empty() {
            Health::Progressing
        } else {
            Health::Stuck {
                reason: format!(
                    "no progress for more than {} s on {} partition(s) with lag: {}",
                    self.stall_after.as_secs(),
                    stuck.len(),
                    stuck.join(", ")
                ),
            }
        };
        Verdict {
            health,
            last_progress,
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
        }
    }
}

/// What the consume loop, the watchdog and the ops listener share.
#[derive(Debug)]
pub struct LivenessState {
    health: Mutex<Health>,
    holding: AtomicBool,
}

impl Default for LivenessState {
    fn default() -> Self {
        Self {
            health: Mutex::new(Health::Starting),
            holding: AtomicBool::new(false),
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
        match (&verdict.health, &previous) {
            (Health::Stuck { reason }, _) => {
                let due = last_stuck_log.is_none_or(|at| at.elapsed() >= Duration::from_secs(60));
                if !matches!(previous, Health::Stuck { .. }) || due {
                    error!(
                        %reason,
                        "ingest is stuck: partitions with lag made no progress; /healthz fails so that the replica is restarted"
                    );
                    last_stuck_log = Some(Instant::now());
                }
            }
            (Health::Waiting { reason }, Health::Waiting { reason: before })
                if reason == before => {}
            (Health::Waiting { reason }, _) => {
                warn!(%reason, "ingest is waiting for a dependency; not counted as a stall")
            }
            (Health::Progressing, Health::Stuck { .. } | Health::Waiting { .. }) => {
                info!("ingest is making progress again")
            }
            _ => {}
        }
        metrics
            .stalled
            .set(i64::from(matches!(verdict.health, Health::Stuck { .. })));
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
