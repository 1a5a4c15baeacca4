//! The ingest against the servers users run: Kafka over TLS and SASL (the local broker's
//! `SASL_SSL`, `SSL` and `SASL_PLAINTEXT` listeners), ClickHouse over HTTPS, batches in every
//! compression codec from a producer nobody here wrote (Kafka's own Java producer), and a record
//! batch that cannot be decoded. Needs the local stack (`make up`), whose scripts generate the
//! certificates and the SASL credentials.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use audit_ingest::config::KafkaConfig;
use audit_runtime::kafka::{KafkaSecurity, OAuthBearer, SaslMechanism, SecurityProtocol};
use audit_testkit::SecureStack;
use common::*;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::Message;
use secrecy::SecretString;

const READY: Duration = Duration::from_secs(60);
const ARRIVE: Duration = Duration::from_secs(60);

/// The environment that points an `audit-ingest` at the `SASL_SSL` listener with SCRAM-SHA-512
/// and at ClickHouse's HTTPS port, trusting the local CA (`ca` names the CA file to trust).
fn secure_env(stack: &SecureStack, ca: &str, password: &str) -> Vec<(String, String)> {
    let ca = stack.tls(ca).display().to_string();
    vec![
        (
            "AUDIT_INGEST__KAFKA__BROKERS".into(),
            stack.sasl_ssl.clone(),
        ),
        (
            "AUDIT_INGEST__KAFKA__SECURITY__PROTOCOL".into(),
            "SASL_SSL".into(),
        ),
        (
            "AUDIT_INGEST__KAFKA__SECURITY__SASL_MECHANISM".into(),
            "SCRAM-SHA-512".into(),
        ),
        (
            "AUDIT_INGEST__KAFKA__SECURITY__SASL_USERNAME".into(),
            stack.user.clone(),
        ),
        ("AUDIT_INGEST__KAFKA__SECURITY__CA_FILE".into(), ca.clone()),
        (
            "AUDIT_INGEST__KAFKA__SASL_PASSWORD".into(),
            password.to_owned(),
        ),
        (
            "AUDIT_INGEST__CLICKHOUSE__URL".into(),
            stack.clickhouse_https.clone(),
        ),
        ("AUDIT_INGEST__CLICKHOUSE__TLS__CA_FILE".into(), ca),
    ]
}

fn as_refs(pairs: &[(String, String)]) -> Vec<(&str, &str)> {
    pairs
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect()
}

