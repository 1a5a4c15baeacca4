-- Key-only copies of audit_events sorted by a filter column first, kept by materialized views:
-- ClickHouse 18.16 has no secondary indexes, so a page or a count filtered by event type or by
-- actor email over a large organization would otherwise scan that column for every event of the
-- organization. With (organization, filter value, time, id) as the sort key it reads only the
-- matching rows. The full rows are then read from audit_events by (time, id).
-- ReplacingMergeTree and readers that de-duplicate make every insert here idempotent, so the
-- back-fill below can run twice (two replicas migrating at once) without changing any answer.
CREATE TABLE IF NOT EXISTS audit_events_by_type
(
    organization_id  String,
    event_type       String,
    occurred_at_ms   Int64,
    id               String
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(toDateTime(intDiv(occurred_at_ms, 1000), 'UTC'))
ORDER BY (organization_id, event_type, occurred_at_ms, id);

CREATE MATERIALIZED VIEW IF NOT EXISTS audit_events_by_type_mv TO audit_events_by_type AS
SELECT organization_id, event_type, occurred_at_ms, id FROM audit_events;

-- actor_email lower-cased: the API matches it case-insensitively. Events without an actor email
-- land under '' (never a valid filter value).
CREATE TABLE IF NOT EXISTS audit_events_by_actor_email
(
    organization_id  String,
    actor_email      String,
    occurred_at_ms   Int64,
    id               String
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(toDateTime(intDiv(occurred_at_ms, 1000), 'UTC'))
ORDER BY (organization_id, actor_email, occurred_at_ms, id);

CREATE MATERIALIZED VIEW IF NOT EXISTS audit_events_by_actor_email_mv TO audit_events_by_actor_email AS
SELECT organization_id, lowerUTF8(ifNull(actor_email, '')) AS actor_email, occurred_at_ms, id FROM audit_events;

-- Back-fill of the events stored before the views existed.
INSERT INTO audit_events_by_type SELECT organization_id, event_type, occurred_at_ms, id FROM audit_events;

INSERT INTO audit_events_by_actor_email SELECT organization_id, lowerUTF8(ifNull(actor_email, '')), occurred_at_ms, id FROM audit_events;
