"""tcp_echo_server.py: a TCP echo server on Python's standard `socket` module.

The peer for tcp_client.ts: every byte that arrives goes back, and when the
client half-closes (recv returns b"") the server closes too, which is what
ends tcp_client.ts's one-shot mode.

    python3 interop/tcp_echo_server.py 9000     # 0 = any free port
"""

import socketserver
import sys


class Echo(socketserver.BaseRequestHandler):
    def handle(self):
        # recv returns some bytes, not a message; b"" means the peer's FIN.
        while data := self.request.recv(65536):
            # send may take only part of the bytes; sendall loops until done.
            self.request.sendall(data)
        # Returning makes socketserver shut down and close the connection.


class Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


with Server(("127.0.0.1", int(sys.argv[1])), Echo) as server:
    host, port = server.server_address
    print(f"listening on tcp://{host}:{port}", flush=True)
    server.serve_forever()
