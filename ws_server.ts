/**
 * ws_server.ts: a WebSocket echo and chat server on `Deno.serve` and
 * `Deno.upgradeWebSocket`, which also serves a browser client at `/`.
 *
 * What it shows: a WebSocket starts life as an HTTP/1.1 request carrying
 * `Upgrade: websocket` and a random `Sec-WebSocket-Key`; the server answers
 * `101 Switching Protocols` with `Sec-WebSocket-Accept` (the key, hashed), and
 * from then on the same TCP connection carries *frames*, not a byte stream.
 * So, unlike `tcp_server.ts`, this server never splits or joins anything:
 * each `message` event is exactly one message the peer sent, text or binary.
 * It also shows close codes, ping/pong to find dead peers, backpressure
 * through `bufferedAmount`, and what a server must check before it says 101.
 *
 * Read it in this order:
 *
 *     1. A WebSocket starts as an HTTP request     startWsServer, handleRequest
 *     2. The upgrade: check, then 101              upgrade
 *     3. Messages arrive whole: echo               serveSocket, echoMessage
 *     4. Chat: one message to everyone             chatMessage, broadcast
 *     5. Ending: close codes and the handshake     leave, close
 *     6. What Deno does for you here               frames, masking, the accept key
 *     7. Limits and bookkeeping                    the checks, the bounds, Deno's quirks
 *     8. The API's types                           WsServerOptions, WsServer
 *     9. The command line                          main
 *    10. The browser page                          page
 *
 * Run it (least privilege, from a checkout or straight from its URL):
 *
 *     deno run --allow-net=127.0.0.1:8080 ws_server.ts
 *     deno run --allow-net=127.0.0.1:8080 ws_server.ts --mode chat
 *     deno run -N https://raw.githubusercontent.com/OWNER/REPO/main/ws_server.ts
 *
 * Then open http://127.0.0.1:8080/ in a browser, or poke it by hand: the
 * upgrade is plain HTTP, so even `nc` shows the handshake.
 *
 *     deno run -N ws_client.ts hello
 *     printf 'GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n'\
 *     'Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n' | nc 127.0.0.1 8080
 *
 * @module
 */

import { parseArgs } from "node:util";

const DEFAULT_HOSTNAME = "127.0.0.1";
const DEFAULT_PORT = 8080;
const DEFAULT_MAX_MESSAGE = 1024 * 1024;
const DEFAULT_MAX_QUEUE = 2 * 1024 * 1024;
const DEFAULT_MAX_CONNECTIONS = 8192;

// Seconds of silence before a peer is dropped. Deno pings a peer silent for
// half of it; one that has sent nothing, not even the pong, by the end is
// dead (a cable pulled, a laptop asleep) and is closed with 1001. TCP alone
// would not notice for hours. Deno counts only whole messages and pongs as
// signs of life, not pings or the fragments of a message still arriving.
const DEFAULT_IDLE_TIMEOUT = 30;

// A line a peer can make us repeat is printed once per this window, then
// counted and summed up.
const LOG_WINDOW_MS = 20_000;

// How long peers get to answer our close frame on shutdown.
const CLOSE_GRACE_MS = 500;

// Close codes (RFC 6455, section 7.4.1).
const GOING_AWAY = 1001;
const UNSUPPORTED_DATA = 1003;
const POLICY_VIOLATION = 1008;
const MESSAGE_TOO_BIG = 1009;

const encoder = new TextEncoder();

// -------------------------------- 1. a WebSocket starts as an HTTP request

/**
 * Starts a WebSocket echo or chat server (plus the browser page at `/`) and
 * returns at once; it serves in the background until `close()`.
 *
 * @example Echo one message
 * ```ts
 * import assert from "node:assert/strict";
 *
 * await using server = startWsServer({ port: 0, log: () => {} });
 * const ws = new WebSocket(`ws://127.0.0.1:${server.addr.port}/`);
 * const closed = new Promise((resolve) => ws.onclose = resolve);
 * await new Promise((resolve) => ws.onopen = resolve);
 * ws.send("hi");
 * const reply = await new Promise((resolve) => ws.onmessage = (event) => resolve(event.data));
 * assert.equal(reply, "hi");
 * ws.close();
 * await closed;
 * ```
 *
 * @throws {Deno.errors.AddrInUse} when the port is taken.
 * @throws {Deno.errors.NotCapable} without `--allow-net` for the address.
 */
export function startWsServer(options: WsServerOptions = {}): WsServer {
  const state = initialState(options);
  // Deno.serve is an HTTP server: every WebSocket begins as one of its requests.
  const http = serveHttp(state, {
    hostname: options.hostname ?? DEFAULT_HOSTNAME,
    port: options.port ?? DEFAULT_PORT,
    ...options.tls,
  });
  survivingDenoWebSocketFailures(state);
  let closed: Promise<void> | undefined;
  // The close handshake: we send 1001, each peer answers with its own close
  // frame. Peers get a moment to answer; then the server shuts down anyway.
  async function close() {
    state.closing = true;
    if (state.clients.size === 0) state.allGone.resolve();
    for (const { socket } of state.clients) closeSocket(socket, GOING_AWAY, "server shutting down");
    let timer;
    await Promise.race([
      state.allGone.promise,
      new Promise((resolve) => timer = setTimeout(resolve, CLOSE_GRACE_MS)),
    ]);
    clearTimeout(timer);
    await http.shutdown();
    stopSurviving(state);
    state.repeats.close();
  }
  return {
    addr: http.addr,
    get connections() {
      return state.clients.size;
    },
    close: () => closed ??= close(),
    [Symbol.asyncDispose]: () => closed ??= close(),
  };
}

