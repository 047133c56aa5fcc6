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
 * With `--tls` the same bytes travel inside TLS: the server proves its name
 * with a certificate, and everything after the handshake is encrypted.
 *
 * Read it in this order:
 *
 *     1. Connect, then send and receive at once    runTcpClient
 *     2. Sending, and the half-close               sendAll, writeAll
 *     3. Receiving: some bytes, not a message      receiveAll
 *     4. TLS: the same streams, encrypted          connect
 *     5. The options                               TcpClientOptions
 *     6. The command line                          main
 *     7. Certificates we cannot check: --insecure  connectInsecure
 *
 * Run it (least privilege; start `tcp_server.ts` first):
 *
 *     deno run --allow-net=127.0.0.1:9000 tcp_client.ts hello world   # one line each, prints replies
 *     deno run --allow-net=127.0.0.1:9000 tcp_client.ts               # interactive; Ctrl-D ends, Ctrl-C quits
 *     deno run --allow-net=localhost:9443 --allow-read=.certs tcp_client.ts \
 *         --tls --host localhost --port 9443 --ca .certs/ca.pem hello  # TLS, trusting `deno task cert`'s CA
 *     deno run -N https://raw.githubusercontent.com/OWNER/REPO/main/tcp_client.ts hello
 *
 * The same against any TCP server, e.g. one made with `nc -l 127.0.0.1 9000`,
 * or a TLS one made with `openssl s_server -accept 9443 -cert ... -key ...`.
 *
 * @module
 */

import { parseArgs } from "node:util";
import * as nodeTls from "node:tls";

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
  const conn = await connect(options);
  options.onConnect?.();
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
  conn: ByteConn,
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
async function writeAll(conn: ByteConn, bytes: Uint8Array): Promise<void> {
  for (let written = 0; written < bytes.length;) {
    written += await conn.write(bytes.subarray(written));
  }
}

// ------------------------------------------ 3. receiving: some bytes, not a message

// A read returns whatever bytes have arrived: part of a line, or several.
// This client prints bytes as they come, so it needs no framing at all.
async function receiveAll(conn: ByteConn, output: TcpClientOptions["output"]): Promise<void> {
  const buf = new Uint8Array(READ_BUFFER_SIZE);
  for (;;) {
    const n = await conn.read(buf);
    if (n === null) return;
    await output(buf.subarray(0, n));
  }
}

// ------------------------------------------------ 4. TLS: the same streams, encrypted

// What this client needs of a connection. A TLS connection has the same
// shape as a TCP one: TLS sits under the same read, write and half-close.
type ByteConn = Pick<Deno.Conn, "read" | "write" | "closeWrite" | "close">;

async function connect(options: TcpClientOptions): Promise<ByteConn> {
  const hostname = options.hostname ?? DEFAULT_HOSTNAME;
  const port = options.port ?? DEFAULT_PORT;
  if (!options.tls) return await Deno.connect({ hostname, port });
  if (options.tls.insecure) return await connectInsecure(hostname, port);
  // The certificate must be for `hostname` and signed by a CA we trust: the
  // system's, or one named in `caCerts` (e.g. the CA `deno task cert` made).
  const conn = await Deno.connectTls({ hostname, port, caCerts: options.tls.caCerts });
  try {
    // The TLS handshake would happen on the first read or write; doing it
    // here makes a refused certificate a connection error.
    await conn.handshake();
  } catch (error) {
    conn.close();
    throw error;
  }
  return conn;
}

// ------------------------------------------------------------------ 5. the options

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
  /**
   * Speak TLS. `caCerts`: PEM certificates of CAs to trust besides the
   * system's. `insecure`: accept any certificate at all (tests only).
   */
  tls?: { caCerts?: string[]; insecure?: boolean };
  /** Called once connected (and, with TLS, once the handshake is done). */
  onConnect?: () => void;
}

// ------------------------------------------------------------- 6. the command line

const USAGE = `Usage: tcp_client.ts [options] [MESSAGE ...]

Connects to a TCP server. With MESSAGEs, sends each as one line, half-closes,
and prints what comes back until the server closes. Without, sends what you
type and prints what arrives; Ctrl-D half-closes, Ctrl-C quits.

Options:
  --host HOST   server address (default ${DEFAULT_HOSTNAME})
  --port PORT   server port (default ${DEFAULT_PORT})
  --tls         speak TLS; the server's certificate must be for HOST and
                signed by a CA we trust
  --ca FILE     with --tls, also trust the CA certificates in this PEM file
                (e.g. .certs/ca.pem, written by deno task cert)
  --insecure    with --tls, accept any certificate at all: for tests only
  -h, --help    show this help`;

