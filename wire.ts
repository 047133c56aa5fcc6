/**
 * wire.ts: see what travels on the wire. A TCP proxy that forwards every byte
 * between a client and a server, unchanged and at once, and shows what passes
 * each way, decoded and explained.
 *
 * What it shows: the difference this project is about, happening on screen.
 * Raw TCP arrives as *reads* of some bytes, never as messages: three `send`s
 * can come as one read, one line as five. A WebSocket is the same TCP
 * connection carrying an HTTP/1.1 upgrade (a `Sec-WebSocket-Key`, answered by
 * `101` and a `Sec-WebSocket-Accept` that must be the key hashed, checked
 * here) and then *frames*: a 2-14 byte header, a mask on everything the client
 * sends, text or binary or control, fragments, pings, a close with a code.
 * Every frame is decoded as its bytes arrive, and the protocol errors RFC 6455
 * forbids with a MUST are pointed out; TLS is recognised and shown as byte
 * counts. Half-closes and resets pass through, and each connection ends with a
 * summary: how long, how many bytes, frames and messages, and what the framing
 * cost.
 *
 * Sections, in reading order:
 *
 *   1. forwarding: two loops per connection, backpressure, half-close, reset
 *   2. what a TCP read is: deciding what a connection speaks, raw reads
 *   3. HTTP heads and the upgrade, with the Sec-WebSocket-Accept check
 *   4. the frame decoder (RFC 6455 section 5.2), incremental, bounded
 *   5. close codes and what they mean
 *   6. faults, on purpose: delays, slices, resets, stalls, re-framing,
 *      dropped pongs and closes (for testing clients; off unless asked)
 *   then the output (human and --json), limits and bookkeeping, the exported
 *   API (`startWire`, `createFrameDecoder`, `EVENT_FIELDS`), the command line.
 *
 * Run it in front of a server (least privilege: its own address and the target):
 *
 *     deno run --allow-net=127.0.0.1:8080 ws_server.ts
 *     deno run --allow-net=127.0.0.1:9001,127.0.0.1:8080 wire.ts --to 127.0.0.1:8080
 *     deno run --allow-net=127.0.0.1:9001 ws_client.ts --url ws://127.0.0.1:9001/ hello
 *
 * Or open http://127.0.0.1:9001/ in a browser: the page, its upgrade and every
 * frame show up. Raw TCP works the same way, and so does netcat:
 *
 *     deno run --allow-net=127.0.0.1:9001,127.0.0.1:9000 wire.ts --to 127.0.0.1:9000
 *     printf 'hello\n' | nc -N 127.0.0.1 9001
 *
 * `--json` prints one JSON object per event (for jq and tests), `--quiet`
 * prints nothing but forwards and decodes (for load tests).
 *
 * @module
 */

import { parseArgs } from "node:util";
import { createHash } from "node:crypto";
import net from "node:net";

const DEFAULT_HOSTNAME = "127.0.0.1";
const DEFAULT_PORT = 9001;
const DEFAULT_PREVIEW = 64;
const MAX_PREVIEW = 65536;
// One buffer per direction, reused for every read: the proxy's memory is a
// few of these per connection however much flows, and a reused buffer makes
// no garbage per chunk.
const READ_BUFFER_SIZE = 64 * 1024;
// An HTTP head longer than this is not shown as HTTP (servers refuse heads
// far smaller: Deno's at 8 KiB of headers); its bytes pass through anyway.
const MAX_HTTP_HEAD = 16 * 1024;
// The longest HTTP method we recognise ("OPTIONS" is 7; extensions are short).
const MAX_METHOD_LENGTH = 20;
// Events wait in memory for a slow stdout up to this many characters; past it,
// forwarding waits too, so a terminal that cannot keep up bounds our memory.
const OUTPUT_BACKLOG_LIMIT = 1024 * 1024;
// RFC 6455 section 1.3: the accept value is base64(SHA-1(key + this GUID)).
const WEBSOCKET_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
// RFC 6455 section 5.5: control frames carry at most 125 payload bytes.
const MAX_CONTROL_PAYLOAD = 125;

const NOTHING = new Uint8Array(0);
const RESET = new Deno.errors.ConnectionReset("connection reset by peer");

const encoder = new TextEncoder();
// Not `fatal`: HTTP heads are shown as well as they decode.
const lenientDecoder = new TextDecoder();
const strictDecoder = new TextDecoder("utf-8", { fatal: true });

/** Which way bytes travel: client to server, or server to client. */
export type Direction = "c2s" | "s2c";

/**
 * Every event type and the fields it may carry, besides the four every event
 * has (`conn`, `dir` where it has a direction, `type`, `t_ms`). README.md
 * documents the same table, and a test keeps the two in step.
 */
export const EVENT_FIELDS = {
  open: ["client", "server"],
  data: ["bytes", "text", "hex", "truncated", "newlines"],
  http: [
    "start",
    "headers",
    "key",
    "accept",
    "accept_expected",
    "accept_ok",
    "protocol",
    "extensions",
  ],
  frame: [
    "fin",
    "rsv",
    "opcode",
    "name",
    "masked",
    "mask",
    "length",
    "length_encoding",
    "header_bytes",
    "text",
    "hex",
    "truncated",
    "code",
    "reason",
    "meaning",
    "message",
    "fragment",
    "message_complete",
    "errors",
  ],
  tls: ["version"],
  fault: [
    "name",
    "delay_ms",
    "jitter_ms",
    "bytes",
    "pieces",
    "frames",
    "code",
    "reason",
    "text",
    "pick",
    "every",
  ],
  fin: [],
  reset: ["side"],
  error: ["message"],
  close: [
    "duration_ms",
    "bytes_c2s",
    "bytes_s2c",
    "discarded_c2s",
    "discarded_s2c",
    "frames_c2s",
    "frames_s2c",
    "messages_c2s",
    "messages_s2c",
    "payload_c2s",
    "payload_s2c",
  ],
} as const;

/** An event's type: a key of {@linkcode EVENT_FIELDS}. */
export type EventType = keyof typeof EVENT_FIELDS;

/** One thing seen on a connection, as `--json` prints it. */
export interface WireEvent {
  /** The connection's number, from 1. */
  conn: number;
  /** Which way the bytes went; absent for connection-level events (open, error, close). */
  dir?: Direction;
  type: EventType;
  /** Milliseconds since the connection was accepted. */
  t_ms: number;
  [field: string]: unknown;
}

// ------------------------------------------------------------ 1. forwarding
//
// A TCP connection is two independent byte streams, so a proxy is two loops,
// one per direction: read from one side, write to the other, and read again
// only once the write is done. That last rule is the backpressure: a side
// that does not read fills its kernel buffer, our write waits, we stop
// reading from the sender, and the sender's writes wait in turn. Memory stays
// at one read buffer per direction, however much flows.
//
// A read of null is the sender's FIN (it has finished sending, and may still
// read): we pass it on with closeWrite() and keep the other direction going.
// A reset on one side cannot be passed on as a reset (Deno's sockets cannot
// send one), so the other side is closed.
//
// Each direction writes through a Sink: the socket itself here, or the fault
// stages of section 6 in front of it, which see both the bytes and the FIN,
// so their order holds. A direction stalled by --stall-after is read and
// discarded up to a window, then waits for the other way's FIN, after which
// it is read again (section 6a), so its FIN or reset is still seen: a
// connection ends once both of its senders are done, stalled or not.

interface DirectionState {
  dir: Direction;
  /** What this direction is being decoded as (section 2). */
  mode: "detect" | "http" | "body" | "raw" | "tls" | "frames";
  /** The HTTP head seen so far (sections 2, 3); allocated only for HTTP. */
  head?: Uint8Array;
  headLength: number;
  /** Where the start line's check has got to (section 2). */
  startChecked: number;
  startPhase: "method" | "line" | "done";
  /** HTTP body bytes still to come, shown as data (section 3). */
  bodyRemaining: number;
  frames?: FrameDecoder;
  /** The decoder's options: `extensions` is only known once the 101 arrives. */
  frameOptions?: FrameDecoderOptions;
  frameCount: number;
  messageCount: number;
  payloadBytes: number;
}

/**
 * What the forwarding loops need of a socket: a Deno.TcpConn, or (when a
 * fault must send a real reset, section 6) a node:net socket made to look
 * like one.
 */
interface ProxySocket {
  read(buffer: Uint8Array): Promise<number | null>;
  write(bytes: Uint8Array): Promise<number>;
  closeWrite(): Promise<void>;
  close(): void;
  setNoDelay(noDelay?: boolean): void;
  readonly remoteAddr: Deno.Addr;
  /** Sends a TCP reset (RST) and closes; only node:net sockets can. */
  reset?(): void;
}

interface Connection {
  id: number;
  start: number;
  client: ProxySocket;
  server?: ProxySocket;
  /** While the connection to the target is being made: aborts it. */
  connecting?: AbortController;
  clientAddress: string;
  bytes: { c2s: number; s2c: number };
  c2s: DirectionState;
  s2c: DirectionState;
  /** Set once we close it ourselves: reads that fail after that are expected. */
  closing: boolean;
  /** FIN seen in each direction. */
  finished: { c2s: boolean; s2c: boolean };
  /** Bytes read and thrown away since --stall-after stalled a direction; undefined until then. */
  discarded: Record<Direction, number | undefined>;
  /** The pending upgrade's Sec-WebSocket-Key, between request and response. */
  websocketKey?: string;
  /** HTTP request methods still waiting for their response (HEAD has no body). */
  methods: string[];
  websocket: boolean;
  /** The faults applied to this connection (section 6), if any. */
  faults?: ConnectionFaults;
}

interface WireState {
  target: { hostname: string; port: number };
  preview: number;
  hex: boolean;
  onEvent?: (event: WireEvent) => void;
  waitForOutput?: () => Promise<void> | undefined;
  faults?: FaultState;
  connections: Set<Connection>;
  tasks: Set<Promise<void>>;
  count: number;
  closing: boolean;
}

async function serveConnection(state: WireState, client: ProxySocket): Promise<void> {
  const conn = newConnection(state, client);
  state.connections.add(conn);
  const target = `${formatHost(state.target.hostname)}:${state.target.port}`;
  emit(state, conn, undefined, "open", { client: conn.clientAddress, server: target });
  // An unreachable target can take minutes to give up on; close() aborts it.
  conn.connecting = new AbortController();
  try {
    conn.server = state.faults?.options.resetAfter !== undefined
      ? await connectNode(state.target, conn.connecting.signal)
      : await Deno.connect({ ...state.target, transport: "tcp", signal: conn.connecting.signal });
  } catch (error) {
    if (conn.closing) {
      finishConnection(state, conn);
      return;
    }
    emit(state, conn, undefined, "error", {
      message: `cannot connect to ${target}: ${connectError(error, target)}`,
    });
    finishConnection(state, conn);
    return;
  }
  conn.connecting = undefined;
  if (conn.closing) {
    finishConnection(state, conn);
    return;
  }
  // We mirror each read with one write; Nagle's algorithm on our side would
  // merge small writes the peer chose to send apart, which is what we show.
  setNoDelay(client);
  setNoDelay(conn.server);
  let toServer = socketSink(conn.server), toClient = socketSink(client);
  if (state.faults) [toServer, toClient] = faultySinks(state, conn, toServer, toClient);
  try {
    await Promise.all([
      pump(state, conn, conn.c2s, client, toServer),
      pump(state, conn, conn.s2c, conn.server, toClient),
    ]);
  } finally {
    finishConnection(state, conn);
  }
}

/**
 * Where one direction's bytes go. `write` resolves once the bytes are handed
 * on; a stage that keeps them longer must copy them, because the read buffer
 * is reused for the next read.
 */
interface Sink {
  write(bytes: Uint8Array): Promise<void>;
  /** The sender's FIN, passed on after every byte before it. */
  closeWrite(): Promise<void>;
}

function socketSink(to: ProxySocket): Sink {
  return { write: (bytes) => writeAll(to, bytes), closeWrite: () => to.closeWrite() };
}

async function pump(
  state: WireState,
  conn: Connection,
  direction: DirectionState,
  from: ProxySocket,
  to: Sink,
): Promise<void> {
  const buffer = new Uint8Array(READ_BUFFER_SIZE);
  for (;;) {
    let n: number | null;
    try {
      n = await from.read(buffer);
    } catch (error) {
      sideFailed(state, conn, direction.dir, sideOf(direction.dir, "from"), error);
      return;
    }
    if (n === null) {
      const otherDir = direction.dir === "c2s" ? "s2c" : "c2s";
      // Once we have half-closed `from` ourselves, the probe would fail anyway.
      if (!conn.finished[otherDir] && await wasReset(from)) {
        sideFailed(state, conn, direction.dir, sideOf(direction.dir, "from"), RESET);
        return;
      }
      await passFin(state, conn, direction, to);
      return;
    }
    const chunk = n === buffer.length ? buffer : buffer.subarray(0, n);
    // The bytes go first, the explanation after: decoding never delays or
    // changes what is forwarded, and it reads the same buffer, no copy.
    let passed: Uint8Array;
    try {
      passed = await forward(conn, direction.dir, to, chunk);
    } catch (error) {
      sideFailed(state, conn, direction.dir, sideOf(direction.dir, "to"), error);
      return;
    }
    conn.bytes[direction.dir] += n;
    if (passed.length > 0) observeSafely(state, conn, direction, passed);
    const backlog = state.waitForOutput?.();
    if (backlog) await backlog;
  }
}

