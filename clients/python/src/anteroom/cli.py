"""``anteroom-wsgi MODULE:APP`` and ``anteroom-asgi MODULE:APP``: serve a
WSGI or ASGI app from an Anteroom queue."""
import argparse
import importlib
import logging
import os
import re
import sys

from . import asgi, wsgi
from .aio import AsyncDispatcher
from .dispatcher import Dispatcher

_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}


def duration(text):
    """``"3s"``, ``"500ms"``, ``"1m"`` or plain seconds, as float seconds."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*(ms|s|m|h)?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 3s, 500ms, 1m)")
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]


def load(target):
    """The object named by ``MODULE:ATTR`` (the current directory on the path)."""
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise SystemExit(f"anteroom-wsgi: {target!r} is not MODULE:APP")
    sys.path.insert(0, os.getcwd())
    obj = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def parser(what):
    p = argparse.ArgumentParser(prog=f"anteroom-{what}",
                                description=f"Serve a {what.upper()} app from an Anteroom queue in Redis.")
    p.add_argument("--redis", default=os.environ.get("ANTEROOM_REDIS", "redis://127.0.0.1:6379"),
                   help="Redis URL (env ANTEROOM_REDIS; default redis://127.0.0.1:6379)")
    p.add_argument("--queue", default=os.environ.get("ANTEROOM_QUEUE", "default"),
                   help="queue name (env ANTEROOM_QUEUE; default 'default')")
    p.add_argument("--threads", type=int, default=int(os.environ.get("ANTEROOM_THREADS", "8")),
                   help="requests run at once (WSGI: each in a thread; ASGI: on one event loop) "
                        "(env ANTEROOM_THREADS; default 8)")
    p.add_argument("--heartbeat-ttl", type=duration, default=duration(os.environ.get("ANTEROOM_HEARTBEAT_TTL", "10s")),
                   help="heartbeat lifetime: silent this long, this dispatcher counts as dead (default 10s)")
    p.add_argument("--grace", type=duration, default=duration(os.environ.get("ANTEROOM_GRACE", "30s")),
                   help="on SIGTERM or SIGINT, how long requests in hand may finish (default 30s)")
    p.add_argument("app", metavar="MODULE:APP", help="the app, e.g. myproject.wsgi:application")
    return p


def wsgi_main(argv=None):
    args = parser("wsgi").parse_args(argv)
    logging.basicConfig(level=os.environ.get("ANTEROOM_LOG", "INFO").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = load(args.app)
    dispatcher = Dispatcher(lambda request: wsgi.call(app, request), args.redis, args.queue,
                            threads=args.threads, heartbeat_ttl=args.heartbeat_ttl, grace=args.grace,
                            label="wsgi")
    dispatcher.run()
    _exit()


def asgi_main(argv=None):
    args = parser("asgi").parse_args(argv)
    logging.basicConfig(level=os.environ.get("ANTEROOM_LOG", "INFO").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = asgi.App(load(args.app))
    dispatcher = AsyncDispatcher(app, args.redis, args.queue, startup=app.startup, shutdown=app.shutdown,
                                 threads=args.threads, heartbeat_ttl=args.heartbeat_ttl, grace=args.grace,
                                 label="asgi")
    dispatcher.run()
    _exit()


def _exit():
    """Exits now: a handler still running past the grace period (its
    request left to the reaper) must not keep the process alive, as the
    worker threads would at interpreter exit."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
