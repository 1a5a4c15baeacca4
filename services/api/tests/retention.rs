//! Retention, legal holds and erasure on the real ClickHouse (and Kafka for the audit events of
//! the operator's changes): what every read path shows, what the retention job removes from
//! every table, what an erasure leaves of a person, and a crash in the middle of one.

mod common;

use audit_api::query::{Filters, SortOrder};
use audit_api::retention::commands::Operator;
use audit_api::retention::narrow;
use audit_api::store::{AuditLogStore, PageRequest};
use audit_store::retention::{Pseudonyms, Visibility};
use audit_store::{DirectoryUserRow, DIRECTORY_USERS_TABLE};
use common::streams::StreamsEnv;
use common::*;

const DAY_MS: i64 = 86_400_000;
const PSEUDONYM_KEY: &str = "test-pseudonym-key-0123456789abcdef";

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// The operator's side, on the API's database and Kafka topics.
fn operator(api: &TestApi, env: Option<&StreamsEnv>) -> Operator {
    let mut config = ApiConfig {
        clickhouse: api.clickhouse.clone(),
        ..ApiConfig::default()
    };
    config.read_events.enabled = false;
    if let Some(env) = env {
        env.tune(&mut config);
    }
    config.retention.default_days = audit_store::retention::MAX_DAYS;
    config.retention.pseudonym_key = Some(PSEUDONYM_KEY.to_owned().into());
    config.retention.erasure_settle_ms = 0;
    Operator::new(&config).unwrap()
}

