#!/usr/bin/env bash
# Run the upstream Durable Streams server conformance suite
# (@durable-streams/server-conformance-tests, pinned in conformance/package.json)
# against the Rust server.
#
# Usage: scripts/conformance.sh [extra server args...]
#
# Environment:
#   SKIP_BUILD=1                 don't run `cargo build --release -p durable-streams-server`
#   SERVER_CMD="cmd args"        server command to run instead of target/release/durable-streams-server
#                                (word-split; `dev --host ... --port ... --long-poll-timeout 500ms "$@"` is appended)
#   CONFORMANCE_SUBSCRIPTIONS=1  also run the reserved subscription API tests
#   CONFORMANCE_FILTER=pattern   only run tests whose full name matches (vitest -t)
#   CONFORMANCE_VERBOSE=1        list every test, not just failures
#   CONFORMANCE_STARTUP_TIMEOUT  seconds to wait for /healthz (default 20)
#   CONFORMANCE_TLS=1            serve over TLS with a throwaway test CA
#                                (scripts/test-cert.sh); Node trusts it via
#                                NODE_EXTRA_CA_CERTS
#
# Outputs: target/conformance/report.json (vitest JSON report) and
# target/conformance/server.log (server stdout+stderr).
# Exits non-zero if any test failed or the run did not complete.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

CONF_DIR="$ROOT/conformance"
OUT_DIR="$ROOT/target/conformance"
REPORT="$OUT_DIR/report.json"
SERVER_LOG="$OUT_DIR/server.log"
STARTUP_TIMEOUT="${CONFORMANCE_STARTUP_TIMEOUT:-20}"
# Must match longPollTimeoutMs in conformance/conformance.test.mjs.
LONG_POLL_TIMEOUT="500ms"

log() { printf 'conformance: %s\n' "$*" >&2; }

for tool in node npm curl python3; do
  command -v "$tool" >/dev/null 2>&1 || { log "required tool '$tool' not found"; exit 2; }
done

mkdir -p "$OUT_DIR"
rm -f "$REPORT"

if [[ ! -d "$CONF_DIR/node_modules" ]]; then
  log "installing test dependencies (npm ci)"
  (cd "$CONF_DIR" && npm ci --no-audit --no-fund)
fi

if [[ "${SKIP_BUILD:-0}" != "1" ]]; then
  log "building durable-streams-server (release)"
  cargo build --release -p durable-streams-server
fi

if [[ -n "${SERVER_CMD:-}" ]]; then
  read -r -a server_cmd <<<"$SERVER_CMD"
else
  server_cmd=("$ROOT/target/release/durable-streams-server")
  if [[ ! -x "${server_cmd[0]}" ]]; then
    log "server binary ${server_cmd[0]} not found (build it or unset SKIP_BUILD)"
    exit 2
  fi
fi

PORT="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')"
BASE_URL="http://127.0.0.1:$PORT"
tls_args=()
curl_tls=()
if [[ "${CONFORMANCE_TLS:-0}" == "1" ]]; then
  cert_dir="$OUT_DIR/tls"
  rm -rf "$cert_dir"
  bash "$ROOT/scripts/test-cert.sh" "$cert_dir"
  BASE_URL="https://localhost:$PORT"
  tls_args=(--tls-cert "$cert_dir/server.pem" --tls-key "$cert_dir/server.key")
  curl_tls=(--cacert "$cert_dir/ca.pem")
  export NODE_EXTRA_CA_CERTS="$cert_dir/ca.pem"
fi

SERVER_PID=""
cleanup() {
  if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 1 50); do
      kill -0 "$SERVER_PID" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

log "starting server on $BASE_URL (log: $SERVER_LOG)"
"${server_cmd[@]}" dev --host 127.0.0.1 --port "$PORT" --long-poll-timeout "$LONG_POLL_TIMEOUT" ${tls_args[@]+"${tls_args[@]}"} "$@" \
  >"$SERVER_LOG" 2>&1 </dev/null &
SERVER_PID=$!

deadline=$((SECONDS + STARTUP_TIMEOUT))
until [[ "$(curl -s ${curl_tls[@]+"${curl_tls[@]}"} -o /dev/null -w '%{http_code}' --max-time 2 "$BASE_URL/healthz" 2>/dev/null || true)" == "200" ]]; do
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    log "server exited before becoming healthy; last lines of $SERVER_LOG:"
    tail -n 40 "$SERVER_LOG" >&2 || true
    exit 1
  fi
  if ((SECONDS > deadline)); then
    log "server did not answer 200 on /healthz within ${STARTUP_TIMEOUT}s; last lines of $SERVER_LOG:"
    tail -n 40 "$SERVER_LOG" >&2 || true
    exit 1
  fi
  sleep 0.2
done
log "server is healthy"

vitest_args=(run)
if [[ -n "${CONFORMANCE_FILTER:-}" ]]; then
  vitest_args+=(-t "$CONFORMANCE_FILTER")
fi

start=$SECONDS
set +e
(
  cd "$CONF_DIR" &&
    CONFORMANCE_BASE_URL="$BASE_URL" \
    CONFORMANCE_SUBSCRIPTIONS="${CONFORMANCE_SUBSCRIPTIONS:-0}" \
    CONFORMANCE_JSON_REPORT="$REPORT" \
    ./node_modules/.bin/vitest "${vitest_args[@]}"
)
vitest_rc=$?
set -e
elapsed=$((SECONDS - start))

if [[ ! -s "$REPORT" ]]; then
  echo "CONFORMANCE FAIL: run did not complete (vitest exit $vitest_rc, no report) in ${elapsed}s; server log: ${SERVER_LOG#"$ROOT"/}"
  exit $((vitest_rc == 0 ? 1 : vitest_rc))
fi

# Counts come from vitest's JSON report (Jest-compatible format).
read -r total passed failed skipped <<<"$(node -e '
  const r = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8"));
  console.log(r.numTotalTests, r.numPassedTests, r.numFailedTests,
              r.numPendingTests + r.numTodoTests);
' "$REPORT")"

if [[ "$vitest_rc" -eq 0 && "$failed" -eq 0 ]]; then
  status=PASS
else
  status=FAIL
fi
echo "CONFORMANCE $status: $passed passed, $failed failed, $skipped skipped, $total total in ${elapsed}s (report: ${REPORT#"$ROOT"/}, server log: ${SERVER_LOG#"$ROOT"/})"

[[ "$status" == PASS ]]
