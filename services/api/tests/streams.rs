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

/// Fails unless `value` is valid under the OpenAPI document's schema `name`.
fn conforms(name: &str, value: &Value) {
    let document: Value = serde_json::from_str(include_str!(
        "../../../schemas/openapi/audit-logs.openapi.json"
    ))
    .unwrap();
    let mut schema = json!({"$ref": format!("#/components/schemas/{name}")});
    schema["components"] = document["components"].clone();
    let validator = jsonschema::draft202012::options()
        .should_validate_formats(true)
        .build(&schema)
        .unwrap();
    let problems: Vec<String> = validator
        .iter_errors(value)
        .map(|e| e.to_string())
        .collect();
    assert!(problems.is_empty(), "{name}: {problems:?}\n{value}");
}

async fn create(api: &TestApi, key: &str, body: Value) -> Value {
    let (status, created) = send(api, reqwest::Method::POST, key, STREAMS, Some(body)).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    conforms("LogStream", &created);
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
    conforms("LogStream", &body);
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
    conforms("LogStreamList", &listed);
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
        conforms("Error", &answer);
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
    conforms("LogStreamTest", &tested);
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

/// Publishes `rows` in slices of `per_tick` every 100 ms until all are out.
fn trickle(
    env: &StreamsEnv,
    rows: Vec<AuditEventRow>,
    per_tick: usize,
) -> tokio::task::JoinHandle<()> {
    let env = env.clone();
    tokio::spawn(async move {
        for chunk in rows.chunks(per_tick) {
            env.publish(chunk).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_failing_every_way_loses_nothing_keeps_order_and_holds_back_no_other() {
    let env = StreamsEnv::new("failures").await;
    let api = env.api("streams_failures").await;
    let acme = api.key("org_acme", Role::Admin).await;
    let globex = api.key("org_globex", Role::Admin).await;
    let mut flaky = Receiver::start(Intake::Webhook).await;
    let (steady, elsewhere) = (
        Receiver::start(Intake::Webhook).await,
        Receiver::start(Intake::Webhook).await,
    );
    let flaky_stream = create(&api, &acme, webhook("flaky", &flaky)).await;
    let flaky_id = flaky_stream["id"].as_str().unwrap().to_owned();
    create(&api, &acme, webhook("steady", &steady)).await;
    create(&api, &globex, webhook("elsewhere", &elsewhere)).await;
    let worker = WorkerProcess::spawn(&env, &api, &[]).await;

    // Events keep arriving through every phase: 40 a second per organization.
    let acme_rows = events("org_acme", 800);
    let globex_rows = events("org_globex", 800);
    let publisher = trickle(&env, acme_rows.clone(), 4);
    let other_publisher = trickle(&env, globex_rows.clone(), 4);

    // 500s: retried; after failing_after_ms (2 s) the stream says so, with the answer.
    flaky.set_mode(Mode::Status(500, None));
    let failing = wait_stream(&api, &acme, &flaky_id, "failing after 500s", |v| {
        v["state"] == "failing"
    })
    .await;
    assert_eq!(failing["lastError"]["status"], 500, "{failing}");
    assert!(failing["lastError"]["message"]
        .as_str()
        .unwrap()
        .contains("receiver answers 500"));
    assert!(
        failing["lag"]["seconds"].as_f64().unwrap() > 1.0,
        "{failing}"
    );
    // Meanwhile the same organization's other stream, and another's, keep up.
    let published_so_far = ids(&acme_rows[..40]);
    steady
        .wait_for(&published_so_far, Duration::from_secs(5))
        .await;
    elsewhere
        .wait_for(&ids(&globex_rows[..40]), Duration::from_secs(5))
        .await;

    // 429 with Retry-After: 2 s: no attempt sooner than that.
    flaky.set_mode(Mode::Status(429, Some(2)));
    let since = Instant::now();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let refused: Vec<Instant> = flaky
        .captured()
        .iter()
        .filter(|c| !c.accepted && c.at > since)
        .map(|c| c.at)
        .collect();
    let throttled: Vec<Duration> = refused.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(!throttled.is_empty(), "no retries while throttled");
    assert!(
        throttled
            .iter()
            .all(|gap| *gap >= Duration::from_millis(1_900)),
        "Retry-After not honoured: {throttled:?}"
    );

    // A destination that never answers (the request times out after 2 s), then one that is down.
    flaky.set_mode(Mode::Hang);
    tokio::time::sleep(Duration::from_secs(5)).await;
    flaky.down();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let down = stream(&api, &acme, &flaky_id).await;
    assert_eq!(down["state"], "failing", "{down}");
    assert!(down["lastError"]["status"].is_null(), "no answer: {down}");
    let rss = audit_testkit::proc_status_kb(worker.pid(), "VmRSS").unwrap();
    assert!(rss < 150 * 1024, "worker RSS {rss} kB during the outage");

    // Back: everything arrives, each once, in order; the stream is active again.
    flaky.set_mode(Mode::Accept);
    flaky.up().await;
    publisher.await.unwrap();
    other_publisher.await.unwrap();
    let wanted = ids(&acme_rows);
    assert_eq!(
        flaky.wait_for(&wanted, Duration::from_secs(60)).await,
        wanted
    );
    assert_eq!(
        steady.wait_for(&wanted, Duration::from_secs(30)).await,
        wanted
    );
    assert_eq!(
        elsewhere
            .wait_for(&ids(&globex_rows), Duration::from_secs(30))
            .await,
        ids(&globex_rows)
    );
    let healthy = wait_stream(&api, &acme, &flaky_id, "active again", |v| {
        v["state"] == "active" && v["deliveredEvents"] == 800
    })
    .await;
    assert_eq!(healthy["lag"]["seconds"], 0.0, "{healthy}");
    let metrics = worker.get("/metrics").await.1;
    assert!(metrics.contains("audit_stream_deliveries_total{kind=\"webhook\",outcome=\"retry\"}"));
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_destination_puts_the_stream_in_error_until_its_settings_change() {
    let env = StreamsEnv::new("refused").await;
    let api = env.api("streams_refused").await;
    let acme = api.key("org_acme", Role::Admin).await;
    let datadog = Receiver::start(Intake::Datadog {
        api_key: "dd-right-key".into(),
    })
    .await;
    let created = create(
        &api,
        &acme,
        json!({"name": "datadog", "format": "ocsf", "destination": {
            "type": "datadog", "url": datadog.url(), "apiKey": "dd-wrong-key",
            "ddtags": "env:test,team:security"}}),
    )
    .await;
    let id = created["id"].as_str().unwrap().to_owned();
    // And a webhook that answers 400 to everything.
    let picky = Receiver::start(Intake::Webhook).await;
    picky.set_mode(Mode::Status(400, None));
    let picky_id = create(&api, &acme, webhook("picky", &picky)).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let _worker = WorkerProcess::spawn(&env, &api, &[]).await;
    let rows = events("org_acme", 2_500);
    env.publish(&rows[..1_000]).await;
    let bad_request = wait_stream(&api, &acme, &picky_id, "error after a 400", |v| {
        v["state"] == "error"
    })
    .await;
    assert_eq!(bad_request["lastError"]["status"], 400, "{bad_request}");
    assert!(bad_request["lastError"]["message"]
        .as_str()
        .unwrap()
        .contains("receiver answers 400"));
    assert_eq!(picky.captured().len(), 1, "a 400 is not retried");
    let refused = wait_stream(&api, &acme, &id, "error after a 403", |v| {
        v["state"] == "error"
    })
    .await;
    assert_eq!(refused["lastError"]["status"], 403, "{refused}");
    assert!(refused["lastError"]["message"]
        .as_str()
        .unwrap()
        .contains("Forbidden"));
    assert!(!refused.to_string().contains("dd-wrong-key"));
    // It stopped: no more attempts while in error, even as events arrive.
    env.publish(&rows[1_000..]).await;
    let attempts = datadog.captured().len();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        datadog.captured().len(),
        attempts,
        "retried a refused request"
    );
    // The right key: it resumes where it stopped.
    let (status, _) = send(
        &api,
        reqwest::Method::PATCH,
        &acme,
        &format!("{STREAMS}/{id}"),
        Some(json!({"destination": {"type": "datadog", "url": datadog.url(), "apiKey": "dd-right-key", "ddtags": "env:test,team:security"}})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let wanted = ids(&rows);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let events = datadog.events();
        let got: Vec<String> = events
            .iter()
            .map(|e| e["metadata"]["uid"].as_str().unwrap().to_owned())
            .collect();
        if got.len() >= wanted.len() {
            assert_eq!(got, wanted);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {}",
            got.len(),
            wanted.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // OCSF, within Datadog's limits, with the stream's tags.
    let first = &datadog.events()[0];
    assert_eq!(first["class_uid"], 3006, "{first}");
    assert_eq!(first["metadata"]["tenant_uid"], "org_acme");
    for request in datadog.captured().iter().filter(|c| c.accepted) {
        let entries: Vec<Value> = serde_json::from_slice(&request.body).unwrap();
        assert!(entries.len() <= 1_000);
        assert_eq!(entries[0]["ddtags"], "env:test,team:security");
        assert_eq!(entries[0]["ddsource"], "audit-logs");
    }
    wait_stream(&api, &acme, &id, "active", |v| {
        v["state"] == "active" && v["lastError"].is_object()
    })
    .await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_sends_again_from_a_time() {
    let env = StreamsEnv::new("replay").await;
    let api = env.api("streams_replay").await;
    let acme = api.key("org_acme", Role::Admin).await;
    let receiver = Receiver::start(Intake::Webhook).await;
    let created = create(&api, &acme, webhook("siem", &receiver)).await;
    let id = created["id"].as_str().unwrap().to_owned();
    let _worker = WorkerProcess::spawn(&env, &api, &[]).await;
    let rows = events("org_acme", 150);
    env.publish(&rows[..100]).await;
    receiver
        .wait_for(&ids(&rows[..100]), Duration::from_secs(30))
        .await;
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let middle = chrono::Utc::now();
    env.publish(&rows[100..]).await;
    let once = ids(&rows);
    assert_eq!(
        receiver.wait_for(&once, Duration::from_secs(30)).await,
        once
    );

    let path = format!(
        "{STREAMS}/{id}/replay?from={}",
        middle.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    );
    let (status, view) = send(&api, reqwest::Method::POST, &acme, &path, None).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{view}");
    // Only what was stored since `from`, again, in order.
    let mut twice = once.clone();
    twice.extend(ids(&rows[100..]));
    let deadline = Instant::now() + Duration::from_secs(30);
    while receiver.ids().len() < twice.len() {
        assert!(
            Instant::now() < deadline,
            "{} of {}",
            receiver.ids().len(),
            twice.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(receiver.ids(), twice);
    // A time to come re-sends nothing and changes nothing.
    let future = format!("{STREAMS}/{id}/replay?from=2999-01-01T00:00:00Z");
    let (status, _) = send(&api, reqwest::Method::POST, &acme, &future, None).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let (status, answer) = send(
        &api,
        reqwest::Method::POST,
        &acme,
        &format!("{STREAMS}/{id}/replay?from=yesterday"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(answer["error"]["parameter"], "from", "{answer}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(receiver.ids(), twice);
    let kinds: Vec<Value> = env
        .changes()
        .into_iter()
        .map(|e| e["type"].clone())
        .collect();
    assert!(kinds.contains(&json!("audit_log_stream.replay_requested")));
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_secret_is_sent_beside_the_old_one_for_the_overlap_only() {
    let env = StreamsEnv::new("rotate").await;
    let api = env.api("streams_rotate").await;
    let acme = api.key("org_acme", Role::Admin).await;
    let receiver = Receiver::start(Intake::Webhook).await;
    let created = create(&api, &acme, webhook("siem", &receiver)).await;
    let id = created["id"].as_str().unwrap().to_owned();
    let first = created["secret"].as_str().unwrap().to_owned();
    let _worker = WorkerProcess::spawn(&env, &api, &[]).await;
    let rows = events("org_acme", 30);
    let requests = |receiver: &Receiver, from: usize| -> Vec<_> {
        receiver
            .captured()
            .into_iter()
            .filter(|c| c.accepted)
            .skip(from)
            .map(|c| (c.headers, c.body))
            .collect()
    };

    env.publish(&rows[..10]).await;
    receiver
        .wait_for(&ids(&rows[..10]), Duration::from_secs(30))
        .await;
    let before = requests(&receiver, 0);
    assert!(verify(&before, &[&first]).iter().all(|v| v == &vec![true]));

    let rotate = format!("{STREAMS}/{id}/rotate-secret");
    let (status, rotated) = send(
        &api,
        reqwest::Method::POST,
        &acme,
        &rotate,
        Some(json!({"overlapSeconds": 3600})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{rotated}");
    let second = rotated["secret"].as_str().unwrap().to_owned();
    assert_ne!(second, first);
    assert!(rotated["previousSecretExpiresAt"].is_string(), "{rotated}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    env.publish(&rows[10..20]).await;
    receiver
        .wait_for(&ids(&rows[..20]), Duration::from_secs(30))
        .await;
    let during = requests(&receiver, before.len());
    assert!(!during.is_empty());
    assert!(
        verify(&during, &[&first, &second])
            .iter()
            .all(|v| v == &vec![true, true]),
        "both secrets sign during the overlap"
    );

    let (_, third) = send(
        &api,
        reqwest::Method::POST,
        &acme,
        &rotate,
        Some(json!({"overlapSeconds": 0})),
    )
    .await;
    let third = third["secret"].as_str().unwrap().to_owned();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let seen = requests(&receiver, 0).len();
    env.publish(&rows[20..]).await;
    receiver
        .wait_for(&ids(&rows), Duration::from_secs(30))
        .await;
    let after = requests(&receiver, seen);
    assert!(!after.is_empty());
    assert!(
        verify(&after, &[&first, &second, &third])
            .iter()
            .all(|v| v == &vec![false, false, true]),
        "no overlap: only the newest secret signs"
    );
    let (_, too_long) = send(
        &api,
        reqwest::Method::POST,
        &acme,
        &rotate,
        Some(json!({"overlapSeconds": 100_000_000})),
    )
    .await;
    assert_eq!(too_long["error"]["field"], "overlapSeconds", "{too_long}");
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn splunk_hec_with_indexer_acknowledgement_receives_every_event() {
    let env = StreamsEnv::new("hec").await;
    let api = env.api("streams_hec").await;
    let acme = api.key("org_acme", Role::Admin).await;
    let hec = Receiver::start(Intake::Hec {
        token: "11111111-2222-3333-4444-555555555555".into(),
        acks: true,
    })
    .await;
    let created = create(
        &api,
        &acme,
        json!({"name": "splunk", "destination": {
            "type": "splunk_hec", "url": hec.url(), "token": "11111111-2222-3333-4444-555555555555",
            "index": "audit", "acknowledgements": true}}),
    )
    .await;
    let id = created["id"].as_str().unwrap().to_owned();
    let _worker = WorkerProcess::spawn(&env, &api, &[]).await;
    let rows = events("org_acme", 1_500);
    env.publish(&rows).await;
    let wanted = ids(&rows);
    assert_eq!(hec.wait_for(&wanted, Duration::from_secs(60)).await, wanted);
    for request in hec.captured().iter().filter(|c| c.accepted) {
        assert!(request.body.len() <= 1_000_000);
        assert_eq!(
            request.headers["authorization"],
            "Splunk 11111111-2222-3333-4444-555555555555"
        );
        assert_eq!(request.headers["x-splunk-request-channel"].len(), 36);
        let first: Value = serde_json::Deserializer::from_slice(&request.body)
            .into_iter::<Value>()
            .next()
            .unwrap()
            .unwrap();
        assert_eq!(first["index"], "audit");
        assert_eq!(first["source"], "audit-logs");
        assert_eq!(first["sourcetype"], "audit-logs:event");
        let event_ms =
            chrono::DateTime::parse_from_rfc3339(first["event"]["timestamp"].as_str().unwrap())
                .unwrap()
                .timestamp_millis();
        assert!((first["time"].as_f64().unwrap() * 1000.0 - event_ms as f64).abs() < 1.0);
    }
    // Counted delivered only once acknowledged (acks turn true 300 ms after each request).
    wait_stream(&api, &acme, &id, "all delivered", |v| {
        v["deliveredEvents"] == 1_500
    })
    .await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_batch_loses_nothing_and_the_next_resumes_in_order() {
    let env = StreamsEnv::new("kill").await;
    let api = env.api("streams_kill").await;
    let acme = api.key("org_acme", Role::Admin).await;
    let receiver = Receiver::start(Intake::Webhook).await;
    create(&api, &acme, webhook("siem", &receiver)).await;
    // Positions written every 5 s: a kill between two writes re-sends what was delivered since.
    let mut first = WorkerProcess::spawn(
        &env,
        &api,
        &[("AUDIT_API__STREAMS__STATE_FLUSH_INTERVAL_MS", "5000")],
    )
    .await;
    let rows = events("org_acme", 3_000);
    let publisher = trickle(&env, rows.clone(), 100);
    let deadline = Instant::now() + Duration::from_secs(30);
    while receiver.ids().len() < 500 {
        assert!(
            Instant::now() < deadline,
            "nothing delivered:\n{}",
            first.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.signal(nix::sys::signal::Signal::SIGKILL);
    first
        .wait_exit(Duration::from_secs(5))
        .await
        .expect("killed");
    let _second = WorkerProcess::spawn(&env, &api, &[]).await;
    publisher.await.unwrap();
    let wanted = ids(&rows);
    let got = receiver.wait_for(&wanted, Duration::from_secs(60)).await;
    // At least once: a reader that skips ids it has seen gets every event, in order.
    let mut seen = BTreeSet::new();
    let firsts: Vec<String> = got
        .into_iter()
        .filter(|id| seen.insert(id.clone()))
        .collect();
    assert_eq!(firsts, wanted);
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_the_streams_and_a_rebalance_sends_nothing_twice() {
    let env = StreamsEnv::new("replicas").await;
    let api = env.api("streams_replicas").await;
    // Organizations in different partitions of the stored-events topic.
    let mut organizations: Vec<String> = Vec::new();
    let mut partitions = BTreeSet::new();
    for n in 0.. {
        let org = format!("org_{n}");
        if partitions.insert(audit_store::stored::partition_of(
            &org,
            common::streams::PARTITIONS,
        )) {
            organizations.push(org);
        }
        if organizations.len() == 4 {
            break;
        }
    }
    let mut receivers = Vec::new();
    for org in &organizations {
        let key = api.key(org, Role::Admin).await;
        let receiver = Receiver::start(Intake::Webhook).await;
        create(&api, &key, webhook("siem", &receiver)).await;
        receivers.push(receiver);
    }
    let mut first = WorkerProcess::spawn(&env, &api, &[]).await;
    let rows: Vec<Vec<AuditEventRow>> = organizations.iter().map(|org| events(org, 400)).collect();
    let publishers: Vec<_> = rows.iter().map(|r| trickle(&env, r.clone(), 10)).collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    // A second replica joins (partitions move), then the first leaves (SIGTERM): both normal.
    let second = WorkerProcess::spawn(&env, &api, &[]).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    first.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(
        first
            .wait_exit(Duration::from_secs(20))
            .await
            .is_some_and(|s| s.success()),
        "{}",
        first.logs()
    );
    for publisher in publishers {
        publisher.await.unwrap();
    }
    for (receiver, rows) in receivers.iter().zip(&rows) {
        let wanted = ids(rows);
        assert_eq!(
            receiver.wait_for(&wanted, Duration::from_secs(60)).await,
            wanted,
            "each event once, in order:\n{}",
            second.logs()
        );
    }
    let metrics = second.get("/metrics").await.1;
    assert!(
        metrics.contains("audit_stream_owned_partitions 6"),
        "{metrics}"
    );
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_cannot_open_a_streams_secrets_says_so_and_one_that_can_delivers() {
    let env = StreamsEnv::new("wrongkey").await;
    let api = env.api("streams_wrongkey").await;
    let acme = api.key("org_acme", Role::Admin).await;
    let receiver = Receiver::start(Intake::Webhook).await;
    let id = create(&api, &acme, webhook("siem", &receiver)).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let other_key = "b3RoZXItMzItYnl0ZS1rZXktZm9yLXRoZS10ZXN0cyE=";
    let wrong =
        WorkerProcess::spawn(&env, &api, &[("AUDIT_API__STREAMS__SECRET_KEY", other_key)]).await;
    let rows = events("org_acme", 50);
    env.publish(&rows).await;
    let view = wait_stream(&api, &acme, &id, "error: secrets unreadable", |v| {
        v["state"] == "error"
    })
    .await;
    assert!(
        view["lastError"]["message"]
            .as_str()
            .unwrap()
            .contains("streams.secret_key"),
        "{view}"
    );
    assert!(view["lastError"]["status"].is_null(), "{view}");
    assert!(receiver.ids().is_empty());
    drop(wrong);
    let _right = WorkerProcess::spawn(&env, &api, &[]).await;
    assert_eq!(
        receiver
            .wait_for(&ids(&rows), Duration::from_secs(30))
            .await,
        ids(&rows)
    );
    wait_stream(&api, &acme, &id, "active again", |v| v["state"] == "active").await;
    api.stop().await;
}

/// Retention and erasure reach the streams: an expired event is never delivered, and a replay
/// after an erasure sends the person's events under their pseudonyms, not as first delivered.
#[tokio::test]
async fn a_stream_delivers_only_held_events_and_replays_an_erased_person_pseudonymized() {
    use audit_api::retention::commands::Operator;
    let env = StreamsEnv::new("retention").await;
    let api = env.api("streams_retention").await;
    let acme = api.key("org_acme", Role::Admin).await;
    let key = "stream-test-pseudonym-key-0123456789";
    let mut config = ApiConfig {
        clickhouse: api.clickhouse.clone(),
        ..ApiConfig::default()
    };
    env.tune(&mut config);
    config.retention.pseudonym_key = Some(key.to_owned().into());
    config.retention.erasure_settle_ms = 0;
    let operator = Operator::new(&config).unwrap();
    operator
        .admin
        .set_days("org_acme", Some(30), "dpo")
        .await
        .unwrap();
    let receiver = Receiver::start(Intake::Webhook).await;
    let created = create(&api, &acme, webhook("siem", &receiver)).await;
    let id = created["id"].as_str().unwrap().to_owned();
    let _worker =
        WorkerProcess::spawn(&env, &api, &[("AUDIT_API__RETENTION__PSEUDONYM_KEY", key)]).await;
    let now = chrono::Utc::now().timestamp_millis();
    let mut expired = event("org_acme", "expired", now - 31 * 86_400_000);
    expired.actor_id = "usr_ada".into();
    let mut ada = event("org_acme", "ada", now - 3_600_000);
    ada.actor_id = "usr_ada".into();
    ada.actor_email = Some("ada@corp.example".into());
    ada.actor_name = Some("Ada Lovelace".into());
    let bob = event("org_acme", "bob", now - 1_000);
    let start = chrono::Utc::now();
    env.publish(&[expired, ada.clone(), bob]).await;
    let held = vec!["ada".to_owned(), "bob".to_owned()];
    assert_eq!(
        receiver.wait_for(&held, Duration::from_secs(30)).await,
        held
    );
    let first = receiver.events();
    assert_eq!(first[0]["actor"]["email"], "ada@corp.example");

    let done = operator.erase("org_acme", "usr_ada", "dpo").await.unwrap();
    assert_eq!(done.state, "done");
    // The worker re-reads the erasures with its settings (every 200 ms here).
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let path = format!(
        "{STREAMS}/{id}/replay?from={}",
        (start - chrono::Duration::seconds(1)).to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    );
    let (status, view) = send(&api, reqwest::Method::POST, &acme, &path, None).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{view}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while receiver.ids().len() < 4 {
        assert!(Instant::now() < deadline, "{:?}", receiver.ids());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(receiver.ids(), ["ada", "bob", "ada", "bob"]);
    let replayed = receiver.events();
    let p = audit_store::retention::Pseudonyms::new(key.as_bytes(), "org_acme", "usr_ada");
    assert_eq!(replayed[2]["actor"]["email"], p.email().as_str());
    assert_eq!(replayed[2]["actor"]["name"], p.name().as_str());
    assert_eq!(replayed[2]["context"]["ip"], p.ip("203.0.113.7").as_str());
    assert_eq!(replayed[3]["actor"]["email"], "Ada.Admin@Acme.example");
    api.stop().await;
}
