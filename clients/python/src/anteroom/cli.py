"""``anteroom-wsgi MODULE:APP`` and ``anteroom-asgi MODULE:APP``: serve a
WSGI or ASGI app from an Anteroom queue."""
import argparse
import importlib
import inspect
import logging
import os
import re
import sys

import redis

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


def load(target, prog):
    """The object named by ``MODULE:ATTR``, imported with the current
    directory on the path; exits with a one-line error (status 2) when it
    cannot be found."""
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        _fail(prog, f"{target!r} is not MODULE:APP (e.g. main:app)")
    sys.path.insert(0, os.getcwd())
    try:
        obj = importlib.import_module(module_name)
    except ImportError as err:
        _fail(prog, f"cannot import {module_name!r} from {os.getcwd()}: {err}")
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            _fail(prog, f"{module_name!r} has no {attr!r}")
    return obj


def _fail(prog, message, status=2):
    print(f"{prog}: {message}", file=sys.stderr)
    raise SystemExit(status)


def _is_asgi(app):
    """Whether ``app`` looks like an ASGI 3 application: a coroutine
    function, or an object whose ``__call__`` is one (FastAPI, Starlette)."""
    call = app if inspect.isfunction(app) or inspect.ismethod(app) else getattr(app, "__call__", None)
    return inspect.iscoroutinefunction(call) or inspect.iscoroutinefunction(app)


_EXAMPLES = {"wsgi": "myproject.wsgi:application, or app:app for Flask",
             "asgi": "main:app for FastAPI or Starlette"}


def parser(what):
    # Defaults from the environment go through ``type`` as strings, so a
    # bad value is a usage error, not a traceback.
    p = argparse.ArgumentParser(prog=f"anteroom-{what}",
                                description=f"Serve an {what.upper()} app from an Anteroom queue in Redis.")
    p.add_argument("--redis", default=os.environ.get("ANTEROOM_REDIS", "redis://127.0.0.1:6379"),
                   help="Redis URL (env ANTEROOM_REDIS; default redis://127.0.0.1:6379)")
    p.add_argument("--queue", default=os.environ.get("ANTEROOM_QUEUE", "default"),
                   help="queue name (env ANTEROOM_QUEUE; default 'default')")
    p.add_argument("--threads", type=int, default=os.environ.get("ANTEROOM_THREADS", "8"),
                   help="requests run at once (WSGI: each in a thread; ASGI: on one event loop) "
                        "(env ANTEROOM_THREADS; default 8)")
    p.add_argument("--heartbeat-ttl", type=duration, default=os.environ.get("ANTEROOM_HEARTBEAT_TTL", "10s"),
                   help="heartbeat lifetime: silent this long, this dispatcher counts as dead "
                        "(env ANTEROOM_HEARTBEAT_TTL; default 10s)")
    p.add_argument("--grace", type=duration, default=os.environ.get("ANTEROOM_GRACE", "30s"),
                   help="on SIGTERM or SIGINT, how long requests in hand may finish; what still runs "
                        "then is left to the reaper of another dispatcher (env ANTEROOM_GRACE; default 30s)")
    p.add_argument("app", metavar="MODULE:APP",
                   help=f"the app, imported from the current directory: {_EXAMPLES[what]} "
                        "(log level: env ANTEROOM_LOG, default INFO)")
    return p


def _serve(prog, dispatcher, redis_url):
    """Runs ``dispatcher``; a Redis it cannot reach is a one-line error
    (status 1), then the process exits (see _exit)."""
    try:
        dispatcher.run()
    except redis.RedisError as err:
        print(f"{prog}: Redis at {redis_url}: {err}", file=sys.stderr)
        _exit(1)
    _exit()


def wsgi_main(argv=None):
    args = parser("wsgi").parse_args(argv)
    logging.basicConfig(level=os.environ.get("ANTEROOM_LOG", "INFO").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = load(args.app, "anteroom-wsgi")
    if not callable(app):
        _fail("anteroom-wsgi", f"{args.app} is not a WSGI app (not callable)")
    dispatcher = Dispatcher(lambda request: wsgi.call(app, request), args.redis, args.queue,
                            threads=args.threads, heartbeat_ttl=args.heartbeat_ttl, grace=args.grace,
                            label="wsgi")
    _serve("anteroom-wsgi", dispatcher, args.redis)


def asgi_main(argv=None):
    args = parser("asgi").parse_args(argv)
    logging.basicConfig(level=os.environ.get("ANTEROOM_LOG", "INFO").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    target = load(args.app, "anteroom-asgi")
    if not callable(target):
        _fail("anteroom-asgi", f"{args.app} is not an ASGI app (not callable)")
    if not _is_asgi(target):
        # A sync __call__ may still return a coroutine (some middleware does).
        logging.getLogger("anteroom").warning(
            "%s does not look like an ASGI app (an async callable taking scope, receive, send)", args.app)
    app = asgi.App(target)
    dispatcher = AsyncDispatcher(app, args.redis, args.queue, startup=app.startup, shutdown=app.shutdown,
                                 threads=args.threads, heartbeat_ttl=args.heartbeat_ttl, grace=args.grace,
                                 label="asgi")
    _serve("anteroom-asgi", dispatcher, args.redis)


def _exit(status=0):
    """Exits now: a handler still running past the grace period (its
    request left to the reaper) must not keep the process alive, as the
    worker threads would at interpreter exit."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
