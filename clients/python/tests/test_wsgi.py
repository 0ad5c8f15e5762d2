"""The WSGI translation (PEP 3333), on requests as the protocol carries them."""
from anteroom import protocol, wsgi


def request(uri="/a%20b/c?x=1&y=2", headers=(), body=b"", method="POST"):
    meta = {"id": "r1", "method": method, "uri": uri, "version": "HTTP/1.1",
            "headers": [[n, v.decode("latin-1")] for n, v in headers],
            "reply_to": "anteroom:{q}:replies:p1", "client_addr": "192.0.2.7:4000",
            "enqueued_at_ms": 1, "deadline_ms": 2, "body_len": len(body)}
    raw = protocol.encode("Q", {k: v for k, v in meta.items() if k != "body_len"}, body)
    kind, decoded, decoded_body = protocol.decode(raw)
    assert kind == "Q"
    return protocol.Request(decoded, decoded_body)


def test_environ_follows_pep_3333():
    env = wsgi.environ(request(headers=[("host", b"example.com:8080"), ("content-type", b"text/plain"),
                                        ("x-test", b"caf\xe9"), ("x-test", b"two"),
                                        ("cookie", b"a=1"), ("cookie", b"b=2")], body=b"hi"))
    assert env["REQUEST_METHOD"] == "POST"
    assert env["PATH_INFO"] == "/a b/c"
    assert env["QUERY_STRING"] == "x=1&y=2"
    assert (env["SERVER_NAME"], env["SERVER_PORT"]) == ("example.com", "8080")
    assert env["CONTENT_TYPE"] == "text/plain"
    assert env["CONTENT_LENGTH"] == "2"
    assert env["HTTP_X_TEST"] == "caf\xe9,two"
    assert env["HTTP_COOKIE"] == "a=1; b=2"
    assert env["REMOTE_ADDR"] == "192.0.2.7"
    assert env["wsgi.input"].read() == b"hi"


def test_header_names_with_underscores_are_dropped():
    env = wsgi.environ(request(headers=[("x_forwarded_host", b"evil"), ("x-forwarded-host", b"good")]))
    assert env["HTTP_X_FORWARDED_HOST"] == "good"


def test_call_collects_status_headers_and_body_and_closes():
    closed = []

    class Body(list):
        def close(self):
            closed.append(True)

    def app(environ, start_response):
        start_response("418 I'm a teapot", [("X-Latin", "caf\xe9")])
        return Body([b"a", b"", b"b"])

    status, headers, body = wsgi.call(app, request())
    assert (status, headers, body) == (418, [("x-latin", b"caf\xe9")], b"ab")
    assert closed == [True]


def test_frames_that_are_not_requests_do_not_decode():
    for raw in [b"", b"\x03Q\x00\x00\x00\x00", b"\x01Q\x00\x00\x00\x09{\"a\":1}", b"\x01Q\x00\x00\x00\x02[]"]:
        try:
            kind, meta, body = protocol.decode(raw)
            protocol.Request(meta, body)
        except protocol.DecodeError:
            continue
        raise AssertionError(f"{raw!r} decoded")


def test_only_this_queues_reply_lists_are_written_to():
    keys = protocol.Keys("web")
    assert keys.is_replies("anteroom:{web}:replies:p1")
    for key in ["anteroom:{other}:replies:p1", "anteroom:{web}:replies:", "anteroom:{web}:replies:a b",
                "anteroom:{web}:requests", "session:1"]:
        assert not keys.is_replies(key), key


def test_a_generator_app_streams_and_is_closed_at_the_end():
    closed = []

    def app(environ, start_response):
        def body():
            try:
                start_response("200 OK", [("content-type", "text/plain")])
                yield b"one "
                yield b""
                yield b"two"
            finally:
                closed.append(True)
        return body()

    status, headers, body = wsgi.call(app, request())
    assert status == 200 and not isinstance(body, bytes)
    assert b"".join(body) == b"one two"
    body.close()
    assert closed == [True]


def test_frames_without_a_body_carry_no_body_len():
    # A proxy's credit, as the Rust proxy encodes it: no body_len.
    meta = b'{"id":"r1","consumed":5}'
    raw = b"\x01A" + len(meta).to_bytes(4, "big") + meta
    kind, decoded, body = protocol.decode(raw)
    assert (kind, decoded["consumed"], body) == ("A", 5, b"")
    try:
        protocol.decode(raw + b"x")
    except protocol.DecodeError:
        pass
    else:
        raise AssertionError("a body no body_len accounts for decoded")


def test_an_iterable_whose_first_piece_is_its_declared_length_goes_whole():
    closed = []

    class Body:
        def __iter__(self):
            yield b"hello"
            raise AssertionError("read past the declared length")

        def close(self):
            closed.append(True)

    def app(environ, start_response):
        start_response("200 OK", [("Content-Length", "5")])
        return Body()

    status, headers, body = wsgi.call(app, request())
    assert (status, body, closed) == (200, b"hello", [True])

    def short(environ, start_response):
        start_response("200 OK", [("Content-Length", "10")])
        return iter([b"hello", b"world"])

    assert not isinstance(wsgi.call(short, request())[2], bytes), "more to come: streamed"
