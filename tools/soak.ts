/**
 * soak.ts: both chat servers under a minute of realistic abuse, checking that
 * a well-behaved client loses nothing while others misbehave around it.
 *
 * It starts `tcp_server.ts` and `ws_server.ts` in chat mode as child
 * processes on 127.0.0.1 (port 0), so that it can read their memory from
 * /proc/PID/status, and runs, against each, `--clients` clients at once:
 *
 * - 70% well-behaved: read everything, and send a numbered message every
 *   `--interval` seconds or so (0.5 to 1.5 times it, at random).
 * - 10% slow: read in bursts with long pauses, and send now and then.
 * - 20% misbehaving, in kinds that take turns: TCP clients that reset
 *   abruptly, send a line with no end (past --max-line), send bytes that are
 *   not UTF-8, connect and say nothing, or half-close; WebSocket clients that
 *   reset, send a message over --max-message or a binary one, send bytes that
 *   are not frames, never answer a ping, or drip a handshake a byte at a time
 *   (slowloris). Each does it again 15 to 30 s after its last turn ended.
 *
 * Loss, precisely: every well-behaved client connects, and is in its room,
 * before any well-behaved client sends. Then each well-behaved message
 * (`soak SENDER SEQ …`) must reach every well-behaved client of the same
 * room, sender included, exactly once and in order of SEQ. When the time is
 * up, sending stops and the clients get up to DRAIN_MS to receive what is on
 * its way; lost = expected − received. A well-behaved client that the server
 * drops is a failure of its own (counted, and left out of the loss, since
 * what it missed after the drop is not a loss of the server's).
 *
 * At the end it sends both servers SIGTERM with every client still connected
 * (a shutdown under load), and prints a summary: messages sent, delivered,
 * lost, disconnects by reason (from the servers' own logs), and peak memory.
 *
 * Run it (about 2,200 open files here, and as many in each server; raise the
 * limit first, or the script stops and says so):
 *
 *     ulimit -n 8192 && deno task soak
 *     ulimit -n 8192 && deno run -A tools/soak.ts --duration 20 --clients 200
 *
 * It sends nothing anywhere but 127.0.0.1, opens a bounded number of
 * connections (a slow or misbehaving client at most one per 15 s), and stops
 * by itself after `--duration` seconds plus at most ~30 s of start and drain.
 * This process handles every client, so on a small machine it may be the
 * bottleneck: it reports its own event-loop lag for that reason.
 *
 * @module
 */

import { parseArgs } from "node:util";
import {
  clientFrame,
  closeQuietly,
  delay,
  flagError,
  memoryMiB,
  openFileLimit,
  runCommand,
  spawnServer,
  UPGRADE_REQUEST,
  UsageError,
  within,
  writeAll,
} from "./shared.ts";

const HOST = "127.0.0.1";
const DEFAULT_DURATION = 60;
const DEFAULT_CLIENTS = 1000;
const DEFAULT_INTERVAL = 30;
const WELL_BEHAVED_SHARE = 0.7;
const SLOW_SHARE = 0.1;
// Seconds a slow or misbehaving client waits between its turns. Every turn
// is a join and a leave announced to the whole room: with 1,000 clients that
// is 2,000 messages, so churn, more than chat, is what loads a server.
const TURN_PAUSE: [number, number] = [15, 30];
// After the run, how long the well-behaved clients get to receive what is
// still on its way before anything missing counts as lost.
const DRAIN_MS = 10_000;
// Start-up waits (connects, the join barrier) are bounded by this.
const START_TIMEOUT_MS = 60_000;
// The soak's own servers: WebSocket peers that stop answering pings are
// dropped after this; TCP clients silent for 1.5 × interval + 5 s.
const WS_IDLE_TIMEOUT = 10;
const BATCH = 100;
// Bytes past the servers' defaults, to break them on purpose.
const OVERLONG_LINE = 70 * 1024; // --max-line is 64 KiB
const OVERSIZE_MESSAGE = 1024 * 1024 + 1; // --max-message is 1 MiB

const encoder = new TextEncoder();
const decoder = new TextDecoder();

type Transport = "tcp" | "ws";

interface Options {
  duration: number;
  clients: number;
  interval: number;
}

