/**
 * udp.ts: a UDP echo and chat server and a UDP client, in one file, on
 * `node:dgram`.
 *
 * What it shows: UDP carries *datagrams*. Unlike TCP's byte stream, a
 * datagram keeps its boundaries: one `send` is one receive, whole, never
 * split or joined with another. Unlike a WebSocket message, nothing makes
 * sure it arrives: a datagram can be lost, duplicated or reordered, and
 * nobody is told. And there is no connection: no handshake, no accept, no
 * close. A server learns of a peer from its first datagram and can only
 * guess it has gone from its silence; a client learns that nobody listens
 * only from a reply that never comes.
 *
 * In reading order:
 *
 *   1. One socket for every peer: bind, then receive from anyone.
 *   2. Echo: each datagram back to the address it came from.
 *   3. Chat: a room of addresses, joined by a first datagram, left by silence.
 *   4. Loss on purpose (--drop, --seed), since loopback loses almost nothing.
 *   5. The client: send, wait, count what never came back.
 *   6. Limits and bookkeeping; then the exported API and the command line.
 *
 * Why `node:dgram` and not `Deno.listenDatagram`: on Deno 2.9 the latter
 * still needs `--unstable-net`, on every run line including the one from a
 * URL, and it has no connected sockets at all. `node:dgram` needs no flag.
 * (On Deno 2.9.6 its `connect()` only remembers the address, so ICMP errors
 * do not surface through it either: see section 5.)
 *
 * Run it (least privilege, from a checkout or straight from its URL). A UDP
 * server answers each peer at the peer's own port, so its permission names
 * the host, not one port:
 *
 *     deno run --allow-net=127.0.0.1 udp.ts serve                 # echo on udp://127.0.0.1:9002
 *     deno run --allow-net=127.0.0.1 udp.ts serve --mode chat --drop 0.3
 *     deno run --allow-net=127.0.0.1 udp.ts send hello world      # two datagrams, prints the replies
 *     deno run -N https://raw.githubusercontent.com/OWNER/REPO/main/udp.ts serve
 *
 * Poke it with netcat: `-u` is UDP, and since UDP has no end to send, `-w1`
 * makes `nc` quit a second after its input ends.
 *
 *     printf 'hi' | nc -u -w1 127.0.0.1 9002      # echo: prints hi
 *     nc -u 127.0.0.1 9002                        # chat: each line is a datagram; Ctrl-C quits
 *
 * @module
 */

import dgram from "node:dgram";
import { parseArgs } from "node:util";

const DEFAULT_HOSTNAME = "127.0.0.1";
const DEFAULT_PORT = 9002;
const DEFAULT_TIMEOUT_MS = 1000;
const DEFAULT_IDLE_TIMEOUT = 60;
const DEFAULT_MAX_PEERS = 1000;
// An IPv4 packet is at most 65,535 bytes, of which the IP header takes 20 and
// the UDP header 8. IPv6's length field leaves out its own 40-byte header.
const MAX_DATAGRAM_IPV4 = 65_507;
const MAX_DATAGRAM_IPV6 = 65_527;
// Chat: every datagram is sent on to every peer, so its size is kept small.
const MAX_CHAT_TEXT = 2048;
// Chat: datagrams a second one peer may send on average, and in a burst.
const CHAT_RATE = 20;
const CHAT_BURST = 40;
// Chat: "room full" answers a second, to all strangers together.
const ROOM_FULL_RATE = 10;
// Echo: datagrams a second answered to one address, on average and in a
// burst, and how many addresses are remembered for it.
const ECHO_RATE = 1000;
const ECHO_BURST = 1000;
const MAX_ECHO_SENDERS = 4096;
// Datagrams handed to the socket but not sent yet. A send never blocks, so
// without a bound a flood would queue without end; past it, outgoing
// datagrams are dropped, which UDP allows.
const MAX_PENDING_SENDS = 4096;
// Log rate limiting: a kind of line is printed once (drops: this many
// times) per window, then counted, and summed up at the window's end.
const LOG_WINDOW_MS = 20_000;
const LOG_DROPS_PER_WINDOW = 100;
// On SIGINT or SIGTERM: the process exits by then, whatever is pending.
const SHUTDOWN_MS = 900;

const encoder = new TextEncoder();
// Not `fatal`: chat bytes that are not UTF-8 become U+FFFD instead of an error.
const decoder = new TextDecoder();
const strictDecoder = new TextDecoder("utf-8", { fatal: true });

interface ServerState {
  socket: dgram.Socket;
  /** The address and port bound, to refuse datagrams that claim to come from them. */
  own: { address: string; port: number };
  mode: Mode;
  dropRate: number;
  random: () => number;
  idleTimeoutMs: number;
  maxPeers: number;
  /** Chat: the room, keyed by "address:port", least recently heard from first. */
  peers: Map<string, Peer>;
  guests: number;
  /** Datagrams received so far, dropped ones included: the number in a drop line. */
  received: number;
  pendingSends: number;
  roomFullAnswers: TokenBucket;
  /** Echo: a token bucket for each address heard from lately, least recent first. */
  echoSenders: Map<string, TokenBucket>;
  closing: boolean;
  log: (line: string) => void;
  limited: LogLimiter;
  timers: ReturnType<typeof setInterval>[];
}

