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
 * `wss://` is the same conversation inside TLS.
 *
 * Read it in this order:
 *
 *     1. Open: the handshake is an HTTP request     runWsClient
 *     2. Send and receive: one send, one message    runWsClient, sendAll
 *     3. Close: a handshake of its own              close, the close event
 *     4. What rides on the handshake: wss://,       handshakeOptions
 *        subprotocols, headers
 *     5. Chat: which replies are our own            OwnEchoes
 *     6. Limits: every wait and every message       createGuard
 *        bounded, whatever the server does
 *     7. The options                                WsClientOptions, WsClose
 *     8. The command line, slash commands,          main, typedMessages
 *        and a person at the terminal               TerminalMarks
 *
 * A server is a peer like any other, so nothing it sends is trusted: each
 * message is printed as one line with its control characters escaped, a
 * message is bounded in size, and every wait is bounded (section 6).
 *
 * Run it (least privilege; start `ws_server.ts` first):
 *
 *     deno run --allow-net=127.0.0.1:8080 ws_client.ts hello world   # prints the replies, closes
 *     deno run --allow-net=127.0.0.1:8080 ws_client.ts               # interactive; /help, Ctrl-D closes
 *     deno run --allow-net=localhost:8443 --allow-read=.certs ws_client.ts \
 *         --url wss://localhost:8443/ --ca .certs/ca.pem hello       # TLS, trusting `deno task cert`'s CA
 *     deno run -N https://raw.githubusercontent.com/OWNER/REPO/main/ws_client.ts --url ws://127.0.0.1:8080/ hi
 *
 * @module
 */

import { parseArgs } from "node:util";

const DEFAULT_URL = "ws://127.0.0.1:8080/";
const DEFAULT_TIMEOUT_MS = 5000;
const DEFAULT_MAX_MESSAGE = 1024 * 1024;

// Close codes (RFC 6455, section 7.4.1). The WebSocket API lets a client send
// only 1000 and 3000-4999, so "too big" (1009) goes out as a private 4009.
const NORMAL_CLOSURE = 1000;
const MESSAGE_TOO_BIG = 4009;
// Never sent in a frame: what a close event says when no code came with it.
const NO_STATUS_RECEIVED = 1005;
const ABNORMAL_CLOSURE = 1006;

const encoder = new TextEncoder();

// ----------------------------------- 1. open: the handshake is an HTTP request

/**
 * Connects, sends `messages`, passes every message received to `onMessage`,
 * closes with 1000 (once each message has come back, after `replies`
 * messages, or when `messages` ends), and resolves with the close once the
 * close handshake is done. If the server closes first, that close is
 * returned at once, even while `messages` is still waiting for its next one.
 *
 * @example Two messages to an echo server, each back as it was sent
 * ```ts
 * import assert from "node:assert/strict";
 *
 * // A WebSocket echo server on a free port: what it receives, it sends back.
 * await using server = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen() {} }, (request) => {
 *   const { socket, response } = Deno.upgradeWebSocket(request);
 *   socket.onmessage = (event) => socket.send(event.data);
 *   return response;
 * });
 *
 * const received: (string | ArrayBuffer)[] = [];
 * const close = await runWsClient({
 *   url: `ws://127.0.0.1:${server.addr.port}/`,
 *   messages: ["hello", "world"],
 *   untilEchoed: true,
 *   onMessage: (data) => received.push(data),
 * });
 * // Two sends, two message events: each whole, however TCP cut them up.
 * assert.deepEqual(received, ["hello", "world"]);
 * assert.deepEqual(close, { code: 1000, reason: "", byServer: false });
 * ```
 *
 * @example The server closes first, with a code and a reason
 * ```ts
 * import assert from "node:assert/strict";
 *
 * await using server = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen() {} }, (request) => {
 *   const { socket, response } = Deno.upgradeWebSocket(request);
 *   socket.onmessage = () => socket.close(4000, "one is enough");
 *   return response;
 * });
 *
 * const close = await runWsClient({
 *   url: `ws://127.0.0.1:${server.addr.port}/`,
 *   messages: ["hi"],
 *   replies: 1, // a reply that never comes: the server's close ends the wait
 *   onMessage: () => {},
 * });
 * assert.deepEqual(close, { code: 4000, reason: "one is enough", byServer: true });
 * ```
 *
 * @throws {Error} when the connection fails (the message says why: refused,
 * not a WebSocket server, a certificate refused and why), drops without the
 * server's close frame (whether or not we sent ours first), brings a message
 * over `maxMessage`, the replies have not come back within `timeout`, or the
 * server does not answer our close frame within 2 s. Having given up, it does not wait for the server to let go:
 * the connection may linger until the server hangs up (the command line
 * exits at once).
 */
