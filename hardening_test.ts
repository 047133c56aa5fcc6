/**
 * hardening_test.ts: both servers against clients that misbehave. Slow
 * readers, silent and dead peers, connection floods, resets, abandoned and
 * slowloris handshakes, bytes that are not UTF-8, forged chat lines, running
 * out of open files, log floods, and SIGTERM with 1,000 clients connected.
 *
 *     deno test -A hardening_test.ts      (also part of plain `deno test -A`)
 *
 * The rules of main_test.ts hold here too: port 0 on 127.0.0.1, every wait is
 * for an event (a line, a frame, a close, a log line, an exit) and is bounded
 * by a timeout, and the sanitizers are on. Where a behaviour is about memory
 * the server runs as a child process and its resident memory is read from
 * /proc/PID/status, with bounds that a correct server meets by a wide margin
 * and an unbounded queue misses by far.
 *
 * The 1,000-client tests need about 2,100 open files in this process (and the
 * server children inherit the limit). If the soft limit is lower they raise it
 * up to the hard limit; if even that is too low they are skipped with the
 * reason in their name, except under CI=true, where they run and fail.
 */

import assert from "node:assert/strict";
import net from "node:net";
import { createLogLimiter, startTcpServer, type TcpServer } from "./tcp_server.ts";
import { startWsServer, type WsServer } from "./ws_server.ts";
import {
  connectTcp,
  openWs,
  runScript,
  scriptPath,
  spawnServer,
  type TcpClient,
  WAIT_MS,
  within,
  type WsClient,
} from "./test_helpers.ts";

const encoder = new TextEncoder();
const decoder = new TextDecoder();
const MiB = 1024 * 1024;
// What a client that stops reading is sent in the memory tests, and the bound
// on the server's growth: a bounded queue stays far below, an unbounded one
// (or one bounded only by the total) far above.
const FLOOD_BYTES = 200 * MiB;
const MAX_GROWTH_MIB = 100;
// Message size for the in-process WebSocket floods. Deno's own WebSocket
// client takes ~20 ms per 8 KiB message on loopback (delayed ACKs), while
// 32 KiB ones go at once; one in flight keeps the talker far below a 64 KiB
// --max-queue of its own.
const WS_TALK_BYTES = 32 * 1024;
const SHUTDOWN_CLIENTS = 1000;
// This process holds every client socket; a little more for Deno itself.
const FILES_NEEDED = 2 * SHUTDOWN_CLIENTS + 100;
const FILES_WANTED = 4096;
const ON_CI = Deno.env.get("CI") === "true";
// Any key works: the server's answer to it is checked in main_test.ts.
const UPGRADE_REQUEST = "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n" +
  "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n" +
  "Sec-WebSocket-Version: 13\r\n\r\n";
// WebSocket opcodes (RFC 6455, section 5.2).
const OP_TEXT = 0x1;
const OP_BINARY = 0x2;
const OP_CLOSE = 0x8;
const OP_PING = 0x9;

// ------------------------------------------------------------------ helpers

/**
 * A server's log as it is written: the lines so far, and a wait for a
 * pattern among them.
 */
function createLines() {
  const lines: string[] = [];
  let wake = () => {};
  function count(pattern: RegExp): number {
    return lines.filter((line) => pattern.test(line)).length;
  }
  return {
    lines,
    count,
    push(line: string) {
      lines.push(line);
      wake();
    },
    /** Waits until `n` lines so far match `pattern`. */
    async waitFor(pattern: RegExp, n = 1, ms = WAIT_MS) {
      await within(
        (async () => {
          while (count(pattern) < n) await new Promise<void>((resolve) => wake = resolve);
        })(),
        `${n} line(s) matching ${pattern}; have ${count(pattern)}: ${lines.slice(-5).join(" | ")}`,
        ms,
      );
    },
  };
}

type Lines = ReturnType<typeof createLines>;

/** A frame as a client must send it: masked (RFC 6455, section 5.3). */
function clientFrame(opcode: number, payload: Uint8Array, mask = true): Uint8Array {
  const extra = payload.length < 126 ? 0 : payload.length < 65536 ? 2 : 8;
  const frame = new Uint8Array(2 + extra + 4 + payload.length);
  const view = new DataView(frame.buffer);
  frame[0] = 0x80 | opcode;
  if (extra === 0) frame[1] = 0x80 | payload.length;
  else if (extra === 2) (frame[1] = 0x80 | 126, view.setUint16(2, payload.length));
  else (frame[1] = 0x80 | 127, view.setBigUint64(2, BigInt(payload.length)));
  const key = frame.subarray(2 + extra, 6 + extra);
  // A zero key is as valid as any and leaves the payload as it is (fast floods).
  if (mask) crypto.getRandomValues(key);
  const body = frame.subarray(6 + extra);
  for (let i = 0; i < payload.length; i++) body[i] = payload[i] ^ key[i & 3];
  return frame;
}

/**
 * A WebSocket client on a bare TCP socket: it does the upgrade by hand, then
 * reads only when asked to and never answers a ping by itself. That makes it
 * a client that stops reading, or a dead peer, which the standard client
 * (which reads eagerly and answers pings) cannot be.
 */
async function rawWs(port: number) {
  const tcp = await connectTcp(port);
  await tcp.write(UPGRADE_REQUEST);
  const status = (await tcp.readLine())?.trimEnd() ?? "";
  const headers: string[] = [];
  for (
    let line = await tcp.readLine();
    line !== null && line !== "\r";
    line = await tcp.readLine()
  ) {
    headers.push(line.trimEnd());
  }
  return {
    tcp,
    status,
    headers,
    /** The next frame from the server, or null at EOF. */
    async readFrame(): Promise<{ opcode: number; payload: Uint8Array } | null> {
      const head = await tcp.readBytes(2);
      if (head.length < 2) return null;
      let length = head[1] & 0x7f;
      if (length === 126) length = new DataView((await tcp.readBytes(2)).buffer).getUint16(0);
      else if (length === 127) {
        length = Number(new DataView((await tcp.readBytes(8)).buffer).getBigUint64(0));
      }
      return { opcode: head[0] & 0x0f, payload: await tcp.readBytes(length) };
    },
    /** Frames until the close frame; returns its code and reason and what came before. */
    async readUntilClose() {
      const texts: string[] = [];
      for (let frame = await this.readFrame(); frame; frame = await this.readFrame()) {
        if (frame.opcode === OP_TEXT) texts.push(decoder.decode(frame.payload));
        if (frame.opcode === OP_CLOSE) return { ...closeFrame(frame.payload), texts };
      }
      return { code: 0, reason: "", texts };
    },
    sendText(text: string) {
      return tcp.write(clientFrame(OP_TEXT, encoder.encode(text)));
    },
    [Symbol.dispose]() {
      tcp.close();
    },
  };
}

type RawWs = Awaited<ReturnType<typeof rawWs>>;

function closeFrame(payload: Uint8Array): { code: number; reason: string } {
  if (payload.length < 2) return { code: 1005, reason: "" };
  return {
    code: new DataView(payload.buffer, payload.byteOffset).getUint16(0),
    reason: decoder.decode(payload.subarray(2)),
  };
}

/**
 * A process's memory in MiB, from /proc: VmRSS is what is resident now, VmHWM
 * the most that ever was (its high-water mark).
 */
function memoryMiB(pid: number, field: "VmRSS" | "VmHWM"): number {
  const status = Deno.readTextFileSync(`/proc/${pid}/status`);
  const kib = Number(status.match(new RegExp(`^${field}:\\s+(\\d+) kB`, "m"))?.[1]);
  assert.ok(kib > 0, `${field} of ${pid}`);
  return kib / 1024;
}

