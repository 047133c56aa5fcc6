/**
 * tools/shared.ts: what bench.ts, soak.ts and the tests share about the
 * servers they run as child processes: starting one and reading its address,
 * its memory, the open-file limit it inherits, a bound on every wait, the
 * bytes of a WebSocket client written by hand (to misbehave on purpose), and
 * the frame of a tool's command line (a mistake is one line, then the usage).
 *
 * The four scripts a learner runs import nothing, so that each works alone
 * from its raw URL; this file is for the tools and tests around them.
 *
 * @module
 */

const decoder = new TextDecoder();

/** A bound on any single wait. Waits end at their event, long before this. */
export const WAIT_MS = 10_000;

/**
 * The absolute path of a file of this project, named from its root.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { scriptPath } from "./shared.ts";
 * assert.ok(scriptPath("tcp_server.ts").endsWith("/tcp_server.ts"));
 * ```
 */
export function scriptPath(name: string): string {
  return decodeURIComponent(new URL(`../${name}`, import.meta.url).pathname);
}

/**
 * `promise`, or a rejection after `ms` that says what was awaited: a bound on
 * waiting, never a pause.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { within } from "./shared.ts";
 * assert.equal(await within(Promise.resolve(1), "a settled promise"), 1);
 * await assert.rejects(within(new Promise(() => {}), "never", 10), /timed out after 10 ms: never/);
 * ```
 */
export async function within<T>(promise: Promise<T>, what: string, ms = WAIT_MS): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms);
  });
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

// ------------------------------------------------------------- command line

/** A command-line mistake: `runCommand` prints it as one line, then the usage, and exits 2. */
export class UsageError extends Error {}

/**
 * A parseArgs error as a UsageError of one line: parseArgs explains itself
 * over several sentences, so the first is kept, with how to pass a value that
 * starts with "-" (a negative number, say) where that was the trouble.
 */
export function flagError(error: unknown): UsageError {
  const first = String((error as Error)?.message ?? error).split(/\.\s/)[0];
  const option = first.match(/^Option '(--[\w-]+)' argument is ambiguous/)?.[1];
  return new UsageError(
    option ? `${option} needs a value; for one that starts with "-", write ${option}=VALUE` : first,
  );
}

/**
 * A whole-number flag's value, or undefined when the flag was not given: a
 * text that is not digits only, or is outside `min`..`max`, is a UsageError
 * in the scripts' own words (`--runs must be an integer from 1 to 20, got "0"`).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { optionalInteger } from "./shared.ts";
 * assert.equal(optionalInteger("--runs", "3", 1, 20), 3);
 * assert.equal(optionalInteger("--runs", undefined, 1, 20), undefined);
 * assert.throws(() => optionalInteger("--runs", "0", 1, 20), /--runs must be an integer from 1 to 20, got "0"/);
 * assert.throws(() => optionalInteger("--pid", "1e3", 1), /--pid must be an integer at least 1/);
 * ```
 */
export function optionalInteger(
  name: string,
  text: string | undefined,
  min: number,
  max = Number.MAX_SAFE_INTEGER,
): number | undefined {
  if (text === undefined) return undefined;
  const value = Number(text);
  if (!/^\d+$/.test(text) || value < min || value > max) {
    const range = max === Number.MAX_SAFE_INTEGER ? `at least ${min}` : `from ${min} to ${max}`;
    throw new UsageError(`${name} must be an integer ${range}, got "${text}"`);
  }
  return value;
}

/** A tool's command line: its name, its usage text, how to read its flags, and what it does. */
export interface Command<Options extends { help: boolean }> {
  name: string;
  usage: string;
  /** Reads the flags; throws a UsageError for a mistake. */
  parse: (args: string[]) => Options;
  /** Does the work; resolves with the exit code. */
  run: (options: Options) => Promise<number>;
}

/**
 * Runs a tool's command line and resolves with its exit code: a mistake is
 * one line (`NAME: what is wrong`), a blank line and the usage on stderr,
 * exit 2; `--help` prints the usage, exit 0; anything else is `run`'s.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { runCommand, UsageError } from "./shared.ts";
 * const command = {
 *   name: "demo",
 *   usage: "Usage: demo [-h]",
 *   parse(args: string[]) {
 *     if (args.length > 1) throw new UsageError("one argument at most");
 *     return { help: args[0] === "-h" };
 *   },
 *   run: () => Promise.resolve(0),
 * };
 * assert.equal(await runCommand(command, []), 0);
 * assert.equal(await runCommand(command, ["-h"]), 0);
 * assert.equal(await runCommand(command, ["a", "b"]), 2);
 * ```
 */
export async function runCommand<Options extends { help: boolean }>(
  command: Command<Options>,
  args: string[],
): Promise<number> {
  let options;
  try {
    options = command.parse(args);
  } catch (error) {
    if (!(error instanceof UsageError)) throw error;
    console.error(`${command.name}: ${error.message}\n\n${command.usage}`);
    return 2;
  }
  if (options.help) {
    console.log(command.usage);
    return 0;
  }
  return await command.run(options);
}

