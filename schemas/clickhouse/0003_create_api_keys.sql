-- API keys of the read service. Only a SHA-256 hash of the secret is stored; the key itself is
-- shown once by `audit-api keys create`. Every change (creation, revocation) inserts a new
-- version of the row; readers take the highest version per key_id (FINAL), merges keep it.
CREATE TABLE IF NOT EXISTS api_keys
(
    key_id           String,
    organization_id  String,
    role             String,
    name             String,
    secret_sha256    String,
    created_at_ms    Int64,
    revoked_at_ms    Nullable(Int64),
    version          UInt64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY key_id;

-- When each key was last used, kept apart from api_keys so that a usage update can never
-- overwrite a revocation written at the same moment by another replica.
CREATE TABLE IF NOT EXISTS api_key_usage
(
    key_id           String,
    last_used_at_ms  Int64
)
ENGINE = ReplacingMergeTree(last_used_at_ms)
ORDER BY key_id;
