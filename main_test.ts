/**
 * main_test.ts: the tests for all four scripts, in-process through their
 * exported functions and as real processes through their command lines.
 *
 *     deno test -A
 *
 * Every server binds port 0 and reports the real port. Nothing sleeps to
 * wait for something to happen: each test awaits the event itself (a line,
 * a message, a close, an exit). Deno's op and resource sanitizers are on
 * (deno.json), so a test that leaks a socket, a timer or a process fails.
 */

import assert from "node:assert/strict";
import { createLineFramer, startTcpServer } from "./tcp_server.ts";
import { runTcpClient } from "./tcp_client.ts";
import { startWsServer } from "./ws_server.ts";
import { runWsClient } from "./ws_client.ts";
import {
  createFrameDecoder,
  EVENT_FIELDS,
  type Frame,
  startWire,
  websocketAccept,
  type WireEvent,
} from "./wire.ts";
import {
  allBytes,
  connectTcp,
  openWs,
  randomBytes,
  runScript,
  scriptPath,
  spawnServer,
  within,
} from "./test_helpers.ts";

const encoder = new TextEncoder();
const decoder = new TextDecoder();
const quiet = () => {};

// ------------------------------------------------------------------ helpers

/** A port nothing listens on (bound, read, released). */
function closedPort(): number {
  using listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  return listener.addr.port;
}

function concat(chunks: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(chunks.reduce((sum, chunk) => sum + chunk.length, 0));
  let offset = 0;
  for (const chunk of chunks) {
    out.set(chunk, offset);
    offset += chunk.length;
  }
  return out;
}

function assertNoStackTrace(stderr: string) {
  assert.doesNotMatch(stderr, /^\s+at /m, `stack trace in stderr:\n${stderr}`);
  assert.doesNotMatch(stderr, /Uncaught|error: Uncaught/);
}

// --------------------------------------------------------------- TCP: echo

Deno.test("tcp echo: text, every byte value, and binary come back unchanged", async () => {
  await using server = startTcpServer({ port: 0, log: quiet });
  using client = await connectTcp(server.addr.port);
  await client.write("hello\n");
  assert.equal(await client.readLine(), "hello");
  await client.write(allBytes());
  assert.deepEqual(await client.readBytes(256), allBytes());
});

Deno.test("tcp echo: 1 MiB sent while reading comes back intact, then half-close ends it", async () => {
  await using server = startTcpServer({ port: 0, log: quiet });
  using client = await connectTcp(server.addr.port);
  const payload = randomBytes(1024 * 1024);
  // The server applies backpressure, so we must read while we write.
  const sending = client.write(payload).then(() => client.conn.closeWrite());
  const echoed = await client.readToEnd();
  await sending;
  assert.equal(echoed.length, payload.length);
  assert.deepEqual(echoed, payload);
});

Deno.test("tcp echo: a client that resets mid-transfer does not disturb the next one", async () => {
  await using server = startTcpServer({ port: 0, log: quiet });
  {
    using rude = await connectTcp(server.addr.port);
    // Send a lot and hang up without reading the echo: the server's writes fail.
    await rude.write(randomBytes(256 * 1024)).catch(() => {});
  }
  using polite = await connectTcp(server.addr.port);
  await polite.write("still there?\n");
  assert.equal(await polite.readLine(), "still there?");
});

// --------------------------------------------------------------- TCP: chat

Deno.test("tcp chat: three clients, everyone gets every line, joins and leaves announced", async () => {
  await using server = startTcpServer({ port: 0, mode: "chat", log: quiet });
  using a = await connectTcp(server.addr.port);
  using b = await connectTcp(server.addr.port);
  assert.equal(await a.readLine(), "* guest-2 joined");
  const c = await connectTcp(server.addr.port);
  assert.equal(await a.readLine(), "* guest-3 joined");
  assert.equal(await b.readLine(), "* guest-3 joined");

  await a.write("hello everyone\r\n");
  for (const peer of [a, b, c]) assert.equal(await peer.readLine(), "guest-1: hello everyone");

  // Many messages in one write: framed into three lines.
  await b.write("one\ntwo\nthree\n");
  for (const peer of [a, b, c]) {
    assert.deepEqual(
      [await peer.readLine(), await peer.readLine(), await peer.readLine()],
      ["guest-2: one", "guest-2: two", "guest-2: three"],
    );
  }

  // One message in many writes, a byte at a time.
  c.conn.setNoDelay(true);
  for (const byte of encoder.encode("split ✓\n")) await c.write(Uint8Array.of(byte));
  for (const peer of [a, b, c]) assert.equal(await peer.readLine(), "guest-3: split ✓");

  c[Symbol.dispose]();
  assert.equal(await a.readLine(), "* guest-3 left");
  assert.equal(await b.readLine(), "* guest-3 left");
});

Deno.test("tcp chat: line framing across arbitrary chunk boundaries", () => {
  const text = "alpha\nbeta\r\n\ngamma ünïcödé\ndelta";
  const bytes = encoder.encode(text);
  for (let size = 1; size <= bytes.length; size++) {
    const lines: string[] = [];
    const push = createLineFramer(64);
    for (let i = 0; i < bytes.length; i += size) {
      assert.ok(push(bytes.subarray(i, i + size), (line) => lines.push(decoder.decode(line))));
    }
    push(null, (line) => lines.push(decoder.decode(line)));
    assert.deepEqual(lines, ["alpha", "beta", "", "gamma ünïcödé", "delta"], `chunk size ${size}`);
  }
});

Deno.test("tcp chat: the line limit holds whether or not the newline ever comes", () => {
  const ignore = () => {};
  assert.ok(createLineFramer(4)(encoder.encode("abcd\r\n"), ignore));
  assert.equal(createLineFramer(4)(encoder.encode("abcde\n"), ignore), false);
  const push = createLineFramer(4);
  assert.ok(push(encoder.encode("abc"), ignore));
  assert.equal(push(encoder.encode("def"), ignore), false, "no newline yet, already too long");
});

Deno.test("tcp chat: a line too long closes only its sender, with a reason", async () => {
  await using server = startTcpServer({ port: 0, mode: "chat", maxLine: 16, log: quiet });
  using talker = await connectTcp(server.addr.port);
  using listener = await connectTcp(server.addr.port);
  assert.equal(await talker.readLine(), "* guest-2 joined");
  await talker.write("x".repeat(40) + "\n");
  assert.equal(await talker.readLine(), "* error: line too long (max 16 bytes)");
  assert.equal(await talker.readLine(), null, "then the server closes");
  assert.equal(await listener.readLine(), "* guest-1 left");
  await listener.write("still here\n");
  assert.equal(await listener.readLine(), "guest-2: still here");
});

