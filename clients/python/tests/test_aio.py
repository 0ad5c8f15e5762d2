"""The asyncio dispatcher's parts against a real Redis (a private
redis-server on a free port, as the repository's other tests start theirs):
completions that finish together go in one MULTI, a reply list Redis
refuses for good fails alone, and an app still without a response at its
request's deadline is cancelled and the request dropped."""
import asyncio
import shutil
import socket
import subprocess
import time

import redis
import redis.asyncio

from anteroom import aio, asgi, protocol


def start_redis():
    server = shutil.which("redis-server")
    assert server, "redis-server is not on PATH (scripts/test.sh installs it)"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([server, "--port", str(port), "--save", "", "--appendonly", "no"],
                               stdout=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            return process, port
        except redis.ConnectionError:
            time.sleep(0.05)
    process.kill()
    raise AssertionError("redis-server did not start")


def test_completions_batch_and_a_refused_reply_fails_alone():
    process, port = start_redis()
    try:
        sync = redis.Redis(port=port)
        processing = "anteroom:{q}:processing:d1"
        sync.rpush(processing, b"r1", b"r2", b"r3")
        sync.set("anteroom:{q}:replies:bad", "not a list")

        async def main():
            client = redis.asyncio.Redis(port=port)
            completer = aio.Completer(client, processing)
            deadline = protocol.now_ms() + 30_000
            done = await asyncio.gather(
                completer.complete(b"r1", "anteroom:{q}:replies:p1", b"one", deadline),
                completer.complete(b"r2", "anteroom:{q}:replies:bad", b"two", deadline),
                completer.complete(b"r3", "anteroom:{q}:replies:p1", b"three", deadline),
                return_exceptions=True)
            await client.aclose()
            return done

        assert asyncio.run(main()) == [None, None, None]
        # Both good replies went; the refused one was given up, and every
        # request left the processing list.
        assert sync.lrange("anteroom:{q}:replies:p1", 0, -1) == [b"one", b"three"]
        assert 0 < sync.pttl("anteroom:{q}:replies:p1") <= 60_000
        assert sync.llen(processing) == 0
        assert sync.get("anteroom:{q}:replies:bad") == b"not a list"
        # All three arrived before the writer ran: one MULTI for them.
        assert int(sync.info("commandstats")["cmdstat_multi"]["calls"]) == 1
    finally:
        process.kill()
        process.wait()


def test_an_app_without_a_response_at_the_deadline_is_cancelled_and_the_request_dropped():
    process, port = start_redis()
    try:
        sync = redis.Redis(port=port)
        cancelled = []

        async def app(scope, receive, send):
            if scope["type"] == "lifespan":
                raise RuntimeError("no lifespan here")
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                cancelled.append(True)
                raise

        served = asgi.App(app)
        dispatcher = aio.AsyncDispatcher(served, f"redis://127.0.0.1:{port}", "q", threads=2)
        now = protocol.now_ms()
        raw = protocol.encode("Q", {"id": "r1", "method": "GET", "uri": "/", "version": "HTTP/1.1",
                                    "headers": [], "reply_to": "anteroom:{q}:replies:p1",
                                    "enqueued_at_ms": now, "deadline_ms": now + 1500})
        sync.rpush(dispatcher.processing, raw)

        async def main():
            dispatcher.freed_event = asyncio.Event()
            dispatcher.streams = None
            dispatcher.completer = aio.Completer(dispatcher.client(), dispatcher.processing)
            started = time.monotonic()
            await dispatcher.handle_one(raw)
            took = time.monotonic() - started
            await asyncio.sleep(0.05)  # the app's cancellation lands
            await dispatcher.completer.client.aclose()
            return took

        took = asyncio.run(main())
        # The deadline was 1.5 s after the envelope was made (before Redis
        # and the loop started): the app ran until about then, not 60 s.
        assert 0.3 <= took < 3.0, took
        assert cancelled == [True]
        assert sync.llen(dispatcher.processing) == 0
        assert sync.exists("anteroom:{q}:replies:p1") == 0
    finally:
        process.kill()
        process.wait()


def test_a_completion_refused_for_lack_of_memory_is_written_past_maxmemory():
    """A Redis over its maxmemory refuses the completion's MULTI (OOM); the
    completion then goes in the allow-oom script, at once, as the Rust
    dispatcher's does (docs/protocol.md, step 5), while Redis still refuses
    ordinary writes."""
    process, port = start_redis()
    try:
        sync = redis.Redis(port=port)
        processing = "anteroom:{q}:processing:d1"
        sync.rpush(processing, b"r1")
        sync.config_set("maxmemory", 1)

        async def main():
            client = redis.asyncio.Redis(port=port)
            completer = aio.Completer(client, processing)
            await asyncio.wait_for(
                completer.complete(b"r1", "anteroom:{q}:replies:p1", b"one", protocol.now_ms() + 30_000), 2)
            await client.aclose()

        asyncio.run(main())
        assert sync.lrange("anteroom:{q}:replies:p1", 0, -1) == [b"one"]
        assert sync.llen(processing) == 0
        try:
            sync.set("other", "x")
            raise AssertionError("Redis took an ordinary write past maxmemory")
        except redis.RedisError as err:
            assert protocol.out_of_memory(err), err
    finally:
        process.kill()
        process.wait()


def test_claims_and_discards_ride_out_redis_errors_as_the_rust_dispatcher(monkeypatch):
    """A claim that Redis cannot answer is asked again until the request's
    deadline, then counts as not claimed (the request does not run: its
    client has its 504; counting it as claimed could run a second
    delivery); removing a request with no reply is retried for DISCARD_S,
    then given up without an exception (the reaper finds what is left). A
    claim names its delivery, and the script a claim is asked again with
    knows its own."""
    from anteroom import dispatcher as threaded
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setattr(threaded, "DISCARD_S", 0.5)
    d = threaded.Dispatcher(lambda request: None, f"redis://127.0.0.1:{port}", "q")
    now = protocol.now_ms()
    meta = {"id": "r1", "method": "GET", "uri": "/", "version": "HTTP/1.1", "headers": [],
            "reply_to": "anteroom:{q}:replies:p1", "enqueued_at_ms": now, "deadline_ms": now + 30_000}
    request = protocol.Request(dict(meta, body_len=0), b"")
    soon = protocol.Request(dict(meta, body_len=0, deadline_ms=now + 1_000), b"")
    started = time.monotonic()
    assert d.claim(soon, 1000) is False
    assert 0.5 <= time.monotonic() - started < 5
    started = time.monotonic()
    assert d.discard(b"raw", request) is None
    assert 0.3 <= time.monotonic() - started < 5

    process, port = start_redis()
    try:
        d = threaded.Dispatcher(lambda request: None, f"redis://127.0.0.1:{port}", "q")
        sync = redis.Redis(port=port)
        sync.rpush(d.processing, b"raw")
        assert d.claim(request, 1000) is True and d.claim(request, 1000) is False
        key = d.keys.claimed(request.id)
        owner = sync.get(key).decode()
        assert owner.startswith(d.id + "/")
        assert sync.eval(protocol.CLAIM_WHEN_FULL, 1, key, owner, 1000) == 1
        assert sync.eval(protocol.CLAIM_WHEN_FULL, 1, key, d.id + "/99", 1000) == 0
        d.discard(b"raw", request)
        assert sync.llen(d.processing) == 0
    finally:
        process.kill()
        process.wait()
