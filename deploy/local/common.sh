#!/usr/bin/env bash
# Shared settings of the local stack: where state lives and which loopback ports it uses.
# Sourced by the other deploy/local scripts; every value can be overridden by environment.

set -euo pipefail

LOCAL_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$LOCAL_DIR/../.." && pwd)"

# One git-ignored directory holds data, logs, pid files and downloaded jars.
AUDIT_STATE_DIR="${AUDIT_STATE_DIR:-$REPO_ROOT/.state}"

# Ports sit well away from the usual 8123/9000/9092 so a developer's own servers keep theirs.
AUDIT_CLICKHOUSE_HTTP_PORT="${AUDIT_CLICKHOUSE_HTTP_PORT:-18123}"
AUDIT_CLICKHOUSE_TCP_PORT="${AUDIT_CLICKHOUSE_TCP_PORT:-19000}"
AUDIT_KAFKA_PORT="${AUDIT_KAFKA_PORT:-19092}"
AUDIT_KAFKA_CONTROLLER_PORT="${AUDIT_KAFKA_CONTROLLER_PORT:-19093}"
# The same broker over TLS and SASL (certificates from tls.sh, credentials below): SASL_SSL with
# PLAIN, SCRAM-SHA-256/512 and OAUTHBEARER; SSL with client certificates required; SASL_PLAINTEXT.
AUDIT_KAFKA_SASL_SSL_PORT="${AUDIT_KAFKA_SASL_SSL_PORT:-19094}"
AUDIT_KAFKA_SSL_PORT="${AUDIT_KAFKA_SSL_PORT:-19095}"
AUDIT_KAFKA_SASL_PLAINTEXT_PORT="${AUDIT_KAFKA_SASL_PLAINTEXT_PORT:-19096}"
# SASL user of the local broker (PLAIN and SCRAM). Local development only.
AUDIT_KAFKA_SASL_USER="${AUDIT_KAFKA_SASL_USER:-audit}"
AUDIT_KAFKA_SASL_PASSWORD="${AUDIT_KAFKA_SASL_PASSWORD:-audit-local-secret}"
# ClickHouse's HTTPS port (a TLS proxy in front of the same server, certificate from tls.sh); 0: none.
AUDIT_CLICKHOUSE_HTTPS_PORT="${AUDIT_CLICKHOUSE_HTTPS_PORT:-18443}"
AUDIT_KAFKA_VERSION="${AUDIT_KAFKA_VERSION:-4.1.1}"
AUDIT_KAFKA_HEAP="${AUDIT_KAFKA_HEAP:-512m}"

CLICKHOUSE_DIR="${AUDIT_CLICKHOUSE_DIR:-$AUDIT_STATE_DIR/clickhouse}"
# The ClickHouse engine: ClickHouse 26.9 built as a library, from the PyPI wheel chdb-core (pinned),
# in a virtual environment under the repository's .state, shared by every state directory (the
# tests' private servers run with one of their own).
AUDIT_CHDB_VERSION="${AUDIT_CHDB_VERSION:-26.9.0}"
# The oldest supported engine, on which `make test` runs the workspace's tests a second time
# (chdb-core 26.7.0 is ClickHouse 26.7.2.1; the wheels before 26.7 cannot listen on a port).
AUDIT_CHDB_FLOOR_VERSION="${AUDIT_CHDB_FLOOR_VERSION:-26.7.0}"
AUDIT_CHDB_VENV="${AUDIT_CHDB_VENV:-$REPO_ROOT/.state/chdb-$AUDIT_CHDB_VERSION}"
# The Standard Webhooks reference package (PyPI), which the stream tests verify signatures with.
AUDIT_STANDARDWEBHOOKS_VERSION="1.0.0"
AUDIT_VERIFY_VENV="${AUDIT_VERIFY_VENV:-$REPO_ROOT/.state/standardwebhooks-$AUDIT_STANDARDWEBHOOKS_VERSION}"
KAFKA_DIR="$AUDIT_STATE_DIR/kafka"
KAFKA_LIB="$AUDIT_STATE_DIR/kafka-$AUDIT_KAFKA_VERSION/lib"
TLS_DIR="$AUDIT_STATE_DIR/tls"

# Topics the services use, the shell's one copy of the names in `audit_event::topics`: the
# identity topics upstream publishes to, the ingest's dead letters, the API's read events, the
# stored events (what log streams deliver).
AUDIT_IDENTITY_TOPICS="identity.users.v1 identity.teams.v1 identity.auth.v1"
AUDIT_DEAD_LETTER_TOPIC="audit.dlq.v1"
AUDIT_READS_TOPIC="audit.reads.v1"
AUDIT_STORED_TOPIC="audit.stored.v1"
# What the stack creates: name:partitions.
AUDIT_TOPICS="${AUDIT_TOPICS:-$(printf '%s:6 ' $AUDIT_IDENTITY_TOPICS)$AUDIT_DEAD_LETTER_TOPIC:3 $AUDIT_READS_TOPIC:3 $AUDIT_STORED_TOPIC:6}"

