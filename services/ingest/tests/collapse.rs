//! Finding and collapsing copies of events (`audit_ingest::duplicates`) on the ClickHouse layout
//! the tests run on (`audit_testkit::clickhouse_config`): one server, the shards of a
//! `Distributed` table, or a replicated cluster. `deploy/local/test.sh` runs this file on each.
//! Needs ClickHouse only.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use audit_ingest::duplicates::{check_noted, collapse_pending, DuplicateWatch};
use audit_ingest::metrics::IngestMetrics;
use audit_store::{
    migrations, pending_duplicate_months, AuditEventRow, ClickHouseConfig, COPY_TABLES,
    EVENTS_TABLE,
};

const JANUARY_2025_MS: i64 = 1_735_689_600_000;

async fn insert(config: &ClickHouseConfig, rows: &[AuditEventRow]) {
    let mut insert = config
        .client()
        .insert::<AuditEventRow>(EVENTS_TABLE)
        .await
        .unwrap();
    for row in rows {
        insert.write(row).await.unwrap();
    }
    insert.end().await.unwrap();
}

/// Every event stored twice (two inserts, so two parts on whichever server holds it): the check
/// finds the 100 copies and records their month; the collapse leaves one row per event in the
/// events table and in every copy table, on every server (each replica too), without `FINAL`.
#[tokio::test]
async fn copies_are_found_and_collapsed_on_every_server_that_holds_them() {
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    let config = audit_testkit::clickhouse_config(format!("audit_test_collapse_{}", &suffix[..12]));
    migrations::apply(&config).await.unwrap();
    let servers = audit_testkit::servers(&config);
    let topology = config.topology();
    // Each server's own tables, named with the database (statements sent to one server each).
    let tables: Vec<String> = std::iter::once(EVENTS_TABLE)
        .chain(COPY_TABLES.iter().map(|c| c.table))
        .map(|t| format!("{}.{}", config.database, topology.local_table(t)))
        .collect();
    // No background merge may collapse a copy before the check and the collapse do.
    let merges = |verb: &'static str| {
        let (servers, tables) = (servers.clone(), tables.clone());
        async move {
            for server in &servers {
                for table in &tables {
                    let sql = format!("SYSTEM {verb} MERGES {table}");
                    server.client().query(&sql).execute().await.unwrap();
                }
            }
        }
    };
    merges("STOP").await;
    let rows: Vec<AuditEventRow> = (0..100)
        .map(|n| AuditEventRow {
            organization_id: format!("org_{}", n % 3),
            occurred_at_ms: JANUARY_2025_MS + n * 60_000,
            id: format!("evt_{n:03}"),
            event_type: "user.created".to_owned(),
            actor_email: Some(format!("user{}@example.com", n % 7)),
            ..AuditEventRow::default()
        })
        .collect();
    insert(&config, &rows).await;
    // The copies as a re-delivery stores them: same event, another ingest time and position
    // (a byte-identical block would be dropped by a replicated table's insert de-duplication).
    let copies: Vec<AuditEventRow> = rows
        .iter()
        .map(|row| AuditEventRow {
            source_offset: row.source_offset + 1_000,
            ingested_at_ms: row.ingested_at_ms + 1,
            ..row.clone()
        })
        .collect();
    insert(&config, &copies).await;

    let client = config.client();
    let watch = DuplicateWatch::default();
    watch.note(&rows);
    watch.note(&copies);
    let metrics = IngestMetrics::new();
    assert_eq!(check_noted(&watch, &client, &metrics).await, 100);
    assert_eq!(
        pending_duplicate_months(&client).await.unwrap(),
        BTreeSet::from(["202501".to_owned()])
    );

    // As the ingest's watcher does: try again until a collapse is recorded.
    merges("START").await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut failures = Vec::new();
    while !pending_duplicate_months(&client).await.unwrap().is_empty() {
        if let Err(err) = collapse_pending(&config, &metrics).await {
            failures.push(err.to_string());
        }
        assert!(
            Instant::now() < deadline,
            "the month is still pending after 60 s: {failures:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    eprintln!("collapse turns that failed before one succeeded: {failures:?}");
    // Every server's own tables: one row per key, without FINAL (replicas fetch the merge).
    for server in &servers {
        for table in &tables {
            let sql = format!("SELECT count(), uniqExact(id) FROM {table}");
            let (rows, ids) = loop {
                let (rows, ids): (u64, u64) =
                    server.client().query(&sql).fetch_one().await.unwrap();
                if rows == ids || Instant::now() > deadline {
                    break (rows, ids);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            };
            assert_eq!(rows, ids, "{table} on {}", server.url);
        }
    }
    let visible: u64 = client
        .query("SELECT count() FROM audit_events")
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(visible, 100);
    audit_testkit::drop_database(&config, &config.database)
        .await
        .unwrap();
}