/** A command-line mistake: reported as one line plus the usage, exit code 2. */
class UsageError extends Error {}

/** A problem with what the user asked for, found before connecting: one line, exit 1. */
class SetupError extends Error {}

/** The server answered in TLS, and we were not speaking it. */
class TlsAnswerError extends Error {}

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
        tls: { type: "boolean", default: false },
        ca: { type: "string" },
        insecure: { type: "boolean", default: false },
        help: { type: "boolean", short: "h", default: false },
      },
    });
  } catch (error) {
    throw new UsageError(parseArgsMessage(error as Error));
  }
  const { host, port, help, tls, ca, insecure } = parsed.values;
  if (!/^\d+$/.test(port) || Number(port) > 65535) {
    throw new UsageError(`--port must be an integer from 0 to 65535, got "${port}"`);
  }
  if (!tls && (ca !== undefined || insecure)) {
    throw new UsageError(`${insecure ? "--insecure" : "--ca"} goes with --tls`);
  }
  if (ca !== undefined && insecure) {
    throw new UsageError("--ca or --insecure, not both: --insecure checks no certificate at all");
  }
  return {
    hostname: host,
    port: Number(port),
    help,
    tls: tls ? { ca, insecure } : undefined,
    messages: parsed.positionals,
  };
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
  // A person typing is told how to leave; their screen, if stdout is it too, is marked.
  const personTyping = interactive && Deno.stdin.isTerminal();
  const terminal = personTyping && Deno.stdout.isTerminal() ? new TerminalMarks() : undefined;
  let input: ReadableStream<Uint8Array> = interactive
    ? Deno.stdin.readable
    : ReadableStream.from([encoder.encode(messages.map((message) => `${message}\n`).join(""))]);
  let output = writeToStdout;
  if (terminal) {
    input = input.pipeThrough(terminal.promptAfterEachLine());
    output = (bytes) => writeToStdout(encoder.encode(terminal.received(bytes)));
  }
  const address = `${formatHost(hostname)}:${port}`;
  try {
    const tls = options.tls && {
      caCerts: options.tls.ca === undefined ? undefined : [await readCaFile(options.tls.ca)],
      insecure: options.tls.insecure,
    };
    if (tls?.insecure) {
      console.error(
        `tcp_client: WARNING: --insecure: ${address}'s certificate is not checked; ` +
          "anyone on the way can read and change this connection",
      );
    }
    await runTcpClient({
      hostname,
      port,
      input,
      output: tls ? output : refuseTlsAnswer(output),
      tls,
      onConnect: () => {
        if (!personTyping) return;
        console.error(
          `tcp_client: connected to ${address}${tls ? " over TLS" : ""}; type lines to send ` +
            "them; Ctrl-D half-closes (the server may still answer), Ctrl-C quits",
        );
        terminal?.prompt();
      },
    });
  } catch (error) {
    terminal?.clear();
    const why = error instanceof SetupError
      ? error.message
      : `${address}: ${connectError(error, hostname, port)}`;
    console.error(`tcp_client: ${why}`);
    return 1;
  }
  terminal?.clear();
  if (interactive) console.error(`tcp_client: ${address} closed the connection`);
  return 0;
}

// The CA file: read here, so that a wrong path or a file with no
// certificate in it is one line, not a certificate error later.
async function readCaFile(path: string): Promise<string> {
  let text;
  try {
    text = await Deno.readTextFile(path);
  } catch (error) {
    if (error instanceof Deno.errors.NotCapable || error instanceof Deno.errors.PermissionDenied) {
      throw new SetupError(
        `cannot read --ca ${path}: permission denied (run with --allow-read=${path})`,
      );
    }
    throw new SetupError(`cannot read --ca ${path}: ${(error as Error).message}`);
  }
  // Deno skips what is not a PEM certificate, without a word.
  if (!text.includes("-----BEGIN CERTIFICATE-----")) {
    throw new SetupError(
      `--ca ${path} holds no PEM certificate (-----BEGIN CERTIFICATE-----); ` +
        "a key or a DER file will not do",
    );
  }
  return text;
}

