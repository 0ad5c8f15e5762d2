'use strict';
// The protocol codec (docs/protocol.md), run with node's own test runner.
const test = require('node:test');
const assert = require('node:assert');
const protocol = require('../lib/protocol');

test('a request round-trips, header values as ISO-8859-1', () => {
  const raw = protocol.encode('Q', {
    id: 'r1', method: 'POST', uri: '/echo', version: 'HTTP/1.1',
    headers: [['x-test', 'caf\u00e9'], ['x-test', 'two']], reply_to: 'anteroom:{q}:replies:p1',
    enqueued_at_ms: 1, deadline_ms: 2,
  }, Buffer.from([0, 255]));
  const { kind, meta, body } = protocol.decode(raw);
  const request = protocol.request(meta, body);
  assert.strictEqual(kind, 'Q');
  assert.deepStrictEqual(request.headers, [['x-test', 'caf\u00e9'], ['x-test', 'two']]);
  assert.deepStrictEqual([...request.body], [0, 255]);
});

test('frames without a body need no body_len; anything else malformed is an error', () => {
  const meta = Buffer.from('{"id":"r1","consumed":5}');
  const head = Buffer.from([1, 'A'.charCodeAt(0), 0, 0, 0, meta.length]);
  assert.strictEqual(protocol.decode(Buffer.concat([head, meta])).meta.consumed, 5);
  for (const raw of [Buffer.alloc(0), Buffer.from([3, 81, 0, 0, 0, 0]), Buffer.concat([head, meta, Buffer.from('x')])]) {
    assert.throws(() => protocol.decode(raw), protocol.DecodeError);
  }
  const bad = protocol.encode('Q', { id: 'r1', method: 'GET', uri: '/', version: 'HTTP/1.1', headers: [['x', '\u0100']],
    reply_to: 'anteroom:{q}:replies:p1', enqueued_at_ms: 1, deadline_ms: 2 });
  const { meta: m, body } = protocol.decode(bad);
  assert.throws(() => protocol.request(m, body), protocol.DecodeError);
});

test('only this queue\'s reply lists are written to', () => {
  const keys = new protocol.Keys('web');
  assert.ok(keys.isReplies('anteroom:{web}:replies:p1'));
  for (const key of ['anteroom:{other}:replies:p1', 'anteroom:{web}:replies:', 'anteroom:{web}:replies:a b', 'session:1']) {
    assert.ok(!keys.isReplies(key), key);
  }
});

test("the queue's clock follows the server and prefers short round trips", async () => {
  // docs/protocol.md, "Time": Redis's clock, estimated from TIME readings.
  const clock = new protocol.Clock();
  assert.ok(Math.abs(clock.nowMs() - Date.now()) < 1000, "before any reading it is the host's clock");
  const reading = (ms) => [String(Math.floor(ms / 1000)), String(Math.floor((ms % 1000) * 1000))];

  let sent = performance.now();
  clock.observe(reading(Date.now() + 3_600_000), sent, sent + 2);
  assert.ok(Math.abs(clock.nowMs() - Date.now() - 3_600_000) < 1000);

  // A worse reading that agrees within its error is not taken; one that
  // disagrees beyond both errors is (the server's clock moved).
  sent = performance.now();
  clock.observe(reading(Date.now() + 3_600_000 + 100), sent, sent + 300);
  const kept = clock.nowMs() - Date.now();
  assert.ok(kept >= 3_599_500 && kept <= 3_600_050, `a worse reading replaced a better one: ${kept}`);
  sent = performance.now();
  clock.observe(reading(Date.now()), sent, sent + 300);
  assert.ok(Math.abs(clock.nowMs() - Date.now()) < 1000, 'a moved clock was not followed');

  sent = performance.now();
  clock.observe([Buffer.from(reading(Date.now() - 30_000)[0]), Buffer.from('0')], sent, sent + 1);
  assert.ok(Math.abs(clock.nowMs() - Date.now() + 30_000) < 1500);

  const before = clock.nowMs();
  await new Promise((resolve) => { setTimeout(resolve, 20); });
  const advanced = clock.nowMs() - before;
  assert.ok(advanced >= 15 && advanced < 500, `advanced ${advanced} ms`);
});

// The version 2 example of docs/protocol.md, byte for byte.
const V2_META = '["01a20140-78af-77c4-9604-bc4b35fb5daf","POST","/echo","HTTP/1.1",'
  + '[["host","localhost"],["content-length","2"]],"anteroom:{default}:replies:p1",'
  + 'null,1700000000000,1700000030000,0,2]';

function frame(version, kind, meta, body = '') {
  const head = Buffer.from([version, kind.charCodeAt(0), 0, 0, 0, 0]);
  head.writeUInt32BE(Buffer.byteLength(meta), 2);
  return Buffer.concat([head, Buffer.from(meta), Buffer.from(body)]);
}

test('the documented version 2 example decodes as its version 1 twin', () => {
  assert.strictEqual(V2_META.length, 0xb5);
  const { kind, meta, body } = protocol.decode(frame(2, 'Q', V2_META, 'hi'));
  const request = protocol.request(meta, body);
  assert.strictEqual(kind, 'Q');
  assert.deepStrictEqual([request.id, request.method, request.uri, request.version],
    ['01a20140-78af-77c4-9604-bc4b35fb5daf', 'POST', '/echo', 'HTTP/1.1']);
  assert.deepStrictEqual(request.headers, [['host', 'localhost'], ['content-length', '2']]);
  assert.strictEqual(request.reply_to, 'anteroom:{default}:replies:p1');
  assert.strictEqual(request.client_addr, null);
  assert.deepStrictEqual([request.enqueued_at_ms, request.deadline_ms], [1700000000000, 1700000030000]);
  assert.deepStrictEqual([request.dedupe, request.stream, request.body.toString()], [false, false, 'hi']);
});

