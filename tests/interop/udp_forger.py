"""udp_forger.py: datagrams with a forged source address, for `udp.ts serve`.

A UDP datagram's source address is a field its sender fills in, and with a
raw socket (root, or CAP_NET_RAW) anyone can fill in anything. This peer
writes the IP and UDP headers itself to send datagrams "from" port 0, which
no socket can send from, and "from" the server's own address, then checks
with ordinary sockets that the server still serves everyone. It prints what
the ordinary sockets receive, one line each.

    python3 interop/udp_forger.py PORT echo    # udp.ts serve --port PORT
    python3 interop/udp_forger.py PORT chat    # udp.ts serve --port PORT --mode chat --idle-timeout 1
"""

import socket
import struct
import sys

HOST = "127.0.0.1"


def checksum(data):
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def forge(raw, source_port, port, payload, count=1):
    """Sends `count` datagrams to HOST:port that claim to come from HOST:source_port."""
    address = socket.inet_aton(HOST)
    length = 8 + len(payload)
    pseudo = address + address + struct.pack("!BBH", 0, socket.IPPROTO_UDP, length)
    header = struct.pack("!HHHH", source_port, port, length, 0)
    # 0 means "no checksum" in UDP over IPv4, so a computed 0 is sent as 0xFFFF.
    udp = struct.pack("!HHHH", source_port, port, length, checksum(pseudo + header + payload) or 0xFFFF)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + length, 0, 0, 64, socket.IPPROTO_UDP, 0, address, address)
    for _ in range(count):
        raw.sendto(ip + udp + payload, (HOST, 0))


def peer():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((HOST, 0))
    s.settimeout(10)
    return s


def echo(raw, port):
    # Batches small enough for the server's receive buffer, each followed by
    # a probe whose echo says the whole batch has been read: 4,500 forged
    # datagrams in all, more than the server's 4,096 pending sends.
    probe = peer()
    answered = 0
    for n in range(45):
        forge(raw, 0, port, b"from port 0", 100)
        forge(raw, port, port, b"from the server itself", 10)
        probe.sendto(b"probe %d" % n, (HOST, port))
        try:
            if probe.recv(65535) == b"probe %d" % n:
                answered += 1
        except socket.timeout:
            break
    print(f"probes answered: {answered} of 45")


def chat(raw, port):
    a = peer()
    a.sendto(b"", (HOST, port))
    forge(raw, 0, port, b"from port 0")
    forge(raw, port, port, b"from the server itself")
    b = peer()
    b.sendto(b"hi", (HOST, port))
    print("a:", a.recv(65535).decode(), end="")
    print("a:", a.recv(65535).decode(), end="")
    print("b:", b.recv(65535).decode(), end="")
    # Silence: both are forgotten after the idle timeout, and each is told.
    for _ in range(5):
        line = b.recv(65535).decode()
        if line.startswith("* you left"):
            print("b:", line, end="")
            break
    b.sendto(b"back", (HOST, port))
    print("b:", b.recv(65535).decode(), end="")


with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as raw:
    {"echo": echo, "chat": chat}[sys.argv[2]](raw, int(sys.argv[1]))
