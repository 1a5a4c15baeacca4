-- Log streams (README "Log streams"): each organization's destinations, and where each stands.
--
-- audit_log_streams: one row per version of a stream's settings, written by the API and the
-- CLI; the highest version wins (readers take FINAL or argMax, merges are asynchronous). A
-- deleted stream keeps a last version with deleted = 1. `settings` is the destination's
-- non-secret JSON (endpoint, payload form, filters, the kind's options); `secrets` holds its
-- secrets encrypted (AES-256-GCM under the operator's stream key, bound to the stream id).
-- replay_seq / replay_from_ms: the newest replay request, which a worker follows once.
CREATE TABLE IF NOT EXISTS audit_log_streams
(
    organization_id  String,
    stream_id        String,
    version          UInt64,
    name             String,
    kind             String,
    settings         String,
    secrets          String,
    paused           UInt8,
    deleted          UInt8,
    replay_seq       UInt64,
    replay_from_ms   Int64,
    created_at_ms    Int64,
    updated_at_ms    Int64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (organization_id, stream_id);

-- Where each stream stands, written by the stream worker that owns it: its position in the
-- stored-events topic (partition and next offset to deliver), the replay request and the
-- settings version it follows, and its health. written_at_us orders versions; the newest wins.
CREATE TABLE IF NOT EXISTS audit_log_stream_state
(
    organization_id       String,
    stream_id             String,
    written_at_us         UInt64,
    replay_seq            UInt64,
    config_version        UInt64,
    partition             Int32,
    next_offset           Int64,
    state                 String,
    delivered_events      UInt64,
    last_delivered_at_ms  Int64,
    last_error_status     Int32,
    last_error            String,
    last_error_at_ms      Int64,
    failing_since_ms      Int64,
    lag_events            Int64,
    lag_ms                Int64
)
ENGINE = ReplacingMergeTree(written_at_us)
ORDER BY (organization_id, stream_id);
