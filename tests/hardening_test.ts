/**
 * hardening_test.ts: both servers against clients that misbehave. Slow
 * readers, silent and dead peers, connection floods, resets, abandoned and
 * slowloris handshakes, bytes that are not UTF-8, forged chat lines, running
 * out of open files, log floods, and SIGTERM with 1,000 clients connected.
 *
 *     deno test -A tests/hardening_test.ts      (also part of plain `deno test -A`)
 *
 * The rules of main_test.ts hold here too: port 0 on 127.0.0.1, every wait is
 * for an event (a line, a frame, a close, a log line, an exit) and is bounded
 * by a timeout, and the sanitizers are on. Where a behaviour is about memory
 * the server runs as a child process and its resident memory is read from
 * /proc/PID/status, with bounds that a correct server meets by a wide margin
 * and an unbounded queue misses by far.
 *
 * The 1,000-client tests need about 2,100 open files in this process (and the
 * server children inherit the limit; Deno raises its soft limit to the hard
 * one as it starts). If that is too low they are skipped with the reason in
 * their name, except under CI=true, where they run and fail.
 */

import assert from "node:assert/strict";
import net from "node:net";
import { createLogLimiter, startTcpServer, type TcpServer } from "../tcp_server.ts";
import { startWsServer, type WsServer } from "../ws_server.ts";
import {
  type AwaitableLog,
  awaitableLog,
  connectTcp,
  joinTcpChat,
  joinWsChat,
  openWs,
  runScript,
  scriptPath,
  spawnServer,
  type TcpClient,
  WAIT_MS,
  within,
  type WsClient,
} from "./helpers.ts";
import { clientFrame, memoryMiB, openFileLimit, UPGRADE_REQUEST } from "../tools/shared.ts";

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
// A thousand joins are half a million "* guest-N joined" deliveries; with
// both CPUs busy elsewhere they have taken more than 10 s.
const JOIN_STORM_MS = 60_000;
// This process holds every client socket; a little more for Deno itself.
const FILES_NEEDED = 2 * SHUTDOWN_CLIENTS + 100;
const FILES_WANTED = 4096;
const ON_CI = Deno.env.get("CI") === "true";
// WebSocket opcodes (RFC 6455, section 5.2).
const OP_TEXT = 0x1;
const OP_BINARY = 0x2;
const OP_CLOSE = 0x8;
const OP_PING = 0x9;

// ------------------------------------------------------------------ helpers

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

/**
 * A bare WebSocket client (rawWs) that has joined a chat: the upgrade
 * succeeded and the first frame was the server's `* you are NAME` notice,
 * read and checked (NAME is `expected`). After that it reads nothing unless
 * asked.
 */
async function joinRawWs(port: number, expected: string): Promise<RawWs> {
  const client = await rawWs(port);
  try {
    assert.match(client.status, / 101 /);
    const notice = await within(client.readFrame(), "the notice on joining");
    assert.equal(notice?.opcode, OP_TEXT);
    assert.equal(decoder.decode(notice.payload), `* you are ${expected}`);
    return client;
  } catch (error) {
    client.tcp.close();
    throw error;
  }
}

