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
import dgram from "node:dgram";
import { createLineFramer, startTcpServer } from "./tcp_server.ts";
import { runTcpClient } from "./tcp_client.ts";
import { startWsServer } from "./ws_server.ts";
import { runWsClient } from "./ws_client.ts";
import { startBridge } from "./bridge.ts";
import { DatagramTooBig, sendDatagrams, startUdpServer } from "./udp.ts";
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
  awaitableLog,
  bufferedConn,
  connectTcp,
  joinTcpChat,
  joinWsChat,
  openWs,
  randomBytes,
  runScript,
  scriptPath,
  spawnServer,
  testCertificates,
  within,
} from "./tests/helpers.ts";

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
  // Each newcomer's first line is its own name; the others hear it joined.
  using a = await connectTcp(server.addr.port);
  assert.equal(await within(a.readLine(), "a's name"), "* you are guest-1");
  using b = await connectTcp(server.addr.port);
  assert.equal(await within(b.readLine(), "b's name"), "* you are guest-2");
  assert.equal(await a.readLine(), "* guest-2 joined");
  const c = await connectTcp(server.addr.port);
  assert.equal(await within(c.readLine(), "c's name"), "* you are guest-3");
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
  using talker = await joinTcpChat(server.addr.port, "guest-1");
  using listener = await joinTcpChat(server.addr.port, "guest-2");
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
  using client = await joinTcpChat(server.addr.port, "guest-1");
  await client.write("no newline");
  await client.conn.closeWrite();
  assert.equal(await client.readLine(), "guest-1: no newline");
  assert.equal(await client.readLine(), null);
});

Deno.test("tcp chat: bytes that are not UTF-8 arrive as U+FFFD", async () => {
  await using server = startTcpServer({ port: 0, mode: "chat", log: quiet });
  using client = await joinTcpChat(server.addr.port, "guest-1");
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
  // Each newcomer's first message is its own name; the others hear it joined.
  await using a = await openWs(url);
  assert.equal(await within(a.next(), "a's name"), "* you are guest-1");
  await using b = await openWs(url);
  assert.equal(await within(b.next(), "b's name"), "* you are guest-2");
  assert.equal(await a.next(), "* guest-2 joined");
  const c = await openWs(url);
  assert.equal(await within(c.next(), "c's name"), "* you are guest-3");
  assert.equal(await a.next(), "* guest-3 joined");
  assert.equal(await b.next(), "* guest-3 joined");
  // A newline would print as a second line, which could pose as anyone's.
  a.socket.send("hello\nwith a newline");
  for (const peer of [a, b, c]) {
    assert.equal(await peer.next(), "guest-1: hello\u240awith a newline");
  }
  c.socket.send("bye");
  for (const peer of [a, b, c]) assert.equal(await peer.next(), "guest-3: bye");
  await c[Symbol.asyncDispose]();
  assert.equal(await a.next(), "* guest-3 left");
  assert.equal(await b.next(), "* guest-3 left");
});

Deno.test("ws chat: binary closes its sender with 1003, too big with 1009, others carry on", async () => {
  await using server = startWsServer({ port: 0, mode: "chat", maxMessage: 100, log: quiet });
  const url = `ws://127.0.0.1:${server.addr.port}/`;
  await using stays = await joinWsChat(url, "guest-1");
  await using binary = await joinWsChat(url, "guest-2");
  await using big = await joinWsChat(url, "guest-3");
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

const SCRIPTS = [
  "tcp_server.ts",
  "tcp_client.ts",
  "ws_server.ts",
  "ws_client.ts",
  "udp.ts",
  "bridge.ts",
  "wire.ts",
];

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
  // tcp_client prints whatever the server sends, its notices too.
  assert.equal(chatted.stdout, "* you are guest-1\nguest-1: hi all\n");
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
  using a = await joinTcpChat(server.port);
  using b = await joinTcpChat(server.port);
  assert.equal(await a.readLine(), "* guest-2 joined");
  const { code } = await server.stop("SIGTERM");
  assert.equal(code, 0);
  assert.equal(await a.readLine(), null, "no '* guest-2 left' while the server goes away");
  assert.equal(await b.readLine(), null);
});

Deno.test("cli: SIGTERM sends open WebSockets 1001 and exits 0", async () => {
  const server = await spawnServer("ws_server.ts", ["--mode", "chat"]);
  const url = `ws://127.0.0.1:${server.port}/`;
  const a = await joinWsChat(url);
  const b = await joinWsChat(url);
  assert.equal(await a.next(), "* guest-2 joined");
  const { code } = await server.stop("SIGTERM");
  assert.equal(code, 0);
  const [closeA, closeB] = await Promise.all([a.closed, b.closed]);
  assert.equal(closeA.code, 1001);
  assert.equal(closeB.code, 1001);
  assert.equal(closeA.reason, "server shutting down");
});

// ----------------------------------------------------------------- the README

// The README and the pages under docs/ that it links to.
const PAGES = [
  "README.md",
  "README.pt-BR.md",
  "docs/reference.md",
  "docs/reliability.md",
  "docs/deno-notes.md",
  "docs/performance.md",
];

Deno.test("readme: the flag reference is each script's own --help", async () => {
  const reference = await Deno.readTextFile(scriptPath("docs/reference.md"));
  for (const script of SCRIPTS) {
    const { stdout } = await runScript(script, ["--help"]);
    assert.ok(
      reference.includes("```\n" + stdout + "```\n"),
      `docs/reference.md's usage block for ${script}`,
    );
  }
});

Deno.test("readme: every link to a script line lands on the code it names", async () => {
  let count = 0;
  for (const page of PAGES) {
    const text = await Deno.readTextFile(scriptPath(page));
    const base = page.includes("/") ? page.slice(0, page.lastIndexOf("/") + 1) : "";
    for (
      const [link, code, file, line] of text.matchAll(/\[`([^`]+)`\]\(([\w./]+\.ts)#L(\d+)\)/g)
    ) {
      const path = new URL(file, `file:///${base}`).pathname.slice(1);
      const lines = (await Deno.readTextFile(scriptPath(path))).split("\n");
      assert.ok(
        lines[Number(line) - 1]?.includes(code),
        `${page}: ${link}: line ${line} is "${lines[Number(line) - 1]}"`,
      );
      count++;
    }
  }
  assert.ok(count >= 10);
});

