#!/usr/bin/env bash
# `make test`: installs what is missing, starts the parts of the stack that are not running,
# runs every test of the workspace against them, and stops what it started (also on failure).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

"$LOCAL_DIR/install.sh"
ensure_stack
cd "$REPO_ROOT"
# Unit, integration and doc tests (not the benchmarks: `make bench`).
cargo test --workspace "$@"