/// A TOML file for `AUDIT_INGEST_CONFIG` (settings whose keys hold dots).
fn config_file(name: &str, text: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!(
        "audit-ingest-{name}-{}.toml",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::write(&path, text).unwrap();
    path
}

/// Record batches of a partition's log, as (base offset, compression codec: 0 none, 1 gzip,
/// 2 snappy, 3 lz4, 4 zstd, byte position in the segment, batch size).
fn record_batches(
    stack: &SecureStack,
    topic: &str,
    partition: i32,
) -> Vec<(i64, u8, usize, usize)> {
    let segment = stack
        .kafka_data_dir
        .join(format!("{topic}-{partition}"))
        .join("00000000000000000000.log");
    let bytes = std::fs::read(&segment).unwrap_or_default();
    let mut batches = Vec::new();
    let mut at = 0;
    while at + 61 <= bytes.len() {
        let base = i64::from_be_bytes(bytes[at..at + 8].try_into().unwrap());
        let length = i32::from_be_bytes(bytes[at + 8..at + 12].try_into().unwrap()) as usize;
        let attributes = i16::from_be_bytes(bytes[at + 21..at + 23].try_into().unwrap());
        let size = 12 + length;
        if at + size > bytes.len() {
            break;
        }
        batches.push((base, (attributes & 0x7) as u8, at, size));
        at += size;
    }
    batches
}

/// Reads `topic` from the start with a consumer configured exactly as the service configures
/// its clients (`Connection::apply`), until `count` messages arrived.
async fn read_topic(config: &KafkaConfig, topic: &str, count: usize) -> Vec<Vec<u8>> {
    let mut client = ClientConfig::new();
    config.connection().apply(&mut client);
    let consumer: StreamConsumer = client
        .set(
            "group.id",
            format!("reader-{}", uuid::Uuid::new_v4().simple()),
        )
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let mut payloads = Vec::new();
    while payloads.len() < count {
        let message = tokio::time::timeout(ARRIVE, consumer.recv())
            .await
            .expect("message")
            .unwrap();
        payloads.push(message.payload().unwrap_or_default().to_vec());
    }
    payloads
}

fn scram_config(stack: &SecureStack) -> KafkaConfig {
    KafkaConfig {
        brokers: stack.sasl_ssl.clone(),
        security: KafkaSecurity {
            protocol: SecurityProtocol::SaslSsl,
            sasl_mechanism: Some(SaslMechanism::ScramSha512),
            sasl_username: Some(stack.user.clone()),
            ca_file: Some(stack.tls("ca.crt")),
            ..KafkaSecurity::default()
        },
        sasl_password: Some(SecretString::from(stack.password.clone())),
        ..KafkaConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumes_and_dead_letters_over_sasl_ssl_and_writes_clickhouse_over_https() {
    let stack = SecureStack::from_env();
    let env = TestEnv::new("sasl-ssl", 3).await;
    let valid = generate_events("tls", 300);
    let producer = producer();
    publish(&env, &producer, &valid).await;
    let invalid: Vec<(String, Vec<u8>)> = (0..5)
        .map(|i| (format!("bad:{i}"), format!("not json {i}").into_bytes()))
        .collect();
    produce(&producer, &env.topics[0], &invalid).await;

    // The dead-letter producer compresses with zstd: the produce side of every codec.
    let file = config_file(
        "zstd",
        "[kafka.properties]\n\"compression.type\" = \"zstd\"\n",
    );
    let mut pairs = secure_env(&stack, "ca.crt", &stack.password);
    pairs.push(("AUDIT_INGEST_CONFIG".into(), file.display().to_string()));
    let mut ingest = IngestProcess::spawn(&env, &as_refs(&pairs));
    ingest.wait_ready(READY).await;
    env.wait_for_count(valid.len() as u64, ARRIVE).await;

    let letters = read_topic(&scram_config(&stack), &env.dead_letter_topic, invalid.len()).await;
    let letters: BTreeSet<String> = letters
        .into_iter()
        .map(|payload| String::from_utf8(payload).unwrap())
        .collect();
    let expected: BTreeSet<String> = (0..5).map(|i| format!("not json {i}")).collect();
    assert_eq!(letters, expected);
    let codecs: BTreeSet<u8> = (0..env.partitions)
        .flat_map(|p| record_batches(&stack, &env.dead_letter_topic, p))
        .map(|(_, codec, _, _)| codec)
        .collect();
    assert_eq!(
        codecs,
        BTreeSet::from([4]),
        "dead letters must be zstd batches"
    );
    let logs = ingest.logs();
    assert!(
        !logs.contains(&stack.password),
        "the SASL password reached the log"
    );
    env.drop_database().await;
}

/// Starts an ingest that must refuse to run, and returns how long it took and what it said.
async fn failed_start(env: &TestEnv, pairs: &[(String, String)]) -> (Duration, String) {
    let started = Instant::now();
    let mut ingest = IngestProcess::spawn(env, &as_refs(pairs));
    let status = ingest
        .wait_exit(Duration::from_secs(30))
        .await
        .unwrap_or_else(|| panic!("audit-ingest kept running:\n{}", ingest.logs()));
    assert!(
        !status.success(),
        "audit-ingest exited cleanly:\n{}",
        ingest.logs()
    );
    (started.elapsed(), ingest.logs())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_ca_or_password_fails_fast_naming_the_cause() {
    let stack = SecureStack::from_env();
    let env = TestEnv::new("wrong-creds", 1).await;
    // The schema first, so that the Kafka side is what fails below.
    let mut migrate = Command::new(env!("CARGO_BIN_EXE_audit-ingest"));
    migrate.arg("migrate").envs(env.ingest_env(free_port()));
    assert!(migrate.status().unwrap().success());

    let (took, logs) = failed_start(&env, &secure_env(&stack, "ca.crt", "not-the-password")).await;
    assert!(took < Duration::from_secs(20), "took {took:?}");
    assert!(
        logs.contains("SASL authentication error") && logs.contains("SCRAM-SHA-512"),
        "{logs}"
    );
    assert!(
        !logs.contains("not-the-password"),
        "the password reached the log"
    );

    let (took, logs) =
        failed_start(&env, &secure_env(&stack, "other-ca.crt", &stack.password)).await;
    assert!(took < Duration::from_secs(20), "took {took:?}");
    // ClickHouse is reached first: its certificate is refused by the wrong CA as well.
    assert!(
        logs.contains("UnknownIssuer") || logs.contains("certificate verify failed"),
        "{logs}"
    );

    // ClickHouse right, Kafka's CA wrong: librdkafka's verdict names the CA.
    let mut pairs = secure_env(&stack, "ca.crt", &stack.password);
    pairs.push((
        "AUDIT_INGEST__KAFKA__SECURITY__CA_FILE".into(),
        stack.tls("other-ca.crt").display().to_string(),
    ));
    let (took, logs) = failed_start(&env, &pairs).await;
    assert!(took < Duration::from_secs(20), "took {took:?}");
    assert!(
        logs.contains("SSL handshake failed") && logs.contains("certificate verify failed"),
        "{logs}"
    );
    env.drop_database().await;
}

/// A client of the service's kind (the ingest's own consumer factory) reaches the brokers and
/// reads the topic list with the given settings.
fn connects(config: &KafkaConfig) -> Result<(), String> {
    config
        .connection()
        .validate()
        .map_err(|err| err.to_string())?;
    let consumer = audit_ingest::kafka::consumer(
        config,
        &format!("probe-{}", uuid::Uuid::new_v4().simple()),
        audit_ingest::kafka::Membership::Standalone,
        audit_ingest::kafka::IngestContext::new(audit_ingest::metrics::IngestMetrics::new()),
    )
    .map_err(|err| err.to_string())?;
    match consumer.fetch_metadata(None, Duration::from_secs(10)) {
        Ok(metadata) if !metadata.topics().is_empty() => Ok(()),
        Ok(_) => Err("no topics".to_owned()),
        Err(err) => Err(err.to_string()),
    }
}

/// A token endpoint of an OpenID Connect provider (client credentials grant) that hands out
/// unsigned JWTs, which the local broker's development validator accepts. Returns its URL and
/// how many tokens it issued.
async fn token_endpoint() -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use axum::routing::post;
    use base64::Engine;
    let issued = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = std::sync::Arc::clone(&issued);
    let app = axum::Router::new().route(
        "/token",
        post(move |body: String| {
            let counter = std::sync::Arc::clone(&counter);
            async move {
                assert!(body.contains("grant_type=client_credentials"), "{body}");
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_secs();
                let header = b64.encode(r#"{"alg":"none"}"#);
                let claims = b64.encode(
                    serde_json::json!({"sub": "audit", "iat": now, "exp": now + 3600, "scope": "kafka"})
                        .to_string(),
                );
                axum::Json(serde_json::json!({
                    "access_token": format!("{header}.{claims}."),
                    "token_type": "bearer",
                    "expires_in": 3600,
                }))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{address}/token"), issued)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_protocol_and_mechanism_connects_and_wrong_ones_do_not() {
    let stack = SecureStack::from_env();
    let password = Some(SecretString::from(stack.password.clone()));
    let ca = Some(stack.tls("ca.crt"));
    let sasl = |brokers: &str, protocol, mechanism| KafkaConfig {
        brokers: brokers.to_owned(),
        security: KafkaSecurity {
            protocol,
            sasl_mechanism: Some(mechanism),
            sasl_username: Some(stack.user.clone()),
            ca_file: if protocol == SecurityProtocol::SaslSsl {
                ca.clone()
            } else {
                None
            },
            ..KafkaSecurity::default()
        },
        sasl_password: password.clone(),
        ..KafkaConfig::default()
    };
    for mechanism in [
        SaslMechanism::Plain,
        SaslMechanism::ScramSha256,
        SaslMechanism::ScramSha512,
    ] {
        connects(&sasl(&stack.sasl_ssl, SecurityProtocol::SaslSsl, mechanism))
            .unwrap_or_else(|err| panic!("SASL_SSL {mechanism:?}: {err}"));
        connects(&sasl(
            &stack.sasl_plaintext,
            SecurityProtocol::SaslPlaintext,
            mechanism,
        ))
        .unwrap_or_else(|err| panic!("SASL_PLAINTEXT {mechanism:?}: {err}"));
    }

    // Mutual TLS: the SSL listener takes the client certificate and refuses a client without.
    let mtls = |with_certificate: bool| KafkaConfig {
        brokers: stack.ssl.clone(),
        security: KafkaSecurity {
            protocol: SecurityProtocol::Ssl,
            ca_file: ca.clone(),
            cert_file: with_certificate.then(|| stack.tls("client.crt")),
            key_file: with_certificate.then(|| stack.tls("client.key")),
            ..KafkaSecurity::default()
        },
        ..KafkaConfig::default()
    };
    connects(&mtls(true)).unwrap_or_else(|err| panic!("SSL with a client certificate: {err}"));
    assert!(
        connects(&mtls(false)).is_err(),
        "SSL without a client certificate connected"
    );

    // OAUTHBEARER: librdkafka fetches the token from the provider itself.
    let (endpoint, issued) = token_endpoint().await;
    let oauth = KafkaConfig {
        brokers: stack.sasl_ssl.clone(),
        security: KafkaSecurity {
            protocol: SecurityProtocol::SaslSsl,
            sasl_mechanism: Some(SaslMechanism::OAuthBearer),
            ca_file: ca.clone(),
            oauthbearer: Some(OAuthBearer {
                token_endpoint: endpoint,
                client_id: "audit-ingest".to_owned(),
                client_secret: SecretString::from("client-secret".to_owned()),
                scope: Some("kafka".to_owned()),
                extensions: BTreeMap::new(),
            }),
            ..KafkaSecurity::default()
        },
        ..KafkaConfig::default()
    };
    let blocking = tokio::task::spawn_blocking(move || connects(&oauth));
    blocking
        .await
        .unwrap()
        .unwrap_or_else(|err| panic!("OAUTHBEARER: {err}"));
    assert!(issued.load(std::sync::atomic::Ordering::SeqCst) >= 1);

    // A wrong password is refused on every mechanism that has one.
    let mut wrong = sasl(
        &stack.sasl_ssl,
        SecurityProtocol::SaslSsl,
        SaslMechanism::ScramSha256,
    );
    wrong.sasl_password = Some(SecretString::from("wrong".to_owned()));
    assert!(connects(&wrong).is_err());
}

/// Kafka's own console producer (the Java client: its own gzip, snappy, lz4 and zstd code)
/// writes `lines` to `topic` as batches compressed with `codec`.
fn java_produce(
    stack: &SecureStack,
    topic: &str,
    codec: &str,
    lines: &[String],
) -> std::process::Child {
    let mut child = Command::new("java")
        .args(["-Xmx128m", "-XX:+UseSerialGC", "-cp"])
        .arg(format!("{}/*", stack.kafka_lib.display()))
        .args([
            "org.apache.kafka.tools.ConsoleProducer",
            "--bootstrap-server",
            &brokers(),
            "--topic",
            topic,
            "--compression-codec",
            codec,
            "--producer-property",
            "linger.ms=50",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("java runs Kafka's console producer");
    let mut stdin = child.stdin.take().unwrap();
    for line in lines {
        writeln!(stdin, "{line}").unwrap();
    }
    drop(stdin);
    child
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_of_every_codec_from_the_java_producer_are_all_stored() {
    let stack = SecureStack::from_env();
    assert!(
        stack.kafka_lib.is_dir(),
        "Kafka's jars missing at {} (run deploy/local/install.sh)",
        stack.kafka_lib.display()
    );
    let env = TestEnv::new("codecs", 1).await;
    let codecs = ["none", "gzip", "snappy", "lz4", "zstd"];
    let mut expected = 0;
    // All on one partition, one codec after the other: a decoder that fails on any of them
    // would hold back everything behind it.
    for codec in codecs {
        let lines: Vec<String> = generate_events(&format!("codec-{codec}"), 200)
            .into_iter()
            .map(|event| event.to_string())
            .collect();
        expected += lines.len() as u64;
        let mut child = java_produce(&stack, &env.topics[0], codec, &lines);
        let status = child.wait().unwrap();
        let mut stderr = String::new();
        std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
        assert!(
            status.success(),
            "console producer ({codec}) failed: {stderr}"
        );
    }
    let found: BTreeSet<u8> = record_batches(&stack, &env.topics[0], 0)
        .into_iter()
        .map(|(_, codec, _, _)| codec)
        .collect();
    assert_eq!(
        found,
        BTreeSet::from([0, 1, 2, 3, 4]),
        "the log holds every codec"
    );

    let mut ingest = IngestProcess::spawn(&env, &[]);
    ingest.wait_ready(READY).await;
    env.wait_for_count(expected, ARRIVE).await;
    let metrics = ingest.metrics().await;
    assert_eq!(
        metric_sum(&metrics, "audit_ingest_undecodable_batch_errors_total"),
        0.0
    );
    env.drop_database().await;
}

/// Overwrites the middle of the compressed records of the batch at `position` (size `size`) in
/// the live segment: the broker serves the file as it is, so every fetch returns a batch whose
/// gzip stream is corrupt.
fn corrupt(segment: &Path, position: usize, size: usize) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(segment)
        .unwrap();
    let records = position + 61;
    let middle = records + (size - 61) / 3;
    file.write_all_at(&[0x5a; 24], middle as u64).unwrap();
    file.sync_all().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_that_cannot_be_decoded_stops_its_partition_visibly_and_nothing_else() {
    let stack = SecureStack::from_env();
    let env = TestEnv::new("undecodable", 1).await;
    let events = generate_events("undecodable", 60);
    let user_events: Vec<_> = events
        .iter()
        .filter(|event| topic_for(&env, event) == env.topics[0])
        .cloned()
        .collect();
    assert!(user_events.len() >= 9);
    let to_users = |event: &serde_json::Value| {
        (
            event["id"].as_str().unwrap().to_owned(),
            serde_json::to_vec(event).unwrap(),
        )
    };
    // users[0]: 3 plain messages, one gzip batch of 3, 3 plain messages.
    let plain = producer();
    let gzip: rdkafka::producer::FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("compression.type", "gzip")
        .set("linger.ms", "200")
        .create()
        .unwrap();
    let before: Vec<_> = user_events[0..3].iter().map(to_users).collect();
    let inside: Vec<_> = user_events[3..6].iter().map(to_users).collect();
    let after: Vec<_> = user_events[6..9].iter().map(to_users).collect();
    produce(&plain, &env.topics[0], &before).await;
    produce(&gzip, &env.topics[0], &inside).await;
    produce(&plain, &env.topics[0], &after).await;
    let batches = record_batches(&stack, &env.topics[0], 0);
    let &(base, _, position, size) = batches
        .iter()
        .find(|(_, codec, _, _)| *codec == 1)
        .expect("a gzip batch in the log");
    assert_eq!(base, 3);
    corrupt(
        &stack
            .kafka_data_dir
            .join(format!("{}-0", env.topics[0]))
            .join("00000000000000000000.log"),
        position,
        size,
    );
    // The other topics carry on.
    let others: Vec<_> = events
        .iter()
        .filter(|event| topic_for(&env, event) != env.topics[0])
        .cloned()
        .collect();
    publish(&env, &plain, &others).await;

    let mut ingest = IngestProcess::spawn(
        &env,
        &[("AUDIT_INGEST__LIVENESS__CHECK_INTERVAL_MS", "1000")],
    );
    env.wait_for_count((others.len() + before.len()) as u64, ARRIVE)
        .await;
    let readyz = format!("http://127.0.0.1:{}/readyz", ingest.http_port);
    let deadline = Instant::now() + Duration::from_secs(60);
    let body = loop {
        if let Ok(Some(status)) = ingest.child.try_wait() {
            panic!("audit-ingest exited with {status}:\n{}", ingest.logs());
        }
        if let Ok(response) = reqwest::get(&readyz).await {
            if response.status() == 503 {
                let body = response.text().await.unwrap();
                if body.starts_with("blocked:") {
                    break body;
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "never blocked:\n{}",
            ingest.logs()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(
        body.contains(&format!(
            "{}[0] cannot be decoded at offset 3",
            env.topics[0]
        )),
        "{body}"
    );
    assert!(
        !body.contains(&env.topics[1]) && !body.contains(&env.topics[2]),
        "{body}"
    );
    let healthz = format!("http://127.0.0.1:{}/healthz", ingest.http_port);
    assert_eq!(
        reqwest::get(&healthz).await.unwrap().status(),
        200,
        "a restart cannot help"
    );
    let metrics = ingest.metrics().await;
    assert!(
        metric_sum(&metrics, "audit_ingest_undecodable_batch_errors_total") >= 1.0,
        "{metrics}"
    );
    assert_eq!(
        metric_sum(&metrics, "audit_ingest_blocked_partitions"),
        1.0,
        "{metrics}"
    );
    let logs = ingest.logs();
    assert!(
        logs.lines()
            .any(|line| line.contains("\"level\":\"ERROR\"") && line.contains("cannot be decoded")),
        "{logs}"
    );
    // Nothing behind the batch was skipped: the events after it are not stored and the
    // partition's committed offset stays at the batch.
    assert_eq!(
        env.visible_count().await,
        (others.len() + before.len()) as u64
    );
    let committed = env.committed_offsets();
    assert_eq!(
        committed.get(&(env.topics[0].clone(), 0)),
        Some(&3),
        "{committed:?}"
    );
    drop(ingest);
    env.drop_database().await;
}