Deno.test("readme: every relative link between the pages lands on a file that exists", async () => {
  for (const page of PAGES) {
    const text = await Deno.readTextFile(scriptPath(page));
    const base = page.includes("/") ? page.slice(0, page.lastIndexOf("/") + 1) : "";
    for (const [, target] of text.matchAll(/\]\(((?!https?:|#)[^)#\s]+)(?:#[^)]*)?\)/g)) {
      const path = new URL(target, `file:///${base}`).pathname.slice(1);
      const found = await Deno.stat(scriptPath(path)).then(() => true, () => false);
      assert.ok(found, `${page} links to ${target}, which is not there`);
    }
  }
});

// The demo on the README's first screen: these commands, with this output.
const DEMO = [
  { server: "tcp_server.ts", client: "tcp_client.ts", port: 9000 },
  { server: "ws_server.ts", client: "ws_client.ts", port: 8080 },
];

Deno.test("readme: the one-minute demo prints what the README shows", async () => {
  const readme = await Deno.readTextFile(scriptPath("README.md"));
  for (const { server, client, port } of DEMO) {
    const allow = `--allow-net=127.0.0.1:${port}`;
    await using running = await spawnServer(server, []);
    const ws = server.startsWith("ws");
    const target = ws
      ? ["--url", `ws://127.0.0.1:${running.port}/`]
      : ["--port", `${running.port}`];
    const { code, stdout } = await runScript(client, [...target, "hello", "world"]);
    assert.equal(code, 0);
    const serverLine = running.line.replace(`:${running.port}`, `:${port}`);
    const shown = `$ deno run ${allow} ${server}\n    ${serverLine}\n`;
    assert.ok(readme.includes(shown), `the README shows ${shown}`);
    const clientShown = `$ deno run ${allow} ${client} hello world\n` +
      stdout.split("\n").filter(Boolean).map((line) => `    ${line}\n`).join("");
    assert.ok(readme.includes(clientShown), `the README shows ${clientShown}`);
  }
});

Deno.test("cli: ws_server's --protocol and --allow-origin take lists, and bad ones are one line and exit 2", async () => {
  const cases: [string[], RegExp][] = [
    [
      ["--protocol", "chat, bad name"],
      /--protocol takes names separated by commas .*, got "bad name"$/,
    ],
    [["--protocol", ""], /--protocol takes names .*, got ""$/],
    [["--allow-origin", "example.com"], /--allow-origin takes origins .*, got "example.com"$/],
    [
      ["--allow-origin", "http://x:1/path"],
      /--allow-origin takes origins .*, got "http:\/\/x:1\/path"$/,
    ],
  ];
  for (const [args, expected] of cases) {
    const { code, stdout, stderr } = await runScript("ws_server.ts", args);
    assert.equal(code, 2, args.join(" "));
    assert.equal(stdout, "");
    const [first, blank, usage] = stderr.split("\n");
    assert.match(first, expected);
    assert.equal(blank, "");
    assert.match(usage, /^Usage: /);
  }
  await using server = await spawnServer("ws_server.ts", [
    "--protocol",
    "chat,superchat",
    "--allow-origin",
    "http://127.0.0.2:8080,https://chat.example",
  ]);
  const url = `ws://127.0.0.1:${server.port}/`;
  const socket = new WebSocket(url, ["superchat"]);
  const opened = await new Promise<string>((resolve, reject) => {
    socket.onopen = () => resolve(socket.protocol);
    socket.onclose = () => reject(new Error("refused"));
  });
  assert.equal(opened, "superchat");
  const closed = new Promise((resolve) => socket.onclose = resolve);
  socket.close();
  await closed;
  for (
    const [origin, status] of [["https://chat.example", 101], ["http://127.0.0.3", 403]] as const
  ) {
    using tcp = await connectTcp(server.port);
    await tcp.write(
      `GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n` +
        `Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n` +
        `Origin: ${origin}\r\n\r\n`,
    );
    assert.match((await tcp.readLine())!, new RegExp(`^HTTP/1\\.1 ${status} `), origin);
  }
  const { stderr } = await server.stop();
  assert.match(stderr, /^\+ 127\.0\.0\.1:\d+ connected, protocol superchat$/m);
  assert.match(stderr, /^! 127\.0\.0\.1:\d+ refused with 403: origin "http:\/\/127\.0\.0\.3" /m);
});
// ------------------------------------------------------------------- UDP

/** A UDP socket on 127.0.0.1 that talks to one server port, with its datagrams awaitable. */
async function udpPeer(serverPort: number) {
  const socket = dgram.createSocket("udp4");
  await new Promise<void>((resolve) => socket.bind(0, "127.0.0.1", resolve));
  const received: Uint8Array[] = [];
  let wake = () => {};
  socket.on("message", (data) => {
    received.push(new Uint8Array(data));
    wake();
  });
  return {
    port: socket.address().port,
    /** Sends one datagram (a string as UTF-8) and waits until the kernel has taken it. */
    send(data: string | Uint8Array): Promise<void> {
      return new Promise((resolve, reject) =>
        socket.send(data, serverPort, "127.0.0.1", (error) => error ? reject(error) : resolve())
      );
    },
    /** The next datagram, whole. */
    async next(): Promise<Uint8Array> {
      while (received.length === 0) {
        await within(new Promise<void>((resolve) => wake = resolve), "a datagram");
      }
      return received.shift()!;
    },
    /** The next datagram as text, without the "\n" the chat ends each one with. */
    async nextText(): Promise<string> {
      return decoder.decode(await this.next()).replace(/\n$/, "");
    },
    async [Symbol.asyncDispose]() {
      await new Promise<void>((resolve) => socket.close(() => resolve()));
    },
  };
}

/** A UDP port nothing listens on (bound, read, released). */
async function closedUdpPort(): Promise<number> {
  const socket = dgram.createSocket("udp4");
  await new Promise<void>((resolve) => socket.bind(0, "127.0.0.1", resolve));
  const { port } = socket.address();
  await new Promise<void>((resolve) => socket.close(() => resolve()));
  return port;
}

/** `udp.ts serve --port 0 ARGS` as a real process: spawnServer, with the command first. */
function spawnUdpServer(args: string[]) {
  return spawnServer("udp.ts", args, { listenArgs: ["serve", "--port", "0"] });
}

Deno.test("udp echo: text, binary, every byte value, empty and 65,507 bytes come back whole", async () => {
  await using server = await startUdpServer({ port: 0, log: quiet });
  const big = randomBytes(65_507);
  const messages = ["hello ✓", allBytes(), new Uint8Array(0), big];
  const replies: Uint8Array[] = [];
  const result = await sendDatagrams({
    port: server.addr.port,
    messages,
    onReply: (data) => replies.push(Uint8Array.from(data)),
  });
  assert.deepEqual(result, { sent: 4, replies: 4, missing: 0, refused: false });
  // One send is one receive: four datagrams, four replies, each exactly one of them.
  assert.deepEqual(replies, [encoder.encode("hello ✓"), allBytes(), new Uint8Array(0), big]);
});

Deno.test("udp echo: a datagram over 65,507 bytes is refused clearly, and nothing is sent", async () => {
  await using server = await startUdpServer({ port: 0, log: quiet });
  const replies: Uint8Array[] = [];
  await assert.rejects(
    sendDatagrams({
      port: server.addr.port,
      messages: ["first", randomBytes(65_508)],
      onReply: (data) => replies.push(data),
    }),
    (error: Error) =>
      error instanceof DatagramTooBig &&
      /^datagram 2 is 65508 bytes, .* \(65507 over IPv4, .*EMSGSIZE.* nothing of it was sent$/
        .test(error.message),
  );
  const oversize = await runScript("udp.ts", [
    "send",
    "--port",
    String(server.addr.port),
    "x".repeat(65_508),
  ]);
  assert.equal(oversize.code, 1);
  assert.equal(oversize.stdout, "");
  assert.match(oversize.stderr, /^udp: udp:\/\/127\.0\.0\.1:\d+: datagram 1 is 65508 bytes, .*\n$/);
  assertNoStackTrace(oversize.stderr);
});

Deno.test("udp chat: three peers join by their first datagram, and everyone gets every message", async () => {
  const logged: string[] = [];
  await using server = await startUdpServer({
    port: 0,
    mode: "chat",
    log: (line) => logged.push(line),
  });
  await using a = await udpPeer(server.addr.port);
  await using b = await udpPeer(server.addr.port);
  await using c = await udpPeer(server.addr.port);
  await a.send("hello");
  assert.equal(await a.nextText(), "guest-1: hello");
  await b.send("hi");
  assert.deepEqual([await a.nextText(), await a.nextText()], ["* guest-2 joined", "guest-2: hi"]);
  assert.equal(await b.nextText(), "guest-2: hi");
  // netcat sends the line's "\n"; a datagram needs none, and it is dropped.
  await c.send("hey\n");
  for (const peer of [a, b]) assert.equal(await peer.nextText(), "* guest-3 joined");
  for (const peer of [a, b, c]) assert.equal(await peer.nextText(), "guest-3: hey");
  // Control characters cannot forge lines or move a terminal's cursor.
  await a.send("x\r\x1b[2Jy");
  for (const peer of [a, b, c]) assert.equal(await peer.nextText(), "guest-1: x\u240d\u241b[2Jy");
  // Bytes that are not UTF-8 arrive as U+FFFD; an empty datagram relays nothing.
  await c.send(Uint8Array.of(0x68, 0xff, 0x69));
  await a.send(new Uint8Array(0));
  await b.send("next");
  for (const peer of [a, b, c]) {
    assert.deepEqual([await peer.nextText(), await peer.nextText()], [
      "guest-3: h\uFFFDi",
      "guest-2: next",
    ]);
  }
  assert.equal(server.peers, 3);
  assert.match(logged.join("\n"), /^\+ 127\.0\.0\.1:\d+ joined as guest-1$/m);
});

Deno.test("udp chat: a silent peer is forgotten after --idle-timeout, and told so", async () => {
  const logged: string[] = [];
  await using server = await startUdpServer({
    port: 0,
    mode: "chat",
    idleTimeout: 1,
    log: (line) => logged.push(line),
  });
  await using a = await udpPeer(server.addr.port);
  await using b = await udpPeer(server.addr.port);
  await using c = await udpPeer(server.addr.port);
  await a.send("1");
  await b.send("2");
  await c.send("3");
  // a and b speak again, so c has been silent longest, then a, then b.
  await a.send("a again");
  await b.send("b again");
  const left = "* you left the room: silent for 1 s (send anything to rejoin)";
  const seen = async (peer: typeof a, count: number) => {
    const texts: string[] = [];
    for (let i = 0; i < count; i++) texts.push(await peer.nextText());
    return texts;
  };
  assert.deepEqual(await seen(a, 9), [
    "guest-1: 1",
    "* guest-2 joined",
    "guest-2: 2",
    "* guest-3 joined",
    "guest-3: 3",
    "guest-1: a again",
    "guest-2: b again",
    "* guest-3 left",
    left,
  ]);
  assert.deepEqual((await seen(b, 8)).slice(3), [
    "guest-1: a again",
    "guest-2: b again",
    "* guest-3 left",
    "* guest-1 left",
    left,
  ]);
  assert.deepEqual((await seen(c, 4)).slice(1), ["guest-1: a again", "guest-2: b again", left]);
  assert.equal(server.peers, 0);
  // Nothing to reconnect: the next datagram is a new peer.
  await c.send("back");
  assert.equal(await c.nextText(), "guest-4: back");
  assert.match(logged.join("\n"), /^- 127\.0\.0\.1:\d+ \(guest-3\) left: silent for 1 s$/m);
});

Deno.test("udp chat: too long, too fast and room full touch only their sender", async () => {
  const logged: string[] = [];
  await using server = await startUdpServer({
    port: 0,
    mode: "chat",
    maxPeers: 2,
    log: (line) => logged.push(line),
  });
  await using a = await udpPeer(server.addr.port);
  await using b = await udpPeer(server.addr.port);
  await using c = await udpPeer(server.addr.port);
  await a.send("hi");
  assert.equal(await a.nextText(), "guest-1: hi");
  await b.send("x".repeat(2049));
  assert.equal(await b.nextText(), "* error: message too long (max 2048 bytes)");
  await c.send("let me in");
  assert.equal(await c.nextText(), "* error: room full (max 2 peers), try again later");
  // A burst of 100: the room gets b's burst allowance (40, less the one its
  // too-long datagram took) and what the rate refills meanwhile, no more.
  for (let i = 1; i <= 100; i++) await b.send(`burst ${i}`);
  await a.send("still fine");
  const relayed = [];
  for (let text = await a.nextText(); text !== "guest-1: still fine"; text = await a.nextText()) {
    relayed.push(text);
  }
  assert.equal(relayed[0], "* guest-2 joined", "b joined with its too-long datagram");
  const bursts = relayed.slice(1);
  assert.ok(bursts.length >= 39 && bursts.length < 100, `${bursts.length} of 100 relayed`);
  assert.deepEqual(bursts, bursts.map((_, i) => `guest-2: burst ${i + 1}`));
  assert.equal(server.peers, 2, "c was never let in");
  await server.close();
  const log = logged.join("\n");
  assert.match(log, /guest-2\) sends over 20 datagrams a second: dropped/);
  assert.match(log, /\(and \d+ more like it in the last 20 s\)/, "counted, not printed each time");
  assert.match(log, /room full \(max 2 peers\), not let in/);
});

Deno.test("udp cli: send prints each reply, one-shot and interactive, echo and chat", async () => {
  await using echo = await spawnUdpServer(["--quiet"]);
  assert.match(echo.line, /^listening on udp:\/\/127\.0\.0\.1:\d+$/);
  const port = String(echo.port);
  const oneShot = await runScript("udp.ts", ["send", "--port", port, "hello", "two words"]);
  assert.equal(oneShot.stdout, "hello\ntwo words\n", oneShot.stderr);
  assert.equal(oneShot.code, 0);
  const interactive = await runScript("udp.ts", ["send", "--port", port], "typed\r\nlines\n");
  assert.equal(interactive.stdout, "typed\nlines\n", interactive.stderr);
  assert.equal(interactive.code, 0);
  // What a peer sent is escaped before it reaches the terminal.
  const escaped = await runScript("udp.ts", ["send", "--port", port, "a\x1b[2Jb"]);
  assert.equal(escaped.stdout, "a\\x1b[2Jb\n");

  await using chat = await spawnUdpServer(["--mode", "chat"]);
  const chatted = await runScript("udp.ts", ["send", "--port", String(chat.port), "hi all"]);
  assert.equal(chatted.stdout, "guest-1: hi all\n", chatted.stderr);
  assert.equal(chatted.code, 0);
  const { code, stderr, exitMs } = await chat.stop("SIGTERM");
  assert.equal(code, 0);
  assert.ok(exitMs < 1000, `SIGTERM to exit took ${exitMs} ms`);
  assert.match(stderr, /^\+ 127\.0\.0\.1:\d+ joined as guest-1$/m);
});

Deno.test("udp cli: --drop 0.5 --seed drops the same datagrams every run, and the client counts them", async () => {
  const messages = Array.from({ length: 10 }, (_, i) => `m${i + 1}`);
  const dropLine =
    /^- dropped datagram #(\d+) from 127\.0\.0\.1:\d+ on purpose \(--drop 0\.5\): "([^"]*)" \(\d+ bytes\)$/gm;
  async function run() {
    const server = await spawnUdpServer(["--drop", "0.5", "--seed", "42"]);
    const client = await runScript("udp.ts", [
      "send",
      "--port",
      String(server.port),
      "--timeout",
      "300",
      ...messages,
    ]);
    const { code, stderr, exitMs } = await server.stop("SIGTERM");
    assert.equal(code, 0);
    assert.ok(exitMs < 1000, `SIGTERM to exit took ${exitMs} ms`);
    assertNoStackTrace(stderr + client.stderr);
    const dropped = [...stderr.matchAll(dropLine)].map(([, number, text]) => {
      // One client, so datagram #N is the Nth message it sent.
      assert.equal(text, `m${number}`);
      return Number(number);
    });
    return { port: server.port, client, dropped };
  }
  const first = await run();
  assert.ok(
    first.dropped.length > 0 && first.dropped.length < messages.length,
    `some but not all dropped: ${first.dropped}`,
  );
  // What the server dropped is exactly what did not come back, and counted.
  const echoed = messages.filter((_, i) => !first.dropped.includes(i + 1));
  assert.equal(first.client.stdout, echoed.map((m) => `${m}\n`).join(""));
  assert.equal(first.client.code, 1);
  assert.equal(
    first.client.stderr,
    `udp: udp://127.0.0.1:${first.port}: no reply to ${first.dropped.length} of 10 datagrams ` +
      "within 300 ms (lost, dropped, or nobody is listening: UDP does not say which)\n",
  );
  const second = await run();
  assert.deepEqual(second.dropped, first.dropped, "the same seed drops the same datagrams");
  assert.equal(second.client.stdout, first.client.stdout);
});

Deno.test("udp cli: a closed port gets 'nobody is listening' where ICMP shows, else 'no reply'", async () => {
  const port = await closedUdpPort();
  const { code, stdout, stderr } = await runScript("udp.ts", [
    "send",
    "--port",
    String(port),
    "--timeout",
    "200",
    "anyone?",
  ]);
  assert.equal(code, 1);
  assert.equal(stdout, "");
  // Deno 2.9.6's node:dgram never connects the socket for real, so the ICMP
  // "port unreachable" never reaches it: there, only the second can happen.
  const where = `udp://127.0.0.1:${port}`;
  assert.ok(
    stderr === `udp: nobody is listening on ${where} (ICMP port unreachable)\n` ||
      stderr === `udp: ${where}: no reply to 1 of 1 datagrams within 200 ms ` +
          "(lost, dropped, or nobody is listening: UDP does not say which)\n",
    stderr,
  );
});

Deno.test("udp cli: bad options print one line plus usage and exit 2; a port in use exits 1", async () => {
  const cases: [string[], RegExp][] = [
    [[], /^udp: say what to do: "serve" \(a server\) or "send" \(a client\)$/],
    [["listen"], /^udp: unknown command "listen": use "serve" or "send"$/],
    [["serve", "--drop", "2"], /--drop must be a number from 0 to 1 .*, got "2"$/],
    [["serve", "--drop", "half"], /--drop must be a number from 0 to 1/],
    [["serve", "--seed", "x"], /--seed must be an integer from 0 to 4294967295, got "x"/],
    [["serve", "--seed", "-1"], /--seed needs a value; .* write --seed=VALUE/],
    [["serve", "--mode", "shout"], /--mode must be echo or chat, got "shout"/],
    [["serve", "--port", "70000"], /--port must be an integer from 0 to 65535, got "70000"/],
    [["serve", "--idle-timeout", "soon"], /--idle-timeout must be an integer at least 0/],
    [["send", "--timeout", "0", "x"], /--timeout must be an integer at least 1, got "0"/],
    [["send", "--drop", "1", "x"], /Unknown option '--drop'/],
  ];
  for (const [args, expected] of cases) {
    const { code, stdout, stderr } = await runScript("udp.ts", args);
    assert.equal(code, 2, `udp.ts ${args.join(" ")}`);
    assert.equal(stdout, "");
    const [first, blank, usage] = stderr.split("\n");
    assert.match(first, expected);
    assert.equal(blank, "");
    assert.match(usage, /^Usage: udp\.ts serve/);
    assertNoStackTrace(stderr);
  }
  const taken = dgram.createSocket("udp4");
  await new Promise<void>((resolve) => taken.bind(0, "127.0.0.1", resolve));
  try {
    const { code, stdout, stderr } = await runScript("udp.ts", [
      "serve",
      "--port",
      String(taken.address().port),
    ]);
    assert.equal(code, 1);
    assert.equal(stdout, "");
    assert.match(
      stderr,
      /^udp: cannot listen on udp:\/\/127\.0\.0\.1:\d+: address already in use .*\n$/,
    );
  } finally {
    await new Promise<void>((resolve) => taken.close(() => resolve()));
  }
});

Deno.test("udp cli: SIGINT and SIGTERM, even right after the listening line, exit 0 within a second", async () => {
  for (const signal of ["SIGINT", "SIGTERM"] as const) {
    await using server = await spawnUdpServer(["--mode", "chat"]);
    const { code, exitMs } = await server.stop(signal);
    assert.equal(code, 0, `${signal}: exit code`);
    assert.ok(exitMs < 1000, `${signal} to exit took ${exitMs} ms`);
  }
});

// ================================================================ bridge.ts
//
// One room, two transports: TCP clients in a WebSocket chat and WebSocket
// clients in a TCP chat, through bridge.ts. Every wait is for an event; the
// upstream servers the tests write themselves record what reached them.

/** Items that arrive one by one (messages, close events), awaited in order. */
function inbox<T>() {
  const items: T[] = [];
  let wake = () => {};
  return {
    items,
    push(item: T) {
      items.push(item);
      wake();
    },
    async next(what = "the next item"): Promise<T> {
      await within(
        (async () => {
          while (items.length === 0) await new Promise<void>((resolve) => wake = resolve);
        })(),
        what,
      );
      return items.shift()!;
    },
  };
}

/**
 * A WebSocket server that records what each connection sends and how it
 * closes; `onOpen` may talk to the connection.
 */
function recordingWsServer(onOpen: (socket: WebSocket) => void = () => {}) {
  const messages = inbox<string | ArrayBuffer>();
  const closes = inbox<CloseEvent>();
  const server = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen: quiet }, (request) => {
    const { socket, response } = Deno.upgradeWebSocket(request);
    socket.binaryType = "arraybuffer";
    socket.onmessage = (event) => messages.push(event.data);
    socket.onclose = (event) => closes.push(event);
    socket.onopen = () => onOpen(socket);
    return response;
  });
  return {
    url: `ws://127.0.0.1:${server.addr.port}/`,
    messages,
    closes,
    [Symbol.asyncDispose]: () => server.shutdown(),
  };
}

/** A TCP listener whose connections a test accepts and talks to itself. */
function rawTcpServer() {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  return {
    url: `tcp://127.0.0.1:${listener.addr.port}`,
    accept: () => within(listener.accept(), "the bridge to connect upstream"),
    [Symbol.dispose]: () => listener.close(),
  };
}

/** Every byte from `conn` until its FIN. */
async function readUntilEof(conn: Deno.Conn): Promise<Uint8Array> {
  const chunks: Uint8Array[] = [];
  const buf = new Uint8Array(64 * 1024);
  for (let n = await conn.read(buf); n !== null; n = await conn.read(buf)) {
    chunks.push(buf.slice(0, n));
  }
  return concat(chunks);
}

/**
 * ws_client.ts's runWsClient as a chat participant: `say` sends a line the
 * way typing it would, `next` awaits what it prints, `leave` ends its input
 * (it closes with 1000) and returns everything it was sent in order.
 */
function wsClientSession(url: string) {
  const said = inbox<string | null>();
  const received = inbox<string>();
  const all: string[] = [];
  async function* messages() {
    for (let text = await said.next(); text !== null; text = await said.next()) yield text;
  }
  const running = runWsClient({
    url,
    messages: messages(),
    onMessage: (data) => {
      all.push(String(data));
      received.push(String(data));
    },
  });
  return {
    say: (text: string) => said.push(text),
    next: () => received.next("a message for ws_client"),
    async leave() {
      said.push(null);
      const close = await within(running, "ws_client to close");
      return { close, all };
    },
  };
}

/** The bridge as a real process: spawnServer, listening where its `--listen` in `args` says. */
function spawnBridge(args: string[]) {
  return spawnServer("bridge.ts", args, { listenArgs: [] });
}

Deno.test("bridge tcp→ws: nc-style TCP clients and ws_client.ts in one ws_server chat, each message once", async () => {
  await using chat = startWsServer({ port: 0, mode: "chat", log: quiet });
  const wsUrl = `ws://127.0.0.1:${chat.addr.port}/`;
  await using bridge = startBridge({ listen: "tcp://127.0.0.1:0", to: wsUrl, log: quiet });

  // One at a time, so the names are known: guest-1 is ws_client.ts.
  const web = wsClientSession(wsUrl);
  assert.equal(await web.next(), "* you are guest-1");
  web.say("hi, I'm on WebSocket");
  assert.equal(await web.next(), "guest-1: hi, I'm on WebSocket");
  const a = await connectTcp(bridge.addr.port);
  assert.equal(await web.next(), "* guest-2 joined");
  // The server's notice to a newcomer crosses the bridge like any message.
  assert.equal(await a.readLine(), "* you are guest-2");
  const b = await connectTcp(bridge.addr.port);
  assert.equal(await b.readLine(), "* you are guest-3");
  assert.equal(await web.next(), "* guest-3 joined");
  assert.equal(await a.readLine(), "* guest-3 joined");

  await a.write("hello from a TCP socket\r\n");
  for (const peer of [a, b]) {
    assert.equal(await peer.readLine(), "guest-2: hello from a TCP socket");
  }
  assert.equal(await web.next(), "guest-2: hello from a TCP socket");
  web.say("hello from ws_client");
  for (const peer of [a, b]) assert.equal(await peer.readLine(), "guest-1: hello from ws_client");
  assert.equal(await web.next(), "guest-1: hello from ws_client");

  // b's FIN: the bridge closes upstream with 1000, the room hears it leave,
  // and b gets its FIN back once the server has answered.
  await b.write("bye ✓");
  await b.conn.closeWrite();
  assert.deepEqual(await b.readLinesToEnd(), ["guest-3: bye ✓"]);
  b.close();
  assert.deepEqual([await a.readLine(), await a.readLine()], ["guest-3: bye ✓", "* guest-3 left"]);

  const { close, all } = await web.leave();
  assert.equal(close.code, 1000);
  assert.deepEqual(all, [
    "* you are guest-1",
    "guest-1: hi, I'm on WebSocket",
    "* guest-2 joined",
    "* guest-3 joined",
    "guest-2: hello from a TCP socket",
    "guest-1: hello from ws_client",
    "guest-3: bye ✓",
    "* guest-3 left",
  ]);
  assert.equal(await a.readLine(), "* guest-1 left");
  await a.conn.closeWrite();
  assert.deepEqual(await a.readLinesToEnd(), [], "nothing twice, nothing more");
  a.close();
});

Deno.test("bridge ws→tcp: ws_client.ts and a WebSocket join a tcp_server chat with a raw TCP client", async () => {
  await using chat = startTcpServer({ port: 0, mode: "chat", log: quiet });
  await using bridge = startBridge({
    listen: "ws://127.0.0.1:0/",
    to: `tcp://127.0.0.1:${chat.addr.port}`,
    log: quiet,
  });
  const bridgeUrl = `ws://127.0.0.1:${bridge.addr.port}/`;

  using nc = await connectTcp(chat.addr.port);
  assert.equal(await nc.readLine(), "* you are guest-1");
  await nc.write("nc here\n");
  assert.equal(await nc.readLine(), "guest-1: nc here");
  const web = wsClientSession(bridgeUrl);
  assert.equal(await nc.readLine(), "* guest-2 joined");
  assert.equal(await web.next(), "* you are guest-2");
  const page = await openWs(bridgeUrl);
  assert.equal(await nc.readLine(), "* guest-3 joined");
  assert.equal(await web.next(), "* guest-3 joined");
  assert.equal(await page.next(), "* you are guest-3");

  web.say("from ws_client");
  assert.equal(await nc.readLine(), "guest-2: from ws_client");
  assert.equal(await web.next(), "guest-2: from ws_client");
  assert.equal(await page.next(), "guest-2: from ws_client");
  page.socket.send("from a WebSocket ✓");
  assert.equal(await nc.readLine(), "guest-3: from a WebSocket ✓");
  assert.equal(await web.next(), "guest-3: from a WebSocket ✓");
  assert.equal(await page.next(), "guest-3: from a WebSocket ✓");
  await nc.write("hi both\n");
  assert.equal(await nc.readLine(), "guest-1: hi both");
  assert.equal(await web.next(), "guest-1: hi both");
  assert.equal(await page.next(), "guest-1: hi both");

  // The page closes: a FIN to tcp_server, which says it left.
  await page[Symbol.asyncDispose]();
  assert.equal(await nc.readLine(), "* guest-3 left");
  const { close, all } = await web.leave();
  assert.equal(close.code, 1000);
  assert.deepEqual(all, [
    "* you are guest-2",
    "* guest-3 joined",
    "guest-2: from ws_client",
    "guest-3: from a WebSocket ✓",
    "guest-1: hi both",
    "* guest-3 left",
  ]);
  assert.deepEqual(page.messages, [], "nothing twice");
  assert.equal(await nc.readLine(), "* guest-2 left");
  await nc.conn.closeWrite();
  assert.deepEqual(await nc.readLinesToEnd(), []);
});

Deno.test("bridge: split and merged TCP writes still make whole messages, both ways", async () => {
  await using upstream = recordingWsServer();
  await using toWs = startBridge({ listen: "tcp://127.0.0.1:0", to: upstream.url, log: quiet });
  {
    using client = await connectTcp(toWs.addr.port);
    client.conn.setNoDelay(true);
    await client.write("one\ntwo\n\nthr");
    assert.deepEqual(
      [await upstream.messages.next(), await upstream.messages.next()],
      ["one", "two"],
    );
    assert.equal(await upstream.messages.next(), "", "an empty line is an empty message");
    await client.write("ee\r\n");
    assert.equal(await upstream.messages.next(), "three");
    for (const byte of encoder.encode("fünf ✓\n")) await client.write(Uint8Array.of(byte));
    assert.equal(await upstream.messages.next(), "fünf ✓");
    await client.write(Uint8Array.of(0x68, 0xff, 0x69, 0x0a));
    assert.equal(await upstream.messages.next(), "h\uFFFDi", "not UTF-8: U+FFFD");
    await client.write("no newline at the end");
    await client.conn.closeWrite();
    assert.equal(await upstream.messages.next(), "no newline at the end");
    assert.equal((await upstream.closes.next()).code, 1000);
    assert.deepEqual(upstream.messages.items, []);
  }

  using tcp = rawTcpServer();
  await using toTcp = startBridge({ listen: "ws://127.0.0.1:0/", to: tcp.url, log: quiet });
  await using ws = await openWs(`ws://127.0.0.1:${toTcp.addr.port}/`);
  using server = await tcp.accept();
  await server.write(encoder.encode("alpha\nbe"));
  assert.equal(await ws.next(), "alpha");
  await server.write(encoder.encode("ta\r\ngamma\ndelta\n"));
  assert.deepEqual([await ws.next(), await ws.next(), await ws.next()], ["beta", "gamma", "delta"]);
  // A message holding a newline is written as it is, plus its own "\n".
  ws.socket.send("two\nlines");
  ws.socket.send("");
  ws.socket.close(1000);
  assert.deepEqual(decoder.decode(await readUntilEof(server)), "two\nlines\n\n");
});

Deno.test("bridge: FIN becomes close 1000 and a close becomes a FIN, in both directions", async (t) => {
  await t.step(
    "tcp client's FIN → close 1000 upstream, after its lines; it still hears back",
    async () => {
      await using upstream = recordingWsServer((socket) => {
        socket.send("welcome");
        // A FIN is a half-close: the client still reads what comes after it.
        socket.addEventListener("message", () => socket.send("got it"));
      });
      await using bridge = startBridge({
        listen: "tcp://127.0.0.1:0",
        to: upstream.url,
        log: quiet,
      });
      using client = await connectTcp(bridge.addr.port);
      assert.equal(await client.readLine(), "welcome");
      await client.write("last words\n");
      await client.conn.closeWrite();
      assert.equal(await upstream.messages.next(), "last words");
      const close = await upstream.closes.next();
      assert.equal(close.code, 1000);
      assert.deepEqual(await client.readLinesToEnd(), ["got it"], "then the client gets its FIN");
    },
  );

  await t.step(
    "upstream's close → FIN to the tcp client, after every message before it",
    async () => {
      // 48 MiB and then the close, to a client that reads only after it:
      // more than the kernel's buffers hold (up to 36 MiB on Linux
      // loopback), so much is still queued in the bridge when the close
      // comes, and all of it must be written before the FIN.
      const COUNT = 768;
      await using upstream = recordingWsServer((socket) => {
        for (let i = 0; i < COUNT; i++) socket.send(`${i} ${"m".repeat(64 * 1024)}`);
        socket.close(1001, "going away");
      });
      const logs = awaitableLog();
      await using bridge = startBridge({
        listen: "tcp://127.0.0.1:0",
        to: upstream.url,
        maxQueue: 128 * 1024 * 1024,
        log: logs.push,
      });
      using client = await connectTcp(bridge.addr.port);
      assert.equal((await upstream.closes.next()).code, 1001);
      const lines = await client.readLinesToEnd();
      assert.equal(lines.length, COUNT);
      assert.ok(lines.every((line, i) => line.startsWith(`${i} `)), "in order");
      client.close();
      assert.match(
        await logs.next(/^- /),
        /^- 127\.0\.0\.1:\d+ disconnected: close 1001 going away → FIN; 0 lines → 0 messages, 768 messages → \d+ bytes$/,
      );
    },
  );

  await t.step("ws client's close → FIN to the tcp server, after its messages", async () => {
    using tcp = rawTcpServer();
    await using bridge = startBridge({ listen: "ws://127.0.0.1:0/", to: tcp.url, log: quiet });
    await using ws = await openWs(`ws://127.0.0.1:${bridge.addr.port}/`);
    ws.socket.send("a");
    ws.socket.send("b");
    ws.socket.close(1000, "done");
    using server = await tcp.accept();
    assert.equal(decoder.decode(await readUntilEof(server)), "a\nb\n");
    assert.equal((await ws.closed).code, 1000);
  });

  await t.step("tcp server's FIN → close 1000 to the ws client, after its lines", async () => {
    using tcp = rawTcpServer();
    await using bridge = startBridge({ listen: "ws://127.0.0.1:0/", to: tcp.url, log: quiet });
    await using ws = await openWs(`ws://127.0.0.1:${bridge.addr.port}/`);
    using server = await tcp.accept();
    await server.write(encoder.encode("see you\nlater"));
    await server.closeWrite();
    assert.deepEqual([await ws.next(), await ws.next()], ["see you", "later"]);
    const close = await ws.closed;
    assert.equal(close.code, 1000);
    assert.equal(close.wasClean, true);
    assert.equal((await readUntilEof(server)).length, 0, "and the bridge's FIN comes back");
  });
});

Deno.test("bridge: --framing raw, a read is a binary message and a message's bytes are written as they are", async () => {
  await using upstream = recordingWsServer();
  await using toWs = startBridge({
    listen: "tcp://127.0.0.1:0",
    to: upstream.url,
    framing: "raw",
    log: quiet,
  });
  {
    using client = await connectTcp(toWs.addr.port);
    await client.write("no\nlines\nhere");
    const first = await upstream.messages.next();
    assert.ok(first instanceof ArrayBuffer, "binary");
    assert.equal(decoder.decode(first), "no\nlines\nhere");
    await client.write(allBytes());
    assert.deepEqual(new Uint8Array(await upstream.messages.next() as ArrayBuffer), allBytes());
    await client.conn.closeWrite();
    assert.equal((await upstream.closes.next()).code, 1000);
  }

  using tcp = rawTcpServer();
  await using toTcp = startBridge({
    listen: "ws://127.0.0.1:0/",
    to: tcp.url,
    framing: "raw",
    log: quiet,
  });
  await using ws = await openWs(`ws://127.0.0.1:${toTcp.addr.port}/`);
  using server = await tcp.accept();
  await server.write(allBytes());
  const received = await ws.next();
  assert.ok(received instanceof ArrayBuffer);
  assert.deepEqual(new Uint8Array(received), allBytes());
  ws.socket.send("text, no newline");
  ws.socket.send(Uint8Array.of(0, 1, 2));
  ws.socket.close();
  assert.deepEqual(
    await readUntilEof(server),
    new Uint8Array([...encoder.encode("text, no newline"), 0, 1, 2]),
  );
});

Deno.test("bridge: a refused upstream: the tcp client gets an error line, the ws client 1011", async () => {
  const port = closedPort();
  const logs = awaitableLog();
  await using toWs = startBridge({
    listen: "tcp://127.0.0.1:0",
    to: `ws://127.0.0.1:${port}/`,
    log: logs.push,
  });
  using client = await connectTcp(toWs.addr.port);
  assert.deepEqual(await client.readLinesToEnd(), [
    `* error: cannot reach ws://127.0.0.1:${port}/: connection refused (is the server running?)`,
  ]);
  client.close();
  assert.match(await logs.next(/^- /), /disconnected: cannot reach ws:\/\/127\.0\.0\.1:\d+\//);

  // Upgraded first, then told why in the close frame (at most 123 bytes).
  await using toTcp = startBridge({
    listen: "ws://127.0.0.1:0/",
    to: `tcp://127.0.0.1:${port}`,
    log: quiet,
  });
  await using ws = await openWs(`ws://127.0.0.1:${toTcp.addr.port}/`);
  const close = await ws.closed;
  assert.equal(close.code, 1011);
  assert.match(close.reason, /^cannot reach tcp:\/\/127\.0\.0\.1:\d+: connection refused/);
  assert.ok(encoder.encode(close.reason).length <= 123);
});

Deno.test("bridge: an upstream that never answers the handshake is given up on", async () => {
  // A TCP server where a WebSocket server should be: it takes the
  // connection and never answers the upgrade.
  using silent = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  await using bridge = startBridge({
    listen: "tcp://127.0.0.1:0",
    to: `ws://127.0.0.1:${silent.addr.port}/`,
    handshakeTimeout: 200,
    log: quiet,
  });
  using client = await connectTcp(bridge.addr.port);
  using upstream = await within(silent.accept(), "the bridge to dial upstream");
  assert.deepEqual(await within(client.readLinesToEnd(), "the error line"), [
    `* error: cannot reach ws://127.0.0.1:${silent.addr.port}/: ` +
    "no WebSocket handshake within 200 ms (is it a WebSocket server?)",
  ]);
  assert.equal((await readUntilEof(upstream)).length > 0, true, "it had sent its request");
});

Deno.test("bridge: a line over --max-message is refused like tcp_server refuses one", async () => {
  await using upstream = recordingWsServer();
  await using bridge = startBridge({
    listen: "tcp://127.0.0.1:0",
    to: upstream.url,
    maxMessage: 16,
    log: quiet,
  });
  using client = await connectTcp(bridge.addr.port);
  await client.write("short\n" + "x".repeat(40) + "\n");
  assert.equal(await upstream.messages.next(), "short");
  assert.deepEqual(await client.readLinesToEnd(), ["* error: line too long (max 16 bytes)"]);
  const close = await upstream.closes.next();
  assert.equal(close.code, 4000);
  assert.match(close.reason, /line too long/);
  assert.deepEqual(upstream.messages.items, []);
});

Deno.test("bridge: a TCP client that does not read is cut off past --max-queue, with a reason", async () => {
  const line = "y".repeat(1023) + "\n";
  // 64 MiB: more than the kernel's buffers between us and the bridge hold
  // (up to 36 MiB on Linux loopback) plus --max-queue.
  const COUNT = 64 * 1024;
  await using upstream = recordingWsServer((socket) => {
    for (let i = 0; i < COUNT; i++) socket.send(line.slice(0, -1));
  });
  const logs = awaitableLog();
  await using bridge = startBridge({
    listen: "tcp://127.0.0.1:0",
    to: upstream.url,
    maxQueue: 64 * 1024,
    log: logs.push,
  });
  using client = await connectTcp(bridge.addr.port);
  // Dropped: the bridge leaves the chat at once (a private close code, as
  // a WebSocket client may only send 1000 or 3000-4999).
  const close = await upstream.closes.next();
  assert.equal(close.code, 4000);
  assert.match(close.reason, /too slowly/);
  // It reads again, within the bridge's 2-s linger, so as fast as it can
  // (tens of MiB wait in the kernel's buffers): whole lines, fewer than were
  // sent, then the reason, then the FIN.
  const { newlines, tail } = await drainKeepingTail(client.conn, 64 * 1024);
  const lines = decoder.decode(tail).split("\n").slice(1, -1);
  assert.equal(lines.at(-1), "* error: too slow, disconnected");
  assert.ok(newlines - 1 < COUNT, `${newlines - 1} lines got through`);
  assert.ok(lines.slice(0, -1).every((got) => got === line.slice(0, -1)), "whole lines only");
  assert.match(await logs.next(/^- /), /disconnected: too slow, disconnected; /);
});

Deno.test("bridge: towards WebSocket it stops reading TCP while bufferedAmount is high", async () => {
  // Upstream is ws_server.ts echo behind a relay the test can pause: while
  // paused, nothing the bridge sends leaves it. A bridge that kept reading
  // would hold every byte the client writes; this one makes the client's
  // writes wait. There is no event for "a write is waiting", so a write
  // that has not finished after a second counts as stalled.
  await using echo = startWsServer({ port: 0, maxQueue: 256 * 1024 * 1024, log: quiet });
  using relayListener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  let paused = Promise.withResolvers<void>();
  paused.resolve();
  const relay = (async () => {
    using down = await relayListener.accept();
    using up = await Deno.connect({ hostname: "127.0.0.1", port: echo.addr.port });
    const pipe = async (from: Deno.Conn, to: Deno.Conn, gate: boolean) => {
      const buf = new Uint8Array(64 * 1024);
      try {
        for (;;) {
          if (gate) await paused.promise;
          const n = await from.read(buf);
          if (n === null) break;
          for (let done = 0; done < n;) done += await to.write(buf.subarray(done, n));
        }
        await to.closeWrite();
      } catch {
        // The other side is gone.
      }
    };
    await Promise.all([pipe(down, up, true), pipe(up, down, false)]);
  })();
  await using bridge = startBridge({
    listen: "tcp://127.0.0.1:0",
    to: `ws://127.0.0.1:${relayListener.addr.port}/`,
    maxQueue: 256 * 1024 * 1024,
    log: quiet,
  });
  using client = await connectTcp(bridge.addr.port);
  await client.write("ping\n");
  assert.equal(await client.readLine(), "ping");
  paused = Promise.withResolvers<void>();

  let echoed = 0;
  const reading = client.drain().then((bytes) => echoed = bytes);
  const chunk = encoder.encode(("z".repeat(1023) + "\n").repeat(64));
  const cap = 128 * 1024 * 1024;
  let written = 0;
  let pending: Promise<void> | undefined;
  while (written < cap) {
    const write = client.write(chunk);
    const stalled = await within(write.then(() => false), "a write", 1000).catch(() => true);
    written += chunk.length;
    if (stalled) {
      pending = write;
      break;
    }
  }
  assert.ok(pending, `all ${written} bytes were taken: nothing held the client back`);
  assert.ok(written < 64 * 1024 * 1024, `${written} bytes were taken before writes waited`);

  // Let go: every line arrives and comes back, and the FIN ends it.
  paused.resolve();
  await within(pending, "the stalled write");
  await client.conn.closeWrite();
  await within(reading, "every echo");
  assert.equal(echoed, written);
  await relay;
});

Deno.test("bridge: 200 clients through one bridge, each way", async () => {
  const CLIENTS = 200;
  await using echo = startWsServer({ port: 0, log: quiet });
  {
    await using bridge = startBridge({
      listen: "tcp://127.0.0.1:0",
      to: `ws://127.0.0.1:${echo.addr.port}/`,
      log: quiet,
    });
    const clients = await Promise.all(
      Array.from({ length: CLIENTS }, () => connectTcp(bridge.addr.port)),
    );
    try {
      await Promise.all(clients.map((client, i) => client.write(`client ${i}\n`)));
      const replies = await within(
        Promise.all(clients.map((client) => client.readLine())),
        "200 echoes",
      );
      assert.deepEqual(replies, clients.map((_, i) => `client ${i}`));
      assert.equal(bridge.connections, CLIENTS);
      await Promise.all(clients.map((client) => client.conn.closeWrite()));
      const ends = await within(
        Promise.all(clients.map((client) => client.readLine())),
        "200 FINs",
      );
      assert.deepEqual(ends, clients.map(() => null));
    } finally {
      for (const client of clients) client.close();
    }
  }
  await using tcpEcho = startTcpServer({ port: 0, log: quiet });
  await using bridge = startBridge({
    listen: "ws://127.0.0.1:0/",
    to: `tcp://127.0.0.1:${tcpEcho.addr.port}`,
    log: quiet,
  });
  const url = `ws://127.0.0.1:${bridge.addr.port}/`;
  const sockets = await Promise.all(Array.from({ length: CLIENTS }, () => openWs(url)));
  try {
    sockets.forEach((ws, i) => ws.socket.send(`socket ${i}`));
    const replies = await within(Promise.all(sockets.map((ws) => ws.next())), "200 echoes");
    assert.deepEqual(replies, sockets.map((_, i) => `socket ${i}`));
  } finally {
    await Promise.all(sockets.map((ws) => ws[Symbol.asyncDispose]()));
  }
});

Deno.test("bridge ws://: the page at /, a bad Host is 400, a foreign Origin 403", async () => {
  using tcp = rawTcpServer();
  await using bridge = startBridge({ listen: "ws://127.0.0.1:0/", to: tcp.url, log: quiet });
  const base = `http://127.0.0.1:${bridge.addr.port}`;
  const page = await fetch(`${base}/`);
  assert.equal(page.status, 200);
  const html = await page.text();
  assert.match(html, /new WebSocket\(/);
  assert.ok(html.includes(tcp.url), "the page says where its messages go");
  const missing = await fetch(`${base}/nope`);
  assert.equal(missing.status, 404);
  await missing.body?.cancel();

  async function handshake(headers: string): Promise<string> {
    using conn = await Deno.connect({ hostname: "127.0.0.1", port: bridge.addr.port });
    await conn.write(encoder.encode(
      `GET / HTTP/1.1\r\n${headers}Upgrade: websocket\r\nConnection: Upgrade\r\n` +
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    ));
    let response = "";
    const buf = new Uint8Array(4096);
    while (!response.includes("\r\n\r\n")) {
      const n = await conn.read(buf);
      if (n === null) break;
      response += decoder.decode(buf.subarray(0, n));
    }
    return response.split("\r\n")[0];
  }
  const host = `Host: 127.0.0.1:${bridge.addr.port}\r\n`;
  assert.match(await handshake("Host: a b\r\n"), /^HTTP\/1\.1 400 /);
  assert.match(await handshake(`${host}Origin: https://evil.example\r\n`), /^HTTP\/1\.1 403 /);
  assert.match(await handshake(`${host}Origin: null\r\n`), /^HTTP\/1\.1 403 /);
  for (const origin of [`http://127.0.0.1:${bridge.addr.port}`, "http://localhost:3000"]) {
    assert.match(await handshake(`${host}Origin: ${origin}\r\n`), /^HTTP\/1\.1 101 /, origin);
    (await tcp.accept()).close();
  }
  assert.match(await handshake(host), /^HTTP\/1\.1 101 /, "no Origin: not a browser");
  (await tcp.accept()).close();
});

Deno.test("cli: bridge.ts refuses the same transport twice and bad URLs with exit 2", async () => {
  const cases: [string[], RegExp][] = [
    [
      ["--listen", "tcp://127.0.0.1:0", "--to", "tcp://127.0.0.1:9000"],
      /--listen and --to must be different transports/,
    ],
    [
      ["--listen", "ws://127.0.0.1:0/", "--to", "ws://127.0.0.1:8080/"],
      /different transports/,
    ],
    [["--to", "ws://127.0.0.1:8080/"], /--listen is required/],
    [["--listen", "tcp://127.0.0.1:0"], /--to is required/],
    [["--listen", "http://127.0.0.1:0", "--to", "tcp://127.0.0.1:1"], /--listen must be tcp:\/\//],
    [["--listen", "tcp://127.0.0.1", "--to", "ws://x/"], /--listen needs a host and a port/],
    [
      ["--listen", "tcp://127.0.0.1:0", "--to", "ws://127.0.0.1:1/", "--framing", "words"],
      /--framing must be lines or raw, got "words"/,
    ],
    [
      ["--listen", "tcp://127.0.0.1:0", "--to", "ws://127.0.0.1:1/", "--max-queue", "0"],
      /--max-queue must be an integer at least 1/,
    ],
  ];
  for (const [args, expected] of cases) {
    const { code, stdout, stderr } = await runScript("bridge.ts", args);
    assert.equal(code, 2, args.join(" "));
    assert.equal(stdout, "");
    const [first, blank, usage] = stderr.split("\n");
    assert.match(first, expected);
    assert.equal(blank, "");
    assert.match(usage, /^Usage: bridge\.ts/);
    assertNoStackTrace(stderr);
  }
});

Deno.test("cli: bridge.ts prints where it listens, logs each client, and exits 0 on SIGTERM and SIGINT", async () => {
  await using chat = startWsServer({ port: 0, mode: "chat", log: quiet });
  for (const [round, signal] of [[1, "SIGTERM"], [2, "SIGINT"]] as const) {
    const bridge = await spawnBridge([
      "--listen",
      "tcp://127.0.0.1:0",
      "--to",
      `ws://127.0.0.1:${chat.addr.port}/`,
    ]);
    assert.match(bridge.line, /^listening on tcp:\/\/127\.0\.0\.1:\d+$/);
    using client = await connectTcp(bridge.port);
    assert.equal(await client.readLine(), `* you are guest-${round}`);
    await client.write("hi\n");
    assert.equal(await client.readLine(), `guest-${round}: hi`);
    await client.conn.closeWrite();
    assert.equal(await client.readLine(), null);
    const { code, stderr, exitMs } = await bridge.stop(signal);
    assert.equal(code, 0);
    assert.ok(exitMs < 1000, `exited ${exitMs} ms after ${signal}`);
    assert.match(
      stderr,
      /^\+ 127\.0\.0\.1:\d+ connected, opening ws:\/\/127\.0\.0\.1:\d+\/\n- 127\.0\.0\.1:\d+ disconnected: FIN → close 1000; 1 line → 1 message, 2 messages → 30 bytes\n$/,
    );
  }
  using tcp = rawTcpServer();
  await using wsBridge = await spawnBridge(["--listen", "ws://127.0.0.1:0/", "--to", tcp.url]);
  assert.match(wsBridge.line, /^listening on ws:\/\/127\.0\.0\.1:\d+\/$/);
  assert.equal((await wsBridge.stop()).code, 0);
});

Deno.test("bridge ws://: a message too big is 1009, a line too long from upstream 1011", async (t) => {
  await t.step("a WebSocket message over --max-message: 1009, and a FIN upstream", async () => {
    using tcp = rawTcpServer();
    await using bridge = startBridge({
      listen: "ws://127.0.0.1:0/",
      to: tcp.url,
      maxMessage: 16,
      log: quiet,
    });
    await using ws = await openWs(`ws://127.0.0.1:${bridge.addr.port}/`);
    using server = await tcp.accept();
    ws.socket.send("fits");
    ws.socket.send("x".repeat(17));
    const close = await within(ws.closed, "the close");
    assert.equal(close.code, 1009);
    assert.equal(close.reason, "message too big (max 16 bytes)");
    assert.equal(decoder.decode(await readUntilEof(server)), "fits\n");
  });

  await t.step("a line from the TCP server over --max-message: 1011", async () => {
    using tcp = rawTcpServer();
    await using bridge = startBridge({
      listen: "ws://127.0.0.1:0/",
      to: tcp.url,
      maxMessage: 16,
      log: quiet,
    });
    await using ws = await openWs(`ws://127.0.0.1:${bridge.addr.port}/`);
    using server = await tcp.accept();
    await server.write(encoder.encode("short\n" + "y".repeat(40)));
    assert.equal(await ws.next(), "short");
    const close = await within(ws.closed, "the close");
    assert.equal(close.code, 1011);
    assert.equal(close.reason, "the TCP server sent a line too long (max 16 bytes)");
  });
});

Deno.test("bridge: a close reason a peer chose reaches the log escaped", async () => {
  await using upstream = recordingWsServer((socket) =>
    socket.close(4321, "bye\n- 127.0.0.1:1 disconnected: forged\x1b[2J\u202e")
  );
  const logs = awaitableLog();
  await using bridge = startBridge({
    listen: "tcp://127.0.0.1:0",
    to: upstream.url,
    log: logs.push,
  });
  using client = await connectTcp(bridge.addr.port);
  assert.equal(await client.readLine(), null);
  const line = await logs.next(/^- /);
  assert.ok(
    line.includes(
      String.raw`close 4321 bye\n- 127.0.0.1:1 disconnected: forged\x1b[2J\u202e → FIN`,
    ),
    line,
  );
  // deno-lint-ignore no-control-regex
  assert.doesNotMatch(line, /[\x00-\x1f\u202e]/);
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
  // Every wait is woken by each event: two tests' waits may be pending at once.
  const waiters = new Set<() => void>();
  const wake = () => {
    for (const resolve of waiters) resolve();
    waiters.clear();
  };
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
            await new Promise<void>((resolve) => waiters.add(resolve));
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
  using upstream = bufferedConn(await accepted);
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
  const reference = await Deno.readTextFile(scriptPath("docs/reference.md"));
  const section = reference.split("\n### wire.ts --json events\n")[1]?.split("\n#")[0];
  assert.ok(section, 'docs/reference.md has a "### wire.ts --json events" section');
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
// ------------------------------------------------------ TLS: the two clients

/** A TLS echo server on a free port; a refused handshake just ends that connection. */
function tlsEchoServer(pair: { cert: string; key: string }) {
  const listener = Deno.listenTls({ hostname: "127.0.0.1", port: 0, ...pair });
  const conns = new Set<Deno.TlsConn>();
  const served: Promise<void>[] = [];
  async function echo(conn: Deno.TlsConn) {
    try {
      const buffer = new Uint8Array(64 * 1024);
      for (let n = await conn.read(buffer); n !== null; n = await conn.read(buffer)) {
        for (let done = 0; done < n;) done += await conn.write(buffer.subarray(done, n));
      }
    } catch {
      // The client refused our certificate, or spoke no TLS.
    } finally {
      conns.delete(conn);
      conn.close();
    }
  }
  const accepting = (async () => {
    for await (const conn of listener) (conns.add(conn), served.push(echo(conn)));
  })();
  return {
    port: listener.addr.port,
    async [Symbol.asyncDispose]() {
      listener.close();
      await accepting.catch(() => {});
      for (const conn of conns) conn.close();
      await Promise.allSettled(served);
    },
  };
}

/** A wss:// echo server (Deno.serve with a certificate) on a free port. */
function wssEchoServer(pair: { cert: string; key: string }) {
  return Deno.serve({ hostname: "127.0.0.1", port: 0, onListen: quiet, ...pair }, (request) => {
    const { socket, response } = Deno.upgradeWebSocket(request);
    socket.onmessage = (event) => socket.send(event.data);
    return response;
  });
}

Deno.test("tls: tcp_client --tls trusts --ca, and refuses a wrong CA, a wrong name, an expired certificate in one line each", async () => {
  await using certs = await testCertificates();
  await using good = tlsEchoServer(certs.good);
  await using wrongName = tlsEchoServer(certs.wrongName);
  await using expired = tlsEchoServer(certs.expired);
  await using caAsServer = tlsEchoServer(certs.caAsServer);
  const client = (port: number, ...args: string[]) =>
    runScript("tcp_client.ts", ["--port", String(port), "--tls", ...args, "hello"]);

  const trusted = await client(good.port, "--ca", certs.files.ca);
  assert.deepEqual(trusted, { code: 0, stdout: "hello\n", stderr: "" });

  const refusals: [number, string, RegExp][] = [
    [
      good.port,
      certs.files.otherCa,
      /certificate refused: unknown issuer, .*trust its CA with --ca FILE/,
    ],
    [
      wrongName.port,
      certs.files.ca,
      /certificate refused: name mismatch, it is for example\.com, not 127\.0\.0\.1;/,
    ],
    [expired.port, certs.files.ca, /certificate refused: expired; the server needs a new one/],
    [
      caAsServer.port,
      certs.files.ca,
      /certificate refused: the server shows a CA certificate as its own;/,
    ],
  ];
  for (const [port, ca, expected] of refusals) {
    const { code, stdout, stderr } = await client(port, "--ca", ca);
    assert.equal(code, 1, stderr);
    assert.equal(stdout, "");
    assert.match(
      stderr,
      new RegExp(`^tcp_client: 127\\.0\\.0\\.1:${port}: ${expected.source}.*\n$`),
    );
    assertNoStackTrace(stderr);
  }
});

Deno.test("tls: tcp_client --insecure accepts any certificate, and says so on stderr", async () => {
  await using certs = await testCertificates();
  await using server = tlsEchoServer(certs.wrongName);
  const { code, stdout, stderr } = await runScript("tcp_client.ts", [
    "--port",
    String(server.port),
    "--tls",
    "--insecure",
    "hello",
    "again",
  ]);
  assert.equal(code, 0, stderr);
  assert.equal(stdout, "hello\nagain\n");
  assert.match(stderr, /^tcp_client: WARNING: --insecure: .*certificate is not checked; .*\n$/);
});

Deno.test("tls: a plain tcp_client on a TLS port, and --tls on a plain port, are refused with what to do", async () => {
  await using certs = await testCertificates();
  await using tls = tlsEchoServer(certs.good);
  const plain = await runScript("tcp_client.ts", ["--port", String(tls.port), "hello"]);
  assert.equal(plain.code, 1);
  assert.equal(plain.stdout, "", "no TLS alert bytes on stdout");
  assert.match(
    plain.stderr,
    /^tcp_client: \S+: the server answered with a TLS alert: it speaks TLS; connect with --tls .*\n$/,
  );
  await using echo = startTcpServer({ port: 0, log: quiet });
  await using chat = startTcpServer({ port: 0, mode: "chat", log: quiet });
  for (const port of [echo.addr.port, chat.addr.port]) {
    const run = await runScript("tcp_client.ts", ["--port", String(port), "--tls", "hello"]);
    assert.equal(run.code, 1);
    assert.match(
      run.stderr,
      /^tcp_client: \S+: the server does not speak TLS \(.*leave out --tls\)\n$/,
    );
  }
});

Deno.test("tls: ws_client wss:// trusts --ca, refuses a wrong CA, a wrong name, an expired certificate in one line each", async () => {
  await using certs = await testCertificates();
  await using good = wssEchoServer(certs.good);
  await using wrongName = wssEchoServer(certs.wrongName);
  await using expired = wssEchoServer(certs.expired);
  await using caAsServer = wssEchoServer(certs.caAsServer);
  const url = (port: number) => `wss://127.0.0.1:${port}/`;
  const client = (port: number, ca: string) =>
    runScript("ws_client.ts", ["--url", url(port), "--ca", ca, "hello"]);

  const trusted = await client(good.addr.port, certs.files.ca);
  assert.deepEqual(trusted, { code: 0, stdout: "hello\n", stderr: "" });

  const refusals: [number, string, RegExp][] = [
    [
      good.addr.port,
      certs.files.otherCa,
      /certificate refused: unknown issuer, .*trust its CA with --ca FILE/,
    ],
    [
      wrongName.addr.port,
      certs.files.ca,
      /certificate refused: name mismatch, it is for example\.com, not 127\.0\.0\.1;/,
    ],
    [expired.addr.port, certs.files.ca, /certificate refused: expired; the server needs a new one/],
    [
      caAsServer.addr.port,
      certs.files.ca,
      /certificate refused: the server shows a CA certificate as its own;/,
    ],
  ];
  for (const [port, ca, expected] of refusals) {
    const { code, stdout, stderr } = await client(port, ca);
    assert.equal(code, 1, stderr);
    assert.equal(stdout, "");
    assert.match(stderr, new RegExp(`^ws_client: ${url(port)}: ${expected.source}.*\n$`));
    assert.match(stderr, /--unsafely-ignore-certificate-errors=127\.0\.0\.1/);
    assert.doesNotMatch(stderr, /unknown host/);
  }
});

Deno.test("tls: ws_client refuses ws:// on a TLS port, wss:// on a plain one, and a --ca that holds no certificate", async () => {
  await using certs = await testCertificates();
  await using tls = wssEchoServer(certs.good);
  const plainOnTls = await runScript("ws_client.ts", [
    "--url",
    `ws://127.0.0.1:${tls.addr.port}/`,
    "x",
  ]);
  assert.equal(plainOnTls.code, 1);
  assert.match(plainOnTls.stderr, /does not speak HTTP, .*a TLS port wants wss:\/\/\)\n$/);
  await using plain = startWsServer({ port: 0, log: quiet });
  const tlsOnPlain = await runScript("ws_client.ts", [
    "--url",
    `wss://127.0.0.1:${plain.addr.port}/`,
    "x",
  ]);
  assert.equal(tlsOnPlain.code, 1);
  assert.match(
    tlsOnPlain.stderr,
    /: the server does not speak TLS \(a ws:\/\/ server\? then use ws:\/\/\)\n$/,
  );
  const notPem = await runScript("ws_client.ts", [
    "--url",
    `wss://127.0.0.1:${tls.addr.port}/`,
    "--ca",
    scriptPath("deno.json"),
    "x",
  ]);
  assert.equal(notPem.code, 1);
  assert.match(notPem.stderr, /^ws_client: \S+: --ca \S+deno\.json holds no PEM certificate .*\n$/);
});

// ------------------------------------------- ws_client: what rides on the handshake

Deno.test("ws_client: --protocol, --header and --origin reach the server, the chosen subprotocol is printed", async () => {
  const seen: Record<string, string>[] = [];
  await using server = Deno.serve(
    { hostname: "127.0.0.1", port: 0, onListen: quiet },
    (request) => {
      seen.push(Object.fromEntries(request.headers));
      // The server picks the second offer, to show that the choice is its own.
      const { socket, response } = Deno.upgradeWebSocket(request, { protocol: "chat.v2" });
      socket.onmessage = (event) => socket.send(event.data);
      return response;
    },
  );
  const url = `ws://127.0.0.1:${server.addr.port}/`;
  const { code, stdout, stderr } = await runScript("ws_client.ts", [
    "--url",
    url,
    "--protocol",
    "chat.v1,chat.v2",
    "--protocol",
    "chat.v3",
    "--header",
    "X-Token: s3cret",
    "--header",
    "X-Trace:  two words ",
    "--origin",
    "http://localhost:3000/app/page.html",
    "hello",
  ]);
  assert.equal(code, 0, stderr);
  assert.equal(stdout, "hello\n");
  assert.equal(stderr, `ws_client: ${url}: subprotocol: chat.v2\n`);
  assert.equal(seen.length, 1);
  assert.equal(seen[0]["sec-websocket-protocol"], "chat.v1, chat.v2, chat.v3");
  assert.equal(seen[0]["x-token"], "s3cret");
  assert.equal(seen[0]["x-trace"], "two words");
  assert.equal(seen[0]["origin"], "http://localhost:3000");
});

Deno.test("ws_client: a server that picks no subprotocol is said so; bad --protocol, --header, --origin are one line and exit 2", async () => {
  await using server = startWsServer({ port: 0, log: quiet });
  const url = `ws://127.0.0.1:${server.addr.port}/`;
  await using plain = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen: quiet }, (request) => {
    const { socket, response } = Deno.upgradeWebSocket(request);
    socket.onmessage = (event) => socket.send(event.data);
    return response;
  });
  const none = await runScript("ws_client.ts", [
    "--url",
    `ws://127.0.0.1:${plain.addr.port}/`,
    "--protocol",
    "x",
    "hi",
  ]);
  assert.equal(none.code, 0, none.stderr);
  assert.match(none.stderr, /: the server chose no subprotocol\n$/);
  const cases: [string[], RegExp][] = [
    [["--protocol", "a b"], /--protocol takes names of letters, .*got "a b"$/],
    [["--protocol", "a,a"], /--protocol names "a" twice$/],
    [["--header", "no colon"], /--header must look like "Name: value", got "no colon"$/],
    [["--header", "Host: evil"], /--header Host: the handshake sets it \(Deno drops ours\)$/],
    [["--header", "Sec-WebSocket-Protocol: x"], /offer subprotocols with --protocol$/],
    [["--origin", "not a url"], /--origin must be a page's URL/],
    [["--origin", "http://a", "--header", "Origin: http://b"], /give the Origin once/],
    [["--ca", "ca.pem"], /--ca goes with a wss:\/\/ URL, got "ws:/],
  ];
  for (const [args, expected] of cases) {
    const run = await runScript("ws_client.ts", ["--url", url, ...args, "x"]);
    assert.equal(run.code, 2, args.join(" "));
    assert.match(run.stderr.split("\n")[0], expected);
  }
});

// ------------------------------------------------ ws_client: slash commands

/** A WebSocket server that echoes and records what it got: texts, bytes, and the close. */
function handshakeRecordingServer() {
  const got: (string | number[])[] = [];
  const closed = Promise.withResolvers<{ code: number; reason: string; wasClean: boolean }>();
  const server = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen: quiet }, (request) => {
    const { socket, response } = Deno.upgradeWebSocket(request);
    socket.binaryType = "arraybuffer";
    socket.onmessage = (event) => {
      got.push(typeof event.data === "string" ? event.data : [...new Uint8Array(event.data)]);
      socket.send(event.data);
    };
    socket.onclose = (event) => {
      closed.resolve({ code: event.code, reason: event.reason, wasClean: event.wasClean });
    };
    return response;
  });
  return { url: `ws://127.0.0.1:${server.addr.port}/`, got, closed: closed.promise, server };
}

Deno.test("ws_client slash commands: //text, /binary HEX and @FILE, mistakes on stderr, /close CODE REASON", async () => {
  const { url, got, closed, server } = handshakeRecordingServer();
  await using _ = server;
  const file = await Deno.makeTempFile();
  await Deno.writeFile(file, Uint8Array.of(1, 2, 3));
  const typed = [
    "hello",
    "//slash",
    "/binary 00 ff 41",
    `/binary @${file}`,
    "/binary zz",
    "/nope",
    "/close 1001",
    "/close 4001 done here",
    "never sent",
  ];
  const run = await runScript("ws_client.ts", ["--url", url], typed.join("\n") + "\n");
  await Deno.remove(file);
  assert.equal(run.code, 0, run.stderr);
  assert.equal(run.stdout, "hello\n/slash\n<binary 3 bytes>\n<binary 3 bytes>\n");
  assert.deepEqual(got, ["hello", "/slash", [0, 255, 65], [1, 2, 3]]);
  assert.deepEqual(await within(closed, "the close"), {
    code: 4001,
    reason: "done here",
    wasClean: true,
  });
  assert.equal(
    run.stderr,
    "ws_client: /binary takes pairs of hex digits (/binary 48 69) or @FILE\n" +
      "ws_client: unknown command /nope (/help lists them; //TEXT sends /TEXT)\n" +
      "ws_client: /close: the code must be 1000 or 3000-4999 (the others are the protocol's own), got 1001\n",
  );
});

Deno.test("ws_client slash commands: /help lists them, /quit leaves without a close frame", async () => {
  const { url, got, closed, server } = handshakeRecordingServer();
  await using _ = server;
  const run = await runScript("ws_client.ts", ["--url", url], "/help\nbye\n/quit\nnever sent\n");
  assert.equal(run.code, 0, run.stderr);
  assert.match(run.stderr, /^ws_client: commands:\n(ws_client: {3}\/\S+.*\n){6}$/);
  // The server sees the TCP connection end with no close frame (1006, which Deno shows as 0).
  const drop = await within(closed, "the drop");
  assert.equal(drop.wasClean, false);
  assert.ok(drop.code === 0 || drop.code === 1006, `code ${drop.code}`);
  assert.deepEqual(got.filter((message) => message === "never sent"), []);
});

// --------------------------------------------- a person at the terminal (a pty)

/**
 * Runs a client under `script`, which gives it a pseudo-terminal for stdin
 * and stdout, as a person's shell would; `typed` is what they type. Its
 * output comes back as the terminal shows it (with "\r\n" line ends).
 */
async function runInTerminal(args: string[], typed: string, { stdoutPiped = false } = {}) {
  const command = [Deno.execPath(), "run", "-A", ...args].map((a) => `'${a}'`).join(" ");
  const child = new Deno.Command("script", {
    // `| cat`: stdin is still the terminal, stdout a pipe.
    args: ["-qefc", stdoutPiped ? `${command} | cat` : command, "/dev/null"],
    stdin: "piped",
    stdout: "piped",
    stderr: "piped",
    env: { NO_COLOR: "1" },
  }).spawn();
  const writer = child.stdin.getWriter();
  await writer.write(encoder.encode(typed));
  await writer.close();
  const { code, stdout } = await within(child.output(), `script ${args.join(" ")}`);
  return { code, screen: decoder.decode(stdout).replaceAll("\r\n", "\n") };
}

// A received line: carriage return and "erase line" (the prompt goes), then "< ".
const RECEIVED = "\r\x1b[2K< ";

Deno.test("tty: at a terminal, both clients say how to leave and mark received lines '< ' after a '> ' prompt", async () => {
  await using tcp = startTcpServer({ port: 0, log: quiet });
  const tcpRun = await runInTerminal(
    [scriptPath("tcp_client.ts"), "--port", String(tcp.addr.port)],
    "hello \x1b[2J\n",
  );
  assert.equal(tcpRun.code, 0, tcpRun.screen);
  assert.match(
    tcpRun.screen,
    /tcp_client: connected to 127\.0\.0\.1:\d+; .*Ctrl-D half-closes.*Ctrl-C quits\n/,
  );
  // The echo, marked and escaped: the ESC the "server" sent back is shown, not obeyed.
  assert.ok(tcpRun.screen.includes(`${RECEIVED}hello \\x1b[2J\n> `), tcpRun.screen);

  await using ws = startWsServer({ port: 0, log: quiet });
  const wsRun = await runInTerminal(
    [scriptPath("ws_client.ts"), "--url", `ws://127.0.0.1:${ws.addr.port}/`],
    "hello\n/binary 00 ff\n",
  );
  assert.equal(wsRun.code, 0, wsRun.screen);
  assert.match(
    wsRun.screen,
    /ws_client: ws:\S+: connected; .*\/help for commands, Ctrl-D to close, Ctrl-C to quit\n/,
  );
  assert.ok(wsRun.screen.includes(`${RECEIVED}hello\n> `), wsRun.screen);
  assert.ok(wsRun.screen.includes(`${RECEIVED}<binary 2 bytes: 00 ff>\n> `), wsRun.screen);

  // Typed at a terminal but printed into a pipe: told how to leave, stdout unmarked as ever.
  await using chat = startWsServer({ port: 0, mode: "chat", log: quiet });
  const piped = await runInTerminal(
    [scriptPath("ws_client.ts"), "--url", `ws://127.0.0.1:${chat.addr.port}/`],
    "hello\n",
    { stdoutPiped: true },
  );
  assert.equal(piped.code, 0, piped.screen);
  assert.match(piped.screen, /ws_client: ws:\S+: connected; /);
  assert.match(piped.screen, /^guest-1: hello$/m);
  assert.ok(!piped.screen.includes("< "), piped.screen);
});

Deno.test("cli: the deno task shortcuts take localhost, the name people type", async () => {
  await using server = startTcpServer({ port: 0, log: quiet });
  const { code, stdout } = await new Deno.Command(Deno.execPath(), {
    args: [
      "task",
      "-q",
      "tcp-client",
      "--host",
      "localhost",
      "--port",
      `${server.addr.port}`,
      "hi",
    ],
    cwd: scriptPath("."),
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).output();
  assert.equal(code, 0);
  assert.equal(decoder.decode(stdout), "hi\n");
});
Deno.test("udp echo: a peer that echoes every reply back is answered 1,000 a second at most, and others still are", async () => {
  // Two echo servers, one datagram forged to say it came from the other,
  // would answer each other for ever. The reflector plays the other server.
  const logged: string[] = [];
  let wake = () => {};
  await using server = await startUdpServer({
    port: 0,
    log: (line) => {
      logged.push(line);
      wake();
    },
  });
  const port = server.addr.port;
  const reflector = dgram.createSocket("udp4");
  await new Promise<void>((resolve) => reflector.bind(0, "127.0.0.1", resolve));
  // Bounded, so that without the limit the loop ends and the wait below fails.
  let reflected = 0;
  reflector.on("message", (data) => {
    if (++reflected < 100_000) reflector.send(data, port, "127.0.0.1");
  });
  try {
    for (let i = 0; i < 4; i++) reflector.send(`ping ${i}`, port, "127.0.0.1");
    const limited = /^- 127\.0\.0\.1:\d+ sends over 1000 datagrams a second: not echoed$/;
    while (!logged.some((line) => limited.test(line))) {
      await within(
        new Promise<void>((resolve) => wake = resolve),
        "the echo rate limit's log line",
      );
    }
    await using other = await udpPeer(port);
    await other.send("still answered");
    assert.equal(await other.nextText(), "still answered");
    assert.ok(reflected < 100_000, `${reflected} echoes reached the reflector`);
  } finally {
    await new Promise<void>((resolve) => reflector.close(() => resolve()));
  }
});

Deno.test("udp cli: a small --drop rate is announced as that rate, not as 0%", async () => {
  await using server = await spawnUdpServer(["--drop", "0.00001", "--seed", "1"]);
  const { stderr } = await server.stop("SIGTERM");
  assert.match(stderr, /^dropping 0\.001% of incoming datagrams on purpose \(--drop 0\.00001 /m);
});

/** Reads a connection to its end at full speed; counts newlines, keeps the last `keep` bytes. */
async function drainKeepingTail(conn: Deno.Conn, keep: number) {
  const buf = new Uint8Array(1024 * 1024);
  let tail = new Uint8Array(0);
  let newlines = 0;
  for (let n = await conn.read(buf); n !== null; n = await conn.read(buf)) {
    const chunk = buf.subarray(0, n);
    for (let i = chunk.indexOf(10); i !== -1; i = chunk.indexOf(10, i + 1)) newlines++;
    const joined = new Uint8Array(Math.min(keep, tail.length + n));
    const fromTail = joined.length - n;
    if (fromTail > 0) joined.set(tail.subarray(tail.length - fromTail));
    joined.set(chunk.subarray(Math.max(0, n - joined.length)), Math.max(0, fromTail));
    tail = joined;
  }
  return { newlines, tail };
}

// ------------------------------------------------ the first ten minutes

Deno.test("tcp chat: the newcomer alone is told its name, names are never reused, echo says nothing", async () => {
  await using server = startTcpServer({ port: 0, mode: "chat", log: quiet });
  using first = await joinTcpChat(server.addr.port, "guest-1");
  {
    using second = await joinTcpChat(server.addr.port, "guest-2");
    assert.equal(await first.readLine(), "* guest-2 joined", "not the notice meant for guest-2");
    await second.write("hi\n");
    assert.equal(await second.readLine(), "guest-2: hi", "one notice, then the chat");
  }
  assert.equal(await first.readLine(), "guest-2: hi");
  assert.equal(await first.readLine(), "* guest-2 left");
  using third = await joinTcpChat(server.addr.port, "guest-3");
  assert.equal(await first.readLine(), "* guest-3 joined");
  await third.write("back\n");
  assert.equal(await first.readLine(), "guest-3: back");

  await using echo = startTcpServer({ port: 0, log: quiet });
  using echoed = await connectTcp(echo.addr.port);
  await echoed.write("first\n");
  assert.equal(await echoed.readLine(), "first", "an echo server sends no notice");
});

Deno.test("ws chat: the newcomer alone is told its name, names are never reused, echo says nothing", async () => {
  await using server = startWsServer({ port: 0, mode: "chat", log: quiet });
  const url = `ws://127.0.0.1:${server.addr.port}/`;
  await using first = await joinWsChat(url, "guest-1");
  {
    await using second = await joinWsChat(url, "guest-2");
    assert.equal(await first.next(), "* guest-2 joined", "not the notice meant for guest-2");
    second.socket.send("hi");
    assert.equal(await second.next(), "guest-2: hi", "one notice, then the chat");
  }
  assert.equal(await first.next(), "guest-2: hi");
  assert.equal(await first.next(), "* guest-2 left");
  await using third = await joinWsChat(url, "guest-3");
  assert.equal(await first.next(), "* guest-3 joined");
  third.socket.send("back");
  assert.equal(await first.next(), "guest-3: back");

  await using echo = startWsServer({ port: 0, log: quiet });
  await using echoed = await openWs(`ws://127.0.0.1:${echo.addr.port}/`);
  echoed.socket.send("first");
  assert.equal(await echoed.next(), "first", "an echo server sends no notice");
});

Deno.test("cli: ws_server names the browser client's http:// address on stderr, unless --quiet", async () => {
  {
    await using server = await spawnServer("ws_server.ts", ["--mode", "chat"]);
    const page = `http://127.0.0.1:${server.port}/`;
    const response = await fetch(page);
    assert.equal(response.status, 200);
    assert.match(await response.text(), /<title>WebSocket chat client<\/title>/);
    const { code, stdout, stderr } = await server.stop();
    assert.equal(code, 0);
    assert.equal(stdout, `listening on ws://127.0.0.1:${server.port}/\n`, "stdout is unchanged");
    assert.equal(stderr.split("\n")[0], `browser client: ${page}`);
  }
  {
    await using server = await spawnServer("ws_server.ts", ["--quiet"]);
    // ws_server installs its SIGTERM handler just after the listening line,
    // in the same synchronous stretch; once it has answered a request, it has.
    const response = await fetch(`http://127.0.0.1:${server.port}/`);
    assert.equal(response.status, 200);
    await response.body?.cancel();
    const { code, stderr } = await server.stop();
    assert.equal(code, 0);
    assert.equal(stderr, "", "--quiet prints nothing on stderr");
  }
});

Deno.test("ws server: the page names its mode and says what to try", async () => {
  for (const mode of ["echo", "chat"] as const) {
    await using server = startWsServer({ port: 0, mode, log: quiet });
    const html = await (await fetch(`http://127.0.0.1:${server.addr.port}/`)).text();
    assert.match(html, new RegExp(`<title>WebSocket ${mode} client</title>`), mode);
    assert.match(html, new RegExp(`<h1>WebSocket client, ${mode} mode <span id="you">`), mode);
    assert.match(html, /<p id="hint">\w+/, mode);
  }
});

// ------------------------------------------------------------------- TLS

Deno.test("ws server over TLS: wss:// echo and chat, and a plain client on the TLS port harms no one", async () => {
  await using certs = await testCertificates();
  await using echo = startWsServer({ port: 0, tls: certs.good, log: quiet });
  using client = Deno.createHttpClient({ caCerts: [certs.ca] });
  const url = `wss://127.0.0.1:${echo.addr.port}/`;
  const opened = await openWsWith(new WebSocket(url, { client }));
  // A client that speaks plain TCP, and one that speaks plain WebSocket,
  // on the TLS port: the TLS handshake fails for them alone.
  using plain = await connectTcp(echo.addr.port);
  await plain.write("hello?\n");
  // All it gets is a TLS alert record (content type 21), then the end.
  const answer = await within(plain.readToEnd(), "the plain client's end");
  assert.ok(answer.length === 0 || answer[0] === 21, `not a TLS alert: ${answer}`);
  const refused = new WebSocket(`ws://127.0.0.1:${echo.addr.port}/`);
  // No close frame ever came: 1006, which Deno's client shows as 0.
  const refusal = await within(closeOf(refused), "the ws:// client's end");
  assert.ok(!refusal.wasClean && [0, 1006].includes(refusal.code), `code ${refusal.code}`);
  opened.socket.send("through TLS");
  assert.equal(await within(opened.next(), "the echo over TLS"), "through TLS");
  opened.socket.close(1000);
  await opened.closed;

  await using chat = startWsServer({ port: 0, mode: "chat", tls: certs.good, log: quiet });
  const chatUrl = `wss://localhost:${chat.addr.port}/`;
  const a = await openWsWith(new WebSocket(chatUrl, { client }));
  assert.equal(await a.next(), "* you are guest-1");
  const b = await openWsWith(new WebSocket(chatUrl, { client }));
  assert.equal(await b.next(), "* you are guest-2");
  assert.equal(await a.next(), "* guest-2 joined");
  b.socket.send("secret");
  assert.deepEqual([await a.next(), await b.next()], ["guest-2: secret", "guest-2: secret"]);
  for (const peer of [a, b]) peer.socket.close(1000);
  await Promise.all([a.closed, b.closed]);
});

Deno.test("cli: ws_server --cert/--key serves wss://; bad TLS files are one line and exit 1", async () => {
  await using certs = await testCertificates();
  const { cert, key, caKey } = certs.files;
  await using server = await spawnServer("ws_server.ts", ["--cert", cert, "--key", key]);
  assert.match(server.line, /^listening on wss:\/\/127\.0\.0\.1:\d+\/$/);
  const exit = await server.stop();
  assert.equal(exit.code, 0);
  assert.match(exit.stderr, /^browser client: https:\/\/127\.0\.0\.1:\d+\/$/m);
  const cases: [string[], string, number][] = [
    [["--cert", cert], "--cert and --key go together", 2],
    [["--cert", `${cert}.none`, "--key", key], "no such file", 1],
    [["--cert", key, "--key", key], "no PEM certificate", 1],
    [["--cert", cert, "--key", cert], "no PEM private key", 1],
    [["--cert", cert, "--key", caKey], "not the private key", 1],
  ];
  for (const [args, text, code] of cases) {
    const result = await runScript("ws_server.ts", ["--port", "0", ...args]);
    assert.equal(result.code, code, args.join(" "));
    assert.ok(result.stderr.split("\n")[0].includes(text), result.stderr);
  }
});

/** A WebSocket made with options (a TLS client, say), opened, with its messages awaitable. */
async function openWsWith(socket: WebSocket) {
  const messages: string[] = [];
  let wake = () => {};
  socket.onmessage = (event) => {
    messages.push(event.data);
    wake();
  };
  const closed = closeOf(socket);
  await within(
    new Promise((resolve, reject) => {
      socket.onopen = resolve;
      closed.then(() => reject(new Error(`could not open ${socket.url}`)));
    }),
    `open ${socket.url}`,
  );
  return {
    socket,
    closed,
    async next(): Promise<string> {
      while (messages.length === 0) await within(new Promise<void>((r) => wake = r), "a message");
      return messages.shift()!;
    },
  };
}

function closeOf(socket: WebSocket): Promise<CloseEvent> {
  return new Promise((resolve) => socket.addEventListener("close", resolve, { once: true }));
}

// ------------------------------------------------------- TLS for tcp_server

/** Reads lines until one satisfies `predicate` (notices and joins come first in chat). */
async function lineWhere(
  client: Awaited<ReturnType<typeof connectTcp>>,
  predicate: (line: string) => boolean,
): Promise<string> {
  for (;;) {
    const line = await within(client.readLine(), "a line over TLS");
    if (line === null) throw new Error("EOF before the expected line");
    if (predicate(line)) return line;
  }
}

Deno.test("tcp over TLS: echo is byte-exact and chat relays lines, for clients that trust the test CA", async () => {
  await using certs = await testCertificates();
  const tls = { ...certs.good, log: quiet };
  {
    await using server = startTcpServer({ port: 0, ...tls });
    using client = await connectTcp(server.addr.port, { caCerts: [certs.ca] });
    const bytes = new Uint8Array([...allBytes(), ...randomBytes(200_000)]);
    const [, echoed] = await Promise.all([
      client.write(bytes),
      within(client.readBytes(bytes.length), "the echo over TLS"),
    ]);
    assert.deepEqual(echoed, bytes);
  }
  await using server = startTcpServer({ port: 0, mode: "chat", ...tls });
  using alice = await connectTcp(server.addr.port, { caCerts: [certs.ca] });
  using bob = await connectTcp(server.addr.port, { caCerts: [certs.ca] });
  // The handshakes may finish in either order; each is in the room once it is told its name.
  for (const client of [alice, bob]) {
    await lineWhere(client, (line) => line.startsWith("* you are "));
  }
  await alice.write("hello over tls\n");
  const relayed = await lineWhere(bob, (line) => line.endsWith(": hello over tls"));
  assert.match(relayed, /^guest-\d+: hello over tls$/);
  assert.equal(server.connections, 2);
});

Deno.test("tcp over TLS: a plain client and one that rejects our certificate each cost one log line; a TLS client carries on", async () => {
  await using certs = await testCertificates();
  const events = awaitableLog();
  const server = startTcpServer({ port: 0, ...certs.good, log: events.push });
  try {
    using good = await connectTcp(server.addr.port, { caCerts: [certs.ca] });
    await good.write("before\n");
    assert.equal(await within(good.readLine(), "echo before"), "before");

    const failures = () => events.lines.filter((line) => line.includes("TLS handshake failed"));
    for (let i = 0; i < 10; i++) {
      using plain = await connectTcp(server.addr.port);
      await plain.write("hello, plain text\n");
      // The server answers with a TLS alert at most, and closes: never an echo.
      const answer = await within(plain.readToEnd().catch(() => new Uint8Array()), "plain close");
      assert.ok(!decoder.decode(answer).includes("hello"), "a plain client got an echo");
    }
    // The plain client's failure line, after the good client's "+ " line.
    await events.waitFor(/TLS handshake failed/);
    await events.waitFor(() => true, { atLeast: 2 });
    const stranger = await Deno.connectTls({ hostname: "127.0.0.1", port: server.addr.port });
    await assert.rejects(stranger.handshake(), /UnknownIssuer|certificate/i);
    stranger.close();
    await events.waitFor(/TLS handshake failed/, { atLeast: 2 });

    await good.write("after\n");
    assert.equal(await within(good.readLine(), "echo after"), "after");
    assert.equal(server.connections, 1, "only the TLS client counts");
    const [plainLine, refusedLine] = failures();
    assert.match(plainLine, /^! 127\.0\.0\.1:\d+ TLS handshake failed: .*not TLS/);
    assert.match(refusedLine, /^! 127\.0\.0\.1:\d+ TLS handshake failed: the client refused it/);
    // Ten plain clients, one line so far: the others are counted, not printed.
    assert.equal(failures().length, 2, failures().join("\n"));
    assert.equal(events.lines.filter((line) => line.startsWith("+ ")).length, 1);
  } finally {
    await server.close();
  }
  assert.ok(
    events.lines.some((line) => /not TLS.*\(and 9 more like it in the last 20 s\)$/.test(line)),
    events.lines.join("\n"),
  );
});

Deno.test("tcp_server cli: --cert/--key listen on tls://; bad or missing files are one line and exit 1", async () => {
  await using certs = await testCertificates();
  const { cert: leaf, key: leafKey, otherKey, ca } = certs.files;
  {
    await using server = await spawnServer("tcp_server.ts", ["--cert", leaf, "--key", leafKey]);
    assert.equal(server.line, `listening on tls://127.0.0.1:${server.port}`);
    using client = await connectTcp(server.port, { caCerts: [certs.ca] });
    await client.write("hi\n");
    assert.equal(await within(client.readLine(), "echo"), "hi");
  }
  const missing = `${certs.dir}/missing.pem`;
  const cases: [string[], RegExp][] = [
    [
      ["--cert", missing, "--key", leafKey],
      /^tcp_server: cannot read --cert .*missing\.pem: no such file$/,
    ],
    [
      ["--cert", leaf, "--key", missing],
      /^tcp_server: cannot read --key .*missing\.pem: no such file$/,
    ],
    [
      ["--cert", leaf, "--key", otherKey],
      /--key .*other\/localhost\.key is not the private key of the certificate in --cert .*good\/localhost\.pem$/,
    ],
    [
      ["--cert", leafKey, "--key", leafKey],
      /--cert .*good\/localhost\.key holds no PEM certificate/,
    ],
    [["--cert", leaf, "--key", ca], /--key .*ca\.pem holds no PEM private key$/],
  ];
  for (const [args, expected] of cases) {
    const { code, stdout, stderr } = await runScript("tcp_server.ts", ["--port", "0", ...args]);
    assert.equal(code, 1, args.join(" "));
    assert.equal(stdout, "");
    assert.equal(stderr.split("\n").length, 2, `one line: ${stderr}`);
    assert.match(stderr.trim(), expected);
  }
  const alone = await runScript("tcp_server.ts", ["--port", "0", "--cert", leaf]);
  assert.equal(alone.code, 2);
  assert.match(alone.stderr.split("\n")[0], /^tcp_server: --cert and --key go together/);
});

// ----------------------------------------------------- memory per connection

/** A process's resident memory in bytes, from /proc (Linux). */
async function residentBytesOf(pid: number): Promise<number> {
  const status = await Deno.readTextFile(`/proc/${pid}/status`);
  return Number(status.match(/^VmRSS:\s+(\d+) kB$/m)![1]) * 1024;
}

Deno.test({
  name: "tcp echo: an idle connection costs its small read buffer, not 64 KiB; bulk still moves",
  ignore: Deno.build.os !== "linux",
  async fn() {
    await using server = await spawnServer("tcp_server.ts", ["--quiet"]);
    const message = encoder.encode("x".repeat(32));
    const echoOnce = async (client: Awaited<ReturnType<typeof connectTcp>>) => {
      await client.write(message);
      assert.deepEqual(await within(client.readBytes(message.length), "echo"), message);
    };
    using warm = await connectTcp(server.port);
    await echoOnce(warm);
    const before = await residentBytesOf(server.pid);
    const clients = [];
    try {
      for (let i = 0; i < 400; i++) {
        const client = await connectTcp(server.port);
        clients.push(client);
        await echoOnce(client);
      }
      // With a 64 KiB buffer per connection this is about 60 KiB; with 1 KiB, about 10.
      const perConnection = (await residentBytesOf(server.pid) - before) / clients.length;
      assert.ok(
        perConnection < 30 * 1024,
        `${(perConnection / 1024).toFixed(1)} KiB per connection`,
      );
      // A bulk sender's reads fill the small buffer, and it moves on to 64 KiB.
      const bulk = randomBytes(4 * 1024 * 1024);
      const [, echoed] = await Promise.all([
        clients[0].write(bulk),
        within(clients[0].readBytes(bulk.length), "4 MiB echo"),
      ]);
      assert.deepEqual(echoed, bulk);
    } finally {
      for (const client of clients) client.close();
    }
  },
});

// ----------------------------------------------------------- wire.ts faults
//
// Each fault against our own clients and servers: the client copes, or fails
// the documented way, and the proxy's log says exactly what was done.

/** The fault events of a log, without the clock, for comparing runs. */
function faultEvents(events: WireEvent[]): Record<string, unknown>[] {
  return events.filter((e) => e.type === "fault").map(({ t_ms: _, ...rest }) => rest);
}

Deno.test("wire faults: tcp_client and ws_client print the same lines through --slice 1 as direct", async () => {
  await using tcpServer = await spawnServer("tcp_server.ts", ["--quiet"]);
  await using wsServer = await spawnServer("ws_server.ts", ["--quiet"]);
  const lines = ["hello", "two words", "ünïcödé ✓"];
  const direct = {
    tcp: await within(
      runScript("tcp_client.ts", ["--port", String(tcpServer.port), ...lines]),
      "tcp direct",
    ),
    ws: await within(
      runScript("ws_client.ts", ["--url", `ws://127.0.0.1:${wsServer.port}/`, ...lines]),
      "ws direct",
    ),
  };
  await using tcpWire = await spawnWire(["--to", `127.0.0.1:${tcpServer.port}`, "--slice", "1"]);
  await using wsWire = await spawnWire(["--to", `127.0.0.1:${wsServer.port}`, "--slice", "1"]);
  const sliced = {
    tcp: await within(
      runScript("tcp_client.ts", ["--port", String(tcpWire.port), ...lines]),
      "tcp sliced",
    ),
    ws: await within(
      runScript("ws_client.ts", ["--url", `ws://127.0.0.1:${wsWire.port}/`, ...lines]),
      "ws sliced",
    ),
  };
  for (const kind of ["tcp", "ws"] as const) {
    assert.equal(direct[kind].code, 0, direct[kind].stderr);
    assert.equal(direct[kind].stdout, lines.join("\n") + "\n");
    assert.equal(sliced[kind].code, 0, sliced[kind].stderr);
    assert.equal(sliced[kind].stdout, direct[kind].stdout, kind);
  }
  await tcpWire.waitFor((e) => e.type === "close", "the TCP proxy's close");
  await wsWire.waitFor((e) => e.type === "close", "the WebSocket proxy's close");
  // The echo really came back a byte per write: one slice event per chunk, every piece 1 byte.
  const slices = tcpWire.events.filter((e) => e.type === "fault" && e.name === "slice");
  assert.ok(slices.some((e) => e.dir === "s2c" && Number(e.pieces) > 1), JSON.stringify(slices));
  for (const e of slices) assert.equal(e.pieces, e.bytes);
  assertDocumentedFields([...tcpWire.events, ...wsWire.events]);
});

Deno.test("wire faults: ws_client through --fragment 3 receives whole messages", async () => {
  await using server = await spawnServer("ws_server.ts", ["--quiet"]);
  await using wire = await spawnWire(["--to", `127.0.0.1:${server.port}`, "--fragment", "3"]);
  const messages = ["hello", "a longer message, cut into many frames", "x"];
  const client = await within(
    runScript("ws_client.ts", ["--url", `ws://127.0.0.1:${wire.port}/`, ...messages]),
    "ws_client.ts through --fragment 3",
  );
  assert.equal(client.code, 0, client.stderr);
  assert.equal(client.stdout, messages.join("\n") + "\n");
  await wire.waitFor((e) => e.type === "close", "the close");
  const fragments = wire.events.filter((e) => e.type === "fault" && e.name === "fragment");
  // Both ways, every message past 3 bytes: ceil(length / 3) frames each.
  for (const dir of ["c2s", "s2c"]) {
    assert.deepEqual(
      fragments.filter((e) => e.dir === dir).map((e) => [e.bytes, e.frames]),
      [[5, 2], [38, 13]],
      dir,
    );
  }
  assertDocumentedFields(wire.events);
});

Deno.test("wire faults: ws_server drops a peer behind --drop-pongs within its idle timeout", async () => {
  await using server = await spawnServer("ws_server.ts", ["--quiet", "--idle-timeout", "1"]);
  await using wire = await spawnWire([
    "--to",
    `127.0.0.1:${server.port}`,
    "--drop-pongs",
    "--faults-to",
    "server",
  ]);
  // Deno's WebSocket answers every ping; the proxy swallows the answers.
  await using client = await openWs(`ws://127.0.0.1:${wire.port}/`);
  const closed = await within(client.closed, "the server dropping the silent peer");
  await wire.waitFor((e) => e.type === "close", "the proxy's close");
  const dropped = wire.events.filter((e) => e.type === "fault" && e.name === "drop-pongs");
  assert.ok(dropped.length >= 1, "at least one pong swallowed");
  assert.ok(dropped.every((e) => e.dir === "c2s"));
  assert.notEqual(closed.code, 1000, `closed with ${closed.code}`);
  assertDocumentedFields(wire.events);
});

Deno.test("wire faults: --drop-close before a server that closes first (1009): ws_client says connection lost", async () => {
  await using server = await spawnServer("ws_server.ts", ["--quiet", "--max-message", "4"]);
  const args = ["--url", "", "this message is too big"];
  // Direct, the 1009 arrives and is reported as the server's close.
  args[1] = `ws://127.0.0.1:${server.port}/`;
  const direct = await within(runScript("ws_client.ts", args), "ws_client direct");
  assert.match(direct.stderr, /1009/);
  assert.doesNotMatch(direct.stderr, /connection lost/);
  await using wire = await spawnWire([
    "--to",
    `127.0.0.1:${server.port}`,
    "--drop-close",
    "--faults-to",
    "client",
  ]);
  args[1] = `ws://127.0.0.1:${wire.port}/`;
  const client = await within(runScript("ws_client.ts", args), "ws_client behind --drop-close");
  assert.equal(client.code, 1);
  assert.match(client.stderr, /connection lost: it closed without a close frame/);
  assertNoStackTrace(client.stderr);
  const dropped = await wire.waitFor(
    (e) => e.type === "fault" && e.name === "drop-close",
    "the drop-close event",
  );
  assert.equal(dropped?.dir, "s2c");
  assert.equal(dropped?.code, 1009);
});

Deno.test("wire faults: --reset-after sends a real TCP reset mid-message", async () => {
  await using server = startTcpServer({ port: 0, log: quiet });
  const log = createEventLog();
  await using wire = startWire({
    port: 0,
    to: server.addr,
    onEvent: log.onEvent,
    faults: { resetAfter: 5, to: "client" },
  });
  await wire.ready;
  using conn = await Deno.connect({ hostname: "127.0.0.1", port: wire.addr.port });
  await conn.write(encoder.encode("hello world\n"));
  const received: number[] = [];
  const buffer = new Uint8Array(64);
  const failure = await within(
    (async () => {
      for (;;) {
        const n = await conn.read(buffer);
        if (n === null) return new Error("a clean end of stream, not a reset");
        received.push(...buffer.subarray(0, n));
      }
    })().catch((error) => error),
    "the reset",
  );
  assert.ok(failure instanceof Deno.errors.ConnectionReset, String(failure));
  // Exactly the first 5 bytes of the echo came, then the RST: mid-line.
  assert.equal(decoder.decode(Uint8Array.from(received)), "hello");
  const fault = await log.waitFor((e) => e.type === "fault", "the fault event");
  assert.deepEqual([fault.dir, fault.name, fault.bytes], ["s2c", "reset-after", 5]);
  await log.waitFor((e) => e.type === "close", "the close");
});

Deno.test("wire faults: ws_client through --reset-after mid-message says connection lost", async () => {
  await using server = await spawnServer("ws_server.ts", ["--quiet"]);
  // The 101 is under 300 bytes; the reset comes inside the 1000-byte echo.
  await using wire = await spawnWire([
    "--to",
    `127.0.0.1:${server.port}`,
    "--reset-after",
    "300",
    "--faults-to",
    "client",
  ]);
  const client = await within(
    runScript("ws_client.ts", ["--url", `ws://127.0.0.1:${wire.port}/`, "x".repeat(1000)]),
    "ws_client behind --reset-after",
  );
  assert.equal(client.code, 1);
  assert.match(client.stderr, /connection lost|reset/);
  assertNoStackTrace(client.stderr);
  // The proxy's log may trail the client's exit: wait for the event.
  const reset = await wire.waitFor((e) => e.type === "fault", "the fault event");
  assert.deepEqual([reset?.dir, reset?.name, reset?.bytes], ["s2c", "reset-after", 300]);
});

Deno.test("wire faults: the same --seed gives the same fault events twice", async () => {
  await using server = await spawnServer("tcp_server.ts", ["--quiet"]);
  const runs: Record<string, unknown>[][] = [];
  for (const seed of ["42", "42", "43"]) {
    await using wire = await spawnWire([
      "--to",
      `127.0.0.1:${server.port}`,
      "--latency",
      "1",
      "--jitter",
      "40",
      "--faults-every",
      "2",
      "--seed",
      seed,
    ]);
    for (let i = 0; i < 4; i++) {
      const client = await within(
        runScript("tcp_client.ts", ["--port", String(wire.port), "one", "two"]),
        "tcp_client",
      );
      assert.equal(client.stdout, "one\ntwo\n");
      await wire.waitFor((e) => e.conn === i + 1 && e.type === "close", `close ${i + 1}`);
    }
    runs.push(faultEvents(wire.events));
  }
  assert.ok(runs[0].length > 0);
  // Two of the four connections were chosen, one in each pair.
  assert.equal(runs[0].filter((e) => e.name === "faults-every").length, 2);
  assert.deepEqual(runs[1], runs[0]);
  assert.notDeepEqual(runs[2], runs[0], "another seed, other choices");
});

Deno.test("wire faults: --close-with after one message: ws_client reports our code, the server got 1000", async () => {
  await using server = await spawnServer("ws_server.ts", []);
  await using wire = await spawnWire([
    "--to",
    `127.0.0.1:${server.port}`,
    "--close-with",
    "4000:maintenance",
    "--close-after-messages",
    "1",
  ]);
  const client = await within(
    runScript("ws_client.ts", ["--url", `ws://127.0.0.1:${wire.port}/`, "one", "two"]),
    "ws_client behind --close-with",
  );
  assert.equal(client.stdout.split("\n")[0], "one");
  assert.match(client.stderr, /code 4000 \(maintenance\)/);
  assertNoStackTrace(client.stderr);
  const closeWith = await wire.waitFor((e) => e.type === "fault", "the close-with event");
  assert.deepEqual([closeWith?.name, closeWith?.code, closeWith?.reason], [
    "close-with",
    4000,
    "maintenance",
  ]);
  await wire.waitFor((e) => e.type === "close", "the close");
  const { stdout, stderr } = await server.stop();
  assert.match(stdout + stderr, /disconnected: code 1000/);
});

Deno.test("wire faults: a bad fault flag is one line and exit code 2", async () => {
  for (
    const [args, message] of [
      [["--close-with", "1006"], /--close-with needs a code a close frame may carry/],
      [["--slice-delay", "5"], /--slice-delay needs --slice/],
      [["--faults-to", "nobody", "--slice", "1"], /--faults-to must be client, server or both/],
      [["--seed", "1"], /need a fault to act on/],
      [["--fragment", "0"], /--fragment must be an integer from 1/],
    ] as const
  ) {
    const { code, stderr } = await runScript("wire.ts", ["--to", "127.0.0.1:1", ...args]);
    assert.equal(code, 2, args.join(" "));
    assert.match(stderr.split("\n")[0], message);
    assertNoStackTrace(stderr);
  }
});

Deno.test("tls end to end: ws_client --ca echoes through ws_server --cert/--key; without --ca, one certificate line and exit 1", async () => {
  await using certs = await testCertificates();
  const { cert, key, ca } = certs.files;
  await using server = await spawnServer("ws_server.ts", ["--cert", cert, "--key", key]);
  // The certificate is for localhost and 127.0.0.1: both names are trusted.
  for (const host of ["127.0.0.1", "localhost"]) {
    const url = `wss://${host}:${server.port}/`;
    const trusted = await runScript("ws_client.ts", ["--url", url, "--ca", ca, "hello", "ü ✓"]);
    assert.deepEqual(trusted, { code: 0, stdout: "hello\nü ✓\n", stderr: "" }, host);
  }
  const url = `wss://127.0.0.1:${server.port}/`;
  const untrusted = await runScript("ws_client.ts", ["--url", url, "hello"]);
  assert.equal(untrusted.code, 1);
  assert.equal(untrusted.stdout, "");
  assert.match(
    untrusted.stderr,
    new RegExp(
      `^ws_client: ${url}: certificate refused: unknown issuer, .*trust its CA with --ca FILE.*\n$`,
    ),
  );
  assertNoStackTrace(untrusted.stderr);
  const exit = await server.stop();
  assert.equal(exit.code, 0);
  // Two connections echoed and closed with 1000; the refused one never got
  // as far as a WebSocket to log.
  assert.equal(exit.stderr.match(/disconnected: code 1000$/gm)?.length, 2, exit.stderr);
});

Deno.test("wire faults: --close-after ends the echo with a clean FIN after exactly that many bytes", async () => {
  await using server = await spawnServer("tcp_server.ts", ["--quiet"]);
  await using wire = await spawnWire([
    "--to",
    `127.0.0.1:${server.port}`,
    "--close-after",
    "5",
    "--faults-to",
    "client",
  ]);
  using client = await connectTcp(wire.port);
  await client.write("hello world\n");
  // readBytes gives fewer bytes only at a clean EOF; a reset would throw.
  const received = await within(client.readBytes(100), "the echo up to the FIN");
  assert.equal(decoder.decode(received), "hello");
  const closed = await wire.waitFor((e) => e.type === "fault", "the close-after event");
  assert.deepEqual([closed.dir, closed.name, closed.bytes], ["s2c", "close-after", 5]);
  await wire.waitFor((e) => e.type === "close", "the close");
  assert.equal(faultEvents(wire.events).length, 1, JSON.stringify(faultEvents(wire.events)));
  assertDocumentedFields(wire.events);
});

Deno.test("wire faults: --stall-after forwards that many bytes, then nothing, with the connection kept open", async () => {
  using upstream = rawTcpServer();
  const target = upstream.url.replace("tcp://", "");
  await using wire = await spawnWire([
    "--to",
    target,
    "--stall-after",
    "5",
    "--faults-to",
    "client",
  ]);
  using client = await connectTcp(wire.port);
  using server = bufferedConn(await upstream.accept());
  await server.write("hello world\n");
  assert.equal(decoder.decode(await within(client.readBytes(5), "the first 5 bytes")), "hello");
  const stalled = await wire.waitFor((e) => e.type === "fault", "the stall-after event");
  assert.deepEqual([stalled.dir, stalled.name, stalled.bytes], ["s2c", "stall-after", 5]);
  // A hang, not a close: the other direction still reaches the server after the stall.
  await client.write("still there?\n");
  assert.equal(
    decoder.decode(await within(server.readBytes(13), "the client's bytes after the stall")),
    "still there?\n",
  );
  // The server finishes (more bytes, then its FIN); none of it passes while the proxy runs.
  await server.write("more\n");
  server.close();
  const { code } = await wire.stop();
  assert.equal(code, 0);
  // Only the proxy's own exit ended the client's connection, and nothing came after "hello".
  const rest = await within(client.readBytes(100).catch(() => new Uint8Array(0)), "the end");
  assert.equal(decoder.decode(rest), "");
  assert.equal(faultEvents(wire.events).length, 1, JSON.stringify(faultEvents(wire.events)));
  assert.ok(!wire.events.some((e) => e.type === "fin" && e.dir === "s2c"), "no FIN passed on");
  assertDocumentedFields(wire.events);
});

Deno.test("wire faults: --bandwidth paces the echo in tenth-of-a-second pieces, bytes unchanged", async () => {
  await using server = await spawnServer("tcp_server.ts", ["--quiet"]);
  await using wire = await spawnWire([
    "--to",
    `127.0.0.1:${server.port}`,
    "--bandwidth",
    "100",
    "--faults-to",
    "client",
  ]);
  const line = "x".repeat(49);
  {
    using client = await connectTcp(wire.port);
    await client.write(line + "\n");
    assert.equal(await within(client.readLine(), "the paced echo"), line);
  }
  await wire.waitFor((e) => e.type === "close", "the close");
  const paced = faultEvents(wire.events);
  assert.ok(paced.length >= 1, "at least one bandwidth event");
  // 100 bytes per second is 10 bytes per tenth of a second: each chunk the
  // server sent was written in pieces of 10, each waiting its turn.
  for (const e of paced) {
    assert.deepEqual([e.dir, e.name], ["s2c", "bandwidth"]);
    assert.equal(e.pieces, Math.ceil(Number(e.bytes) / 10), JSON.stringify(e));
  }
  assert.equal(paced.reduce((sum, e) => sum + Number(e.bytes), 0), 50);
  assert.ok(paced.reduce((sum, e) => sum + Number(e.pieces), 0) >= 5);
  assertDocumentedFields(wire.events);
});

Deno.test("wire faults: --ping-every pings a client of ws_server, and the proxy swallows each pong it answers", async () => {
  await using server = await spawnServer("ws_server.ts", ["--quiet"]);
  await using wire = await spawnWire(["--to", `127.0.0.1:${server.port}`, "--ping-every", "50"]);
  // A raw client, so that the pings it is sent are seen, and its pongs are its own.
  using client = await connectTcp(wire.port);
  await client.write(
    "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
      "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
  );
  assert.match((await within(client.readLine(), "the 101"))!, /^HTTP\/1\.1 101 /);
  for (let i = 0; i < 32 && await within(client.readLine(), "the head") !== "\r"; i++);
  const mask = Uint8Array.of(9, 8, 7, 6);
  const pings: string[] = [];
  let echo: string | undefined;
  // Bounded: a ping every 50 ms, so three come long before 64 frames.
  await within(
    (async () => {
      for (let frames = 0; frames < 64 && (pings.length < 3 || echo === undefined); frames++) {
        const [first, second] = await client.readBytes(2);
        const payload = await client.readBytes(second & 0x7f);
        const opcode = first & 0x0f;
        if (opcode === 9) {
          // RFC 6455 section 5.5.3: the pong carries the ping's payload.
          await client.write(wsFrame({ opcode: 10, payload, mask }));
          pings.push(decoder.decode(payload));
          if (pings.length === 3) {
            await client.write(wsFrame({ opcode: 1, payload: encoder.encode("hi"), mask }));
          }
        } else if (opcode === 1) echo = decoder.decode(payload);
      }
    })(),
    "three pings and the echo",
  );
  const ours = pings.filter((text) => text.startsWith("wire.ts ping "));
  assert.deepEqual(ours.slice(0, 3), ["wire.ts ping 1", "wire.ts ping 2", "wire.ts ping 3"]);
  assert.equal(echo, "hi", "the connection works between the pings");
  // Every pong the client answered to our pings is swallowed on its way to the server.
  const last = ours.at(-1);
  await wire.waitFor(
    (e) => e.type === "fault" && e.dir === "c2s" && e.text === last,
    "the last pong swallowed",
  );
  const events = faultEvents(wire.events);
  const injected = events.filter((e) => e.dir === "s2c").map((e) => e.text);
  const swallowed = events.filter((e) => e.dir === "c2s").map((e) => e.text);
  assert.ok(events.every((e) => e.name === "ping-every"), JSON.stringify(events));
  assert.deepEqual(injected.slice(0, ours.length), ours);
  assert.deepEqual(swallowed, ours, "each pong swallowed once, none passed on");
  assertDocumentedFields(wire.events);
});

Deno.test("wire faults: behind --ping-every the server receives the client's frames but none of its pongs", async () => {
  // A recording server in place of ws_server.ts: it sees every byte that reaches it.
  using listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  await using wire = await spawnWire([
    "--to",
    `127.0.0.1:${listener.addr.port}`,
    "--ping-every",
    "50",
  ]);
  using client = await connectTcp(wire.port);
  const accepted = listener.accept();
  const request = "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
  await client.write(request);
  using upstream = bufferedConn(await within(accepted, "the proxy's connection"));
  assert.equal(decoder.decode(await upstream.readBytes(request.length)), request);
  const response = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n" +
    "Connection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
  await upstream.write(response);
  assert.equal(decoder.decode(await client.readBytes(response.length)), response);
  const mask = Uint8Array.of(9, 8, 7, 6);
  for (let i = 1; i <= 3; i++) {
    const [first, second] = await within(client.readBytes(2), `ping ${i}`);
    const payload = await client.readBytes(second & 0x7f);
    assert.deepEqual([first, decoder.decode(payload)], [0x89, `wire.ts ping ${i}`]);
    await client.write(wsFrame({ opcode: 10, payload, mask }));
  }
  await wire.waitFor(
    (e) => e.type === "fault" && e.dir === "c2s" && e.text === "wire.ts ping 3",
    "the third pong swallowed",
  );
  const text = wsFrame({ opcode: 1, payload: encoder.encode("hi"), mask });
  const close = wsFrame({ opcode: 8, payload: Uint8Array.of(0x03, 0xe8), mask });
  await client.write(concat([text, close]));
  client.conn.closeWrite();
  // Byte for byte what the client sent, its three pongs left out.
  assert.deepEqual(await within(upstream.readToEnd(), "the client's FIN"), concat([text, close]));
  upstream.close();
  await wire.waitFor((e) => e.type === "close", "the close");
  const swallowed = faultEvents(wire.events).filter((e) => e.dir === "c2s").map((e) => e.text);
  assert.deepEqual(swallowed, ["wire.ts ping 1", "wire.ts ping 2", "wire.ts ping 3"]);
  assertDocumentedFields(wire.events);
});

Deno.test("cli: every server exits 0 on SIGTERM sent the moment it prints its listening line", async () => {
  using target = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const servers: [string, string[]][] = [
    ["tcp_server.ts", ["--quiet"]],
    ["ws_server.ts", ["--quiet"]],
    ["wire.ts", ["--to", `127.0.0.1:${target.addr.port}`, "--quiet"]],
  ];
  for (const [script, args] of servers) {
    // Five times each: the race, when there was one, lost about one in two.
    for (let round = 0; round < 5; round++) {
      await using server = await spawnServer(script, args);
      const { code, signal } = await server.stop("SIGTERM");
      assert.deepEqual([code, signal], [0, null], `${script}, round ${round + 1}`);
    }
  }
});

/** Accept-Language headers that must get a page in Portuguese. */
const PORTUGUESE_ACCEPT_LANGUAGE = [
  "pt-BR,pt;q=0.9,en;q=0.8",
  "pt",
  "PT-pt",
  "en;q=0.5, pt-BR;q=0.8",
  "fr, pt;q=0.1",
];
/** And ones that must get English: none, other languages, and hostile or broken headers. */
const ENGLISH_ACCEPT_LANGUAGE = [
  undefined,
  "en-US",
  "en-US,en;q=0.9,pt;q=0.8",
  "pt;q=0, en;q=0.1",
  "pt;q=2",
  "pt;q=abc",
  "*",
  "de, fr",
  ";;;,,,=q;pt;;",
  "pt-" + "x".repeat(5000),
  Array.from({ length: 100 }, () => "pt").join(","),
  "\u00e9\u00e7\u00e3o".repeat(10),
];

/**
 * The page at `url` for one Accept-Language, once the headers every served
 * page carries are checked: its Content-Language and its text.
 */
async function fetchPage(url: string, acceptLanguage: string | undefined, method = "GET") {
  const response = await fetch(url, {
    method,
    headers: acceptLanguage === undefined ? {} : { "accept-language": acceptLanguage },
  });
  const what = `${method} Accept-Language: ${acceptLanguage?.slice(0, 40)}`;
  assert.equal(response.status, 200, what);
  assert.equal(response.headers.get("vary"), "Accept-Language", what);
  assert.equal(response.headers.get("x-content-type-options"), "nosniff", what);
  assert.equal(response.headers.get("content-security-policy"), "frame-ancestors 'none'", what);
  assert.equal(response.headers.get("content-type"), "text/html; charset=utf-8", what);
  return { language: response.headers.get("content-language"), html: await response.text() };
}

/**
 * Every Portuguese header gets the page in Portuguese (with the protocol's
 * own "* you are NAME" still English), every other one the English page.
 */
async function assertFollowsAcceptLanguage(
  url: string,
  texts: { portuguese: RegExp[]; english: RegExp[] },
): Promise<void> {
  for (const header of PORTUGUESE_ACCEPT_LANGUAGE) {
    const { language, html } = await fetchPage(url, header);
    assert.equal(language, "pt-BR", header);
    for (const text of texts.portuguese) assert.match(html, text, header);
    assert.match(html, /\\\* you are/, header);
  }
  for (const header of ENGLISH_ACCEPT_LANGUAGE) {
    const { language, html } = await fetchPage(url, header);
    assert.equal(language, "en", header?.slice(0, 40));
    for (const text of texts.english) assert.match(html, text, header?.slice(0, 40));
  }
}

Deno.test("ws server: the browser page follows Accept-Language, Portuguese for pt, English otherwise", async () => {
  await using server = startWsServer({ port: 0, mode: "chat", log: quiet });
  await assertFollowsAcceptLanguage(`http://127.0.0.1:${server.addr.port}/`, {
    english: [
      /<html lang="en">/,
      /<title>WebSocket chat client<\/title>/,
      />Not connected\.</,
      />Connect</,
      /"Closed: code "/,
    ],
    portuguese: [
      /<html lang="pt-BR">/,
      /<title>Cliente WebSocket chat<\/title>/,
      /Cliente WebSocket, modo chat/,
      /<p id="hint">Chat: cada mensagem vai para todo mundo/,
      />Desconectado\.</,
      />Conectar</,
      /placeholder="Digite uma mensagem"/,
      /"Conectado a "/,
      /"Fechada: código "/,
      /"conexão fechada, código "/,
    ],
  });
});

/**
 * The code blocks of a Markdown page, fenced or indented by four spaces, each
 * with whether an `<!-- differs: reason -->` comment stands right before it.
 */
function markdownCodeBlocks(text: string): { code: string; differs: boolean }[] {
  const lines = text.split("\n");
  const blocks: { code: string; differs: boolean }[] = [];
  const differsBefore = (start: number) => {
    let before = start - 1;
    while (before >= 0 && lines[before].trim() === "") before--;
    return before >= 0 && /^<!-- differs: .+ -->$/.test(lines[before].trim());
  };
  for (let i = 0; i < lines.length; i++) {
    if (lines[i].startsWith("```")) {
      const end = lines.indexOf("```", i + 1);
      assert.ok(end > i, `an unclosed fence at line ${i + 1}`);
      blocks.push({ code: lines.slice(i + 1, end).join("\n"), differs: differsBefore(i) });
      i = end;
    } else if (lines[i].startsWith("    ") && (i === 0 || lines[i - 1].trim() === "")) {
      let end = i;
      while (end < lines.length && (lines[end].startsWith("    ") || lines[end].trim() === "")) {
        end++;
      }
      while (lines[end - 1].trim() === "") end--;
      blocks.push({
        code: lines.slice(i, end).map((line) => line.slice(4)).join("\n"),
        differs: differsBefore(i),
      });
      i = end - 1;
    }
  }
  return blocks;
}

Deno.test("readme: every code block in README.pt-BR.md is README.md's, or says why it differs", async () => {
  const english = markdownCodeBlocks(await Deno.readTextFile(scriptPath("README.md")));
  const translated = markdownCodeBlocks(await Deno.readTextFile(scriptPath("README.pt-BR.md")));
  for (const { code, differs } of translated) {
    if (differs) continue;
    assert.ok(
      english.some((block) => block.code.includes(code)),
      `README.pt-BR.md has a code block README.md does not (mark it <!-- differs: reason -->):\n${code}`,
    );
  }
  assert.ok(translated.length >= 15, `only ${translated.length} code blocks found`);
});

Deno.test("bridge ws://: the browser page follows Accept-Language like ws_server.ts's, and says where it relays", async () => {
  using tcp = rawTcpServer();
  await using lines = startBridge({ listen: "ws://127.0.0.1:0/", to: tcp.url, log: quiet });
  await using raw = startBridge({
    listen: "ws://127.0.0.1:0/",
    to: tcp.url,
    framing: "raw",
    log: quiet,
  });
  const linesUrl = `http://127.0.0.1:${lines.addr.port}/`;
  const rawUrl = `http://127.0.0.1:${raw.addr.port}/`;
  await assertFollowsAcceptLanguage(linesUrl, {
    english: [
      /<html lang="en">/,
      /<title>WebSocket to TCP bridge<\/title>/,
      /WebSocket client, bridged to TCP <span id="you">/,
      /relays to the TCP server at <code>tcp:\/\/127\.0\.0\.1:\d+<\/code>: each message you send becomes one line/,
      /<p id="hint">→ marks what you sent/,
      /"Chat: every message goes to everyone connected/,
      />Not connected\.</,
      />Connect</,
      /"— you are "/,
      /"Closed: code "/,
    ],
    portuguese: [
      /<html lang="pt-BR">/,
      /<title>Ponte WebSocket para TCP<\/title>/,
      /Cliente WebSocket, via ponte para TCP <span id="you">/,
      /repassa tudo para o servidor TCP em <code>tcp:\/\/127\.0\.0\.1:\d+<\/code>: cada mensagem que você envia vira uma linha/,
      /<p id="hint">→ marca o que você enviou/,
      /"Chat: cada mensagem vai para todo mundo/,
      /aria-label="URL da ponte"/,
      />Desconectado\.</,
      />Conectar</,
      /placeholder="Digite uma mensagem"/,
      /"— você é "/,
      /"Conectado a "/,
      /"Fechada: código "/,
      /"conexão fechada, código "/,
    ],
  });
  // HEAD answers with the same headers and no body.
  const head = await fetchPage(linesUrl, "pt-BR", "HEAD");
  assert.deepEqual(head, { language: "pt-BR", html: "" });
  // With --framing raw the page does not promise lines.
  const rawPt = await fetchPage(rawUrl, "pt-BR");
  assert.match(rawPt.html, /vai para ele do jeito que está, sem quebra de linha/);
  assert.doesNotMatch(rawPt.html, /vira uma linha/);
  const rawEn = await fetchPage(rawUrl, "en");
  assert.match(rawEn.html, /is written to it as it is, with no newline/);
  assert.doesNotMatch(rawEn.html, /becomes one line/);
});

Deno.test("wire faults: behind --stall-after, a connection whose two ends have closed ends and is reported, the rest discarded and counted", async (t) => {
  // Which way stalls, who sends, and who closes first: the stalled side's
  // sender closes last, so its FIN is what the proxy must still read.
  // With --latency the bytes before the stall wait in the delay line while
  // the rest is read: what is shown and what is discarded must not change.
  const cases = [[], ["--latency", "50"]].flatMap((delay) =>
    (["client", "server"] as const).map((faultsTo) => ({ delay, faultsTo }))
  );
  for (const { delay, faultsTo } of cases) {
    await t.step(`--faults-to ${faultsTo} ${delay.join(" ")}`, async () => {
      using upstream = rawTcpServer();
      await using wire = await spawnWire([
        "--to",
        upstream.url.replace("tcp://", ""),
        "--stall-after",
        "5",
        "--faults-to",
        faultsTo,
        ...delay,
      ]);
      using client = await connectTcp(wire.port);
      using server = bufferedConn(await upstream.accept());
      const [sender, receiver] = faultsTo === "client" ? [server, client] : [client, server];
      const dir = faultsTo === "client" ? "s2c" : "c2s";
      await sender.write("hello world\n");
      assert.equal(
        decoder.decode(await within(receiver.readBytes(5), "the first 5 bytes")),
        "hello",
      );
      await wire.waitFor((e) => e.type === "fault" && e.name === "stall-after", "the stall");
      // The receiver closes first; its FIN still passes the other way, so the
      // sender reads its EOF, sends a last line nobody gets, and closes too.
      receiver.close();
      assert.equal((await within(sender.readToEnd(), "the receiver's FIN")).length, 0);
      await sender.write("more\n");
      sender.close();
      const closed = await wire.waitFor((e) => e.type === "close", "the stalled connection's end");
      assert.equal(closed[`bytes_${dir}`], 17, JSON.stringify(closed));
      assert.equal(closed[`discarded_${dir}`], 12, JSON.stringify(closed));
      assert.ok(!wire.events.some((e) => e.type === "fin" && e.dir === dir), "no FIN passed on");
      assert.ok(!wire.events.some((e) => e.type === "reset"), "both ends closed cleanly");
      // Only what passed is shown: the 5 bytes, none of the discarded rest.
      const shown = wire.events.filter((e) => e.type === "data" && e.dir === dir);
      assert.deepEqual(shown.map((e) => e.text).join(""), "hello", JSON.stringify(shown));
      assertDocumentedFields(wire.events);
    });
  }
});

Deno.test("wire faults: --drop-close when the client closes first: ws_client says its close frame got no answer, not code 1005", async () => {
  await using server = await spawnServer("ws_server.ts", ["--quiet"]);
  await using wire = await spawnWire([
    "--to",
    `127.0.0.1:${server.port}`,
    "--drop-close",
    "--faults-to",
    "server",
  ]);
  // Interactive: the end of stdin is what makes the client close, with 1000.
  const client = await within(
    runScript("ws_client.ts", ["--url", `ws://127.0.0.1:${wire.port}/`], "hello\n"),
    "ws_client behind --drop-close, closing first",
  );
  assert.equal(client.stdout, "hello\n");
  assert.equal(client.code, 1);
  assert.match(client.stderr, /connection lost: .*our close frame/);
  assert.doesNotMatch(client.stderr, /the server closed the connection/);
  assert.equal(client.stderr.trimEnd().split("\n").length, 1, client.stderr);
  assertNoStackTrace(client.stderr);
  const dropped = await wire.waitFor(
    (e) => e.type === "fault" && e.name === "drop-close",
    "the drop-close event",
  );
  assert.deepEqual([dropped.dir, dropped.code], ["c2s", 1000]);
});

Deno.test("wire faults: behind --stall-after towards the server, a client's reset still ends the connection", async () => {
  const { default: net } = await import("node:net");
  using upstream = rawTcpServer();
  await using wire = await spawnWire([
    "--to",
    upstream.url.replace("tcp://", ""),
    "--stall-after",
    "5",
    "--faults-to",
    "server",
  ]);
  // node:net, because a Deno socket cannot send a reset (RST).
  const client = net.connect(wire.port, "127.0.0.1");
  const connected = new Promise<void>((resolve, reject) => {
    client.once("connect", resolve);
    client.once("error", reject);
  });
  try {
    await within(connected, "the client's connection");
    client.write("hello world\n");
    using server = bufferedConn(await upstream.accept());
    assert.equal(decoder.decode(await within(server.readBytes(5), "the first 5 bytes")), "hello");
    await wire.waitFor((e) => e.type === "fault" && e.name === "stall-after", "the stall");
    client.resetAndDestroy();
    await wire.waitFor((e) => e.type === "close", "the end after the client's reset");
    const reset = wire.events.find((e) => e.type === "reset");
    assert.equal(reset?.side, "client", JSON.stringify(wire.events.map((e) => e.type)));
    // As after any reset, the proxy closed the server's side.
    assert.equal((await within(server.readToEnd(), "the server's EOF")).length, 0);
    assertDocumentedFields(wire.events);
  } finally {
    client.destroy();
  }
});