function handleRequest(
  state: ServerState,
  request: Request,
  info: Deno.ServeHandlerInfo,
): Response {
  // remoteAddr can only be read while the request is being handled.
  const { hostname, port } = info.remoteAddr as Deno.NetAddr;
  const peer = `${hostname}:${port}`;
  const url = addressedUrl(request);
  if (!url) return refuse(state, peer, addressRefusal(request));
  // Header values are case-insensitive: "WebSocket" is as valid as "websocket".
  if (request.headers.get("upgrade")?.toLowerCase() === "websocket") {
    return upgrade(state, request, { peer, url });
  }
  if ((request.method === "GET" || request.method === "HEAD") && url.pathname === "/") {
    // The page speaks the browser's language (Accept-Language), English by default.
    const lang = pageLanguage(request.headers.get("accept-language"));
    return new Response(page(state.mode, lang), { headers: pageHeaders(lang) });
  }
  const secure = url.protocol === "https:";
  return plain(
    404,
    `not found: the browser client is at ${secure ? "https" : "http"}://${url.host}/ ` +
      `and the WebSocket endpoint is ${secure ? "wss" : "ws"}://${url.host}/`,
  );
}

// ----------------------------------------- 2. the upgrade: check, then 101

// The HTTP upgrade handshake. Everything up to the 101 response is ordinary
// HTTP, which is why a WebSocket server can refuse with a status code (400,
// 403, 426, 503) and a reason, something a raw TCP server can only do by closing.
function upgrade(
  state: ServerState,
  request: Request,
  { peer, url }: { peer: string; url: URL },
): Response {
  const refusal = handshakeRefusal(request) ?? originRefusal(state, request, url) ??
    protocolRefusal(state, request);
  if (refusal) return refuse(state, peer, refusal);
  if (state.closing) return plain(503, "server shutting down");
  if (state.clients.size >= state.maxConnections) {
    return plain(503, `server full (max ${state.maxConnections} connections), try again later`);
  }
  // Read before upgrading: from then on the request's headers are gone.
  const protocol = chosenProtocol(state, request);
  let upgraded;
  try {
    upgraded = Deno.upgradeWebSocket(request, { idleTimeout: state.idleTimeout });
  } catch (error) {
    return refuse(state, peer, {
      status: 400,
      reason: `bad WebSocket handshake: ${(error as Error).message}`,
    });
  }
  // Deno's own `protocol` option looks for the name only between ", ", so
  // it throws for "a,b" (what Node's ws sends); the header is set here.
  if (protocol) upgraded.response.headers.set("sec-websocket-protocol", protocol);
  const client: Client = {
    socket: upgraded.socket,
    peer,
    name: "",
    protocol,
    gone: false,
    left: false,
  };
  state.clients.add(client);
  serveSocket(state, client);
  return upgraded.response;
}

// ------------------------------------------ 3. messages arrive whole: echo

function serveSocket(state: ServerState, client: Client): void {
  const { socket } = client;
  // Binary messages arrive as ArrayBuffer (the browser default is Blob).
  socket.binaryType = "arraybuffer";
  socket.onopen = () => {
    if (state.mode === "chat") join(state, client);
    state.log(
      `+ ${client.peer} connected${client.name ? ` as ${client.name}` : ""}` +
        (client.protocol ? `, protocol ${client.protocol}` : ""),
    );
  };
  socket.onmessage = state.mode === "chat"
    ? (event) => chatMessage(state, client, event.data)
    : (event) => echoMessage(state, client, event.data);
  // No `error` handler: an error (a reset, a missed pong) is always followed
  // by `close`, where the cleanup is. (A no-op error listener is not free
  // either: it measured 3-4 KiB more per idle socket on Deno 2.9.)
  socket.onclose = (event) => leave(state, client, event);
}

// Echo needs no framing: the WebSocket hands us whole messages, and
// `send` keeps text as text and binary as binary.
function echoMessage(state: ServerState, client: Client, data: string | ArrayBuffer): void {
  if (tooBig(state, client, data)) return;
  // `send` never blocks, so a client that sends without reading would have
  // us buffer every echo: the same bound as chat applies.
  if (client.socket.bufferedAmount > state.maxQueue) {
    dropTooSlow(state, client);
    return;
  }
  client.socket.send(data);
}

// ---------------------------------------- 4. chat: one message to everyone

function chatMessage(state: ServerState, client: Client, data: string | ArrayBuffer): void {
  if (tooBig(state, client, data)) return;
  if (typeof data !== "string") {
    closeSocket(client.socket, UNSUPPORTED_DATA, "text messages only");
    return;
  }
  broadcast(state, `${client.name}: ${sanitizeChatText(data)}`);
}

// A newcomer learns its own name from a notice of its own ("* " lines are
// the server speaking), and everyone else from the join.
function join(state: ServerState, client: Client): void {
  client.name = `guest-${++state.guests}`;
  client.socket.send(`* you are ${client.name}`);
  broadcast(state, `* ${client.name} joined`, client);
}

