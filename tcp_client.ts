/**
 * tcp_client.ts: a TCP client on `Deno.connect`, like a small netcat.
 *
 * What it shows: a TCP connection is two independent byte streams, one each
 * way. This client sends and receives at the same time, and when it has
 * nothing more to say it *half-closes* (`closeWrite()`, a FIN): the server
 * sees end-of-file but can still answer, and the client keeps reading until
 * the server closes its side too. That is how a client says "that was my
 * whole request" without closing the door on the reply.
 *
 * Read it in this order:
 *
 *     1. Connect, then send and receive at once    runTcpClient
 *     2. Sending, and the half-close               sendAll, writeAll
 *     3. Receiving: some bytes, not a message      receiveAll
 *     4. The options                               TcpClientOptions
 *     5. The command line                          main
 *
 * Run it (least privilege; start `tcp_server.ts` first):
 *
 *     deno run --allow-net=127.0.0.1:9000 tcp_client.ts hello world   # one line each, prints replies
 *     deno run --allow-net=127.0.0.1:9000 tcp_client.ts               # interactive; Ctrl-D ends, Ctrl-C quits
 *     deno run -N https://raw.githubusercontent.com/OWNER/REPO/main/tcp_client.ts hello
 *
 * The same against any TCP server, e.g. one made with `nc -l 127.0.0.1 9000`.
 *
 * @module
 */

import { parseArgs } from "node:util";

const DEFAULT_HOSTNAME = "127.0.0.1";
const DEFAULT_PORT = 9000;
// A read fills at most this much; a bigger buffer means fewer reads of bulk data.
const READ_BUFFER_SIZE = 64 * 1024;

const encoder = new TextEncoder();

// ------------------------------------------- 1. connect, then send and receive

/**
 * Connects, sends everything from `input` while passing everything received
 * to `output`, half-closes when `input` ends, and resolves once the server
 * has closed the connection (stopping `input` if it has not ended yet).
 *
 * @example Send two lines to an echo server and collect the reply
 * ```ts
 * import assert from "node:assert/strict";
 *
 * // A one-connection echo server on a free port: what it reads, it writes back.
 * const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
 * const serving = listener.accept().then((conn) => conn.readable.pipeTo(conn.writable));
 *
 * let reply = "";
 * const decoder = new TextDecoder();
 * await runTcpClient({
 *   port: listener.addr.port,
 *   input: ReadableStream.from([new TextEncoder().encode("hello\nworld\n")]),
 *   output: (bytes) => void (reply += decoder.decode(bytes, { stream: true })),
 * });
 * await serving;
 * listener.close();
 * // However TCP cut the reply into reads, the bytes are the same.
 * assert.equal(reply, "hello\nworld\n");
 * ```
 *
 * @throws {Deno.errors.ConnectionRefused} when nothing listens on the port.
 * @throws {Deno.errors.ConnectionReset} when the server resets the connection.
 */
export async function runTcpClient(options: TcpClientOptions): Promise<void> {
  const conn = await Deno.connect({
    hostname: options.hostname ?? DEFAULT_HOSTNAME,
    port: options.port ?? DEFAULT_PORT,
  });
  const reader = options.input.getReader();
  // Sending and receiving run at the same time: a server may answer before
  // the request is over, or (chat) at any moment. A failed send needs no
  // report of its own: the reset or close behind it ends the receiving too.
  const sending = sendAll(conn, reader).catch(() => {});
  try {
    await receiveAll(conn, options.output);
  } finally {
    // The server has closed (or reset): whatever is still unsent has nowhere
    // to go. Closing also ends a write stuck on a server that stopped reading.
    await reader.cancel().catch(() => {});
    conn.close();
    await sending;
  }
}

// ------------------------------------------------ 2. sending, and the half-close

async function sendAll(
  conn: Deno.Conn,
  reader: ReadableStreamDefaultReader<Uint8Array>,
): Promise<void> {
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    await writeAll(conn, value);
  }
  // The half-close: "I am done sending". Closing `conn.writable` instead
  // would close the whole connection, and the reply with it.
  await conn.closeWrite();
}

// A write may take only part of the bytes (a "partial send"); loop until all
// are written. Each await also waits for room in the kernel's send buffer:
// that is backpressure, for free.
async function writeAll(conn: Deno.Conn, bytes: Uint8Array): Promise<void> {
  for (let written = 0; written < bytes.length;) {
    written += await conn.write(bytes.subarray(written));
  }
}

// ------------------------------------------ 3. receiving: some bytes, not a message

// A read returns whatever bytes have arrived: part of a line, or several.
// This client prints bytes as they come, so it needs no framing at all.
async function receiveAll(conn: Deno.Conn, output: TcpClientOptions["output"]): Promise<void> {
  const buf = new Uint8Array(READ_BUFFER_SIZE);
  for (;;) {
    const n = await conn.read(buf);
    if (n === null) return;
    await output(buf.subarray(0, n));
  }
}

