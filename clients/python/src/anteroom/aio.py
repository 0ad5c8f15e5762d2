"""The dispatcher loop on asyncio, for apps that run on an event loop
(ASGI): the pulls, the requests and their completions are tasks on one
loop in the main thread, with no thread between the app and Redis.

It is :class:`~anteroom.dispatcher.Dispatcher` with its hot path moved
onto the loop (redis-py's ``redis.asyncio``); the rest is the threaded
dispatcher's, one implementation: the heartbeat, the credit reader and
the reaper run in their own threads, and a streamed body is written by a
thread of its own (``Dispatcher.stream``, paced by the proxy's credits)
while the app keeps sending on the loop.

- **Pulls**: every free place's worth in one ``MULTI`` of ``LMOVE``
  commands, a ``BLMOVE`` only when the queue is empty (docs/protocol.md,
  step 1); the pause key is re-read every ``PAUSE_POLL_S``.
- **Completions**: whatever finished while the previous write was on the
  wire goes in one ``MULTI`` (``RPUSH`` the reply, ``PEXPIRE`` its list,
  ``LREM`` the request from the processing list, for each), as the Rust
  dispatcher batches them (docs/protocol.md, step 5).
"""
import asyncio
import logging
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import redis
import redis.asyncio
from redis.backoff import NoBackoff
from redis.retry import Retry

from . import protocol
from .dispatcher import (FAILED, PAUSE_POLL_S, PULL_BLOCK_S, REPLY_TTL_MS, RETRY_DELAY_S, Dispatcher,
                         refused_for_good)

log = logging.getLogger("anteroom")


async def _within(awaitable, seconds):
    """``awaitable``'s result, or asyncio.TimeoutError after ``seconds``
    (it is then cancelled): ``asyncio.timeout`` where there is one (Python
    3.11: a timer, no task of its own), else ``asyncio.wait_for``."""
    if hasattr(asyncio, "timeout"):
        async with asyncio.timeout(seconds):
            return await awaitable
    return await asyncio.wait_for(awaitable, seconds)


class Completer:
    """Writes completions (docs/protocol.md, step 5) in batches: one
    ``MULTI`` holds every completion that arrived while the previous one
    was on the wire. Owns its Redis connection."""

    def __init__(self, client, processing):
        self.client = client
        self.processing = processing
        self.pending = []
        self.wake = asyncio.Event()
        self.task = None

    async def complete(self, raw, reply_to, frame, deadline_ms):
        """Pushes ``frame`` onto ``reply_to`` and removes ``raw`` from the
        processing list; returns once Redis has both. Raises what the
        threaded dispatcher's ``complete`` raises: a refusal other than
        WRONGTYPE or NOPERM (those give the reply up) after retrying until
        ``deadline_ms``, the request's deadline."""
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self.run())
        done = asyncio.get_running_loop().create_future()
        self.pending.append((raw, reply_to, frame, deadline_ms, done))
        self.wake.set()
        await done

    async def run(self):
        while True:
            await self.wake.wait()
            self.wake.clear()
            batch, self.pending = self.pending, []
            try:
                await self.write(batch)
            except Exception as err:  # noqa: BLE001 - the writer must outlive any one batch
                log.exception("completing %d requests failed", len(batch))
                for *_, done in batch:
                    if not done.done():
                        done.set_exception(err)

    async def write(self, batch):
        while True:
            try:
                errors = await self.transaction(batch)
                break
            except redis.RedisError as err:
                if protocol.out_of_memory(err):
                    # Redis is over its maxmemory: each completion in a
                    # script it runs then (the request's removal frees its
                    # memory).
                    errors = [await self.when_full(entry) for entry in batch]
                    break
                if refused_for_good(err):
                    # Refused when queued (EXECABORT, e.g. an ACL on one
                    # reply list): each completion on its own, so one bad
                    # reply list fails alone.
                    if len(batch) > 1:
                        for entry in batch:
                            await self.write([entry])
                        return
                    errors = [err]
                    break
                # Anything else (a lost connection, OOM, READONLY) is tried
                # again until each request's deadline, as the Rust
                # dispatcher does.
                late = protocol.now_ms() + RETRY_DELAY_S * 1000
                for entry in batch:
                    if late >= entry[3] and not entry[4].done():
                        entry[4].set_exception(err)
                batch = [entry for entry in batch if late < entry[3]]
                if not batch:
                    return
                log.warning("completing %d requests failed (%s); retrying", len(batch), err)
                await asyncio.sleep(RETRY_DELAY_S)
        for (raw, reply_to, _, _, done), err in zip(batch, errors):
            if refused_for_good(err):
                log.error("Redis refused a reply on %s (%s); giving it up", reply_to, err)
                try:
                    await self.client.lrem(self.processing, 1, raw)
                    err = None
                except redis.RedisError as lrem_err:
                    err = lrem_err
            if done.done():
                continue
            if err is None:
                done.set_result(None)
            else:
                done.set_exception(err)

    async def when_full(self, entry):
        """One completion in ``COMPLETE_WHEN_FULL``: its error, or None."""
        raw, reply_to, frame, _, _ = entry
        try:
            await self.client.eval(protocol.COMPLETE_WHEN_FULL, 2, self.processing, reply_to, REPLY_TTL_MS,
                                   raw, frame)
            return None
        except redis.RedisError as err:
            return err

    async def transaction(self, batch):
        """One ``MULTI`` for ``batch``: each completion's error, or None."""
        async with self.client.pipeline(transaction=True) as pipe:
            for raw, reply_to, frame, _, _ in batch:
                pipe.rpush(reply_to, frame).pexpire(reply_to, REPLY_TTL_MS).lrem(self.processing, 1, raw)
            results = await pipe.execute(raise_on_error=False)
        return [next((r for r in results[at:at + 3] if isinstance(r, Exception)), None)
                for at in range(0, 3 * len(batch), 3)]