// `send` never blocks: Deno queues the frame and `bufferedAmount` says how
// much is still waiting for the peer. That is the backpressure signal; a
// client that lets it grow past the bound is dropped rather than let it
// hold the server's memory hostage.
function broadcast(state: ServerState, text: string, except?: Client): void {
  // Shutting down: messages that arrived just before are not relayed. A
  // backlog of them, each sent to every client, would only delay the exit.
  if (state.closing) return;
  const tooSlow: Client[] = [];
  for (const client of state.clients) {
    const { socket } = client;
    if (client === except || socket.readyState !== WebSocket.OPEN || !client.name) continue;
    if (socket.bufferedAmount > state.maxQueue) {
      tooSlow.push(client);
      continue;
    }
    socket.send(text);
  }
  for (const client of tooSlow) dropTooSlow(state, client);
}

// -------------------------- 5. ending: close codes and the close handshake

function leave(state: ServerState, client: Client, event: CloseEvent): void {
  if (client.gone) return;
  client.gone = true;
  state.clients.delete(client);
  if (state.closing) {
    if (state.clients.size === 0) state.allGone.resolve();
    return;
  }
  state.log(
    `- ${client.peer} disconnected${client.name ? ` (${client.name})` : ""}: ` +
      `code ${event.code || "none (connection lost)"}` +
      (event.reason ? ` ${escapeControls(event.reason)}` : ""),
  );
  announceLeave(state, client);
}

function announceLeave(state: ServerState, client: Client): void {
  if (state.mode !== "chat" || !client.name || client.left) return;
  client.left = true;
  broadcast(state, `* ${client.name} left`);
}

function closeSocket(socket: WebSocket, code: number, reason: string): void {
  try {
    socket.close(code, reason);
  } catch {
    // Already closing.
  }
}

// -------------------------------------------- 6. what Deno does for you here
//
// After the 101, `Deno.upgradeWebSocket` speaks the frame protocol itself
// (RFC 6455, section 5.2); this file only ever sees whole messages. On the
// wire, every message is one or more frames:
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
//
// - FIN ends a message; a message sent in pieces is a first frame with
//   FIN 0, then continuation frames (opcode 0), the last with FIN 1. Deno
//   joins them before `message` fires.
// - Opcodes: 1 text (UTF-8, checked), 2 binary, 8 close, 9 ping, 10 pong.
//   Deno answers pings with pongs by itself.
// - MASK: every frame from a client is XORed with a fresh 4-byte key, so a
//   page cannot choose the bytes a proxy on the way sees (cache poisoning);
//   frames from the server are never masked. Deno unmasks.
// - The length takes 7 bits, or 7 + 16, or 7 + 64: 2 to 14 bytes of header
//   per frame in all, where TCP adds nothing.
//
// The handshake's proof is `Sec-WebSocket-Accept`: base64 of the SHA-1 of
// the client's key followed by the fixed GUID 258EAFA5-E914-47DA-95CA-
// C5AB0DC85B11. For the RFC's own sample key, dGhlIHNhbXBsZSBub25jZQ==, the
// answer is s3pPLMBiTxaQ9kYGzzhZRbK+xOo=. It shows the server read this very
// request, so a cache or a confused HTTP server cannot fake a 101.

// ----------------------------------------------- 7. limits and bookkeeping

// Deno refuses frames over 64 MiB on its own, before we ever see them.
const DENO_MAX_FRAME = 64 * 1024 * 1024;

// After Deno.serve stops accepting (out of file descriptors), how soon it
// is started again: first quickly, then backing off while it keeps failing.
const RESTART_MIN_MS = 100;

const RESTART_MAX_MS = 2000;

// File descriptors the runtime itself needs besides one per connection.
const RESERVED_FILES = 64;

interface Client {
  socket: WebSocket;
  peer: string;
  name: string;
  /** The subprotocol chosen in the handshake, if the client offered one. */
  protocol?: string;
  /** Set once the client is gone: Deno can fire `close` twice for one socket. */
  gone: boolean;
  /** Chat: its leave was announced (a too-slow client's comes before its close event). */
  left: boolean;
}

interface ServerState {
  mode: Mode;
  maxMessage: number;
  maxQueue: number;
  maxConnections: number;
  idleTimeout: number;
  protocols: string[];
  /** Normalized origins (`scheme://host[:port]`), `"null"` or `"*"`. */
  allowOrigins: Set<string>;
  log: (line: string) => void;
  /** For lines a peer can make us repeat at any rate: refusals, accept failures. */
  repeats: LogLimiter;
  /** Every open WebSocket, and upgrades on their way to being one. */
  clients: Set<Client>;
  guests: number;
  closing: boolean;
  /** Resolved when the last client is gone while closing. */
  allGone: PromiseWithResolvers<void>;
}

/** The HTTP side: Deno.serve, started again if it ever stops accepting. */
interface HttpServer {
  readonly addr: Deno.NetAddr;
  shutdown(): Promise<void>;
}

function tooBig(state: ServerState, client: Client, data: string | ArrayBuffer): boolean {
  // A string's UTF-8 size is between its length and three times that; only
  // count the bytes when the quick bounds cannot decide.
  const size = typeof data !== "string"
    ? data.byteLength
    : data.length * 3 <= state.maxMessage
    ? 0
    : encoder.encode(data).length;
  if (size <= state.maxMessage) return false;
  closeSocket(client.socket, MESSAGE_TOO_BIG, `message too big (max ${state.maxMessage} bytes)`);
  return true;
}

