/**
 * tools/cert.ts: a test certificate in one command, for TLS on this machine.
 *
 *     deno task cert                       # writes .certs/ (gitignored)
 *     deno run --allow-run=openssl --allow-write=DIR tools/cert.ts --out DIR
 *
 * It writes a small local certificate authority and a server certificate
 * it signed, for `localhost` and `127.0.0.1`:
 *
 *     ca.pem                the CA: what a client trusts (--ca ca.pem)
 *     ca.key                the CA's private key (signs; keep it here)
 *     localhost.pem         the server's certificate (--cert localhost.pem)
 *     localhost.key         the server's private key  (--key localhost.key)
 *
 * Why two certificates, not one self-signed: rustls, the TLS library under
 * Deno, refuses a certificate that is its own CA when a server presents it
 * (`CaUsedAsEndEntity`). So the CA only signs, and the leaf it signs is what
 * the server shows.
 *
 * It runs the system's `openssl` (OpenSSL 3.0 or later), twice:
 *
 *     openssl req -x509 -newkey ec ... -keyout ca.key -out ca.pem
 *         -addext basicConstraints=critical,CA:TRUE ...
 *     openssl req -new -newkey ec ... -keyout localhost.key
 *         -addext subjectAltName=DNS:localhost,IP:127.0.0.1 ...
 *       | openssl x509 -req -CA ca.pem -CAkey ca.key -days N -out localhost.pem
 *
 * For the tests, which need certificates that must be refused, it can also
 * reuse a CA (`--ca-dir`), issue for other names (`--name`), or issue one
 * that is already expired (`--days -1`).
 *
 * @module
 */

import { parseArgs } from "node:util";

const DEFAULT_OUT = ".certs";
const DEFAULT_NAMES = ["localhost", "127.0.0.1"];
const DEFAULT_DAYS = 825;
const CA_DAYS = 3650;
// P-256 keys: small, fast, and accepted by every TLS stack the tests meet.
const KEY_OPTIONS = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];

/** Where {@linkcode makeCertificates} wrote its files. */
export interface CertificateFiles {
  /** The CA's certificate: trust it with `--ca`. */
  ca: string;
  /** The CA's private key. */
  caKey: string;
  /** The server's certificate (`--cert`). */
  cert: string;
  /** The server's private key (`--key`). */
  key: string;
}

/** Options for {@linkcode makeCertificates}. */
export interface CertificateOptions {
  /** Folder to write into; created if missing. */
  out: string;
  /** Names (DNS names or IP addresses) the server certificate is for. Default localhost, 127.0.0.1. */
  names?: string[];
  /** Days the server certificate is valid; -1 makes one that has already expired. Default 825. */
  days?: number;
  /** Sign with the CA (ca.pem, ca.key) already in this folder instead of making a new one. */
  caDir?: string;
}

/**
 * Writes a CA (unless `caDir` names one) and a server certificate signed by
 * it into `out`, by running `openssl`; returns the paths.
 *
 * @example A CA and a localhost leaf, then a TLS connection that trusts the CA
 * ```ts
 * import assert from "node:assert/strict";
 *
 * const out = await Deno.makeTempDir();
 * const files = await makeCertificates({ out });
 * const listener = Deno.listenTls({
 *   hostname: "127.0.0.1",
 *   port: 0,
 *   cert: await Deno.readTextFile(files.cert),
 *   key: await Deno.readTextFile(files.key),
 * });
 * const serving = listener.accept().then(async (conn) => {
 *   await conn.write(new TextEncoder().encode("hi"));
 *   conn.close();
 * });
 * const conn = await Deno.connectTls({
 *   hostname: "127.0.0.1",
 *   port: listener.addr.port,
 *   caCerts: [await Deno.readTextFile(files.ca)],
 * });
 * const reply = await new Response(conn.readable).text();
 * await serving;
 * listener.close();
 * await Deno.remove(out, { recursive: true });
 * assert.equal(reply, "hi");
 * ```
 */
