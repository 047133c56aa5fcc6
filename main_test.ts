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
import { DatagramTooBig, sendDatagrams, startUdpServer } from "./udp.ts";
import {
  allBytes,
  connectTcp,
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

const SCRIPTS = ["tcp_server.ts", "tcp_client.ts", "ws_server.ts", "ws_client.ts", "udp.ts"];

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

/** `udp.ts serve --port 0 ARGS` as a real process: like spawnServer, with the command first. */
async function spawnUdpServer(args: string[]) {
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", scriptPath("udp.ts"), "serve", "--port", "0", ...args],
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const stderr = new Response(child.stderr).text();
  const stdout = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
  let printed = "";
  while (!printed.includes("\n")) {
    const { done, value } = await within(stdout.read(), "udp.ts serve's first line");
    if (done) break;
    printed += value;
  }
  let stopped: Promise<{ code: number; stdout: string; stderr: string; exitMs: number }>;
  async function stop(signal: Deno.Signal) {
    const start = performance.now();
    try {
      child.kill(signal);
    } catch {
      // Already exited.
    }
    const { code } = await child.status;
    const exitMs = performance.now() - start;
    for (let r = await stdout.read(); !r.done; r = await stdout.read()) printed += r.value;
    return { code, stdout: printed, stderr: await stderr, exitMs };
  }
  const line = printed.split("\n")[0];
  const port = Number(line.match(/^listening on udp:\/\/127\.0\.0\.1:(\d+)$/)?.[1]);
  if (!port) {
    throw new Error(`udp.ts serve did not start: ${line} ${(await stop("SIGKILL")).stderr}`);
  }
  return {
    line,
    port,
    stop: (signal: Deno.Signal = "SIGTERM") => stopped ??= stop(signal),
    async [Symbol.asyncDispose]() {
      await (stopped ??= stop("SIGKILL"));
    },
  };
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

// ------------------------------------------------------- TLS for tcp_server

/** A log to pass as `log`, whose lines can be awaited. */
function awaitableLog() {
  const lines: string[] = [];
  let wake = () => {};
  return {
    lines,
    log(line: string) {
      lines.push(line);
      wake();
    },
    /** Resolves once `predicate(lines)` holds, within WAIT_MS. */
    async until(predicate: (lines: string[]) => boolean, what: string): Promise<void> {
      await within(
        (async () => {
          while (!predicate(lines)) await new Promise<void>((resolve) => wake = resolve);
        })(),
        what,
      );
    },
  };
}

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
  const tls = { cert: certs.leaf, key: certs.leafKey, log: quiet };
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
  const server = startTcpServer({ port: 0, cert: certs.leaf, key: certs.leafKey, log: events.log });
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
    await events.until((lines) => failures().length >= 1 && lines.length >= 2, "the plain line");
    const stranger = await Deno.connectTls({ hostname: "127.0.0.1", port: server.addr.port });
    await assert.rejects(stranger.handshake(), /UnknownIssuer|certificate/i);
    stranger.close();
    await events.until(() => failures().length >= 2, "the refused certificate's line");

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
  const { leaf, leafKey, otherKey, ca } = certs.files;
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
      /--key .*other\.key is not the private key of the certificate in --cert .*leaf\.pem$/,
    ],
    [["--cert", leafKey, "--key", leafKey], /--cert .*leaf\.key holds no PEM certificate/],
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