/** What one server's run adds up to. */
interface Room {
  transport: Transport;
  port: number;
  pid: number;
  /** The server's --idle-timeout, seconds. */
  idleTimeout: number;
  /** Well-behaved clients: index → messages sent. */
  sent: Int32Array;
  /** recipient × sender → messages received (each SEQ once). */
  got: Int32Array;
  /** recipient × sender → last SEQ received, −1 for none: for order. */
  lastSeq: Int32Array;
  duplicates: number;
  outOfOrder: number;
  /** Per well-behaved client: still connected (not dropped by the server). */
  connected: boolean[];
  /** Well-behaved clients the server dropped, by what they saw. */
  dropped: Map<string, number>;
  /** Slow and misbehaving clients, by kind: turns, and turns where the server did as documented. */
  kinds: Map<string, { turns: number; asDocumented: number }>;
  /** Disconnects by reason, from the server's own log. */
  reasons: Map<string, number>;
  /** Anything else the server logged (there should be nothing). */
  otherLog: string[];
  /** Set at shutdown: from then on a connection that ends is not a drop. */
  closing: boolean;
  /** What was owed to the well-behaved clients at the end, and what they got. */
  result: { expected: number; received: number };
  rssStart: number;
  rssPeak: number;
  shutdown: { code: number; ms: number; closed: number; of: number } | undefined;
  stop: (signal: Deno.Signal) => Promise<number>;
}

/** One turn of a slow or misbehaving client: what it may hold open, closed when the run stops. */
interface Turn {
  room: Room;
  stop: AbortSignal;
  hold<T extends { close(): void }>(resource: T): T;
}

// ------------------------------------------------------------ command line

const USAGE = `Usage: soak.ts [options]

Soaks tcp_server.ts and ws_server.ts (chat mode, started here on 127.0.0.1)
with well-behaved, slow and misbehaving clients, then prints messages sent,
delivered and lost, disconnects by reason, and the servers' peak memory.
Needs about 2.2 open files per client: run \`ulimit -n 8192\` first.

Options:
  --duration SECONDS  how long the clients run (default ${DEFAULT_DURATION})
  --clients N         clients per server, at least 10 (default ${DEFAULT_CLIENTS})
  --interval SECONDS  mean gap between a well-behaved client's messages
                      (default ${DEFAULT_INTERVAL})
  -h, --help          show this help`;

function parseCommandLine(args: string[]): Options & { help: boolean } {
  let values;
  try {
    values = parseArgs({
      args,
      strict: true,
      options: {
        duration: { type: "string", default: String(DEFAULT_DURATION) },
        clients: { type: "string", default: String(DEFAULT_CLIENTS) },
        interval: { type: "string", default: String(DEFAULT_INTERVAL) },
        help: { type: "boolean", short: "h", default: false },
      },
    }).values;
  } catch (error) {
    throw flagError(error);
  }
  return {
    duration: numberOption("--duration", values.duration, 1, 3600),
    clients: numberOption("--clients", values.clients, 10, 10_000, true),
    interval: numberOption("--interval", values.interval, 0.1, 600),
    help: values.help,
  };
}

function numberOption(name: string, text: string, min: number, max: number, integer = false) {
  const value = Number(text);
  if (text.trim() === "" || !(value >= min && value <= max) || (integer && !/^\d+$/.test(text))) {
    throw new UsageError(
      `${name} must be ${integer ? "an integer" : "a number"} from ${min} to ${max}, got "${text}"`,
    );
  }
  return value;
}

// ---------------------------------------------------------------- helpers

function between(low: number, high: number): number {
  return low + Math.random() * (high - low);
}

function count(map: Map<string, number>, key: string, n = 1): void {
  map.set(key, (map.get(key) ?? 0) + n);
}

/** Text that makes messages of varied size, with some multi-byte UTF-8. */
function padding(): string {
  const words = ["lorem", "ipsum", "dolor", "sit", "amet", "café", "naïve", "✓", "ünïcödé"];
  const out: string[] = [];
  for (let n = Math.floor(Math.random() * 30); n > 0; n--) {
    out.push(words[Math.floor(Math.random() * words.length)]);
  }
  return out.join(" ");
}

// ----------------------------------------------------------------- servers