// ------------------------------------------------------------------ servers

/** How a server started by `spawnServer` ended, and everything it printed. */
export interface ServerExit {
  code: number;
  signal: string | null;
  stdout: string;
  /** Its stderr, unless `onStderrLine` took it line by line. */
  stderr: string;
  /** Milliseconds from the signal to the exit. */
  exitMs: number;
}

/** How `spawnServer` runs a server. */
export interface SpawnOptions {
  /** Deno's permission flags for it. Default: loopback only, all a server needs. */
  permissions?: string[];
  /** Gets each line the server writes to stderr as it comes (its log), instead of keeping it. */
  onStderrLine?: (line: string) => void;
  /** How long it may take to print its `listening on` line. Default 15 s. */
  startMs?: number;
  /**
   * What comes before `args` to make it listen on a free port. Default
   * `--port 0`; `udp.ts` wants its command first (`serve --port 0`), and
   * bridge.ts none (its `--listen` in `args` says where).
   */
  listenArgs?: string[];
}

/**
 * One of the project's servers started as its own process on `--port 0`, so
 * that its memory and signals are its own and it shares no event loop with
 * the load. It is ready once it has printed its first line (`listening on
 * tcp://127.0.0.1:PORT` or `ws://…/`). `stop` signals it and collects what it
 * printed; disposing of it kills it if `stop` was not called.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { spawnServer } from "./shared.ts";
 * await using server = await spawnServer("tcp_server.ts", ["--quiet"]);
 * assert.equal(server.address, `tcp://127.0.0.1:${server.port}`);
 * assert.equal((await server.stop()).code, 0);
 * ```
 *
 * @throws {Error} when it exits or says nothing before `startMs`, with its stderr.
 */
export async function spawnServer(script: string, args: string[], options: SpawnOptions = {}) {
  const {
    permissions = ["--allow-net=127.0.0.1"],
    onStderrLine,
    startMs = 15_000,
    listenArgs = ["--port", "0"],
  } = options;
  const child = new Deno.Command(denoCommand(), {
    args: ["run", ...permissions, scriptPath(script), ...listenArgs, ...args],
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const stderr = onStderrLine ? forEachLine(child.stderr, onStderrLine) : text(child.stderr);
  const stdout = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
  let printed = "";
  const firstLine = (async () => {
    while (!printed.includes("\n")) {
      const { done, value } = await stdout.read();
      if (done) break;
      printed += value;
    }
  })();
  // A server that hangs before listening is killed; its stdout then ends.
  await within(firstLine, `${script} to start`, startMs).catch(() => kill(child, "SIGKILL"));
  await firstLine;

  let stopped: Promise<ServerExit> | undefined;
  async function stop(signal: Deno.Signal): Promise<ServerExit> {
    const start = performance.now();
    kill(child, signal);
    const status = await child.status;
    const exitMs = performance.now() - start;
    for (let r = await stdout.read(); !r.done; r = await stdout.read()) printed += r.value;
    return {
      code: status.code,
      signal: status.signal,
      stdout: printed,
      stderr: await stderr,
      exitMs,
    };
  }
  const line = printed.split("\n")[0];
  const port = Number(line.match(/:(\d+)\/?$/)?.[1]);
  if (!port) {
    const { stderr } = await stop("SIGKILL");
    throw new Error(`${script} ${args.join(" ")} did not start: ${stderr.trim()}`);
  }
  return {
    /** The first line it printed. */
    line,
    /** Where it listens, as it said: `tcp://127.0.0.1:PORT` or `ws://127.0.0.1:PORT/`. */
    address: line.replace(/^listening on /, ""),
    port,
    /** Its process id, to read its memory. */
    pid: child.pid,
    /** Signals it (once: later calls return the same result) and waits for its exit. */
    stop: (signal: Deno.Signal = "SIGTERM") => stopped ??= stop(signal),
    async [Symbol.asyncDispose]() {
      await (stopped ??= stop("SIGKILL"));
    },
  };
}

/** What `spawnServer` resolves with. */
export type ServerProcess = Awaited<ReturnType<typeof spawnServer>>;

function kill(child: Deno.ChildProcess, signal: Deno.Signal): void {
  try {
    child.kill(signal);
  } catch {
    // Already exited.
  }
}

async function text(stream: ReadableStream<Uint8Array>): Promise<string> {
  return await new Response(stream).text();
}

async function forEachLine(
  stream: ReadableStream<Uint8Array>,
  onLine: (line: string) => void,
): Promise<string> {
  let rest = "";
  for await (const chunk of stream.pipeThrough(new TextDecoderStream())) {
    const lines = (rest + chunk).split("\n");
    rest = lines.pop()!;
    for (const line of lines) onLine(line);
  }
  if (rest) onLine(rest);
  return "";
}

// `--allow-run=deno` names the deno on PATH. Where that is a symlink (deno
// installed from npm), Deno.execPath() is the link's target, which that
// permission does not cover: then start the one the permission names.
function denoCommand(): string {
  const self = Deno.execPath();
  return Deno.permissions.querySync({ name: "run", command: self }).state === "granted"
    ? self
    : "deno";
}

// ------------------------------------------------------------------- memory

/**
 * A process's memory in MiB, from /proc/PID/status (Linux, and Deno lets a
 * script read /proc only with --allow-all): VmRSS is what is resident now,
 * VmHWM the most that ever was (its high-water mark).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { memoryMiB } from "./shared.ts";
 * if (Deno.build.os === "linux") assert.ok(memoryMiB("self", "VmRSS") > 0);
 * ```
 */
export function memoryMiB(pid: number | "self", field: "VmRSS" | "VmHWM"): number {
  const status = Deno.readTextFileSync(`/proc/${pid}/status`);
  const kib = Number(status.match(new RegExp(`^${field}:\\s+(\\d+) kB`, "m"))?.[1]);
  if (!(kib > 0)) throw new Error(`no ${field} in /proc/${pid}/status`);
  return kib / 1024;
}

/**
 * A process's resident set size in bytes, from `ps`: the way to read it for a
 * script that runs without --allow-all (bench.ts: `--allow-run=deno,ps`).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { residentBytes } from "./shared.ts";
 * if (Deno.build.os !== "windows") assert.ok(await residentBytes(Deno.pid) > 0);
 * ```
 */
export async function residentBytes(pid: number): Promise<number> {
  let output;
  try {
    output = await new Deno.Command("ps", {
      args: ["-o", "rss=", "-p", String(pid)],
      stdin: "null",
      stderr: "null",
    }).output();
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) throw new Error("no ps command to read memory");
    throw error;
  }
  const kib = decoder.decode(output.stdout).trim();
  if (!output.success || !/^\d+$/.test(kib)) throw new Error(`ps found no process ${pid}`);
  return Number(kib) * 1024;
}

// ---------------------------------------------------------- open-file limit

/**
 * This process's soft limit on open files (`ulimit -n`), which its child
 * processes inherit. Deno raises it to the hard limit as it starts
 * (denoland/deno#10162), so this is as high as it goes without root: where it
 * is too low, only `ulimit -Hn` (as root) helps. Linux only: it reads
 * /proc/self/limits.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { openFileLimit } from "./shared.ts";
 * if (Deno.build.os === "linux") assert.ok(openFileLimit() >= 64);
 * ```
 */
export function openFileLimit(): number {
  const limits = Deno.readTextFileSync("/proc/self/limits");
  return Number(limits.match(/^Max open files\s+(\d+)/m)?.[1] ?? 0);
}

// ------------------------------------------------------- small I/O helpers

/** Resolves after `ms`, or as soon as `signal` aborts: a pause, never a wait for an event. */
export function delay(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const done = () => {
      clearTimeout(timer);
      signal?.removeEventListener("abort", done);
      resolve();
    };
    const timer = setTimeout(done, ms);
    if (signal?.aborted) done();
    else signal?.addEventListener("abort", done);
  });
}

