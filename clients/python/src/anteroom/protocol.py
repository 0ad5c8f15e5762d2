"""The Anteroom wire protocol (docs/protocol.md): frames, keys.

A frame is ``[version 0x01][kind][u32 BE meta_len][meta JSON][body]``; a
request ('Q', 'U', 'W') may also be version 0x02, its metadata the same
fields as a JSON array (docs/protocol.md, "Request envelopes, version 2").
Header values are bytes, carried in JSON as strings of code points
U+0000..U+00FF (ISO-8859-1), as WSGI carries them.
"""
import json
import re
import struct
import threading
import time

VERSION = 1
#: The version of a request whose metadata is an array.
VERSION_2 = 2
#: A version 2 request's fields, in their order; ``flags`` holds
#: ``dedupe`` (bit 1) and ``stream`` (bit 2).
REQUEST_FIELDS_V2 = ("id", "method", "uri", "version", "headers", "reply_to", "client_addr",
                     "enqueued_at_ms", "deadline_ms", "flags", "body_len")
#: Longest a deadline may lie ahead (24 h): further is no proxy's envelope.
MAX_HOLD_MS = 24 * 3600 * 1000
#: The largest integer a request's metadata may carry: 2^53 - 1, the largest
#: every JSON implementation reads exactly (RFC 7493 section 2.2, I-JSON), so
#: every dispatcher reads an envelope the same way.
MAX_JSON_INTEGER = 2**53 - 1


def json_integer(value):
    """Whether ``value`` is an integer of a request's metadata: from 0 to
    :data:`MAX_JSON_INTEGER`, not a boolean."""
    return (isinstance(value, int) and not isinstance(value, bool)
            and 0 <= value <= MAX_JSON_INTEGER)


_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


class DecodeError(ValueError):
    """Bytes that are not a frame of the expected kind (docs/protocol.md)."""


class Clock:
    """The queue's clock (docs/protocol.md, "Time"): Unix time by the Redis
    server's clock, which every deadline is read against, so a host whose
    own clock is off neither drops requests as expired nor runs them after
    their client's 504.

    It is the monotonic clock plus an offset that :meth:`observe` corrects
    from each ``TIME`` reading (taken on connect and with every heartbeat).
    Of the readings, the one over the shortest round trip is kept (its error
    is at most half the round trip), unless it is older by more seconds than
    a new one's round trip is longer in milliseconds, or a new one disagrees
    with it by more than both errors and that allowance (the server's clock
    moved), as the Rust ``anteroom_protocol::clock``. Before any reading it
    is the host's wall clock."""

    def __init__(self):
        self._lock = threading.Lock()
        #: Server milliseconds at monotonic zero, or None before any reading.
        self._at_zero = None
        self._round_trip = None
        self._taken = None

    def now_ms(self):
        """Unix milliseconds by the queue's clock."""
        at_zero = self._at_zero
        if at_zero is None:
            return int(time.time() * 1000)
        return int(at_zero + time.monotonic() * 1000)

    def observe(self, reply, sent, received):
        """Takes the ``TIME`` ``reply`` (seconds, microseconds) to a command
        sent at ``sent`` and answered at ``received`` (monotonic seconds)."""
        seconds, micros = int(reply[0]), int(reply[1])
        round_trip = received - sent
        at_zero = seconds * 1000 + micros / 1000 - (sent + round_trip / 2) * 1000
        with self._lock:
            if self._round_trip is not None:
                allowance = (received - self._taken) / 1000
                worse = round_trip > self._round_trip + allowance
                errors_ms = (round_trip + self._round_trip) / 2 * 1000 + allowance * 1000
                if worse and abs(at_zero - self._at_zero) <= errors_ms:
                    return
            self._at_zero = at_zero
            self._round_trip, self._taken = round_trip, received

    def read(self, client):
        """Reads the server's clock through redis-py ``client`` (``TIME``)."""
        sent = time.monotonic()
        reply = client.time()
        self.observe(reply, sent, time.monotonic())


#: The process's queue clock.
CLOCK = Clock()


def now_ms():
    """Unix milliseconds by the queue's clock (the Redis server's, see
    :class:`Clock`): the unit of every deadline on the wire."""
    return CLOCK.now_ms()


def encode(kind, meta, body=b""):
    """One frame of ``kind`` (a one-letter str) with ``meta`` (a dict;
    ``body_len`` is set here) and ``body`` (bytes)."""
    meta = dict(meta, body_len=len(body))
    encoded = json.dumps(meta, separators=(",", ":")).encode("utf-8")
    return bytes([VERSION, ord(kind)]) + struct.pack(">I", len(encoded)) + encoded + body