/** Starts one chat server as a child process, and its room's bookkeeping. */
async function startRoom(transport: Transport, options: Options): Promise<Room> {
  // A well-behaved TCP client talks at least every 1.5 intervals: the idle
  // timeout must be longer than that, and short enough to come in a run.
  const idle = Math.ceil(transport === "tcp" ? 1.5 * options.interval + 5 : WS_IDLE_TIMEOUT);
  const reasons = new Map<string, number>();
  const otherLog: string[] = [];
  const server = await spawnServer(
    transport === "tcp" ? "tcp_server.ts" : "ws_server.ts",
    ["--mode", "chat", "--idle-timeout", String(idle)],
    {
      // The server logs a line per connection that ends, "- PEER disconnected
      // (NAME): REASON": those are the disconnects by reason.
      onStderrLine(line) {
        const reason = line.match(/^- \S+ disconnected(?: \([^)]*\))?: (.*)$/)?.[1];
        if (reason !== undefined) count(reasons, reason);
        else if (!line.startsWith("+ ")) otherLog.push(line);
      },
    },
  );
  const n = Math.round(options.clients * WELL_BEHAVED_SHARE);
  return {
    transport,
    port: server.port,
    pid: server.pid,
    idleTimeout: idle,
    sent: new Int32Array(n),
    got: new Int32Array(n * n),
    lastSeq: new Int32Array(n * n).fill(-1),
    duplicates: 0,
    outOfOrder: 0,
    connected: new Array(n).fill(false),
    dropped: new Map(),
    kinds: new Map(),
    reasons,
    otherLog,
    closing: false,
    result: { expected: 0, received: 0 },
    rssStart: memoryMiB(server.pid, "VmRSS"),
    rssPeak: 0,
    shutdown: undefined,
    stop: async (signal) => (await server.stop(signal)).code,
  };
}

// ------------------------------------------------- well-behaved clients

/** What a well-behaved client does with one chat line or message it received. */
function receive(room: Room, recipient: number, text: string): void {
  const match = text.match(/^guest-\d+: soak [tw](\d+) (\d+)(?: |$)/);
  if (!match) return;
  const slot = recipient * room.sent.length + Number(match[1]);
  const seq = Number(match[2]);
  const last = room.lastSeq[slot];
  if (seq <= last) {
    room.duplicates++;
    return;
  }
  if (seq !== last + 1) room.outOfOrder++;
  room.lastSeq[slot] = seq;
  room.got[slot]++;
}

/** A well-behaved client's pace: a numbered message every interval or so, until `stop`. */
async function talk(
  room: Room,
  id: number,
  send: (text: string) => Promise<void> | void,
  stop: AbortSignal,
  interval: number,
): Promise<void> {
  const tag = `${room.transport === "tcp" ? "t" : "w"}${id}`;
  // The first messages spread over one interval, not all at once.
  await delay(Math.random() * interval * 1000, stop);
  while (!stop.aborted && room.connected[id]) {
    try {
      await send(`soak ${tag} ${room.sent[id]} ${padding()}`);
    } catch {
      return;
    }
    room.sent[id]++;
    await delay(between(0.5, 1.5) * interval * 1000, stop);
  }
}

interface WellBehaved {
  send(text: string): Promise<void> | void;
  /** Resolves when the connection ends, with what the client saw last. */
  ended: Promise<string>;
  close(): void;
}

/** A TCP chat client that reads every line as it comes. */
async function tcpWellBehaved(
  room: Room,
  id: number,
  notice: (line: string) => void,
): Promise<WellBehaved> {
  const conn = await Deno.connect({ hostname: HOST, port: room.port });
  room.connected[id] = true;
  const ended = (async () => {
    const buf = new Uint8Array(64 * 1024);
    // One decoder per connection, in streaming mode: a character may be
    // split across two reads.
    const utf8 = new TextDecoder();
    let rest = "";
    let last = "EOF";
    try {
      for (let n = await conn.read(buf); n !== null; n = await conn.read(buf)) {
        const lines = (rest + utf8.decode(buf.subarray(0, n), { stream: true })).split("\n");
        rest = lines.pop()!;
        for (const line of lines) {
          if (!line.startsWith("* ")) receive(room, id, line);
          else if (line.startsWith("* error:")) last = line;
          else notice(line);
        }
      }
    } catch (error) {
      last = (error as Error).name;
    }
    if (room.connected[id] && !room.closing) {
      room.connected[id] = false;
      count(room.dropped, last);
    }
    return last;
  })();
  return {
    send: (text) => writeAll(conn, encoder.encode(text + "\n")),
    ended,
    close: () => closeQuietly(conn),
  };
}

/** A WebSocket chat client on the standard API, as a browser would be. */
async function wsWellBehaved(
  room: Room,
  id: number,
  notice: (line: string) => void,
): Promise<WellBehaved> {
  const socket = new WebSocket(`ws://${HOST}:${room.port}/`);
  const closed = new Promise<CloseEvent>((resolve) => socket.onclose = resolve);
  socket.onmessage = (event) => {
    const text = String(event.data);
    if (text.startsWith("* ")) notice(text);
    else receive(room, id, text);
  };
  await new Promise((resolve, reject) => {
    socket.onopen = resolve;
    closed.then(() => reject(new Error(`ws client ${id} could not connect`)));
  });
  room.connected[id] = true;
  const ended = closed.then((event) => {
    const last = `code ${event.code}${event.reason ? ` ${event.reason}` : ""}`;
    if (room.connected[id] && !room.closing) {
      room.connected[id] = false;
      count(room.dropped, last);
    }
    return last;
  });
  return { send: (text) => socket.send(text), ended, close: () => closeQuietly(socket) };
}

