#!/usr/bin/env python3
"""An app that keeps a ledger of every execution, run as a real process
behind `anteroom dispatch` by the chaos soak (`anteroom-bench --scenario
chaos`, crates/anteroom-bench/src/chaos.rs). Standard library only.

Usage: ledger_app.py PORT LEDGER_FILE

Every request carries `X-Chaos-Id: ID` (unique per client request). Each
execution appends one line to LEDGER_FILE before it does anything else, and
the file survives restarts (opened for appending at each start):

    run ID METHOD START_MS          every execution, repeats included
    effect KEY                      a POST carried out (see below)

START_MS is the Unix time in milliseconds when the app began it.

- GET /item: answers 200 with the body `item ID`.
- GET /stream: a streamed (chunked) response of 8 chunks of 8 KiB, 20 ms
  apart: 65,536 bytes of `ID` repeated.
- POST /order: with an `Idempotency-Key`, carries the key out once (written
  as `effect KEY`; read again at start, as a database would remember it)
  and answers 201, or 200 for a key already carried out; without one,
  every POST is carried out (`effect ID`) and answered 201. The body is
  read whole and its length echoed as `X-Body-Length`.

SIGTERM stops as an app server stops for a deploy: no new connections, the
requests in progress finish (at most 10 s), then the process exits. HTTP/1.1
keep-alive, as a real app server.
"""

import contextlib
import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PORT = int(sys.argv[1])
LEDGER = sys.argv[2]

lock = threading.Lock()
done = set()
if os.path.exists(LEDGER):
    with open(LEDGER, encoding="utf-8") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 2 and parts[0] == "effect":
                done.add(parts[1])
ledger = open(LEDGER, "a", encoding="utf-8", buffering=1)
active = 0
stopping = threading.Event()


@contextlib.contextmanager
def counted():
    """A request in progress, which a stop waits for."""
    global active
    with lock:
        active += 1
    try:
        yield
    finally:
        with lock:
            active -= 1


def write(line):
    with lock:
        ledger.write(line + "\n")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # An idle keep-alive connection is closed after this long.
    timeout = 30

    def log_message(self, *args):
        pass

    def handle_one_request(self):
        super().handle_one_request()
        if stopping.is_set():
            self.close_connection = True

    def answer(self, status, body, extra=()):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        for name, value in extra:
            self.send_header(name, value)
        if stopping.is_set():
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def started(self):
        ident = self.headers.get("X-Chaos-Id", "-")
        write(f"run {ident} {self.command} {int(time.time() * 1000)}")
        return ident

    def do_GET(self):
        with counted():
            self.get()

    def do_POST(self):
        with counted():
            self.post()

    def get(self):
        ident = self.started()
        if self.path.startswith("/stream"):
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            chunk = (ident.encode() * (8192 // max(len(ident), 1) + 1))[:8192]
            for _ in range(8):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.flush()
                time.sleep(0.02)
            self.wfile.write(b"0\r\n\r\n")
            return
        self.answer(200, f"item {ident}".encode())

    def post(self):
        ident = self.started()
        length = int(self.headers.get("Content-Length") or 0)
        received = len(self.rfile.read(length))
        key = self.headers.get("Idempotency-Key")
        status = 201
        with lock:
            if key is not None and key in done:
                status = 200
            else:
                effect = key if key is not None else ident
                done.add(effect)
                ledger.write(f"effect {effect}\n")
        self.answer(status, f"order {ident}".encode(), [("X-Body-Length", str(received))])


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128
    allow_reuse_address = True


server = Server(("127.0.0.1", PORT), Handler)


def stop(*_):
    stopping.set()
    threading.Thread(target=server.shutdown, daemon=True).start()


signal.signal(signal.SIGTERM, stop)
server.serve_forever()
server.socket.close()
deadline = time.monotonic() + 10
while time.monotonic() < deadline:
    with lock:
        if active == 0:
            break
    time.sleep(0.01)
ledger.flush()
os._exit(0)
