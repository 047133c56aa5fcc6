/**
 * bridge.ts: a TCP ↔ WebSocket bridge, so that netcat users and browser
 * users can sit in the same chat. It listens on one transport and connects
 * each client, with a connection of its own, to a server on the other.
 *
 * What it shows: framing is a decision. A WebSocket carries messages, TCP
 * carries bytes, and a bridge between them has to decide where one message
 * ends in the byte stream. Here a newline ends it (`--framing lines`, what
 * the chat servers speak), or nothing does and each read is a message
 * (`--framing raw`, where you can watch TCP cut your bytes wherever it
 * likes). The ends have to be translated too (a FIN is not a close frame),
 * and so does backpressure, which a byte stream has built in and a
 * WebSocket does not. In reading order:
 *
 *   1. byte stream → messages: the line framer, and reading TCP into a WebSocket
 *   2. messages → byte stream: each message written to TCP, bounded
 *   3. ends: FIN vs close frame, and an upstream that will not answer
 *   4. backpressure both ways: bufferedAmount one way, --max-queue the other
 *
 * Run it (least privilege: its own address and the server's, nothing else):
 *
 *     deno run --allow-net=127.0.0.1:8080 ws_server.ts --mode chat
 *     deno run --allow-net=127.0.0.1:9001,127.0.0.1:8080 bridge.ts \
 *       --listen tcp://127.0.0.1:9001 --to ws://127.0.0.1:8080/
 *     nc -N 127.0.0.1 9001       # chats with the browser page at http://127.0.0.1:8080/
 *
 *     deno run --allow-net=127.0.0.1:9000 tcp_server.ts --mode chat
 *     deno run --allow-net=127.0.0.1:8081,127.0.0.1:9000 bridge.ts \
 *       --listen ws://127.0.0.1:8081/ --to tcp://127.0.0.1:9000
 *     # open http://127.0.0.1:8081/ (the bridge serves a page), or:
 *     deno run -N ws_client.ts --url ws://127.0.0.1:8081/
 *
 * Try `--framing raw` in front of `ws_server.ts` in echo mode: type into `nc`
 * a line at a time, then paste many lines at once. Each read comes back as
 * one binary message, whatever lines it held, and the log counts reads.
 *
 * @module
 */

import { parseArgs } from "node:util";

const DEFAULT_MAX_MESSAGE = 1024 * 1024;
const DEFAULT_MAX_QUEUE = 2 * 1024 * 1024;
// Deno refuses WebSocket frames over 64 MiB on its own.
const DENO_MAX_FRAME = 64 * 1024 * 1024;
// One buffer per TCP connection, reused for every read.
const READ_BUFFER_SIZE = 64 * 1024;
// Towards a WebSocket: stop reading TCP while more than this waits to be sent.
const BUFFERED_HIGH = 1024 * 1024;
// How often a paused reader looks at bufferedAmount again: the WebSocket API
// has no "drained" event to wait for.
const BUFFERED_POLL_MS = 10;
// After our FIN, how long we keep reading (and discarding) what the TCP peer
// still sends. Closing with unread input makes the kernel send a reset,
// which can destroy the last lines before they are read.
const LINGER_MS = 2000;
// How long an upstream WebSocket server gets to answer the handshake. A
// server that accepts and never answers (a TCP server, say) would otherwise
// hold the client forever: Deno's WebSocket has no timeout of its own.
const DEFAULT_HANDSHAKE_TIMEOUT_MS = 10_000;
// How long clients get to answer our close frame on shutdown.
const CLOSE_GRACE_MS = 500;
// A close frame's reason is at most 123 bytes of UTF-8 (RFC 6455, 5.5).
const MAX_CLOSE_REASON = 123;

// Close codes (RFC 6455, section 7.4.1). A WebSocket *client* may send only
// 1000 or 3000-4999 (the `close()` of the WebSocket API throws on the rest),
// so towards an upstream server the bridge uses 1000 and one private code.
const NORMAL_CLOSURE = 1000;
const GOING_AWAY = 1001;
const POLICY_VIOLATION = 1008;
const MESSAGE_TOO_BIG = 1009;
const INTERNAL_ERROR = 1011;
/** Sent upstream when the TCP client failed (reset, line too long, too slow). */
const CLIENT_FAILED = 4000;

const encoder = new TextEncoder();
// Not `fatal`: bytes that are not UTF-8 become U+FFFD instead of an error.
const decoder = new TextDecoder();

/** How the byte stream is cut into messages. */
export type Framing = "lines" | "raw";

/** Options for {@linkcode startBridge}. Sizes are in bytes. */
export interface BridgeOptions {
  /**
   * Where clients connect: `tcp://HOST:PORT`, or `ws://HOST:PORT/` (which also
   * serves a browser page at `/`). Port 0 picks a free one (read it from `addr`).
   */
  listen: string;
  /** The server each client gets a connection to: `ws://HOST:PORT/PATH` or `tcp://HOST:PORT`. */
  to: string;
  /** `lines` (default): one line is one text message; `raw`: one TCP read is one binary message. */
  framing?: Framing;
  /** Longest line translated, and largest message a WebSocket client may send. Default 1 MiB. */
  maxMessage?: number;
  /** Bytes waiting for a TCP side before that link is dropped as too slow. Default 2 MiB. */
  maxQueue?: number;
  /** Milliseconds an upstream WebSocket server gets to finish the handshake. Default 10000. */
  handshakeTimeout?: number;
  /** Where connection events go. Default `console.error`; pass `() => {}` for silence. */
  log?: (line: string) => void;
}

/** A running bridge, returned by {@linkcode startBridge}. */
export interface Bridge extends AsyncDisposable {
  /** The address actually bound (with the real port when you asked for 0). */
  readonly addr: Deno.NetAddr;
  /** Clients connected right now. */
  readonly connections: number;
  /** Stop accepting, close every client and its upstream, and wait until all are gone. */
  close(): Promise<void>;
}

/** An address from `--listen` or `--to`. */
interface Endpoint {
  transport: "tcp" | "ws";
  hostname: string;
  port: number;
  /** As written, normalized: `tcp://127.0.0.1:9000`, `ws://127.0.0.1:8080/`. */
  url: string;
}

/** One downstream client and its upstream: a TCP connection and a WebSocket. */
interface Link {
  peer: string;
  /** The TCP side: the client (tcp:// listener) or the upstream server (ws:// listener). */
  conn: Deno.TcpConn | undefined;
  /** The WebSocket side: the upstream (tcp:// listener) or the client (ws:// listener). */
  socket: WebSocket | undefined;
  /** Bytes waiting to be written to the TCP side, written together in one write. */
  queue: Uint8Array[];
  queued: number;
  /** Set while a flush is writing; awaiting it waits until the queue is empty. */
  flushing: Promise<void> | undefined;
  /** A FIN goes to the TCP side once the queue is written. */
  finishing: boolean;
  finSent: boolean;
  /** No more input is translated: the link is on its way out. */
  ending: boolean;
  /** The bridge itself closed the WebSocket (so its close event is no news). */
  weClosed: boolean;
  /** The WebSocket's close event came (Deno can fire it twice). */
  socketDone: boolean;
  socketGone: PromiseWithResolvers<void>;
  linger: ReturnType<typeof setTimeout> | undefined;
  /** Why the link ended, for the log; the first cause found wins. */
  reason: string;
  // The translation, counted for the departure log line.
  streamUnits: number;
  messagesSent: number;
  messagesReceived: number;
  bytesWritten: number;
}

