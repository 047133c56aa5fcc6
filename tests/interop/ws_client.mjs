/**
 * ws_client.mjs: a WebSocket client on the `ws` package for Node.js.
 *
 * The peer for ws_server.ts. Sends each MESSAGE as text, except `binary:N`,
 * which is sent as N binary bytes 0, 1, 2, …, 255, 0, 1, …. Prints each
 * message received on its own line (binary as `<binary N bytes sha256 HEX>`),
 * closes with 1000 after one reply per message sent (never, with --stay),
 * where a text message starting with "* " is a chat server's notice (its
 * "* you are NAME", joins and leaves), printed but not a reply,
 * and prints how the connection closed: `closed CODE REASON`. With
 * --protocol=A,B it offers those subprotocols (ws insists that the server
 * picks one) and prints the one chosen first: `protocol NAME`. With
 * --ca=FILE (for a wss:// URL) it trusts that CA's certificates, and only
 * those (ws hands `ca` to Node's tls.connect).
 *
 *     node interop/ws_client.mjs ws://127.0.0.1:8080/ hello binary:256
 *     node interop/ws_client.mjs ws://127.0.0.1:8080/ --stay hello
 *     node interop/ws_client.mjs ws://127.0.0.1:8080/ --protocol=graphql-ws hello
 *     node interop/ws_client.mjs wss://127.0.0.1:8443/ --ca=.certs/ca.pem hello
 */

import { createHash } from "node:crypto";
import { readFileSync } from "node:fs";
import process from "node:process";
import WebSocket from "ws";

const [url, ...args] = process.argv.slice(2);
const stay = args.includes("--stay");
const protocols = args.find((arg) => arg.startsWith("--protocol="))?.slice(11).split(",");
const caFile = args.find((arg) => arg.startsWith("--ca="))?.slice(5);
const messages = args.filter((arg) =>
  arg !== "--stay" && !arg.startsWith("--protocol=") && !arg.startsWith("--ca=")
);
let received = 0;

function payload(message) {
  const size = message.match(/^binary:(\d+)$/)?.[1];
  return size === undefined
    ? message
    : Uint8Array.from({ length: Number(size) }, (_, i) => i % 256);
}

function describe(data, isBinary) {
  if (!isBinary) return data.toString("utf8");
  return `<binary ${data.length} bytes sha256 ${createHash("sha256").update(data).digest("hex")}>`;
}

const socket = new WebSocket(url, protocols, caFile ? { ca: readFileSync(caFile) } : {});
socket.on("open", () => {
  if (protocols) console.log(`protocol ${socket.protocol}`);
  for (const message of messages) socket.send(payload(message));
});
// ws hands over every message as a Buffer; isBinary says which opcode it had.
socket.on("message", (data, isBinary) => {
  const text = describe(data, isBinary);
  console.log(text);
  if (!isBinary && text.startsWith("* ")) return;
  if (++received === messages.length && !stay) socket.close(1000);
});
socket.on("close", (code, reason) => console.log(`closed ${code} ${reason}`.trimEnd()));
socket.on("error", (error) => {
  console.error(`ws_client.mjs: ${error.message}`);
  process.exitCode = 1;
});