export async function makeCertificates(options: CertificateOptions): Promise<CertificateFiles> {
  const { out, names = DEFAULT_NAMES, days = DEFAULT_DAYS } = options;
  await Deno.mkdir(out, { recursive: true });
  const caDir = options.caDir ?? out;
  const files = {
    ca: `${caDir}/ca.pem`,
    caKey: `${caDir}/ca.key`,
    cert: `${out}/${names[0]}.pem`,
    key: `${out}/${names[0]}.key`,
  };
  if (options.caDir === undefined) {
    await openssl([
      "req",
      "-x509",
      ...KEY_OPTIONS,
      "-keyout",
      files.caKey,
      "-out",
      files.ca,
      "-days",
      String(CA_DAYS),
      "-subj",
      // A name of its own: a client finds a certificate's CA by name, so two
      // CAs of one name would meet as a "bad signature", not "unknown issuer".
      `/CN=local test CA ${new Date().toISOString()} ${crypto.randomUUID().slice(0, 8)}`,
      "-addext",
      "basicConstraints=critical,CA:TRUE",
      "-addext",
      "keyUsage=critical,keyCertSign,cRLSign",
    ]);
  }
  const altNames = names.map((name) => isIpAddress(name) ? `IP:${name}` : `DNS:${name}`);
  const request = await openssl([
    "req",
    "-new",
    ...KEY_OPTIONS,
    "-keyout",
    files.key,
    "-subj",
    `/CN=${names[0]}`,
    "-addext",
    `subjectAltName=${altNames.join(",")}`,
    "-addext",
    "basicConstraints=critical,CA:FALSE",
    "-addext",
    "extendedKeyUsage=serverAuth",
  ]);
  // `x509 -req`, unlike `req -x509`, takes a negative -days: an expired leaf.
  await openssl([
    "x509",
    "-req",
    "-CA",
    files.ca,
    "-CAkey",
    files.caKey,
    "-days",
    String(days),
    "-copy_extensions",
    "copyall",
    "-out",
    files.cert,
  ], request);
  return files;
}

function isIpAddress(name: string): boolean {
  return /^\d+\.\d+\.\d+\.\d+$/.test(name) || name.includes(":");
}

/** openssl failed, or is not there: one line for the user. */
class OpensslError extends Error {}

async function openssl(args: string[], stdin?: Uint8Array): Promise<Uint8Array> {
  let child;
  try {
    child = new Deno.Command("openssl", {
      args,
      stdin: stdin ? "piped" : "null",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) {
      throw new OpensslError(
        "openssl is not installed (e.g. apt-get install openssl, brew install openssl)",
      );
    }
    throw error;
  }
  if (stdin) {
    const writer = child.stdin.getWriter();
    await writer.write(stdin);
    await writer.close();
  }
  const { code, stdout, stderr } = await child.output();
  if (code !== 0) {
    const said = new TextDecoder().decode(stderr).trim().split("\n").filter((line) =>
      !/^-+$/.test(line)
    );
    throw new OpensslError(`openssl ${args[0]} failed: ${said.at(-1) ?? `exit code ${code}`}`);
  }
  return stdout;
}

// ------------------------------------------------------------ command line

const USAGE = `Usage: tools/cert.ts [options]

Writes a local test CA (ca.pem, ca.key) and a server certificate it signed
(NAME.pem, NAME.key) by running the system's openssl.

Options:
  --out DIR      folder to write into (default ${DEFAULT_OUT})
  --name NAME    a name the certificate is for; repeat for more
                 (default ${DEFAULT_NAMES.join(" and ")})
  --days N       days it is valid; -1 makes an expired one (default ${DEFAULT_DAYS})
  --ca-dir DIR   sign with the CA already in DIR instead of making one
  -h, --help     show this help`;

async function main(args: string[]): Promise<number> {
  let parsed;
  try {
    parsed = parseArgs({
      args,
      strict: true,
      options: {
        out: { type: "string", default: DEFAULT_OUT },
        name: { type: "string", multiple: true },
        days: { type: "string", default: String(DEFAULT_DAYS) },
        "ca-dir": { type: "string" },
        help: { type: "boolean", short: "h", default: false },
      },
    }).values;
    if (!/^-?\d+$/.test(parsed.days) || Number(parsed.days) === 0) {
      throw new Error(`--days must be a whole number other than 0, got "${parsed.days}"`);
    }
  } catch (error) {
    console.error(`cert: ${(error as Error).message.split(/\.\s/)[0]}\n\n${USAGE}`);
    return 2;
  }
  if (parsed.help) {
    console.log(USAGE);
    return 0;
  }
  try {
    const files = await makeCertificates({
      out: parsed.out,
      names: parsed.name,
      days: Number(parsed.days),
      caDir: parsed["ca-dir"],
    });
    console.log(
      `wrote ${files.ca} (trust it: --ca), ${files.cert} and ${files.key} (serve them: --cert, --key)`,
    );
    return 0;
  } catch (error) {
    if (!(error instanceof OpensslError || error instanceof Deno.errors.NotCapable)) throw error;
    console.error(`cert: ${error.message}`);
    return 1;
  }
}

if (import.meta.main) Deno.exit(await main(Deno.args));
