//! Running it: freshness and request ids, read events, TLS and start-up failures. Against the real ClickHouse of the local stack (`make up`); every test
//! gets its own database, its own keys and an in-process server on a free port.

mod common;

use common::*;

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
    // A caller's plain request id is kept and echoed; anything else is replaced by a new one.
    let url = api.url("/api/v1/organization/audit-logs", "limit=1");
    for (sent, kept) in [
        ("trace-42_a.b", true),
        ("has space", false),
        ("<script>", false),
        (&"x".repeat(129)[..], false),
    ] {
        let response = api
            .http
            .get(&url)
            .header("X-API-Key", &key)
            .header("x-request-id", sent)
            .send()
            .await
            .unwrap();
        let echoed = response.headers()["x-request-id"].to_str().unwrap();
        if kept {
            assert_eq!(echoed, sent);
        } else {
            assert_ne!(echoed, sent);
            assert!(uuid::Uuid::parse_str(echoed).is_ok(), "{echoed}");
        }
    }
    let metrics = api.metrics().await;
    assert!(metrics.contains("audit_api_requests_total{format=\"json\",route=\"/api/v1/organization/audit-logs\",status=\"200\"}"));
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