/// The ids a JSON page, a CSV page, both exports and a cursor walk return for `query`, and
/// the page's total: every read path at once.
async fn every_read_path(api: &TestApi, key: &str, query: &str) -> Vec<(String, Vec<String>)> {
    let page = api.page(key, &format!("limit=1000&{query}")).await;
    let mut json = ids(&page);
    json.sort();
    let total = vec![page["total"].to_string()];
    let (status, _, csv) = api
        .get(key, &format!("limit=1000&format=csv&{query}"))
        .await;
    assert_eq!(status, StatusCode::OK);
    let mut csv_page = csv_ids(&csv);
    csv_page.sort();
    let (status, _, ndjson) = api
        .get_path(
            key,
            "/api/v1/organization/audit-logs/export",
            &format!("format=ndjson&{query}"),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let mut exported = ndjson_ids(&ndjson);
    exported.sort();
    let (status, _, export_csv) = api
        .get_path(
            key,
            "/api/v1/organization/audit-logs/export",
            &format!("format=csv&{query}"),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let mut exported_csv = csv_ids(&export_csv);
    exported_csv.sort();
    let mut walked = api.walk(key, &format!("limit=1&{query}")).await;
    walked.sort();
    vec![
        ("page".into(), json),
        ("total".into(), total),
        ("csv".into(), csv_page),
        ("export".into(), exported),
        ("export csv".into(), exported_csv),
        ("cursor".into(), walked),
    ]
}

fn csv_ids(body: &[u8]) -> Vec<String> {
    let mut reader = csv::Reader::from_reader(body);
    let headers = reader.headers().unwrap().clone();
    let at = headers.iter().position(|h| h == "id").unwrap();
    reader
        .records()
        .map(|r| r.unwrap().get(at).unwrap().to_owned())
        .collect()
}

fn expect(ids: &[&str]) -> Vec<(String, Vec<String>)> {
    let mut sorted: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
    sorted.sort();
    ["page", "total", "csv", "export", "export csv", "cursor"]
        .iter()
        .map(|path| {
            let value = if *path == "total" {
                vec![ids.len().to_string()]
            } else {
                sorted.clone()
            };
            (path.to_string(), value)
        })
        .collect()
}

/// Polls until `check` holds (the API re-reads retention every 200 ms in tests).
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(15);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Events at the edges of a hold, to the millisecond, and around the retention's cutoff.
fn edge_events(org: &str, now: i64) -> Vec<AuditEventRow> {
    let mut rows = vec![
        event(org, "before_hold", BASE_MS + 999),
        event(org, "hold_start", BASE_MS + 1_000),
        event(org, "hold_last", BASE_MS + 1_999),
        event(org, "hold_end", BASE_MS + 2_000),
        event(org, "expired", now - DAY_MS - 60_000),
        event(org, "fresh", now - DAY_MS + 60_000),
    ];
    for row in &mut rows {
        row.resource_id = "usr_target".into();
    }
    rows
}

#[tokio::test]
async fn expired_events_leave_every_read_path_and_a_hold_keeps_its_range_to_the_millisecond() {
    let api = TestApi::spawn("retention_reads").await;
    let operator = operator(&api, None);
    let now = now_ms();
    api.insert(&edge_events("org_r", now)).await;
    api.insert(&edge_events("org_other", now)).await;
    let key = api.key("org_r", Role::Admin).await;
    let other = api.key("org_other", Role::Admin).await;
    let all = [
        "before_hold",
        "hold_start",
        "hold_last",
        "hold_end",
        "expired",
        "fresh",
    ];
    assert_eq!(every_read_path(&api, &key, "").await, expect(&all));

    operator
        .admin
        .set_days("org_r", Some(1), "dpo@acme.example")
        .await
        .unwrap();
    operator
        .admin
        .place_hold(
            "org_r",
            Some(BASE_MS + 1_000),
            Some(BASE_MS + 2_000),
            "Case 2026-17",
            "legal@acme.example",
        )
        .await
        .unwrap();
    eventually("the retention to apply", || async {
        api.page(&key, "limit=10").await["total"] == 3
    })
    .await;
    let held = ["hold_start", "hold_last", "fresh"];
    assert_eq!(every_read_path(&api, &key, "").await, expect(&held));
    // Filters meet the held times: a range over the gap and the bound finds nothing more.
    assert_eq!(
        every_read_path(
            &api,
            &key,
            "from=2025-01-01T00:00:00.000Z&to=2025-01-01T00:00:02.001Z"
        )
        .await,
        expect(&["hold_start", "hold_last"])
    );
    assert_eq!(
        every_read_path(&api, &key, "resourceId=usr_target&eventType=user.created").await,
        expect(&held)
    );
    // Another organization keeps everything.
    assert_eq!(every_read_path(&api, &other, "").await, expect(&all));

    // The admin sees the retention, the oldest event held and the hold.
    let (status, _, body) = api
        .get_path(&key, "/api/v1/organization/audit-logs/retention", "")
        .await;
    assert_eq!(status, StatusCode::OK);
    let view: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(view["retentionDays"], 1);
    assert_eq!(view["source"], "organization");
    assert_eq!(view["oldestEventAt"], "2025-01-01T00:00:01.000Z");
    assert_eq!(view["legalHolds"][0]["reason"], "Case 2026-17");
    assert_eq!(view["legalHolds"][0]["from"], "2025-01-01T00:00:01.000Z");
    assert_eq!(view["legalHolds"][0]["to"], "2025-01-01T00:00:02.000Z");
    let (_, _, body) = api
        .get_path(&other, "/api/v1/organization/audit-logs/retention", "")
        .await;
    let other_view: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(other_view["source"], "default");
    assert_eq!(other_view["legalHolds"], serde_json::json!([]));
    assert_eq!(other_view["oldestEventAt"], "2025-01-01T00:00:00.999Z");

    // Lifting the hold resumes expiry.
    let hold_id = view["legalHolds"][0]["id"].as_str().unwrap().to_owned();
    operator
        .admin
        .lift_hold("org_r", &hold_id, "legal@acme.example")
        .await
        .unwrap();
    eventually("the lifted hold to apply", || async {
        api.page(&key, "limit=10").await["total"] == 1
    })
    .await;
    assert_eq!(every_read_path(&api, &key, "").await, expect(&["fresh"]));
    // Back to the default: everything again (nothing was removed: the job did not run).
    operator
        .admin
        .set_days("org_r", None, "dpo@acme.example")
        .await
        .unwrap();
    eventually("the default to apply", || async {
        api.page(&key, "limit=10").await["total"] == 6
    })
    .await;
    api.stop().await;
}

/// The store's read paths with a fixed clock: the cutoff itself, to the millisecond.
#[tokio::test]
async fn the_cutoff_is_exact_to_the_millisecond_in_pages_totals_and_exports() {
    let api = TestApi::spawn("retention_cutoff").await;
    let now = BASE_MS + 40 * DAY_MS;
    let cutoff = now - 30 * DAY_MS;
    api.insert(&[
        event("org_c", "a_minus_1", cutoff - 1),
        event("org_c", "b_at", cutoff),
        event("org_c", "c_plus_1", cutoff + 1),
    ])
    .await;
    let store = AuditLogStore::new(
        &api.clickhouse,
        &Default::default(),
        audit_api::metrics::ApiMetrics::new(),
    );
    let held = narrow(&Filters::default(), &Visibility::at(now, 30, &[]));
    let request = PageRequest {
        organization_id: "org_c",
        filters: &held,
        sort: SortOrder::Asc,
        limit: 10,
        offset: 0,
        cursor: None,
    };
    let page = store
        .page::<audit_api::render::EventItem>(&request, true)
        .await
        .unwrap();
    let ids: Vec<String> = page.keys.iter().map(|(_, id)| id.clone()).collect();
    assert_eq!(ids, ["b_at", "c_plus_1"]);
    assert_eq!(page.total, 2);
    assert_eq!(store.count("org_c", &held).await.unwrap(), (2, true));
    assert_eq!(store.oldest("org_c", &held).await.unwrap(), Some(cutoff));
    let mut rows = store
        .export("org_c", &held, SortOrder::Asc)
        .rows(held.from_ms, None, true)
        .unwrap();
    let mut exported = Vec::new();
    while let Some(row) = rows.next().await.unwrap() {
        exported.push(row.id.to_string());
    }
    assert_eq!(exported, ["b_at", "c_plus_1"]);
    api.stop().await;
}

/// Rows of `org` in every table that holds events or facts, checked in ClickHouse itself
/// (no FINAL: what is on disk).
async fn stored(api: &TestApi, org: &str) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let tables = std::iter::once(audit_store::EVENTS_TABLE)
        .chain(audit_store::COPY_TABLES.iter().map(|c| c.table))
        .chain([DIRECTORY_USERS_TABLE, audit_store::DIRECTORY_TEAMS_TABLE]);
    for table in tables {
        let n: u64 = api
            .client()
            .query(&format!(
                "SELECT count() FROM {table} WHERE organization_id = ?"
            ))
            .bind(org)
            .fetch_one()
            .await
            .unwrap();
        out.push((table.to_owned(), n));
    }
    out
}

async fn insert_directory(api: &TestApi, rows: &[DirectoryUserRow]) {
    let mut insert = api
        .client()
        .insert::<DirectoryUserRow>(DIRECTORY_USERS_TABLE)
        .await
        .unwrap();
    for row in rows {
        insert.write(row).await.unwrap();
    }
    insert.end().await.unwrap();
}

fn fact(org: &str, user: &str, email: &str, at_ms: i64) -> DirectoryUserRow {
    DirectoryUserRow {
        organization_id: org.into(),
        user_id: user.into(),
        email: email.into(),
        occurred_at_ms: at_ms,
        event_id: format!("evt_{user}"),
    }
}

#[tokio::test]
async fn the_job_removes_expired_events_from_every_table_and_never_what_a_hold_covers() {
    let env = StreamsEnv::new("retention_job").await;
    let api = env.api("retention_job").await;
    let operator = operator(&api, Some(&env));
    let now = now_ms();
    for org in ["org_p", "org_q"] {
        api.insert(&edge_events(org, now)).await;
        insert_directory(
            &api,
            &[
                fact(org, "usr_old", "old@acme.example", BASE_MS),
                fact(org, "usr_new", "new@acme.example", now - 1_000),
            ],
        )
        .await;
    }
    let before = stored(&api, "org_q").await;
    operator
        .admin
        .set_days("org_p", Some(1), "dpo@acme.example")
        .await
        .unwrap();
    let hold = operator
        .admin
        .place_hold(
            "org_p",
            Some(BASE_MS + 1_000),
            Some(BASE_MS + 2_000),
            "Case 17",
            "legal@acme.example",
        )
        .await
        .unwrap();

    let report = operator.job.purge(now_ms()).await.unwrap();
    let purged: Vec<(&str, u64)> = report
        .organizations
        .iter()
        .map(|o| (o.organization_id.as_str(), o.removed_events))
        .collect();
    assert_eq!(purged, [("org_p", 3)], "{report:?}");
    // Held: the hold's two events and the fresh one, in every table; the old fact is gone.
    let counts = stored(&api, "org_p").await;
    for (table, n) in &counts {
        let want = match table.as_str() {
            DIRECTORY_USERS_TABLE => 1,
            "directory_teams" => 0,
            _ => 3,
        };
        assert_eq!(*n, want, "{table}: {counts:?}");
    }
    let held_ids: Vec<String> = api
        .client()
        .query("SELECT id FROM audit_events WHERE organization_id = 'org_p' ORDER BY id")
        .fetch_all()
        .await
        .unwrap();
    assert_eq!(held_ids, ["fresh", "hold_last", "hold_start"]);
    // Nothing of another organization moved.
    assert_eq!(stored(&api, "org_q").await, before);

    // An erasure of someone in the held range is refused, and changes nothing.
    let refused = operator
        .erase("org_p", "usr_hold_start", "dpo@acme.example")
        .await;
    let message = refused.unwrap_err().to_string();
    assert!(
        message.contains("legal hold") && message.contains(&hold.hold_id),
        "{message}"
    );
    let email: Option<String> = api
        .client()
        .query("SELECT affected_user_email FROM audit_events WHERE id = 'hold_start' AND organization_id = 'org_p'")
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(email.as_deref(), Some("hold_start@acme.example"));

    // Lifted: the next run removes the range; a run after that finds nothing.
    operator
        .admin
        .lift_hold("org_p", &hold.hold_id, "legal@acme.example")
        .await
        .unwrap();
    let report = operator.job.purge(now_ms()).await.unwrap();
    assert_eq!(report.removed_events, 2);
    for (table, n) in stored(&api, "org_p").await {
        let want = match table.as_str() {
            DIRECTORY_USERS_TABLE => 1,
            "directory_teams" => 0,
            _ => 1,
        };
        assert_eq!(n, want, "{table}");
    }
    assert_eq!(
        operator.job.purge(now_ms()).await.unwrap().removed_events,
        0
    );
    assert_eq!(stored(&api, "org_q").await, before);

    // Each change is an audit event of the organization, naming who asked.
    let changes = env.changes();
    let types: Vec<&str> = changes
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        [
            "audit_log.retention_updated",
            "audit_log.legal_hold_placed",
            "audit_log.legal_hold_lifted"
        ]
    );
    assert_eq!(changes[0]["actor"]["name"], "dpo@acme.example");
    assert_eq!(changes[0]["changes"][0]["newValue"], 1);
    assert_eq!(changes[1]["metadata"]["reason"], "Case 17");
    api.stop().await;
}

