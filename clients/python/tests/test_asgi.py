"""The ASGI translation (HTTP scope, messages, lifespan)."""
import asyncio

from anteroom import asgi
from test_wsgi import request


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

    bridge = asgi.Bridge(app)
    bridge.start()
    assert bridge(request(body=b"whole")) == (201, [("x-a", b"caf\xe9")], b"all of it")
    status, headers, body = bridge(request(body=b"it"))
    assert (status, headers) == (201, [("x-a", b"caf\xe9")])
    assert not isinstance(body, bytes)
    assert b"".join(body) == b"got it"
    bridge.close()


def test_an_app_that_fails_mid_body_breaks_the_stream():
    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            raise RuntimeError("no lifespan here")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"part", "more_body": True})
        raise ValueError("the app broke")

    bridge = asgi.Bridge(app)
    bridge.start()
    _, _, body = bridge(request())
    pieces = iter(body)
    assert next(pieces) == b"part"
    try:
        next(pieces)
    except ValueError as err:
        assert "broke" in str(err)
    else:
        raise AssertionError("the stream ended cleanly")
    bridge.close()


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

    bridge = asgi.Bridge(app)
    bridge.start()
    assert bridge(request())[2] == b"ok"
    bridge.close()
    assert events == ["lifespan.startup", "lifespan.shutdown"]

    async def plain(scope, receive, send):
        assert scope["type"] == "http", "no lifespan support"
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"plain"})

    bridge = asgi.Bridge(plain)
    bridge.start()
    assert bridge(request())[2] == b"plain"
    bridge.close()