class AsyncDispatcher(Dispatcher):
    """Serves ``handler``, a coroutine function ``handler(request) ->
    (status, [(name, bytes)], body)`` where body is bytes, or an iterator
    of bytes read by a thread (it may block), streamed as the threaded
    dispatcher streams; at most ``threads`` requests at once on the loop.
    ``startup`` and ``shutdown`` are coroutine functions run on the loop
    before the first pull and after the last request (ASGI lifespan)."""

    def __init__(self, handler, redis_url, queue, startup=None, shutdown=None, **options):
        super().__init__(handler, redis_url, queue, **options)
        self.startup = startup
        self.shutdown = shutdown
        self.tasks = set()

    def client(self):
        """A Redis client of its own on the loop: one connection, no
        redis-py retries (the callers decide what to retry)."""
        return redis.asyncio.Redis.from_url(self.redis_url, single_connection_client=True,
                                            health_check_interval=30, retry=Retry(NoBackoff(), 0))

    def prepare(self):
        """The loop, and the app's startup on it, before this dispatcher
        registers: a dispatcher that cannot start never looks alive."""
        self.loop = asyncio.new_event_loop()
        if self.startup is not None:
            self.loop.run_until_complete(self.startup())

    def serve(self):
        loop = self.loop
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        try:
            loop.run_until_complete(self.serve_async())
        finally:
            self.stop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
                signal.signal(sig, lambda *_: self.stop())
            # Whatever still runs past the grace period (its request is the
            # reaper's) is cancelled, and waited for a second at most: an
            # app that ignores cancelling must not hold the stop.
            left = [task for task in asyncio.all_tasks(loop) if not task.done()]
            for task in left:
                task.cancel()
            if left:
                loop.run_until_complete(asyncio.wait(left, timeout=1.0))
            loop.close()

    async def serve_async(self):
        self.freed_event = asyncio.Event()
        self.streams = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="anteroom-stream")
        puller, writer = self.client(), self.client()
        self.completer = Completer(writer, self.processing)
        try:
            await self.pull_async(puller)
            # Stopping: what is in hand finishes within the grace period;
            # what does not is cancelled before the app's shutdown closes
            # what it uses (its request stays in the processing list, for
            # the reaper: a 502 now would turn a repeatable GET into an error).
            deadline = self.stopped_at + self.grace
            if self.tasks:
                await asyncio.wait(set(self.tasks), timeout=max(0.0, deadline - time.monotonic()))
            for task in self.tasks:
                task.cancel()
            if self.shutdown is not None:
                # The app's own work after its responses ends first (the
                # shutdown's to wait for); at least a second for all of it.
                shutdown = asyncio.get_running_loop().create_task(self.shutdown())
                done, _ = await asyncio.wait({shutdown}, timeout=max(1.0, deadline - time.monotonic()))
                if not done:
                    log.warning("the app's shutdown did not finish in time")
                elif shutdown.exception() is not None:
                    log.warning("the app's shutdown failed: %s", shutdown.exception())
        finally:
            self.streams.shutdown(wait=False)
            for client in (puller, writer):
                await client.aclose()

    async def pull_async(self, client):
        checked = 0.0
        pause_id = None
        while not self.stopping.is_set():
            if self.orphans_due():
                # On a thread of its own (its own connection): the loop
                # goes on meanwhile.
                await asyncio.to_thread(self.reconcile_or_retry)
            try:
                # As the threaded pull: the pause key every PAUSE_POLL_S.
                if time.monotonic() - checked >= PAUSE_POLL_S:
                    pause_id = self.pause_id(await client.get(self.keys.paused))
                    checked = time.monotonic()
                if pause_id != self.acknowledged:
                    self.acknowledged = pause_id
                    self.beat_now.set()
                if pause_id is not None:
                    await asyncio.sleep(0.05)
                    continue
                free = self.threads - self.in_flight
                if free <= 0:
                    self.freed_event.clear()
                    try:
                        await asyncio.wait_for(self.freed_event.wait(), 0.05)
                    except asyncio.TimeoutError:
                        pass
                    continue
                if self.beat_stale():
                    # As the threaded pull: pulled only while the heartbeat
                    # is known to live (on a thread: its own connection).
                    await asyncio.to_thread(self.beat)
                taken = await self.take_async(client, free)
            except redis.RedisError as err:
                log.warning("pulling failed: %s; retrying", err)
                self.pull_failed()
                await asyncio.sleep(0.5)
                continue
            for raw in taken:
                task = asyncio.get_running_loop().create_task(self.handle_async(raw))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)

    async def take_async(self, client, free):
        """As ``Dispatcher.take``, on the loop."""
        try:
            async with client.pipeline(transaction=True) as pipe:
                for _ in range(free):
                    pipe.lmove(self.keys.requests, self.processing, "RIGHT", "LEFT")
                taken = [raw for raw in await pipe.execute() if raw is not None]
        except redis.RedisError as err:
            if not protocol.out_of_memory(err):
                raise
            # Over maxmemory: the moves in a script Redis runs then.
            taken = await client.eval(protocol.PULL_WHEN_FULL, 2, self.keys.requests, self.processing, free)
        if not taken:
            raw = await client.blmove(self.keys.requests, self.processing, PULL_BLOCK_S, "RIGHT", "LEFT")
            taken = [raw] if raw is not None else []
        self.hold(taken)
        return taken

    async def handle_async(self, raw):
        held = True
        try:
            await self.handle_one(raw)
            held = False
        except asyncio.CancelledError:
            raise  # past the grace period: still held, the reaper's
        except Exception:  # noqa: BLE001 - the loop must survive anything
            held = False
            log.exception("handling a request failed (the reaper answers it once this dispatcher is gone)")
        finally:
            if not held:
                self.release(raw)
                self.freed_event.set()

    async def handle_one(self, raw):
        """``Dispatcher.handle`` on the loop: the rare verdicts run the
        threaded dispatcher's own steps in a thread (``set_aside``,
        ``discard``, ``claim``); a run ends in the batched completion, or a
        stream written from a thread."""
        loop = asyncio.get_running_loop()
        verdict, request, extra = self.triage(raw)
        if verdict == "aside":
            return await loop.run_in_executor(self.streams, self.set_aside, raw, request)
        if verdict == "expired":
            return await loop.run_in_executor(self.streams, self.discard, raw, request)  # the client has its 504
        if verdict == "refuse":
            frame = protocol.response(request.id, *protocol.REFUSED[extra])
            return await self.completer.complete(raw, request.reply_to, frame, request.deadline_ms)
        if verdict == "claim" and not await loop.run_in_executor(self.streams, self.claim, request, extra):
            return await loop.run_in_executor(self.streams, self.discard, raw, request)  # another delivery has it
        try:
            # The app gets until the deadline for its response to begin;
            # then it is cancelled and the request dropped, as the Rust
            # dispatcher does: the client has its 504.
            left = max(0.0, (request.deadline_ms - protocol.now_ms()) / 1000)
            status, headers, out = await _within(self.handler(request), left)
            if not isinstance(out, (bytes, bytearray)) and not request.stream:
                # The producer reads whole replies only.
                out = await loop.run_in_executor(self.streams, b"".join, out)
        except Exception as err:  # noqa: BLE001 - the app's failure is the client's 502
            if isinstance(err, asyncio.TimeoutError) and protocol.now_ms() >= request.deadline_ms:
                log.warning("%s %s began no response by its deadline; dropped", request.method, request.uri)
                return await loop.run_in_executor(self.streams, self.discard, raw, request)
            log.exception("the app failed on %s %s", request.method, request.uri)
            status, headers, out = FAILED
        if not isinstance(out, (bytes, bytearray)):
            return await loop.run_in_executor(self.streams, self.stream, raw, request, status, headers, out)
        frame = protocol.response(request.id, status, headers, bytes(out))
        return await self.completer.complete(raw, request.reply_to, frame, request.deadline_ms)
