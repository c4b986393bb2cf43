#!/usr/bin/env bash
# Benchmark our server against the upstream Rust server (crates.io
# `durable-streams` 0.1.5) and the Node reference server
# (`@durable-streams/server`, pinned in bench/node/package-lock.json).
#
# Usage: scripts/bench.sh
#
# Full mode (default): installs what is missing (upstream into
# target/bench/upstream-rust, Node server into bench/node/node_modules),
# builds ours in release, then for each workload runs each server in turn
# (ours memory, ours file, upstream --durability memory, upstream wal, node
# in-memory, node file), rotating the order every round, the server pinned to
# CPU 0 and the load generator to CPU 1. Writes docs/benchmarks.md and
# docs/benchmarks.svg (medians, ratios ours/theirs, the issue's targets).
#
# Environment:
#   BENCH_SMOKE=1          every workload tiny, our server only (both engines); no
#                          install, no docs; exits non-zero if any run fails or
#                          any read-back verification fails (what CI runs)
#   BENCH_ROUNDS=N         rounds per workload and server (default 3)
#   BENCH_SECONDS=S        duration of the timed append/producer phases (default 5)
#   BENCH_SERVERS=a,b      subset of: ours-mem ours-file upstream-mem upstream-wal node-mem node-file
#   BENCH_WORKLOADS=p,q    workload name prefixes (e.g. append,catchup); default all
#   BENCH_CONDITIONS=text  free text recorded in docs/benchmarks.md (e.g. "machine idle")
#   BENCH_NOTES=FILE       a hand-written analysis of the run, included in docs/benchmarks.md
#   BENCH_NO_DOCS=1        don't rewrite docs/ (results stay in target/bench/results.jsonl)
#
# Outputs: target/bench/results.jsonl (one JSON line per run), target/bench/logs/
# (server logs), docs/benchmarks.md, docs/benchmarks.svg.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

WORK="$ROOT/target/bench"
UPSTREAM_VERSION=0.1.5
log() { printf 'bench: %s\n' "$*" >&2; }

mkdir -p "$WORK"
log "building durable-streams-server and ds-bench (release)"
cargo build --release --locked -p durable-streams-server -p durable-streams-bench
OURS="$ROOT/target/release/durable-streams-server"
DSBENCH="$ROOT/target/release/ds-bench"

# Pin the server to CPU 0 and the load generator to CPU 1 when possible.
server_cpus=()
gen_pin=()
if command -v taskset >/dev/null 2>&1 && [[ "$(nproc)" -ge 2 ]]; then
  server_cpus=(--server-cpus 0)
  gen_pin=(taskset -c 1)
  pinning="server on CPU 0, load generator on CPU 1 (taskset)"
else
  pinning="no CPU pinning (taskset missing or fewer than 2 CPUs)"
  log "$pinning"
fi

if [[ "${BENCH_SMOKE:-0}" == "1" ]]; then
  out="$WORK/smoke/results.jsonl"
  mkdir -p "$WORK/smoke"
  rm -f "$out"
  start=$SECONDS
  set +e
  "${gen_pin[@]}" "$DSBENCH" run --smoke --ours "$OURS" "${server_cpus[@]}" \
    --servers "${BENCH_SERVERS:-ours-mem,ours-file}" \
    ${BENCH_WORKLOADS:+--workloads "$BENCH_WORKLOADS"} \
    --work-dir "$WORK/smoke" --out "$out"
  rc=$?
  set -e
  runs=$(wc -l <"$out" | tr -d ' ')
  if [[ $rc -eq 0 ]]; then
    echo "BENCH SMOKE PASS: $runs runs completed and verified in $((SECONDS - start))s (results: ${out#"$ROOT"/})"
  else
    echo "BENCH SMOKE FAIL (exit $rc) after $((SECONDS - start))s (results: ${out#"$ROOT"/}, logs: ${WORK#"$ROOT"/}/smoke/logs)"
  fi
  exit $rc
fi

# ---- install the other servers ----
UPSTREAM_BIN="$WORK/upstream-rust/bin/durable-streams-server"
if [[ ! -x "$UPSTREAM_BIN" ]]; then
  if [[ -x /tmp/upstream-rust/bin/durable-streams-server ]] &&
    grep -q "durable-streams $UPSTREAM_VERSION " /tmp/upstream-rust/.crates.toml 2>/dev/null; then
    log "copying upstream server $UPSTREAM_VERSION from /tmp/upstream-rust"
    mkdir -p "$WORK/upstream-rust/bin"
    cp /tmp/upstream-rust/bin/durable-streams-server "$UPSTREAM_BIN"
  else
    log "installing upstream server: cargo install durable-streams --version $UPSTREAM_VERSION"
    cargo install durable-streams --version "$UPSTREAM_VERSION" --locked --root "$WORK/upstream-rust"
  fi
fi
if [[ ! -d "$ROOT/bench/node/node_modules/@durable-streams/server" ]]; then
  command -v npm >/dev/null || { log "npm is required for the Node server"; exit 2; }
  log "installing the Node server (npm ci in bench/node)"
  (cd "$ROOT/bench/node" && npm ci --no-audit --no-fund)
fi
command -v perf >/dev/null || log "perf not found: fsync counts will be missing (apt-get install linux-perf / linux-tools)"

rounds="${BENCH_ROUNDS:-3}"
secs="${BENCH_SECONDS:-5}"
out="$WORK/results.jsonl"
rm -f "$out"
log "running: rounds=$rounds secs=$secs servers=${BENCH_SERVERS:-all} workloads=${BENCH_WORKLOADS:-all}"
start=$SECONDS
"${gen_pin[@]}" "$DSBENCH" run --ours "$OURS" --upstream "$UPSTREAM_BIN" --node-dir "$ROOT/bench/node" \
  "${server_cpus[@]}" --rounds "$rounds" --secs "$secs" \
  ${BENCH_SERVERS:+--servers "$BENCH_SERVERS"} ${BENCH_WORKLOADS:+--workloads "$BENCH_WORKLOADS"} \
  --work-dir "$WORK" --out "$out"
elapsed=$((SECONDS - start))
log "runs finished in ${elapsed}s"

if [[ "${BENCH_NO_DOCS:-0}" != "1" ]]; then
  cmd="scripts/bench.sh"
  for v in BENCH_ROUNDS BENCH_SECONDS BENCH_SERVERS BENCH_WORKLOADS; do
    [[ -n "${!v:-}" ]] && cmd="$v=${!v} $cmd"
  done
  load="$(cut -d' ' -f1-3 /proc/loadavg)"
  "$DSBENCH" report --results "$out" --md "$ROOT/docs/benchmarks.md" --svg "$ROOT/docs/benchmarks.svg" \
    --work-dir "$WORK" --command "$cmd" ${BENCH_NOTES:+--notes "$BENCH_NOTES"} \
    --conditions "$pinning; run took ${elapsed}s; load average at the end $load${BENCH_CONDITIONS:+; $BENCH_CONDITIONS}"
fi
