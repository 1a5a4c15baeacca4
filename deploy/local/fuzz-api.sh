#!/usr/bin/env bash
# Schema-driven fuzzing of the API (reads and log-stream management): schemathesis (from PyPI, pinned) generates requests
# from schemas/openapi/audit-logs.openapi.json and sends them to a real audit-api in front of
# the local ClickHouse, seeded with events. Fails on any 5xx, any response that breaks the
# document, and any schema-violating request that is accepted. Part of `make test`.
#
# Every schemathesis check runs, "schema-valid request rejected" included. The two rules OpenAPI
# cannot state (a cursor is a token this service issued; from is before to) are kept out of the
# generated requests by deploy/tests/fuzz_hooks.py. Real cursors: a client generated from the
# document (openapi-python-client, pinned, as a user would generate one) walks every page by
# cursor (deploy/tests/generated_client.py); generated clients send every parameter's default.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

SCHEMATHESIS_VERSION="4.32.5"
OPENAPI_CLIENT_VERSION="0.29.1"
VENV="$AUDIT_STATE_DIR/venv"
CLIENT_VENV="$AUDIT_STATE_DIR/client-venv"
SEED="${AUDIT_FUZZ_SEED:-20261127}"
EXAMPLES="${AUDIT_FUZZ_EXAMPLES:-150}"

cd "$REPO_ROOT"
if ! "$VENV/bin/schemathesis" --version 2>/dev/null | grep -q "$SCHEMATHESIS_VERSION"; then
  log "installing schemathesis $SCHEMATHESIS_VERSION into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
fi
if ! "$CLIENT_VENV/bin/openapi-python-client" --version 2>/dev/null | grep -q "$OPENAPI_CLIENT_VERSION"; then
  log "installing openapi-python-client $OPENAPI_CLIENT_VERSION into $CLIENT_VENV"
  python3 -m venv "$CLIENT_VENV"
  "$CLIENT_VENV/bin/pip" install -q --disable-pip-version-check "openapi-python-client==$OPENAPI_CLIENT_VERSION"
fi
cargo build -q -p audit-api --bin audit-api

port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
database="audit_fuzz_$(date +%s)_$$"
ch="http://127.0.0.1:$AUDIT_CLICKHOUSE_HTTP_PORT"
export AUDIT_API__HTTP_LISTEN="127.0.0.1:$port"
export AUDIT_API__CLICKHOUSE__URL="$ch"
export AUDIT_API__CLICKHOUSE__DATABASE="$database"
export AUDIT_API__READ_EVENTS__ENABLED=false
# Log streams on (a throwaway key): their management endpoints are fuzzed too.
AUDIT_API__STREAMS__SECRET_KEY="$(python3 -c 'import base64, os; print(base64.b64encode(os.urandom(32)).decode())')"
export AUDIT_API__STREAMS__SECRET_KEY
export AUDIT_API__RATE_LIMIT__REQUESTS_PER_SECOND=0
# The events below date from 2025: held under the longest retention.
export AUDIT_API__RETENTION__DEFAULT_DAYS=3650
export AUDIT_API__TELEMETRY__LOG_FILTER=warn
api_log="$AUDIT_STATE_DIR/fuzz-api.log"

target/debug/audit-api serve >"$api_log" 2>&1 &
api_pid=$!
cleanup() {
  kill -TERM "$api_pid" 2>/dev/null || true
  wait "$api_pid" 2>/dev/null || true
  curl -fs "$ch/" --data-binary "DROP DATABASE IF EXISTS $database" >/dev/null || true
}
trap cleanup EXIT
wait_until 60 "audit-api" curl -fs "http://127.0.0.1:$port/readyz" \
  || { tail -n 20 "$api_log" >&2; die "audit-api did not start"; }
key="$(target/debug/audit-api keys create --org org_fuzz --role admin --name fuzz --quiet)"

# Events with every optional field both present and absent, formulas, quotes and Unicode.
curl -fs "$ch/?database=$database" --data-binary "INSERT INTO audit_events SELECT
  'org_fuzz', 1735689600000 + number * 60000, concat('evt_', toString(number)),
  ['user.created', 'team_member.added', 'role.assigned', 'user.logged_in'][number % 4 + 1],
  concat('usr_', toString(number % 7)), 'user',
  if(number % 3 = 0, NULL, concat('User', toString(number % 7), '@Acme.example')),
  if(number % 5 = 0, '=HYPERLINK(\"x\")', 'Zoë, \"the\" admin'),
  ['team', 'user', 'role', 'organization'][number % 4 + 1], concat('res_', toString(number % 11)),
  if(number % 2 = 0, NULL, 'Platform'), if(number % 2 = 0, NULL, 'usr_9'), NULL,
  if(number % 2 = 0, '[]', '[{\"field\":\"role\",\"oldValue\":\"member\",\"newValue\":{\"a\":[1,null]}}]'),
  '203.0.113.7', NULL, 'req_1', NULL, if(number % 2 = 0, NULL, '{\"k\":\"v\"}'),
  'identity.users.v1', 0, number, 1
  FROM system.numbers LIMIT 500" >/dev/null
wait_until 30 "the key" curl -fs -H "X-API-Key: $key" "http://127.0.0.1:$port/api/v1/organization/audit-logs?limit=1" -o /dev/null

log "fuzzing the API ($EXAMPLES examples per operation, seed $SEED)"
# A throwaway key of a throwaway database: fine on the command line.
out="$AUDIT_STATE_DIR/fuzz-output.log"
status=0
PYTHONPATH="$REPO_ROOT/deploy/tests" SCHEMATHESIS_HOOKS=fuzz_hooks \
"$VENV/bin/schemathesis" run schemas/openapi/audit-logs.openapi.json \
  --url "http://127.0.0.1:$port" \
  --header "X-API-Key: $key" \
  --checks all \
  --max-examples "$EXAMPLES" --seed "$SEED" \
  --no-color >"$out" 2>&1 || status=$?
tail -n 30 "$out"
# A client generated from the document walks all 500 events by cursor.
client_dir="$AUDIT_STATE_DIR/generated-client"
rm -rf "$client_dir"
if "$CLIENT_VENV/bin/openapi-python-client" generate --path schemas/openapi/audit-logs.openapi.json \
     --output-path "$client_dir" --meta setup >"$AUDIT_STATE_DIR/generated-client.log" 2>&1 \
   && "$CLIENT_VENV/bin/pip" install -q --disable-pip-version-check "$client_dir" >>"$AUDIT_STATE_DIR/generated-client.log" 2>&1 \
   && "$CLIENT_VENV/bin/python" deploy/tests/generated_client.py "http://127.0.0.1:$port" "$key" 500; then
  :
else
  tail -n 20 "$AUDIT_STATE_DIR/generated-client.log" >&2
  log "the generated client could not walk the log by cursor"
  status=1
fi
# Requests that never got past authentication would test nothing.
if grep -q "Authentication failed" "$out"; then
  status=1
fi
(( status == 0 )) && log "api fuzz: no issue found" || log "api fuzz: FAILED (see above; api log: $api_log)"
exit "$status"