test('version 2 ignores later elements and unknown flag bits', () => {
  const meta = '["i","GET","/","HTTP/2",[],"r","127.0.0.1:5",1,2,7,0,"later",{"x":1}]';
  for (const kind of ['Q', 'U', 'W']) {
    const decoded = protocol.decode(frame(2, kind, meta));
    const request = protocol.request(decoded.meta, decoded.body);
    assert.deepStrictEqual([request.dedupe, request.stream, request.client_addr], [true, true, '127.0.0.1:5']);
  }
});

test('a short or mistyped version 2 array is refused', () => {
  for (const meta of [
    '["i","GET","/","HTTP/1.1",[],"r",null,1,2,0]',
    '["i","GET","/","HTTP/1.1",[],"r",null,1,2,true,0]',
    '["i","GET","/","HTTP/1.1",[],"r",null,1,2,-1,0]',
    '["i","GET","/","HTTP/1.1",[],"r",null,1,2,0,3]',
    '["i","GET","/","HTTP/1.1",[],"r",5,1,2,0,0]',
    '["i","GET","/","HTTP/1.1",[],"r",null,1,2,0,null]',
    '["i","GET","/","HTTP/1.1",[],"r",null,1,2,0,false]',
    '{"id":"i","method":"GET","uri":"/","version":"HTTP/1.1","headers":[],"reply_to":"r","enqueued_at_ms":1,"deadline_ms":2,"body_len":0}',
  ]) {
    assert.throws(() => {
      const decoded = protocol.decode(frame(2, 'Q', meta));
      protocol.request(decoded.meta, decoded.body);
    }, protocol.DecodeError, meta);
  }
});

const v1Meta = (e, d, b) => `{"id":"i","method":"GET","uri":"/","version":"HTTP/1.1","headers":[],"reply_to":"r","enqueued_at_ms":${e},"deadline_ms":${d},"body_len":${b}}`;
const v2Integers = (e, d, f, b) => `["i","GET","/","HTTP/1.1",[],"r",null,${e},${d},${f},${b}]`;

test('integers up to 2^53 - 1 decode in both versions', () => {
  const max = '9007199254740991';
  for (const [version, meta] of [[1, v1Meta(max, max, 0)], [2, v2Integers(max, max, max, 0)]]) {
    const decoded = protocol.decode(frame(version, 'Q', meta));
    const request = protocol.request(decoded.meta, decoded.body);
    assert.deepStrictEqual([request.enqueued_at_ms, request.deadline_ms], [2 ** 53 - 1, 2 ** 53 - 1]);
  }
});

// Every dispatcher reads a request's integers alike (docs/protocol.md): 0 to
// 2^53 - 1, no booleans, no fractions (but 1.0, which JavaScript reads as 1).
test('integers above 2^53 - 1, negative or not integers are refused', () => {
  const bad = [];
  for (const over of ['9007199254740992', '18446744073709551615']) {
    bad.push([2, v2Integers(over, 2, 0, 0)], [2, v2Integers(1, over, 0, 0)], [2, v2Integers(1, 2, over, 0)],
      [1, v1Meta(over, 2, 0)], [1, v1Meta(1, over, 0)]);
  }
  bad.push([1, v1Meta(-1, 2, 0)], [1, v1Meta(1, -2, 0)], [2, v2Integers(-1, 2, 0, 0)],
    [1, v1Meta('true', 2, 0)], [2, v2Integers(1, 2, '1.5', 0)], [2, v2Integers(1, 2, 0, -1)]);
  for (const [version, meta] of bad) {
    assert.throws(() => {
      const decoded = protocol.decode(frame(version, 'Q', meta));
      protocol.request(decoded.meta, decoded.body);
    }, protocol.DecodeError, meta);
  }
});

// As strictly as every dispatcher reads it: body_len named (not null), dedupe
// and stream booleans, client_addr a string or null, an object.
test('a version 1 request is read as strictly as every dispatcher reads it', () => {
  const base = '"id":"i","method":"GET","uri":"/","version":"HTTP/1.1","headers":[],"reply_to":"r","enqueued_at_ms":1,"deadline_ms":2';
  for (const meta of [`{${base}}`, `{${base},"body_len":null}`, `{${base},"dedupe":1,"body_len":0}`,
    `{${base},"stream":"yes","body_len":0}`, `{${base},"client_addr":5,"body_len":0}`,
    '["i","GET","/","HTTP/1.1",[],"r",null,1,2,false,false,0]']) {
    assert.throws(() => {
      const decoded = protocol.decode(frame(1, 'Q', meta));
      protocol.request(decoded.meta, decoded.body);
    }, protocol.DecodeError, meta);
  }
  const decoded = protocol.decode(frame(1, 'Q', `{${base},"client_addr":null,"dedupe":true,"stream":false,"body_len":0}`));
  const request = protocol.request(decoded.meta, decoded.body);
  assert.deepStrictEqual([request.dedupe, request.stream, request.client_addr], [true, false, null]);
});

test('only requests have a version 2', () => {
  assert.throws(() => protocol.decode(frame(2, 'R', '{"id":"i","status":200,"headers":[],"body_len":0}')),
    /unsupported envelope version 2/);
  assert.throws(() => protocol.decode(frame(3, 'Q', V2_META, 'hi')), /unsupported envelope version 3/);
});
