/**
 * bench.ts: raw TCP against WebSocket, measured on your machine, over loopback.
 *
 * What it shows: what the WebSocket layer costs on top of the TCP connection
 * it runs on. It starts `tcp_server.ts` and `ws_server.ts` as separate
 * processes (echo and chat), drives both with the same load, and prints a
 * table side by side: round-trip latency on one connection, echoes per second
 * over many connections, bulk MB/s, chat fan-out deliveries per second, the
 * cost of opening a connection, and server memory per idle connection.
 * Every echoed byte and every chat delivery is checked, so a server that
 * answers wrongly fails instead of looking fast.
 *
 * Read the absolute figures as a floor: the load generator is this script, in
 * JavaScript, on the same machine, sharing its CPUs with the server under
 * test. The ratios between the two transports are the point.
 *
 * Run it (least privilege: loopback only, run deno for the servers and ps
 * for their memory; a default run takes under a minute):
 *
 *     deno run --allow-net=127.0.0.1 --allow-run=deno,ps tools/bench.ts
 *     deno task bench --quick                  # a few seconds, a first look
 *     deno task bench --json > bench.json      # one JSON object, for machines
 *     deno task bench --tcp 127.0.0.1:9101 --ws ws://127.0.0.1:9102/   # servers you started
 *
 * @module
 */

import { parseArgs } from "node:util";
import {
  closeQuietly,
  delay,
  flagError,
  optionalInteger,
  residentBytes,
  runCommand,
  type ServerProcess,
  spawnServer,
  UsageError,
  within,
  writeAll,
} from "./shared.ts";

// 2,000 idle connections: with fewer, the heap a server already has absorbs
// much of what they cost, and memory per connection reads too low.
const DEFAULTS = { duration: 4, rounds: 2, connections: 50, idle: 2000, clients: 20, senders: 4 };
// --quick: enough to see every row and its verification work, in a few seconds.
const QUICK = { duration: 0.4, rounds: 1, connections: 10, idle: 100, clients: 6, senders: 2 };
const MAX_DURATION = 60;
// A small message, so per-message costs dominate, not copying.
const MESSAGE_SIZE = 32;
// Bulk: 64 KiB per write (TCP) or per message (WebSocket); for WebSocket,
// this many messages travel at once, so neither side ever waits idle.
const BULK_CHUNK = 64 * 1024;
const BULK_IN_FLIGHT = 8;
// Chat: each sender has at most this many messages on their way (sent, not
// yet relayed back to it), so no client falls behind by more than the server
// lets it (2 MiB for ours) and the figure is the steady state, not a burst.
const CHAT_WINDOW = 16;
// Until every client has heard every other one, it repeats its hello this
// often: a client whose connect() returned may not be in the room yet.
const HELLO_EVERY_MS = 50;
// Time before each timed phase that is run but not counted: connections
// settle, the JIT compiles the hot paths on both sides.
const MAX_WARMUP = 0.5;
// Caps on counts, so that every phase is bounded in count as well as time.
const MAX_SAMPLES = 1_000_000;
const MAX_MESSAGES = 50_000_000;
const MAX_BULK_BYTES = 64 * 1024 ** 3;
// Connecting (or draining) that takes longer than this means the server is
// stuck, not slow: the phase fails.
const STALL_MS = 5000;
// After opening the idle connections, time for the server to finish its
// per-connection work before its memory is read.
const SETTLE_MS = 300;
const CLOSE_WAIT_MS = 1000;
// The close code for "done, all is well" (RFC 6455, section 7.4.1). Closing
// without one sends no code at all, which some servers log as an error.
const NORMAL_CLOSURE = 1000;

const encoder = new TextEncoder();

type Transport = "tcp" | "ws";
// In the order of the table's columns.
const TRANSPORTS = ["tcp", "ws"] as const;
const NAMES = { tcp: "TCP", ws: "WebSocket" };

/** What a run does, from the command line with its defaults. Durations are in seconds. */
interface Settings {
  duration: number;
  rounds: number;
  connections: number;
  idle: number;
  clients: number;
  senders: number;
}

/** Where one transport's servers are: started here, or given by flags. */
interface Servers {
  source: "started" | "given";
  echo: string | null;
  chat: string | null;
  /** The echo server's process id, for its memory per connection. */
  pid: number | null;
}

const FLOOR_NOTE = "The load generator is JavaScript on this same machine, sharing its CPUs with " +
  "the server under test, so every absolute figure is a floor for what the server can do; " +
  "the ratios between the transports are the point.";

const MEANING = [
  "What the difference means: a WebSocket is a TCP connection plus work on every message. The",
  "sender wraps each message in a frame (2 to 14 bytes of header), a client also masks the payload",
  "(XOR with a fresh 4-byte key, so that no proxy cache can be poisoned), and the receiver parses",
  "the frame, unmasks it and, for text, checks the UTF-8. That work grows with every byte, which",
  "the bulk row shows; for small messages it is little next to what each message costs anyway",
  "(system calls, a turn of the event loop), so the round-trip and echoes rows can come out close,",
  "either way round. Opening a WebSocket adds an HTTP request and its 101 answer to TCP's",
  "handshake: the open row, paid once per connection, not per message. The chat row measures each",
  "server's fan-out code as much as the protocol: how many writes it makes per message and client.",
  "And raw TCP has no messages at all: its chat server must cut the byte stream into lines itself.",
  "Memory is how much the server's resident set grew while the idle connections were open,",
  "divided by their number; a garbage collection in between can move it by a few KiB either way.",
  "Expect about 10 KiB for TCP (tcp_server.ts reads into 1 KiB until reads fill it; Deno's own",
  "floor is 7-8 KiB) and about 20 KiB for WebSocket: the protocol costs memory, not TCP. With a",
  "few hundred connections (--quick) the heap a server already has absorbs part of it, and the",
  "figures come out lower; tools/idle_memory.ts measures TCP with 5,000, next to plain Deno loops.",
];

