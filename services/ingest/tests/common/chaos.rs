//! Compound faults for the liveness test and the chaos benchmark: replicas of the real
//! `audit-ingest` binary supervised as Kubernetes would run them (restarted when they exit, killed
//! and restarted when `/healthz` fails), random SIGKILLs, a ClickHouse outage, a replica added and
//! one removed, all while events keep arriving. The schedule comes from a seed, so that a failing
//! run can be replayed.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::sys::signal::Signal;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};

use super::*;

/// One fault of a schedule.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// SIGKILL the replica of `slot`; it is started again `restart_after` later.
    Kill {
        slot: usize,
        restart_after: Duration,
    },
    /// Stop ClickHouse, start it again `down_for` later.
    ClickHouseOutage { down_for: Duration },
    /// Start a replica in a new slot.
    AddReplica { slot: usize },
    /// Stop the replica of `slot` for good (SIGTERM, as a scale-down does).
    RemoveReplica { slot: usize },
}

/// What a schedule contains; [`Plan::generate`] draws the times and the victims from the seed.
#[derive(Debug, Clone)]
pub struct PlanShape {
    pub replicas: usize,
    /// Faults happen between 3 s and `span - 5 s`.
    pub span: Duration,
    /// Time between two kills, drawn uniformly.
    pub kill_every: (Duration, Duration),
    pub outage: Option<(Duration, Duration)>,
    pub add_and_remove: bool,
}