/** Every well-behaved client of one room, connected, and in the room. */
async function connectWellBehaved(room: Room): Promise<WellBehaved[]> {
  const n = room.sent.length;
  const everyoneIn = Promise.withResolvers<void>();
  // Names go in accept order and the well-behaved clients come first: once
  // one of them hears "guest-N joined", all N are in the room.
  const last = `* guest-${n} joined`;
  const notice = (line: string) => line === last && everyoneIn.resolve();
  const open = room.transport === "tcp" ? tcpWellBehaved : wsWellBehaved;
  const clients: WellBehaved[] = [];
  for (let i = 0; i < n; i += BATCH) {
    const ids = Array.from({ length: Math.min(BATCH, n - i) }, (_, j) => i + j);
    clients.push(...await Promise.all(ids.map((id) => open(room, id, notice))));
  }
  await within(everyoneIn.promise, `${room.transport}: every join`, START_TIMEOUT_MS);
  return clients;
}

// ------------------------------------------ slow and misbehaving clients

/** Runs a slow or misbehaving client's turn over and over, until the run stops. */
async function cycle(
  room: Room,
  kind: string,
  stop: AbortSignal,
  turn: (t: Turn) => Promise<boolean>,
): Promise<void> {
  const tally = room.kinds.get(kind) ?? { turns: 0, asDocumented: 0 };
  room.kinds.set(kind, tally);
  // Start at different moments, so that the kinds mix over the whole run;
  // those that wait for an idle timeout start early, so that it can come.
  const spread = kind === "silent" || kind === "dead" ? 5 : TURN_PAUSE[1];
  await delay(Math.random() * spread * 1000, stop);
  while (!stop.aborted) {
    const held = new Set<{ close(): void }>();
    const release = () => held.forEach(closeQuietly);
    stop.addEventListener("abort", release, { once: true });
    let asDocumented = false;
    try {
      asDocumented = await turn({
        room,
        stop,
        hold(resource) {
          held.add(resource);
          // Opened while the run was stopping: close it at once.
          if (stop.aborted) closeQuietly(resource);
          return resource;
        },
      });
    } catch {
      // Refused, reset or cut short where we did not expect it.
    } finally {
      stop.removeEventListener("abort", release);
      release();
    }
    // A turn the end of the run cut short says nothing about the server.
    if (stop.aborted) break;
    tally.turns++;
    if (asDocumented) tally.asDocumented++;
    await delay(between(...TURN_PAUSE) * 1000, stop);
  }
}

/**
 * Reads until EOF (or a reset) and returns the last 200 characters; with
 * `watch`, also whether it ever appeared in the stream.
 */
async function readTail(conn: Deno.Conn, watch?: string): Promise<string> {
  const buf = new Uint8Array(64 * 1024);
  let tail = "";
  let seen = false;
  try {
    for (let n = await conn.read(buf); n !== null; n = await conn.read(buf)) {
      const text = tail + decoder.decode(buf.subarray(0, n));
      if (watch && text.includes(watch)) seen = true;
      tail = text.slice(-200);
    }
  } catch {
    // A reset ends it too.
  }
  return watch === undefined || seen ? tail : "";
}

function lastLine(text: string): string {
  return text.split("\n").filter((line) => line !== "").at(-1) ?? "";
}

/**
 * Reads for `ms` (a burst), then returns: the read still pending is kept for
 * the next burst, since a connection may have only one read at a time.
 */
function burstReader(conn: Deno.Conn, onBytes: (bytes: Uint8Array) => Promise<void> | void) {
  const buf = new Uint8Array(16 * 1024);
  let pending: Promise<number | null> | undefined;
  return async function readFor(ms: number): Promise<void> {
    const end = Date.now() + ms;
    while (Date.now() < end) {
      pending ??= conn.read(buf);
      let timer: ReturnType<typeof setTimeout> | undefined;
      const n = await Promise.race([
        pending,
        new Promise<number>((resolve) => timer = setTimeout(() => resolve(-1), end - Date.now())),
      ]);
      clearTimeout(timer);
      if (n === -1) return;
      pending = undefined;
      if (n === null) throw new Error("EOF");
      await onBytes(buf.subarray(0, n));
    }
  };
}

