#!/usr/bin/env bash
# The project's whole test run (what CI runs, via .ci/run):
#   1. unit, property and integration tests of every crate;
#   2. the official conformance suite against the release binary, once per
#      storage engine (in-memory, then the file engine on a fresh directory).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

echo "== cargo test (workspace)"
cargo test --workspace --locked

echo "== conformance suite (in-memory engine)"
cargo build --release --locked -p durable-streams-server
CONFORMANCE_SUBSCRIPTIONS=1 SKIP_BUILD=1 NO_COLOR=1 scripts/conformance.sh

echo "== conformance suite (file engine)"
data_dir="$(mktemp -d)"
trap 'rm -rf "$data_dir"' EXIT
CONFORMANCE_SUBSCRIPTIONS=1 SKIP_BUILD=1 NO_COLOR=1 scripts/conformance.sh --data-dir "$data_dir"
echo "== benchmark smoke (our server only; checks completion and read-back verification, not speed)"
BENCH_SMOKE=1 scripts/bench.sh
