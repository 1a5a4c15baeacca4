//! Decoding of Kafka messages and the batch they accumulate in until a flush: valid events,
//! dead letters, and the next offset to commit per partition.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use audit_event::{AuditEvent, EventError};
use audit_store::{AuditEventRow, Lineage};
use opentelemetry::trace::SpanContext;
use opentelemetry::trace::TraceContextExt;
use rdkafka::message::{BorrowedMessage, Headers};
use rdkafka::Message;

use crate::kafka::PartitionKey;

/// Where a message was read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourcePosition {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// An invalid message, kept byte for byte for the dead-letter topic.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
    pub error: EventError,
    pub source: SourcePosition,
}

/// What one message became.
#[derive(Debug)]
pub enum Decoded {
    /// A valid event, already in its stored form (lineage set, `ingested_at_ms` still 0).
    Event(Box<AuditEventRow>),
    Invalid(Box<DeadLetter>),
}

/// Parses one message. Never fails: an unusable message becomes a [`DeadLetter`].
pub fn decode(message: &BorrowedMessage<'_>) -> Decoded {
    let source = SourcePosition {
        topic: message.topic().to_owned(),
        partition: message.partition(),
        offset: message.offset(),
    };
    let payload = message.payload().unwrap_or_default();
    match AuditEvent::from_slice(payload) {
        Ok(event) => Decoded::Event(Box::new(AuditEventRow::from_event_owned(
            event,
            Lineage {
                topic: source.topic,
                partition: source.partition,
                offset: source.offset,
                ingested_at_ms: 0,
            },
        ))),
        Err(error) => Decoded::Invalid(Box::new(DeadLetter {
            key: message.key().map(<[u8]>::to_vec),
            payload: message.payload().map(<[u8]>::to_vec),
            headers: message
                .headers()
                .map(|headers| {
                    headers
                        .iter()
                        .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
                        .collect()
                })
                .unwrap_or_default(),
            error,
            source,
        })),
    }
}

/// The W3C trace context a producer attached to the message, if any.
pub fn trace_context(message: &BorrowedMessage<'_>) -> Option<SpanContext> {
    trace_context_of(message.headers()?)
}

/// The W3C trace context (`traceparent`, and `tracestate` when sent) in a message's headers.
fn trace_context_of(headers: &impl Headers) -> Option<SpanContext> {
    let traceparent = headers
        .iter()
        .find(|h| h.key.eq_ignore_ascii_case("traceparent"))?
        .value?;
    let traceparent = std::str::from_utf8(traceparent).ok()?;
    let mut carrier = std::collections::HashMap::new();
    carrier.insert("traceparent".to_owned(), traceparent.to_owned());
    if let Some(state) = headers
        .iter()
        .find(|h| h.key.eq_ignore_ascii_case("tracestate"))
        .and_then(|h| h.value)
        .and_then(|v| std::str::from_utf8(v).ok())
    {
        carrier.insert("tracestate".to_owned(), state.to_owned());
    }
    let context = opentelemetry::global::get_text_map_propagator(|p| p.extract(&carrier));
    let span = context.span().span_context().clone();
    span.is_valid().then_some(span)
}

/// Most trace links kept per batch; a batch span with thousands of links helps nobody.
const MAX_TRACE_LINKS: usize = 64;

/// Events and dead letters waiting for one flush.
#[derive(Debug, Default)]
pub struct EventBatch {
    pub events: Vec<AuditEventRow>,
    pub dead_letters: Vec<DeadLetter>,
    /// Offset after the last message of each partition in this batch: what to commit. A short
    /// list searched linearly: a batch spans few partitions, and lookups allocate nothing.
    positions: Vec<(PartitionKey, i64)>,
    pub trace_links: Vec<SpanContext>,
    bytes: usize,
    opened: Option<Instant>,
}

impl EventBatch {
    pub fn push(&mut self, decoded: Decoded, bytes: usize, trace: Option<SpanContext>) {
        let (topic, partition, offset) = match &decoded {
            Decoded::Event(e) => (&e.source_topic, e.source_partition, e.source_offset),
            Decoded::Invalid(d) => (&d.source.topic, d.source.partition, d.source.offset),
        };
        let next = offset + 1;
        match self
            .positions
            .iter_mut()
            .find(|((t, p), _)| *p == partition && t == topic)
        {
            Some((_, entry)) => {
                debug_assert!(*entry <= next, "offsets go forward within a partition");
                *entry = (*entry).max(next);
            }
            None => self.positions.push(((topic.clone(), partition), next)),
        }
        match decoded {
            Decoded::Event(event) => self.events.push(*event),
            Decoded::Invalid(letter) => self.dead_letters.push(*letter),
        }
        if let Some(trace) = trace {
            if self.trace_links.len() < MAX_TRACE_LINKS {
                self.trace_links.push(trace);
            }
        }
        self.bytes += bytes;
        self.opened.get_or_insert_with(Instant::now);
    }

