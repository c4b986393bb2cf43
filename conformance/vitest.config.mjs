import { defineConfig } from "vitest/config"

// Reporters: the default reporter prints every failed test (name, assertion,
// stack) plus the final "Tests N failed | M passed (T)" counts. Set
// CONFORMANCE_VERBOSE=1 to list every test with its status as well.
// If CONFORMANCE_JSON_REPORT is set, a machine-readable report is also
// written there (scripts/conformance.sh uses target/conformance/report.json).
const reporters = [process.env.CONFORMANCE_VERBOSE === "1" ? "verbose" : "default"]
const outputFile = {}
if (process.env.CONFORMANCE_JSON_REPORT) {
  reporters.push("json")
  outputFile.json = process.env.CONFORMANCE_JSON_REPORT
}

export default defineConfig({
  test: {
    include: ["conformance.test.mjs"],
    // Upstream runs this suite with vitest defaults (single file, forks pool,
    // tests sequential except the suite's own test.concurrent blocks). Tests
    // that need longer (fuzzing, TTL expiry, long-poll) set their own
    // per-test timeouts; this only raises the 5s default so a slow debug
    // build or loaded CI machine does not produce spurious timeouts.
    testTimeout: 15_000,
    hookTimeout: 15_000,
    pool: "forks",
    fileParallelism: false,
    passWithNoTests: false,
    retry: 0,
    reporters,
    outputFile,
  },
})
