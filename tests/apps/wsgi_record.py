"""A WSGI app that records each request it runs: the path of every request
to /run/ID is appended to the file named by RECORD_FILE, and answered 200
`ran`; with the query `hang=1` it is answered only after 60 s. For the
tests of lost replies and partitions with the Python dispatcher
(tests/it/lost_replies.rs, tests/it/faults.rs). Standard library only."""

import os
import time


def app(environ, start_response):
    path = environ.get("PATH_INFO", "")
    if path.startswith("/run/"):
        with open(os.environ["RECORD_FILE"], "a", encoding="utf-8") as f:
            f.write(path[len("/run/"):] + "\n")
        if "hang=1" in environ.get("QUERY_STRING", "").split("&"):
            time.sleep(60)
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ran\n"]
