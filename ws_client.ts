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
 * A server is a peer like any other, so nothing it sends is trusted: each
 * message is printed as one line with its control characters escaped, a
 * message is bounded in size (even one Deno is still assembling out of our
 * sight), and every wait is bounded: the handshake, the replies, and the
 * server's answer to our close frame.
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
const DEFAULT_MAX_MESSAGE = 1024 * 1024;
// Deno's client refuses frames over 64 MiB on its own ("Frame too large").
const DENO_MAX_FRAME = 64 * 1024 * 1024;
// How long the server gets to answer our close frame before we stop waiting.
const CLOSE_WAIT_MS = 2000;
// Deno assembles a fragmented message out of sight, in memory outside the
// JavaScript heap, and hands it over only once complete; there is no cap on
// the fragments' sum (denoland/deno#15809). Growth of that memory by more
// than this plus a few messages' worth means a message too big is arriving.
const NATIVE_MEMORY_HEADROOM = 128 * 1024 * 1024;
const MEMORY_CHECK_MS = 50;

// Close codes (RFC 6455, section 7.4.1). The WebSocket API lets a client send
// only 1000 and 3000-4999, so "too big" (1009) goes out as a private 4009.
const NORMAL_CLOSURE = 1000;
const MESSAGE_TOO_BIG = 4009;

const encoder = new TextEncoder();

