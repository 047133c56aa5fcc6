/**
 * tcp_echo_server.mjs: a TCP echo server on Node.js's `net` module.
 *
 * The peer for tcp_client.ts: every byte goes back, and when the client
 * half-closes, the server finishes writing and closes too.
 *
 *     node interop/tcp_echo_server.mjs 9000     # 0 = any free port
 */

import net from "node:net";
import process from "node:process";

// allowHalfOpen: the client's FIN must not end our side before the echo of
// its last bytes is out; pipe() ends it once everything is written.
const server = net.createServer({ allowHalfOpen: true }, (socket) => {
  socket.on("error", () => socket.destroy());
  socket.pipe(socket);
});

server.listen(Number(process.argv[2]), "127.0.0.1", () => {
  const { address, port } = server.address();
  console.log(`listening on tcp://${address}:${port}`);
});
