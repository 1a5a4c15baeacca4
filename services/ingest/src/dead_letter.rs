//! The dead-letter topic: invalid messages go there with their original key and bytes and
//! headers giving the reason and the source position. A batch's dead letters are acknowledged by
//! Kafka before any offset past them is committed.

use std::time::Duration;

use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;

use crate::batch::DeadLetter;
use crate::kafka::DeadLetterClient;
use crate::metrics::IngestMetrics;
use crate::retry::Retry;

pub const HEADER_REASON: &str = "dlq.reason";
pub const HEADER_DETAIL: &str = "dlq.detail";
pub const HEADER_SOURCE_TOPIC: &str = "dlq.source.topic";
pub const HEADER_SOURCE_PARTITION: &str = "dlq.source.partition";
pub const HEADER_SOURCE_OFFSET: &str = "dlq.source.offset";

/// Longest `dlq.detail` header; parser messages quote input, which may be large.
const MAX_DETAIL_BYTES: usize = 1024;

pub struct DeadLetterProducer {
    producer: DeadLetterClient,
    topic: String,
    metrics: IngestMetrics,
    retry: Retry,
}

impl DeadLetterProducer {
    pub fn new(
        producer: DeadLetterClient,
        topic: String,
        metrics: IngestMetrics,
        retry: Retry,
    ) -> Self {
        Self {
            producer,
            topic,
            metrics,
            retry,
        }
    }

    /// Produces every letter and waits for all acknowledgements, retrying failed sends.
    pub async fn send_all(&self, letters: &[DeadLetter]) -> Result<(), KafkaError> {
        if letters.is_empty() {
            return Ok(());
        }
        let sends = letters.iter().map(|letter| self.send_with_retry(letter));
        let results = futures_util::future::join_all(sends).await;
        for (letter, result) in letters.iter().zip(results) {
            result?;
            self.metrics
                .dead_lettered
                .with_label_values(&[letter.source.topic.as_str(), letter.error.reason.as_str()])
                .inc();
        }
        Ok(())
    }

    /// Sends until Kafka acknowledges or refuses the message itself.
    async fn send_with_retry(&self, letter: &DeadLetter) -> Result<(), KafkaError> {
        self.retry
            .run(
                "dead_letter_produce",
                || self.send(letter),
                |err| !is_permanent(err),
            )
            .await
    }

    async fn send(&self, letter: &DeadLetter) -> Result<(), KafkaError> {
        let partition = letter.source.partition.to_string();
        let offset = letter.source.offset.to_string();
        let detail = truncate(&letter.error.detail, MAX_DETAIL_BYTES);
        let mut headers = OwnedHeaders::new();
        for (key, value) in &letter.headers {
            headers = headers.insert(Header {
                key: key.as_str(),
                value: value.as_deref(),
            });
        }
        for (key, value) in [
            (HEADER_REASON, letter.error.reason.as_str()),
            (HEADER_DETAIL, detail),
            (HEADER_SOURCE_TOPIC, letter.source.topic.as_str()),
            (HEADER_SOURCE_PARTITION, partition.as_str()),
            (HEADER_SOURCE_OFFSET, offset.as_str()),
        ] {
            headers = headers.insert(Header {
                key,
                value: Some(value.as_bytes()),
            });
        }
        let mut record: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(&self.topic).headers(headers);
        if let Some(key) = &letter.key {
            record = record.key(key.as_slice());
        }
        if let Some(payload) = &letter.payload {
            record = record.payload(payload.as_slice());
        }
        self.producer
            .send(record, Duration::from_secs(30))
            .await
            .map(|_| ())
            .map_err(|(err, _)| err)
    }
}

/// Errors that no retry can fix (the message itself is refused).
pub(crate) fn is_permanent(err: &KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode as Code;
    matches!(
        err.rdkafka_error_code(),
        Some(Code::MessageSizeTooLarge | Code::InvalidRecord | Code::TopicAuthorizationFailed)
    )
}

fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncates_on_a_character_boundary() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("héllo", 3), "hé");
        assert_eq!(truncate("abc", 10), "abc");
    }
}
