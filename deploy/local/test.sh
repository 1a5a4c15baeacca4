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
set -e
stop_started_parts_now
# One closing line for the whole workspace (cargo prints one per test binary).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$output"
echo "api fuzz (schemathesis, every check; generated client walks by cursor): $fuzz"
echo "deploy checks (helm, kubernetes-validate, images, compose, dashboards): $deploy"
exit "$status"