// Writes a chunk on and returns the part that passed, which is what is shown:
// all of it, unless a stall (section 6a) discarded its tail, which is only
// counted.
async function forward(
  conn: Connection,
  dir: Direction,
  to: Sink,
  chunk: Uint8Array,
): Promise<Uint8Array> {
  const discardedBefore = conn.discarded[dir] ?? 0;
  await to.write(chunk);
  const discarded = (conn.discarded[dir] ?? 0) - discardedBefore;
  return discarded > 0 ? chunk.subarray(0, Math.max(0, chunk.length - discarded)) : chunk;
}

// Deno's read ends with null after a reset just as after a FIN (Python's
// recv raises ECONNRESET). Writing nothing tells them apart: it fails only
// on a connection that was reset.
async function wasReset(conn: ProxySocket): Promise<boolean> {
  try {
    await conn.write(NOTHING);
    return false;
  } catch {
    return true;
  }
}

async function writeAll(to: ProxySocket, bytes: Uint8Array): Promise<void> {
  // A write may take only part of the bytes: a partial write is normal.
  let done = await to.write(bytes);
  while (done < bytes.length) done += await to.write(bytes.subarray(done));
}

async function passFin(
  state: WireState,
  conn: Connection,
  direction: DirectionState,
  to: Sink,
): Promise<void> {
  if (conn.closing) return;
  // A stalled direction passes nothing on, its FIN included (section 6a).
  if (conn.discarded[direction.dir] !== undefined) return;
  endOfStream(state, conn, direction);
  markFinished(conn, direction.dir);
  emit(state, conn, direction.dir, "fin", {});
  try {
    await to.closeWrite();
  } catch {
    // The other side is gone already; its own loop reports how.
  }
}

// The FIN has passed this way. A stall the other way waits for it (section 6a).
function markFinished(conn: Connection, dir: Direction): void {
  conn.finished[dir] = true;
  conn.faults?.finished[dir].resolve();
}

function sideOf(dir: Direction, end: "from" | "to"): "client" | "server" {
  return (dir === "c2s") === (end === "from") ? "client" : "server";
}

// A failed read or write: a reset from that side, or our own close.
function sideFailed(
  state: WireState,
  conn: Connection,
  dir: Direction,
  side: "client" | "server",
  error: unknown,
): void {
  if (conn.closing) return;
  if (
    error instanceof Deno.errors.ConnectionReset || error instanceof Deno.errors.BrokenPipe ||
    error instanceof Deno.errors.ConnectionAborted
  ) {
    emit(state, conn, dir, "reset", { side });
  } else {
    emit(state, conn, dir, "error", { message: `${side}: ${errorText(error)}` });
  }
  abortConnection(conn);
}

function abortConnection(conn: Connection): void {
  conn.closing = true;
  conn.faults?.stop();
  conn.connecting?.abort();
  conn.connecting = undefined;
  closeQuietly(conn.client);
  if (conn.server) closeQuietly(conn.server);
}

function finishConnection(state: WireState, conn: Connection): void {
  abortConnection(conn);
  state.connections.delete(conn);
  const summary: Record<string, unknown> = {
    duration_ms: round(performance.now() - conn.start),
    bytes_c2s: conn.bytes.c2s,
    bytes_s2c: conn.bytes.s2c,
  };
  for (const dir of ["c2s", "s2c"] as const) {
    if (conn.discarded[dir] !== undefined) summary[`discarded_${dir}`] = conn.discarded[dir];
  }
  if (conn.websocket) {
    summary.frames_c2s = conn.c2s.frameCount;
    summary.frames_s2c = conn.s2c.frameCount;
    summary.messages_c2s = conn.c2s.messageCount;
    summary.messages_s2c = conn.s2c.messageCount;
    summary.payload_c2s = conn.c2s.payloadBytes;
    summary.payload_s2c = conn.s2c.payloadBytes;
  }
  emit(state, conn, undefined, "close", summary);
}

// ------------------------------------------------- 2. what a TCP read is
//
// A read returns whatever the kernel had: part of what the peer wrote, or
// several of its writes at once. Nothing in TCP says where one message ends,
// so a raw connection is shown read by read, each with its byte count, and
// where its newlines fall, the framing a line protocol adds on top.
//
// What a connection speaks is decided as early as its bytes allow: a TLS
// handshake starts with record type 0x16; HTTP with an upper-case method;
// anything else is raw TCP at once. Deciding holds back events, never bytes.

// Decoding must never stop forwarding: should it ever fail on some bytes,
// that direction is shown as raw data from then on, and the bytes flow on.
function observeSafely(
  state: WireState,
  conn: Connection,
  direction: DirectionState,
  chunk: Uint8Array,
): void {
  try {
    observe(state, conn, direction, chunk);
  } catch (error) {
    direction.mode = "raw";
    emit(state, conn, direction.dir, "error", {
      message: `cannot decode these bytes (${errorText(error)}); shown raw from here`,
    });
  }
}

function observe(
  state: WireState,
  conn: Connection,
  direction: DirectionState,
  chunk: Uint8Array,
): void {
  let offset = 0;
  while (offset < chunk.length) {
    switch (direction.mode) {
      case "detect":
        detect(state, conn, direction, chunk.subarray(offset));
        break;
      case "http":
        offset = readHead(state, conn, direction, chunk, offset);
        break;
      case "body":
        offset = readBody(state, conn, direction, chunk, offset);
        break;
      case "frames":
        direction.frames!.push(offset === 0 ? chunk : chunk.subarray(offset));
        return;
      case "raw":
      case "tls":
        if (state.onEvent) emitData(state, conn, direction, chunk.subarray(offset));
        return;
    }
  }
}

function detect(
  state: WireState,
  conn: Connection,
  direction: DirectionState,
  bytes: Uint8Array,
): void {
  const first = bytes[0];
  const other = direction.dir === "c2s" ? conn.s2c : conn.c2s;
  if (direction.dir === "s2c") {
    // The server spoke first or answered something that was not HTTP.
    direction.mode = other.mode === "http" || other.mode === "body" || other.mode === "frames"
      ? "http"
      : other.mode === "tls"
      ? "tls"
      : "raw";
    return;
  }
  if (first === 0x16) {
    direction.mode = other.mode = "tls";
    // The record's version bytes: 3.1 for every TLS 1.x ClientHello.
    const version = bytes.length >= 3 ? `${bytes[1]}.${bytes[2]}` : undefined;
    emit(state, conn, "c2s", "tls", version ? { version } : {});
  } else if (first >= 0x41 && first <= 0x5a) {
    direction.mode = "http";
  } else {
    direction.mode = "raw";
  }
}

function emitData(
  state: WireState,
  conn: Connection,
  direction: DirectionState,
  bytes: Uint8Array,
): void {
  if (direction.mode === "tls") {
    emit(state, conn, direction.dir, "data", { bytes: bytes.length });
    return;
  }
  let newlines = 0;
  for (let i = bytes.indexOf(10); i !== -1; i = bytes.indexOf(10, i + 1)) newlines++;
  emit(state, conn, direction.dir, "data", {
    bytes: bytes.length,
    ...previewFields(state, bytes.subarray(0, state.preview), bytes.length > state.preview),
    newlines,
  });
}

// The first `preview` bytes as text when they are UTF-8 (a character cut by
// the preview's end is left out), else as hex.
function previewFields(
  state: WireState,
  bytes: Uint8Array,
  truncated: boolean,
  binary = false,
): { text?: string; hex?: string; truncated: boolean } {
  if (!state.hex && !binary) {
    const text = utf8Text(bytes, truncated);
    if (text !== undefined) return { text, truncated };
  }
  return { hex: toHex(bytes), truncated };
}

function utf8Text(bytes: Uint8Array, truncated: boolean): string | undefined {
  const end = utf8Length(bytes);
  // A cut can fall inside a character: its first bytes are left out.
  if (end === -1 || (end < bytes.length && !truncated)) return undefined;
  return lenientDecoder.decode(end === bytes.length ? bytes : bytes.subarray(0, end));
}

// How many bytes from the start are whole UTF-8 characters: all of them, or
// where a character begins that the bytes end inside of; -1 when they are not
// UTF-8. (A check, not a decode: binary data costs no exception per read.)
function utf8Length(bytes: Uint8Array): number {
  let i = 0;
  while (i < bytes.length) {
    const byte = bytes[i];
    if (byte < 0x80) {
      i++;
      continue;
    }
    let need: number, low = 0x80, high = 0xbf;
    if (byte >= 0xc2 && byte <= 0xdf) need = 1;
    else if (byte >= 0xe0 && byte <= 0xef) {
      need = 2;
      if (byte === 0xe0) low = 0xa0;
      else if (byte === 0xed) high = 0x9f;
    } else if (byte >= 0xf0 && byte <= 0xf4) {
      need = 3;
      if (byte === 0xf0) low = 0x90;
      else if (byte === 0xf4) high = 0x8f;
    } else {
      return -1;
    }
    for (let k = 1; k <= need; k++) {
      if (i + k >= bytes.length) return i;
      const next = bytes[i + k];
      if (next < (k === 1 ? low : 0x80) || next > (k === 1 ? high : 0xbf)) return -1;
    }
    i += need + 1;
  }
  return i;
}

function endOfStream(state: WireState, conn: Connection, direction: DirectionState): void {
  if (direction.mode === "http" && direction.headLength > 0 && state.onEvent) {
    // A head that never finished: its bytes, as they were.
    direction.mode = "raw";
    emitData(state, conn, direction, direction.head!.subarray(0, direction.headLength));
  }
  const unfinished = direction.frames?.unfinished();
  if (unfinished) emit(state, conn, direction.dir, "error", { message: unfinished });
}

// --------------------------------------------- 3. HTTP heads and the upgrade
//
// An HTTP/1.x message starts with a head: a start line ("GET / HTTP/1.1", or
// "HTTP/1.1 200 OK"), header lines, and an empty line (CRLF CRLF). A
// WebSocket begins as such a request with `Upgrade: websocket` and a random
// `Sec-WebSocket-Key`; a server that agrees answers `101 Switching Protocols`
// with `Sec-WebSocket-Accept: base64(SHA-1(key + GUID))`, proving it read
// this very request (a cache or a confused server could not produce it).
// After the 101 both directions carry frames. Any other answer leaves the
// connection HTTP: the next head, or its body, follows.

function readHead(
  state: WireState,
  conn: Connection,
  direction: DirectionState,
  chunk: Uint8Array,
  offset: number,
): number {
  const head = direction.head ??= new Uint8Array(MAX_HTTP_HEAD);
  const before = direction.headLength;
  const taken = Math.min(chunk.length - offset, head.length - before);
  head.set(chunk.subarray(offset, offset + taken), before);
  direction.headLength += taken;
  if (!startLineFits(direction)) return notHttp(state, conn, direction, offset + taken);
  const end = indexOfBlankLine(head, Math.max(0, before - 3), direction.headLength);
  if (end === -1) {
    if (direction.headLength === head.length) {
      return notHttp(state, conn, direction, offset + taken);
    }
    return offset + taken;
  }
  const headBytes = end + 4;
  direction.headLength = 0;
  direction.startChecked = 0;
  direction.startPhase = direction.dir === "c2s" ? "method" : "line";
  httpHead(state, conn, direction, lenientDecoder.decode(head.subarray(0, end)));
  return offset + headBytes - before;
}

// Checks the start line as its bytes arrive: a request starts with an
// upper-case method and a space, a response with "HTTP/1.".
function startLineFits(direction: DirectionState): boolean {
  const head = direction.head!;
  for (; direction.startChecked < direction.headLength; direction.startChecked++) {
    const i = direction.startChecked;
    const byte = head[i];
    if (direction.startPhase === "method") {
      if (byte === 0x20 && i > 0) direction.startPhase = "line";
      else if (byte < 0x41 || byte > 0x5a || i >= MAX_METHOD_LENGTH) return false;
    } else if (direction.startPhase === "line") {
      if (direction.dir === "s2c" && i < 7 && byte !== "HTTP/1.".charCodeAt(i)) return false;
      if (byte === 0x0a) {
        const line = lenientDecoder.decode(head.subarray(0, i)).replace(/\r$/, "");
        const pattern = direction.dir === "c2s" ? REQUEST_LINE : STATUS_LINE;
        if (!pattern.test(line)) return false;
        direction.startPhase = "done";
      }
    } else {
      break;
    }
  }
  return true;
}

const REQUEST_LINE = /^[A-Z]+ \S+ HTTP\/1\.\d$/;
const STATUS_LINE = /^HTTP\/1\.\d \d{3}(?: .*)?$/;

function indexOfBlankLine(bytes: Uint8Array, from: number, to: number): number {
  for (let i = bytes.indexOf(13, from); i !== -1 && i + 3 < to; i = bytes.indexOf(13, i + 1)) {
    if (bytes[i + 1] === 10 && bytes[i + 2] === 13 && bytes[i + 3] === 10) return i;
  }
  return -1;
}

// Not HTTP after all: what was held back is shown as one read, and the rest
// of the direction as raw data.
function notHttp(
  state: WireState,
  conn: Connection,
  direction: DirectionState,
  offset: number,
): number {
  direction.mode = "raw";
  if (state.onEvent) {
    emitData(state, conn, direction, direction.head!.subarray(0, direction.headLength));
  }
  direction.headLength = 0;
  return offset;
}

