//! Totals while events arrive, are re-delivered and merged. Against the real ClickHouse of the local stack (`make up`); every test
//! gets its own database, its own keys and an in-process server on a free port.

mod common;

use common::*;

/// Totals are counted per month and a month is reused while its parts stay the same: every
/// change to the stored rows (an insert into a known month, a new month, a re-delivery, a merge)
/// must show in the next total.
#[tokio::test]
async fn totals_follow_inserts_redeliveries_and_merges() {
    const FEB_MS: i64 = 1_738_368_000_000; // 2025-02-01T00:00:00Z
    const MAR_MS: i64 = 1_740_787_200_000; // 2025-03-01T00:00:00Z
    let api = TestApi::spawn("totals").await;
    let key = api.key("org_a", Role::Admin).await;
    let total = |query: &'static str| api.total(&key, query);
    // No background merge may collapse a copy before the test looks at it.
    // On a cluster: the shards' own tables, on every server.
    let events = api
        .clickhouse
        .topology()
        .local_table(audit_store::EVENTS_TABLE);
    let everywhere = |sql: String| {
        let clickhouse = api.clickhouse.clone();
        async move { clickhouse.execute_everywhere(&sql, |c| c).await.unwrap() }
    };
    let merges = |verb: &'static str| everywhere(format!("SYSTEM {verb} MERGES {events}"));
    merges("STOP").await;
    // Above the exact-total limit (so the stored rows are what is counted): 110,000 events 30 s
    // apart, January and February 2025, and another organization's events in the same months.
    let bulk: Vec<AuditEventRow> = (0..110_000)
        .map(|n| event("org_a", &format!("b{n:06}"), BASE_MS + n * 30_000))
        .collect();
    api.insert(&bulk).await;
    api.insert(&series("org_b", 20)).await;
    let in_february = bulk.iter().filter(|r| r.occurred_at_ms >= FEB_MS).count() as u64;
    assert!(in_february > 0 && in_february < 110_000);
    // February on its own is under the limit: exact, distinct events.
    let february = "limit=1&from=2025-02-01T00:00:00Z";

    // No copy known anywhere: the stored rows are the events, exact at any size.
    assert_eq!(total("limit=1").await, (110_000, true));
    assert_eq!(total("limit=1").await, (110_000, true));
    assert_eq!(total(february).await, (in_february, true));

    // New events in a month already counted, and in a month never seen.
    let news: Vec<AuditEventRow> = (0..5)
        .map(|n| event("org_a", &format!("n{n}"), FEB_MS + 7))
        .chain((0..3).map(|n| event("org_a", &format!("m{n}"), MAR_MS + n)))
        .collect();
    api.insert(&news).await;
    assert_eq!(total("limit=1").await, (110_008, true));
    assert_eq!(total(february).await, (in_february + 8, true));

    // A copy (an event published twice upstream) is a stored row until its month is merged
    // (the total says so once the ingest's check found it).
    api.insert_copies(&bulk[..2]).await;
    assert_eq!(total("limit=1").await, (110_010, false));
    merges("START").await;
    everywhere(format!(
        "OPTIMIZE TABLE {} FINAL",
        api.clickhouse.each_shard_table(audit_store::EVENTS_TABLE)
    ))
    .await;
    // Now every month is one merged part, where no copy can hide: exact at any size.
    assert_eq!(total("limit=1").await, (110_008, true));
    let by_actor = total("limit=1&from=2025-02-01T00:00:00Z&actorId=usr_admin").await;
    assert_eq!(by_actor.0, in_february + 8);
    // A range counts its whole months from what was counted without bounds, and its edge
    // months with the bounds: from mid-January (an edge), to 1 ms into March (an edge).
    const MID_JANUARY_MS: i64 = BASE_MS + 14 * 86_400_000;
    let since_mid_january = bulk
        .iter()
        .filter(|r| r.occurred_at_ms >= MID_JANUARY_MS)
        .count() as u64;
    assert_eq!(
        total("limit=1&from=2025-01-15T00:00:00Z").await,
        (since_mid_january + 8, true)
    );
    assert_eq!(
        total("limit=1&from=2025-01-15T00:00:00Z&to=2025-03-01T00:00:00.001Z").await,
        (since_mid_january + 5 + 1, true)
    );

    // A copy in March while January and February stay merged: a selective total takes the
    // merged months' stored rows and counts March's distinct events, exact at any size; the
    // unfiltered total (stored rows per month) shows the copy until a merge.
    merges("STOP").await;
    api.insert_copies(&news[5..6]).await;
    assert_eq!(total("limit=1&actorId=usr_admin").await, (110_008, true));
    assert_eq!(total("limit=1").await, (110_009, false));
    merges("START").await;

    // Below the limit the total is exact, and it follows inserts as well.
    let key_b = api.key("org_b", Role::Admin).await;
    assert_eq!(api.total(&key_b, "limit=1").await, (20, true));
    api.insert(&[event("org_b", "late", MAR_MS + 99)]).await;
    assert_eq!(api.total(&key_b, "limit=1").await, (21, true));

    let metrics = api.metrics().await;
    assert!(
        metrics.contains("audit_api_aggregate_months_total{outcome=\"reused\"}"),
        "{metrics}"
    );
    api.stop().await;
}
