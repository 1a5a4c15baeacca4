#!/usr/bin/env bash
# `make bench`: release build, then the benchmarks against the local stack (started and stopped
# as needed). Each prints its table to stdout and keeps it in its RESULTS.md:
#   ingest -> services/ingest/benches/RESULTS.md  (audit-ingest throughput, freshness, RSS)
#   api    -> services/api/benches/RESULTS.md     (read latency on 10M events, CSV export)
#   streams -> services/api/benches/STREAMS.md    (log-stream delivery: throughput, latency, RSS)
#   retention -> services/api/benches/RETENTION.md (expiry and erasure on 10M events, read impact)
# `make bench` runs all four; `make bench BENCH=api` (or ingest, streams, retention) runs one.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

which="${1:-all}"
"$LOCAL_DIR/install.sh"
cd "$REPO_ROOT"
cargo build --release --workspace --bins
ensure_stack

run_bench() {
  local package="$1" bench="$2" results="$3"
  cargo bench -p "$package" --bench "$bench" | tee "$results.tmp"
  {
    echo "<!-- written by \`make bench\` (deploy/local/bench.sh); rerun it to refresh -->"
    cat "$results.tmp"
  } >"$results"
  rm -f "$results.tmp"
  echo "bench: results saved to $results"
}

if [[ "$which" == all || "$which" == ingest ]]; then
  run_bench audit-ingest ingest_throughput services/ingest/benches/RESULTS.md
fi
if [[ "$which" == all || "$which" == api ]]; then
  run_bench audit-api read_latency services/api/benches/RESULTS.md
fi
if [[ "$which" == all || "$which" == streams ]]; then
  run_bench audit-api stream_delivery services/api/benches/STREAMS.md
fi
if [[ "$which" == all || "$which" == retention ]]; then
  run_bench audit-api retention services/api/benches/RETENTION.md
fi