Deno.test("tcp chat: a last line without a newline is delivered at EOF", async () => {
  await using server = startTcpServer({ port: 0, mode: "chat", log: quiet });
  using client = await connectTcp(server.addr.port);
  await client.write("no newline");
  await client.conn.closeWrite();
  assert.equal(await client.readLine(), "guest-1: no newline");
  assert.equal(await client.readLine(), null);
});

Deno.test("tcp chat: bytes that are not UTF-8 arrive as U+FFFD", async () => {
  await using server = startTcpServer({ port: 0, mode: "chat", log: quiet });
  using client = await connectTcp(server.addr.port);
  await client.write(Uint8Array.of(0x68, 0xff, 0x69, 0x0a));
  assert.equal(await client.readLine(), "guest-1: h\uFFFDi");
});

// ---------------------------------------------------------- TCP: the client

Deno.test("tcp client: sends its input, half-closes, and returns everything until the server closes", async () => {
  await using server = startTcpServer({ port: 0, log: quiet });
  const received: Uint8Array[] = [];
  await runTcpClient({
    port: server.addr.port,
    input: ReadableStream.from([encoder.encode("hello\n"), allBytes()]),
    output: (bytes) => void received.push(bytes.slice()),
  });
  assert.deepEqual(concat(received), new Uint8Array([...encoder.encode("hello\n"), ...allBytes()]));
});

Deno.test("tcp client: connection refused is an error of its own kind", async () => {
  await assert.rejects(
    runTcpClient({ port: closedPort(), input: ReadableStream.from([]), output: () => {} }),
    Deno.errors.ConnectionRefused,
  );
});

// ---------------------------------------------------------- WebSocket: echo

Deno.test("ws echo: text stays text, binary stays binary, every byte value intact", async () => {
  await using server = startWsServer({ port: 0, log: quiet });
  await using ws = await openWs(`ws://127.0.0.1:${server.addr.port}/`);
  ws.socket.send("hello ✓");
  assert.equal(await ws.next(), "hello ✓");
  ws.socket.send(allBytes());
  assert.deepEqual(new Uint8Array(await ws.next() as ArrayBuffer), allBytes());
});

Deno.test("ws echo: 1 MiB messages, text and binary", async () => {
  await using server = startWsServer({ port: 0, log: quiet });
  await using ws = await openWs(`ws://127.0.0.1:${server.addr.port}/`);
  const text = "é".repeat(512 * 1024); // 1 MiB of UTF-8
  ws.socket.send(text);
  assert.equal(await ws.next(), text);
  const bytes = randomBytes(1024 * 1024);
  ws.socket.send(bytes);
  assert.deepEqual(new Uint8Array(await ws.next() as ArrayBuffer), bytes);
});

Deno.test("ws echo: a message over --max-message closes with 1009", async () => {
  await using server = startWsServer({ port: 0, maxMessage: 1000, log: quiet });
  await using ws = await openWs(`ws://127.0.0.1:${server.addr.port}/`);
  ws.socket.send("x".repeat(1001));
  const event = await ws.closed;
  assert.equal(event.code, 1009);
  assert.match(event.reason, /too big/);
});

// ---------------------------------------------------------- WebSocket: chat

Deno.test("ws chat: three clients, everyone gets every message, joins and leaves announced", async () => {
  await using server = startWsServer({ port: 0, mode: "chat", log: quiet });
  const url = `ws://127.0.0.1:${server.addr.port}/`;
  await using a = await openWs(url);
  await using b = await openWs(url);
  assert.equal(await a.next(), "* guest-2 joined");
  const c = await openWs(url);
  assert.equal(await a.next(), "* guest-3 joined");
  assert.equal(await b.next(), "* guest-3 joined");
  a.socket.send("hello\nwith a newline");
  for (const peer of [a, b, c]) assert.equal(await peer.next(), "guest-1: hello\nwith a newline");
  c.socket.send("bye");
  for (const peer of [a, b, c]) assert.equal(await peer.next(), "guest-3: bye");
  await c[Symbol.asyncDispose]();
  assert.equal(await a.next(), "* guest-3 left");
  assert.equal(await b.next(), "* guest-3 left");
});

Deno.test("ws chat: binary closes its sender with 1003, too big with 1009, others carry on", async () => {
  await using server = startWsServer({ port: 0, mode: "chat", maxMessage: 100, log: quiet });
  const url = `ws://127.0.0.1:${server.addr.port}/`;
  await using stays = await openWs(url);
  await using binary = await openWs(url);
  await using big = await openWs(url);
  assert.equal(await stays.next(), "* guest-2 joined");
  assert.equal(await stays.next(), "* guest-3 joined");
  binary.socket.send(Uint8Array.of(1, 2, 3));
  assert.equal((await binary.closed).code, 1003);
  big.socket.send("x".repeat(101));
  assert.equal((await big.closed).code, 1009);
  assert.equal(await stays.next(), "* guest-2 left");
  assert.equal(await stays.next(), "* guest-3 left");
  stays.socket.send("fine");
  assert.equal(await stays.next(), "guest-1: fine");
});

// ------------------------------------------------ WebSocket: HTTP and close

