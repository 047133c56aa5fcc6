/**
 * tests/helpers.ts: what main_test.ts, hardening_test.ts and interop_test.ts
 * share. A script's path, a bound on a wait, test bytes, the scripts run as
 * real processes, a TCP connection and a WebSocket whose reads are
 * awaitable, a log whose lines are awaitable, and test certificates.
 *
 * Its name does not end in _test.ts, so `deno test` runs nothing here. The
 * helpers keep the tests' rules: every wait is for an event (a line, a
 * message, a close, an exit), never a sleep, and whatever they open they
 * close, so that the sanitizers stay quiet.
 */

import assert from "node:assert/strict";
import {
  scriptPath,
  type ServerProcess,
  spawnServer as spawnServerProcess,
  WAIT_MS,
  within,
} from "../tools/shared.ts";
import { type CertificateFiles, makeCertificates } from "../tools/cert.ts";

const encoder = new TextEncoder();
const decoder = new TextDecoder();

// The wait bound and the server processes are the tools' too (bench.ts, soak.ts).
export { scriptPath, type ServerExit, WAIT_MS, within } from "../tools/shared.ts";

/** Every byte value once, 0 to 255. */
export function allBytes(): Uint8Array {
  return Uint8Array.from({ length: 256 }, (_, i) => i);
}

/** `n` random bytes (getRandomValues fills at most 64 KiB per call). */
export function randomBytes(n: number): Uint8Array {
  const bytes = new Uint8Array(n);
  for (let i = 0; i < n; i += 65536) crypto.getRandomValues(bytes.subarray(i, i + 65536));
  return bytes;
}

/** Runs a script of this project to completion and returns its exit code and output. */
export async function runScript(name: string, args: string[], stdin?: string) {
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", scriptPath(name), ...args],
    stdin: stdin === undefined ? "null" : "piped",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  if (stdin !== undefined) {
    const writer = child.stdin.getWriter();
    await writer.write(encoder.encode(stdin));
    await writer.close();
  }
  const { code, stdout, stderr } = await child.output();
  return { code, stdout: decoder.decode(stdout), stderr: decoder.decode(stderr) };
}

/**
 * A server script started as a real process on `--port 0` (or what
 * `listenArgs` says instead), with every permission (tools/shared.ts's
 * `spawnServer`): ready once it has printed its first line; `stop` signals it
 * and collects its output, and disposing of it kills it if `stop` was not
 * called.
 */
export function spawnServer(
  name: string,
  args: string[],
  options: { listenArgs?: string[] } = {},
): Promise<ServerProcess> {
  return spawnServerProcess(name, args, { ...options, permissions: ["-A"] });
}

/**
 * A TCP connection to 127.0.0.1 with buffered reads: whole lines, exact
 * lengths, or everything until EOF. With `tls`, a TLS connection that trusts
 * `caCerts`.
 */
export async function connectTcp(port: number, tls?: { caCerts: string[] }) {
  // Typed as a TcpConn for the tests that set TCP options; a TLS test uses
  // only what both have (read, write, close).
  const conn = tls
    ? await connectTls(port, tls.caCerts) as unknown as Deno.TcpConn
    : await Deno.connect({ hostname: "127.0.0.1", port });
  return bufferedConn(conn);
}

