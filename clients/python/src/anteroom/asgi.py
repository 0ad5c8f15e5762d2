"""ASGI (version 3.0, HTTP and lifespan): a queued request as a ``scope``
and its messages, the app's ``send`` calls as a response.

:class:`App` runs the app on the dispatcher's own event loop
(aio.AsyncDispatcher): no thread between a request and the app. A
response sent in one body message is whole; one sent in pieces is read
from a thread (the dispatcher's streaming, paced by the proxy's credits)
through a bounded pipe, so a slow client slows the app.
"""
import asyncio
import collections
import logging
import threading
from urllib.parse import unquote

log = logging.getLogger("anteroom")

_ASGI = {"version": "3.0", "spec_version": "2.3"}
#: Body messages sent by the app and not yet read by the streaming thread.
PIPE_DEPTH = 16


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


class _Pipe:
    """Body messages from the loop (``put``, waits while PIPE_DEPTH are
    unread) to a thread (``get``, blocks): ``("more", data)``,
    ``("end", data)`` or ``("error", exception)``."""

    def __init__(self, loop):
        self.loop = loop
        self.items = collections.deque()
        self.ready = threading.Condition()
        self.room = asyncio.Event()

    async def put(self, item):
        while len(self.items) >= PIPE_DEPTH:
            self.room.clear()
            await self.room.wait()
        self.put_nowait(item)

    def put_nowait(self, item):
        with self.ready:
            self.items.append(item)
            self.ready.notify()

    def get(self):
        with self.ready:
            while not self.items:
                self.ready.wait()
            item = self.items.popleft()
        self.loop.call_soon_threadsafe(self.room.set)
        return item


class _Stream:
    """An ASGI response body in pieces, read (in a thread) as the app
    sends it; ``close`` before its end stops the app."""

    def __init__(self, pipe, first, call):
        #: ``call["task"]`` is the app's call.
        self.pipe, self.first, self.call, self.finished = pipe, first, call, False

    def __iter__(self):
        if self.first:
            yield self.first
        while True:
            kind, value = self.pipe.get()
            if kind == "error":
                self.finished = True
                raise value
            if value:
                yield value
            if kind == "end":
                self.finished = True
                return

    def close(self):
        if not self.finished:
            # The client is gone or the stream broke: stop the app (unless
            # the loop has ended with the grace period).
            try:
                self.pipe.loop.call_soon_threadsafe(self.call["task"].cancel)
            except RuntimeError:
                pass


class App:
    """An ASGI app served by aio.AsyncDispatcher: ``await app(request)``
    is ``(status, [(name, bytes)], body)``, body bytes when the app sent
    it in one message, otherwise an iterator over its pieces (for a
    thread); :meth:`startup` and :meth:`shutdown` run the lifespan
    protocol, for apps that speak it. Raises what the app raised before
    its response began."""

    def __init__(self, app):
        self.app = app
        self.lifespan = None
        #: The app's calls still running: past a response too (Starlette's
        #: background tasks run after it), waited for by :meth:`shutdown`.
        self.running = set()

    async def __call__(self, request):
        loop = asyncio.get_running_loop()
        answer = loop.create_future()
        finished = asyncio.Event()
        state = {"status": None, "headers": None, "pipe": None, "sent_body": False, "ended": False,
                 "task": None}

        async def receive():
            if not state["sent_body"]:
                state["sent_body"] = True
                return {"type": "http.request", "body": request.body, "more_body": False}
            await finished.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            kind = message["type"]
            if kind == "http.response.start" and state["status"] is None:
                state["headers"] = [(bytes(n).decode("latin-1").lower(), bytes(v))
                                    for n, v in message.get("headers", [])]
                state["status"] = int(message["status"])
            elif kind == "http.response.body" and state["status"] is not None and not state["ended"]:
                more = bool(message.get("more_body", False))
                body = bytes(message.get("body", b""))
                state["ended"] = not more
                if state["pipe"] is not None:
                    await state["pipe"].put(("more" if more else "end", body))
                elif more:
                    state["pipe"] = _Pipe(loop)
                    answer.set_result((state["status"], state["headers"], _Stream(state["pipe"], body, state)))
                else:
                    answer.set_result((state["status"], state["headers"], body))
                if not more:
                    # Only once the end is handed over: an app that listens
                    # for the disconnect (Starlette's StreamingResponse) may
                    # cancel its own sending as soon as it hears it.
                    finished.set()

        async def run():
            failure = None
            try:
                await self.app(scope(request), receive, send)
                if state["status"] is None:
                    failure = RuntimeError("the ASGI app returned without starting a response")
                elif not state["ended"]:
                    state["ended"] = True
                    if state["pipe"] is not None:
                        await state["pipe"].put(("end", b""))
                    else:
                        answer.set_result((state["status"], state["headers"], b""))
            except asyncio.CancelledError:
                failure = RuntimeError("the ASGI app was stopped mid-response")
                raise
            except Exception as err:  # noqa: BLE001 - the dispatcher's: 502, or an aborted stream
                failure = err
            finally:
                finished.set()
                if failure is not None and state["ended"]:
                    log.error("the ASGI app failed after its response: %r", failure)
                elif failure is not None:
                    state["ended"] = True
                    if state["pipe"] is not None:
                        # Never waits: the reader must hear of it.
                        state["pipe"].put_nowait(("error", failure))
                    elif not answer.done():
                        answer.set_exception(failure)

        # Not referred to by name inside run(): an eager task factory runs
        # it before create_task returns.
        task = state["task"] = loop.create_task(run())
        self.running.add(task)
        task.add_done_callback(self.running.discard)
        try:
            return await answer
        except asyncio.CancelledError:
            task.cancel()
            raise

    async def startup(self):
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

    async def shutdown(self):
        """Waits for the app's calls still running, then lifespan shutdown
        when startup ran it."""
        if self.running:
            await asyncio.wait(set(self.running))
        if self.lifespan is None:
            return
        inbox, finished, task = self.lifespan
        await inbox.put({"type": "lifespan.shutdown"})
        await finished
        await task