/** Options for {@linkcode runWsClient}. Sizes are in bytes, times in milliseconds. */
export interface WsClientOptions {
  /** Server URL, `ws://` or `wss://`. */
  url: string;
  /** Text messages to send, one `send()` each, e.g. the lines of stdin. */
  messages: Iterable<string> | AsyncIterable<string>;
  /**
   * Close with 1000 once each message sent has come back: from an echo
   * server as it was sent, from a chat server as `NAME: TEXT` under our own
   * name (everybody else's lines are passed to `onMessage` too).
   */
  untilEchoed?: boolean;
  /**
   * Close with 1000 once this many messages have arrived, whatever they
   * are. Without it or `untilEchoed`, close with 1000 when `messages` ends.
   */
  replies?: number;
  /**
   * Give up on the opening handshake after this long; with `replies` or
   * `untilEchoed`, on the whole run. Default 5000.
   */
  timeout?: number;
  /**
   * Largest message accepted; a bigger one closes the connection (code 4009)
   * and rejects. Default 1 MiB, at most 64 MiB.
   */
  maxMessage?: number;
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
 * closes with 1000 (once each message has come back, after `replies`
 * messages, or when `messages` ends), and resolves with the close once the
 * close handshake is done. If the server closes first, that close is
 * returned at once, even while `messages` is still waiting for its next one.
 *
 * @example Send two messages to an echo or a chat server
 * ```ts
 * const received: unknown[] = [];
 * const close = await runWsClient({
 *   url: "ws://127.0.0.1:8080/",
 *   messages: ["hello", "world"],
 *   untilEchoed: true,
 *   onMessage: (data) => received.push(data),
 * });
 * // echo: received is ["hello", "world"]; chat: ["guest-1: hello", "guest-1: world"]
 * // close.code is 1000
 * ```
 *
 * @throws {Error} when the connection fails, drops without a close frame,
 * brings a message over `maxMessage`, the replies have not come back within
 * `timeout`, or the server does not answer our close frame within 2 s.
 * Having given up, it does not wait for the server to let go: the connection
 * may linger until the server hangs up (the command line exits at once).
 */
export async function runWsClient(options: WsClientOptions): Promise<WsClose> {
  const { url, replies, onMessage } = options;
  const timeout = options.timeout ?? DEFAULT_TIMEOUT_MS;
  const maxMessage = Math.min(options.maxMessage ?? DEFAULT_MAX_MESSAGE, DENO_MAX_FRAME);
  const echoes = options.untilEchoed ? new OwnEchoes() : undefined;
  const boundedRun = replies !== undefined || echoes !== undefined;
  const socket = new WebSocket(url);
  // Binary messages as ArrayBuffer, which code can read at once (Blob is async).
  socket.binaryType = "arraybuffer";
  const opened = Promise.withResolvers<void>();
  const closed = Promise.withResolvers<CloseEvent>();
  // Rejected when we stop waiting for the server: the close wait or memory.
  const abandoned = Promise.withResolvers<never>();
  abandoned.promise.catch(() => {});
  let failure = "";
  let received = 0;
  let weClosed = false;
  let timedOut = false;
  let tooBig = 0;
  let closeWait: ReturnType<typeof setTimeout> | undefined;
  function close(code = NORMAL_CLOSURE, reason?: string) {
    // Not OPEN: the server has begun the close, or it is over.
    if (weClosed || socket.readyState !== WebSocket.OPEN) return;
    weClosed = true;
    socket.close(code, reason);
    // A server that never answers our close frame would keep us forever.
    closeWait = setTimeout(() => {
      abandoned.reject(
        new Error(`the server did not answer our close frame within ${CLOSE_WAIT_MS} ms; gave up`),
      );
    }, CLOSE_WAIT_MS);
  }
  socket.onopen = () => opened.resolve();
  socket.onerror = (event) => failure ||= (event as ErrorEvent).message ?? "";
  // `close` can fire twice; resolving a settled promise is a no-op.
  socket.onclose = (event) => {
    opened.reject(new Error(connectFailure(failure)));
    closed.resolve(event);
  };
  socket.onmessage = (event) => {
    if (weClosed && tooBig) return;
    const size = messageSize(event.data, maxMessage);
    if (size > maxMessage) {
      tooBig = size;
      close(MESSAGE_TOO_BIG, `message too big (max ${maxMessage} bytes)`);
      return;
    }
    onMessage(event.data);
    received++;
    if (typeof event.data === "string") echoes?.received(event.data);
    if (received === replies || echoes?.done) close();
  };
  const deadline = setTimeout(() => {
    timedOut = true;
    // Closing a socket that is still connecting cancels the handshake.
    if (socket.readyState === WebSocket.CONNECTING) {
      failure ||= "timed out";
      socket.close();
    } else close();
  }, timeout);
  const stopWatching = watchNativeMemory(NATIVE_MEMORY_HEADROOM + 4 * maxMessage, (grown) => {
    close(MESSAGE_TOO_BIG, `message too big (max ${maxMessage} bytes)`);
    // It keeps arriving until the server reads our close: no waiting for that.
    abandoned.reject(
      new Error(
        `the server is sending a message over --max-message ${maxMessage} ` +
          `(${Math.round(grown / 1048576)} MiB of memory so far, and it has not ended); gave up`,
      ),
    );
  });
  try {
    await Promise.race([opened.promise, abandoned.promise]);
    if (!boundedRun) clearTimeout(deadline);
    const stop = Promise.race([closed.promise, abandoned.promise.catch(() => {})]);
    await sendAll(socket, options.messages, stop, (text) => echoes?.sent(text));
    if (echoes) {
      echoes.allSent();
      if (echoes.done) close();
    } else if (replies === undefined) close();
    const event = await Promise.race([closed.promise, abandoned.promise]);
    if (tooBig) {
      throw new Error(
        `the server sent a message of ${tooBig} bytes, over --max-message ${maxMessage}; ` +
          "closed the connection (raise --max-message to accept it)",
      );
    }
    if (timedOut) {
      const [done, of, what] = echoes
        ? [echoes.count, echoes.total, "messages came back"]
        : [received, replies, "replies"];
      throw new Error(`timed out: ${done} of ${of} ${what} in ${timeout} ms`);
    }
    // Code 1006 (shown by Deno as 0) is never sent: it means no close frame came.
    if (!event.wasClean || event.code === 0 || event.code === 1006) {
      throw new Error(
        "connection lost: it closed without a close frame (server crashed or network dropped?)",
      );
    }
    return { code: event.code, reason: event.reason, byServer: !weClosed };
  } finally {
    clearTimeout(deadline);
    clearTimeout(closeWait);
    stopWatching();
  }
}

// A message's size in bytes, or at least enough of it to compare with `max`:
// a string's UTF-8 size is between its length and three times that, so its
// bytes are counted only when those bounds cannot decide.
function messageSize(data: string | ArrayBuffer, max: number): number {
  if (typeof data !== "string") return data.byteLength;
  if (data.length * 3 <= max || data.length > max) return data.length;
  return encoder.encode(data).length;
}

// The only sign of a fragmented message on its way is the memory Deno
// collects it in, outside the JavaScript heap. Calls `onOver` once that has
// grown by more than `limit` bytes since the start; returns a stop function.
function watchNativeMemory(limit: number, onOver: (grown: number) => void): () => void {
  const native = () => {
    const { rss, heapTotal, external } = Deno.memoryUsage();
    return rss - heapTotal - external;
  };
  const start = native();
  const timer = setInterval(() => {
    const grown = native() - start;
    if (grown <= limit) return;
    clearInterval(timer);
    onOver(grown);
  }, MEMORY_CHECK_MS);
  return () => clearInterval(timer);
}

const STOPPED: unique symbol = Symbol("stopped");

// Sends each message as it comes, and stops at once if the connection closes
// while we wait for the next one (say, for a line on stdin).
async function sendAll(
  socket: WebSocket,
  messages: Iterable<string> | AsyncIterable<string>,
  stop: Promise<unknown>,
  onSent: (text: string) => void,
): Promise<void> {
  const iterator = Symbol.asyncIterator in messages
    ? messages[Symbol.asyncIterator]()
    : messages[Symbol.iterator]();
  const stopped = stop.then((): typeof STOPPED => STOPPED);
  for (;;) {
    const next = await Promise.race([iterator.next(), stopped]);
    if (next === STOPPED || socket.readyState !== WebSocket.OPEN) {
      // An async generator busy reading (stdin) only returns after its read
      // ends, which may be never: ask it to, but do not wait for it.
      Promise.resolve(iterator.return?.()).catch(() => {});
      return;
    }
    if (next.done) return;
    socket.send(next.value);
    onSent(next.value);
  }
}

/**
 * Which of the messages we sent have come back. An echo server returns our
 * text as it is. A chat server relays it to everyone as `NAME: TEXT`, among
 * everybody else's lines, and may tell us our name (`* you are NAME`); if it
 * does not, our name is the speaker whose lines, from our first send on, are
 * exactly our messages in order. A speaker heard before we sent anything, or
 * saying anything else, is somebody else.
 */
class OwnEchoes {
  #sent: string[] = [];
  #allSent = false;
  #echoed = 0;
  #ownName: string | undefined;
  #relayed = new Map<string, number>();
  #others = new Set<string>();

