"""tcp_client.py: a TCP client on Python's standard `socket` module.

The peer for tcp_server.ts. Sends each MESSAGE as a line (or, without any,
all of stdin, byte for byte), half-closes, and writes everything received to
stdout until the server closes.

    python3 interop/tcp_client.py 9000 hello "two words"
    head -c 1000 /dev/urandom | python3 interop/tcp_client.py 9000 > echoed
"""

import socket
import sys
import threading

port, messages = int(sys.argv[1]), sys.argv[2:]
data = "".join(m + "\n" for m in messages).encode() if messages else sys.stdin.buffer.read()

with socket.create_connection(("127.0.0.1", port)) as sock:

    def send_then_half_close():
        sock.sendall(data)
        # FIN: "I am done sending"; the socket can still receive the reply.
        sock.shutdown(socket.SHUT_WR)

    # Send and receive at once: an echo server stops reading while its
    # replies go unread, so sending everything first could deadlock.
    sender = threading.Thread(target=send_then_half_close)
    sender.start()
    while chunk := sock.recv(65536):
        sys.stdout.buffer.write(chunk)
    sender.join()