Deno.test("ws server: GET / is the browser client, other paths 404, a bad upgrade 400", async () => {
  await using server = startWsServer({ port: 0, log: quiet });
  const base = `http://127.0.0.1:${server.addr.port}`;
  const page = await fetch(`${base}/`);
  assert.equal(page.status, 200);
  assert.match(page.headers.get("content-type")!, /text\/html/);
  const html = await page.text();
  assert.match(html, /new WebSocket\(/);
  assert.doesNotMatch(
    html,
    /<script[^>]+src=|<link[^>]+href=/,
    "self-contained: no external assets",
  );

  const missing = await fetch(`${base}/nope`);
  assert.equal(missing.status, 404);
  assert.match(await missing.text(), /ws:\/\/127\.0\.0\.1:\d+\//);

  const noKey = await fetch(`${base}/`, {
    headers: { Upgrade: "WebSocket", Connection: "Upgrade" },
  });
  assert.equal(noKey.status, 400);
  assert.match(await noKey.text(), /Sec-WebSocket-Key/);
});

Deno.test("ws server: the Upgrade header matches in any case, and any path upgrades", async () => {
  await using server = startWsServer({ port: 0, log: quiet });
  using conn = await Deno.connect({ hostname: "127.0.0.1", port: server.addr.port });
  const request =
    "GET /any/path HTTP/1.1\r\nHost: x\r\nUpgrade: WebSocket\r\nConnection: upgrade\r\n" +
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
  await conn.write(encoder.encode(request));
  let response = "";
  const buf = new Uint8Array(4096);
  while (!response.includes("\r\n\r\n")) {
    const n = await conn.read(buf);
    if (n === null) break;
    response += decoder.decode(buf.subarray(0, n));
  }
  assert.match(response, /^HTTP\/1\.1 101 /);
  // RFC 6455's own example: this key must give this accept value.
  assert.match(response, /sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK\+xOo=/i);
});

Deno.test("ws server: close() sends every client 1001", async () => {
  const server = startWsServer({ port: 0, log: quiet });
  const url = `ws://127.0.0.1:${server.addr.port}/`;
  const a = await openWs(url);
  const b = await openWs(url);
  await server.close();
  assert.equal((await a.closed).code, 1001);
  assert.equal((await b.closed).code, 1001);
});

// --------------------------------------------------- WebSocket: the client

Deno.test("ws client: sends, collects one reply per message, closes with 1000", async () => {
  await using server = startWsServer({ port: 0, log: quiet });
  const received: unknown[] = [];
  const close = await runWsClient({
    url: `ws://127.0.0.1:${server.addr.port}/`,
    messages: ["one", "two"],
    replies: 2,
    onMessage: (data) => received.push(data),
  });
  assert.deepEqual(received, ["one", "two"]);
  assert.deepEqual(close, { code: 1000, reason: "", byServer: false });
});

Deno.test("ws client: a server that never replies times out", async () => {
  await using server = Deno.serve(
    { hostname: "127.0.0.1", port: 0, onListen: quiet },
    (request) => {
      const { response } = Deno.upgradeWebSocket(request);
      return response;
    },
  );
  await assert.rejects(
    runWsClient({
      url: `ws://127.0.0.1:${server.addr.port}/`,
      messages: ["anyone?"],
      replies: 1,
      timeout: 200,
      onMessage: () => {},
    }),
    /timed out: 0 of 1 replies/,
  );
});

Deno.test("ws client: refused, and not a WebSocket server, are clear errors", async () => {
  const options = { messages: ["x"], replies: 1, onMessage: () => {} };
  await assert.rejects(
    runWsClient({ ...options, url: `ws://127.0.0.1:${closedPort()}/` }),
    /connection refused/,
  );
  await using http = Deno.serve(
    { hostname: "127.0.0.1", port: 0, onListen: quiet },
    () => new Response("just a web page", { status: 200 }),
  );
  await assert.rejects(
    runWsClient({ ...options, url: `ws://127.0.0.1:${http.addr.port}/` }),
    /HTTP 200 instead of 101/,
  );
});

// ------------------------------------------------------- the command lines

const SCRIPTS = ["tcp_server.ts", "tcp_client.ts", "ws_server.ts", "ws_client.ts", "wire.ts"];

Deno.test("cli: --help prints usage and exits 0", async () => {
  for (const script of SCRIPTS) {
    const { code, stdout } = await runScript(script, ["--help"]);
    assert.equal(code, 0, script);
    assert.match(stdout, new RegExp(`^Usage: ${script}`), script);
  }
});

Deno.test("cli: bad options print one line plus usage and exit 2", async () => {
  const cases: [string, string[], RegExp][] = [
    ["tcp_server.ts", ["--bogus"], /Unknown option '--bogus'/],
    [
      "tcp_server.ts",
      ["--port", "70000"],
      /--port must be an integer from 0 to 65535, got "70000"/,
    ],
    ["tcp_server.ts", ["--mode", "shout"], /--mode must be echo or chat, got "shout"/],
    ["tcp_server.ts", ["--max-line=-1"], /--max-line must be an integer at least 1, got "-1"/],
    ["tcp_server.ts", ["--max-line", "-1"], /--max-line needs a value; .* write --max-line=VALUE/],
    ["tcp_server.ts", ["--port"], /Option '--port <value>' argument missing/],
    ["tcp_server.ts", ["stray"], /Unexpected argument 'stray'/],
    ["tcp_client.ts", ["--port", "http"], /--port must be an integer/],
    ["ws_server.ts", ["--port=-5"], /--port must be an integer/],
    ["ws_server.ts", ["--max-message", "1.5"], /--max-message must be an integer/],
    ["ws_client.ts", ["--url", "http://127.0.0.1/"], /--url must be a ws:\/\/ or wss:\/\/ URL/],
    ["ws_client.ts", ["--timeout", "soon", "x"], /--timeout must be/],
  ];
  for (const [script, args, expected] of cases) {
    const { code, stdout, stderr } = await runScript(script, args);
    assert.equal(code, 2, `${script} ${args.join(" ")}`);
    assert.equal(stdout, "");
    const [first, blank, usage] = stderr.split("\n");
    assert.match(first, expected);
    assert.equal(blank, "");
    assert.match(usage, /^Usage: /);
    assertNoStackTrace(stderr);
  }
});

Deno.test("cli: clients report a refused connection in one line and exit 1", async () => {
  const port = closedPort();
  const tcp = await runScript("tcp_client.ts", ["--port", String(port), "hi"]);
  assert.equal(tcp.code, 1);
  assert.equal(
    tcp.stderr,
    `tcp_client: 127.0.0.1:${port}: connection refused ` +
      "(is the server running? start one with: deno run -N tcp_server.ts)\n",
  );
  const ws = await runScript("ws_client.ts", ["--url", `ws://127.0.0.1:${port}/`, "hi"]);
  assert.equal(ws.code, 1);
  assert.match(ws.stderr, /^ws_client: ws:\/\/127\.0\.0\.1:\d+\/: connection refused .*\n$/);
  assertNoStackTrace(tcp.stderr + ws.stderr);
});

Deno.test("cli: a port in use is one clear line and exit 1", async () => {
  using taken = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  for (const script of ["tcp_server.ts", "ws_server.ts"]) {
    const { code, stdout, stderr } = await runScript(script, ["--port", String(taken.addr.port)]);
    assert.equal(code, 1, script);
    assert.equal(stdout, "");
    assert.match(stderr, /^\w+: cannot listen on 127\.0\.0\.1:\d+: address already in use .*\n$/);
  }
});

Deno.test("cli: tcp_client one-shot against tcp_server, echo and chat", async () => {
  await using echo = await spawnServer("tcp_server.ts", ["--quiet"]);
  assert.match(echo.line, /^listening on tcp:\/\/127\.0\.0\.1:\d+$/);
  const echoed = await runScript("tcp_client.ts", [
    "--port",
    String(echo.port),
    "hello",
    "two words",
  ]);
  assert.equal(echoed.code, 0);
  assert.equal(echoed.stdout, "hello\ntwo words\n");

  await using chat = await spawnServer("tcp_server.ts", ["--mode", "chat"]);
  const chatted = await runScript("tcp_client.ts", ["--port", String(chat.port), "hi all"]);
  assert.equal(chatted.code, 0);
  assert.equal(chatted.stdout, "guest-1: hi all\n");
  const { code, stderr } = await chat.stop();
  assert.equal(code, 0);
  assert.match(
    stderr,
    /\+ 127\.0\.0\.1:\d+ connected as guest-1\n- 127\.0\.0\.1:\d+ disconnected \(guest-1\)/,
  );
});

Deno.test("cli: tcp_client interactive sends stdin, half-closes at its end", async () => {
  await using server = startTcpServer({ port: 0, log: quiet });
  const { code, stdout, stderr } = await runScript(
    "tcp_client.ts",
    ["--port", String(server.addr.port)],
    "typed line\nanother\n",
  );
  assert.equal(code, 0);
  assert.equal(stdout, "typed line\nanother\n");
  assert.match(stderr, /closed the connection/);
});

Deno.test("cli: ws_client one-shot and interactive against ws_server", async () => {
  await using server = await spawnServer("ws_server.ts", ["--quiet"]);
  assert.match(server.line, /^listening on ws:\/\/127\.0\.0\.1:\d+\/$/);
  const url = `ws://127.0.0.1:${server.port}/`;
  const oneShot = await runScript("ws_client.ts", ["--url", url, "hello", "two words"]);
  assert.equal(oneShot.code, 0);
  assert.equal(oneShot.stdout, "hello\ntwo words\n");
  const interactive = await runScript("ws_client.ts", ["--url", url], "typed\r\nlines\n");
  assert.equal(interactive.code, 0);
  assert.equal(interactive.stdout, "typed\nlines\n");
});

Deno.test("cli: ws_client reports a server that is not a WebSocket server", async () => {
  await using tcp = startTcpServer({ port: 0, log: quiet });
  const { code, stderr } = await runScript("ws_client.ts", [
    "--url",
    `ws://127.0.0.1:${tcp.addr.port}/`,
    "x",
  ]);
  assert.equal(code, 1);
  assert.match(stderr, /^ws_client: .*does not speak HTTP.*\n$/);
});

Deno.test("cli: SIGTERM closes tcp_server's open connections and exits 0", async () => {
  const server = await spawnServer("tcp_server.ts", ["--mode", "chat"]);
  using a = await connectTcp(server.port);
  using b = await connectTcp(server.port);
  assert.equal(await a.readLine(), "* guest-2 joined");
  const { code } = await server.stop("SIGTERM");
  assert.equal(code, 0);
  assert.equal(await a.readLine(), null, "no '* guest-2 left' while the server goes away");
  assert.equal(await b.readLine(), null);
});

Deno.test("cli: SIGTERM sends open WebSockets 1001 and exits 0", async () => {
  const server = await spawnServer("ws_server.ts", ["--mode", "chat"]);
  const url = `ws://127.0.0.1:${server.port}/`;
  const a = await openWs(url);
  const b = await openWs(url);
  assert.equal(await a.next(), "* guest-2 joined");
  const { code } = await server.stop("SIGTERM");
  assert.equal(code, 0);
  const [closeA, closeB] = await Promise.all([a.closed, b.closed]);
  assert.equal(closeA.code, 1001);
  assert.equal(closeB.code, 1001);
  assert.equal(closeA.reason, "server shutting down");
});

// ----------------------------------------------------------------- the README

Deno.test("readme: the flag reference is each script's own --help", async () => {
  const readme = await Deno.readTextFile(scriptPath("README.md"));
  for (const script of SCRIPTS) {
    const { stdout } = await runScript(script, ["--help"]);
    assert.ok(readme.includes("```\n" + stdout + "```\n"), `README's usage block for ${script}`);
  }
});

Deno.test("readme: every link to a script line lands on the code it names", async () => {
  const readme = await Deno.readTextFile(scriptPath("README.md"));
  const links = [...readme.matchAll(/\[`([^`]+)`\]\((\w+\.ts)#L(\d+)\)/g)];
  assert.ok(links.length >= 10);
  for (const [link, code, file, line] of links) {
    const lines = (await Deno.readTextFile(scriptPath(file))).split("\n");
    assert.ok(
      lines[Number(line) - 1]?.includes(code),
      `${link}: line ${line} is "${lines[Number(line) - 1]}"`,
    );
  }
});

// ------------------------------------------------------------------ wire.ts
//
// wire.ts sits between our own clients and servers: the tests check that
// every byte still arrives and that what it reports is what went by.

/** Fields every event may carry besides those of its type (README: "--json"). */
const COMMON_EVENT_FIELDS = ["conn", "dir", "type", "t_ms"];

/** The events of one proxy, awaitable: `waitFor` resolves at the first event that matches. */
function createEventLog() {
  const events: WireEvent[] = [];
  let ended = false;
  let wake = () => {};
  return {
    events,
    onEvent(event: WireEvent) {
      events.push(event);
      wake();
    },
    end() {
      ended = true;
      wake();
    },
    waitFor(predicate: (event: WireEvent) => boolean, what: string): Promise<WireEvent> {
      return within(
        (async () => {
          for (;;) {
            const found = events.find(predicate);
            if (found) return found;
            if (ended) throw new Error(`wire.ts ended before ${what}`);
            await new Promise<void>((resolve) => wake = resolve);
          }
        })(),
        what,
      );
    },
    /** Every event of connection `conn`, of one type and direction if given. */
    of(conn: number, type?: string, dir?: string): WireEvent[] {
      return events.filter((e) =>
        e.conn === conn && (type === undefined || e.type === type) &&
        (dir === undefined || e.dir === dir)
      );
    },
  };
}

/** Every field of every event is one README.md documents for its type. */
function assertDocumentedFields(events: WireEvent[]) {
  for (const event of events) {
    const fields: readonly string[] = EVENT_FIELDS[event.type];
    assert.ok(fields, `undocumented event type ${event.type}`);
    for (const key of Object.keys(event)) {
      assert.ok(
        COMMON_EVENT_FIELDS.includes(key) || fields.includes(key),
        `${event.type} event has an undocumented field "${key}"`,
      );
    }
  }
}

/** wire.ts as a real process with --json, its events parsed as they are printed. */
async function spawnWire(args: string[]) {
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", scriptPath("wire.ts"), "--port", "0", "--json", ...args],
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const stderr = new Response(child.stderr).text();
  const log = createEventLog();
  const listening = Promise.withResolvers<string>();
  const notJson: string[] = [];
  const reading = (async () => {
    let buffered = "";
    let first = true;
    for await (const text of child.stdout.pipeThrough(new TextDecoderStream())) {
      buffered += text;
      for (let end = buffered.indexOf("\n"); end !== -1; end = buffered.indexOf("\n")) {
        const line = buffered.slice(0, end);
        buffered = buffered.slice(end + 1);
        if (first) {
          first = false;
          listening.resolve(line);
          continue;
        }
        try {
          log.onEvent(JSON.parse(line));
        } catch {
          notJson.push(line);
        }
      }
    }
    listening.resolve("");
    log.end();
  })();
  let stopped: Promise<{ code: number; stderr: string; notJson: string[] }> | undefined;
  async function stop(signal: Deno.Signal) {
    try {
      child.kill(signal);
    } catch {
      // Already exited.
    }
    const { code } = await child.status;
    await reading;
    return { code, stderr: await stderr, notJson };
  }
  const line = await within(listening.promise, "wire.ts's listening line");
  const port = Number(line.match(/^listening on tcp:\/\/127\.0\.0\.1:(\d+)$/)?.[1]);
  if (!port) {
    const { stderr } = await stop("SIGKILL");
    throw new Error(`wire.ts did not start (first line "${line}"): ${stderr}`);
  }
  return {
    ...log,
    port,
    pid: child.pid,
    stop: (signal: Deno.Signal = "SIGTERM") => stopped ??= stop(signal),
    async [Symbol.asyncDispose]() {
      await (stopped ??= stop("SIGKILL"));
    },
  };
}

/** One WebSocket frame's bytes, for the decoder to find fault with. */
function wsFrame(
  options: {
    fin?: boolean;
    rsv?: number;
    opcode: number;
    payload: Uint8Array;
    mask?: Uint8Array;
    lengthForm?: 7 | 16 | 64;
  },
): Uint8Array {
  const { payload, mask } = options;
  const form = options.lengthForm ??
    (payload.length < 126 ? 7 : payload.length < 65536 ? 16 : 64);
  const head = [((options.fin ?? true) ? 0x80 : 0) | ((options.rsv ?? 0) << 4) | options.opcode];
  const maskBit = mask ? 0x80 : 0;
  if (form === 7) head.push(maskBit | payload.length);
  else if (form === 16) head.push(maskBit | 126, payload.length >> 8, payload.length & 0xff);
  else {head.push(
      maskBit | 127,
      0,
      0,
      0,
      0,
      0,
      payload.length >> 16,
      (payload.length >> 8) & 0xff,
      payload.length & 0xff,
    );}
  const body = mask ? payload.map((byte, i) => byte ^ mask[i % 4]) : payload;
  return concat([Uint8Array.from(head), ...(mask ? [mask] : []), body]);
}

/** Resident memory of a process in KiB, read with ps (a script may read /proc only with -A). */
async function rssKiB(pid: number): Promise<number> {
  const { stdout } = await new Deno.Command("ps", {
    args: ["-o", "rss=", "-p", String(pid)],
    stdout: "piped",
    stderr: "null",
  }).output();
  return Number(decoder.decode(stdout).trim());
}

Deno.test("wire: ws_client through wire.ts to ws_server: handshake, masks, close codes both ways", async () => {
  await using server = await spawnServer("ws_server.ts", ["--quiet", "--max-message", "10"]);
  await using wire = await spawnWire(["--to", `127.0.0.1:${server.port}`]);
  const url = `ws://127.0.0.1:${wire.port}/`;
  const hello = await within(
    runScript("ws_client.ts", ["--url", url, "hello"]),
    "ws_client.ts through wire.ts",
  );
  assert.equal(hello.code, 0, hello.stderr);
  assert.equal(hello.stdout, "hello\n");
  await wire.waitFor((e) => e.conn === 1 && e.type === "close", "the first connection's close");

  const [request] = wire.of(1, "http", "c2s");
  const [response] = wire.of(1, "http", "s2c");
  assert.match(String(request.start), /^GET \/ HTTP\/1\.1$/);
  const key = (request.headers as Record<string, string>)["sec-websocket-key"];
  assert.equal(request.key, key);
  assert.match(String(response.start), /^HTTP\/1\.1 101 /);
  assert.equal(response.accept_expected, websocketAccept(key));
  assert.equal(response.accept, response.accept_expected);
  assert.equal(response.accept_ok, true);

  const clientFrames = wire.of(1, "frame", "c2s");
  const serverFrames = wire.of(1, "frame", "s2c");
  for (const frame of clientFrames) {
    assert.equal(frame.masked, true);
    assert.match(String(frame.mask), /^[0-9a-f]{8}$/);
    assert.equal(frame.header_bytes, 6, "2 bytes of header and a 4-byte mask");
  }
  for (const frame of serverFrames) {
    assert.equal(frame.masked, false);
    assert.equal(frame.mask, undefined);
    assert.equal(frame.header_bytes, 2);
  }
  assert.deepEqual(
    clientFrames.map((f) => [f.name, f.text ?? null, f.code ?? null]),
    [["text", "hello", null], ["close", null, 1000]],
  );
  assert.deepEqual(
    serverFrames.map((f) => [f.name, f.text ?? null, f.code ?? null]),
    [["text", "hello", null], ["close", null, 1000]],
  );
  const [close] = wire.of(1, "close");
  assert.equal(close.frames_c2s, 2);
  assert.equal(close.frames_s2c, 2);
  assert.equal(close.messages_c2s, 1);
  assert.equal(close.payload_c2s, 7, "hello and a 2-byte close code");

  // The server closes first this time: 1009 for a message over --max-message.
  const big = await within(
    runScript("ws_client.ts", ["--url", url, "x".repeat(11)]),
    "ws_client.ts through wire.ts",
  );
  assert.equal(big.code, 1);
  await wire.waitFor((e) => e.conn === 2 && e.type === "close", "the second connection's close");
  const [serverClose] = wire.of(2, "frame", "s2c").filter((f) => f.name === "close");
  assert.equal(serverClose.code, 1009);
  assert.equal(serverClose.meaning, "message too big");
  assert.equal(serverClose.reason, "message too big (max 10 bytes)");
  const [clientClose] = wire.of(2, "frame", "c2s").filter((f) => f.name === "close");
  assert.equal(clientClose.masked, true, "the client's answer to the close");
  for (const frame of wire.events.filter((e) => e.type === "frame")) {
    assert.deepEqual(frame.errors, [], `${frame.dir} ${frame.name}`);
  }
  assertDocumentedFields(wire.events);
  const { code, notJson } = await wire.stop();
  assert.equal(code, 0);
  assert.deepEqual(notJson, [], "with --json every line after the first is JSON");
});

Deno.test("wire: tcp_client through wire.ts to tcp_server: reads, bytes, and the half-close", async () => {
  await using server = await spawnServer("tcp_server.ts", ["--quiet"]);
  await using wire = await spawnWire(["--to", `127.0.0.1:${server.port}`]);
  const client = await within(
    runScript("tcp_client.ts", [
      "--port",
      String(wire.port),
      "hello",
      "two words",
    ]),
    "tcp_client.ts through wire.ts",
  );
  assert.equal(client.code, 0);
  assert.equal(client.stdout, "hello\ntwo words\n");
  const close = await wire.waitFor((e) => e.type === "close", "the close");
  for (const dir of ["c2s", "s2c"]) {
    const reads = wire.of(1, "data", dir);
    assert.ok(reads.length >= 1);
    assert.equal(reads.map((r) => r.text).join(""), "hello\ntwo words\n", dir);
    assert.equal(reads.reduce((sum, r) => sum + Number(r.bytes), 0), 16, dir);
    assert.equal(reads.reduce((sum, r) => sum + Number(r.newlines), 0), 2, dir);
  }
  // tcp_client half-closes once it has sent; the echo server finishes, then closes.
  const types = wire.of(1).map((e) => `${e.type}${e.dir ? ` ${e.dir}` : ""}`);
  assert.ok(types.indexOf("fin c2s") < types.indexOf("fin s2c"), types.join(", "));
  assert.ok(types.indexOf("fin c2s") > types.indexOf("data c2s"));
  assert.equal(close.bytes_c2s, 16);
  assert.equal(close.bytes_s2c, 16);
  assert.equal(wire.of(1, "frame").length + wire.of(1, "http").length, 0, "raw TCP, no frames");
  assertDocumentedFields(wire.events);
});

Deno.test("wire: one line sent a byte at a time is many reads; ten lines in one write, one read", async () => {
  await using server = startTcpServer({ port: 0, log: quiet });
  const log = createEventLog();
  await using wire = startWire({
    port: 0,
    to: server.addr,
    preview: 1000,
    onEvent: log.onEvent,
  });
  using client = await connectTcp(wire.addr.port);
  client.conn.setNoDelay(true);
  const line = encoder.encode("split\n");
  // Each byte goes once the proxy has reported the one before: one read each.
  for (const [i, byte] of line.entries()) {
    await client.write(Uint8Array.of(byte));
    await log.waitFor(() => log.of(1, "data", "c2s").length === i + 1, `read ${i + 1}`);
  }
  assert.equal(await client.readLine(), "split");
  assert.deepEqual(
    log.of(1, "data", "c2s").map((e) => [e.bytes, e.text, e.newlines]),
    [[1, "s", 0], [1, "p", 0], [1, "l", 0], [1, "i", 0], [1, "t", 0], [1, "\n", 1]],
  );
  const tenLines = Array.from({ length: 10 }, (_, i) => `line ${i}\n`).join("");
  await client.write(tenLines);
  for (let i = 0; i < 10; i++) assert.equal(await client.readLine(), `line ${i}`);
  const [merged] = log.of(1, "data", "c2s").slice(6);
  assert.equal(merged.bytes, tenLines.length);
  assert.equal(merged.newlines, 10);
  assert.equal(merged.text, tenLines);
  assertDocumentedFields(log.events);
});

Deno.test("wire: a 16 MiB message passes whole while the proxy's memory stays bounded", async () => {
  await using server = await spawnServer("ws_server.ts", ["--quiet", "--max-message", "20000000"]);
  await using wire = await spawnWire(["--to", `127.0.0.1:${server.port}`]);
  await using ws = await openWs(`ws://127.0.0.1:${wire.port}/`);
  ws.socket.send("warm up");
  assert.equal(await ws.next(), "warm up");
  const before = await rssKiB(wire.pid);
  const message = randomBytes(16 * 1024 * 1024);
  ws.socket.send(message);
  let peak = before;
  let done = false;
  const echoed = ws.next().finally(() => done = true);
  // Sampled until the echo is back (each ps takes a few ms), at most 500 times.
  for (let i = 0; i < 500 && !done; i++) peak = Math.max(peak, await rssKiB(wire.pid));
  const reply = new Uint8Array(await within(echoed, "the 16 MiB echo") as ArrayBuffer);
  peak = Math.max(peak, await rssKiB(wire.pid));
  assert.equal(reply.length, message.length);
  assert.deepEqual(reply, message);
  const frame = await wire.waitFor(
    (e) => e.type === "frame" && e.dir === "s2c" && e.length === message.length,
    "the echo's frame event",
  );
  assert.equal(frame.length_encoding, 64);
  assert.equal(frame.truncated, true);
  assert.equal(String(frame.hex).length, 128, "a 64-byte preview, nothing more");
  // Holding one such message would cost 16 MiB; a few read buffers are 64 KiB each.
  const grownMiB = (peak - before) / 1024;
  assert.ok(grownMiB < 8, `proxy memory grew by ${grownMiB.toFixed(1)} MiB for a 16 MiB message`);
});

Deno.test("wire: malformed frames are reported, and every byte still goes through", async () => {
  // A server that accepts RFC 6455's example key, then records what arrives.
  using listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const log = createEventLog();
  await using wire = startWire({ port: 0, to: listener.addr, onEvent: log.onEvent });
  using client = await connectTcp(wire.addr.port);
  const accepted = listener.accept();
  const request = "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
  await client.write(request);
  using upstream = connectedPeer(await accepted);
  assert.equal(decoder.decode(await upstream.readBytes(request.length)), request);
  await upstream.write(
    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
      "Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n",
  );
  await client.readLine();
  const mask = Uint8Array.of(1, 2, 3, 4);
  const bad = concat([
    wsFrame({ opcode: 1, payload: encoder.encode("no mask") }),
    wsFrame({ opcode: 1, rsv: 2, mask, payload: Uint8Array.of(0x68, 0xff) }),
    wsFrame({ opcode: 2, mask, payload: encoder.encode("short"), lengthForm: 16 }),
    wsFrame({ opcode: 3, mask, payload: new Uint8Array(0) }),
    wsFrame({ opcode: 9, mask, payload: new Uint8Array(126) }),
    wsFrame({ opcode: 10, fin: false, mask, payload: new Uint8Array(0) }),
    wsFrame({ opcode: 0, mask, payload: encoder.encode("orphan") }),
    wsFrame({ opcode: 8, mask, payload: Uint8Array.of(0x03, 0xed) }), // 1005
  ]);
  await client.write(bad);
  client.conn.closeWrite();
  assert.deepEqual(await upstream.readToEnd(), bad, "forwarded byte for byte");
  await upstream.write(wsFrame({ opcode: 1, mask, payload: encoder.encode("masked") }));
  upstream.close();
  await log.waitFor((e) => e.type === "close", "the close");
  const errors = (dir: string) =>
    log.of(1, "frame", dir).map((f) => (f.errors as string[]).join("; "));
  const expected = [
    /client frame must be masked/,
    /RSV bits 010 .*\(§5\.2\); .*not valid UTF-8/,
    /length 5 sent in the 16-bit form/,
    /opcode 3 is reserved/,
    /control frame of 126 bytes/,
    /control frame fragmented/,
    /continuation frame with no message/,
    /close code 1005 may not be sent/,
  ];
  const found = errors("c2s");
  assert.equal(found.length, expected.length, found.join("\n"));
  expected.forEach((pattern, i) => assert.match(found[i], pattern));
  assert.match(errors("s2c")[0], /server frame must not be masked/);
  assert.equal(log.of(1, "frame", "s2c")[0].text, "masked", "unmasked for the preview");
  assertDocumentedFields(log.events);
});

/** An accepted connection with connectTcp's buffered reads. */
function connectedPeer(conn: Deno.Conn) {
  // connectTcp opens its own connection; this wraps one we accepted instead.
  let buffered: Uint8Array = new Uint8Array(0);
  const buffer = new Uint8Array(64 * 1024);
  async function fill(): Promise<boolean> {
    const n = await conn.read(buffer);
    if (n === null) return false;
    buffered = concat([buffered, buffer.subarray(0, n)]);
    return true;
  }
  return {
    async readBytes(n: number) {
      while (buffered.length < n && await fill());
      const head = buffered.slice(0, n);
      buffered = buffered.subarray(n);
      return head;
    },
    async readToEnd() {
      while (await fill());
      const all = buffered;
      buffered = new Uint8Array(0);
      return all;
    },
    async write(data: string | Uint8Array) {
      const bytes = typeof data === "string" ? encoder.encode(data) : data;
      for (let done = 0; done < bytes.length;) done += await conn.write(bytes.subarray(done));
    },
    close() {
      try {
        conn.close();
      } catch {
        // Already closed.
      }
    },
    [Symbol.dispose]() {
      this.close();
    },
  };
}

Deno.test("wire: keep-alive HTTP shows each head in turn; TLS is byte counts only", async () => {
  await using server = startWsServer({ port: 0, log: quiet });
  const log = createEventLog();
  await using wire = startWire({ port: 0, to: server.addr, onEvent: log.onEvent });
  {
    using client = await connectTcp(wire.addr.port);
    await client.write(
      "GET / HTTP/1.1\r\nHost: x\r\n\r\nGET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    await client.readToEnd();
  }
  await log.waitFor((e) => e.conn === 1 && e.type === "close", "the HTTP connection's close");
  assert.deepEqual(log.of(1, "http").map((e) => `${e.dir} ${e.start}`), [
    "c2s GET / HTTP/1.1",
    "c2s GET /nope HTTP/1.1",
    "s2c HTTP/1.1 200 OK",
    "s2c HTTP/1.1 404 Not Found",
  ]);
  const page = log.of(1, "data", "s2c");
  assert.ok(page.length >= 2, "each body is data between the heads");

  {
    using client = await connectTcp(wire.addr.port);
    // The first bytes of a TLS ClientHello: handshake record, version 3.1.
    await client.write(Uint8Array.of(0x16, 0x03, 0x01, 0x00, 0x05, 0x01, 0x00, 0x00, 0x01, 0x00));
    await client.conn.closeWrite();
    await client.readToEnd();
  }
  await log.waitFor((e) => e.conn === 2 && e.type === "close", "the TLS connection's close");
  const [tls] = log.of(2, "tls");
  assert.equal(tls.version, "3.1");
  for (const data of log.of(2, "data")) {
    assert.equal(data.text ?? data.hex, undefined, "encrypted: no preview");
  }
  assertDocumentedFields(log.events);
});

Deno.test("wire: a refused target closes that client with one error event; the proxy carries on", async () => {
  const port = closedPort();
  await using wire = await spawnWire(["--to", `127.0.0.1:${port}`]);
  for (const conn of [1, 2]) {
    using client = await connectTcp(wire.port);
    assert.equal((await client.readToEnd()).length, 0);
    await wire.waitFor((e) => e.conn === conn && e.type === "close", `connection ${conn}'s close`);
    assert.deepEqual(wire.of(conn).map((e) => e.type), ["open", "error", "close"]);
    assert.equal(
      wire.of(conn, "error")[0].message,
      `cannot connect to 127.0.0.1:${port}: connection refused (is the server running?)`,
    );
  }
  const { code, stderr } = await wire.stop();
  assert.equal(code, 0);
  assertNoStackTrace(stderr);
});

Deno.test("wire: human output escapes what a peer sends; SIGTERM exits 0 with a connection open", async () => {
  await using server = startTcpServer({ port: 0, log: quiet });
  await using wire = await spawnServer("wire.ts", ["--to", `127.0.0.1:${server.addr.port}`]);
  using client = await connectTcp(wire.port);
  await client.write("\x1b[2J\rforged\n");
  assert.equal(await client.readLine(), "\x1b[2J\rforged");
  const { code, stdout } = await wire.stop("SIGTERM");
  assert.equal(code, 0);
  assert.equal(await client.readLine(), null, "closed on shutdown");
  assert.ok(
    !stdout.includes("\x1b") && !stdout.includes("\r"),
    "no ESC or carriage return reaches the terminal",
  );
  assert.match(stdout, /c→s {2}data {3}12 B {2}"\\x1b\[2J\\rforged\\n" {2}\(1 newline\)/);
  assert.match(stdout, /─── {2}close {2}after [\d.]+ ms: c→s 12 B, s→c 12 B/);
});

Deno.test("wire: bad flags print one line plus usage and exit 2; a port in use exits 1", async () => {
  const cases: [string[], RegExp][] = [
    [[], /--to HOST:PORT is required/],
    [
      ["--to", "127.0.0.1:70000"],
      /--to must be HOST:PORT with a port from 1 to 65535.*"127\.0\.0\.1:70000"/,
    ],
    [["--to", "localhost"], /--to must be HOST:PORT/],
    [
      ["--to", "127.0.0.1:1", "--preview=-1"],
      /--preview must be an integer from 0 to 65536, got "-1"/,
    ],
    [
      ["--to", "127.0.0.1:1", "--preview", "-1"],
      /--preview needs a value; .* write --preview=VALUE/,
    ],
    [["--to", "127.0.0.1:1", "--bogus"], /Unknown option '--bogus'/],
  ];
  for (const [args, expected] of cases) {
    const { code, stdout, stderr } = await runScript("wire.ts", args);
    assert.equal(code, 2, args.join(" "));
    assert.equal(stdout, "");
    const [first, blank, usage] = stderr.split("\n");
    assert.match(first, expected);
    assert.match(first, /^wire: /);
    assert.equal(blank, "");
    assert.match(usage, /^Usage: wire\.ts/);
    assertNoStackTrace(stderr);
  }
  using taken = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const inUse = await runScript("wire.ts", [
    "--port",
    String(taken.addr.port),
    "--to",
    "127.0.0.1:1",
  ]);
  assert.equal(inUse.code, 1);
  assert.match(
    inUse.stderr,
    /^wire: cannot listen on 127\.0\.0\.1:\d+: address already in use .*\n$/,
  );
});

Deno.test("readme: the --json event table is the one wire.ts emits", async () => {
  const readme = await Deno.readTextFile(scriptPath("README.md"));
  const section = readme.split("\n### wire.ts --json events\n")[1]?.split("\n#")[0];
  assert.ok(section, 'README.md has a "### wire.ts --json events" section');
  const documented: Record<string, string[]> = {};
  for (const [, type, fields] of section.matchAll(/^\| `(\w+)` +\| (.*?) *\|$/gm)) {
    documented[type] = [...fields.matchAll(/`(\w+)`/g)].map((m) => m[1]);
  }
  const inCode = Object.fromEntries(
    Object.entries(EVENT_FIELDS).map(([type, fields]) => [type, [...fields]]),
  );
  assert.deepEqual(documented, inCode);
  for (const field of COMMON_EVENT_FIELDS) assert.match(section, new RegExp(`\`${field}\``));
});

Deno.test("wire: a reset on either side is reported, and the other side is closed", async () => {
  using listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const log = createEventLog();
  await using wire = startWire({ port: 0, to: listener.addr, onEvent: log.onEvent });
  // Closing a socket with bytes it has not read makes the kernel send a reset:
  // each end reads one byte of two (so both have arrived), then closes.
  for (const [conn, resetter] of [[1, "server"], [2, "client"]] as const) {
    using client = await Deno.connect({ hostname: "127.0.0.1", port: wire.addr.port });
    using upstream = await listener.accept();
    const [rude, other] = resetter === "server" ? [upstream, client] : [client, upstream];
    await other.write(encoder.encode("ab"));
    assert.equal(await rude.read(new Uint8Array(1)), 1);
    rude.close();
    const rest = await other.read(new Uint8Array(16)).catch(() => null);
    assert.equal(rest, null, "the other side is closed too");
    await log.waitFor((e) => e.conn === conn && e.type === "close", `connection ${conn}'s close`);
    const [reset] = log.of(conn, "reset");
    assert.equal(reset?.side, resetter, log.of(conn).map((e) => e.type).join(", "));
  }
  assertDocumentedFields(log.events);
});

Deno.test("wire: the frame decoder gives the same frames whatever sizes the bytes arrive in", () => {
  const mask = Uint8Array.of(0x37, 0xfa, 0x21, 0x3d);
  const e = encoder.encode("é");
  const stream = concat([
    // A text message in two fragments, "é" split between them, a ping between.
    wsFrame({
      opcode: 1,
      fin: false,
      mask,
      payload: concat([encoder.encode("caf"), e.subarray(0, 1)]),
    }),
    wsFrame({ opcode: 9, mask, payload: encoder.encode("are you there") }),
    wsFrame({ opcode: 0, mask, payload: concat([e.subarray(1), encoder.encode("!")]) }),
    wsFrame({ opcode: 2, mask, payload: randomBytes(300) }), // a 16-bit length
    wsFrame({ opcode: 2, mask, payload: randomBytes(70000) }), // a 64-bit length
    wsFrame({
      opcode: 8,
      mask,
      payload: concat([Uint8Array.of(0x0f, 0xa0), encoder.encode("bye ✓")]),
    }),
  ]);
  const decode = (size: number) => {
    const frames: Frame[] = [];
    const decoder = createFrameDecoder({
      fromClient: true,
      preview: 8,
      onFrame: (f) => frames.push(f),
    });
    for (let i = 0; i < stream.length; i += size) decoder.push(stream.subarray(i, i + size));
    assert.equal(decoder.unfinished(), undefined);
    return frames;
  };
  const whole = decode(stream.length);
  assert.deepEqual(
    whole.map((
      f,
    ) => [f.name, f.fin, f.length, f.lengthEncoding, f.headerBytes, f.message, f.fragment]),
    [
      ["text", false, 4, 7, 6, 1, 1],
      ["ping", true, 13, 7, 6, undefined, undefined],
      ["continuation", true, 2, 7, 6, 1, 2],
      ["binary", true, 300, 16, 8, 2, 1],
      ["binary", true, 70000, 64, 14, 3, 1],
      ["close", true, 9, 7, 6, undefined, undefined],
    ],
  );
  assert.deepEqual(whole.map((f) => f.errors), [[], [], [], [], [], []]);
  assert.deepEqual(whole.map((f) => f.messageComplete), [false, false, true, true, true, false]);
  assert.equal(decoder.decode(whole[1].preview), "are you there", "control frames in full");
  assert.deepEqual(whole[0].preview, concat([encoder.encode("caf"), e.subarray(0, 1)]), "unmasked");
  assert.equal(whole[4].preview.length, 8, "a big payload keeps only its preview");
  assert.equal(whole[4].truncated, true);
  assert.deepEqual([whole[5].code, whole[5].reason], [4000, "bye ✓"]);
  for (const size of [1, 2, 3, 5, 7, 13, 64, 1000]) {
    assert.deepEqual(decode(size), whole, `${size}`);
  }
});

Deno.test("wire: --hex and --preview bound what each event shows", async () => {
  await using server = startTcpServer({ port: 0, log: quiet });
  await using wire = await spawnWire([
    "--to",
    `127.0.0.1:${server.addr.port}`,
    "--hex",
    "--preview",
    "4",
  ]);
  using client = await connectTcp(wire.port);
  await client.write("hello\n");
  assert.equal(await client.readLine(), "hello");
  const data = await wire.waitFor((e) => e.type === "data" && e.dir === "s2c", "the echo");
  assert.deepEqual([data.bytes, data.hex, data.text, data.truncated], [
    6,
    "68656c6c",
    undefined,
    true,
  ]);
});
