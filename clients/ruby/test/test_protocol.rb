# frozen_string_literal: true

require "minitest/autorun"
require_relative "../lib/anteroom/protocol"

# The frame codec and key names against docs/protocol.md.
class TestProtocol < Minitest::Test
  P = Anteroom::Protocol

  def request_meta(**extra)
    { "id" => "r1", "method" => "POST", "uri" => "/a?b=c", "version" => "HTTP/1.1",
      "reply_to" => "anteroom:{q}:replies:p1", "enqueued_at_ms" => 1, "deadline_ms" => 2,
      "headers" => [["x-test", "caf\u00e9"], ["x-test", "b"]] }.merge(extra)
  end

  def test_a_frame_round_trips_byte_exact
    body = (0..255).map(&:chr).join.b
    raw = P.encode("Q", request_meta, body)
    assert_equal [1, "Q".ord], raw.unpack("CC")
    kind, meta, decoded = P.decode(raw)
    assert_equal "Q", kind
    assert_equal 256, meta["body_len"]
    assert_equal body, decoded
    assert_equal Encoding::BINARY, decoded.encoding
  end

  def test_header_values_are_latin1_bytes_both_ways
    request = P::Request.new(request_meta, "".b)
    assert_equal [["x-test", "caf\xE9".b], ["x-test", "b".b]], request.headers
    _, meta, = P.decode(P.response("r1", 200, request.headers, ""))
    assert_equal [["x-test", "caf\u00e9"], ["x-test", "b"]], meta["headers"]
  end

  def test_bad_frames_are_decode_errors
    good = P.encode("Q", request_meta, "xy")
    ["".b, "\x01Q".b, "\x03Q\x00\x00\x00\x00".b, good[0, good.bytesize - 1],
     "\x01Q\x00\x00\x00\x03abc".b, "\x01Q\x00\x00\x00\x02[]".b, good + "z",
     "\x01Q\x00\x00\x00\x09{\"a\":\"\xFF\"}".b].each do |raw|
      assert_raises(P::DecodeError, raw.inspect) { P.decode(raw) }
    end
  end

  def test_requests_with_missing_or_mistyped_fields_are_refused
    ["id", "deadline_ms", "headers"].each do |field|
      meta = request_meta
      meta.delete(field)
      assert_raises(P::DecodeError, field) { P::Request.new(meta, "".b) }
    end
    assert_raises(P::DecodeError) { P::Request.new(request_meta("deadline_ms" => "2"), "".b) }
    assert_raises(P::DecodeError) { P::Request.new(request_meta("headers" => [["a", "\u0100"]]), "".b) }
    assert_raises(P::DecodeError) { P::Request.new(request_meta("headers" => [["a"]]), "".b) }
  end

  # The version 2 example of docs/protocol.md, byte for byte.
  V2_META = '["01a20140-78af-77c4-9604-bc4b35fb5daf","POST","/echo","HTTP/1.1",' \
            '[["host","localhost"],["content-length","2"]],"anteroom:{default}:replies:p1",' \
            'null,1700000000000,1700000030000,0,2]'

  def frame(version, kind, meta, body = "")
    [version, kind.ord, meta.bytesize].pack("CCN") + meta.b + body.b
  end

  def test_the_documented_version_2_example_decodes_as_its_version_1_twin
    assert_equal 0xb5, V2_META.bytesize
    kind, meta, body = P.decode(frame(2, "Q", V2_META, "hi"))
    request = P::Request.new(meta, body)
    assert_equal "Q", kind
    assert_equal ["01a20140-78af-77c4-9604-bc4b35fb5daf", "POST", "/echo", "HTTP/1.1"],
                 [request.id, request.method, request.uri, request.version]
    assert_equal [["host", "localhost".b], ["content-length", "2".b]], request.headers
    assert_equal "anteroom:{default}:replies:p1", request.reply_to
    assert_nil request.client_addr
    assert_equal [1_700_000_000_000, 1_700_000_030_000], [request.enqueued_at_ms, request.deadline_ms]
    assert_equal [false, false, "hi".b], [request.dedupe?, request.stream?, request.body]
  end

  def test_version_2_ignores_later_elements_and_unknown_flag_bits
    meta = '["i","GET","/","HTTP/2",[],"r","127.0.0.1:5",1,2,7,0,"later",{"x":1}]'
    %w[Q U W].each do |kind|
      request = P::Request.new(*P.decode(frame(2, kind, meta))[1..])
      assert_equal [true, true, "127.0.0.1:5"], [request.dedupe?, request.stream?, request.client_addr]
    end
  end

  def test_a_short_or_mistyped_version_2_array_is_refused
    ['["i","GET","/","HTTP/1.1",[],"r",null,1,2,0]',
     '["i","GET","/","HTTP/1.1",[],"r",null,1,2,true,0]',
     '["i","GET","/","HTTP/1.1",[],"r",null,1,2,-1,0]',
     '["i","GET","/","HTTP/1.1",[],"r",null,1,2,0,3]',
     '["i","GET","/","HTTP/1.1",[],"r",5,1,2,0,0]',
     '["i","GET","/","HTTP/1.1",[],"r",null,1,2,0,null]',
     '["i","GET","/","HTTP/1.1",[],"r",null,1,2,0,false]',
     '{"id":"i","method":"GET","uri":"/","version":"HTTP/1.1","headers":[],"reply_to":"r",' \
     '"enqueued_at_ms":1,"deadline_ms":2,"body_len":0}'].each do |meta|
      assert_raises(P::DecodeError, meta) { P::Request.new(*P.decode(frame(2, "Q", meta))[1..]) }
    end
  end

  V1_META = '{"id":"i","method":"GET","uri":"/","version":"HTTP/1.1","headers":[],"reply_to":"r",' \
            '"enqueued_at_ms":%<e>s,"deadline_ms":%<d>s,"body_len":%<b>s}'
  V2_INTEGERS = '["i","GET","/","HTTP/1.1",[],"r",null,%<e>s,%<d>s,%<f>s,%<b>s]'

  def test_integers_up_to_2_to_the_53_minus_1_decode_in_both_versions
    max = (2**53) - 1
    [[1, format(V1_META, e: max, d: max, b: 0)], [2, format(V2_INTEGERS, e: max, d: max, f: max, b: 0)]].each do |version, meta|
      request = P::Request.new(*P.decode(frame(version, "Q", meta))[1..])
      assert_equal [max, max], [request.enqueued_at_ms, request.deadline_ms]
    end
  end

  # Every dispatcher reads a request's integers as JavaScript's doubles can
  # (docs/protocol.md): 0 to 2^53 - 1, no booleans, no fractions.
  def test_integers_above_2_to_the_53_minus_1_negative_or_not_integers_are_refused
    bad = []
    [2**53, (2**64) - 1].each do |over|
      bad << [2, format(V2_INTEGERS, e: over, d: 2, f: 0, b: 0)]
      bad << [2, format(V2_INTEGERS, e: 1, d: over, f: 0, b: 0)]
      bad << [2, format(V2_INTEGERS, e: 1, d: 2, f: over, b: 0)]
      bad << [1, format(V1_META, e: over, d: 2, b: 0)]
      bad << [1, format(V1_META, e: 1, d: over, b: 0)]
    end
    bad << [1, format(V1_META, e: -1, d: 2, b: 0)]
    bad << [1, format(V1_META, e: 1, d: -2, b: 0)]
    bad << [2, format(V2_INTEGERS, e: -1, d: 2, f: 0, b: 0)]
    bad << [1, format(V1_META, e: "true", d: 2, b: 0)]
    bad << [2, format(V2_INTEGERS, e: 1, d: 2, f: "1.5", b: 0)]
    bad << [2, format(V2_INTEGERS, e: 1, d: 2, f: "1.0", b: 0)]
    bad << [2, format(V2_INTEGERS, e: "1.0", d: 2, f: 0, b: 0)]
    bad.each do |version, meta|
      assert_raises(P::DecodeError, meta) { P::Request.new(*P.decode(frame(version, "Q", meta))[1..]) }
    end
    # A body of the length a 1.0 would stand for.
    [[1, format(V1_META, e: 1, d: 2, b: "1.0")], [2, format(V2_INTEGERS, e: 1, d: 2, f: 0, b: "1.0")]].each do |version, meta|
      assert_raises(P::DecodeError, meta) { P::Request.new(*P.decode(frame(version, "Q", meta, "x"))[1..]) }
    end
  end

  V1_BASE = '"id":"i","method":"GET","uri":"/","version":"HTTP/1.1","headers":[],"reply_to":"r",' \
            '"enqueued_at_ms":1,"deadline_ms":2'

  # As strictly as every dispatcher reads it: body_len named (not null),
  # dedupe and stream booleans, client_addr a string or null, an object.
  def test_a_version_1_request_is_read_as_strictly_as_every_dispatcher_reads_it
    ["{#{V1_BASE}}", "{#{V1_BASE},\"body_len\":null}", "{#{V1_BASE},\"dedupe\":1,\"body_len\":0}",
     "{#{V1_BASE},\"stream\":\"yes\",\"body_len\":0}", "{#{V1_BASE},\"client_addr\":5,\"body_len\":0}",
     '["i","GET","/","HTTP/1.1",[],"r",null,1,2,false,false,0]'].each do |meta|
      assert_raises(P::DecodeError, meta) { P::Request.new(*P.decode(frame(1, "Q", meta))[1..]) }
    end
    meta = "{#{V1_BASE},\"client_addr\":null,\"dedupe\":true,\"stream\":false,\"body_len\":0}"
    request = P::Request.new(*P.decode(frame(1, "Q", meta))[1..])
    assert_equal [true, false, nil], [request.dedupe?, request.stream?, request.client_addr]
  end

  def test_only_requests_have_a_version_2
    error = assert_raises(P::DecodeError) { P.decode(frame(2, "R", '{"id":"i","status":200,"headers":[],"body_len":0}')) }
    assert_match(/unsupported envelope version 2/, error.message)
    error = assert_raises(P::DecodeError) { P.decode(frame(3, "Q", V2_META, "hi")) }
    assert_match(/unsupported envelope version 3/, error.message)
  end

  def test_frames_without_a_body_need_no_body_len
    raw = [1, "A".ord].pack("CC") + [7].pack("N") + '{"a":1}'
    assert_equal ["A", { "a" => 1 }, "".b], P.decode(raw)
  end

  def test_stream_frames
    _, head, = P.decode(P.stream_head("r", 200, [["a", "b"]], "k", 10, "d/1"))
    assert_equal({ "id" => "r", "status" => 200, "headers" => [["a", "b"]], "credit_to" => "k",
                   "window" => 10, "run" => "d/1", "body_len" => 0 }, head)
    _, chunk, data = P.decode(P.stream_chunk("r", 3, "xyz"))
    assert_equal [3, "xyz"], [chunk["seq"], data]
    _, ending, = P.decode(P.stream_end("r", 4, "boom"))
    assert_equal [4, "boom"], ending.values_at("chunks", "aborted")
    refute P.decode(P.stream_end("r", 4))[1].key?("aborted")
  end

  def test_keys
    keys = P::Keys.new("web")
    assert_equal "anteroom:{web}:requests", keys.requests
    assert_equal "anteroom:{web}:processing:d1", keys.processing("d1")
    assert keys.replies?("anteroom:{web}:replies:p-1")
    refute keys.replies?("anteroom:{other}:replies:p-1")
    refute keys.replies?("anteroom:{web}:requests")
    refute keys.replies?("anteroom:{web}:replies:a b")
    assert_raises(ArgumentError) { P::Keys.new("a b") }
  end

  # The queue's clock (docs/protocol.md, "Time"): Redis's, estimated from
  # TIME readings, preferring the reading over the shortest round trip.
  def test_the_clock_follows_the_server_and_prefers_short_round_trips
    clock = P::Clock.new
    wall = -> { Process.clock_gettime(Process::CLOCK_REALTIME, :float_millisecond) }
    mono = -> { P::Clock.monotonic_ms }
    assert_in_delta wall.call, clock.now_ms, 1000, "before any reading it is the host's clock"

    server = wall.call + 3_600_000
    sent = mono.call
    clock.observe([(server / 1000).to_i, ((server % 1000) * 1000).to_i], sent, sent + 2)
    assert_in_delta 3_600_000, clock.now_ms - wall.call, 1000

    # A worse reading that agrees within its error is not taken; one that
    # disagrees beyond both errors is (the server's clock moved).
    server = wall.call + 3_600_000 + 100
    sent = mono.call
    clock.observe([(server / 1000).to_i, ((server % 1000) * 1000).to_i], sent, sent + 300)
    assert_in_delta 3_599_800, clock.now_ms - wall.call, 250, "a worse reading replaced a better one"
    server = wall.call
    sent = mono.call
    clock.observe([(server / 1000).to_i, ((server % 1000) * 1000).to_i], sent, sent + 300)
    assert_in_delta 0, clock.now_ms - wall.call, 1000, "a moved clock was not followed"

    server = wall.call - 30_000
    sent = mono.call
    clock.observe([(server / 1000).to_i, ((server % 1000) * 1000).to_i], sent, sent + 1)
    assert_in_delta(-30_000, clock.now_ms - wall.call, 1000)

    before = clock.now_ms
    sleep 0.02
    assert_includes 15...500, clock.now_ms - before
  end
end
