/**
 * interop_test.ts: the four scripts against networking code nobody here
 * wrote: Python's `socket` module, Node.js's `net`, OpenBSD netcat, the `ws`
 * package, python-websockets, and a real Chromium using the page that
 * ws_server.ts serves. Each peer talks to our servers and, where that makes
 * sense, our clients talk to a server built on it. The WebSocket peers do it
 * over TLS too (wss://, with a test CA from tools/cert.ts; openssl needed).
 *
 *     npm ci --prefix tests/interop             # the ws package, once
 *     deno test -A tests/interop_test.ts        # or: deno task test:interop
 *
 * The small peer programs are in tests/interop/ (its README.md says what each
 * is). A test whose peer is not installed is skipped, with what to install
 * in its name; under CI=true it fails instead, so CI never passes by
 * skipping. Every server binds port 0 and prints its real port, and every
 * wait is for an event (a line, a close, a DOM change) with a timeout.
 *
 * Chromium is driven through the DevTools protocol (CDP) over Deno's own
 * WebSocket client, not playwright-core. CDP *is* a WebSocket protocol, so
 * driving the browser is one more interop check of the kind this file is
 * about; it needs no npm package in a Deno test (Node's module loading, a
 * driver that spawns its own helpers) and every process, socket and timer
 * the browser tests open is Deno's own, so the sanitizers see all of them.
 * The tests use the page as a person would: real mouse clicks and text
 * input (Input.dispatchMouseEvent, Input.insertText, Input.dispatchKeyEvent),
 * and they read what the page shows in #status and #log. They never touch
 * the page's WebSocket. Set UPDATE_SCREENSHOT=1 to write the chat test's
 * screenshot to docs/chat.png and the bridge test's to docs/bridge.png (they
 * are taken and checked on every run).
 */

import assert from "node:assert/strict";
import {
  allBytes,
  randomBytes,
  scriptPath,
  type TestCertificates,
  testCertificates,
  within,
} from "./helpers.ts";

const TIMEOUT_MS = 15_000;
const CI = Deno.env.get("CI") === "true";
const INTEROP_DIR = scriptPath("tests/interop");
const encoder = new TextEncoder();
const decoder = new TextDecoder();

// --------------------------------------------------------------- the peers

/** A program a test needs: found on this machine or not, and how to get it. */
interface Peer {
  found: boolean;
  install: string;
}

// Debian's python3-websockets lives in /usr/bin/python3's dist-packages; a
// python3 earlier on PATH (pyenv, a venv) may not see it, so try that first.
const PYTHON_CANDIDATES = ["/usr/bin/python3", "python3"];
const PYTHON = await firstThatRuns(PYTHON_CANDIDATES, ["-c", "import socket"]);
const PYTHON_WITH_WEBSOCKETS = await firstThatRuns(PYTHON_CANDIDATES, ["-c", "import websockets"]);
const CHROMIUM = Deno.env.get("CHROMIUM") ?? "/usr/bin/chromium";

const python: Peer = { found: PYTHON !== undefined, install: "python3" };
const pythonWebsockets: Peer = {
  found: PYTHON_WITH_WEBSOCKETS !== undefined,
  install: "python3-websockets (apt-get install python3-websockets)",
};
const node: Peer = { found: await runs("node", ["--version"]), install: "Node.js (node)" };
const nodeWs: Peer = {
  found: node.found && await exists(`${INTEROP_DIR}/node_modules/ws/package.json`),
  install: "the ws package (npm ci --prefix tests/interop)",
};
// Only OpenBSD's netcat has -N (half-close at the end of stdin).
const netcat: Peer = {
  found: (await outputOf("nc", ["-h"])).includes("-N"),
  install: "OpenBSD netcat (apt-get install netcat-openbsd)",
};
const chromium: Peer = {
  found: await exists(CHROMIUM),
  install: `Chromium at ${CHROMIUM} (apt-get install chromium, or set CHROMIUM)`,
};

/**
 * A test that needs peers: skipped with the reason in its name when one is
 * missing, except under CI=true, where a missing peer fails the test.
 */
function interopTest(name: string, peers: Peer[], fn: () => Promise<void>): void {
  const missing = peers.filter((peer) => !peer.found).map((peer) => peer.install);
  if (missing.length > 0 && !CI) {
    Deno.test({ name: `${name} (skipped: needs ${missing.join(", ")})`, ignore: true, fn });
    return;
  }
  Deno.test(name, async () => {
    assert.deepEqual(missing, [], "CI=true, so a missing peer is a failure, not a skip");
    await fn();
  });
}

// --------------------------------------------------- the README's one-liners

// One-liners a reader would type to reach the servers, as the tests run
// them; the README's "Talk to it from anything" shows each with the default
// port (9000 for TCP, 8080 for WebSocket), and a test keeps the two the same.
const ONE_LINERS = {
  pythonTcp: (port: number) =>
    `python3 -c 'import socket; s = socket.create_connection(("127.0.0.1", ${port})); ` +
    `s.sendall(b"hello\\n"); s.shutdown(socket.SHUT_WR); print(s.makefile().read(), end="")'`,
  nodeTcp: (port: number) =>
    `node -e 'const s = require("net").connect(${port}, "127.0.0.1", () => s.end("hello\\n")); ` +
    `s.pipe(process.stdout)'`,
  netcatEcho: (port: number) => `printf 'hello\\n' | nc -N 127.0.0.1 ${port}`,
  netcatChat: (port: number) => `nc -N 127.0.0.1 ${port}`,
  pythonWs: (port: number) => `/usr/bin/python3 -m websockets ws://127.0.0.1:${port}/`,
  nodeWs: (port: number) =>
    `node -e 'const ws = new (require("ws"))("ws://127.0.0.1:${port}/"); ` +
    `ws.on("open", () => ws.send("hello")); ` +
    `ws.on("message", (m) => { console.log(String(m)); ws.close(); })'`,
  browser: (port: number) => `http://127.0.0.1:${port}/`,
  devtoolsConsole: (port: number) =>
    `const ws = new WebSocket("ws://127.0.0.1:${port}/");\n` +
    `ws.onmessage = (e) => console.log(e.data);\n` +
    `ws.onopen = () => ws.send("hello from the console");`,
};
const TCP_ONE_LINERS = new Set(["pythonTcp", "nodeTcp", "netcatEcho", "netcatChat"]);

// ------------------------------------------------------------ processes

/** A peer program's path: they live in tests/interop/. */
function peer(name: string): string {
  return scriptPath(`tests/interop/${name}`);
}

function deno(script: string, ...args: string[]): [string, string[]] {
  return [Deno.execPath(), ["run", "-A", scriptPath(script), ...args]];
}

// One-liners run through sh, exactly as a reader would type them.
function shell(line: string): [string, string[]] {
  return ["sh", ["-c", line]];
}

// `python3` in a one-liner must be the one that has websockets (and Debian's
// is not always first on PATH). The tests send UTF-8 text through Python's
// stdio, whatever the machine's locale.
function peerEnv(): Record<string, string> {
  const python = PYTHON_WITH_WEBSOCKETS ?? PYTHON;
  const env = { PYTHONUTF8: "1" };
  if (!python?.includes("/")) return env;
  const dir = python.slice(0, python.lastIndexOf("/"));
  return { ...env, PATH: `${dir}:${Deno.env.get("PATH") ?? ""}` };
}

async function exists(path: string): Promise<boolean> {
  try {
    await Deno.stat(path);
    return true;
  } catch {
    return false;
  }
}

async function outputOf(command: string, args: string[]): Promise<string> {
  try {
    const { stdout, stderr } = await new Deno.Command(command, { args, stdin: "null" }).output();
    return decoder.decode(stdout) + decoder.decode(stderr);
  } catch {
    return "";
  }
}

async function runs(command: string, args: string[]): Promise<boolean> {
  try {
    const { success } = await new Deno.Command(command, {
      args,
      stdin: "null",
      stdout: "null",
      stderr: "null",
    }).output();
    return success;
  } catch {
    return false;
  }
}

async function firstThatRuns(commands: string[], args: string[]): Promise<string | undefined> {
  for (const command of commands) {
    if (await runs(command, args)) return command;
  }
  return undefined;
}

interface RunOptions {
  stdin?: string | Uint8Array;
  cwd?: string;
}

