'use strict';
// The Anteroom wire protocol, version 1 (docs/protocol.md): frames and keys.
// A frame is [version 0x01][kind][u32 BE meta_len][meta JSON][body]. Header
// values are bytes, carried in JSON as strings of code points U+0000..U+00FF
// (ISO-8859-1): Buffer's 'latin1' encoding.

const VERSION = 1;
/** Longest a deadline may lie ahead (24 h): further is no proxy's envelope. */
const MAX_HOLD_MS = 24 * 3600 * 1000;
/** Largest piece of a streamed body in one chunk frame (256 KiB). */
const MAX_CHUNK = 256 * 1024;
const ID = /^[A-Za-z0-9._-]{1,64}$/;

class DecodeError extends Error {}

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
  if (raw[0] !== VERSION) throw new DecodeError(`unsupported envelope version ${raw[0]}`);
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
  if (meta === null || typeof meta !== 'object' || Array.isArray(meta)) {
    throw new DecodeError('metadata is not a JSON object');
  }
  const body = raw.subarray(6 + metaLen);
  // Frames without a body (credits, heads, ends) carry no body_len.
  if ((meta.body_len ?? 0) !== body.length) {
    throw new DecodeError(`body is ${body.length} bytes, body_len says ${meta.body_len}`);
  }
  return { kind: String.fromCharCode(raw[1]), meta, body };
}

/** A request envelope's metadata, checked field by field. */
function request(meta, body) {
  for (const [name, type] of [['id', 'string'], ['method', 'string'], ['uri', 'string'],
    ['version', 'string'], ['reply_to', 'string'], ['enqueued_at_ms', 'number'], ['deadline_ms', 'number']]) {
    if (typeof meta[name] !== type) throw new DecodeError(`request metadata: ${name} missing or not a ${type}`);
  }
  for (const name of ['enqueued_at_ms', 'deadline_ms']) {
    if (!Number.isSafeInteger(meta[name])) throw new DecodeError(`request metadata: ${name} is not an integer`);
  }
  if (!Array.isArray(meta.headers)) throw new DecodeError('request metadata: headers is not a list');
  const headers = meta.headers.map((pair) => {
    if (!Array.isArray(pair) || typeof pair[0] !== 'string' || typeof pair[1] !== 'string'
      || /[^\u0000-\u00ff]/.test(pair[1])) {
      throw new DecodeError('request metadata: a header is not [name, ISO-8859-1 value]');
    }
    return [pair[0], pair[1]];
  });
  return { ...meta, headers, body, dedupe: Boolean(meta.dedupe), stream: Boolean(meta.stream) };
}

/** A whole response frame ('R'); header values are latin1 strings. */
function response(id, status, headers, body) {
  return encode('R', { id, status, headers }, body);
}

/** The head of a streamed response ('S'): chunks follow, credited on `creditTo`. */
function streamHead(id, status, headers, creditTo, window) {
  return encode('S', { id, status, headers, credit_to: creditTo, window });
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
  return encode('D', { reason, at_ms: Date.now(), by, body_len: raw.length }, raw);
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

  /** Whether `key` is a reply list of this queue: nothing else is written to. */
  isReplies(key) {
    if (!key.startsWith(`${this.prefix}replies:`)) return false;
    return ID.test(key.slice(this.prefix.length + 8));
  }
}

module.exports = {
  VERSION, MAX_HOLD_MS, MAX_CHUNK, DecodeError, encode, decode, request, response, streamHead, streamChunk, streamEnd,
  deadLetter, Keys,
};
