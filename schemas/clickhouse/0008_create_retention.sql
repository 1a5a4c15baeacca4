-- Retention, legal hold and erasure (README "Retention, legal hold and erasure"). Written by the
-- operator's CLI (`audit-api retention|hold|erase`) and by the retention job; read by the API
-- (which events an organization still sees), the stream worker and the ingest.
--
-- audit_retention_policies: each organization's retention in days, one row per version (the
-- highest wins: readers take argMax, merges are asynchronous). days = 0 is a version that
-- clears the organization's own value: the configured default applies again.
CREATE TABLE IF NOT EXISTS audit_retention_policies
(
    organization_id  String,
    version          UInt64,
    days             UInt32,
    set_by           String,
    set_at_ms        Int64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY organization_id;

-- Legal holds: while a hold stands (lifted_at_ms is null), nothing in its range is removed, by
-- retention or by erasure, and its events stay readable. An open bound (null) reaches the
-- oldest or the newest event. One row per version of a hold (placed, then lifted).
CREATE TABLE IF NOT EXISTS audit_legal_holds
(
    organization_id  String,
    hold_id          String,
    version          UInt64,
    from_ms          Nullable(Int64),
    to_ms            Nullable(Int64),
    reason           String,
    placed_by        String,
    placed_at_ms     Int64,
    lifted_by        String,
    lifted_at_ms     Nullable(Int64)
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (organization_id, hold_id);

-- Erasures of a person (an organization's user id): one row per version of the job's progress.
-- A job is 'running' from its first step to its last, then 'done'; a running job left by a
-- crashed process is finished by the next retention run (or the same erase command). Never
-- holds an erased value: the subject is the user id, which the events keep.
CREATE TABLE IF NOT EXISTS audit_erasures
(
    organization_id  String,
    user_id          String,
    erasure_id       String,
    version          UInt64,
    requested_by     String,
    requested_at_ms  Int64,
    state            String,
    step             UInt32,
    events           UInt64,
    finished_at_ms   Int64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (organization_id, user_id, erasure_id);

-- Each run of the retention job: when it started and ended, and how many stored rows it removed
-- from the events table (its copies lose the same events).
CREATE TABLE IF NOT EXISTS audit_retention_runs
(
    run_id           String,
    started_at_ms    Int64,
    finished_at_ms   Int64,
    organizations    UInt32,
    removed_rows     UInt64,
    error            String
)
ENGINE = MergeTree
ORDER BY (started_at_ms, run_id);