/** Opens `count` connections, `batch` at a time so the listen backlog never overflows. */
async function openMany<T>(count: number, open: (i: number) => Promise<T>, batch = 100) {
  const opened: T[] = [];
  for (let i = 0; i < count; i += batch) {
    const size = Math.min(batch, count - i);
    opened.push(...await Promise.all(Array.from({ length: size }, (_, j) => open(i + j))));
  }
  return opened;
}

// Deno has no setrlimit, so this calls the C library's (FFI, allowed by -A)
// to raise the soft limit on open files up to the hard limit. Returns why
// the limit is still too low, or undefined when it is enough.
function raiseFileLimit(needed: number, wanted: number): string | undefined {
  if (Deno.build.os !== "linux") return "these tests read /proc, which only Linux has";
  const soft = () =>
    Number(Deno.readTextFileSync("/proc/self/limits").match(/^Max open files\s+(\d+)/m)?.[1]);
  if (soft() >= needed) return undefined;
  const RLIMIT_NOFILE = 7;
  try {
    const libc = Deno.dlopen("libc.so.6", {
      getrlimit: { parameters: ["i32", "buffer"], result: "i32" },
      setrlimit: { parameters: ["i32", "buffer"], result: "i32" },
    });
    try {
      const limits = new BigUint64Array(2); // struct rlimit { soft, hard }
      libc.symbols.getrlimit(RLIMIT_NOFILE, limits);
      limits[0] = limits[1] < BigInt(wanted) ? limits[1] : BigInt(wanted);
      libc.symbols.setrlimit(RLIMIT_NOFILE, limits);
    } finally {
      libc.close();
    }
  } catch {
    // No FFI permission, or no glibc: report the limit below.
  }
  const now = soft();
  return now >= needed
    ? undefined
    : `open files limit is ${now}, need ${needed}: run \`ulimit -n ${wanted}\` first`;
}

const FILE_LIMIT_PROBLEM = raiseFileLimit(FILES_NEEDED, FILES_WANTED);

/** A test that needs many open files: skipped with the reason if they are not there, except on CI. */
function manyClientsTest(name: string, fn: () => Promise<void>): void {
  const skip = FILE_LIMIT_PROBLEM !== undefined && !ON_CI;
  Deno.test({
    name: skip ? `${name} (skipped: ${FILE_LIMIT_PROBLEM})` : name,
    ignore: skip,
    fn: async () => {
      assert.equal(FILE_LIMIT_PROBLEM, undefined, `CI must run this test: ${FILE_LIMIT_PROBLEM}`);
      await fn();
    },
  });
}

/** A memory test: Linux only, since it reads /proc. Never skipped on CI. */
function memoryTest(name: string, fn: () => Promise<void>): void {
  const skip = Deno.build.os !== "linux" && !ON_CI;
  Deno.test({ name: skip ? `${name} (skipped: needs /proc)` : name, ignore: skip, fn });
}

/**
 * Asks a TCP server for one more client: it sends a line and reads the first
 * line back, which is its own line relayed (chat) or echoed, or the refusal.
 */
async function probeTcp(port: number): Promise<{ client: TcpClient; accepted: boolean }> {
  const client = await connectTcp(port);
  await client.write("probe\n");
  const line = await within(client.readLine(), "a probe's first line");
  if (line === "* error: server full") {
    assert.equal(await within(client.readLine(), "EOF after server full"), null);
    return { client, accepted: false };
  }
  assert.match(line ?? "null", /^(guest-\d+: )?probe$/);
  return { client, accepted: true };
}

/**
 * Fills a TCP server up to its cap: exactly `free` more clients get in and
 * the next is refused. Then they leave, and the count is back where it was.
 */
async function assertTcpRoom(server: TcpServer, log: Lines, free: number): Promise<void> {
  const connections = server.connections;
  const disconnects = log.count(/^- /);
  const probes: TcpClient[] = [];
  try {
    for (let i = 0; i <= free; i++) {
      const { client, accepted } = await probeTcp(server.addr.port);
      probes.push(client);
      assert.equal(accepted, i < free, `probe ${i + 1} with ${free} free places`);
    }
    assert.equal(server.connections, connections + free);
  } finally {
    for (const probe of probes) probe.close();
  }
  await waitForDisconnects(log, disconnects + free, server, connections);
}

/** The same for a WebSocket server: `free` upgrades get 101, the next 503. */
async function assertWsRoom(server: WsServer, log: Lines, free: number): Promise<void> {
  const connections = server.connections;
  const disconnects = log.count(/^- /);
  const probes: RawWs[] = [];
  try {
    for (let i = 0; i <= free; i++) {
      const probe = await within(rawWs(server.addr.port), "a probe's upgrade");
      probes.push(probe);
      assert.match(probe.status, i < free ? / 101 / : / 503 /, `probe ${i + 1} with ${free} free`);
    }
    assert.equal(server.connections, connections + free);
  } finally {
    for (const probe of probes) probe.tcp.close();
  }
  await waitForDisconnects(log, disconnects + free, server, connections);
}

/** Waits until the server's log shows `n` disconnects in all, then checks the count. */
async function waitForDisconnects(
  log: Lines,
  n: number,
  server: { connections: number },
  connections: number,
): Promise<void> {
  await log.waitFor(/^- /, n);
  assert.equal(log.count(/^- /), n, "each connection ends exactly once");
  assert.equal(server.connections, connections, `connections after ${n} disconnects`);
}

/**
 * The steps of "the count survives every way a connection ends", for either
 * server. Each case is a step of `t`: a fresh chat server with room for two
 * (from `start`), a subject (guest-1) that ends one way (`end`), then the log
 * must show one disconnect for each client that took part, the subject's
 * with `reason`, and both places must be free again (`assertRoom`).
 */
function connectionEndSteps<Server extends TcpServer | WsServer, Options>(
  t: Deno.TestContext,
  start: (log: Lines, options: Options) => Server,
  assertRoom: (server: Server, log: Lines, free: number) => Promise<void>,
) {
  return async function endsWith(
    name: string,
    options: Options,
    end: (port: number) => Promise<void>,
    reason: RegExp,
    clients = 1,
  ): Promise<void> {
    await t.step(name, async () => {
      const log = createLines();
      await using server = start(log, options);
      await end(server.addr.port);
      await waitForDisconnects(log, clients, server, 0);
      assert.match(log.lines.find((line) => /^- .*\(guest-1\)/.test(line))!, reason);
      await assertRoom(server, log, 2);
    });
  };
}

