"""ASGI (version 3.0, HTTP and lifespan): a queued request as a ``scope``
and its messages, the app's ``send`` calls as a response.

The app runs on one asyncio event loop in a thread of its own; the
dispatcher's worker threads hand it requests and wait for the answers, so
the pulling, pausing, deadlines and stopping are the WSGI server's, one
implementation (dispatcher.py).
"""
import asyncio
import logging
import threading
from urllib.parse import unquote

log = logging.getLogger("anteroom")

_ASGI = {"version": "3.0", "spec_version": "2.3"}


def scope(request):
    """The HTTP connection scope of ``request`` (a protocol.Request)."""
    path, _, query = request.uri.partition("?")
    host = next((v.decode("latin-1") for n, v in request.headers if n == "host"), "localhost")
    name, _, port = host.rpartition(":") if host.rsplit(":", 1)[-1].isdigit() else (host, "", "")
    proto = next((v.decode("latin-1") for n, v in request.headers if n == "x-forwarded-proto"), "http")
    client_host, _, client_port = (request.client_addr or "").rpartition(":")
    return {
        "type": "http",
        "asgi": _ASGI,
        "http_version": request.version[5:] if request.version.startswith("HTTP/1") else "1.1",
        "method": request.method,
        "scheme": "https" if proto == "https" else "http",
        "path": unquote(path, encoding="utf-8", errors="surrogateescape"),
        "raw_path": path.encode("latin-1", errors="replace"),
        "query_string": query.encode("latin-1", errors="replace"),
        "root_path": "",
        "headers": [(n.encode("latin-1"), v) for n, v in request.headers],
        "client": (client_host.strip("[]"), int(client_port)) if client_port.isdigit() else None,
        "server": (name or host, int(port) if port else (443 if proto == "https" else 80)),
    }


async def call(app, request):
    """Runs the ASGI ``app`` on ``request``: ``(status, headers, body)``."""
    sent_body = False
    done = asyncio.Event()
    response = {"status": None, "headers": [], "chunks": []}

    async def receive():
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await done.wait()  # nothing more comes; the client is "gone" once answered
        return {"type": "http.disconnect"}

    async def send(message):
        kind = message["type"]
        if kind == "http.response.start":
            response["status"] = int(message["status"])
            response["headers"] = [(bytes(n).decode("latin-1").lower(), bytes(v))
                                   for n, v in message.get("headers", [])]
        elif kind == "http.response.body":
            if response["status"] is None:
                raise RuntimeError("http.response.body before http.response.start")
            response["chunks"].append(bytes(message.get("body", b"")))
            if not message.get("more_body", False):
                done.set()

    try:
        await app(scope(request), receive, send)
    finally:
        done.set()
    if response["status"] is None:
        raise RuntimeError("the ASGI app returned without starting a response")
    return response["status"], response["headers"], b"".join(response["chunks"])


class Bridge:
    """An event loop in a thread of its own running ``app``: lifespan
    startup on :meth:`start`, shutdown on :meth:`close`, and
    :meth:`__call__` for the dispatcher's worker threads."""

    def __init__(self, app):
        self.app = app
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="anteroom-asgi", daemon=True)
        self.lifespan = None
        self.shutdown_done = None

    def start(self):
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._startup(), self.loop).result()

    def __call__(self, request):
        return asyncio.run_coroutine_threadsafe(call(self.app, request), self.loop).result()

    def close(self, timeout=10):
        if self.lifespan is not None:
            try:
                asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop).result(timeout)
            except Exception as err:  # noqa: BLE001 - stopping goes on regardless
                log.warning("ASGI lifespan shutdown failed: %s", err)
        self.loop.call_soon_threadsafe(self.loop.stop)

    async def _startup(self):
        """Lifespan startup (ASGI lifespan spec); an app that does not
        speak lifespan (it raises, or returns) is served without it."""
        inbox = asyncio.Queue()
        started = asyncio.get_running_loop().create_future()
        finished = asyncio.get_running_loop().create_future()

        async def receive():
            return await inbox.get()

        async def send(message):
            kind = message["type"]
            if kind == "lifespan.startup.complete" and not started.done():
                started.set_result(True)
            elif kind == "lifespan.startup.failed" and not started.done():
                started.set_exception(RuntimeError(message.get("message", "lifespan startup failed")))
            elif kind in ("lifespan.shutdown.complete", "lifespan.shutdown.failed") and not finished.done():
                finished.set_result(True)

        async def run():
            try:
                await self.app({"type": "lifespan", "asgi": _ASGI}, receive, send)
            except Exception as err:  # noqa: BLE001 - no lifespan support
                log.debug("the app does not run lifespan: %s", err)
            for future in (started, finished):
                if not future.done():
                    future.set_result(False)

        task = asyncio.get_running_loop().create_task(run())
        await inbox.put({"type": "lifespan.startup"})
        if await started:
            self.lifespan = (inbox, finished, task)

    async def _shutdown(self):
        inbox, finished, task = self.lifespan
        await inbox.put({"type": "lifespan.shutdown"})
        await finished
        await task
