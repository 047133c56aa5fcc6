/**
 * tools/idle_memory.ts: what an idle TCP connection costs tcp_server.ts, in
 * memory, next to the plainest Deno echo loop measured in the same run.
 *
 * A connection that says nothing still holds its read: the buffer the kernel
 * will copy the next bytes into. This opens many connections to each server,
 * has each make one exchange (in echo, a line sent and echoed; in chat, the
 * join and the `* you are` line read back), leaves them all open and idle, and reads how much the server's
 * resident set grew, divided by the connections. The servers are, each a
 * fresh process per run, in an order that rotates from run to run:
 *
 * - `tcp_server.ts` in echo mode and in chat mode;
 * - tools/plain_tcp_echo.ts with a 64 KiB and with a 4 KiB buffer: what the
 *   runtime itself costs with a large and a small read buffer.
 *
 * The figures of one run are compared with each other; the medians of the
 * runs are printed with the ratio of each to the plain loops.
 *
 *     deno run -A tools/idle_memory.ts                       # 5,000 connections, 3 runs
 *     deno run -A tools/idle_memory.ts --connections 1000 --runs 5 --json
 *
 * It needs `ulimit -n` above the number of connections, for itself and the
 * servers it starts (which inherit it).
 *
 * @module
 */

import { parseArgs } from "node:util";
import {
  closeQuietly,
  delay,
  flagError,
  openFileLimit,
  optionalInteger,
  residentBytes,
  runCommand,
  spawnServer,
  within,
  writeAll,
} from "./shared.ts";

const DEFAULT_CONNECTIONS = 5000;
const DEFAULT_RUNS = 3;
// Connections opened at once: fast enough to open thousands in seconds, slow
// enough that the listener's backlog never overflows.
const OPENING_IN_PARALLEL = 32;
// After the last connection has made its exchange, the server may still be
// busy (a chat delivers N joins to N clients): memory is read once it has
// used no CPU for QUIET_MS (the burst figure), and again --settle seconds
// later (the settled figure). In between, V8 gives back the heap that the
// burst's garbage grew: its "memory reducer" collects once allocation has
// been low for about 8 s. A server still busy after BUSY_MS is reported.
const QUIET_MS = 500;
const DEFAULT_SETTLE_S = 20;
const BUSY_MS = 60_000;
// Linux counts a process's CPU time in ticks of 10 ms (USER_HZ = 100).
const QUIET_TICKS = 2;
// Open files a process needs beside its connections.
const RESERVED_FILES = 64;
const MESSAGE = new TextEncoder().encode("hello, idle world\n");

/** One server measured: how it is started and the one exchange each connection makes. */
interface Subject {
  name: string;
  script: string;
  args: string[];
  greet: (conn: Deno.TcpConn) => Promise<void>;
}

const SUBJECTS: Subject[] = [
  {
    name: "tcp_server.ts echo",
    script: "tcp_server.ts",
    args: ["--mode", "echo"],
    greet: echoOnce,
  },
  {
    name: "tcp_server.ts chat",
    script: "tcp_server.ts",
    args: ["--mode", "chat"],
    greet: joinChat,
  },
  {
    name: "plain loop, 64 KiB",
    script: "tools/plain_tcp_echo.ts",
    args: ["--buffer", "65536"],
    greet: echoOnce,
  },
  {
    name: "plain loop, 4 KiB",
    script: "tools/plain_tcp_echo.ts",
    args: ["--buffer", "4096"],
    greet: echoOnce,
  },
];

async function echoOnce(conn: Deno.TcpConn): Promise<void> {
  await writeAll(conn, MESSAGE);
  const buf = new Uint8Array(MESSAGE.length);
  let got = 0;
  while (got < buf.length) {
    const n = await conn.read(buf.subarray(got));
    if (n === null) throw new Error("the server closed before its echo");
    got += n;
  }
}

