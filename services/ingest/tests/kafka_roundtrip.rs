//! Against the real Kafka broker of the local stack (`make up`): a message produced with rdkafka
//! is read back by a consumer group, and the group's committed offset survives the consumer.

use std::collections::BTreeSet;
use std::time::Duration;

use audit_testkit::brokers;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

async fn create_topic(name: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .expect("admin client");
    let results = admin
        .create_topics(
            &[NewTopic::new(name, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("create_topics request");
    for result in results {
        result.expect("topic created");
    }
}

fn consumer(group: &str) -> StreamConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("consumer")
}

async fn receive(consumer: &StreamConsumer, count: usize) -> Vec<(i32, i64, String, String)> {
    let mut received = Vec::new();
    while received.len() < count {
        let message = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .expect("a message within 30 s")
            .expect("no consumer error");
        let trace = message
            .headers()
            .and_then(|headers| headers.iter().find(|h| h.key == "traceparent"))
            .and_then(|h| h.value)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default();
        received.push((
            message.partition(),
            message.offset(),
            String::from_utf8_lossy(message.payload().unwrap_or_default()).into_owned(),
            trace,
        ));
        consumer
            .commit_message(&message, CommitMode::Sync)
            .expect("commit");
    }
    received
}

#[tokio::test]
async fn produced_messages_are_consumed_in_a_group_and_offsets_survive() {
    let topic = unique("test.roundtrip");
    let group = unique("test-group");
    create_topic(&topic, 3).await;

    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("enable.idempotence", "true")
        .create()
        .expect("producer");
    let mut sent = BTreeSet::new();
    for i in 0..9 {
        let payload = format!("{{\"n\":{i}}}");
        let key = format!("key-{i}");
        let delivery = producer
            .send(
                FutureRecord::to(&topic)
                    .key(&key)
                    .payload(&payload)
                    .headers(OwnedHeaders::new().insert(Header {
                        key: "traceparent",
                        value: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
                    })),
                Duration::from_secs(10),
            )
            .await
            .expect("delivered");
        assert!(delivery.offset >= 0);
        sent.insert(payload);
    }

    let first = consumer(&group);
    first.subscribe(&[topic.as_str()]).unwrap();
    let received = receive(&first, 9).await;
    let payloads: BTreeSet<String> = received.iter().map(|r| r.2.clone()).collect();
    assert_eq!(payloads, sent);
    assert!(received
        .iter()
        .all(|r| r.3.starts_with("00-0af7651916cd43dd")));
    assert_eq!(
        received.iter().map(|r| r.0).collect::<BTreeSet<_>>().len(),
        3,
        "keys spread over all partitions"
    );

    // The group's committed offsets are past every message, as the broker reports them.
    let mut wanted = TopicPartitionList::new();
    for partition in 0..3 {
        wanted.add_partition(&topic, partition);
    }
    let committed = first
        .committed_offsets(wanted, Duration::from_secs(10))
        .unwrap();
    let total: i64 = committed
        .elements()
        .iter()
        .map(|e| match e.offset() {
            Offset::Offset(o) => o,
            other => panic!("partition {} not committed: {other:?}", e.partition()),
        })
        .sum();
    assert_eq!(total, 9);
    drop(first);

    // A new member of the same group resumes after the committed offsets: it sees only the new one.
    producer
        .send(
            FutureRecord::to(&topic)
                .key("key-late")
                .payload("{\"n\":\"late\"}"),
            Duration::from_secs(10),
        )
        .await
        .expect("delivered");
    let second = consumer(&group);
    second.subscribe(&[topic.as_str()]).unwrap();
    let resumed = receive(&second, 1).await;
    assert_eq!(resumed[0].2, "{\"n\":\"late\"}");
    let extra = tokio::time::timeout(Duration::from_secs(3), second.recv()).await;
    assert!(extra.is_err(), "a committed message was delivered again");
}
