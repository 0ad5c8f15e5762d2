"""The dispatcher loop (docs/protocol.md, "What a dispatcher does"), for
any handler ``handle(request) -> (status, [(name, bytes)], body)``, where
body is bytes, or an iterator of bytes that is streamed to a proxy that
reads streams ("Streamed replies": a head, chunks paced by the proxy's
credits, an end).

One thread pulls into this dispatcher's processing list, at most as many
held as there are worker threads: every free thread's worth at once (a
``MULTI`` of ``LMOVE`` commands, one round trip), blocking with ``BLMOVE`` only
when the queue is empty (docs/protocol.md, step 1). The workers run the
handler, one thread beats. Pauses are seen before each pull and
acknowledged in the heartbeat; SIGTERM or SIGINT stops pulling, lets the
requests in hand finish within the grace period, then removes the
heartbeat.
"""
import collections
import itertools
import json
import logging
import os
import signal
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from . import protocol
from .protocol import DecodeError, Keys, now_ms

log = logging.getLogger("anteroom")

#: How long a reply list lives without a new reply (as the Rust dispatcher).
REPLY_TTL_MS = 60_000
#: How long one blocked pull waits: a pause is seen at most this late.
PULL_BLOCK_S = 0.1
#: How often this dispatcher reaps dead ones (seconds; as the Rust dispatcher).
REAP_EVERY_S = 5.0
#: How often the pause key is re-read while serving (seconds).
PAUSE_POLL_S = 0.05
#: How long the reaper's answers are retried at most (seconds), and so how
#: long a stop waits for a reaper's pass (with 5 more); a reply is retried
#: until its request's deadline (Dispatcher.retrying).
RETRY_S = 10.0
#: The pause between two tries of a failed write (seconds).
RETRY_DELAY_S = 0.2
#: After a failed pull, the processing list is looked at again once a pull
#: the failed connection had sent would surely have landed or timed out
#: (seconds; docs/protocol.md, "Lost replies").
RECHECK_AFTER_S = PULL_BLOCK_S + 3.0
#: A settling of orphans that failed is tried again after this long.
RECONCILE_RETRY_S = 1.0
#: And every this long in any case (one LRANGE of at most ``threads``
#: items, as the Ruby dispatcher): a command whose reply timed out
#: (SOCKET_TIMEOUT_S) may still land after the recheck, a completion's
#: take among them.
SWEEP_EVERY_S = 2.0
#: How long removing a request with no reply is retried (seconds; the Rust
#: dispatcher's minute).
DISCARD_S = 60.0
#: Longest wait for a reply or a connection (s): the longest blocking
#: command here (the credit reader's ``BLMPOP``) waits 1 s.
SOCKET_TIMEOUT_S = 5.0
#: Most bytes of a streamed body sent and not yet credited (1 MiB, as the
#: Rust dispatcher's default window).
WINDOW = 1024 * 1024
#: A stream whose client reads nothing with the window full, this long, is
#: aborted (as the Rust dispatcher's --stream-idle-timeout).
STREAM_IDLE_S = 60.0


