#!/usr/bin/env python3
"""A floating address for the MySQL role-swap test: a TCP forwarder on a
fixed port that sends each new connection to the server named in a file,
as a virtual IP moved between database hosts would. Standard library only.

Usage: floating_address.py LISTEN_PORT TARGET_FILE

TARGET_FILE holds `HOST:PORT` (the server that has the address now), or
nothing (the address is on no server: new connections are refused, closed
at once). It is read for every new connection, so moving the address is
writing the file; connections already open stay with their server, as TCP
connections to a moved address would until they break.
"""

import asyncio
import sys

LISTEN_PORT = int(sys.argv[1])
TARGET_FILE = sys.argv[2]


def target():
    try:
        with open(TARGET_FILE, encoding="utf-8") as f:
            text = f.read().strip()
    except OSError:
        return None
    if not text:
        return None
    host, _, port = text.rpartition(":")
    return host, int(port)


async def pipe(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        writer.close()


async def handle(client_reader, client_writer):
    where = target()
    if where is None:
        client_writer.close()
        return
    try:
        server_reader, server_writer = await asyncio.open_connection(*where)
    except OSError:
        client_writer.close()
        return
    await asyncio.gather(
        pipe(client_reader, server_writer), pipe(server_reader, client_writer)
    )


async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", LISTEN_PORT)
    async with server:
        await server.serve_forever()


asyncio.run(main())
