"""ASGI (version 3.0, HTTP and lifespan): a queued request as a ``scope``
and its messages, the app's ``send`` calls as a response.

The app runs on one asyncio event loop in a thread of its own; the
dispatcher's worker threads hand it requests and wait for the answers, so
the pulling, pausing, deadlines and stopping are the WSGI server's, one
implementation (dispatcher.py).
"""
import asyncio
import logging
import queue
import threading
import time
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


async def _pipe_call(app, request, pipe):
    """Runs ``app`` on ``request``, putting on ``pipe`` (a thread-safe
    queue) ``("start", status, headers)``, then ``("more", data)`` pieces
    and ``("end", data)``, or ``("error", exception)``."""
    put = lambda item: asyncio.to_thread(pipe.put, item)  # noqa: E731 - waits while the reader is behind
    state = {"started": False, "ended": False}
    done = asyncio.Event()
    sent_body = False

    async def receive():
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        kind = message["type"]
        if kind == "http.response.start" and not state["started"]:
            state["started"] = True
            headers = [(bytes(n).decode("latin-1").lower(), bytes(v)) for n, v in message.get("headers", [])]
            await put(("start", int(message["status"]), headers))
        elif kind == "http.response.body" and state["started"] and not state["ended"]:
            more = bool(message.get("more_body", False))
            if not more:
                state["ended"] = True
            await put(("more" if more else "end", bytes(message.get("body", b""))))
            if not more:
                # Only once the end is handed over: an app that listens for
                # the disconnect (Starlette's StreamingResponse) may cancel
                # its own sending as soon as it hears it.
                done.set()

    try:
        await app(scope(request), receive, send)
        if not state["started"]:
            await put(("error", RuntimeError("the ASGI app returned without starting a response")))
        elif not state["ended"]:
            state["ended"] = True
            await put(("end", b""))
    except asyncio.CancelledError:
        raise
    except Exception as err:  # noqa: BLE001 - handed to the dispatcher: 502, or an aborted stream
        state["ended"] = True
        await put(("error", err))
    finally:
        done.set()
        if not state["ended"]:
            # Cancelled mid-response: the reader must not wait forever.
            try:
                pipe.put_nowait(("error", RuntimeError("the ASGI app stopped mid-response")))
            except queue.Full:
                pass


async def _settle(timeout=1.0):
    """Waits, at most ``timeout``, for the loop's other tasks to end."""
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    if tasks:
        await asyncio.wait(tasks, timeout=timeout)


class _Stream:
    """An ASGI response body, read as the app sends it."""

    def __init__(self, pipe, first, future):
        self.pipe, self.first, self.future, self.finished = pipe, first, future, False

    def __iter__(self):
        if self.first:
            yield self.first
        while True:
            kind, value = self.pipe.get()[:2]
            if kind == "error":
                self.finished = True
                raise value
            if value:
                yield value
            if kind == "end":
                self.finished = True
                return

    def close(self):
        if self.finished:
            return
        # The client is gone or the stream broke: stop the app, and let a
        # put it is blocked in go through.
        self.future.cancel()
        until = time.monotonic() + 1
        while not self.future.done() and time.monotonic() < until:
            try:
                self.pipe.get_nowait()
            except queue.Empty:
                time.sleep(0.01)


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
        """``(status, headers, body)``: body is bytes when the app sent it
        in one message, otherwise an iterator over its messages as the app
        sends them (16 ahead at most: a slow reader slows the app)."""
        pipe = queue.Queue(maxsize=16)
        future = asyncio.run_coroutine_threadsafe(_pipe_call(self.app, request, pipe), self.loop)
        head = pipe.get()
        if head[0] == "error":
            raise head[1]
        _, status, headers = head
        first = pipe.get()
        if first[0] == "error":
            raise first[1]
        if first[0] == "end":
            return status, headers, first[1]
        return status, headers, _Stream(pipe, first[1], future)

    def close(self, timeout=10):
        if self.lifespan is not None:
            try:
                asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop).result(timeout)
            except Exception as err:  # noqa: BLE001 - stopping goes on regardless
                log.warning("ASGI lifespan shutdown failed: %s", err)
        # Requests still finishing (their last piece handed over) end first.
        try:
            asyncio.run_coroutine_threadsafe(_settle(), self.loop).result(timeout)
        except Exception:  # noqa: BLE001 - stopping goes on regardless
            pass
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
