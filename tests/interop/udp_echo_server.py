"""udp_echo_server.py: a UDP echo server on Python's standard `socket` module.

The peer for `udp.ts send`: every datagram that arrives goes back to the
address it came from, whole. There is nothing to accept and nothing to close:
one socket serves every peer, and recvfrom says who sent each datagram.

    python3 interop/udp_echo_server.py 9002     # 0 = any free port
"""

import socket
import sys

with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server:
    server.bind(("127.0.0.1", int(sys.argv[1])))
    host, port = server.getsockname()
    print(f"listening on udp://{host}:{port}", flush=True)
    while True:
        # One recvfrom is one datagram, never part of one: 65535 bytes is
        # room for the largest (a bigger one would be cut off, not split).
        data, sender = server.recvfrom(65535)
        server.sendto(data, sender)