interface Peer {
  key: string;
  address: string;
  port: number;
  name: string;
  lastSeen: number;
  bucket: TokenBucket;
}

// ------------------------------------------------- 1. one socket, any peer

// A TCP server has a listening socket and one more per connection. A UDP
// server has one socket, and every datagram from every peer arrives on it
// with the sender's address beside it: `from` is all a server knows of who
// is talking. Each receive is exactly one datagram, never part of one.
function serve(state: ServerState): void {
  state.socket.on("message", (data, from) => receive(state, data, from));
  // Deno reports receive errors here; an EventEmitter with no "error"
  // listener would throw them and end the process.
  state.socket.on("error", (error) => state.limited("error", `! socket error: ${error.message}`));
  if (state.mode === "chat" && state.idleTimeoutMs > 0) {
    const every = Math.min(1000, state.idleTimeoutMs / 4);
    state.timers.push(setInterval(() => forgetSilentPeers(state, Date.now()), every));
  }
}

function receive(state: ServerState, data: Uint8Array, from: dgram.RemoteInfo): void {
  if (state.closing || isForgedSource(state, from)) return;
  const number = ++state.received;
  if (dropOnPurpose(state, number, data, from)) return;
  if (state.mode === "chat") chatDatagram(state, data, from);
  else echoDatagram(state, data, from);
}

// ------------------------------------------------------------ 2. echo

// No framing and no connection: the datagram is already the message, and
// its sender's address is where the answer goes. An empty datagram is a
// datagram too (TCP has no way to send zero bytes), and comes back empty.
function echoDatagram(state: ServerState, data: Uint8Array, from: dgram.RemoteInfo): void {
  if (echoTooFast(state, from, Date.now())) return;
  sendTo(state, data, from.address, from.port);
}

// ------------------------------------------------------------ 3. chat

// There is nothing to accept: a peer is in the room from its first datagram
// and is known by the address and port it sends from. A peer that goes away
// says nothing (it has nothing to close), so silence is the only sign, and
// after --idle-timeout seconds of it the peer is forgotten.
function chatDatagram(state: ServerState, data: Uint8Array, from: dgram.RemoteInfo): void {
  const now = Date.now();
  const key = `${formatHost(from.address)}:${from.port}`;
  const peer = state.peers.get(key) ?? join(state, key, from, now);
  if (!peer) return;
  markSeen(state, peer, now);
  if (tooFast(state, peer, now) || tooLong(state, peer, data)) return;
  const text = chatText(data);
  // An empty datagram relays nothing: it only says "still here".
  if (text !== "") broadcast(state, `${peer.name}: ${text}`);
}

function join(state: ServerState, key: string, from: dgram.RemoteInfo, now: number) {
  if (state.peers.size >= state.maxPeers) {
    roomFull(state, from, now);
    return undefined;
  }
  const peer: Peer = {
    key,
    address: from.address,
    port: from.port,
    name: `guest-${++state.guests}`,
    lastSeen: now,
    bucket: createTokenBucket(CHAT_RATE, CHAT_BURST, now),
  };
  broadcast(state, `* ${peer.name} joined`);
  state.peers.set(key, peer);
  state.log(`+ ${key} joined as ${peer.name}`);
  return peer;
}

// The room is kept in the order peers were last heard from, so the sweep
// reads only the silent ones at its front, and they leave in that order.
function forgetSilentPeers(state: ServerState, now: number): void {
  const seconds = state.idleTimeoutMs / 1000;
  for (const peer of state.peers.values()) {
    if (now - peer.lastSeen < state.idleTimeoutMs) break;
    state.peers.delete(peer.key);
    state.log(`- ${peer.key} (${peer.name}) left: silent for ${seconds} s`);
    // It may be long gone; if not, it learns why it hears nothing more.
    sendText(state, peer, `* you left the room: silent for ${seconds} s (send anything to rejoin)`);
    broadcast(state, `* ${peer.name} left`);
  }
}

// Each chat datagram ends with "\n" so that netcat, which prints bytes as
// they come, shows one per line; udp.ts send prints one per line anyway.
function broadcast(state: ServerState, text: string): void {
  const bytes = encoder.encode(`${text}\n`);
  for (const peer of state.peers.values()) sendTo(state, bytes, peer.address, peer.port);
}

function sendText(state: ServerState, peer: Peer, text: string): void {
  sendTo(state, encoder.encode(`${text}\n`), peer.address, peer.port);
}

// ----------------------------------------------------- 4. loss on purpose

// Real networks lose datagrams (a full queue in a router, radio noise), and
// loopback almost never does: only when a receiver falls behind and its
// socket buffer overflows. --drop throws away that share of the datagrams
// that arrive, before anything else sees them, and logs each one so that a
// learner can match the drop here with the reply missing at the client.
// --seed makes the choice repeatable: the same seed drops the same
// datagrams, by their number in arrival order.
function dropOnPurpose(
  state: ServerState,
  number: number,
  data: Uint8Array,
  from: dgram.RemoteInfo,
): boolean {
  if (state.dropRate === 0 || state.random() >= state.dropRate) return false;
  state.limited(
    "drop",
    `- dropped datagram #${number} from ${formatHost(from.address)}:${from.port} on purpose ` +
      `(--drop ${state.dropRate}): ${preview(data)}`,
    LOG_DROPS_PER_WINDOW,
  );
  return true;
}

