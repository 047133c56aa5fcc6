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
import { type CertificateFiles, makeCertificates } from "./tools/cert.ts";
import {
  allBytes,
  connectTcp,
  openWs,
  randomBytes,
  runScript,
  scriptPath,
  spawnServer,
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

const SCRIPTS = ["tcp_server.ts", "tcp_client.ts", "ws_server.ts", "ws_client.ts"];

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

// ------------------------------------------------------ TLS: the two clients

/**
 * Certificates made by tools/cert.ts in a temporary folder: a CA and a
 * localhost/127.0.0.1 leaf it signed, a leaf for another name and an expired
 * one from the same CA, and a second CA nobody's leaf comes from.
 */
async function testCertificates() {
  const dir = await Deno.makeTempDir({ prefix: "tls_test_" });
  const good = await makeCertificates({ out: `${dir}/good` });
  const caDir = `${dir}/good`;
  const wrongName = await makeCertificates({ out: `${dir}/name`, caDir, names: ["example.com"] });
  const expired = await makeCertificates({ out: `${dir}/expired`, caDir, days: -1 });
  const other = await makeCertificates({ out: `${dir}/other` });
  const pair = async (files: CertificateFiles) => ({
    cert: await Deno.readTextFile(files.cert),
    key: await Deno.readTextFile(files.key),
  });
  return {
    ca: good.ca,
    otherCa: other.ca,
    good: await pair(good),
    wrongName: await pair(wrongName),
    expired: await pair(expired),
    // A CA's own certificate shown by a server: what a lone self-signed one amounts to.
    caAsServer: await pair({ ...good, cert: good.ca, key: good.caKey }),
    async [Symbol.asyncDispose]() {
      await Deno.remove(dir, { recursive: true });
    },
  };
}

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

  const trusted = await client(good.port, "--ca", certs.ca);
  assert.deepEqual(trusted, { code: 0, stdout: "hello\n", stderr: "" });

  const refusals: [number, string, RegExp][] = [
    [
      good.port,
      certs.otherCa,
      /certificate refused: unknown issuer, .*trust its CA with --ca FILE/,
    ],
    [
      wrongName.port,
      certs.ca,
      /certificate refused: name mismatch, it is for example\.com, not 127\.0\.0\.1;/,
    ],
    [expired.port, certs.ca, /certificate refused: expired; the server needs a new one/],
    [
      caAsServer.port,
      certs.ca,
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

  const trusted = await client(good.addr.port, certs.ca);
  assert.deepEqual(trusted, { code: 0, stdout: "hello\n", stderr: "" });

  const refusals: [number, string, RegExp][] = [
    [
      good.addr.port,
      certs.otherCa,
      /certificate refused: unknown issuer, .*trust its CA with --ca FILE/,
    ],
    [
      wrongName.addr.port,
      certs.ca,
      /certificate refused: name mismatch, it is for example\.com, not 127\.0\.0\.1;/,
    ],
    [expired.addr.port, certs.ca, /certificate refused: expired; the server needs a new one/],
    [
      caAsServer.addr.port,
      certs.ca,
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
function recordingWsServer() {
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
  const { url, got, closed, server } = recordingWsServer();
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
  const { url, got, closed, server } = recordingWsServer();
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