/** Writes all of `bytes`: a write may take only part of them. */
export async function writeAll(conn: Deno.Conn, bytes: Uint8Array): Promise<void> {
  for (let done = 0; done < bytes.length;) done += await conn.write(bytes.subarray(done));
}

/** Closes `resource`; one that is closed already is no error. */
export function closeQuietly(resource: { close(): void }): void {
  try {
    resource.close();
  } catch {
    // Already closed.
  }
}

// ------------------------------------------------------ a WebSocket by hand

/**
 * The upgrade request a bare TCP socket sends to become a WebSocket. Any key
 * works: the server's answer to it is checked in main_test.ts.
 */
export const UPGRADE_REQUEST = "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n" +
  "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n" +
  "Sec-WebSocket-Version: 13\r\n\r\n";

/**
 * A frame as a client must send it: masked (RFC 6455, section 5.3). With
 * `mask` false the key is zero, as valid as any, and leaves the payload as it
 * is (fast floods).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { clientFrame } from "./shared.ts";
 * const frame = clientFrame(0x1, new TextEncoder().encode("hi"), false);
 * assert.deepEqual([...frame], [0x81, 0x82, 0, 0, 0, 0, 0x68, 0x69]);
 * ```
 */
export function clientFrame(opcode: number, payload: Uint8Array, mask = true): Uint8Array {
  const extra = payload.length < 126 ? 0 : payload.length < 65536 ? 2 : 8;
  const frame = new Uint8Array(2 + extra + 4 + payload.length);
  const view = new DataView(frame.buffer);
  frame[0] = 0x80 | opcode;
  if (extra === 0) frame[1] = 0x80 | payload.length;
  else if (extra === 2) (frame[1] = 0x80 | 126, view.setUint16(2, payload.length));
  else (frame[1] = 0x80 | 127, view.setBigUint64(2, BigInt(payload.length)));
  const key = frame.subarray(2 + extra, 6 + extra);
  if (mask) crypto.getRandomValues(key);
  const body = frame.subarray(6 + extra);
  for (let i = 0; i < payload.length; i++) body[i] = payload[i] ^ key[i & 3];
  return frame;
}