impl PlanShape {
    /// The liveness test's schedule: three replicas, a kill every 2-7 s restarted 1-2 s later,
    /// one ClickHouse outage of 15-20 s, a replica added and one removed.
    pub fn compound(span: Duration) -> Self {
        Self {
            replicas: 3,
            span,
            kill_every: (Duration::from_secs(2), Duration::from_secs(7)),
            outage: Some((Duration::from_secs(15), Duration::from_secs(20))),
            add_and_remove: true,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub seed: u64,
    pub replicas: usize,
    /// Faults in time order, as offsets from the start of the schedule.
    pub faults: Vec<(Duration, Fault)>,
}

fn uniform(rng: &mut SmallRng, (low, high): (Duration, Duration)) -> Duration {
    Duration::from_millis(rng.random_range(low.as_millis() as u64..=high.as_millis() as u64))
}

impl Plan {
    /// Draws a schedule. Victims are chosen among the replicas running at that moment of the
    /// schedule (a replica being restarted is not killed again before it is back).
    pub fn generate(seed: u64, shape: &PlanShape) -> Self {
        let mut rng = SmallRng::seed_from_u64(seed);
        let secs = Duration::from_secs;
        let last = shape.span.saturating_sub(secs(5));
        let mut faults: Vec<(Duration, Fault)> = Vec::new();
        if let Some(length) = shape.outage {
            let start = uniform(&mut rng, (secs(12), secs(25).min(last)));
            faults.push((
                start,
                Fault::ClickHouseOutage {
                    down_for: uniform(&mut rng, length),
                },
            ));
        }
        // The moments of decision, in time order; victims are drawn as the timeline unfolds.
        enum Step {
            Kill,
            Add,
            Remove,
        }
        let mut steps: Vec<(Duration, Step)> = Vec::new();
        let mut at = uniform(&mut rng, (secs(3), secs(6)));
        while at < last {
            steps.push((at, Step::Kill));
            at += uniform(&mut rng, shape.kill_every);
        }
        if shape.add_and_remove {
            steps.push((uniform(&mut rng, (secs(8), last)), Step::Add));
            steps.push((uniform(&mut rng, (secs(8), last)), Step::Remove));
        }
        steps.sort_by_key(|(at, _)| *at);
        let mut next_slot = shape.replicas;
        let mut running: BTreeSet<usize> = (0..shape.replicas).collect();
        let mut restarting: Vec<(Duration, usize)> = Vec::new();
        let mut last_victim: Option<usize> = None;
        for (at, step) in steps {
            restarting.retain(|(back, slot)| {
                if *back <= at {
                    running.insert(*slot);
                }
                *back > at
            });
            match step {
                Step::Add => {
                    faults.push((at, Fault::AddReplica { slot: next_slot }));
                    running.insert(next_slot);
                    next_slot += 1;
                }
                // At least one replica keeps running.
                Step::Remove | Step::Kill if running.len() < 2 => {}
                Step::Remove => {
                    let slot = pick(&mut rng, &running);
                    running.remove(&slot);
                    faults.push((at, Fault::RemoveReplica { slot }));
                }
                Step::Kill => {
                    // Crashes cluster: a crash-looping pod is killed again and again while the
                    // others live on (and go through the rebalances and the outage), so the
                    // previous victim, when it runs again, is the likelier one.
                    let slot = match last_victim {
                        Some(slot) if running.contains(&slot) && rng.random_bool(0.7) => slot,
                        _ => pick(&mut rng, &running),
                    };
                    last_victim = Some(slot);
                    let restart_after = uniform(&mut rng, (secs(1), secs(2)));
                    running.remove(&slot);
                    restarting.push((at + restart_after, slot));
                    faults.push((
                        at,
                        Fault::Kill {
                            slot,
                            restart_after,
                        },
                    ));
                }
            }
        }
        faults.sort_by_key(|(at, _)| *at);
        Self {
            seed,
            replicas: shape.replicas,
            faults,
        }
    }

    /// When the last fault is over (a killed replica started again, ClickHouse started again).
    pub fn last_fault_end(&self) -> Duration {
        self.faults
            .iter()
            .map(|(at, fault)| match fault {
                Fault::Kill { restart_after, .. } => *at + *restart_after,
                Fault::ClickHouseOutage { down_for } => *at + *down_for,
                Fault::AddReplica { .. } | Fault::RemoveReplica { .. } => *at,
            })
            .max()
            .unwrap_or_default()
    }
}

fn pick(rng: &mut SmallRng, slots: &BTreeSet<usize>) -> usize {
    let index = rng.random_range(0..slots.len());
    *slots.iter().nth(index).expect("index within the set")
}

/// How the replicas and the publisher run.
#[derive(Debug, Clone)]
pub struct ChaosSettings {
    /// Events published per second, spread over the three topics, for `publish_for`.
    pub rate: u64,
    pub publish_for: Duration,
    /// After the last fault and the last event published, how long every event may take to be
    /// visible.
    pub settle_within: Duration,
    /// Extra `AUDIT_INGEST__...` settings for every replica.
    pub ingest: Vec<(String, String)>,
    /// Give each slot a stable `kafka.instance_id` (static group membership).
    pub static_membership: bool,
    /// `/healthz` failures in a row after which the supervisor restarts a replica.
    pub liveness_failures: u32,
    /// The replicas' `liveness.stall_after_ms`, for the "ready while stuck" check.
    pub stall_after: Duration,
    /// The `audit-ingest` binary to run.
    pub binary: std::path::PathBuf,
}

/// A kill and how long the group took to consume every partition again.
#[derive(Debug, Clone)]
pub struct KillRecord {
    pub slot: usize,
    pub at: Duration,
    /// The kill as Unix time (seconds), to compare with `ingested_at_ms`.
    pub unix_at: f64,
    /// From the SIGKILL until every partition had stored an event read after it.
    pub resumed_after: Option<Duration>,
    /// Whether ClickHouse was down at some point between the kill and the resume.
    pub during_outage: bool,
}

/// What a chaos run saw.
#[derive(Debug, Default)]
pub struct ChaosOutcome {
    pub published: u64,
    /// Event rows visible through the de-duplicating read (`FINAL`), and distinct ids among them.
    pub visible: u64,
    pub distinct: u64,
    /// From the later of the last fault and the last event published until every event was
    /// visible; None when the bound passed first.
    pub settled_after: Option<Duration>,
    pub last_fault_end: Duration,
    pub publish_end: Duration,
    /// Events visible (`FINAL`) when the publisher finished, so that events visible per second
    /// of publishing compare a run with faults with one without.
    pub visible_at_publish_end: Option<u64>,
    pub kills: Vec<KillRecord>,
    /// Replicas the supervisor restarted because `/healthz` failed, with the reason they gave.
    pub liveness_restarts: Vec<String>,
    /// Moments a replica answered `/readyz` 200 while its last progress was older than
    /// `stall_after` (plus one check interval).
    pub ready_while_stuck: Vec<String>,
    /// The longest time a partition with lag went without its committed offset moving, seen
    /// from outside (the group's offsets and the partitions' end offsets, read from Kafka every
    /// second); the time ClickHouse was down (and 5 s after) does not count. With the partition
    /// and when it ended (or "still" when the run ended with it stalled).
    pub longest_partition_stall: (Duration, String),
    /// Replicas that exited on their own and were started again (e.g. start-up while
    /// ClickHouse was down).
    pub crash_restarts: usize,
    /// Log of the run, for a failure message.
    pub journal: Vec<String>,
    /// Tail of every replica's log, for a failure message.
    pub logs: String,
}

/// One replica slot: a stable identity and the process that currently fills it.
struct Slot {
    id: usize,
    process: Option<IngestProcess>,
    /// Started again at this time (after a kill or an exit).
    restart_at: Option<Instant>,
    removed: bool,
    health_failures: u32,
    generation: usize,
    logs: Vec<std::path::PathBuf>,
}

impl Slot {
    fn new(id: usize) -> Self {
        Self {
            id,
            process: None,
            restart_at: None,
            removed: false,
            health_failures: 0,
            generation: 0,
            logs: Vec::new(),
        }
    }
}

pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

/// The value of an unlabelled gauge in a Prometheus text exposition.
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' '))
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