interface BridgeState {
  listen: Endpoint;
  to: Endpoint;
  framing: Framing;
  maxMessage: number;
  maxQueue: number;
  handshakeTimeout: number;
  log: (line: string) => void;
  links: Set<Link>;
  tasks: Set<Promise<void>>;
  closing: boolean;
}

// ------------------------------------------- 1. byte stream → messages

/**
 * Cuts a byte stream into lines. TCP delivers bytes, not messages: a line can
 * arrive in pieces across many reads, and one read can hold many lines, so
 * the framer keeps the unfinished tail of each chunk for the next one.
 *
 * Returns a `push(chunk, onLine)` function that calls `onLine` once per
 * complete line (without `\n` or a trailing `\r`; a view that is only valid
 * during the call) and returns `false` as soon as a line is longer than
 * `maxLine` bytes, even one whose end has not arrived yet. Push `null` at
 * the end of the stream to get a last line that had no `\n`.
 *
 * @example
 * ```ts
 * const push = createLineFramer(1024);
 * const lines: string[] = [];
 * const decode = (line: Uint8Array) => lines.push(new TextDecoder().decode(line));
 * push(new TextEncoder().encode("hel"), decode);
 * push(new TextEncoder().encode("lo\r\nworld\n"), decode);
 * // lines is ["hello", "world"]
 * ```
 */
export function createLineFramer(
  maxLine: number,
): (chunk: Uint8Array | null, onLine: (line: Uint8Array) => void) => boolean {
  // Room for a full line plus its "\r", allocated only when a line is split.
  let pending = new Uint8Array(0);
  let pendingLength = 0;
  return function push(chunk, onLine) {
    if (chunk === null) {
      if (pendingLength > 0) chunk = Uint8Array.of(10);
      else return true;
    }
    let start = 0;
    for (let end = chunk.indexOf(10, start); end !== -1; end = chunk.indexOf(10, start)) {
      let line = chunk.subarray(start, end);
      start = end + 1;
      if (pendingLength > 0) {
        if (pendingLength + line.length > maxLine + 1) return false;
        line = append(line);
        pendingLength = 0;
      }
      if (line[line.length - 1] === 13) line = line.subarray(0, line.length - 1);
      if (line.length > maxLine) return false;
      onLine(line);
    }
    const tail = chunk.subarray(start);
    if (pendingLength + tail.length > maxLine + 1) return false;
    if (tail.length > 0) append(tail);
    return true;
  };
  function append(bytes: Uint8Array): Uint8Array {
    const needed = pendingLength + bytes.length;
    if (needed > pending.length) {
      const grown = new Uint8Array(
        Math.min(maxLine + 1, Math.max(needed, 2 * pending.length, 256)),
      );
      grown.set(pending.subarray(0, pendingLength));
      pending = grown;
    }
    pending.set(bytes, pendingLength);
    pendingLength = needed;
    return pending.subarray(0, needed);
  }
}

// Reads the TCP side until its end and sends what it reads to the WebSocket:
// with `lines`, one text message per line (an empty line is an empty
// message); with `raw`, one binary message per read, cut wherever TCP cut
// it. Returns once the TCP side has ended (EOF, a reset, or we closed it).
async function streamToSocket(state: BridgeState, link: Link): Promise<void> {
  const conn = link.conn!;
  const buf = new Uint8Array(READ_BUFFER_SIZE);
  const push = createLineFramer(state.maxMessage);
  const sendLine = (line: Uint8Array) => {
    link.streamUnits++;
    sendMessage(link, decoder.decode(line));
  };
  try {
    for (;;) {
      await socketDrained(link);
      const n = await conn.read(buf);
      // Once the link is ending, what still arrives is read and discarded.
      if (link.ending || !isOpen(link.socket)) {
        if (n === null) return;
        continue;
      }
      if (state.framing === "raw") {
        if (n === null) break;
        link.streamUnits++;
        // `send` may go out after the next read: it gets a copy, not `buf`.
        sendMessage(link, buf.slice(0, n));
        continue;
      }
      // At EOF (null), a last line without "\n" still counts.
      if (!push(n === null ? null : buf.subarray(0, n), sendLine)) {
        lineTooLong(state, link);
        if (n === null) return;
        continue;
      }
      if (n === null) break;
    }
  } catch (error) {
    tcpFailed(state, link, describe(error));
    return;
  }
  tcpFinished(link);
}

function sendMessage(link: Link, data: string | Uint8Array): void {
  link.messagesSent++;
  link.socket!.send(data);
}

// ------------------------------------------- 2. messages → byte stream

// A message from the WebSocket, written to the TCP side. With `lines`, a text
// message becomes its UTF-8 and a "\n" (a message that holds newlines is
// written as it is: the chat servers sanitize, the bridge only translates);
// binary is written as raw bytes, and with `raw` so is text.
function socketMessage(state: BridgeState, link: Link, data: string | ArrayBuffer): void {
  if (link.ending) return;
  if (state.listen.transport === "ws" && messageTooBig(state, link, data)) return;
  link.messagesReceived++;
  const bytes = typeof data !== "string"
    ? new Uint8Array(data)
    : encoder.encode(state.framing === "lines" ? `${data}\n` : data);
  writeToStream(state, link, bytes);
}

// Queue bytes for the TCP side and make sure a flush will write them.
// Messages that arrive while a write is in progress go out together in the
// next write. The queue is bounded (section 4): the WebSocket cannot be
// told to wait, so a TCP side that reads slower than messages come is cut off.
function writeToStream(state: BridgeState, link: Link, bytes: Uint8Array): void {
  link.queue.push(bytes);
  link.queued += bytes.length;
  if (link.queued > state.maxQueue) {
    tooSlow(state, link);
    return;
  }
  startFlush(link);
}

function startFlush(link: Link): void {
  if (link.conn && (link.queue.length > 0 || link.finishing)) link.flushing ??= flush(link);
}

async function flush(link: Link): Promise<void> {
  // Start after the current turn's synchronous work, so that everything it
  // queued leaves in the same write.
  await null;
  const conn = link.conn!;
  try {
    while (link.queue.length > 0) {
      const chunks = link.queue;
      link.queue = [];
      const bytes = chunks.length === 1 ? chunks[0] : concat(chunks);
      // A write may take only part of the bytes (a "partial send").
      let written = await conn.write(bytes);
      while (written < bytes.length) written += await conn.write(bytes.subarray(written));
      link.queued -= bytes.length;
      link.bytesWritten += bytes.length;
    }
    if (link.finishing && !link.finSent) {
      link.finSent = true;
      await conn.closeWrite();
    }
  } catch (error) {
    // The TCP peer is gone; closing ends its read loop too.
    link.reason ||= describe(error);
    link.queue = [];
    closeQuietly(conn);
  } finally {
    link.flushing = undefined;
  }
}

