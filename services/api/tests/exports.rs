//! Exports and CSV: order, windows, failures mid-stream, memory and shutdown. Against the real ClickHouse of the local stack (`make up`); every test
//! gets its own database, its own keys and an in-process server on a free port.

mod common;

use common::*;

/// Exports read their range in windows of a few stored rows here (`export_window_rows` 4), each
/// ordered by the service: the same events in the same order as the pages, both ways, with ties
/// broken by id across and within windows, re-deliveries (stored as parts of their own) shown
/// once, and an hour holding more rows than a window sorted by ClickHouse in its turn.
#[tokio::test]
async fn exports_read_in_windows_keep_the_page_order() {
    let api = TestApi::spawn_with("windows", |c| c.query.export_window_rows = 4).await;
    let key = api.key("org_a", Role::Admin).await;
    const HOUR: i64 = 3_600_000;
    // 30 events over 12 hours, three per millisecond at times repeated in several hours; hour 5
    // holds 9 of them (more than a window).
    let rows: Vec<AuditEventRow> = (0..30)
        .map(|n| {
            let hour = if n < 9 { 5 } else { n % 12 };
            event(
                "org_a",
                &format!("w{:02}", 29 - n),
                BASE_MS + hour * HOUR + (n % 3) * 1000,
            )
        })
        .collect();
    // Inserted in an order of their own, then partly delivered again.
    let mut shuffled = rows.clone();
    shuffled.sort_by_key(|r| r.id.bytes().rev().collect::<Vec<u8>>());
    api.insert(&shuffled).await;
    let mut again: Vec<AuditEventRow> = rows.iter().step_by(4).cloned().collect();
    for row in &mut again {
        row.ingested_at_ms = 2;
    }
    api.insert_copies(&again).await;

    for sort in ["desc", "asc"] {
        let page = api.page(&key, &format!("limit=1000&sort={sort}")).await;
        let expected = ids(&page);
        assert_eq!(expected.len(), 30);
        let (status, _, body) = api
            .get_path(
                &key,
                "/api/v1/organization/audit-logs/export",
                &format!("format=ndjson&sort={sort}"),
            )
            .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(ndjson_ids(&body), expected, "ndjson export, sort={sort}");
        let body = api
            .get_path(
                &key,
                "/api/v1/organization/audit-logs/export",
                &format!("format=csv&sort={sort}&from=2025-01-01T03:00:00Z"),
            )
            .await
            .2;
        let csv_ids: Vec<String> = csv::Reader::from_reader(&body[..])
            .records()
            .map(|r| r.unwrap()[0].to_owned())
            .collect();
        let in_range: Vec<String> = page["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|item| item["timestamp"].as_str().unwrap() >= "2025-01-01T03:00:00.000Z")
            .map(|item| item["id"].as_str().unwrap().to_owned())
            .collect();
        assert!(in_range.len() < 30 && in_range.len() > 9);
        assert_eq!(csv_ids, in_range, "csv export from 03:00, sort={sort}");
    }
    api.stop().await;
}

/// A window that fails after the response head went out (here: a stored row that is not UTF-8,
/// which the ingest never writes) ends the body with an error, so a client never takes the rows
/// sent so far for the whole export; failing in the first window, it is an error status.
#[tokio::test]
async fn an_export_failing_midway_ends_in_an_error_not_a_short_file() {
    let api = TestApi::spawn_with("midway", |c| c.query.export_window_rows = 4).await;
    let key = api.key("org_a", Role::Admin).await;
    const HOUR: i64 = 3_600_000;
    // 4 events an hour over 20 hours (20 windows), then in the oldest hour 3 events and a broken
    // row: the last window of a newest-first export.
    let rows: Vec<AuditEventRow> = (0..83)
        .map(|n| {
            event(
                "org_a",
                &format!("m{n:02}"),
                BASE_MS + HOUR * (20 - n / 4) + (n % 4) * 1000,
            )
        })
        .collect();
    api.insert(&rows).await;
    api.client()
        .query(
            "INSERT INTO audit_events (organization_id, occurred_at_ms, id, event_type, actor_id, \
             actor_type, resource_type, resource_id, changes, metadata, source_topic, \
             source_partition, source_offset, ingested_at_ms) \
             SELECT 'org_a', ?, 'broken', 'user.created', 'usr_1', 'user', 'user', 'usr_2', '[]', \
             unhex('7B22FF227D'), 't', 0, 0, 1",
        )
        .bind(BASE_MS + 3000)
        .execute()
        .await
        .unwrap();
    let mut newest_first: Vec<&AuditEventRow> = rows.iter().collect();
    newest_first.sort_by_key(|r| std::cmp::Reverse((r.occurred_at_ms, r.id.clone())));
    let newest_first: Vec<String> = newest_first.iter().map(|r| r.id.clone()).collect();

    let url = api.url("/api/v1/organization/audit-logs/export", "format=ndjson");
    let mut response = api
        .http
        .get(&url)
        .header("X-API-Key", &key)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut received = Vec::new();
    let ended = loop {
        match response.chunk().await {
            Ok(Some(chunk)) => received.extend_from_slice(&chunk),
            Ok(None) => break Ok(()),
            Err(err) => break Err(err),
        }
    };
    assert!(ended.is_err(), "the body ended as if complete");
    // What arrived is the start of the export, in order, and none of the broken window: every
    // window before it at most (the connection is cut, so what the server had not sent yet may
    // be lost with it).
    let lines = received
        .iter()
        .rposition(|b| *b == b'\n')
        .map_or(0, |i| i + 1);
    let got = ndjson_ids(&received[..lines]);
    // The first window is read before the head is sent and goes out with it.
    assert!((4..=80).contains(&got.len()), "{} rows arrived", got.len());
    assert_eq!(got, newest_first[..got.len()].to_vec());

    // Oldest first, the broken row is in the first window: an error status, no body of rows.
    let (status, _, body) = api
        .get_path(
            &key,
            "/api/v1/organization/audit-logs/export",
            "format=ndjson&sort=asc",
        )
        .await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    let error: Value = serde_json::from_slice(&body).unwrap();
    assert!(!error["error"]["message"].as_str().unwrap().contains("UTF"));
    api.stop().await;
}

#[tokio::test]
async fn csv_matches_json_and_is_safe_for_spreadsheets() {
    let api = TestApi::spawn("csv").await;
    let key = api.key("org_a", Role::Admin).await;
    let mut rows = series("org_a", 12);
    rows[3].actor_name = Some("=cmd|' /C calc'!A0".to_owned());
    rows[4].resource_name = Some("Team, \"quoted\"\nsecond line".to_owned());
    rows[5].actor_name = Some("Zoë 🚀 ∑".to_owned());
    api.insert(&rows).await;

    let query = "limit=7&offset=2&sort=asc&from=2025-01-01T00:00:01Z";
    let json = api.page(&key, query).await;
    let (status, headers, body) = api.get(&key, &format!("{query}&format=csv")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["content-type"], "text/csv; charset=utf-8");
    assert_eq!(
        headers["content-disposition"],
        "attachment; filename=\"audit-logs-20250101T000001Z-now.csv\""
    );
    assert_eq!(headers["x-total-count"], "11");

    let mut reader = csv::Reader::from_reader(&body[..]);
    let header: Vec<String> = reader
        .headers()
        .unwrap()
        .iter()
        .map(str::to_owned)
        .collect();
    assert_eq!(header, audit_api::render::CSV_HEADER);
    let records: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
    let items = json["items"].as_array().unwrap();
    assert_eq!(records.len(), items.len());
    let column = |name: &str| header.iter().position(|h| h == name).unwrap();
    for (record, item) in records.iter().zip(items) {
        assert_eq!(&record[column("id")], item["id"].as_str().unwrap());
        assert_eq!(
            &record[column("timestamp")],
            item["timestamp"].as_str().unwrap()
        );
        assert_eq!(
            &record[column("eventType")],
            item["eventType"].as_str().unwrap()
        );
        assert_eq!(
            &record[column("actorId")],
            item["actor"]["id"].as_str().unwrap()
        );
        assert_eq!(
            &record[column("actorEmail")],
            item["actor"]["email"].as_str().unwrap_or("")
        );
        let name = item["actor"]["name"].as_str().unwrap_or("");
        assert_eq!(
            &record[column("actorName")],
            audit_api::render::neutralize(name).as_ref()
        );
        assert_eq!(
            &record[column("resourceName")],
            item["resource"]["name"].as_str().unwrap_or("")
        );
        let changes: Value = serde_json::from_str(&record[column("changes")]).unwrap();
        assert_eq!(changes, item["changes"]);
        let metadata: Value = serde_json::from_str(&record[column("metadata")]).unwrap();
        assert_eq!(metadata, item["metadata"]);
    }
    let formula = records.iter().find(|r| &r[0] == "e003").unwrap();
    assert_eq!(&formula[column("actorName")], "'=cmd|' /C calc'!A0");
    let quoted = records.iter().find(|r| &r[0] == "e004").unwrap();
    assert_eq!(
        &quoted[column("resourceName")],
        "Team, \"quoted\"\nsecond line"
    );
    let unicode = records.iter().find(|r| &r[0] == "e005").unwrap();
    assert_eq!(&unicode[column("actorName")], "Zoë 🚀 ∑");
    api.stop().await;
}

/// A child process killed when dropped, also when an assertion fails (a process left running
/// would hold the test's output pipe open, and the test run would never end).
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Peak resident memory of a live process (kB).
fn peak_rss_kb(pid: u32) -> u64 {
    audit_testkit::proc_status_kb(pid, "VmHWM").expect("the process is running")
}

/// The real binary streams a 1,000,000-row CSV export with flat memory: the body is produced as
/// the client reads, never held whole (one query that ClickHouse reads in sort-key order, the
/// default). A client that hangs up stops the export's query and gives back its place among the
/// exports allowed at once (`query.max_concurrent_exports`, 1 here). (The windowed mode,
/// `query.export_window_rows` > 0, has tests of its own above.)
#[tokio::test]
async fn a_million_row_export_streams_in_bounded_memory_and_stops_with_its_client() {
    const ROWS: u64 = 1_000_000;
    const BOUND_MB: u64 = 64;
    let api = TestApi::spawn("bigexport").await;
    for (org, rows, step_ms) in [("org_big", ROWS, 5_000)] {
        api.client()
            .query(&format!(
                "INSERT INTO audit_events SELECT '{org}', 1735689600000 + number * {step_ms}, concat('e', toString(number)), \
                 'user.created', 'usr_admin', 'user', 'ada@acme.example', 'Ada Admin', 'user', concat('usr_', toString(number)), \
                 NULL, NULL, NULL, '[{{\"field\":\"role\",\"newValue\":\"admin\"}}]', '203.0.113.7', 'curl/8', NULL, NULL, \
                 '{{\"k\":1}}', 'identity.users.v1', 0, number, 1 FROM system.numbers LIMIT {rows}",
            ))
            .execute()
            .await
            .unwrap();
    }
    let key = keys::generate("org_big", Role::Admin, "export");
    keys::create(&api.client(), &key).await.unwrap();

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_audit-api"))
        .arg("serve")
        .env("AUDIT_API__HTTP_LISTEN", format!("127.0.0.1:{port}"))
        .env("AUDIT_API__CLICKHOUSE__URL", &api.clickhouse.url)
        .env("AUDIT_API__CLICKHOUSE__DATABASE", &api.clickhouse.database)
        .env("AUDIT_API__READ_EVENTS__ENABLED", "false")
        .env("AUDIT_API__TELEMETRY__LOG_FILTER", "warn")
        .env("AUDIT_API__QUERY__MAX_CONCURRENT_EXPORTS", "1")
        // The fixtures date from 2025: held under the longest retention.
        .env("AUDIT_API__RETENTION__DEFAULT_DAYS", "3650")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let child = KillOnDrop(child);
    let ready = format!("http://127.0.0.1:{port}/readyz");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !matches!(api.http.get(&ready).send().await, Ok(r) if r.status().is_success()) {
        assert!(Instant::now() < deadline, "audit-api did not become ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A client that hangs up stops the ClickHouse query. The export's `from` (7 ms into the
    // data) marks its SQL among the queries of other tests: `system.processes` shows the
    // statement with its parameters' values substituted.
    let running = || async {
        api.client()
            .query(
                "SELECT count() FROM system.processes WHERE query LIKE '%1735689600007%' \
                 AND query NOT LIKE '%system.processes%'",
            )
            .fetch_one::<u64>()
            .await
            .unwrap()
    };
    let export = |key: &keys::CreatedKey, query: &str| {
        api.http
            .get(format!(
                "http://127.0.0.1:{port}/api/v1/organization/audit-logs/export?{query}"
            ))
            .header("X-API-Key", key.secret.expose_secret())
            .send()
    };
    let mut response = export(&key, "format=csv&from=2025-01-01T00:00:00.007Z")
        .await
        .unwrap();
    assert!(response.chunk().await.unwrap().is_some());
    assert!(
        running().await >= 1,
        "the export's query runs while its client reads"
    );
    // One export at a time here (`query.max_concurrent_exports = 1`): a second one is refused
    // while the first runs; pages are not limited.
    let refused = export(&key, "format=csv").await.unwrap();
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refused.headers()["retry-after"], "5");
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "too_many_exports");
    let page = api
        .http
        .get(format!(
            "http://127.0.0.1:{port}/api/v1/organization/audit-logs?limit=1"
        ))
        .header("X-API-Key", key.secret.expose_secret())
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    drop(response);
    let deadline = Instant::now() + Duration::from_secs(10);
    while running().await > 0 {
        assert!(
            Instant::now() < deadline,
            "the export's query outlived its client"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The export that hung up gave its place back.
    let mut response = export(&key, "format=csv").await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let (mut lines, mut bytes) = (0u64, 0u64);
    while let Some(chunk) = response.chunk().await.unwrap() {
        if lines == 0 {
            let text = String::from_utf8_lossy(&chunk);
            let newest = text.lines().nth(1).unwrap();
            assert!(newest.starts_with("e999999,"), "newest first: {newest}");
        }
        lines += chunk.iter().filter(|b| **b == b'\n').count() as u64;
        bytes += chunk.len() as u64;
    }
    let peak_mb = peak_rss_kb(child.0.id()) / 1024;
    eprintln!("exported {lines} lines, {bytes} bytes; audit-api peak RSS {peak_mb} MB");
    drop(child);
    assert_eq!(lines, ROWS + 1, "header plus one line per event");
    assert!(bytes > ROWS * 100);
    assert!(
        peak_mb < BOUND_MB,
        "peak RSS {peak_mb} MB while streaming {bytes} bytes"
    );
    api.stop().await;
}

/// SIGTERM (the shutdown token) stops new requests but lets a CSV stream already under way finish.
#[tokio::test]
async fn shutdown_lets_a_running_export_finish() {
    let api = TestApi::spawn_with("shutdown", |config| config.shutdown_timeout_ms = 20_000).await;
    let key = api.key("org_a", Role::Admin).await;
    api.client()
        .query(
            "INSERT INTO audit_events SELECT 'org_a', 1735689600000 + number, concat('e', toString(number)), \
             'user.created', 'usr_admin', 'user', NULL, NULL, 'user', 'u', NULL, NULL, NULL, '[]', \
             NULL, NULL, NULL, NULL, NULL, 't', 0, number, 1 FROM system.numbers LIMIT 200000",
        )
        .execute()
        .await
        .unwrap();
    let mut response = api
        .http
        .get(api.url("/api/v1/organization/audit-logs/export", "format=csv"))
        .header("X-API-Key", &key)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let first = response.chunk().await.unwrap().unwrap();
    api.shutdown.cancel();
    let mut lines = first.iter().filter(|b| **b == b'\n').count();
    while let Some(chunk) = response.chunk().await.unwrap() {
        lines += chunk.iter().filter(|b| **b == b'\n').count();
    }
    assert_eq!(
        lines, 200_001,
        "the stream under way completes after the shutdown began"
    );
    // New connections are refused once the server has stopped.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(api.http.get(api.url("/healthz", "")).send().await.is_err());
    api.stop().await;
}
