-- The audit events, one row per event id (ReplacingMergeTree collapses re-deliveries; the read
-- path de-duplicates the rows not merged yet). Ordered for the read path: tenant, then time.
-- occurred_at_ms is epoch milliseconds (UTC): DateTime64 does not exist on ClickHouse 18.16.
-- Optional contract fields are Nullable so that "absent" reads back as null, not as ''.
CREATE TABLE IF NOT EXISTS audit_events
(
    organization_id      String,
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
ORDER BY (organization_id, occurred_at_ms, id);
