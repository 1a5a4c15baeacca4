//! Reads of the audit log are audited too: each answered page or export becomes an
//! `audit_log.viewed` / `audit_log.exported` event (actor = the API key) on a Kafka topic that
//! `audit-ingest` can consume like any other. Publishing never delays or fails a response;
//! a lost publication is logged and counted.

use std::time::Duration;

use audit_runtime::kafka::LoggingContext;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use serde_json::json;
use tracing::warn;

use crate::config::ReadEventsConfig;
use crate::keys::Caller;
use crate::metrics::ApiMetrics;
use crate::query::Filters;
use crate::time::format_timestamp;

/// What a request did, for its read event.
pub struct ReadFacts<'a> {
    pub caller: &'a Caller,
    /// `audit_log.viewed` or `audit_log.exported`.
    pub event_type: &'static str,
    pub format: &'static str,
    pub filters: &'a Filters,
    pub request_id: &'a str,
    pub ip: Option<String>,
    pub user_agent: Option<String>,
}

#[derive(Clone)]
pub struct ReadEventPublisher {
    producer: Option<FutureProducer<LoggingContext>>,
    topic: String,
    metrics: ApiMetrics,
}

impl ReadEventPublisher {
    pub fn new(
        config: &ReadEventsConfig,
        metrics: ApiMetrics,
    ) -> Result<Self, rdkafka::error::KafkaError> {
        let producer = if config.enabled {
            Some(audit_runtime::kafka::idempotent_producer(
                &config.connection(),
                &[("linger.ms", "20"), ("message.timeout.ms", "60000")],
            )?)
        } else {
            None
        };
        Ok(Self {
            producer,
            topic: config.topic.clone(),
            metrics,
        })
    }

    /// The event for one read, in the shape of the event contract.
    pub fn event(facts: &ReadFacts<'_>) -> serde_json::Value {
        let f = facts.filters;
        let mut context = serde_json::Map::new();
        context.insert("requestId".into(), json!(facts.request_id));
        if let Some(ip) = &facts.ip {
            context.insert("ip".into(), json!(ip));
        }
        if let Some(agent) = &facts.user_agent {
            context.insert(
                "userAgent".into(),
                json!(agent.chars().take(512).collect::<String>()),
            );
        }
        let mut actor = serde_json::Map::new();
        actor.insert("id".into(), json!(facts.caller.key_id));
        actor.insert("type".into(), json!("api_key"));
        if !facts.caller.key_name.is_empty() {
            actor.insert("name".into(), json!(facts.caller.key_name));
        }
        json!({
            "id": format!("evt_{}", uuid::Uuid::new_v4().simple()),
            "type": facts.event_type,
            "occurredAt": format_timestamp(chrono::Utc::now().timestamp_millis()),
            "organizationId": facts.caller.organization_id,
            "actor": actor,
            "resource": {"type": "audit_log", "id": facts.caller.organization_id},
            "context": context,
            "metadata": {
                "format": facts.format,
                "filters": {
                    "from": f.from_ms.map(format_timestamp),
                    "to": f.to_ms.map(format_timestamp),
                    "eventType": f.event_type,
                    "actorId": f.actor_id,
                    "actorEmail": f.actor_email,
                    "resourceType": f.resource_type,
                    "resourceId": f.resource_id,
                }
            }
        })
    }

    /// Hands the event to Kafka in the background.
    pub fn publish(&self, facts: &ReadFacts<'_>) {
        let Some(producer) = self.producer.clone() else {
            return;
        };
        let event = Self::event(facts);
        let key = facts.caller.organization_id.clone();
        let topic = self.topic.clone();
        let metrics = self.metrics.clone();
        tokio::spawn(async move {
            let payload = event.to_string();
            let record = FutureRecord::to(&topic).key(&key).payload(&payload);
            match producer.send(record, Duration::from_secs(5)).await {
                Ok(_) => metrics.read_events.with_label_values(&["published"]).inc(),
                Err((err, _)) => {
                    metrics.read_events.with_label_values(&["failed"]).inc();
                    warn!(error = %err, topic = %topic, "could not publish the read event");
                }
            }
        });
    }

    /// Publishes one event of the contract (keyed by its organization) and waits for Kafka's
    /// acknowledgement: for changes, whose audit event must not be lost silently.
    pub async fn send(&self, key: &str, event: &serde_json::Value) -> Result<(), String> {
        let Some(producer) = &self.producer else {
            return Err("read_events.enabled is false: stream changes are not published".into());
        };
        let payload = event.to_string();
        let record = FutureRecord::to(&self.topic).key(key).payload(&payload);
        match producer.send(record, Duration::from_secs(10)).await {
            Ok(_) => {
                self.metrics
                    .read_events
                    .with_label_values(&["published"])
                    .inc();
                Ok(())
            }
            Err((err, _)) => {
                self.metrics
                    .read_events
                    .with_label_values(&["failed"])
                    .inc();
                Err(err.to_string())
            }
        }
    }

    /// Waits for queued read events on shutdown.
    pub fn flush(&self, timeout: Duration) {
        if let Some(producer) = &self.producer {
            let _ = producer.flush(timeout);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::Role;

    #[test]
    fn read_events_satisfy_the_event_contract() {
        let caller = Caller {
            key_id: "0123456789abcdef".into(),
            key_name: "dashboard".into(),
            organization_id: "org_acme".into(),
            role: Role::Admin,
        };
        let filters = Filters {
            event_type: Some("user.created".into()),
            from_ms: Some(0),
            ..Filters::default()
        };
        for (event_type, format) in [
            ("audit_log.viewed", "json"),
            ("audit_log.exported", "ndjson"),
        ] {
            let event = ReadEventPublisher::event(&ReadFacts {
                caller: &caller,
                event_type,
                format,
                filters: &filters,
                request_id: "req_1",
                ip: Some("127.0.0.1".into()),
                user_agent: Some("curl/8".into()),
            });
            let bytes = serde_json::to_vec(&event).unwrap();
            let parsed = audit_event::AuditEvent::from_slice(&bytes)
                .unwrap_or_else(|err| panic!("{event}: {err}"));
            assert_eq!(parsed.event_type, event_type);
            assert_eq!(parsed.organization_id, "org_acme");
        }
    }
}
