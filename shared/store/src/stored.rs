//! The stored-events topic (`audit_event::topics::STORED`): every event the ingest has stored,
//! published after its insert and before the ingest commits its source offsets, so that nothing
//! stored is missing from it (a crash in between publishes the batch again: at least once).
//!
//! Messages: key = organization id, value = the stored row ([`AuditEventRow`]) as JSON, in the
//! partition [`partition_of`] gives, so that one organization's events are in one partition in
//! the order the ingest stored them, and a log stream's position is one offset. The mapping
//! depends on the partition count: never change the topic's partition count (create a new
//! topic and point both services at it instead).

use sha2::{Digest, Sha256};

use crate::AuditEventRow;

/// The partition of `organization_id`'s events in a topic of `partitions` partitions: the first
/// four bytes of its SHA-256, big-endian, modulo the count. Stable across releases (a test pins
/// it): the ingest writes with it and the stream workers find a stream's partition with it.
pub fn partition_of(organization_id: &str, partitions: i32) -> i32 {
    let digest = Sha256::digest(organization_id.as_bytes());
    let head = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]);
    (head % partitions.max(1) as u32) as i32
}

/// The message value of a stored event.
pub fn encode(row: &AuditEventRow) -> Vec<u8> {
    serde_json::to_vec(row).expect("a row serializes")
}

/// A stored event from its message value.
pub fn decode(payload: &[u8]) -> Result<AuditEventRow, serde_json::Error> {
    serde_json::from_slice(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_pinned() {
        // Changing the function moves organizations between partitions under running streams.
        let got: Vec<i32> = ["org_acme", "org_globex", "org_initech", ""]
            .iter()
            .map(|org| partition_of(org, 6))
            .collect();
        assert_eq!(got, PINNED);
        for org in ["a", "b", "org_1"] {
            assert!((0..6).contains(&partition_of(org, 6)));
            assert_eq!(partition_of(org, 1), 0);
        }
    }

    // From Python: int.from_bytes(hashlib.sha256(org.encode()).digest()[:4], "big") % 6.
    const PINNED: [i32; 4] = [0, 0, 3, 2];

    #[test]
    fn rows_round_trip() {
        let row = AuditEventRow {
            organization_id: "org_acme".into(),
            id: "evt_1".into(),
            actor_email: Some("a\"b@example.com".into()),
            metadata: None,
            ..AuditEventRow::default()
        };
        assert_eq!(decode(&encode(&row)).unwrap(), row);
    }
}
