'use strict';
// The Anteroom wire protocol (docs/protocol.md): frames and keys.
// A frame is [version 0x01][kind][u32 BE meta_len][meta JSON][body]; a
// request ('Q', 'U', 'W') may also be version 0x02, its metadata the same
// fields as a JSON array ("Request envelopes, version 2"). Header
// values are bytes, carried in JSON as strings of code points U+0000..U+00FF
// (ISO-8859-1): Buffer's 'latin1' encoding.

const VERSION = 1;
/** The version of a request whose metadata is an array. */
const VERSION_2 = 2;
/** A version 2 request's fields, in their order; `flags` holds `dedupe` (bit 1) and `stream` (bit 2). */
const REQUEST_FIELDS_V2 = ['id', 'method', 'uri', 'version', 'headers', 'reply_to', 'client_addr',
  'enqueued_at_ms', 'deadline_ms', 'flags', 'body_len'];
/** Longest a deadline may lie ahead (24 h): further is no proxy's envelope. */
const MAX_HOLD_MS = 24 * 3600 * 1000;
/** Largest piece of a streamed body in one chunk frame (256 KiB). */
const MAX_CHUNK = 256 * 1024;
const ID = /^[A-Za-z0-9._-]{1,64}$/;

class DecodeError extends Error {}

/**
 * The queue's clock (docs/protocol.md, "Time"): Unix time by the Redis
 * server's clock, which every deadline is read against, so a host whose own
 * clock is off neither drops requests as expired nor runs them after their
 * client's 504. It is the monotonic clock (`performance.now()`) plus an
 * offset that `observe` corrects from each `TIME` reading (on connect and
 * with every heartbeat). The reading over the shortest round trip is kept
 * (its error is at most half the round trip), unless it is older by more
 * seconds than a new one's round trip is longer in milliseconds, or a new one
 * disagrees with it by more than both errors and that allowance (the server's
 * clock moved), as the Rust `anteroom_protocol::clock`. Before any reading it
 * is the host's clock.
 */
class Clock {
  constructor() {
    /** Server ms at monotonic zero, or null before any reading. */
    this.atZero = null;
    this.roundTrip = null;
    this.taken = null;
  }

  /** Unix milliseconds by the queue's clock. */
  nowMs() {
    if (this.atZero === null) return Date.now();
    return Math.floor(this.atZero + performance.now());
  }

  /**
   * Takes the `TIME` `reply` ([seconds, microseconds], strings or Buffers)
   * to a command sent at `sent` and answered at `received` (monotonic ms).
   */
  observe(reply, sent, received) {
    const seconds = Number(String(reply[0]));
    const micros = Number(String(reply[1]));
    if (!Number.isFinite(seconds) || !Number.isFinite(micros)) throw new TypeError(`TIME replied ${reply}`);
    const roundTrip = received - sent;
    const atZero = seconds * 1000 + micros / 1000 - (sent + roundTrip / 2);
    if (this.roundTrip !== null) {
      const allowance = (received - this.taken) / 1000;
      const worse = roundTrip > this.roundTrip + allowance;
      const errors = (roundTrip + this.roundTrip) / 2 + allowance;
      if (worse && Math.abs(atZero - this.atZero) <= errors) return;
    }
    this.atZero = atZero;
    this.roundTrip = roundTrip;
    this.taken = received;
  }

  /** Reads the server's clock through node-redis `client` (`TIME`). */
  async read(client) {
    const sent = performance.now();
    const reply = await client.sendCommand(['TIME']);
    this.observe(reply, sent, performance.now());
  }
}

/** The process's queue clock. */
const CLOCK = new Clock();

/** Unix milliseconds by the queue's clock: the unit of every deadline on the wire. */
function nowMs() {
  return CLOCK.nowMs();
}

/** One frame of `kind` (a one-letter string) with `meta` and `body`. */
function encode(kind, meta, body = Buffer.alloc(0)) {
  const json = Buffer.from(JSON.stringify({ ...meta, body_len: body.length }), 'utf8');
  const head = Buffer.alloc(6);
  head[0] = VERSION;
  head[1] = kind.charCodeAt(0);
  head.writeUInt32BE(json.length, 2);
  return Buffer.concat([head, json, body]);
}

