//! The read API against the real ClickHouse of the local stack (`make up`): every test gets its
//! own database, its own keys and an in-process server on a free port.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use audit_api::config::ApiConfig;
use audit_api::keys::{self, Role};
use audit_api::Application;
use audit_store::clickhouse;
use audit_store::{AuditEventRow, ClickHouseConfig};
use audit_testkit::clickhouse_url;
use reqwest::StatusCode;
use secrecy::ExposeSecret;
use serde_json::Value;

const BASE_MS: i64 = 1_735_689_600_000; // 2025-01-01T00:00:00Z

/// One running API with its own database.
struct TestApi {
    address: SocketAddr,
    clickhouse: ClickHouseConfig,
    http: reqwest::Client,
    shutdown: tokio_util::sync::CancellationToken,
    server: Option<tokio::task::JoinHandle<()>>,
}

impl TestApi {
    async fn spawn(name: &str) -> Self {
        Self::spawn_with(name, |_| {}).await
    }

    async fn spawn_with(name: &str, tune: impl FnOnce(&mut ApiConfig)) -> Self {
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let mut config = ApiConfig {
            http_listen: "127.0.0.1:0".parse().unwrap(),
            clickhouse: audit_testkit::clickhouse_config(format!(
                "audit_api_test_{name}_{}",
                &suffix[..12]
            )),
            shutdown_timeout_ms: 2_000,
            ..ApiConfig::default()
        };
        config.read_events.enabled = false;
        config.rate_limit.requests_per_second = 0;
        config.keys.refresh_interval_ms = 200;
        tune(&mut config);
        let clickhouse = config.clickhouse.clone();
        let app = Application::build(config).await.expect("api starts");
        let address = app.local_addr().unwrap();
        let shutdown = app.shutdown_token();
        let server = tokio::spawn(async move {
            app.run().await.expect("api runs");
        });
        Self {
            address,
            clickhouse,
            http: reqwest::Client::new(),
            shutdown,
            server: Some(server),
        }
    }

    fn client(&self) -> clickhouse::Client {
        self.clickhouse.client()
    }

    /// Creates a key and waits until the running service knows it.
    async fn key(&self, org: &str, role: Role) -> String {
        let key = keys::generate(org, role, "test");
        keys::create(&self.client(), &key).await.unwrap();
        let text = key.secret.expose_secret().to_owned();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let status = self.get(&text, "limit=1").await.0;
            if status != StatusCode::UNAUTHORIZED || Instant::now() > deadline {
                return text;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn insert(&self, rows: &[AuditEventRow]) {
        let mut insert = self
            .client()
            .insert::<AuditEventRow>(audit_store::EVENTS_TABLE)
            .await
            .unwrap();
        for row in rows {
            insert.write(row).await.unwrap();
        }
        insert.end().await.unwrap();
    }

    /// Stores `rows` again, as copies of events stored already (an event published twice
    /// upstream), and records their months as holding copies, as the ingest's duplicate check
    /// does after it stored them (`audit_ingest::duplicates`).
    async fn insert_copies(&self, rows: &[AuditEventRow]) {
        self.insert(rows).await;
        let months: std::collections::BTreeSet<String> = rows
            .iter()
            .map(|r| {
                chrono::DateTime::from_timestamp_millis(r.occurred_at_ms)
                    .unwrap()
                    .format("%Y%m")
                    .to_string()
            })
            .collect();
        for month in months {
            self.client()
                .query(&format!(
                    "INSERT INTO {} VALUES (?, 'found', toUInt64(toUnixTimestamp(now())) * 1000, 1)",
                    audit_store::DUPLICATES_TABLE
                ))
                .bind(month)
                .execute()
                .await
                .unwrap();
        }
    }

    /// `total` and `X-Total-Count-Exact` of a 200 JSON page.
    async fn total(&self, key: &str, query: &str) -> (u64, bool) {
        let (status, headers, body) = self.get(key, query).await;
        assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
        let page: Value = serde_json::from_slice(&body).unwrap();
        let exact = headers["x-total-count-exact"].to_str().unwrap() == "true";
        (page["total"].as_u64().unwrap(), exact)
    }

    /// The Prometheus exposition of `/metrics`.
    async fn metrics(&self) -> String {
        let response = self.http.get(self.url("/metrics", "")).send().await;
        response.unwrap().text().await.unwrap()
    }

    fn url(&self, path: &str, query: &str) -> String {
        format!("http://{}{path}?{query}", self.address)
    }

    /// GET the list endpoint with an `X-API-Key`.
    async fn get(
        &self,
        key: &str,
        query: &str,
    ) -> (StatusCode, reqwest::header::HeaderMap, Vec<u8>) {
        self.get_path(key, "/api/v1/organization/audit-logs", query)
            .await
    }

    async fn get_path(
        &self,
        key: &str,
        path: &str,
        query: &str,
    ) -> (StatusCode, reqwest::header::HeaderMap, Vec<u8>) {
        let response = self
            .http
            .get(self.url(path, query))
            .header("X-API-Key", key)
            .send()
            .await
            .unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.bytes().await.unwrap().to_vec();
        (status, headers, body)
    }

    /// A 200 JSON page.
    async fn page(&self, key: &str, query: &str) -> Value {
        let (status, _, body) = self.get(key, query).await;
        assert_eq!(
            status,
            StatusCode::OK,
            "{query}: {}",
            String::from_utf8_lossy(&body)
        );
        serde_json::from_slice(&body).unwrap()
    }

    /// The ids of every page of `query`, first page then by `nextCursor` to the end.
    async fn walk(&self, key: &str, query: &str) -> Vec<String> {
        let mut walked = Vec::new();
        let mut page = self.page(key, query).await;
        loop {
            walked.extend(ids(&page));
            let Some(cursor) = page["nextCursor"].as_str().map(str::to_owned) else {
                return walked;
            };
            page = self.page(key, &format!("{query}&cursor={cursor}")).await;
        }
    }

    async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(server) = self.server.take() {
            let _ = server.await;
        }
        let _ = audit_testkit::drop_database(&self.clickhouse, &self.clickhouse.database).await;
    }
}

fn ids(page: &Value) -> Vec<String> {
    page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| item["id"].as_str().unwrap().to_owned())
        .collect()
}

