//! Against the real ClickHouse of the local stack (`make up`): each test gets its own database.

use std::path::Path;

use audit_event::{format_rfc3339_millis, AuditEvent};
use audit_store::migrations::{self, MIGRATIONS};
use audit_store::{AuditEventRow, ClickHouseConfig, Lineage, StoreError, EVENTS_TABLE};

fn fresh_config() -> ClickHouseConfig {
    audit_testkit::clickhouse_config(format!("audit_test_{}", uuid::Uuid::new_v4().simple()))
}

async fn drop_database(config: &ClickHouseConfig) {
    audit_testkit::drop_database(config, &config.database)
        .await
        .expect("drop test database");
}

#[tokio::test]
async fn applies_every_migration_once_and_then_nothing() {
    let config = fresh_config();
    let all: Vec<u32> = MIGRATIONS.iter().map(|m| m.version).collect();
    assert_eq!(migrations::pending(&config).await.unwrap(), all);
    assert!(matches!(
        migrations::ensure_current(&config).await,
        Err(StoreError::SchemaBehind { .. })
    ));

    let first = migrations::apply(&config).await.unwrap();
    assert_eq!(first.applied, all);
    let second = migrations::apply(&config).await.unwrap();
    assert!(second.applied.is_empty());
    assert_eq!(second.already_applied, all);
    assert!(migrations::pending(&config).await.unwrap().is_empty());
    migrations::ensure_current(&config).await.unwrap();
    drop_database(&config).await;
}

#[tokio::test]
async fn concurrent_runners_all_succeed() {
    let config = fresh_config();
    let runs: Vec<_> = (0..4)
        .map(|_| {
            let config = config.clone();
            tokio::spawn(async move { migrations::apply(&config).await })
        })
        .collect();
    for run in runs {
        run.await.unwrap().unwrap();
    }
    assert!(migrations::pending(&config).await.unwrap().is_empty());
    let tables: u64 = config
        .client()
        .query("SELECT count() FROM system.tables WHERE database = ? AND name = ?")
        .bind(config.database.as_str())
        .bind(EVENTS_TABLE)
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(tables, 1);
    drop_database(&config).await;
}

#[tokio::test]
async fn refuses_a_database_whose_applied_migration_was_edited() {
    let config = fresh_config();
    migrations::apply(&config).await.unwrap();
    config
        .client()
        .query("INSERT INTO schema_migrations (version, name, checksum, applied_at) VALUES (1, 'x', 'not-the-checksum', now())")
        .execute()
        .await
        .unwrap();
    // Two records for version 1 now disagree: the runner must refuse, not pick one.
    let err = migrations::apply(&config).await.unwrap_err();
    assert!(
        matches!(err, StoreError::MigrationChanged { version: 1, .. }),
        "{err}"
    );
    let err = migrations::pending(&config).await.unwrap_err();
    assert!(
        matches!(err, StoreError::MigrationChanged { version: 1, .. }),
        "{err}"
    );
    drop_database(&config).await;
}

#[tokio::test]
async fn round_trips_an_event_row_with_millisecond_precision() {
    let config = fresh_config();
    migrations::apply(&config).await.unwrap();

    let example = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../schemas/events/examples/valid/edge.unicode-and-injection.json");
    let mut event = AuditEvent::from_slice(&std::fs::read(example).unwrap()).unwrap();
    event.occurred_at = audit_event::parse_occurred_at("2025-01-31T23:59:59.987+01:00").unwrap();
    let row = AuditEventRow::from_event(
        &event,
        &Lineage {
            topic: "identity.teams.v1".to_owned(),
            partition: 4,
            offset: 1_234_567,
            ingested_at_ms: 1_738_400_000_001,
        },
    );
    let client = config.client();
    let mut insert = client.insert::<AuditEventRow>(EVENTS_TABLE).await.unwrap();
    insert.write(&row).await.unwrap();
    insert.end().await.unwrap();

    let back: Vec<AuditEventRow> = client
        .query("SELECT ?fields FROM audit_events WHERE organization_id = ? AND id = ?")
        .bind(event.organization_id.as_str())
        .bind(event.id.as_str())
        .fetch_all()
        .await
        .unwrap();
    assert_eq!(back, vec![row]);
    let at = chrono::DateTime::from_timestamp_millis(back[0].occurred_at_ms).unwrap();
    assert_eq!(format_rfc3339_millis(&at), "2025-01-31T22:59:59.987Z");
    assert!(back[0]
        .metadata
        .as_deref()
        .unwrap()
        .contains("12345678901234567890"));

    // The partition key puts the event in its UTC month.
    let partition: String = client
        .query("SELECT _partition_id FROM audit_events WHERE organization_id = ? AND id = ?")
        .bind(event.organization_id.as_str())
        .bind(event.id.as_str())
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(partition, "202501");
    drop_database(&config).await;
}