/** `{kind, meta, body}` of a frame; throws DecodeError when it is not one. */
function decode(raw) {
  if (raw.length < 6) throw new DecodeError('shorter than a frame header');
  const version2 = raw[0] === VERSION_2 && 'QUW'.includes(String.fromCharCode(raw[1]));
  if (raw[0] !== VERSION && !version2) throw new DecodeError(`unsupported envelope version ${raw[0]}`);
  const metaLen = raw.readUInt32BE(2);
  if (raw.length < 6 + metaLen) {
    throw new DecodeError(`envelope is truncated: ${6 + metaLen} bytes needed, ${raw.length} available`);
  }
  let meta;
  try {
    meta = JSON.parse(raw.subarray(6, 6 + metaLen).toString('utf8'));
  } catch (err) {
    throw new DecodeError(`metadata is not JSON: ${err.message}`);
  }
  if (version2) meta = requestFields(meta);
  if (meta === null || typeof meta !== 'object' || Array.isArray(meta)) {
    throw new DecodeError('metadata is not a JSON object');
  }
  const body = raw.subarray(6 + metaLen);
  const kind = String.fromCharCode(raw[1]);
  // A request names its body's length, even when it is 0 (null is none).
  if ('QUW'.includes(kind) && !jsonInteger(meta.body_len)) {
    throw new DecodeError('request metadata: body_len is not an integer from 0 to 2^53 - 1');
  }
  // Frames without a body (credits, heads, ends) carry no body_len.
  if ((meta.body_len ?? 0) !== body.length) {
    throw new DecodeError(`body is ${body.length} bytes, body_len says ${meta.body_len}`);
  }
  return { kind, meta, body };
}

/**
 * Whether `value` is an integer of a request's metadata: from 0 to 2^53 - 1,
 * the largest every JSON implementation reads exactly (RFC 7493 section
 * 2.2, I-JSON). JSON's `1.0` is read as 1 here: JavaScript's numbers
 * cannot tell them apart (docs/protocol.md).
 */
function jsonInteger(value) {
  return Number.isSafeInteger(value) && value >= 0;
}

/**
 * A version 2 request's metadata array as version 1's object: the first
 * eleven elements by name (later ones are ignored), `flags` as `dedupe` and
 * `stream`. Throws DecodeError when it is not such an array; decode()
 * checks `body_len` and request() every other field.
 */
function requestFields(meta) {
  if (!Array.isArray(meta) || meta.length < REQUEST_FIELDS_V2.length) {
    throw new DecodeError('version 2 request metadata is not an array of 11 elements');
  }
  const fields = {};
  REQUEST_FIELDS_V2.forEach((name, index) => { fields[name] = meta[index]; });
  const { flags } = fields;
  if (!jsonInteger(flags)) throw new DecodeError('request metadata: flags is not an integer from 0 to 2^53 - 1');
  delete fields.flags;
  // Bits 1 and 2 only: later bits (up to 2^53) are ignored, as the protocol says.
  fields.dedupe = flags % 2 === 1;
  fields.stream = Math.floor(flags / 2) % 2 === 1;
  return fields;
}

/** A request envelope's metadata, checked field by field. */
function request(meta, body) {
  for (const [name, type] of [['id', 'string'], ['method', 'string'], ['uri', 'string'],
    ['version', 'string'], ['reply_to', 'string']]) {
    if (typeof meta[name] !== type) throw new DecodeError(`request metadata: ${name} missing or not a ${type}`);
  }
  for (const name of ['enqueued_at_ms', 'deadline_ms']) {
    if (!jsonInteger(meta[name])) throw new DecodeError(`request metadata: ${name} is not an integer from 0 to 2^53 - 1`);
  }
  if (!Array.isArray(meta.headers)) throw new DecodeError('request metadata: headers is not a list');
  const headers = meta.headers.map((pair) => {
    if (!Array.isArray(pair) || typeof pair[0] !== 'string' || typeof pair[1] !== 'string'
      || /[^\u0000-\u00ff]/.test(pair[1])) {
      throw new DecodeError('request metadata: a header is not [name, ISO-8859-1 value]');
    }
    return [pair[0], pair[1]];
  });
  for (const name of ['dedupe', 'stream']) {
    if (meta[name] !== undefined && typeof meta[name] !== 'boolean') {
      throw new DecodeError(`request metadata: ${name} is not a boolean`);
    }
  }
  if (meta.client_addr !== undefined && meta.client_addr !== null && typeof meta.client_addr !== 'string') {
    throw new DecodeError('request metadata: client_addr is neither a string nor null');
  }
  return { ...meta, headers, body, dedupe: meta.dedupe === true, stream: meta.stream === true };
}

/** Whether a reaper may run `request` again: GET, HEAD or OPTIONS, or an Idempotency-Key (docs/protocol.md, step 8). */
function isSafeToRepeat(request) {
  return ['GET', 'HEAD', 'OPTIONS'].includes(request.method)
    || request.headers.some(([name]) => name.toLowerCase() === 'idempotency-key');
}