// The newcomer's first line is its name; others' joins follow (see drain).
async function joinChat(conn: Deno.TcpConn): Promise<void> {
  const buf = new Uint8Array(256);
  let text = "";
  while (!text.includes("\n")) {
    const n = await conn.read(buf);
    if (n === null) throw new Error("the server closed before naming us");
    text += new TextDecoder().decode(buf.subarray(0, n));
  }
  if (!text.startsWith("* you are ")) throw new Error(`unexpected first line: ${text.trim()}`);
}

// An idle client sends nothing but still reads what arrives (in a chat, the
// others' joins), as a real one does, so the server's queues can empty.
async function drain(conn: Deno.TcpConn, into: Uint8Array): Promise<void> {
  try {
    while (await conn.read(into) !== null) {
      // Discarded.
    }
  } catch {
    // Closed by us at the end.
  }
}

/** Resident growth per idle connection, in bytes: just after the burst, and settled. */
interface Figure {
  burst: number;
  settled: number;
}

/** One fresh server, `connections` idle connections to it, and its growth per connection. */
async function measure(subject: Subject, connections: number, settleMs: number): Promise<Figure> {
  await using server = await spawnServer(subject.script, [
    "--quiet",
    ...subject.args,
    ...(subject.script === "tcp_server.ts" ? ["--max-connections", String(connections + 1)] : []),
  ]);
  const address = { hostname: "127.0.0.1", port: server.port };
  const conns: Deno.TcpConn[] = [];
  const drains: Promise<void>[] = [];
  const discarded = new Uint8Array(64 * 1024);
  try {
    // One connection first, so that what every server pays once (its first
    // accept, the code it compiles for it) is not counted per connection.
    const first = await Deno.connect(address);
    conns.push(first);
    await within(subject.greet(first), `${subject.name}: the first connection`);
    drains.push(drain(first, discarded));
    const before = await residentBytes(server.pid);
    let next = 0;
    await Promise.all(Array.from({ length: OPENING_IN_PARALLEL }, async () => {
      while (next < connections) {
        next++;
        const conn = await Deno.connect(address);
        conns.push(conn);
        await within(subject.greet(conn), `${subject.name}: connection ${conns.length}`);
        drains.push(drain(conn, discarded));
      }
    }));
    await untilQuiet(server.pid, subject.name);
    const burst = (await residentBytes(server.pid) - before) / connections;
    await delay(settleMs);
    return { burst, settled: (await residentBytes(server.pid) - before) / connections };
  } finally {
    for (const conn of conns) closeQuietly(conn);
    await Promise.all(drains);
  }
}

// User plus system CPU time, fields 14 and 15 of /proc/PID/stat (after the
// command name in parentheses, which may itself hold spaces).
function cpuTicks(pid: number): number {
  const stat = Deno.readTextFileSync(`/proc/${pid}/stat`);
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return Number(fields[11]) + Number(fields[12]);
}

async function untilQuiet(pid: number, name: string): Promise<void> {
  const end = performance.now() + BUSY_MS;
  let before = cpuTicks(pid);
  while (performance.now() < end) {
    await delay(QUIET_MS);
    const now = cpuTicks(pid);
    if (now - before < QUIET_TICKS) return;
    before = now;
  }
  throw new Error(`${name} was still busy ${BUSY_MS / 1000} s after the last connection opened`);
}

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const middle = sorted.length >> 1;
  return sorted.length % 2 ? sorted[middle] : (sorted[middle - 1] + sorted[middle]) / 2;
}

/** Per subject, its figures in each run. */
async function measureAll(options: Options): Promise<Map<string, Figure[]>> {
  const { connections, runs, settle } = options;
  const figures = new Map(SUBJECTS.map((s) => [s.name, [] as Figure[]]));
  for (let run = 0; run < runs; run++) {
    for (let i = 0; i < SUBJECTS.length; i++) {
      const subject = SUBJECTS[(run + i) % SUBJECTS.length];
      const figure = await measure(subject, connections, settle * 1000);
      figures.get(subject.name)!.push(figure);
      console.error(
        `run ${run + 1}/${runs}: ${subject.name}: ${kib(figure.burst)} KiB after the burst, ` +
          `${kib(figure.settled)} KiB settled`,
      );
    }
  }
  return figures;
}

function kib(bytes: number): string {
  return (bytes / 1024).toFixed(1);
}