// mulberry32: a tiny seeded generator of numbers in [0, 1). Not for secrets;
// for a drop pattern that a test, or a second run, can repeat.
function mulberry32(seed: number): () => number {
  let state = seed | 0;
  return () => {
    state = (state + 0x6d2b79f5) | 0;
    let t = Math.imul(state ^ (state >>> 15), state | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

// ------------------------------------------------------------ 5. the client

interface Exchange {
  socket: dgram.Socket;
  /** Where replies must come from: the server's address, as resolved. */
  server: { address: string; port: number };
  sent: number;
  replies: number;
  refused: boolean;
  /** The --allow-net value this exchange needs, for a permission error. */
  allow: string;
  /** Called on every reply or error, to wake whoever waits for one. */
  wake: () => void;
}

// `connect` on a UDP socket sends nothing: it only fixes the address that
// `send` goes to. Where the runtime really connects the socket (Node.js
// does), the kernel also hands it the ICMP "port unreachable" that a closed
// port answers with, as ECONNREFUSED on the next receive; an unconnected
// socket never hears of it. Deno 2.9.6 only remembers the address (no
// connect(2): denoland/deno#36492 would add it), so here a closed port looks
// exactly like a lost datagram, and the client can only say "no reply".
async function startExchange(
  socket: dgram.Socket,
  hostname: string,
  port: number,
  allow: string,
) {
  try {
    await new Promise<void>((resolve, reject) => {
      socket.once("error", reject);
      // Node.js reports a failed lookup as an "error" event, Deno to this callback.
      socket.connect(port, hostname, (error?: Error) => {
        socket.off("error", reject);
        if (error) reject(error);
        else resolve();
      });
    });
  } catch (error) {
    throw bindError(error as Error & { code?: string });
  }
  const exchange: Exchange = {
    socket,
    server: socket.remoteAddress(),
    sent: 0,
    replies: 0,
    refused: false,
    allow,
    wake: () => {},
  };
  socket.on("error", (error: Error & { code?: string }) => {
    if (error.code === "ECONNREFUSED") exchange.refused = true;
    exchange.wake();
  });
  return exchange;
}

// Anyone can send a datagram to our port: only what comes from the server's
// address and port is a reply. (A connected socket would filter the others
// out in the kernel; Deno 2.9.6's hands them to us.)
function isReply(exchange: Exchange, from: dgram.RemoteInfo): boolean {
  return from.address === exchange.server.address && from.port === exchange.server.port;
}

// A datagram goes out whole or not at all. One that is bigger than a UDP
// datagram can be (65,507 bytes over IPv4) is refused by the kernel with
// EMSGSIZE, and nothing of it leaves. Smaller ones that are bigger than the
// path's MTU (1,500 bytes on most Ethernet) leave as IP fragments, and the
// loss of any fragment loses the whole datagram.
function sendDatagram(exchange: Exchange, bytes: Uint8Array, number: number): Promise<void> {
  return new Promise((resolve, reject) => {
    exchange.socket.send(
      bytes,
      (error) => error ? reject(sendError(error, bytes, number, exchange.allow)) : resolve(),
    );
  });
}

// Nothing says a reply will come, so the client waits a while and then
// counts what did not come back: lost on the way there or back, dropped by
// the server, or never heard because nobody listens. UDP does not say which.
async function awaitReplies(exchange: Exchange, timeoutMs: number): Promise<void> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timedOut = new Promise<true>((resolve) =>
    timer = setTimeout(() => resolve(true), timeoutMs)
  );
  try {
    while (!exchange.refused && exchange.replies < exchange.sent) {
      const woken = new Promise<false>((resolve) => exchange.wake = () => resolve(false));
      if (await Promise.race([woken, timedOut])) break;
    }
  } finally {
    clearTimeout(timer);
  }
}

// Sends each message as it comes (a line typed, say), and stops early if an
// ICMP error says nobody is listening.
async function sendAll(
  exchange: Exchange,
  messages: Iterable<string | Uint8Array> | AsyncIterable<string | Uint8Array>,
): Promise<void> {
  const iterator = Symbol.asyncIterator in messages
    ? messages[Symbol.asyncIterator]()
    : messages[Symbol.iterator]();
  const refused = new Promise<{ done: true; value: undefined }>((resolve) => {
    exchange.socket.on(
      "error",
      () => exchange.refused && resolve({ done: true, value: undefined }),
    );
  });
  try {
    for (;;) {
      const next = await Promise.race([iterator.next(), refused]);
      if (next.done || exchange.refused) break;
      const bytes = typeof next.value === "string" ? encoder.encode(next.value) : next.value;
      await sendDatagram(exchange, bytes, ++exchange.sent);
    }
  } finally {
    await iterator.return?.();
  }
}

// ------------------------------------------------- 6. limits and bookkeeping

interface TokenBucket {
  /** Takes one token if there is one; false means over the rate. */
  take(now: number): boolean;
}

// `rate` tokens a second, at most `burst` saved up: a peer may be quick for a
// moment, but never fast for long.
function createTokenBucket(rate: number, burst: number, now: number): TokenBucket {
  let tokens = burst;
  let last = now;
  return {
    take(now: number) {
      tokens = Math.min(burst, tokens + (now - last) * rate / 1000);
      last = now;
      if (tokens < 1) return false;
      tokens -= 1;
      return true;
    },
  };
}

// A datagram's source address is only a field its sender filled in. Port 0
// is no port anyone can send from, so it is forged, and cannot be answered
// (node:dgram throws on a send to it). One that names this very socket
// would have the server answer itself, and then its own answer, for ever.
function isForgedSource(state: ServerState, from: dgram.RemoteInfo): boolean {
  return from.port === 0 || from.port === state.own.port &&
      (from.address === state.own.address || isWildcard(state.own.address));
}

// An echo server answers whatever address a datagram names, and that can be
// forged to name another echo server: the two then answer each other for
// ever, at full speed (the old UDP echo and chargen loop). Answering one
// address at most ECHO_RATE a second breaks the loop, and keeps one fast
// peer from filling the send queue that every other peer's answers need.
function echoTooFast(state: ServerState, from: dgram.RemoteInfo, now: number): boolean {
  const key = `${formatHost(from.address)}:${from.port}`;
  const bucket = state.echoSenders.get(key) ?? createTokenBucket(ECHO_RATE, ECHO_BURST, now);
  // Deleting and setting again keeps the Map least recently heard from first.
  state.echoSenders.delete(key);
  state.echoSenders.set(key, bucket);
  if (state.echoSenders.size > MAX_ECHO_SENDERS) {
    state.echoSenders.delete(state.echoSenders.keys().next().value!);
  }
  if (bucket.take(now)) return false;
  state.limited("fast", `- ${key} sends over ${ECHO_RATE} datagrams a second: not echoed`);
  return true;
}

function markSeen(state: ServerState, peer: Peer, now: number): void {
  peer.lastSeen = now;
  // Deleting and setting again moves the peer to the end of the Map's order.
  state.peers.delete(peer.key);
  state.peers.set(peer.key, peer);
}

// A peer over its rate loses the datagram, as a congested network would
// lose it; every other peer's share of the room is untouched.
function tooFast(state: ServerState, peer: Peer, now: number): boolean {
  if (peer.bucket.take(now)) return false;
  state.limited(
    "fast",
    `- ${peer.key} (${peer.name}) sends over ${CHAT_RATE} datagrams a second: dropped`,
  );
  return true;
}

// Every chat datagram is sent on to every peer: a big one is refused, and
// its sender told, in a datagram smaller than the one it sent.
function tooLong(state: ServerState, peer: Peer, data: Uint8Array): boolean {
  if (data.length <= MAX_CHAT_TEXT) return false;
  sendText(state, peer, `* error: message too long (max ${MAX_CHAT_TEXT} bytes)`);
  return true;
}

// A stranger's datagram when the room is full. There is no connection to
// refuse, so the answer is a datagram, and answers to strangers are rate
// limited: a sender's address can be forged, and a server must not be made
// to flood whoever it names.
function roomFull(state: ServerState, from: dgram.RemoteInfo, now: number): void {
  const where = `${formatHost(from.address)}:${from.port}`;
  state.limited("full", `- ${where}: room full (max ${state.maxPeers} peers), not let in`);
  if (!state.roomFullAnswers.take(now)) return;
  const text = `* error: room full (max ${state.maxPeers} peers), try again later\n`;
  sendTo(state, encoder.encode(text), from.address, from.port);
}

function sendTo(state: ServerState, data: Uint8Array, address: string, port: number): void {
  if (state.closing) return;
  if (state.pendingSends >= MAX_PENDING_SENDS) {
    state.limited("queue", `! ${MAX_PENDING_SENDS} datagrams waiting to be sent: dropping more`);
    return;
  }
  state.pendingSends++;
  try {
    state.socket.send(data, port, address, (error) => {
      state.pendingSends--;
      if (error && !state.closing) sendFailed(state, error, address, port);
    });
  } catch (error) {
    // node:dgram throws, rather than calls back, for a port it cannot send to.
    state.pendingSends--;
    sendFailed(state, error as Error, address, port);
  }
}

function sendFailed(state: ServerState, error: Error, address: string, port: number): void {
  const where = `${formatHost(address)}:${port}`;
  const permission = Deno.permissions.querySync({ name: "net", host: where }).state;
  const why = permission === "granted"
    ? error.message
    : `permission denied (run with --allow-net=${formatHost(address)}: ` +
      "a UDP server answers each peer at its own port)";
  state.limited("send", `! cannot send to ${where}: ${why}`);
}

// Chat text: UTF-8 (bytes that are not become U+FFFD), one line ending
// dropped (netcat sends one), and no control characters.
function chatText(data: Uint8Array): string {
  return sanitizeChatText(decoder.decode(data).replace(/\r?\n$/, ""));
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

// Anything a peer chose (here: the bytes of a datagram) is escaped before it
// reaches a log line or a terminal: no newline can forge a line, no ESC can
// move the cursor, no bidi override can reorder what the operator reads.
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

// The start of a datagram, for a log line: what was lost, and how big it was.
function preview(data: Uint8Array): string {
  const text = decoder.decode(data.subarray(0, 40));
  return `"${escapeControls(text)}"${data.length > 40 ? "…" : ""} (${data.length} bytes)`;
}

/** Logs a line, or counts it when one of its kind was logged in this window. */
interface LogLimiter {
  (kind: string, line: string, perWindow?: number): void;
  /** Prints the summary of every kind that was counted, and starts afresh. */
  flush(): void;
}

// The same kind of line repeated is printed the first time (or the first
// `perWindow` times), then counted; once per window, or at close, one line
// says how many more there were. A flood cannot flood the log.
function createLogLimiter(log: (line: string) => void): LogLimiter {
  const kinds = new Map<string, { first: string; since: number; printed: number; more: number }>();
  function summarise(kind: string) {
    const entry = kinds.get(kind)!;
    kinds.delete(kind);
    if (entry.more > 0) {
      log(`${entry.first} (and ${entry.more} more like it in the last ${LOG_WINDOW_MS / 1000} s)`);
    }
  }
  const limiter = (kind: string, line: string, perWindow = 1) => {
    const now = Date.now();
    const entry = kinds.get(kind);
    if (entry && now - entry.since >= LOG_WINDOW_MS) summarise(kind);
    const current = kinds.get(kind);
    if (!current) {
      kinds.set(kind, { first: line, since: now, printed: 1, more: 0 });
      log(line);
    } else if (current.printed < perWindow) {
      current.printed++;
      log(line);
    } else {
      current.more++;
    }
  };
  limiter.flush = () => {
    for (const kind of [...kinds.keys()]) summarise(kind);
  };
  return limiter;
}

// Deno checks net permission for a bind inside node:dgram, and a refusal
// there is an uncaught error with a stack trace; asking first turns it into
// one clear line.
function checkNetPermission(host: string | undefined, advice: string): void {
  const descriptor = host === undefined ? { name: "net" as const } : { name: "net" as const, host };
  let { state } = Deno.permissions.querySync(descriptor);
  if (state === "prompt") state = Deno.permissions.requestSync(descriptor).state;
  if (state !== "granted") throw new Deno.errors.NotCapable(`permission denied (${advice})`);
}

function isWildcard(hostname: string): boolean {
  return hostname === "0.0.0.0" || hostname === "::" || hostname === "[::]";
}

function socketType(hostname: string): "udp4" | "udp6" {
  return hostname.includes(":") ? "udp6" : "udp4";
}

// The client binds where it can reach the server from: loopback for a
// loopback server (so that --allow-net=127.0.0.1 is enough), else anywhere.
function localAddressFor(hostname: string): string {
  if (hostname === "localhost" || hostname.startsWith("127.")) return "127.0.0.1";
  if (hostname === "::1") return "::1";
  return hostname.includes(":") ? "::" : "0.0.0.0";
}

async function bindSocket(hostname: string, port: number): Promise<dgram.Socket> {
  const socket = dgram.createSocket(socketType(hostname));
  try {
    await new Promise<void>((resolve, reject) => {
      socket.once("error", reject);
      socket.bind(port, hostname, () => {
        socket.off("error", reject);
        resolve();
      });
    });
  } catch (error) {
    await closeSocket(socket);
    throw bindError(error as Error & { code?: string });
  }
  return socket;
}

function closeSocket(socket: dgram.Socket): Promise<void> {
  return new Promise((resolve) => {
    try {
      socket.close(() => resolve());
    } catch {
      resolve(); // Already closed.
    }
  });
}

// node:dgram reports errors by code; the rest of the project, and Deno,
// by class.
function bindError(error: Error & { code?: string }): Error {
  switch (error.code) {
    case "EADDRINUSE":
      return new Deno.errors.AddrInUse(error.message);
    case "EADDRNOTAVAIL":
      return new Deno.errors.AddrNotAvailable(error.message);
    case "ENOTFOUND":
    case "EAI_AGAIN":
      return new Deno.errors.NotFound("unknown host (check --host)");
    case "EACCES":
      return new Deno.errors.PermissionDenied(error.message);
    default:
      return error;
  }
}

function sendError(
  error: Error & { code?: string },
  bytes: Uint8Array,
  number: number,
  allow: string,
): Error {
  if (error.code === "EMSGSIZE") {
    return new DatagramTooBig(
      `datagram ${number} is ${bytes.length} bytes, more than one UDP datagram can carry ` +
        `(${MAX_DATAGRAM_IPV4} over IPv4, ${MAX_DATAGRAM_IPV6} over IPv6): ` +
        "the kernel refused it (EMSGSIZE) and nothing of it was sent",
    );
  }
  if (error.code === "ENOTFOUND" || error.code === "EAI_AGAIN") {
    return new Deno.errors.NotFound("unknown host (check --host)");
  }
  if (error.code === "EPERM" || /UNKNOWN/.test(error.message)) {
    return new Deno.errors.NotCapable(`permission denied (run with --allow-net=${allow})`);
  }
  return error;
}

function formatHost(hostname: string): string {
  return hostname.includes(":") ? `[${hostname}]` : hostname;
}

// ------------------------------------------------------------ the API

/** What the server does with the datagrams it receives. */
export type Mode = "echo" | "chat";

/** Options for {@linkcode startUdpServer}. */
export interface UdpServerOptions {
  /** Address to bind. Default `127.0.0.1` (this machine only). */
  hostname?: string;
  /** Port to bind; `0` picks a free one (read it back from `addr`). Default 9002. */
  port?: number;
  /** `echo` (default) sends each datagram back; `chat` relays it to every peer as text. */
  mode?: Mode;
  /** Share of incoming datagrams to drop on purpose, 0 to 1. Default 0. */
  drop?: number;
  /** Seed for the drop choices; the same seed drops the same datagrams. Default random. */
  seed?: number;
  /** Chat: seconds of silence after which a peer is forgotten; 0 = never. Default 60. */
  idleTimeout?: number;
  /** Chat: peers in the room at once; a stranger past it gets "room full". Default 1000. */
  maxPeers?: number;
  /** Where events go (joins, leaves, drops, errors). Default `console.error`. */
  log?: (line: string) => void;
}

/** A running server, returned by {@linkcode startUdpServer}. */
export interface UdpServer extends AsyncDisposable {
  /** The address actually bound (with the real port when you asked for 0). */
  readonly addr: Deno.NetAddr;
  /** The seed the drop choices use (given or drawn): pass it again to repeat them. */
  readonly seed: number;
  /** Chat: peers in the room right now. */
  readonly peers: number;
  /** Stops receiving and closes the socket. Nobody is told: there is nobody to tell. */
  close(): Promise<void>;
}

/**
 * Starts a UDP echo or chat server; it serves in the background until
 * `close()`.
 *
 * @example Echo one datagram
 * ```ts
 * await using server = await startUdpServer({ port: 0, log: () => {} });
 * const replies: Uint8Array[] = [];
 * await sendDatagrams({ port: server.addr.port, messages: ["hi"], onReply: (d) => replies.push(d) });
 * // replies holds one datagram: "hi"
 * ```
 *
 * @throws {Deno.errors.AddrInUse} when the port is taken.
 * @throws {Deno.errors.NotCapable} without `--allow-net` for the host.
 */
export async function startUdpServer(options: UdpServerOptions = {}): Promise<UdpServer> {
  const hostname = options.hostname ?? DEFAULT_HOSTNAME;
  const port = options.port ?? DEFAULT_PORT;
  if (isWildcard(hostname)) {
    checkNetPermission(undefined, "run with -N: a server on every interface answers any address");
  } else {
    checkNetPermission(
      formatHost(hostname),
      `run with --allow-net=${
        formatHost(hostname)
      }: a UDP server answers each peer at its own port`,
    );
  }
  const socket = await bindSocket(hostname, port);
  const seed = options.seed ?? crypto.getRandomValues(new Uint32Array(1))[0];
  const log = options.log ?? console.error;
  const { address, port: boundPort } = socket.address();
  const state: ServerState = {
    socket,
    own: { address, port: boundPort },
    mode: options.mode ?? "echo",
    dropRate: options.drop ?? 0,
    random: mulberry32(seed),
    idleTimeoutMs: (options.idleTimeout ?? DEFAULT_IDLE_TIMEOUT) * 1000,
    maxPeers: options.maxPeers ?? DEFAULT_MAX_PEERS,
    peers: new Map(),
    guests: 0,
    received: 0,
    pendingSends: 0,
    roomFullAnswers: createTokenBucket(ROOM_FULL_RATE, ROOM_FULL_RATE, Date.now()),
    echoSenders: new Map(),
    closing: false,
    log,
    limited: createLogLimiter(log),
    timers: [],
  };
  state.timers.push(setInterval(() => state.limited.flush(), LOG_WINDOW_MS));
  serve(state);
  let closed: Promise<void> | undefined;
  function close() {
    state.closing = true;
    for (const timer of state.timers) clearInterval(timer);
    state.limited.flush();
    return closeSocket(socket);
  }
  return {
    addr: { transport: "udp", hostname: address, port: boundPort },
    seed,
    get peers() {
      return state.peers.size;
    },
    close: () => closed ??= close(),
    [Symbol.asyncDispose]: () => closed ??= close(),
  };
}

/** Options for {@linkcode sendDatagrams}. */
export interface UdpSendOptions {
  /** Server to send to. Default `127.0.0.1`. */
  hostname?: string;
  /** Server port. Default 9002. */
  port?: number;
  /** One datagram each, in order (a string as UTF-8), e.g. the lines of stdin. */
  messages: Iterable<string | Uint8Array> | AsyncIterable<string | Uint8Array>;
  /** Milliseconds to wait for replies after the last datagram. Default 1000. */
  timeout?: number;
  /** Called with each datagram that comes back from the server, whole. */
  onReply: (data: Uint8Array) => void;
}

/** How an exchange went. */
export interface UdpSendResult {
  /** Datagrams sent. */
  sent: number;
  /** Datagrams that came back from the server's address. */
  replies: number;
  /** Sent minus replies, at least 0: the ones that got no answer within the timeout. */
  missing: number;
  /** An ICMP "port unreachable" said nobody listens (only where the runtime can tell). */
  refused: boolean;
}

/**
 * Sends each message as one datagram to a UDP server, passes every datagram
 * that comes back to `onReply`, and resolves once as many have come back as
 * were sent, or `timeout` ms after the last one. Lost datagrams are not an
 * error: they are counted in `missing`.
 *
 * @example Two datagrams to an echo server
 * ```ts
 * await using server = await startUdpServer({ port: 0, log: () => {} });
 * const result = await sendDatagrams({
 *   port: server.addr.port,
 *   messages: ["hello", new Uint8Array([0, 255])],
 *   onReply: (data) => console.log(data),
 * });
 * // result is { sent: 2, replies: 2, missing: 0, refused: false }
 * ```
 *
 * @throws {DatagramTooBig} for a message over 65,507 bytes (IPv4); nothing of it is sent.
 * @throws {Deno.errors.NotCapable} without `--allow-net` for the server's host.
 */
export async function sendDatagrams(options: UdpSendOptions): Promise<UdpSendResult> {
  const hostname = options.hostname ?? DEFAULT_HOSTNAME;
  const port = options.port ?? DEFAULT_PORT;
  const local = localAddressFor(hostname);
  const allow = [
    ...new Set([local === "127.0.0.1" || local === "::1" ? local : `${local}:0`, hostname]),
  ]
    .map(formatHost).join(",");
  checkNetPermission(`${formatHost(local)}:0`, `run with --allow-net=${allow}`);
  const socket = await bindSocket(local, 0);
  try {
    const exchange = await startExchange(socket, hostname, port, allow);
    socket.on("message", (data: Uint8Array, from) => {
      if (!isReply(exchange, from)) return;
      exchange.replies++;
      // A plain Uint8Array, not node:dgram's Buffer subclass.
      options.onReply(new Uint8Array(data.buffer, data.byteOffset, data.byteLength));
      exchange.wake();
    });
    await sendAll(exchange, options.messages);
    await awaitReplies(exchange, options.timeout ?? DEFAULT_TIMEOUT_MS);
    const { sent, replies, refused } = exchange;
    return { sent, replies, missing: Math.max(0, sent - replies), refused };
  } finally {
    await closeSocket(socket);
  }
}

/** A message too big for one UDP datagram; the kernel sent nothing of it. */
export class DatagramTooBig extends Error {
  override name = "DatagramTooBig";
}

// ---------------------------------------------------------------- command line

const USAGE = `Usage: udp.ts serve [options]
       udp.ts send [options] [MESSAGE ...]

UDP datagrams, both ends. "serve" runs an echo (default) or chat server and
prints "listening on udp://HOST:PORT". "send" sends each MESSAGE as one
datagram and prints every reply; without MESSAGEs, one datagram per line you
type (Ctrl-D ends, Ctrl-C quits). Replies that do not come back within
--timeout are counted, and make the exit code 1.

Serve options:
  --host HOST             address to bind (default ${DEFAULT_HOSTNAME}; 0.0.0.0 = every interface)
  --port PORT             port to bind, 0 = any free port (default ${DEFAULT_PORT})
  --mode echo|chat        send each datagram back, or relay it to every peer (default echo)
  --drop RATE             drop this share of incoming datagrams on purpose, 0 to 1 (default 0)
  --seed N                seed for --drop, to drop the same datagrams again (default random)
  --idle-timeout SECONDS  chat: forget a peer silent this long, 0 = never (default ${DEFAULT_IDLE_TIMEOUT})
  --max-peers N           chat: peers in the room at once (default ${DEFAULT_MAX_PEERS})
  --quiet                 no log on stderr

Send options:
  --host HOST             server address (default ${DEFAULT_HOSTNAME})
  --port PORT             server port (default ${DEFAULT_PORT})
  --timeout MS            wait this long for replies after the last datagram (default ${DEFAULT_TIMEOUT_MS})

  -h, --help              show this help`;

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

const COMMON_OPTIONS = {
  host: { type: "string", default: DEFAULT_HOSTNAME },
  port: { type: "string", default: String(DEFAULT_PORT) },
  help: { type: "boolean", short: "h", default: false },
} as const;

function parseServeArgs(args: string[]) {
  let parsed;
  try {
    parsed = parseArgs({
      args,
      strict: true,
      options: {
        ...COMMON_OPTIONS,
        mode: { type: "string", default: "echo" },
        drop: { type: "string", default: "0" },
        seed: { type: "string" },
        "idle-timeout": { type: "string", default: String(DEFAULT_IDLE_TIMEOUT) },
        "max-peers": { type: "string", default: String(DEFAULT_MAX_PEERS) },
        quiet: { type: "boolean", default: false },
      },
    }).values;
  } catch (error) {
    throw new UsageError(parseArgsMessage(error as Error));
  }
  const mode = parsed.mode;
  if (mode !== "echo" && mode !== "chat") {
    throw new UsageError(`--mode must be echo or chat, got "${mode}"`);
  }
  return {
    hostname: parsed.host,
    port: integerOption("--port", parsed.port, 0, 65535),
    mode: mode as Mode,
    drop: rateOption("--drop", parsed.drop),
    seed: parsed.seed === undefined
      ? undefined
      : integerOption("--seed", parsed.seed, 0, 2 ** 32 - 1),
    idleTimeout: integerOption("--idle-timeout", parsed["idle-timeout"], 0),
    maxPeers: integerOption("--max-peers", parsed["max-peers"], 1),
    quiet: parsed.quiet,
    help: parsed.help,
  };
}

function parseSendArgs(args: string[]) {
  let parsed;
  try {
    parsed = parseArgs({
      args,
      strict: true,
      allowPositionals: true,
      options: {
        ...COMMON_OPTIONS,
        timeout: { type: "string", default: String(DEFAULT_TIMEOUT_MS) },
      },
    });
  } catch (error) {
    throw new UsageError(parseArgsMessage(error as Error));
  }
  const { host, port, timeout, help } = parsed.values;
  return {
    hostname: host,
    port: integerOption("--port", port, 1, 65535),
    timeout: integerOption("--timeout", timeout, 1),
    help,
    messages: parsed.positionals,
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

function rateOption(name: string, text: string): number {
  const value = Number(text);
  if (!/^(\d+(\.\d*)?|\.\d+)$/.test(text) || value > 1) {
    throw new UsageError(
      `${name} must be a number from 0 to 1 (a share, 0.25 = a quarter), got "${text}"`,
    );
  }
  return value;
}

// stdin is a byte stream like any other: cut it into lines, one datagram each.
async function* readLines(stream: ReadableStream<Uint8Array>): AsyncGenerator<string> {
  let pending = "";
  for await (const text of stream.pipeThrough(new TextDecoderStream())) {
    const lines = (pending + text).split("\n");
    pending = lines.pop()!;
    for (const line of lines) yield line.endsWith("\r") ? line.slice(0, -1) : line;
  }
  if (pending) yield pending;
}

// One datagram, one line: text as text (one line ending dropped, since the
// chat adds one), anything else as its size. Escaped, since a peer chose it.
function show(data: Uint8Array): void {
  let text;
  try {
    text = strictDecoder.decode(data);
  } catch {
    console.log(`<binary ${data.length} bytes>`);
    return;
  }
  console.log(escapeControls(text.replace(/\r?\n$/, "")));
}

async function main(args: string[]): Promise<number> {
  const [command, ...rest] = args;
  try {
    if (command === "serve") return await serveCommand(parseServeArgs(rest));
    if (command === "send") return await sendCommand(parseSendArgs(rest));
    if (command === "-h" || command === "--help") {
      console.log(USAGE);
      return 0;
    }
    throw new UsageError(
      command === undefined
        ? 'say what to do: "serve" (a server) or "send" (a client)'
        : `unknown command "${escapeControls(command)}": use "serve" or "send"`,
    );
  } catch (error) {
    if (!(error instanceof UsageError)) throw error;
    console.error(`udp: ${error.message}\n\n${USAGE}`);
    return 2;
  }
}

async function serveCommand(options: ReturnType<typeof parseServeArgs>): Promise<number> {
  if (options.help) {
    console.log(USAGE);
    return 0;
  }
  const address = `${formatHost(options.hostname)}:${options.port}`;
  const log = options.quiet ? () => {} : console.error;
  let server: UdpServer;
  try {
    server = await startUdpServer({ ...options, log });
  } catch (error) {
    console.error(`udp: cannot listen on udp://${address}: ${startError(error, options.port)}`);
    return 1;
  }
  // Listening for the signals before saying "listening": whoever reads that
  // line may signal at once.
  const stop = Promise.withResolvers<void>();
  for (const signal of ["SIGINT", "SIGTERM"] as const) {
    if (Deno.build.os !== "windows" || signal === "SIGINT") {
      Deno.addSignalListener(signal, stop.resolve);
    }
  }
  console.log(`listening on udp://${formatHost(server.addr.hostname)}:${server.addr.port}`);
  if (options.drop > 0) {
    log(
      `dropping ${Number((options.drop * 100).toPrecision(3))}% of incoming datagrams on purpose ` +
        `(--drop ${options.drop} --seed ${server.seed} repeats this run's choices)`,
    );
  }
  await stop.promise;
  // Closing is quick; the timer guarantees the process is gone within a second.
  setTimeout(() => Deno.exit(0), SHUTDOWN_MS);
  await server.close();
  return 0;
}

function startError(error: unknown, port: number): string {
  if (error instanceof Deno.errors.AddrInUse) {
    return "address already in use (is another server running? try --port 0 for any free port)";
  }
  if (error instanceof Deno.errors.NotCapable) return error.message;
  if (error instanceof Deno.errors.PermissionDenied) {
    return "permission denied" + (port > 0 && port < 1024 ? " (ports below 1024 need root)" : "");
  }
  if (error instanceof Deno.errors.AddrNotAvailable) return "that address is not on this machine";
  if (error instanceof Deno.errors.NotFound) return "unknown host (check --host)";
  return error instanceof Error ? error.message : String(error);
}

async function sendCommand(options: ReturnType<typeof parseSendArgs>): Promise<number> {
  if (options.help) {
    console.log(USAGE);
    return 0;
  }
  const { hostname, port, timeout, messages } = options;
  const server = `udp://${formatHost(hostname)}:${port}`;
  let result;
  try {
    result = await sendDatagrams({
      hostname,
      port,
      timeout,
      messages: messages.length > 0 ? messages : readLines(Deno.stdin.readable),
      onReply: show,
    });
  } catch (error) {
    console.error(`udp: ${server}: ${error instanceof Error ? error.message : String(error)}`);
    return 1;
  }
  if (result.refused) {
    console.error(`udp: nobody is listening on ${server} (ICMP port unreachable)`);
    return 1;
  }
  if (result.missing > 0) {
    console.error(
      `udp: ${server}: no reply to ${result.missing} of ${result.sent} datagrams within ${timeout} ms ` +
        "(lost, dropped, or nobody is listening: UDP does not say which)",
    );
    return 1;
  }
  return 0;
}

if (import.meta.main) Deno.exit(await main(Deno.args));
