#!/usr/bin/env bash
# `make run`: the whole system locally. Installs what is missing, builds, starts Kafka and
# ClickHouse, starts the services (which apply the migrations), publishes demo events through
# Kafka, and runs until Ctrl-C, which stops everything it started.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

cd "$REPO_ROOT"
"$LOCAL_DIR/install.sh"
log "building the services"
cargo build --workspace --bins

SERVICES_DIR="$AUDIT_STATE_DIR/services"
mkdir -p "$SERVICES_DIR"
INGEST_PORT="${AUDIT_INGEST_HTTP_PORT:-18081}"
API_PORT="${AUDIT_API_HTTP_PORT:-18080}"
STREAMS_PORT="${AUDIT_STREAMS_HTTP_PORT:-18082}"
RECEIVER_PORT="${AUDIT_DEMO_RECEIVER_PORT:-18083}"

# Ctrl-C under `make run | tee run.log` ends the reader of our output too: a write to it must
# fail (and be ignored, see `log`) rather than kill this script before it stops the stack.
trap '' PIPE

service_pids=()
cleanup() {
  local pid
  for pid in "${service_pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "${service_pids[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  stop_started_parts_now
}

# ClickHouse and Kafka, started here unless already up (`make up`); stopped on exit if started.
ensure_stack
trap cleanup EXIT
trap 'log "stopping"; exit 0' INT TERM

export AUDIT_INGEST__KAFKA__BROKERS="127.0.0.1:$AUDIT_KAFKA_PORT"
export AUDIT_INGEST__CLICKHOUSE__URL="http://127.0.0.1:$AUDIT_CLICKHOUSE_HTTP_PORT"
export AUDIT_INGEST__HTTP_LISTEN="127.0.0.1:$INGEST_PORT"
export AUDIT_INGEST__TELEMETRY__LOG_FORMAT="${AUDIT_INGEST__TELEMETRY__LOG_FORMAT:-pretty}"
# The identity topics, plus the API's own read events (reads of the audit log are audited).
export AUDIT_INGEST__KAFKA__TOPICS="${AUDIT_IDENTITY_TOPICS// /,},$AUDIT_READS_TOPIC"
export AUDIT_API__CLICKHOUSE__URL="$AUDIT_INGEST__CLICKHOUSE__URL"
export AUDIT_API__READ_EVENTS__BROKERS="$AUDIT_INGEST__KAFKA__BROKERS"
export AUDIT_API__HTTP_LISTEN="127.0.0.1:$API_PORT"
export AUDIT_API__TELEMETRY__LOG_FORMAT="${AUDIT_API__TELEMETRY__LOG_FORMAT:-pretty}"
# Log streams: a key kept across runs (the streams' secrets are sealed with it), and loopback
# http:// destinations allowed, for the demo receiver.
if [[ ! -s "$SERVICES_DIR/streams-secret-key" ]]; then
  (umask 077; python3 -c 'import base64, os; print(base64.b64encode(os.urandom(32)).decode())' \
    >"$SERVICES_DIR/streams-secret-key")
fi
AUDIT_API__STREAMS__SECRET_KEY="$(cat "$SERVICES_DIR/streams-secret-key")"
export AUDIT_API__STREAMS__SECRET_KEY
# Erasure: a pseudonym key kept across runs (the same person keeps the same pseudonyms), the
# same for the API, the job and the ingest.
if [[ ! -s "$SERVICES_DIR/pseudonym-key" ]]; then
  (umask 077; python3 -c 'import secrets; print(secrets.token_urlsafe(36))' \
    >"$SERVICES_DIR/pseudonym-key")
fi
AUDIT_API__RETENTION__PSEUDONYM_KEY="$(cat "$SERVICES_DIR/pseudonym-key")"
export AUDIT_API__RETENTION__PSEUDONYM_KEY
export AUDIT_INGEST__RETENTION__PSEUDONYM_KEY="$AUDIT_API__RETENTION__PSEUDONYM_KEY"
export AUDIT_API__STREAMS__ALLOW_HTTP=true
export AUDIT_API__STREAMS__ALLOW_PRIVATE_DESTINATIONS=true

log "starting audit-ingest (log: $SERVICES_DIR/ingest.log)"
target/debug/audit-ingest run >"$SERVICES_DIR/ingest.log" 2>&1 &
service_pids+=($!)
wait_until 60 "audit-ingest" curl -fs "http://127.0.0.1:$INGEST_PORT/readyz" \
  || { tail -n 30 "$SERVICES_DIR/ingest.log" >&2; die "audit-ingest did not become ready"; }

log "starting audit-api (log: $SERVICES_DIR/api.log)"
target/debug/audit-api serve >"$SERVICES_DIR/api.log" 2>&1 &
service_pids+=($!)
wait_until 60 "audit-api" curl -fs "http://127.0.0.1:$API_PORT/readyz" \
  || { tail -n 30 "$SERVICES_DIR/api.log" >&2; die "audit-api did not become ready"; }
log "starting the stream worker (log: $SERVICES_DIR/streams.log)"
AUDIT_API__HTTP_LISTEN="127.0.0.1:$STREAMS_PORT" target/debug/audit-api streams run \
  >"$SERVICES_DIR/streams.log" 2>&1 &
service_pids+=($!)
wait_until 60 "the stream worker" curl -fs "http://127.0.0.1:$STREAMS_PORT/readyz" \
  || { tail -n 30 "$SERVICES_DIR/streams.log" >&2; die "the stream worker did not become ready"; }
# The demo SIEM: org_demo's webhook stream delivers to it (created once, kept across runs).
python3 "$LOCAL_DIR/demo-receiver.py" "$RECEIVER_PORT" "$SERVICES_DIR/demo-siem.log" &
service_pids+=($!)
if ! target/debug/audit-api streams list --org org_demo | grep '"name": "make run demo"' >/dev/null; then
  target/debug/audit-api streams create --org org_demo --json \
    "{\"name\": \"make run demo\", \"destination\": {\"type\": \"webhook\", \"url\": \"http://127.0.0.1:$RECEIVER_PORT/\"}}" \
    >"$SERVICES_DIR/demo-stream.json"
  chmod 600 "$SERVICES_DIR/demo-stream.json"
fi

# A fresh admin key for the demo organization on every run (shown once, stored hashed).
DEMO_KEY="$(target/debug/audit-api keys create --org org_demo --role admin --name "make run demo" --quiet)"
printf '%s\n' "$DEMO_KEY" >"$SERVICES_DIR/demo-api-key"
chmod 600 "$SERVICES_DIR/demo-api-key"

# A fixed seed and a run id per UTC day: running `make run` again the same day republishes the
# very same events (ids and times), which the ingest de-duplicates; another day adds 400 more.
DEMO_RUN="demo-$(date -u +%Y%m%d)"
log "publishing demo events through Kafka"
target/debug/audit-loadgen --brokers "127.0.0.1:$AUDIT_KAFKA_PORT" --count 400 --spread-days 7 \
  --orgs org_demo,org_acme --seed 7 --run-id "$DEMO_RUN"

count() {
  curl -fs "http://127.0.0.1:$AUDIT_CLICKHOUSE_HTTP_PORT/?database=audit" \
    --data-binary "SELECT count() FROM audit_events FINAL WHERE id LIKE 'evt_${DEMO_RUN}_%'"
}
demo_arrived() { [[ "$(count)" -ge 400 ]]; }
wait_until 60 "demo data" demo_arrived || log "demo events still arriving ($(count) of 400)"

# One run of the retention job (the chart runs it daily): demo events are days old, so it
# removes nothing unless a retention shorter than that was set.
target/debug/audit-api retention run >"$SERVICES_DIR/retention-run.json" \
  || log "the retention job failed (see above)"

cat <<MSG

  audit-logs is running locally:
    ClickHouse    http://127.0.0.1:$AUDIT_CLICKHOUSE_HTTP_PORT  (database "audit")
    Kafka         127.0.0.1:$AUDIT_KAFKA_PORT
    audit-ingest  http://127.0.0.1:$INGEST_PORT/metrics  (log: $SERVICES_DIR/ingest.log)

  $(count) demo events (run $DEMO_RUN) were published through Kafka and ingested. Read them through the API
  (admin key of org_demo, also in $SERVICES_DIR/demo-api-key):

    export KEY='$DEMO_KEY'
    curl -s -H "X-API-Key: \$KEY" 'http://127.0.0.1:$API_PORT/api/v1/organization/audit-logs?limit=5'
    curl -s -H "X-API-Key: \$KEY" 'http://127.0.0.1:$API_PORT/api/v1/organization/audit-logs?eventType=team_member.added&format=csv'
    curl -s -H "X-API-Key: \$KEY" 'http://127.0.0.1:$API_PORT/api/v1/organization/audit-logs/export?format=ndjson' | head -3

    audit-api     http://127.0.0.1:$API_PORT  (/openapi.json, /metrics; log: $SERVICES_DIR/api.log)
    streams       http://127.0.0.1:$STREAMS_PORT/metrics  (the stream worker; log: $SERVICES_DIR/streams.log)

  org_demo's log stream "make run demo" delivers its new events to a local webhook receiver,
  which writes them to $SERVICES_DIR/demo-siem.log ($(wc -l <"$SERVICES_DIR/demo-siem.log" 2>/dev/null || echo 0) so far):

    curl -s -H "X-API-Key: \$KEY" 'http://127.0.0.1:$API_PORT/api/v1/organization/audit-log-streams'

  Retention, legal holds and erasure (README "Retention, legal hold and erasure"):

    curl -s -H "X-API-Key: \$KEY" 'http://127.0.0.1:$API_PORT/api/v1/organization/audit-logs/retention'
    target/debug/audit-api retention set --org org_demo --days 3 --by you && target/debug/audit-api retention run
    target/debug/audit-api hold place --org org_acme --reason "demo hold" --by you

  More events: target/debug/audit-loadgen --count 1000
  More keys:   target/debug/audit-api keys create --org org_acme --role admin

  Press Ctrl-C to stop everything this command started.
MSG
while true; do
  sleep 3600 &
  wait $!
done
