"""ws_client.py: a WebSocket client on python-websockets (Debian's python3-websockets).

The peer for ws_server.ts. Sends each MESSAGE as text, except `binary:N`,
which is sent as N binary bytes 0, 1, 2, ..., 255, 0, 1, .... Prints each
message received on its own line (binary as `<binary N bytes sha256 HEX>`),
closes with 1000 after one reply per message sent, and prints how the
connection closed: `closed CODE REASON`. A text message starting with "* "
is a chat server's notice (its "* you are NAME", joins and leaves): printed,
but not a reply. With `--ca FILE` (for a wss:// URL) it trusts that CA's
certificates, and only those.

    python3 interop/ws_client.py ws://127.0.0.1:8080/ hello binary:256
    python3 interop/ws_client.py wss://127.0.0.1:8443/ --ca .certs/ca.pem hello
"""

import asyncio
import hashlib
import re
import ssl
import sys

import websockets


def payload(message):
    size = re.fullmatch(r"binary:(\d+)", message)
    return bytes(i % 256 for i in range(int(size[1]))) if size else message


def describe(data):
    # websockets gives text frames as str and binary frames as bytes.
    if isinstance(data, str):
        return data
    return f"<binary {len(data)} bytes sha256 {hashlib.sha256(data).hexdigest()}>"


async def main(url, messages, ca):
    # websockets takes a wss:// URL's TLS settings as an ssl.SSLContext. An
    # explicit ssl=None would turn TLS off (websockets 10 only fills in a
    # default for a missing argument), so without --ca there is none at all.
    options = {"ssl": ssl.create_default_context(cafile=ca)} if ca else {}
    async with websockets.connect(url, **options) as socket:
        for message in messages:
            await socket.send(payload(message))
        try:
            replies = 0
            while replies < len(messages):
                data = await socket.recv()
                print(describe(data), flush=True)
                if not (isinstance(data, str) and data.startswith("* ")):
                    replies += 1
        except websockets.ConnectionClosed:
            pass  # the server closed first; its code is printed below
        # Leaving the block runs the close handshake with 1000.
    print(f"closed {socket.close_code} {socket.close_reason}".rstrip(), flush=True)


def split_ca(args):
    if "--ca" not in args:
        return args, None
    at = args.index("--ca")
    return args[:at] + args[at + 2 :], args[at + 1]


messages, ca = split_ca(sys.argv[2:])
asyncio.run(main(sys.argv[1], messages, ca))