// A client that reads nothing will not read our close frame either, so its
// close event may not come until it hangs up: in chat it leaves the room now.
// It still counts against maxConnections until its connection is gone.
function dropTooSlow(state: ServerState, client: Client): void {
  closeSocket(client.socket, POLICY_VIOLATION, "too slow, disconnected");
  announceLeave(state, client);
}

function initialState(options: WsServerOptions): ServerState {
  const log = options.log ?? console.error;
  return {
    mode: options.mode ?? "echo",
    maxMessage: Math.min(options.maxMessage ?? DEFAULT_MAX_MESSAGE, DENO_MAX_FRAME),
    maxQueue: options.maxQueue ?? DEFAULT_MAX_QUEUE,
    maxConnections: options.maxConnections ?? DEFAULT_MAX_CONNECTIONS,
    idleTimeout: options.idleTimeout ?? DEFAULT_IDLE_TIMEOUT,
    protocols: options.protocols ?? [],
    allowOrigins: allowedOrigins(options.allowOrigins ?? []),
    log,
    repeats: createLogLimiter(log),
    clients: new Set(),
    guests: 0,
    closing: false,
    allGone: Promise.withResolvers(),
  };
}

/** An HTTP answer instead of a 101: a status, a one-line reason, extra headers. */
interface Refusal {
  status: number;
  reason: string;
  headers?: Record<string, string>;
}

// Host is `host[:port]` (RFC 9110, section 7.2). Deno builds request.url from
// it unchecked: "a b" makes `new URL` throw, and "x@y" or "x/y" would name
// another host or path.
const HOST_HEADER = /^(?:[A-Za-z0-9._~-]+|\[[0-9A-Fa-f:.]+\])(?::\d{1,5})?$/;

// A Sec-WebSocket-Key is 16 random bytes in base64: 22 characters and "==".
const WEBSOCKET_KEY = /^[A-Za-z0-9+/]{22}==$/;

// Subprotocol names are HTTP tokens (RFC 6455, section 4.1).
const TOKEN = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/;

const WEBSOCKET_VERSION = "13";

// Browsers on this machine: local development pages keep working.
const LOCAL_HOSTNAMES = new Set(["localhost", "127.0.0.1", "[::1]"]);

/** The URL the request was addressed to, or undefined if its Host is not a host. */
function addressedUrl(request: Request): URL | undefined {
  const host = request.headers.get("host");
  if (host && !isHost(host)) return undefined;
  try {
    return new URL(request.url);
  } catch {
    return undefined;
  }
}

function isHost(text: string): boolean {
  // The pattern lets through a port over 65535 or an IPv6 address that is not one.
  return HOST_HEADER.test(text) && URL.canParse(`http://${text}/`);
}

function addressRefusal(request: Request): Refusal {
  const host = request.headers.get("host");
  if (host && !isHost(host)) {
    return {
      status: 400,
      reason: "bad request: the Host header must be a host name or address with an optional " +
        `:port, got "${escapeControls(host)}"`,
    };
  }
  // An absolute URL in the request line names the host instead of Host.
  return {
    status: 400,
    reason: `bad request: the request's URL is not a URL: "${escapeControls(request.url)}"`,
  };
}

// What RFC 6455 (section 4.2.1) requires of the request, checked before
// upgrading: Deno answers 101 to any method, a missing version, and a key
// of any shape.
function handshakeRefusal(request: Request): Refusal | undefined {
  if (request.method !== "GET") {
    return {
      status: 400,
      reason: `bad WebSocket handshake: the method must be GET, got ${
        escapeControls(request.method)
      }`,
    };
  }
  const key = request.headers.get("sec-websocket-key");
  if (key === null || !WEBSOCKET_KEY.test(key)) {
    return {
      status: 400,
      reason: `bad WebSocket handshake: the Sec-WebSocket-Key header ${
        key === null ? "is missing" : "must be 16 bytes in base64"
      }`,
    };
  }
  const version = request.headers.get("sec-websocket-version");
  if (version !== WEBSOCKET_VERSION) {
    return {
      status: 426,
      reason:
        `bad WebSocket handshake: this server speaks WebSocket version ${WEBSOCKET_VERSION}, ` +
        (version === null
          ? "and the Sec-WebSocket-Version header is missing"
          : `not ${escapeControls(version)}`),
      headers: { "sec-websocket-version": WEBSOCKET_VERSION },
    };
  }
  return undefined;
}

// A browser lets any page open a WebSocket to any server, cookies and all,
// and says which page in Origin: checking it is the server's job, or any
// site a user visits can join the chat as them (Cross-Site WebSocket
// Hijacking). Clients that are not browsers send no Origin.
function originRefusal(state: ServerState, request: Request, url: URL): Refusal | undefined {
  const origin = request.headers.get("origin");
  if (origin === null || originAllowed(state, origin, url)) return undefined;
  return {
    status: 403,
    reason: `origin "${escapeControls(origin)}" is not allowed: pages from other sites ` +
      "may not use this server (start it with --allow-origin ORIGIN to accept one)",
  };
}

function originAllowed(state: ServerState, origin: string, url: URL): boolean {
  if (state.allowOrigins.has("*") || state.allowOrigins.has(origin)) return true;
  let page;
  try {
    page = new URL(origin);
  } catch {
    return false;
  }
  if (page.protocol !== "http:" && page.protocol !== "https:") return false;
  if (state.allowOrigins.has(page.origin) || LOCAL_HOSTNAMES.has(page.hostname)) return true;
  // The server's own pages: the same host and port the request was sent to
  // (https too, for a server behind a TLS proxy).
  return page.host === new URL(`${page.protocol}//${url.host}`).host;
}