function httpHead(
  state: WireState,
  conn: Connection,
  direction: DirectionState,
  text: string,
): void {
  const [start, ...lines] = text.split("\r\n");
  // No prototype: a header named "__proto__" is just a header.
  const headers: Record<string, string> = Object.create(null);
  for (const line of lines) {
    const colon = line.indexOf(":");
    if (colon <= 0) continue;
    const name = line.slice(0, colon).trim().toLowerCase();
    const value = line.slice(colon + 1).trim();
    headers[name] = name in headers ? `${headers[name]}, ${value}` : value;
  }
  const fields: Record<string, unknown> = { start, headers };
  if (direction.dir === "c2s") {
    request(state, conn, direction, start, headers, fields);
  } else {
    response(state, conn, direction, start, headers, fields);
  }
  emit(state, conn, direction.dir, "http", fields);
}

function request(
  state: WireState,
  conn: Connection,
  direction: DirectionState,
  start: string,
  headers: Record<string, string>,
  fields: Record<string, unknown>,
): void {
  const method = start.slice(0, start.indexOf(" "));
  if (conn.methods.length < 64) conn.methods.push(method);
  if (/\bwebsocket\b/i.test(headers["upgrade"] ?? "") && headers["sec-websocket-key"]) {
    // A client may send frames only after the 101, so what follows is frames
    // (if the server refuses, section 3's response() turns this back).
    conn.websocketKey = headers["sec-websocket-key"];
    fields.key = conn.websocketKey;
    startFrames(state, conn, direction);
    return;
  }
  bodyFollows(direction, headers, true);
}

function response(
  state: WireState,
  conn: Connection,
  direction: DirectionState,
  start: string,
  headers: Record<string, string>,
  fields: Record<string, unknown>,
): void {
  const status = Number(start.split(" ")[1]);
  if (status >= 100 && status < 200 && status !== 101) return; // 100 Continue: the real one follows
  const method = conn.methods.shift();
  const key = conn.websocketKey;
  conn.websocketKey = undefined;
  if (status === 101 && key !== undefined) {
    const expected = websocketAccept(key);
    fields.accept = headers["sec-websocket-accept"] ?? null;
    fields.accept_expected = expected;
    fields.accept_ok = fields.accept === expected;
    if (headers["sec-websocket-protocol"]) fields.protocol = headers["sec-websocket-protocol"];
    if (headers["sec-websocket-extensions"]) {
      fields.extensions = headers["sec-websocket-extensions"];
    }
    startWebSocket(state, conn, Boolean(headers["sec-websocket-extensions"]));
    return;
  }
  if (status === 101) {
    // Upgraded to something that is not WebSocket (h2c, say): bytes from here.
    conn.c2s.mode = direction.mode = "raw";
    return;
  }
  if (key !== undefined) {
    // The upgrade was refused: the client's next bytes are a request again.
    conn.c2s.mode = "http";
    conn.c2s.frames = conn.c2s.frameOptions = undefined;
  }
  const noBody = method === "HEAD" || status === 204 || status === 304;
  if (!noBody) bodyFollows(direction, headers, false);
}

// A body of Content-Length bytes is shown as data, then the next head; a
// chunked body, or one that lasts until the server closes, is shown raw.
function bodyFollows(
  direction: DirectionState,
  headers: Record<string, string>,
  isRequest: boolean,
) {
  const length = headers["content-length"];
  if (headers["transfer-encoding"]) {
    direction.mode = "raw";
  } else if (length !== undefined && /^\d{1,15}$/.test(length)) {
    direction.bodyRemaining = Number(length);
    direction.mode = direction.bodyRemaining > 0 ? "body" : "http";
  } else {
    direction.mode = isRequest ? "http" : "raw";
  }
}

function readBody(
  state: WireState,
  conn: Connection,
  direction: DirectionState,
  chunk: Uint8Array,
  offset: number,
): number {
  const taken = Math.min(chunk.length - offset, direction.bodyRemaining);
  if (state.onEvent) emitData(state, conn, direction, chunk.subarray(offset, offset + taken));
  direction.bodyRemaining -= taken;
  if (direction.bodyRemaining === 0) direction.mode = "http";
  return offset + taken;
}

/**
 * The `Sec-WebSocket-Accept` a server must send for a `Sec-WebSocket-Key`:
 * base64 of the SHA-1 of the key followed by RFC 6455's GUID.
 *
 * @example RFC 6455's own example
 * ```ts
 * websocketAccept("dGhlIHNhbXBsZSBub25jZQ=="); // "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
 * ```
 */
export function websocketAccept(key: string): string {
  return createHash("sha1").update(key + WEBSOCKET_GUID).digest("base64");
}

function startWebSocket(state: WireState, conn: Connection, extensions: boolean): void {
  conn.websocket = true;
  // The client's decoder started at its request; only now do we know
  // whether an extension gives the RSV bits a meaning.
  if (!conn.c2s.frameOptions) startFrames(state, conn, conn.c2s);
  conn.c2s.frameOptions!.extensions = extensions;
  startFrames(state, conn, conn.s2c);
  conn.s2c.frameOptions!.extensions = extensions;
}

function startFrames(state: WireState, conn: Connection, direction: DirectionState): void {
  direction.mode = "frames";
  direction.head = undefined;
  direction.frameOptions = {
    fromClient: direction.dir === "c2s",
    preview: state.onEvent ? state.preview : 0,
    extensions: false,
    onFrame: (frame) => frameSeen(state, conn, direction, frame),
  };
  direction.frames = createFrameDecoder(direction.frameOptions);
}

function frameSeen(
  state: WireState,
  conn: Connection,
  direction: DirectionState,
  frame: Frame,
): void {
  direction.frameCount++;
  direction.payloadBytes += frame.length;
  if (frame.messageComplete) direction.messageCount++;
  if (!state.onEvent) return;
  const fields: Record<string, unknown> = {
    fin: frame.fin,
    rsv: frame.rsv,
    opcode: frame.opcode,
    name: frame.name,
    masked: frame.mask !== undefined,
  };
  if (frame.mask !== undefined) fields.mask = frame.mask;
  Object.assign(fields, {
    length: frame.length,
    length_encoding: frame.lengthEncoding,
    header_bytes: frame.headerBytes,
  });
  const binary = frame.opcode === 2 || frame.compressed ||
    (frame.opcode === 0 && frame.messageOpcode === 2);
  const shown = frame.opcode === 8 ? frame.preview.subarray(0, 0) : frame.preview;
  if (frame.opcode !== 8) {
    Object.assign(fields, previewFields(state, shown, frame.truncated, binary));
  }
  if (frame.code !== undefined) {
    fields.code = frame.code;
    fields.meaning = closeMeaning(frame.code);
    fields.reason = frame.reason ?? "";
  }
  if (frame.message !== undefined) {
    fields.message = frame.message;
    fields.fragment = frame.fragment;
    fields.message_complete = frame.messageComplete;
  }
  fields.errors = frame.errors;
  emit(state, conn, direction.dir, "frame", fields);
}

// ------------------------------------------------------ 4. the frame decoder
//
// RFC 6455 section 5.2, the layout of every frame:
//
//      0                   1                   2                   3
//      0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//     +-+-+-+-+-------+-+-------------+-------------------------------+
//     |F|R|R|R| opcode|M| Payload len |    Extended payload length    |
//     |I|S|S|S|  (4)  |A|     (7)     |             (16/64)           |
//     |N|V|V|V|       |S|             |   (if payload len==126/127)   |
//     | |1|2|3|       |K|             |                               |
//     +-+-+-+-+-------+-+-------------+ - - - - - - - - - - - - - - - +
//     |     Extended payload length continued, if payload len == 127  |
//     + - - - - - - - - - - - - - - - +-------------------------------+
//     |                               |Masking-key, if MASK set to 1  |
//     +-------------------------------+-------------------------------+
//     | Masking-key (continued)       |          Payload Data         |
//     +-------------------------------- - - - - - - - - - - - - - - - +
//     :                     Payload Data continued ...                :
//     + - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - +
//
// FIN ends a message; a message may be split into a first frame and
// continuation frames (opcode 0). Opcodes: 1 text, 2 binary, 8 close, 9 ping,
// 10 pong; the others are reserved. Lengths under 126 fit in the 7 bits;
// 126 means a 16-bit length follows, 127 a 64-bit one, and the shortest form
// must be used. Every client frame is masked: its payload is XORed with the
// 4-byte key, byte i with key[i % 4], so that a client's bytes can never look
// like a request to a cache in between; server frames are not masked.
//
// The decoder takes bytes as they arrive, in pieces of any size. It keeps
// the header (at most 14 bytes) and the first bytes of each payload for the
// preview, never a whole payload: a 64 MiB frame costs what a 6-byte one does.

/** One decoded frame, as {@linkcode createFrameDecoder} reports it once its last byte has passed. */
export interface Frame {
  fin: boolean;
  /** RSV1 = 4, RSV2 = 2, RSV3 = 1. */
  rsv: number;
  opcode: number;
  name: string;
  /** The masking key, as 8 hex digits, when the frame is masked. */
  mask?: string;
  /** Payload bytes. */
  length: number;
  /** Which length field carried it: 7, 16 or 64 bits. */
  lengthEncoding: 7 | 16 | 64;
  headerBytes: number;
  /** The first payload bytes, unmasked (a control frame's whole payload). */
  preview: Uint8Array;
  truncated: boolean;
  /** A data frame's message number in this direction, from 1. */
  message?: number;
  /** Which frame of its message this is, from 1. */
  fragment?: number;
  /** True on the frame that ends a message. */
  messageComplete: boolean;
  /** The opcode of the message a data frame belongs to (1 or 2). */
  messageOpcode?: number;
  /** RSV1 on a message with a negotiated extension (permessage-deflate). */
  compressed: boolean;
  /** Close frames: the code (absent when the payload is empty) and reason. */
  code?: number;
  reason?: string;
  /** Protocol errors in this frame, each naming the rule it breaks; empty when none. */
  errors: string[];
}

/** Options for {@linkcode createFrameDecoder}. */
export interface FrameDecoderOptions {
  /** True for frames a client sends (they must be masked), false for a server's. */
  fromClient: boolean;
  /** Payload bytes kept for each frame's preview. Control frames keep up to 125 anyway. */
  preview: number;
  /** An extension was negotiated (RSV bits may then be set). Read at each frame. Default false. */
  extensions?: boolean;
  /** Called once per frame, after its last byte. */
  onFrame: (frame: Frame) => void;
}

/** What {@linkcode createFrameDecoder} returns. */
export interface FrameDecoder {
  /** Decodes the next bytes; any amount, from one byte to many frames. */
  push(bytes: Uint8Array): void;
  /** At the end of the stream: a description of the frame cut short, if any. */
  unfinished(): string | undefined;
}

const OPCODE_NAMES: Record<number, string> = {
  0: "continuation",
  1: "text",
  2: "binary",
  8: "close",
  9: "ping",
  10: "pong",
};

/**
 * An incremental RFC 6455 frame decoder: push bytes in pieces of any size,
 * get one `onFrame` call per frame, with its header fields, a preview of its
 * payload and the protocol errors it contains. Memory is bounded by the
 * preview, whatever the frames' size.
 *
 * @example A masked text frame "hi", pushed one byte at a time
 * ```ts
 * const frames: Frame[] = [];
 * const decoder = createFrameDecoder({ fromClient: true, preview: 64, onFrame: (f) => frames.push(f) });
 * for (const byte of [0x81, 0x82, 1, 2, 3, 4, 0x69, 0x6b]) decoder.push(Uint8Array.of(byte));
 * // frames[0]: fin true, name "text", mask "01020304", preview "hi", errors []
 * ```
 */
