#!/usr/bin/env bash
# `make bench`: release build, then the ingest benchmark against the local stack (started and
# stopped as needed). The table goes to stdout and to services/ingest/benches/RESULTS.md.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

"$LOCAL_DIR/install.sh"
cd "$REPO_ROOT"
cargo build --release --workspace --bins
ensure_stack
results="services/ingest/benches/RESULTS.md"
cargo bench -p audit-ingest --bench ingest_throughput | tee "$results.tmp"
{
  echo "<!-- written by \`make bench\` (deploy/local/bench.sh); rerun it to refresh -->"
  cat "$results.tmp"
} > "$results"
rm -f "$results.tmp"
echo "bench: results saved to $results"