const TCP_KINDS: Record<string, (t: Turn) => Promise<boolean>> = {
  // Reads in bursts with longer pauses, and says a word after each, often
  // enough not to be idle. Dropped only as too slow, or not at all, is as
  // documented.
  async slow({ room, stop, hold }) {
    const conn = hold(await Deno.connect({ hostname: HOST, port: room.port }));
    let seen = "";
    const readFor = burstReader(conn, (bytes) => {
      seen = (seen + decoder.decode(bytes)).slice(-200);
    });
    try {
      for (let turn = 0; turn < 3 && !stop.aborted; turn++) {
        await writeAll(conn, encoder.encode(`slow: turn ${turn}\n`));
        await readFor(2000);
        await delay(Math.min(10, room.idleTimeout / 2) * 1000, stop);
      }
    } catch {
      // Dropped.
    }
    const error = lastLine(seen).startsWith("* error:") ? lastLine(seen) : "";
    return error === "" || error === "* error: too slow, disconnected";
  },
  // Says something, lets the room's traffic pile up unread, then closes:
  // unread data makes that a reset.
  async reset({ room, stop, hold }) {
    const conn = hold(await Deno.connect({ hostname: HOST, port: room.port }));
    await writeAll(conn, encoder.encode("rude: about to hang up\n"));
    await delay(between(500, 2000), stop);
    return true;
  },
  // A line with no end: refused within --max-line bytes.
  async overlong({ room, hold }) {
    const conn = hold(await Deno.connect({ hostname: HOST, port: room.port }));
    const reply = readTail(conn);
    await writeAll(conn, new Uint8Array(OVERLONG_LINE).fill(0x78)).catch(() => {});
    return /^\* error: line too long/.test(lastLine(await reply));
  },
  // Bytes that are not UTF-8, newlines among them: relayed with U+FFFD.
  async garbage({ room, stop, hold }) {
    const conn = hold(await Deno.connect({ hostname: HOST, port: room.port }));
    const reply = readTail(conn);
    for (let i = 0; i < 5 && !stop.aborted; i++) {
      const bytes = crypto.getRandomValues(new Uint8Array(512));
      bytes[bytes.length - 1] = 0x0a;
      await writeAll(conn, bytes);
      await delay(1000, stop);
    }
    await conn.closeWrite();
    return !lastLine(await reply).startsWith("* error:");
  },
  // Connects and says nothing: dropped by the idle timeout.
  async silent({ room, hold }) {
    const conn = hold(await Deno.connect({ hostname: HOST, port: room.port }));
    return lastLine(await readTail(conn)) === "* error: idle timeout";
  },
  // One line, then a half-close: the server still answers, then closes.
  async halfclose({ room, hold }) {
    const conn = hold(await Deno.connect({ hostname: HOST, port: room.port }));
    const reply = readTail(conn, ": brief: bye\n");
    await writeAll(conn, encoder.encode("brief: bye\n"));
    await conn.closeWrite();
    // Its own line comes back (in the middle of the room's traffic), then EOF.
    return (await reply) !== "";
  },
};

/** A bare WebSocket: the handshake by hand, then frames as raw bytes. */
async function rawWebSocket({ room, hold }: Turn) {
  const conn = hold(await Deno.connect({ hostname: HOST, port: room.port }));
  await writeAll(conn, encoder.encode(UPGRADE_REQUEST));
  const buf = new Uint8Array(4096);
  let head = "";
  while (!head.includes("\r\n\r\n")) {
    const n = await conn.read(buf);
    if (n === null) break;
    head += decoder.decode(buf.subarray(0, n));
  }
  return { conn, upgraded: / 101 /.test(head.split("\r\n")[0]) };
}

/** Opens a standard WebSocket, sends one message, returns the close code. */
async function sendOnce({ room, hold }: Turn, data: string | Uint8Array): Promise<number> {
  const socket = hold(new WebSocket(`ws://${HOST}:${room.port}/`));
  const closed = new Promise<CloseEvent>((resolve) => socket.onclose = resolve);
  await Promise.race([new Promise((resolve) => socket.onopen = resolve), closed]);
  if (socket.readyState === WebSocket.OPEN) socket.send(data);
  return (await closed).code;
}