export AUDIT_STATE_DIR AUDIT_CLICKHOUSE_HTTP_PORT AUDIT_CLICKHOUSE_TCP_PORT AUDIT_KAFKA_PORT AUDIT_CHDB_VENV

# Neither fails when stderr is gone (`make run | tee run.log`, then Ctrl-C, ends the reader
# first): a clean-up that logs must still stop what it started.
log() { printf '[local] %s\n' "$*" >&2 2>/dev/null || true; }
die() { printf '[local] error: %s\n' "$*" >&2 2>/dev/null || true; exit 1; }

# pid_alive FILE: true when FILE names a running process.
pid_alive() {
  local f="$1"
  [[ -f "$f" ]] && kill -0 "$(cat "$f")" 2>/dev/null
}

# wait_until SECONDS DESCRIPTION COMMAND...: poll COMMAND every 0.5 s.
wait_until() {
  local limit="$1" what="$2"; shift 2
  local deadline=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    if (( SECONDS >= deadline )); then
      return 1
    fi
    sleep 0.5
  done
  log "$what is ready"
}

# stop_pid FILE NAME: SIGTERM, wait up to 30 s, then SIGKILL; removes the pid file.
stop_pid() {
  local f="$1" name="$2"
  if ! pid_alive "$f"; then
    rm -f "$f"
    return 0
  fi
  local pid
  pid="$(cat "$f")"
  log "stopping $name (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  local deadline=$((SECONDS + 30))
  while kill -0 "$pid" 2>/dev/null; do
    if (( SECONDS >= deadline )); then
      log "$name did not stop in 30 s, killing it"
      kill -KILL "$pid" 2>/dev/null || true
      break
    fi
    sleep 0.2
  done
  rm -f "$f"
}

# Starts the parts of the stack that are not running and stops exactly those on exit
# (also on failure or Ctrl-C). For scripts that need the stack for a while: test, bench.
STARTED_PARTS=()
stop_started_parts_now() {
  local part
  for part in "${STARTED_PARTS[@]}"; do
    "$LOCAL_DIR/$part.sh" stop || true
  done
  STARTED_PARTS=()
}
stop_started_parts() {
  local rc=$?
  stop_started_parts_now
  exit $rc
}
ensure_stack() {
  trap stop_started_parts EXIT INT TERM
  local part
  for part in clickhouse kafka; do
    if ! "$LOCAL_DIR/$part.sh" status >/dev/null 2>&1; then
      STARTED_PARTS+=("$part")
      "$LOCAL_DIR/$part.sh" start
    elif [[ "$part" == kafka ]]; then
      # Already running (e.g. after `make up`): make sure the project's topics exist.
      "$LOCAL_DIR/kafka.sh" topics
    fi
  done
  export AUDIT_TEST_CLICKHOUSE_URL="http://127.0.0.1:$AUDIT_CLICKHOUSE_HTTP_PORT"
  export AUDIT_TEST_KAFKA_BROKERS="127.0.0.1:$AUDIT_KAFKA_PORT"
  # The TLS and SASL endpoints of the same servers, and what a client needs to reach them.
  export AUDIT_TEST_CLICKHOUSE_HTTPS_URL="https://127.0.0.1:$AUDIT_CLICKHOUSE_HTTPS_PORT"
  export AUDIT_TEST_KAFKA_SASL_SSL_BROKERS="127.0.0.1:$AUDIT_KAFKA_SASL_SSL_PORT"
  export AUDIT_TEST_KAFKA_SSL_BROKERS="127.0.0.1:$AUDIT_KAFKA_SSL_PORT"
  export AUDIT_TEST_KAFKA_SASL_PLAINTEXT_BROKERS="127.0.0.1:$AUDIT_KAFKA_SASL_PLAINTEXT_PORT"
  export AUDIT_TEST_KAFKA_SASL_USER="$AUDIT_KAFKA_SASL_USER"
  export AUDIT_TEST_KAFKA_SASL_PASSWORD="$AUDIT_KAFKA_SASL_PASSWORD"
  export AUDIT_TEST_TLS_DIR="$TLS_DIR"
  export AUDIT_TEST_KAFKA_DATA_DIR="$KAFKA_DIR/data"
  export AUDIT_TEST_KAFKA_LIB="$KAFKA_LIB"
  export AUDIT_TEST_WEBHOOK_VERIFIER="$AUDIT_VERIFY_VENV/bin/python $REPO_ROOT/deploy/tests/verify_webhooks.py"
}
