"""A WSGI app that records each request it runs: the path of every request
to /run/ID is appended to the file named by RECORD_FILE, and answered 200
`ran`. For the tests of lost replies with the Python dispatcher
(tests/it/lost_replies.rs). Standard library only."""

import os


def app(environ, start_response):
    path = environ.get("PATH_INFO", "")
    if path.startswith("/run/"):
        with open(os.environ["RECORD_FILE"], "a", encoding="utf-8") as f:
            f.write(path[len("/run/"):] + "\n")
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ran\n"]