const WS_KINDS: Record<string, (t: Turn) => Promise<boolean>> = {
  // Reads in bursts, pausing for less than half the idle timeout so that it
  // can still answer the server's pings; talks now and then.
  async slow(t) {
    const { conn, upgraded } = await rawWebSocket(t);
    let pending = new Uint8Array(0);
    let closeCode = 0;
    const readFor = burstReader(conn, async (bytes) => {
      const joined = new Uint8Array(pending.length + bytes.length);
      joined.set(pending);
      joined.set(bytes, pending.length);
      const parsed = parseFrames(joined);
      pending = parsed.rest;
      for (const frame of parsed.frames) {
        if (frame.opcode === 0x9) await writeAll(conn, clientFrame(0xa, frame.payload));
        if (frame.opcode === 0x8) closeCode = (frame.payload[0] << 8) | frame.payload[1];
      }
    });
    try {
      for (let turn = 0; turn < 5 && !t.stop.aborted && !closeCode; turn++) {
        await writeAll(conn, clientFrame(0x1, encoder.encode(`slow: turn ${turn}`)));
        await readFor(1000);
        await delay((t.room.idleTimeout / 2 - 1.5) * 1000, t.stop);
      }
    } catch {
      // Dropped.
    }
    return upgraded && (closeCode === 0 || closeCode === 1008);
  },
  // Sends a message, lets traffic pile up unread, then drops the TCP
  // connection without a close frame.
  async reset(t) {
    const { conn, upgraded } = await rawWebSocket(t);
    await writeAll(conn, clientFrame(0x1, encoder.encode("rude: about to hang up")));
    await delay(between(500, 2000), t.stop);
    return upgraded;
  },
  // One message over --max-message: 1009.
  async oversize(t) {
    return await sendOnce(t, "y".repeat(OVERSIZE_MESSAGE)) === 1009;
  },
  // Binary in a text chat: 1003.
  async binary(t) {
    return await sendOnce(t, Uint8Array.of(1, 2, 3)) === 1003;
  },
  // Bytes that are not frames at all: the server closes.
  async garbage(t) {
    const { conn, upgraded } = await rawWebSocket(t);
    await writeAll(conn, crypto.getRandomValues(new Uint8Array(64))).catch(() => {});
    await readTail(conn);
    return upgraded;
  },
  // Never reads, so never answers a ping: closed with 1001 after the idle
  // timeout. Reads only at the end, to find the close frame's reason.
  async dead(t) {
    const { conn, upgraded } = await rawWebSocket(t);
    await delay((t.room.idleTimeout + 2) * 1000, t.stop);
    return upgraded && (await readTail(conn)).includes("No response from ping frame.");
  },
  // Slowloris: a handshake dripped one byte at a time, never finished.
  async slowloris({ room, stop, hold }) {
    const conn = hold(await Deno.connect({ hostname: HOST, port: room.port }));
    const bytes = encoder.encode(UPGRADE_REQUEST.slice(0, -2));
    for (let i = 0; i < bytes.length && !stop.aborted; i++) {
      await writeAll(conn, bytes.subarray(i, i + 1));
      await delay(100, stop);
    }
    return true;
  },
};

/** Server frames (unmasked) from the front of `bytes`, and what is left over. */
function parseFrames(bytes: Uint8Array) {
  const frames: { opcode: number; payload: Uint8Array }[] = [];
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  let at = 0;
  while (bytes.length - at >= 2) {
    let length = bytes[at + 1] & 0x7f;
    let header = 2;
    if (length === 126 && bytes.length - at >= 4) [length, header] = [view.getUint16(at + 2), 4];
    else if (length === 127 && bytes.length - at >= 10) {
      [length, header] = [Number(view.getBigUint64(at + 2)), 10];
    } else if (length >= 126) break;
    if (bytes.length - at < header + length) break;
    frames.push({
      opcode: bytes[at] & 0x0f,
      payload: bytes.slice(at + header, at + header + length),
    });
    at += header + length;
  }
  return { frames, rest: bytes.slice(at) };
}

// -------------------------------------------------------------------- run

