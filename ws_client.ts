/**
 * ws_client.ts: a WebSocket client on the standard `WebSocket` API, the same
 * one browsers have.
 *
 * What it shows: WebSocket is message-based. One `send()` arrives as one
 * `message` event, whole, however TCP split it on the way: there is no
 * framing code here, unlike `tcp_server.ts`. Closing is a handshake too: we
 * send a close frame with a code (1000 = normal), the server answers with
 * its own, and only then does the `close` event fire. A connection that just
 * drops has no close frame at all, and that is how we tell the two apart.
 *
 * Run it (least privilege; start `ws_server.ts` first):
 *
 *     deno run --allow-net=127.0.0.1:8080 ws_client.ts hello world   # prints the replies, closes
 *     deno run --allow-net=127.0.0.1:8080 ws_client.ts               # interactive; Ctrl-D closes, Ctrl-C quits
 *     deno run -N https://raw.githubusercontent.com/OWNER/REPO/main/ws_client.ts --url ws://127.0.0.1:8080/ hi
 *
 * @module
 */

import { parseArgs } from "node:util";

const DEFAULT_URL = "ws://127.0.0.1:8080/";
const DEFAULT_TIMEOUT_MS = 5000;
const NORMAL_CLOSURE = 1000;

/** Options for {@linkcode runWsClient}. */
export interface WsClientOptions {
  /** Server URL, `ws://` or `wss://`. */
  url: string;
  /** Text messages to send, one `send()` each, e.g. the lines of stdin. */
  messages: Iterable<string> | AsyncIterable<string>;
  /**
   * Close with 1000 once this many messages have arrived (send N, expect N
   * replies). Without it, close with 1000 when `messages` ends.
   */
  replies?: number;
  /** With `replies`: give up after this many milliseconds. Default 5000. */
  timeout?: number;
  /** Called with each message received: a string, or an ArrayBuffer for binary. */
  onMessage: (data: string | ArrayBuffer) => void;
}

/** How the connection ended: the close frame's code and reason. */
export interface WsClose {
  code: number;
  reason: string;
  /** True when the server started the close handshake, not us. */
  byServer: boolean;
}

/**
 * Connects, sends `messages`, passes every message received to `onMessage`,
 * closes with 1000 (after `replies` messages, or when `messages` ends), and
 * resolves with the close once the close handshake is done. If the server
 * closes first, that close is returned.
 *
 * @example Send two messages to an echo server
 * ```ts
 * const received: unknown[] = [];
 * const close = await runWsClient({
 *   url: "ws://127.0.0.1:8080/",
 *   messages: ["hello", "world"],
 *   replies: 2,
 *   onMessage: (data) => received.push(data),
 * });
 * // received is ["hello", "world"], close.code is 1000
 * ```
 *
 * @throws {Error} when the connection fails, drops without a close frame,
 * or `replies` have not arrived within `timeout`.
 */
export async function runWsClient(options: WsClientOptions): Promise<WsClose> {
  const { url, replies, onMessage } = options;
  const socket = new WebSocket(url);
  // Binary messages as ArrayBuffer, which code can read at once (Blob is async).
  socket.binaryType = "arraybuffer";
  const opened = Promise.withResolvers<void>();
  const closed = Promise.withResolvers<CloseEvent>();
  let failure = "";
  let received = 0;
  let weClosed = false;
  let timedOut = false;
  function close() {
    weClosed = true;
    // Only 1000 and 3000-4999 are for applications; the rest are reserved.
    if (socket.readyState === WebSocket.OPEN) socket.close(NORMAL_CLOSURE);
  }
  socket.onopen = () => opened.resolve();
  socket.onerror = (event) => failure ||= (event as ErrorEvent).message ?? "";
  // `close` can fire twice; resolving a settled promise is a no-op.
  socket.onclose = (event) => {
    opened.reject(new Error(connectFailure(failure)));
    closed.resolve(event);
  };
  socket.onmessage = (event) => {
    onMessage(event.data);
    if (++received === replies) close();
  };
  const timer = replies === undefined ? undefined : setTimeout(() => {
    timedOut = true;
    if (socket.readyState === WebSocket.CONNECTING) failure ||= "timed out";
    close();
  }, options.timeout ?? DEFAULT_TIMEOUT_MS);
  try {
    await opened.promise;
    await sendAll(socket, options.messages, closed.promise);
    if (replies === undefined) close();
    const event = await closed.promise;
    if (timedOut) {
      throw new Error(
        `timed out: ${received} of ${replies} replies in ${
          options.timeout ?? DEFAULT_TIMEOUT_MS
        } ms`,
      );
    }
    // Code 1006 (shown by Deno as 0) is never sent: it means no close frame came.
    if (!event.wasClean || event.code === 0 || event.code === 1006) {
      throw new Error(
        "connection lost: it closed without a close frame (server crashed or network dropped?)",
      );
    }
    return { code: event.code, reason: event.reason, byServer: !weClosed };
  } finally {
    clearTimeout(timer);
  }
}

