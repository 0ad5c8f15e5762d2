"""The ASGI translation (HTTP scope, messages, lifespan)."""
import asyncio

from anteroom import asgi
from test_wsgi import request


def serve(app, *requests):
    """What aio.AsyncDispatcher does with ``app``: lifespan startup, each
    of ``requests`` on the loop (a streamed body read from a thread),
    shutdown. The answers, each ``(status, headers, body, streamed)``."""

    async def main():
        served = asgi.App(app)
        await served.startup()
        answers = []
        for each in requests:
            status, headers, body = await served(each)
            streamed = not isinstance(body, bytes)
            if streamed:
                body = await asyncio.to_thread(b"".join, body)
            answers.append((status, headers, body, streamed))
        await served.shutdown()
        return answers

    return asyncio.run(main())


def test_scope_follows_the_asgi_http_spec():
    scope = asgi.scope(request(uri="/a%20b?x=1", headers=[("host", b"example.com:8080"), ("x-test", b"caf\xe9")]))
    assert scope["type"] == "http" and scope["asgi"]["version"] == "3.0"
    assert (scope["method"], scope["path"], scope["raw_path"]) == ("POST", "/a b", b"/a%20b")
    assert scope["query_string"] == b"x=1"
    assert scope["headers"] == [(b"host", b"example.com:8080"), (b"x-test", b"caf\xe9")]
    assert scope["server"] == ("example.com", 8080)
    assert scope["client"] == ("192.0.2.7", 4000)


def test_a_response_in_one_message_is_whole_and_one_in_pieces_streams():
    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            raise RuntimeError("no lifespan here")
        body = (await receive())["body"]
        await send({"type": "http.response.start", "status": 201, "headers": [(b"X-A", b"caf\xe9")]})
        if body == b"whole":
            await send({"type": "http.response.body", "body": b"all of it"})
            return
        await send({"type": "http.response.body", "body": b"got ", "more_body": True})
        await send({"type": "http.response.body", "body": body})

    whole, pieces = serve(app, request(body=b"whole"), request(body=b"it"))
    assert whole == (201, [("x-a", b"caf\xe9")], b"all of it", False)
    assert pieces == (201, [("x-a", b"caf\xe9")], b"got it", True)


def test_an_app_that_fails_mid_body_breaks_the_stream():
    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            raise RuntimeError("no lifespan here")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"part", "more_body": True})
        raise ValueError("the app broke")

    async def main():
        _, _, body = await asgi.App(app)(request())
        pieces = iter(body)
        assert await asyncio.to_thread(next, pieces) == b"part"
        try:
            await asyncio.to_thread(next, pieces)
        except ValueError as err:
            assert "broke" in str(err)
        else:
            raise AssertionError("the stream ended cleanly")

    asyncio.run(main())


def test_an_app_that_fails_before_its_response_raises_and_one_that_sends_nothing_too():
    async def broken(scope, receive, send):
        raise KeyError("broken")

    async def silent(scope, receive, send):
        return None

    async def main(app):
        try:
            await asgi.App(app)(request())
        except (KeyError, RuntimeError) as err:
            return err
        raise AssertionError("no failure")

    assert isinstance(asyncio.run(main(broken)), KeyError)
    assert "without starting a response" in str(asyncio.run(main(silent)))


def test_a_stream_closed_early_stops_the_app():
    stopped = []

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        try:
            while True:
                await send({"type": "http.response.body", "body": b"x", "more_body": True})
        except asyncio.CancelledError:
            stopped.append(True)
            raise

    async def main():
        answer = asgi.App(app)
        _, _, body = await answer(request())
        pieces = iter(body)
        assert await asyncio.to_thread(next, pieces) == b"x"
        body.close()
        for _ in range(100):
            if stopped:
                break
            await asyncio.sleep(0.01)
        # Here, not after asyncio.run, which cancels whatever still runs.
        assert stopped == [True]

    asyncio.run(main())


def test_lifespan_runs_startup_and_shutdown_and_apps_without_it_are_served():
    events = []

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                events.append(message["type"])
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    assert serve(app, request())[0][2] == b"ok"
    assert events == ["lifespan.startup", "lifespan.shutdown"]

    async def plain(scope, receive, send):
        assert scope["type"] == "http", "no lifespan support"
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"plain"})

    assert serve(plain, request())[0][2] == b"plain"


def test_work_after_the_response_is_waited_for_by_shutdown():
    """Starlette's background tasks run in the app's call after its
    response: the answer comes at once, the shutdown waits for the rest."""
    finished = []

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            raise RuntimeError("no lifespan here")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})
        await asyncio.sleep(0.2)
        finished.append(True)

    async def main():
        served = asgi.App(app)
        await served.startup()
        assert (await served(request()))[2] == b"done"
        assert finished == []
        await served.shutdown()
        assert finished == [True]

    asyncio.run(main())