export function createFrameDecoder(options: FrameDecoderOptions): FrameDecoder {
  const keep = Math.max(options.preview, MAX_CONTROL_PAYLOAD);
  const header = new Uint8Array(14);
  const mask = new Uint8Array(4);
  const preview = new Uint8Array(keep);
  let headerFill = 0;
  let headerNeed = 2;
  let inPayload = false;
  let remaining = 0;
  let position = 0;
  let previewCap = 0;
  let previewFill = 0;
  let frame: Frame | undefined;
  // The message in progress, across its frames.
  let messageOpcode = 0;
  let messages = 0;
  let fragments = 0;
  let messageCompressed = false;
  let closed = false;
  // UTF-8 validation of a text message, across frames: continuation bytes
  // still expected, and the range the next one must fall in (which rules
  // out overlong forms, surrogates and code points past U+10FFFF).
  let validating = false;
  let utf8Ok = true;
  let utf8Need = 0;
  let utf8Low = 0x80;
  let utf8High = 0xbf;

  function startFrame(): void {
    const fin = (header[0] & 0x80) !== 0;
    const rsv = (header[0] >> 4) & 7;
    const opcode = header[0] & 0x0f;
    const masked = (header[1] & 0x80) !== 0;
    const length7 = header[1] & 0x7f;
    const errors: string[] = [];
    let length = length7;
    let lengthEncoding: 7 | 16 | 64 = 7;
    if (length7 === 126) {
      lengthEncoding = 16;
      length = (header[2] << 8) | header[3];
      if (length < 126) {
        errors.push(`length ${length} sent in the 16-bit form; the shortest must be used (§5.2)`);
      }
    } else if (length7 === 127) {
      lengthEncoding = 64;
      const high = ((header[2] << 24) >>> 0) + (header[3] << 16) + (header[4] << 8) + header[5];
      const low = ((header[6] << 24) >>> 0) + (header[7] << 16) + (header[8] << 8) + header[9];
      if (high >= 0x80000000) {
        errors.push("64-bit length with its most significant bit set (§5.2)");
      } else if (high > 0x1fffff) {
        errors.push("a length past 2^53 bytes: no real frame is that big, decoding cannot follow");
      }
      // Past 2^53 a JavaScript number loses bytes; no real frame is that big.
      length = Math.min(high, 0x1fffff) * 2 ** 32 + low;
      if (length < 65536) {
        errors.push(`length ${length} sent in the 64-bit form; the shortest must be used (§5.2)`);
      }
    }
    const maskOffset = headerNeed - 4;
    if (masked) mask.set(header.subarray(maskOffset, maskOffset + 4));
    const control = opcode >= 8;
    const name = OPCODE_NAMES[opcode] ?? "reserved";
    if (options.fromClient && !masked) errors.push("a client frame must be masked (§5.1)");
    if (!options.fromClient && masked) errors.push("a server frame must not be masked (§5.1)");
    if (name === "reserved") errors.push(`opcode ${opcode} is reserved (§5.2)`);
    // What the RSV bits mean is up to the extension that was negotiated.
    if (rsv !== 0 && !options.extensions) {
      errors.push(
        `RSV bits ${
          rsv.toString(2).padStart(3, "0")
        } set without an extension that defines them (§5.2)`,
      );
    }
    if (closed) errors.push("a frame after a close frame (§5.5.1)");
    if (control) {
      if (length > MAX_CONTROL_PAYLOAD) {
        errors.push(`control frame of ${length} bytes; at most 125 (§5.5)`);
      }
      if (!fin) errors.push("control frame fragmented; control frames must have FIN (§5.5)");
      if (opcode === 8) closed = true;
    }
    let message: number | undefined;
    let fragment: number | undefined;
    let ofOpcode: number | undefined;
    if (opcode === 1 || opcode === 2) {
      if (messageOpcode !== 0) {
        errors.push("a new message before the last one's final frame (§5.4)");
      }
      messageOpcode = opcode;
      message = ++messages;
      fragments = 1;
      fragment = 1;
      messageCompressed = options.extensions === true && (rsv & 4) !== 0;
      validating = opcode === 1 && !messageCompressed;
      utf8Ok = true;
      utf8Need = 0;
      utf8Low = 0x80;
      utf8High = 0xbf;
    } else if (opcode === 0) {
      if (messageOpcode === 0) {
        errors.push("a continuation frame with no message to continue (§5.4)");
      } else {
        message = messages;
        fragment = ++fragments;
      }
    }
    if (message !== undefined) ofOpcode = messageOpcode;
    frame = {
      fin,
      rsv,
      opcode,
      name,
      mask: masked ? toHex(mask) : undefined,
      length,
      lengthEncoding,
      headerBytes: headerNeed,
      preview,
      truncated: false,
      message,
      fragment,
      messageComplete: false,
      messageOpcode: ofOpcode,
      compressed: messageCompressed && message !== undefined,
      errors,
    };
    inPayload = true;
    remaining = length;
    position = 0;
    previewFill = 0;
    previewCap = Math.min(length, control ? keep : options.preview);
    if (!masked) mask.fill(0);
  }

  function payload(bytes: Uint8Array, from: number, count: number): void {
    const currentFrame = frame!;
    if (previewFill < previewCap) {
      const n = Math.min(count, previewCap - previewFill);
      for (let i = 0; i < n; i++) {
        preview[previewFill + i] = bytes[from + i] ^ mask[(position + i) & 3];
      }
      previewFill += n;
    }
    if (validating && utf8Ok && currentFrame.message !== undefined) {
      validateUtf8(bytes, from, count);
    }
    position += count;
  }

  function validateUtf8(bytes: Uint8Array, from: number, count: number): void {
    let need = utf8Need, low = utf8Low, high = utf8High;
    const key0 = mask[position & 3], key1 = mask[(position + 1) & 3];
    const key2 = mask[(position + 2) & 3], key3 = mask[(position + 3) & 3];
    for (let i = 0; i < count; i++) {
      const k = i & 3;
      const byte = bytes[from + i] ^ (k === 0 ? key0 : k === 1 ? key1 : k === 2 ? key2 : key3);
      if (need === 0) {
        if (byte < 0x80) continue;
        low = 0x80;
        high = 0xbf;
        if (byte >= 0xc2 && byte <= 0xdf) need = 1;
        else if (byte >= 0xe0 && byte <= 0xef) {
          need = 2;
          if (byte === 0xe0) low = 0xa0;
          else if (byte === 0xed) high = 0x9f;
        } else if (byte >= 0xf0 && byte <= 0xf4) {
          need = 3;
          if (byte === 0xf0) low = 0x90;
          else if (byte === 0xf4) high = 0x8f;
        } else {
          utf8Ok = false;
          return;
        }
      } else {
        if (byte < low || byte > high) {
          utf8Ok = false;
          return;
        }
        need--;
        low = 0x80;
        high = 0xbf;
      }
    }
    utf8Need = need;
    utf8Low = low;
    utf8High = high;
  }

  function endFrame(): void {
    const done = frame!;
    frame = undefined;
    inPayload = false;
    headerFill = 0;
    headerNeed = 2;
    done.preview = preview.slice(0, previewFill);
    done.truncated = done.length > previewFill;
    if (done.message !== undefined && done.fin) {
      done.messageComplete = true;
      if (validating && utf8Ok && utf8Need !== 0) utf8Ok = false;
      messageOpcode = 0;
    }
    if (validating && !utf8Ok) {
      done.errors.push("a text message that is not valid UTF-8 (§8.1)");
      validating = false;
    }
    if (done.opcode === 8) closePayload(done);
    options.onFrame(done);
  }

  function closePayload(done: Frame): void {
    const bytes = done.preview;
    if (bytes.length === 1) {
      done.errors.push("a close payload of 1 byte; a code takes 2 (§5.5.1)");
      return;
    }
    if (bytes.length < 2) return;
    done.code = (bytes[0] << 8) | bytes[1];
    const reason = bytes.subarray(2);
    try {
      done.reason = strictDecoder.decode(reason);
    } catch {
      done.reason = lenientDecoder.decode(reason);
      done.errors.push("a close reason that is not valid UTF-8 (§5.5.1)");
    }
    if (!closeCodeMaySend(done.code)) {
      done.errors.push(`close code ${done.code} may not be sent in a close frame (§7.4)`);
    }
  }

  return {
    push(bytes: Uint8Array): void {
      let i = 0;
      while (i < bytes.length) {
        if (!inPayload) {
          header[headerFill++] = bytes[i++];
          if (headerFill === 2) {
            const length7 = header[1] & 0x7f;
            headerNeed = 2 + (length7 === 126 ? 2 : length7 === 127 ? 8 : 0) +
              ((header[1] & 0x80) !== 0 ? 4 : 0);
          }
          if (headerFill === headerNeed) {
            startFrame();
            if (remaining === 0) endFrame();
          }
          continue;
        }
        const count = Math.min(remaining, bytes.length - i);
        payload(bytes, i, count);
        i += count;
        remaining -= count;
        if (remaining === 0) endFrame();
      }
    },
    unfinished(): string | undefined {
      if (inPayload) {
        return `the stream ended ${position} bytes into a ${frame!.length}-byte ${
          frame!.name
        } frame`;
      }
      if (headerFill > 0) return `the stream ended inside a frame header (${headerFill} bytes)`;
      return undefined;
    },
  };
}

// ---------------------------------------------------------- 5. close codes
//
// A close frame's payload is a 2-byte code and a UTF-8 reason (section 5.5.1).
// 1005, 1006 and 1015 are what an API reports when there was no code, no
// close frame at all, or a failed TLS handshake: they may never be sent.

const CLOSE_MEANINGS: Record<number, string> = {
  1000: "normal closure",
  1001: "going away",
  1002: "protocol error",
  1003: "unsupported data",
  1004: "reserved",
  1005: "no status code (may not be sent)",
  1006: "closed abnormally (may not be sent)",
  1007: "invalid data",
  1008: "policy violation",
  1009: "message too big",
  1010: "a required extension is missing",
  1011: "server error",
  1012: "service restart",
  1013: "try again later",
  1014: "bad gateway",
  1015: "TLS handshake failed (may not be sent)",
};

function closeMeaning(code: number): string {
  return CLOSE_MEANINGS[code] ??
    (code >= 3000 && code <= 3999
      ? "application (registered)"
      : code >= 4000 && code <= 4999
      ? "application (private)"
      : "not a defined code");
}

// Section 7.4: 1000-1003 and 1007-1011 (and the later IANA 1012-1014), or
// 3000-4999 for applications. Everything else is a protocol error.
function closeCodeMaySend(code: number): boolean {
  return (code >= 1000 && code <= 1003) || (code >= 1007 && code <= 1014) ||
    (code >= 3000 && code <= 4999);
}

// ---------------------------------------------------------------- 6. faults
//
// Everything above forwards faithfully. The stages here misbehave on purpose,
// so that a client can be tested against what a polite loopback never does:
// a line in five pieces, a message in many frames, a slow link, a peer that
// vanishes or hangs, a server whose pongs never come. Each stage is a Sink in
// front of the socket (section 1), per direction: `--faults-to client` acts
// on what travels to the client (s2c), `server` on what travels to the
// server (c2s). Every time a fault acts it is reported as a `fault` event.
//
// Nothing is corrupted silently: TCP-level stages forward the same bytes in
// the same order (later, slower, in pieces, or not at all); WebSocket-level
// stages re-frame, which RFC 6455 section 5.4 allows any intermediary: the
// same messages in the same order, control frames never split, and every
// client frame masked with a fresh key. Memory stays bounded: a delayed
// direction holds at most DELAY_LINE_LIMIT bytes, a fragmenting one one
// fragment, and a stalled one nothing (it discards what comes, up to
// STALL_WINDOW, then its sender waits).

/** The faults `startWire` applies; each field is the flag of the same name. */
export interface FaultOptions {
  /** Which direction the faults act on: what travels to the client, to the server, or both. Default both. */
  to?: "client" | "server" | "both";
  /** Each chunk is held this long, order kept. */
  latency?: number;
  /** A random 0..jitter ms added to each delay. */
  jitter?: number;
  /** At most this many bytes per second. */
  bandwidth?: number;
  /** Forward in pieces of at most this many bytes, each its own write. */
  slice?: number;
  /** Milliseconds between the pieces of a slice. */
  sliceDelay?: number;
  /** Send a TCP reset (RST) once this many bytes have been forwarded. */
  resetAfter?: number;
  /** Close cleanly (FIN) once this many bytes have been forwarded. */
  closeAfter?: number;
  /** Stop forwarding, connection kept open, once this many bytes have been forwarded. */
  stallAfter?: number;
  /** Re-frame each WebSocket data message into frames of at most this many payload bytes. */
  fragment?: number;
  /** Swallow pong frames. */
  dropPongs?: boolean;
  /** Send a ping to the client this often, swallowing the pongs it causes. */
  pingEvery?: number;
  /** Close the client with this code (and reason) after `closeAfterMessages` messages to it. */
  closeWith?: { code: number; reason: string };
  /** Messages to the client before `closeWith` acts. Default 0. */
  closeAfterMessages?: number;
  /** Swallow a close frame and drop the connection instead. */
  dropClose?: boolean;
  /** Seed for every random choice (jitter, which connection). Default: random. */
  seed?: number;
  /** Apply the faults to one connection, picked at random, in every this many. Default 1 (all). */
  every?: number;
}

interface FaultState {
  options: FaultOptions;
  seed: number;
  /** Picks which connection of each block of `every` is faulted. */
  pick: () => number;
  block: number;
  chosen: number;
}

/** The faults on one connection: stopped, with every timer, when it closes. */
interface ConnectionFaults {
  stop(): void;
  stopped: Promise<void>;
  random: () => number;
  /** The 101 has passed: both directions carry frames from here. */
  upgraded: boolean;
  toClient?: WebSocketStage;
  toServer?: WebSocketStage;
  /** Payloads of our own pings still waiting for their pong. */
  pings: string[];
  closeSent: boolean;
  messagesToClient: number;
  /** Resolved once the FIN has passed that way (section 1's markFinished). */
  finished: Record<Direction, PromiseWithResolvers<void>>;
}

// What a stalled direction takes in before its sender waits: about what a
// hung peer's kernel would still accept (Linux's default receive buffer).
const STALL_WINDOW = 128 * 1024;
// A delayed direction keeps at most this many bytes; past it the sender waits.
const DELAY_LINE_LIMIT = 1024 * 1024;
/** The largest --fragment: one fragment is what a fragmenting direction holds. */
export const MAX_FRAGMENT = 1024 * 1024;
// Our pings carry this text and a number, so their pongs are recognised.
const PING_PREFIX = "wire.ts ping ";

function newFaultState(options: FaultOptions): FaultState {
  const seed = options.seed ?? crypto.getRandomValues(new Uint32Array(1))[0];
  return { options, seed, pick: seededRandom(seed), block: -1, chosen: 0 };
}