function closeFrame(payload: Uint8Array): { code: number; reason: string } {
  if (payload.length < 2) return { code: 1005, reason: "" };
  return {
    code: new DataView(payload.buffer, payload.byteOffset).getUint16(0),
    reason: decoder.decode(payload.subarray(2)),
  };
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

// Why the limit on open files is too low, or undefined when it is enough.
function fileLimitProblem(needed: number, wanted: number): string | undefined {
  if (Deno.build.os !== "linux") return "these tests read /proc, which only Linux has";
  const now = openFileLimit();
  return now >= needed
    ? undefined
    : `open files limit is ${now}, need ${needed}: run \`ulimit -n ${wanted}\` first`;
}

const FILE_LIMIT_PROBLEM = fileLimitProblem(FILES_NEEDED, FILES_WANTED);

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
  let line = await within(client.readLine(), "a probe's first line");
  // A chat server first tells a newcomer its name.
  if (line !== null && /^\* you are guest-\d+$/.test(line)) {
    line = await within(client.readLine(), "a probe's line after its name");
  }
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
async function assertTcpRoom(server: TcpServer, log: AwaitableLog, free: number): Promise<void> {
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
async function assertWsRoom(server: WsServer, log: AwaitableLog, free: number): Promise<void> {
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
  log: AwaitableLog,
  n: number,
  server: { connections: number },
  connections: number,
): Promise<void> {
  await log.waitFor(/^- /, { atLeast: n });
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
  start: (log: AwaitableLog, options: Options) => Server,
  assertRoom: (server: Server, log: AwaitableLog, free: number) => Promise<void>,
) {
  return async function endsWith(
    name: string,
    options: Options,
    end: (port: number) => Promise<void>,
    reason: RegExp,
    clients = 1,
  ): Promise<void> {
    await t.step(name, async () => {
      const log = awaitableLog();
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
    // guest-1 reads its name, then never another byte.
    using _slow = await joinTcpChat(server.port, "guest-1");
    using fast = await joinTcpChat(server.port, "guest-2");
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
  const log = awaitableLog();
  await using server = startTcpServer({
    port: 0,
    mode: "chat",
    maxQueue: 64 * 1024,
    log: log.push,
  });
  using slow = await joinTcpChat(server.addr.port, "guest-1"); // stops reading
  using talker = await joinTcpChat(server.addr.port, "guest-2");
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
  const log = awaitableLog();
  await using server = startTcpServer({ port: 0, mode: "chat", idleTimeout: 0.5, log: log.push });
  const start = performance.now();
  using silent = await joinTcpChat(server.addr.port, "guest-1");
  using talker = await joinTcpChat(server.addr.port, "guest-2");
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
  const log = awaitableLog();
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
    using client = await joinTcpChat(port, "guest-1");
    await client.write("bye\n");
    await client.conn.closeWrite();
    assert.deepEqual(await within(client.readLinesToEnd(), "EOF"), ["guest-1: bye"]);
  }, /closed by peer$/);
  await endsWith("reset", {}, async (port) => {
    const client = await joinTcpChat(port, "guest-1");
    await client.write("one\ntwo\n");
    assert.equal(await within(client.readLine(), "the first line"), "guest-1: one");
    // "guest-1: two" is still unread: closing now sends a reset, not a FIN.
    client.close();
  }, /closed by peer$/);
  await endsWith("idle drop", { idleTimeout: 0.3 }, async (port) => {
    using client = await joinTcpChat(port, "guest-1");
    assert.deepEqual(await within(client.readLinesToEnd(), "the idle drop"), [
      "* error: idle timeout",
    ]);
  }, /idle timeout$/);
  await endsWith("line too long", { maxLine: 100 }, async (port) => {
    using client = await joinTcpChat(port, "guest-1");
    await client.write("z".repeat(200));
    assert.deepEqual(await within(client.readLinesToEnd(), "the refusal"), [
      "* error: line too long (max 100 bytes)",
    ]);
  }, /line too long/);
  await endsWith(
    "slow-consumer drop",
    { maxQueue: 64 * 1024 },
    async (port) => {
      const slow = await joinTcpChat(port, "guest-1"); // then never reads
      using talker = await joinTcpChat(port, "guest-2");
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
    const log = awaitableLog();
    const server = startTcpServer({ port: 0, mode: "chat", log: log.push });
    using a = await joinTcpChat(server.addr.port, "guest-1");
    using b = await joinTcpChat(server.addr.port, "guest-2");
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
  using sender = await joinTcpChat(server.addr.port, "guest-1");
  using receiver = await joinTcpChat(server.addr.port, "guest-2");
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
  using fits = await joinTcpChat(server.addr.port, "guest-1");
  await fits.write("y".repeat(1000) + "\r\n");
  assert.equal(
    await within(fits.readLine(), "a line of max length"),
    `guest-1: ${"y".repeat(1000)}`,
  );
  using endless = await joinTcpChat(server.addr.port, "guest-2");
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
  const log = awaitableLog();
  await using server = startTcpServer({ port: 0, mode: "chat", log: log.push });
  const { port } = server.addr;
  using first = await joinTcpChat(port, "guest-1");
  const silent = await openMany(100, () => connectTcp(port)); // guest-2..101: say nothing
  const rude = await openMany(50, () => connectTcp(port)); // guest-102..151
  const joins = first.readLine.bind(first);
  for (let line = ""; line !== "* guest-151 joined";) {
    line = (await within(joins(), "the joins")) ?? "EOF";
  }
  // Each has unread "joined" lines (all but the last), so closing sends a
  // reset. (Deno reports a reset seen by read() as EOF: "closed by peer".)
  for (const client of rude) client.close();
  await log.waitFor(/^- /, { atLeast: 50 });
  using halfClosed = await joinTcpChat(port, "guest-152");
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
    // guest-1 reads its name, then never another byte.
    using _slow = await joinRawWs(server.port, "guest-1");
    await using fast = await joinWsChat(`ws://127.0.0.1:${server.port}/`, "guest-2");
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
  const log = awaitableLog();
  await using server = startWsServer({
    port: 0,
    mode: "chat",
    maxQueue: 64 * 1024,
    log: log.push,
  });
  const url = `ws://127.0.0.1:${server.addr.port}/`;
  using slow = await joinRawWs(server.addr.port, "guest-1"); // stops reading
  await using talker = await joinWsChat(url, "guest-2");
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
  const log = awaitableLog();
  const idleTimeout = 1;
  await using server = startWsServer({ port: 0, mode: "chat", idleTimeout, log: log.push });
  // guest-1 answers pings; guest-2 never does.
  await using alive = await joinWsChat(`ws://127.0.0.1:${server.addr.port}/`, "guest-1");
  const start = performance.now();
  using dead = await joinRawWs(server.addr.port, "guest-2");
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
  const log = awaitableLog();
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
    const client = await joinRawWs(port, "guest-1");
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
      using slow = await joinRawWs(port, "guest-1"); // then never reads until dropped
      await using talker = await joinWsChat(url(port), "guest-2");
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
    const log = awaitableLog();
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
    const log = awaitableLog();
    const server = startWsServer({ port: 0, mode: "chat", log: log.push });
    const a = await joinWsChat(url(server.addr.port), "guest-1");
    const b = await joinWsChat(url(server.addr.port), "guest-2");
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
  const log = awaitableLog();
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
    await using a = await joinWsChat(url, "guest-1");
    await using b = await joinWsChat(url, "guest-2");
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
        JOIN_STORM_MS,
      );
    } else {
      await Promise.all(clients.map((client) => client.write("hi\n")));
      const echoes = await within(
        Promise.all(clients.map((client) => client.readLine())),
        "every echo",
        JOIN_STORM_MS,
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
        JOIN_STORM_MS,
      );
    } else {
      await Promise.all(clients.map((client) => client.sendText("hi")));
      await within(
        Promise.all(clients.map(async (client) => {
          const frame = await client.readFrame();
          assert.equal(decoder.decode(frame?.payload), "hi");
        })),
        "every echo",
        JOIN_STORM_MS,
      );
    }
    const { code, exitMs } = await server.stop("SIGTERM");
    assert.equal(code, 0);
    assert.ok(exitMs < 3000, `exited ${exitMs.toFixed(0)} ms after SIGTERM`);
    const ends = await within(
      Promise.all(clients.map((client) => client.readUntilClose())),
      "every close frame",
      JOIN_STORM_MS,
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
    runScript("tools/soak.ts", ["--duration", "2", "--clients", "20", "--interval", "0.5"]),
    "a short soak",
    60_000,
  );
  const report = short.stdout;
  assert.equal(short.code, 0, report + short.stderr);
  assert.match(report, /^ {2}lost +0 +0$/m);
  assert.match(report, /^result: PASS$/m);
  const bad = await runScript("tools/soak.ts", ["--duration", "soon"]);
  assert.equal(bad.code, 2);
  const [first, blank, usage] = bad.stderr.split("\n");
  assert.equal(first, 'soak: --duration must be a number from 1 to 3600, got "soon"');
  assert.equal(blank, "");
  assert.match(usage, /^Usage: soak\.ts/);
});

// ------------------------------------------------- where Deno itself gives way

/** A frame with FIN as given and a zero masking key (valid, and the payload goes as it is). */
function fragmentHeader(opcode: number, fin: boolean, length: number): Uint8Array {
  const header = new Uint8Array(14);
  header[0] = (fin ? 0x80 : 0) | opcode;
  header[1] = 0x80 | 127;
  new DataView(header.buffer).setBigUint64(2, BigInt(length));
  return header;
}

Deno.test("ws: a 520 MiB message in 1 MiB fragments cannot end the server; its sender is closed by --idle-timeout, the others carry on", async () => {
  // Long enough that a bystander's pong is never late on a busy machine
  // (pinged at 3 s, dropped at 6 s), short enough to wait for.
  await using server = await spawnServer("ws_server.ts", ["--idle-timeout", "6"]);
  await using bystander = await openWs(`ws://127.0.0.1:${server.port}/`);
  using attacker = await rawWs(server.port);
  assert.match(attacker.status, / 101 /);
  // Every frame is under every limit (1 MiB, the default --max-message); only
  // their sum is not, and V8 cannot make a string that long.
  const fragment = new Uint8Array(MiB).fill(0x61);
  const FRAGMENTS = 520;
  for (let i = 0; i < FRAGMENTS; i++) {
    await attacker.tcp.write(fragmentHeader(i === 0 ? OP_TEXT : 0, i === FRAGMENTS - 1, MiB));
    await attacker.tcp.write(fragment);
  }
  bystander.socket.send("still here");
  assert.equal(await within(bystander.next(), "the bystander's echo"), "still here");
  const ending = await within(attacker.readUntilClose(), "the sender's close frame", 30_000);
  assert.equal(ending.code, 1001);
  bystander.socket.send("and still");
  assert.equal(await within(bystander.next(), "the bystander's second echo"), "and still");
  const exit = await server.stop();
  assert.equal(exit.code, 0, exit.stderr);
  assert.doesNotMatch(exit.stderr, /Uncaught|TypeError/);
  assert.equal(exit.stderr.match(/too big for Deno to assemble/g)?.length, 1, exit.stderr);
});

/** ws_server.ts as a child process whose open-file limit is `files`. */
async function spawnWithFileLimit(files: number, args: string[]) {
  const child = new Deno.Command("sh", {
    args: [
      "-c",
      `ulimit -n ${files} && script="$1" && shift && exec "$0" run -A "$script" --port 0 "$@"`,
      Deno.execPath(),
      scriptPath("ws_server.ts"),
      ...args,
    ],
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const stderr = awaitableLog();
  const stderrDone = (async () => {
    for await (const text of child.stderr.pipeThrough(new TextDecoderStream())) {
      for (const line of text.split("\n")) if (line) stderr.push(line);
    }
  })();
  const stdout = child.stdout.pipeThrough(new TextDecoderStream());
  const reader = stdout.getReader();
  let printed = "";
  while (!printed.includes("\n")) {
    const { done, value } = await reader.read();
    if (done) break;
    printed += value;
  }
  const port = Number(printed.match(/:(\d+)\/\n/)?.[1]);
  return {
    port,
    stderr,
    async stop() {
      try {
        child.kill("SIGTERM");
      } catch {
        // Already exited: its status says how.
      }
      const status = await child.status;
      while (!(await reader.read()).done);
      await stderrDone;
      return status;
    },
  };
}

Deno.test("ws: out of file descriptors the server warns at start, keeps its WebSockets, and serves again once descriptors free up", async () => {
  const server = await spawnWithFileLimit(256, ["--max-connections", "1000"]);
  try {
    await server.stderr.waitFor(/warning: the open-file limit \(ulimit -n\) is 256, too low/);
    await using early = await openWs(`ws://127.0.0.1:${server.port}/`);
    // Connections that never send a byte: each costs the server a descriptor.
    // Some are refused or reset while the server is out of descriptors.
    const idle = await openMany(
      400,
      () => Deno.connect({ hostname: "127.0.0.1", port: server.port }).catch(() => undefined),
    );
    await server.stderr.waitFor(/accept failed: too many open files/);
    early.socket.send("during");
    assert.equal(await within(early.next(), "an echo while out of descriptors"), "during");
    for (const conn of idle) conn?.close();
    const late = await within(openWhenServed(`ws://127.0.0.1:${server.port}/`), "a new WebSocket");
    await using _late = late;
    late.socket.send("after");
    assert.equal(await within(late.next(), "a new client's echo"), "after");
  } finally {
    const status = await server.stop();
    assert.equal(status.code, 0, server.stderr.lines.join("\n"));
    assert.equal(server.stderr.count(/Uncaught/), 0, server.stderr.lines.join("\n"));
  }
});

/** Opens a WebSocket, trying again while the server is still recovering (bounded). */
async function openWhenServed(url: string): Promise<WsClient> {
  const deadline = Date.now() + WAIT_MS;
  for (;;) {
    try {
      return await openWs(url);
    } catch (error) {
      if (Date.now() > deadline) throw error;
    }
  }
}
// --------------------------------------- ws_client against servers that misbehave

// RFC 6455, section 1.3: the server proves it read the key by hashing it with this.
const WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
const NORMAL_CLOSURE = 1000;

/** A frame as a server sends it: never masked; `fin` false leaves the message open. */
function serverFrame(opcode: number, payload: Uint8Array, fin = true): Uint8Array {
  const extra = payload.length < 126 ? 0 : payload.length < 65536 ? 2 : 8;
  const frame = new Uint8Array(2 + extra + payload.length);
  const view = new DataView(frame.buffer);
  frame[0] = (fin ? 0x80 : 0) | opcode;
  if (extra === 0) frame[1] = payload.length;
  else if (extra === 2) (frame[1] = 126, view.setUint16(2, payload.length));
  else (frame[1] = 127, view.setBigUint64(2, BigInt(payload.length)));
  frame.set(payload, 2 + extra);
  return frame;
}

function textFrame(text: string): Uint8Array {
  return serverFrame(OP_TEXT, encoder.encode(text));
}

function closingFrame(code: number, reason = ""): Uint8Array {
  const reasonBytes = encoder.encode(reason);
  const payload = new Uint8Array(2 + reasonBytes.length);
  new DataView(payload.buffer).setUint16(0, code);
  payload.set(reasonBytes, 2);
  return serverFrame(OP_CLOSE, payload);
}

/** The server's side of one fake connection, after the 101. */
interface FakePeer {
  /** Writes all of `bytes`; false once the client is gone. */
  write(bytes: Uint8Array): Promise<boolean>;
  /** The client's next frame, unmasked, or null at EOF. */
  readFrame(): Promise<{ opcode: number; payload: Uint8Array } | null>;
}

/**
 * A WebSocket server on a bare TCP listener, to be whatever server a test
 * needs: it reads the upgrade request, answers 101 (followed by `early`, in
 * the same write), then lets `serve` have the connection. Disposing of it
 * closes the listener and every connection and waits for `serve` to end.
 */
function fakeWsServer(serve: (peer: FakePeer) => Promise<void>, early: Uint8Array[] = []) {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const conns = new Set<Deno.Conn>();
  const served: Promise<void>[] = [];
  async function handle(conn: Deno.Conn) {
    let buffered = new Uint8Array(0);
    async function fill(): Promise<boolean> {
      const chunk = new Uint8Array(64 * 1024);
      const n = await conn.read(chunk).catch(() => null);
      if (n === null) return false;
      const joined = new Uint8Array(buffered.length + n);
      joined.set(buffered);
      joined.set(chunk.subarray(0, n), buffered.length);
      buffered = joined;
      return true;
    }
    async function take(n: number): Promise<Uint8Array | null> {
      while (buffered.length < n) if (!await fill()) return null;
      const head = buffered.slice(0, n);
      buffered = buffered.subarray(n);
      return head;
    }
    async function write(bytes: Uint8Array): Promise<boolean> {
      try {
        for (let done = 0; done < bytes.length;) done += await conn.write(bytes.subarray(done));
        return true;
      } catch {
        return false;
      }
    }
    while (!decoder.decode(buffered).includes("\r\n\r\n")) if (!await fill()) return;
    const request = decoder.decode(buffered);
    buffered = buffered.subarray(request.indexOf("\r\n\r\n") + 4);
    const key = request.match(/^sec-websocket-key: *(\S+)/im)?.[1] ?? "";
    const hash = await crypto.subtle.digest("SHA-1", encoder.encode(key + WS_GUID));
    const accept = btoa(String.fromCharCode(...new Uint8Array(hash)));
    const answer = encoder.encode(
      "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
        `Sec-WebSocket-Accept: ${accept}\r\n\r\n`,
    );
    if (!await write(Uint8Array.from([...answer, ...early.flatMap((frame) => [...frame])]))) return;
    await serve({
      write,
      async readFrame() {
        const head = await take(2);
        if (!head) return null;
        let length = head[1] & 0x7f;
        if (length >= 126) {
          const bytes = await take(length === 126 ? 2 : 8);
          if (!bytes) return null;
          const view = new DataView(bytes.buffer);
          length = length === 126 ? view.getUint16(0) : Number(view.getBigUint64(0));
        }
        const key = head[1] & 0x80 ? await take(4) : new Uint8Array(4);
        const payload = key && await take(length);
        if (!key || !payload) return null;
        for (let i = 0; i < payload.length; i++) payload[i] ^= key[i & 3];
        return { opcode: head[0] & 0x0f, payload };
      },
    });
  }
  const accepting = (async () => {
    for await (const conn of listener) {
      conns.add(conn);
      served.push(
        handle(conn).finally(() => {
          conns.delete(conn);
          conn.close();
        }),
      );
    }
  })();
  return {
    url: `ws://127.0.0.1:${listener.addr.port}/`,
    async [Symbol.asyncDispose]() {
      listener.close();
      await accepting.catch(() => {});
      for (const conn of conns) conn.close();
      await Promise.allSettled(served);
    },
  };
}

/** How a ws_client.ts run ended: its output, how long it took, its peak memory. */
interface ClientRun {
  code: number;
  stdout: string;
  stderr: string;
  ms: number;
  /** The highest resident memory seen (VmHWM), in MiB. */
  peakMiB: number;
  /** Why the test had to kill it, if it did. */
  killed?: string;
}

/**
 * ws_client.ts as a child process. With `stdin: "open"` its stdin is a pipe
 * the test writes to and never closes (a user who has not typed yet). It is
 * killed if it runs past `ms`, or if its memory passes `maxMiB`, and the
 * result says so: an unbounded client must not take the machine down.
 */
function spawnWsClient(
  args: string[],
  stdin?: string | "open",
  limits = { ms: WAIT_MS, maxMiB: 1024 },
) {
  const start = performance.now();
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", scriptPath("ws_client.ts"), ...args],
    stdin: stdin === undefined ? "null" : "piped",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const writer = stdin === undefined ? undefined : child.stdin.getWriter();
  const wrote = stdin === undefined || stdin === "open"
    ? Promise.resolve()
    : writer!.write(encoder.encode(stdin)).then(() => writer!.close());
  const stdout = new Response(child.stdout).text();
  const stderr = new Response(child.stderr).text();
  let killed: string | undefined;
  let peakMiB = 0;
  function kill(why: string) {
    killed ??= why;
    try {
      child.kill("SIGKILL");
    } catch {
      // Already exited.
    }
  }
  const watch = setInterval(() => {
    try {
      peakMiB = Math.max(peakMiB, memoryMiB(child.pid, "VmHWM"));
    } catch {
      return; // Exited between two looks.
    }
    if (peakMiB > limits.maxMiB) kill(`its memory passed ${limits.maxMiB} MiB`);
  }, 20);
  const timer = setTimeout(() => kill(`still running after ${limits.ms} ms`), limits.ms);
  return {
    /** Writes to its stdin (with `stdin: "open"`), leaving it open. */
    write: (text: string) => writer!.write(encoder.encode(text)),
    async result(): Promise<ClientRun> {
      const status = await child.status;
      const ms = performance.now() - start;
      clearInterval(watch);
      clearTimeout(timer);
      await wrote.catch(() => {});
      if (stdin === "open") await writer!.close().catch(() => {});
      return { code: status.code, stdout: await stdout, stderr: await stderr, ms, peakMiB, killed };
    },
  };
}

/** Runs ws_client.ts to its end (see spawnWsClient) and returns how it ended. */
function runWsClientCli(args: string[], stdin?: string, limits?: { ms: number; maxMiB: number }) {
  return spawnWsClient(args, stdin, limits).result();
}

Deno.test("ws_client: a hostile server's text and close reason reach the terminal escaped, one line each", async () => {
  const hostile = "hello\n* guest-1 left\r\x1b[2J\ttab kept \u202e";
  const reason = "bye\n\x1b[31mws_client: forged";
  await using server = fakeWsServer(async (peer) => {
    await peer.readFrame();
    await peer.write(textFrame(hostile));
    await peer.write(serverFrame(OP_BINARY, new Uint8Array(3)));
    await peer.write(closingFrame(NORMAL_CLOSURE, reason));
    while (await peer.readFrame());
  });
  const run = await runWsClientCli(["--url", server.url, "go"]);
  assert.equal(run.killed, undefined);
  assert.equal(
    run.stdout,
    "hello\\n* guest-1 left\\r\\x1b[2J\ttab kept \\u202e\n<binary 3 bytes>\n",
  );
  assert.equal(
    run.stderr,
    `ws_client: ${server.url}: the server closed the connection: ` +
      "code 1000 (bye\\n\\x1b[31mws_client: forged)\n",
  );
  assert.equal(run.code, 0);
});

Deno.test("ws_client: --timeout covers the handshake, against a listener that never answers", async () => {
  using listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const held: Deno.Conn[] = [];
  const accepting = (async () => {
    for await (const conn of listener) held.push(conn);
  })();
  const url = `ws://127.0.0.1:${listener.addr.port}/`;
  const oneShot = await runWsClientCli(["--timeout", "1000", "--url", url, "hi"]);
  const interactive = await runWsClientCli(["--timeout", "1000", "--url", url], "");
  listener.close();
  await accepting.catch(() => {});
  for (const conn of held) conn.close();
  for (const run of [oneShot, interactive]) {
    assert.equal(run.killed, undefined);
    assert.equal(run.stderr, `ws_client: ${url}: timed out waiting for the handshake\n`);
    assert.equal(run.code, 1);
    // The bound is the timeout, plus a process start, on a machine that may be busy.
    assert.ok(run.ms < 1000 + WAIT_MS / 2, `${run.ms} ms`);
  }
});

Deno.test("ws_client: a server that never answers our close frame is left within 2 s, exit 1", async () => {
  const heard: string[] = [];
  await using server = fakeWsServer(async (peer) => {
    for (let frame = await peer.readFrame(); frame; frame = await peer.readFrame()) {
      if (frame.opcode === OP_TEXT) await peer.write(serverFrame(OP_TEXT, frame.payload));
      if (frame.opcode === OP_CLOSE) heard.push(`close ${closeFrame(frame.payload).code}`);
      else heard.push(decoder.decode(frame.payload));
    }
  });
  const run = await runWsClientCli(["--url", server.url, "hi"]);
  assert.equal(run.killed, undefined);
  assert.equal(run.stdout, "hi\n");
  assert.equal(
    run.stderr,
    `ws_client: ${server.url}: the server did not answer our close frame within 2000 ms; gave up\n`,
  );
  assert.equal(run.code, 1);
  assert.deepEqual(heard, ["hi", "close 1000"]);
});

Deno.test("ws_client: a message over --max-message closes the connection (4009) and exits 1", async () => {
  const heard: { code: number; reason: string }[] = [];
  await using server = fakeWsServer(async (peer) => {
    await peer.write(textFrame("x".repeat(100)));
    await peer.write(textFrame("y".repeat(101)));
    for (let frame = await peer.readFrame(); frame; frame = await peer.readFrame()) {
      if (frame.opcode !== OP_CLOSE) continue;
      heard.push(closeFrame(frame.payload));
      await peer.write(serverFrame(OP_CLOSE, frame.payload));
    }
  });
  // Interactive with stdin open: only the message can end this connection.
  const run = await spawnWsClient(["--url", server.url, "--max-message", "100"], "open").result();
  assert.equal(run.killed, undefined);
  assert.equal(run.stdout, "x".repeat(100) + "\n");
  assert.equal(
    run.stderr,
    `ws_client: ${server.url}: the server sent a message of 101 bytes, over --max-message 100; ` +
      "closed the connection (raise --max-message to accept it)\n",
  );
  assert.equal(run.code, 1);
  assert.deepEqual(heard, [{ code: 4009, reason: "message too big (max 100 bytes)" }]);
});

Deno.test("ws_client: a server's endless fragmented message is cut off before the client's memory runs away", async () => {
  const fragment = new Uint8Array(MiB).fill(0x78);
  let sentMiB = 0;
  await using server = fakeWsServer(async (peer) => {
    const more = serverFrame(0x0, fragment, false);
    let ok = await peer.write(serverFrame(OP_TEXT, fragment, false));
    // Until the client is gone (its memory limit or ours kills it).
    for (; ok; sentMiB++) ok = await peer.write(more);
  });
  // --timeout far off, so that only a bound on memory can end this.
  const run = await runWsClientCli(["--url", server.url, "--timeout", "60000", "hi"], undefined, {
    ms: 30_000,
    maxMiB: 1024,
  });
  assert.equal(run.killed, undefined);
  assert.match(
    run.stderr,
    /^ws_client: \S+: the server is sending a message over --max-message 1048576 \(\d+ MiB of memory so far, and it has not ended\); gave up\n$/,
  );
  assert.equal(run.code, 1);
  assert.ok(run.peakMiB < 512, `peak ${run.peakMiB} MiB after ${sentMiB} MiB of fragments`);
});

Deno.test("ws_client interactive: the chat server stopping is reported and exits 1 at once, stdin still open", async () => {
  const server = startWsServer({ port: 0, mode: "chat", log: () => {} });
  const url = `ws://127.0.0.1:${server.addr.port}/`;
  await using watcher = await joinWsChat(url, "guest-1");
  const client = spawnWsClient(["--url", url], "open");
  assert.equal(await within(watcher.next(), "the client joins"), "* guest-2 joined");
  await server.close();
  const run = await client.result();
  assert.equal(run.killed, undefined);
  assert.equal(
    run.stderr,
    `ws_client: ${url}: the server closed the connection: code 1001 (server shutting down)\n`,
  );
  assert.equal(run.code, 1);
});

Deno.test("ws_client interactive: a server's 1000 close is reported and exits 0 at once, stdin still open", async () => {
  await using server = Deno.serve(
    { hostname: "127.0.0.1", port: 0, onListen: () => {} },
    (request) => {
      const { socket, response } = Deno.upgradeWebSocket(request);
      socket.onmessage = () => socket.close(NORMAL_CLOSURE, "bye");
      return response;
    },
  );
  const url = `ws://127.0.0.1:${server.addr.port}/`;
  const client = spawnWsClient(["--url", url], "open");
  await client.write("please close\n");
  const run = await client.result();
  assert.equal(run.killed, undefined);
  assert.equal(
    run.stderr,
    `ws_client: ${url}: the server closed the connection: code 1000 (bye)\n`,
  );
  assert.equal(run.code, 0);
});

Deno.test("ws_client with piped input: the server's 1009 is not lost, exit 1", async () => {
  await using server = startWsServer({ port: 0, maxMessage: 10, log: () => {} });
  const url = `ws://127.0.0.1:${server.addr.port}/`;
  const run = await runWsClientCli(["--url", url], "x".repeat(100) + "\n");
  assert.equal(run.killed, undefined);
  assert.equal(
    run.stderr,
    `ws_client: ${url}: the server closed the connection: code 1009 (message too big (max 10 bytes))\n`,
  );
  assert.equal(run.code, 1);
});

Deno.test("ws_client one-shot: chat lines that come with the 101 are not taken for replies", async () => {
  const heard: string[] = [];
  const early = [textFrame("guest-1: hello, who's there?"), textFrame("* guest-3 joined")];
  await using server = fakeWsServer(async (peer) => {
    for (let frame = await peer.readFrame(); frame; frame = await peer.readFrame()) {
      if (frame.opcode === OP_CLOSE) {
        heard.push(`close ${closeFrame(frame.payload).code}`);
        await peer.write(serverFrame(OP_CLOSE, frame.payload));
        continue;
      }
      const text = decoder.decode(frame.payload);
      heard.push(text);
      // Somebody else talks first, then our line comes back under our name.
      await peer.write(textFrame(`guest-1: ${text}`));
      await peer.write(textFrame(`guest-2: ${text}`));
    }
  }, early);
  const run = await runWsClientCli(["--url", server.url, "a", "b"]);
  assert.equal(run.killed, undefined);
  assert.equal(run.code, 0, run.stderr);
  assert.deepEqual(heard, ["a", "b", "close 1000"]);
  assert.equal(
    run.stdout,
    "guest-1: hello, who's there?\n* guest-3 joined\n" +
      "guest-1: a\nguest-2: a\nguest-1: b\nguest-2: b\n",
  );
});

Deno.test("ws_client one-shot in a busy ws_server chat: waits for its own lines under its own name", async () => {
  await using server = await spawnServer("ws_server.ts", ["--mode", "chat", "--quiet"]);
  const url = `ws://127.0.0.1:${server.port}/`;
  await using chatty = await joinWsChat(url, "guest-1");
  // The chatty client talks all the while, from before ws_client joins until
  // it has gone, 8 lines in flight, some of them the same text as its own.
  let said = 0;
  const talk = () => chatty.socket.send(said++ % 2 ? `chatter ${said}` : "one");
  for (let i = 0; i < 8; i++) talk();
  assert.equal(await within(chatty.next(), "the chat begins"), "guest-1: one");
  talk();
  let clientGone = false;
  const run = spawnWsClient(["--url", url, "one", "two", "three"]).result().finally(() => {
    clientGone = true;
  });
  while (!clientGone) {
    const line = await within(chatty.next(), "the chat goes on");
    if (typeof line === "string" && line.startsWith("guest-1: ")) talk();
  }
  const { killed, code, stdout, stderr } = await run;
  const lines = stdout.trimEnd().split("\n");
  const story = `${stderr}after ${said} chatty lines it printed ${lines.length}: ` +
    lines.slice(0, 10).join(" | ");
  assert.equal(killed, undefined, story);
  assert.equal(code, 0, story);
  // It prints what the server sends, the notice with its name first.
  assert.equal(lines.shift(), "* you are guest-2", story);
  const own = lines.filter((line) => line.startsWith("guest-2: "));
  assert.deepEqual(own, ["guest-2: one", "guest-2: two", "guest-2: three"], story);
  assert.ok(lines.every((line) => /^guest-[12]: (one|two|three|chatter \d+)$/.test(line)), story);
  assert.ok(lines.length > own.length, `the chatty client's lines are printed too: ${story}`);
});

Deno.test("ws_client interactive: a connection lost without a close frame is reported and exits 1 at once", async () => {
  await using server = fakeWsServer(async (peer) => {
    // Hang up (the fake closes the TCP connection) after the first message.
    await peer.readFrame();
  });
  const client = spawnWsClient(["--url", server.url], "open");
  await client.write("anyone?\n");
  const run = await client.result();
  assert.equal(run.killed, undefined);
  assert.match(
    run.stderr,
    /^ws_client: \S+: connection lost: it closed without a close frame .*\n$/,
  );
  assert.equal(run.code, 1);
});

Deno.test("ws_client one-shot: a chat server's '* you are NAME' tells it whose lines are its own", async () => {
  const OP_PONG = 0xa;
  const heard: string[] = [];
  await using server = fakeWsServer(async (peer) => {
    for (let frame = await peer.readFrame(); frame; frame = await peer.readFrame()) {
      if (frame.opcode === OP_TEXT) {
        const text = decoder.decode(frame.payload);
        heard.push(text);
        // A newcomer says the very same thing first; our own copy follows
        // only after a ping's round trip, so a client that took the
        // newcomer's line for its own has closed by then.
        await peer.write(textFrame(`guest-9: ${text}`));
        await peer.write(serverFrame(OP_PING, new Uint8Array(0)));
      } else if (frame.opcode === OP_PONG) {
        heard.push("pong");
        await peer.write(textFrame(`guest-2: ${heard[0]}`));
      } else if (frame.opcode === OP_CLOSE) {
        heard.push(`close ${closeFrame(frame.payload).code}`);
        await peer.write(serverFrame(OP_CLOSE, frame.payload));
      }
    }
  }, [textFrame("* you are guest-2")]);
  const run = await runWsClientCli(["--url", server.url, "hello"]);
  assert.equal(run.killed, undefined);
  assert.equal(run.code, 0, run.stderr);
  assert.deepEqual(heard, ["hello", "pong", "close 1000"]);
  assert.equal(run.stdout, "* you are guest-2\nguest-9: hello\nguest-2: hello\n");
});
// ------------------------------------------ WebSocket: what the handshake checks

/**
 * An upgrade request by hand: the headers a browser sends, each of which a
 * test may replace (a value) or leave out (undefined).
 */
function upgradeRequest(
  headers: Record<string, string | undefined> = {},
  { method = "GET", path = "/" } = {},
): string {
  const all: Record<string, string | undefined> = {
    Host: "127.0.0.1",
    Upgrade: "websocket",
    Connection: "Upgrade",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
    "Sec-WebSocket-Version": "13",
    ...headers,
  };
  const lines = Object.entries(all).filter(([, value]) => value !== undefined)
    .map(([name, value]) => `${name}: ${value}\r\n`);
  return `${method} ${path} HTTP/1.1\r\n${lines.join("")}\r\n`;
}

/**
 * One request on a fresh connection, as raw bytes: the status, the headers
 * (lower-case names) and the body (none for a 101). The connection is closed.
 */
async function exchange(port: number, request: string) {
  using tcp = await connectTcp(port);
  return await within(
    (async () => {
      await tcp.write(request);
      const status = Number((await tcp.readLine())?.split(" ")[1]);
      const headers = new Map<string, string>();
      for (let line = await tcp.readLine(); line && line !== "\r"; line = await tcp.readLine()) {
        const colon = line.indexOf(":");
        headers.set(line.slice(0, colon).toLowerCase(), line.slice(colon + 1).trim());
      }
      const length = status === 101 ? 0 : Number(headers.get("content-length") ?? 0);
      return { status, headers, body: decoder.decode(await tcp.readBytes(length)) };
    })(),
    `an answer to ${JSON.stringify(request.split("\r\n")[0])}`,
  );
}

const BAD_HOSTS = ["a b", "<script>", "[::1", "x@y", "x/y", "x:99999"];

Deno.test("ws server: a bad Host header is a 400 with a one-line reason and one log line, no stack trace", async () => {
  for (const quiet of [false, true]) {
    await using server = await spawnServer("ws_server.ts", quiet ? ["--quiet"] : []);
    for (const host of BAD_HOSTS) {
      for (
        const request of [
          `GET /x HTTP/1.1\r\nHost: ${host}\r\n\r\n`,
          upgradeRequest({ Host: host }),
        ]
      ) {
        const answer = await exchange(server.port, request);
        assert.equal(answer.status, 400, `Host: ${host}`);
        assert.equal(answer.headers.get("x-content-type-options"), "nosniff");
        assert.match(answer.body, /^bad request: the Host header must be a host name .*\n$/);
        assert.equal(answer.body.split("\n").length, 2, "one line");
      }
    }
    // An absolute URL in the request line stands for the Host header.
    const target = await exchange(server.port, "GET http://[::1/ HTTP/1.1\r\nHost: x\r\n\r\n");
    assert.equal(target.status, 400);
    assert.equal(target.body, `bad request: the request's URL is not a URL: "http://[::1/"\n`);
    // The text answers that were fine before say nosniff too.
    const missing = await exchange(server.port, "GET /nope HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
    assert.equal(missing.status, 404);
    assert.equal(missing.headers.get("x-content-type-options"), "nosniff");
    const { code, stderr } = await server.stop();
    assert.equal(code, 0);
    if (quiet) {
      assert.equal(stderr, "");
      continue;
    }
    const lines = stderr.trimEnd().split("\n");
    assert.equal(lines.shift(), `browser client: http://127.0.0.1:${server.port}/`);
    for (const line of lines) {
      assert.match(
        line,
        /^! 127\.0\.0\.1:\d+ refused with 400: bad request: the (Host|request's URL) /,
      );
    }
    // Each bad Host was sent twice: logged once, and the repeat summed up
    // at exit by the log limiter.
    const repeats = lines.filter((line) => / \(and 1 more like it in the last 20 s\)$/.test(line));
    assert.equal(lines.length - repeats.length, BAD_HOSTS.length + 1, stderr);
    assert.equal(repeats.length, BAD_HOSTS.length, stderr);
  }
});

Deno.test("ws server: the handshake is checked before upgrading: method, key, version", async () => {
  const log = awaitableLog();
  await using server = startWsServer({ port: 0, log: log.push });
  const { port } = server.addr;
  const cases: [string, number, RegExp][] = [
    [upgradeRequest({}, { method: "POST" }), 400, /the method must be GET, got POST$/],
    [upgradeRequest({}, { method: "PUT" }), 400, /the method must be GET, got PUT$/],
    [
      upgradeRequest({ "Sec-WebSocket-Key": undefined }),
      400,
      /Sec-WebSocket-Key header is missing/,
    ],
    [
      upgradeRequest({ "Sec-WebSocket-Key": "abc" }),
      400,
      /Sec-WebSocket-Key header must be 16 bytes/,
    ],
    // Base64, but of 15 and of 17 bytes.
    [upgradeRequest({ "Sec-WebSocket-Key": btoa("x".repeat(15)) }), 400, /must be 16 bytes/],
    [upgradeRequest({ "Sec-WebSocket-Key": btoa("x".repeat(17)) }), 400, /must be 16 bytes/],
    [upgradeRequest({ "Sec-WebSocket-Version": undefined }), 426, /Version header is missing$/],
    [upgradeRequest({ "Sec-WebSocket-Version": "8" }), 426, /speaks WebSocket version 13, not 8$/],
    [upgradeRequest({ "Sec-WebSocket-Version": "13, 8" }), 426, /not 13, 8$/],
  ];
  const reasons = new Set<string>();
  for (const [request, status, reason] of cases) {
    const answer = await exchange(port, request);
    reasons.add(answer.body);
    const what = request.split("\r\n").filter((line) => /^(GET|POST|PUT|Sec)/.test(line)).join(" ");
    assert.equal(answer.status, status, what);
    assert.match(answer.body, /^bad WebSocket handshake: [^\n]+\n$/, what);
    assert.match(answer.body.trimEnd(), reason, what);
    assert.equal(answer.headers.get("x-content-type-options"), "nosniff");
    if (status === 426) assert.equal(answer.headers.get("sec-websocket-version"), "13", what);
  }
  // A refusal repeated word for word (three keys of the wrong size) is
  // logged once: the log limiter. Every different one is logged.
  assert.ok(reasons.size < cases.length);
  assert.equal(
    log.count(/^! 127\.0\.0\.1:\d+ refused with (400|426): bad WebSocket handshake: /),
    reasons.size,
  );
  assert.equal(log.count(/^\+ /), 0, "none of them became a WebSocket");
  assert.equal(server.connections, 0);
  // RFC 6455's own example key, with everything right, still upgrades.
  const good = await exchange(
    port,
    upgradeRequest({ "Sec-WebSocket-Key": btoa("0123456789abcdef") }),
  );
  assert.equal(good.status, 101);
});

Deno.test("ws server: subprotocols: the client's first offer by default, or the first in --protocol", async () => {
  const log = awaitableLog();
  {
    await using server = startWsServer({ port: 0, log: log.push });
    const { port } = server.addr;
    const offers: [string | undefined, string | undefined][] = [
      ["graphql-ws, chat", "graphql-ws"],
      // Node's ws separates with a bare comma; Deno's own option would throw.
      ["a,b", "a"],
      // Empty list elements are ignored (RFC 9110, section 5.6.1).
      [" , x", "x"],
      ["", undefined],
      [undefined, undefined],
    ];
    for (const [offer, chosen] of offers) {
      const answer = await exchange(port, upgradeRequest({ "Sec-WebSocket-Protocol": offer }));
      assert.equal(answer.status, 101, `offering ${offer}`);
      assert.equal(answer.headers.get("sec-websocket-protocol"), chosen, `offering ${offer}`);
    }
    const malformed = await exchange(port, upgradeRequest({ "Sec-WebSocket-Protocol": "a b" }));
    assert.equal(malformed.status, 400);
    assert.match(malformed.body, /Sec-WebSocket-Protocol must be a comma-separated list of names/);
    // Deno's own client, which checks the answer as a browser does.
    await using ws = await openWsWith(`ws://127.0.0.1:${port}/`, ["graphql-ws"]);
    assert.equal(ws.socket.protocol, "graphql-ws");
    ws.socket.send("hi");
    assert.equal(await ws.next(), "hi");
    await log.waitFor(/^\+ 127\.0\.0\.1:\d+ connected, protocol graphql-ws$/);
  }
  await using server = startWsServer({ port: 0, protocols: ["chat", "superchat"], log: log.push });
  const { port } = server.addr;
  for (const [offer, chosen] of [["x, superchat, chat", "superchat"], [undefined, undefined]]) {
    const answer = await exchange(port, upgradeRequest({ "Sec-WebSocket-Protocol": offer }));
    assert.equal(answer.status, 101, `offering ${offer}`);
    assert.equal(answer.headers.get("sec-websocket-protocol"), chosen, `offering ${offer}`);
  }
  const other = await exchange(port, upgradeRequest({ "Sec-WebSocket-Protocol": "x, y" }));
  assert.equal(other.status, 400);
  assert.equal(
    other.body,
    "no common subprotocol: the client offered x, y; this server speaks chat, superchat\n",
  );
});

/** `openWs` offering subprotocols: a connection that fails to open rejects. */
async function openWsWith(url: string, protocols: string[]) {
  const socket = new WebSocket(url, protocols);
  const opened = await within(
    new Promise<boolean>((resolve) => {
      socket.onopen = () => resolve(true);
      socket.onclose = () => resolve(false);
    }),
    `open ${url}`,
  );
  if (!opened) throw new Error(`could not open ${url} with ${protocols}`);
  const messages: unknown[] = [];
  const closed = new Promise<CloseEvent>((resolve) => socket.onclose = resolve);
  let wake = () => {};
  socket.onmessage = (event) => {
    messages.push(event.data);
    wake();
  };
  return {
    socket,
    async next() {
      while (messages.length === 0) await new Promise<void>((resolve) => wake = resolve);
      return messages.shift();
    },
    async [Symbol.asyncDispose]() {
      if (socket.readyState === WebSocket.OPEN) socket.close();
      await closed;
    },
  };
}

Deno.test("ws chat: a refused handshake is never announced and takes no guest name", async () => {
  const log = awaitableLog();
  await using server = startWsServer({ port: 0, mode: "chat", protocols: ["chat"], log: log.push });
  const { port } = server.addr;
  const url = `ws://127.0.0.1:${port}/`;
  await using member = await joinWsChat(url, "guest-1");
  const refused = [
    upgradeRequest({ "Sec-WebSocket-Protocol": "graphql-ws" }),
    upgradeRequest({ Origin: "http://evil.example" }),
    upgradeRequest({ "Sec-WebSocket-Version": "8" }),
  ];
  for (const request of refused) assert.notEqual((await exchange(port, request)).status, 101);
  member.socket.send("anyone?");
  assert.equal(await member.next(), "guest-1: anyone?", "no join or leave came first");
  await using next = await joinWsChat(url, "guest-2");
  assert.equal(await member.next(), "* guest-2 joined");
  next.socket.send("me");
  assert.equal(await next.next(), "guest-2: me");
  assert.equal(log.count(/^! /), refused.length);
});

Deno.test("ws server: Origin: its own pages, localhost and no Origin are accepted, other pages 403", async () => {
  const log = awaitableLog();
  {
    await using server = startWsServer({ port: 0, log: log.push });
    const { port } = server.addr;
    const accepted: Record<string, string | undefined>[] = [
      {},
      { Origin: `http://127.0.0.1:${port}` },
      { Origin: "http://localhost:3000" },
      { Origin: "https://localhost" },
      { Origin: "http://[::1]:5173" },
      { Origin: "http://127.0.0.1:1" },
      // The server's own pages, under whatever name the browser used for it.
      { Host: "chat.example:8080", Origin: "http://chat.example:8080" },
      { Host: "chat.example", Origin: "https://chat.example" },
      { Host: "Chat.Example:80", Origin: "http://chat.example" },
    ];
    for (const headers of accepted) {
      const answer = await exchange(port, upgradeRequest(headers));
      assert.equal(answer.status, 101, JSON.stringify(headers));
    }
    const refused: Record<string, string>[] = [
      { Origin: "http://evil.example" },
      { Origin: "http://127.0.0.2:8080" },
      { Origin: "http://localhost.evil.example" },
      { Origin: "null" },
      { Origin: "file://" },
      { Origin: "not an origin" },
      { Host: "chat.example:8080", Origin: "http://chat.example:8081" },
      { Host: "chat.example", Origin: "http://evil.chat.example" },
      // Sent as UTF-8, read by Deno as Latin-1: C1 controls, which must not reach the log.
      { Origin: "http://evil.example\x85\x9b2J" },
    ];
    for (const headers of refused) {
      const answer = await exchange(port, upgradeRequest(headers));
      assert.equal(answer.status, 403, JSON.stringify(headers));
      assert.match(
        answer.body,
        /^origin "[^"\n]+" is not allowed: .* --allow-origin ORIGIN to accept one\)\n$/,
      );
      assert.equal(answer.headers.get("x-content-type-options"), "nosniff");
    }
    assert.equal(log.count(/^! 127\.0\.0\.1:\d+ refused with 403: origin /), refused.length);
    assert.ok(log.lines.some((line) => /evil\.example.\\x85.\\x9b2J/.test(line)), "escaped");
    assert.ok(log.lines.every((line) => !/\p{Cc}/u.test(line)), "no raw controls");
  }
  {
    await using server = startWsServer({
      port: 0,
      allowOrigins: ["http://127.0.0.2:8080/"],
      log: log.push,
    });
    const { port } = server.addr;
    const allowed = await exchange(port, upgradeRequest({ Origin: "http://127.0.0.2:8080" }));
    assert.equal(allowed.status, 101);
    const other = await exchange(port, upgradeRequest({ Origin: "http://127.0.0.2:8081" }));
    assert.equal(other.status, 403);
  }
  await using server = startWsServer({ port: 0, allowOrigins: ["*"], log: log.push });
  for (const origin of ["http://evil.example", "null"]) {
    const answer = await exchange(server.addr.port, upgradeRequest({ Origin: origin }));
    assert.equal(answer.status, 101, origin);
  }
});

Deno.test("ws chat: control characters are relayed as visible pictures, echo stays exact, close reasons are escaped in the log", async () => {
  const hostile = "hi\n* guest-1 left\r\x1b[2J\x07\x00\x7f\x9b\ttab";
  const log = awaitableLog();
  {
    await using server = startWsServer({ port: 0, mode: "chat", log: log.push });
    const url = `ws://127.0.0.1:${server.addr.port}/`;
    await using reader = await joinWsChat(url, "guest-1");
    await using sender = await joinWsChat(url, "guest-2");
    assert.equal(await reader.next(), "* guest-2 joined");
    sender.socket.send(hostile);
    const shown = "guest-2: hi\u240a* guest-1 left\u240d\u241b[2J\u2407\u2400\u2421\ufffd\ttab";
    assert.equal(await reader.next(), shown);
    assert.equal(await sender.next(), shown);
    sender.socket.close(4000, "bye\n+ 10.0.0.1:1 connected as guest-9\x1b[31m");
    assert.equal(await reader.next(), "* guest-2 left");
    await log.waitFor(/^- .*\(guest-2\)/);
    const line = log.lines.find((line) => line.includes("(guest-2)"))!;
    assert.ok(
      line.endsWith("code 4000 bye\\n+ 10.0.0.1:1 connected as guest-9\\x1b[31m"),
      line,
    );
  }
  await using server = startWsServer({ port: 0, log: log.push });
  await using echo = await openWs(`ws://127.0.0.1:${server.addr.port}/`);
  echo.socket.send(hostile);
  assert.equal(await echo.next(), hostile, "echo is byte-exact");
});
// ------------- TCP: forged lines, stalled readers, open files, log floods

Deno.test("tcp chat: a sender cannot forge lines or send terminal escapes; receivers get control pictures", async () => {
  await using server = startTcpServer({ port: 0, mode: "chat", log: () => {} });
  using sender = await joinTcpChat(server.addr.port, "guest-1");
  using receiver = await joinTcpChat(server.addr.port, "guest-2");
  assert.equal(await within(sender.readLine(), "the join"), "* guest-2 joined");
  await sender.write("innocent\rguest-1: forged\x1b[2K\x07\x00\n");
  const expected = "guest-1: innocent\u240dguest-1: forged\u241b[2K\u2407\u2400";
  for (const client of [sender, receiver]) {
    assert.equal(await within(client.readLine(), "the relayed line"), expected);
  }
});

Deno.test("tcp echo: two clients that send 7 MiB and stop reading are dropped at --idle-timeout; a newcomer is served", async () => {
  const log = awaitableLog();
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
    await log.waitFor(/^- .*: idle timeout \(stopped reading\)$/, { atLeast: 2, ms: 3 * WAIT_MS });
    const { client: newcomer, accepted } = await probeTcp(server.addr.port);
    newcomer.close();
    assert.ok(accepted, "the newcomer is served once the greedy clients are gone");
  } finally {
    for (const client of greedy) client.close();
  }
  await within(Promise.all(writes), "the greedy writes ending");
});

Deno.test("tcp chat: a client that talks but stopped reading is dropped once its pending write has not moved for --idle-timeout", async () => {
  const log = awaitableLog();
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
  const log = awaitableLog();
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
        await server.log.waitFor(/^(\+ |accept failed)/, { atLeast: held.length });
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
  const log = awaitableLog();
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