function pause(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/**
 * One chat client as floodChat drives it: `send` says one line (a TCP line
 * without its newline, or a WebSocket text message), `receive` takes the
 * next one that arrives, or null at EOF.
 */
interface ChatLink {
  send(text: string): Promise<void> | void;
  receive(): Promise<string | null>;
}

/** A TCP chat client as a ChatLink. */
function tcpLink(client: TcpClient): ChatLink {
  return { send: (text) => client.write(`${text}\n`), receive: () => client.readLine() };
}

/** A WebSocket chat client as a ChatLink. */
function wsLink(client: WsClient): ChatLink {
  // The chat relays text only. At the close, next() throws instead of
  // returning null: nothing more can be read either way.
  return {
    send: (text) => client.socket.send(text),
    receive: async () => String(await client.next()),
  };
}

/**
 * Sends numbered lines (TCP) or text messages (WebSocket) of `messageBytes`
 * through a chat and reads each one back, at most `window` unanswered: a
 * well-behaved client, which reads everything. Checks that its own come back
 * whole and in order, and returns the notices (`* …` lines) that arrived in
 * between. With `stopAt`, stops sending once a notice matches it.
 */
async function floodChat(
  link: ChatLink,
  name: string,
  options: { total: number; messageBytes: number; window: number; stopAt?: RegExp },
): Promise<string[]> {
  const filler = "x".repeat(options.messageBytes - 16);
  const messages = Math.ceil(options.total / options.messageBytes);
  const notices: string[] = [];
  let received = 0;
  async function receive() {
    const message = await link.receive();
    if (message === null) throw new Error(`${name}: EOF after ${received} of its messages`);
    if (message.startsWith("* ")) notices.push(message);
    else {
      // Not assert.equal: its message would print two 60 KiB strings.
      assert.ok(
        message === `${name}: ${received} ${filler}`,
        `${name}'s message ${received} intact`,
      );
      received++;
    }
  }
  let sent = 0;
  while (sent < messages && !(options.stopAt && notices.some((n) => options.stopAt!.test(n)))) {
    await link.send(`${sent++} ${filler}`);
    while (sent - received > options.window) await receive();
  }
  while (received < sent) await receive();
  return notices;
}

// --------------------------------------------------------- TCP: slow readers

memoryTest(
  "tcp chat: a client that stops reading is dropped as too slow and announced; 200 MiB later the server has grown < 100 MiB",
  async () => {
    // Default --max-queue (2 MiB): the test is of the shipped configuration.
    await using server = await spawnServer("tcp_server.ts", ["--mode", "chat", "--quiet"]);
    using _slow = await connectTcp(server.port); // guest-1: never reads a byte
    using fast = await connectTcp(server.port); // guest-2
    const before = memoryMiB(server.pid, "VmRSS");
    const notices = await within(
      floodChat(tcpLink(fast), "guest-2", {
        total: FLOOD_BYTES,
        messageBytes: 60 * 1024,
        window: 16,
      }),
      "200 MiB through the chat",
      60_000,
    );
    const growth = memoryMiB(server.pid, "VmHWM") - before;
    assert.ok(growth < MAX_GROWTH_MIB, `the server grew by ${growth.toFixed(1)} MiB`);
    assert.deepEqual(notices, ["* guest-1 left"]);
  },
);

Deno.test("tcp chat: the too-slow client gets the reason once it reads again; the others carry on", async () => {
  const log = createLines();
  await using server = startTcpServer({
    port: 0,
    mode: "chat",
    maxQueue: 64 * 1024,
    log: log.push,
  });
  using slow = await connectTcp(server.addr.port); // guest-1: stops reading
  using talker = await connectTcp(server.addr.port); // guest-2
  const lineBytes = 8 * 1024;
  const notices = await within(
    floodChat(tcpLink(talker), "guest-2", {
      total: 64 * MiB,
      messageBytes: lineBytes,
      window: 4,
      stopAt: /^\* guest-1 left$/,
    }),
    "the slow client's drop",
    30_000,
  );
  assert.deepEqual(notices, ["* guest-1 left"]);
  const lines = await within(slow.readLinesToEnd(), "the slow client's backlog");
  slow.close();
  assert.equal(lines.shift(), "* guest-2 joined");
  assert.equal(lines.pop(), "* error: too slow, disconnected");
  // What came before the reason is whole lines in order: the queue was
  // dropped whole, nothing was cut in the middle of a line.
  const filler = "x".repeat(lineBytes - 16);
  assert.ok(lines.length > 0);
  lines.forEach((line, i) => assert.ok(line === `guest-2: ${i} ${filler}`, `line ${i}`));
  await waitForDisconnects(log, 1, server, 1);
  assert.match(log.lines.find((line) => line.startsWith("- "))!, /\(guest-1\): too slow/);
  await talker.write("still here\n");
  assert.equal(await within(talker.readLine(), "the talker's line"), "guest-2: still here");
});

// ------------------------------------------------------------ TCP: idle peers

Deno.test("tcp chat: --idle-timeout drops a silent client with a reason; one that talks stays", async () => {
  const log = createLines();
  await using server = startTcpServer({ port: 0, mode: "chat", idleTimeout: 0.5, log: log.push });
  const start = performance.now();
  using silent = await connectTcp(server.addr.port); // guest-1
  using talker = await connectTcp(server.addr.port); // guest-2
  let dropped = false;
  const silentLines = silent.readLinesToEnd().then((lines) => {
    dropped = true;
    return { lines, ms: performance.now() - start };
  });
  // The talker's pace, four times within any idle timeout, until the silent
  // one is gone: what keeps it alive is that it talks.
  for (let tick = 0; !dropped; tick++) {
    assert.ok(tick < 100, "the silent client was never dropped");
    await talker.write(`tick ${tick}\n`);
    await pause(100);
  }
  const { lines, ms } = await silentLines;
  silent.close();
  assert.deepEqual(lines.filter((line) => !line.startsWith("guest-2: tick")), [
    "* guest-2 joined",
    "* error: idle timeout",
  ]);
  // The idle sweep runs four times per timeout here, so the drop comes
  // between three and four sweeps after the last byte.
  assert.ok(ms >= 350 && ms < 3000, `dropped after ${ms.toFixed(0)} ms of silence (timeout 500)`);
  await talker.write("still here\n");
  const heard: string[] = [];
  for (let line = ""; line !== "guest-2: still here";) {
    line = (await within(talker.readLine(), "the talker's lines")) ?? "EOF";
    heard.push(line);
  }
  assert.ok(heard.includes("* guest-1 left"));
  await waitForDisconnects(log, 1, server, 1);
  assert.match(log.lines.find((line) => line.startsWith("- "))!, /\(guest-1\): idle timeout$/);
});

Deno.test("tcp echo: --idle-timeout works in echo mode too", async () => {
  await using server = startTcpServer({ port: 0, idleTimeout: 0.3, log: () => {} });
  using client = await connectTcp(server.addr.port);
  await client.write("hi\n");
  assert.deepEqual(await within(client.readLinesToEnd(), "the idle drop"), [
    "hi",
    "* error: idle timeout",
  ]);
});

// ---------------------------------------------------- TCP: connection caps

Deno.test("tcp: over --max-connections a client is told the server is full and not counted; places free up", async () => {
  const log = createLines();
  await using server = startTcpServer({ port: 0, maxConnections: 2, log: log.push });
  const a = await probeTcp(server.addr.port);
  const b = await probeTcp(server.addr.port);
  assert.ok(a.accepted && b.accepted);
  // A crowd over the cap at once: every one refused, none counted.
  const crowd = await openMany(50, async () => (await probeTcp(server.addr.port)).client);
  assert.equal(server.connections, 2);
  for (const client of crowd) client.close();
  a.client.close();
  await waitForDisconnects(log, 1, server, 1);
  await assertTcpRoom(server, log, 1);
  b.client.close();
  await waitForDisconnects(log, 3, server, 0);
  await assertTcpRoom(server, log, 2);
  assert.equal(log.count(/^\+ /), log.count(/^- /));
});

Deno.test("tcp chat: the count survives every way a connection ends, exactly once each", async (t) => {
  const endsWith = connectionEndSteps(
    t,
    (log, options: { idleTimeout?: number; maxQueue?: number; maxLine?: number }) =>
      startTcpServer({ port: 0, mode: "chat", maxConnections: 2, log: log.push, ...options }),
    assertTcpRoom,
  );
  await endsWith("clean close", {}, async (port) => {
    const { client } = await probeTcp(port);
    client.close();
  }, /closed by peer$/);
  await endsWith("half-close", {}, async (port) => {
    using client = await connectTcp(port);
    await client.write("bye\n");
    await client.conn.closeWrite();
    assert.deepEqual(await within(client.readLinesToEnd(), "EOF"), ["guest-1: bye"]);
  }, /closed by peer$/);
  await endsWith("reset", {}, async (port) => {
    const client = await connectTcp(port);
    await client.write("one\ntwo\n");
    assert.equal(await within(client.readLine(), "the first line"), "guest-1: one");
    // "guest-1: two" is still unread: closing now sends a reset, not a FIN.
    client.close();
  }, /closed by peer$/);
  await endsWith("idle drop", { idleTimeout: 0.3 }, async (port) => {
    using client = await connectTcp(port);
    assert.deepEqual(await within(client.readLinesToEnd(), "the idle drop"), [
      "* error: idle timeout",
    ]);
  }, /idle timeout$/);
  await endsWith("line too long", { maxLine: 100 }, async (port) => {
    using client = await connectTcp(port);
    await client.write("z".repeat(200));
    assert.deepEqual(await within(client.readLinesToEnd(), "the refusal"), [
      "* error: line too long (max 100 bytes)",
    ]);
  }, /line too long/);
  await endsWith(
    "slow-consumer drop",
    { maxQueue: 64 * 1024 },
    async (port) => {
      const slow = await connectTcp(port); // never reads
      using talker = await connectTcp(port);
      await within(
        floodChat(tcpLink(talker), "guest-2", {
          total: 64 * MiB,
          messageBytes: 8 * 1024,
          window: 4,
          stopAt: /left$/,
        }),
        "the slow client's drop",
        30_000,
      );
      // The server closes it after its linger; the talker goes too.
      talker.close();
      await within(slow.drain(), "the server closing the slow client");
      slow.close();
    },
    /too slow, disconnected$/,
    2,
  );
  await t.step("server shutdown", async () => {
    const log = createLines();
    const server = startTcpServer({ port: 0, mode: "chat", log: log.push });
    using a = await connectTcp(server.addr.port);
    using b = await connectTcp(server.addr.port);
    assert.equal(await within(a.readLine(), "a join"), "* guest-2 joined");
    await within(server.close(), "close()");
    assert.equal(server.connections, 0);
    assert.equal(log.count(/^- /), 0, "no disconnect lines while the whole server goes away");
    for (const client of [a, b]) {
      assert.deepEqual(await within(client.readLinesToEnd(), "EOF"), [], "and no '* … left'");
    }
  });
});

Deno.test("tcp: close() right after clients connect still returns", async () => {
  for (let round = 0; round < 20; round++) {
    const server = startTcpServer({ port: 0, mode: "chat", log: () => {} });
    const clients = await Promise.all(
      Array.from({ length: 5 }, () => connectTcp(server.addr.port)),
    );
    try {
      // No await between the connects and close(): some accepts have
      // completed but their connections are not being served yet.
      await within(server.close(), `close() in round ${round}`, 3000);
    } finally {
      for (const client of clients) client.close();
      await server.close();
    }
  }
});

// ------------------------------------------------------ TCP: bad input

Deno.test("tcp chat: bytes that are not UTF-8 reach everyone as U+FFFD; valid text split anywhere stays intact", async () => {
  await using server = startTcpServer({ port: 0, mode: "chat", log: () => {} });
  using sender = await connectTcp(server.addr.port);
  using receiver = await connectTcp(server.addr.port);
  assert.equal(await within(sender.readLine(), "the join"), "* guest-2 joined");
  sender.conn.setNoDelay(true);
  const cases: [number[][], string][] = [
    [[[0x61, 0xff, 0x62, 0x0a]], "a\uFFFDb"], // a byte that is never UTF-8
    [[[0xe2, 0x82, 0x0a]], "\uFFFD"], // a sequence cut short by the newline
    [[[0xc0, 0xaf, 0x0a]], "\uFFFD\uFFFD"], // an overlong "/"
    [[[0xed, 0xa0, 0x80, 0x0a]], "\uFFFD\uFFFD\uFFFD"], // a UTF-16 surrogate
    [[[0x00, 0x01, 0x09, 0x7f, 0x0a]], "\u2400\u2401\t\u2421"], // controls as pictures, tab as is
    [[[0xc2, 0x9b, 0x0a]], "\uFFFD"], // a C1 control (CSI), valid UTF-8
    [[[0xe2], [0x82], [0xac, 0x0a]], "€"], // valid, in three writes
  ];
  for (const [writes, expected] of cases) {
    for (const bytes of writes) await sender.write(Uint8Array.from(bytes));
    for (const client of [sender, receiver]) {
      assert.equal(await within(client.readLine(), "a relayed line"), `guest-1: ${expected}`);
    }
  }
});

Deno.test("tcp chat: a line with no newline at all hits --max-line within that many bytes", async () => {
  await using server = startTcpServer({ port: 0, mode: "chat", maxLine: 1000, log: () => {} });
  using fits = await connectTcp(server.addr.port);
  await fits.write("y".repeat(1000) + "\r\n");
  assert.equal(
    await within(fits.readLine(), "a line of max length"),
    `guest-1: ${"y".repeat(1000)}`,
  );
  using endless = await connectTcp(server.addr.port);
  // 1000 bytes and a "\r" could still be a line; one byte more cannot. No
  // newline ever comes: the server must decide from what it has.
  await endless.write("y".repeat(1002));
  assert.deepEqual(await within(endless.readLinesToEnd(), "the refusal"), [
    "* error: line too long (max 1000 bytes)",
  ]);
  assert.equal(await within(fits.readLine(), "the leave"), "* guest-2 joined");
  assert.equal(await within(fits.readLine(), "the leave"), "* guest-2 left");
});

// ------------------------------------- TCP: resets, silence, half-closes

Deno.test("tcp chat: silent connections, resets and half-closes do not stop the server serving others", async () => {
  const log = createLines();
  await using server = startTcpServer({ port: 0, mode: "chat", log: log.push });
  const { port } = server.addr;
  using first = await connectTcp(port); // guest-1
  const silent = await openMany(100, () => connectTcp(port)); // guest-2..101: say nothing
  const rude = await openMany(50, () => connectTcp(port)); // guest-102..151
  const joins = first.readLine.bind(first);
  for (let line = ""; line !== "* guest-151 joined";) {
    line = (await within(joins(), "the joins")) ?? "EOF";
  }
  // Each has unread "joined" lines (all but the last), so closing sends a
  // reset. (Deno reports a reset seen by read() as EOF: "closed by peer".)
  for (const client of rude) client.close();
  await log.waitFor(/^- /, 50);
  using halfClosed = await connectTcp(port); // guest-152
  await halfClosed.write("bye\n");
  await halfClosed.conn.closeWrite();
  assert.deepEqual(await within(halfClosed.readLinesToEnd(), "EOF"), ["guest-152: bye"]);
  await first.write("still here\n");
  const heard: string[] = [];
  for (let line = ""; line !== "guest-1: still here";) {
    line = (await within(first.readLine(), "first's lines")) ?? "EOF";
    heard.push(line);
  }
  assert.equal(heard.filter((line) => /^\* guest-\d+ left$/.test(line)).length, 51);
  assert.ok(heard.includes("guest-152: bye"));
  assert.equal(server.connections, 101);
  for (const client of silent) client.close();
  await waitForDisconnects(log, 151, server, 1);
});

// --------------------------------------------------- WebSocket: slow readers

memoryTest(
  "ws chat: a client that stops reading is closed as too slow and announced; 200 MiB later the server has grown < 100 MiB",
  async () => {
    await using server = await spawnServer("ws_server.ts", ["--mode", "chat", "--quiet"]);
    using _slow = await rawWs(server.port); // guest-1: never reads a byte
    await using fast = await openWs(`ws://127.0.0.1:${server.port}/`); // guest-2
    const before = memoryMiB(server.pid, "VmRSS");
    const notices = await within(
      floodChat(wsLink(fast), "guest-2", {
        total: FLOOD_BYTES,
        messageBytes: 64 * 1024,
        window: 16,
      }),
      "200 MiB through the chat",
      60_000,
    );
    const growth = memoryMiB(server.pid, "VmHWM") - before;
    assert.ok(growth < MAX_GROWTH_MIB, `the server grew by ${growth.toFixed(1)} MiB`);
    assert.deepEqual(notices, ["* guest-1 left"]);
  },
);

memoryTest(
  "ws echo: a client that sends without reading is closed as too slow; after 200 MiB the server has grown < 100 MiB",
  async () => {
    await using server = await spawnServer("ws_server.ts", ["--quiet"]);
    using greedy = await rawWs(server.port);
    const before = memoryMiB(server.pid, "VmRSS");
    // Binary frames of 64 KiB, never reading the echoes. Once the server has
    // dropped us, a write either fails (it reset the connection) or never
    // completes: Deno keeps a closed WebSocket's TCP connection until the
    // writes still pending to it are done, and nobody reads from it any more.
    const frame = clientFrame(OP_BINARY, new Uint8Array(64 * 1024), false);
    let sent = 0;
    for (let taken = true; taken && sent < FLOOD_BYTES; sent += taken ? frame.length : 0) {
      taken = await within(greedy.tcp.write(frame), "a write", 2000).then(() => true, () => false);
    }
    const growth = memoryMiB(server.pid, "VmHWM") - before;
    assert.ok(growth < MAX_GROWTH_MIB, `the server grew by ${growth.toFixed(1)} MiB`);
    assert.ok(sent < FLOOD_BYTES, "the server dropped the client before it sent everything");
  },
);

Deno.test("ws chat: the too-slow client is announced at once and gets 1008 once it reads again", async () => {
  const log = createLines();
  await using server = startWsServer({
    port: 0,
    mode: "chat",
    maxQueue: 64 * 1024,
    log: log.push,
  });
  const url = `ws://127.0.0.1:${server.addr.port}/`;
  using slow = await rawWs(server.addr.port); // guest-1: stops reading
  await using talker = await openWs(url); // guest-2
  const messageBytes = WS_TALK_BYTES;
  const notices = await within(
    floodChat(wsLink(talker), "guest-2", {
      total: 64 * MiB,
      messageBytes,
      window: 1,
      stopAt: /^\* guest-1 left$/,
    }),
    "the slow client's drop",
    30_000,
  );
  assert.deepEqual(notices, ["* guest-1 left"]);
  // Still counted: its socket is open until it reads our close frame (or goes away).
  assert.equal(server.connections, 2);
  const { code, reason, texts } = await within(slow.readUntilClose(), "the close frame");
  assert.equal(code, 1008);
  assert.equal(reason, "too slow, disconnected");
  assert.equal(texts.shift(), "* guest-2 joined");
  const filler = "x".repeat(messageBytes - 16);
  assert.ok(texts.length > 0);
  texts.forEach((text, i) => assert.ok(text === `guest-2: ${i} ${filler}`, `message ${i}`));
  slow.tcp.close();
  await waitForDisconnects(log, 1, server, 1);
  talker.socket.send("still here");
  assert.equal(await within(talker.next(), "the talker's message"), "guest-2: still here");
});

// ------------------------------------------------------ WebSocket: idle peers

Deno.test("ws chat: --idle-timeout N pings a silent peer at N/2 and drops it at N if no pong came; one that answers stays", async () => {
  const log = createLines();
  const idleTimeout = 1;
  await using server = startWsServer({ port: 0, mode: "chat", idleTimeout, log: log.push });
  await using alive = await openWs(`ws://127.0.0.1:${server.addr.port}/`); // answers pings
  const start = performance.now();
  using dead = await rawWs(server.addr.port); // never answers
  const frames: { opcode: number; ms: number; payload: Uint8Array }[] = [];
  for (let frame = await within(dead.readFrame(), "a frame"); frame;) {
    frames.push({ ...frame, ms: performance.now() - start });
    frame = await within(dead.readFrame(), "a frame");
  }
  const ping = frames.find((frame) => frame.opcode === OP_PING);
  const close = frames.find((frame) => frame.opcode === OP_CLOSE);
  assert.ok(ping && close, `a ping, then a close: got opcodes ${frames.map((f) => f.opcode)}`);
  assert.ok(
    ping.ms > 0.3 * idleTimeout * 1000 && ping.ms < 0.8 * idleTimeout * 1000,
    `ping at ${ping.ms} ms`,
  );
  assert.ok(
    close.ms > 0.8 * idleTimeout * 1000 && close.ms < 1.5 * idleTimeout * 1000,
    `drop at ${close.ms} ms`,
  );
  assert.deepEqual(closeFrame(close.payload), {
    code: 1001,
    reason: "No response from ping frame.",
  });
  // The standard client was just as silent, but answered the ping.
  assert.equal(await within(alive.next(), "the join"), "* guest-2 joined");
  assert.equal(await within(alive.next(), "the leave"), "* guest-2 left");
  alive.socket.send("still here");
  assert.equal(await within(alive.next(), "alive's message"), "guest-1: still here");
  assert.equal(server.connections, 1);
  assert.match(log.lines.find((line) => line.startsWith("- "))!, /code 1001 No response from ping/);
});

// ------------------------------------------------- WebSocket: connection caps

Deno.test("ws: over --max-connections an upgrade gets HTTP 503 with a one-line body; places free up", async () => {
  const log = createLines();
  await using server = startWsServer({ port: 0, mode: "chat", maxConnections: 2, log: log.push });
  const { port } = server.addr;
  const url = `ws://127.0.0.1:${port}/`;
  const a = await openWs(url);
  await using _b = await openWs(url);
  using refused = await rawWs(port);
  assert.match(refused.status, /^HTTP\/1\.1 503 /);
  const length = Number(refused.headers.find((h) => /^content-length:/i.test(h))?.split(":")[1]);
  const body = decoder.decode(await refused.tcp.readBytes(length));
  assert.equal(body, "server full (max 2 connections), try again later\n");
  assert.equal(server.connections, 2);
  // Over the cap and abandoned mid-handshake: after the whole request (the
  // 503 goes to a closed socket), or after half the headers.
  for (let i = 0; i < 20; i++) {
    using conn = await Deno.connect({ hostname: "127.0.0.1", port });
    const request = encoder.encode(UPGRADE_REQUEST);
    await conn.write(i % 2 ? request : request.subarray(0, 40));
  }
  assert.equal(server.connections, 2);
  await a[Symbol.asyncDispose]();
  await waitForDisconnects(log, 1, server, 1);
  await assertWsRoom(server, log, 1);
  assert.equal(log.count(/^\+ /), 3);
});

Deno.test("ws chat: the count survives every way a connection ends, exactly once each", async (t) => {
  const endsWith = connectionEndSteps(
    t,
    (log, options: { idleTimeout?: number; maxQueue?: number; maxMessage?: number }) =>
      startWsServer({ port: 0, mode: "chat", maxConnections: 2, log: log.push, ...options }),
    assertWsRoom,
  );
  const url = (port: number) => `ws://127.0.0.1:${port}/`;
  await endsWith("clean close", {}, async (port) => {
    const client = await openWs(url(port));
    client.socket.close(1000);
    await client.closed;
  }, /code 1000$/);
  await endsWith("reset", {}, async (port) => {
    const client = await rawWs(port);
    await client.sendText("one");
    await client.sendText("two");
    const first = await within(client.readFrame(), "the first message");
    assert.equal(decoder.decode(first?.payload), "guest-1: one");
    // "guest-1: two" is still unread: closing now sends a reset.
    client.tcp.close();
  }, /code none \(connection lost\)$/);
  await endsWith("garbage instead of frames", {}, async (port) => {
    using client = await rawWs(port);
    await client.tcp.write(new Uint8Array(64).fill(0xff));
    await within(client.tcp.drain(), "the server closing");
  }, /disconnected/);
  await endsWith("idle drop", { idleTimeout: 1 }, async (port) => {
    using client = await rawWs(port);
    assert.equal((await within(client.readUntilClose(), "the idle drop")).code, 1001);
  }, /code 1001 No response from ping frame\.$/);
  await endsWith("message too big", { maxMessage: 100 }, async (port) => {
    await using client = await openWs(url(port));
    client.socket.send("z".repeat(101));
    assert.equal((await within(client.closed, "the close")).code, 1009);
  }, /./);
  await endsWith("binary in chat", {}, async (port) => {
    await using client = await openWs(url(port));
    client.socket.send(new Uint8Array(3));
    assert.equal((await within(client.closed, "the close")).code, 1003);
  }, /./);
  await endsWith(
    "slow-consumer drop",
    { maxQueue: 64 * 1024 },
    async (port) => {
      using slow = await rawWs(port); // never reads until dropped
      await using talker = await openWs(url(port));
      await within(
        floodChat(wsLink(talker), "guest-2", {
          total: 64 * MiB,
          messageBytes: WS_TALK_BYTES,
          window: 1,
          stopAt: /left$/,
        }),
        "the slow client's drop",
        30_000,
      );
      assert.equal((await within(slow.readUntilClose(), "the close frame")).code, 1008);
    },
    /./,
    2,
  );
  await t.step("abandoned handshakes are never counted", async () => {
    const log = createLines();
    await using server = startWsServer({ port: 0, maxConnections: 2, log: log.push });
    const request = encoder.encode(UPGRADE_REQUEST);
    for (const cut of [0, 1, 20, request.length - 2]) {
      using conn = await Deno.connect({ hostname: "127.0.0.1", port: server.addr.port });
      if (cut > 0) await conn.write(request.subarray(0, cut));
    }
    assert.equal(server.connections, 0);
    await assertWsRoom(server, log, 2);
    assert.equal(log.count(/^\+ /), 2, "only the two probes ever connected");
  });
  await t.step("server shutdown", async () => {
    const log = createLines();
    const server = startWsServer({ port: 0, mode: "chat", log: log.push });
    const a = await openWs(url(server.addr.port));
    const b = await openWs(url(server.addr.port));
    assert.equal(await within(a.next(), "the join"), "* guest-2 joined");
    await within(server.close(), "close()");
    assert.equal(server.connections, 0);
    assert.equal(log.count(/^- /), 0, "no disconnect lines while the whole server goes away");
    for (const client of [a, b]) {
      assert.equal((await client.closed).code, 1001);
      assert.deepEqual(client.messages, [], "and no '* … left'");
    }
  });
});

// -------------------------- WebSocket: slowloris, silence, abrupt clients

Deno.test("ws chat: slowloris handshakes and silent connections do not stop the server serving others", async () => {
  const log = createLines();
  await using server = startWsServer({ port: 0, mode: "chat", log: log.push });
  const { port } = server.addr;
  const silent = await openMany(50, () => Deno.connect({ hostname: "127.0.0.1", port }));
  const loris = await openMany(50, () => Deno.connect({ hostname: "127.0.0.1", port }));
  // Each sends its request one byte every 10 ms and never finishes it.
  let stop = false;
  const request = encoder.encode(UPGRADE_REQUEST).subarray(0, -2);
  const dripping = loris.map(async (conn) => {
    for (let i = 0; i < request.length && !stop; i++) {
      await conn.write(request.subarray(i, i + 1));
      await pause(10);
    }
  });
  try {
    const url = `ws://127.0.0.1:${port}/`;
    await using a = await openWs(url);
    await using b = await openWs(url);
    assert.equal(await within(a.next(), "the join"), "* guest-2 joined");
    for (let i = 0; i < 20; i++) {
      (i % 2 ? a : b).socket.send(`message ${i}`);
      const expected = `${i % 2 ? "guest-1" : "guest-2"}: message ${i}`;
      assert.equal(await within(a.next(), "a's message"), expected);
      assert.equal(await within(b.next(), "b's message"), expected);
    }
    const page = await within(fetch(`http://127.0.0.1:${port}/`), "GET /");
    assert.equal(page.status, 200);
    await page.body?.cancel();
    assert.equal(server.connections, 2, "handshakes that never finish are not counted");
  } finally {
    stop = true;
    await Promise.allSettled(dripping);
    for (const conn of [...silent, ...loris]) conn.close();
  }
});

// ------------------------------------------- shutdown with 1,000 clients

/** SIGTERM to a TCP server with SHUTDOWN_CLIENTS clients: each gets EOF, none a leave. */
async function shutdownTcpUnderLoad(mode: string): Promise<void> {
  await using server = await spawnServer("tcp_server.ts", ["--mode", mode, "--quiet"]);
  const clients = await openMany(
    SHUTDOWN_CLIENTS,
    () => within(connectTcp(server.port), "a connect"),
  );
  try {
    if (mode === "chat") {
      // Names go in accept order and the first client was among the first
      // accepted: once it hears the last join, everyone is in the room.
      const last = `* guest-${SHUTDOWN_CLIENTS} joined`;
      await within(
        (async () => {
          for (let line = await clients[0].readLine(); line !== last;) {
            assert.notEqual(line, null);
            line = await clients[0].readLine();
          }
        })(),
        "the last join",
      );
    } else {
      await Promise.all(clients.map((client) => client.write("hi\n")));
      const echoes = await within(
        Promise.all(clients.map((client) => client.readLine())),
        "every echo",
      );
      assert.equal(echoes.filter((line) => line !== "hi").length, 0);
    }
    const { code, exitMs } = await server.stop("SIGTERM");
    assert.equal(code, 0);
    assert.ok(exitMs < 3000, `exited ${exitMs.toFixed(0)} ms after SIGTERM`);
    const rest = await within(
      Promise.all(clients.map((client) => client.readLinesToEnd())),
      "every client's EOF",
    );
    const left = rest.filter((lines) => lines.some((line) => / left$/.test(line))).length;
    assert.equal(left, 0, "nobody is told who left while the whole server goes away");
  } finally {
    for (const client of clients) client.close();
  }
}

/** SIGTERM to a WebSocket server with SHUTDOWN_CLIENTS clients: each gets 1001, none a leave. */
async function shutdownWsUnderLoad(mode: string): Promise<void> {
  await using server = await spawnServer("ws_server.ts", ["--mode", mode, "--quiet"]);
  // Bare clients: they read only what this test asks for, which keeps a
  // thousand of them cheap here.
  const clients = await openMany(
    SHUTDOWN_CLIENTS,
    () => within(rawWs(server.port), "an upgrade"),
  );
  try {
    assert.equal(clients.filter(({ status }) => !/ 101 /.test(status)).length, 0);
    if (mode === "chat") {
      // Names go in accept order and the first client was among the first
      // accepted: once it hears the last join, everyone is in the room.
      const last = `* guest-${SHUTDOWN_CLIENTS} joined`;
      await within(
        (async () => {
          for (let frame = await clients[0].readFrame(); frame;) {
            if (decoder.decode(frame.payload) === last) return;
            frame = await clients[0].readFrame();
          }
        })(),
        "the last join",
      );
    } else {
      await Promise.all(clients.map((client) => client.sendText("hi")));
      await within(
        Promise.all(clients.map(async (client) => {
          const frame = await client.readFrame();
          assert.equal(decoder.decode(frame?.payload), "hi");
        })),
        "every echo",
      );
    }
    const { code, exitMs } = await server.stop("SIGTERM");
    assert.equal(code, 0);
    assert.ok(exitMs < 3000, `exited ${exitMs.toFixed(0)} ms after SIGTERM`);
    const ends = await within(
      Promise.all(clients.map((client) => client.readUntilClose())),
      "every close frame",
    );
    const codes = Map.groupBy(ends, ({ code, reason }) => `${code} ${reason}`);
    assert.deepEqual([...codes.keys()], ["1001 server shutting down"]);
    const left = ends.filter(({ texts }) => texts.some((text) => / left$/.test(text))).length;
    assert.equal(left, 0, "nobody is told who left while the whole server goes away");
  } finally {
    for (const client of clients) client.tcp.close();
  }
}

// Both servers at once: each is a process of its own, and a thousand WebSocket
// chat joins keep one core busy for seconds (half a million frames).
for (const mode of ["chat", "echo"]) {
  manyClientsTest(
    `tcp and ws ${mode}: SIGTERM with ${SHUTDOWN_CLIENTS} clients on each closes every one, exits 0 promptly`,
    () => Promise.all([shutdownTcpUnderLoad(mode), shutdownWsUnderLoad(mode)]).then(() => {}),
  );
}

// ---------------------------------------------------------------- soak.ts

Deno.test("soak.ts: a short run loses nothing and exits 0; a bad flag is one line and exit 2", async () => {
  const short = await within(
    runScript("soak.ts", ["--duration", "2", "--clients", "20", "--interval", "0.5"]),
    "a short soak",
    60_000,
  );
  const report = short.stdout;
  assert.equal(short.code, 0, report + short.stderr);
  assert.match(report, /^ {2}lost +0 +0$/m);
  assert.match(report, /^result: PASS$/m);
  const bad = await runScript("soak.ts", ["--duration", "soon"]);
  assert.equal(bad.code, 2);
  const [first, blank, usage] = bad.stderr.split("\n");
  assert.equal(first, 'soak: --duration must be a number from 1 to 3600, got "soon"');
  assert.equal(blank, "");
  assert.match(usage, /^Usage: soak\.ts/);
});

// ------------- TCP: forged lines, stalled readers, open files, log floods

Deno.test("tcp chat: a sender cannot forge lines or send terminal escapes; receivers get control pictures", async () => {
  await using server = startTcpServer({ port: 0, mode: "chat", log: () => {} });
  using sender = await connectTcp(server.addr.port); // guest-1
  using receiver = await connectTcp(server.addr.port); // guest-2
  assert.equal(await within(sender.readLine(), "the join"), "* guest-2 joined");
  await sender.write("innocent\rguest-1: forged\x1b[2K\x07\x00\n");
  const expected = "guest-1: innocent\u240dguest-1: forged\u241b[2K\u2407\u2400";
  for (const client of [sender, receiver]) {
    assert.equal(await within(client.readLine(), "the relayed line"), expected);
  }
});

Deno.test("tcp echo: two clients that send 7 MiB and stop reading are dropped at --idle-timeout; a newcomer is served", async () => {
  const log = createLines();
  await using server = startTcpServer({
    port: 0,
    idleTimeout: 2,
    maxConnections: 2,
    log: log.push,
  });
  const greedy = await Promise.all([0, 1].map(() => connectTcp(server.addr.port)));
  // Each sends far more than the kernel's buffers hold both ways and reads
  // nothing: the server's echo write stalls, and so does this write.
  const payload = new Uint8Array(7 * MiB);
  const writes = greedy.map((client) => client.write(payload).catch(() => {}));
  try {
    await log.waitFor(/^- .*: idle timeout \(stopped reading\)$/, 2, 3 * WAIT_MS);
    const { client: newcomer, accepted } = await probeTcp(server.addr.port);
    newcomer.close();
    assert.ok(accepted, "the newcomer is served once the greedy clients are gone");
  } finally {
    for (const client of greedy) client.close();
  }
  await within(Promise.all(writes), "the greedy writes ending");
});

Deno.test("tcp chat: a client that talks but stopped reading is dropped once its pending write has not moved for --idle-timeout", async () => {
  const log = createLines();
  await using server = startTcpServer({
    port: 0,
    mode: "chat",
    idleTimeout: 2,
    maxQueue: 64 * MiB,
    log: log.push,
  });
  using talker = await connectTcp(server.addr.port); // guest-1: never reads
  // Its own lines come back to it: 12 MiB of them, more than the kernel's
  // buffers hold (and less than --max-queue), so the write to it stalls.
  const line = `${"x".repeat(60 * 1024)}\n`;
  for (let i = 0; i < 200; i++) await talker.write(line);
  // It goes on talking, several times per sweep: silence is not what drops it.
  for (let tick = 0; log.count(/^- /) === 0; tick++) {
    assert.ok(tick < 100, "the client that stopped reading was never dropped");
    await talker.write(`tick ${tick}\n`).catch(() => {});
    await pause(200);
  }
  assert.match(
    log.lines.find((line) => line.startsWith("- "))!,
    /\(guest-1\): idle timeout \(stopped reading\)$/,
  );
});

/**
 * tcp_server.ts as a process, optionally under `ulimit -n` (through sh, since
 * Deno has no setrlimit), with its stderr read line by line as it is written:
 * `log` can be awaited while it runs. `stop` sends SIGTERM and waits for the
 * exit and the rest of the log.
 */
async function spawnLoggingServer(args: string[], options: { fileLimit?: number } = {}) {
  const deno = [Deno.execPath(), "run", "-A", scriptPath("tcp_server.ts"), "--port", "0", ...args];
  const command = options.fileLimit === undefined
    ? new Deno.Command(deno[0], { args: deno.slice(1), stdout: "piped", stderr: "piped" })
    : new Deno.Command("sh", {
      // sh's own `ulimit -n` sets the soft and the hard limit, so Deno
      // cannot raise it again at startup.
      args: ["-c", `ulimit -n ${options.fileLimit} && exec "$@"`, "sh", ...deno],
      stdout: "piped",
      stderr: "piped",
    });
  const child = command.spawn();
  const log = createLines();
  const logged = (async () => {
    let rest = "";
    for await (const text of child.stderr.pipeThrough(new TextDecoderStream())) {
      const lines = (rest + text).split("\n");
      rest = lines.pop()!;
      for (const line of lines) log.push(line);
    }
  })();
  const stdout = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
  let printed = "";
  while (!printed.includes("\n")) {
    const { done, value } = await within(stdout.read(), "the listening line");
    if (done) break;
    printed += value;
  }
  let stopped: Promise<number> | undefined;
  async function stop(signal: Deno.Signal): Promise<number> {
    try {
      child.kill(signal);
    } catch {
      // Already exited.
    }
    const { code } = await child.status;
    await stdout.cancel();
    await logged;
    return code;
  }
  const port = Number(printed.match(/:(\d+)\n/)?.[1]);
  if (!port) {
    await stop("SIGKILL");
    throw new Error(`tcp_server.ts did not start: ${log.lines.join("\n")}`);
  }
  return {
    port,
    log,
    /** SIGTERM, then the exit code once the whole log is in. */
    stop: () => stopped ??= stop("SIGTERM"),
    async [Symbol.asyncDispose]() {
      await (stopped ??= stop("SIGKILL"));
    },
  };
}

/**
 * A test of Linux behaviour: the open-file limit is read from /proc, and a
 * reset before accept() makes Linux's accept fail (getpeername: ENOTCONN).
 * Never skipped on CI.
 */
function linuxTest(name: string, fn: () => Promise<void>): void {
  const skip = Deno.build.os !== "linux" && !ON_CI;
  Deno.test({ name: skip ? `${name} (skipped: Linux only)` : name, ignore: skip, fn });
}

linuxTest(
  "tcp: out of open files, the server warns at start, says what to do, and serves again once files free up",
  async () => {
    // 1,000 places but 256 files: the server runs out long before it is full.
    await using server = await spawnLoggingServer(["--max-connections", "1000"], {
      fileLimit: 256,
    });
    await server.log.waitFor(/^tcp_server: warning/);
    assert.equal(
      server.log.lines[0],
      'tcp_server: warning: the open-file limit (ulimit -n) is 256, too low for --max-connections 1000; raise it with "ulimit -n 1064" before starting, or lower --max-connections',
    );
    // Connections that never send, one at a time, until the server logs an
    // accept failure instead of "+ … connected": one of the two comes for each.
    const held: TcpClient[] = [];
    try {
      while (server.log.count(/^accept failed/) === 0) {
        assert.ok(held.length < 1000, "the server never ran out of files");
        held.push(await within(connectTcp(server.port), "a connect"));
        await server.log.waitFor(/^(\+ |accept failed)/, held.length);
      }
      const served = server.log.count(/^\+ /);
      assert.ok(served > 100 && served < 256, `${served} served before the files ran out`);
      assert.equal(
        server.log.lines.find((line) => line.startsWith("accept failed")),
        'accept failed: too many open files (ulimit -n is 256): raise the limit with "ulimit -n 1064" before starting, or lower --max-connections; new clients wait until connections close',
      );
      // A newcomer waits in the kernel's queue, behind the one that failed.
      using newcomer = await within(connectTcp(server.port), "the newcomer's connect");
      await newcomer.write("still serving?\n");
      for (const client of held.splice(0, 10)) client.close();
      assert.equal(await within(newcomer.readLine(), "the newcomer's echo"), "still serving?");
    } finally {
      for (const client of held) client.close();
    }
    assert.equal(await server.stop(), 0);
    // Accept was retried ten times a second while the files were out: the
    // limiter printed the first failure and, at the exit, at most a summary.
    const failures = server.log.lines.filter((line) => line.startsWith("accept failed"));
    assert.ok(failures.length <= 2, failures.join("\n"));
    for (const summary of failures.slice(1)) {
      assert.match(summary, /connections close \(and \d+ more like it in the last 20 s\)$/);
    }
  },
);

/** Opens `count` connections, each reset (RST, not FIN) the moment it is open. */
async function resetConnections(port: number, count: number): Promise<void> {
  await Promise.all(Array.from({ length: count }, () =>
    new Promise<void>((resolve) => {
      // SO_LINGER 0, which Deno's own API cannot set.
      const socket = net.connect(port, "127.0.0.1", () => socket.resetAndDestroy());
      socket.on("error", () => {});
      socket.on("close", () => resolve());
    })));
}

linuxTest(
  "tcp: a flood of clients resetting before accept gives one log line and one summary, not one each",
  async () => {
    await using server = await spawnLoggingServer([]);
    const start = performance.now();
    let resets = 0;
    // Most resets arrive before the server accepts; go on until one has
    // (bounded), then a thousand more that the limiter must count, not print.
    while (server.log.count(/^accept failed/) === 0) {
      assert.ok(resets < 20_000, "no reset ever made accept() fail");
      await within(resetConnections(server.port, 100), "100 resets");
      resets += 100;
    }
    for (let i = 0; i < 10; i++) await within(resetConnections(server.port, 100), "100 resets");
    resets += 1000;
    assert.equal(await server.stop(), 0);
    const seconds = (performance.now() - start) / 1000;
    const failures = server.log.lines.filter((line) => line.startsWith("accept failed"));
    const first = "accept failed: a client reset its connection before it was accepted";
    const printed = failures.filter((line) => line === first).length;
    const summaries = failures.map((line) =>
      Number(line.match(/^(.*) \(and (\d+) more like it in the last 20 s\)$/)?.[2] ?? NaN)
    ).filter((n) => !Number.isNaN(n));
    assert.equal(printed + summaries.length, failures.length, failures.join("\n"));
    // One first line per 20-s window (the run takes a few seconds).
    assert.ok(printed >= 1 && printed <= 1 + seconds / 20, `${printed} in ${seconds.toFixed(1)} s`);
    assert.ok(summaries.length >= 1, "the flood is summed up at the exit");
    const counted = printed + summaries.reduce((sum, n) => sum + n, 0);
    assert.ok(counted > 1 && counted <= resets, `${counted} failures of ${resets} resets`);
  },
);

Deno.test("tcp: refusals over --max-connections are logged once, then summed up at close", async () => {
  const log = createLines();
  await using server = startTcpServer({ port: 0, maxConnections: 1, log: log.push });
  const { client } = await probeTcp(server.addr.port);
  const crowd = await openMany(50, async () => (await probeTcp(server.addr.port)).client);
  for (const refused of crowd) refused.close();
  assert.equal(log.count(/turned away/), 1, log.lines.join("\n"));
  client.close();
  await within(server.close(), "close()");
  assert.equal(log.count(/turned away/), 2);
  assert.match(
    log.lines.findLast((line) => /turned away/.test(line))!,
    /^! 127\.0\.0\.1:\d+ turned away: server full \(and 49 more like it in the last 20 s\)$/,
  );
});

Deno.test("log limiter: the first line of a kind, then one summary per window; kinds are apart", async () => {
  const printed: string[] = [];
  const limiter = createLogLimiter((line) => printed.push(line));
  for (let i = 0; i < 1000; i++) limiter.log("reset", `reset ${i}`);
  limiter.log("full", "full 0");
  assert.deepEqual(printed, ["reset 0", "full 0"]);
  limiter.close();
  assert.deepEqual(printed, [
    "reset 0",
    "full 0",
    "reset 999 (and 999 more like it in the last 20 s)",
  ]);
  // A window that ends by itself: the summary comes without another line,
  // and the next line of that kind is printed at once.
  const summary = Promise.withResolvers<void>();
  const short: string[] = [];
  const quick = createLogLimiter((line) => {
    short.push(line);
    if (line.includes("more like it")) summary.resolve();
  }, 50);
  try {
    for (let i = 0; i < 3; i++) quick.log("reset", `reset ${i}`);
    await within(summary.promise, "the summary at the end of the window");
    quick.log("reset", "reset 3");
    assert.deepEqual(short, [
      "reset 0",
      "reset 2 (and 2 more like it in the last 0.05 s)",
      "reset 3",
    ]);
  } finally {
    quick.close();
  }
});