def decode(raw):
    """``(kind, meta, body)`` of a frame; DecodeError when it is not one."""
    if len(raw) < 6:
        raise DecodeError("shorter than a frame header")
    version_2 = raw[0] == VERSION_2 and raw[1] in b"QUW"
    if raw[0] != VERSION and not version_2:
        raise DecodeError(f"unsupported envelope version {raw[0]}")
    (meta_len,) = struct.unpack(">I", raw[2:6])
    if len(raw) < 6 + meta_len:
        raise DecodeError(f"envelope is truncated: {6 + meta_len} bytes needed, {len(raw)} available")
    try:
        meta = json.loads(raw[6 : 6 + meta_len].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise DecodeError(f"metadata is not JSON: {err}") from None
    if version_2:
        meta = request_fields(meta)
    elif not isinstance(meta, dict):
        raise DecodeError("metadata is not a JSON object")
    body = bytes(raw[6 + meta_len :])
    if raw[1] in b"QUW" and "body_len" not in meta:
        # A request names its body's length, even when it is 0.
        raise DecodeError("request metadata: body_len missing")
    # Frames without a body (credits, heads, ends) carry no body_len.
    body_len = meta.get("body_len", 0)
    # An integer: JSON's true and 1.0 are no length, though Python's True
    # and 1.0 equal 1.
    if not isinstance(body_len, int) or isinstance(body_len, bool) or body_len != len(body):
        raise DecodeError(f"body is {len(body)} bytes, body_len says {meta.get('body_len')}")
    return chr(raw[1]), meta, body


def request_fields(meta):
    """A version 2 request's metadata array as version 1's object: the
    first eleven elements by name (later ones are ignored), ``flags`` as
    ``dedupe`` and ``stream``. DecodeError when it is not such an array;
    :func:`decode` checks ``body_len`` and :class:`Request` every other
    field."""
    if not isinstance(meta, list) or len(meta) < len(REQUEST_FIELDS_V2):
        raise DecodeError("version 2 request metadata is not an array of 11 elements")
    fields = dict(zip(REQUEST_FIELDS_V2, meta))
    flags = fields.pop("flags")
    if not json_integer(flags):
        raise DecodeError("request metadata: flags is not an integer from 0 to 2^53 - 1")
    fields["dedupe"] = bool(flags & 1)
    fields["stream"] = bool(flags & 2)
    return fields


class Request:
    """A request envelope (kind ``'Q'``), checked field by field."""

    FIELDS = {"id": str, "method": str, "uri": str, "version": str, "reply_to": str}

    def __init__(self, meta, body):
        for name, kind in self.FIELDS.items():
            if not isinstance(meta.get(name), kind):
                raise DecodeError(f"request metadata: {name} missing or not {kind.__name__}")
        for name in ("enqueued_at_ms", "deadline_ms"):
            if not json_integer(meta.get(name)):
                raise DecodeError(f"request metadata: {name} is not an integer from 0 to 2^53 - 1")
        headers = meta.get("headers")
        if not isinstance(headers, list):
            raise DecodeError("request metadata: headers is not a list")
        try:
            self.headers = [(str(n), v.encode("latin-1")) for n, v in headers]
        except (ValueError, TypeError, UnicodeEncodeError, AttributeError):
            raise DecodeError("request metadata: a header is not [name, ISO-8859-1 value]") from None
        self.id = meta["id"]
        self.method = meta["method"]
        self.uri = meta["uri"]
        self.version = meta["version"]
        self.reply_to = meta["reply_to"]
        self.client_addr = meta.get("client_addr")
        self.enqueued_at_ms = meta["enqueued_at_ms"]
        self.deadline_ms = meta["deadline_ms"]
        for name in ("dedupe", "stream"):
            if not isinstance(meta.get(name, False), bool):
                raise DecodeError(f"request metadata: {name} is not a boolean")
        if self.client_addr is not None and not isinstance(self.client_addr, str):
            raise DecodeError("request metadata: client_addr is neither a string nor null")
        self.dedupe = meta.get("dedupe", False)
        #: The producer reads streamed replies ('S', 'C', 'E').
        self.stream = meta.get("stream", False)
        self.body = body

    def is_safe_to_repeat(self):
        return self.method in ("GET", "HEAD", "OPTIONS") or any(
            n.lower() == "idempotency-key" for n, _ in self.headers)


#: Moves a dead dispatcher's processing list into the reaper's own and
#: returns the moved items; nil when its heartbeat exists or another reaper
#: claimed it first (docs/protocol.md, step 8). KEYS: the dead one's
#: heartbeat, its processing list, the reaper's processing list, the
#: registry; ARGV: the dead one's id. The same script as the Rust reaper's.
CLAIM = """
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
if not redis.call('ZSCORE', KEYS[4], ARGV[1]) then return false end
local items = {}
while true do
  local item = redis.call('LMOVE', KEYS[2], KEYS[3], 'RIGHT', 'LEFT')
  if not item then break end
  table.insert(items, item)
end
redis.call('ZREM', KEYS[4], ARGV[1])
return items"""

#: Puts a reaped request back at the end of the queue pulled next, only if
#: it is still in the reaper's list, at most MAX_REPEATS times, releasing
#: its dedupe claim when the dead dispatcher holds it or, with ARGV[5], any
#: dispatcher whose heartbeat is gone (an orphan may be a dead dispatcher's
#: request, claimed by a reaper whose reply was lost): 0 done, 1 not held,
#: 2 repeated too often (answer it 502). KEYS: the reaper's processing
#: list, the requests list, the claim key, the repeats counter; ARGV: the
#: raw envelope, the dead dispatcher's id, MAX_REPEATS, the counter's TTL
#: in ms, the heartbeat keys' prefix (``anteroom:{q}:dispatcher:``). The
#: Rust reaper's script (crates/anteroom-control/src/queue/requeue.rs).
REQUEUE = """
if ARGV[3] ~= '-1' then
  local n = redis.call('INCR', KEYS[4])
  redis.call('PEXPIRE', KEYS[4], ARGV[4])
  if n > tonumber(ARGV[3]) then return 2 end
end
local release = false
if ARGV[2] ~= '' then
  local holder = redis.call('GET', KEYS[3])
  release = holder and (holder == ARGV[2] or string.sub(holder, 1, #ARGV[2] + 1) == ARGV[2] .. '/'
      or (ARGV[5] ~= '' and redis.call('EXISTS', ARGV[5] .. string.match(holder, '^[^/]*')) == 0))
end
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 1 end
redis.call('RPUSH', KEYS[2], ARGV[1])
if release then redis.call('DEL', KEYS[3]) end
return 0"""
#: Takes up to ARGV[1] requests (KEYS: requests, processing) while Redis is
#: over its maxmemory: the LMOVEs of a pull, in a script Redis runs then
#: (the ``allow-oom`` flag; moving grows nothing, and without it nothing
#: queued could drain). The Rust dispatcher's script
#: (crates/anteroom-control/src/queue/mod.rs).
PULL_WHEN_FULL = """\
#!lua flags=allow-oom
local moved = {}
for _ = 1, tonumber(ARGV[1]) do
  local item = redis.call('LMOVE', KEYS[1], KEYS[2], 'RIGHT', 'LEFT')
  if not item then break end
  moved[#moved + 1] = item
end
return moved"""
#: Completes one request while Redis is over its maxmemory: the commands
#: of a completion in a script Redis runs then (``allow-oom``). KEYS:
#: processing, the reply list; ARGV: the reply TTL in ms, the request's
#: bytes, the reply. The Rust dispatcher's script
#: (crates/anteroom-control/src/queue/complete.rs).
COMPLETE_WHEN_FULL = """\
#!lua flags=allow-oom
if ARGV[3] then
  redis.call('RPUSH', KEYS[2], ARGV[3])
  redis.call('PEXPIRE', KEYS[2], ARGV[1])
end
redis.call('LREM', KEYS[1], 1, ARGV[2])
return 1"""


#: Completes one request and takes the next in the same script, one round
#: trip where a completion and a pull take two: the commands of
#: ``COMPLETE_WHEN_FULL``, then, unless the queue is paused, one ``LMOVE``
#: of a pull (step 1), whose item it returns (None: none, or paused; the
#: pause key is read in the script, so nothing is taken once a pause is
#: set). ``allow-oom``, as the two it joins. KEYS: processing, the reply
#: list, the requests list, the pause key; ARGV: the reply TTL in ms, the
#: request's bytes, the reply. The Ruby and Node dispatchers' script too.
COMPLETE_AND_TAKE = """\
#!lua flags=allow-oom
redis.call('RPUSH', KEYS[2], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[1])
redis.call('LREM', KEYS[1], 1, ARGV[2])
local paused = redis.call('EXISTS', KEYS[4]) == 1
if paused then return false end
return redis.call('LMOVE', KEYS[3], KEYS[1], 'RIGHT', 'LEFT')"""


#: Answers one request only if it is still in the processing list (an
#: orphan a lost reply left there, which another actor may have settled
#: meanwhile): ``LREM``, and only if that removed it, the reply, even past
#: Redis's maxmemory. KEYS: processing, the reply list; ARGV: the reply TTL
#: in ms, the request's bytes, the reply. 1 when it was held. The Rust
#: dispatcher's script (crates/anteroom-control/src/queue/complete.rs).
COMPLETE_IF_HELD = """\
#!lua flags=allow-oom
if redis.call('LREM', KEYS[1], 1, ARGV[2]) == 0 then return 0 end
if ARGV[3] then
  redis.call('RPUSH', KEYS[2], ARGV[3])
  redis.call('PEXPIRE', KEYS[2], ARGV[1])
end
return 1"""


#: Claims a ``dedupe`` request in a script that may run any number of times:
#: after a claim whose answer was lost, and while Redis is over its
#: maxmemory (``allow-oom``). KEYS: the claim key; ARGV: the owner (this
#: delivery), the TTL in ms. 1 when claimed here, now or by an earlier try
#: (the key holds the owner). The Rust dispatcher's script
#: (crates/anteroom-control/src/queue/mod.rs).
CLAIM_WHEN_FULL = """\
#!lua flags=allow-oom
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then return 1 end
if holder then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1"""


def out_of_memory(err):
    """Whether Redis refused a command for want of memory (``OOM``:
    ``maxmemory`` reached under ``noeviction``); redis-py may cut the code
    from the message, which always names maxmemory."""
    return "maxmemory" in str(err)


#: Most times a request that may already have run is put back (the Rust
#: dispatcher's MAX_REPEATS): one that kills what runs it is not retried
#: until its deadline.
MAX_REPEATS = 2

#: What this dispatcher answers to the request kinds it knows and does not
#: serve: a request whose body follows (``'U'``: larger than the proxy's
#: --body-buffer) gets 413 (RFC 9110 section 15.5.14), a WebSocket
#: handshake (``'W'``) 501.
REFUSED = {
    "U": (413, [("content-type", b"text/plain; charset=utf-8")],
          b"this dispatcher takes request bodies up to the proxy's --body-buffer only; "
          b"raise --body-buffer on the proxy\n"),
    "W": (501, [("content-type", b"text/plain; charset=utf-8")],
          b"this dispatcher does not serve WebSockets\n"),
}

#: The answer to a request whose dispatcher died while it may have run.
INTERRUPTED = (502, [("content-type", b"text/plain; charset=utf-8")],
               b"the backend stopped while handling this request; it may or may not have been carried out\n")


def response(request_id, status, headers, body):
    """A whole response frame (``'R'``); ``headers`` are (str, bytes)."""
    meta = {"id": request_id, "status": status,
            "headers": [[name, value.decode("latin-1")] for name, value in headers]}
    return encode("R", meta, body)


#: Largest piece of a streamed body in one chunk frame (256 KiB).
MAX_CHUNK = 256 * 1024


def stream_head(request_id, status, headers, credit_to, window, run):
    """The head of a streamed response (``'S'``). ``run`` is unique to this
    run of the request: a proxy drops a head with its stream's own ``run``
    as a copy instead of aborting the stream (docs/protocol.md)."""
    meta = {"id": request_id, "status": status,
            "headers": [[name, value.decode("latin-1")] for name, value in headers],
            "credit_to": credit_to, "window": window, "run": run}
    return encode("S", meta)


def stream_chunk(request_id, seq, data):
    """One piece of a streamed body (``'C'``), numbered from 0."""
    return encode("C", {"id": request_id, "seq": seq}, data)


def stream_end(request_id, chunks, aborted=None):
    """The end of a streamed body (``'E'``): how many chunks, and why it
    was cut short, if it was."""
    meta = {"id": request_id, "chunks": chunks}
    if aborted is not None:
        meta["aborted"] = aborted
    return encode("E", meta)


def dead_letter(raw, reason, by):
    """A dead letter (``'D'``) carrying ``raw``, byte for byte."""
    return encode("D", {"reason": reason, "at_ms": now_ms(), "by": by}, raw)


class Keys:
    """The Redis key names of one queue (docs/protocol.md, "Redis keys")."""

    def __init__(self, queue):
        if not _ID.fullmatch(queue):
            raise ValueError(f"queue name {queue!r}: 1 to 64 of A-Z a-z 0-9 . _ -")
        self.queue = queue
        self.prefix = f"anteroom:{{{queue}}}:"

    def __getattr__(self, name):
        if name in ("requests", "dispatchers", "paused", "dead"):
            return self.prefix + name
        raise AttributeError(name)

    def processing(self, dispatcher_id):
        return f"{self.prefix}processing:{dispatcher_id}"

    def credits(self, dispatcher_id):
        return f"{self.prefix}credits:{dispatcher_id}"

    def dispatcher(self, dispatcher_id):
        return f"{self.prefix}dispatcher:{dispatcher_id}"

    def claimed(self, request_id):
        return f"{self.prefix}claimed:{request_id}"

    def repeats(self, request_id):
        return f"{self.prefix}repeats:{request_id}"

    def is_replies(self, key):
        """Whether ``key`` is a reply list of this queue: a dispatcher
        writes to no other key, whatever an envelope says."""
        rest = key[len(self.prefix):] if key.startswith(self.prefix) else None
        return rest is not None and rest.startswith("replies:") and bool(_ID.fullmatch(rest[8:]))
