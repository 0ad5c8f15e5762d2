"""A WebSocket echo app in a process of its own, for the WebSocket tests.

Serves on 127.0.0.1:PORT (the first argument): every text or binary
message comes back as it came, and `/close/CODE` closes the socket with
CODE after echoing the first message (so its last message and its close
leave one right after the other). Prints "ready" once it listens.
"""
import asyncio
import sys

from websockets.asyncio.server import serve


async def echo(ws):
    path = ws.request.path
    async for message in ws:
        await ws.send(message)
        if path.startswith("/close/"):
            await ws.close(int(path.rsplit("/", 1)[1]), "asked to")
            return


async def main():
    port = int(sys.argv[1])
    async with serve(echo, "127.0.0.1", port, max_size=32 * 1024 * 1024) as server:
        print("ready", flush=True)
        await server.serve_forever()


asyncio.run(main())