export async function runWsClient(options: WsClientOptions): Promise<WsClose> {
  const { replies, onMessage } = options;
  const echoes = options.untilEchoed ? new OwnEchoes() : undefined;
  // For wss:// with our own CA: an HTTP client that trusts it (section 4).
  using trust = trustingClient(options.caCerts);
  // The opening handshake is an HTTP GET asking to upgrade; the server
  // answers 101 Switching Protocols, and from then on the same TCP
  // connection carries WebSocket frames, both ways, at any time.
  const socket = new WebSocket(options.url, handshakeOptions(options, trust.client));
  // Binary messages as ArrayBuffer, which code can read at once (Blob is async).
  socket.binaryType = "arraybuffer";
  const opened = Promise.withResolvers<void>();
  const closed = Promise.withResolvers<CloseEvent>();
  let weClosed = false;
  // Every wait bounded, every message capped, whatever the server does (section 6).
  using guard = createGuard(socket, {
    url: options.url,
    timeout: options.timeout ?? DEFAULT_TIMEOUT_MS,
    maxMessage: options.maxMessage ?? DEFAULT_MAX_MESSAGE,
    close,
  });
  socket.onopen = () => opened.resolve();
  socket.onerror = (event) => guard.noteError(event);
  // `close` can fire twice; resolving a settled promise is a no-op.
  socket.onclose = (event) => {
    opened.reject(guard.connectError());
    closed.resolve(event);
  };

  // ---------------------------- 2. send and receive: one send, one message

  let received = 0;
  socket.onmessage = (event) => {
    if (!guard.admits(event.data)) return;
    onMessage(event.data);
    received++;
    if (typeof event.data === "string") echoes?.received(event.data);
    if (received === replies || echoes?.done) close();
  };
  await guard.orGiveUp(opened.promise);
  guard.handshakeDone({ runBounded: replies !== undefined || echoes !== undefined });
  options.onOpen?.(socket.protocol);
  await sendAll(socket, options.messages, {
    stop: guard.orGiveUp(closed.promise).catch(() => {}),
    onSent: (text) => echoes?.sent(text),
    onClose: close,
  });
  if (echoes) {
    echoes.allSent();
    if (echoes.done) close();
  } else if (replies === undefined) close();

  // ------------------------------------------ 3. close: a handshake of its own

  // Our close frame says "I am done", with a code; the server answers with
  // its own close frame, and only then does the `close` event fire.
  function close(code = NORMAL_CLOSURE, reason?: string) {
    // Not OPEN: the server has begun the close, or it is over.
    if (weClosed || socket.readyState !== WebSocket.OPEN) return;
    weClosed = true;
    socket.close(code, reason);
    guard.awaitCloseAnswer();
  }
  const event = await guard.orGiveUp(closed.promise);
  guard.throwIfCutShort(() =>
    echoes
      ? `${echoes.count} of ${echoes.total} messages came back`
      : `${received} of ${replies} replies`
  );
  const lost = lostConnection(event, { weClosed });
  if (lost) throw new Error(`connection lost: ${lost}`);
  return { code: event.code, reason: event.reason, byServer: !weClosed };
}

