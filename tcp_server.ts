/**
 * tcp_server.ts: a TCP echo and chat server on `Deno.listen`.
 *
 * What it shows: TCP gives you a reliable, ordered *byte stream* and nothing
 * else. A `read()` returns some bytes, not one message: one message can arrive
 * in many reads and many messages in one read. So the echo mode needs no
 * framing (bytes in, the same bytes out), while the chat mode must cut the
 * stream into lines itself. It also shows backpressure (await every write),
 * the half-close (a peer that has finished sending can still receive), and a
 * server that one misbehaving client cannot crash. With `--cert` and `--key`
 * the same byte stream runs inside TLS (`Deno.listenTls`): encrypted on the
 * wire, and nothing else changes.
 *
 * Read it in this order:
 *
 *     1. Accept, then serve each connection        startTcpServer, acceptLoop, serveClient
 *        (over TLS, the handshake comes first)     tlsHandshake
 *     2. Echo: the same bytes back                 echoLoop, writeAll
 *     3. Framing: cutting the stream into lines    createLineFramer
 *     4. Chat: fan-out and backpressure            chatLoop, broadcast, send, flush
 *     5. Ending a connection: half-close, linger   end
 *     6. Limits and bookkeeping                    admit, the idle sweep, accept errors, logs
 *     7. The API's types                           TcpServerOptions, TcpServer
 *     8. The command line                          main
 *
 * Run it (least privilege, from a checkout or straight from its URL):
 *
 *     deno run --allow-net=127.0.0.1:9000 tcp_server.ts
 *     deno run --allow-net=127.0.0.1:9000 tcp_server.ts --mode chat
 *     deno run -N https://raw.githubusercontent.com/OWNER/REPO/main/tcp_server.ts
 *     deno run --allow-net=127.0.0.1:9000 --allow-read=cert.pem,key.pem tcp_server.ts \
 *       --cert cert.pem --key key.pem                  # TLS: prints listening on tls://...
 *
 * Poke it with netcat (`-N` sends EOF, a half-close, when stdin ends), or,
 * over TLS, with openssl:
 *
 *     printf 'hello\n' | nc -N 127.0.0.1 9000     # echo: prints hello
 *     nc -N 127.0.0.1 9000                        # chat: type lines, Ctrl-D leaves
 *     openssl s_client -quiet -CAfile ca.pem -connect 127.0.0.1:9000   # TLS: type lines
 *
 * @module
 */

import { parseArgs } from "node:util";

const DEFAULT_HOSTNAME = "127.0.0.1";
const DEFAULT_PORT = 9000;
const DEFAULT_MAX_LINE = 64 * 1024;
const DEFAULT_MAX_QUEUE = 2 * 1024 * 1024;
const DEFAULT_MAX_CONNECTIONS = 8192;
const DEFAULT_CHAT_IDLE_TIMEOUT = 300;
// A read needs memory for the kernel to copy the bytes into, and holds it
// while it waits: an idle connection costs what its buffer costs. So a
// connection reads into 1 KiB (a chat line, a small echo), and into 64 KiB
// only while its reads fill the buffer (a bulk sender), to move bulk data in
// few reads; see nextReadBuffer.
const SMALL_READ_BUFFER = 1024;
const LARGE_READ_BUFFER = 64 * 1024;
// After an error line and our FIN, how long we keep reading (and discarding)
// what the peer still sends. Closing a socket with unread input makes the
// kernel send a reset, which can destroy the error line before it is read.
const LINGER_MS = 2000;

const encoder = new TextEncoder();
// Not `fatal`: bytes that are not UTF-8 become U+FFFD instead of an error.
const decoder = new TextDecoder();

// ------------------------------------------ 1. accept, then serve each connection

/**
 * Starts a TCP echo or chat server and returns at once; it serves in the
 * background until `close()`.
 *
 * @example Echo server on a free port
 * ```ts
 * import assert from "node:assert/strict";
 *
 * await using server = startTcpServer({ port: 0, log: () => {} });
 * using conn = await Deno.connect({ hostname: "127.0.0.1", port: server.addr.port });
 * await conn.write(new TextEncoder().encode("hi\n"));
 * // TCP may cut the echo into several reads: read until all 3 bytes are in.
 * const reply = new Uint8Array(3);
 * for (let got = 0; got < reply.length;) got += (await conn.read(reply.subarray(got)))!;
 * assert.equal(new TextDecoder().decode(reply), "hi\n");
 * ```
 *
 * @throws {Deno.errors.AddrInUse} when the port is taken.
 * @throws {Deno.errors.NotCapable} without `--allow-net` for the address.
 */
