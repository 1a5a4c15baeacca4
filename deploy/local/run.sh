#!/usr/bin/env bash
# `make run`: the whole system locally. Installs what is missing, builds, starts the stack,
# applies the ClickHouse migrations, and keeps running until Ctrl-C, which stops what it started.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

cd "$REPO_ROOT"
"$LOCAL_DIR/install.sh"
log "building the services"
cargo build --workspace --bins

started=()
cleanup() {
  local part
  for part in "${started[@]}"; do
    "$LOCAL_DIR/$part.sh" stop || true
  done
}
trap cleanup EXIT
trap 'log "stopping"; exit 0' INT TERM

for part in clickhouse kafka; do
  if ! "$LOCAL_DIR/$part.sh" status >/dev/null 2>&1; then
    started+=("$part")
    "$LOCAL_DIR/$part.sh" start
  fi
done

export AUDIT_INGEST__CLICKHOUSE__URL="http://127.0.0.1:$AUDIT_CLICKHOUSE_HTTP_PORT"
export AUDIT_INGEST__TELEMETRY__LOG_FORMAT=pretty
target/debug/audit-ingest migrate

cat <<MSG

  The local stack is up:
    ClickHouse  http://127.0.0.1:$AUDIT_CLICKHOUSE_HTTP_PORT  (database "audit", migrations applied)
    Kafka       127.0.0.1:$AUDIT_KAFKA_PORT  (topics: $AUDIT_TOPICS)

  The ingest and read services are not built yet (issues 3 and 4); this command will start
  them, publish demo events and print ready-to-paste curl commands once they exist.

  Press Ctrl-C to stop what this command started.
MSG
while true; do
  sleep 3600 &
  wait $!
done
