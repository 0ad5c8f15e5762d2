"""The conformance kit's reference app as a WSGI app (docs/clients.md):
``anteroom conformance -- anteroom-wsgi conformance_app:app``."""
import os
import time
from urllib.parse import parse_qs


def app(environ, start_response):
    path = environ["PATH_INFO"]
    query = parse_qs(environ["QUERY_STRING"])
    if path == "/echo":
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length)
        target = path + ("?" + environ["QUERY_STRING"] if environ["QUERY_STRING"] else "")
        headers = [("x-method", environ["REQUEST_METHOD"]), ("x-target", target)]
        for key, value in environ.items():
            if key.startswith("HTTP_X_TEST_"):
                name = key[5:].lower().replace("_", "-")
                # WSGI joins repeated fields with commas: split them back.
                headers += [(name, part) for part in value.split(",")]
        start_response("200 OK", headers)
        return [body]
    if path.startswith("/status/"):
        code = int(path.rsplit("/", 1)[1])
        start_response(f"{code} Status", [("x-status", str(code))])
        return [f"status {code}\n".encode()]
    if path.startswith("/touch/"):
        with open(os.environ["ANTEROOM_CONFORMANCE_LOG"], "a") as log:
            log.write(path.rsplit("/", 1)[1] + "\n")
        time.sleep(int(query.get("ms", ["0"])[0]) / 1000)
        start_response("200 OK", [("content-type", "text/plain")])
        return [b"touched\n"]
    if path == "/stream":
        n, ms = int(query.get("n", ["3"])[0]), int(query.get("ms", ["100"])[0])

        def chunks():
            for i in range(n):
                if i:
                    time.sleep(ms / 1000)
                yield f"chunk {i}\n".encode()

        start_response("200 OK", [("content-type", "text/plain")])
        return chunks()
    start_response("404 Not Found", [("content-type", "text/plain")])
    return [b"not found\n"]
