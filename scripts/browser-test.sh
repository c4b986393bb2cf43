#!/usr/bin/env bash
# Browser test (issue 7): headless Chromium opens a page served by our
# server over HTTPS with HTTP/2, which holds ten EventSource connections to
# ten streams at once and must receive an append on every one of them.
# Over HTTP/1.1 Chromium allows six connections per origin, so the seventh
# stream would stall: passing proves HTTP/2 multiplexing of live SSE reads.
#
# Usage: scripts/browser-test.sh        (needs target/release/durable-streams-server,
#                                        unless SKIP_BUILD is unset: then builds it)
# Needs: chromium (Debian package), curl, openssl, python3.
# Environment: CHROMIUM=path, CHROMIUM_FLAGS="extra flags" (e.g.
# --disable-http2 shows the HTTP/1.1 stall: the test then fails),
# BROWSER_DEADLINE_S (default 90).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="$ROOT/target/browser-test"
rm -rf "$OUT"
mkdir -p "$OUT"
log() { printf 'browser-test: %s\n' "$*" >&2; }

CHROMIUM="${CHROMIUM:-$(command -v chromium || command -v chromium-browser || true)}"
[[ -n "$CHROMIUM" ]] || { log "chromium not found (apt-get install chromium)"; exit 2; }
if [[ "${SKIP_BUILD:-0}" != "1" ]]; then
  cargo build --release --locked -p durable-streams-server
fi
SERVER="$ROOT/target/release/durable-streams-server"

bash scripts/test-cert.sh "$OUT/tls"
PORT="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')"
ORIGIN="https://localhost:$PORT"
CURL=(curl -sS --fail --cacert "$OUT/tls/ca.pem" --max-time 60)

SERVER_PID=""
CHROME_PID=""
cleanup() {
  [[ -n "$CHROME_PID" ]] && kill "$CHROME_PID" 2>/dev/null || true
  [[ -n "$SERVER_PID" ]] && kill "$SERVER_PID" 2>/dev/null || true
  wait 2>/dev/null || true
}
trap cleanup EXIT

"$SERVER" dev --host 127.0.0.1 --port "$PORT" \
  --tls-cert "$OUT/tls/server.pem" --tls-key "$OUT/tls/server.key" >"$OUT/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 1 100); do
  "${CURL[@]}" -o /dev/null "$ORIGIN/healthz" 2>/dev/null && break
  kill -0 "$SERVER_PID" 2>/dev/null || { log "server exited:"; tail -20 "$OUT/server.log" >&2; exit 1; }
  sleep 0.1
done

# HTTP/2 over TLS as seen by curl (ALPN), before involving the browser.
proto="$("${CURL[@]}" --http2 -o /dev/null -w '%{http_version}' "$ORIGIN/healthz")"
[[ "$proto" == "2" ]] || { log "expected HTTP/2 over TLS, curl got HTTP/$proto"; exit 1; }

BASE="/v1/stream/browser-$$-$RANDOM"
N=10
"${CURL[@]}" -X PUT -H 'content-type: text/html' --data-binary @browser/page.html "$ORIGIN$BASE/page" -o /dev/null
"${CURL[@]}" -X PUT -H 'content-type: text/plain' "$ORIGIN$BASE/results" -o /dev/null
for i in $(seq 0 $((N - 1))); do
  "${CURL[@]}" -X PUT -H 'content-type: text/plain' "$ORIGIN$BASE/s$i" -o /dev/null
done

# Trust exactly this server key (no system-wide CA change); a throwaway profile.
"$CHROMIUM" --headless=new --no-sandbox --disable-gpu --no-first-run \
  --disable-dev-shm-usage --user-data-dir="$OUT/profile" \
  --ignore-certificate-errors-spki-list="$(cat "$OUT/tls/spki.txt")" ${CHROMIUM_FLAGS:-} \
  "$ORIGIN$BASE/page?base=$BASE&n=$N" >"$OUT/chromium.log" 2>&1 &
CHROME_PID=$!

# Follow the results stream with long-polls until a verdict (bounded).
offset="-1"
results=""
deadline=$((SECONDS + ${BROWSER_DEADLINE_S:-90}))
appended=0
while ((SECONDS < deadline)); do
  hdrs="$OUT/results.headers"
  body="$("${CURL[@]}" -D "$hdrs" "$ORIGIN$BASE/results?offset=$offset&live=long-poll")" || true
  next="$(tr -d '\r' <"$hdrs" | awk -F': ' 'tolower($1)=="stream-next-offset"{print $2}')"
  [[ -n "$next" ]] && offset="$next"
  [[ -n "$body" ]] && results+="$body"$'\n'
  if [[ "$appended" == 0 ]] && grep -q '^ready' <<<"$results"; then
    log "page: $(grep '^ready' <<<"$results" | head -1); appending to $N streams"
    for i in $(seq 0 $((N - 1))); do
      "${CURL[@]}" -X POST -H 'content-type: text/plain' --data-binary "hello-$i" "$ORIGIN$BASE/s$i" -o /dev/null
    done
    appended=1
  fi
  if grep -qE '^(ok|fail)' <<<"$results"; then break; fi
  kill -0 "$CHROME_PID" 2>/dev/null || { log "chromium exited early:"; tail -20 "$OUT/chromium.log" >&2; exit 1; }
done
printf '%s\n' "$results" >"$OUT/results.txt"
verdict="$(grep -E '^(ok|fail)' <<<"$results" | head -1 || true)"
if [[ "$verdict" == "ok h2" ]]; then
  echo "BROWSER PASS: $N EventSource streams over HTTPS/HTTP2 each received its append (page reported: $verdict)"
  exit 0
fi
echo "BROWSER FAIL: page reported: ${verdict:-nothing within the deadline}; results: $(tr '\n' '|' <<<"$results"); logs in ${OUT#"$ROOT"/}"
exit 1