// A TLS server that reads our plain bytes answers with an alert record
// (content type 21, version 3.x, length 2) and hangs up. Printed, it would
// be 7 bytes of noise; it is an error that says what to do instead.
function refuseTlsAnswer(output: TcpClientOptions["output"]): TcpClientOptions["output"] {
  let first = true;
  return (bytes) => {
    if (first) {
      first = false;
      const [type, major, minor, lengthHigh, lengthLow] = bytes;
      if (type === 21 && major === 3 && minor <= 4 && lengthHigh === 0 && lengthLow === 2) {
        throw new TlsAnswerError();
      }
    }
    return output(bytes);
  };
}

function connectError(error: unknown, hostname: string, port: number): string {
  const code = (error as { code?: string }).code;
  if (error instanceof Deno.errors.ConnectionRefused || code === "ECONNREFUSED") {
    return "connection refused (is the server running? start one with: deno run -N tcp_server.ts)";
  }
  if (error instanceof Deno.errors.ConnectionReset || code === "ECONNRESET") {
    return "connection reset by the server";
  }
  if (error instanceof Deno.errors.BrokenPipe) {
    return "the server closed the connection while we were sending";
  }
  if (error instanceof Deno.errors.NotCapable || error instanceof Deno.errors.PermissionDenied) {
    return `permission denied (run with --allow-net=${formatHost(hostname)}:${port})`;
  }
  if (error instanceof Deno.errors.TimedOut) {
    return "connection timed out (is the address right and reachable?)";
  }
  if (error instanceof TlsAnswerError) {
    return "the server answered with a TLS alert: it speaks TLS; connect with --tls " +
      "(and --ca FILE to trust a test CA)";
  }
  const message = error instanceof Error ? error.message : String(error);
  if (/lookup address|Name or service not known|nodename nor servname|ENOTFOUND/i.test(message)) {
    return `unknown host "${hostname}" (check the --host spelling)`;
  }
  const certificate = message.match(/invalid peer certificate: (.*)/)?.[1];
  if (certificate !== undefined) return certificateFailure(certificate, hostname);
  if (
    /InvalidContentType|corrupt message|unexpected handshake message|wrong version number/i.test(
      message,
    )
  ) {
    return "the server does not speak TLS (a plain tcp:// server? then leave out --tls)";
  }
  return message;
}

// rustls's reason for refusing the server's certificate, as one line that
// says what was wrong and how to make it trusted.
function certificateFailure(reason: string, hostname: string): string {
  const skip = "(or, for a test only, --insecure)";
  if (/UnknownIssuer/i.test(reason)) {
    return "certificate refused: unknown issuer, no CA we trust signed it; trust its CA with " +
      `--ca FILE (e.g. --ca .certs/ca.pem from deno task cert) ${skip}`;
  }
  if (/BadSignature/i.test(reason)) {
    return "certificate refused: bad signature, it names a CA we trust that did not sign it " +
      `(a CA of the same name, made again?); trust the CA that signed it with --ca FILE ${skip}`;
  }
  if (/not valid for name|NotValidForName/i.test(reason)) {
    const names = [...reason.matchAll(/(?:DnsName|IpAddress)\("?([^")]+)"?\)/g)].map((m) => m[1]);
    const valid = names.length ? `it is for ${names.join(", ")}` : "it is for other names";
    return `certificate refused: name mismatch, ${valid}, not ${hostname}; connect by a name ` +
      `it lists (--host), or give the server a certificate for ${hostname} ${skip}`;
  }
  if (/Expired/i.test(reason)) {
    return "certificate refused: expired; the server needs a new one " +
      `(deno task cert makes a test one) ${skip}`;
  }
  if (/NotValidYet/i.test(reason)) {
    return `certificate refused: not valid yet (is this machine's clock right?) ${skip}`;
  }
  if (/CaUsedAsEndEntity/i.test(reason)) {
    return "certificate refused: the server shows a CA certificate as its own; give it a " +
      `certificate signed by that CA instead (deno task cert makes both) ${skip}`;
  }
  return `certificate refused: ${reason} ${skip}`;
}

/**
 * A person at a terminal sees what they send and what comes back apart:
 * they type after a "> " prompt, and what arrives is written over the
 * prompt as lines marked "< ", escaped, with the prompt after each whole
 * line. Only when stdin and stdout are both the terminal; piped, the bytes
 * pass unchanged.
 */
