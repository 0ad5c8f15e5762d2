#!/usr/bin/env python3
"""A small order-taking app, run as a real process behind `anteroom dispatch`
by the app-restart tests (tests/it/restarts.rs). Standard library only.

Usage: orders_app.py PORT DATA_DIR [--warmup SECONDS]

- POST /orders with an `Idempotency-Key` records the key once in
  DATA_DIR/orders.log (read again at start, so a restarted app remembers what
  it carried out, as a database would) and answers 201; a repeated key
  answers 200 with the original order, carrying nothing out again. Without
  a key, the body is recorded as the order. Every POST that arrives is also
  written to DATA_DIR/arrivals.log before anything else, repeats included.
- GET /health answers 503 for --warmup seconds after start (warming up), then
  200. Any other request that arrives while warming up is also written to
  DATA_DIR/early.log, so a test can show that none arrived.
- Any other GET answers 200 with the path and this process's pid.

Keep-alive (HTTP/1.1) as a real app server; SIGTERM stops at once, SIGKILL
loses nothing written.
"""

import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PORT = int(sys.argv[1])
DATA = sys.argv[2]
WARMUP = float(sys.argv[sys.argv.index("--warmup") + 1]) if "--warmup" in sys.argv else 0.0
STARTED = time.monotonic()
ORDERS = os.path.join(DATA, "orders.log")
EARLY = os.path.join(DATA, "early.log")
ARRIVALS = os.path.join(DATA, "arrivals.log")

lock = threading.Lock()
seen = set()
if os.path.exists(ORDERS):
    with open(ORDERS, encoding="utf-8") as f:
        seen.update(line.rstrip("\n") for line in f)


def warming():
    return time.monotonic() - STARTED < WARMUP


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def answer(self, status, payload):
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def note_early(self):
        if warming():
            with lock, open(EARLY, "a", encoding="utf-8") as f:
                f.write(f"{self.command} {self.path}\n")

    def do_GET(self):
        if self.path == "/health":
            if warming():
                self.answer(503, {"status": "warming up"})
            else:
                self.answer(200, {"status": "ok"})
            return
        self.note_early()
        self.answer(200, {"path": self.path, "pid": os.getpid()})

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode("utf-8", "replace")
        self.note_early()
        key = self.headers.get("Idempotency-Key") or body
        with lock, open(ARRIVALS, "a", encoding="utf-8") as f:
            f.write(key + "\n")
        with lock:
            if key in seen:
                self.answer(200, {"order": key, "repeat": True})
                return
            with open(ORDERS, "a", encoding="utf-8") as f:
                f.write(key + "\n")
                f.flush()
            seen.add(key)
        self.answer(201, {"order": key, "repeat": False})


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128


Server(("127.0.0.1", PORT), Handler).serve_forever()
