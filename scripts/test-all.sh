#!/usr/bin/env bash
# The project's whole test run (what CI runs, via .ci/run):
#   1. unit, property and integration tests of every crate;
#   2. the official conformance suite against the release binary.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

echo "== cargo test (workspace)"
cargo test --workspace --locked

echo "== conformance suite (in-memory engine)"
cargo build --release --locked -p durable-streams-server
SKIP_BUILD=1 NO_COLOR=1 scripts/conformance.sh
