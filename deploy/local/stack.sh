#!/usr/bin/env bash
# The local stack as a whole: ClickHouse + Kafka on loopback.
# Usage: stack.sh up|down|status|logs
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

up() {
  local started=$SECONDS
  "$LOCAL_DIR/install.sh"
  "$LOCAL_DIR/clickhouse.sh" start
  "$LOCAL_DIR/kafka.sh" start
  log "stack up in $((SECONDS - started)) s: clickhouse http://127.0.0.1:$AUDIT_CLICKHOUSE_HTTP_PORT, kafka 127.0.0.1:$AUDIT_KAFKA_PORT"
}

down() {
  "$LOCAL_DIR/kafka.sh" stop
  "$LOCAL_DIR/clickhouse.sh" stop
}

status() {
  local rc=0
  "$LOCAL_DIR/clickhouse.sh" status || rc=1
  "$LOCAL_DIR/kafka.sh" status || rc=1
  return $rc
}

logs() {
  local f
  for f in "$CLICKHOUSE_DIR/log/clickhouse.err.log" "$KAFKA_DIR/log/server.log" "$AUDIT_STATE_DIR"/services/*.log; do
    [[ -f "$f" ]] || continue
    printf '==> %s <==\n' "$f"
    tail -n "${LINES:-40}" "$f"
  done
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  logs) logs ;;
  *) die "usage: $0 up|down|status|logs" ;;
esac