/** The names in Sec-WebSocket-Protocol, in the client's order; undefined if malformed. */
function offeredProtocols(request: Request): string[] | undefined {
  const header = request.headers.get("sec-websocket-protocol");
  if (header === null) return [];
  // Empty list elements ("a, , b", or an empty header) are to be ignored
  // (RFC 9110, section 5.6.1).
  const names = header.split(",").map((name) => name.trim()).filter((name) => name !== "");
  return names.every((name) => TOKEN.test(name)) ? names : undefined;
}

function protocolRefusal(state: ServerState, request: Request): Refusal | undefined {
  const offered = offeredProtocols(request);
  if (!offered) {
    return {
      status: 400,
      reason:
        "bad WebSocket handshake: Sec-WebSocket-Protocol must be a comma-separated list of names",
    };
  }
  if (offered.length === 0 || chosenProtocol(state, request)) return undefined;
  return {
    status: 400,
    reason: `no common subprotocol: the client offered ${offered.join(", ")}; ` +
      `this server speaks ${state.protocols.join(", ")}`,
  };
}

// The client lists what it speaks, most preferred first; the server picks
// one and names it in the 101, or a browser fails the connection (1006).
function chosenProtocol(state: ServerState, request: Request): string | undefined {
  return offeredProtocols(request)?.find((name) =>
    state.protocols.length === 0 || state.protocols.includes(name)
  );
}

/** `scheme://host[:port]` as browsers write it, `"null"` or `"*"`; undefined if not an origin. */
function normalizeOrigin(text: string): string | undefined {
  if (text === "*" || text === "null") return text;
  try {
    const url = new URL(text);
    const bare = url.pathname === "/" && !url.search && !url.hash && !url.username;
    return bare && (url.protocol === "http:" || url.protocol === "https:") ? url.origin : undefined;
  } catch {
    return undefined;
  }
}

function allowedOrigins(origins: string[]): Set<string> {
  return new Set(origins.map((origin) => normalizeOrigin(origin) ?? origin));
}

/** A refusal: its one log line (the peer's words escaped) and the HTTP answer. */
function refuse(state: ServerState, peer: string, refusal: Refusal): Response {
  // The same refusal over and over (a client retrying, or a flood) is
  // logged once per window, then counted; each different one is logged.
  state.repeats.log(
    `refused ${refusal.status}: ${refusal.reason}`,
    `! ${peer} refused with ${refusal.status}: ${refusal.reason}`,
  );
  return plain(refusal.status, refusal.reason, refusal.headers);
}

// nosniff: a browser must not read a text answer, which may quote what the
// client sent, as HTML.
function plain(status: number, text: string, headers: Record<string, string> = {}): Response {
  return new Response(`${text}\n`, {
    status,
    headers: {
      "content-type": "text/plain; charset=utf-8",
      "x-content-type-options": "nosniff",
      ...headers,
    },
  });
}

// Deno.serve stops for good when accept() fails, for instance when the
// process is out of file descriptors (EMFILE): its `finished` promise
// rejects and the port is closed. Serving again on the same port, once a
// descriptor is free, is how this server recovers; WebSockets already open
// are not touched.
function serveHttp(
  state: ServerState,
  address: { hostname: string; port: number; cert?: string; key?: string },
): HttpServer {
  const handler = (request: Request, info: Deno.ServeHandlerInfo) =>
    handleRequest(state, request, info);
  let stopped = false;
  let retry: ReturnType<typeof setTimeout> | undefined;
  let current = listen(address.port);
  const addr = current.addr;
  function listen(port: number): Deno.HttpServer<Deno.NetAddr> {
    const server = Deno.serve({ ...address, port, onListen: () => {} }, handler);
    server.finished.catch((error) => {
      if (stopped) return;
      state.repeats.log("accept", `accept failed: ${acceptFailure(error)}; serving again shortly`);
      restartSoon(RESTART_MIN_MS);
    });
    return server;
  }
  function restartSoon(ms: number) {
    retry = setTimeout(() => {
      if (stopped) return;
      try {
        current = listen(addr.port);
      } catch (error) {
        state.repeats.log("listen", `cannot listen again yet: ${acceptFailure(error)}`);
        restartSoon(Math.min(2 * ms, RESTART_MAX_MS));
      }
    }, ms);
  }
  return {
    addr,
    async shutdown() {
      stopped = true;
      clearTimeout(retry);
      await current.shutdown();
    },
  };
}

function acceptFailure(error: unknown): string {
  const message = error instanceof Error ? error.message : String(error);
  if (/Too many open files|os error 24/i.test(message)) {
    return "too many open files: raise the limit (ulimit -n) or lower --max-connections";
  }
  return escapeControls(message);
}

// Deno assembles a fragmented message without a limit on its total size
// (denoland/deno#15809), and one bigger than V8's largest string (about
// 512 MiB) fails inside Deno's own WebSocket code, as an unhandled rejection
// that would end the process and every other client's connection with it.
// Only that failure is caught here. The connection it happened on gets no
// more events; Deno's idle timer still runs and closes it (1001) within
// --idle-timeout.
const survivingServers = new Set<ServerState>();

function survivingDenoWebSocketFailures(state: ServerState): void {
  if (survivingServers.size === 0) {
    globalThis.addEventListener("unhandledrejection", onDenoWebSocketFailure);
  }
  survivingServers.add(state);
}