// ------------------------------------------- 3. ends: FIN vs close frame

// TCP ends with a FIN, a half-close: "I am done sending", while the other
// direction stays open. A WebSocket ends with a close frame, both ways at
// once. So the bridge maps them: a FIN from the TCP side becomes close 1000,
// sent after every message before it (Deno sends in order); a close from the
// WebSocket side becomes a FIN, after every byte before it is written.

function tcpFinished(link: Link): void {
  link.reason ||= `FIN → close ${NORMAL_CLOSURE}`;
  closeSocket(link, NORMAL_CLOSURE, "");
}

function socketClosed(state: BridgeState, link: Link, event: CloseEvent): void {
  if (link.socketDone) return;
  link.socketDone = true;
  // Deno shows "no close frame at all" (1006) as code 0.
  const lost = !event.wasClean || event.code === 0 || event.code === 1006;
  if (!link.weClosed) {
    link.reason ||= lost
      ? "connection lost (no close frame)"
      : `close ${event.code}${event.reason ? ` ${event.reason}` : ""} → FIN`;
    // A TCP client is told, in a line of its own, when its server vanished.
    if (lost && state.listen.transport === "tcp" && !link.ending) {
      refuseTcpClient(link, `lost the connection to ${state.to.url}`);
    }
  }
  finishStream(link);
  link.socketGone.resolve();
}

// The FIN towards the TCP side, after everything queued for it. Then its
// peer has LINGER_MS to send its own FIN before the connection is closed.
function finishStream(link: Link): void {
  if (link.finishing) return;
  link.finishing = true;
  startFlush(link);
  startLinger(link);
}

// (A WebSocket client may leave while its upstream is still being dialled:
// then the linger starts once there is a connection to close.)
function startLinger(link: Link): void {
  if (!link.conn || link.linger !== undefined) return;
  link.linger = setTimeout(() => closeQuietly(link.conn), LINGER_MS);
}

// A TCP client is told why in one last line, the way tcp_server.ts does it,
// then gets the FIN. (Only a client: a line sent to an upstream TCP server
// would be a chat message from the client, one it never wrote.)
function refuseTcpClient(link: Link, error: string): void {
  link.ending = true;
  link.reason ||= error;
  const line = encoder.encode(`* error: ${error}\n`);
  link.queue.push(line);
  link.queued += line.length;
  finishStream(link);
}

// The upstream could not be reached. A TCP client gets an error line and
// the FIN; a WebSocket client was already upgraded (the upstream is dialled
// only then), so it gets a close frame: 1011, the server cannot serve it.
function upstreamFailed(state: BridgeState, link: Link, why: string): void {
  const error = `cannot reach ${state.to.url}: ${why}`;
  if (state.listen.transport === "tcp") {
    refuseTcpClient(link, error);
    return;
  }
  link.reason ||= error;
  link.ending = true;
  closeSocket(link, INTERNAL_ERROR, error);
}

function tcpFailed(state: BridgeState, link: Link, why: string): void {
  if (state.listen.transport === "tcp") {
    link.reason ||= why;
    closeSocket(link, CLIENT_FAILED, `the TCP client's connection ended: ${why}`);
  } else {
    link.reason ||= `lost the connection to ${state.to.url}: ${why}`;
    closeSocket(link, INTERNAL_ERROR, `lost the connection to ${state.to.url}: ${why}`);
  }
}

function closeSocket(link: Link, code: number, reason: string): void {
  if (!isOpen(link.socket)) return;
  link.weClosed = true;
  try {
    link.socket!.close(code, closeReason(reason));
  } catch {
    // Already closing.
  }
}

// -------------------------------------------- 4. backpressure both ways

// Towards a WebSocket, `send` never blocks: what the peer has not taken yet
// waits in `bufferedAmount`. So while that is high the bridge stops reading
// the TCP side, and the TCP sender is slowed down by TCP itself: its writes
// wait once the kernel's buffers between us are full.
async function socketDrained(link: Link): Promise<void> {
  while (isOpen(link.socket) && link.socket!.bufferedAmount > BUFFERED_HIGH) {
    await delay(BUFFERED_POLL_MS);
  }
}

// The other way there is no such brake: Deno's WebSocket reads every message
// as it comes and has no way to pause. What waits for the TCP side is
// bounded by --max-queue instead; past it, that link is cut off.
function tooSlow(state: BridgeState, link: Link): void {
  link.queued -= link.queue.reduce((sum, chunk) => sum + chunk.length, 0);
  link.queue = [];
  if (state.listen.transport === "tcp") {
    // Everything still queued is dropped; the error line goes last, after
    // whatever the kernel already holds.
    refuseTcpClient(link, "too slow, disconnected");
    closeSocket(link, CLIENT_FAILED, "the TCP client reads too slowly");
  } else {
    link.reason ||= "the TCP server reads too slowly";
    link.ending = true;
    closeSocket(link, POLICY_VIOLATION, "too slow: the TCP server reads slower than you send");
    closeQuietly(link.conn);
  }
}

// ------------------------------------------------ limits and bookkeeping

function lineTooLong(state: BridgeState, link: Link): void {
  const limit = `line too long (max ${state.maxMessage} bytes)`;
  if (state.listen.transport === "tcp") {
    refuseTcpClient(link, limit);
    closeSocket(link, CLIENT_FAILED, limit);
  } else {
    link.reason ||= `the TCP server sent a ${limit}`;
    link.ending = true;
    closeSocket(link, INTERNAL_ERROR, `the TCP server sent a ${limit}`);
    closeQuietly(link.conn);
  }
}

function messageTooBig(state: BridgeState, link: Link, data: string | ArrayBuffer): boolean {
  // A string's UTF-8 size is between its length and three times that; only
  // count the bytes when the quick bounds cannot decide.
  const size = typeof data !== "string"
    ? data.byteLength
    : data.length * 3 <= state.maxMessage
    ? 0
    : encoder.encode(data).length;
  if (size <= state.maxMessage) return false;
  const reason = `message too big (max ${state.maxMessage} bytes)`;
  link.reason ||= reason;
  link.ending = true;
  closeSocket(link, MESSAGE_TOO_BIG, reason);
  return true;
}

function newLink(peer: string): Link {
  return {
    peer,
    conn: undefined,
    socket: undefined,
    queue: [],
    queued: 0,
    flushing: undefined,
    finishing: false,
    finSent: false,
    ending: false,
    weClosed: false,
    socketDone: false,
    socketGone: Promise.withResolvers(),
    linger: undefined,
    reason: "",
    streamUnits: 0,
    messagesSent: 0,
    messagesReceived: 0,
    bytesWritten: 0,
  };
}

