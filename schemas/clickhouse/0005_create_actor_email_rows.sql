-- Full copies of the events sorted by (organization, lower-cased actor email, time, id), kept by
-- a materialized view. A page filtered by actor email reads its keys from 0004's key-only table
-- and then its rows by id from audit_events, where one actor's events lie spread among every
-- other actor's: the 50 newest events of one actor of a large organization span days, and
-- ClickHouse decompresses every column around each of them (about twice the time of the rest of
-- the request on the benchmark data). Here one actor's events of a time range are contiguous, so
-- keys, counts, rows and exports filtered by actor email read only that range. It costs a second
-- copy of the events on disk and a second write per insert.
-- Replaces audit_events_by_actor_email for readers; that table and its view are left in place so
-- that API replicas of the previous release keep answering during a rolling upgrade; a later
-- migration drops them.
-- ReplacingMergeTree and readers that de-duplicate make every insert idempotent, as in 0004.
CREATE TABLE IF NOT EXISTS audit_events_by_actor_email_rows
(
    organization_id      String,
    actor_email_key      String,
    occurred_at_ms       Int64,
    id                   String,
    event_type           String,
    actor_id             String,
    actor_type           String,
    actor_email          Nullable(String),
    actor_name           Nullable(String),
    resource_type        String,
    resource_id          String,
    resource_name        Nullable(String),
    affected_user_id     Nullable(String),
    affected_user_email  Nullable(String),
    changes              String,
    context_ip           Nullable(String),
    context_user_agent   Nullable(String),
    context_request_id   Nullable(String),
    context_location     Nullable(String),
    metadata             Nullable(String),
    source_topic         String,
    source_partition     Int32,
    source_offset        Int64,
    ingested_at_ms       UInt64
)
ENGINE = ReplacingMergeTree(ingested_at_ms)
PARTITION BY toYYYYMM(toDateTime(intDiv(occurred_at_ms, 1000), 'UTC'))
ORDER BY (organization_id, actor_email_key, occurred_at_ms, id);

-- actor_email_key: the email lower-cased (the API matches it case-insensitively); '' for events
-- without an actor email (never a valid filter value). Columns listed in the table's order: the
-- view matches them by name, but the back-fill's INSERT ... SELECT by position.
CREATE MATERIALIZED VIEW IF NOT EXISTS audit_events_by_actor_email_rows_mv TO audit_events_by_actor_email_rows AS
SELECT organization_id, lowerUTF8(ifNull(actor_email, '')) AS actor_email_key, occurred_at_ms, id, event_type, actor_id, actor_type, actor_email, actor_name, resource_type, resource_id, resource_name, affected_user_id, affected_user_email, changes, context_ip, context_user_agent, context_request_id, context_location, metadata, source_topic, source_partition, source_offset, ingested_at_ms FROM audit_events;

-- Back-fill of the events stored before the view existed.
INSERT INTO audit_events_by_actor_email_rows SELECT organization_id, lowerUTF8(ifNull(actor_email, '')) AS actor_email_key, occurred_at_ms, id, event_type, actor_id, actor_type, actor_email, actor_name, resource_type, resource_id, resource_name, affected_user_id, affected_user_email, changes, context_ip, context_user_agent, context_request_id, context_location, metadata, source_topic, source_partition, source_offset, ingested_at_ms FROM audit_events;
