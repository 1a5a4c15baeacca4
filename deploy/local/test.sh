#!/usr/bin/env bash
# `make test`: installs what is missing, starts the parts of the stack that are not running,
# runs every test of the workspace against them, and stops what it started (also on failure).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

"$LOCAL_DIR/install.sh"

started=()
cleanup() {
  local rc=$?
  local part
  for part in "${started[@]}"; do
    "$LOCAL_DIR/$part.sh" stop || true
  done
  exit $rc
}
trap cleanup EXIT INT TERM

for part in clickhouse kafka; do
  if ! "$LOCAL_DIR/$part.sh" status >/dev/null 2>&1; then
    started+=("$part")
    "$LOCAL_DIR/$part.sh" start
  else
    # Already running (e.g. after `make up`): make sure the project's topics exist.
    [[ "$part" == kafka ]] && "$LOCAL_DIR/kafka.sh" topics
  fi
done

export AUDIT_TEST_CLICKHOUSE_URL="http://127.0.0.1:$AUDIT_CLICKHOUSE_HTTP_PORT"
export AUDIT_TEST_KAFKA_BROKERS="127.0.0.1:$AUDIT_KAFKA_PORT"
cd "$REPO_ROOT"
# Unit, integration and doc tests (not the benchmarks: `make bench`).
cargo test --workspace "$@"