/**
 * Moves a dead dispatcher's processing list into the reaper's own and returns
 * the moved items; nil when its heartbeat exists or another reaper claimed it
 * first (docs/protocol.md, step 8). KEYS: the dead one's heartbeat, its
 * processing list, the reaper's processing list, the registry; ARGV: the dead
 * one's id. The Rust reaper's script.
 */
const CLAIM = `
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
if not redis.call('ZSCORE', KEYS[4], ARGV[1]) then return false end
local items = {}
while true do
  local item = redis.call('LMOVE', KEYS[2], KEYS[3], 'RIGHT', 'LEFT')
  if not item then break end
  table.insert(items, item)
end
redis.call('ZREM', KEYS[4], ARGV[1])
return items`;

/**
 * What this dispatcher answers to the request kinds it knows and does not
 * serve: a request whose body follows ('U': larger than the proxy's
 * --body-buffer) gets 413 (RFC 9110 section 15.5.14), a WebSocket handshake
 * ('W') 501.
 */
const REFUSED = {
  U: [413, [['content-type', 'text/plain; charset=utf-8']],
    Buffer.from("this dispatcher takes request bodies up to the proxy's --body-buffer only; raise --body-buffer on the proxy\n")],
  W: [501, [['content-type', 'text/plain; charset=utf-8']], Buffer.from('this dispatcher does not serve WebSockets\n')],
};

/**
 * Puts a reaped request back at the end of the queue pulled next, only if it
 * is still in the reaper's list, at most MAX_REPEATS times, releasing its
 * dedupe claim when the dead dispatcher holds it or, with ARGV[5], any
 * dispatcher whose heartbeat is gone (an orphan may be a dead dispatcher's
 * request, claimed by a reaper whose reply was lost): 0 done, 1 not held, 2
 * repeated too often (answer it 502). KEYS: the reaper's processing list, the
 * requests list, the claim key, the repeats counter; ARGV: the raw envelope,
 * the dead dispatcher's id, MAX_REPEATS, the counter's TTL in ms, the
 * heartbeat keys' prefix (`anteroom:{q}:dispatcher:`). The Rust reaper's
 * script (crates/anteroom-control/src/queue/requeue.rs).
 */
const REQUEUE = `
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
return 0`;

/** Most times a request that may already have run is put back (the Rust dispatcher's MAX_REPEATS). */
const MAX_REPEATS = 2;

/** The answer to a request whose dispatcher died while it may have run. */
const INTERRUPTED = [502, [['content-type', 'text/plain; charset=utf-8']],
  Buffer.from('the backend stopped while handling this request; it may or may not have been carried out\n')];

/** A whole response frame ('R'); header values are latin1 strings. */
function response(id, status, headers, body) {
  return encode('R', { id, status, headers }, body);
}

/**
 * The head of a streamed response ('S'): chunks follow, credited on
 * `creditTo`. `run` is unique to this run of the request: a proxy drops a
 * head with its stream's own `run` as a copy instead of aborting the stream
 * (docs/protocol.md).
 */
function streamHead(id, status, headers, creditTo, window, run) {
  return encode('S', { id, status, headers, credit_to: creditTo, window, run });
}

/** One piece of a streamed body ('C'), numbered from 0. */
function streamChunk(id, seq, data) {
  return encode('C', { id, seq }, data);
}

/** The end of a streamed body ('E'): how many chunks, and why it was cut short, if it was. */
function streamEnd(id, chunks, aborted = null) {
  return encode('E', aborted === null ? { id, chunks } : { id, chunks, aborted });
}

/** A dead letter ('D') carrying `raw`, byte for byte. */
function deadLetter(raw, reason, by) {
  return encode('D', { reason, at_ms: nowMs(), by, body_len: raw.length }, raw);
}

/** The Redis key names of one queue (docs/protocol.md, "Redis keys"). */
class Keys {
  constructor(queue) {
    if (!ID.test(queue)) throw new Error(`queue name ${JSON.stringify(queue)}: 1 to 64 of A-Z a-z 0-9 . _ -`);
    this.queue = queue;
    this.prefix = `anteroom:{${queue}}:`;
    this.requests = `${this.prefix}requests`;
    this.dispatchers = `${this.prefix}dispatchers`;
    this.paused = `${this.prefix}paused`;
    this.dead = `${this.prefix}dead`;
  }

  processing(id) { return `${this.prefix}processing:${id}`; }

  dispatcher(id) { return `${this.prefix}dispatcher:${id}`; }

  credits(id) { return `${this.prefix}credits:${id}`; }

  claimed(id) { return `${this.prefix}claimed:${id}`; }

