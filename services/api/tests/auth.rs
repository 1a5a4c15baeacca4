//! Who may read what: keys, roles, organizations and request budgets. Against the real ClickHouse of the local stack (`make up`); every test
//! gets its own database, its own keys and an in-process server on a free port.

mod common;

use common::*;

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
    // The admin key's row holds the SHA-256 of the whole key, and no row of either key table
    // holds its secret.
    use sha2::Digest;
    let digest = hex::encode(sha2::Sha256::digest(admin.as_bytes()));
    let with_digest: u64 = api
        .client()
        .query("SELECT count() FROM api_keys FINAL WHERE secret_sha256 = ?")
        .bind(&digest)
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(with_digest, 1);
    let (_, secret) = admin["alk_".len()..].split_once('_').unwrap();
    for table in ["api_keys", "api_key_usage"] {
        let rows: Vec<String> = api
            .client()
            .query(&format!("SELECT toString(tuple(*)) FROM {table}"))
            .fetch_all()
            .await
            .unwrap();
        assert!(table != "api_keys" || rows.len() >= 2, "{table}: {rows:?}");
        assert!(rows.iter().all(|row| !row.contains(secret)), "{table}");
    }
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