function stopSurviving(state: ServerState): void {
  survivingServers.delete(state);
  if (survivingServers.size === 0) {
    globalThis.removeEventListener("unhandledrejection", onDenoWebSocketFailure);
  }
}

function onDenoWebSocketFailure(event: PromiseRejectionEvent): void {
  const { reason } = event;
  if (!(reason instanceof Error) || !String(reason.stack).includes("ext:deno_websocket")) return;
  event.preventDefault();
  for (const state of survivingServers) {
    state.repeats.log(
      "too big for Deno",
      `! a client sent a message too big for Deno to assemble (${
        escapeControls(reason.message)
      }); that connection gets no more messages and is closed ${
        state.idleTimeout > 0
          ? `within --idle-timeout (${state.idleTimeout} s)`
          : "when its peer hangs up (--idle-timeout is 0)"
      }`,
    );
  }
}

/** What {@linkcode createLogLimiter} returns. */
interface LogLimiter {
  /** Logs `line`, or only counts it when a line of the same `kind` was logged in this window. */
  log(kind: string, line: string): void;
  /** Logs the summaries still due and stops the window timers. */
  close(): void;
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
 * The same as tcp_server.ts's (copied: each script stands alone).
 */
function createLogLimiter(
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
  // deno-lint-ignore no-control-regex
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

// Each connection costs a file descriptor, so --max-connections means
// nothing above the process's open-file limit. The limit can only be read
// from /proc (Linux), and only with read permission for it: without, no
// warning, and no permission prompt either.
function openFileLimit(): number | undefined {
  const path = "/proc/self/limits";
  if (Deno.permissions.querySync({ name: "read", path }).state !== "granted") return undefined;
  try {
    const soft = Deno.readTextFileSync(path).match(/^Max open files\s+(\d+)/m)?.[1];
    return soft === undefined ? undefined : Number(soft);
  } catch {
    return undefined;
  }
}

function openFileWarning(maxConnections: number): string | undefined {
  const limit = openFileLimit();
  const needed = maxConnections + RESERVED_FILES;
  if (limit === undefined || limit >= needed) return undefined;
  return `warning: the open-file limit (ulimit -n) is ${limit}, too low for --max-connections ` +
    `${maxConnections}; raise it with "ulimit -n ${needed}" before starting, or lower --max-connections`;
}

// ------------------------------------------------------ 8. the API's types

/** What the server does with the messages a client sends. */
export type Mode = "echo" | "chat";

/** Options for {@linkcode startWsServer}. Sizes are in bytes. */
export interface WsServerOptions {
  /** Address to bind. Default `127.0.0.1` (this machine only). */
  hostname?: string;
  /** Port to bind; `0` picks a free one (read it back from `addr`). Default 8080. */
  port?: number;
  /** `echo` (default) sends every message back; `chat` relays text to everyone. */
  mode?: Mode;
  /** Largest message accepted; a bigger one closes that client with 1009. Default 1 MiB. */
  maxMessage?: number;
  /** Bytes buffered for one client before it is closed with 1008 as too slow. Default 2 MiB. */
  maxQueue?: number;
  /** WebSockets open at once; further upgrades get HTTP 503. Default 8192. */
  maxConnections?: number;
  /**
   * Seconds without a whole message or a pong before a peer is dropped (1001); Deno pings it
   * halfway. Its pings and the fragments of an unfinished message do not count. 0 = never.
   * Default 30.
   */
  idleTimeout?: number;
  /**
   * Subprotocols spoken: the client's first offered name in the list is chosen, and a
   * client offering only others is refused (400). Default: the client's first offer.
   */
  protocols?: string[];
  /**
   * Browser origins accepted besides the server's own pages and `localhost`,
   * `127.0.0.1`, `[::1]` on any port (`"*"` = any origin). Default none.
   */
  allowOrigins?: string[];
  /**
   * Serve `https://` and `wss://`: a certificate chain and its private key, both PEM text
   * (not file names). The WebSocket then runs inside TLS, inside TCP. Default: plain.
   */
  tls?: { cert: string; key: string };
  /** Where connection events go. Default `console.error`; pass `() => {}` for silence. */
  log?: (line: string) => void;
}

/** A running server, returned by {@linkcode startWsServer}. */
export interface WsServer extends AsyncDisposable {
  /** The address actually bound (with the real port when you asked for 0). */
  readonly addr: Deno.NetAddr;
  /** WebSockets open right now. */
  readonly connections: number;
  /** Close every WebSocket with 1001, stop the HTTP server, and wait until it is down. */
  close(): Promise<void>;
}

// ----------------------------------------------------- 9. the command line

const USAGE = `Usage: ws_server.ts [options]

A WebSocket echo (default) or chat server; GET / serves a browser client.
Prints "listening on ws://HOST:PORT/" (wss:// with --cert and --key).

Options:
  --host HOST             address to bind (default ${DEFAULT_HOSTNAME}; 0.0.0.0 = every interface)
  --port PORT             port to bind, 0 = any free port (default ${DEFAULT_PORT})
  --mode echo|chat        echo messages back, or relay text to everyone (default echo)
  --max-message BYTES     largest message; bigger closes with 1009 (default ${DEFAULT_MAX_MESSAGE}, at most 64 MiB)
  --max-queue BYTES       unsent bytes a client may fall behind by; past it, close 1008
                          (default ${DEFAULT_MAX_QUEUE})
  --max-connections N     WebSockets open at once; more get HTTP 503 (default ${DEFAULT_MAX_CONNECTIONS})
  --idle-timeout SECONDS  drop a peer that sends no whole message and no pong this long
                          (1001); it is pinged halfway; 0 = never (default ${DEFAULT_IDLE_TIMEOUT})
  --protocol NAMES        subprotocols spoken, comma-separated: the client's first offered
                          name among them is chosen; a client offering only others gets
                          HTTP 400 (default: whatever the client offers first)
  --allow-origin ORIGINS  also accept browser pages from these origins, comma-separated
                          (http://host:port), or from any with '*' (default: only this
                          server's own pages, and localhost, 127.0.0.1, [::1] on any port;
                          other pages get HTTP 403)
  --cert FILE             TLS certificate chain (PEM): serve https:// and wss://; needs --key
  --key FILE              the certificate's private key (PEM)
  --quiet                 no connection log on stderr
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
        "max-message": { type: "string", default: String(DEFAULT_MAX_MESSAGE) },
        "max-queue": { type: "string", default: String(DEFAULT_MAX_QUEUE) },
        "max-connections": { type: "string", default: String(DEFAULT_MAX_CONNECTIONS) },
        "idle-timeout": { type: "string", default: String(DEFAULT_IDLE_TIMEOUT) },
        protocol: { type: "string" },
        "allow-origin": { type: "string" },
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
  return {
    hostname: parsed.host,
    port: integerOption("--port", parsed.port, 0, 65535),
    mode,
    maxMessage: integerOption("--max-message", parsed["max-message"], 1, DENO_MAX_FRAME),
    maxQueue: integerOption("--max-queue", parsed["max-queue"], 1),
    maxConnections: integerOption("--max-connections", parsed["max-connections"], 1),
    idleTimeout: integerOption("--idle-timeout", parsed["idle-timeout"], 0),
    protocols: protocolsOption(parsed.protocol),
    allowOrigins: originsOption(parsed["allow-origin"]),
    tlsFiles: tlsFilesOption(parsed.cert, parsed.key),
    quiet: parsed.quiet,
    help: parsed.help,
  };
}

interface CommandLine extends WsServerOptions {
  tlsFiles?: { cert: string; key: string };
  quiet: boolean;
  help: boolean;
}

function tlsFilesOption(cert: string | undefined, key: string | undefined) {
  if (cert === undefined && key === undefined) return undefined;
  if (cert === undefined || key === undefined) {
    throw new UsageError(
      "--cert and --key go together: TLS needs both the certificate and its key",
    );
  }
  return { cert, key };
}

// The files are read here, so that the server's options hold PEM text and a
// missing or unreadable file is one line before anything listens.
function readTlsFiles(files: { cert: string; key: string }): { cert: string; key: string } {
  const read = (flag: string, path: string) => {
    try {
      return Deno.readTextFileSync(path);
    } catch (error) {
      const why = error instanceof Deno.errors.NotFound
        ? "no such file"
        : error instanceof Deno.errors.NotCapable || error instanceof Deno.errors.PermissionDenied
        ? `permission denied (run with --allow-read=${path})`
        : (error as Error).message;
      throw new Error(`cannot read ${flag} ${path}: ${why}`);
    }
  };
  return { cert: read("--cert", files.cert), key: read("--key", files.key) };
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

function protocolsOption(text: string | undefined): string[] | undefined {
  if (text === undefined) return undefined;
  const names = text.split(",").map((name) => name.trim());
  const bad = names.find((name) => !TOKEN.test(name));
  if (bad !== undefined) {
    throw new UsageError(
      `--protocol takes names separated by commas (letters, digits and !#$%&'*+-.^_\`|~), got "${bad}"`,
    );
  }
  return names;
}

