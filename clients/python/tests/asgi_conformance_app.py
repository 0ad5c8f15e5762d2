"""The conformance kit's reference app as an ASGI app (docs/clients.md):
``anteroom conformance -- anteroom-asgi asgi_conformance_app:app``."""
import asyncio
import os
from urllib.parse import parse_qs


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    path = scope["path"]
    query = parse_qs(scope["query_string"].decode("latin-1"))

    async def answer(status, headers, body):
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    if path == "/echo":
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        target = scope["raw_path"] + (b"?" + scope["query_string"] if scope["query_string"] else b"")
        headers = [(b"x-method", scope["method"].encode()), (b"x-target", target)]
        headers += [(n, v) for n, v in scope["headers"] if n.startswith(b"x-test-")]
        await answer(200, headers, body)
    elif path.startswith("/status/"):
        code = int(path.rsplit("/", 1)[1])
        await answer(code, [(b"x-status", str(code).encode())], f"status {code}\n".encode())
    elif path.startswith("/touch/"):
        with open(os.environ["ANTEROOM_CONFORMANCE_LOG"], "a") as log:
            log.write(path.rsplit("/", 1)[1] + "\n")
        await asyncio.sleep(int(query.get("ms", ["0"])[0]) / 1000)
        await answer(200, [(b"content-type", b"text/plain")], b"touched\n")
    elif path == "/stream":
        n, ms = int(query.get("n", ["3"])[0]), int(query.get("ms", ["100"])[0])
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        for i in range(n):
            if i:
                await asyncio.sleep(ms / 1000)
            await send({"type": "http.response.body", "body": f"chunk {i}\n".encode(), "more_body": i < n - 1})
    else:
        await answer(404, [(b"content-type", b"text/plain")], b"not found\n")
