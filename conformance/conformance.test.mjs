// Runs the upstream Durable Streams server conformance suite against an
// already-running server. Normally invoked via scripts/conformance.sh, which
// builds and starts the Rust server and sets CONFORMANCE_BASE_URL.
//
// We do not use the package's own CLI (`server-conformance-tests --run <url>`):
// as published (0.3.6) it reports "No test files found". This file mirrors
// what the CLI's dist/test-runner.js does, plus our options.
import { runConformanceTests } from "@durable-streams/server-conformance-tests"

const baseUrl = process.env.CONFORMANCE_BASE_URL

if (!baseUrl) {
  throw new Error(
    "CONFORMANCE_BASE_URL is required (e.g. http://127.0.0.1:4437). " +
      "Run scripts/conformance.sh from the repository root."
  )
}

runConformanceTests({
  baseUrl,
  subscriptions: process.env.CONFORMANCE_SUBSCRIPTIONS === "1",
  // Must match the server's --long-poll-timeout (scripts/conformance.sh passes
  // 500ms). Long-poll tests get a vitest timeout of this + 1000ms.
  longPollTimeoutMs: 500,
})