/// The copies sorted by a filter column (migration 0004's key-only tables, 0005's full rows by
/// actor email) are filled by views for new events, and by back-fills for events stored before
/// them; running the back-fills again (two replicas migrating at once) changes nothing a reader
/// sees.
#[tokio::test]
async fn filter_indexes_cover_old_and_new_events_and_the_backfill_is_idempotent() {
    let config = fresh_config();
    migrations::apply(&config).await.unwrap();
    let client = config.client();
    let example = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../schemas/events/examples/valid/team_member.updated.json");
    let mut event = AuditEvent::from_slice(&std::fs::read(example).unwrap()).unwrap();
    // Mixed case: the actor-email copies key on the lower-cased email.
    event.actor.email = Some("Ada.Admin@ACME.example".to_owned());
    let lineage = |offset| Lineage {
        topic: "t".to_owned(),
        partition: 0,
        offset,
        ingested_at_ms: 1,
    };
    let insert_one = |id: &str, offset: i64| {
        let mut event = event.clone();
        event.id = id.to_owned();
        let row = AuditEventRow::from_event(&event, &lineage(offset));
        let client = client.clone();
        async move {
            let mut insert = client.insert::<AuditEventRow>(EVENTS_TABLE).await.unwrap();
            insert.write(&row).await.unwrap();
            insert.end().await.unwrap();
        }
    };
    // "Old" events: stored, then wiped from the key-only tables as if the views came later.
    insert_one("old", 1).await;
    let copies = [
        "audit_events_by_type",
        "audit_events_by_actor_email",
        "audit_events_by_actor_email_rows",
    ];
    for table in copies {
        // On a cluster: the shards' own tables, on every server.
        let truncate = format!("TRUNCATE TABLE {}", config.each_shard_table(table));
        config.execute_everywhere(&truncate, |c| c).await.unwrap();
        let left: u64 = client
            .query(&format!("SELECT count() FROM {table}"))
            .fetch_one()
            .await
            .unwrap();
        assert_eq!(left, 0, "{table} was not emptied");
    }
    let backfill: Vec<String> = MIGRATIONS[3..5]
        .iter()
        .flat_map(|m| m.statements())
        .filter(|s| s.starts_with("INSERT"))
        .collect();
    assert_eq!(backfill.len(), 3);
    for _ in 0..2 {
        for statement in &backfill {
            client.query(statement).execute().await.unwrap();
        }
    }
    insert_one("new", 2).await;
    let by_type: Vec<String> = client
        .query("SELECT id FROM audit_events_by_type FINAL WHERE organization_id = ? AND event_type = ? ORDER BY id")
        .bind(event.organization_id.as_str())
        .bind(event.event_type.as_str())
        .fetch_all()
        .await
        .unwrap();
    assert_eq!(by_type, ["new", "old"]);
    let email = event.actor.email.clone().unwrap().to_lowercase();
    let by_email: Vec<String> = client
        .query("SELECT id FROM audit_events_by_actor_email FINAL WHERE organization_id = ? AND actor_email = ? ORDER BY id")
        .bind(event.organization_id.as_str())
        .bind(email.as_str())
        .fetch_all()
        .await
        .unwrap();
    assert_eq!(by_email, ["new", "old"]);
    // The full copy holds the same rows as audit_events, with the email lower-cased as its key.
    let copied: Vec<(String, String, Option<String>, String)> = client
        .query(
            "SELECT id, actor_email_key, actor_email, changes FROM audit_events_by_actor_email_rows \
             FINAL WHERE organization_id = ? AND actor_email_key = ? ORDER BY id",
        )
        .bind(event.organization_id.as_str())
        .bind(email.as_str())
        .fetch_all()
        .await
        .unwrap();
    let stored: Vec<(String, String, Option<String>, String)> = client
        .query(
            "SELECT id, lowerUTF8(ifNull(actor_email, '')), actor_email, changes FROM audit_events \
             FINAL WHERE organization_id = ? ORDER BY id",
        )
        .bind(event.organization_id.as_str())
        .fetch_all()
        .await
        .unwrap();
    assert_eq!(copied.len(), 2);
    assert_eq!(copied, stored);
    drop_database(&config).await;
}