pub struct ChaosRun<'a> {
    pub env: &'a TestEnv,
    pub server: &'a PrivateClickHouse,
    pub plan: Plan,
    pub settings: ChaosSettings,
}

impl ChaosRun<'_> {
    fn spawn(&self, slot: &mut Slot) {
        slot.generation += 1;
        let mut extra: Vec<(String, String)> = self.settings.ingest.clone();
        if self.settings.static_membership {
            extra.push((
                "AUDIT_INGEST__KAFKA__INSTANCE_ID".into(),
                format!("{}-replica-{}", self.env.name, slot.id),
            ));
        }
        let extra: Vec<(&str, &str)> = extra
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let process = IngestProcess::spawn_binary(
            self.env,
            &self.settings.binary,
            &format!("slot{}-gen{}", slot.id, slot.generation),
            &extra,
        );
        slot.logs.push(process.log.clone());
        slot.process = Some(process);
        slot.restart_at = None;
        slot.health_failures = 0;
    }

    /// Runs the schedule while publishing, then waits for every event to be visible.
    pub async fn run(self) -> ChaosOutcome {
        let mut outcome = ChaosOutcome::default();
        // Journal times count from the start of the schedule, like the faults' times.
        let mut schedule_start = Instant::now();
        let note = |outcome: &mut ChaosOutcome, start: Instant, text: String| {
            outcome
                .journal
                .push(format!("{:>6.1}s {text}", start.elapsed().as_secs_f64()));
        };
        let mut slots: Vec<Slot> = Vec::new();
        for id in 0..self.plan.replicas {
            let mut slot = Slot::new(id);
            self.spawn(&mut slot);
            slots.push(slot);
        }
        for slot in &mut slots {
            slot.process
                .as_mut()
                .expect("just spawned")
                .wait_ready(Duration::from_secs(60))
                .await;
        }
        let partitions = self.env.topics.len() * self.env.partitions as usize;
        note(
            &mut outcome,
            schedule_start,
            format!("{} replicas ready", slots.len()),
        );

        let publisher = tokio::spawn(publish_at_rate(
            self.env.clone(),
            self.settings.rate,
            self.settings.publish_for,
        ));
        schedule_start = Instant::now();
        let mut pending: std::collections::VecDeque<(Duration, Fault)> =
            self.plan.faults.clone().into();
        let mut outage: Option<tokio::task::JoinHandle<()>> = None;
        let mut outage_window: Option<(Duration, Duration)> = None;
        let mut stopping: Vec<(usize, IngestProcess)> = Vec::new();
        let mut open_kills: Vec<(usize, Instant, f64)> = Vec::new();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(1))
            .build()
            .expect("http client");
        let settle_from = self.plan.last_fault_end().max(self.settings.publish_for);
        let settle_deadline = settle_from + self.settings.settle_within;
        let planned = planned_events(self.settings.rate, self.settings.publish_for);
        let mut watch = PartitionWatch::new(self.env);
        let mut last_watch = Instant::now();

        loop {
            let now = schedule_start.elapsed();
            // The outage lasts until the server is back, which can be later than planned: its
            // stop waits for the clients' open connections (ClickHouse 18.16 serves requests
            // on them for as long as they keep coming, 15 s and more), and its start takes
            // its time on a loaded machine.
            if let (Some(handle), Some((_, to))) = (&outage, outage_window.as_mut()) {
                if !handle.is_finished() {
                    *to = (*to).max(now);
                }
            }
            // 1. Faults that are due.
            while pending.front().is_some_and(|(at, _)| *at <= now) {
                let (at, fault) = pending.pop_front().expect("checked");
                note(
                    &mut outcome,
                    schedule_start,
                    format!("fault at {at:?}: {fault:?}"),
                );
                match fault {
                    Fault::Kill {
                        slot,
                        restart_after,
                    } => {
                        let slot = &mut slots[slot];
                        if let Some(process) = slot.process.as_mut() {
                            process.signal(Signal::SIGKILL);
                            let _ = process.wait_exit(Duration::from_secs(5)).await;
                        }
                        slot.process = None;
                        slot.restart_at = Some(Instant::now() + restart_after);
                        open_kills.push((slot.id, Instant::now(), unix_now()));
                    }
                    Fault::ClickHouseOutage { down_for } => {
                        let state = self.server.state.clone();
                        let http_port = self.server.http_port;
                        let tcp_port = self.server.tcp_port;
                        outage_window = Some((now, now + down_for));
                        outage = Some(tokio::task::spawn_blocking(move || {
                            PrivateClickHouse::control(&state, http_port, tcp_port, "stop");
                            std::thread::sleep(down_for);
                            PrivateClickHouse::control(&state, http_port, tcp_port, "start");
                        }));
                    }
                    Fault::AddReplica { slot: id } => {
                        let mut slot = Slot::new(id);
                        self.spawn(&mut slot);
                        debug_assert_eq!(slots.len(), id, "slots are added in order");
                        slots.push(slot);
                    }
                    Fault::RemoveReplica { slot } => {
                        let slot = &mut slots[slot];
                        slot.removed = true;
                        slot.restart_at = None;
                        // It stops in the background (its final flush may wait for
                        // ClickHouse) while the schedule goes on.
                        if let Some(process) = slot.process.take() {
                            process.signal(Signal::SIGTERM);
                            stopping.push((slot.id, process));
                        }
                    }
                }
            }

            // 2. Supervise like a kubelet: restart what exited, probe liveness and readiness.
            let mut probes = Vec::new();
            for (index, slot) in slots.iter_mut().enumerate().filter(|(_, s)| !s.removed) {
                if let Some(at) = slot.restart_at {
                    if Instant::now() >= at {
                        self.spawn(slot);
                        note(
                            &mut outcome,
                            schedule_start,
                            format!("slot {} started", slot.id),
                        );
                    }
                    continue;
                }
                let Some(process) = slot.process.as_mut() else {
                    continue;
                };
                if let Ok(Some(status)) = process.child.try_wait() {
                    note(
                        &mut outcome,
                        schedule_start,
                        format!("slot {} exited with {status}; restarting in 1 s", slot.id),
                    );
                    outcome.crash_restarts += 1;
                    slot.process = None;
                    slot.restart_at = Some(Instant::now() + Duration::from_secs(1));
                    continue;
                }
                probes.push((index, probe(&http, process.http_port)));
            }
            let (indexes, probes): (Vec<usize>, Vec<_>) = probes.into_iter().unzip();
            let results = futures_util::future::join_all(probes).await;
            for (index, result) in indexes.into_iter().zip(results) {
                let slot = &mut slots[index];
                match result.unhealthy {
                    Some(_) => slot.health_failures += 1,
                    None => slot.health_failures = 0,
                }
                if slot.health_failures >= self.settings.liveness_failures {
                    let reason = result.unhealthy.unwrap_or_default();
                    note(
                        &mut outcome,
                        schedule_start,
                        format!(
                            "slot {} failed /healthz {} times ({reason}); restarting it",
                            slot.id, slot.health_failures
                        ),
                    );
                    outcome
                        .liveness_restarts
                        .push(format!("slot {}: {reason}", slot.id));
                    if let Some(mut process) = slot.process.take() {
                        process.signal(Signal::SIGKILL);
                        let _ = process.wait_exit(Duration::from_secs(5)).await;
                    }
                    slot.restart_at = Some(Instant::now() + Duration::from_secs(1));
                    continue;
                }
                // Right after the outage a replica that waited for ClickHouse is ready again
                // before its watchdog's next check (every 5 s) has seen it progress.
                let just_after_outage = outage_window
                    .is_some_and(|(from, to)| now >= from && now <= to + Duration::from_secs(10));
                if let (true, Some(last), false) =
                    (result.ready, result.last_progress, just_after_outage)
                {
                    let age = unix_now() - last;
                    // One check interval of the replica's watchdog on top of the limit.
                    if age > self.settings.stall_after.as_secs_f64() + 10.0 {
                        let text =
                            format!("slot {}: ready with no progress for {age:.0} s", slot.id);
                        note(&mut outcome, schedule_start, text.clone());
                        outcome.ready_while_stuck.push(text);
                    }
                }
            }

            // 3. Kills the group has recovered from: every partition stored an event read
            // after the kill.
            if !open_kills.is_empty() {
                let newest = newest_ingest_per_partition(self.env).await;
                open_kills.retain(|(slot, at, unix_at)| {
                    let resumed = newest.len() >= partitions
                        && newest.values().all(|ms| *ms as f64 / 1000.0 > *unix_at);
                    if resumed {
                        let kill_at = at.duration_since(schedule_start);
                        outcome.kills.push(KillRecord {
                            slot: *slot,
                            at: kill_at,
                            unix_at: *unix_at,
                            resumed_after: Some(at.elapsed()),
                            during_outage: outage_window
                                .is_some_and(|(from, to)| kill_at <= to && now >= from),
                        });
                    }
                    !resumed
                });
            }

            if outcome.visible_at_publish_end.is_none() && publisher.is_finished() {
                outcome.visible_at_publish_end = self.env.try_visible_count().await;
            }

            if last_watch.elapsed() >= Duration::from_secs(1) {
                last_watch = Instant::now();
                let outage_now = outage_window
                    .is_some_and(|(from, to)| now >= from && now <= to + Duration::from_secs(5));
                watch.observe(outage_now).await;
            }

            // 4. Done when everything published is visible, or the bound passed.
            if pending.is_empty() && publisher.is_finished() && now >= settle_from {
                let visible = self.env.visible_count().await;
                if visible >= planned {
                    outcome.settled_after = Some(now.saturating_sub(settle_from));
                    break;
                }
                if now >= settle_deadline {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }

        outcome.published = publisher.await.expect("publisher");
        outcome.longest_partition_stall = watch.longest();
        if let Some(outage) = outage {
            let _ = outage.await;
        }
        // Late copies would show up now: look again a little later.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (visible, distinct) = self.env.visible_and_distinct().await;
        outcome.visible = visible;
        outcome.distinct = distinct;
        outcome.last_fault_end = self.plan.last_fault_end();
        outcome.publish_end = self.settings.publish_for;
        for (slot, at, unix_at) in open_kills {
            outcome.kills.push(KillRecord {
                slot,
                at: at.duration_since(schedule_start),
                unix_at,
                resumed_after: None,
                during_outage: false,
            });
        }
        for (id, mut process) in stopping {
            if process.wait_exit(Duration::from_secs(15)).await.is_none() {
                outcome
                    .journal
                    .push(format!("slot {id} did not stop within 15 s of its SIGTERM"));
            }
        }
        for slot in &mut slots {
            if let Some(mut process) = slot.process.take() {
                process.signal(Signal::SIGTERM);
                let _ = process.wait_exit(Duration::from_secs(12)).await;
            }
            for (generation, log) in slot.logs.iter().enumerate() {
                let text = std::fs::read_to_string(log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(25).collect();
                outcome.logs.push_str(&format!(
                    "--- slot {} run {} ({}) ---\n{}\n",
                    slot.id,
                    generation + 1,
                    log.display(),
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                ));
            }
        }
        outcome
    }
}

/// The consumer group's progress per partition, read from Kafka as an operator's lag monitor
/// would, independently of what the replicas say about themselves.
struct PartitionWatch {
    consumer: std::sync::Arc<BaseConsumer>,
    partitions: TopicPartitionList,
    /// Per partition: committed offset last seen and since when it has not moved (None while
    /// caught up).
    state: BTreeMap<(String, i32), (i64, Option<Instant>)>,
    longest: (Duration, String),
}

impl PartitionWatch {
    fn new(env: &TestEnv) -> Self {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers())
            .set("group.id", &env.group)
            .set("isolation.level", "read_committed")
            .create()
            .expect("offset reader");
        let mut partitions = TopicPartitionList::new();
        for topic in &env.topics {
            for partition in 0..env.partitions {
                partitions.add_partition(topic, partition);
            }
        }
        Self {
            consumer: std::sync::Arc::new(consumer),
            partitions,
            state: BTreeMap::new(),
            longest: (Duration::ZERO, "none".to_owned()),
        }
    }

    /// Reads committed and end offsets once; `pause_clock` (ClickHouse down) restarts every
    /// clock, as nothing can be committed then.
    async fn observe(&mut self, pause_clock: bool) {
        let consumer = std::sync::Arc::clone(&self.consumer);
        let partitions = self.partitions.clone();
        let read = tokio::task::spawn_blocking(move || {
            let timeout = Duration::from_secs(2);
            let committed = consumer
                .committed_offsets(partitions.clone(), timeout)
                .ok()?;
            let mut ends = TopicPartitionList::new();
            for element in partitions.elements() {
                ends.add_partition_offset(element.topic(), element.partition(), Offset::End)
                    .ok()?;
            }
            let ends = consumer.offsets_for_times(ends, timeout).ok()?;
            let offset = |list: &TopicPartitionList, topic: &str, partition: i32| match list
                .find_partition(topic, partition)?
                .offset()
            {
                Offset::Offset(o) => Some(o),
                _ => None,
            };
            Some(
                partitions
                    .elements()
                    .iter()
                    .filter_map(|e| {
                        let end = offset(&ends, e.topic(), e.partition())?;
                        let committed = offset(&committed, e.topic(), e.partition()).unwrap_or(0);
                        Some(((e.topic().to_owned(), e.partition()), committed, end))
                    })
                    .collect::<Vec<_>>(),
            )
        });
        let Ok(Some(readings)) = read.await else {
            return;
        };
        let now = Instant::now();
        for (key, committed, end) in readings {
            let entry = self.state.entry(key.clone()).or_insert((committed, None));
            // Within one offset of the end: a transaction marker may follow the last event.
            let caught_up = committed + 1 >= end;
            if pause_clock || caught_up || committed > entry.0 {
                if let Some(since) = entry.1 {
                    note_stall(&mut self.longest, since.elapsed(), &key, "ended");
                }
                entry.1 = (!caught_up).then_some(now);
            } else if entry.1.is_none() {
                entry.1 = Some(now);
            }
            entry.0 = committed;
        }
    }

    fn longest(&mut self) -> (Duration, String) {
        let open: Vec<((String, i32), Instant)> = self
            .state
            .iter()
            .filter_map(|(key, (_, since))| since.map(|since| (key.clone(), since)))
            .collect();
        for (key, since) in open {
            note_stall(&mut self.longest, since.elapsed(), &key, "still");
        }
        self.longest.clone()
    }
}