export function startTcpServer(options: TcpServerOptions = {}): TcpServer {
  const mode = options.mode ?? "echo";
  const address = {
    hostname: options.hostname ?? DEFAULT_HOSTNAME,
    port: options.port ?? DEFAULT_PORT,
  };
  if ((options.cert === undefined) !== (options.key === undefined)) {
    throw new TypeError("cert and key go together: give both, or neither");
  }
  // TLS or not, a listener hands out connections that read and write bytes.
  const listener: Deno.Listener = options.cert === undefined
    ? Deno.listen(address)
    : Deno.listenTls({ ...address, cert: options.cert, key: options.key! });
  const state = initialState(listener, options);
  const idleTimeout = options.idleTimeout ??
    (mode === "chat" ? DEFAULT_CHAT_IDLE_TIMEOUT : 0);
  const sweeper = idleTimeout > 0 ? startIdleSweeper(state, idleTimeout) : undefined;
  const accepting = acceptLoop(state);
  let closed: Promise<void> | undefined;
  async function close() {
    state.closing = true;
    clearInterval(sweeper);
    closeQuietly(listener);
    // Nobody needs "* NAME left" while the whole server goes away, and
    // `closing` stops it: otherwise N leaves go to N-1 peers, N² writes.
    for (const client of state.clients) closeQuietly(client.conn);
    for (const conn of state.handshaking) closeQuietly(conn);
    await accepting;
    while (state.tasks.size > 0) await Promise.all(state.tasks);
    state.limitedLog.close();
  }
  return {
    addr: listener.addr as Deno.NetAddr,
    get connections() {
      return state.served;
    },
    close: () => closed ??= close(),
    [Symbol.asyncDispose]: () => closed ??= close(),
  };
}

// Each accepted connection is served by a task of its own, so the loop is at
// once ready for the next client. One connection failing never stops the
// others: accept() errors are survived (see logAcceptFailure).
async function acceptLoop(state: ServerState): Promise<void> {
  while (!state.closing) {
    let conn: Deno.Conn;
    try {
      conn = await state.listener.accept();
    } catch (error) {
      if (state.closing || error instanceof Deno.errors.BadResource) return;
      await survivingAcceptFailure(state, error);
      continue;
    }
    // close() may have run while this accept was completing: close() has
    // already closed every connection it knew of, and would wait for this one.
    if (state.closing) {
      closeQuietly(conn);
      return;
    }
    const task = serveClient(state, conn);
    state.tasks.add(task);
    task.finally(() => state.tasks.delete(task));
  }
}

async function serveClient(state: ServerState, conn: Deno.Conn): Promise<void> {
  if (state.tls && !await tlsHandshake(state, conn)) return;
  const client = newClient(state, conn);
  if (admit(state, client)) {
    if (state.mode === "chat") {
      // Chat lines are small and a client both sends and receives: with Nagle
      // on, its next line waits for the ACK of the last (up to 40 ms).
      // (Deno.TlsConn has no setNoDelay: see docs/deno-notes.md, "TLS and Nagle".)
      if (!state.tls) (conn as Deno.TcpConn).setNoDelay(true);
      join(state, client);
    }
    state.log(`+ ${client.peer} connected${client.name ? ` as ${client.name}` : ""}`);
  }
  try {
    await (state.mode === "chat" ? chatLoop(state, client) : echoLoop(client));
  } catch (error) {
    client.reason ||= describe(error);
  }
  // The peer sent EOF (a half-close), reset, or we closed it. It may still
  // be owed data; send that, then close for real.
  end(state, client);
  await client.flushing;
  release(state, client);
}

// --------------------------------------------------- 2. echo: the same bytes back

// Echo needs no framing: whatever bytes arrive go straight back. Awaiting each
// write before the next read is the backpressure: a client that sends without
// reading fills its own buffers and stalls, while we hold one read buffer.
async function echoLoop(client: Client): Promise<void> {
  const small = new Uint8Array(SMALL_READ_BUFFER);
  let buf = small;
  for (;;) {
    const n = await client.conn.read(buf);
    if (n === null) return;
    markProgress(client);
    // A client being ended is still read (see end), no longer answered.
    if (!client.ending) await writeAll(client, buf.subarray(0, n));
    buf = nextReadBuffer(buf, n, small);
  }
}

// A read that filled its buffer means more is waiting: the next one gets 64
// KiB. A read that would have fit in the small buffer means the burst is
// over: back to it, and the large one becomes garbage, so a connection that
// went quiet costs 1 KiB again. Reused otherwise: no garbage per message.
// The price: a client that stops right after a bulk read keeps its 64 KiB
// until its next read, since a read that is waiting cannot be given another
// buffer. Dropping to 1 KiB after every read short of 64 KiB would free it,
// but allocates 64 KiB at each new burst: bulk echo measured 0.94× as fast.
function nextReadBuffer(
  buf: Uint8Array<ArrayBuffer>,
  n: number,
  small: Uint8Array<ArrayBuffer>,
): Uint8Array<ArrayBuffer> {
  if (n === buf.length) return buf === small ? new Uint8Array(LARGE_READ_BUFFER) : buf;
  return n <= small.length ? small : buf;
}

// A write may take only part of the bytes (a "partial send"): loop until all
// are out. Each await waits for room in the kernel's send buffer, and each
// write that moves is progress: a client taking a long echo slowly is busy.
async function writeAll(client: Client, bytes: Uint8Array): Promise<void> {
  markWriting(client, true);
  let written = await client.conn.write(bytes);
  markProgress(client);
  while (written < bytes.length) {
    written += await client.conn.write(bytes.subarray(written));
    markProgress(client);
  }
  markWriting(client, false);
}

