//! Liveness under compound faults, with the real `audit-ingest` binary, the real Kafka of the
//! local stack and a ClickHouse server of the test's own: three replicas, events published
//! continuously, random SIGKILLs and restarts, a ClickHouse outage, a replica added and one
//! removed. Every event must be visible exactly once soon after the last fault, stored once (no
//! copies from the ingest's re-deliveries, so the API's totals are exact), and no replica may
//! stay stuck or call itself ready while stuck.
//!
//! The schedule comes from a seed (`AUDIT_CHAOS_SEED`, default 1); a failure prints it with the
//! schedule, a journal of the run and the tail of every replica's log. `AUDIT_CHAOS_INGEST_BINARY`
//! runs another `audit-ingest` build through the same schedule.

mod common;

use std::time::Duration;

use common::chaos::{seed_from_env, ChaosRun, ChaosSettings, Plan, PlanShape};
use common::*;

/// How long a partition with lag may go without a commit, outside ClickHouse's outage. The
/// longest legitimate wait: a rebalance whose leader is killed half-way waits out the dead
/// member's 30 s session, and every replica's commits fail meanwhile (they go on storing);
/// seen up to 40 s over ten seeds. A partition left paused stays without commits for good.
const MAX_PARTITION_STALL: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_under_kills_an_outage_and_scaling_store_every_event_once_and_never_stall() {
    let seed = seed_from_env(1);
    let server = PrivateClickHouse::start();
    let mut env = TestEnv::new("chaos", 6).await;
    env.use_server(&server);
    let other_build = std::env::var_os("AUDIT_CHAOS_INGEST_BINARY").map(std::path::PathBuf::from);
    env.track_inserts(other_build.as_deref()).await;
    let plan = Plan::generate(seed, &PlanShape::compound(Duration::from_secs(60)));
    let settings = ChaosSettings {
        rate: 2_000,
        publish_for: Duration::from_secs(60),
        settle_within: Duration::from_secs(60),
        ingest: vec![
            // Small batches, so that a 2,000 events/s run reaches back-pressure (a full batch
            // behind a flush waiting for ClickHouse) as a user's 8,000 events/s run does with
            // the default 50,000.
            ("AUDIT_INGEST__BATCH__MAX_ROWS".into(), "2000".into()),
            // The default back-off cap (the test harness lowers it to 1 s): after an outage a
            // flush may wait up to 5 s for its next try, and rebalances happen meanwhile.
            ("AUDIT_INGEST__RETRY__MAX_BACKOFF_MS".into(), "5000".into()),
            // A stall is called within the run's two minutes.
            (
                "AUDIT_INGEST__LIVENESS__STALL_AFTER_MS".into(),
                "30000".into(),
            ),
        ],
        static_membership: true,
        liveness_failures: 3,
        stall_after: Duration::from_secs(30),
        // Another build can be put through the same schedule (a release build, an older commit).
        binary: std::env::var_os("AUDIT_CHAOS_INGEST_BINARY")
            .map_or_else(|| env!("CARGO_BIN_EXE_audit-ingest").into(), Into::into),
    };
    let outcome = ChaosRun {
        env: &env,
        server: &server,
        plan: plan.clone(),
        settings,
    }
    .run()
    .await;

    let report = format!(
        "seed {seed} (replay with AUDIT_CHAOS_SEED={seed})\nschedule: {:#?}\njournal:\n{}\n\
         kills: {:?}\n{}",
        plan.faults,
        outcome.journal.join("\n"),
        outcome.kills,
        outcome.logs
    );
    assert!(
        outcome.settled_after.is_some(),
        "not every event visible 60 s after the last fault: {} of {} ({} distinct)\n{report}",
        outcome.visible,
        outcome.published,
        outcome.distinct
    );
    assert_eq!(
        (outcome.visible, outcome.distinct),
        (outcome.published, outcome.published),
        "visible rows and distinct ids must both equal the events published\n{report}"
    );
    // No copies: no event was inserted twice over the whole run (merges aside), the stored
    // rows are the events for every organization, every copy table holds every event, and the
    // read API's total says so, exactly. (The tracking view can miss rows: ClickHouse writes
    // views after the table, and an insert cut short by the outage in between leaves them out;
    // it cannot count a row twice that was inserted once.)
    let (inserted, distinct) = env.inserted_and_distinct().await;
    assert_eq!(
        inserted, distinct,
        "rows ever inserted and distinct events among them: the ingest stored copies\n{report}"
    );
    for copy in audit_store::COPY_TABLES {
        let keys: u64 = env
            .client()
            .query(&format!(
                "SELECT uniqExact(organization_id, occurred_at_ms, id) FROM {}",
                copy.table
            ))
            .fetch_one()
            .await
            .unwrap();
        assert_eq!(
            keys, outcome.published,
            "{} misses events the events table holds\n{report}",
            copy.table
        );
    }
    let stored = env.stored_and_distinct().await;
    for (org, (rows, ids)) in &stored {
        assert_eq!(
            rows, ids,
            "{org}: {rows} rows stored for {ids} events: the ingest stored copies\n{report}"
        );
    }
    let organizations: Vec<&str> = stored.keys().map(String::as_str).collect();
    let api = ApiProcess::spawn(&env, &organizations).await;
    let mut total = 0;
    for (org, (_, ids)) in &stored {
        let (count, exact) = api.total(org).await;
        assert_eq!(
            (count, exact),
            (*ids, true),
            "{org}: the API's total (and X-Total-Count-Exact) against its events\n{report}"
        );
        total += count;
    }
    assert_eq!(
        total, outcome.published,
        "API totals against the events published"
    );
    drop(api);
    eprintln!(
        "chaos seed {seed}: rows ever inserted {inserted} for {distinct} events ({} rows of inserts \
         cut short between the events table and its views, copied into the copy tables)",
        outcome.published - distinct
    );
    // Seen from Kafka: no partition with lag goes long without a commit (ClickHouse's outage
    // aside).
    let (stall, partition) = &outcome.longest_partition_stall;
    assert!(
        *stall < MAX_PARTITION_STALL,
        "partition {partition} had lag and no commit for {stall:?} (limit {MAX_PARTITION_STALL:?})\n{report}"
    );
    assert!(
        outcome.ready_while_stuck.is_empty(),
        "a replica called itself ready while stuck: {:?}\n{report}",
        outcome.ready_while_stuck
    );
    assert!(
        outcome.liveness_restarts.is_empty(),
        "a replica got stuck (the supervisor restarted it on /healthz): {:?}\n{report}",
        outcome.liveness_restarts
    );
    eprintln!(
        "chaos seed {seed}: {} events, all visible {:.1} s after the last fault ({} kills, {} \
         restarts after a failed start); longest partition stall {:.1} s ({})",
        outcome.published,
        outcome.settled_after.unwrap_or_default().as_secs_f64(),
        outcome.kills.len(),
        outcome.crash_restarts,
        stall.as_secs_f64(),
        partition
    );
}

