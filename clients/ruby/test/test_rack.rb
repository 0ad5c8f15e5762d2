# frozen_string_literal: true

require "minitest/autorun"
require_relative "../lib/anteroom/protocol"
require_relative "../lib/anteroom/rack"
require_relative "../lib/anteroom/cli"

# The Rack translation: environments from envelopes, responses from apps.
class TestRack < Minitest::Test
  P = Anteroom::Protocol

  def request(uri: "/a%20b?x=1", headers: [], body: "".b, client: "10.0.0.1:5000")
    meta = { "id" => "r1", "method" => "POST", "uri" => uri, "version" => "HTTP/1.1",
             "reply_to" => "anteroom:{q}:replies:p", "enqueued_at_ms" => 1, "deadline_ms" => 2,
             "headers" => headers, "client_addr" => client }
    P::Request.new(meta, body)
  end

  def test_the_environment_follows_the_rack_spec
    env = Anteroom::Rack.env(request(headers: [["host", "example.com:8080"], ["content-type", "text/plain"],
                                               ["x-forwarded-proto", "https"]], body: "hi"))
    assert_equal "POST", env["REQUEST_METHOD"]
    assert_equal "", env["SCRIPT_NAME"]
    assert_equal "/a%20b", env["PATH_INFO"], "as Puma gives it: not decoded"
    assert_equal "x=1", env["QUERY_STRING"]
    assert_equal ["example.com", "8080"], env.values_at("SERVER_NAME", "SERVER_PORT")
    assert_equal "https", env["rack.url_scheme"]
    assert_equal "text/plain", env["CONTENT_TYPE"]
    assert_equal "2", env["CONTENT_LENGTH"]
    refute env.key?("HTTP_CONTENT_TYPE")
    assert_equal ["10.0.0.1", "5000"], env.values_at("REMOTE_ADDR", "REMOTE_PORT")
    assert_equal "hi", env["rack.input"].read
    assert_equal Encoding::BINARY, env["rack.input"].read.encoding
  end

  def test_repeated_fields_are_joined_and_values_kept_byte_for_byte
    env = Anteroom::Rack.env(request(headers: [["x-a", "1"], ["x-a", "caf\u00e9"], ["cookie", "a=1"],
                                               ["cookie", "b=2"]]))
    assert_equal "1,caf\xE9".b, env["HTTP_X_A"]
    assert_equal "a=1; b=2", env["HTTP_COOKIE"]
  end

  def test_defaults_without_host_or_client
    env = Anteroom::Rack.env(request(uri: "/", client: nil))
    assert_equal ["localhost", "80", ""], env.values_at("SERVER_NAME", "SERVER_PORT", "QUERY_STRING")
    assert_equal ["[::1]", "443"], Anteroom::Rack.split_host("[::1]:443")
    assert_equal ["[::1]", nil], Anteroom::Rack.split_host("[::1]")
  end

  def test_rack2_and_rack3_headers_become_fields
    app = ->(_env) { [201, { "Set-Cookie" => "a=1\nb=2", "x-three" => %w[c d], "rack.hint" => "x" }, ["ok"]] }
    status, fields, body = Anteroom::Rack.call(app, request)
    assert_equal 201, status
    assert_equal [["set-cookie", "a=1"], ["set-cookie", "b=2"], ["x-three", "c"], ["x-three", "d"]], fields
    assert_equal "ok", body
  end

  def test_an_array_body_is_whole_and_closed
    closed = []
    body = ["a", "b"]
    body.define_singleton_method(:close) { closed << true }
    _, _, out = Anteroom::Rack.call(->(_env) { [200, {}, body] }, request)
    assert_equal "ab", out
    assert_equal [true], closed
  end

  def test_an_each_body_is_handed_on_unread_for_streaming
    reads = []
    body = Object.new
    body.define_singleton_method(:each) { |&blk| reads << :each && %w[x y].each(&blk) }
    _, _, out = Anteroom::Rack.call(->(_env) { [200, {}, body] }, request)
    assert_same body, out
    assert_empty reads, "nothing read before the stream starts"
  end

  def test_a_body_whose_to_ary_is_nil_streams
    body = Object.new
    body.define_singleton_method(:to_ary) { nil }
    body.define_singleton_method(:each) { |&blk| %w[x y].each(&blk) }
    _, _, out = Anteroom::Rack.call(->(_env) { [200, {}, body] }, request)
    assert_same body, out
  end

  def test_a_body_without_each_is_refused_and_closed
    closed = []
    body = Object.new
    body.define_singleton_method(:close) { closed << true }
    assert_raises(TypeError) { Anteroom::Rack.call(->(_env) { [200, {}, body] }, request) }
    assert_equal [true], closed
  end

  def test_a_bad_status_or_headers_close_the_body
    [["nope", {}], [200, nil]].each do |status, headers|
      closed = []
      body = ["x"]
      body.define_singleton_method(:close) { closed << true }
      assert_raises(StandardError) { Anteroom::Rack.call(->(_env) { [status, headers, body] }, request) }
      assert_equal [true], closed, status.inspect
    end
  end

  def test_header_names_with_underscores_are_dropped
    env = Anteroom::Rack.env(request(headers: [["x_forwarded_host", "evil"], ["x-forwarded-host", "good"]]))
    assert_equal "good", env["HTTP_X_FORWARDED_HOST"]
  end

  def test_durations_and_options
    assert_in_delta 0.5, Anteroom::CLI.duration("500ms")
    assert_in_delta 60.0, Anteroom::CLI.duration("1m")
    assert_in_delta 3.0, Anteroom::CLI.duration("3")
    assert_raises(OptionParser::InvalidArgument) { Anteroom::CLI.duration("soon") }
    opts = Anteroom::CLI.options(["--queue", "web", "--threads", "3", "app.ru"], { "ANTEROOM_GRACE" => "2s" })
    assert_equal ["web", 3, 2.0, "app.ru"], opts.values_at(:queue, :threads, :grace, :config)
    assert_equal "config.ru", Anteroom::CLI.options([], {})[:config]
    assert_raises(OptionParser::ParseError) { Anteroom::CLI.options(["a.ru", "b.ru"], {}) }
    assert_equal %w[warn warn error], %w[warning WARN Error].map { |name| Anteroom::CLI.log_level(name) }
    assert_output(nil, /not a log level/) { assert_raises(SystemExit) { Anteroom::CLI.log_level("loud") } }
  end
end