// ----------------------------------------- 3. framing: cutting the stream into lines

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
 * @example A line split across two reads, and two lines in one
 * ```ts
 * import assert from "node:assert/strict";
 *
 * const push = createLineFramer(1024);
 * const lines: string[] = [];
 * const decode = (line: Uint8Array) => void lines.push(new TextDecoder().decode(line));
 * assert.ok(push(new TextEncoder().encode("hel"), decode));
 * assert.ok(push(new TextEncoder().encode("lo\r\nworld\nbye"), decode));
 * assert.ok(push(null, decode)); // the end of the stream: "bye" had no "\n"
 * assert.deepEqual(lines, ["hello", "world", "bye"]);
 * assert.equal(createLineFramer(4)(new TextEncoder().encode("too long"), decode), false);
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

// -------------------------------------------------- 4. chat: fan-out and backpressure

async function chatLoop(state: ServerState, client: Client): Promise<void> {
  const small = new Uint8Array(SMALL_READ_BUFFER);
  let buf = small;
  const push = createLineFramer(state.maxLine);
  const relay = (line: Uint8Array) =>
    broadcast(state, `${client.name}: ${sanitizeChatText(decoder.decode(line))}\n`);
  for (;;) {
    const n = await client.conn.read(buf);
    markProgress(client);
    // At EOF (null), a last line without "\n" still counts.
    const chunk = n === null ? null : buf.subarray(0, n);
    if (!client.ending && !push(chunk, relay)) {
      end(state, client, `line too long (max ${state.maxLine} bytes)`);
    }
    if (chunk === null) return;
    buf = nextReadBuffer(buf, n!, small);
  }
}

// A newcomer is told its name at once ("* " lines are the server speaking),
// and everyone already there learns it from the join. That is one line to
// each of them: N clients arriving together cost N²/2 deliveries (12.5
// million for 5,000), a burst whose garbage the runtime takes a few seconds
// to give back (docs/performance.md, "Idle connections").
function join(state: ServerState, client: Client): void {
  client.name = `guest-${++state.guests}`;
  broadcast(state, `* ${client.name} joined\n`);
  state.room.add(client);
  send(state, client, encoder.encode(`* you are ${client.name}\n`));
}

// One message is encoded once and the same bytes are queued to every client.
function broadcast(state: ServerState, text: string): void {
  const bytes = encoder.encode(text);
  for (const client of state.room) send(state, client, bytes);
}

// Queue bytes for a client and make sure a flush will write them. Messages
// queued while a write is in progress go out together in the next write, so
// a busy client costs one write per turn, not one per message. The queue is
// the backpressure: one that outgrows --max-queue drops its client.
function send(state: ServerState, client: Client, bytes: Uint8Array): void {
  enqueue(client, bytes);
  if (client.queued > state.maxQueue) dropTooSlow(state, client);
  else client.flushing ??= flush(client);
}

async function flush(client: Client): Promise<void> {
  // Start after the current turn's synchronous work, so that everything it
  // queued (all the lines of one read, say) leaves in the same write.
  await null;
  try {
    while (client.queue.length > 0) {
      const chunks = client.queue;
      client.queue = [];
      const bytes = chunks.length === 1 ? chunks[0] : concat(chunks);
      // A write may take only part of the bytes (a "partial send"): write
      // the rest until all are out. (A subarray only then: this runs once
      // per delivery, and a new view per write costs measurably.)
      let written = await client.conn.write(bytes);
      markWritten(client);
      while (written < bytes.length) {
        written += await client.conn.write(bytes.subarray(written));
        markWritten(client);
      }
      client.queued -= bytes.length;
    }
    if (client.ending) await client.conn.closeWrite();
  } catch (error) {
    // The peer is gone; closing makes its read loop end and clean up.
    client.reason ||= describe(error);
    client.queue = [];
    closeQuietly(client.conn);
  } finally {
    client.flushing = undefined;
  }
}

// --------------------------------------------- 5. ending a connection: half-close, linger

// Stops processing a client's input and takes it out of the chat. With an
// error, the client is told why in a last line, then gets our FIN
// (closeWrite, a half-close: "I am done sending") while we keep reading and
// discarding what it still sends, until it closes or LINGER_MS passes.
function end(state: ServerState, client: Client, error?: string): void {
  if (client.ending) return;
  client.ending = true;
  if (state.room.delete(client) && !state.closing) {
    broadcast(state, `* ${client.name} left\n`);
  }
  if (!error) return;
  client.reason ||= error;
  enqueue(client, encoder.encode(`* error: ${error}\n`));
  client.flushing ??= flush(client);
  client.linger = setTimeout(() => closeQuietly(client.conn), LINGER_MS);
}

// --------------------------------------------------------- 6. limits and bookkeeping

// How often the idle sweep runs, at most.
const SWEEP_MS = 1000;
// Open files a server needs beyond one per client: Deno itself holds about
// 20, plus the listener, plus clients being turned away or lingering.
const RESERVED_FILES = 64;
// A line that a peer can make us repeat at any rate (one per reset, one per
// refused connection) is printed once per window, then summed up.
const LOG_WINDOW_MS = 20_000;
// How long accept() rests after an error that is not about one client (out
// of files): the error would come back at once, in a busy loop.
const ACCEPT_RETRY_MS = 100;
// How long a TLS client gets to finish its handshake; a peer that connects
// and says nothing would otherwise hold its open file forever.
const TLS_HANDSHAKE_TIMEOUT_MS = 10_000;

interface Client {
  conn: Deno.Conn;
  peer: string;
  name: string;
  /** Chat: bytes waiting to be written, written together in one write. */
  queue: Uint8Array[];
  /** Bytes queued or being written: what this client costs us right now. */
  queued: number;
  /** Set while a flush is writing; awaiting it waits until the queue is empty. */
  flushing: Promise<void> | undefined;
  /** Echo: a write is in progress. */
  writing: boolean;
  /** Idle sweeps since the client last made progress (see markProgress). */
  idleSweeps: number;
  /** Chat: idle sweeps with a flush pending since a write to it last moved. */
  stalledSweeps: number;
  /** No more input is processed; the connection is on its way out. */
  ending: boolean;
  /** Why the connection ended, for the log; the first cause found wins. */
  reason: string;
  /** Counted against `maxConnections` (clients turned away are not). */
  counted: boolean;
  linger: ReturnType<typeof setTimeout> | undefined;
}

interface ServerState {
  mode: Mode;
  maxLine: number;
  maxQueue: number;
  maxConnections: number;
  /** The process's open-file limit, when it can be read. */
  fileLimit: number | undefined;
  log: (line: string) => void;
  /** For the lines a peer can make us repeat at any rate. */
  limitedLog: LogLimiter;
  listener: Deno.Listener;
  /** The listener speaks TLS: every connection starts with a handshake. */
  tls: boolean;
  /** TLS connections whose handshake is still running (not yet clients). */
  handshaking: Set<Deno.Conn>;
  /** Every open connection, including those being turned away. */
  clients: Set<Client>;
  /** Connections counted against maxConnections. */
  served: number;
  /** Chat: the clients that receive broadcasts. */
  room: Set<Client>;
  tasks: Set<Promise<void>>;
  guests: number;
  closing: boolean;
}

function initialState(listener: Deno.Listener, options: TcpServerOptions): ServerState {
  const log = safeLog(options.log ?? console.error);
  return {
    mode: options.mode ?? "echo",
    maxLine: options.maxLine ?? DEFAULT_MAX_LINE,
    maxQueue: options.maxQueue ?? DEFAULT_MAX_QUEUE,
    maxConnections: options.maxConnections ?? DEFAULT_MAX_CONNECTIONS,
    fileLimit: openFileLimit(),
    log,
    limitedLog: createLogLimiter(log),
    listener,
    tls: options.cert !== undefined,
    handshaking: new Set(),
    clients: new Set(),
    served: 0,
    room: new Set(),
    tasks: new Set(),
    guests: 0,
    closing: false,
  };
}

// Every open connection is known, so that close() can close it.
function newClient(state: ServerState, conn: Deno.Conn): Client {
  const client: Client = {
    conn,
    peer: peerName(conn),
    name: "",
    queue: [],
    queued: 0,
    flushing: undefined,
    writing: false,
    idleSweeps: 0,
    stalledSweeps: 0,
    ending: false,
    reason: "",
    counted: false,
    linger: undefined,
  };
  state.clients.add(client);
  return client;
}

function peerName(conn: Deno.Conn): string {
  const { hostname, port } = conn.remoteAddr as Deno.NetAddr;
  return `${hostname}:${port}`;
}

// A TLS client becomes a client only once its handshake is done, so a peer
// that fails it (a plain TCP client on the TLS port, a client that rejects
// our certificate, one that says nothing) never joins and is never counted:
// it costs one log line, rate-limited, since any peer can cause it at will.
// Handshakes in progress are bounded by --max-connections too.
async function tlsHandshake(state: ServerState, conn: Deno.Conn): Promise<boolean> {
  const peer = peerName(conn);
  if (state.handshaking.size >= state.maxConnections) {
    state.limitedLog.log("turned away", `! ${peer} turned away: too many TLS handshakes at once`);
    closeQuietly(conn);
    return false;
  }
  state.handshaking.add(conn);
  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    closeQuietly(conn);
  }, TLS_HANDSHAKE_TIMEOUT_MS);
  try {
    await (conn as Deno.TlsConn).handshake();
  } catch (error) {
    closeQuietly(conn);
    if (!state.closing) {
      const { kind, why } = timedOut
        ? { kind: "timeout", why: `no handshake within ${TLS_HANDSHAKE_TIMEOUT_MS / 1000} s` }
        : describeTlsFailure(error);
      state.limitedLog.log(`tls: ${kind}`, `! ${peer} TLS handshake failed: ${why}`);
    }
    return false;
  } finally {
    clearTimeout(timer);
    state.handshaking.delete(conn);
  }
  if (!state.closing) return true;
  closeQuietly(conn);
  return false;
}

// What rustls says, with the likely cause a person can act on, and its kind
// for the log limiter (so that one flood of plain clients hides no other cause).
function describeTlsFailure(error: unknown): { kind: string; why: string } {
  const message = error instanceof Error ? error.message : String(error);
  if (/InvalidContentType|corrupt message/.test(message)) {
    return { kind: "not tls", why: `${message} (not TLS: a plain TCP client on the TLS port?)` };
  }
  const alert = message.match(/received fatal alert: (\w+)/)?.[1];
  if (alert) {
    return {
      kind: `alert ${alert}`,
      why: `the client refused it (${alert}: does it trust our certificate's CA?)`,
    };
  }
  return { kind: error instanceof Error ? error.name : "other", why: describe(error) };
}