async function run(options: Options): Promise<{ rooms: Room[]; lagMs: number }> {
  const rooms = await Promise.all([startRoom("tcp", options), startRoom("ws", options)]);
  const stop = new AbortController();
  try {
    console.error("soak: connecting the well-behaved clients");
    const wellBehaved = await Promise.all(rooms.map(connectWellBehaved));
    for (const room of rooms) room.rssStart = memoryMiB(room.pid, "VmRSS");
    console.error(`soak: running for ${options.duration} s`);
    const clients: Promise<void>[] = [];
    for (const [r, room] of rooms.entries()) {
      for (const [id, client] of wellBehaved[r].entries()) {
        clients.push(talk(room, id, client.send, stop.signal, options.interval));
      }
      const kinds = room.transport === "tcp" ? TCP_KINDS : WS_KINDS;
      const misbehaving = Object.keys(kinds).filter((kind) => kind !== "slow");
      const slow = Math.round(options.clients * SLOW_SHARE);
      for (let i = 0; i < options.clients - room.sent.length; i++) {
        const kind = i < slow ? "slow" : misbehaving[i % misbehaving.length];
        clients.push(cycle(room, kind, stop.signal, kinds[kind]));
      }
    }
    const lag = watchEventLoop();
    await delay(options.duration * 1000);
    stop.abort();
    console.error(`soak: draining, at most ${DRAIN_MS / 1000} s`);
    await within(Promise.all(clients), "the clients to stop").catch((error) => {
      console.error(`soak: ${error.message}; going on`);
    });
    await drain(rooms);
    // A shutdown under load: every well-behaved client is still connected.
    await Promise.all(rooms.map((room, r) => shutDown(room, wellBehaved[r])));
    return { rooms, lagMs: lag() };
  } finally {
    stop.abort();
    for (const room of rooms) if (!room.shutdown) await room.stop("SIGKILL");
  }
}

/** Receptions each connected well-behaved client is owed, and those it got. */
function tally(room: Room): { expected: number; received: number } {
  const n = room.sent.length;
  let expected = 0;
  let received = 0;
  for (let r = 0; r < n; r++) {
    if (!room.connected[r]) continue;
    for (let s = 0; s < n; s++) {
      expected += room.sent[s];
      received += room.got[r * n + s];
    }
  }
  return { expected, received };
}

/** Waits until every connected well-behaved client has all it is owed, or DRAIN_MS. */
async function drain(rooms: Room[]): Promise<void> {
  const deadline = Date.now() + DRAIN_MS;
  const owed = (room: Room) => {
    const { expected, received } = tally(room);
    return received < expected;
  };
  while (Date.now() < deadline && rooms.some(owed)) await delay(100);
}

/** SIGTERM with the well-behaved clients connected: each must be closed cleanly. */
async function shutDown(room: Room, clients: WellBehaved[]): Promise<void> {
  room.rssPeak = memoryMiB(room.pid, "VmHWM");
  room.result = tally(room);
  room.closing = true;
  const still = clients.filter((_, id) => room.connected[id]);
  const start = performance.now();
  const code = await room.stop("SIGTERM");
  const ms = performance.now() - start;
  const ends = await within(Promise.all(still.map((client) => client.ended)), "closes")
    .catch(() => [] as string[]);
  const clean = room.transport === "tcp" ? /^EOF$/ : /^code 1001 /;
  const closed = ends.filter((end) => clean.test(end)).length;
  for (const client of clients) client.close();
  room.shutdown = { code, ms, closed, of: still.length };
}

/** How late this process's timers fire, worst case: the client side's own load. */
function watchEventLoop(): () => number {
  let worst = 0;
  let due = performance.now() + 100;
  const timer = setInterval(() => {
    worst = Math.max(worst, performance.now() - due);
    due = performance.now() + 100;
  }, 100);
  return () => {
    clearInterval(timer);
    return Math.round(worst);
  };
}

// ----------------------------------------------------------------- report

function machine(): string {
  const cpu = Deno.readTextFileSync("/proc/cpuinfo").match(/^model name\s*:\s*(.*)$/m)?.[1];
  const kib = Number(Deno.readTextFileSync("/proc/meminfo").match(/^MemTotal:\s+(\d+)/m)?.[1]);
  const kernel = Deno.readTextFileSync("/proc/sys/kernel/osrelease").trim();
  return `${cpu ?? "unknown CPU"}, ${navigator.hardwareConcurrency} cores, ` +
    `${Math.round(kib / 1024 / 1024)} GiB, Linux ${kernel}, Deno ${Deno.version.deno}`;
}