class Credits:
    """What proxies have said of this dispatcher's streams, by request id:
    bytes handed to the client so far, and whether the client is gone."""

    def __init__(self):
        self.changed = threading.Condition()
        self.streams = {}

    def register(self, request_id):
        with self.changed:
            self.streams[request_id] = [0, False]

    def forget(self, request_id):
        with self.changed:
            self.streams.pop(request_id, None)

    def deliver(self, request_id, consumed, cancel):
        with self.changed:
            state = self.streams.get(request_id)
            if state is not None:
                state[0] = max(state[0], consumed)
                state[1] = state[1] or cancel
                self.changed.notify_all()

    def room(self, request_id, sent, length, timeout):
        """Waits until ``length`` more bytes fit in the window; False when
        the client is gone or nothing was credited within ``timeout``."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                consumed, cancel = self.streams.get(request_id, (0, True))
                if cancel:
                    return False
                if sent + length <= min(consumed, sent) + WINDOW or sent == consumed:
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.changed.wait(left)

def refused_for_good(err):
    """Whether Redis refused a write for good: a reply list that holds
    something else (WRONGTYPE) or an ACL that forbids it (NOPERM); retrying
    cannot help. Anything else (a lost connection, OOM, READONLY during a
    failover) may pass."""
    # redis-py raises NOPERM as NoPermissionError, its code cut from the
    # message; on EXECABORT it raises the first command's error. A command
    # a script runs that the ACL forbids answers "ERR The user executing the
    # script can't run this command".
    return isinstance(err, redis.exceptions.NoPermissionError) or (
        isinstance(err, redis.ResponseError) and any(
            sign in str(err) for sign in ("WRONGTYPE", "NOPERM", "executing the script can't run")))


FAILED = (502, [("content-type", b"text/plain; charset=utf-8")],
          b"the backend failed to handle the request\n")


class Dispatcher:
    """Serves ``handler`` on ``queue`` of the Redis at ``redis_url``."""

    def __init__(self, handler, redis_url, queue, threads=8, heartbeat_ttl=10.0, grace=30.0,
                 label="python"):
        self.handler = handler
        self.redis_url = redis_url
        self.local = threading.local()
        self.keys = Keys(queue)
        self.threads = max(1, threads)
        self.heartbeat_ttl = max(0.3, heartbeat_ttl)
        self.grace = grace
        self.label = label
        self.id = "py-" + uuid.uuid4().hex[:16]
        self.processing = self.keys.processing(self.id)
        self.stopping = threading.Event()
        #: When the stop came (monotonic seconds): the grace period runs from here.
        self.stopped_at = None
        #: Set once the grace period is over: the heartbeat and the credit
        #: reader run until then, for the requests still in hand.
        self.done = threading.Event()
        self.beat_now = threading.Event()
        self.in_flight = 0
        self.lock = threading.Lock()
        #: The raw bytes of each request in hand (a multiset, under
        #: ``lock``): what the processing list may hold beyond these is an
        #: orphan of a lost reply.
        self.held = collections.Counter()
        #: Settling orphans and reaping exclude each other: what a reaping
        #: pass claimed into the processing list is its own.
        self.settling = threading.Lock()
        #: Set after a pull or a reaping pass failed: the processing list
        #: may hold requests no task of this dispatcher has.
        self.orphans_possible = threading.Event()
        self.recheck_at = None
        self.reconcile_after = 0.0
        self.next_sweep = 0.0
        #: The ``<n>`` of each claim's owner (hex), from a random start: a
        #: dispatcher restarted with a fixed id never takes an earlier run's
        #: claim for its own.
        self.deliveries = itertools.count(uuid.uuid4().int >> 80)
        #: When the last heartbeat that Redis took was sent (monotonic s).
        self.beat_sent_at = float("-inf")
        #: Completions under way that take the next request too (under
        #: ``lock``), and whether a settling of orphans waits for them
        #: (``landed`` is notified when the last lands).
        self.taking = 0
        self.reconciling = False
        self.landed = threading.Condition(self.lock)
        #: Notified when a request in flight ends (``lock`` is its lock).
        self.freed = threading.Condition(self.lock)
        self.acknowledged = None
        self.started_at_ms = now_ms()
        self.credits_key = self.keys.credits(self.id)
        self.credits = Credits()
        #: Reaped requests whose settling failed, by raw bytes: the dead
        #: dispatcher each came from (the reaper thread's alone).
        self.unsettled = {}

    @property
    def redis(self):
        """This thread's own Redis client: one connection per thread, so no
        pool checkout (and its readiness poll) per command, and no retries
        by redis-py (a MULTI or a push run again after a lost reply could
        land twice; the callers here decide what to retry). A reply not
        read within SOCKET_TIMEOUT_S (longer than any blocking command here)
        fails the command, so a half-open connection holds up nothing for
        long (as the Ruby dispatcher's)."""
        client = getattr(self.local, "client", None)
        if client is None:
            client = redis.Redis.from_url(self.redis_url, single_connection_client=True,
                                          health_check_interval=30, retry=Retry(NoBackoff(), 0),
                                          socket_timeout=SOCKET_TIMEOUT_S, socket_connect_timeout=SOCKET_TIMEOUT_S)
            self.local.client = client
        return client

    # -- lifecycle ---------------------------------------------------------

    def run(self):
        """Serves until SIGTERM or SIGINT (installed here, in the main thread)."""
        self.prepare()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop())
        protocol.CLOCK.read(self.redis)
        self.started_at_ms = now_ms()
        self.redis.sadd("anteroom:queues", self.keys.queue)
        self.beat()
        beating = threading.Thread(target=self.heartbeat, name="anteroom-heartbeat", daemon=True)
        beating.start()
        threading.Thread(target=self.read_credits, name="anteroom-credits", daemon=True).start()
        reaping = threading.Thread(target=self.reaper, name="anteroom-reaper", daemon=True)
        reaping.start()
        log.info("dispatcher %s serving queue %s with %d at once", self.id, self.keys.queue, self.threads)
        try:
            self.serve()
        finally:
            deadline = (self.stopped_at or time.monotonic()) + self.grace
            while self.running() and time.monotonic() < deadline:
                time.sleep(0.02)
            # A reap pass under way finishes first: what it claimed is in this
            # dispatcher's list, which must not lose its registry entry.
            reaping.join(RETRY_S + 5)
            left = self.running()
            self.done.set()
            self.beat_now.set()
            beating.join(1.5)
            self.redis.delete(self.keys.dispatcher(self.id))
            # What is left in the processing list goes to the reaper, which
            # finds it through the registry entry: it stays while the list
            # holds anything.
            if self.redis.llen(self.processing) == 0:
                self.redis.zrem(self.keys.dispatchers, self.id)
            else:
                log.warning("grace period over with %d requests running; the reaper takes them "
                            "from the processing list", left)
            log.info("dispatcher %s stopped", self.id)

    def prepare(self):
        """Runs before this dispatcher registers or takes a signal (a
        SIGTERM here ends the process): nothing for worker threads."""

    def serve(self):
        """Pulls and runs requests until :meth:`stop`: worker threads."""
        pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="anteroom-worker")
        try:
            self.pull(pool)
        finally:
            pool.shutdown(wait=False)

    def stop(self):
        if self.stopped_at is None:
            self.stopped_at = time.monotonic()
        self.stopping.set()
        self.beat_now.set()

    def running(self):
        with self.lock:
            return self.in_flight

    # -- pulling -----------------------------------------------------------

    def paused(self):
        """The id of the pause in force (docs/protocol.md, "Pausing"), or None."""
        return self.pause_id(self.redis.get(self.keys.paused))

    @staticmethod
    def pause_id(record):
        """The pause id in the raw pause key ``record`` (bytes or None)."""
        if record is None:
            return None
        try:
            pause_id = json.loads(record)["id"]
        except (ValueError, KeyError, TypeError):
            pause_id = None
        # Anything else still means paused; its raw value is the id.
        return pause_id if isinstance(pause_id, str) else record.decode("latin-1")

    def pull(self, pool):
        checked = 0.0
        pause_id = None
        while not self.stopping.is_set():
            if self.orphans_due():
                self.reconcile_or_retry()
            try:
                # The pause key is re-read every PAUSE_POLL_S, not before
                # every pull: a pull between a pause and its acknowledgement
                # is allowed (the pause waits for the acknowledgement).
                if time.monotonic() - checked >= PAUSE_POLL_S:
                    pause_id = self.paused()
                    checked = time.monotonic()
                if pause_id != self.acknowledged:
                    # No pull is outstanding here: acknowledged at once.
                    self.acknowledged = pause_id
                    self.beat_now.set()
                if pause_id is not None:
                    self.stopping.wait(0.05)
                    continue
                free = self.wait_free(0.05)
                if not free:
                    continue
                if self.beat_stale():
                    # Pulled only while this dispatcher's heartbeat is known
                    # to live (its last beat sent under half the TTL ago):
                    # cut off longer than the TTL, it was reaped (its
                    # registry entry removed), and a request pulled before
                    # its next beat would have no reaper should it die.
                    self.beat()
                taken = self.take(free)
            except redis.RedisError as err:
                log.warning("pulling failed: %s; retrying", err)
                self.pull_failed()
                self.stopping.wait(0.5)
                continue
            for raw in taken:
                pool.submit(self.handle_and_release, raw)

    def wait_free(self, timeout):
        """How many more requests may be held (waits up to ``timeout`` for one)."""
        with self.freed:
            if self.in_flight >= self.threads:
                self.freed.wait(timeout)
            return self.threads - self.in_flight

    def take(self, free):
        """Moves up to ``free`` requests into the processing list: their
        ``LMOVE`` commands in one script (``PULL_WHEN_FULL``, which also runs
        while Redis is over its maxmemory), then a ``BLMOVE`` for one when
        that found none. Each taken request counts as in flight from here."""
        taken = self.redis.eval(protocol.PULL_WHEN_FULL, 2, self.keys.requests, self.processing, free)
        if not taken:
            raw = self.redis.blmove(self.keys.requests, self.processing, PULL_BLOCK_S, "RIGHT", "LEFT")
            taken = [raw] if raw is not None else []
        self.hold(taken)
        return taken

    def hold(self, taken):
        """Counts ``taken`` (raw requests just pulled) as in hand."""
        with self.lock:
            self.in_flight += len(taken)
            self.held.update(taken)

    def release(self, raw):
        """``raw`` is no longer in hand (answered, or given up)."""
        with self.freed:
            self.in_flight -= 1
            self.unhold_locked(raw)
            self.freed.notify()

    def unhold(self, raw):
        """``raw`` is no longer in hand, its place passed to the request its
        completion took."""
        with self.lock:
            self.unhold_locked(raw)

    def unhold_locked(self, raw):
        self.held[raw] -= 1
        if self.held[raw] <= 0:
            del self.held[raw]

    # -- orphans of lost replies (docs/protocol.md, "Lost replies") ---------

    def pull_failed(self):
        """A pull failed: its reply may have been lost after Redis moved
        requests into the processing list. Looked at now, and again once a
        pull the failed connection sent would have landed."""
        with self.lock:  # also called from worker threads
            self.orphans_possible.set()
            self.recheck_at = time.monotonic() + RECHECK_AFTER_S

    def orphans_due(self):
        """Whether the processing list is to be looked at now (called by the
        pull loop, with no pull outstanding)."""
        now = time.monotonic()
        with self.lock:
            if self.recheck_at is not None and now >= self.recheck_at:
                self.recheck_at = None
                self.orphans_possible.set()
            if now >= self.next_sweep:
                self.next_sweep = now + SWEEP_EVERY_S
                self.orphans_possible.set()
        return self.orphans_possible.is_set() and now >= self.reconcile_after

    def reconcile_or_retry(self):
        """:meth:`reconcile`, unless a reaping pass is under way (the pull
        loop does not wait for it: tried again shortly, as after a failure)."""
        self.orphans_possible.clear()
        if not self.settling.acquire(blocking=False):
            self.orphans_possible.set()
            self.reconcile_after = time.monotonic() + RECONCILE_RETRY_S
            return
        try:
            self.reconcile()
        except redis.RedisError as err:
            log.warning("settling orphans failed (%s); trying again shortly", err)
            self.orphans_possible.set()
            self.reconcile_after = time.monotonic() + RECONCILE_RETRY_S
        finally:
            self.settling.release()

    def reconcile(self):
        """Settles what the processing list holds beyond the requests in
        hand, as the Rust dispatcher does: a copy of a request in hand (a
        producer's repeated push) is only removed; any other item, a
        request whose pull reply was lost (never run) or that a lost claim
        reply moved here, is settled as a reaper settles a dead
        dispatcher's: past its deadline dropped, safe to repeat put back,
        otherwise answered 502 if it is still in the list. The caller holds
        ``settling``."""
        with self.lock:
            # Completions stop taking requests, and those under way land and
            # count what they took as held (at most 1 s; else tried again
            # shortly).
            self.reconciling = True
            landed = self.landed.wait_for(lambda: self.taking == 0, timeout=1.0)
            in_hand = collections.Counter(self.held)
        try:
            if landed:
                self.settle_orphans(in_hand)
            else:
                self.orphans_possible.set()
                self.reconcile_after = time.monotonic() + RECONCILE_RETRY_S
        finally:
            with self.lock:
                self.reconciling = False

    def settle_orphans(self, in_hand):
        """:meth:`reconcile`'s settling, given the requests in hand."""
        listed = self.redis.lrange(self.processing, 0, -1)
        copies, orphans = [], []
        for raw in listed:
            if in_hand[raw] > 0:
                in_hand[raw] -= 1
            elif raw in in_hand:
                copies.append(raw)
            elif raw not in self.unsettled:  # the reaper's, retried by it
                orphans.append(raw)
        for raw in copies:
            self.redis.lrem(self.processing, 1, raw)
        for raw in orphans:
            self.settle(raw, self.id, guarded=True)
        if copies or orphans:
            log.warning("settled %d requests in the processing list that no task held (a lost reply); "
                        "removed %d copies of requests in hand", len(orphans), len(copies))

    def handle_and_release(self, raw):
        """Handles ``raw``, then each next request its completion took
        (:meth:`complete_and_take`) in the same place; frees the place when
        none came."""
        while raw is not None:
            taken = None
            try:
                taken = self.handle(raw)
            except Exception:  # noqa: BLE001 - a worker must survive anything
                log.exception("handling a request failed (the reaper answers it once this dispatcher is gone)")
            finally:
                if taken is None:
                    self.release(raw)
                else:
                    self.unhold(raw)
            raw = taken

    # -- one request -------------------------------------------------------

    def examine(self, raw):
        """``(kind, request, None)`` when ``raw`` is a request a producer of
        this queue could have written (docs/protocol.md, step 2), otherwise
        ``(None, None, reason)``. No Redis command."""
        try:
            kind, meta, body = protocol.decode(raw)
            if kind not in ("Q", "U", "W"):
                raise DecodeError(f"kind {kind!r} is not a request")
            request = protocol.Request(meta, body)
        except DecodeError as err:
            return None, None, f"does not decode: {err}"
        if not self.keys.is_replies(request.reply_to):
            return None, None, f"reply_to {request.reply_to!r} is not a reply list of queue {self.keys.queue}"
        return kind, request, None

    def accepted(self, raw, found=""):
        """``(kind, request)`` of ``raw`` when :meth:`examine` accepts it;
        otherwise it is set aside, the reason prefixed with ``found``, and
        None."""
        kind, request, reason = self.examine(raw)
        if reason is not None:
            self.set_aside(raw, found + reason)
            return None
        return kind, request

    def triage(self, raw):
        """What a pulled request needs before (or instead of) running
        (docs/protocol.md, steps 2 and 3), with no Redis command:
        ``("aside", reason, None)``, ``("expired", request, None)`` (the
        client has its 504), ``("refuse", request, kind)`` (a kind known and
        not served: the client hears why at once, instead of waiting out its
        hold budget), ``("claim", request, ttl_ms)`` (a ``dedupe`` request:
        ``SET NX`` its claim first) or ``("run", request, None)``."""
        kind, request, reason = self.examine(raw)
        if reason is not None:
            return "aside", reason, None
        now = now_ms()
        if request.deadline_ms - now > protocol.MAX_HOLD_MS:
            return "aside", "deadline more than 24 h ahead", None
        if now >= request.deadline_ms:
            return "expired", request, None
        if kind in protocol.REFUSED:
            log.warning("refusing %s %s: %s", request.method, request.uri, protocol.REFUSED[kind][2].strip())
            return "refuse", request, kind
        if request.dedupe:
            return "claim", request, max(1, request.deadline_ms - now + REPLY_TTL_MS)
        return "run", request, None

    def handle(self, raw):
        """Serves ``raw``: the next request when its completion took one
        (:meth:`complete_and_take`), else None."""
        verdict, request, extra = self.triage(raw)
        if verdict == "aside":
            self.set_aside(raw, request)
            return None
        if verdict == "expired":
            self.discard(raw, request)  # the client has its 504
            return None
        if verdict == "refuse":
            self.complete(raw, request, protocol.response(request.id, *protocol.REFUSED[extra]))
            return None
        if verdict == "claim" and not self.claim(request, extra):
            self.discard(raw, request)  # another delivery has it
            return None
        try:
            status, headers, out = self.handler(request)
            if not isinstance(out, (bytes, bytearray)) and not request.stream:
                out = b"".join(out)  # the producer reads whole replies only
        except Exception:  # noqa: BLE001 - the app's failure is the client's 502
            log.exception("the app failed on %s %s", request.method, request.uri)
            status, headers, out = FAILED
        if not isinstance(out, (bytes, bytearray)):
            self.stream(raw, request, status, headers, out)
            return None
        return self.complete_and_take(raw, request, protocol.response(request.id, status, headers, bytes(out)))

    def complete_and_take(self, raw, request, frame):
        """:meth:`complete`, taking the next request in the same round trip
        when this dispatcher would pull now (``COMPLETE_AND_TAKE``: not while
        stopping, paused, settling orphans or with a heartbeat that may be
        near its end): the request taken, counted as held, or None. After a
        failure the take may have landed with its reply lost: the completion
        is retried alone, and the processing list looked at as after a
        failed pull."""
        with self.lock:
            chain = not (self.stopping.is_set() or self.acknowledged is not None or self.reconciling
                         or self.beat_stale())
            if chain:
                self.taking += 1
        if not chain:
            self.complete(raw, request, frame)
            return None
        taken = failed = None
        try:
            taken = self.redis.eval(protocol.COMPLETE_AND_TAKE, 4, self.processing, request.reply_to,
                                    self.keys.requests, self.keys.paused, REPLY_TTL_MS, raw, frame)
        except redis.RedisError as err:
            log.warning("completing %s and taking the next failed (%s); completing it alone", request.id, err)
            failed = err
        finally:
            with self.lock:
                self.taking -= 1
                if taken is not None:
                    self.held[taken] += 1
                if self.taking == 0:
                    self.landed.notify_all()
        if failed is not None:
            if not refused_for_good(failed):
                self.pull_failed()
            self.complete(raw, request, frame)
        return taken

    def complete(self, raw, request, frame, until_ms=None):
        """Pushes the last frame of ``request`` and removes it from the
        processing list in one script (docs/protocol.md, step 5;
        ``COMPLETE_WHEN_FULL``, which also runs while Redis is over its
        maxmemory). A reply Redis refuses for good (WRONGTYPE, NOPERM) is
        given up and the request removed alone; any other failure is
        retried until ``until_ms`` (default: the request's deadline; see
        :meth:`retrying`)."""
        def write():
            self.redis.eval(protocol.COMPLETE_WHEN_FULL, 2, self.processing, request.reply_to,
                            REPLY_TTL_MS, raw, frame)

        try:
            self.retrying(request, "completing", write, until_ms)
        except redis.RedisError as err:
            if not refused_for_good(err):
                raise
            log.error("Redis refused the reply to %s (%s); giving it up", request.id, err)
            self.redis.lrem(self.processing, 1, raw)

    @staticmethod
    def retrying(request, what, write, until_ms=None):
        """Runs ``write`` until it succeeds; after a failure (a lost
        connection, a failover, ``OOM`` or ``READONLY``) again every
        RETRY_DELAY_S until ``until_ms``: by default ``request``'s deadline,
        as the Rust dispatcher does (docs/protocol.md, step 5), since a
        reply after it reaches no one; a stream, which outlives its
        deadline, passes its own (:meth:`stream_until`). Raises a refusal
        for good (WRONGTYPE, NOPERM) at once, and the last failure then."""
        until_ms = request.deadline_ms if until_ms is None else until_ms
        while True:
            try:
                return write()
            except redis.RedisError as err:
                if refused_for_good(err) or now_ms() + RETRY_DELAY_S * 1000 >= until_ms:
                    raise
                log.warning("%s %s failed (%s); retrying", what, request.id, err)
                time.sleep(RETRY_DELAY_S)

    def stream(self, raw, request, status, headers, body):
        """Streams ``body`` (an iterator of bytes): the head now, a chunk
        for each piece as the window allows, then the end with the
        request's removal from the processing list in one script. A client
        that is gone (a cancel) gets nothing more; an app that fails mid-
        body, or a client that reads nothing for STREAM_IDLE_S, gets an
        aborted end."""
        push = lambda frame: self.retrying(request, "streaming", lambda: self.redis.pipeline(  # noqa: E731
            transaction=False).rpush(request.reply_to, frame).pexpire(request.reply_to, REPLY_TTL_MS).execute(),
            self.stream_until(request))
        self.credits.register(request.id)
        seq = sent = 0
        aborted = None
        try:
            push(protocol.stream_head(request.id, status, headers, self.credits_key, WINDOW, self.delivery()))
            try:
                for chunk in body:
                    for at in range(0, len(chunk), protocol.MAX_CHUNK):
                        piece = bytes(chunk[at:at + protocol.MAX_CHUNK])
                        if not self.credits.room(request.id, sent, len(piece), STREAM_IDLE_S):
                            if self.credits.streams.get(request.id, (0, True))[1]:
                                self.discard(raw, request)  # the client is gone
                                return None
                            raise TimeoutError(f"the client read nothing for {STREAM_IDLE_S:.0f}s")
                        push(protocol.stream_chunk(request.id, seq, piece))
                        seq, sent = seq + 1, sent + len(piece)
            except Exception as err:  # noqa: BLE001 - the stream is cut short, never ended cleanly
                log.warning("stream aborted: %s", err)
                aborted = str(err) or type(err).__name__
            self.complete(raw, request, protocol.stream_end(request.id, seq, aborted), self.stream_until(request))
        finally:
            self.credits.forget(request.id)
            close = getattr(body, "close", None)
            if close is not None:
                close()
        return None

    def discard(self, raw, request):
        """Removes ``raw`` from the processing list with no reply (expired,
        another delivery's, its client gone): housekeeping, retried for
        DISCARD_S as the Rust dispatcher does; what is left stays for the
        reaper should this dispatcher die."""
        try:
            self.retrying(request, "discarding", lambda: self.redis.lrem(self.processing, 1, raw),
                          now_ms() + int(DISCARD_S * 1000))
        except redis.RedisError as err:
            log.error("cannot remove %s from the processing list (%s)", request.id, err)

    def delivery(self):
        """A token unique to one run of one request, ``<dispatcher id>/<n>``:
        a claim's owner, and a stream head's ``run``."""
        return f"{self.id}/{next(self.deliveries):x}"

    def claim(self, request, ttl_ms):
        """Claims a ``dedupe`` request (``SET NX``, docs/protocol.md step 3):
        False when another delivery has it. The claim names this delivery,
        ``<dispatcher id>/<n>``. After a failure (its answer may be what was
        lost; or Redis, over its maxmemory, refused the ``SET``) it is asked
        again with the CLAIM_WHEN_FULL script, which also knows this
        delivery's own claim, until the deadline; past it the request is not
        run (as the Rust dispatcher)."""
        key = self.keys.claimed(request.id)
        owner = self.delivery()
        try:
            return bool(self.redis.set(key, owner, nx=True, px=ttl_ms))
        except redis.RedisError as err:
            if not protocol.out_of_memory(err):
                log.warning("claiming %s failed (%s); asking again", request.id, err)
        try:
            return self.retrying(request, "claiming", lambda: self.redis.eval(
                protocol.CLAIM_WHEN_FULL, 1, key, owner, ttl_ms)) == 1
        except redis.RedisError as err:
            log.warning("cannot claim %s (%s) by its deadline; not running it", request.id, err)
            return False

    @staticmethod
    def stream_until(request):
        """Until when a write of a stream is retried: a stream may run past
        its request's deadline, so at least STREAM_IDLE_S from now (as the
        Rust dispatcher's stream writes)."""
        return max(request.deadline_ms, now_ms() + int(STREAM_IDLE_S * 1000))

    def read_credits(self):
        """Pops this dispatcher's credit list (``'A'`` frames from proxies)
        until the grace period is over."""
        while not self.done.is_set():
            try:
                popped = self.redis.blmpop(1, 1, self.credits_key, direction="LEFT", count=256)
            except redis.RedisError as err:
                log.warning("reading credits failed: %s", err)
                self.stopping.wait(0.5)
                continue
            for raw in (popped[1] if popped else []):
                try:
                    kind, meta, _ = protocol.decode(raw)
                    if kind == "A":
                        self.credits.deliver(meta["id"], int(meta.get("consumed", 0)), bool(meta.get("cancel")))
                except (DecodeError, KeyError, TypeError, ValueError):
                    log.warning("discarding a credit-list frame that does not decode")

    def set_aside(self, raw, reason):
        log.error("moving an envelope to the dead-letter list: %s", reason)
        letter = protocol.dead_letter(raw, reason, self.id)
        self.redis.pipeline(transaction=True).lpush(self.keys.dead, letter).lrem(
            self.processing, 1, raw).execute()

    # -- reaping (docs/protocol.md, step 8) -----------------------------------

    def reaper(self):
        """Reaps every REAP_EVERY_S until this dispatcher stops."""
        while not self.stopping.wait(REAP_EVERY_S):
            try:
                with self.settling:
                    self.reap()
            except Exception as err:  # noqa: BLE001 - the next pass tries again
                # A claim whose reply was lost has moved a dead
                # dispatcher's requests into this one's list unseen.
                self.orphans_possible.set()
                log.warning("reaping failed: %s", err)

    def reap(self):
        """One pass: claims the processing list of each registered
        dispatcher whose heartbeat is gone (the CLAIM script, so one reaper
        wins each list) into this one's, then settles each request. An item
        whose settling fails stays in this one's list and is tried again at
        the next pass, the others go on."""
        for raw, dead in list(self.unsettled.items()):
            self.settle_or_keep(raw, dead)
        for dead in self.redis.zrange(self.keys.dispatchers, 0, -1):
            dead = dead.decode("latin-1")
            if dead == self.id:
                continue
            if self.stopping.is_set():
                return
            items = self.redis.eval(protocol.CLAIM, 4, self.keys.dispatcher(dead), self.keys.processing(dead),
                                    self.processing, self.keys.dispatchers, dead)
            if not items:
                continue
            log.warning("reaping %d requests of dispatcher %s, whose heartbeat expired", len(items), dead)
            for raw in items:
                self.settle_or_keep(raw, dead)

    def settle_or_keep(self, raw, dead):
        try:
            self.settle(raw, dead)
            self.unsettled.pop(raw, None)
        except Exception as err:  # noqa: BLE001 - kept for the next pass
            log.warning("settling a reaped request failed (%s); trying again at the next pass", err)
            self.unsettled[raw] = dead

    def settle(self, raw, dead, guarded=False):
        """A dead dispatcher's request, now in this one's processing list:
        set aside when no producer of this queue wrote it; dropped when
        past its deadline; put back at the end pulled next when safe to
        repeat (a ``'Q'`` GET, HEAD, OPTIONS or with an Idempotency-Key),
        at most MAX_REPEATS times; otherwise answered 502, since it may or
        may not have run. ``dead`` is the dispatcher it was claimed from
        (this one's own id for an orphan of a lost reply, which is
        ``guarded``: its 502 is pushed only if it is still in the list)."""
        found = ("found in the processing list with no task holding it; " if guarded
                 else "found in a dead dispatcher's list; ")
        accepted = self.accepted(raw, found)
        if accepted is None:
            return None
        kind, request = accepted
        now = now_ms()
        if now >= request.deadline_ms:
            return self.discard(raw, request)
        if kind == "Q" and request.is_safe_to_repeat():
            done = self.redis.eval(protocol.REQUEUE, 4, self.processing, self.keys.requests,
                                   self.keys.claimed(request.id), self.keys.repeats(request.id), raw, dead,
                                   protocol.MAX_REPEATS, max(1, request.deadline_ms - now),
                                   self.keys.dispatcher(""))
            if done != 2:
                return None  # back in the queue, or no longer this reaper's
        # Bounded by RETRY_S too: a stop waits for the reaper's pass.
        until_ms = min(request.deadline_ms, now_ms() + int(RETRY_S * 1000))
        frame = protocol.response(request.id, *protocol.INTERRUPTED)
        if guarded:
            self.retrying(request, "answering an orphan", lambda: self.redis.eval(
                protocol.COMPLETE_IF_HELD, 2, self.processing, request.reply_to, REPLY_TTL_MS, raw, frame),
                until_ms)
            return None
        self.complete(raw, request, frame, until_ms)
        return None

    # -- heartbeat ---------------------------------------------------------

    def beat(self):
        pause_id = self.acknowledged
        beat = {"id": self.id, "host": socket.gethostname(), "pid": os.getpid(), "label": self.label,
                "concurrency": self.threads, "in_flight": self.running(), "paused": pause_id is not None,
                "pause_id": pause_id, "started_at_ms": self.started_at_ms}
        ttl_ms = int(self.heartbeat_ttl * 1000)
        sent = time.monotonic()
        # TIME first: each beat also reads the queue's clock.
        try:
            reply = self.redis.pipeline(transaction=False).time().set(
                self.keys.dispatcher(self.id), json.dumps(beat), px=ttl_ms).zadd(
                self.keys.dispatchers, {self.id: now_ms()}).execute()
        except redis.RedisError as err:
            # Redis over its maxmemory refuses the SET, not PEXPIRE: the
            # heartbeat lives on with its last contents, so this dispatcher
            # does not look dead to the reapers.
            if not protocol.out_of_memory(err) or not self.redis.pexpire(self.keys.dispatcher(self.id), ttl_ms):
                raise
            self.beat_sent_at = sent
            return
        self.beat_sent_at = sent
        protocol.CLOCK.observe(reply[0], sent, time.monotonic())

    def beat_stale(self):
        """Whether the heartbeat may be near its end: the last one Redis took
        was sent half its TTL ago or more (it lives at least the TTL from
        its sending), so it is written again before the next pull."""
        return time.monotonic() - self.beat_sent_at >= self.heartbeat_ttl / 2

    def heartbeat(self):
        while not self.done.is_set():
            self.beat_now.wait(self.heartbeat_ttl / 3)
            self.beat_now.clear()
            if self.done.is_set():
                return
            try:
                self.beat()
            except Exception as err:  # noqa: BLE001 - a missed beat is absorbed by the TTL
                log.warning("heartbeat failed: %s", err)
