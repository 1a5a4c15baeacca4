#!/usr/bin/env bash
# A sharded ClickHouse on this machine: AUDIT_SHARDS (2) engines of the pinned 26.9 wheel, each
# a clickhouse.sh process of its own (own directory and ports, no HTTPS), each knowing the
# cluster `audit_shards` of one replica per shard. The engine refuses ON CLUSTER and Replicated*
# tables (it runs no distributed DDL worker and no replication threads), so this is the layout of
# clickhouse.cluster_replicated = false: the migrations runner creates the tables on every server
# in turn (clickhouse.cluster_nodes) and the services read and write through the Distributed
# tables of the first. `make test` runs the store's and the API's tests on it.
# Usage: clickhouse-shards.sh start|stop|status|env
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

SHARDS="${AUDIT_SHARDS:-2}"
HTTP_BASE="${AUDIT_SHARDS_HTTP_PORT:-18130}"
TCP_BASE="${AUDIT_SHARDS_TCP_PORT:-19010}"
CLUSTER=audit_shards

remote_servers() {
  local xml="<$CLUSTER>"
  for ((i = 1; i <= SHARDS; i++)); do
    xml+="<shard><replica><host>127.0.0.1</host><port>$((TCP_BASE + i))</port></replica></shard>"
  done
  echo "$xml</$CLUSTER>"
}

each() {
  local action=$1 status=0
  for ((i = 1; i <= SHARDS; i++)); do
    AUDIT_CLICKHOUSE_DIR="$AUDIT_STATE_DIR/clickhouse-shard$i" \
    AUDIT_CLICKHOUSE_HTTP_PORT=$((HTTP_BASE + i)) \
    AUDIT_CLICKHOUSE_TCP_PORT=$((TCP_BASE + i)) \
    AUDIT_CLICKHOUSE_HTTPS_PORT=0 \
    AUDIT_CLICKHOUSE_REMOTE_SERVERS="$(remote_servers)" \
      "$LOCAL_DIR/clickhouse.sh" "$action" || status=1
  done
  return "$status"
}

# The test settings for this cluster (audit_testkit::clickhouse_config reads them).
test_env() {
  local nodes=()
  for ((i = 1; i <= SHARDS; i++)); do nodes+=("http://127.0.0.1:$((HTTP_BASE + i))"); done
  echo "AUDIT_TEST_CLICKHOUSE_URL=${nodes[0]}"
  echo "AUDIT_TEST_CLICKHOUSE_CLUSTER=$CLUSTER"
  echo "AUDIT_TEST_CLICKHOUSE_CLUSTER_NODES=$(IFS=,; echo "${nodes[*]}")"
}

case "${1:-}" in
  start) each start ;;
  stop) each stop ;;
  status) each status ;;
  env) test_env ;;
  *) die "usage: $0 start|stop|status|env" ;;
esac