fn note_stall(
    longest: &mut (Duration, String),
    stalled: Duration,
    (topic, partition): &(String, i32),
    how: &str,
) {
    if stalled > longest.0 {
        *longest = (stalled, format!("{topic}[{partition}] ({how})"));
    }
}

/// What one round of probes saw of a replica.
struct Probe {
    /// `/healthz` answered 503, with this body.
    unhealthy: Option<String>,
    ready: bool,
    last_progress: Option<f64>,
}

async fn probe(http: &reqwest::Client, port: u16) -> Probe {
    let base = format!("http://127.0.0.1:{port}");
    let unhealthy = match http.get(format!("{base}/healthz")).send().await {
        Ok(response) if response.status().as_u16() == 503 => {
            Some(response.text().await.unwrap_or_default().trim().to_owned())
        }
        _ => None,
    };
    let ready = http
        .get(format!("{base}/readyz"))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success());
    let metrics = match http.get(format!("{base}/metrics")).send().await {
        Ok(response) => response.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    };
    Probe {
        unhealthy,
        ready,
        last_progress: metric_value(&metrics, "audit_ingest_last_progress_timestamp_seconds"),
    }
}

/// `ingested_at_ms` of the newest stored row of each source partition.
async fn newest_ingest_per_partition(env: &TestEnv) -> BTreeMap<(String, i32), u64> {
    #[derive(clickhouse::Row, serde::Deserialize)]
    struct Newest {
        topic: String,
        partition: i32,
        newest: u64,
    }
    let query = env
        .client()
        .query(
            "SELECT source_topic AS topic, source_partition AS partition, \
             max(ingested_at_ms) AS newest FROM audit_events GROUP BY topic, partition",
        )
        .fetch_all::<Newest>();
    match tokio::time::timeout(Duration::from_secs(1), query).await {
        Ok(Ok(rows)) => rows
            .into_iter()
            .map(|r| ((r.topic, r.partition), r.newest))
            .collect(),
        _ => BTreeMap::new(),
    }
}

/// How many events [`publish_at_rate`] publishes.
pub fn planned_events(rate: u64, length: Duration) -> u64 {
    (rate / 10).max(1) * (length.as_millis() as u64 / 100)
}

/// Publishes `rate` events per second for `length`, in 100 ms steps; returns how many.
async fn publish_at_rate(env: TestEnv, rate: u64, length: Duration) -> u64 {
    let producer = producer();
    let examples: Vec<Value> = valid_examples();
    let per_step = (rate / 10).max(1);
    let steps = length.as_millis() as u64 / 100;
    let started = Instant::now();
    let mut next = 0usize;
    for step in 0..steps {
        let events: Vec<Value> = (0..per_step as usize)
            .map(|i| generated_event(&examples, "chaos", next + i))
            .collect();
        next += events.len();
        publish(&env, &producer, &events).await;
        let due = started + Duration::from_millis((step + 1) * 100);
        tokio::time::sleep_until(due.into()).await;
    }
    next as u64
}

/// Reads the seed from `AUDIT_CHAOS_SEED`, else `default`.
pub fn seed_from_env(default: u64) -> u64 {
    std::env::var("AUDIT_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}
