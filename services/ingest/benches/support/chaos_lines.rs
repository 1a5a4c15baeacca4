//! The liveness lines of `make bench BENCH=ingest`: events visible per second while replicas are
//! killed, ClickHouse goes away and the group grows and shrinks, against the same load without
//! faults; and how long the group takes to consume every partition again after a replica is
//! SIGKILLed, with static membership (the default) and with dynamic membership and the eager
//! assignor (the configuration before static membership). The faults come from the chaos test's
//! harness (`tests/common/chaos.rs`), run against the release build.

use std::time::Duration;

use audit_testkit::percentile;

use crate::common::chaos::{ChaosOutcome, ChaosRun, ChaosSettings, Fault, Plan, PlanShape};
use crate::common::{PrivateClickHouse, TestEnv};

/// Publishing rate and length of every chaos line: the rate of the run that found the stall.
pub const RATE: u64 = 8_000;
const PUBLISH_FOR: Duration = Duration::from_secs(60);
const SEED: u64 = 1;

fn settings(static_membership: bool, extra: &[(&str, &str)]) -> ChaosSettings {
    ChaosSettings {
        rate: RATE,
        publish_for: PUBLISH_FOR,
        settle_within: Duration::from_secs(120),
        ingest: extra
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        static_membership,
        liveness_failures: 3,
        stall_after: Duration::from_secs(120),
        binary: env!("CARGO_BIN_EXE_audit-ingest").into(),
    }
}

/// One schedule against a database of its own on `server`; also returns the events stored per
/// second between each kill and the group's resume.
async fn run(
    server: &PrivateClickHouse,
    name: &str,
    plan: &Plan,
    settings: ChaosSettings,
) -> (ChaosOutcome, Option<String>) {
    let mut env = TestEnv::new(name, 6).await;
    env.clickhouse.url = server.url();
    eprintln!("bench: {name}: {}", describe(plan));
    let outcome = ChaosRun {
        env: &env,
        server,
        plan: plan.clone(),
        settings,
    }
    .run()
    .await;
    let stored = kill_windows(&env, &outcome).await;
    env.drop_database().await;
    (outcome, stored)
}

/// How long after each kill the group's stored rate is measured: the others' progress while
/// one replica restarts.
const AFTER_KILL: Duration = Duration::from_secs(10);

/// Events stored per second in the `AFTER_KILL` after each kill, over all kills, as text.
async fn kill_windows(env: &TestEnv, outcome: &ChaosOutcome) -> Option<String> {
    let mut rows = 0u64;
    let mut seconds = 0.0;
    for kill in &outcome.kills {
        let from = (kill.unix_at * 1000.0) as u64;
        let to = from + AFTER_KILL.as_millis() as u64;
        rows += env
            .client()
            .query(
                "SELECT count() FROM audit_events WHERE ingested_at_ms >= ? AND ingested_at_ms < ?",
            )
            .bind(from)
            .bind(to)
            .fetch_one::<u64>()
            .await
            .unwrap_or(0);
        seconds += AFTER_KILL.as_secs_f64();
    }
    (seconds > 0.0).then(|| format!("{:.0}", rows as f64 / seconds))
}

struct Resume {
    kills: usize,
    resumed: usize,
    p50: f64,
    max: f64,
    stored_per_second: String,
}

fn resume_of(outcome: &ChaosOutcome, stored_per_second: Option<String>) -> Resume {
    let mut seconds: Vec<f64> = outcome
        .kills
        .iter()
        .filter_map(|k| k.resumed_after.map(|d| d.as_secs_f64()))
        .collect();
    seconds.sort_by(f64::total_cmp);
    Resume {
        kills: outcome.kills.len(),
        resumed: seconds.len(),
        p50: percentile(&seconds, 0.5),
        max: seconds.last().copied().unwrap_or(f64::NAN),
        stored_per_second: stored_per_second.unwrap_or_else(|| "-".to_owned()),
    }
}

fn describe(plan: &Plan) -> String {
    let kills = plan
        .faults
        .iter()
        .filter(|(_, f)| matches!(f, Fault::Kill { .. }))
        .count();
    let outage = plan.faults.iter().find_map(|(at, f)| match f {
        Fault::ClickHouseOutage { down_for } => Some(format!(
            ", ClickHouse down {:.0} s from {:.0} s",
            down_for.as_secs_f64(),
            at.as_secs_f64()
        )),
        _ => None,
    });
    let scaling = if plan
        .faults
        .iter()
        .any(|(_, f)| matches!(f, Fault::AddReplica { .. }))
    {
        ", one replica added and one removed"
    } else {
        ""
    };
    format!("{kills} SIGKILLs{}{scaling}", outage.unwrap_or_default())
}