// A client past --max-connections is told the server is full and let go
// (after the linger, like any error); it is never counted.
function admit(state: ServerState, client: Client): boolean {
  if (state.served >= state.maxConnections) {
    state.limitedLog.log("turned away", `! ${client.peer} turned away: server full`);
    end(state, client, "server full");
    return false;
  }
  client.counted = true;
  state.served++;
  return true;
}

// The connection is closed for real and forgotten; a counted one is logged.
function release(state: ServerState, client: Client): void {
  clearTimeout(client.linger);
  closeQuietly(client.conn);
  state.clients.delete(client);
  if (!client.counted) return;
  state.served--;
  if (!state.closing) {
    state.log(
      `- ${client.peer} disconnected${client.name ? ` (${client.name})` : ""}: ${
        client.reason || "closed by peer"
      }`,
    );
  }
}

function enqueue(client: Client, bytes: Uint8Array): void {
  client.queue.push(bytes);
  client.queued += bytes.length;
}

// It stopped reading, or reads slower than the room talks. Everything still
// queued is dropped so its memory is bounded; the error line goes last,
// after whatever the kernel already holds.
function dropTooSlow(state: ServerState, client: Client): void {
  client.queued -= client.queue.reduce((sum, chunk) => sum + chunk.length, 0);
  client.queue = [];
  end(state, client, "too slow, disconnected");
}