/** Runs a program to completion (killed after TIMEOUT_MS) and returns its exit code and output. */
async function run([command, args]: [string, string[]], options: RunOptions = {}) {
  const child = new Deno.Command(command, {
    args,
    cwd: options.cwd,
    env: peerEnv(),
    stdin: options.stdin === undefined ? "null" : "piped",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  // Read while writing: a program that echoes its input would otherwise
  // block on a full stdout pipe, and then so would our write.
  const output = child.output();
  let timer: ReturnType<typeof setTimeout> | undefined;
  try {
    timer = setTimeout(() => child.kill("SIGKILL"), TIMEOUT_MS);
    if (options.stdin !== undefined) {
      const writer = child.stdin.getWriter();
      const bytes = typeof options.stdin === "string"
        ? encoder.encode(options.stdin)
        : options.stdin;
      await writer.write(bytes).catch(() => {});
      await writer.close().catch(() => {});
    }
    const { code, signal, stdout, stderr } = await output;
    const what = `${command} ${args.join(" ")}`;
    assert.equal(signal, null, `${what} was killed (timed out?): ${decoder.decode(stderr)}`);
    return { code, bytes: stdout, stdout: decoder.decode(stdout), stderr: decoder.decode(stderr) };
  } finally {
    clearTimeout(timer);
  }
}

/** A program left running: read its stdout line by line, write to its stdin, stop it. */
function spawn(
  [command, args]: [string, string[]],
  options: { cwd?: string; stdin?: boolean } = {},
) {
  const what = [command, ...args].join(" ");
  const child = new Deno.Command(command, {
    args,
    cwd: options.cwd,
    env: peerEnv(),
    stdin: options.stdin ? "piped" : "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const stderr = new Response(child.stderr).text();
  const stdout = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
  const stdin = options.stdin ? child.stdin.getWriter() : undefined;
  let buffered = "";
  let eof = false;
  let stdinOpen = options.stdin ?? false;
  // A read that timed out is still pending: the next call must reuse it, or
  // the text it brings would be lost.
  let reading: Promise<ReadableStreamReadResult<string>> | undefined;
  let finished: Promise<{ code: number; signal: string | null; rest: string; stderr: string }>;

  async function nextLine(): Promise<string | null> {
    for (;;) {
      const end = buffered.indexOf("\n");
      if (end !== -1) {
        const line = buffered.slice(0, end);
        buffered = buffered.slice(end + 1);
        return line;
      }
      if (eof) {
        const rest = buffered;
        buffered = "";
        return rest === "" ? null : rest;
      }
      reading ??= stdout.read().finally(() => reading = undefined);
      const { done, value } = await within(
        reading,
        `a line from ${what} (so far: ${JSON.stringify(buffered)})`,
        TIMEOUT_MS,
      );
      if (done) eof = true;
      else buffered += value;
    }
  }

  async function closeStdin(): Promise<void> {
    if (!stdinOpen) return;
    stdinOpen = false;
    await stdin!.close().catch(() => {});
  }

  async function finish() {
    await closeStdin();
    let status;
    let stuck: unknown;
    try {
      status = await within(child.status, `${what} to exit`, TIMEOUT_MS);
    } catch (error) {
      stuck = error;
      child.kill("SIGKILL");
      status = await child.status;
    }
    let rest = buffered;
    for (let r = await (reading ?? stdout.read()); !r.done; r = await stdout.read()) {
      rest += r.value;
    }
    buffered = "";
    if (stuck) throw stuck;
    return { code: status.code, signal: status.signal, rest, stderr: await stderr };
  }

  return {
    nextLine,
    closeStdin,
    async write(text: string) {
      await stdin!.write(encoder.encode(text));
    },
    /** Closes stdin, waits for the exit, and returns what it had not read yet. */
    finish: () => finished ??= finish(),
    stop(signal: Deno.Signal = "SIGTERM") {
      try {
        child.kill(signal);
      } catch {
        // Already exited.
      }
      return finished ??= finish();
    },
    async [Symbol.asyncDispose]() {
      if (!finished) {
        try {
          child.kill("SIGKILL");
        } catch {
          // Already exited.
        }
      }
      await (finished ??= finish()).catch(() => {});
    },
  };
}

/** A server that prints "listening on tcp://127.0.0.1:PORT" or "ws://…/" first. */
async function startServer(program: [string, string[]]) {
  const server = spawn(program);
  const line = await server.nextLine().catch(() => null);
  const port = Number(line?.match(/^listening on (?:tcp|ws):\/\/127\.0\.0\.1:(\d+)\/?$/)?.[1]);
  if (!port) {
    const { stderr } = await server.stop("SIGKILL");
    throw new Error(`${program[1].join(" ")} did not start: ${line}\n${stderr}`);
  }
  return Object.assign(server, { port, url: `ws://127.0.0.1:${port}/` });
}

/** Reads lines until one matches, and returns them all (at most 50). */
async function linesUntil(
  program: { nextLine(): Promise<string | null> },
  pattern: RegExp,
): Promise<string[]> {
  const lines: string[] = [];
  while (lines.length < 50) {
    const line = await program.nextLine();
    if (line === null) break;
    lines.push(line);
    if (pattern.test(line)) return lines;
  }
  throw new Error(`no line matched ${pattern}; got ${JSON.stringify(lines)}`);
}

async function nextLines(program: { nextLine(): Promise<string | null> }, count: number) {
  const lines: (string | null)[] = [];
  for (let i = 0; i < count; i++) lines.push(await program.nextLine());
  return lines;
}

/**
 * The first member of a chat says `text`: its first line must be the
 * server's "* you are guest-1", and its next the room's relay of `text`.
 */
async function assertFirstInChatSays(
  program: { nextLine(): Promise<string | null>; write(text: string): Promise<void> },
  text: string,
): Promise<void> {
  assert.equal(await program.nextLine(), "* you are guest-1");
  await program.write(`${text}\n`);
  assert.equal(await program.nextLine(), `guest-1: ${text}`);
}

/** How the peers print a binary message of N bytes 0, 1, 2, …: `binary:N` sends one. */
async function binaryLine(size: number): Promise<string> {
  const bytes = Uint8Array.from({ length: size }, (_, i) => i % 256);
  const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", bytes));
  const hex = Array.from(digest, (byte) => byte.toString(16).padStart(2, "0")).join("");
  return `<binary ${size} bytes sha256 ${hex}>`;
}

/**
 * Runs `program` with every byte value and then `randomCount` random bytes
 * on its stdin: it must exit 0 having printed exactly those bytes. Enough
 * bytes take many reads and writes on the way.
 */
async function assertEchoesBytes(program: [string, string[]], randomCount: number) {
  const payload = new Uint8Array([...allBytes(), ...randomBytes(randomCount)]);
  const echoed = await run(program, { stdin: payload });
  assert.equal(echoed.code, 0, echoed.stderr);
  assert.deepEqual(echoed.bytes, payload);
}

/**
 * tcp_client.ts against an echo server written on another stack: its
 * arguments go as lines, and in interactive mode its stdin as it is (bytes,
 * not lines).
 */
async function assertTcpClientAgainstEchoServer(program: [string, string[]]) {
  await using server = await startServer(program);
  const oneShot = await run(deno("tcp_client.ts", "--port", String(server.port), "hello", "ü ✓"));
  assert.equal(oneShot.stdout, "hello\nü ✓\n", oneShot.stderr);
  assert.equal(oneShot.code, 0);
  await assertEchoesBytes(deno("tcp_client.ts", "--port", String(server.port)), 256 * 1024);
}

/**
 * ws_client.ts against an echo server written on another stack, which
 * prints how each connection closed: ours closes with 1000.
 */
async function assertWsClientAgainstEchoServer(program: [string, string[]]) {
  await using server = await startServer(program);
  const client = await run(deno("ws_client.ts", "--url", server.url, "hello", "ünïcödé ✓"));
  assert.equal(client.stdout, "hello\nünïcödé ✓\n", client.stderr);
  assert.equal(client.code, 0);
  assert.equal(await server.nextLine(), "closed 1000");
}

/**
 * A peer's WebSocket client (`command`, running `script` from tests/interop/)
 * sends two texts and binary messages of 256 and `largeSize` bytes to the
 * echo server at `url` (with `options` before them: a --ca, say): it must
 * print every echo, then a clean close.
 */
async function assertPeerWsClientEchoed(
  command: string,
  script: string,
  url: string,
  largeSize: number,
  options: string[] = [],
) {
  const client = await run([
    command,
    [peer(script), url, ...options, "hello", "ünïcödé ✓", "binary:256", `binary:${largeSize}`],
  ]);
  assert.equal(client.code, 0, client.stderr);
  assert.deepEqual(client.stdout.split("\n"), [
    "hello",
    "ünïcödé ✓",
    await binaryLine(256),
    await binaryLine(largeSize),
    "closed 1000",
    "",
  ]);
}

// ============================================================ TCP: Python

interopTest("python socket: the README one-liner and tcp_client.py against tcp_server.ts echo", [
  python,
], async () => {
  await using server = await startServer(deno("tcp_server.ts", "--port", "0", "--quiet"));
  const oneLiner = await run(shell(ONE_LINERS.pythonTcp(server.port)));
  assert.equal(oneLiner.stdout, "hello\n", oneLiner.stderr);
  assert.equal(oneLiner.code, 0);

  const lines = await run([PYTHON!, [peer("tcp_client.py"), String(server.port), "hi", "ü ✓"]]);
  assert.equal(lines.stdout, "hi\nü ✓\n", lines.stderr);
  await assertEchoesBytes([PYTHON!, [peer("tcp_client.py"), String(server.port)]], 256 * 1024);
});

interopTest("python socket: tcp_client.py chats through tcp_server.ts with tcp_client.ts", [
  python,
], async () => {
  await using server = await startServer(
    deno("tcp_server.ts", "--port", "0", "--mode", "chat", "--quiet"),
  );
  await using denoClient = spawn(deno("tcp_client.ts", "--port", String(server.port)), {
    stdin: true,
  });
  // Every client prints what the server sends, its own name first.
  await assertFirstInChatSays(denoClient, "hi, who's there?");

  const oneLiner = await run(shell(ONE_LINERS.pythonTcp(server.port)));
  assert.equal(oneLiner.stdout, "* you are guest-2\nguest-2: hello\n", oneLiner.stderr);
  const py = await run([PYTHON!, [peer("tcp_client.py"), String(server.port), "Python here"]]);
  assert.equal(py.stdout, "* you are guest-3\nguest-3: Python here\n", py.stderr);
  assert.deepEqual(await nextLines(denoClient, 6), [
    "* guest-2 joined",
    "guest-2: hello",
    "* guest-2 left",
    "* guest-3 joined",
    "guest-3: Python here",
    "* guest-3 left",
  ]);
  const { code } = await denoClient.finish();
  assert.equal(code, 0);
});

interopTest(
  "python socket: tcp_client.ts against a Python echo server",
  [python],
  () => assertTcpClientAgainstEchoServer([PYTHON!, [peer("tcp_echo_server.py"), "0"]]),
);

// ============================================================ TCP: Node.js

interopTest("node net: the README one-liner and tcp_client.mjs against tcp_server.ts echo", [
  node,
], async () => {
  await using server = await startServer(deno("tcp_server.ts", "--port", "0", "--quiet"));
  const oneLiner = await run(shell(ONE_LINERS.nodeTcp(server.port)));
  assert.equal(oneLiner.stdout, "hello\n", oneLiner.stderr);
  assert.equal(oneLiner.code, 0);
  await assertEchoesBytes(["node", [peer("tcp_client.mjs"), String(server.port)]], 256 * 1024);
});

interopTest("node net: tcp_client.mjs chats through tcp_server.ts with tcp_client.ts", [
  node,
], async () => {
  await using server = await startServer(
    deno("tcp_server.ts", "--port", "0", "--mode", "chat", "--quiet"),
  );
  await using denoClient = spawn(deno("tcp_client.ts", "--port", String(server.port)), {
    stdin: true,
  });
  await assertFirstInChatSays(denoClient, "hi");
  const js = await run(["node", [peer("tcp_client.mjs"), String(server.port), "one", "two"]]);
  assert.equal(js.stdout, "* you are guest-2\nguest-2: one\nguest-2: two\n", js.stderr);
  assert.deepEqual(await nextLines(denoClient, 4), [
    "* guest-2 joined",
    "guest-2: one",
    "guest-2: two",
    "* guest-2 left",
  ]);
  assert.equal((await denoClient.finish()).code, 0);
});

interopTest(
  "node net: tcp_client.ts against a Node.js echo server",
  [node],
  () => assertTcpClientAgainstEchoServer(["node", [peer("tcp_echo_server.mjs"), "0"]]),
);

// ================================================================= netcat

interopTest("netcat: the README one-liner and every byte value against tcp_server.ts echo", [
  netcat,
], async () => {
  await using server = await startServer(deno("tcp_server.ts", "--port", "0", "--quiet"));
  const oneLiner = await run(shell(ONE_LINERS.netcatEcho(server.port)));
  assert.equal(oneLiner.stdout, "hello\n", oneLiner.stderr);
  assert.equal(oneLiner.code, 0);
  await assertEchoesBytes(shell(ONE_LINERS.netcatChat(server.port)), 64 * 1024);
});

interopTest("netcat: nc chats through tcp_server.ts with tcp_client.ts, then leaves", [
  netcat,
], async () => {
  await using server = await startServer(
    deno("tcp_server.ts", "--port", "0", "--mode", "chat", "--quiet"),
  );
  await using nc = spawn(shell(ONE_LINERS.netcatChat(server.port)), { stdin: true });
  await assertFirstInChatSays(nc, "netcat here");
  const denoClient = await run(deno("tcp_client.ts", "--port", String(server.port), "hi nc"));
  assert.equal(denoClient.stdout, "* you are guest-2\nguest-2: hi nc\n", denoClient.stderr);
  assert.deepEqual(await nextLines(nc, 3), [
    "* guest-2 joined",
    "guest-2: hi nc",
    "* guest-2 left",
  ]);
  // -N: the end of stdin sends FIN; the server closes, and nc exits.
  await nc.write("bye\n");
  const { code, rest } = await nc.finish();
  assert.equal(rest, "guest-1: bye\n");
  assert.equal(code, 0);
});

// ======================================================= WebSocket: Node ws

interopTest("ws (Node.js): text, binary, every byte value and 1 MiB through ws_server.ts echo", [
  nodeWs,
], async () => {
  await using server = await startServer(deno("ws_server.ts", "--port", "0", "--quiet"));
  const oneLiner = await run(shell(ONE_LINERS.nodeWs(server.port)), { cwd: INTEROP_DIR });
  assert.equal(oneLiner.stdout, "hello\n", oneLiner.stderr);
  assert.equal(oneLiner.code, 0);

  await assertPeerWsClientEchoed("node", "ws_client.mjs", server.url, 1048576);
  // One byte over --max-message (1 MiB by default).
  const tooBig = await run(["node", [peer("ws_client.mjs"), server.url, "binary:1048577"]]);
  assert.equal(tooBig.stdout, "closed 1009 message too big (max 1048576 bytes)\n", tooBig.stderr);
});

interopTest("ws (Node.js): chat with ws_client.ts; binary closes 1003, too big 1009", [
  nodeWs,
], async () => {
  await using server = await startServer(
    deno("ws_server.ts", "--port", "0", "--mode", "chat", "--max-message", "100", "--quiet"),
  );
  await using denoClient = spawn(deno("ws_client.ts", "--url", server.url), { stdin: true });
  // Every client prints what the server sends, its own name first.
  await assertFirstInChatSays(denoClient, "hi");

  const js = await run(["node", [peer("ws_client.mjs"), server.url, "from ws"]]);
  assert.equal(js.stdout, "* you are guest-2\nguest-2: from ws\nclosed 1000\n", js.stderr);
  const binary = await run(["node", [peer("ws_client.mjs"), server.url, "binary:3"]]);
  assert.equal(binary.stdout, "* you are guest-3\nclosed 1003 text messages only\n", binary.stderr);
  const big = await run(["node", [peer("ws_client.mjs"), server.url, "x".repeat(101)]]);
  assert.equal(
    big.stdout,
    "* you are guest-4\nclosed 1009 message too big (max 100 bytes)\n",
    big.stderr,
  );
  assert.deepEqual(await nextLines(denoClient, 7), [
    "* guest-2 joined",
    "guest-2: from ws",
    "* guest-2 left",
    "* guest-3 joined",
    "* guest-3 left",
    "* guest-4 joined",
    "* guest-4 left",
  ]);
  assert.equal((await denoClient.finish()).code, 0);
});

interopTest("ws (Node.js): SIGTERM on ws_server.ts closes a ws client with 1001", [
  nodeWs,
], async () => {
  await using server = await startServer(deno("ws_server.ts", "--port", "0", "--quiet"));
  await using js = spawn(["node", [peer("ws_client.mjs"), server.url, "--stay", "hello"]]);
  assert.equal(await js.nextLine(), "hello");
  const { code } = await server.stop("SIGTERM");
  assert.equal(code, 0);
  assert.equal(await js.nextLine(), "closed 1001 server shutting down");
  const exited = await js.finish();
  assert.equal(exited.code, 0, exited.stderr);
});

interopTest(
  "ws (Node.js): ws_client.ts against a ws echo server closes with 1000",
  [nodeWs],
  () => assertWsClientAgainstEchoServer(["node", [peer("ws_echo_server.mjs"), "0"]]),
);

// ==================================================== python-websockets

interopTest("python-websockets: ws_client.py and python -m websockets against ws_server.ts", [
  pythonWebsockets,
], async () => {
  await using server = await startServer(deno("ws_server.ts", "--port", "0", "--quiet"));
  await assertPeerWsClientEchoed(PYTHON_WITH_WEBSOCKETS!, "ws_client.py", server.url, 65536);

  // The interactive client draws a prompt with terminal escapes; what
  // matters is the "< hello" it prints for the echo.
  await using repl = spawn(shell(ONE_LINERS.pythonWs(server.port)), { stdin: true });
  await linesUntil(repl, /Connected to ws:\/\/127\.0\.0\.1:\d+\//);
  await repl.write("hello\n");
  await linesUntil(repl, /< hello$/);
  const { code, rest } = await repl.finish();
  assert.match(rest, /Connection closed: 1000 \(OK\)/);
  assert.equal(code, 0);
});

interopTest("python-websockets: chat with ws_client.ts; binary closes 1003", [
  pythonWebsockets,
], async () => {
  await using server = await startServer(
    deno("ws_server.ts", "--port", "0", "--mode", "chat", "--quiet"),
  );
  await using denoClient = spawn(deno("ws_client.ts", "--url", server.url), { stdin: true });
  await assertFirstInChatSays(denoClient, "hi");
  const py = await run([PYTHON_WITH_WEBSOCKETS!, [peer("ws_client.py"), server.url, "from py"]]);
  assert.equal(py.stdout, "* you are guest-2\nguest-2: from py\nclosed 1000\n", py.stderr);
  const binary = await run([PYTHON_WITH_WEBSOCKETS!, [
    peer("ws_client.py"),
    server.url,
    "binary:3",
  ]]);
  assert.equal(binary.stdout, "* you are guest-3\nclosed 1003 text messages only\n", binary.stderr);
  assert.deepEqual(await nextLines(denoClient, 5), [
    "* guest-2 joined",
    "guest-2: from py",
    "* guest-2 left",
    "* guest-3 joined",
    "* guest-3 left",
  ]);
  assert.equal((await denoClient.finish()).code, 0);
});

interopTest(
  "python-websockets: ws_client.ts against a websockets echo server",
  [pythonWebsockets],
  () =>
    assertWsClientAgainstEchoServer([PYTHON_WITH_WEBSOCKETS!, [peer("ws_echo_server.py"), "0"]]),
);

// ============================================================== Chromium

// Known to work headless as root on a machine without a network: no
// sandbox (root), no GPU, nothing that phones home.
const CHROMIUM_FLAGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];
// The whole page at its natural size, and no more, so that the README
// shows it large; pixels at twice the density keep the text sharp there.
const VIEWPORT = { width: 900, height: 600, deviceScaleFactor: 2, mobile: false };

// deno-lint-ignore no-explicit-any
type CdpResult = any;

/**
 * A DevTools protocol connection: JSON commands with ids, answered by
 * results with the same id, and events without one. With `flatten`
 * sessions, one WebSocket carries every page; `sessionId` says which.
 */
async function connectCdp(url: string) {
  const socket = new WebSocket(url);
  const replies = new Map<number, PromiseWithResolvers<CdpResult>>();
  const waiters = new Set<(message: CdpResult) => boolean>();
  const closed = Promise.withResolvers<void>();
  let lastId = 0;
  socket.onmessage = (event) => {
    const message = JSON.parse(event.data);
    const reply = replies.get(message.id);
    if (reply) {
      replies.delete(message.id);
      if (message.error) reply.reject(new Error(`CDP: ${JSON.stringify(message.error)}`));
      else reply.resolve(message.result);
      return;
    }
    for (const waiter of waiters) if (waiter(message)) waiters.delete(waiter);
  };
  socket.onclose = () => {
    for (const reply of replies.values()) reply.reject(new Error("CDP connection closed"));
    replies.clear();
    closed.resolve();
  };
  await within(
    new Promise((resolve, reject) => {
      socket.onopen = resolve;
      socket.onerror = () => reject(new Error(`cannot connect to ${url}`));
    }),
    "the DevTools WebSocket to open",
    TIMEOUT_MS,
  );
  socket.onerror = () => {};

  function send(method: string, params = {}, sessionId?: string): Promise<CdpResult> {
    const id = ++lastId;
    const reply = Promise.withResolvers<CdpResult>();
    replies.set(id, reply);
    socket.send(JSON.stringify({ id, method, params, sessionId }));
    return within(reply.promise, method, TIMEOUT_MS).finally(() => replies.delete(id));
  }

  /** An event still to come: call before the action that causes it. */
  function nextEvent(
    method: string,
    sessionId: string,
    matches: (params: CdpResult) => boolean = () => true,
  ): Promise<CdpResult> {
    const event = Promise.withResolvers<CdpResult>();
    const waiter = (message: CdpResult) => {
      if (message.method !== method || message.sessionId !== sessionId) return false;
      if (!matches(message.params)) return false;
      event.resolve(message.params);
      return true;
    };
    waiters.add(waiter);
    return within(event.promise, `the event ${method}`, TIMEOUT_MS)
      .finally(() => waiters.delete(waiter));
  }

  return {
    send,
    nextEvent,
    async close() {
      socket.close();
      await closed.promise;
    },
  };
}

type Cdp = Awaited<ReturnType<typeof connectCdp>>;

/**
 * Starts Chromium on a fresh profile with its DevTools on a free port;
 * `extraFlags` go after the usual ones.
 */
async function launchChromium(extraFlags: string[] = []) {
  const profile = await Deno.makeTempDir({ prefix: "interop-chromium-" });
  const child = new Deno.Command(CHROMIUM, {
    args: [
      ...CHROMIUM_FLAGS,
      ...extraFlags,
      `--user-data-dir=${profile}`,
      "--remote-debugging-port=0",
      "about:blank",
    ],
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const stdout = new Response(child.stdout).text();
  // Chromium says where its DevTools listen in one line on stderr.
  const stderr = child.stderr.pipeThrough(new TextDecoderStream()).getReader();
  let log = "";
  let devtools: string | undefined;
  try {
    await within(
      (async () => {
        while (devtools === undefined) {
          const { done, value } = await stderr.read();
          if (done) throw new Error(`Chromium exited:\n${log}`);
          log += value;
          devtools = log.match(/DevTools listening on (ws:\/\/\S+)/)?.[1];
        }
      })(),
      "Chromium's DevTools URL",
      TIMEOUT_MS,
    );
  } catch (error) {
    child.kill("SIGKILL");
    await Promise.all([child.status, stdout, stderr.cancel()]);
    await Deno.remove(profile, { recursive: true });
    throw error;
  }
  // Keep draining stderr, or Chromium would block once the pipe is full.
  const draining = (async () => {
    for (let r = await stderr.read(); !r.done; r = await stderr.read()) log += r.value;
  })();
  const cdp = await connectCdp(devtools!);
  return {
    cdp,
    openPage: (url: string) => openPage(cdp, url),
    async [Symbol.asyncDispose]() {
      await cdp.send("Browser.close").catch(() => {});
      await cdp.close();
      const exited = await within(child.status, "Chromium to exit", TIMEOUT_MS).catch(() => {
        child.kill("SIGKILL");
        return child.status;
      });
      await Promise.all([exited, draining, stdout]);
      await Deno.remove(profile, { recursive: true });
    },
  };
}

/** A new tab, loaded: its CDP session and a way to send commands to it. */
async function openPage(cdp: Cdp, url: string) {
  const { targetId } = await cdp.send("Target.createTarget", { url: "about:blank" });
  const { sessionId } = await cdp.send("Target.attachToTarget", { targetId, flatten: true });
  const send = (method: string, params = {}) => cdp.send(method, params, sessionId);
  await send("Page.enable");
  await send("Runtime.enable");
  await send("Emulation.setDeviceMetricsOverride", VIEWPORT);
  const loaded = cdp.nextEvent("Page.loadEventFired", sessionId);
  const { errorText } = await send("Page.navigate", { url });
  if (errorText) throw new Error(`cannot load ${url}: ${errorText}`);
  await loaded;
  return { cdp, sessionId, send };
}

type Page = Awaited<ReturnType<typeof openPage>>;

/** Evaluates an expression in the page (awaiting it if it is a promise) and returns its value. */
async function evaluate(page: Page, expression: string): Promise<CdpResult> {
  const { result, exceptionDetails } = await page.send("Runtime.evaluate", {
    expression,
    awaitPromise: true,
    returnByValue: true,
  });
  if (exceptionDetails) {
    throw new Error(
      `in the page: ${exceptionDetails.exception?.description ?? exceptionDetails.text}`,
    );
  }
  return result.value;
}

/** What #log shows: one entry per `<li>`, with its class (sent, note) if any. */
const LOG_ITEMS_JS = `[...document.querySelectorAll("#log li")]
  .map((li) => li.className ? li.className + ": " + li.textContent : li.textContent)`;

/**
 * Waits until `conditionJs`, evaluated in the page after each DOM change, is
 * truthy, and returns its value. A MutationObserver makes it an event, not a
 * polling loop.
 */
async function waitForPage(page: Page, conditionJs: string, what: string): Promise<CdpResult> {
  const expression = `new Promise((resolve) => {
    const check = () => {
      const value = ${conditionJs};
      if (value) { observer.disconnect(); resolve(value); }
    };
    const observer = new MutationObserver(check);
    observer.observe(document.body, { subtree: true, childList: true, characterData: true });
    check();
  })`;
  try {
    return await evaluate(page, expression);
  } catch (error) {
    const shown = await evaluate(
      page,
      `[document.getElementById("status").textContent, ${LOG_ITEMS_JS}]`,
    )
      .catch(() => "(unreadable)");
    throw new Error(
      `waiting for ${what}: ${(error as Error).message}; the page shows ${JSON.stringify(shown)}`,
    );
  }
}

/** The log, once it has at least `count` entries. */
function waitForLog(page: Page, count: number): Promise<string[]> {
  return waitForPage(
    page,
    `document.querySelectorAll("#log li").length >= ${count} && ${LOG_ITEMS_JS}`,
    `${count} entries in #log`,
  );
}

function waitForStatus(page: Page, startsWith: string): Promise<string> {
  return waitForPage(
    page,
    `document.getElementById("status").textContent.startsWith(${JSON.stringify(startsWith)}) &&
      document.getElementById("status").textContent`,
    `#status to start with "${startsWith}"`,
  );
}

/** #you, once it names `name` (the page learns it from the chat's "* you are" notice). */
function waitForYou(page: Page, name: string): Promise<string> {
  return waitForPage(
    page,
    `document.getElementById("you").textContent.endsWith(${JSON.stringify(` ${name}`)}) &&
      document.getElementById("you").textContent`,
    `#you to name ${name}`,
  );
}

/** The page's title, its h1 (with #you in it) and its #hint, as shown. */
function pageHeading(page: Page): Promise<{ title: string; h1: string; hint: string }> {
  return evaluate(
    page,
    `({
      title: document.title,
      h1: document.querySelector("h1").textContent.trim(),
      hint: document.getElementById("hint").textContent,
    })`,
  );
}

/** A left click in the middle of the element, as a mouse would do it. */
async function click(page: Page, selector: string): Promise<void> {
  const { x, y } = await evaluate(
    page,
    `(() => {
      const box = document.querySelector(${JSON.stringify(selector)}).getBoundingClientRect();
      return { x: box.x + box.width / 2, y: box.y + box.height / 2 };
    })()`,
  );
  for (const type of ["mousePressed", "mouseReleased"]) {
    await page.send("Input.dispatchMouseEvent", { type, x, y, button: "left", clickCount: 1 });
  }
}

async function pressEnter(page: Page): Promise<void> {
  const key = { key: "Enter", code: "Enter", windowsVirtualKeyCode: 13 };
  await page.send("Input.dispatchKeyEvent", { type: "keyDown", text: "\r", ...key });
  await page.send("Input.dispatchKeyEvent", { type: "keyUp", ...key });
}

/** Clicks into #message, types the text, and sends it with the button or the Enter key. */
async function typeMessage(page: Page, text: string, submit: "click" | "enter"): Promise<void> {
  await page.send("Page.bringToFront");
  await click(page, "#message");
  await page.send("Input.insertText", { text });
  if (submit === "click") await click(page, "#send");
  else await pressEnter(page);
}

function isPng(bytes: Uint8Array): boolean {
  return [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a].every((byte, i) => bytes[i] === byte);
}

/** Width and height from a PNG's IHDR chunk. */
function pngSize(bytes: Uint8Array): { width: number; height: number } {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  return { width: view.getUint32(16), height: view.getUint32(20) };
}

interopTest(
  "chromium: the page at / echoes what is typed, reconnects, and shows 1001 on shutdown",
  [
    chromium,
  ],
  async () => {
    await using server = await startServer(deno("ws_server.ts", "--port", "0", "--quiet"));
    await using browser = await launchChromium();
    const page = await browser.openPage(ONE_LINERS.browser(server.port));
    assert.equal(await waitForStatus(page, "Connected"), `Connected to ${server.url}`);
    assert.equal(
      await evaluate(page, `document.getElementById("connect").textContent`),
      "Disconnect",
    );
    // The mode is in the title and heading; an echo server names nobody.
    const heading = await pageHeading(page);
    assert.equal(heading.title, "WebSocket echo client");
    assert.equal(heading.h1, "WebSocket client, echo mode");
    assert.match(heading.hint, /^Echo: /);

    // Each echo is awaited before the next message is typed: on a busy
    // machine the second could be sent before the first comes back.
    await typeMessage(page, "hello from Chromium", "click");
    assert.deepEqual(await waitForLog(page, 2), [
      "sent: → hello from Chromium",
      "hello from Chromium",
    ]);
    await typeMessage(page, "ünïcödé ✓ <b>not bold</b>", "enter");
    assert.deepEqual((await waitForLog(page, 4)).slice(2), [
      "sent: → ünïcödé ✓ <b>not bold</b>",
      "ünïcödé ✓ <b>not bold</b>",
    ]);
    assert.equal(await evaluate(page, `document.getElementById("message").value`), "");

    // The same button disconnects (close 1000, "bye") and connects again.
    await click(page, "#connect");
    assert.equal(await waitForStatus(page, "Closed"), "Closed: code 1000 (bye)");
    await click(page, "#connect");
    assert.equal(await waitForStatus(page, "Connected"), `Connected to ${server.url}`);
    await typeMessage(page, "back again", "click");
    assert.deepEqual((await waitForLog(page, 7)).slice(4), [
      "note: connection closed, code 1000",
      "sent: → back again",
      "back again",
    ]);

    const { code } = await server.stop("SIGTERM");
    assert.equal(code, 0);
    assert.equal(
      await waitForStatus(page, "Closed"),
      "Closed: code 1001 (server shutting down)",
    );
    assert.equal((await waitForLog(page, 8))[7], "note: connection closed, code 1001");
  },
);

interopTest("chromium: two pages and ws_client.ts chat, and every one sees every message", [
  chromium,
], async () => {
  await using server = await startServer(
    deno("ws_server.ts", "--port", "0", "--mode", "chat", "--quiet"),
  );
  const url = ONE_LINERS.browser(server.port);
  await using browser = await launchChromium();
  // One at a time, so the names are known: guest-1, guest-2, guest-3. Each
  // page shows its own name, told by the server and kept out of #log.
  const first = await browser.openPage(url);
  assert.equal(await waitForStatus(first, "Connected"), `Connected to ${server.url}`);
  assert.equal(await waitForYou(first, "guest-1"), "— you are guest-1");
  const second = await browser.openPage(url);
  await waitForStatus(second, "Connected");
  assert.equal(await waitForYou(second, "guest-2"), "— you are guest-2");
  assert.deepEqual(await waitForLog(first, 1), ["* guest-2 joined"]);
  await using terminal = spawn(deno("ws_client.ts", "--url", server.url), { stdin: true });
  assert.equal(await terminal.nextLine(), "* you are guest-3");
  assert.equal((await waitForLog(first, 2))[1], "* guest-3 joined");
  assert.deepEqual(await waitForLog(second, 1), ["* guest-3 joined"]);

  // Each message reaches all three before the next is sent. A page shows
  // its own lines once, as the server relays them, marked "mine": no local
  // "sent: →" entry beside them.
  const said = [
    "Hi! I'm typing this into the page, in Chromium.",
    "Hello from a second tab.",
    "And I'm ws_client.ts, in a terminal.",
    "So all three of us see every message.",
  ];
  await typeMessage(first, said[0], "click");
  assert.equal((await waitForLog(first, 3))[2], `mine: guest-1: ${said[0]}`);
  assert.equal((await waitForLog(second, 2))[1], `guest-1: ${said[0]}`);
  assert.equal(await terminal.nextLine(), `guest-1: ${said[0]}`);

  await typeMessage(second, said[1], "enter");
  assert.equal((await waitForLog(first, 4))[3], `guest-2: ${said[1]}`);
  assert.equal((await waitForLog(second, 3))[2], `mine: guest-2: ${said[1]}`);
  assert.equal(await terminal.nextLine(), `guest-2: ${said[1]}`);

  await terminal.write(`${said[2]}\n`);
  assert.equal(await terminal.nextLine(), `guest-3: ${said[2]}`);
  await waitForLog(second, 4);

  await typeMessage(first, said[3], "click");
  assert.equal(await terminal.nextLine(), `guest-1: ${said[3]}`);
  assert.deepEqual(await waitForLog(first, 6), [
    "* guest-2 joined",
    "* guest-3 joined",
    `mine: guest-1: ${said[0]}`,
    `guest-2: ${said[1]}`,
    `guest-3: ${said[2]}`,
    `mine: guest-1: ${said[3]}`,
  ]);
  assert.deepEqual(await waitForLog(second, 5), [
    "* guest-3 joined",
    `guest-1: ${said[0]}`,
    `mine: guest-2: ${said[1]}`,
    `guest-3: ${said[2]}`,
    `guest-1: ${said[3]}`,
  ]);
  const heading = await pageHeading(first);
  assert.equal(heading.title, "WebSocket chat client");
  assert.equal(heading.h1, "WebSocket client, chat mode — you are guest-1");
  assert.match(heading.hint, /^Chat: /);

  await first.send("Page.bringToFront");
  const { data } = await first.send("Page.captureScreenshot", { format: "png" });
  const screenshot = Uint8Array.from(atob(data), (char) => char.charCodeAt(0));
  assert.ok(isPng(screenshot), "the screenshot is a PNG");
  assert.deepEqual(pngSize(screenshot), {
    width: VIEWPORT.width * VIEWPORT.deviceScaleFactor,
    height: VIEWPORT.height * VIEWPORT.deviceScaleFactor,
  });
  if (Deno.env.get("UPDATE_SCREENSHOT") === "1") {
    await Deno.writeFile(scriptPath("docs/chat.png"), screenshot);
  }

  // The terminal leaves: Ctrl-D, a close with 1000, and both pages say so.
  const { code, rest } = await terminal.finish();
  assert.equal(code, 0);
  assert.equal(rest, "");
  assert.equal((await waitForLog(first, 7))[6], "* guest-3 left");
  assert.equal((await waitForLog(second, 6))[5], "* guest-3 left");

  // Disconnected, the page names nobody; connected again, it is a new guest.
  await click(first, "#connect");
  assert.equal(await waitForStatus(first, "Closed"), "Closed: code 1000 (bye)");
  assert.equal(await evaluate(first, `document.getElementById("you").textContent`), "");
  await click(first, "#connect");
  assert.equal(await waitForYou(first, "guest-4"), "— you are guest-4");
  await typeMessage(first, "back", "enter");
  assert.deepEqual((await waitForLog(first, 9)).slice(7), [
    "note: connection closed, code 1000",
    "mine: guest-4: back",
  ]);
});

interopTest("chromium DevTools console: the README's snippet talks to ws_server.ts", [
  chromium,
], async () => {
  await using server = await startServer(deno("ws_server.ts", "--port", "0", "--quiet"));
  await using browser = await launchChromium();
  const page = await browser.openPage(ONE_LINERS.browser(server.port));
  const logged = browser.cdp.nextEvent(
    "Runtime.consoleAPICalled",
    page.sessionId,
    (event) => event.type === "log",
  );
  // replMode evaluates as the console does (top-level const, await).
  const { exceptionDetails } = await page.send("Runtime.evaluate", {
    expression: ONE_LINERS.devtoolsConsole(server.port),
    replMode: true,
  });
  assert.equal(exceptionDetails, undefined);
  const { args } = await logged;
  assert.deepEqual(args.map((arg: { value: unknown }) => arg.value), ["hello from the console"]);
});

// =============================================================== the README

Deno.test("readme: 'Talk to it from anything' shows the lines these tests run", async () => {
  const readme = await Deno.readTextFile(scriptPath("README.md"));
  const section = readme.split(/^## /m).find((part) => part.startsWith("Talk to it from anything"));
  assert.ok(section, 'README has a section "## Talk to it from anything"');
  for (const [name, line] of Object.entries(ONE_LINERS)) {
    const shown = line(TCP_ONE_LINERS.has(name) ? 9000 : 8080);
    assert.ok(section.includes(shown), `the README shows ${name}: ${shown}`);
  }
  assert.match(section, /!\[[^\]]+\]\(docs\/chat\.png\)/, "and the screenshot");
  assert.ok(await exists(scriptPath("docs/chat.png")), "docs/chat.png exists");
});

// ================================ subprotocols and origins (issue 8, items 5 and 6)

interopTest("ws (Node.js): a client offering a subprotocol gets one, in echo and in chat", [
  nodeWs,
], async () => {
  {
    await using server = await startServer(deno("ws_server.ts", "--port", "0", "--quiet"));
    const echo = await run(["node", [
      peer("ws_client.mjs"),
      server.url,
      "--protocol=graphql-ws",
      "hi",
    ]]);
    assert.equal(echo.stdout, "protocol graphql-ws\nhi\nclosed 1000\n", echo.stderr);
    assert.equal(echo.code, 0);
  }
  await using server = await startServer(
    deno("ws_server.ts", "--port", "0", "--mode", "chat", "--protocol", "chat", "--quiet"),
  );
  await using denoClient = spawn(deno("ws_client.ts", "--url", server.url), { stdin: true });
  await assertFirstInChatSays(denoClient, "hi");
  // ws joins several names with a bare comma: "graphql-ws,chat".
  const js = await run(["node", [
    peer("ws_client.mjs"),
    server.url,
    "--protocol=graphql-ws,chat",
    "yo",
  ]]);
  assert.equal(
    js.stdout,
    "protocol chat\n* you are guest-2\nguest-2: yo\nclosed 1000\n",
    js.stderr,
  );
  const other = await run(["node", [
    peer("ws_client.mjs"),
    server.url,
    "--protocol=graphql-ws",
    "no",
  ]]);
  assert.match(other.stderr, /Unexpected server response: 400/);
  assert.equal(other.code, 1);
  await denoClient.write("still here\n");
  assert.deepEqual(await nextLines(denoClient, 4), [
    "* guest-2 joined",
    "guest-2: yo",
    "* guest-2 left",
    "guest-1: still here",
  ]);
  assert.equal((await denoClient.finish()).code, 0);
});

/**
 * In a page: opens a WebSocket to `url` offering `protocols`, sends `text`
 * once open, and resolves with what happened: the protocol chosen, the
 * server's notices ("* " messages) that came first, and the first message
 * that is not one; or the close code if it never opened.
 */
function subprotocolSnippet(url: string, protocols: string[], text: string): string {
  return `new Promise((resolve) => {
    const ws = new WebSocket(${JSON.stringify(url)}, ${JSON.stringify(protocols)});
    const notices = [];
    ws.onopen = () => ws.send(${JSON.stringify(text)});
    ws.onmessage = (event) => {
      if (event.data.startsWith("* ")) return void notices.push(event.data);
      resolve({ protocol: ws.protocol, notices, message: event.data });
      ws.close(1000);
    };
    ws.onclose = (event) => resolve({ code: event.code });
  })`;
}

interopTest("chromium: a page offering a subprotocol gets one, in echo and in chat", [
  chromium,
], async () => {
  await using browser = await launchChromium();
  {
    await using server = await startServer(deno("ws_server.ts", "--port", "0", "--quiet"));
    const page = await browser.openPage(ONE_LINERS.browser(server.port));
    assert.deepEqual(
      await evaluate(page, subprotocolSnippet(server.url, ["graphql-ws"], "hello")),
      { protocol: "graphql-ws", notices: [], message: "hello" },
    );
  }
  await using server = await startServer(
    deno("ws_server.ts", "--port", "0", "--mode", "chat", "--quiet"),
  );
  await using terminal = spawn(deno("ws_client.ts", "--url", server.url), { stdin: true });
  await assertFirstInChatSays(terminal, "hi");
  const page = await browser.openPage(ONE_LINERS.browser(server.port));
  // The page's own client is guest-2; the snippet's socket is guest-3.
  assert.equal(await terminal.nextLine(), "* guest-2 joined");
  assert.deepEqual(
    await evaluate(page, subprotocolSnippet(server.url, ["chat", "superchat"], "from a tab")),
    { protocol: "chat", notices: ["* you are guest-3"], message: "guest-3: from a tab" },
  );
  assert.deepEqual(await nextLines(terminal, 3), [
    "* guest-3 joined",
    "guest-3: from a tab",
    "* guest-3 left",
  ]);
  assert.equal((await terminal.finish()).code, 0);
});

// A page on another site, as far as the browser knows: 127.0.0.2 is this
// machine too, but a different origin from 127.0.0.1 and localhost. Its
// script joins the chat at ?ws=URL, posts, and shows everything it can.
const ELSEWHERE_PAGE = `<!doctype html>
<title>somewhere else</title>
<pre id="events"></pre>
<script>
  const show = (text) => document.getElementById("events").textContent += text + "\\n";
  const ws = new WebSocket(new URLSearchParams(location.search).get("ws"));
  ws.onopen = () => { show("open"); ws.send("posted by another site"); };
  ws.onmessage = (event) => show("message " + event.data);
  ws.onclose = (event) => show("close " + event.code);
</script>`;

interopTest("chromium: a page from another origin cannot join the chat (403); its own pages can", [
  chromium,
], async () => {
  const elsewhere = Deno.serve(
    { hostname: "127.0.0.2", port: 0, onListen: () => {} },
    () => new Response(ELSEWHERE_PAGE, { headers: { "content-type": "text/html" } }),
  );
  try {
    const origin = `http://127.0.0.2:${elsewhere.addr.port}`;
    await using browser = await launchChromium();
    const events = (page: Page, last: string) =>
      waitForPage(
        page,
        `document.getElementById("events").textContent.includes(${JSON.stringify(last)}) &&
          document.getElementById("events").textContent`,
        `the page elsewhere to show ${last}`,
      );
    {
      await using server = await startServer(
        deno("ws_server.ts", "--port", "0", "--mode", "chat"),
      );
      await using terminal = spawn(deno("ws_client.ts", "--url", server.url), { stdin: true });
      await assertFirstInChatSays(terminal, "my secret");
      const page = await browser.openPage(`${origin}/?ws=${server.url}`);
      // A refused handshake is, to a page, a connection that failed.
      assert.equal(await events(page, "close"), "close 1006\n");
      // The server's own page still connects, and is the next guest.
      const own = await browser.openPage(ONE_LINERS.browser(server.port));
      await waitForStatus(own, "Connected");
      await terminal.write("anyone else?\n");
      assert.deepEqual(await nextLines(terminal, 2), ["* guest-2 joined", "guest-1: anyone else?"]);
      const { stderr } = await server.stop();
      assert.match(
        stderr,
        new RegExp(
          `^! 127\\.0\\.0\\.1:\\d+ refused with 403: origin "${origin}" is not allowed`,
          "m",
        ),
      );
      await terminal.finish();
    }
    // Allowed by name, the same page gets in: the refusal was its origin.
    await using server = await startServer(
      deno("ws_server.ts", "--port", "0", "--mode", "chat", "--allow-origin", origin, "--quiet"),
    );
    const page = await browser.openPage(`${origin}/?ws=${server.url}`);
    assert.equal(
      await events(page, "message guest-1: posted"),
      "open\nmessage * you are guest-1\nmessage guest-1: posted by another site\n",
    );
  } finally {
    await elsewhere.shutdown();
  }
});
// ==================================================================== UDP

// The README's UDP one-liners, as the tests run them; its "UDP" section
// shows each with the default port, 9002, and a test keeps the two the same.
const UDP_ONE_LINERS = {
  pythonUdp: (port: number) =>
    `python3 -c 'import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); ` +
    `s.settimeout(2); s.sendto(b"hello\\n", ("127.0.0.1", ${port})); ` +
    `print(s.recv(65535).decode(), end="")'`,
  netcatUdpEcho: (port: number) => `printf 'hello\\n' | nc -u -w1 127.0.0.1 ${port}`,
  netcatUdpChat: (port: number) => `nc -u 127.0.0.1 ${port}`,
};

/** A UDP server that prints "listening on udp://127.0.0.1:PORT" first. */
async function startDatagramServer(program: [string, string[]]) {
  const server = spawn(program);
  const line = await server.nextLine().catch(() => null);
  const port = Number(line?.match(/^listening on udp:\/\/127\.0\.0\.1:(\d+)$/)?.[1]);
  if (!port) {
    const { stderr } = await server.stop("SIGKILL");
    throw new Error(`${program[1].join(" ")} did not start: ${line}\n${stderr}`);
  }
  return Object.assign(server, { port });
}

interopTest(
  "python socket: SOCK_DGRAM datagrams, every byte value and 65,507 bytes through udp.ts echo",
  [
    python,
  ],
  async () => {
    await using server = await startDatagramServer(
      deno("udp.ts", "serve", "--port", "0", "--quiet"),
    );
    const oneLiner = await run(shell(UDP_ONE_LINERS.pythonUdp(server.port)));
    assert.equal(oneLiner.stdout, "hello\n", oneLiner.stderr);
    assert.equal(oneLiner.code, 0);
    // Each sendto is one datagram and each recv one reply, whole: no loop to
    // gather the pieces, as TCP would need.
    const script = `
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
for payload in (bytes(range(256)), bytes(i % 251 for i in range(65507)), b""):
    s.sendto(payload, ("127.0.0.1", int(sys.argv[1])))
    reply = s.recv(65535)
    print(len(reply), reply == payload)
`;
    const datagrams = await run([PYTHON!, ["-c", script, String(server.port)]]);
    assert.equal(datagrams.stdout, "256 True\n65507 True\n0 True\n", datagrams.stderr);
    assert.equal(datagrams.code, 0);
  },
);

interopTest("python socket: SOCK_DGRAM chats through udp.ts with udp.ts send", [
  python,
], async () => {
  await using server = await startDatagramServer(
    deno("udp.ts", "serve", "--port", "0", "--mode", "chat", "--quiet"),
  );
  const oneLiner = await run(shell(UDP_ONE_LINERS.pythonUdp(server.port)));
  assert.equal(oneLiner.stdout, "guest-1: hello\n", oneLiner.stderr);
  const denoClient = await run(deno("udp.ts", "send", "--port", String(server.port), "hi"));
  assert.equal(denoClient.stdout, "guest-2: hi\n", denoClient.stderr);
  assert.equal(denoClient.code, 0);
});

interopTest(
  "python socket: udp.ts send against a Python UDP echo server",
  [python],
  async () => {
    await using server = await startDatagramServer([PYTHON!, [peer("udp_echo_server.py"), "0"]]);
    const port = String(server.port);
    const oneShot = await run(deno("udp.ts", "send", "--port", port, "hello", "ü ✓", ""));
    assert.equal(oneShot.stdout, "hello\nü ✓\n\n", oneShot.stderr);
    assert.equal(oneShot.code, 0);
    const interactive = await run(deno("udp.ts", "send", "--port", port), {
      stdin: "typed\nlines\n",
    });
    assert.equal(interactive.stdout, "typed\nlines\n", interactive.stderr);
    assert.equal(interactive.code, 0);
  },
);

interopTest("netcat: nc -u against udp.ts echo, and nc -u chats with udp.ts send", [
  netcat,
], async () => {
  await using echo = await startDatagramServer(deno("udp.ts", "serve", "--port", "0", "--quiet"));
  const oneLiner = await run(shell(UDP_ONE_LINERS.netcatUdpEcho(echo.port)));
  assert.equal(oneLiner.stdout, "hello\n", oneLiner.stderr);
  assert.equal(oneLiner.code, 0);

  await using chat = await startDatagramServer(
    deno("udp.ts", "serve", "--port", "0", "--mode", "chat", "--quiet"),
  );
  // Run without sh in between, so that stopping it stops nc itself.
  const [command, ...args] = UDP_ONE_LINERS.netcatUdpChat(chat.port).split(" ");
  await using nc = spawn([command, args], { stdin: true });
  // Each write reaches nc as one read, and nc sends each read as one datagram.
  await nc.write("netcat here\n");
  assert.equal(await nc.nextLine(), "guest-1: netcat here");
  const denoClient = await run(deno("udp.ts", "send", "--port", String(chat.port), "hi nc"));
  assert.equal(denoClient.stdout, "guest-2: hi nc\n", denoClient.stderr);
  assert.deepEqual(await nextLines(nc, 2), ["* guest-2 joined", "guest-2: hi nc"]);
  // nc -u has no end to send, and would wait for more datagrams forever.
  await nc.stop("SIGTERM");
});

Deno.test("readme: the UDP section shows the lines these tests run", async () => {
  const readme = await Deno.readTextFile(scriptPath("README.md"));
  const section = readme.split(/^## /m).find((part) => part.startsWith("UDP"));
  assert.ok(section, 'README has a section "## UDP…"');
  for (const [name, line] of Object.entries(UDP_ONE_LINERS)) {
    const shown = line(9002);
    assert.ok(section.includes(shown), `the README shows ${name}: ${shown}`);
  }
});

// ============================================================ bridge.ts

// A terminal, drawn: what nc's window showed, line by line, typed lines
// (the terminal echoes them) in bold. The picture puts it beside the page.
function terminalHtml(title: string, lines: { text: string; typed?: boolean }[]): string {
  const escape = (text: string) =>
    text.replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]!);
  const body = lines
    .map(({ text, typed }) => typed ? `<b>${escape(text)}</b>` : escape(text))
    .join("\n");
  return `<div class="term"><div class="bar">${escape(title)}</div><pre>${body}</pre></div>`;
}

const SIDE_BY_SIDE_CSS = `
  body { margin: 0; display: flex; gap: 16px; padding: 16px; background: #d9dde3; align-items: flex-start; }
  .term { width: 620px; height: 568px; background: #1e1f22; border-radius: 8px; overflow: hidden;
    box-shadow: 0 2px 8px #0004; display: flex; flex-direction: column; }
  .bar { background: #3a3c41; color: #ccc; font: 13px/28px system-ui, sans-serif; text-align: center; }
  pre { margin: 0; padding: 10px 12px; color: #d6d6d6; font: 14px/1.5 ui-monospace, "DejaVu Sans Mono", monospace;
    white-space: pre-wrap; word-break: break-word; }
  pre b { color: #fff; }
  img { width: 852px; height: 568px; border-radius: 8px; box-shadow: 0 2px 8px #0004; }`;

interopTest("chromium + netcat: nc through bridge.ts chats with the page ws_server.ts serves", [
  chromium,
  netcat,
], async () => {
  await using server = await startServer(
    deno("ws_server.ts", "--port", "0", "--mode", "chat", "--quiet"),
  );
  await using bridge = await startServer(
    deno("bridge.ts", "--listen", "tcp://127.0.0.1:0", "--to", server.url, "--quiet"),
  );
  await using browser = await launchChromium();
  const page = await browser.openPage(ONE_LINERS.browser(server.port));
  await waitForStatus(page, "Connected");
  const ncCommand = ONE_LINERS.netcatChat(bridge.port);
  await using nc = spawn(shell(ncCommand), { stdin: true });
  assert.deepEqual(await waitForLog(page, 1), ["* guest-2 joined"]);

  // What nc's terminal shows: what was typed, and what arrived.
  const terminal: { text: string; typed?: boolean }[] = [{ text: `$ ${ncCommand}`, typed: true }];
  async function ncSays(text: string) {
    terminal.push({ text, typed: true });
    await nc.write(`${text}\n`);
  }
  async function ncHears(expected: string) {
    const line = await nc.nextLine();
    assert.equal(line, expected);
    terminal.push({ text: line! });
  }
  // The server names each newcomer first; the bridge passes it on as a line.
  await ncHears("* you are guest-2");
  const said = [
    "Hi! I'm in Chromium, on a WebSocket.",
    "Hello from nc, over plain TCP, through bridge.ts.",
    "So each line you type becomes one message?",
    "Yes: the bridge cuts my bytes at every newline.",
  ];
  await typeMessage(page, said[0], "click");
  await ncHears(`guest-1: ${said[0]}`);
  await ncSays(said[1]);
  await ncHears(`guest-2: ${said[1]}`);
  assert.equal((await waitForLog(page, 3))[2], `guest-2: ${said[1]}`);
  await typeMessage(page, said[2], "enter");
  await ncHears(`guest-1: ${said[2]}`);
  await ncSays(said[3]);
  await ncHears(`guest-2: ${said[3]}`);
  // The page shows its own lines once, as the server relayed them ("mine").
  assert.deepEqual(await waitForLog(page, 5), [
    "* guest-2 joined",
    `mine: guest-1: ${said[0]}`,
    `guest-2: ${said[1]}`,
    `mine: guest-1: ${said[2]}`,
    `guest-2: ${said[3]}`,
  ]);

  // The picture: the page as Chromium shows it, beside nc's terminal.
  await page.send("Page.bringToFront");
  const shot = await page.send("Page.captureScreenshot", { format: "png" });
  const picture = await browser.openPage("about:blank");
  // The page at 568 / 600 of its size, as tall as the terminal.
  const width = 16 + 620 + 16 + 852 + 16;
  await picture.send("Emulation.setDeviceMetricsOverride", { ...VIEWPORT, width });
  await evaluate(
    picture,
    `(() => {
      const style = document.createElement("style");
      style.textContent = ${JSON.stringify(SIDE_BY_SIDE_CSS)};
      document.head.append(style);
      document.body.innerHTML = ${
      JSON.stringify(terminalHtml("Terminal", terminal) + '<img alt="">')
    };
      const img = document.querySelector("img");
      const loaded = new Promise((resolve, reject) => { img.onload = resolve; img.onerror = reject; });
      img.src = "data:image/png;base64," + ${JSON.stringify(shot.data)};
      return loaded.then(() => true);
    })()`,
  );
  const { data } = await picture.send("Page.captureScreenshot", { format: "png" });
  const screenshot = Uint8Array.from(atob(data), (char) => char.charCodeAt(0));
  assert.ok(isPng(screenshot), "the screenshot is a PNG");
  assert.deepEqual(pngSize(screenshot), {
    width: width * VIEWPORT.deviceScaleFactor,
    height: VIEWPORT.height * VIEWPORT.deviceScaleFactor,
  });
  if (Deno.env.get("UPDATE_SCREENSHOT") === "1") {
    await Deno.writeFile(scriptPath("docs/bridge.png"), screenshot);
  }

  // nc leaves (-N: the end of its input is a FIN): the bridge closes with
  // 1000, the room hears it, and nc gets its FIN and exits.
  const { code, rest } = await nc.finish();
  assert.equal(code, 0);
  assert.equal(rest, "");
  assert.equal((await waitForLog(page, 6))[5], "* guest-2 left");
});

interopTest("chromium + netcat: the page bridge.ts serves joins a tcp_server.ts chat with nc", [
  chromium,
  netcat,
], async () => {
  await using server = await startServer(
    deno("tcp_server.ts", "--port", "0", "--mode", "chat", "--quiet"),
  );
  await using nc = spawn(shell(ONE_LINERS.netcatChat(server.port)), { stdin: true });
  await assertFirstInChatSays(nc, "nc here first");
  await using bridge = await startServer(
    deno("bridge.ts", "--listen", "ws://127.0.0.1:0/", "--to", `tcp://127.0.0.1:${server.port}`),
  );
  await using browser = await launchChromium();
  const page = await browser.openPage(bridge.url.replace("ws:", "http:"));
  assert.equal(await waitForStatus(page, "Connected"), `Connected to ${bridge.url}`);
  assert.equal(await nc.nextLine(), "* guest-2 joined");
  // tcp_server's "* you are guest-2" crosses the bridge as a message: the
  // page learns from it that it is in a chat, and its name, as on ws_server's.
  assert.equal(await waitForYou(page, "guest-2"), "— you are guest-2");
  assert.match((await pageHeading(page)).hint, /^Chat: every message goes to everyone/);
  await typeMessage(page, "hello from the bridge's page ✓", "click");
  assert.equal(await nc.nextLine(), "guest-2: hello from the bridge's page ✓");
  await nc.write("welcome, browser\n");
  assert.equal(await nc.nextLine(), "guest-1: welcome, browser");
  assert.deepEqual(await waitForLog(page, 2), [
    "mine: guest-2: hello from the bridge's page ✓",
    "guest-1: welcome, browser",
  ]);
  // Disconnect: close 1000 becomes a FIN to tcp_server, which says so.
  await click(page, "#connect");
  assert.equal(await waitForStatus(page, "Closed"), "Closed: code 1000 (bye)");
  assert.equal(await nc.nextLine(), "* guest-2 left");
  const { code, stderr } = await bridge.stop("SIGTERM");
  assert.equal(code, 0);
  assert.match(stderr, /- 127\.0\.0\.1:\d+ disconnected: close 1000 bye → FIN; /);
  assert.equal((await nc.finish()).code, 0);
});

// A raw socket writes its own IP and UDP headers, source address included;
// Linux allows one to root (or CAP_NET_RAW), as under .ci/run.
const rawSockets: Peer = {
  found: PYTHON !== undefined &&
    await runs(PYTHON, [
      "-c",
      "import socket; socket.socket(socket.AF_INET, socket.SOCK_RAW, 255)",
    ]),
  install: "root, for Python's raw sockets (sudo, or CAP_NET_RAW)",
};

interopTest(
  "python raw socket: datagrams forged from port 0 or the server's own address stop neither echo nor chat",
  [rawSockets],
  async () => {
    // Before: each forged from port 0 took one of the 4,096 pending sends for
    // good (node:dgram throws on a send to port 0), until echo answered nobody.
    {
      await using server = await startDatagramServer(
        deno("udp.ts", "serve", "--port", "0", "--quiet"),
      );
      const forger = await run([PYTHON!, [peer("udp_forger.py"), String(server.port), "echo"]]);
      assert.equal(forger.stdout, "probes answered: 45 of 45\n", forger.stderr);
    }
    // Before: port 0 joined the room, every broadcast threw at it, nobody
    // else could join, and the idle sweep's throw ended the process.
    await using server = await startDatagramServer(
      deno("udp.ts", "serve", "--port", "0", "--mode", "chat", "--idle-timeout", "1"),
    );
    const forger = await run([PYTHON!, [peer("udp_forger.py"), String(server.port), "chat"]]);
    assert.equal(
      forger.stdout,
      "a: * guest-2 joined\na: guest-2: hi\nb: guest-2: hi\n" +
        "b: * you left the room: silent for 1 s (send anything to rejoin)\nb: guest-3: back\n",
      forger.stderr,
    );
    const { code, stderr } = await server.stop("SIGTERM");
    assert.equal(code, 0, stderr);
    assert.doesNotMatch(stderr, /:0 joined|error/, stderr);
  },
);

// ============================================== TLS: openssl s_client

const openssl: Peer = {
  found: await runs("openssl", ["version"]),
  install: "openssl (apt-get install openssl)",
};

/** tcp_server.ts with --cert/--key, started like startServer but on tls://. */
async function startTlsServer(...args: string[]) {
  const server = spawn(deno("tcp_server.ts", "--port", "0", ...args));
  const line = await server.nextLine().catch(() => null);
  const port = Number(line?.match(/^listening on tls:\/\/127\.0\.0\.1:(\d+)$/)?.[1]);
  if (!port) {
    const { stderr } = await server.stop("SIGKILL");
    throw new Error(`tcp_server.ts ${args.join(" ")} did not start: ${line}\n${stderr}`);
  }
  return Object.assign(server, { port });
}

interopTest(
  "openssl s_client: echo and chat over TLS with tcp_server.ts; without our CA it refuses, and the server logs one line",
  [
    openssl,
  ],
  async () => {
    await using certs = await testCertificates();
    const tls = ["--cert", certs.files.cert, "--key", certs.files.key];
    const client = (port: number, ...args: string[]) =>
      spawn(
        [
          "openssl",
          ["s_client", "-quiet", "-no_ign_eof", "-verify_return_error", ...args]
            .concat(["-connect", `127.0.0.1:${port}`]),
        ],
        { stdin: true },
      );
    {
      await using server = await startTlsServer(...tls, "--quiet");
      await using echo = client(server.port, "-CAfile", certs.files.ca, "-verify_ip", "127.0.0.1");
      await echo.write("hello over tls\n");
      assert.equal(await echo.nextLine(), "hello over tls");
      const { code } = await echo.finish();
      assert.equal(code, 0);
    }
    {
      await using server = await startTlsServer(...tls, "--mode", "chat", "--quiet");
      await using chat = client(server.port, "-CAfile", certs.files.ca);
      await linesUntil(chat, /^\* you are guest-1$/);
      await chat.write("openssl here\n");
      assert.equal(await chat.nextLine(), "guest-1: openssl here");
    }
    // Not trusting our CA, s_client refuses the certificate: it exits non-zero,
    // and the server logs the failed handshake as one line, no stack trace.
    await using server = await startTlsServer(...tls);
    const refused = await run(
      ["openssl", ["s_client", "-verify_return_error", "-connect", `127.0.0.1:${server.port}`]],
      { stdin: "" },
    );
    assert.notEqual(refused.code, 0);
    const { stderr } = await server.stop();
    const lines = stderr.trim().split("\n");
    assert.equal(lines.length, 1, stderr);
    assert.match(lines[0], /^! 127\.0\.0\.1:\d+ TLS handshake failed: the client refused it/);
  },
);

// ======================================================= wire.ts faults

// Any intermediary may re-frame messages (RFC 6455 section 5.4), and TCP may
// deliver any byte stream in any pieces: other stacks' clients must still get
// whole, correct messages through wire.ts's --fragment 1 and --slice 1.
for (const fault of [["--fragment", "1"], ["--slice", "1"]]) {
  interopTest(
    `wire.ts ${fault.join(" ")}: ws and python-websockets clients still receive whole messages`,
    [nodeWs, pythonWebsockets],
    async () => {
      await using server = await startServer(deno("ws_server.ts", "--port", "0", "--quiet"));
      await using wire = await startServer(
        deno("wire.ts", "--port", "0", "--quiet", "--to", `127.0.0.1:${server.port}`, ...fault),
      );
      await assertPeerWsClientEchoed("node", "ws_client.mjs", wire.url, 4096);
      await assertPeerWsClientEchoed(PYTHON_WITH_WEBSOCKETS!, "ws_client.py", wire.url, 4096);
    },
  );
}

// ======================================================= TLS: wss:// peers

// The same servers with --cert and --key: TLS under the WebSocket, and each
// peer trusting our test CA (tools/cert.ts) its own way.

/** ws_server.ts with the test certificate: it prints "listening on wss://127.0.0.1:PORT/". */
async function startWssServer(certs: TestCertificates, ...args: string[]) {
  const tls = ["--cert", certs.files.cert, "--key", certs.files.key];
  const server = spawn(deno("ws_server.ts", "--port", "0", ...tls, ...args));
  const line = await server.nextLine().catch(() => null);
  const port = Number(line?.match(/^listening on wss:\/\/127\.0\.0\.1:(\d+)\/$/)?.[1]);
  if (!port) {
    const { stderr } = await server.stop("SIGKILL");
    throw new Error(`ws_server.ts --cert --key did not start: ${line}\n${stderr}`);
  }
  return Object.assign(server, { port, url: `wss://127.0.0.1:${port}/` });
}

/**
 * The base64 SHA-256 of a certificate's public key (its SPKI), as
 * Chromium's --ignore-certificate-errors-spki-list wants it; computed by
 * openssl, as the README tells a reader to.
 */
async function spkiHash(certFile: string): Promise<string> {
  const { code, stdout, stderr } = await run(shell(
    `openssl x509 -in '${certFile}' -pubkey -noout | openssl pkey -pubin -outform der | ` +
      "openssl dgst -sha256 -binary | base64",
  ));
  assert.equal(code, 0, stderr);
  const hash = stdout.trim();
  assert.match(hash, /^[A-Za-z0-9+/]{43}=$/, "a SHA-256 in base64");
  return hash;
}

interopTest(
  "python-websockets over TLS: ws_client.py --ca echoes through ws_server.ts --cert --key",
  [
    pythonWebsockets,
    openssl,
  ],
  async () => {
    await using certs = await testCertificates();
    await using server = await startWssServer(certs, "--quiet");
    const client = await run([PYTHON_WITH_WEBSOCKETS!, [
      peer("ws_client.py"),
      server.url,
      "--ca",
      certs.files.ca,
      "hello over wss",
      "binary:256",
    ]]);
    assert.equal(client.code, 0, client.stderr);
    assert.equal(client.stdout, `hello over wss\n${await binaryLine(256)}\nclosed 1000\n`);
    // Without our CA, Python's default trust store refuses the certificate.
    const untrusted = await run([PYTHON_WITH_WEBSOCKETS!, [peer("ws_client.py"), server.url, "x"]]);
    assert.notEqual(untrusted.code, 0);
    assert.match(untrusted.stderr, /CERTIFICATE_VERIFY_FAILED/);
  },
);

interopTest(
  "ws (Node.js) over TLS: ws_client.mjs --ca=FILE echoes and chats through ws_server.ts --cert --key",
  [
    nodeWs,
    openssl,
  ],
  async () => {
    await using certs = await testCertificates();
    const ca = `--ca=${certs.files.ca}`;
    {
      await using echo = await startWssServer(certs, "--quiet");
      await assertPeerWsClientEchoed("node", "ws_client.mjs", echo.url, 65536, [ca]);
      // Without our CA, Node's default trust store refuses the certificate.
      const untrusted = await run(["node", [peer("ws_client.mjs"), echo.url, "x"]]);
      assert.equal(untrusted.code, 1);
      assert.match(untrusted.stderr, /^ws_client\.mjs: unable to verify the first certificate$/m);
    }
    await using chat = await startWssServer(certs, "--mode", "chat", "--quiet");
    const denoClient = deno("ws_client.ts", "--url", chat.url, "--ca", certs.files.ca);
    await using terminal = spawn(denoClient, { stdin: true });
    assert.equal(await terminal.nextLine(), "* you are guest-1");
    const js = await run(["node", [peer("ws_client.mjs"), chat.url, ca, "from ws"]]);
    assert.equal(js.stdout, "* you are guest-2\nguest-2: from ws\nclosed 1000\n", js.stderr);
    assert.deepEqual(await nextLines(terminal, 3), [
      "* guest-2 joined",
      "guest-2: from ws",
      "* guest-2 left",
    ]);
    assert.equal((await terminal.finish()).code, 0);
  },
);

interopTest("chromium over TLS: the page loads over https, connects with wss: and chats", [
  chromium,
  openssl,
], async () => {
  await using certs = await testCertificates();
  await using server = await startWssServer(certs, "--mode", "chat", "--quiet");
  // Trust exactly our leaf's key: Chromium's switch for test servers, short
  // of installing the CA in its certificate store. Without it the page does
  // not load (net::ERR_CERT_AUTHORITY_INVALID).
  const spki = await spkiHash(certs.files.cert);
  await using browser = await launchChromium([`--ignore-certificate-errors-spki-list=${spki}`]);
  const page = await browser.openPage(`https://127.0.0.1:${server.port}/`);
  assert.equal(await waitForStatus(page, "Connected"), `Connected to ${server.url}`);
  assert.equal(await waitForYou(page, "guest-1"), "— you are guest-1");
  assert.equal(await evaluate(page, "location.protocol"), "https:");

  const denoClient = deno("ws_client.ts", "--url", server.url, "--ca", certs.files.ca);
  await using terminal = spawn(denoClient, { stdin: true });
  assert.equal(await terminal.nextLine(), "* you are guest-2");
  assert.deepEqual(await waitForLog(page, 1), ["* guest-2 joined"]);
  const typed = "typed in Chromium, over wss";
  await typeMessage(page, typed, "enter");
  assert.equal((await waitForLog(page, 2))[1], `mine: guest-1: ${typed}`);
  assert.equal(await terminal.nextLine(), `guest-1: ${typed}`);
  await terminal.write("and back from the terminal\n");
  assert.equal(await terminal.nextLine(), "guest-2: and back from the terminal");
  assert.equal((await waitForLog(page, 3))[2], "guest-2: and back from the terminal");
  const { code } = await terminal.finish();
  assert.equal(code, 0);
  assert.equal((await waitForLog(page, 4))[3], "* guest-2 left");
});

/**
 * A pt-BR page, connected as guest-1, says "olá, mundo ✓" and sees it come
 * back once, then disconnects: the status, the note and the button all in
 * Portuguese.
 */
async function assertPortugueseRoundTrip(page: Page): Promise<void> {
  await typeMessage(page, "olá, mundo ✓", "click");
  assert.deepEqual(await waitForLog(page, 1), ["mine: guest-1: olá, mundo ✓"]);

  await click(page, "#connect");
  assert.equal(await waitForStatus(page, "Fechada"), "Fechada: código 1000 (bye)");
  assert.equal((await waitForLog(page, 2))[1], "note: conexão fechada, código 1000");
  assert.equal(
    await evaluate(page, `document.getElementById("connect").textContent`),
    "Conectar",
  );
}

interopTest(
  "chromium: with --lang=pt-BR the page at / speaks Portuguese, and the chat protocol stays as it is",
  [chromium],
  async () => {
    await using server = await startServer(
      deno("ws_server.ts", "--port", "0", "--mode", "chat", "--quiet"),
    );
    // Headless Chromium sends Accept-Language from --accept-lang; --lang
    // alone did not change it: the page stayed English (Chromium 156).
    await using browser = await launchChromium(["--lang=pt-BR", "--accept-lang=pt-BR"]);
    const page = await browser.openPage(ONE_LINERS.browser(server.port));
    assert.equal(await waitForStatus(page, "Conectado"), `Conectado a ${server.url}`);
    assert.equal(await evaluate(page, `document.documentElement.lang`), "pt-BR");
    assert.equal(
      await evaluate(page, `document.getElementById("connect").textContent`),
      "Desconectar",
    );
    const heading = await pageHeading(page);
    assert.equal(heading.title, "Cliente WebSocket chat");
    assert.match(heading.h1, /^Cliente WebSocket, modo chat/);
    assert.match(heading.hint, /^Chat: cada mensagem vai para todo mundo/);
    // The server still says "* you are guest-1"; only the page's words change.
    assert.equal(await waitForYou(page, "guest-1"), "— você é guest-1");
    await assertPortugueseRoundTrip(page);
  },
);

interopTest(
  "chromium: with --lang=pt-BR the page bridge.ts serves speaks Portuguese, and a line round-trips through tcp_server.ts",
  [chromium],
  async () => {
    await using server = await startServer(
      deno("tcp_server.ts", "--port", "0", "--mode", "chat", "--quiet"),
    );
    const to = `tcp://127.0.0.1:${server.port}`;
    await using bridge = await startServer(
      deno("bridge.ts", "--listen", "ws://127.0.0.1:0/", "--to", to, "--quiet"),
    );
    // As for ws_server.ts's page: --accept-lang is what sets Accept-Language.
    await using browser = await launchChromium(["--lang=pt-BR", "--accept-lang=pt-BR"]);
    const page = await browser.openPage(bridge.url.replace("ws:", "http:"));
    assert.equal(await waitForStatus(page, "Conectado"), `Conectado a ${bridge.url}`);
    assert.equal(await evaluate(page, `document.documentElement.lang`), "pt-BR");
    assert.equal(
      await evaluate(page, `document.getElementById("connect").textContent`),
      "Desconectar",
    );
    assert.equal(
      await evaluate(page, `document.getElementById("relay").textContent`),
      `Esta página fala WebSocket com o bridge.ts, que repassa tudo para o servidor TCP em ${to}: ` +
        "cada mensagem que você envia vira uma linha para ele, e cada linha que ele manda volta " +
        "como uma mensagem.",
    );
    // tcp_server still says "* you are guest-1"; only the page's words change.
    assert.equal(await waitForYou(page, "guest-1"), "— você é guest-1");
    const heading = await pageHeading(page);
    assert.equal(heading.title, "Ponte WebSocket para TCP");
    assert.match(heading.h1, /^Cliente WebSocket, via ponte para TCP/);
    assert.match(heading.hint, /^Chat: cada mensagem vai para todo mundo/);
    // Page → WebSocket → bridge → a line to tcp_server → relayed back, once.
    await assertPortugueseRoundTrip(page);
    assert.match((await pageHeading(page)).hint, /^→ marca o que você enviou/);
  },
);

interopTest(
  "chromium: the page bridge.ts serves in front of tcp_server.ts echo marks what was sent, and is not fooled by '* you are'",
  [chromium],
  async () => {
    await using server = await startServer(
      deno("tcp_server.ts", "--port", "0", "--quiet"),
    );
    await using bridge = await startServer(
      deno("bridge.ts", "--listen", "ws://127.0.0.1:0/", "--to", `tcp://127.0.0.1:${server.port}`),
    );
    await using browser = await launchChromium();
    const page = await browser.openPage(bridge.url.replace("ws:", "http:"));
    assert.equal(await waitForStatus(page, "Connected"), `Connected to ${bridge.url}`);
    // An echo server names no one: what comes back is the typed line, and
    // only a chat's first notice, before anything was sent, names the page.
    await typeMessage(page, "* you are mallory", "enter");
    await typeMessage(page, "mallory: hi", "enter");
    assert.deepEqual(await waitForLog(page, 4), [
      "sent: → * you are mallory",
      "* you are mallory",
      "sent: → mallory: hi",
      "mallory: hi",
    ]);
    assert.equal(await evaluate(page, `document.getElementById("you").textContent`), "");
    assert.match((await pageHeading(page)).hint, /^→ marks what you sent/);
    const { code } = await bridge.stop("SIGTERM");
    assert.equal(code, 0);
  },
);
