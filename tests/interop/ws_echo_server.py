"""ws_echo_server.py: a WebSocket echo server on python-websockets (Debian's python3-websockets).

The peer for ws_client.ts: text comes back as text, binary as binary, and
each close is printed as `closed CODE REASON`, so a test can see the code the
client sent.

    python3 interop/ws_echo_server.py 8080     # 0 = any free port
"""

import asyncio
import sys

import websockets


async def echo(socket):
    # The loop ends when the client's close frame arrives.
    async for message in socket:
        await socket.send(message)
    print(f"closed {socket.close_code} {socket.close_reason}".rstrip(), flush=True)


async def main(port):
    async with websockets.serve(echo, "127.0.0.1", port) as server:
        host, port = server.sockets[0].getsockname()[:2]
        print(f"listening on ws://{host}:{port}/", flush=True)
        await asyncio.Future()  # serve until killed


asyncio.run(main(int(sys.argv[1])))
