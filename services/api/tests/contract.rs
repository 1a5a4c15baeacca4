//! The published contract: bad input, bound values, the OpenAPI document and the error answers. Against the real ClickHouse of the local stack (`make up`); every test
//! gets its own database, its own keys and an in-process server on a free port.

mod common;

use common::*;

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
    // The retention view, with and without a legal hold.
    let retention = validator("Retention");
    let path = "/api/v1/organization/audit-logs/retention";
    let (status, _, body) = api.get_path(&key, path, "").await;
    assert_eq!(status, StatusCode::OK);
    let body: Value = serde_json::from_slice(&body).unwrap();
    let problems: Vec<String> = retention
        .iter_errors(&body)
        .map(|e| e.to_string())
        .collect();
    assert!(problems.is_empty(), "{body}: {problems:?}");
    audit_store::retention::write_hold(
        &api.client(),
        &audit_store::retention::HoldRow {
            organization_id: "org_a".into(),
            hold_id: "hold_1".into(),
            version: 1,
            from_ms: Some(BASE_MS),
            to_ms: None,
            reason: "Case 1".into(),
            placed_by: "legal".into(),
            placed_at_ms: BASE_MS,
            lifted_by: String::new(),
            lifted_at_ms: None,
        },
    )
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, _, body) = api.get_path(&key, path, "").await;
        let body: Value = serde_json::from_slice(&body).unwrap();
        if body["legalHolds"].as_array().is_some_and(|h| !h.is_empty()) {
            let problems: Vec<String> = retention
                .iter_errors(&body)
                .map(|e| e.to_string())
                .collect();
            assert!(problems.is_empty(), "{body}: {problems:?}");
            break;
        }
        assert!(Instant::now() < deadline, "the hold never showed: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
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
    // Before the retention is known, reads are refused: they could show expired events.
    let router = audit_api::routes::router(state.clone());
    use tower::ServiceExt;
    let request = axum::http::Request::get("/api/v1/organization/audit-logs")
        .header("X-API-Key", &key)
        .body(axum::body::Body::empty())
        .unwrap();
    let response = router.oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(response.headers().contains_key("retry-after"));
    let (error, _) = error_body(response).await;
    assert_eq!(error["error"]["code"], "not_ready");
    state.retention.refresh(&api.client()).await.unwrap();
    let router = audit_api::routes::router(state);
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
