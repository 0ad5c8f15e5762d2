"""aio.Completer against a real Redis (a private redis-server on a free
port, as the repository's other tests start theirs): completions that
finish together go in one MULTI, and a reply list Redis refuses for good
fails alone."""
import asyncio
import shutil
import socket
import subprocess
import time

import redis
import redis.asyncio

from anteroom import aio


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
            done = await asyncio.gather(
                completer.complete(b"r1", "anteroom:{q}:replies:p1", b"one"),
                completer.complete(b"r2", "anteroom:{q}:replies:bad", b"two"),
                completer.complete(b"r3", "anteroom:{q}:replies:p1", b"three"),
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
