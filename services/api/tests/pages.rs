//! Pages: sorting, filters, cursors, re-deliveries and the windows of months they read. Against the real ClickHouse of the local stack (`make up`); every test
//! gets its own database, its own keys and an in-process server on a free port.

mod common;

use common::*;

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
