/**
 * tcp_client.mjs: a TCP client on Node.js's `net` module.
 *
 * The peer for tcp_server.ts. Sends each MESSAGE as a line (or, without any,
 * all of stdin, byte for byte), half-closes, and writes everything received
 * to stdout until the server closes.
 *
 *     node interop/tcp_client.mjs 9000 hello "two words"
 *     head -c 1000 /dev/urandom | node interop/tcp_client.mjs 9000 > echoed
 */

import net from "node:net";
import process from "node:process";

const [port, ...messages] = process.argv.slice(2);
const socket = net.connect({ host: "127.0.0.1", port: Number(port) });
socket.on("error", (error) => {
  console.error(`tcp_client.mjs: ${error.message}`);
  process.exitCode = 1;
});
socket.pipe(process.stdout);
// end() writes the last bytes, then sends FIN: a half-close, so the reply
// still arrives. Piping stdin does the same when stdin ends.
if (messages.length > 0) socket.end(messages.map((message) => `${message}\n`).join(""));
else process.stdin.pipe(socket);