function attachSocket(state: BridgeState, link: Link, socket: WebSocket): void {
  link.socket = socket;
  // Binary messages arrive as ArrayBuffer (the browser default is Blob).
  socket.binaryType = "arraybuffer";
  socket.onmessage = (event) => socketMessage(state, link, event.data);
  // No `error` handler: an error is always followed by `close`.
  socket.onclose = (event) => socketClosed(state, link, event);
}

// Both sides are up: translate until both have ended, then close what is
// left and log what the link did.
async function runLink(state: BridgeState, link: Link): Promise<void> {
  await streamToSocket(state, link);
  await link.socketGone.promise;
  finishStream(link);
  await link.flushing;
  await endLink(state, link);
}

async function endLink(state: BridgeState, link: Link): Promise<void> {
  await link.flushing;
  clearTimeout(link.linger);
  closeQuietly(link.conn);
  state.links.delete(link);
  if (state.closing) return;
  const reason = escapeControls(link.reason || "closed");
  state.log(`- ${link.peer} disconnected: ${reason}; ${translation(state, link)}`);
}

// What the bridge made of the link's traffic, for the log: "3 lines → 3
// messages, 5 messages → 120 bytes", or with raw, reads → messages.
function translation(state: BridgeState, link: Link): string {
  const unit = state.framing === "lines" ? "line" : "read";
  return `${plural(link.streamUnits, unit)} → ${plural(link.messagesSent, "message")}, ` +
    `${plural(link.messagesReceived, "message")} → ${plural(link.bytesWritten, "byte")}`;
}

function plural(count: number, noun: string): string {
  return `${count} ${noun}${count === 1 ? "" : "s"}`;
}

function track(state: BridgeState, task: Promise<void>): void {
  state.tasks.add(task);
  task.finally(() => state.tasks.delete(task));
}

// ------------------------------------------------------ the tcp:// side

// One connection failing must never stop the others, so `accept()` errors
// are survived (a client that resets before we accept it, no file
// descriptors left for a moment).
async function acceptLoop(state: BridgeState, listener: Deno.TcpListener): Promise<void> {
  while (!state.closing) {
    let conn: Deno.TcpConn;
    try {
      conn = await listener.accept();
    } catch (error) {
      if (state.closing || error instanceof Deno.errors.BadResource) return;
      state.log(`accept failed: ${escapeControls(describe(error))}`);
      if (!(error instanceof Deno.errors.NotConnected)) await delay(100);
      continue;
    }
    if (state.closing) {
      closeQuietly(conn);
      return;
    }
    track(state, serveTcpClient(state, conn));
  }
}

async function serveTcpClient(state: BridgeState, conn: Deno.TcpConn): Promise<void> {
  const { hostname, port } = conn.remoteAddr;
  const link = newLink(`${hostname}:${port}`);
  link.conn = conn;
  // Chat lines are small: with Nagle on, the next waits for the last's ACK.
  conn.setNoDelay(true);
  state.links.add(link);
  state.log(`+ ${link.peer} connected, opening ${state.to.url}`);
  const failure = await openUpstreamSocket(state, link);
  if (failure !== undefined) {
    upstreamFailed(state, link, failure);
    link.socketGone.resolve();
    // Read and discard until the client's FIN or the linger ends.
    await streamToSocket(state, link);
    await endLink(state, link);
    return;
  }
  if (state.closing) closeSocket(link, NORMAL_CLOSURE, "bridge shutting down");
  await runLink(state, link);
}

// Resolves once the upstream WebSocket is open (undefined), or with why it
// could not be opened. Until then nothing is read from the TCP client: what
// it sends early waits in the kernel, the first backpressure of all.
function openUpstreamSocket(state: BridgeState, link: Link): Promise<string | undefined> {
  let socket: WebSocket;
  try {
    socket = new WebSocket(state.to.url);
  } catch (error) {
    return Promise.resolve(describe(error));
  }
  attachSocket(state, link, socket);
  const opened = Promise.withResolvers<string | undefined>();
  let failure = "";
  socket.onerror = (event) => failure ||= (event as ErrorEvent).message ?? "";
  // Until it opens, a close means it never did: no link to end yet.
  socket.onclose = () => opened.resolve(upstreamError(failure));
  socket.onopen = () => {
    socket.onclose = (event) => socketClosed(state, link, event);
    opened.resolve(undefined);
  };
  // close() while connecting gives up on the handshake (then `close` fires).
  const timer = setTimeout(() => {
    failure = `no WebSocket handshake within ${state.handshakeTimeout} ms`;
    socket.close();
  }, state.handshakeTimeout);
  return opened.promise.finally(() => clearTimeout(timer));
}

// Deno's error events say "failed to connect to WebSocket: ..."; keep the
// part a person can act on.
function upstreamError(message: string): string {
  const status = message.match(/Invalid status code:? (\d+)/i)?.[1];
  if (status) return `the server answered HTTP ${status} instead of 101 (is the path right?)`;
  if (/lookup address|Name or service not known|dns/i.test(message)) return "unknown host";
  if (/invalid HTTP|parse/i.test(message)) return "it does not speak HTTP (a raw TCP port?)";
  if (/tcp connect|refused/i.test(message)) return "connection refused (is the server running?)";
  if (/^no WebSocket handshake/.test(message)) return `${message} (is it a WebSocket server?)`;
  return message ? escapeControls(message) : "the connection failed";
}

// ------------------------------------------------------- the ws:// side

function handleRequest(
  state: BridgeState,
  request: Request,
  info: Deno.ServeHandlerInfo,
): Response {
  const url = requestUrl(request);
  if (!url) return plain(400, "bad request: the Host header is not a valid host");
  // Header values are case-insensitive: "WebSocket" is as valid as "websocket".
  if (request.headers.get("upgrade")?.toLowerCase() === "websocket") {
    return upgrade(state, request, info, url);
  }
  if ((request.method === "GET" || request.method === "HEAD") && url.pathname === "/") {
    // The page speaks the browser's language (Accept-Language), English by default.
    const lang = pageLanguage(request.headers.get("accept-language"));
    return new Response(page({ to: state.to.url, framing: state.framing }, lang), {
      headers: pageHeaders(lang),
    });
  }
  return plain(
    404,
    `not found: the browser client is at http://${url.host}/ and the WebSocket endpoint is ws://${url.host}/`,
  );
}

// Deno builds `request.url` from the Host header, so a Host that is not a
// host ("a b", "[") makes the URL unparsable: that is the client's error.
function requestUrl(request: Request): URL | undefined {
  try {
    return new URL(request.url);
  } catch {
    return undefined;
  }
}

// A web page on any site can open a WebSocket to 127.0.0.1, and the browser
// sends its cookies along: only the Origin header says who asked. Allowed:
// no Origin (not a browser), this server's own page, and pages served from
// this machine (localhost, 127.0.0.1, [::1]) on any port.
function originAllowed(origin: string | null, host: string): boolean {
  if (origin === null) return true;
  let parsed;
  try {
    parsed = new URL(origin);
  } catch {
    return false;
  }
  if (parsed.host === host) return true;
  return ["localhost", "127.0.0.1", "[::1]"].includes(parsed.hostname);
}