/// The ids of an NDJSON export body, in order.
fn ndjson_ids(body: &[u8]) -> Vec<String> {
    body.split(|b| *b == b'\n')
        .filter(|line| !line.is_empty())
        .map(|line| {
            serde_json::from_slice::<Value>(line).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect()
}

/// A stored event; `n` makes every field distinct enough to filter on.
fn event(org: &str, id: &str, at_ms: i64) -> AuditEventRow {
    AuditEventRow {
        organization_id: org.to_owned(),
        occurred_at_ms: at_ms,
        id: id.to_owned(),
        event_type: "user.created".to_owned(),
        actor_id: "usr_admin".to_owned(),
        actor_type: "user".to_owned(),
        actor_email: Some("Ada.Admin@Acme.example".to_owned()),
        actor_name: Some("Ada Admin".to_owned()),
        resource_type: "user".to_owned(),
        resource_id: format!("usr_{id}"),
        resource_name: None,
        affected_user_id: Some(format!("usr_{id}")),
        affected_user_email: Some(format!("{id}@acme.example")),
        changes: r#"[{"field":"role","oldValue":"member","newValue":"admin"}]"#.to_owned(),
        context_ip: Some("203.0.113.7".to_owned()),
        context_user_agent: Some("curl/8".to_owned()),
        context_request_id: Some("req_1".to_owned()),
        context_location: None,
        metadata: Some(r#"{"source":"test"}"#.to_owned()),
        source_topic: "identity.users.v1".to_owned(),
        source_partition: 0,
        source_offset: 0,
        ingested_at_ms: 1,
    }
}

/// Events `e000..` one second apart, with a few types, actors and resources mixed in.
fn series(org: &str, count: usize) -> Vec<AuditEventRow> {
    (0..count)
        .map(|n| {
            let mut row = event(org, &format!("e{n:03}"), BASE_MS + n as i64 * 1000);
            if n % 3 == 0 {
                row.event_type = "team_member.added".to_owned();
                row.resource_type = "team".to_owned();
                row.resource_id = format!("team_{}", n % 2);
            }
            if n % 4 == 0 {
                row.actor_id = "usr_bob".to_owned();
                row.actor_email = Some("bob@acme.example".to_owned());
            }
            if n % 5 == 0 {
                row.actor_email = None;
            }
            row
        })
        .collect()
}

#[tokio::test]
async fn keys_decide_who_reads() {
    let api = TestApi::spawn("auth").await;
    let admin = api.key("org_a", Role::Admin).await;
    let member = api.key("org_a", Role::Member).await;

    let url = api.url("/api/v1/organization/audit-logs", "");
    let missing = api.http.get(&url).send().await.unwrap();
    assert_eq!(missing.status(), StatusCode::UNAUTHORIZED);
    let body: Value = missing.json().await.unwrap();
    assert_eq!(body["error"]["code"], "missing_api_key");

    assert_eq!(
        api.get("alk_0000000000000000_nope", "").await.0,
        StatusCode::UNAUTHORIZED
    );
    let mut forged = admin.clone();
    forged.replace_range(forged.len() - 2.., "xx");
    assert_eq!(api.get(&forged, "").await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(api.get(&member, "").await.0, StatusCode::FORBIDDEN);
    assert_eq!(api.get(&admin, "").await.0, StatusCode::OK);

    let bearer = api
        .http
        .get(&url)
        .header("Authorization", format!("Bearer {admin}"))
        .send()
        .await
        .unwrap();
    assert_eq!(bearer.status(), StatusCode::OK);

    // Revocation reaches the running service within the 5 s promise.
    let key_id = admin.split('_').nth(1).unwrap().to_owned();
    let revoked_at = Instant::now();
    keys::revoke(&api.client(), &key_id).await.unwrap();
    loop {
        if api.get(&admin, "").await.0 == StatusCode::UNAUTHORIZED {
            break;
        }
        assert!(
            revoked_at.elapsed() < Duration::from_secs(5),
            "revocation not applied within 5 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Usage is recorded (last-used time) without the key ever being stored in clear.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let stored: Vec<String> = api
        .client()
        .query("SELECT secret_sha256 FROM api_keys")
        .fetch_all()
        .await
        .unwrap();
    assert!(stored
        .iter()
        .all(|hash| hash.len() == 64 && !admin.contains(hash.as_str())));
    api.stop().await;
}

#[tokio::test]
async fn pages_sort_filter_and_count() {
    let api = TestApi::spawn("pages").await;
    let key = api.key("org_a", Role::Admin).await;
    let rows = series("org_a", 30);
    api.insert(&rows).await;

    // Defaults: newest first, 50 per page, exact total.
    let page = api.page(&key, "").await;
    assert_eq!(page["total"], 30);
    assert_eq!(page["limit"], 50);
    assert_eq!(page["offset"], 0);
    assert_eq!(page["nextCursor"], Value::Null);
    let all = ids(&page);
    assert_eq!(all.first().unwrap(), "e029");
    assert_eq!(all.last().unwrap(), "e000");
    let asc = ids(&api.page(&key, "sort=asc").await);
    assert_eq!(asc, all.iter().rev().cloned().collect::<Vec<_>>());

    // An item carries every field the contract lists, as stored.
    let item = &page["items"][29];
    assert_eq!(item["timestamp"], "2025-01-01T00:00:00.000Z");
    assert_eq!(item["eventType"], "team_member.added");
    assert_eq!(item["actor"]["id"], "usr_bob");
    assert_eq!(item["actor"]["email"], Value::Null);
    assert_eq!(item["affectedUser"]["email"], "e000@acme.example");
    assert_eq!(item["resource"]["type"], "team");
    assert_eq!(item["changes"][0]["oldValue"], "member");
    assert_eq!(item["context"]["ip"], "203.0.113.7");
    assert_eq!(item["metadata"]["source"], "test");

    // limit 1 and offset past the end.
    let one = api.page(&key, "limit=1&offset=3").await;
    assert_eq!(ids(&one), vec!["e026"]);
    assert!(one["nextCursor"].is_string());
    let past = api.page(&key, "offset=500").await;
    assert_eq!(past["items"].as_array().unwrap().len(), 0);
    assert_eq!(past["total"], 30);

    // from inclusive, to exclusive, at millisecond edges.
    let window = api
        .page(
            &key,
            "from=2025-01-01T00:00:05Z&to=2025-01-01T00:00:08Z&sort=asc",
        )
        .await;
    assert_eq!(ids(&window), vec!["e005", "e006", "e007"]);
    let edge = api
        .page(
            &key,
            "from=2025-01-01T00:00:05.001Z&to=2025-01-01T00:00:08.001Z&sort=asc",
        )
        .await;
    assert_eq!(ids(&edge), vec!["e006", "e007", "e008"]);
    let offset_zone = api
        .page(
            &key,
            "from=2025-01-01T01:00:05%2B01:00&to=2025-01-01T01:00:06%2B01:00",
        )
        .await;
    assert_eq!(ids(&offset_zone), vec!["e005"]);

    // Each filter alone, checked against the rows themselves.
    let expect = |keep: &dyn Fn(&AuditEventRow) -> bool| -> BTreeSet<String> {
        rows.iter()
            .filter(|r| keep(r))
            .map(|r| r.id.clone())
            .collect()
    };
    let got = |page: Value| -> BTreeSet<String> { ids(&page).into_iter().collect() };
    assert_eq!(
        got(api.page(&key, "eventType=team_member.added").await),
        expect(&|r| r.event_type == "team_member.added")
    );
    assert_eq!(
        got(api.page(&key, "actorId=usr_bob").await),
        expect(&|r| r.actor_id == "usr_bob")
    );
    assert_eq!(
        got(api.page(&key, "actorEmail=ADA.admin%40acme.EXAMPLE").await),
        expect(&|r| r.actor_email.as_deref() == Some("Ada.Admin@Acme.example"))
    );
    assert_eq!(
        got(api.page(&key, "resourceType=team").await),
        expect(&|r| r.resource_type == "team")
    );
    assert_eq!(
        got(api.page(&key, "resourceId=team_1").await),
        expect(&|r| r.resource_id == "team_1")
    );
    let combined = api
        .page(
            &key,
            "eventType=team_member.added&actorId=usr_bob&resourceId=team_0",
        )
        .await;
    assert_eq!(
        got(combined.clone()),
        expect(&|r| r.event_type == "team_member.added"
            && r.actor_id == "usr_bob"
            && r.resource_id == "team_0")
    );
    assert_eq!(
        combined["total"].as_u64().unwrap() as usize,
        ids(&combined).len()
    );
    // Actor email with other filters (read from the actor-email copy of the rows).
    let with_email = api
        .page(
            &key,
            "actorEmail=Ada.Admin%40acme.example&eventType=team_member.added&to=2025-01-01T00:00:20Z",
        )
        .await;
    let want = expect(&|r| {
        r.actor_email.as_deref() == Some("Ada.Admin@Acme.example")
            && r.event_type == "team_member.added"
            && r.occurred_at_ms < BASE_MS + 20_000
    });
    assert!(!want.is_empty());
    assert_eq!(got(with_email.clone()), want);
    assert_eq!(with_email["total"].as_u64().unwrap() as usize, want.len());
    api.stop().await;
}

#[tokio::test]
async fn ties_redeliveries_and_cursors() {
    let api = TestApi::spawn("cursor").await;
    let key = api.key("org_a", Role::Admin).await;
    // Ten events in the same millisecond: ties are broken by id, both ways.
    let tied: Vec<AuditEventRow> = (0..10)
        .map(|n| event("org_a", &format!("t{n}"), BASE_MS))
        .collect();
    api.insert(&tied).await;
    // The same events delivered again (a re-delivery after a crash): still shown once.
    let mut again = tied.clone();
    for row in &mut again {
        row.ingested_at_ms = 2;
    }
    api.insert_copies(&again).await;

    let desc = api.page(&key, "").await;
    assert_eq!(desc["total"], 10);
    assert_eq!(
        ids(&desc),
        (0..10).rev().map(|n| format!("t{n}")).collect::<Vec<_>>()
    );
    let asc = api.page(&key, "sort=asc").await;
    assert_eq!(
        ids(&asc),
        (0..10).map(|n| format!("t{n}")).collect::<Vec<_>>()
    );

    // Offset pages of 3 never overlap or skip.
    let mut by_offset = Vec::new();
    for offset in (0..10).step_by(3) {
        by_offset.extend(ids(&api
            .page(&key, &format!("limit=3&offset={offset}"))
            .await));
    }
    assert_eq!(by_offset, ids(&desc));

    // Cursor pages, with new events arriving (newer) during the walk: same sequence, no repeat.
    let mut by_cursor = Vec::new();
    let mut page = api.page(&key, "limit=3").await;
    api.insert(&[event("org_a", "late", BASE_MS + 5_000)]).await;
    loop {
        by_cursor.extend(ids(&page));
        let Some(cursor) = page["nextCursor"].as_str().map(str::to_owned) else {
            break;
        };
        page = api.page(&key, &format!("limit=3&cursor={cursor}")).await;
        assert_eq!(page["offset"], 0);
    }
    assert_eq!(by_cursor, ids(&desc));

    // A bounded range (read in one query) and the export collapse re-deliveries too.
    let day = api
        .page(&key, "from=2025-01-01T00:00:00Z&to=2025-01-02T00:00:00Z")
        .await;
    let mut with_late = vec!["late".to_owned()];
    with_late.extend(ids(&desc));
    assert_eq!(ids(&day), with_late);
    assert_eq!(day["total"], 11);
    // The same through the event-type key table and the actor-email copy of the rows.
    for filter in [
        "eventType=user.created",
        "actorEmail=ada.admin%40acme.example",
    ] {
        let page = api.page(&key, &format!("{filter}&limit=4")).await;
        assert_eq!(ids(&page), with_late[..4].to_vec(), "{filter}");
        assert_eq!(page["total"], 11, "{filter}");
        let cursor = page["nextCursor"].as_str().unwrap();
        let next = api
            .page(&key, &format!("{filter}&limit=4&cursor={cursor}"))
            .await;
        assert_eq!(ids(&next), with_late[4..8].to_vec(), "{filter}");
    }
    let export = api
        .get_path(
            &key,
            "/api/v1/organization/audit-logs/export",
            "format=ndjson&sort=asc",
        )
        .await
        .2;
    let exported = ndjson_ids(&export);
    let mut expected: Vec<String> = (0..10).map(|n| format!("t{n}")).collect();
    expected.push("late".to_owned());
    assert_eq!(exported, expected);
    let by_email = api
        .get_path(
            &key,
            "/api/v1/organization/audit-logs/export",
            "format=ndjson&sort=asc&actorEmail=ADA.admin%40acme.EXAMPLE",
        )
        .await
        .2;
    assert_eq!(ndjson_ids(&by_email), expected);

    // A cursor is bound to its filters and sort.
    let first = api.page(&key, "limit=2&sort=asc").await;
    let cursor = first["nextCursor"].as_str().unwrap();
    let (status, _, body) = api.get(&key, &format!("limit=2&cursor={cursor}")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let error: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(error["error"]["parameter"], "cursor");
    api.stop().await;
}

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
    assert!(got.len() <= 80, "{} rows arrived", got.len());
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

#[tokio::test]
async fn an_organization_never_sees_another_ones_events() {
    let api = TestApi::spawn("tenancy").await;
    let key_a = api.key("org_a", Role::Admin).await;
    let key_b = api.key("org_b", Role::Admin).await;
    // Same ids, times, actors and resources in both organizations.
    let mut a = series("org_a", 20);
    let mut b = series("org_b", 20);
    for row in &mut a {
        row.metadata = Some(r#"{"owner":"a"}"#.to_owned());
    }
    for row in &mut b {
        row.metadata = Some(r#"{"owner":"b"}"#.to_owned());
    }
    api.insert(&a).await;
    api.insert(&b).await;

    let filters = [
        "",
        "eventType=team_member.added",
        "actorId=usr_bob",
        "actorEmail=bob%40acme.example",
        "resourceType=team",
        "resourceId=team_0",
        "from=2025-01-01T00:00:03Z",
        "to=2025-01-01T00:00:09Z",
    ];
    let tails = ["", "sort=asc", "limit=3", "limit=3&offset=2", "format=csv"];
    for (key, owner) in [(&key_a, "a"), (&key_b, "b")] {
        for i in 0..filters.len() {
            for j in i..filters.len() {
                for tail in tails {
                    let query = [filters[i], filters[j], tail]
                        .iter()
                        .filter(|p| !p.is_empty())
                        .copied()
                        .collect::<BTreeSet<_>>()
                        .into_iter()
                        .collect::<Vec<_>>()
                        .join("&");
                    let (status, _, body) = api.get(key, &query).await;
                    assert_eq!(status, StatusCode::OK, "{query}");
                    let text = String::from_utf8(body).unwrap();
                    let other = if owner == "a" { "b" } else { "a" };
                    assert!(
                        !text.contains(&format!("\"owner\":\"{other}\""))
                            && !text.contains(&format!("\"\"owner\"\":\"\"{other}\"\"")),
                        "{query} leaked org_{other}"
                    );
                }
            }
        }
        let export = api
            .get_path(
                key,
                "/api/v1/organization/audit-logs/export",
                "format=ndjson",
            )
            .await;
        let lines: Vec<Value> = export
            .2
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 20);
        assert!(lines.iter().all(|l| l["metadata"]["owner"] == owner));
    }
    api.stop().await;
}

#[tokio::test]
async fn hostile_values_are_bound_not_spliced() {
    let api = TestApi::spawn("hostile").await;
    let key = api.key("org_a", Role::Admin).await;
    let mut rows = series("org_a", 3);
    rows[0].actor_id = "x' OR '1'='1".to_owned();
    rows[1].resource_id = "Zoë\\🚀\"?;--".to_owned();
    api.insert(&rows).await;
    let values = [
        "' OR 1=1 --",
        "x' OR '1'='1",
        "\\'; DROP TABLE audit_events; --",
        "?",
        "??",
        "{name:String}",
        "Zoë\\🚀\"?;--",
        "=SUM(A1:A9)",
        "%00",
        "\u{202e}gnp.exe",
        "a\"b,c\nd",
        "o'hara@x.example",
        "a'@b'OR'1'='1",
        "nul\u{0}byte",
    ];
    for parameter in [
        "eventType",
        "actorId",
        "actorEmail",
        "resourceType",
        "resourceId",
    ] {
        for value in values {
            let encoded: String = form_urlencoded::byte_serialize(value.as_bytes()).collect();
            let (status, _, body) = api.get(&key, &format!("{parameter}={encoded}")).await;
            let text = String::from_utf8_lossy(&body);
            if parameter == "actorEmail" && !value.contains('@') {
                assert_eq!(
                    status,
                    StatusCode::BAD_REQUEST,
                    "{parameter}={value:?}: {text}"
                );
                continue;
            }
            assert_eq!(status, StatusCode::OK, "{parameter}={value:?}: {text}");
            let page: Value = serde_json::from_slice(&body).unwrap();
            let expected = rows
                .iter()
                .filter(|r| match parameter {
                    "eventType" => r.event_type == value,
                    "actorId" => r.actor_id == value,
                    "actorEmail" => {
                        r.actor_email.as_deref().map(str::to_lowercase)
                            == Some(value.to_lowercase())
                    }
                    "resourceType" => r.resource_type == value,
                    _ => r.resource_id == value,
                })
                .count();
            assert_eq!(
                page["total"].as_u64().unwrap() as usize,
                expected,
                "{parameter}={value:?}"
            );
        }
    }
    // The table is still there, with every row.
    assert_eq!(api.page(&key, "").await["total"], 3);
    api.stop().await;
}

#[tokio::test]
async fn bad_input_gets_a_400_naming_the_parameter() {
    let api = TestApi::spawn("badinput").await;
    let key = api.key("org_a", Role::Admin).await;
    for (query, parameter) in [
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("offset=-1", "offset"),
        ("offset=abc", "offset"),
        ("sort=newest", "sort"),
        ("format=xml", "format"),
        ("from=2025-01-01", "from"),
        ("to=2025-01-01T00:00:00", "to"),
        ("from=2025-01-02T00:00:00Z&to=2025-01-01T00:00:00Z", "from"),
        ("limit=5&limit=5", "limit"),
        ("cursor=garbage", "cursor"),
        ("unknown=1", "query"),
    ] {
        let (status, headers, body) = api.get(&key, query).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}");
        assert!(headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json"));
        let error: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(error["error"]["code"], "invalid_parameter", "{query}");
        assert_eq!(error["error"]["parameter"], parameter, "{query}");
        assert!(!error["error"]["message"].as_str().unwrap().is_empty());
    }
    api.stop().await;
}

#[tokio::test]
async fn each_key_has_a_request_budget() {
    let api = TestApi::spawn_with("ratelimit", |config| {
        config.rate_limit.requests_per_second = 1;
        config.rate_limit.burst = 3;
    })
    .await;
    let key = api.key("org_a", Role::Admin).await;
    let other = api.key("org_a", Role::Admin).await;
    let mut limited = None;
    for _ in 0..10 {
        let (status, headers, body) = api.get(&key, "limit=1").await;
        if status == StatusCode::TOO_MANY_REQUESTS {
            limited = Some((headers, body));
            break;
        }
    }
    let (headers, body) = limited.expect("the budget of 3 runs out within 10 requests");
    let retry_after: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry_after));
    let error: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(error["error"]["code"], "rate_limited");
    // Another key is not affected.
    assert_eq!(api.get(&other, "limit=1").await.0, StatusCode::OK);
    api.stop().await;
}

#[tokio::test]
async fn responses_match_the_openapi_document() {
    let api = TestApi::spawn("openapi").await;
    let key = api.key("org_a", Role::Admin).await;
    api.insert(&series("org_a", 5)).await;
    let served: Value = api
        .http
        .get(api.url("/openapi.json", ""))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let on_disk: Value = serde_json::from_str(include_str!(
        "../../../schemas/openapi/audit-logs.openapi.json"
    ))
    .unwrap();
    assert_eq!(served, on_disk);
    let validator = |name: &str| {
        let mut schema = serde_json::json!({"$ref": format!("#/components/schemas/{name}")});
        schema["components"] = on_disk["components"].clone();
        jsonschema::draft202012::options()
            .should_validate_formats(true)
            .build(&schema)
            .unwrap()
    };
    let page = validator("AuditLogPage");
    let error = validator("Error");
    for query in [
        "",
        "limit=2",
        "sort=asc&limit=1",
        "eventType=user.created",
        "offset=99",
    ] {
        let body = api.page(&key, query).await;
        let problems: Vec<String> = page.iter_errors(&body).map(|e| e.to_string()).collect();
        assert!(problems.is_empty(), "{query}: {problems:?}");
    }
    for (key, query) in [
        (key.as_str(), "limit=0"),
        ("nope", ""),
        (key.as_str(), "bogus=1"),
    ] {
        let (_, _, body) = api.get(key, query).await;
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert!(error.is_valid(&body), "{query}: {body}");
    }
    api.stop().await;
}

#[tokio::test]
async fn an_unreachable_store_is_a_clear_503() {
    let api = TestApi::spawn("down").await;
    let key = api.key("org_a", Role::Admin).await;
    // The same keys, in front of a ClickHouse that does not answer.
    let mut config = ApiConfig::default();
    config.read_events.enabled = false;
    config.clickhouse.url = "http://127.0.0.1:9".to_owned();
    let state = audit_api::AppState::new(&config).unwrap();
    state
        .keys
        .replace(keys::load(&api.client(), None).await.unwrap());
    let router = audit_api::routes::router(state);
    use tower::ServiceExt;
    // A page, and an export (whose query is opened on a thread of its own).
    for uri in [
        "/api/v1/organization/audit-logs",
        "/api/v1/organization/audit-logs/export?format=csv",
    ] {
        let request = axum::http::Request::get(uri)
            .header("X-API-Key", &key)
            .body(axum::body::Body::empty())
            .unwrap();
        let response = router.clone().oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE, "{uri}");
        assert!(response.headers().contains_key("retry-after"));
        let (error, text) = error_body(response).await;
        assert_eq!(error["error"]["code"], "store_unavailable");
        assert!(!text.contains("127.0.0.1"));
    }
    api.stop().await;
}

/// The JSON error body of an in-process response, and its text.
async fn error_body(response: axum::response::Response) -> (Value, String) {
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await
        .unwrap()
        .to_bytes();
    let text = String::from_utf8_lossy(&body).into_owned();
    (serde_json::from_slice(&body).unwrap(), text)
}

/// A query over ClickHouse's time limit is a 504 that names the limit and nothing else. The
/// service's own queries cannot be made slow on demand, so the real server's timeout comes
/// through the same client (`SELECT sleep(2)` under a 1 s `max_execution_time`).
#[tokio::test]
async fn a_clickhouse_timeout_is_a_clear_504() {
    use axum::response::IntoResponse;
    let config = ClickHouseConfig {
        url: clickhouse_url(),
        ..ClickHouseConfig::default()
    };
    let err = config
        .server_client()
        .with_setting("max_execution_time", "1")
        .query("SELECT sleep(2)")
        .fetch_one::<u8>()
        .await
        .unwrap_err();
    let response = audit_api::error::from_clickhouse(&err).into_response();
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT, "{err}");
    let (error, text) = error_body(response).await;
    assert_eq!(error["error"]["code"], "query_timeout");
    assert!(!text.contains("sleep") && !text.contains("Code"), "{text}");
}

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

#[tokio::test]
async fn freshness_and_request_ids_come_with_every_answer() {
    let api = TestApi::spawn("fresh").await;
    let key = api.key("org_a", Role::Admin).await;
    let mut row = event("org_a", "f1", BASE_MS);
    row.ingested_at_ms = 1_750_000_000_000;
    api.insert(&[row]).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, headers, _) = api.get(&key, "").await;
        assert_eq!(status, StatusCode::OK);
        assert!(headers.contains_key("x-request-id"));
        if let Some(fresh) = headers.get("x-audit-newest-ingested-at") {
            assert_eq!(fresh, "2025-06-15T15:06:40.000Z");
            break;
        }
        assert!(Instant::now() < deadline, "no freshness header");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A newer event in the same month (the watermark is kept per month) moves it on.
    let mut row = event("org_a", "f2", BASE_MS + 1);
    row.ingested_at_ms = 1_750_000_001_000;
    api.insert(&[row]).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, headers, _) = api.get(&key, "").await;
        if headers["x-audit-newest-ingested-at"] == "2025-06-15T15:06:41.000Z" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the freshness header did not advance"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let metrics = api.metrics().await;
    assert!(metrics.contains("audit_api_requests_total{format=\"json\",route=\"/api/v1/organization/audit-logs\",status=\"200\"}"));
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

/// A new one-partition topic for a test's read events.
async fn read_events_topic(name: &str) -> String {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;

    let topic = format!(
        "test.api.{name}.{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", audit_testkit::brokers())
        .create()
        .unwrap();
    admin
        .create_topics(
            &[NewTopic::new(&topic, 1, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await
        .unwrap();
    topic
}

/// Reads are audited: a page and an export each publish an event, in the event contract's
/// shape, to the configured Kafka topic.
#[tokio::test]
async fn reads_are_published_as_audit_events() {
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::Message;

    let brokers = audit_testkit::brokers();
    let topic = read_events_topic("reads").await;
    let api = TestApi::spawn_with("reads", |config| {
        config.read_events.enabled = true;
        config.read_events.brokers = brokers.clone();
        config.read_events.topic = topic.clone();
    })
    .await;
    let key = api.key("org_a", Role::Admin).await;
    api.get(&key, "eventType=role.assigned&limit=5").await;
    api.get_path(
        &key,
        "/api/v1/organization/audit-logs/export",
        "format=ndjson",
    )
    .await;

    let consumer: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", format!("{topic}-reader"))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[&topic]).unwrap();
    let key_id = key.split('_').nth(1).unwrap();
    let mut seen = Vec::new();
    while !seen
        .iter()
        .any(|e: &Value| e["type"] == "audit_log.exported")
    {
        let message = tokio::time::timeout(Duration::from_secs(20), consumer.recv())
            .await
            .expect("read events arrive")
            .unwrap();
        let payload = message.payload().unwrap();
        audit_event::AuditEvent::from_slice(payload).expect("a valid audit event");
        seen.push(serde_json::from_slice(payload).unwrap());
    }
    let viewed = seen
        .iter()
        .find(|e| {
            e["type"] == "audit_log.viewed"
                && e["metadata"]["filters"]["eventType"] == "role.assigned"
        })
        .expect("the page read was published");
    assert_eq!(viewed["organizationId"], "org_a");
    assert_eq!(viewed["actor"]["type"], "api_key");
    assert_eq!(viewed["actor"]["id"], key_id);
    assert!(
        !viewed.to_string().contains(&key[20..]),
        "the key itself never leaves"
    );
    api.stop().await;
}

/// Pages are looked for in narrow time windows first (see `AuditLogStore::page_keys`); whatever
/// the window, a page is the same as a full sort would give, re-deliveries included.
#[tokio::test]
async fn narrowed_pages_equal_full_sorts() {
    let api = TestApi::spawn("windows").await;
    let key = api.key("org_a", Role::Admin).await;
    let now = chrono::Utc::now().timestamp_millis();
    let mut rows = Vec::new();
    // 30 events in the last hour, each delivered twice: the 1-hour window counts 60 rows but
    // holds 30 events, fewer than a 50-row page needs.
    for n in 0..30 {
        rows.push(event("org_a", &format!("recent{n:02}"), now - 60_000 * n));
    }
    let redelivered: Vec<AuditEventRow> = rows.clone();
    // 40 events two days ago, 40 two months ago, 40 two years ago, 5 in the future.
    for (prefix, age) in [
        ("days", 2 * 86_400_000i64),
        ("months", 60 * 86_400_000),
        ("years", 730 * 86_400_000),
    ] {
        for n in 0..40 {
            rows.push(event(
                "org_a",
                &format!("{prefix}{n:02}"),
                now - age - 1000 * n,
            ));
        }
    }
    for n in 0..5 {
        rows.push(event(
            "org_a",
            &format!("future{n}"),
            now + 3_600_000 * (n + 1),
        ));
    }
    api.insert(&rows).await;
    api.insert_copies(&redelivered).await;

    let mut expected: Vec<(i64, String)> = rows
        .iter()
        .map(|r| (r.occurred_at_ms, r.id.clone()))
        .collect();
    expected.sort();
    expected.reverse();
    let expected: Vec<String> = expected.into_iter().map(|(_, id)| id).collect();

    for (limit, offset) in [(50, 0), (10, 30), (50, 60), (100, 100), (1000, 0)] {
        let page = api
            .page(&key, &format!("limit={limit}&offset={offset}"))
            .await;
        let want: Vec<String> = expected.iter().skip(offset).take(limit).cloned().collect();
        assert_eq!(ids(&page), want, "desc limit={limit} offset={offset}");
        assert_eq!(page["total"], 155);
    }
    // Oldest first from a point in time, and cursor walks both ways.
    let from = chrono::DateTime::from_timestamp_millis(now - 61 * 86_400_000)
        .unwrap()
        .to_rfc3339();
    let encoded: String = form_urlencoded::byte_serialize(from.as_bytes()).collect();
    let asc = api
        .page(&key, &format!("sort=asc&limit=45&from={encoded}"))
        .await;
    let mut ascending: Vec<String> = expected.iter().rev().cloned().collect();
    ascending.retain(|id| !id.starts_with("years"));
    assert_eq!(ids(&asc), ascending[..45].to_vec());
    for sort in ["desc", "asc"] {
        let walked = api.walk(&key, &format!("sort={sort}&limit=7")).await;
        let want: Vec<String> = if sort == "desc" {
            expected.clone()
        } else {
            expected.iter().rev().cloned().collect()
        };
        assert_eq!(walked, want, "cursor walk {sort}");
    }
    api.stop().await;
}

/// Pages filtered by event type read the key-only table or, when the window is one month, the
/// full rows directly; either way they equal a full sort, for a frequent type and for a rare one
/// spread over months, on the first request (nothing known) and the later ones (windows sized
/// by the counts kept), at an offset and by cursor.
#[tokio::test]
async fn event_type_pages_equal_full_sorts_whatever_the_window() {
    let api = TestApi::spawn("bytype").await;
    let key = api.key("org_a", Role::Admin).await;
    let now = chrono::Utc::now().timestamp_millis();
    let mut rows = Vec::new();
    // 90 frequent events in the last days, 3 rare ones each month over four months.
    for n in 0..90 {
        let mut row = event("org_a", &format!("f{n:03}"), now - 3_600_000 * n);
        row.event_type = "team.updated".to_owned();
        rows.push(row);
    }
    for month in 0..4i64 {
        for n in 0..3 {
            let mut row = event(
                "org_a",
                &format!("r{month}{n}"),
                now - month * 31 * 86_400_000 - 1000 * n,
            );
            row.event_type = "role.revoked".to_owned();
            rows.push(row);
        }
    }
    api.insert(&rows).await;
    for event_type in ["team.updated", "role.revoked"] {
        let mut expected: Vec<(i64, String)> = rows
            .iter()
            .filter(|r| r.event_type == event_type)
            .map(|r| (r.occurred_at_ms, r.id.clone()))
            .collect();
        expected.sort();
        expected.reverse();
        let expected: Vec<String> = expected.into_iter().map(|(_, id)| id).collect();
        for round in 0..2 {
            for (limit, offset) in [(5, 0), (10, 3), (100, 0)] {
                let page = api
                    .page(
                        &key,
                        &format!("eventType={event_type}&limit={limit}&offset={offset}"),
                    )
                    .await;
                let want: Vec<String> = expected.iter().skip(offset).take(limit).cloned().collect();
                assert_eq!(
                    ids(&page),
                    want,
                    "{event_type} round {round} {limit}/{offset}"
                );
                assert_eq!(page["total"], expected.len());
            }
            let walked = api
                .walk(&key, &format!("eventType={event_type}&limit=4"))
                .await;
            assert_eq!(walked, expected, "{event_type} round {round} cursor walk");
        }
    }
    api.stop().await;
}

/// A copy of an event that the ingest has not found yet (no `audit_event_duplicates` record):
/// pages read without FINAL see both rows, and must still show the event once, in JSON and CSV,
/// on a first page, at an offset and by cursor.
#[tokio::test]
async fn a_copy_not_found_yet_shows_once() {
    let api = TestApi::spawn("unfound").await;
    let key = api.key("org_a", Role::Admin).await;
    let now = chrono::Utc::now().timestamp_millis();
    let rows: Vec<AuditEventRow> = (0..12)
        .map(|n| event("org_a", &format!("e{n:02}"), now - 1_000 * n))
        .collect();
    api.insert(&rows).await;
    // Plain inserts: the same events again, unrecorded.
    api.insert(&rows[2..6]).await;
    let expected: Vec<String> = rows.iter().map(|r| r.id.clone()).collect();
    for (limit, offset) in [(5, 0), (12, 0), (4, 4)] {
        let page = api
            .page(&key, &format!("limit={limit}&offset={offset}"))
            .await;
        let got = ids(&page);
        assert_eq!(
            got,
            expected[offset..offset + limit].to_vec(),
            "limit={limit} offset={offset}"
        );
    }
    assert_eq!(api.walk(&key, "limit=3").await, expected);
    let (_, _, body) = api.get(&key, "format=csv&limit=6").await;
    let csv = String::from_utf8(body).unwrap();
    let lines: Vec<&str> = csv.lines().skip(1).collect();
    assert_eq!(lines.len(), 6, "{csv}");
    for (line, id) in lines.iter().zip(&expected) {
        assert!(line.starts_with(&format!("{id},")), "{line}");
    }
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

/// The production connections: ClickHouse over HTTPS (the local server's TLS port, trusting the
/// local CA) for keys, pages and exports, and read events published over Kafka's `SASL_SSL`
/// listener with SASL/PLAIN (as Confluent Cloud and Event Hubs take them).
#[tokio::test]
async fn reads_over_https_and_publishes_read_events_over_sasl_ssl() {
    use audit_runtime::kafka::{KafkaSecurity, SaslMechanism, SecurityProtocol};
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::Message;

    let stack = audit_testkit::SecureStack::from_env();
    let topic = read_events_topic("tls-reads").await;
    let api = TestApi::spawn_with("https", |config| {
        // The stack's one server behind TLS, whatever layout the other tests use.
        config.clickhouse.cluster = String::new();
        config.clickhouse.cluster_nodes = Vec::new();
        config.clickhouse.url = stack.clickhouse_https.clone();
        config.clickhouse.tls.ca_file = Some(stack.tls("ca.crt"));
        config.read_events.enabled = true;
        config.read_events.brokers = stack.sasl_ssl.clone();
        config.read_events.topic = topic.clone();
        config.read_events.security = KafkaSecurity {
            protocol: SecurityProtocol::SaslSsl,
            sasl_mechanism: Some(SaslMechanism::Plain),
            sasl_username: Some(stack.user.clone()),
            ca_file: Some(stack.tls("ca.crt")),
            ..KafkaSecurity::default()
        };
        config.read_events.sasl_password = Some(stack.password.clone().into());
    })
    .await;
    assert!(api.clickhouse.url.starts_with("https://"));
    api.insert(&[
        event("org_a", "evt_tls_1", BASE_MS),
        event("org_a", "evt_tls_2", BASE_MS + 1_000),
    ])
    .await;
    let key = api.key("org_a", Role::Admin).await;
    let (status, _, body) = api.get(&key, "limit=10").await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let page: Value = serde_json::from_slice(&body).unwrap();
    let ids: BTreeSet<String> = ids(&page).into_iter().collect();
    assert_eq!(
        ids,
        BTreeSet::from(["evt_tls_1".to_owned(), "evt_tls_2".to_owned()])
    );
    let (status, _, body) = api
        .get_path(&key, "/api/v1/organization/audit-logs/export", "format=csv")
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        String::from_utf8(body).unwrap().lines().count(),
        3,
        "header and two rows"
    );

    let consumer: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", audit_testkit::brokers())
        .set("group.id", format!("{topic}-reader"))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[&topic]).unwrap();
    let message = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
        .await
        .expect("the read event arrives over SASL_SSL")
        .unwrap();
    let published: Value = serde_json::from_slice(message.payload().unwrap()).unwrap();
    assert_eq!(published["organizationId"], "org_a");
    api.stop().await;
}

/// A wrong CA for ClickHouse's HTTPS, or a wrong SASL password for the read-event producer, stops
/// the start with a message that names the cause.
#[tokio::test]
async fn a_wrong_ca_or_password_stops_the_start_naming_the_cause() {
    use audit_runtime::kafka::{KafkaSecurity, SaslMechanism, SecurityProtocol};

    let stack = audit_testkit::SecureStack::from_env();
    let suffix = &uuid::Uuid::new_v4().simple().to_string()[..12];
    let mut config = ApiConfig {
        http_listen: "127.0.0.1:0".parse().unwrap(),
        clickhouse: ClickHouseConfig {
            url: stack.clickhouse_https.clone(),
            database: format!("audit_api_test_wrong_{suffix}"),
            ..ClickHouseConfig::default()
        },
        ..ApiConfig::default()
    };
    config.read_events.enabled = false;
    config.clickhouse.tls.ca_file = Some(stack.tls("other-ca.crt"));
    // The whole chain of causes, as the binary prints it.
    let chain = |err: audit_api::app::AppError| format!("{:#}", anyhow::Error::from(err));
    let err = chain(
        Application::build(config.clone())
            .await
            .err()
            .expect("refused: the server's certificate is not from the configured CA"),
    );
    assert!(err.contains("UnknownIssuer"), "{err}");

    config.clickhouse.tls.ca_file = Some(stack.tls("ca.crt"));
    config.read_events.enabled = true;
    config.read_events.brokers = stack.sasl_ssl.clone();
    config.read_events.security = KafkaSecurity {
        protocol: SecurityProtocol::SaslSsl,
        sasl_mechanism: Some(SaslMechanism::ScramSha256),
        sasl_username: Some(stack.user.clone()),
        ca_file: Some(stack.tls("ca.crt")),
        ..KafkaSecurity::default()
    };
    config.read_events.sasl_password = Some("wrong-password".to_owned().into());
    let started = Instant::now();
    let err = chain(
        Application::build(config)
            .await
            .err()
            .expect("refused: wrong password"),
    );
    assert!(started.elapsed() < Duration::from_secs(15));
    assert!(
        err.contains("SASL authentication error") && err.contains("SCRAM-SHA-256"),
        "{err}"
    );
    assert!(!err.contains("wrong-password"), "{err}");
    let _ = audit_testkit::drop_database(
        &ClickHouseConfig {
            url: clickhouse_url(),
            ..ClickHouseConfig::default()
        },
        &format!("audit_api_test_wrong_{suffix}"),
    )
    .await;
}