/// The schedules themselves: every victim exists and runs at the time of its fault, whatever the
/// seed, and every schedule has the faults the test promises.
#[test]
fn schedules_only_fault_replicas_that_are_running() {
    use common::chaos::Fault;
    use std::collections::BTreeSet;
    for seed in 0..500 {
        let plan = Plan::generate(seed, &PlanShape::compound(Duration::from_secs(60)));
        let mut running: BTreeSet<usize> = (0..plan.replicas).collect();
        let mut back: Vec<(Duration, usize)> = Vec::new();
        let (mut kills, mut outages, mut adds, mut removes) = (0, 0, 0, 0);
        for (at, fault) in &plan.faults {
            back.retain(|(when, slot)| {
                if when <= at {
                    running.insert(*slot);
                }
                when > at
            });
            match fault {
                Fault::Kill {
                    slot,
                    restart_after,
                } => {
                    assert!(
                        running.remove(slot),
                        "seed {seed}: kill of {slot} at {at:?}"
                    );
                    back.push((*at + *restart_after, *slot));
                    kills += 1;
                }
                Fault::ClickHouseOutage { down_for } => {
                    assert!(*down_for >= Duration::from_secs(15), "seed {seed}");
                    outages += 1;
                }
                Fault::AddReplica { slot } => {
                    assert!(
                        running.insert(*slot),
                        "seed {seed}: slot {slot} added twice"
                    );
                    adds += 1;
                }
                Fault::RemoveReplica { slot } => {
                    assert!(
                        running.remove(slot),
                        "seed {seed}: removal of {slot} at {at:?}"
                    );
                    removes += 1;
                }
            }
        }
        assert!(kills >= 5, "seed {seed}: {kills} kills");
        assert_eq!((outages, adds, removes), (1, 1, 1), "seed {seed}");
        assert!(
            plan.last_fault_end() <= Duration::from_secs(60),
            "seed {seed}"
        );
    }
}
