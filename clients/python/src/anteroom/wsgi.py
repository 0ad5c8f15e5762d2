"""WSGI (PEP 3333): a queued request as an ``environ``, the app's answer
as a response."""
import io
import sys
from urllib.parse import unquote_to_bytes

# Fields that are not HTTP_* variables (PEP 3333, CGI).
_SPECIAL = {"content-type": "CONTENT_TYPE", "content-length": "CONTENT_LENGTH"}


def environ(request):
    """The WSGI environ of ``request`` (a protocol.Request)."""
    path, _, query = request.uri.partition("?")
    host = next((v.decode("latin-1") for n, v in request.headers if n == "host"), "localhost")
    name, _, port = host.rpartition(":") if host.rsplit(":", 1)[-1].isdigit() else (host, "", "")
    client_host, _, client_port = (request.client_addr or "").rpartition(":")
    proto = next((v.decode("latin-1") for n, v in request.headers if n == "x-forwarded-proto"), "http")
    env = {
        "REQUEST_METHOD": request.method,
        "SCRIPT_NAME": "",
        # PEP 3333: the path, percent-decoded, as ISO-8859-1 code points.
        "PATH_INFO": unquote_to_bytes(path).decode("latin-1"),
        "QUERY_STRING": query,
        "SERVER_NAME": name or host,
        "SERVER_PORT": port or ("443" if proto == "https" else "80"),
        "SERVER_PROTOCOL": request.version if request.version.startswith("HTTP/1") else "HTTP/1.1",
        "REMOTE_ADDR": client_host.strip("[]"),
        "REMOTE_PORT": client_port,
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "https" if proto == "https" else "http",
        "wsgi.input": io.BytesIO(request.body),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    if "CONTENT_LENGTH" not in env and request.body:
        env["CONTENT_LENGTH"] = str(len(request.body))
    for name, value in request.headers:
        if "_" in name:
            # It would pass for the dashed name (X_Forwarded_For as
            # X-Forwarded-For, which the proxy strips): dropped, as
            # gunicorn and nginx do.
            continue
        text = value.decode("latin-1")
        key = _SPECIAL.get(name) or "HTTP_" + name.upper().replace("-", "_")
        if key in env and key.startswith("HTTP_"):
            # RFC 9110 section 5.3: repeated fields are one, comma-joined
            # (cookies with "; ", RFC 6265 section 5.4).
            env[key] += ("; " if name == "cookie" else ",") + text
        else:
            env[key] = text
    return env


def call(app, request):
    """Runs the WSGI ``app`` on ``request``: ``(status, headers, body)``
    with header values as bytes. The body is bytes when the app answered
    with a list or tuple (all there at once), and otherwise an iterator
    that runs the app's iterable as it is read (so it can be streamed), and
    closes it at the end (PEP 3333)."""
    started = {"written": []}

    def start_response(status, headers, exc_info=None):
        if exc_info and started.get("sent"):
            raise exc_info[1].with_traceback(exc_info[2])
        started["status"] = int(status.split(" ", 1)[0])
        started["headers"] = [(str(n).lower(), str(v).encode("latin-1")) for n, v in headers]
        return started["written"].append

    result = app(environ(request), start_response)
    if isinstance(result, (list, tuple)):
        try:
            chunks = started["written"] + [bytes(c) for c in result]
        finally:
            _close(result)
        if "status" not in started:
            raise RuntimeError("the WSGI app did not call start_response")
        return started["status"], started["headers"], b"".join(chunks)
    # An iterable: start_response may come with its first item (PEP 3333).
    iterator = iter(result)
    first = None
    try:
        for item in iterator:
            if item:
                first = bytes(item)
                break
            if "status" in started:
                break
    except BaseException:
        _close(result)
        raise
    if "status" not in started:
        _close(result)
        raise RuntimeError("the WSGI app did not call start_response")
    if _complete(started, first):
        # The first piece is the whole declared body (Flask's and Django's
        # ordinary responses): answered whole, not streamed.
        _close(result)
        return started["status"], started["headers"], b"".join(started["written"] + [first or b""])
    started["sent"] = True
    return started["status"], started["headers"], _Body(result, iterator, started["written"], first)


def _complete(started, first):
    """Whether what the app has given so far is all of its declared
    ``Content-Length``."""
    length = next((v for n, v in started["headers"] if n == "content-length"), None)
    have = sum(len(w) for w in started["written"]) + len(first or b"")
    try:
        return length is not None and int(length) == have
    except ValueError:
        return False


class _Body:
    """The rest of a WSGI app's iterable, read as the stream goes."""

    def __init__(self, result, iterator, written, first):
        self.result, self.iterator, self.written, self.first = result, iterator, written, first

    def __iter__(self):
        yield from self.written
        if self.first:
            yield self.first
        for item in self.iterator:
            if item:
                yield bytes(item)

    def close(self):
        _close(self.result)


def _close(result):
    """Calls the iterable's ``close`` if it has one (PEP 3333: always,
    once the server is done with it)."""
    close = getattr(result, "close", None)
    if close is not None:
        close()