/**
 * Runs every phase for both transports, against the `given` servers or ones
 * it starts (added to `started`, for the caller to stop), and returns the
 * report that --json prints. A failed phase is reported in `errors`, not
 * thrown; a server that cannot start is, and so is `stop`'s reason: no phase
 * starts once it has aborted.
 */
async function runBench(options: {
  settings: Settings;
  given: Partial<Record<Transport, Servers>>;
  started: ServerProcess[];
  stop: AbortSignal;
}) {
  const { settings, given, started, stop } = options;
  const began = performance.now();
  const servers = {
    tcp: given.tcp ?? await startServers("tcp", started),
    ws: given.ws ?? await startServers("ws", started),
  };
  const results = await measureAll(servers, settings, stop);
  return {
    machine: { cpus: navigator.hardwareConcurrency, os: Deno.build.os, deno: Deno.version.deno },
    settings,
    servers,
    ...results,
    ratios: ratiosOf(results.tcp, results.ws),
    seconds: (performance.now() - began) / 1000,
    note: FLOOR_NOTE,
  };
}

type Report = Awaited<ReturnType<typeof runBench>>;

// Each timed phase runs in rounds, TCP and WebSocket taking turns, and each
// keeps its best round: another program on the machine can only ever make a
// round slower, and taking turns spreads what it does over both columns.
async function measureAll(
  servers: Record<Transport, Servers>,
  settings: Settings,
  stop: AbortSignal,
) {
  const results = { tcp: emptyResult(), ws: emptyResult() };
  for (const step of STEPS) {
    for (const transport of TRANSPORTS) {
      if (servers[transport][step.server] === null) {
        const flag = `--${transport}${step.server === "chat" ? "-chat" : ""}`;
        results[transport].skipped[step.name] = `no ${step.server} server given (${flag})`;
      }
    }
  }
  const rounds = (step: Step) => step.timed ? settings.rounds : 1;
  const measured = (step: Step) => TRANSPORTS.filter((t) => servers[t][step.server] !== null);
  const total = STEPS.reduce((sum, step) => sum + rounds(step) * measured(step).length, 0);
  let index = 0;
  for (const step of STEPS) {
    const best: Partial<Record<Transport, Figures>> = {};
    for (let round = 1; round <= rounds(step); round++) {
      for (const transport of measured(step)) {
        stop.throwIfAborted();
        const result = results[transport];
        const name = rounds(step) > 1
          ? `${step.name} (round ${round} of ${rounds(step)})`
          : step.name;
        console.error(`bench: [${++index}/${total}] ${NAMES[transport]} ${name}`);
        // A phase that failed once fails again, and may take STALL_MS to.
        if (result.errors[step.name]) continue;
        try {
          const figures = await step.run({
            transport,
            target: servers[transport][step.server]!,
            settings,
            duration: settings.duration / settings.rounds,
            pid: servers[transport].pid,
            skip: (what, why) => result.skipped[what] = why,
          });
          const previous = best[transport];
          if (!previous || step.score(figures) > step.score(previous)) best[transport] = figures;
          if (typeof figures.chatLost === "number") {
            result.chatLost = (result.chatLost ?? 0) + figures.chatLost;
          }
        } catch (error) {
          result.errors[step.name] = describe(error);
        }
      }
    }
    for (const transport of TRANSPORTS) {
      const { chatLost: _, ...figures } = best[transport] ?? {};
      Object.assign(results[transport], figures);
    }
  }
  for (const result of [results.tcp, results.ws]) {
    if (result.chatLost) result.errors.chat ??= `${result.chatLost} chat deliveries never arrived`;
  }
  return results;
}

// ------------------------------------------------------------------ the phases

/** What one round of a phase is run with. */
interface Round {
  transport: Transport;
  /** The echo or chat server's address. */
  target: string;
  settings: Settings;
  /** Seconds counted in this round: --duration split over the rounds. */
  duration: number;
  /** The echo server's process id, for its memory. */
  pid: number | null;
  /** Records why one figure of the phase is missing. */
  skip: (what: string, why: string) => void;
}

/** What one round of a phase measured. */
type Figures = Partial<Omit<TransportResult, "skipped" | "errors">>;

interface Step {
  name: string;
  server: "echo" | "chat";
  /** Timed phases run once per round; the others once. */
  timed: boolean;
  run: (round: Round) => Promise<Figures>;
  /** Which round was best: the higher, the better. */
  score: (figures: Figures) => number;
}

// The order matters for memory: it runs after the latency phase has warmed
// the server up, but before the big phases have grown its heap, whose free
// space would then absorb new connections and hide their cost.
const STEPS: Step[] = [
  {
    name: "latency",
    server: "echo",
    timed: true,
    run: measureLatency,
    score: (figures) => -figures.latencyP50Us!,
  },
  { name: "connections", server: "echo", timed: false, run: measureConnections, score: () => 0 },
  {
    name: "throughput",
    server: "echo",
    timed: true,
    run: measureThroughput,
    score: (figures) => figures.messagesPerSecond!,
  },
  {
    name: "bulk",
    server: "echo",
    timed: true,
    run: async ({ transport, target, duration }) => ({
      bulkMBPerSecond:
        (transport === "tcp"
          ? await measureTcpBulk(parseTcpAddress(target), duration)
          : await measureWsBulk(target, duration)) / 1e6,
    }),
    score: (figures) => figures.bulkMBPerSecond!,
  },
  {
    name: "chat",
    server: "chat",
    timed: true,
    run: measureChat,
    score: (figures) => figures.chatDeliveriesPerSecond!,
  },
];

function warmup(duration: number): number {
  return Math.min(MAX_WARMUP, duration / 4);
}

/**
 * One phase's clock and the resources it opened. If the phase overruns its
 * time by `STALL_MS` (a server that stopped answering), it fails: its
 * connections are closed and everything waiting on them is rejected, so no
 * phase can hang.
 */
class Phase {
  /** When counting starts and stops, in `performance.now()` milliseconds. */
  start = Infinity;
  end = Infinity;
  error: Error | undefined;
  #resources = new Set<{ close(): void }>();
  #sockets = new Set<WebSocket>();
  #waiters = new Set<(error: Error) => void>();
  #timer: ReturnType<typeof setTimeout>;