  sent(text: string): void {
    this.#sent.push(text);
  }

  allSent(): void {
    this.#allSent = true;
  }

  received(text: string): void {
    if (this.#sent.length > 0 && this.#isNext(text, this.#echoed)) {
      this.#echoed++;
      return;
    }
    const name = text.match(/^\* you are (\S+)$/)?.[1];
    if (name !== undefined) {
      this.#ownName ??= name;
      return;
    }
    const line = text.match(/^([^\s:]+): ([\s\S]*)$/);
    if (!line) return;
    const [, speaker, said] = line;
    if (this.#ownName !== undefined ? speaker !== this.#ownName : this.#others.has(speaker)) return;
    const count = this.#relayed.get(speaker) ?? 0;
    if (this.#sent.length > 0 && this.#isNext(said, count)) {
      this.#relayed.set(speaker, count + 1);
    } else if (this.#ownName === undefined) {
      this.#others.add(speaker);
    }
  }

  /** How many of ours have come back, in order. */
  get count(): number {
    if (this.#ownName !== undefined) {
      return Math.max(this.#echoed, this.#relayed.get(this.#ownName) ?? 0);
    }
    return Math.max(this.#echoed, ...this.#relayed.values());
  }

  get total(): number {
    return this.#sent.length;
  }

  get done(): boolean {
    return this.#allSent && this.count === this.#sent.length;
  }

  // The server may show our control characters as their pictures (chat).
  #isNext(text: string, index: number): boolean {
    const expected = this.#sent[index];
    return expected !== undefined &&
      (text === expected || text === sanitizeChatText(expected));
  }
}

// Chat text may carry no control characters but tab: a "\r" or an ESC
// sequence would let one sender overwrite or forge lines on everyone's
// terminal. Each is replaced by its visible Unicode "control picture".
function sanitizeChatText(text: string): string {
  // deno-lint-ignore no-control-regex -- matching control characters is the point
  return text.replace(/[\x00-\x08\x0a-\x1f\x7f-\x9f]/g, (c) => {
    const code = c.charCodeAt(0);
    return code < 0x20 ? String.fromCharCode(0x2400 + code) : code === 0x7f ? "\u2421" : "\ufffd";
  });
}

// Anything a peer chose (a message, a close reason, an error's detail) is
// escaped before it reaches the terminal: no newline can forge a line, no ESC
// can move the cursor, no bidi override can reorder what the user reads.
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
prints what comes back until each has come back (from an echo server as sent,
from a chat server as "NAME: TEXT" under our own name), then closes with code
1000. Without, sends each line you type; Ctrl-D closes, Ctrl-C quits. When the
server closes, says so at once and exits: 0 after code 1000, 1 after any other.
Each message is one line: control characters show escaped (\\n, \\x1b), binary
messages as <binary N bytes>. A server that does not answer our close frame
within ${CLOSE_WAIT_MS / 1000} s is left (exit 1).

Options:
  --url URL            server (default ${DEFAULT_URL})
  --timeout MS         give up on the handshake after this long; with MESSAGEs,
                       on the whole run (default ${DEFAULT_TIMEOUT_MS})
  --max-message BYTES  largest message accepted; a bigger one closes the connection
                       (code 4009) and exits 1 (default ${DEFAULT_MAX_MESSAGE}, at most 64 MiB)
  -h, --help           show this help`;

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
        "max-message": { type: "string", default: String(DEFAULT_MAX_MESSAGE) },
        help: { type: "boolean", short: "h", default: false },
      },
    });
  } catch (error) {
    throw new UsageError(parseArgsMessage(error as Error));
  }
  const { url, timeout, help, "max-message": maxMessage } = parsed.values;
  if (!URL.canParse(url) || !/^wss?:$/.test(new URL(url).protocol)) {
    throw new UsageError(`--url must be a ws:// or wss:// URL, got "${url}"`);
  }
  if (!/^\d+$/.test(timeout) || Number(timeout) < 1) {
    throw new UsageError(
      `--timeout must be a whole number of milliseconds, 1 or more, got "${timeout}"`,
    );
  }
  if (!/^\d+$/.test(maxMessage) || Number(maxMessage) < 1 || Number(maxMessage) > DENO_MAX_FRAME) {
    throw new UsageError(
      `--max-message must be a whole number of bytes from 1 to ${DENO_MAX_FRAME}, got "${maxMessage}"`,
    );
  }
  return {
    url,
    timeout: Number(timeout),
    maxMessage: Number(maxMessage),
    help,
    messages: parsed.positionals,
  };
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

// One message, one line: what the server chose reaches the terminal escaped.
function show(data: string | ArrayBuffer): void {
  console.log(
    typeof data === "string" ? escapeControls(data) : `<binary ${data.byteLength} bytes>`,
  );
}

function report(url: string, text: string): void {
  console.error(`ws_client: ${url}: ${escapeControls(text)}`);
}

async function main(args: string[]): Promise<number> {
  let options;
  try {
    options = parseCommandLine(args);
  } catch (error) {
    if (!(error instanceof UsageError)) throw error;
    console.error(`ws_client: ${escapeControls(error.message)}\n\n${USAGE}`);
    return 2;
  }
  if (options.help) {
    console.log(USAGE);
    return 0;
  }
  const { url, timeout, maxMessage, messages } = options;
  const oneShot = messages.length > 0;
  let close;
  try {
    close = await runWsClient({
      url,
      messages: oneShot ? messages : readLines(Deno.stdin.readable),
      untilEchoed: oneShot,
      timeout,
      maxMessage,
      onMessage: show,
    });
  } catch (error) {
    report(url, clientError(error, url));
    return 1;
  }
  // The answer to our own 1000 is no news; any other code is, whoever began.
  if (!close.byServer && close.code === NORMAL_CLOSURE) return 0;
  const why = `code ${close.code}${close.reason ? ` (${close.reason})` : ""}`;
  report(url, `the server closed the connection: ${why}`);
  return close.code === NORMAL_CLOSURE ? 0 : 1;
}

function clientError(error: unknown, url: string): string {
  if (error instanceof Deno.errors.NotCapable || error instanceof Deno.errors.PermissionDenied) {
    return `permission denied (run with --allow-net=${new URL(url).host})`;
  }
  return error instanceof Error ? error.message : String(error);
}

// Deno.exit, not a return: a read of stdin that is still waiting would keep
// the process alive after the connection is gone.
if (import.meta.main) Deno.exit(await main(Deno.args));