function upgrade(
  state: BridgeState,
  request: Request,
  info: Deno.ServeHandlerInfo,
  url: URL,
): Response {
  if (!request.headers.has("sec-websocket-key")) {
    return plain(400, "bad WebSocket handshake: the Sec-WebSocket-Key header is missing");
  }
  if (!originAllowed(request.headers.get("origin"), url.host)) {
    return plain(403, "forbidden: pages from other sites may not connect (Origin not allowed)");
  }
  if (state.closing) return plain(503, "bridge shutting down");
  // remoteAddr can only be read while the request is being handled.
  const { hostname, port } = info.remoteAddr as Deno.NetAddr;
  let upgraded;
  try {
    upgraded = Deno.upgradeWebSocket(request);
  } catch (error) {
    return plain(400, `bad WebSocket handshake: ${(error as Error).message}`);
  }
  const link = newLink(`${hostname}:${port}`);
  attachSocket(state, link, upgraded.socket);
  state.links.add(link);
  // The upstream is dialled once the client is a WebSocket: only then can it
  // be told, with a close frame, that the server is not there.
  upgraded.socket.onopen = () => track(state, serveWsClient(state, link));
  return upgraded.response;
}

async function serveWsClient(state: BridgeState, link: Link): Promise<void> {
  state.log(`+ ${link.peer} connected, opening ${state.to.url}`);
  try {
    link.conn = await Deno.connect({ hostname: state.to.hostname, port: state.to.port });
  } catch (error) {
    upstreamFailed(state, link, describe(error));
    await link.socketGone.promise;
    await endLink(state, link);
    return;
  }
  link.conn.setNoDelay(true);
  // Messages that came while we connected are queued; the client may even
  // have left already (its close becomes our FIN at once).
  if (state.closing) closeSocket(link, GOING_AWAY, "bridge shutting down");
  startFlush(link);
  if (link.finishing) startLinger(link);
  await runLink(state, link);
}

function plain(status: number, text: string): Response {
  return new Response(`${text}\n`, {
    status,
    headers: { "content-type": "text/plain; charset=utf-8", "x-content-type-options": "nosniff" },
  });
}

// ------------------------------------------------------ the browser page

// The page is ws_server.ts's, in the same two languages and with the same
// functions (copied, not imported: every script runs on its own). What the
// bridge adds is where the messages go, and that it cannot know what the TCP
// server speaks: the page learns that it is in a chat from the server itself.

// The languages the browser page is written in; English is the default.
type PageLanguage = "en" | "pt";

// The page's language for an `Accept-Language` header (RFC 9110 §12.5.4):
// Portuguese when the highest-q language the page speaks is any `pt`
// (`pt`, `pt-BR`, `pt-PT`), English otherwise; ties keep the header's order.
// The header is the browser's, so never trusted: a missing, oversize or
// malformed one means English, and nothing here throws. For example
// "pt-BR,pt;q=0.9,en;q=0.8" is "pt", and "en-US,pt;q=0.5" is "en".
function pageLanguage(header: string | null): PageLanguage {
  // Accept-Language is whatever the peer sent: past this size, or past this
  // many entries, it is not a browser's list and the page stays English.
  // (Local, as in ws_server.ts, where the server may answer before a
  // top-level constant would be initialized.)
  const ACCEPT_LANGUAGE_MAX_CHARS = 1024;
  const ACCEPT_LANGUAGE_MAX_ENTRIES = 32;
  if (!header || header.length > ACCEPT_LANGUAGE_MAX_CHARS) return "en";
  const entries = header.split(",");
  if (entries.length > ACCEPT_LANGUAGE_MAX_ENTRIES) return "en";
  let best: PageLanguage = "en";
  let bestQ = 0;
  for (const entry of entries) {
    const [range, ...params] = entry.trim().toLowerCase().split(";");
    const tag = range.trim();
    const primary = tag === "*" ? "en" : tag.split("-")[0];
    if (primary !== "pt" && primary !== "en") continue;
    const q = acceptQuality(params);
    if (q > bestQ) [best, bestQ] = [primary, q];
  }
  return best;
}

// A q parameter is 0 to 1 with at most three decimals; anything else
// ("q=2", "q=abc") is not a weight and the range counts as not wanted.
function acceptQuality(params: string[]): number {
  const q = params.map((param) => param.trim()).find((param) => param.startsWith("q="));
  if (q === undefined) return 1;
  return /^q=(0(\.\d{0,3})?|1(\.0{0,3})?)$/.test(q) ? Number(q.slice(2)) : 0;
}

// The page's response headers. Vary: a cache must not hand the Portuguese
// page to an English browser, or the other way round.
function pageHeaders(lang: PageLanguage): Record<string, string> {
  return {
    "content-type": "text/html; charset=utf-8",
    "content-language": lang === "pt" ? "pt-BR" : "en",
    "vary": "Accept-Language",
    "x-content-type-options": "nosniff",
    // No other site may frame the page (clickjacking: a hidden frame that
    // makes a visitor click Send).
    "content-security-policy": "frame-ancestors 'none'",
  };
}

// Every text the page shows, in each language it speaks. The protocol
// messages ("NAME: TEXT", "* NAME joined") are the TCP server's, not the
// page's: they stay as they are. `to` arrives as HTML, already escaped.
function pageTexts(lang: PageLanguage) {
  return {
    en: {
      title: "WebSocket to TCP bridge",
      heading: "WebSocket client, bridged to TCP",
      relay: (to: string, framing: Framing) =>
        `This page speaks WebSocket to bridge.ts, which relays to the TCP server at ${to}: ` +
        (framing === "lines"
          ? "each message you send becomes one line to it, and each line it sends comes back " +
            "as one message."
          : "each message you send is written to it as it is, with no newline, and each read " +
            "from it comes back as one binary message, cut wherever TCP cut the bytes."),
      lineHint: "→ marks what you sent; the lines after it are the server's answer. A chat " +
        "server names you as you join: from then on your own lines come back from it, as " +
        "everyone else's do, and show in blue.",
      rawHint: "→ marks what you sent; what the server sends back shows as binary messages, " +
        "as many as TCP made reads.",
      chatHint: "Chat: every message goes to everyone connected, you included. Your own lines " +
        "come back from the server as everyone else's do, and show in blue: that is how you " +
        "know they arrived. Open a second tab to talk to yourself.",
      bridgeUrl: "Bridge URL",
      connect: "Connect",
      disconnect: "Disconnect",
      notConnected: "Not connected.",
      message: "Message",
      placeholder: "Type a message",
      send: "Send",
      youAre: "— you are ",
      connecting: "Connecting to ",
      connected: "Connected to ",
      closed: "Closed: code ",
      lost: " — the connection was lost or refused",
      closedNote: "connection closed, code ",
      binary: "<binary ",
    },
    pt: {
      title: "Ponte WebSocket para TCP",
      heading: "Cliente WebSocket, via ponte para TCP",
      relay: (to: string, framing: Framing) =>
        `Esta página fala WebSocket com o bridge.ts, que repassa tudo para o servidor TCP em ${to}: ` +
        (framing === "lines"
          ? "cada mensagem que você envia vira uma linha para ele, e cada linha que ele manda " +
            "volta como uma mensagem."
          : "cada mensagem que você envia vai para ele do jeito que está, sem quebra de linha, " +
            "e cada leitura volta como uma mensagem binária, cortada onde o TCP cortou os bytes."),
      lineHint: "→ marca o que você enviou; as linhas que vêm depois são a resposta do servidor. " +
        "Um servidor de chat te dá um nome assim que você entra: daí em diante as suas " +
        "próprias linhas voltam dele, como as dos outros, e aparecem em azul.",
      rawHint: "→ marca o que você enviou; o que o servidor manda de volta aparece como " +
        "mensagens binárias, tantas quantas foram as leituras do TCP.",
      chatHint: "Chat: cada mensagem vai para todo mundo que está conectado, inclusive você. " +
        "Suas próprias linhas voltam do servidor, como as dos outros, e aparecem em azul: é " +
        "assim que você sabe que elas chegaram. Abra uma segunda aba para conversar com você " +
        "mesmo.",
      bridgeUrl: "URL da ponte",
      connect: "Conectar",
      disconnect: "Desconectar",
      notConnected: "Desconectado.",
      message: "Mensagem",
      placeholder: "Digite uma mensagem",
      send: "Enviar",
      youAre: "— você é ",
      connecting: "Conectando a ",
      connected: "Conectado a ",
      closed: "Fechada: código ",
      lost: " — a conexão caiu ou foi recusada",
      closedNote: "conexão fechada, código ",
      binary: "<binário, ",
    },
  }[lang];
}