// Sends each message as it comes, and stops early if the connection closes
// while we wait for the next one (say, for a line on stdin).
async function sendAll(
  socket: WebSocket,
  messages: Iterable<string> | AsyncIterable<string>,
  closed: Promise<unknown>,
): Promise<void> {
  const iterator = Symbol.asyncIterator in messages
    ? messages[Symbol.asyncIterator]()
    : messages[Symbol.iterator]();
  const stop = closed.then(() => ({ done: true, value: undefined }) as const);
  for (;;) {
    const next = await Promise.race([iterator.next(), stop]);
    if (next.done || socket.readyState !== WebSocket.OPEN) break;
    socket.send(next.value);
  }
  await iterator.return?.();
}

function connectFailure(message: string): string {
  if (message === "timed out") return "timed out waiting for the handshake";
  const status = message.match(/Invalid status code:? (\d+)/i);
  if (status) {
    return `the server answered HTTP ${
      status[1]
    } instead of 101 Switching Protocols (is this a WebSocket endpoint?)`;
  }
  if (/lookup address|Name or service not known|dns/i.test(message)) {
    return "unknown host (check the URL)";
  }
  if (/invalid HTTP|parse/i.test(message)) {
    return "the server does not speak HTTP, so it is no WebSocket server (a raw TCP port?)";
  }

  if (/tcp connect|refused/i.test(message)) {
    return "connection refused (is the server running? start one with: deno run -N ws_server.ts)";
  }
  return message ? `cannot connect: ${message}` : "cannot connect";
}

// ---------------------------------------------------------------- command line

const USAGE = `Usage: ws_client.ts [options] [MESSAGE ...]

Connects to a WebSocket server. With MESSAGEs, sends each as a text message,
prints what comes back until one reply per message has arrived, then closes
with code 1000. Without, sends each line you type; Ctrl-D closes, Ctrl-C quits.
Binary messages are shown as <binary N bytes>.

Options:
  --url URL        server (default ${DEFAULT_URL})
  --timeout MS     with MESSAGEs: give up after this long (default ${DEFAULT_TIMEOUT_MS})
  -h, --help       show this help`;

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
        url: { type: "string", default: DEFAULT_URL },
        timeout: { type: "string", default: String(DEFAULT_TIMEOUT_MS) },
        help: { type: "boolean", short: "h", default: false },
      },
    });
  } catch (error) {
    throw new UsageError(parseArgsMessage(error as Error));
  }
  const { url, timeout, help } = parsed.values;
  if (!URL.canParse(url) || !/^wss?:$/.test(new URL(url).protocol)) {
    throw new UsageError(`--url must be a ws:// or wss:// URL, got "${url}"`);
  }
  if (!/^\d+$/.test(timeout) || Number(timeout) < 1) {
    throw new UsageError(
      `--timeout must be a whole number of milliseconds, 1 or more, got "${timeout}"`,
    );
  }
  return { url, timeout: Number(timeout), help, messages: parsed.positionals };
}

// stdin is a byte stream like any other: cut it into lines, one message each.
async function* readLines(stream: ReadableStream<Uint8Array>): AsyncGenerator<string> {
  let pending = "";
  for await (const text of stream.pipeThrough(new TextDecoderStream())) {
    const lines = (pending + text).split("\n");
    pending = lines.pop()!;
    for (const line of lines) yield line.endsWith("\r") ? line.slice(0, -1) : line;
  }
  if (pending) yield pending;
}

function show(data: string | ArrayBuffer): void {
  console.log(typeof data === "string" ? data : `<binary ${data.byteLength} bytes>`);
}

async function main(args: string[]): Promise<number> {
  let options;
  try {
    options = parseCommandLine(args);
  } catch (error) {
    if (!(error instanceof UsageError)) throw error;
    console.error(`ws_client: ${error.message}\n\n${USAGE}`);
    return 2;
  }
  if (options.help) {
    console.log(USAGE);
    return 0;
  }
  const { url, timeout, messages } = options;
  const oneShot = messages.length > 0;
  let close;
  try {
    close = await runWsClient({
      url,
      messages: oneShot ? messages : readLines(Deno.stdin.readable),
      replies: oneShot ? messages.length : undefined,
      timeout,
      onMessage: show,
    });
  } catch (error) {
    console.error(`ws_client: ${url}: ${clientError(error, url)}`);
    return 1;
  }
  if (!close.byServer) return 0;
  const why = `code ${close.code}${close.reason ? ` (${close.reason})` : ""}`;
  console.error(`ws_client: ${url}: the server closed the connection: ${why}`);
  return close.code === NORMAL_CLOSURE ? 0 : 1;
}

function clientError(error: unknown, url: string): string {
  if (error instanceof Deno.errors.NotCapable || error instanceof Deno.errors.PermissionDenied) {
    return `permission denied (run with --allow-net=${new URL(url).host})`;
  }
  return error instanceof Error ? error.message : String(error);
}

if (import.meta.main) Deno.exit(await main(Deno.args));