// mulberry32: a small PRNG whose sequence depends only on its seed, so a run
// with the same --seed makes the same choices.
function seededRandom(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function fault(
  state: WireState,
  conn: Connection,
  dir: Direction,
  name: string,
  fields: Record<string, unknown> = {},
): void {
  emit(state, conn, dir, "fault", { name, ...fields });
}

// One connection in every K, a different one in each block of K, chosen by
// the seeded generator in the order connections arrive.
function connectionIsFaulted(state: WireState, faults: FaultState, conn: Connection): boolean {
  const every = faults.options.every ?? 1;
  if (every <= 1) return true;
  const block = Math.floor((conn.id - 1) / every);
  if (block !== faults.block) {
    faults.block = block;
    faults.chosen = Math.floor(faults.pick() * every);
  }
  if ((conn.id - 1) % every !== faults.chosen) return false;
  emit(state, conn, undefined, "fault", {
    name: "faults-every",
    every,
    pick: faults.chosen + 1,
  });
  return true;
}

function faultySinks(
  state: WireState,
  conn: Connection,
  toServer: Sink,
  toClient: Sink,
): [Sink, Sink] {
  const faults = state.faults!;
  if (!connectionIsFaulted(state, faults, conn)) return [toServer, toClient];
  const { options } = faults;
  const stop = Promise.withResolvers<void>();
  let stopped = false;
  conn.faults = {
    stop: () => {
      if (!stopped) stop.resolve();
      stopped = true;
    },
    stopped: stop.promise,
    // Each connection its own sequence: concurrent connections cannot
    // change each other's choices.
    random: seededRandom(faults.seed ^ Math.imul(conn.id, 0x9e3779b9)),
    upgraded: false,
    pings: [],
    closeSent: false,
    messagesToClient: 0,
    finished: { c2s: Promise.withResolvers(), s2c: Promise.withResolvers() },
  };
  const to = options.to ?? "both";
  const server = to !== "client", client = to !== "server";
  if (server) toServer = tcpFaultStage(state, conn, "c2s", toServer);
  if (client) toClient = tcpFaultStage(state, conn, "s2c", toClient);
  // Pings and the close act on both directions, whatever --faults-to says.
  const both = options.pingEvery !== undefined || options.closeWith !== undefined;
  const frameFaults = options.fragment !== undefined || options.dropPongs || options.dropClose;
  if (both || (server && frameFaults)) {
    conn.faults.toServer = webSocketStage(state, conn, "c2s", toServer, server);
    toServer = conn.faults.toServer.sink;
  }
  // The direction to the client is where the 101 is seen, so it is always
  // watched once any frame fault is on, faulted or not.
  if (both || frameFaults) {
    conn.faults.toClient = webSocketStage(state, conn, "s2c", toClient, client);
    toClient = conn.faults.toClient.sink;
  }
  return [toServer, toClient];
}

function sleep(ms: number, faults: ConnectionFaults): Promise<void> {
  if (ms <= 0) return Promise.resolve();
  let timer: ReturnType<typeof setTimeout> | undefined;
  return Promise.race([
    new Promise<void>((resolve) => timer = setTimeout(resolve, ms)),
    faults.stopped,
  ]).finally(() => clearTimeout(timer));
}

// ------------------------------------------------ 6a. TCP-level faults
//
// Bytes pass in order through: the stall (--stall-after), the delay line
// (--latency, --jitter), the byte counter (--reset-after, --close-after),
// then the pacer (--bandwidth, --slice). Counts are bytes forwarded in this
// direction. The stall comes first so that it is decided as the bytes are
// read: section 1 then shows only what will pass, and knows whether to pass
// a FIN on, even while the bytes before the stall wait in the delay line.

function tcpFaultStage(state: WireState, conn: Connection, dir: Direction, to: Sink): Sink {
  const options = state.faults!.options;
  const faults = conn.faults!;
  const limits = [
    ["reset-after", options.resetAfter],
    ["close-after", options.closeAfter],
  ].filter(([, after]) => after !== undefined) as [string, number][];
  const paced = options.bandwidth !== undefined || options.slice !== undefined;
  const delayed = options.latency || options.jitter;
  if (!limits.length && !paced && !delayed && options.stallAfter === undefined) return to;
  let forwarded = 0;
  let tripped = false;
  let nextFree = 0;

  async function pace(bytes: Uint8Array): Promise<void> {
    if (!paced) return to.write(bytes);
    const perTenth = options.bandwidth !== undefined
      ? Math.max(1, Math.floor(options.bandwidth / 10))
      : Infinity;
    const size = Math.min(options.slice ?? Infinity, perTenth);
    const pieces = Math.ceil(bytes.length / size);
    if (options.slice !== undefined && pieces > 1) {
      fault(state, conn, dir, "slice", { bytes: bytes.length, pieces });
    }
    if (options.bandwidth !== undefined) {
      fault(state, conn, dir, "bandwidth", { bytes: bytes.length, pieces });
    }
    for (let offset = 0; offset < bytes.length; offset += size) {
      if (offset > 0 && options.sliceDelay) await sleep(options.sliceDelay, faults);
      if (conn.closing) return;
      const piece = bytes.subarray(offset, offset + size);
      if (options.bandwidth !== undefined) {
        await sleep(nextFree - performance.now(), faults);
        nextFree = Math.max(nextFree, performance.now()) + piece.length * 1000 / options.bandwidth;
      }
      await to.write(piece);
    }
  }

  async function count(bytes: Uint8Array): Promise<void> {
    if (tripped) return faults.stopped;
    const hit = limits.filter(([, after]) => forwarded + bytes.length >= after)
      .sort((a, b) => a[1] - b[1])[0];
    if (!hit) {
      forwarded += bytes.length;
      return pace(bytes);
    }
    const [name, after] = hit;
    if (after > forwarded) await pace(bytes.subarray(0, after - forwarded));
    tripped = true;
    fault(state, conn, dir, name, { bytes: after });
    endByFault(conn, dir, name);
    forwarded = after;
  }

  // After a reset or a close the connection is going, and nothing waits on
  // this direction.
  function closeWrite(): Promise<void> {
    return tripped ? faults.stopped : to.closeWrite();
  }

  let sink: Sink = { write: count, closeWrite };
  if (delayed) sink = delayLine(state, conn, dir, sink);
  if (options.stallAfter !== undefined) sink = stallStage(state, conn, dir, sink);
  return sink;
}

// --reset-after sends the receiver a RST (and closes the sender's side);
// --close-after a FIN to the receiver, then closes.
function endByFault(conn: Connection, dir: Direction, name: string): void {
  const receiver = dir === "c2s" ? conn.server! : conn.client;
  if (name === "reset-after") receiver.reset?.();
  else receiver.closeWrite().catch(() => {});
  abortConnection(conn);
}

// A stall means "stop forwarding this direction, keep the connection open",
// as a peer that hangs: it stops reading, but its kernel still takes in up to
// a receive buffer's worth. So what the sender still sends is read and thrown
// away (counted: the close event's `discarded_*`) up to STALL_WINDOW; past
// it, reading waits, and the sender's writes block (backpressure), until the
// other direction's FIN has passed. From then on all of it is read and
// discarded, so that its own FIN or reset is seen: the connection ends, and
// is reported, like any other. Its FIN is swallowed (section 1's passFin).
function stallStage(state: WireState, conn: Connection, dir: Direction, to: Sink): Sink {
  const after = state.faults!.options.stallAfter!;
  const faults = conn.faults!;
  let forwarded = 0;
  return {
    async write(bytes) {
      const discarded = conn.discarded[dir];
      if (discarded !== undefined) {
        if (discarded >= STALL_WINDOW) {
          const other = dir === "c2s" ? "s2c" : "c2s";
          await Promise.race([faults.finished[other].promise, faults.stopped]);
        }
        conn.discarded[dir] = conn.discarded[dir]! + bytes.length;
        return;
      }
      if (forwarded + bytes.length < after) {
        forwarded += bytes.length;
        return await to.write(bytes);
      }
      const passing = after - forwarded;
      forwarded = after;
      // Decided before anything is awaited: the caller sees the stall at once.
      conn.discarded[dir] = bytes.length - passing;
      fault(state, conn, dir, "stall-after", { bytes: after });
      if (passing > 0) await to.write(bytes.subarray(0, passing));
    },
    closeWrite() {
      return conn.discarded[dir] !== undefined ? Promise.resolve() : to.closeWrite();
    },
  };
}

// Each chunk is copied (the read buffer is reused) and written once its time
// comes; a FIN waits its turn behind the bytes. Delays never reorder: a
// chunk's time is never before the one ahead of it.
function delayLine(state: WireState, conn: Connection, dir: Direction, to: Sink): Sink {
  const options = state.faults!.options;
  const faults = conn.faults!;
  const queue: { bytes?: Uint8Array; due: number }[] = [];
  let queued = 0;
  let lastDue = 0;
  let running: Promise<void> | undefined;
  let roomFor: PromiseWithResolvers<void> | undefined;

  async function run(): Promise<void> {
    try {
      while (queue.length && !conn.closing) {
        const item = queue[0];
        await sleep(item.due - performance.now(), faults);
        if (conn.closing) break;
        if (item.bytes) await to.write(item.bytes);
        else await to.closeWrite();
        queue.shift();
        queued -= item.bytes?.length ?? 0;
        if (queued <= DELAY_LINE_LIMIT) roomFor?.resolve();
      }
    } catch (error) {
      sideFailed(state, conn, dir, dir === "c2s" ? "server" : "client", error);
    } finally {
      running = undefined;
      roomFor?.resolve();
    }
  }

  function enqueue(bytes?: Uint8Array): void {
    const jitter = options.jitter ? Math.floor(conn.faults!.random() * (options.jitter + 1)) : 0;
    const delay = (options.latency ?? 0) + jitter;
    lastDue = Math.max(performance.now() + delay, lastDue);
    queue.push({ bytes, due: lastDue });
    fault(state, conn, dir, "latency", {
      delay_ms: delay,
      ...(options.jitter ? { jitter_ms: jitter } : {}),
      ...(bytes ? { bytes: bytes.length } : {}),
    });
    running ??= run();
  }

  return {
    async write(bytes) {
      queued += bytes.length;
      enqueue(bytes.slice());
      while (queued > DELAY_LINE_LIMIT && running && !conn.closing) {
        roomFor = Promise.withResolvers();
        await roomFor.promise;
      }
    },
    async closeWrite() {
      enqueue();
      await running;
    },
  };
}

// ------------------------------------------ 6b. WebSocket-level faults
//
// After the 101, each direction is parsed into frames a second time, on the
// forwarding side (section 4's decoder only watches). A frame is passed on
// as it arrives unless a fault wants it: a control frame (at most 125 bytes)
// is held whole, so it can be dropped; a data frame under --fragment is
// unmasked and cut into frames of at most that many payload bytes (the first
// keeps the opcode and RSV bits, the rest are continuations, FIN only on the
// last). Our own frames (pings, closes) go in only between whole frames.

interface WebSocketStage {
  sink: Sink;
  /** Sends a frame of our own, between the frames that pass. */
  inject(frame: Uint8Array): void;
  /** The other direction saw the 101: frames from here. */
  upgraded(): void;
  /** Swallow every frame from the next one on (after our close). */
  drop(): void;
}

function webSocketStage(
  state: WireState,
  conn: Connection,
  dir: Direction,
  to: Sink,
  faulted: boolean,
): WebSocketStage {
  const options = state.faults!.options;
  const faults = conn.faults!;
  const fromClient = dir === "c2s";
  // s2c: the response head, scanned for a 101; c2s: bytes before the 101.
  let phase: "head" | "frames" | "pass" = "head";
  const head = new Uint8Array(MAX_HTTP_HEAD);
  let headLength = 0;
  const header = new Uint8Array(14);
  let headerFill = 0, headerNeed = 2;
  let inFrame = false;
  let remaining = 0, position = 0;
  let action: "pass" | "hold" | "fragment" | "drop" = "pass";
  let opcode = 0, fin = true, rsv = 0;
  const mask = new Uint8Array(4);
  let masked = false;
  let held: Uint8Array | undefined;
  let heldFill = 0;
  let piece: Uint8Array | undefined;
  let pieceFill = 0, pieces = 0;
  let firstPiece = true;
  let dropping = false;
  let outputs: Uint8Array[] = [];
  let pending: Uint8Array[] = [];
  let chain = Promise.resolve();

  function send(bytes: Uint8Array[]): Promise<void> {
    for (const b of bytes) chain = chain.then(() => conn.closing ? undefined : to.write(b));
    const done = chain;
    chain = chain.catch(() => {});
    return done;
  }

  function atBoundary(): boolean {
    return phase !== "frames" || !inFrame || action !== "pass";
  }

  function flushPending(): void {
    if (pending.length && (phase !== "frames" || !inFrame || action !== "pass")) {
      outputs.push(...pending);
      pending = [];
    }
  }

  function startFrame(): void {
    fin = (header[0] & 0x80) !== 0;
    rsv = (header[0] >> 4) & 7;
    opcode = header[0] & 0x0f;
    masked = (header[1] & 0x80) !== 0;
    const length7 = header[1] & 0x7f;
    remaining = length7 === 126
      ? (header[2] << 8) | header[3]
      : length7 === 127
      ? (((header[6] << 24) >>> 0) + (header[7] << 16) + (header[8] << 8) + header[9]) +
        Math.min(
            ((header[2] << 24) >>> 0) + (header[3] << 16) + (header[4] << 8) + header[5],
            0x1fffff,
          ) * 2 ** 32
      : length7;
    if (masked) mask.set(header.subarray(headerNeed - 4, headerNeed));
    else mask.fill(0);
    position = 0;
    inFrame = true;
    const control = opcode >= 8;
    if (dropping) action = "drop";
    else if (control && remaining <= MAX_CONTROL_PAYLOAD) {
      action = "hold";
      held = new Uint8Array(headerNeed + remaining);
      held.set(header.subarray(0, headerNeed));
      heldFill = headerNeed;
    } else if (!control && opcode <= 2 && faulted && options.fragment !== undefined) {
      action = "fragment";
      if (opcode !== 0) firstPiece = true;
      piece ??= new Uint8Array(options.fragment);
      pieceFill = 0;
      pieces = 0;
      fragmentStart = true;
    } else {
      action = "pass";
      outputs.push(header.slice(0, headerNeed));
    }
  }

  let fragmentStart = true;
  function emitPiece(last: boolean): void {
    const payload = piece!.slice(0, pieceFill);
    const pieceOpcode = fragmentStart && firstPiece ? opcode : 0;
    const pieceRsv = fragmentStart && firstPiece ? rsv : 0;
    outputs.push(encodeFrame({
      fin: last && fin,
      rsv: pieceRsv,
      opcode: pieceOpcode,
      payload,
      masked: fromClient,
    }));
    if (fragmentStart && firstPiece) firstPiece = false;
    fragmentStart = false;
    pieceFill = 0;
    pieces++;
  }

  function payload(bytes: Uint8Array, from: number, count: number): void {
    if (action === "pass") outputs.push(bytes.subarray(from, from + count));
    else if (action === "hold") {
      held!.set(bytes.subarray(from, from + count), heldFill);
      heldFill += count;
    } else if (action === "fragment") {
      const size = piece!.length;
      for (let i = 0; i < count;) {
        const n = Math.min(count - i, size - pieceFill);
        for (let k = 0; k < n; k++) {
          piece![pieceFill + k] = bytes[from + i + k] ^ mask[(position + i + k) & 3];
        }
        pieceFill += n;
        i += n;
        // More of this frame to come (here or in a later chunk): not its last piece.
        if (pieceFill === size && count - i + remaining > 0) emitPiece(false);
      }
    }
    position += count;
  }

  function endFrame(): void {
    inFrame = false;
    headerFill = 0;
    headerNeed = 2;
    if (action === "fragment") {
      emitPiece(true);
      if (pieces > 1) {
        fault(state, conn, dir, "fragment", { bytes: position, frames: pieces });
      }
    } else if (action === "hold") heldFrame(held!);
    held = undefined;
    if (!dropping && opcode <= 2 && fin && dir === "s2c") messageToClient();
    flushPending();
  }

  // A whole control frame: passed on, or swallowed by a fault.
  function heldFrame(frame: Uint8Array): void {
    const body = frame.subarray(frame.length - position);
    const unmasked = body.map((byte, i) => byte ^ mask[i & 3]);
    if (opcode === 10 && fromClient && answersOurPing(unmasked)) {
      fault(state, conn, dir, "ping-every", { text: lenientDecoder.decode(unmasked) });
      return;
    }
    if (opcode === 10 && faulted && options.dropPongs) {
      fault(state, conn, dir, "drop-pongs", { bytes: unmasked.length });
      return;
    }
    if (opcode === 8 && faulted && options.dropClose) {
      const fields: Record<string, unknown> = {};
      if (unmasked.length >= 2) fields.code = (unmasked[0] << 8) | unmasked[1];
      fault(state, conn, dir, "drop-close", fields);
      dropping = true;
      queueMicrotask(() => abortConnection(conn));
      return;
    }
    outputs.push(frame);
  }

  function answersOurPing(payload: Uint8Array): boolean {
    const text = lenientDecoder.decode(payload);
    const at = faults.pings.indexOf(text);
    if (at === -1) return false;
    faults.pings.splice(at, 1);
    return true;
  }

  function messageToClient(): void {
    if (options.closeWith === undefined || faults.closeSent) return;
    faults.messagesToClient++;
    if (faults.messagesToClient >= (options.closeAfterMessages ?? 0)) {
      queueMicrotask(() => sendCloses(state, conn));
    }
  }

  function frames(bytes: Uint8Array, from: number): void {
    let i = from;
    while (i < bytes.length) {
      if (!inFrame) {
        header[headerFill++] = bytes[i++];
        if (headerFill === 2) {
          const length7 = header[1] & 0x7f;
          headerNeed = 2 + (length7 === 126 ? 2 : length7 === 127 ? 8 : 0) +
            ((header[1] & 0x80) !== 0 ? 4 : 0);
        }
        if (headerFill === headerNeed) {
          startFrame();
          if (remaining === 0) endFrame();
        }
        continue;
      }
      const n = Math.min(remaining, bytes.length - i);
      remaining -= n;
      payload(bytes, i, n);
      i += n;
      if (remaining === 0) endFrame();
    }
    // A header cut by the chunk's end is held back; nothing else is.
  }

  // s2c: the response head passes as it comes; after a 101 for a WebSocket,
  // what follows it is frames. Any other answer: this stage steps aside.
  function scanHead(bytes: Uint8Array): number {
    const taken = Math.min(bytes.length, head.length - headLength);
    head.set(bytes.subarray(0, taken), headLength);
    const before = headLength;
    headLength += taken;
    const end = indexOfBlankLine(head, Math.max(0, before - 3), headLength);
    if (end === -1) {
      if (headLength === head.length) phase = "pass";
      return bytes.length;
    }
    const text = lenientDecoder.decode(head.subarray(0, end));
    if (/^HTTP\/1\.1 101 /.test(text) && /\r\nupgrade:\s*websocket/i.test(text)) {
      phase = "frames";
      faults.upgraded = true;
      if (conn.faults!.toServer) conn.faults!.toServer.upgraded();
      upgradedHere();
    } else {
      phase = "pass";
    }
    return end + 4 - before;
  }

  let pingTimer: ReturnType<typeof setInterval> | undefined;
  let pingCount = 0;
  function upgradedHere(): void {
    if (dir !== "s2c") return;
    if (options.pingEvery !== undefined) {
      pingTimer = setInterval(() => {
        // A stalled direction passes nothing, our own pings included.
        if (conn.discarded[dir] !== undefined) return;
        const text = `${PING_PREFIX}${++pingCount}`;
        if (faults.pings.length >= 16) faults.pings.shift();
        faults.pings.push(text);
        fault(state, conn, dir, "ping-every", { text });
        inject(
          encodeFrame({
            fin: true,
            rsv: 0,
            opcode: 9,
            payload: encoder.encode(text),
            masked: false,
          }),
        );
      }, options.pingEvery);
      faults.stopped.then(() => clearInterval(pingTimer));
    }
    if (options.closeWith !== undefined && (options.closeAfterMessages ?? 0) === 0) {
      queueMicrotask(() => sendCloses(state, conn));
    }
  }

  function inject(frame: Uint8Array): void {
    if (conn.closing) return;
    if (atBoundary()) send([frame]).catch(() => {});
    else pending.push(frame);
  }

  const sink: Sink = {
    write(bytes) {
      outputs = [];
      if (phase === "head" && dir === "c2s") {
        if (faults.upgraded) phase = "frames";
        else return to.write(bytes);
      }
      if (phase === "head") {
        const used = scanHead(bytes);
        outputs.push(bytes.subarray(0, used));
        if (faults.upgraded) frames(bytes, used);
        else if (used < bytes.length) outputs.push(bytes.subarray(used));
      } else if (phase === "frames") {
        frames(bytes, 0);
      } else {
        outputs.push(bytes);
      }
      return send(outputs);
    },
    closeWrite: () => chain.then(() => to.closeWrite()),
  };
  return {
    sink,
    inject,
    upgraded: () => {
      if (phase === "head") phase = "frames";
    },
    drop: () => {
      dropping = true;
      if (inFrame && action === "fragment") action = "drop";
    },
  };
}

// --close-with: the client gets our close as if the server sent it, the
// server a close 1000 from us; what either sends after that is swallowed,
// and the server's FIN ends the connection as usual.
function sendCloses(state: WireState, conn: Connection): void {
  const faults = conn.faults!;
  const closeWith = state.faults!.options.closeWith!;
  if (faults.closeSent || conn.closing) return;
  faults.closeSent = true;
  fault(state, conn, "s2c", "close-with", { code: closeWith.code, reason: closeWith.reason });
  faults.toClient!.inject(closePayloadFrame(closeWith.code, closeWith.reason, false));
  faults.toServer!.inject(closePayloadFrame(1000, "", true));
  faults.toClient!.drop();
  faults.toServer!.drop();
}

function closePayloadFrame(code: number, reason: string, masked: boolean): Uint8Array {
  const text = encoder.encode(reason);
  const payload = new Uint8Array(2 + text.length);
  payload[0] = code >> 8;
  payload[1] = code & 0xff;
  payload.set(text, 2);
  return encodeFrame({ fin: true, rsv: 0, opcode: 8, payload, masked });
}

/** One frame's bytes; a masked one gets a fresh random key (RFC 6455 section 5.3). */
function encodeFrame(
  frame: { fin: boolean; rsv: number; opcode: number; payload: Uint8Array; masked: boolean },
): Uint8Array {
  const { payload } = frame;
  const length = payload.length;
  const extended = length < 126 ? 0 : length < 65536 ? 2 : 8;
  const headerLength = 2 + extended + (frame.masked ? 4 : 0);
  const bytes = new Uint8Array(headerLength + length);
  bytes[0] = (frame.fin ? 0x80 : 0) | (frame.rsv << 4) | frame.opcode;
  const maskBit = frame.masked ? 0x80 : 0;
  if (extended === 0) bytes[1] = maskBit | length;
  else if (extended === 2) {
    bytes[1] = maskBit | 126;
    bytes[2] = length >> 8;
    bytes[3] = length & 0xff;
  } else {
    bytes[1] = maskBit | 127;
    new DataView(bytes.buffer).setBigUint64(2, BigInt(length));
  }
  if (!frame.masked) {
    bytes.set(payload, headerLength);
    return bytes;
  }
  const key = crypto.getRandomValues(new Uint8Array(4));
  bytes.set(key, headerLength - 4);
  for (let i = 0; i < length; i++) bytes[headerLength + i] = payload[i] ^ key[i & 3];
  return bytes;
}

// ---------------------------------------------- 6c. sockets that can reset
//
// A TCP reset is an RST segment: the peer's next read fails with
// ECONNRESET instead of ending cleanly. Deno.TcpConn cannot send one (no
// SO_LINGER); node:net's socket.resetAndDestroy() can, on Deno 2.9.6. So with
// --reset-after, the proxy's sockets are node:net sockets, behind the same
// small interface the forwarding loops use.

function nodeError(error: Error & { code?: string }): Error {
  if (error.code === "ECONNRESET") return new Deno.errors.ConnectionReset(error.message);
  if (error.code === "EPIPE") return new Deno.errors.BrokenPipe(error.message);
  if (error.code === "ECONNREFUSED") return new Deno.errors.ConnectionRefused(error.message);
  return error;
}

// Reads take one node chunk at a time, the socket paused in between: the
// same backpressure as Deno's read loop, at most one chunk in memory.
function nodeSocket(socket: net.Socket): ProxySocket {
  let chunk: Uint8Array | undefined;
  let offset = 0;
  let ended = false;
  let failure: Error | undefined;
  let wake: (() => void) | undefined;
  socket.pause();
  socket.on("data", (data: Uint8Array) => {
    chunk = data;
    offset = 0;
    socket.pause();
    wake?.();
  });
  socket.on("end", () => {
    ended = true;
    wake?.();
  });
  socket.on("error", (error) => {
    failure = nodeError(error);
    wake?.();
  });
  socket.on("close", () => {
    ended = true;
    wake?.();
  });
  return {
    async read(buffer) {
      while (!chunk) {
        if (failure) throw failure;
        if (ended) return null;
        socket.resume();
        await new Promise<void>((resolve) => wake = resolve);
        wake = undefined;
      }
      const n = Math.min(buffer.length, chunk.length - offset);
      buffer.set(chunk.subarray(offset, offset + n));
      offset += n;
      if (offset === chunk.length) chunk = undefined;
      return n;
    },
    write(bytes) {
      return new Promise((resolve, reject) => {
        if (failure) return reject(failure);
        if (socket.destroyed || !socket.writable) {
          return reject(new Deno.errors.BrokenPipe("socket closed"));
        }
        if (bytes.length === 0) return resolve(0);
        socket.write(bytes, (error) => error ? reject(nodeError(error)) : resolve(bytes.length));
      });
    },
    closeWrite() {
      socket.end();
      return Promise.resolve();
    },
    close: () => socket.destroy(),
    setNoDelay: () => socket.setNoDelay(true),
    get remoteAddr(): Deno.NetAddr {
      return {
        transport: "tcp",
        hostname: socket.remoteAddress ?? "",
        port: socket.remotePort ?? 0,
      };
    },
    reset: () => socket.resetAndDestroy(),
  };
}

function connectNode(
  target: { hostname: string; port: number },
  signal: AbortSignal,
): Promise<ProxySocket> {
  return new Promise((resolve, reject) => {
    const socket = net.connect({ host: target.hostname, port: target.port, allowHalfOpen: true });
    const abort = () => {
      socket.destroy();
      reject(new Deno.errors.Interrupted("aborted"));
    };
    signal.addEventListener("abort", abort, { once: true });
    socket.once("connect", () => {
      signal.removeEventListener("abort", abort);
      resolve(nodeSocket(socket));
    });
    socket.once("error", (error) => {
      signal.removeEventListener("abort", abort);
      reject(nodeError(error));
    });
  });
}

/** What the accept loop needs of a listener. */
interface ProxyListener {
  accept(): Promise<ProxySocket>;
  close(): void;
}

function listenNode(
  hostname: string,
  port: number,
): { listener: ProxyListener; ready: Promise<Deno.NetAddr> } {
  const waiting: net.Socket[] = [];
  let wake: (() => void) | undefined;
  let closed = false;
  const server = net.createServer({ allowHalfOpen: true }, (socket) => {
    waiting.push(socket);
    wake?.();
  });
  const ready = new Promise<Deno.NetAddr>((resolve, reject) => {
    server.once("error", (error) => reject(nodeError(error)));
    server.listen(port, hostname, () => {
      const address = server.address() as net.AddressInfo;
      resolve({ transport: "tcp", hostname: address.address, port: address.port });
    });
  });
  return {
    ready,
    listener: {
      async accept() {
        while (!waiting.length) {
          if (closed) throw new Deno.errors.BadResource("listener closed");
          await new Promise<void>((resolve) => wake = resolve);
        }
        return nodeSocket(waiting.shift()!);
      },
      close() {
        closed = true;
        server.close();
        for (const socket of waiting.splice(0)) socket.destroy();
        wake?.();
      },
    },
  };
}

// ------------------------------------------------------------------ output
//
// Every event goes through emit(); the CLI turns it into a human line or a
// JSON line. Human lines escape whatever a peer chose (escapeControls): a
// payload with "\r" or ESC must not rewrite the operator's terminal.

function emit(
  state: WireState,
  conn: Connection,
  dir: Direction | undefined,
  type: EventType,
  fields: Record<string, unknown>,
): void {
  if (!state.onEvent) return;
  const event: WireEvent = dir === undefined
    ? { conn: conn.id, type, t_ms: round(performance.now() - conn.start), ...fields }
    : { conn: conn.id, dir, type, t_ms: round(performance.now() - conn.start), ...fields };
  state.onEvent(event);
}

/** Options for {@linkcode formatEvent}. */
export interface FormatOptions {
  /** ANSI colours (only for a terminal). Default false. */
  color?: boolean;
}

const COLORS = {
  dim: "\x1b[2m",
  c2s: "\x1b[36m",
  s2c: "\x1b[35m",
  bold: "\x1b[1m",
  error: "\x1b[31m",
  ok: "\x1b[32m",
  reset: "\x1b[0m",
};

/**
 * One event as the human view shows it: the connection, the time since it
 * opened, the direction, and what happened, with peer-chosen text escaped.
 * An HTTP head adds one indented line per header.
 *
 * @example
 * ```ts
 * formatEvent({ conn: 1, dir: "c2s", type: "data", t_ms: 1.5, bytes: 6, text: "hello\n", truncated: false, newlines: 1 });
 * // '#1      +1.5ms  c→s  data   6 B  "hello\\n"  (1 newline)'
 * ```
 */
export function formatEvent(event: WireEvent, options: FormatOptions = {}): string {
  const paint = (color: keyof typeof COLORS, text: string) =>
    options.color ? `${COLORS[color]}${text}${COLORS.reset}` : text;
  const arrow = event.dir === "c2s"
    ? paint("c2s", "c→s")
    : event.dir === "s2c"
    ? paint("s2c", "s→c")
    : "───";
  const prefix = `${paint("bold", `#${event.conn}`.padEnd(4))} ${
    paint("dim", `+${event.t_ms.toFixed(1)}ms`.padStart(9))
  }  ${arrow}  `;
  const indent = " ".repeat(4 + 1 + 9 + 2 + 3 + 2 + 7);
  const body = describe(event, paint);
  const [first, ...more] = body;
  return [prefix + first, ...more.map((line) => indent + line)].join("\n");
}

function describe(
  event: WireEvent,
  paint: (color: keyof typeof COLORS, text: string) => string,
): string[] {
  const e = event as Record<string, unknown>;
  const tag = (name: string) => paint("bold", name.padEnd(6));
  const errors = ((e.errors ?? []) as string[]).map((error) =>
    paint("error", `✗ protocol error: ${error}`)
  );
  switch (event.type) {
    case "open":
      return [`${tag("open")} client ${e.client} → server ${e.server}`];
    case "data": {
      if (e.text === undefined && e.hex === undefined) {
        return [`${tag("data")} ${e.bytes} B (encrypted)`];
      }
      const newlines = e.newlines ? `  (${e.newlines} newline${e.newlines === 1 ? "" : "s"})` : "";
      return [`${tag("data")} ${e.bytes} B  ${shownPayload(e)}${newlines}`];
    }
    case "http": {
      const lines = [`${tag("http")} ${escapeControls(String(e.start))}`];
      for (const [name, value] of Object.entries(e.headers as Record<string, string>)) {
        lines.push(paint("dim", `${escapeControls(name)}: ${escapeControls(value)}`));
      }
      if (e.accept_expected !== undefined) {
        lines.push(
          e.accept_ok
            ? paint("ok", `✓ Sec-WebSocket-Accept is base64(SHA-1(key + "${WEBSOCKET_GUID}"))`)
            : paint(
              "error",
              `✗ Sec-WebSocket-Accept should be ${e.accept_expected}, got ${
                escapeControls(String(e.accept))
              }`,
            ),
        );
        lines.push("from here on, both directions carry WebSocket frames");
      }
      return lines;
    }
    case "frame": {
      const parts = [
        `${tag("frame")} ${String(e.name).padEnd(6)}`,
        e.fin ? "FIN" : "fin=0",
        e.rsv ? `rsv=${Number(e.rsv).toString(2).padStart(3, "0")}` : "",
        e.masked ? `mask ${e.mask}` : "unmasked",
        `len ${e.length} (${e.length_encoding}-bit)`,
        `header ${e.header_bytes} B`,
      ];
      if (e.code !== undefined) {
        parts.push(`code ${e.code} ${e.meaning}`, `reason "${escapeControls(String(e.reason))}"`);
      } else if (e.text !== undefined || e.hex !== undefined) {
        if (e.length) parts.push(shownPayload(e));
      }
      if (e.message !== undefined && !(e.fragment === 1 && e.fin)) {
        parts.push(
          `message ${e.message} part ${e.fragment}${e.message_complete ? ", complete" : ""}`,
        );
      }
      return [parts.filter(Boolean).join("  "), ...errors];
    }
    case "tls":
      return [
        `${tag("tls")} a TLS handshake${
          e.version ? ` (record version ${e.version})` : ""
        }: the rest is encrypted, shown as byte counts`,
      ];
    case "fault":
      return [paint("error", `${tag("fault")} ${describeFault(e)}`)];
    case "fin":
      return [
        `${tag("fin")} ${
          event.dir === "c2s" ? "client" : "server"
        } finished sending (FIN); passed on as a half-close`,
      ];
    case "reset":
      return [
        paint("error", `${tag("reset")} the ${e.side} reset the connection; the other side closed`),
      ];
    case "error":
      return [paint("error", `${tag("error")} ${escapeControls(String(e.message))}`)];
    case "close": {
      let line = `${tag("close")} after ${e.duration_ms} ms: c→s ${e.bytes_c2s} B${
        discardedNote(e.discarded_c2s)
      }, s→c ${e.bytes_s2c} B${discardedNote(e.discarded_s2c)}`;
      if (e.frames_c2s !== undefined) {
        line +=
          `; frames ${e.frames_c2s}/${e.frames_s2c}, messages ${e.messages_c2s}/${e.messages_s2c}` +
          `, payload ${e.payload_c2s}/${e.payload_s2c} B (the rest is HTTP and frame headers)`;
      }
      return [line];
    }
  }
}

function discardedNote(discarded: unknown): string {
  return discarded === undefined ? "" : ` (${discarded} B of it discarded by the stall)`;
}

// What a fault did, in words, with the choices it made.
function describeFault(e: Record<string, unknown>): string {
  switch (e.name) {
    case "latency":
      return `held ${e.bytes === undefined ? "the FIN" : `${e.bytes} B`} for ${e.delay_ms} ms${
        e.jitter_ms !== undefined ? ` (${e.jitter_ms} ms of it jitter)` : ""
      }`;
    case "slice":
      return `${e.bytes} B sent as ${e.pieces} separate writes`;
    case "bandwidth":
      return `${e.bytes} B paced to the bandwidth limit, in ${e.pieces} writes`;
    case "reset-after":
      return `${e.bytes} B forwarded: reset (RST) sent, connection dropped`;
    case "close-after":
      return `${e.bytes} B forwarded: closed (FIN)`;
    case "stall-after":
      return `${e.bytes} B forwarded: stalled, nothing more passes this way ` +
        `(what still comes is discarded, then held back; the connection stays open)`;
    case "fragment":
      return `a ${e.bytes}-byte frame re-framed as ${e.frames} frames`;
    case "drop-pongs":
      return `a pong (${e.bytes} B) swallowed`;
    case "ping-every":
      return `ping "${escapeControls(String(e.text))}" (ours; its pong is swallowed)`;
    case "close-with":
      return `close ${e.code} "${escapeControls(String(e.reason))}" sent to the client, ` +
        `close 1000 to the server`;
    case "drop-close":
      return `a close frame${e.code !== undefined ? ` (code ${e.code})` : ""} swallowed; ` +
        `connection dropped instead`;
    case "faults-every":
      return `this connection gets the faults (number ${e.pick} of every ${e.every})`;
    default:
      return String(e.name);
  }
}

function shownPayload(e: Record<string, unknown>): string {
  const more = e.truncated ? "…" : "";
  return e.text !== undefined
    ? `"${escapeControls(String(e.text))}"${more}`
    : `hex ${e.hex}${more}`;
}

function toHex(bytes: Uint8Array): string {
  let hex = "";
  for (const byte of bytes) hex += byte.toString(16).padStart(2, "0");
  return hex;
}

// Anything a peer chose (a payload, a header, a close reason) is escaped
// before it reaches a terminal: no newline can forge a line, no ESC can move
// the cursor, no bidi override can reorder what the operator reads.
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

// ---------------------------------------------------- limits, bookkeeping

function newDirection(dir: Direction): DirectionState {
  return {
    dir,
    mode: "detect",
    headLength: 0,
    startChecked: 0,
    startPhase: dir === "c2s" ? "method" : "line",
    bodyRemaining: 0,
    frameCount: 0,
    messageCount: 0,
    payloadBytes: 0,
  };
}

function newConnection(state: WireState, client: ProxySocket): Connection {
  const remote = client.remoteAddr as Deno.NetAddr;
  return {
    id: ++state.count,
    start: performance.now(),
    client,
    clientAddress: `${formatHost(remote.hostname)}:${remote.port}`,
    bytes: { c2s: 0, s2c: 0 },
    c2s: newDirection("c2s"),
    s2c: newDirection("s2c"),
    closing: false,
    finished: { c2s: false, s2c: false },
    discarded: { c2s: undefined, s2c: undefined },
    methods: [],
    websocket: false,
  };
}

function setNoDelay(conn: ProxySocket): void {
  try {
    conn.setNoDelay(true);
  } catch {
    // Already closed: its loop will say so.
  }
}

function closeQuietly(conn: ProxySocket): void {
  try {
    conn.close();
  } catch {
    // Already closed.
  }
}

function connectError(error: unknown, target: string): string {
  if (error instanceof Deno.errors.ConnectionRefused) {
    return "connection refused (is the server running?)";
  }
  if (error instanceof Deno.errors.NotCapable || error instanceof Deno.errors.PermissionDenied) {
    return `permission denied (run with --allow-net=${target})`;
  }
  return errorText(error);
}

function errorText(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

function round(ms: number): number {
  return Math.round(ms * 10) / 10;
}

function formatHost(hostname: string): string {
  return hostname.includes(":") ? `[${hostname}]` : hostname;
}

// ---------------------------------------------------------------- the API

/** Options for {@linkcode startWire}. */
export interface WireOptions {
  /** Address to bind. Default `127.0.0.1` (this machine only). */
  hostname?: string;
  /** Port to bind; `0` picks a free one (read it back from `addr`). Default 9001. */
  port?: number;
  /** The server every connection is forwarded to. */
  to: { hostname: string; port: number };
  /** Payload bytes shown per event. Default 64. */
  preview?: number;
  /** Payload previews as hex even when they are text. Default false. */
  hex?: boolean;
  /** Called with every event, in order per connection. Without it nothing is built (`--quiet`). */
  onEvent?: (event: WireEvent) => void;
  /** Returns a promise while the output is backlogged: forwarding waits for it. */
  waitForOutput?: () => Promise<void> | undefined;
  /** Faults to apply on purpose (section 6). Default none: every byte forwarded unchanged. */
  faults?: FaultOptions;
}

/** A running proxy, returned by {@linkcode startWire}. */
export interface Wire extends AsyncDisposable {
  /** The address actually bound (with the real port when you asked for 0); read it after `ready`. */
  readonly addr: Deno.NetAddr;
  /** Resolves once listening: at once, or (with `faults.resetAfter`, node:net sockets) a moment later. */
  readonly ready: Promise<void>;
  /** Connections open right now. */
  readonly connections: number;
  /** Stop accepting, close every connection (each gets its `close` event), and wait until all are gone. */
  close(): Promise<void>;
}

/**
 * Starts the proxy and returns at once; it forwards every connection to
 * `to` in the background, reporting events to `onEvent`, until `close()`.
 *
 * @example Watch "hello" travel to a TCP echo server
 * ```ts
 * using echo = Deno.listen({ hostname: "127.0.0.1", port: 0 });
 * (async () => { for await (const c of echo) c.readable.pipeTo(c.writable).catch(() => {}); })();
 * const events: WireEvent[] = [];
 * await using wire = startWire({ port: 0, to: echo.addr, onEvent: (e) => events.push(e) });
 * const conn = await Deno.connect({ hostname: "127.0.0.1", port: wire.addr.port });
 * await conn.write(new TextEncoder().encode("hello\n"));
 * await conn.read(new Uint8Array(6));
 * conn.close();
 * // events: open, data c2s "hello\n", data s2c "hello\n", ... close
 * ```
 *
 * @throws {Deno.errors.AddrInUse} when the port is taken.
 * @throws {Deno.errors.NotCapable} without `--allow-net` for the address.
 */
export function startWire(options: WireOptions): Wire {
  const state: WireState = {
    target: { hostname: options.to.hostname, port: options.to.port },
    preview: options.preview ?? DEFAULT_PREVIEW,
    hex: options.hex ?? false,
    onEvent: options.onEvent,
    waitForOutput: options.waitForOutput,
    faults: options.faults ? newFaultState(options.faults) : undefined,
    connections: new Set(),
    tasks: new Set(),
    count: 0,
    closing: false,
  };
  const hostname = options.hostname ?? DEFAULT_HOSTNAME;
  const port = options.port ?? DEFAULT_PORT;
  let listener: ProxyListener, addr: Deno.NetAddr, ready: Promise<void>;
  if (options.faults?.resetAfter !== undefined) {
    const node = listenNode(hostname, port);
    listener = node.listener;
    addr = { transport: "tcp", hostname, port };
    ready = node.ready.then((bound) => void (addr = bound));
  } else {
    const deno = Deno.listen({ hostname, port, transport: "tcp" });
    listener = deno;
    addr = deno.addr;
    ready = Promise.resolve();
  }
  const accepting = acceptLoop(state, listener);
  let closed: Promise<void> | undefined;
  async function close() {
    state.closing = true;
    try {
      listener.close();
    } catch {
      // Already closed.
    }
    await accepting;
    for (const conn of state.connections) abortConnection(conn);
    await Promise.all(state.tasks);
  }
  return {
    get addr() {
      return addr;
    },
    ready,
    get connections() {
      return state.connections.size;
    },
    close: () => closed ??= close(),
    [Symbol.asyncDispose]: () => closed ??= close(),
  };
}

async function acceptLoop(state: WireState, listener: ProxyListener): Promise<void> {
  for (;;) {
    let client: ProxySocket;
    try {
      client = await listener.accept();
    } catch (error) {
      if (state.closing || error instanceof Deno.errors.BadResource) return;
      // Out of file descriptors, say: the connections we have carry on.
      await new Promise((resolve) => setTimeout(resolve, 100));
      continue;
    }
    if (state.closing) {
      closeQuietly(client);
      return;
    }
    // Each connection in its own task; nothing it does can throw out of here.
    const task = serveConnection(state, client).catch(() => {}).finally(() =>
      state.tasks.delete(task)
    );
    state.tasks.add(task);
  }
}

// ---------------------------------------------------------------- command line

const USAGE = `Usage: wire.ts --to HOST:PORT [options]

A TCP proxy that shows what travels between a client and a server: raw TCP
reads, HTTP heads, the WebSocket handshake and every frame, decoded. Forwards
every byte unchanged. Prints "listening on tcp://HOST:PORT", then the events.

Options:
  --to HOST:PORT     the server to forward every connection to (required)
  --host HOST        address to bind (default ${DEFAULT_HOSTNAME}; 0.0.0.0 = every interface)
  --port PORT        port to bind, 0 = any free port (default ${DEFAULT_PORT})
  --json             one JSON object per event and line (the format is in README.md)
  --hex              show payloads as hex, even when they are text
  --preview BYTES    payload bytes shown per event, 0 to ${MAX_PREVIEW} (default ${DEFAULT_PREVIEW})
  --quiet            forward and decode, print nothing after the listening line
  -h, --help         show this help

Faults, on purpose, each reported as a "fault" event (see "Test your own client"):
  --faults-to WHO        client, server or both (default both): which way the faults act
  --latency MS           hold each chunk this long, order kept
  --jitter MS            add a random 0..MS to each delay
  --bandwidth BYTES_PER_S  forward at most this many bytes per second
  --slice BYTES          forward in pieces of at most BYTES, each its own write
  --slice-delay MS       wait this long between the pieces of a slice
  --reset-after BYTES    send a TCP reset (RST) once BYTES have been forwarded
  --close-after BYTES    close cleanly (FIN) once BYTES have been forwarded
  --stall-after BYTES    stop forwarding, connection kept open, after BYTES
  --fragment BYTES       WebSocket: re-frame data messages into frames of at most
                         BYTES payload (1 to ${MAX_FRAGMENT}), control frames whole
  --drop-pongs           WebSocket: swallow pong frames
  --ping-every MS        WebSocket: ping the client this often, swallow its pongs
  --close-with CODE[:REASON]  WebSocket: close the client with this code (the
                         server gets a close 1000) after --close-after-messages
  --close-after-messages N  messages to the client before --close-with (default 0)
  --drop-close           WebSocket: swallow a close frame, drop the connection instead
  --seed N               seed for every random choice (jitter, which connection)
  --faults-every K       apply the faults to one connection in every K (default 1)`;

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

interface CommandLine {
  faults?: FaultOptions;
  hostname: string;
  port: number;
  to: { hostname: string; port: number };
  preview: number;
  hex: boolean;
  json: boolean;
  quiet: boolean;
  help: boolean;
}

function parseCommandLine(args: string[]): CommandLine {
  let parsed;
  try {
    parsed = parseArgs({
      args,
      strict: true,
      options: {
        to: { type: "string" },
        host: { type: "string", default: DEFAULT_HOSTNAME },
        port: { type: "string", default: String(DEFAULT_PORT) },
        json: { type: "boolean", default: false },
        hex: { type: "boolean", default: false },
        preview: { type: "string", default: String(DEFAULT_PREVIEW) },
        quiet: { type: "boolean", default: false },
        help: { type: "boolean", short: "h", default: false },
        "faults-to": { type: "string" },
        latency: { type: "string" },
        jitter: { type: "string" },
        bandwidth: { type: "string" },
        slice: { type: "string" },
        "slice-delay": { type: "string" },
        "reset-after": { type: "string" },
        "close-after": { type: "string" },
        "stall-after": { type: "string" },
        fragment: { type: "string" },
        "drop-pongs": { type: "boolean", default: false },
        "ping-every": { type: "string" },
        "close-with": { type: "string" },
        "close-after-messages": { type: "string" },
        "drop-close": { type: "boolean", default: false },
        seed: { type: "string" },
        "faults-every": { type: "string" },
      },
    }).values;
  } catch (error) {
    throw new UsageError(parseArgsMessage(error as Error));
  }
  const options = {
    hostname: parsed.host,
    port: integerOption("--port", parsed.port, 0, 65535),
    to: { hostname: "", port: 0 },
    preview: integerOption("--preview", parsed.preview, 0, MAX_PREVIEW),
    hex: parsed.hex,
    json: parsed.json,
    quiet: parsed.quiet,
    help: parsed.help,
  };
  if (options.help) return options;
  const faults = faultOptions(parsed);
  if (faults) Object.assign(options, { faults });
  if (parsed.to === undefined) {
    throw new UsageError("--to HOST:PORT is required: the server to forward to");
  }
  options.to = targetOption(parsed.to);
  return options;
}

function faultOptions(
  parsed: Record<string, string | boolean | undefined>,
): FaultOptions | undefined {
  const number = (name: string, min: number, max?: number) => {
    const text = parsed[name];
    return typeof text === "string" ? integerOption(`--${name}`, text, min, max) : undefined;
  };
  const who = parsed["faults-to"];
  if (who !== undefined && who !== "client" && who !== "server" && who !== "both") {
    throw new UsageError(`--faults-to must be client, server or both, got "${who}"`);
  }
  const faults: FaultOptions = {
    to: who as FaultOptions["to"],
    latency: number("latency", 0),
    jitter: number("jitter", 0),
    bandwidth: number("bandwidth", 1),
    slice: number("slice", 1),
    sliceDelay: number("slice-delay", 0),
    resetAfter: number("reset-after", 0),
    closeAfter: number("close-after", 0),
    stallAfter: number("stall-after", 0),
    fragment: number("fragment", 1, MAX_FRAGMENT),
    dropPongs: parsed["drop-pongs"] === true,
    pingEvery: number("ping-every", 1),
    closeWith: typeof parsed["close-with"] === "string"
      ? closeWithOption(parsed["close-with"])
      : undefined,
    closeAfterMessages: number("close-after-messages", 0),
    dropClose: parsed["drop-close"] === true,
    seed: number("seed", 0, 0xffffffff),
    every: number("faults-every", 1),
  };
  if (faults.sliceDelay !== undefined && faults.slice === undefined) {
    throw new UsageError("--slice-delay needs --slice BYTES: the pieces to wait between");
  }
  if (faults.closeAfterMessages !== undefined && faults.closeWith === undefined) {
    throw new UsageError("--close-after-messages needs --close-with CODE[:REASON]");
  }
  const acting = Object.entries(faults).some(([key, value]) =>
    key !== "to" && key !== "seed" && key !== "every" && value !== undefined && value !== false
  );
  if (!acting) {
    if (who !== undefined || faults.seed !== undefined || faults.every !== undefined) {
      throw new UsageError(
        "--faults-to, --seed and --faults-every need a fault to act on (--latency, --slice, ...)",
      );
    }
    return undefined;
  }
  return faults;
}

function closeWithOption(text: string): { code: number; reason: string } {
  const colon = text.indexOf(":");
  const codeText = colon === -1 ? text : text.slice(0, colon);
  const reason = colon === -1 ? "" : text.slice(colon + 1);
  const code = Number(codeText);
  if (!/^\d{4}$/.test(codeText) || !closeCodeMaySend(code)) {
    throw new UsageError(
      `--close-with needs a code a close frame may carry (1000-1003, 1007-1014, 3000-4999), got "${codeText}"`,
    );
  }
  if (encoder.encode(reason).length > MAX_CONTROL_PAYLOAD - 2) {
    throw new UsageError(
      "--close-with's reason must fit a close frame: at most 123 bytes of UTF-8",
    );
  }
  return { code, reason };
}

function targetOption(text: string): { hostname: string; port: number } {
  const match = text.match(/^(?:\[([^\]]+)\]|([^:\s]+)):(\d{1,5})$/);
  const port = Number(match?.[3]);
  if (!match || port < 1 || port > 65535) {
    throw new UsageError(
      `--to must be HOST:PORT with a port from 1 to 65535 (an IPv6 host in brackets), got "${text}"`,
    );
  }
  return { hostname: match[1] ?? match[2], port };
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

// Events are written in batches: while one write to stdout is under way, the
// next lines gather, so a busy proxy makes few large writes instead of one
// per event. Past OUTPUT_BACKLOG_LIMIT, forwarding waits for the writer.
function createOutput(format: (event: WireEvent) => string) {
  let pending: string[] = [];
  let size = 0;
  let writing: Promise<void> | undefined;
  let broken = false;
  async function flush() {
    while (pending.length > 0) {
      const text = pending.join("\n") + "\n";
      pending = [];
      size = 0;
      const bytes = encoder.encode(text);
      try {
        for (let done = 0; done < bytes.length;) {
          done += await Deno.stdout.write(bytes.subarray(done));
        }
      } catch {
        // stdout closed (a pipe to `head`, say): keep forwarding, stop printing.
        pending = [];
        broken = true;
      }
    }
    writing = undefined;
  }
  return {
    event(event: WireEvent) {
      if (broken) return;
      const line = format(event);
      pending.push(line);
      size += line.length;
      writing ??= flush();
    },
    waitForOutput: () => size > OUTPUT_BACKLOG_LIMIT ? writing : undefined,
    drained: () => writing ?? Promise.resolve(),
  };
}

async function main(args: string[]): Promise<number> {
  let options;
  try {
    options = parseCommandLine(args);
  } catch (error) {
    if (!(error instanceof UsageError)) throw error;
    console.error(`wire: ${error.message}\n\n${USAGE}`);
    return 2;
  }
  if (options.help) {
    console.log(USAGE);
    return 0;
  }
  const color = !options.json && Deno.stdout.isTerminal() && !Deno.noColor;
  const output = createOutput(
    options.json ? (event) => JSON.stringify(event) : (event) => formatEvent(event, { color }),
  );
  const address = `${formatHost(options.hostname)}:${options.port}`;
  let wire: Wire;
  try {
    wire = startWire({
      ...options,
      onEvent: options.quiet ? undefined : output.event,
      waitForOutput: options.quiet ? undefined : output.waitForOutput,
    });
  } catch (error) {
    console.error(
      `wire: cannot listen on ${address}: ${startError(error, options.hostname, options.port)}`,
    );
    return 1;
  }
  try {
    await wire.ready;
  } catch (error) {
    console.error(
      `wire: cannot listen on ${address}: ${startError(error, options.hostname, options.port)}`,
    );
    return 1;
  }
  // Listening for signals before saying "listening": a script that stops
  // the proxy the moment it has read that line gets exit 0.
  const stop = Promise.withResolvers<void>();
  for (const signal of ["SIGINT", "SIGTERM"] as const) {
    if (Deno.build.os !== "windows" || signal === "SIGINT") {
      Deno.addSignalListener(signal, stop.resolve);
    }
  }
  console.log(`listening on tcp://${formatHost(wire.addr.hostname)}:${wire.addr.port}`);
  await stop.promise;
  // Closing is quick; the timer is a guarantee that a stuck peer or a
  // stuck stdout cannot hold the process past a second.
  setTimeout(() => Deno.exit(0), 900);
  await wire.close();
  await output.drained();
  return 0;
}

function startError(error: unknown, hostname: string, port: number): string {
  if (error instanceof Deno.errors.AddrInUse) {
    return "address already in use (is another server running? try --port 0 for any free port)";
  }
  if (error instanceof Deno.errors.NotCapable || error instanceof Deno.errors.PermissionDenied) {
    return `permission denied (run with --allow-net=${formatHost(hostname)}:${port}` +
      (port > 0 && port < 1024 ? ", and ports below 1024 need root" : "") + ")";
  }
  if (error instanceof Deno.errors.AddrNotAvailable) return "that address is not on this machine";
  return error instanceof Error ? error.message : String(error);
}

if (import.meta.main) Deno.exit(await main(Deno.args));