/** Prints the summary table; returns the exit code: 0 when nothing was lost. */
function report(options: Options, rooms: Room[], lagMs: number): number {
  const [tcp, ws] = rooms;
  const rows: [string, string, string][] = [];
  const row = (label: string, of: (room: Room) => string | number) =>
    rows.push([label, String(of(tcp)), String(of(ws))]);
  const n = (value: number) => value.toLocaleString("en-US");
  const total = (map: Map<string, number>) => [...map.values()].reduce((a, b) => a + b, 0);
  row("well-behaved clients", (room) => room.sent.length);
  row("  messages sent", (room) => n(room.sent.reduce((a, b) => a + b, 0)));
  row("  deliveries owed to them", (room) => n(room.result.expected));
  row("  delivered", (room) => n(room.result.received));
  row("  lost", (room) => n(room.result.expected - room.result.received));
  row("  duplicated / out of order", (room) => `${room.duplicates} / ${room.outOfOrder}`);
  row("  dropped by the server", (room) => total(room.dropped));
  rows.push(["slow and misbehaving: turns (as documented)", "", ""]);
  const kinds = [...new Set(rooms.flatMap((room) => [...room.kinds.keys()]))];
  for (const kind of kinds) {
    row(`  ${kind}`, (room) => {
      const tally = room.kinds.get(kind);
      return tally ? `${n(tally.turns)} (${n(tally.asDocumented)})` : "-";
    });
  }
  rows.push(["disconnects by reason (server log)", "", ""]);
  const reasons = new Map<string, number>();
  for (const room of rooms) for (const [reason, k] of room.reasons) count(reasons, reason, k);
  for (const [reason] of [...reasons].sort((a, b) => b[1] - a[1])) {
    row(`  ${reason}`, (room) => n(room.reasons.get(reason) ?? 0));
  }
  row(
    "server RSS: start -> peak (MiB)",
    (room) => `${room.rssStart.toFixed(0)} -> ${room.rssPeak.toFixed(0)}`,
  );
  row(
    "SIGTERM under load: exit code, ms",
    (room) => `${room.shutdown?.code}, ${room.shutdown?.ms.toFixed(0)}`,
  );
  row(
    "  well-behaved closed cleanly",
    (room) =>
      `${room.shutdown?.closed}/${room.shutdown?.of} (${
        room.transport === "tcp" ? "EOF" : "1001"
      })`,
  );
  const width = Math.max(...rows.map(([label]) => label.length)) + 2;
  const column = Math.max(12, ...rows.map(([, a]) => a.length + 2));
  console.log(
    `soak: ${options.duration} s, ${options.clients} TCP + ${options.clients} WebSocket chat ` +
      `clients on ${HOST}, a message every ~${options.interval} s per well-behaved client`,
  );
  console.log(`machine: ${machine()}`);
  console.log("");
  console.log("".padEnd(width) + "TCP".padEnd(column) + "WebSocket");
  for (const [label, a, b] of rows) console.log(label.padEnd(width) + a.padEnd(column) + b);
  console.log("");
  console.log(
    `soak process: peak RSS ${memoryMiB("self", "VmHWM").toFixed(0)} MiB, ` +
      `event loop late by at most ${lagMs} ms`,
  );
  for (const room of rooms) {
    for (const line of room.otherLog.slice(0, 5)) console.log(`${room.transport} server: ${line}`);
  }
  const failures: string[] = [];
  for (const room of rooms) {
    const lost = room.result.expected - room.result.received;
    if (lost !== 0) failures.push(`${room.transport}: ${lost} lost`);
    if (room.duplicates + room.outOfOrder > 0) failures.push(`${room.transport}: misordered`);
    if (total(room.dropped) > 0) {
      failures.push(`${room.transport}: well-behaved dropped (${[...room.dropped.keys()]})`);
    }
    if (room.shutdown?.code !== 0) failures.push(`${room.transport}: exit ${room.shutdown?.code}`);
    if (room.shutdown?.closed !== room.shutdown?.of) {
      failures.push(`${room.transport}: not every client closed cleanly at shutdown`);
    }
  }
  console.log(failures.length === 0 ? "result: PASS" : `result: FAIL: ${failures.join("; ")}`);
  return failures.length === 0 ? 0 : 1;
}

async function soak(options: Options): Promise<number> {
  if (Deno.build.os !== "linux") {
    console.error("soak: this needs Linux: it reads the servers' memory from /proc");
    return 1;
  }
  // This process holds every client's socket (and churn), each server as many.
  const needed = Math.ceil(2.2 * options.clients) + 100;
  const limit = openFileLimit();
  if (limit < needed) {
    console.error(
      `soak: the open files limit is ${limit}, ${options.clients} clients per server need ` +
        `${needed}: run \`ulimit -n 8192\` first`,
    );
    return 1;
  }
  const { rooms, lagMs } = await run(options);
  return report(options, rooms, lagMs);
}

if (import.meta.main) {
  const command = { name: "soak", usage: USAGE, parse: parseCommandLine, run: soak };
  Deno.exit(await runCommand(command, Deno.args));
}