// A client is alive while it makes progress: a read that brings its bytes,
// or, in echo mode, a write of its echo that moves (a client taking a long
// echo slowly is busy, not idle). A single store in the hot path.
function markProgress(client: Client): void {
  client.idleSweeps = 0;
}

// Echo: a write is in progress, so a client silent this long may be stuck in
// it rather than idle (see dropIdle).
function markWriting(client: Client, writing: boolean): void {
  client.writing = writing;
}

// Chat: a write to the client moved. In chat that is not a sign of life (a
// write lands in the kernel's buffers whether or not anyone reads them), but
// a write that does not move for the whole timeout means it stopped reading.
function markWritten(client: Client): void {
  client.stalledSweeps = 0;
}

// Every sweep counts one more idle period for each client; progress resets
// the count (no timer per client). A write that never moves is no progress:
// an echo client that sends and stops reading is dropped like a silent one,
// and a chat client whose flush is stuck that long is dropped even while it
// talks.
function startIdleSweeper(state: ServerState, idleTimeout: number): ReturnType<typeof setInterval> {
  const every = Math.min(SWEEP_MS, (idleTimeout * 1000) / 4);
  const limit = Math.ceil((idleTimeout * 1000) / every);
  return setInterval(() => {
    for (const client of state.clients) {
      if (client.ending) continue;
      if (++client.idleSweeps >= limit) dropIdle(state, client);
      else if (client.flushing && ++client.stalledSweeps >= limit) dropStuck(state, client);
    }
  }, every);
}

// A silent client is told why and lingers like any other, unless it is
// silent because its echo is stuck.
function dropIdle(state: ServerState, client: Client): void {
  if (client.writing) dropStuck(state, client);
  else end(state, client, "idle timeout");
}

