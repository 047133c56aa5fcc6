/**
 * tools/plain_tcp_echo.ts: the plainest Deno TCP echo server, a baseline for
 * what the runtime itself costs. One read/write loop per connection over one
 * buffer of a fixed size, and nothing else: no limits, no log, no framing.
 * idle_memory.ts measures tcp_server.ts against it.
 *
 *     deno run --allow-net=127.0.0.1 tools/plain_tcp_echo.ts --port 0 --buffer 65536
 *
 * It prints `listening on tcp://127.0.0.1:PORT` like the project's servers.
 *
 * @module
 */

import { parseArgs } from "node:util";

async function echo(conn: Deno.Conn, bufferSize: number): Promise<void> {
  const buf = new Uint8Array(bufferSize);
  try {
    for (let n = await conn.read(buf); n !== null; n = await conn.read(buf)) {
      let written = 0;
      while (written < n) written += await conn.write(buf.subarray(written, n));
    }
  } catch {
    // The peer went away.
  } finally {
    try {
      conn.close();
    } catch {
      // Already closed.
    }
  }
}

if (import.meta.main) {
  const { values } = parseArgs({
    options: {
      port: { type: "string", default: "0" },
      buffer: { type: "string", default: "65536" },
      // Accepted, as the project's servers do: there is nothing to log.
      quiet: { type: "boolean" },
    },
  });
  const bufferSize = Number(values.buffer);
  if (!Number.isInteger(bufferSize) || bufferSize < 1) {
    console.error("plain_tcp_echo.ts: --buffer must be a positive number of bytes");
    Deno.exit(2);
  }
  const listener = Deno.listen({ hostname: "127.0.0.1", port: Number(values.port) });
  console.log(`listening on tcp://127.0.0.1:${listener.addr.port}`);
  Deno.addSignalListener("SIGTERM", () => Deno.exit(0));
  for await (const conn of listener) echo(conn, bufferSize);
}