// The browser client: one self-contained page, no external assets, using
// the same standard WebSocket API as ws_client.ts. Where its messages go and
// how they are framed are all the bridge fills in, besides the language.
function page(
  { to, framing }: { to: string; framing: Framing },
  lang: PageLanguage = "en",
): string {
  const t = pageTexts(lang);
  const js = (text: string) => JSON.stringify(text);
  return `<!doctype html>
<html lang="${lang === "pt" ? "pt-BR" : "en"}">
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>${t.title}</title>
<style>
  body { font: 16px/1.4 system-ui, sans-serif; max-width: 46rem; margin: 1.5rem auto; padding: 0 1rem; color: #1b1b1b; }
  h1 { font-size: 1.3rem; margin: 0 0 .25rem; }
  #relay, #hint { font-size: .9rem; color: #444; margin: 0 0 .75rem; }
  form { display: flex; gap: .5rem; margin: .5rem 0; }
  input { flex: 1; font: inherit; padding: .4rem .5rem; border: 1px solid #999; border-radius: 4px; }
  button { font: inherit; padding: .4rem .9rem; border-radius: 4px; border: 1px solid #555; background: #f2f2f2; cursor: pointer; }
  button:disabled { opacity: .5; cursor: default; }
  #status { font-size: .9rem; color: #555; margin: .25rem 0; }
  #you { font-weight: 600; }
  #log { list-style: none; margin: .5rem 0; padding: .5rem; height: 22rem; overflow-y: auto; border: 1px solid #ccc; border-radius: 4px; background: #fafafa; font: 15px/1.5 ui-monospace, monospace; }
  #log li { white-space: pre-wrap; word-break: break-word; }
  #log .sent, #log .mine { color: #1a5fb4; }
  #log .note { color: #777; font-style: italic; }
</style>
<h1>${t.heading} <span id="you"></span></h1>
<p id="relay">${t.relay(`<code>${escapeHtml(to)}</code>`, framing)}</p>
<p id="hint">${framing === "lines" ? t.lineHint : t.rawHint}</p>
<form id="connect-form">
  <input id="url" aria-label="${t.bridgeUrl}" spellcheck="false">
  <button id="connect">${t.connect}</button>
</form>
<div id="status" role="status">${t.notConnected}</div>
<ul id="log" aria-live="polite"></ul>
<form id="send-form">
  <input id="message" aria-label="${t.message}" placeholder="${t.placeholder}" autocomplete="off" disabled>
  <button id="send" disabled>${t.send}</button>
</form>
<script type="module">
  const $ = (id) => document.getElementById(id);
  $("url").value = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/";
  let socket;
  // Whether the TCP server is a chat: the bridge cannot know, the server says so.
  let chat = false;
  let me = "";
  // Nothing has been received or sent yet on this connection.
  let fresh = true;

  function show(text, kind) {
    const item = document.createElement("li");
    item.textContent = text;
    if (kind) item.className = kind;
    $("log").append(item);
    $("log").scrollTop = $("log").scrollHeight;
  }

  function setConnected(connected) {
    $("connect").textContent = connected ? ${js(t.disconnect)} : ${js(t.connect)};
    $("message").disabled = $("send").disabled = !connected;
    if (connected) $("message").focus();
  }

  // A chat server names each newcomer in a notice of its own, before
  // anything else: only that first message can be it (an echo server sends
  // "* you are x" back to whoever types it).
  function received(text) {
    const name = fresh && text.match(/^\\* you are (\\S+)$/)?.[1];
    fresh = false;
    if (name) {
      chat = true;
      me = name;
      $("you").textContent = ${js(t.youAre)} + name;
      $("hint").textContent = ${js(t.chatHint)};
      return;
    }
    show(text, chat && me && text.startsWith(me + ": ") ? "mine" : undefined);
  }

  $("connect-form").onsubmit = (event) => {
    event.preventDefault();
    if (socket) return socket.close(1000, "bye");
    socket = new WebSocket($("url").value);
    socket.binaryType = "arraybuffer";
    $("status").textContent = ${js(t.connecting)} + socket.url + " …";
    socket.onopen = () => {
      $("status").textContent = ${js(t.connected)} + socket.url;
      setConnected(true);
    };
    socket.onmessage = (event) =>
      typeof event.data === "string"
        ? received(event.data)
        : show(${js(t.binary)} + event.data.byteLength + " bytes>");
    // The close event carries the code and reason from the close frame;
    // 1006 means there was none (the connection just dropped).
    socket.onclose = (event) => {
      $("status").textContent = ${
    js(t.closed)
  } + event.code + (event.reason ? " (" + event.reason + ")" : "") +
        (event.code === 1006 ? ${js(t.lost)} : "");
      show(${js(t.closedNote)} + event.code, "note");
      // The next connection gets an upstream of its own, which names it anew.
      socket = undefined;
      chat = false;
      me = "";
      fresh = true;
      $("you").textContent = "";
      $("hint").textContent = ${js(framing === "lines" ? t.lineHint : t.rawHint)};
      setConnected(false);
    };
  };

  $("send-form").onsubmit = (event) => {
    event.preventDefault();
    const text = $("message").value;
    if (!socket || socket.readyState !== WebSocket.OPEN || text === "") return;
    socket.send(text);
    fresh = false;
    // In chat the server's relay is the confirmation; otherwise, its answer.
    if (!chat) show("→ " + text, "sent");
    $("message").value = "";
  };

  $("connect-form").requestSubmit();
</script>
</html>
`;
}