// ------------------------------------------------------------------ 4. the options

/** Options for {@linkcode runTcpClient}. */
export interface TcpClientOptions {
  /** Server to connect to. Default `127.0.0.1`. */
  hostname?: string;
  /** Server port. Default 9000. */
  port?: number;
  /** Bytes to send, e.g. `Deno.stdin.readable`. When it ends, the client half-closes. */
  input: ReadableStream<Uint8Array>;
  /** Called with the bytes received, as they arrive; awaited before the next read. */
  output: (bytes: Uint8Array) => void | Promise<void>;
}

// ------------------------------------------------------------- 5. the command line

const USAGE = `Usage: tcp_client.ts [options] [MESSAGE ...]

Connects to a TCP server. With MESSAGEs, sends each as one line, half-closes,
and prints what comes back until the server closes. Without, sends what you
type and prints what arrives; Ctrl-D half-closes, Ctrl-C quits.

Options:
  --host HOST   server address (default ${DEFAULT_HOSTNAME})
  --port PORT   server port (default ${DEFAULT_PORT})
  -h, --help    show this help`;

/** A command-line mistake: reported as one line plus the usage, exit code 2. */
class UsageError extends Error {}

// parseArgs explains itself over several sentences; keep the first, and say
// how to pass a value that starts with "-" (a negative number, say).
function parseArgsMessage(error: Error): string {
  const first = error.message.split(/\.\s/)[0];
  const option = first.match(/^Option '(--[\w-]+)' argument is ambiguous/)?.[1];
  return option
    ? `${option} needs a value; for one that starts with "-", write ${option}=VALUE`
    : first;
}

function parseCommandLine(args: string[]) {
  let parsed;
  try {
    parsed = parseArgs({
      args,
      strict: true,
      allowPositionals: true,
      options: {
        host: { type: "string", default: DEFAULT_HOSTNAME },
        port: { type: "string", default: String(DEFAULT_PORT) },
        help: { type: "boolean", short: "h", default: false },
      },
    });
  } catch (error) {
    throw new UsageError(parseArgsMessage(error as Error));
  }
  const { host, port, help } = parsed.values;
  if (!/^\d+$/.test(port) || Number(port) > 65535) {
    throw new UsageError(`--port must be an integer from 0 to 65535, got "${port}"`);
  }
  return { hostname: host, port: Number(port), help, messages: parsed.positionals };
}

function formatHost(hostname: string): string {
  return hostname.includes(":") ? `[${hostname}]` : hostname;
}

async function writeToStdout(bytes: Uint8Array): Promise<void> {
  for (let written = 0; written < bytes.length;) {
    written += await Deno.stdout.write(bytes.subarray(written));
  }
}

async function main(args: string[]): Promise<number> {
  let options;
  try {
    options = parseCommandLine(args);
  } catch (error) {
    if (!(error instanceof UsageError)) throw error;
    console.error(`tcp_client: ${error.message}\n\n${USAGE}`);
    return 2;
  }
  if (options.help) {
    console.log(USAGE);
    return 0;
  }
  const { hostname, port, messages } = options;
  const interactive = messages.length === 0;
  const input = interactive
    ? Deno.stdin.readable
    : ReadableStream.from([encoder.encode(messages.map((message) => `${message}\n`).join(""))]);
  const address = `${formatHost(hostname)}:${port}`;
  try {
    await runTcpClient({ hostname, port, input, output: writeToStdout });
  } catch (error) {
    console.error(`tcp_client: ${address}: ${connectError(error, hostname, port)}`);
    return 1;
  }
  if (interactive) console.error(`tcp_client: ${address} closed the connection`);
  return 0;
}

function connectError(error: unknown, hostname: string, port: number): string {
  if (error instanceof Deno.errors.ConnectionRefused) {
    return "connection refused (is the server running? start one with: deno run -N tcp_server.ts)";
  }
  if (error instanceof Deno.errors.ConnectionReset) return "connection reset by the server";
  if (error instanceof Deno.errors.BrokenPipe) {
    return "the server closed the connection while we were sending";
  }
  if (error instanceof Deno.errors.NotCapable || error instanceof Deno.errors.PermissionDenied) {
    return `permission denied (run with --allow-net=${formatHost(hostname)}:${port})`;
  }
  if (error instanceof Deno.errors.TimedOut) {
    return "connection timed out (is the address right and reachable?)";
  }
  const message = error instanceof Error ? error.message : String(error);
  if (/lookup address|Name or service not known|nodename nor servname/i.test(message)) {
    return `unknown host "${hostname}" (check the --host spelling)`;
  }
  return message;
}

if (import.meta.main) Deno.exit(await main(Deno.args));