  constructor() {
    this.#timer = setTimeout(() => this.fail(new Error("stalled while connecting")), STALL_MS);
  }

  /** Starts the clock: `warmupSeconds` uncounted, then `seconds` counted. */
  go(warmupSeconds: number, seconds: number): void {
    this.start = performance.now() + warmupSeconds * 1000;
    this.end = this.start + seconds * 1000;
    clearTimeout(this.#timer);
    this.#timer = setTimeout(
      () => this.fail(new Error(`the server stopped answering for ${STALL_MS / 1000} s`)),
      this.end - performance.now() + STALL_MS,
    );
  }

  fail(error: Error): void {
    this.error ??= error;
    for (const reject of this.#waiters) reject(this.error);
    this.#waiters.clear();
    this.#closeAll();
  }

  /** Throws the phase's error, if it has failed. */
  check(): void {
    if (this.error) throw this.error;
  }

  own<T extends { close(): void }>(resource: T): T {
    if (resource instanceof WebSocket) this.#sockets.add(resource);
    else this.#resources.add(resource);
    return resource;
  }

  /** A promise that also rejects when the phase fails. */
  wait<T>(): PromiseWithResolvers<T> {
    const waiter = Promise.withResolvers<T>();
    // It may fail before anyone awaits it; that is no unhandled rejection.
    waiter.promise.catch(() => {});
    if (this.error) {
      waiter.reject(this.error);
      return waiter;
    }
    const reject = waiter.reject;
    this.#waiters.add(reject);
    return {
      promise: waiter.promise,
      resolve: (value) => {
        this.#waiters.delete(reject);
        waiter.resolve(value);
      },
      reject: (error) => {
        this.#waiters.delete(reject);
        waiter.reject(error);
      },
    };
  }

  /** Closes everything, waiting (briefly) for WebSocket close handshakes. */
  async finish(): Promise<void> {
    clearTimeout(this.#timer);
    const closing = [...this.#sockets].map((socket) =>
      socket.readyState === WebSocket.CLOSED ? Promise.resolve() : new Promise<void>((resolve) => {
        socket.addEventListener("close", () => resolve());
      })
    );
    this.#closeAll();
    await within(Promise.all(closing), "close handshakes", CLOSE_WAIT_MS).catch(() => {});
  }

  #closeAll(): void {
    for (const resource of this.#resources) closeQuietly(resource);
    for (const socket of this.#sockets) {
      if (socket.readyState === WebSocket.OPEN) socket.close(NORMAL_CLOSURE);
      else if (socket.readyState === WebSocket.CONNECTING) closeQuietly(socket);
    }
  }
}

async function inPhase<T>(body: (phase: Phase) => Promise<T>): Promise<T> {
  const phase = new Phase();
  try {
    const value = await body(phase);
    phase.check();
    return value;
  } catch (error) {
    // A failed phase closes its connections, and the reads on them then
    // throw something less helpful than the reason they were closed.
    throw phase.error ?? error;
  } finally {
    await phase.finish();
  }
}

/** One open connection to an echo server. */
interface EchoConnection {
  /** Sends `message` and resolves with the echo, `message.length` bytes. */
  roundTrip(message: Uint8Array): Promise<Uint8Array>;
}

type Opener = (phase: Phase) => Promise<EchoConnection>;

function opener({ transport, target }: Round): Opener {
  if (transport === "ws") return (phase) => openWsEcho(target, phase);
  const address = parseTcpAddress(target);
  return (phase) => openTcpEcho(address, phase);
}

/** Round trips of one small message on one connection. */
async function measureLatency(round: Round): Promise<Figures> {
  const { duration } = round;
  return await inPhase(async (phase) => {
    const connection = await opener(round)(phase);
    const message = new Uint8Array(MESSAGE_SIZE);
    const samples = new Float64Array(MAX_SAMPLES);
    let count = 0;
    phase.go(warmup(duration), duration);
    for (let seq = 0; count < MAX_SAMPLES; seq++) {
      stamp(message, seq);
      const sent = performance.now();
      if (sent >= phase.end) break;
      const echo = await connection.roundTrip(message);
      const took = performance.now() - sent;
      verifyEcho(message, echo);
      if (sent >= phase.start) samples[count++] = took;
    }
    if (count === 0) throw new Error("no round trip completed");
    const taken = samples.subarray(0, count);
    return {
      roundTrips: count,
      latencyP50Us: percentile(taken, 50) * 1000,
      latencyP99Us: percentile(taken, 99) * 1000,
    };
  });
}

/** Echoes per second over many connections, each with one message in flight. */
async function measureThroughput(round: Round): Promise<Figures> {
  const { duration, settings } = round;
  const open = opener(round);
  return await inPhase(async (phase) => {
    const connections = await Promise.all(
      Array.from({ length: settings.connections }, () => open(phase)),
    );
    let counted = 0;
    let total = 0;
    phase.go(warmup(duration), duration);
    await Promise.all(connections.map(async (connection, n) => {
      const message = new Uint8Array(MESSAGE_SIZE);
      for (let seq = n; total < MAX_MESSAGES; seq += settings.connections) {
        if (performance.now() >= phase.end) return;
        stamp(message, seq);
        const echo = await connection.roundTrip(message);
        verifyEcho(message, echo);
        total++;
        const now = performance.now();
        if (now >= phase.start && now < phase.end) counted++;
      }
    }));
    return { messagesPerSecond: counted / duration };
  });
}

/**
 * Opens connections one after another, each used for one echo and then left
 * idle, timing each from connect() to its echo; reads the server's resident
 * memory before and after when its process id is known.
 */
async function measureConnections(round: Round): Promise<Figures> {
  const { transport, settings, pid } = round;
  const open = opener(round);
  return await inPhase(async (phase) => {
    const before = pid === null ? null : await residentBytes(pid);
    const openMs = new Float64Array(settings.idle);
    const message = new Uint8Array(MESSAGE_SIZE);
    let opened = 0;
    phase.go(0, Math.max(settings.duration, 2));
    while (opened < settings.idle && performance.now() < phase.end) {
      const began = performance.now();
      const connection = await open(phase).catch((error) => {
        throw outOfFiles(error, opened, settings.idle);
      });
      stamp(message, opened);
      verifyEcho(message, await connection.roundTrip(message));
      openMs[opened++] = performance.now() - began;
    }
    if (opened === 0) throw new Error("no connection opened");
    let memoryPerConnection = null;
    if (before === null) {
      round.skip("memory", `no process id for the ${transport} echo server (--${transport}-pid)`);
    } else {
      await delay(SETTLE_MS);
      memoryPerConnection = (await residentBytes(pid!) - before) / opened;
    }
    return {
      openP50Us: percentile(openMs.subarray(0, opened), 50) * 1000,
      idleConnections: opened,
      memoryPerConnection,
    };
  });
}

// Running out of open files here is the machine's limit, not the server's
// fault: say what to change. (Deno's WebSocket connect error hides the
// errno, so only TCP's says so; the WebSocket phase fails the same way.)
function outOfFiles(error: unknown, opened: number, wanted: number): unknown {
  const message = error instanceof Error ? error.message : String(error);
  if (!/Too many open files|os error 24/.test(message)) return error;
  return new Error(
    `${message} after ${opened} of ${wanted} idle connections: raise the open-file limit ` +
      `("ulimit -n ${wanted + 200}") or lower --idle`,
  );
}

// ------------------------------------------------------------------------ TCP

interface TcpAddress {
  hostname: string;
  port: number;
}

async function connectTcp(address: TcpAddress, phase: Phase): Promise<Deno.TcpConn> {
  const conn = phase.own(await Deno.connect(address));
  // Our side sends small messages while replies are unacknowledged (chat);
  // with Nagle's algorithm on, those would wait for an ACK, and the figure
  // would be this client's, not the server's.
  conn.setNoDelay(true);
  return conn;
}

async function openTcpEcho(address: TcpAddress, phase: Phase): Promise<EchoConnection> {
  const conn = await connectTcp(address, phase);
  const reply = new Uint8Array(MESSAGE_SIZE);
  return {
    async roundTrip(message) {
      await writeAll(conn, message);
      const echo = message.length === reply.length ? reply : new Uint8Array(message.length);
      // TCP has no messages: the echo may come back in several reads.
      for (let got = 0; got < echo.length;) {
        const n = await conn.read(echo.subarray(got));
        if (n === null) throw new Error("the server closed the connection mid-echo");
        got += n;
      }
      return echo;
    },
  };
}

/**
 * Bulk echo on one TCP connection: one task writes 64 KiB chunks while
 * another reads the echo, since a server that awaits its writes (ours does)
 * stops reading when nobody reads its replies. Returns bytes per second.
 */
async function measureTcpBulk(address: TcpAddress, duration: number): Promise<number> {
  return await inPhase(async (phase) => {
    const conn = await connectTcp(address, phase);
    const allBack = phase.wait<void>();
    let sent = 0;
    let received = 0;
    let writing = true;
    let counted = 0;
    phase.go(warmup(duration), duration);
    (async () => {
      // Each 4-byte word carries its own position in the stream, so one
      // comparison per word catches a lost, repeated or reordered byte.
      // Reads end anywhere, so the tail of a word waits for the next read.
      const bytes = new Uint8Array(BULK_CHUNK + 4);
      const words = new Uint32Array(bytes.buffer);
      let carry = 0;
      let word = 0;
      for (;;) {
        const n = await conn.read(bytes.subarray(carry, carry + BULK_CHUNK));
        if (n === null) {
          throw new Error(`the server closed after echoing ${received} of ${sent} bytes`);
        }
        const have = carry + n;
        const whole = have >>> 2;
        for (let i = 0; i < whole; i++) {
          if (words[i] !== ((word + i) >>> 0)) {
            throw new Error(`echo differs from what was sent at byte ${(word + i) * 4}`);
          }
        }
        word += whole;
        carry = have & 3;
        bytes.copyWithin(0, whole * 4, have);
        received += n;
        const now = performance.now();
        if (now >= phase.start && now < phase.end) counted += n;
        if (!writing && received === sent) allBack.resolve();
      }
    })().catch((error) => phase.fail(error));
    const chunk = new Uint32Array(BULK_CHUNK / 4);
    while (performance.now() < phase.end && sent < MAX_BULK_BYTES) {
      fillWords(chunk, sent / 4);
      await writeAll(conn, new Uint8Array(chunk.buffer));
      sent += BULK_CHUNK;
    }
    writing = false;
    if (received === sent) allBack.resolve();
    await allBack.promise;
    return counted / duration;
  });
}

function tcpChatOpener(address: TcpAddress): ChatOpener {
  return async (phase, onText) => {
    const conn = await connectTcp(address, phase);
    // Chat on TCP is newline-framed: cut the byte stream into lines.
    (async () => {
      const buffer = new Uint8Array(BULK_CHUNK);
      // A read can also end inside a UTF-8 character; `stream` keeps its start.
      const utf8 = new TextDecoder();
      let pending = "";
      for (;;) {
        const n = await conn.read(buffer);
        if (n === null) break;
        const lines = (pending + utf8.decode(buffer.subarray(0, n), { stream: true })).split("\n");
        pending = lines.pop()!;
        for (const line of lines) onText(line);
      }
      if (!phase.error) phase.fail(new Error("the chat server closed a connection"));
    })().catch((error) => phase.fail(error));
    return (text) => writeAll(conn, encoder.encode(`${text}\n`));
  };
}

// ------------------------------------------------------------------ WebSocket

async function openWebSocket(url: string, phase: Phase): Promise<WebSocket> {
  const socket = phase.own(new WebSocket(url));
  socket.binaryType = "arraybuffer";
  const opened = phase.wait<void>();
  socket.onopen = () => opened.resolve();
  socket.onerror = (event) => {
    opened.reject(new Error(`cannot connect to ${url}: ${(event as ErrorEvent).message}`));
  };
  socket.onclose = () => opened.reject(new Error(`${url} closed the connection while opening`));
  await opened.promise;
  return socket;
}

async function openWsEcho(url: string, phase: Phase): Promise<EchoConnection> {
  const socket = await openWebSocket(url, phase);
  let waiting: PromiseWithResolvers<Uint8Array> | undefined;
  socket.onerror = () => {};
  socket.onclose = (event) => {
    phase.fail(new Error(`the server closed a WebSocket (code ${event.code})`));
  };
  socket.onmessage = (event) => {
    const waiter = waiting;
    waiting = undefined;
    if (!waiter) phase.fail(new Error("the server sent a message nobody asked for"));
    else if (typeof event.data === "string") waiter.reject(new Error("sent binary, got text"));
    else waiter.resolve(new Uint8Array(event.data));
  };
  return {
    roundTrip(message) {
      waiting = phase.wait();
      socket.send(message);
      return waiting.promise;
    },
  };
}

/**
 * Bulk echo on one WebSocket: 64 KiB binary messages, `BULK_IN_FLIGHT` of
 * them on their way at any time. Returns bytes per second.
 */
async function measureWsBulk(url: string, duration: number): Promise<number> {
  return await inPhase(async (phase) => {
    const socket = await openWebSocket(url, phase);
    const buffers = Array.from({ length: BULK_IN_FLIGHT }, () => new Uint32Array(BULK_CHUNK / 4));
    const done = phase.wait<void>();
    let sent = 0;
    let received = 0;
    let counted = 0;
    function send() {
      const words = buffers[sent % BULK_IN_FLIGHT];
      fillWords(words, sent * words.length);
      socket.send(words);
      sent++;
    }
    socket.onerror = () => {};
    socket.onclose = (event) => done.reject(new Error(`the server closed (code ${event.code})`));
    socket.onmessage = (event) => {
      if (typeof event.data === "string") return done.reject(new Error("sent binary, got text"));
      const words = new Uint32Array(event.data);
      const first = received * (BULK_CHUNK / 4);
      if (words.length !== BULK_CHUNK / 4) {
        return done.reject(
          new Error(`sent ${BULK_CHUNK} bytes, the echo had ${event.data.byteLength}`),
        );
      }
      for (let i = 0; i < words.length; i++) {
        if (words[i] !== ((first + i) >>> 0)) {
          return done.reject(new Error(`echo of message ${received} differs at byte ${i * 4}`));
        }
      }
      received++;
      const now = performance.now();
      if (now >= phase.start && now < phase.end) counted += BULK_CHUNK;
      if (now < phase.end && sent * BULK_CHUNK < MAX_BULK_BYTES) send();
      else if (received === sent) done.resolve();
    };
    phase.go(warmup(duration), duration);
    for (let i = 0; i < BULK_IN_FLIGHT; i++) send();
    await done.promise;
    return counted / duration;
  });
}

function wsChatOpener(url: string): ChatOpener {
  return async (phase, onText) => {
    const socket = await openWebSocket(url, phase);
    socket.onerror = () => {};
    socket.onclose = (event) => {
      phase.fail(new Error(`the chat server closed a WebSocket (code ${event.code})`));
    };
    socket.onmessage = (event) => {
      if (typeof event.data === "string") onText(event.data);
      else phase.fail(new Error("the chat server sent a binary message"));
    };
    return (text) => {
      socket.send(text);
      return Promise.resolve();
    };
  };
}

// ----------------------------------------------------------------------- chat

/** Opens one chat client; `onText` gets each line or message it receives. */
type ChatOpener = (phase: Phase, onText: (text: string) => void) => Promise<ChatSend>;
type ChatSend = (text: string) => Promise<void>;

/**
 * Chat fan-out: `clients` join one room and the first `senders` of them
 * send numbered messages. The server relays each to every client, sender
 * included, as "NAME: TEXT"; every client checks that it gets each sender's
 * messages once and in order. Returns deliveries per second and how many
 * never arrived.
 */
async function measureChat(round: Round): Promise<Figures> {
  const { transport, target, duration, settings: { clients, senders } } = round;
  const open = transport === "tcp" ? tcpChatOpener(parseTcpAddress(target)) : wsChatOpener(target);
  return await inPhase(async (phase) => {
    // next[client][sender]: the sequence number that client expects next.
    const next = Array.from({ length: clients }, () => new Float64Array(senders));
    const heard = Array.from({ length: clients }, () => new Set<number>());
    let allHeard = 0;
    const everyoneHeard = phase.wait<void>();
    const sent = new Float64Array(senders);
    const ackWaiters: (PromiseWithResolvers<void> | undefined)[] = [];
    let delivered = 0;
    let counted = 0;
    let sendingDone = false;
    let drained: PromiseWithResolvers<void> | undefined;

    function receive(client: number, text: string) {
      // "* NAME joined" and "* NAME left" are announcements, not messages.
      if (text.startsWith("* ")) return;
      const body = text.slice(text.indexOf(": ") + 2);
      const fields = body.split(" ");
      if (fields[0] === "hello") {
        const from = Number(fields[1]);
        if (!heard[client].has(from)) {
          heard[client].add(from);
          if (heard[client].size === clients && ++allHeard === clients) everyoneHeard.resolve();
        }
        return;
      }
      const sender = Number(fields[1]);
      const seq = Number(fields[2]);
      if (fields[0] !== "m" || !(sender < senders) || !Number.isInteger(seq)) {
        return phase.fail(new Error(`unexpected chat line: ${JSON.stringify(text)}`));
      }
      // A number skipped is a delivery lost; one seen before is a server bug.
      if (seq < next[client][sender]) {
        return phase.fail(
          new Error(`client ${client} got message ${seq} from sender ${sender} twice, or late`),
        );
      }
      next[client][sender] = seq + 1;
      delivered++;
      const now = performance.now();
      if (now >= phase.start && now < phase.end) counted++;
      if (client === sender) ackWaiters[sender]?.resolve();
      if (sendingDone && caughtUp()) drained?.resolve();
    }

    // Every client has seen (or skipped) the last message of every sender.
    function caughtUp() {
      return next.every((expects) => expects.every((seq, sender) => seq === sent[sender]));
    }

    const sends: ChatSend[] = [];
    for (let client = 0; client < clients; client++) {
      sends.push(await open(phase, (text) => receive(client, text)));
    }
    // The room is complete once every client has heard every client's hello.
    const hellos = (async () => {
      while (allHeard < clients && !phase.error) {
        await Promise.all(sends.map((send, client) => send(`hello ${client}`)));
        await delay(HELLO_EVERY_MS);
      }
    })();
    try {
      await everyoneHeard.promise;
    } finally {
      await hellos.catch(() => {});
    }

    phase.go(warmup(duration), duration);
    await Promise.all(
      sends.slice(0, senders).map(async (send, sender) => {
        const own = next[sender];
        while (performance.now() < phase.end && sent[sender] < MAX_MESSAGES) {
          if (sent[sender] - own[sender] >= CHAT_WINDOW) {
            ackWaiters[sender] = phase.wait<void>();
            await ackWaiters[sender]!.promise;
            continue;
          }
          await send(`m ${sender} ${sent[sender]}`);
          sent[sender]++;
        }
      }),
    );
    sendingDone = true;
    // Whatever was sent is still arriving; wait for it, but not forever:
    // what has not come by then is lost.
    if (!caughtUp()) {
      drained = phase.wait<void>();
      await within(drained.promise, "chat deliveries", STALL_MS).catch(() => {});
    }
    phase.check();
    return {
      chatDeliveriesPerSecond: counted / duration,
      chatLost: sent.reduce((sum, n) => sum + n, 0) * clients - delivered,
    };
  });
}

// --------------------------------------------------------------------- servers

/** Starts the project's echo and chat servers for one transport (tcp_server.ts or ws_server.ts). */
async function startServers(transport: Transport, started: ServerProcess[]): Promise<Servers> {
  const script = transport === "tcp" ? "tcp_server.ts" : "ws_server.ts";
  // Each is listed as soon as it runs, so that it is stopped even when its
  // sibling fails to start.
  const [echo, chat] = await Promise.all(["echo", "chat"].map(async (mode) => {
    const server = await spawnServer(script, ["--quiet", "--mode", mode]);
    started.push(server);
    return server;
  }));
  return { source: "started", echo: echo.address, chat: chat.address, pid: echo.pid };
}

// ------------------------------------------------------------------- helpers

// Each message differs from the last, so a server that answers with a stale
// or made-up reply fails the comparison.
function stamp(message: Uint8Array, seq: number): void {
  for (let i = 0; i < message.length; i++) message[i] = (seq * 131 + i * 7) & 255;
}

function verifyEcho(sent: Uint8Array, echo: Uint8Array): void {
  if (echo.length !== sent.length) {
    throw new Error(`sent ${sent.length} bytes, the echo had ${echo.length}`);
  }
  for (let i = 0; i < sent.length; i++) {
    if (echo[i] !== sent[i]) throw new Error(`echo differs from what was sent at byte ${i}`);
  }
}

function fillWords(words: Uint32Array, first: number): void {
  for (let i = 0; i < words.length; i++) words[i] = first + i;
}

/** Nearest-rank percentile of unsorted samples (sorted in place). */
function percentile(samples: Float64Array, p: number): number {
  samples.sort();
  return samples[Math.max(0, Math.ceil((p / 100) * samples.length) - 1)];
}

/**
 * One transport's figures, as --json prints them; null where a phase was
 * skipped (`skipped` says why) or failed (`errors` says how). Round trips of
 * one 32-byte echo on one connection, p50 and p99, and opening a connection
 * (TCP connect, plus the HTTP upgrade for WebSocket) with one echo, in µs;
 * echoes per second over `connections` connections; bulk echo in MB/s (10^6
 * bytes); chat deliveries per second, summed over all receivers, and those
 * that never arrived (anything but 0 is a failure); and the growth of the
 * server's resident memory per idle connection, in bytes.
 */
function emptyResult() {
  return {
    latencyP50Us: null as number | null,
    latencyP99Us: null as number | null,
    roundTrips: 0,
    openP50Us: null as number | null,
    messagesPerSecond: null as number | null,
    bulkMBPerSecond: null as number | null,
    chatDeliveriesPerSecond: null as number | null,
    chatLost: null as number | null,
    memoryPerConnection: null as number | null,
    idleConnections: 0,
    skipped: {} as Record<string, string>,
    errors: {} as Record<string, string>,
  };
}

type TransportResult = ReturnType<typeof emptyResult>;

function ratiosOf(tcp: TransportResult, ws: TransportResult) {
  const ratios: Partial<Record<Metric, number>> = {};
  for (const row of ROWS) {
    const a = tcp[row.metric];
    const b = ws[row.metric];
    if (a !== null && b !== null && a > 0) ratios[row.metric] = b / a;
  }
  return ratios;
}

function parseTcpAddress(text: string): TcpAddress {
  const match = text.replace(/^tcp:\/\//, "").match(/^(\[[^\]]+\]|[^:\/]+):(\d+)\/?$/);
  if (!match) throw new Error(`not a HOST:PORT address: "${text}"`);
  return { hostname: match[1].replace(/^\[|\]$/g, ""), port: Number(match[2]) };
}

function describe(error: unknown): string {
  if (error instanceof Deno.errors.ConnectionRefused) return "connection refused";
  if (error instanceof Deno.errors.ConnectionReset) return "connection reset by the server";
  return error instanceof Error ? error.message : String(error);
}

// ---------------------------------------------------------------------- table

const ROWS = [
  { metric: "latencyP50Us", label: () => "round trip, 1 connection, p50", unit: "µs" },
  { metric: "latencyP99Us", label: () => "round trip, 1 connection, p99", unit: "µs" },
  { metric: "openP50Us", label: () => "open + first echo, p50", unit: "µs" },
  {
    metric: "messagesPerSecond",
    label: (s: Settings) => `echoes, ${s.connections} connections`,
    unit: "msg/s",
  },
  { metric: "bulkMBPerSecond", label: () => "bulk echo, 64 KiB chunks", unit: "MB/s" },
  {
    metric: "chatDeliveriesPerSecond",
    label: (s: Settings) => `chat, ${s.clients} clients, ${s.senders} sending`,
    unit: "dlv/s",
  },
  {
    metric: "memoryPerConnection",
    label: (s: Settings) => `server memory, ${s.idle} idle`,
    unit: "KiB/conn",
  },
] as const;

type Metric = (typeof ROWS)[number]["metric"];

// One row per figure, columns TCP | WebSocket | WS ÷ TCP, then what the
// numbers mean.
function formatReport(report: Report): string {
  const { machine, settings, servers } = report;
  const lines = [
    `TCP vs WebSocket over loopback: ${machine.cpus} CPUs, ${machine.os}, Deno ${machine.deno}`,
    `  TCP:       ${serverLine(servers.tcp, "tcp_server.ts")}`,
    `  WebSocket: ${serverLine(servers.ws, "ws_server.ts")}`,
    `  each timed figure: ${
      settings.rounds === 1 ? "one round" : `the best of ${settings.rounds} rounds`
    } of ${+(settings.duration / settings.rounds).toFixed(2)} s after a warm-up; ` +
    `${MESSAGE_SIZE}-byte messages`,
    "",
  ];
  const table = [["", "unit", "TCP", "WebSocket", "WS / TCP"]];
  for (const row of ROWS) {
    const scale = row.metric === "memoryPerConnection" ? 1 / 1024 : 1;
    const tcp = report.tcp[row.metric];
    const ws = report.ws[row.metric];
    const ratio = report.ratios[row.metric];
    table.push([
      row.label(settings),
      row.unit,
      tcp === null ? "-" : formatNumber(tcp * scale),
      ws === null ? "-" : formatNumber(ws * scale),
      ratio === undefined ? "" : `${ratio.toFixed(2)}×`,
    ]);
  }
  table.push([
    "chat deliveries lost",
    "",
    report.tcp.chatLost === null ? "-" : String(report.tcp.chatLost),
    report.ws.chatLost === null ? "-" : String(report.ws.chatLost),
    "",
  ]);
  const widths = table[0].map((_, column) => Math.max(...table.map((row) => row[column].length)));
  for (const row of table) {
    lines.push(
      "  " +
        row.map((cell, column) =>
          column === 0 ? cell.padEnd(widths[column]) : cell.padStart(widths[column])
        ).join("   "),
    );
  }
  lines.push(
    "",
    "  µs and KiB: lower is better; msg/s, MB/s and deliveries/s (dlv/s): higher is better.",
    "",
  );
  for (const transport of ["tcp", "ws"] as const) {
    const name = transport === "tcp" ? "TCP" : "WebSocket";
    for (const [phase, why] of Object.entries(report[transport].errors)) {
      lines.push(`FAILED ${name} ${phase}: ${why}`);
    }
    for (const [phase, why] of Object.entries(report[transport].skipped)) {
      lines.push(`skipped ${name} ${phase}: ${why}`);
    }
  }
  if (lines[lines.length - 1] !== "") lines.push("");
  lines.push(...MEANING, "", ...wrap(report.note, 92));
  return lines.join("\n");
}

function serverLine(server: Servers, script: string): string {
  const where = [server.echo && `echo ${server.echo}`, server.chat && `chat ${server.chat}`]
    .filter(Boolean).join(", ");
  return server.source === "started"
    ? `${script} started by bench.ts (${where})`
    : `given by flag (${where}${server.pid === null ? "" : `, pid ${server.pid}`})`;
}

function formatNumber(value: number): string {
  if (value >= 100) return Math.round(value).toLocaleString("en-US");
  return value.toFixed(value >= 10 ? 1 : 2);
}

function wrap(text: string, width: number): string[] {
  const lines = [""];
  for (const word of text.split(" ")) {
    const last = lines.length - 1;
    if (lines[last] && lines[last].length + word.length + 1 > width) lines.push(word);
    else lines[last] += lines[last] ? ` ${word}` : word;
  }
  return lines;
}

// ---------------------------------------------------------------- command line

const USAGE = `Usage: bench.ts [options]

Measures raw TCP against WebSocket on this machine, over loopback only, and
prints a table: TCP | WebSocket | WS / TCP. It starts tcp_server.ts and
ws_server.ts (echo and chat) as separate processes, or measures servers you
name; a default run takes under a minute. The load generator is JavaScript
sharing the CPUs with the servers, so absolute figures are a floor; the
ratios are the point.

Options:
  --duration SECONDS    measured time of each timed phase, per transport
                        (default ${DEFAULTS.duration}, at most ${MAX_DURATION})
  --rounds N            split it into N rounds, TCP and WebSocket taking turns;
                        the best round counts (default ${DEFAULTS.rounds})
  --quick               ${QUICK.duration} s phases, one round, fewer connections: seconds in all
  --connections N       connections for echoes per second (default ${DEFAULTS.connections})
  --idle N              idle connections for memory per connection (default ${DEFAULTS.idle})
  --clients N           chat clients in the room (default ${DEFAULTS.clients})
  --senders N           how many of them send (default ${DEFAULTS.senders})
  --json                print one JSON object instead of the table
  --tcp HOST:PORT       measure this TCP echo server instead of starting one
  --tcp-chat HOST:PORT  and this TCP chat server (tcp_server.ts --mode chat's protocol)
  --tcp-pid PID         process id of the --tcp server, for its memory per connection
  --ws URL              measure this WebSocket echo server instead of starting one
  --ws-chat URL         and this WebSocket chat server (ws_server.ts --mode chat's protocol)
  --ws-pid PID          process id of the --ws server, for its memory per connection
  -h, --help            show this help

Naming a server for a transport means bench.ts starts none for it: rows with
no server named are skipped, and so is memory without a PID. --tcp and
--tcp-chat also take the tcp://HOST:PORT that a server prints. Chat servers
must relay every line to every client, the sender included, as "NAME: TEXT".
Exit status: 0, 1 if a phase failed or lost a chat delivery, 2 for bad flags.`;

function parseCommandLine(args: string[]) {
  let parsed;
  try {
    parsed = parseArgs({
      args,
      strict: true,
      options: {
        duration: { type: "string" },
        rounds: { type: "string" },
        quick: { type: "boolean", default: false },
        connections: { type: "string" },
        idle: { type: "string" },
        clients: { type: "string" },
        senders: { type: "string" },
        json: { type: "boolean", default: false },
        tcp: { type: "string" },
        "tcp-chat": { type: "string" },
        "tcp-pid": { type: "string" },
        ws: { type: "string" },
        "ws-chat": { type: "string" },
        "ws-pid": { type: "string" },
        help: { type: "boolean", short: "h", default: false },
      },
    }).values;
  } catch (error) {
    throw flagError(error);
  }
  const defaults = parsed.quick ? QUICK : DEFAULTS;
  const clients = optionalInteger("--clients", parsed.clients, 2, 1000) ?? defaults.clients;
  const settings: Settings = {
    duration: parsed.duration === undefined
      ? defaults.duration
      : secondsOption("--duration", parsed.duration),
    rounds: optionalInteger("--rounds", parsed.rounds, 1, 10) ?? defaults.rounds,
    connections: optionalInteger("--connections", parsed.connections, 1, 5000) ??
      defaults.connections,
    idle: optionalInteger("--idle", parsed.idle, 1, 10_000) ?? defaults.idle,
    clients,
    senders: optionalInteger("--senders", parsed.senders, 1, clients) ??
      Math.min(defaults.senders, clients),
  };
  return {
    settings,
    servers: {
      tcp: givenServers("tcp", parsed.tcp, parsed["tcp-chat"], parsed["tcp-pid"]),
      ws: givenServers("ws", parsed.ws, parsed["ws-chat"], parsed["ws-pid"]),
    },
    json: parsed.json,
    help: parsed.help,
  };
}

function givenServers(
  transport: Transport,
  echo: string | undefined,
  chat: string | undefined,
  pid: string | undefined,
): Servers | undefined {
  for (const [flag, value] of [[`--${transport}`, echo], [`--${transport}-chat`, chat]]) {
    if (value !== undefined) {
      if (transport === "tcp") checkTcpTarget(flag!, value);
      else checkWsTarget(flag!, value);
    }
  }
  if (pid !== undefined && echo === undefined) {
    throw new UsageError(
      `--${transport}-pid is the --${transport} server's process id: name that server too`,
    );
  }
  if (echo === undefined && chat === undefined) return undefined;
  return {
    source: "given",
    echo: echo ?? null,
    chat: chat ?? null,
    pid: optionalInteger(`--${transport}-pid`, pid, 1) ?? null,
  };
}

function checkTcpTarget(flag: string, text: string): void {
  let address;
  try {
    address = parseTcpAddress(text);
  } catch {
    throw new UsageError(`${flag} must be HOST:PORT, e.g. 127.0.0.1:9000, got "${text}"`);
  }
  checkLoopback(flag, address.hostname, address.port, text);
}

function checkWsTarget(flag: string, text: string): void {
  if (!URL.canParse(text) || new URL(text).protocol !== "ws:") {
    throw new UsageError(`${flag} must be a ws:// URL, e.g. ws://127.0.0.1:8080/, got "${text}"`);
  }
  const url = new URL(text);
  checkLoopback(flag, url.hostname.replace(/^\[|\]$/g, ""), Number(url.port || 80), text);
}

// A load test sends as much as it can: it only ever targets this machine.
function checkLoopback(flag: string, hostname: string, port: number, text: string): void {
  if (!/^(127(\.\d{1,3}){3}|localhost|::1)$/.test(hostname)) {
    throw new UsageError(
      `${flag} must be on this machine (127.0.0.1, localhost or ::1), got "${text}"`,
    );
  }
  if (port < 1 || port > 65535) {
    throw new UsageError(`${flag} needs a port from 1 to 65535, got "${text}"`);
  }
}

function secondsOption(name: string, text: string): number {
  const value = Number(text);
  if (text.trim() === "" || !Number.isFinite(value) || value <= 0 || value > MAX_DURATION) {
    throw new UsageError(
      `${name} must be a number of seconds above 0, at most ${MAX_DURATION}, got "${text}"`,
    );
  }
  return value;
}

function failed(report: Report): boolean {
  return [report.tcp, report.ws].some((result) =>
    Object.keys(result.errors).length > 0 || (result.chatLost ?? 0) > 0
  );
}

async function bench(options: ReturnType<typeof parseCommandLine>): Promise<number> {
  const started: ServerProcess[] = [];
  const stopServers = () => Promise.all(started.map((server) => server.stop()));
  // Interrupted, it starts no further phase and stops the servers it
  // started, so that the phase in progress fails at once.
  const interrupted = new AbortController();
  const signals = Deno.build.os === "windows"
    ? ["SIGINT"] as const
    : ["SIGINT", "SIGTERM"] as const;
  const interrupt = () => {
    interrupted.abort(new Error("interrupted"));
    stopServers();
  };
  for (const signal of signals) Deno.addSignalListener(signal, interrupt);
  try {
    const { settings, servers: given } = options;
    const report = await runBench({ settings, given, started, stop: interrupted.signal });
    await stopServers();
    console.log(options.json ? JSON.stringify(report, null, 2) : formatReport(report));
    return failed(report) ? 1 : 0;
  } catch (error) {
    console.error(`bench: ${startError(error)}`);
    return interrupted.signal.aborted ? 130 : 1;
  } finally {
    for (const signal of signals) Deno.removeSignalListener(signal, interrupt);
    await stopServers();
  }
}

function startError(error: unknown): string {
  if (error instanceof Deno.errors.NotCapable || error instanceof Deno.errors.PermissionDenied) {
    return `${error.message} (run with --allow-net=127.0.0.1 --allow-run=deno,ps)`;
  }
  return error instanceof Error ? error.message : String(error);
}

if (import.meta.main) {
  const command = { name: "bench", usage: USAGE, parse: parseCommandLine, run: bench };
  Deno.exit(await runCommand(command, Deno.args));
}