// Code 1006 (shown by Deno as 0) is never sent: it means no close frame
// came. Once we have sent ours, Deno reports a connection that drops before
// the answer as 1005, clean, the code of a close frame with no code in it
// (RFC 6455 section 7.1.5 says 1006). We always send a code, and servers
// typically echo it (section 5.5.1): no code back is most likely the answer
// that never came, and the line we print names both causes.
function lostConnection(
  event: CloseEvent,
  { weClosed }: { weClosed: boolean },
): string | undefined {
  if (!event.wasClean || event.code === 0 || event.code === ABNORMAL_CLOSURE) {
    return "it closed without a close frame (server crashed or network dropped?)";
  }
  if (weClosed && event.code === NO_STATUS_RECEIVED) {
    return "no close code came back for our close frame: the connection closed without the " +
      "server's close frame (server crashed or network dropped?), or its close frame had no " +
      "code; Deno reports both as 1005";
  }
  return undefined;
}

const STOPPED: unique symbol = Symbol("stopped");

// Sends each message as it comes, and stops at once if the connection closes
// while we wait for the next one (say, for a line on stdin).
async function sendAll(
  socket: WebSocket,
  messages: WsClientOptions["messages"],
  { stop, onSent, onClose }: {
    stop: Promise<unknown>;
    onSent: (text: string) => void;
    onClose: (code: number, reason?: string) => void;
  },
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
    const message = next.value;
    if (typeof message === "string") {
      socket.send(message);
      onSent(message);
    } else if (message instanceof Uint8Array) {
      socket.send(message);
    } else {
      onClose(message.code, message.reason);
      return;
    }
  }
}

// ---------- 4. what rides on the handshake: wss://, subprotocols, headers

// The handshake request can carry subprotocols (`Sec-WebSocket-Protocol`:
// the server picks one of ours, or none) and headers of our own, Origin
// among them. With wss:// it all goes inside TLS: the same bytes, encrypted,
// to a server that proved its name with a certificate.
function handshakeOptions(
  options: WsClientOptions,
  client: Deno.HttpClient | undefined,
): WebSocketOptions {
  return {
    protocols: options.protocols ?? [],
    headers: options.headers ?? {},
    ...(client ? { client } : {}),
  };
}

// A certificate is trusted when a CA we trust signed it: the system's, or
// one we name (`caCerts`, e.g. the CA `deno task cert` made).
function trustingClient(caCerts: string[] | undefined) {
  const client = caCerts?.length ? Deno.createHttpClient({ caCerts }) : undefined;
  return { client, [Symbol.dispose]: () => client?.close() };
}

// ------------------------------------------ 5. chat: which replies are our own

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

// ------------------------------- 6. limits: every wait and every message bounded

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

/**
 * What keeps one connection bounded, whatever the server does: a deadline
 * on the handshake (or on the whole run, when it waits for replies), a cap
 * on each message, a watch on the memory a message still being assembled
 * takes, and a bound on the wait for the answer to our close frame. Giving
 * up rejects `orGiveUp`'s promises; `throwIfCutShort` says why the run
 * ended early. Disposing of it stops every timer it set.
 */
