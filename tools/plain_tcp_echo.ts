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
import { flagError, optionalInteger, runCommand } from "./shared.ts";

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

const USAGE = `Usage: plain_tcp_echo.ts [--port PORT] [--buffer BYTES]

The plainest Deno TCP echo server, on 127.0.0.1: one read/write loop per
connection over one buffer of BYTES (default 65536). A baseline for
idle_memory.ts. --quiet is accepted and changes nothing.`;

function parse(args: string[]) {
  let values;
  try {
    values = parseArgs({
      args,
      strict: true,
      options: {
        port: { type: "string" },
        buffer: { type: "string" },
        // Accepted, as the project's servers do: there is nothing to log.
        quiet: { type: "boolean" },
        help: { type: "boolean", short: "h", default: false },
      },
    }).values;
  } catch (error) {
    throw flagError(error);
  }
  const port = optionalInteger("--port", values.port, 0, 65535) ?? 0;
  const bufferSize = optionalInteger("--buffer", values.buffer, 1, 16 * 1024 * 1024) ?? 65536;
  return { port, bufferSize, help: values.help };
}

async function serve(options: ReturnType<typeof parse>): Promise<number> {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: options.port });
  Deno.addSignalListener("SIGTERM", () => Deno.exit(0));
  console.log(`listening on tcp://127.0.0.1:${listener.addr.port}`);
  for await (const conn of listener) echo(conn, options.bufferSize);
  return 0;
}

if (import.meta.main) {
  Deno.exit(
    await runCommand({ name: "plain_tcp_echo.ts", usage: USAGE, parse, run: serve }, Deno.args),
  );
}
