#!/usr/bin/env bash
# Offline validation of everything under deploy/ (part of `make test`):
#   1. the Helm chart: `helm lint` and `helm template` with the default values and with
#      ci/all-features-values.yaml; every rendered manifest validated against the Kubernetes
#      OpenAPI schemas (kubernetes-validate, strict) for the oldest and newest versions we claim;
#      values.schema.json must refuse wrong values;
#   2. Dockerfile, Compose file, Grafana dashboard and Prometheus rules (deploy/tests/check_deploy.py),
#      including the metric names they use against a running audit-ingest and audit-api.
# helm comes from `go install` (pinned); kubernetes-validate and PyYAML from PyPI (pinned).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

HELM_VERSION="v3.22.0"
KUBE_VALIDATE_VERSION="1.37.0"
KUBE_VERSIONS=(1.34.0 1.37.0)
BIN="$AUDIT_STATE_DIR/bin"
VENV="$AUDIT_STATE_DIR/deploy-venv"
CHART="$REPO_ROOT/deploy/helm/audit-logs"
OUT="$AUDIT_STATE_DIR/rendered"

cd "$REPO_ROOT"
# A helm built by `go install` does not know its own version: a marker file records it.
if [[ ! -x "$BIN/helm" || "$(cat "$BIN/helm.version" 2>/dev/null)" != "$HELM_VERSION" ]]; then
  command -v go >/dev/null || die "go is needed to build helm"
  log "building helm $HELM_VERSION with go install (a few minutes, once)"
  mkdir -p "$BIN"
  GOBIN="$BIN" go install "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
  echo "$HELM_VERSION" >"$BIN/helm.version"
fi
if ! "$VENV/bin/kubernetes-validate" --version 2>/dev/null | grep -q "$KUBE_VALIDATE_VERSION"; then
  log "installing kubernetes-validate $KUBE_VALIDATE_VERSION into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check "kubernetes-validate==$KUBE_VALIDATE_VERSION"
fi
helm="$BIN/helm"

rm -rf "$OUT" && mkdir -p "$OUT"
for config in default all-features; do
  values=()
  [[ "$config" == all-features ]] && values=(-f "$CHART/ci/all-features-values.yaml")
  log "helm lint + template ($config values)"
  "$helm" lint --strict --kube-version "${KUBE_VERSIONS[0]}" "$CHART" "${values[@]}" >"$OUT/lint-$config.log" 2>&1 \
    || { cat "$OUT/lint-$config.log" >&2; die "helm lint failed ($config)"; }
  "$helm" template audit "$CHART" --namespace audit --kube-version "${KUBE_VERSIONS[0]}" "${values[@]}" --output-dir "$OUT/$config" >/dev/null
  # One file per document; CRDs (ServiceMonitor) have no schema in kubernetes-validate and are
  # checked by check_deploy.py instead.
  "$VENV/bin/python" "$REPO_ROOT/deploy/tests/split_manifests.py" "$OUT/$config" "$OUT/$config-docs"
  for version in "${KUBE_VERSIONS[@]}"; do
    "$VENV/bin/kubernetes-validate" --strict --quiet -k "$version" "$OUT/$config-docs"/*.yaml \
      || die "rendered manifests ($config values) are not valid Kubernetes $version objects"
  done
done

# values.schema.json must turn a wrong value into an install-time error.
for bad in "api.rateLimit.burst=-1" "clickhouse.compression=gzip" "api.keysRefreshIntervalMs=60000" \
           "ingest.topics=null" "image.pullPolicy=Sometimes" "kafka.properties.sasl\.password=x" \
           "ingest.sessionTimeoutMs=1000" "ingest.assignor=sticky" "ingest.liveness.stallAfterMs=5" \
           "kafka.security.protocol=TLS" "kafka.security.saslMechanism=GSSAPI" \
           "kafka.security.saslMechanism=PLAIN" "kafka.security.endpointIdentification=off" \
           "clickhouse.cluster=bad-name" "clickhouse.clusterNodes={clickhouse-0:8123}" \
           "retention.defaultDays=0" "retention.defaultDays=4000"; do
  if "$helm" template audit "$CHART" --kube-version "${KUBE_VERSIONS[0]}" --set "$bad" >/dev/null 2>&1; then
    die "values.schema.json accepted --set $bad"
  fi
done
log "helm chart: lint, render and schema checks passed"

"$VENV/bin/python" "$REPO_ROOT/deploy/tests/check_deploy.py" --rendered "$OUT"