function escapeHtml(text: string): string {
  return text.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

// ----------------------------------------------------------- the API

/**
 * Starts a bridge and returns at once; it serves in the background until
 * `close()`. One of `listen` and `to` is `tcp://HOST:PORT`, the other
 * `ws://HOST:PORT/…`; each client gets its own connection to `to`.
 *
 * @example A TCP client talks to a WebSocket echo server, a line a message
 * ```ts
 * await using echo = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen() {} }, (request) => {
 *   const { socket, response } = Deno.upgradeWebSocket(request);
 *   socket.onmessage = (event) => socket.send(event.data);
 *   return response;
 * });
 * await using bridge = startBridge({
 *   listen: "tcp://127.0.0.1:0",
 *   to: `ws://127.0.0.1:${echo.addr.port}/`,
 *   log: () => {},
 * });
 * using conn = await Deno.connect({ hostname: "127.0.0.1", port: bridge.addr.port });
 * await conn.write(new TextEncoder().encode("hello\n"));
 * const buf = new Uint8Array(6);
 * await conn.read(buf); // "hello\n": the message "hello", written back as a line
 * ```
 *
 * @throws {TypeError} when `listen` or `to` is not such a URL, or both are the same transport.
 * @throws {Deno.errors.AddrInUse} when the port is taken.
 * @throws {Deno.errors.NotCapable} without `--allow-net` for the address.
 */
export function startBridge(options: BridgeOptions): Bridge {
  const listen = parseEndpoint(options.listen, "listen");
  const to = parseEndpoint(options.to, "to");
  if (listen.transport === to.transport) {
    throw new TypeError(
      `listen and to must be different transports (one tcp://, one ws://), both are ${to.transport}://`,
    );
  }
  const state: BridgeState = {
    listen,
    to,
    framing: options.framing ?? "lines",
    maxMessage: Math.min(options.maxMessage ?? DEFAULT_MAX_MESSAGE, DENO_MAX_FRAME),
    maxQueue: options.maxQueue ?? DEFAULT_MAX_QUEUE,
    handshakeTimeout: options.handshakeTimeout ?? DEFAULT_HANDSHAKE_TIMEOUT_MS,
    log: options.log ?? console.error,
    links: new Set(),
    tasks: new Set(),
    closing: false,
  };
  let addr: Deno.NetAddr;
  let stop: () => Promise<void>;
  if (listen.transport === "tcp") {
    const listener = Deno.listen({ hostname: listen.hostname, port: listen.port });
    addr = listener.addr;
    const accepting = acceptLoop(state, listener);
    stop = async () => {
      closeQuietly(listener);
      await accepting;
    };
  } else {
    const server = Deno.serve({
      hostname: listen.hostname,
      port: listen.port,
      onListen: () => {},
    }, (request, info) => handleRequest(state, request, info));
    addr = server.addr;
    stop = () => server.shutdown();
  }
  let closed: Promise<void> | undefined;
  async function close() {
    state.closing = true;
    const closeCode = listen.transport === "tcp" ? NORMAL_CLOSURE : GOING_AWAY;
    for (const link of state.links) {
      link.ending = true;
      closeSocket(link, closeCode, "bridge shutting down");
      closeQuietly(link.conn);
    }
    let timer;
    await Promise.race([
      (async () => {
        while (state.tasks.size > 0) await Promise.all(state.tasks);
      })(),
      new Promise((resolve) => timer = setTimeout(resolve, CLOSE_GRACE_MS)),
    ]);
    clearTimeout(timer);
    await stop();
  }
  return {
    addr,
    get connections() {
      return state.links.size;
    },
    close: () => closed ??= close(),
    [Symbol.asyncDispose]: () => closed ??= close(),
  };
}

/** Parses `tcp://HOST:PORT` or `ws://HOST:PORT/PATH` (`wss://` too, for `to`). */
function parseEndpoint(text: string, role: "listen" | "to"): Endpoint {
  const usage = role === "listen"
    ? "tcp://HOST:PORT or ws://HOST:PORT/"
    : "ws://HOST:PORT/PATH or tcp://HOST:PORT";
  const url = URL.canParse(text) ? new URL(text) : undefined;
  const secure = url?.protocol === "wss:" && role === "to";
  if (!url || !(url.protocol === "tcp:" || url.protocol === "ws:" || secure)) {
    throw new TypeError(`${role} must be ${usage}, got "${text}"`);
  }
  const hostname = url.hostname.replace(/^\[(.*)\]$/, "$1");
  const defaultPort = url.protocol === "ws:" ? "80" : url.protocol === "wss:" ? "443" : "";
  const portText = url.port || defaultPort;
  if (!hostname || portText === "") {
    throw new TypeError(`${role} needs a host and a port: ${usage}, got "${text}"`);
  }
  if (url.protocol === "tcp:" && (url.pathname !== "" && url.pathname !== "/" || url.search)) {
    throw new TypeError(`${role}: a tcp:// address has no path, got "${text}"`);
  }
  if (role === "listen" && url.protocol === "ws:" && (url.pathname !== "/" || url.search)) {
    throw new TypeError(
      `listen: the bridge serves its page at / and upgrades there, so no path, got "${text}"`,
    );
  }
  const port = Number(portText);
  if (url.protocol === "tcp:") {
    return { transport: "tcp", hostname, port, url: `tcp://${url.host}` };
  }
  return { transport: "ws", hostname, port, url: url.href };
}

// ---------------------------------------------------------------- helpers

// Anything a peer chose (a close reason, an error it caused) is escaped
// before it reaches a log line or a terminal: no newline can forge a line,
// no ESC can move the cursor, no bidi override can reorder what the operator
// reads.
function escapeControls(text: string): string {
  return text.replace(
    // deno-lint-ignore no-control-regex
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

// At most 123 bytes of UTF-8, cut at a character boundary.
function closeReason(text: string): string {
  if (encoder.encode(text).length <= MAX_CLOSE_REASON) return text;
  let cut = "";
  for (const char of text) {
    if (encoder.encode(cut + char + "…").length > MAX_CLOSE_REASON) break;
    cut += char;
  }
  return cut + "…";
}

function isOpen(socket: WebSocket | undefined): boolean {
  return socket?.readyState === WebSocket.OPEN;
}

function concat(chunks: Uint8Array[]): Uint8Array {
  let length = 0;
  for (const chunk of chunks) length += chunk.length;
  const out = new Uint8Array(length);
  let offset = 0;
  for (const chunk of chunks) {
    out.set(chunk, offset);
    offset += chunk.length;
  }
  return out;
}

function closeQuietly(resource: { close(): void } | undefined): void {
  try {
    resource?.close();
  } catch {
    // Already closed.
  }
}

function delay(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

function describe(error: unknown): string {
  if (error instanceof Deno.errors.ConnectionRefused) {
    return "connection refused (is the server running?)";
  }
  if (error instanceof Deno.errors.ConnectionReset) return "connection reset by peer";
  if (error instanceof Deno.errors.BrokenPipe) return "peer stopped reading (broken pipe)";
  if (error instanceof Deno.errors.NotCapable || error instanceof Deno.errors.PermissionDenied) {
    return "permission denied (add the address to --allow-net)";
  }
  if (error instanceof Deno.errors.Interrupted || error instanceof Deno.errors.BadResource) {
    return "closed";
  }
  return error instanceof Error ? error.message : String(error);
}

// ---------------------------------------------------------------- command line

const USAGE = `Usage: bridge.ts --listen URL --to URL [options]

Bridges TCP and WebSocket: listens on one, and connects each client to a
server on the other, with a connection of its own. Prints "listening on
tcp://HOST:PORT" or "listening on ws://HOST:PORT/".

  bridge.ts --listen tcp://127.0.0.1:9001 --to ws://127.0.0.1:8080/
  bridge.ts --listen ws://127.0.0.1:8081/ --to tcp://127.0.0.1:9000

Options:
  --listen URL          tcp://HOST:PORT, or ws://HOST:PORT/ (also serves a browser page at /)
  --to URL              the server on the other transport: ws://HOST:PORT/PATH or tcp://HOST:PORT
  --framing lines|raw   lines: a line is a text message and back (default);
                        raw: a TCP read is a binary message, a message's bytes are written as is
  --max-message BYTES   longest line, and largest message from a WebSocket client
                        (default ${DEFAULT_MAX_MESSAGE}, at most 64 MiB)
  --max-queue BYTES     unsent bytes a TCP side may fall behind by (default ${DEFAULT_MAX_QUEUE})
  --quiet               no connection log on stderr
  -h, --help            show this help`;

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

function parseCommandLine(args: string[]): BridgeOptions & { quiet: boolean; help: boolean } {
  let parsed;
  try {
    parsed = parseArgs({
      args,
      strict: true,
      options: {
        listen: { type: "string" },
        to: { type: "string" },
        framing: { type: "string", default: "lines" },
        "max-message": { type: "string", default: String(DEFAULT_MAX_MESSAGE) },
        "max-queue": { type: "string", default: String(DEFAULT_MAX_QUEUE) },
        quiet: { type: "boolean", default: false },
        help: { type: "boolean", short: "h", default: false },
      },
    }).values;
  } catch (error) {
    throw new UsageError(parseArgsMessage(error as Error));
  }
  if (parsed.help) return { listen: "", to: "", quiet: false, help: true };
  const framing = parsed.framing;
  if (framing !== "lines" && framing !== "raw") {
    throw new UsageError(`--framing must be lines or raw, got "${framing}"`);
  }
  if (parsed.listen === undefined) {
    throw new UsageError("--listen is required: tcp://HOST:PORT or ws://HOST:PORT/");
  }
  if (parsed.to === undefined) {
    throw new UsageError("--to is required: ws://HOST:PORT/PATH or tcp://HOST:PORT");
  }
  let listen, to;
  try {
    listen = parseEndpoint(parsed.listen, "listen");
    to = parseEndpoint(parsed.to, "to");
  } catch (error) {
    throw new UsageError(`--${(error as Error).message}`);
  }
  if (listen.transport === to.transport) {
    throw new UsageError(
      `--listen and --to must be different transports (one tcp://, one ws://), both are ${to.transport}://`,
    );
  }
  return {
    listen: parsed.listen,
    to: parsed.to,
    framing,
    maxMessage: integerOption("--max-message", parsed["max-message"], 1, DENO_MAX_FRAME),
    maxQueue: integerOption("--max-queue", parsed["max-queue"], 1),
    quiet: parsed.quiet,
    help: false,
  };
}

function integerOption(
  name: string,
  text: string,
  min: number,
  max = Number.MAX_SAFE_INTEGER,
): number {
  const value = Number(text);
  if (!/^\d+$/.test(text) || value < min || value > max) {
    const range = max === Number.MAX_SAFE_INTEGER ? `at least ${min}` : `from ${min} to ${max}`;
    throw new UsageError(`${name} must be an integer ${range}, got "${text}"`);
  }
  return value;
}

function formatHost(hostname: string): string {
  return hostname.includes(":") ? `[${hostname}]` : hostname;
}

async function main(args: string[]): Promise<number> {
  let options;
  try {
    options = parseCommandLine(args);
  } catch (error) {
    if (!(error instanceof UsageError)) throw error;
    console.error(`bridge: ${error.message}\n\n${USAGE}`);
    return 2;
  }
  if (options.help) {
    console.log(USAGE);
    return 0;
  }
  const listen = parseEndpoint(options.listen, "listen");
  const to = parseEndpoint(options.to, "to");
  // Each client dials the upstream later; without permission every one of
  // them would fail. Say so now, once.
  const upstream = `${formatHost(to.hostname)}:${to.port}`;
  if ((await Deno.permissions.query({ name: "net", host: upstream })).state !== "granted") {
    console.error(
      `bridge: cannot connect to ${to.url}: permission denied (run with --allow-net=${
        formatHost(listen.hostname)
      }:${listen.port},${upstream})`,
    );
    return 1;
  }
  let bridge: Bridge;
  try {
    bridge = startBridge({ ...options, log: options.quiet ? () => {} : console.error });
  } catch (error) {
    console.error(
      `bridge: cannot listen on ${formatHost(listen.hostname)}:${listen.port}: ${
        startError(error, listen.hostname, listen.port)
      }`,
    );
    return 1;
  }
  // Listen for the signals before saying we are ready: a supervisor may
  // send SIGTERM the moment it reads the line.
  const stop = Promise.withResolvers<void>();
  for (const signal of ["SIGINT", "SIGTERM"] as const) {
    if (Deno.build.os !== "windows" || signal === "SIGINT") {
      Deno.addSignalListener(signal, stop.resolve);
    }
  }
  const { hostname, port } = bridge.addr;
  console.log(
    `listening on ${listen.transport}://${formatHost(hostname)}:${port}${
      listen.transport === "ws" ? "/" : ""
    }`,
  );
  await stop.promise;
  // Closing is quick; the timer is a guarantee that a stuck peer cannot hold
  // the process past a second.
  setTimeout(() => Deno.exit(0), 900);
  await bridge.close();
  return 0;
}

function startError(error: unknown, hostname: string, port: number): string {
  if (error instanceof Deno.errors.AddrInUse) {
    return "address already in use (is another server running? try port 0 for any free port)";
  }
  if (error instanceof Deno.errors.NotCapable || error instanceof Deno.errors.PermissionDenied) {
    return `permission denied (run with --allow-net=${formatHost(hostname)}:${port}` +
      (port > 0 && port < 1024 ? ", and ports below 1024 need root" : "") + ")";
  }
  if (error instanceof Deno.errors.AddrNotAvailable) return "that address is not on this machine";
  return error instanceof Error ? error.message : String(error);
}

if (import.meta.main) Deno.exit(await main(Deno.args));
