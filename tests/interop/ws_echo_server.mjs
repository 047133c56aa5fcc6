/**
 * ws_echo_server.mjs: a WebSocket echo server on the `ws` package for Node.js.
 *
 * The peer for ws_client.ts: text comes back as text, binary as binary, and
 * each close is printed as `closed CODE REASON`, so a test can see the code
 * the client sent.
 *
 *     node interop/ws_echo_server.mjs 8080     # 0 = any free port
 */

import process from "node:process";
import { WebSocketServer } from "ws";

const server = new WebSocketServer({ host: "127.0.0.1", port: Number(process.argv[2]) });
server.on("listening", () => {
  const { address, port } = server.address();
  console.log(`listening on ws://${address}:${port}/`);
});
server.on("connection", (socket) => {
  socket.on("message", (data, isBinary) => socket.send(data, { binary: isBinary }));
  socket.on("close", (code, reason) => console.log(`closed ${code} ${reason}`.trimEnd()));
  socket.on("error", () => {});
});