/// The person to erase, someone else, and their events in one organization.
struct Cast {
    events: Vec<AuditEventRow>,
    erased: Vec<&'static str>,
}

fn cast(org: &str) -> Cast {
    let ada_old = "Ada.Lovelace@Corp.example";
    let ada_new = "ada@analytical.example";
    let mut events = Vec::new();
    for n in 0..6 {
        let mut row = event(org, &format!("ada_acts_{n}"), BASE_MS + n * 60_000);
        row.actor_id = "usr_ada".into();
        row.actor_email = Some(if n < 4 { ada_old } else { ada_new }.into());
        row.actor_name = Some("Ada Lovelace".into());
        row.context_ip = Some(
            if n % 2 == 0 {
                "198.51.100.23"
            } else {
                "198.51.100.99"
            }
            .into(),
        );
        row.context_user_agent = Some("AdaBrowser/1.0".into());
        row.resource_type = "team".into();
        row.resource_id = "team_engines".into();
        row.affected_user_id = None;
        row.affected_user_email = None;
        events.push(row);
    }
    let mut about = event(org, "bob_changes_ada", BASE_MS + 10 * 60_000);
    about.actor_id = "usr_bob".into();
    about.actor_email = Some("bob@corp.example".into());
    about.actor_name = Some("Bob Babbage".into());
    about.context_ip = Some("192.0.2.50".into());
    about.resource_id = "usr_ada".into();
    about.resource_name = Some(ada_old.into());
    about.affected_user_id = Some("usr_ada".into());
    about.affected_user_email = Some(ada_old.into());
    about.changes = format!(
        r#"[{{"field":"email","oldValue":"{ada_old}","newValue":"{ada_new}"}},{{"field":"role","oldValue":"member","newValue":"admin"}}]"#
    );
    events.push(about);
    let mut mention = event(org, "bob_invites", BASE_MS + 11 * 60_000);
    mention.actor_id = "usr_bob".into();
    mention.actor_email = Some("bob@corp.example".into());
    mention.actor_name = Some("Bob Babbage".into());
    mention.context_ip = Some("192.0.2.50".into());
    mention.resource_type = "team".into();
    mention.resource_id = "team_engines".into();
    mention.affected_user_id = Some("usr_carol".into());
    mention.affected_user_email = Some("carol@corp.example".into());
    mention.metadata = Some(r#"{"referredBy":"Ada Lovelace","source":"test"}"#.into());
    events.push(mention);
    for n in 0..3 {
        let mut row = event(org, &format!("bob_{n}"), BASE_MS + (20 + n) * 60_000);
        row.actor_id = "usr_bob".into();
        row.actor_email = Some("bob@corp.example".into());
        row.actor_name = Some("Bob Babbage".into());
        row.context_ip = Some("192.0.2.50".into());
        events.push(row);
    }
    Cast {
        events,
        erased: vec![
            "lovelace@corp.example",
            "ada@analytical.example",
            "Ada Lovelace",
            "198.51.100.23",
            "198.51.100.99",
            "AdaBrowser",
        ],
    }
}

/// (table, column) pairs of the database whose text holds `needle` in a row of `org` (every
/// table with an organization column), or anywhere (every other table), case-insensitively: on
/// every server of the layout (each shard's own tables too).
async fn search_everywhere(api: &TestApi, org: &str, needle: &str) -> Vec<(String, String)> {
    let mut found = BTreeSet::new();
    for server in audit_testkit::servers(&api.clickhouse) {
        let client = server.client();
        let columns: Vec<(String, String)> = client
            .query(
                "SELECT table, name FROM system.columns WHERE database = currentDatabase() \
                 AND table IN (SELECT name FROM system.tables WHERE database = currentDatabase() \
                 AND engine LIKE '%MergeTree%')",
            )
            .fetch_all()
            .await
            .unwrap();
        let with_org: BTreeSet<String> = columns
            .iter()
            .filter(|(_, name)| name == "organization_id")
            .map(|(table, _)| table.clone())
            .collect();
        for (table, column) in &columns {
            let scoped = with_org.contains(table);
            let scope = if scoped {
                "organization_id = ?"
            } else {
                "? != ''"
            };
            let n: u64 = client
                .query(&format!(
                    "SELECT count() FROM {table} WHERE {scope} \
                     AND positionCaseInsensitiveUTF8(toString({column}), ?) > 0"
                ))
                .bind(org)
                .bind(needle)
                .fetch_one()
                .await
                .unwrap();
            if n > 0 {
                found.insert((table.clone(), column.clone()));
            }
        }
    }
    found.into_iter().collect()
}

async fn erasure_fixture(name: &str) -> (StreamsEnv, TestApi, Cast) {
    let env = StreamsEnv::new(name).await;
    let api = env.api(name).await;
    let cast = cast("org_e");
    api.insert(&cast.events).await;
    // The same user id and email in another organization: another person, untouched.
    api.insert(&self::cast("org_other").events).await;
    insert_directory(
        &api,
        &[
            fact(
                "org_e",
                "usr_ada",
                "ada@analytical.example",
                BASE_MS + 5 * 60_000,
            ),
            fact("org_e", "usr_bob", "bob@corp.example", BASE_MS),
            fact("org_other", "usr_ada", "ada@analytical.example", BASE_MS),
        ],
    )
    .await;
    (env, api, cast)
}

async fn assert_erased(api: &TestApi, key: &str, cast: &Cast) {
    for needle in &cast.erased {
        assert_eq!(
            search_everywhere(api, "org_e", needle).await,
            Vec::<(String, String)>::new(),
            "{needle} is still stored"
        );
        // The other organization's person of the same id keeps everything.
        assert!(
            !search_everywhere(api, "org_other", needle).await.is_empty(),
            "{needle}"
        );
    }
    let p = Pseudonyms::new(PSEUDONYM_KEY.as_bytes(), "org_e", "usr_ada");
    // One pseudonym across the person's events; the same address keeps the same pseudonym.
    let page = api.page(key, "actorId=usr_ada&limit=100&sort=asc").await;
    let items = page["items"].as_array().unwrap().clone();
    assert_eq!(items.len(), 6);
    for item in &items {
        assert_eq!(item["actor"]["email"], p.email().as_str(), "{item}");
        assert_eq!(item["actor"]["name"], p.name().as_str());
        assert_eq!(item["context"]["userAgent"], p.user_agent().as_str());
    }
    let ips: BTreeSet<String> = items
        .iter()
        .map(|i| i["context"]["ip"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ips, [p.ip("198.51.100.23"), p.ip("198.51.100.99")].into());
    // Filtered by the pseudonym, the copy sorted by email finds them; by an old email, nothing.
    assert_eq!(
        api.page(key, &format!("actorEmail={}", p.email())).await["total"],
        6
    );
    assert_eq!(
        api.page(key, "actorEmail=ada@analytical.example").await["total"],
        0
    );
    // Bob's event about Ada: her values replaced, his and the rest kept.
    let page = api.page(key, "actorId=usr_bob&limit=100").await;
    let items = page["items"].as_array().unwrap().clone();
    assert_eq!(items.len(), 5);
    let about = items.iter().find(|i| i["id"] == "bob_changes_ada").unwrap();
    assert_eq!(about["actor"]["email"], "bob@corp.example");
    assert_eq!(about["context"]["ip"], "192.0.2.50");
    assert_eq!(about["affectedUser"]["email"], p.email().as_str());
    assert_eq!(about["resource"]["name"], p.email().as_str());
    assert_eq!(about["changes"][0]["oldValue"], p.email().as_str());
    assert_eq!(about["changes"][0]["newValue"], p.email().as_str());
    assert_eq!(about["changes"][1]["newValue"], "admin");
    let invite = items.iter().find(|i| i["id"] == "bob_invites").unwrap();
    assert_eq!(invite["metadata"]["referredBy"], p.name().as_str());
    assert_eq!(invite["metadata"]["source"], "test");
    assert_eq!(invite["affectedUser"]["email"], "carol@corp.example");
    // Every event is still there, with its id, type and time.
    assert_eq!(api.page(key, "limit=1").await["total"], 11);
}

#[tokio::test]
async fn an_erasure_leaves_a_stable_pseudonym_in_every_table_and_touches_no_one_else() {
    let (env, api, cast) = erasure_fixture("retention_erase").await;
    let operator = operator(&api, Some(&env));
    let key = api.key("org_e", Role::Admin).await;
    let done = operator
        .erase("org_e", "usr_ada", "dpo@acme.example")
        .await
        .unwrap();
    assert_eq!(done.state, "done");
    // Her six events, Bob's change of her, and Bob's invite that names her.
    assert_eq!(done.events, 8);
    assert_erased(&api, &key, &cast).await;
    // Run again: nothing changes, the same pseudonyms.
    let again = operator
        .erase("org_e", "usr_ada", "dpo@acme.example")
        .await
        .unwrap();
    assert_eq!(again.state, "done");
    assert_erased(&api, &key, &cast).await;
    // The erasure is an audit event: who asked, whom, how many events; never the values.
    let changes = env.changes();
    let erased = changes
        .iter()
        .find(|e| e["type"] == "audit_log.subject_erased")
        .expect("the erasure's audit event");
    assert_eq!(erased["actor"]["name"], "dpo@acme.example");
    assert_eq!(
        erased["resource"],
        serde_json::json!({"type": "user", "id": "usr_ada"})
    );
    assert_eq!(erased["metadata"]["events"], 8);
    let text = erased.to_string();
    for needle in ["lovelace", "analytical", "198.51.100"] {
        assert!(!text.to_lowercase().contains(needle), "{text}");
    }
    api.stop().await;
}

#[tokio::test]
async fn an_erasure_cut_short_is_finished_by_the_next_run() {
    let (env, api, cast) = erasure_fixture("retention_crash").await;
    let operator = operator(&api, Some(&env));
    let key = api.key("org_e", Role::Admin).await;
    // A process that died after the events were rewritten, before the directory and the
    // copies sorted by email were.
    let cut = operator
        .eraser()
        .erase_until("org_e", "usr_ada", "dpo@acme.example", 2)
        .await
        .unwrap();
    assert_eq!(cut.state, "running");
    assert!(!search_everywhere(&api, "org_e", "ada@analytical.example")
        .await
        .is_empty());
    let listed = operator.erasures("org_e").await.unwrap();
    assert_eq!(listed["data"][0]["state"], "running");
    // The next retention run finishes it.
    let finished = operator.eraser().resume_all().await.unwrap();
    assert_eq!(finished.len(), 1);
    assert_eq!(finished[0].erasure_id, cut.erasure_id);
    assert_eq!(finished[0].state, "done");
    assert_eq!(finished[0].events, 8);
    assert_erased(&api, &key, &cast).await;
    assert!(operator.eraser().resume_all().await.unwrap().is_empty());
    api.stop().await;
}