/// Events written through `audit_events` are stored on the servers of the configured layout
/// (one server, or spread over every shard of a cluster), each copy table's rows beside their
/// event, and read back whole through `audit_events`.
#[tokio::test]
async fn events_are_stored_on_every_shard_and_read_back_whole() {
    let config = fresh_config();
    migrations::apply(&config).await.unwrap();
    let rows: Vec<AuditEventRow> = (0..200)
        .map(|n| AuditEventRow {
            organization_id: "org_a".to_owned(),
            occurred_at_ms: 1_735_689_600_000 + n * 1000,
            id: format!("evt_{n:03}"),
            event_type: "user.created".to_owned(),
            ..AuditEventRow::default()
        })
        .collect();
    let mut insert = config
        .client()
        .insert::<AuditEventRow>(EVENTS_TABLE)
        .await
        .unwrap();
    for row in &rows {
        insert.write(row).await.unwrap();
    }
    insert.end().await.unwrap();
    // Once acknowledged, every row is readable (a cluster's insert waits for its shards).
    // On replicas it is eventually: the insert waits for one replica of each shard, and a read
    // may reach the other before it fetched the rows (README "Sharded ClickHouse"); seen in CI.
    let replicated = matches!(config.topology(), audit_store::Topology::Replicated { .. });
    let patience = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let whole = loop {
        let whole: u64 = config
            .client()
            .query("SELECT count() FROM audit_events WHERE organization_id = 'org_a'")
            .fetch_one()
            .await
            .unwrap();
        if whole == 200 || !replicated || std::time::Instant::now() > patience {
            break whole;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    assert_eq!(whole, 200);
    // Per shard (a server's `shard` macro; a server without one is a shard of its own), the
    // rows each of its servers holds in its own tables; replicas catch up asynchronously.
    let topology = config.topology();
    let count = |server: &ClickHouseConfig, table: &str| {
        let sql = format!("SELECT count() FROM {}", topology.local_table(table));
        let client = server.client();
        async move { client.query(&sql).fetch_one::<u64>().await.unwrap() }
    };
    let mut shards: std::collections::BTreeMap<String, Vec<ClickHouseConfig>> = Default::default();
    for server in audit_testkit::servers(&config) {
        let shard: Vec<String> = server
            .client()
            .query("SELECT substitution FROM system.macros WHERE macro = 'shard'")
            .fetch_all()
            .await
            .unwrap();
        let shard = shard
            .into_iter()
            .next()
            .unwrap_or_else(|| server.url.clone());
        shards.entry(shard).or_default().push(server);
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut stored = Vec::new();
    for (shard, servers) in &shards {
        // Per server: its events, and its copy of them (the view of each server copies its
        // own events; a replica fetches both tables' rows), equal once caught up.
        let mut counts = Vec::new();
        loop {
            counts.clear();
            for server in servers {
                counts.push(count(server, EVENTS_TABLE).await);
                counts.push(count(server, "audit_events_by_type").await);
            }
            if counts.windows(2).all(|w| w[0] == w[1]) || std::time::Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        assert!(
            counts.windows(2).all(|w| w[0] == w[1]),
            "shard {shard}: (events, copy) per server disagree: {counts:?}"
        );
        stored.push(counts[0]);
    }
    assert_eq!(stored.iter().sum::<u64>(), 200, "{stored:?}");
    assert!(
        stored.iter().all(|&n| n > 0),
        "a shard got nothing: {stored:?}"
    );
    drop_database(&config).await;
}

#[test]
fn every_sql_file_is_listed_in_order() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../schemas/clickhouse");
    let mut files: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|name| name.ends_with(".sql"))
        .collect();
    files.sort();
    let listed: Vec<String> = MIGRATIONS
        .iter()
        .map(|m| format!("{:04}_{}.sql", m.version, m.name))
        .collect();
    assert_eq!(files, listed);
}
