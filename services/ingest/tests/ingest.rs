//! End-to-end behaviour of `audit-ingest` against the real Kafka and ClickHouse of the local
//! stack: the real binary, real failures (SIGKILL, SIGTERM, a ClickHouse that goes away).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use audit_event::AuditEvent;
use audit_store::{AuditEventRow, Lineage};
use common::*;
use nix::sys::signal::Signal;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Headers;
use rdkafka::Message;
use serde_json::Value;

const READY: Duration = Duration::from_secs(60);
const ARRIVE: Duration = Duration::from_secs(90);

/// The stored row an event must become (lineage aside).
fn expected_row(event: &Value) -> AuditEventRow {
    let parsed = AuditEvent::from_slice(&serde_json::to_vec(event).unwrap()).unwrap();
    AuditEventRow::from_event(
        &parsed,
        &Lineage {
            topic: String::new(),
            partition: 0,
            offset: 0,
            ingested_at_ms: 0,
        },
    )
}

fn without_lineage(mut row: AuditEventRow) -> AuditEventRow {
    row.source_topic.clear();
    row.source_partition = 0;
    row.source_offset = 0;
    row.ingested_at_ms = 0;
    row
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_catalog_type_over_three_topics_is_stored_once_field_by_field() {
    let env = TestEnv::new("catalog", 4).await;
    let events = generate_events("cat", 600);
    let producer = producer();
    publish(&env, &producer, &events).await;
    // Re-deliveries: the same ids again, as an upstream retry or a replay would send them.
    publish(&env, &producer, &events[..150]).await;

    let mut ingest = IngestProcess::spawn(&env, &[("AUDIT_INGEST__DIRECTORY__ENRICH", "false")]);
    ingest.wait_ready(READY).await;
    env.wait_for_count(600, ARRIVE).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(env.visible_count().await, 600, "duplicates visible");

    let stored: Vec<AuditEventRow> = env
        .client()
        .query("SELECT ?fields FROM audit_events FINAL ORDER BY id")
        .fetch_all()
        .await
        .unwrap();
    let by_id: BTreeMap<&str, &AuditEventRow> = stored.iter().map(|r| (r.id.as_str(), r)).collect();
    let mut types = BTreeSet::new();
    for event in &events {
        let id = event["id"].as_str().unwrap();
        let row = by_id.get(id).unwrap_or_else(|| panic!("{id} missing"));
        assert_eq!(
            row.source_topic,
            topic_for(&env, event),
            "{id} lineage topic"
        );
        assert!(row.ingested_at_ms > 0);
        assert_eq!(
            without_lineage((*row).clone()),
            expected_row(event),
            "{id} differs"
        );
        types.insert(row.event_type.clone());
    }
    for entry in serde_json::from_slice::<Value>(
        &std::fs::read(repo_root().join("schemas/events/catalog.json")).unwrap(),
    )
    .unwrap()["types"]
        .as_array()
        .unwrap()
    {
        assert!(
            types.contains(entry["type"].as_str().unwrap()),
            "{} not exercised",
            entry["type"]
        );
    }
    let metrics = ingest.metrics().await;
    assert_eq!(
        metric_sum(&metrics, "audit_ingest_events_consumed_total"),
        750.0
    );
    ingest.signal(Signal::SIGTERM);
    assert!(ingest
        .wait_exit(Duration::from_secs(10))
        .await
        .is_some_and(|s| s.success()));
    env.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_examples_are_dead_lettered_with_their_reason_and_valid_neighbours_stored() {
    let env = TestEnv::new("dlq", 2).await;
    let dir = repo_root().join("schemas/events/examples/invalid");
    let expected: Value =
        serde_json::from_slice(&std::fs::read(dir.join("expected.json")).unwrap()).unwrap();
    let expected: BTreeMap<String, String> = expected["examples"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(file, reason)| {
            (
                file.rsplit('/').next().unwrap().to_owned(),
                reason.as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let valid = generate_events("dlq-ok", expected.len() * 2);
    let mut messages = Vec::new();
    for (i, (file, _)) in expected.iter().enumerate() {
        messages.push((
            format!("ok-{i}-a"),
            serde_json::to_vec(&valid[2 * i]).unwrap(),
        ));
        messages.push((
            format!("bad:{file}"),
            std::fs::read(dir.join(file)).unwrap(),
        ));
        messages.push((
            format!("ok-{i}-b"),
            serde_json::to_vec(&valid[2 * i + 1]).unwrap(),
        ));
    }
    let producer = producer();
    produce(&producer, &env.topics[0], &messages).await;

    let mut ingest = IngestProcess::spawn(&env, &[]);
    ingest.wait_ready(READY).await;
    env.wait_for_count(valid.len() as u64, ARRIVE).await;

    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", format!("{}-reader", env.group))
        .set("auto.offset.reset", "earliest")
        .set("fetch.message.max.bytes", "4194304")
        .create()
        .unwrap();
    consumer
        .subscribe(&[env.dead_letter_topic.as_str()])
        .unwrap();
    let mut seen = BTreeMap::new();
    while seen.len() < expected.len() {
        let message = tokio::time::timeout(ARRIVE, consumer.recv())
            .await
            .expect("dead letter")
            .unwrap();
        let key = String::from_utf8(message.key().unwrap().to_vec()).unwrap();
        let file = key
            .strip_prefix("bad:")
            .expect("only invalid messages are dead-lettered")
            .to_owned();
        let headers: BTreeMap<String, String> = message
            .headers()
            .unwrap()
            .iter()
            .map(|h| {
                (
                    h.key.to_owned(),
                    String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                )
            })
            .collect();
        assert_eq!(
            message.payload().unwrap_or_default(),
            std::fs::read(dir.join(&file)).unwrap().as_slice(),
            "{file}: bytes changed"
        );
        assert_eq!(headers["dlq.source.topic"], env.topics[0]);
        assert!(headers["dlq.source.offset"].parse::<i64>().is_ok());
        assert!(!headers["dlq.detail"].is_empty());
        seen.insert(file, headers["dlq.reason"].clone());
    }
    assert_eq!(seen, expected);
    assert_eq!(env.visible_count().await, valid.len() as u64);
    env.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_batch_loses_nothing_and_shows_nothing_twice() {
    let env = TestEnv::new("sigkill", 6).await;
    env.track_inserts(None).await;
    let events = generate_events("kill", 3000);
    let producer = producer();
    let settings = [
        ("AUDIT_INGEST__BATCH__MAX_ROWS", "100"),
        ("AUDIT_INGEST__BATCH__MAX_AGE_MS", "50"),
    ];
    for round in 0..4 {
        let chunk = &events[round * 600..(round + 1) * 600];
        let mut ingest = IngestProcess::spawn(&env, &settings);
        ingest.wait_ready(READY).await;
        publish(&env, &producer, chunk).await;
        // Kill while batches are in flight: some inserted and not committed, some half-read.
        let before = env.visible_count().await;
        let deadline = std::time::Instant::now() + ARRIVE;
        while env.visible_count().await <= before + 50 {
            assert!(
                std::time::Instant::now() < deadline,
                "round {round}: nothing ingested:\n{}",
                ingest.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        ingest.signal(Signal::SIGKILL);
        ingest
            .wait_exit(Duration::from_secs(5))
            .await
            .expect("killed");
    }
    publish(&env, &producer, &events[2400..]).await;
    let mut ingest = IngestProcess::spawn(&env, &settings);
    ingest.wait_ready(READY).await;
    env.wait_for_count(3000, ARRIVE).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ids = env.visible_ids().await;
    let wanted: Vec<String> = events
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), 3000, "duplicates or losses");
    assert_eq!(ids, wanted);
    // Killed replicas left batches stored and not committed; their successors skipped them.
    assert_eq!(no_copies(&env).await, 3000);
    // And published them again: every stored event is in the stored-events topic, in its
    // organization's partition; a reader that skips ids it has seen gets each source
    // partition's events in source order.
    let published = env.stored_messages();
    let mut seen: BTreeSet<String> = BTreeSet::new();
    let mut last: BTreeMap<(i32, String, i32), i64> = BTreeMap::new();
    for (partition, key, row) in &published {
        assert_eq!(key, &row.organization_id);
        assert_eq!(
            *partition,
            audit_store::stored::partition_of(&row.organization_id, STORED_PARTITIONS)
        );
        if !seen.insert(row.id.clone()) {
            continue;
        }
        let source = (*partition, row.source_topic.clone(), row.source_partition);
        if let Some(previous) = last.insert(source, row.source_offset) {
            assert!(
                row.source_offset > previous,
                "{} published before an earlier event of its source partition",
                row.id
            );
        }
    }
    assert_eq!(
        seen.len(),
        3000,
        "stored events missing from the stored topic"
    );
    assert_eq!(
        env.inserted_and_distinct().await,
        (3000, 3000),
        "copies were inserted"
    );
    ingest.signal(Signal::SIGTERM);
    ingest.wait_exit(Duration::from_secs(10)).await;
    env.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_flushes_a_partial_batch_and_commits_it() {
    let env = TestEnv::new("sigterm", 2).await;
    // A batch that would wait a minute for more events: only the shutdown flushes it.
    let mut ingest = IngestProcess::spawn(
        &env,
        &[
            ("AUDIT_INGEST__BATCH__MAX_AGE_MS", "60000"),
            ("AUDIT_INGEST__BATCH__MAX_ROWS", "100000"),
        ],
    );
    ingest.wait_ready(READY).await;
    let events = generate_events("term", 7);
    publish(&env, &producer(), &events).await;
    ingest
        .wait_for_metric(
            "audit_ingest_events_consumed_total",
            7.0,
            ARRIVE,
            "not consumed",
        )
        .await;
    assert_eq!(env.visible_count().await, 0, "flushed before its age");

    let stopping = std::time::Instant::now();
    ingest.signal(Signal::SIGTERM);
    let status = ingest
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("exit within 10 s");
    assert!(status.success(), "exit status {status}:\n{}", ingest.logs());
    assert!(stopping.elapsed() < Duration::from_secs(10));
    assert_eq!(env.visible_count().await, 7);
    let committed: i64 = env.committed_offsets().values().sum();
    assert_eq!(committed, 7, "offsets of the flushed batch committed");
    env.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_the_partitions_and_one_stopping_loses_nothing() {
    let env = TestEnv::new("replicas", 6).await;
    let events = generate_events("rep", 2400);
    let producer = producer();
    let settings = [
        ("AUDIT_INGEST__BATCH__MAX_ROWS", "200"),
        ("AUDIT_INGEST__BATCH__MAX_AGE_MS", "100"),
    ];
    let mut first = IngestProcess::spawn(&env, &settings);
    let mut second = IngestProcess::spawn(&env, &settings);
    first.wait_ready(READY).await;
    second.wait_ready(READY).await;

    publish(&env, &producer, &events[..1200]).await;
    let deadline = std::time::Instant::now() + ARRIVE;
    while env.visible_count().await < 300 {
        assert!(std::time::Instant::now() < deadline, "nothing ingested");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Stop one mid-stream; the survivor takes over its partitions.
    second.signal(Signal::SIGTERM);
    publish(&env, &producer, &events[1200..]).await;
    assert!(second
        .wait_exit(Duration::from_secs(10))
        .await
        .is_some_and(|s| s.success()));
    env.wait_for_count(2400, ARRIVE).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(env.visible_count().await, 2400);
    let metrics = first.metrics().await;
    assert!(
        metric_sum(&metrics, "audit_ingest_events_inserted_total") > 0.0,
        "first replica did work"
    );
    first.signal(Signal::SIGTERM);
    first.wait_exit(Duration::from_secs(10)).await;
    env.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projection_fills_missing_emails_and_team_names() {
    let env = TestEnv::new("projection", 1).await;
    let producer = producer();
    let event =
        |id: &str, kind: &str, at: &str, actor: Value, resource: Value, affected: Option<Value>| {
            let mut e = serde_json::json!({
                "id": id, "type": kind, "occurredAt": at, "organizationId": "org_p",
                "actor": actor, "resource": resource,
            });
            if let Some(a) = affected {
                e["affectedUser"] = a;
            }
            e
        };
    let created = event(
        "p-1",
        "user.created",
        "2025-05-01T10:00:00Z",
        serde_json::json!({"id": "scim", "type": "scim"}),
        serde_json::json!({"type": "user", "id": "u_carol"}),
        Some(serde_json::json!({"id": "u_carol", "email": "carol@acme.example"})),
    );
    let team = event(
        "p-2",
        "team.created",
        "2025-05-01T10:01:00Z",
        serde_json::json!({"id": "u_carol", "email": "carol@acme.example"}),
        serde_json::json!({"type": "team", "id": "t_core", "name": "Core"}),
        None,
    );
    let ids_only = event(
        "p-3",
        "team_member.added",
        "2025-05-01T10:02:00Z",
        serde_json::json!({"id": "u_carol"}),
        serde_json::json!({"type": "team", "id": "t_core"}),
        Some(serde_json::json!({"id": "u_carol"})),
    );
    let mut ingest = IngestProcess::spawn(&env, &[]);
    ingest.wait_ready(READY).await;
    publish(&env, &producer, &[created, team]).await;
    env.wait_for_count(2, ARRIVE).await;
    publish(&env, &producer, std::slice::from_ref(&ids_only)).await;
    env.wait_for_count(3, ARRIVE).await;

    // A fresh process (empty cache) must find the facts in ClickHouse.
    ingest.signal(Signal::SIGTERM);
    ingest.wait_exit(Duration::from_secs(10)).await;
    let mut ingest = IngestProcess::spawn(&env, &[]);
    ingest.wait_ready(READY).await;
    let mut later = ids_only.clone();
    later["id"] = Value::String("p-4".into());
    later["occurredAt"] = Value::String("2025-05-02T00:00:00Z".into());
    publish(&env, &producer, &[later]).await;
    env.wait_for_count(4, ARRIVE).await;

    let rows: Vec<AuditEventRow> = env
        .client()
        .query("SELECT ?fields FROM audit_events FINAL WHERE id IN ('p-3', 'p-4') ORDER BY id")
        .fetch_all()
        .await
        .unwrap();
    assert_eq!(rows.len(), 2);
    for row in rows {
        assert_eq!(
            row.actor_email.as_deref(),
            Some("carol@acme.example"),
            "{}",
            row.id
        );
        assert_eq!(
            row.affected_user_email.as_deref(),
            Some("carol@acme.example"),
            "{}",
            row.id
        );
        assert_eq!(row.resource_name.as_deref(), Some("Core"), "{}", row.id);
    }
    let metrics = ingest.metrics().await;
    assert_eq!(
        metric_sum(&metrics, "audit_ingest_enriched_fields_total"),
        3.0
    );
    env.drop_database().await;
}

/// An erased person's events that occurred before their erasure and arrive (again) afterwards
/// are stored and published under their pseudonyms, and so is the directory's fact; their
/// later events are stored as sent (`retention.pseudonymize_later_events` is off).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erased_persons_events_arriving_again_are_stored_under_pseudonyms() {
    let env = TestEnv::new("erased", 1).await;
    let producer = producer();
    let key = "ingest-test-pseudonym-key-0123456789";
    let mut ingest = IngestProcess::spawn(
        &env,
        &[
            ("AUDIT_INGEST__RETENTION__PSEUDONYM_KEY", key),
            ("AUDIT_INGEST__RETENTION__REFRESH_INTERVAL_MS", "200"),
        ],
    );
    ingest.wait_ready(READY).await;
    // The erasure, as `audit-api erase` records it (on 2025-06-01).
    env.client()
        .query(
            "INSERT INTO audit_erasures (organization_id, user_id, erasure_id, version, \
             requested_by, requested_at_ms, state, step, events, finished_at_ms) \
             VALUES ('org_e', 'u_ada', 'erasure_1', 1, 'dpo', 1748736000000, 'done', 4, 1, 1748736000000)",
        )
        .execute()
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let event = |id: &str, at: &str, actor: Value, affected: Value| {
        serde_json::json!({
            "id": id, "type": "user.updated", "occurredAt": at, "organizationId": "org_e",
            "actor": actor, "resource": {"type": "user", "id": "u_ada"},
            "affectedUser": affected,
            "changes": [{"field": "email", "oldValue": "ada@old.example", "newValue": "ada@corp.example"}],
            "context": {"ip": "198.51.100.23", "userAgent": "AdaBrowser/1.0"},
        })
    };
    let ada = serde_json::json!({"id": "u_ada", "type": "user", "email": "ada@corp.example", "name": "Ada Lovelace"});
    let bob = serde_json::json!({"id": "u_bob", "type": "user", "email": "bob@corp.example"});
    let before = event(
        "e-1",
        "2025-05-01T10:00:00Z",
        ada.clone(),
        serde_json::json!({"id": "u_ada", "email": "ada@corp.example"}),
    );
    let about = event(
        "e-2",
        "2025-05-02T10:00:00Z",
        bob,
        serde_json::json!({"id": "u_ada", "email": "ada@corp.example"}),
    );
    let after = event(
        "e-3",
        "2025-07-01T10:00:00Z",
        ada,
        serde_json::json!({"id": "u_ada", "email": "ada@corp.example"}),
    );
    publish(&env, &producer, &[before, about, after]).await;
    env.wait_for_count(3, ARRIVE).await;

    let p = audit_store::retention::Pseudonyms::new(key.as_bytes(), "org_e", "u_ada");
    let rows: Vec<AuditEventRow> = env
        .client()
        .query("SELECT ?fields FROM audit_events FINAL ORDER BY id")
        .fetch_all()
        .await
        .unwrap();
    let stored: BTreeMap<String, AuditEventRow> = env
        .stored_messages()
        .into_iter()
        .map(|(_, _, row)| (row.id.clone(), row))
        .collect();
    for row in [&rows[0], &stored["e-1"]] {
        assert_eq!(row.actor_email, Some(p.email()));
        assert_eq!(row.actor_name, Some(p.name()));
        assert_eq!(row.context_ip, Some(p.ip("198.51.100.23")));
        assert_eq!(row.context_user_agent, Some(p.user_agent()));
        assert_eq!(row.affected_user_email, Some(p.email()));
        assert!(!row.changes.contains("ada@corp.example"), "{}", row.changes);
    }
    for row in [&rows[1], &stored["e-2"]] {
        assert_eq!(row.actor_email.as_deref(), Some("bob@corp.example"));
        assert_eq!(row.affected_user_email, Some(p.email()));
    }
    // Occurred after the erasure: stored as sent.
    assert_eq!(rows[2].actor_email.as_deref(), Some("ada@corp.example"));
    assert_eq!(
        stored["e-3"].actor_email.as_deref(),
        Some("ada@corp.example")
    );
    let facts: Vec<(String, i64)> = env
        .client()
        .query("SELECT email, occurred_at_ms FROM directory_users WHERE user_id = 'u_ada' ORDER BY occurred_at_ms")
        .fetch_all()
        .await
        .unwrap();
    for (email, at) in &facts {
        if *at < 1_748_736_000_000 {
            assert_eq!(email, &p.email());
        }
    }
    env.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_invalid_messages_stops_the_service_with_a_clear_error() {
    let env = TestEnv::new("ratio", 1).await;
    let garbage: Vec<(String, Vec<u8>)> = (0..300)
        .map(|i| (format!("k{i}"), b"{broken".to_vec()))
        .collect();
    produce(&producer(), &env.topics[0], &garbage).await;
    let mut ingest = IngestProcess::spawn(
        &env,
        &[
            ("AUDIT_INGEST__DEAD_LETTER__WINDOW_MESSAGES", "100"),
            ("AUDIT_INGEST__DEAD_LETTER__MAX_INVALID_RATIO", "0.5"),
        ],
    );
    let status = ingest
        .wait_exit(ARRIVE)
        .await
        .expect("the service stops by itself");
    assert!(!status.success());
    let logs = ingest.logs();
    assert!(logs.contains("were invalid"), "{logs}");
    assert!(logs.contains("dead-letter topic"), "{logs}");
    env.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_outage_holds_commits_and_everything_arrives_afterwards() {
    let server = PrivateClickHouse::start();
    let mut env = TestEnv::new("outage", 3).await;
    env.use_server(&server);
    let producer = producer();
    let events = generate_events("down", 500);

    let mut ingest = IngestProcess::spawn(&env, &[("AUDIT_INGEST__BATCH__MAX_AGE_MS", "100")]);
    ingest.wait_ready(READY).await;
    publish(&env, &producer, &events[..200]).await;
    env.wait_for_count(200, ARRIVE).await;
    let committed_sum = |env: &TestEnv| env.committed_offsets().values().sum::<i64>();
    let deadline = std::time::Instant::now() + ARRIVE;
    while committed_sum(&env) < 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "first 200 never committed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    server.run("stop");
    publish(&env, &producer, &events[200..]).await;
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            committed_sum(&env),
            200,
            "an offset was committed while ClickHouse was down"
        );
        assert!(
            ingest.child.try_wait().unwrap().is_none(),
            "ingest died:\n{}",
            ingest.logs()
        );
    }
    let metrics = ingest.metrics().await;
    assert!(
        metric_sum(&metrics, "audit_ingest_retries_total") > 0.0,
        "no retries recorded"
    );
    let ready = reqwest::get(format!("http://127.0.0.1:{}/readyz", ingest.http_port))
        .await
        .unwrap();
    assert_eq!(
        ready.status().as_u16(),
        503,
        "ready while ClickHouse is down"
    );

    server.run("start");
    env.wait_for_count(500, ARRIVE).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(env.visible_count().await, 500);
    let deadline = std::time::Instant::now() + ARRIVE;
    while committed_sum(&env) < 500 {
        assert!(
            std::time::Instant::now() < deadline,
            "offsets not committed after recovery"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ingest.signal(Signal::SIGTERM);
    assert!(ingest
        .wait_exit(Duration::from_secs(10))
        .await
        .is_some_and(|s| s.success()));
}

/// `/healthz` and `/readyz` of a replica, as (status, body).
async fn probe(ingest: &IngestProcess, path: &str) -> (u16, String) {
    let response = reqwest::get(format!("http://127.0.0.1:{}{path}", ingest.http_port))
        .await
        .unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_cannot_progress_fails_healthz_and_one_waiting_for_clickhouse_does_not() {
    let server = PrivateClickHouse::start();
    let mut env = TestEnv::new("liveness", 3).await;
    env.use_server(&server);
    let producer = producer();
    let events = generate_events("live", 300);
    let stall_after = Duration::from_secs(10);
    let mut ingest = IngestProcess::spawn(
        &env,
        &[
            ("AUDIT_INGEST__BATCH__MAX_AGE_MS", "100"),
            ("AUDIT_INGEST__LIVENESS__STALL_AFTER_MS", "10000"),
            ("AUDIT_INGEST__LIVENESS__CHECK_INTERVAL_MS", "1000"),
        ],
    );
    ingest.wait_ready(READY).await;
    publish(&env, &producer, &events[..100]).await;
    env.wait_for_count(100, ARRIVE).await;
    assert_eq!(probe(&ingest, "/healthz").await.0, 200);

    // ClickHouse down for longer than stall_after: waiting, not stuck. Two bursts, so that a
    // batch waits behind a flush that retries.
    server.run("stop");
    publish(&env, &producer, &events[100..150]).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    publish(&env, &producer, &events[150..200]).await;
    let down = std::time::Instant::now();
    let cpu_before = audit_testkit::proc_cpu_seconds(ingest.child.id()).unwrap();
    let mut said_waiting = false;
    while down.elapsed() < stall_after + Duration::from_secs(6) {
        let (health, body) = probe(&ingest, "/healthz").await;
        assert_eq!(health, 200, "not stuck while ClickHouse is down: {body}");
        let (ready, body) = probe(&ingest, "/readyz").await;
        assert_eq!(ready, 503, "ready while ClickHouse is down: {body}");
        said_waiting |= body.starts_with("waiting: clickhouse unreachable");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(said_waiting, "/readyz never said it waits for ClickHouse");
    // Waiting costs next to nothing: a batch behind the retrying flush once made the loop spin
    // a core at 100% for the whole outage (16 CPU-seconds here).
    let cpu = audit_testkit::proc_cpu_seconds(ingest.child.id()).unwrap() - cpu_before;
    assert!(
        cpu < 4.0,
        "{cpu:.1} CPU-seconds in {:?} of waiting",
        down.elapsed()
    );
    server.run("start");
    env.wait_for_count(200, ARRIVE).await;

    // ClickHouse answers, but the events table is gone (an operator's mistake): every insert
    // fails and is retried, nothing is committed. Stuck once stall_after has passed.
    let client = env.client();
    client
        .query("RENAME TABLE audit_events TO audit_events_away")
        .execute()
        .await
        .unwrap();
    publish(&env, &producer, &events[200..]).await;
    let stalled_from = std::time::Instant::now();
    let (health, body) = loop {
        let (health, body) = probe(&ingest, "/healthz").await;
        if health == 503 {
            break (health, body);
        }
        assert!(
            stalled_from.elapsed() < stall_after + Duration::from_secs(20),
            "/healthz still {health} {body} {:?} after inserts started failing:\n{}",
            stalled_from.elapsed(),
            ingest.logs()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    // The stall clock starts at the partition's last progress the watchdog saw: caught up, at
    // its last reading before the publish above landed, up to one check interval (1 s) before
    // `stalled_from`.
    assert!(
        stalled_from.elapsed() + Duration::from_secs(1) >= stall_after,
        "stuck before stall_after: {:?}",
        stalled_from.elapsed()
    );
    assert_eq!(health, 503);
    assert!(
        body.starts_with("stuck: no progress for more than 10 s") && body.contains("lag "),
        "{body}"
    );
    assert!(
        body.contains(&env.topics[0])
            || body.contains(&env.topics[1])
            || body.contains(&env.topics[2]),
        "{body}"
    );
    let (ready, ready_body) = probe(&ingest, "/readyz").await;
    assert_eq!(
        (ready, ready_body.starts_with("stuck: ")),
        (503, true),
        "{ready_body}"
    );
    let metrics = ingest.metrics().await;
    assert_eq!(metric_sum(&metrics, "audit_ingest_stalled"), 1.0);
    let last_progress = metric_sum(&metrics, "audit_ingest_last_progress_timestamp_seconds");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        now - last_progress >= stall_after.as_secs_f64(),
        "last progress {last_progress}, now {now}"
    );
    assert!(
        ingest.logs().contains("ingest is stuck"),
        "no error logged:\n{}",
        ingest.logs()
    );

    // The table is back: the retried insert lands and the replica recovers by itself.
    client
        .query("RENAME TABLE audit_events_away TO audit_events")
        .execute()
        .await
        .unwrap();
    env.wait_for_count(300, ARRIVE).await;
    let recovered = std::time::Instant::now();
    while probe(&ingest, "/healthz").await.0 != 200 {
        assert!(
            recovered.elapsed() < Duration::from_secs(15),
            "still stuck after recovery"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(
        metric_sum(&ingest.metrics().await, "audit_ingest_stalled"),
        0.0
    );
    assert_eq!(env.visible_count().await, 300);
    ingest.signal(Signal::SIGTERM);
    assert!(ingest
        .wait_exit(Duration::from_secs(10))
        .await
        .is_some_and(|s| s.success()));
}

/// The stored rows of the test's database, asserting that each is a distinct event (no copy
/// stored, none waiting for a merge) in the events table and in every copy table.
async fn no_copies(env: &TestEnv) -> u64 {
    let stored = env.stored_and_distinct().await;
    for (org, (rows, ids)) in &stored {
        assert_eq!(rows, ids, "{org}: {rows} rows stored for {ids} events");
    }
    let rows: u64 = stored.values().map(|(rows, _)| rows).sum();
    for copy in audit_store::COPY_TABLES {
        let (copies, keys): (u64, u64) = env
            .client()
            .query(&format!(
                "SELECT count(), uniqExact(organization_id, occurred_at_ms, id) FROM {}",
                copy.table
            ))
            .fetch_one()
            .await
            .unwrap();
        assert_eq!((copies, keys), (rows, rows), "{}", copy.table);
    }
    rows
}

fn replay(env: &TestEnv, args: &[&str]) -> String {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_audit-ingest"))
        .arg("replay")
        .args(args)
        .envs(env.ingest_env(free_port()))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "replay {args:?} failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_reads_a_range_by_time_or_offset_and_changes_nothing_when_repeated() {
    let env = TestEnv::new("replay", 2).await;
    let producer = producer();
    let events = generate_events("replay", 150);
    // Everything on one topic so that offsets and times are easy to reason about.
    let messages = |range: std::ops::Range<usize>| -> Vec<(String, Vec<u8>)> {
        events[range]
            .iter()
            .map(|e| {
                (
                    e["id"].as_str().unwrap().to_owned(),
                    serde_json::to_vec(e).unwrap(),
                )
            })
            .collect()
    };
    produce(&producer, &env.topics[0], &messages(0..100)).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let later = chrono::Utc::now().to_rfc3339();
    tokio::time::sleep(Duration::from_millis(200)).await;
    produce(&producer, &env.topics[0], &messages(100..150)).await;

    let out = replay(&env, &["--topic", &env.topics[0], "--from-time", &later]);
    assert!(out.contains("replayed 50 messages"), "{out}");
    assert_eq!(env.visible_count().await, 50);
    let first_fifty: Vec<String> = events[100..]
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(env.visible_ids().await, first_fifty);

    let out = replay(
        &env,
        &[
            "--topic",
            &env.topics[0],
            "--partition",
            "0",
            "--from-offset",
            "0",
            "--to-offset",
            "10",
        ],
    );
    assert!(out.contains("replayed 10 messages"), "{out}");
    assert_eq!(env.visible_count().await, 60);

    // The whole topic, twice: still every event exactly once, and stored once: what is stored
    // already is looked up (everything up to the highest offset written before) and skipped.
    let out = replay(&env, &[]);
    assert!(
        out.contains("150 events (60 of them stored already"),
        "{out}"
    );
    let out = replay(&env, &[]);
    assert!(out.contains("replayed 150 messages"), "{out}");
    assert!(
        out.contains("150 events (150 of them stored already"),
        "{out}"
    );
    assert_eq!(env.visible_count().await, 150);
    assert_eq!(no_copies(&env).await, 150);
    env.drop_database().await;
}

/// An event published twice upstream (same id, organization and time, two offsets), right after
/// the first or later, is stored twice; the duplicate check after insert finds the copies,
/// records their month (the API's totals say "not exact" meanwhile) and the month is merged into
/// one row per event, in the events table and in every copy table. ClickHouse's own merges are stopped until the check
/// has found the copies, so that it is the check that finds them, not a merge that hides them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_of_upstream_duplicates_are_found_and_collapsed() {
    let env = TestEnv::new("upstream", 2).await;
    env.track_inserts(None).await;
    let tables: Vec<&str> = std::iter::once(audit_store::EVENTS_TABLE)
        .chain(audit_store::COPY_TABLES.iter().map(|c| c.table))
        .collect();
    // On a cluster: the shards' own tables, on every server.
    let merges = |verb: &'static str| {
        let clickhouse = env.clickhouse.clone();
        let tables = tables.clone();
        async move {
            for table in tables {
                let table = clickhouse.topology().local_table(table);
                let sql = format!("SYSTEM {verb} MERGES {table}");
                clickhouse.execute_everywhere(&sql, |c| c).await.unwrap();
            }
        }
    };
    merges("STOP").await;
    let events = generate_events("upstream", 300);
    let producer = producer();
    // 50 copies right behind their originals, most likely in the same insert: the ingest turns
    // off ClickHouse's collapse at insert (`optimize_on_insert`, 21.x and later), so these are
    // stored twice too, on every version, and left to the check.
    let mut first = events.clone();
    first.extend_from_slice(&events[..50]);
    publish(&env, &producer, &first).await;
    let mut ingest = IngestProcess::spawn(&env, &[("AUDIT_INGEST__DIRECTORY__ENRICH", "false")]);
    ingest.wait_ready(READY).await;
    env.wait_for_count(300, ARRIVE).await;
    // 100 more copies later, in inserts of their own.
    publish(&env, &producer, &events[..100]).await;

    let pending = || async {
        audit_store::pending_duplicate_months(&env.client())
            .await
            .unwrap()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while pending().await.is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "no copy found within 20 s:\n{}",
            ingest.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let stored = || async {
        env.stored_and_distinct()
            .await
            .values()
            .map(|(r, _)| r)
            .sum::<u64>()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while stored().await < 450 {
        assert!(
            std::time::Instant::now() < deadline,
            "copies not all stored within 20 s:\n{}",
            ingest.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(stored().await, 450, "every copy stored (merges stopped)");
    // Every copy found: a copy still there at the next check is counted again.
    ingest
        .wait_for_metric(
            "audit_ingest_duplicate_rows_found_total",
            150.0,
            Duration::from_secs(20),
            "the checks found fewer than 150 copies",
        )
        .await;

    merges("START").await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !pending().await.is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "copies not collapsed within 20 s:\n{}",
            ingest.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(no_copies(&env).await, 300);
    assert!(
        metric_sum(
            &ingest.metrics().await,
            "audit_ingest_duplicate_collapses_total"
        ) >= 1.0
    );
    // Upstream duplicates are not the ingest's re-deliveries: nothing was skipped as stored.
    assert_eq!(
        metric_sum(
            &ingest.metrics().await,
            "audit_ingest_events_already_stored_total"
        ),
        0.0
    );
    ingest.signal(Signal::SIGTERM);
    ingest.wait_exit(Duration::from_secs(10)).await;
    env.drop_database().await;
}

/// A replica takes over partitions whose previous owner stored more than it committed: one of
/// its inserts landed (and was cut short before ClickHouse wrote the copy tables), the next did
/// not. The new owner stores the rest, nothing twice, and fills the copy tables.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_skips_what_the_previous_owner_stored_and_fills_its_copies() {
    let env = TestEnv::new("takeover", 1).await;
    env.track_inserts(None).await;
    let topic = env.topics[0].clone();
    let events = generate_events("takeover", 200);
    let messages: Vec<(String, Vec<u8>)> = events
        .iter()
        .map(|e| {
            (
                e["id"].as_str().unwrap().to_owned(),
                serde_json::to_vec(e).unwrap(),
            )
        })
        .collect();
    produce(&producer(), &topic, &messages).await;

    // The previous owner: intents up to offset 149 recorded, offsets 0..=99 stored (with the
    // lineage the ingest gives them), 100..=149 not, nothing committed; the copy tables lost
    // its insert (the server stopped between the events table and its views).
    let client = env.client();
    client
        .query("INSERT INTO ingest_write_intents VALUES (?, 0, 149, 1)")
        .bind(topic.as_str())
        .execute()
        .await
        .unwrap();
    let mut insert = client
        .insert::<AuditEventRow>(audit_store::EVENTS_TABLE)
        .await
        .unwrap();
    for (offset, event) in events[..100].iter().enumerate() {
        let mut row = expected_row(event);
        row.source_topic = topic.clone();
        row.source_offset = offset as i64;
        row.ingested_at_ms = 1;
        insert.write(&row).await.unwrap();
    }
    insert.end().await.unwrap();
    for copy in audit_store::COPY_TABLES {
        // On a cluster: the shards' own tables, on every server.
        let table = env.clickhouse.each_shard_table(copy.table);
        env.clickhouse
            .execute_everywhere(&format!("TRUNCATE TABLE {table}"), |c| c)
            .await
            .unwrap();
    }

    let mut ingest = IngestProcess::spawn(&env, &[("AUDIT_INGEST__DIRECTORY__ENRICH", "false")]);
    ingest.wait_ready(READY).await;
    env.wait_for_count(200, ARRIVE).await;
    assert_eq!(no_copies(&env).await, 200);
    assert_eq!(
        env.inserted_and_distinct().await,
        (200, 200),
        "copies inserted"
    );
    let metrics = ingest.metrics().await;
    assert_eq!(
        metric_sum(&metrics, "audit_ingest_events_already_stored_total"),
        100.0
    );
    assert_eq!(
        metric_sum(&metrics, "audit_ingest_events_inserted_total"),
        100.0
    );
    ingest.signal(Signal::SIGTERM);
    ingest.wait_exit(Duration::from_secs(10)).await;
    env.drop_database().await;
}

/// The whole path of a log stream: identity topics, the ingest, the stored-events topic, the
/// stream worker (the real `audit-api streams run`), a webhook receiver (`make run`'s demo SIEM).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_events_reach_the_organizations_log_stream_through_both_services() {
    let env = TestEnv::new("e2e-stream", 3).await;
    let mut ingest = IngestProcess::spawn(&env, &[]);
    ingest.wait_ready(READY).await;
    let api = ApiProcess::binary();
    let receiver_port = free_port();
    let siem = std::env::temp_dir().join(format!("{}-siem.log", env.group));
    let mut receiver = std::process::Command::new("python3")
        .arg(repo_root().join("deploy/local/demo-receiver.py"))
        .arg(receiver_port.to_string())
        .arg(&siem)
        .spawn()
        .unwrap();
    let key = "ZGVtby1vbmx5LWtleS1kby1ub3QtdXNlLWluLXByb2Q=";
    let worker_port = free_port();
    let vars = [
        ("AUDIT_API__CLICKHOUSE__URL", env.clickhouse.url.clone()),
        (
            "AUDIT_API__CLICKHOUSE__DATABASE",
            env.clickhouse.database.clone(),
        ),
        ("AUDIT_API__READ_EVENTS__ENABLED", "false".to_owned()),
        ("AUDIT_API__READ_EVENTS__BROKERS", brokers()),
        ("AUDIT_API__STREAMS__SECRET_KEY", key.to_owned()),
        ("AUDIT_API__STREAMS__TOPIC", env.stored_topic.clone()),
        (
            "AUDIT_API__STREAMS__GROUP_ID",
            format!("{}-streams", env.group),
        ),
        ("AUDIT_API__STREAMS__ALLOW_HTTP", "true".to_owned()),
        (
            "AUDIT_API__STREAMS__ALLOW_PRIVATE_DESTINATIONS",
            "true".to_owned(),
        ),
        ("AUDIT_API__HTTP_LISTEN", format!("127.0.0.1:{worker_port}")),
        ("AUDIT_API__TELEMETRY__LOG_FILTER", "warn".to_owned()),
        // Fixtures may date from 2025: held under the longest retention.
        ("AUDIT_API__RETENTION__DEFAULT_DAYS", "3650".to_owned()),
    ];
    let body = serde_json::json!({"name": "siem", "destination": {
        "type": "webhook", "url": format!("http://127.0.0.1:{receiver_port}/")}});
    let created = std::process::Command::new(&api)
        .args([
            "streams",
            "create",
            "--org",
            "org_0",
            "--json",
            &body.to_string(),
        ])
        .envs(vars.iter().map(|(k, v)| (*k, v)))
        .output()
        .unwrap();
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    let mut worker = std::process::Command::new(&api)
        .args(["streams", "run"])
        .envs(vars.iter().map(|(k, v)| (*k, v)))
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let ready = format!("http://127.0.0.1:{worker_port}/readyz");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !matches!(reqwest::get(&ready).await, Ok(r) if r.status().is_success()) {
        assert!(
            std::time::Instant::now() < deadline,
            "the stream worker did not become ready"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let events = generate_events("e2e", 300);
    publish(&env, &producer(), &events).await;
    let wanted: BTreeSet<String> = events
        .iter()
        .filter(|e| e["organizationId"] == "org_0")
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect();
    let delivered = || -> Vec<String> {
        std::fs::read_to_string(&siem)
            .unwrap_or_default()
            .lines()
            .filter_map(|line| line.split_whitespace().nth(2).map(str::to_owned))
            .collect()
    };
    let deadline = std::time::Instant::now() + ARRIVE;
    while delivered().len() < wanted.len() {
        assert!(
            std::time::Instant::now() < deadline,
            "{} of {} delivered",
            delivered().len(),
            wanted.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let got = delivered();
    assert_eq!(
        got.len(),
        wanted.len(),
        "an event twice, or another organization's"
    );
    assert_eq!(got.into_iter().collect::<BTreeSet<_>>(), wanted);
    for child in [&mut worker, &mut receiver] {
        let _ = child.kill();
        let _ = child.wait();
    }
    let _ = std::fs::remove_file(&siem);
    ingest.signal(Signal::SIGTERM);
    ingest.wait_exit(Duration::from_secs(10)).await;
    env.drop_database().await;
}