class TerminalMarks {
  static PROMPT = "> ";
  // Carriage return and "erase line": the prompt goes, the line is theirs.
  static CLEAR_LINE = "\r\x1b[2K";
  #decoder = new TextDecoder();
  #atLineStart = true;

  /** What to write for bytes received. */
  received(bytes: Uint8Array): string {
    const parts = this.#decoder.decode(bytes, { stream: true }).split("\n");
    let out = "";
    parts.forEach((part, i) => {
      const whole = i < parts.length - 1;
      if (!whole && part === "") return;
      if (this.#atLineStart) out += `${TerminalMarks.CLEAR_LINE}< `;
      out += escapeControls(whole ? part.replace(/\r$/, "") : part);
      if (whole) out += "\n";
      this.#atLineStart = whole;
    });
    return this.#atLineStart && parts.length > 1 ? out + TerminalMarks.PROMPT : out;
  }

  /** Passes typed bytes on, and shows the prompt again once a line has gone. */
  promptAfterEachLine(): TransformStream<Uint8Array, Uint8Array> {
    return new TransformStream({
      transform: (chunk, controller) => {
        controller.enqueue(chunk);
        if (chunk.at(-1) === 10) this.prompt();
      },
    });
  }

  prompt(): void {
    this.#write(TerminalMarks.PROMPT);
    this.#atLineStart = true;
  }

  /** Clears the prompt so that a line on stderr starts at the left. */
  clear(): void {
    this.#write(TerminalMarks.CLEAR_LINE);
  }

  #write(text: string): void {
    const bytes = encoder.encode(text);
    for (let written = 0; written < bytes.length;) {
      written += Deno.stdout.writeSync(bytes.subarray(written));
    }
  }
}

// What a peer sends is escaped before it reaches a person's terminal: no
// "\r" can overwrite a line, no ESC can move the cursor, no bidi override
// can reorder what they read.
function escapeControls(text: string): string {
  return text.replace(
    // deno-lint-ignore no-control-regex -- matching control characters is the point
    /[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]/g,
    (c) => {
      const code = c.charCodeAt(0);
      return code === 10
        ? "\\n"
        : code === 13
        ? "\\r"
        : code < 0x100
        ? `\\x${code.toString(16).padStart(2, "0")}`
        : `\\u${code.toString(16).padStart(4, "0")}`;
    },
  );
}

// ------------------------------------ 7. certificates we cannot check: --insecure

// Deno.connectTls always checks the certificate; node:tls can be told not
// to (`rejectUnauthorized: false`). Its socket is wrapped in the shape this
// client reads and writes: bytes are handed over as `read` asks for them,
// and the socket is paused meanwhile, so a fast server waits for us.
function connectInsecure(hostname: string, port: number): Promise<ByteConn> {
  return new Promise((resolve, reject) => {
    const socket = nodeTls.connect({
      host: hostname,
      port,
      rejectUnauthorized: false,
      servername: /^[\d.]+$|:/.test(hostname) ? undefined : hostname,
    });
    socket.once("error", reject);
    socket.once("secureConnect", () => {
      socket.off("error", reject);
      resolve(nodeSocketConn(socket));
    });
  });
}

function nodeSocketConn(socket: nodeTls.TLSSocket): ByteConn {
  const chunks: Uint8Array[] = [];
  let ended = false;
  let failure: Error | undefined;
  let wake = () => {};
  socket.on("data", (chunk: Uint8Array) => {
    chunks.push(chunk);
    socket.pause();
    wake();
  });
  socket.on("end", () => (ended = true, wake()));
  socket.on("error", (error) => (failure = error, wake()));
  socket.on("close", () => (ended = true, wake()));
  return {
    async read(buffer) {
      while (chunks.length === 0) {
        if (failure) throw failure;
        if (ended) return null;
        await new Promise<void>((resolve) => wake = resolve);
      }
      const chunk = chunks[0];
      const n = Math.min(buffer.length, chunk.length);
      buffer.set(chunk.subarray(0, n));
      if (n < chunk.length) chunks[0] = chunk.subarray(n);
      else (chunks.shift(), socket.resume());
      return n;
    },
    write(bytes) {
      return new Promise((resolve, reject) =>
        socket.write(bytes, (error) => error ? reject(error) : resolve(bytes.length))
      );
    },
    closeWrite() {
      return new Promise((resolve) => socket.end(resolve));
    },
    close() {
      socket.destroy();
    },
  };
}

if (import.meta.main) Deno.exit(await main(Deno.args));