function table(figures: Map<string, Figure[]>, options: Options): string {
  const medians = new Map(
    [...figures].map(([name, runs]) => [name, {
      burst: median(runs.map((f) => f.burst)),
      settled: median(runs.map((f) => f.settled)),
    }]),
  );
  const large = medians.get("plain loop, 64 KiB")!.settled;
  const small = medians.get("plain loop, 4 KiB")!.settled;
  const rows = [...medians].map(([name, { burst, settled }]) =>
    `  ${name.padEnd(20)} ${kib(burst).padStart(8)} ${kib(settled).padStart(8)} ` +
    `${(settled / large).toFixed(2).padStart(9)}× ${(settled / small).toFixed(2).padStart(8)}×`
  );
  return [
    `Server memory per idle TCP connection, KiB: ${options.connections} connections, ` +
    (options.runs === 1 ? "one run" : `median of ${options.runs} runs`),
    `  ${"server".padEnd(20)} ${"burst".padStart(8)} ${"settled".padStart(8)} ` +
    `${"vs 64 KiB".padStart(10)} ${"vs 4 KiB".padStart(9)}`,
    ...rows,
    `burst: as soon as the server is idle; settled: ${options.settle} s later (V8 gives back`,
    `the heap a burst's garbage grew some 10-15 s after it ends). The ratios are of the settled`,
    `figures.`,
  ].join("\n");
}

const USAGE = `Usage: idle_memory.ts [options]

Opens many idle TCP connections to tcp_server.ts (echo, then chat) and to a
plain Deno read/write loop with a 64 KiB and with a 4 KiB buffer, and prints
how much each server's resident memory grew per connection: medians of the
runs, and ratios to the plain loops. Loopback only.

Options:
  --connections N   idle connections per server (default ${DEFAULT_CONNECTIONS})
  --runs N          fresh servers per subject, alternating (default ${DEFAULT_RUNS})
  --settle SECONDS  how long after the burst the settled figure is read
                    (default ${DEFAULT_SETTLE_S})
  --json            one JSON object instead of the table
  -h, --help        show this help

It needs "ulimit -n" above N + ${RESERVED_FILES}. Exit status: 0, 1 if a measurement
failed, 2 for bad flags.`;

function parse(args: string[]) {
  let values;
  try {
    values = parseArgs({
      args,
      strict: true,
      options: {
        connections: { type: "string" },
        runs: { type: "string" },
        settle: { type: "string" },
        json: { type: "boolean", default: false },
        help: { type: "boolean", short: "h", default: false },
      },
    }).values;
  } catch (error) {
    throw flagError(error);
  }
  return {
    connections: optionalInteger("--connections", values.connections, 1, 50_000) ??
      DEFAULT_CONNECTIONS,
    runs: optionalInteger("--runs", values.runs, 1, 20) ?? DEFAULT_RUNS,
    settle: optionalInteger("--settle", values.settle, 0, 600) ?? DEFAULT_SETTLE_S,
    json: values.json,
    help: values.help,
  };
}

type Options = ReturnType<typeof parse>;

async function run(options: Options): Promise<number> {
  const { connections, runs } = options;
  const limit = openFileLimit();
  if (limit < connections + RESERVED_FILES) {
    console.error(
      `idle_memory.ts: the open-file limit (ulimit -n) is ${limit}, too low for ${connections} ` +
        `connections; raise it with "ulimit -n ${
          connections + RESERVED_FILES
        }" or lower --connections`,
    );
    return 1;
  }
  let figures;
  try {
    figures = await measureAll(options);
  } catch (error) {
    console.error(`idle_memory.ts: ${(error as Error).message}`);
    return 1;
  }
  if (options.json) {
    console.log(JSON.stringify({
      connections,
      runs,
      settleSeconds: options.settle,
      bytesPerConnection: Object.fromEntries(figures),
    }));
  } else {
    console.log(table(figures, options));
  }
  return 0;
}

if (import.meta.main) {
  Deno.exit(await runCommand({ name: "idle_memory.ts", usage: USAGE, parse, run }, Deno.args));
}