/** The same buffered reads and writes as `connectTcp`, on a connection already open (one accepted, say). */
export function bufferedConn<C extends Deno.Conn>(conn: C) {
  let buffered = new Uint8Array(0);
  let eof = false;
  async function fill(): Promise<boolean> {
    if (eof) return false;
    const chunk = new Uint8Array(64 * 1024);
    const n = await conn.read(chunk);
    if (n === null) {
      eof = true;
      return false;
    }
    const joined = new Uint8Array(buffered.length + n);
    joined.set(buffered);
    joined.set(chunk.subarray(0, n), buffered.length);
    buffered = joined;
    return true;
  }
  function take(n: number): Uint8Array {
    const head = buffered.slice(0, n);
    buffered = buffered.subarray(n);
    return head;
  }
  return {
    conn,
    /** Writes all of `data` (a string as UTF-8). */
    async write(data: string | Uint8Array) {
      const bytes = typeof data === "string" ? encoder.encode(data) : data;
      for (let done = 0; done < bytes.length;) done += await conn.write(bytes.subarray(done));
    },
    /** The next line without its "\n", or null at EOF. */
    async readLine(): Promise<string | null> {
      for (;;) {
        const end = buffered.indexOf(10);
        if (end !== -1) return decoder.decode(take(end + 1)).slice(0, -1);
        if (!await fill()) {
          return buffered.length > 0 ? decoder.decode(take(buffered.length)) : null;
        }
      }
    },
    /** Exactly `n` bytes, fewer only at EOF. */
    async readBytes(n: number): Promise<Uint8Array> {
      while (buffered.length < n && await fill());
      return take(n);
    },
    /** Every byte until EOF. */
    async readToEnd(): Promise<Uint8Array> {
      while (await fill());
      return take(buffered.length);
    },
    /** Every line until EOF. */
    async readLinesToEnd(): Promise<string[]> {
      const lines: string[] = [];
      for (let line = await this.readLine(); line !== null; line = await this.readLine()) {
        lines.push(line);
      }
      return lines;
    },
    /** Reads and discards everything until EOF; returns how many bytes that was. */
    async drain(): Promise<number> {
      let total = buffered.length;
      buffered = new Uint8Array(0);
      const chunk = new Uint8Array(64 * 1024);
      for (let n = await conn.read(chunk); n !== null; n = await conn.read(chunk)) total += n;
      eof = true;
      return total;
    },
    /** Closes the connection; closing it again does nothing. */
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

async function connectTls(port: number, caCerts: string[]): Promise<Deno.TlsConn> {
  const conn = await Deno.connectTls({ hostname: "127.0.0.1", port, caCerts });
  try {
    await conn.handshake();
  } catch (error) {
    conn.close();
    throw error;
  }
  return conn;
}

/** What `connectTcp` returns. */
export type TcpClient = Awaited<ReturnType<typeof connectTcp>>;

/**
 * A standard WebSocket, open (within WAIT_MS), with its messages awaitable
 * one by one and its close event as a promise. Disposing of it closes it and
 * waits for the close.
 */
export async function openWs(url: string) {
  const socket = new WebSocket(url);
  // Binary messages as bytes to compare, not Blobs to read first.
  socket.binaryType = "arraybuffer";
  const messages: (string | ArrayBuffer)[] = [];
  let isClosed = false;
  let wake = () => {};
  const closed = new Promise<CloseEvent>((resolve) => {
    socket.onclose = (event) => {
      isClosed = true;
      resolve(event);
      wake();
    };
  });
  socket.onmessage = (event) => {
    messages.push(event.data);
    wake();
  };
  await within(
    new Promise((resolve, reject) => {
      socket.onopen = resolve;
      closed.then(() => reject(new Error(`could not open ${url}`)));
    }),
    `open ${url}`,
  );
  return {
    socket,
    closed,
    /** The messages that have arrived and that `next` has not taken yet, oldest first. */
    messages,
    /** Takes the oldest message; throws if none is left and the socket has closed. */
    async next(): Promise<string | ArrayBuffer> {
      while (messages.length === 0) {
        if (isClosed) throw new Error("closed before the next message");
        await new Promise<void>((resolve) => wake = resolve);
      }
      return messages.shift()!;
    },
    async [Symbol.asyncDispose]() {
      if (socket.readyState === WebSocket.OPEN) socket.close();
      await closed;
    },
  };
}

/** What `openWs` returns. */
export type WsClient = Awaited<ReturnType<typeof openWs>>;

// A chat server tells each newcomer its name in a notice of its own, the
// first line (TCP) or message (WebSocket) it sends: `* you are guest-N`.
const YOU_ARE = /^\* you are (guest-\d+)$/;

function ownName(notice: unknown, expected: string | undefined, where: string): string {
  assert.ok(typeof notice === "string", `${where}: the first message is not text`);
  const name = notice.match(YOU_ARE)?.[1];
  assert.ok(
    name !== undefined,
    `${where}: the first line is ${JSON.stringify(notice)}, not "* you are NAME"`,
  );
  if (expected !== undefined) assert.equal(name, expected, `${where}: the name it was told`);
  return name;
}

/**
 * Joins a TCP chat server: connects, checks that the first line is the
 * server's `* you are NAME` notice (and that NAME is `expected`, if given),
 * and returns the connection with `name` set. The notice is consumed.
 */
export async function joinTcpChat(port: number, expected?: string) {
  const client = await connectTcp(port);
  try {
    const notice = await within(client.readLine(), `the notice on joining 127.0.0.1:${port}`);
    return Object.assign(client, { name: ownName(notice, expected, `tcp chat ${port}`) });
  } catch (error) {
    client.close();
    throw error;
  }
}

/**
 * Joins a WebSocket chat server: opens, checks that the first message is
 * the server's `* you are NAME` notice (and that NAME is `expected`, if
 * given), and returns the socket with `name` set. The notice is consumed.
 */
export async function joinWsChat(url: string, expected?: string) {
  const client = await openWs(url);
  try {
    const notice = await within(client.next(), `the notice on joining ${url}`);
    return Object.assign(client, { name: ownName(notice, expected, `ws chat ${url}`) });
  } catch (error) {
    await client[Symbol.asyncDispose]();
    throw error;
  }
}

/** What a log line is looked for by: a pattern, or a test of the line. */
export type LineMatch = RegExp | ((line: string) => boolean);

/**
 * A log to pass as a server's `log` option (or to feed a process's stderr
 * into), whose lines can be awaited. `next` takes lines in order, as a
 * reader would; `waitFor` and `count` look at every line so far. Every wait
 * is bounded (WAIT_MS unless told), and one that times out says what the
 * log held by then.
 *
 * @example Waiting for a server's connect and disconnect lines
 * ```ts
 * import assert from "node:assert/strict";
 * import { startTcpServer } from "../tcp_server.ts";
 * import { awaitableLog } from "./helpers.ts";
 *
 * const log = awaitableLog();
 * await using server = startTcpServer({ port: 0, log: log.push });
 * const conn = await Deno.connect({ hostname: "127.0.0.1", port: server.addr.port });
 * conn.close();
 * assert.match(await log.next(/^- /), /disconnected/);
 * await log.waitFor(/^\+ /, { atLeast: 1 });
 * ```
 */
export function awaitableLog() {
  const lines: string[] = [];
  // Lines before this index have been passed by `next`.
  let taken = 0;
  const waiters = new Set<() => void>();
  const matches = (match: LineMatch, line: string) =>
    typeof match === "function" ? match(line) : match.test(line);
  function count(match: LineMatch): number {
    return lines.filter((line) => matches(match, line)).length;
  }
  async function until<T>(found: () => T | undefined, what: string, ms: number): Promise<T> {
    // A wait that timed out must not wake later and take a line (`next`).
    let gaveUp = false;
    const waiting = (async () => {
      for (;;) {
        if (gaveUp) return undefined as T;
        const value = found();
        if (value !== undefined) return value;
        await new Promise<void>((resolve) => waiters.add(resolve));
      }
    })();
    try {
      return await within(waiting, what, ms);
    } catch (error) {
      gaveUp = true;
      const last = lines.slice(-5).map((line) => JSON.stringify(line)).join(" | ");
      throw new Error(`${(error as Error).message}; ${lines.length} line(s), the last: ${last}`);
    }
  }
  return {
    /** Every line so far, oldest first. */
    lines,
    /** The sink: give it to a server as its `log`. */
    push: (line: string) => {
      lines.push(line);
      for (const wake of waiters) wake();
      waiters.clear();
    },
    /** How many lines so far match. */
    count,
    /**
     * The next line that matches, after the one `next` last returned; the
     * lines passed over on the way are not looked at again.
     */
    next(match: LineMatch, what = `a log line matching ${match}`): Promise<string> {
      return until(
        () => {
          for (; taken < lines.length; taken++) {
            if (matches(match, lines[taken])) return lines[taken++];
          }
        },
        what,
        WAIT_MS,
      );
    },
    /** Waits until at least `atLeast` (1) lines so far match, within `ms` (WAIT_MS). */
    async waitFor(match: LineMatch, options: { atLeast?: number; ms?: number } = {}) {
      const { atLeast = 1, ms = WAIT_MS } = options;
      await until(
        () => count(match) >= atLeast || undefined,
        `${atLeast} log line(s) matching ${match}`,
        ms,
      );
    },
  };
}

/** What `awaitableLog` returns. */
export type AwaitableLog = ReturnType<typeof awaitableLog>;

/** A server's certificate and private key as PEM text: what `Deno.listenTls` takes. */
export interface PemPair {
  cert: string;
  key: string;
}

/** Certificates for TLS tests, in a temporary folder: see `testCertificates`. */
export interface TestCertificates extends AsyncDisposable {
  /** The temporary folder; disposing of the certificates removes it. */
  dir: string;
  /**
   * Paths. `ca`, `caKey`, `cert` and `key` are tools/cert.ts's files: the CA
   * and the localhost/127.0.0.1 leaf it signed, for a server's --cert and
   * --key. `otherCa` is a second CA that signed none of the leaves below, and
   * `otherKey` a private key that belongs to none of them.
   */
  files: CertificateFiles & { otherCa: string; otherKey: string };
  /** The CA's certificate as PEM text: what a client's `caCerts` takes. */
  ca: string;
  /** The localhost/127.0.0.1 leaf the CA signed. */
  good: PemPair;
  /** A leaf from the same CA for example.com only. */
  wrongName: PemPair;
  /** A leaf from the same CA that has already expired. */
  expired: PemPair;
  /** The CA's own certificate shown by a server: what a lone self-signed one amounts to. */
  caAsServer: PemPair;
}

/**
 * The certificates TLS tests need, made by tools/cert.ts (what `deno task
 * cert` runs, so the tests exercise it) in a temporary folder that disposing
 * of them removes: a CA and the localhost/127.0.0.1 leaf it signed, a leaf
 * for another name and an expired one from the same CA, and a second CA.
 *
 * @example A TLS listener with the good leaf, for clients that trust the CA
 * ```ts
 * import { testCertificates } from "./helpers.ts";
 *
 * await using certs = await testCertificates();
 * using listener = Deno.listenTls({ hostname: "127.0.0.1", port: 0, ...certs.good });
 * // A client trusts certs.ca (PEM text) or certs.files.ca (its path, for --ca).
 * ```
 */
export async function testCertificates(): Promise<TestCertificates> {
  const dir = await Deno.makeTempDir({ prefix: "tls_test_" });
  try {
    const good = await makeCertificates({ out: `${dir}/good` });
    const caDir = `${dir}/good`;
    const wrongName = await makeCertificates({
      out: `${dir}/wrong-name`,
      caDir,
      names: ["example.com"],
    });
    const expired = await makeCertificates({ out: `${dir}/expired`, caDir, days: -1 });
    const other = await makeCertificates({ out: `${dir}/other` });
    const pair = async (files: CertificateFiles): Promise<PemPair> => ({
      cert: await Deno.readTextFile(files.cert),
      key: await Deno.readTextFile(files.key),
    });
    return {
      dir,
      files: { ...good, otherCa: other.ca, otherKey: other.key },
      ca: await Deno.readTextFile(good.ca),
      good: await pair(good),
      wrongName: await pair(wrongName),
      expired: await pair(expired),
      caAsServer: await pair({ ...good, cert: good.ca, key: good.caKey }),
      async [Symbol.asyncDispose]() {
        await Deno.remove(dir, { recursive: true });
      },
    };
  } catch (error) {
    await Deno.remove(dir, { recursive: true });
    throw error;
  }
}