function originsOption(text: string | undefined): string[] | undefined {
  if (text === undefined) return undefined;
  const origins = text.split(",").map((origin) => origin.trim());
  const bad = origins.find((origin) => normalizeOrigin(origin) === undefined);
  if (bad !== undefined) {
    throw new UsageError(
      `--allow-origin takes origins such as http://example.com:8080 separated by commas, or '*', got "${bad}"`,
    );
  }
  return origins;
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
    console.error(`ws_server: ${error.message}\n\n${USAGE}`);
    return 2;
  }
  if (options.help) {
    console.log(USAGE);
    return 0;
  }
  const address = `${formatHost(options.hostname!)}:${options.port}`;
  let tls;
  try {
    tls = options.tlsFiles && readTlsFiles(options.tlsFiles);
  } catch (error) {
    console.error(`ws_server: ${(error as Error).message}`);
    return 1;
  }
  let server: WsServer;
  try {
    server = startWsServer({ ...options, tls, log: options.quiet ? () => {} : console.error });
  } catch (error) {
    console.error(
      `ws_server: cannot listen on ${address}: ${
        startError(error, options.hostname!, options.port!)
      }`,
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
  const where = `${formatHost(server.addr.hostname)}:${server.addr.port}`;
  console.log(`listening on ${tls ? "wss" : "ws"}://${where}/`);
  if (!options.quiet) console.error(`browser client: ${tls ? "https" : "http"}://${where}/`);
  const warning = openFileWarning(options.maxConnections!);
  if (warning) console.error(`ws_server: ${warning}`);
  await stop.promise;
  // Closing is quick; the timer is a guarantee that a stuck peer cannot hold
  // the process past a second.
  setTimeout(() => Deno.exit(0), 900);
  await server.close();
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
  const message = error instanceof Error ? error.message : String(error);
  if (/No certificates found/i.test(message)) return "--cert holds no PEM certificate";
  if (/No keys found/i.test(message)) return "--key holds no PEM private key";
  if (/KeyMismatch|keys may not be consistent/i.test(message)) {
    return "--key is not the private key of the certificate in --cert";
  }
  return message;
}

if (import.meta.main) Deno.exit(await main(Deno.args));

// ---------------------------------------------------- 10. the browser page

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
  // (Local, not top-level: the server is already answering before a
  // top-level constant down here would be initialized.)
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
// messages ("NAME: TEXT", "* NAME joined") are the server's, not the page's:
// they stay as they are. A function for the same reason as page().
function pageTexts(lang: PageLanguage) {
  return {
    en: {
      title: (mode: Mode) => `WebSocket ${mode} client`,
      heading: (mode: Mode) => `WebSocket client, ${mode} mode`,
      chatHint: "Chat: every message goes to everyone connected, you included. Your own lines " +
        "come back from the server as everyone else's do, and show in blue: that is how you " +
        "know they arrived. Open a second tab to talk to yourself.",
      echoHint: "Echo: the server sends every message straight back, whole. → marks what you " +
        "sent; the line under it is the server's reply, one message in, one message out.",
      serverUrl: "Server URL",
      connect: "Connect",
      disconnect: "Disconnect",
      notConnected: "Not connected.",
      message: "Message",
      placeholder: "Type a message",
      send: "Send",
      youAre: "— you are ",
      connecting: "Connecting to ",
      connected: "Connected to ",
      protocol: ", protocol ",
      closed: "Closed: code ",
      lost: " — the connection was lost or refused",
      closedNote: "connection closed, code ",
      binary: "<binary ",
    },
    pt: {
      title: (mode: Mode) => `Cliente WebSocket ${mode}`,
      heading: (mode: Mode) => `Cliente WebSocket, modo ${mode}`,
      chatHint: "Chat: cada mensagem vai para todo mundo que está conectado, inclusive você. " +
        "Suas próprias linhas voltam do servidor, como as dos outros, e aparecem em azul: é " +
        "assim que você sabe que elas chegaram. Abra uma segunda aba para conversar com você " +
        "mesmo.",
      echoHint: "Echo: o servidor devolve cada mensagem na hora, inteira. → marca o que você " +
        "enviou; a linha de baixo é a resposta do servidor, uma mensagem de ida, uma de volta.",
      serverUrl: "URL do servidor",
      connect: "Conectar",
      disconnect: "Desconectar",
      notConnected: "Desconectado.",
      message: "Mensagem",
      placeholder: "Digite uma mensagem",
      send: "Enviar",
      youAre: "— você é ",
      connecting: "Conectando a ",
      connected: "Conectado a ",
      protocol: ", protocolo ",
      closed: "Fechada: código ",
      lost: " — a conexão caiu ou foi recusada",
      closedNote: "conexão fechada, código ",
      binary: "<binário, ",
    },
  }[lang];
}

// The browser client: one self-contained page, no external assets. It uses
// the same standard WebSocket API as ws_client.ts.
// A function, not a constant: functions are hoisted, and the command line
// above starts serving (and may call this) before a constant down here
// would be initialized. The mode and the language are all the server fills in.
function page(mode: Mode, lang: PageLanguage = "en"): string {
  const t = pageTexts(lang);
  const js = (text: string) => JSON.stringify(text);
  return `<!doctype html>
<html lang="${lang === "pt" ? "pt-BR" : "en"}">
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>${t.title(mode)}</title>
<style>
  body { font: 16px/1.4 system-ui, sans-serif; max-width: 46rem; margin: 1.5rem auto; padding: 0 1rem; color: #1b1b1b; }
  h1 { font-size: 1.3rem; margin: 0 0 .25rem; }
  #hint { font-size: .9rem; color: #444; margin: 0 0 .75rem; }
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
<h1>${t.heading(mode)} <span id="you"></span></h1>
<p id="hint">${mode === "chat" ? t.chatHint : t.echoHint}</p>
<form id="connect-form">
  <input id="url" aria-label="${t.serverUrl}" spellcheck="false">
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
  const chat = ${JSON.stringify(mode === "chat")};
  $("url").value = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/";
  let socket;
  let me = "";

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

  // The chat server names each newcomer in a notice of its own.
  function received(text) {
    const name = chat && text.match(/^\\* you are (\\S+)$/)?.[1];
    if (name) {
      me = name;
      $("you").textContent = ${js(t.youAre)} + name;
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
      $("status").textContent = ${js(t.connected)} + socket.url +
        (socket.protocol ? ${js(t.protocol)} + socket.protocol : "");
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
      socket = undefined;
      me = "";
      $("you").textContent = "";
      setConnected(false);
    };
  };

  $("send-form").onsubmit = (event) => {
    event.preventDefault();
    const text = $("message").value;
    if (!socket || socket.readyState !== WebSocket.OPEN || text === "") return;
    socket.send(text);
    // In chat the server's relay is the confirmation; in echo, its reply.
    if (!chat) show("→ " + text, "sent");
    $("message").value = "";
  };

  $("connect-form").requestSubmit();
</script>
</html>
`;
}
