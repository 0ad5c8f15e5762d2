"""An Anteroom dispatcher in Python with redis-py, written from docs/protocol.md.

Usage: python3 dispatcher.py REDIS_URL QUEUE     (pip install redis)
One request at a time. When the queue is empty it polls every 50 ms rather
than blocking, so a pause never has a blocked pull to cut short.
"""
import json, os, signal, socket, struct, sys, time, uuid

import redis


def now_ms(r):
    """Unix ms by Redis's clock (TIME), which deadlines are read against, so
    this host's own clock need not be right (docs/protocol.md, "Time")."""
    seconds, micros = r.time()
    return seconds * 1000 + micros // 1000


#: A version 2 request's fields, in order (docs/protocol.md, "Request
#: envelopes, version 2").
FIELDS_V2 = ("id", "method", "uri", "version", "headers", "reply_to", "client_addr",
             "enqueued_at_ms", "deadline_ms", "flags", "body_len")


def decode_request(raw):
    if len(raw) < 6 or raw[0] not in (1, 2) or raw[1] != ord("Q"):
        raise ValueError("not a version 1 or 2 request envelope")
    (meta_len,) = struct.unpack(">I", raw[2:6])
    if len(raw) < 6 + meta_len:
        raise ValueError("truncated")
    meta = json.loads(raw[6 : 6 + meta_len].decode("utf-8"))
    if raw[0] == 2:  # the same fields as an array; flags: 1 dedupe, 2 stream
        if not isinstance(meta, list) or len(meta) < len(FIELDS_V2):
            raise ValueError("version 2 metadata is not an array of 11")
        meta = dict(zip(FIELDS_V2, meta))
        meta["dedupe"] = bool(meta["flags"] & 1)
    body = raw[6 + meta_len :]
    if len(body) != meta["body_len"]:
        raise ValueError("body length mismatch")
    meta["headers"] = [(name, value.encode("latin-1")) for name, value in meta["headers"]]
    return meta, body


def frame(kind, meta, body):
    encoded = json.dumps(meta).encode("utf-8")
    return bytes([1, ord(kind)]) + struct.pack(">I", len(encoded)) + encoded + body


def app(method, uri, headers, body):
    """The application: (status, [(name, value bytes)], body bytes)."""
    if uri.startswith("/hello"):
        return 200, [("content-type", b"text/plain")], b"hello from python\n"
    if uri.startswith("/echo"):
        echoed = [(n, v) for n, v in headers if n == "content-type" or n.startswith("x-test-")]
        return 200, echoed + [("x-method", method.encode())], body
    return 404, [("content-type", b"text/plain")], b"not found\n"


def handle(r, key, processing, me, raw):
    try:
        meta, body = decode_request(raw)
    except (ValueError, KeyError, TypeError, UnicodeError) as err:  # a dead letter
        dead = frame("D", {"reason": f"does not decode: {err}", "at_ms": now_ms(r), "by": me, "body_len": len(raw)}, raw)
        r.pipeline(transaction=True).lpush(key("dead"), dead).lrem(processing, 1, raw).execute()
        return
    if now_ms(r) >= meta["deadline_ms"]:  # the client already has its 504
        r.lrem(processing, 1, raw)
        return
    claim_ms = max(1, meta["deadline_ms"] - now_ms(r) + 60_000)
    if meta.get("dedupe") and not r.set(key("claimed:" + meta["id"]), me, nx=True, px=claim_ms):
        r.lrem(processing, 1, raw)  # another delivery has it
        return
    status, headers, out = app(meta["method"], meta["uri"], meta["headers"], body)
    reply_headers = [[name, value.decode("latin-1")] for name, value in headers]
    reply = frame("R", {"id": meta["id"], "status": status, "headers": reply_headers, "body_len": len(out)}, out)
    r.pipeline(transaction=True).rpush(meta["reply_to"], reply).pexpire(meta["reply_to"], 60_000).lrem(
        processing, 1, raw).execute()


def main(url, queue):
    r = redis.Redis.from_url(url)
    me, started = "py-" + uuid.uuid4().hex[:12], now_ms(r)
    key = lambda suffix: f"anteroom:{{{queue}}}:{suffix}"
    processing, pause_id, last_beat = key("processing:" + me), None, float("-inf")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    r.sadd("anteroom:queues", queue)
    try:
        while True:
            record = r.get(key("paused"))
            try:
                paused = None if record is None else json.loads(record)["id"]
            except (ValueError, KeyError, TypeError):
                paused = record.decode("latin-1")  # anything else still means paused
            if paused != pause_id or time.monotonic() - last_beat > 3:  # heartbeat, TTL 10 s
                pause_id, last_beat = paused, time.monotonic()
                beat = {"id": me, "host": socket.gethostname(), "pid": os.getpid(), "label": "python",
                        "concurrency": 1, "in_flight": 0, "paused": pause_id is not None,
                        "pause_id": pause_id, "started_at_ms": started}
                r.pipeline(transaction=False).set(key("dispatcher:" + me), json.dumps(beat), px=10_000).zadd(
                    key("dispatchers"), {me: now_ms(r)}).execute()
            raw = None if pause_id else r.lmove(key("requests"), processing, "RIGHT", "LEFT")
            if raw is None:
                time.sleep(0.05)
            else:
                handle(r, key, processing, me, raw)
    finally:
        r.delete(key("dispatcher:" + me))
        r.zrem(key("dispatchers"), me)


if __name__ == "__main__":
    main(*sys.argv[1:3])
