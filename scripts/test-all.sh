#!/usr/bin/env bash
# The project's whole test run (what CI runs, via .ci/run):
#   1. unit, property and integration tests of every crate;
#   2. the official conformance suite against the release binary, once per
#      storage engine (in-memory, then the file engine on a fresh directory
#      with compression off, so Node's catch-up reads take the sendfile
#      path), and once more over TLS with the file engine (test CA given to
#      Node);
#   3. the browser test: headless Chromium, ten EventSources over HTTPS/HTTP2;
#   4. the benchmark in smoke mode (completes and verifies, no speed checks).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

echo "== cargo test (workspace)"
cargo test --workspace --locked

echo "== conformance suite (in-memory engine)"
cargo build --release --locked -p durable-streams-server
CONFORMANCE_SUBSCRIPTIONS=1 SKIP_BUILD=1 NO_COLOR=1 scripts/conformance.sh

echo "== conformance suite (file engine, compression off: catch-up reads by sendfile)"
data_dir="$(mktemp -d)"
trap 'rm -rf "$data_dir"' EXIT
CONFORMANCE_SUBSCRIPTIONS=1 SKIP_BUILD=1 NO_COLOR=1 scripts/conformance.sh --data-dir "$data_dir" \
  --config conformance/no-compression.toml
echo "== conformance suite (TLS, file engine)"
tls_dir="$(mktemp -d)"
trap 'rm -rf "$data_dir" "$tls_dir"' EXIT
CONFORMANCE_TLS=1 CONFORMANCE_SUBSCRIPTIONS=1 SKIP_BUILD=1 NO_COLOR=1 scripts/conformance.sh --data-dir "$tls_dir"

echo "== browser test (headless Chromium, HTTPS + HTTP/2)"
SKIP_BUILD=1 scripts/browser-test.sh

echo "== benchmark smoke (our server only; checks completion and read-back verification, not speed)"
BENCH_SMOKE=1 scripts/bench.sh