// A client whose write has not moved for the whole timeout has stopped
// reading: its kernel buffers are full and no error line could reach it.
// Closing the connection aborts the stuck write and frees its place at once.
function dropStuck(state: ServerState, client: Client): void {
  client.reason ||= "idle timeout (stopped reading)";
  end(state, client);
  closeQuietly(client.conn);
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

function closeQuietly(resource: { close(): void }): void {
  try {
    resource.close();
  } catch {
    // Already closed.
  }
}

function delay(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

// Every connection is an open file, and running out of them is survived:
// accept() fails, new clients wait in the kernel's queue, and are served as
// soon as others leave. A client that resets before we accept it makes
// accept() fail too (Deno reports it as NotConnected: see docs/deno-notes.md,
// "accept() and a reset"). Either can repeat thousands of times a second, so
// it is logged through the limiter, and out of files says what to do.
async function survivingAcceptFailure(state: ServerState, error: unknown): Promise<void> {
  if (isOutOfFiles(error)) {
    state.limitedLog.log(
      "accept: EMFILE",
      `accept failed: ${tooManyFiles(state.fileLimit, state.maxConnections)}`,
    );
  } else if (error instanceof Deno.errors.NotConnected) {
    state.limitedLog.log(
      "accept: reset",
      "accept failed: a client reset its connection before it was accepted",
    );
    // About one client only: the next accept can go at once.
    return;
  } else {
    const name = error instanceof Error ? error.name : "unknown";
    state.limitedLog.log(`accept: ${name}`, `accept failed: ${describe(error)}`);
  }
  await delay(ACCEPT_RETRY_MS);
}

// EMFILE: this process has used up its open-file limit (ENFILE, the whole
// system's, is not ours to fix).
function isOutOfFiles(error: unknown): boolean {
  return (error as { code?: unknown } | null)?.code === "EMFILE";
}

// Out of files, said with what to do about it.
function tooManyFiles(limit: number | undefined, maxConnections: number): string {
  const needed = maxConnections + RESERVED_FILES;
  const now = limit === undefined ? "" : ` (ulimit -n is ${limit})`;
  const raise = limit === undefined || limit < needed ? ` with "ulimit -n ${needed}"` : "";
  return `too many open files${now}: raise the limit${raise} before starting, or lower ` +
    "--max-connections; new clients wait until connections close";
}

/**
 * The soft limit on this process's open files (`ulimit -n`, RLIMIT_NOFILE),
 * or `undefined` where it cannot be read. Deno has no getrlimit; on Linux the
 * limit is in /proc/self/limits, readable only with --allow-all (see
 * docs/deno-notes.md, "/proc needs --allow-all"). The read permission is
 * queried first, so that a terminal never shows a permission prompt for it.
 * Deno raises its soft limit to the hard one at startup (docs/deno-notes.md,
 * "the open-file limit"), so under a shell's `ulimit -n N` this is N.
 *
 * Self-contained: copy it, with {@linkcode fileLimitWarning} and
 * RESERVED_FILES, into any server.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 *
 * const limit = openFileLimit(); // 1024 under `ulimit -n 1024` with -A; undefined without -A
 * const readable = Deno.build.os === "linux" &&
 *   Deno.permissions.querySync({ name: "read", path: "/proc/self/limits" }).state === "granted";
 * if (readable) assert.ok(Number.isSafeInteger(limit) && limit! > 0);
 * else assert.equal(limit, undefined);
 * ```
 */
export function openFileLimit(): number | undefined {
  const path = "/proc/self/limits";
  try {
    if (Deno.permissions.querySync({ name: "read", path }).state !== "granted") return undefined;
    const soft = Number(Deno.readTextFileSync(path).match(/^Max open files\s+(\d+)/m)?.[1]);
    return Number.isSafeInteger(soft) ? soft : undefined;
  } catch {
    // Not permitted (without -A), or no /proc (not Linux).
    return undefined;
  }
}

/**
 * The warning to print at start when the open-file limit is too low for
 * `maxConnections` clients (each is an open file, and the process needs
 * RESERVED_FILES more), or `undefined` when it is enough or unknown.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 *
 * assert.match(fileLimitWarning(8192, 1024)!, /^the open-file limit \(ulimit -n\) is 1024, /);
 * assert.match(fileLimitWarning(8192, 1024)!, /raise it with "ulimit -n 8256"/);
 * assert.equal(fileLimitWarning(8192, 65536), undefined);
 * assert.equal(fileLimitWarning(8192, undefined), undefined); // unknown: no warning
 * ```
 */
export function fileLimitWarning(
  maxConnections: number,
  limit: number | undefined,
): string | undefined {
  const needed = maxConnections + RESERVED_FILES;
  if (limit === undefined || limit >= needed) return undefined;
  return `the open-file limit (ulimit -n) is ${limit}, too low for --max-connections ` +
    `${maxConnections}; raise it with "ulimit -n ${needed}" before starting, ` +
    "or lower --max-connections";
}

/**
 * A log for lines that a peer can make us repeat at any rate (one per
 * reset, one per refused connection). The first line of a kind is logged at
 * once and opens a window of `windowMs`; the others of that kind in the
 * window are only counted, and when it ends (or at `close()`) one line sums
 * them up: the last of them with `(and N more like it in the last 20 s)`.
 * So a flood costs at most two lines per kind and window. The timers are
 * unref'd: they never keep a process alive, but `close()` them anyway.
 *
 * Self-contained: copy it, with LOG_WINDOW_MS, into any server.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 *
 * const lines: string[] = [];
 * const limiter = createLogLimiter((line) => lines.push(line));
 * for (let i = 0; i < 1000; i++) limiter.log("reset", "accept failed: reset");
 * limiter.close();
 * assert.deepEqual(lines, [
 *   "accept failed: reset",
 *   "accept failed: reset (and 999 more like it in the last 20 s)",
 * ]);
 * ```
 */
export function createLogLimiter(
  log: (line: string) => void,
  windowMs = LOG_WINDOW_MS,
): LogLimiter {
  const windows = new Map<
    string,
    { last: string; more: number; timer: ReturnType<typeof setTimeout> }
  >();
  function summarize(kind: string): void {
    const window = windows.get(kind)!;
    windows.delete(kind);
    clearTimeout(window.timer);
    if (window.more > 0) {
      log(`${window.last} (and ${window.more} more like it in the last ${windowMs / 1000} s)`);
    }
  }
  return {
    log(kind, line) {
      const window = windows.get(kind);
      if (window) {
        window.more++;
        window.last = line;
        return;
      }
      log(line);
      const timer = setTimeout(() => summarize(kind), windowMs);
      Deno.unrefTimer(timer);
      windows.set(kind, { last: line, more: 0, timer });
    },
    close() {
      for (const kind of [...windows.keys()]) summarize(kind);
    },
  };
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

// Anything a peer chose (a close reason, a name, a header) is escaped before
// it reaches a log line or a terminal: no newline can forge a line, no ESC
// can move the cursor, no bidi override can reorder what the operator reads.
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

// Every log line goes through escapeControls. None carries text a peer
// chose today (addresses are numbers, names are ours, reasons are ours or
// the system's), and this keeps it so whatever is added later.
function safeLog(log: (line: string) => void): (line: string) => void {
  return (line) => log(escapeControls(line));
}

function describe(error: unknown): string {
  if (error instanceof Deno.errors.ConnectionReset) return "connection reset by peer";
  if (error instanceof Deno.errors.BrokenPipe) return "peer stopped reading (broken pipe)";
  // TLS: the peer closed its TCP connection without TLS's own goodbye.
  if (error instanceof Deno.errors.UnexpectedEof) return "closed by peer (no TLS close_notify)";
  if (error instanceof Deno.errors.Interrupted || error instanceof Deno.errors.BadResource) {
    return "closed";
  }
  return error instanceof Error ? error.message : String(error);
}

// ----------------------------------------------------------------- 7. the API's types

/** What the server does with the bytes a client sends. */
export type Mode = "echo" | "chat";

/** Options for {@linkcode startTcpServer}. Sizes are in bytes. */
export interface TcpServerOptions {
  /** Address to bind. Default `127.0.0.1` (this machine only). */
  hostname?: string;
  /** Port to bind; `0` picks a free one (read it back from `addr`). Default 9000. */
  port?: number;
  /** `echo` (default) sends every byte back; `chat` relays lines to everyone. */
  mode?: Mode;
  /** Chat: longest line accepted, without its line ending. Default 65536. */
  maxLine?: number;
  /** Chat: bytes queued for one client before it is dropped as too slow. Default 2 MiB. */
  maxQueue?: number;
  /** Connections served at once; the next one is told the server is full. Default 8192. */
  maxConnections?: number;
  /** Seconds without a byte from a client before it is dropped; 0 = never. Default 0 (echo), 300 (chat). */
  idleTimeout?: number;
  /** Where connection events go. Default `console.error`; pass `() => {}` for silence. */
  log?: (line: string) => void;
  /** TLS: the certificate chain, PEM text (leaf first). With `key`, the server speaks TLS. */
  cert?: string;
  /** TLS: the private key of `cert`'s leaf, PEM text. */
  key?: string;
}

/** A running server, returned by {@linkcode startTcpServer}. */
export interface TcpServer extends AsyncDisposable {
  /** The address actually bound (with the real port when you asked for 0). */
  readonly addr: Deno.NetAddr;
  /** Connections open right now. */
  readonly connections: number;
  /** Stop accepting, close every connection, and wait until all are gone. */
  close(): Promise<void>;
}

/** What {@linkcode createLogLimiter} returns. */
export interface LogLimiter {
  /** Logs `line`, or only counts it when a line of the same `kind` was logged in this window. */
  log(kind: string, line: string): void;
  /** Logs the summaries still due and stops the window timers. */
  close(): void;
}

// -------------------------------------------------------------- 8. the command line

const USAGE = `Usage: tcp_server.ts [options]

A TCP echo (default) or chat server. Prints "listening on tcp://HOST:PORT",
or "listening on tls://HOST:PORT" with --cert and --key.

Options:
  --host HOST             address to bind (default ${DEFAULT_HOSTNAME}; 0.0.0.0 = every interface)
  --port PORT             port to bind, 0 = any free port (default ${DEFAULT_PORT})
  --mode echo|chat        echo bytes back, or relay lines to everyone (default echo)
  --max-line BYTES        chat: longest line accepted (default ${DEFAULT_MAX_LINE})
  --max-queue BYTES       chat: unsent bytes a client may fall behind by (default ${DEFAULT_MAX_QUEUE})
  --max-connections N     clients served at once (default ${DEFAULT_MAX_CONNECTIONS})
  --idle-timeout SECONDS  drop clients silent, or not reading, this long; 0 = never
                          (default 0 for echo, ${DEFAULT_CHAT_IDLE_TIMEOUT} for chat)
  --cert FILE             speak TLS with this certificate chain (PEM, leaf first);
                          needs --key, and --allow-read for both files
  --key FILE              the private key of --cert's certificate (PEM)
  --quiet                 no connection log on stderr
  -h, --help              show this help

Each client is an open file. With -A (Deno reads /proc/self/limits only
then), a warning at start says when "ulimit -n" is too low for
--max-connections.`;

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

interface CommandLine extends TcpServerOptions {
  certFile?: string;
  keyFile?: string;
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
        host: { type: "string", default: DEFAULT_HOSTNAME },
        port: { type: "string", default: String(DEFAULT_PORT) },
        mode: { type: "string", default: "echo" },
        "max-line": { type: "string", default: String(DEFAULT_MAX_LINE) },
        "max-queue": { type: "string", default: String(DEFAULT_MAX_QUEUE) },
        "max-connections": { type: "string", default: String(DEFAULT_MAX_CONNECTIONS) },
        "idle-timeout": { type: "string" },
        cert: { type: "string" },
        key: { type: "string" },
        quiet: { type: "boolean", default: false },
        help: { type: "boolean", short: "h", default: false },
      },
    }).values;
  } catch (error) {
    throw new UsageError(parseArgsMessage(error as Error));
  }
  const mode = parsed.mode;
  if (mode !== "echo" && mode !== "chat") {
    throw new UsageError(`--mode must be echo or chat, got "${mode}"`);
  }
  if ((parsed.cert === undefined) !== (parsed.key === undefined)) {
    throw new UsageError("--cert and --key go together: give both (PEM files), or neither");
  }
  return {
    hostname: parsed.host,
    port: integerOption("--port", parsed.port, 0, 65535),
    mode,
    maxLine: integerOption("--max-line", parsed["max-line"], 1),
    maxQueue: integerOption("--max-queue", parsed["max-queue"], 1),
    maxConnections: integerOption("--max-connections", parsed["max-connections"], 1),
    idleTimeout: parsed["idle-timeout"] === undefined
      ? undefined
      : numberOption("--idle-timeout", parsed["idle-timeout"]),
    certFile: parsed.cert,
    keyFile: parsed.key,
    quiet: parsed.quiet,
    help: parsed.help,
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

function numberOption(name: string, text: string): number {
  const value = Number(text);
  if (text.trim() === "" || !Number.isFinite(value) || value < 0) {
    throw new UsageError(`${name} must be a number of seconds, 0 or more, got "${text}"`);
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
    console.error(`tcp_server: ${error.message}\n\n${USAGE}`);
    return 2;
  }
  if (options.help) {
    console.log(USAGE);
    return 0;
  }
  const address = `${formatHost(options.hostname!)}:${options.port}`;
  let server: TcpServer;
  try {
    if (options.certFile !== undefined) {
      options.cert = readPem("--cert", options.certFile);
      options.key = readPem("--key", options.keyFile!);
    }
    server = startTcpServer({ ...options, log: options.quiet ? () => {} : console.error });
  } catch (error) {
    console.error(
      error instanceof StartError
        ? `tcp_server: ${error.message}`
        : `tcp_server: cannot listen on ${address}: ${startError(error, options)}`,
    );
    return 1;
  }
  // Listening for signals before saying "listening": a test or a script
  // that stops the server the moment it has read that line gets exit 0.
  const stop = Promise.withResolvers<void>();
  for (const signal of ["SIGINT", "SIGTERM"] as const) {
    if (Deno.build.os !== "windows" || signal === "SIGINT") {
      Deno.addSignalListener(signal, stop.resolve);
    }
  }
  const scheme = options.cert === undefined ? "tcp" : "tls";
  console.log(`listening on ${scheme}://${formatHost(server.addr.hostname)}:${server.addr.port}`);
  const warning = fileLimitWarning(options.maxConnections!, openFileLimit());
  if (warning) console.error(`tcp_server: warning: ${warning}`);
  await stop.promise;
  // Closing is quick; the timer is a guarantee that a stuck peer cannot hold
  // the process past a second.
  setTimeout(() => Deno.exit(0), 900);
  await server.close();
  return 0;
}

/** A problem found before listening, such as an unreadable --cert: one line, exit code 1. */
class StartError extends Error {}

function readPem(flag: string, file: string): string {
  try {
    return Deno.readTextFileSync(file);
  } catch (error) {
    const why = error instanceof Deno.errors.NotFound
      ? "no such file"
      : error instanceof Deno.errors.NotCapable || error instanceof Deno.errors.PermissionDenied
      ? `permission denied (run with --allow-read=${file})`
      : error instanceof Error
      ? error.message
      : String(error);
    throw new StartError(`cannot read ${flag} ${file}: ${why}`);
  }
}

function startError(error: unknown, options: CommandLine): string {
  const { hostname, port, certFile, keyFile } = options as Required<CommandLine>;
  // Deno.listenTls checks the PEM files and that the key fits the certificate.
  const message = error instanceof Error ? error.message : String(error);
  if (certFile !== undefined && /No certificates found/.test(message)) {
    return `--cert ${certFile} holds no PEM certificate ("-----BEGIN CERTIFICATE-----")`;
  }
  if (certFile !== undefined && /No keys found/.test(message)) {
    return `--key ${keyFile} holds no PEM private key`;
  }
  if (certFile !== undefined && /KeyMismatch|not be consistent/.test(message)) {
    return `--key ${keyFile} is not the private key of the certificate in --cert ${certFile}`;
  }
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
