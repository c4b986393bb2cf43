// Starts the Node reference server for scripts/bench.sh.
// Usage: node server.mjs PORT [DATA_DIR]   (in-memory without DATA_DIR)
import { DurableStreamTestServer } from "@durable-streams/server"

const port = Number(process.argv[2] ?? 4437)
const dataDir = process.argv[3]
const server = new DurableStreamTestServer({
  port,
  host: "127.0.0.1",
  ...(dataDir ? { dataDir } : {}),
  longPollTimeout: 30000,
})
await server.start()
console.log(`node durable-streams server on 127.0.0.1:${port}${dataDir ? ` (data: ${dataDir})` : " (memory)"}`)
const stop = async () => {
  try { await server.stop() } finally { process.exit(0) }
}
process.on("SIGTERM", stop)
process.on("SIGINT", stop)
