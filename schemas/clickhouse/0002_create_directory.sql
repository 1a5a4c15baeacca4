-- The directory projection: the latest (user id -> email) and (team id -> name) fact per
-- organization, folded from the events themselves. A fact is inserted only when it is newer
-- than what the writer knows, so merges (which keep the row with the largest occurred_at_ms)
-- leave one row per id; readers still take the latest row explicitly with
-- ORDER BY occurred_at_ms DESC, event_id DESC LIMIT 1 BY id, since merging is asynchronous.
-- Rebuilt by replaying the topics (audit-ingest replay).
CREATE TABLE IF NOT EXISTS directory_users
(
    organization_id  String,
    user_id          String,
    email            String,
    occurred_at_ms   Int64,
    event_id         String
)
ENGINE = ReplacingMergeTree(occurred_at_ms)
ORDER BY (organization_id, user_id);

CREATE TABLE IF NOT EXISTS directory_teams
(
    organization_id  String,
    team_id          String,
    name             String,
    occurred_at_ms   Int64,
    event_id         String
)
ENGINE = ReplacingMergeTree(occurred_at_ms)
ORDER BY (organization_id, team_id);