/// Runs the four chaos lines and prints their tables.
pub async fn lines() {
    let no_faults = Plan {
        seed: 0,
        replicas: 3,
        faults: Vec::new(),
    };
    let compound = Plan::generate(SEED, &PlanShape::compound(PUBLISH_FOR));
    let kills_only = Plan::generate(
        SEED,
        &PlanShape {
            replicas: 3,
            span: PUBLISH_FOR,
            kill_every: (Duration::from_secs(8), Duration::from_secs(10)),
            outage: None,
            add_and_remove: false,
        },
    );
    let server = PrivateClickHouse::start();
    let (steady, _) = run(&server, "bench-steady", &no_faults, settings(true, &[])).await;
    let (chaos, _) = run(&server, "bench-chaos", &compound, settings(true, &[])).await;
    let (outcome, stored) = run(
        &server,
        "bench-kills-static",
        &kills_only,
        settings(true, &[]),
    )
    .await;
    let statics = resume_of(&outcome, stored);
    let before = settings(
        false,
        &[("AUDIT_INGEST__KAFKA__ASSIGNOR", "range,roundrobin")],
    );
    let (outcome, stored) = run(&server, "bench-kills-dynamic", &kills_only, before).await;
    let dynamic = resume_of(&outcome, stored);
    drop(server);

    let published = |o: &ChaosOutcome| o.published;
    let per_second = |o: &ChaosOutcome| {
        o.visible_at_publish_end
            .map_or(f64::NAN, |v| v as f64 / PUBLISH_FOR.as_secs_f64())
    };
    let settled = |o: &ChaosOutcome| {
        o.settled_after.map_or("not within 120 s".to_owned(), |d| {
            format!("{:.1}", d.as_secs_f64())
        })
    };
    let exact = |o: &ChaosOutcome| {
        if o.visible == o.published && o.distinct == o.published {
            "yes".to_owned()
        } else {
            format!("NO ({} visible, {} distinct)", o.visible, o.distinct)
        }
    };
    println!();
    println!(
        "Liveness under faults: 3 replicas of the release build (default settings: static \
         membership, cooperative-sticky, 50,000-row batches), {RATE} events/s published for \
         {} s over 3 topics x 6 partitions, ClickHouse 18.16 of the run's own; the supervisor \
         restarts a replica that exits, as a kubelet would. Schedule from seed {SEED}: {}.",
        PUBLISH_FOR.as_secs(),
        describe(&compound)
    );
    println!();
    println!("| line | events published | events/s visible while publishing | all visible after the last fault or event (s) | exactly once | stuck replicas |");
    println!("|---|---:|---:|---:|---|---:|");
    for (name, outcome) in [
        ("steady state (no faults)", &steady),
        ("chaos schedule", &chaos),
    ] {
        println!(
            "| {name} | {} | {:.0} | {} | {} | {} |",
            published(outcome),
            per_second(outcome),
            settled(outcome),
            exact(outcome),
            outcome.liveness_restarts.len()
        );
    }
    println!(
        "| chaos / steady | | {:.2} | | | |",
        per_second(&chaos) / per_second(&steady)
    );
    println!();
    println!(
        "Kill to resume: {} SIGKILLs 8-10 s apart, each replica started again 1-2 s later, no \
         other fault; from the kill until every partition has stored an event read after it.",
        kills_only.faults.len()
    );
    println!();
    println!("| membership | kills (resumed) | kill -> group consuming again p50 (s) | max (s) | events/s stored in the {} s after each kill (published: {RATE}) |", AFTER_KILL.as_secs());
    println!("|---|---:|---:|---:|---:|");
    for (name, line) in [
        (
            "static: group.instance.id, session 30 s, cooperative-sticky (default)",
            &statics,
        ),
        (
            "dynamic: no instance id, session 10 s, range,roundrobin (before)",
            &dynamic,
        ),
    ] {
        println!(
            "| {name} | {} ({}) | {:.1} | {:.1} | {} |",
            line.kills, line.resumed, line.p50, line.max, line.stored_per_second
        );
    }
}