    pub fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }

    /// What to commit once this batch is durable.
    pub fn next_offsets(&self) -> BTreeMap<PartitionKey, i64> {
        self.positions.iter().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.events.len() + self.dead_letters.len()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Time since the first message entered the batch.
    pub fn age(&self) -> Duration {
        self.opened.map(|t| t.elapsed()).unwrap_or_default()
    }

    /// When the batch must be flushed because of its age.
    pub fn deadline(&self, max_age: Duration) -> Option<Instant> {
        self.opened.map(|t| t + max_age)
    }

    pub fn is_full(&self, max_rows: usize, max_bytes: usize) -> bool {
        self.len() >= max_rows || self.bytes >= max_bytes
    }

    /// Empty, full or past its age under `config`: what decides when it is flushed (see
    /// [`crate::flow`]).
    pub fn state(&self, config: &crate::config::BatchConfig) -> crate::flow::BatchState {
        crate::flow::BatchState {
            empty: self.is_empty(),
            full: self.is_full(config.max_rows, config.max_bytes),
            expired: self.age() >= config.max_age(),
        }
    }

    /// Forgets everything from partitions this member no longer owns: their new owner will
    /// read those messages again from the last committed offset.
    pub fn drop_partitions(&mut self, revoked: &BTreeSet<PartitionKey>) -> usize {
        let before = self.len();
        let owned = |topic: &str, partition: i32| !revoked.contains(&(topic.to_owned(), partition));
        self.events
            .retain(|e| owned(&e.source_topic, e.source_partition));
        self.dead_letters
            .retain(|d| owned(&d.source.topic, d.source.partition));
        self.positions.retain(|(key, _)| !revoked.contains(key));
        if self.is_empty() {
            *self = EventBatch::default();
        }
        before - self.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(topic: &str, partition: i32, offset: i64) -> Decoded {
        let json = format!(
            r#"{{"id":"e-{topic}-{partition}-{offset}","type":"user.logged_in","occurredAt":"2025-01-01T00:00:00Z","organizationId":"o","actor":{{"id":"u"}},"resource":{{"type":"session","id":"s"}}}}"#
        );
        Decoded::Event(Box::new(AuditEventRow::from_event_owned(
            AuditEvent::from_slice(json.as_bytes()).unwrap(),
            Lineage {
                topic: topic.to_owned(),
                partition,
                offset,
                ingested_at_ms: 0,
            },
        )))
    }

    /// A producer's trace context becomes the flush span's link; a malformed one is ignored.
    #[test]
    fn a_traceparent_header_is_read_as_the_producers_trace() {
        use rdkafka::message::{Header, OwnedHeaders};
        opentelemetry::global::set_text_map_propagator(
            opentelemetry_sdk::propagation::TraceContextPropagator::new(),
        );
        let headers = |value: &str| {
            OwnedHeaders::new()
                .insert(Header {
                    key: "content-type",
                    value: Some("application/json"),
                })
                .insert(Header {
                    key: "TraceParent",
                    value: Some(value),
                })
        };
        let context = trace_context_of(&headers(
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ))
        .expect("a valid traceparent");
        assert_eq!(
            context.trace_id().to_string(),
            "0af7651916cd43dd8448eb211c80319c"
        );
        assert_eq!(context.span_id().to_string(), "b7ad6b7169203331");
        assert!(context.is_remote() && context.is_sampled());
        assert!(trace_context_of(&headers("00-not-a-trace-01")).is_none());
        assert!(trace_context_of(&OwnedHeaders::new()).is_none());
    }

    #[test]
    fn commits_the_offset_after_the_last_message_of_each_partition() {
        let mut batch = EventBatch::default();
        batch.push(event("a", 0, 10), 100, None);
        batch.push(event("a", 0, 11), 100, None);
        batch.push(event("a", 1, 3), 100, None);
        assert_eq!(batch.next_offsets()[&("a".to_owned(), 0)], 12);
        assert_eq!(batch.next_offsets()[&("a".to_owned(), 1)], 4);
        assert_eq!(batch.len(), 3);
        assert_eq!(batch.bytes(), 300);
        assert!(batch.is_full(3, 10_000));
        assert!(batch.is_full(10, 300));
        assert!(!batch.is_full(10, 301));
    }

    #[test]
    fn revoked_partitions_leave_the_batch_entirely() {
        let mut batch = EventBatch::default();
        batch.push(event("a", 0, 10), 1, None);
        batch.push(event("a", 1, 3), 1, None);
        let revoked = BTreeSet::from([("a".to_owned(), 0)]);
        assert_eq!(batch.drop_partitions(&revoked), 1);
        assert_eq!(batch.len(), 1);
        assert!(!batch.next_offsets().contains_key(&("a".to_owned(), 0)));
        batch.drop_partitions(&BTreeSet::from([("a".to_owned(), 1)]));
        assert!(batch.is_empty());
        assert!(batch.deadline(Duration::from_secs(1)).is_none());
    }
}