function createGuard(socket: WebSocket, options: {
  url: string;
  timeout: number;
  maxMessage: number;
  close: (code?: number, reason?: string) => void;
}) {
  const { url, timeout, close } = options;
  const maxMessage = Math.min(options.maxMessage, DENO_MAX_FRAME);
  // What the error event said: the close event that follows has no detail.
  let failure = "";
  let timedOut = false;
  // The size of the message over the cap, once one has come.
  let tooBig = 0;
  const abandoned = Promise.withResolvers<never>();
  abandoned.promise.catch(() => {});
  const deadline = setTimeout(onDeadline, timeout);
  let closeWait: ReturnType<typeof setTimeout> | undefined;
  const stopWatching = watchNativeMemory(NATIVE_MEMORY_HEADROOM + 4 * maxMessage, onMemoryRunaway);

  function onDeadline(): void {
    timedOut = true;
    // Closing a socket that is still connecting cancels the handshake.
    if (socket.readyState === WebSocket.CONNECTING) {
      failure ||= "timed out";
      socket.close();
    } else close();
  }

  function onMemoryRunaway(grown: number): void {
    close(MESSAGE_TOO_BIG, `message too big (max ${maxMessage} bytes)`);
    // It keeps arriving until the server reads our close: no waiting for that.
    abandoned.reject(
      new Error(
        `the server is sending a message over --max-message ${maxMessage} ` +
          `(${Math.round(grown / 1048576)} MiB of memory so far, and it has not ended); gave up`,
      ),
    );
  }

  return {
    /** `promise`, unless we give up on the server first. */
    orGiveUp<T>(promise: Promise<T>): Promise<T> {
      return Promise.race([promise, abandoned.promise]);
    },

    /** Keeps the error event's detail: the close event that follows has none. */
    noteError(event: Event): void {
      failure ||= (event as ErrorEvent).message ?? "";
    },

    /** Why the handshake failed, in words for the user. */
    connectError(): Error {
      return new Error(connectFailure(failure, url));
    },

    /** The deadline covers only the handshake, unless the run waits for replies. */
    handshakeDone({ runBounded }: { runBounded: boolean }): void {
      if (!runBounded) clearTimeout(deadline);
    },

    /** False for a message over the cap: the connection is closed with 4009 instead. */
    admits(data: string | ArrayBuffer): boolean {
      if (tooBig) return false;
      const size = messageSize(data, maxMessage);
      if (size <= maxMessage) return true;
      tooBig = size;
      close(MESSAGE_TOO_BIG, `message too big (max ${maxMessage} bytes)`);
      return false;
    },

    /** A server that never answers our close frame would keep us forever. */
    awaitCloseAnswer(): void {
      closeWait = setTimeout(() => {
        abandoned.reject(
          new Error(
            `the server did not answer our close frame within ${CLOSE_WAIT_MS} ms; gave up`,
          ),
        );
      }, CLOSE_WAIT_MS);
    },

    /** After the close: throws if a limit, not the conversation, ended it. */
    throwIfCutShort(progress: () => string): void {
      if (tooBig) {
        throw new Error(
          `the server sent a message of ${tooBig} bytes, over --max-message ${maxMessage}; ` +
            "closed the connection (raise --max-message to accept it)",
        );
      }
      if (timedOut) throw new Error(`timed out: ${progress()} in ${timeout} ms`);
    },

    [Symbol.dispose](): void {
      clearTimeout(deadline);
      clearTimeout(closeWait);
      stopWatching();
    },
  };
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

// What Deno's error event said, in words that say what to do.
function connectFailure(message: string, url: string): string {
  if (message === "timed out") return "timed out waiting for the handshake";
  const certificate = message.match(/invalid peer certificate: (.*)/)?.[1];
  if (certificate !== undefined) return certificateFailure(certificate, url);
  const status = message.match(/Invalid status code:? (\d+)/i);
  if (status) {
    return `the server answered HTTP ${
      status[1]
    } instead of 101 Switching Protocols (is this a WebSocket endpoint?)`;
  }
  if (/InvalidContentType|corrupt message/i.test(message)) {
    return "the server does not speak TLS (a ws:// server? then use ws://)";
  }
  if (/lookup address|Name or service not known/i.test(message)) {
    return "unknown host (check the URL)";
  }
  if (/invalid HTTP|parse/i.test(message)) {
    return "the server does not speak HTTP, so it is no WebSocket server " +
      "(a raw TCP port? a TLS port wants wss://)";
  }
  if (/tcp connect|refused/i.test(message)) {
    return "connection refused (is the server running? start one with: deno run -N ws_server.ts)";
  }
  return message ? `cannot connect: ${message}` : "cannot connect";
}

// rustls's reason for refusing the server's certificate, as one line that
// says what was wrong and how to make it trusted.
function certificateFailure(reason: string, url: string): string {
  const host = new URL(url).hostname;
  const skip = `(or, for a test only, run Deno with --unsafely-ignore-certificate-errors=${host})`;
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
    return `certificate refused: name mismatch, ${valid}, not ${host}; connect by a name it ` +
      `lists, or give the server a certificate for ${host} ${skip}`;
  }
  if (/Expired/i.test(reason)) {
    return `certificate refused: expired; the server needs a new one (deno task cert makes a test one) ${skip}`;
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

// ---------------------------------------------------------------- 7. the options

/** What `messages` may hold: a text message, a binary one, or a close with a code. */
export type WsOutgoing = string | Uint8Array | WsCloseRequest;

/** A request to close with this code (1000 or 3000-4999) and reason (at most 123 bytes). */
export interface WsCloseRequest {
  code: number;
  reason?: string;
}

/** Options for {@linkcode runWsClient}. Sizes are in bytes, times in milliseconds. */
export interface WsClientOptions {
  /** Server URL, `ws://` or `wss://`. */
  url: string;
  /**
   * Messages to send, one `send()` each, e.g. the lines of stdin. A close
   * request ends the sending and starts the close handshake with its code.
   */
  messages: Iterable<WsOutgoing> | AsyncIterable<WsOutgoing>;
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
  /** Subprotocols to offer, in order of preference; the server picks one or none. */
  protocols?: string[];
  /**
   * Headers to send with the handshake, e.g. `Origin`. Deno drops the ones
   * the handshake owns (Host, Upgrade, Connection, Sec-WebSocket-*).
   */
  headers?: Record<string, string>;
  /** For wss://: PEM certificates of CAs to trust besides the system's. */
  caCerts?: string[];
  /** Called once the handshake is done, with the subprotocol the server chose ("" for none). */
  onOpen?: (protocol: string) => void;
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

// -------------------------------------------------------------- 8. command line

const USAGE = `Usage: ws_client.ts [options] [MESSAGE ...]

Connects to a WebSocket server. With MESSAGEs, sends each as a text message,
prints what comes back until each has come back (from an echo server as sent,
from a chat server as "NAME: TEXT" under our own name), then closes with code
1000. Without, sends each line you type; Ctrl-D closes, Ctrl-C quits, and a
line starting with / is a command (/help lists them). When the server closes,
says so at once and exits: 0 after code 1000, 1 after any other.
Each message is one line: control characters show escaped (\\n, \\x1b), binary
messages as <binary N bytes>. A server that does not answer our close frame
within ${CLOSE_WAIT_MS / 1000} s is left (exit 1). There is no --insecure: trust
a test CA with --ca, or run Deno with --unsafely-ignore-certificate-errors=HOST.

Options:
  --url URL            server, ws:// or wss:// (default ${DEFAULT_URL})
  --ca FILE            for wss://, also trust the CA certificates in this PEM file
                       (e.g. .certs/ca.pem, written by deno task cert)
  --protocol NAME      offer this subprotocol; repeat it or separate names with
                       commas to offer more; the server's choice goes to stderr
  --header "N: V"      send this header with the handshake; repeat for more
  --origin URL         send this page's origin, as a browser would (Origin header)
  --timeout MS         give up on the handshake after this long; with MESSAGEs,
                       on the whole run (default ${DEFAULT_TIMEOUT_MS})
  --max-message BYTES  largest message accepted; a bigger one closes the connection
                       (code 4009) and exits 1 (default ${DEFAULT_MAX_MESSAGE}, at most 64 MiB)
  -h, --help           show this help`;

const SLASH_HELP = `commands:
  /close [CODE [REASON]]  close with CODE (1000, or 3000-4999; default 1000) and REASON
  /binary HEX             send a binary message, e.g. /binary 48 69 or /binary 4869
  /binary @FILE           send a file's bytes as one binary message
  /quit                   leave at once, without the close handshake (the server sees 1006)
  //TEXT                  send /TEXT, a line that starts with /
  /help                   this list`;

/** A command-line mistake: reported as one line plus the usage, exit code 2. */
class UsageError extends Error {}

/** A problem with what the user asked for, found before connecting: one line, exit 1. */
class SetupError extends Error {}

// parseArgs explains itself over several sentences; keep the first, and say
// how to pass a value that starts with "-" (a negative number, say).
function parseArgsMessage(error: Error): string {
  const first = error.message.split(/\.\s/)[0];
  const option = first.match(/^Option '(--[\w-]+)' argument is ambiguous/)?.[1];
  return option
    ? `${option} needs a value; for one that starts with "-", write ${option}=VALUE`
    : first;
}

// RFC 7230's token: what a header name and a subprotocol name may be made of.
const TOKEN = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/;
// Deno writes these itself and silently drops ours.
const HANDSHAKE_HEADERS = /^(host|upgrade|connection|sec-websocket-.*)$/i;

function parseCommandLine(args: string[]) {
  let parsed;
  try {
    parsed = parseArgs({
      args,
      strict: true,
      allowPositionals: true,
      options: {
        url: { type: "string", default: DEFAULT_URL },
        ca: { type: "string" },
        protocol: { type: "string", multiple: true, default: [] },
        header: { type: "string", multiple: true, default: [] },
        origin: { type: "string" },
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
  if (parsed.values.ca !== undefined && new URL(url).protocol !== "wss:") {
    throw new UsageError(`--ca goes with a wss:// URL, got "${url}"`);
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
    ca: parsed.values.ca,
    protocols: parseProtocols(parsed.values.protocol),
    headers: parseHeaders(parsed.values.header, parsed.values.origin),
    timeout: Number(timeout),
    maxMessage: Number(maxMessage),
    help,
    messages: parsed.positionals,
  };
}

function parseProtocols(values: string[]): string[] {
  const names = values.flatMap((value) => value.split(",")).map((name) => name.trim());
  for (const name of names) {
    if (!TOKEN.test(name)) {
      throw new UsageError(
        `--protocol takes names of letters, digits and !#$%&'*+-.^_\`|~, got "${name}"`,
      );
    }
  }
  const repeated = names.find((name, i) => names.indexOf(name) !== i);
  if (repeated !== undefined) throw new UsageError(`--protocol names "${repeated}" twice`);
  return names;
}

function parseHeaders(values: string[], origin: string | undefined): Record<string, string> {
  const headers: Record<string, string> = {};
  for (const value of values) {
    const colon = value.indexOf(":");
    const name = value.slice(0, colon).trim();
    const text = value.slice(colon + 1).trim();
    if (colon < 1 || !TOKEN.test(name)) {
      throw new UsageError(`--header must look like "Name: value", got "${value}"`);
    }
    // deno-lint-ignore no-control-regex -- a line break would end the header early
    if (/[\x00-\x08\x0a-\x1f\x7f]/.test(text)) {
      throw new UsageError(`--header ${name}: the value may not hold control characters`);
    }
    if (HANDSHAKE_HEADERS.test(name)) {
      throw new UsageError(
        `--header ${name}: the handshake sets it (Deno drops ours)` +
          (/protocol/i.test(name) ? "; offer subprotocols with --protocol" : ""),
      );
    }
    if (Object.keys(headers).some((known) => known.toLowerCase() === name.toLowerCase())) {
      throw new UsageError(`--header ${name} is given twice`);
    }
    headers[name] = text;
  }
  if (origin !== undefined) {
    const page = URL.canParse(origin) ? new URL(origin).origin : "null";
    if (page === "null") {
      throw new UsageError(
        `--origin must be a page's URL, like http://localhost:3000, got "${origin}"`,
      );
    }
    if (Object.keys(headers).some((name) => name.toLowerCase() === "origin")) {
      throw new UsageError("give the Origin once: --origin or --header Origin, not both");
    }
    headers.Origin = page;
  }
  return headers;
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
      `--ca ${path} holds no PEM certificate (-----BEGIN CERTIFICATE-----); a key or a DER file will not do`,
    );
  }
  return text;
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

/** What one typed line asks for. */
type SlashCommand =
  | { send: WsOutgoing }
  | { readFile: string }
  | { help: true }
  | { quit: true }
  | { error: string };

/**
 * Reads one typed line, as wscat's slash commands do: a line that starts
 * with "/" is a command, "//" escapes a leading "/", anything else is text.
 */
function slashCommand(line: string): SlashCommand {
  if (!line.startsWith("/")) return { send: line };
  if (line.startsWith("//")) return { send: line.slice(1) };
  const [, name, rest = ""] = line.match(/^\/(\S*)\s*(.*)$/s)!;
  switch (name) {
    case "close":
      return closeCommand(rest);
    case "binary":
      if (rest.startsWith("@")) return { readFile: rest.slice(1) };
      if (/^([0-9a-f]{2}\s*)+$/i.test(rest)) {
        const hex = rest.replace(/\s+/g, "");
        return { send: Uint8Array.from(hex.match(/../g)!, (byte) => parseInt(byte, 16)) };
      }
      return { error: "/binary takes pairs of hex digits (/binary 48 69) or @FILE" };
    case "quit":
      return { quit: true };
    case "help":
      return { help: true };
    default:
      return { error: `unknown command /${name} (/help lists them; //TEXT sends /TEXT)` };
  }
}

function closeCommand(rest: string): SlashCommand {
  const [, codeText = "", reason = ""] = rest.match(/^(\S*)\s*(.*)$/s)!;
  if (codeText === "") return { send: { code: NORMAL_CLOSURE } };
  const code = Number(codeText);
  if (!/^\d+$/.test(codeText) || (code !== NORMAL_CLOSURE && (code < 3000 || code > 4999))) {
    return {
      error:
        `/close: the code must be 1000 or 3000-4999 (the others are the protocol's own), got ${codeText}`,
    };
  }
  const bytes = encoder.encode(reason).length;
  if (bytes > 123) {
    return { error: `/close: the reason is ${bytes} bytes; at most 123 fit in a close frame` };
  }
  return { send: { code, reason } };
}

/**
 * The lines typed (or piped) in interactive mode, as messages: slash
 * commands are carried out, their mistakes reported on stderr, and the
 * rest sent as text.
 */
async function* typedMessages(
  lines: AsyncIterable<string>,
  { terminal, onClose }: { terminal?: TerminalMarks; onClose: (code: number) => void },
): AsyncGenerator<WsOutgoing> {
  for await (const line of lines) {
    const command = slashCommand(line);
    if ("send" in command) {
      if (typeof command.send === "object" && "code" in command.send) onClose(command.send.code);
      yield command.send;
    } else if ("readFile" in command) {
      const bytes = await readBinaryFile(command.readFile);
      if (typeof bytes === "string") notice(terminal, bytes);
      else yield bytes;
    } else if ("help" in command) notice(terminal, SLASH_HELP);
    else if ("error" in command) notice(terminal, command.error);
    else Deno.exit(0);
    terminal?.prompt();
  }
}

// The bytes of /binary @FILE, or why not, in one line.
async function readBinaryFile(path: string): Promise<Uint8Array | string> {
  try {
    const { size } = await Deno.stat(path);
    if (size > DENO_MAX_FRAME) return `/binary @${path}: ${size} bytes, over 64 MiB`;
    return await Deno.readFile(path);
  } catch (error) {
    if (error instanceof Deno.errors.NotCapable || error instanceof Deno.errors.PermissionDenied) {
      return `/binary @${path}: permission denied (run with --allow-read=${path})`;
    }
    return `/binary @${path}: ${(error as Error).message}`;
  }
}

// A binary message as its size and its first bytes in hex, for a person.
function binaryPreview(data: ArrayBuffer): string {
  const bytes = new Uint8Array(data, 0, Math.min(data.byteLength, 16));
  const hex = Array.from(bytes, (byte) => byte.toString(16).padStart(2, "0")).join(" ");
  const more = data.byteLength > bytes.length ? " …" : "";
  return `<binary ${data.byteLength} bytes${hex ? `: ${hex}${more}` : ""}>`;
}

/**
 * A person at a terminal sees what they send and what comes back apart:
 * they type after a "> " prompt, and each message received is a line
 * marked "< " written over the prompt, which then comes back. Only when
 * stdin and stdout are both the terminal; piped, stdout stays as it was.
 */
class TerminalMarks {
  static PROMPT = "> ";
  // Carriage return and "erase line": the prompt goes, the line is ours.
  static CLEAR_LINE = "\r\x1b[2K";

  /** What to write for one received message: its line, then the prompt again. */
  static received(data: string | ArrayBuffer): string {
    const text = typeof data === "string" ? escapeControls(data) : binaryPreview(data);
    return `${TerminalMarks.CLEAR_LINE}< ${text}\n${TerminalMarks.PROMPT}`;
  }

  prompt(): void {
    writeTerminal(TerminalMarks.PROMPT);
  }

  /** Clears the prompt so that a line on stderr starts at the left. */
  clear(): void {
    writeTerminal(TerminalMarks.CLEAR_LINE);
  }
}

function writeTerminal(text: string): void {
  const bytes = encoder.encode(text);
  for (let written = 0; written < bytes.length;) {
    written += Deno.stdout.writeSync(bytes.subarray(written));
  }
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

// One message, one line: what the server chose reaches the terminal escaped.
function show(data: string | ArrayBuffer): void {
  console.log(
    typeof data === "string" ? escapeControls(data) : `<binary ${data.byteLength} bytes>`,
  );
}

function notice(terminal: TerminalMarks | undefined, text: string): void {
  terminal?.clear();
  console.error(text.split("\n").map((line) => `ws_client: ${line}`).join("\n"));
}

function report(url: string, text: string, terminal?: TerminalMarks): void {
  terminal?.clear();
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
  const { url, timeout, maxMessage, messages, protocols, headers } = options;
  const oneShot = messages.length > 0;
  // A person typing is told how to leave; their screen, if stdout is it too, is marked.
  const personTyping = !oneShot && Deno.stdin.isTerminal();
  const terminal = personTyping && Deno.stdout.isTerminal() ? new TerminalMarks() : undefined;
  let close;
  // The code we close with: 1000, unless /close chose another.
  let closeCode = NORMAL_CLOSURE;
  try {
    const caCerts = options.ca === undefined ? undefined : [await readCaFile(options.ca)];
    close = await runWsClient({
      url,
      messages: oneShot ? messages : typedMessages(readLines(Deno.stdin.readable), {
        terminal,
        onClose: (code) => closeCode = code,
      }),
      untilEchoed: oneShot,
      timeout,
      maxMessage,
      protocols,
      headers,
      caCerts,
      onOpen: (protocol) => {
        if (protocols.length > 0) {
          report(url, protocol ? `subprotocol: ${protocol}` : "the server chose no subprotocol");
        }
        if (!personTyping) return;
        report(
          url,
          "connected; type a line to send it, /help for commands, Ctrl-D to close, Ctrl-C to quit",
        );
        terminal?.prompt();
      },
      onMessage: terminal ? (data) => writeTerminal(TerminalMarks.received(data)) : show,
    });
  } catch (error) {
    report(url, error instanceof SetupError ? error.message : clientError(error, url), terminal);
    return 1;
  }
  // The answer to our own close is no news; any other code is, whoever began.
  if (!close.byServer && (close.code === NORMAL_CLOSURE || close.code === closeCode)) {
    terminal?.clear();
    return 0;
  }
  const why = `code ${close.code}${close.reason ? ` (${close.reason})` : ""}`;
  report(url, `the server closed the connection: ${why}`, terminal);
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
