#!/usr/bin/env bash
# `make test`: installs what is missing, starts the parts of the stack that are not running,
# runs every test of the workspace against them, and stops what it started (also on failure).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

"$LOCAL_DIR/install.sh"
ensure_stack
cd "$REPO_ROOT"
output="$AUDIT_STATE_DIR/test-output.log"
# Unit, integration and doc tests (not the benchmarks: `make bench`).
set +e
cargo test --workspace "$@" 2>&1 | tee "$output"
status=${PIPESTATUS[0]}
# Schema-driven fuzzing of the read API (schemathesis), when the workspace tests passed.
fuzz="not run"
if (( status == 0 )); then
  if "$LOCAL_DIR/fuzz-api.sh"; then fuzz="passed"; else fuzz="FAILED"; status=1; fi
fi
# Helm chart, Dockerfile, Compose file, dashboard and alert rules (offline; see the script).
deploy="not run"
if (( status == 0 )); then
  if "$LOCAL_DIR/check-deploy.sh"; then deploy="passed"; else deploy="FAILED"; status=1; fi
fi
passed_in() { awk '/^test result:/ { for (i = 1; i <= NF; i++) if ($(i+1) ~ /^passed/) p += $i } END { print p }' "$1"; }
test_args=("$@")

# stage NAME SKIP_VARIABLE SCRIPT [VAR=VALUE...]: unless a step failed before or SKIP_VARIABLE
# is 1, runs SCRIPT (bash with `set -e`, common.sh sourced, the environment given, the test
# arguments as "$@"), its output in $AUDIT_STATE_DIR/test-output-NAME.log; sets the variable
# NAME to "passed (N tests)", "FAILED" (and status) or "not run".
stage() {
  local name=$1 skip=$2 script=$3
  shift 3
  printf -v "$name" '%s' "not run"
  if (( status != 0 )) || [[ "${!skip:-0}" == 1 ]]; then return 0; fi
  local out="$AUDIT_STATE_DIR/test-output-$name.log"
  if env "$@" bash -c "set -e; source \"\$0/common.sh\"; $script" "$LOCAL_DIR" "${test_args[@]}" 2>&1 \
    | tee "$out"; (( PIPESTATUS[0] == 0 )); then
    printf -v "$name" 'passed (%s tests)' "$(passed_in "$out")"
  else
    printf -v "$name" '%s' FAILED
    status=1
  fi
}

# The same tests on the oldest supported engine (AUDIT_CHDB_FLOOR_VERSION), a second ClickHouse
# of its own on other ports, with its HTTPS front; Kafka is shared. AUDIT_SKIP_FLOOR=1 skips it.
stage floor AUDIT_SKIP_FLOOR '
  "$LOCAL_DIR/install.sh"
  "$LOCAL_DIR/clickhouse.sh" start
  trap "\"$LOCAL_DIR/clickhouse.sh\" stop" EXIT
  log "the workspace tests again, on ClickHouse $(curl -fsS "http://127.0.0.1:$AUDIT_CLICKHOUSE_HTTP_PORT/?query=SELECT%20version()")"
  AUDIT_TEST_CLICKHOUSE_URL="http://127.0.0.1:$AUDIT_CLICKHOUSE_HTTP_PORT" \
  AUDIT_TEST_CLICKHOUSE_HTTPS_URL="https://127.0.0.1:$AUDIT_CLICKHOUSE_HTTPS_PORT" \
    cargo test --workspace "$@"' \
  AUDIT_CHDB_VERSION="$AUDIT_CHDB_FLOOR_VERSION" \
  AUDIT_CHDB_VENV="$REPO_ROOT/.state/chdb-$AUDIT_CHDB_FLOOR_VERSION" \
  AUDIT_CLICKHOUSE_DIR="$AUDIT_STATE_DIR/clickhouse-floor" \
  AUDIT_CLICKHOUSE_HTTP_PORT="${AUDIT_FLOOR_HTTP_PORT:-18124}" \
  AUDIT_CLICKHOUSE_TCP_PORT="${AUDIT_FLOOR_TCP_PORT:-19001}" \
  AUDIT_CLICKHOUSE_HTTPS_PORT="${AUDIT_FLOOR_HTTPS_PORT:-18444}"

# The store's, the API's and the ingest's integration tests again through a sharded ClickHouse:
# two engines as the shards of the Distributed tables (deploy/local/clickhouse-shards.sh).
# AUDIT_SKIP_SHARDS=1 skips it.
stage sharded AUDIT_SKIP_SHARDS '
  "$LOCAL_DIR/clickhouse-shards.sh" start
  trap "\"$LOCAL_DIR/clickhouse-shards.sh\" stop" EXIT
  export $("$LOCAL_DIR/clickhouse-shards.sh" env)
  log "the store, API and ingest tests again, through the shards of $AUDIT_TEST_CLICKHOUSE_CLUSTER_NODES"
  cargo test -p audit-store -p audit-api "$@"
  cargo test -p audit-ingest --test ingest --test collapse "$@"'

# The migrations runner's replicated layout (ON CLUSTER, Replicated* engines) on a cluster of
# two shards of two replicas with ZooKeeper (deploy/local/clickhouse-replicated.sh): Debian's
# 18.16 servers, since the current engine cannot run distributed DDL or replication; the
# services' queries need 26.7+, so only the store's migration tests and the ingest's collapse of
# copies (plain SQL that 18.16 runs too) run there. AUDIT_SKIP_REPLICATED=1 skips it.
stage replicated AUDIT_SKIP_REPLICATED '
  "$LOCAL_DIR/clickhouse-replicated.sh" start
  trap "\"$LOCAL_DIR/clickhouse-replicated.sh\" stop" EXIT
  export $("$LOCAL_DIR/clickhouse-replicated.sh" env)
  log "the migration and collapse tests again, on the replicated cluster of $AUDIT_TEST_CLICKHOUSE_REPLICATED_SERVERS"
  # Two tests at a time: each runs every migration ON CLUSTER, and 18.16 servers run their
  # distributed DDL queue one task at a time.
  RUST_TEST_THREADS=2 cargo test -p audit-store --test migrations "$@"
  cargo test -p audit-ingest --test collapse "$@"'
set -e
stop_started_parts_now
# One closing line for the whole workspace (cargo prints one per test binary).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$output"
echo "api fuzz (schemathesis, every check; generated client walks by cursor): $fuzz"
echo "deploy checks (helm, kubernetes-validate, images, compose, dashboards): $deploy"
echo "the same tests on ClickHouse $AUDIT_CHDB_FLOOR_VERSION (the oldest supported engine): $floor"
echo "the store, API and ingest tests through a sharded ClickHouse (2 shards, Distributed tables): $sharded"
echo "the migration and collapse tests on a replicated cluster (ON CLUSTER, 2 shards x 2 replicas, ZooKeeper, ClickHouse 18.16): $replicated"
exit "$status"