  repeats(id) { return `${this.prefix}repeats:${id}`; }

  /** Whether `key` is a reply list of this queue: nothing else is written to. */
  isReplies(key) {
    if (!key.startsWith(`${this.prefix}replies:`)) return false;
    return ID.test(key.slice(this.prefix.length + 8));
  }
}

/**
 * Takes up to ARGV[1] requests (KEYS: requests, processing) while Redis is
 * over its maxmemory: the LMOVEs of a pull, in a script Redis runs then (the
 * `allow-oom` flag; moving grows nothing, and without it nothing queued could
 * drain). The Rust dispatcher's script (crates/anteroom-control/src/queue/mod.rs).
 */
const PULL_WHEN_FULL = `\
#!lua flags=allow-oom
local moved = {}
for _ = 1, tonumber(ARGV[1]) do
  local item = redis.call('LMOVE', KEYS[1], KEYS[2], 'RIGHT', 'LEFT')
  if not item then break end
  moved[#moved + 1] = item
end
return moved`;

/**
 * Completes one request while Redis is over its maxmemory: the commands of a
 * completion in a script Redis runs then (`allow-oom`). KEYS: processing, the
 * reply list; ARGV: the reply TTL in ms, the request's bytes, the reply. The
 * Rust dispatcher's script (crates/anteroom-control/src/queue/complete.rs).
 */
const COMPLETE_WHEN_FULL = `\
#!lua flags=allow-oom
if ARGV[3] then
  redis.call('RPUSH', KEYS[2], ARGV[3])
  redis.call('PEXPIRE', KEYS[2], ARGV[1])
end
redis.call('LREM', KEYS[1], 1, ARGV[2])
return 1`;

/**
 * Completes one request and takes the next in the same script, one round
 * trip where a completion and a pull take two: the commands of
 * COMPLETE_WHEN_FULL, then, unless the queue is paused, one `LMOVE` of a
 * pull (step 1), whose item it returns (null: none, or paused; the pause key
 * is read in the script, so nothing is taken once a pause is set).
 * `allow-oom`, as the two it joins. KEYS: processing, the reply list, the
 * requests list, the pause key; ARGV: the reply TTL in ms, the request's
 * bytes, the reply. The Ruby dispatcher's script too.
 */
const COMPLETE_AND_TAKE = `\
#!lua flags=allow-oom
redis.call('RPUSH', KEYS[2], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[1])
redis.call('LREM', KEYS[1], 1, ARGV[2])
local paused = redis.call('EXISTS', KEYS[4]) == 1
if paused then return false end
return redis.call('LMOVE', KEYS[3], KEYS[1], 'RIGHT', 'LEFT')`;

/**
 * Answers one request only if it is still in the processing list (an orphan
 * a lost reply left there, which another actor may have settled meanwhile):
 * LREM, and only if that removed it, the reply, even past Redis's maxmemory.
 * KEYS: processing, the reply list; ARGV: the reply TTL in ms, the request's
 * bytes, the reply. 1 when it was held. The Rust dispatcher's script
 * (crates/anteroom-control/src/queue/complete.rs).
 */
const COMPLETE_IF_HELD = `\
#!lua flags=allow-oom
if redis.call('LREM', KEYS[1], 1, ARGV[2]) == 0 then return 0 end
if ARGV[3] then
  redis.call('RPUSH', KEYS[2], ARGV[3])
  redis.call('PEXPIRE', KEYS[2], ARGV[1])
end
return 1`;

/**
 * Claims a `dedupe` request in a script that may run any number of times:
 * after a claim whose answer was lost, and while Redis is over its
 * maxmemory (`allow-oom`). KEYS: the claim key; ARGV: the owner (this
 * delivery), the TTL in ms. 1 when claimed here, now or by an earlier try
 * (the key holds the owner). The Rust dispatcher's script
 * (crates/anteroom-control/src/queue/mod.rs).
 */
const CLAIM_WHEN_FULL = `\
#!lua flags=allow-oom
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then return 1 end
if holder then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1`;

module.exports = {
  Clock, CLOCK, nowMs, PULL_WHEN_FULL, COMPLETE_WHEN_FULL, COMPLETE_AND_TAKE, COMPLETE_IF_HELD, CLAIM_WHEN_FULL,
  VERSION, VERSION_2, MAX_HOLD_MS, MAX_CHUNK, DecodeError, encode, decode, request, isSafeToRepeat, CLAIM, REQUEUE, MAX_REPEATS, INTERRUPTED, REFUSED,
  response,
  streamHead, streamChunk, streamEnd, deadLetter, Keys,
};
