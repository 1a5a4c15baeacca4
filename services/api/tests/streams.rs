//! Log streams end to end: the management API (in process), the stream worker (a child process),
//! a stored-events topic on the real Kafka fed as the ingest feeds it, real ClickHouse, and local
//! receivers speaking each destination's intake protocol.

mod common;

use common::streams::{Intake, Mode, Receiver, StreamsEnv, WorkerProcess};
use common::*;
use serde_json::json;

async fn send(
    api: &TestApi,
    method: reqwest::Method,
    key: &str,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let (path, query) = path.split_once('?').unwrap_or((path, ""));
    let mut request = api
        .http
        .request(method, api.url(path, query))
        .header("x-api-key", key);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    let text = response.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

const STREAMS: &str = "/api/v1/organization/audit-log-streams";

async fn create(api: &TestApi, key: &str, body: Value) -> Value {
    let (status, created) = send(api, reqwest::Method::POST, key, STREAMS, Some(body)).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    created
}

async fn stream(api: &TestApi, key: &str, id: &str) -> Value {
    let (status, body) = send(
        api,
        reqwest::Method::GET,
        key,
        &format!("{STREAMS}/{id}"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

/// Polls the stream until `check` holds.
async fn wait_stream(
    api: &TestApi,
    key: &str,
    id: &str,
    what: &str,
    check: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let view = stream(api, key, id).await;
        if check(&view) {
            return view;
        }
        assert!(Instant::now() < deadline, "{what}: {view}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn webhook(name: &str, receiver: &Receiver) -> Value {
    json!({"name": name, "destination": {"type": "webhook", "url": receiver.url()}})
}

/// Distinct events of `org`, `count` of them, with ids `<org>-<n>`.
fn events(org: &str, count: usize) -> Vec<AuditEventRow> {
    series(org, count)
        .into_iter()
        .enumerate()
        .map(|(n, mut row)| {
            row.id = format!("{org}-{n:05}");
            row
        })
        .collect()
}

fn ids(rows: &[AuditEventRow]) -> Vec<String> {
    rows.iter().map(|r| r.id.clone()).collect()
}

/// Runs the independent verifier over `(headers, body)` pairs: per request, whether each of
/// `secrets` verifies it.
fn verify(
    captured: &[(std::collections::BTreeMap<String, String>, Vec<u8>)],
    secrets: &[&str],
) -> Vec<Vec<bool>> {
    use base64::Engine;
    let command = std::env::var("AUDIT_TEST_WEBHOOK_VERIFIER").expect(
        "AUDIT_TEST_WEBHOOK_VERIFIER is unset: run the tests through `make test` (deploy/local/test.sh)",
    );
    let cases: Vec<Value> = captured
        .iter()
        .map(|(headers, body)| {
            json!({
                "headers": headers,
                "body": base64::engine::general_purpose::STANDARD.encode(body),
                "secrets": secrets,
            })
        })
        .collect();
    let file = std::env::temp_dir().join(format!("webhooks-{}.json", uuid::Uuid::new_v4()));
    std::fs::write(&file, serde_json::to_vec(&cases).unwrap()).unwrap();
    let mut parts = command.split_whitespace();
    let output = std::process::Command::new(parts.next().unwrap())
        .args(parts)
        .arg(&file)
        .output()
        .expect("the webhook verifier runs");
    let _ = std::fs::remove_file(&file);
    assert!(
        output.status.success(),
        "verifier failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_reaches_its_organizations_streams_once_in_order_signed_and_filtered() {
    let env = StreamsEnv::new("deliver").await;
    let api = env.api("streams_deliver").await;
    let acme = api.key("org_acme", Role::Admin).await;
    let globex = api.key("org_globex", Role::Admin).await;
    let (all, filtered, other) = (
        Receiver::start(Intake::Webhook).await,
        Receiver::start(Intake::Webhook).await,
        Receiver::start(Intake::Webhook).await,
    );
    let everything = create(&api, &acme, webhook("everything", &all)).await;
    let secret = everything["secret"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("whsec_"));
    let mut body = webhook("team changes by users", &filtered);
    body["filters"] = json!({"eventTypes": ["team_member.*"], "actorTypes": ["user"]});
    create(&api, &acme, body).await;
    create(&api, &globex, webhook("globex", &other)).await;
    // Shown once: never again.
    let (_, listed) = send(&api, reqwest::Method::GET, &acme, STREAMS, None).await;
    assert_eq!(listed["data"].as_array().unwrap().len(), 2, "{listed}");
    assert!(!listed.to_string().contains(&secret));

    let _worker = WorkerProcess::spawn(&env, &api, &[]).await;
    let mut acme_rows = events("org_acme", 600);
    for (n, row) in acme_rows.iter_mut().enumerate() {
        if n % 7 == 0 {
            row.actor_type = "api_key".into();
        }
    }
    let globex_rows = events("org_globex", 300);
    for chunk in 0..3 {
        env.publish(&acme_rows[chunk * 200..(chunk + 1) * 200])
            .await;
        env.publish(&globex_rows[chunk * 100..(chunk + 1) * 100])
            .await;
    }
    let wanted = ids(&acme_rows);
    let got = all.wait_for(&wanted, Duration::from_secs(60)).await;
    assert_eq!(got, wanted, "each once, in the order stored");
    let wanted_filtered: Vec<String> = acme_rows
        .iter()
        .filter(|r| r.event_type.starts_with("team_member.") && r.actor_type == "user")
        .map(|r| r.id.clone())
        .collect();
    assert!(!wanted_filtered.is_empty() && wanted_filtered.len() < wanted.len());
    assert_eq!(
        filtered
            .wait_for(&wanted_filtered, Duration::from_secs(30))
            .await,
        wanted_filtered
    );
    assert_eq!(
        other
            .wait_for(&ids(&globex_rows), Duration::from_secs(30))
            .await,
        ids(&globex_rows)
    );
    // The JSON item of the read API, and nothing of another organization.
    let first = &all.events()[0];
    assert_eq!(first["id"], "org_acme-00000");
    assert_eq!(first["eventType"], "team_member.added");
    assert!(first["timestamp"].as_str().unwrap().ends_with('Z'));
    assert!(!all.ids().iter().any(|id| id.starts_with("org_globex")));

    // Signatures verify with the reference implementation, and a tampered body does not.
    let mut requests: Vec<_> = all
        .captured()
        .into_iter()
        .filter(|c| c.accepted)
        .map(|c| (c.headers, c.body))
        .collect();
    let count = requests.len();
    assert!(count >= 1);
    let mut tampered = requests[0].clone();
    tampered.1 = String::from_utf8(tampered.1)
        .unwrap()
        .replace("org_acme-00000", "org_acme-99999")
        .into_bytes();
    requests.push(tampered);
    let verdicts = verify(&requests, &[&secret]);
    assert_eq!(verdicts.len(), count + 1);
    assert!(
        verdicts[..count].iter().all(|v| v == &vec![true]),
        "{verdicts:?}"
    );
    assert_eq!(verdicts[count], vec![false]);

    // Health: active, delivered, caught up.
    let id = everything["id"].as_str().unwrap();
    let view = wait_stream(&api, &acme, id, "delivered count", |v| {
        v["deliveredEvents"] == 600
    })
    .await;
    assert_eq!(view["state"], "active");
    assert!(view["lastDeliveredAt"].is_string());
    assert_eq!(view["lag"]["seconds"], 0.0);
    assert!(view["lastError"].is_null());

    // Every change was an audit event of its organization, without the secret.
    let changes = env.changes();
    let created: Vec<&Value> = changes
        .iter()
        .filter(|e| e["type"] == "audit_log_stream.created")
        .collect();
    assert_eq!(created.len(), 3, "{changes:?}");
    assert!(created.iter().any(
        |e| e["organizationId"] == "org_globex" && e["resource"]["type"] == "audit_log_stream"
    ));
    assert!(created.iter().all(|e| e["actor"]["type"] == "api_key"));
    assert!(!serde_json::to_string(&changes).unwrap().contains(&secret));
    for change in &changes {
        audit_event::AuditEvent::from_slice(&serde_json::to_vec(change).unwrap())
            .unwrap_or_else(|err| panic!("{change}: {err}"));
    }
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_organization_cannot_see_or_touch_anothers_streams_and_secrets_stay_hidden() {
    let env = StreamsEnv::new("tenancy").await;
    let api = env.api("streams_tenancy").await;
    let acme = api.key("org_acme", Role::Admin).await;
    let globex = api.key("org_globex", Role::Admin).await;
    let hec = Receiver::start(Intake::Hec {
        token: "hec-token-0123".into(),
        acks: false,
    })
    .await;
    let created = create(
        &api,
        &acme,
        json!({"name": "splunk", "destination": {"type": "splunk_hec", "url": hec.url(), "token": "hec-token-0123"}}),
    )
    .await;
    let id = created["id"].as_str().unwrap();
    assert!(!created.to_string().contains("hec-token-0123"));
    assert!(created.get("secret").is_none());
    let path = format!("{STREAMS}/{id}");
    use reqwest::Method;
    for (method, path, body) in [
        (Method::GET, path.clone(), None),
        (Method::PATCH, path.clone(), Some(json!({"paused": true}))),
        (Method::DELETE, path.clone(), None),
        (Method::POST, format!("{path}/test"), None),
        (
            Method::POST,
            format!("{path}/replay?from=2026-01-01T00:00:00Z"),
            None,
        ),
        (
            Method::POST,
            format!("{path}/rotate-secret"),
            Some(json!({})),
        ),
    ] {
        let (status, answer) = send(&api, method.clone(), &globex, &path, body).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{method} {path}: {answer}");
        assert_eq!(answer["error"]["code"], "stream_not_found");
    }
    let (_, theirs) = send(&api, Method::GET, &globex, STREAMS, None).await;
    assert_eq!(theirs["data"], json!([]));
    // Still there, unpaused, for its own organization.
    let view = stream(&api, &acme, id).await;
    assert_eq!(view["paused"], false);
    assert!(!view.to_string().contains("hec-token-0123"));
    // Only admins manage streams.
    let member = api.key("org_acme", Role::Member).await;
    let (status, _) = send(&api, Method::GET, &member, STREAMS, None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = send(&api, Method::GET, "nope", STREAMS, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // Bad bodies name the field.
    for (body, field) in [
        (
            json!({"name": "x", "destination": {"type": "webhook", "url": "ftp://x"}}),
            "destination.url",
        ),
        (
            json!({"name": "x", "destination": {"type": "carrier_pigeon"}}),
            "destination",
        ),
        (
            json!({"name": "x", "destination": {"type": "splunk_hec", "url": "http://127.0.0.1:9"}}),
            "destination.token",
        ),
        (
            json!({"name": "", "destination": {"type": "webhook", "url": "http://127.0.0.1:9/"}}),
            "name",
        ),
        (
            json!({"name": "x", "destination": {"type": "webhook", "url": "http://127.0.0.1:9/"}, "filters": {"eventTypes": ["Bad Type"]}}),
            "filters.eventTypes",
        ),
        (
            json!({"name": "x", "destination": {"type": "webhook", "url": "http://127.0.0.1:9/"}, "colour": "red"}),
            "colour",
        ),
    ] {
        let (status, answer) = send(&api, Method::POST, &acme, STREAMS, Some(body.clone())).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {answer}");
        assert_eq!(answer["error"]["field"], field, "{body}: {answer}");
        assert!(!answer.to_string().contains("SELECT"));
    }
    // Not JSON at all.
    let response = api
        .http
        .post(api.url(STREAMS, ""))
        .header("x-api-key", &acme)
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    // The test endpoint reaches the destination and reports its answer.
    let (status, tested) = send(&api, Method::POST, &acme, &format!("{path}/test"), None).await;
    assert_eq!(status, StatusCode::OK, "{tested}");
    assert_eq!(tested["delivered"], true, "{tested}");
    assert_eq!(tested["status"], 200);
    let sent = hec.events();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0]["eventType"], "audit_log_stream.test");
    hec.set_mode(Mode::Status(503, None));
    let (_, tested) = send(&api, Method::POST, &acme, &format!("{path}/test"), None).await;
    assert_eq!(tested["delivered"], false, "{tested}");
    assert_eq!(tested["status"], 503);
    // Deleted: gone for its organization too.
    let (status, _) = send(&api, Method::DELETE, &acme, &path, None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = send(&api, Method::GET, &acme, &path, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let kinds: Vec<String> = env
        .changes()
        .iter()
        .map(|e| e["type"].as_str().unwrap().to_owned())
        .filter(|kind| kind.starts_with("audit_log_stream."))
        .collect();
    assert_eq!(
        kinds,
        ["audit_log_stream.created", "audit_log_stream.deleted"],
        "refused requests change nothing"
    );
    api.stop().await;
}
