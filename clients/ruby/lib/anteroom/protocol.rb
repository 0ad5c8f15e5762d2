# frozen_string_literal: true

require "json"

module Anteroom
  # The Anteroom wire protocol (docs/protocol.md): frames and Redis keys.
  #
  # A frame is +[version 0x01][kind][u32 BE meta_len][meta JSON][body]+; a
  # request may also be version 0x02, its metadata a JSON array.
  # Header values are bytes, carried in JSON as strings of code points
  # U+0000..U+00FF (ISO-8859-1). Every byte string here is binary
  # (ASCII-8BIT).
  module Protocol
    VERSION = 1
    # The version of a request (+'Q'+, +'U'+, +'W'+) whose metadata is the
    # same fields as a JSON array (docs/protocol.md, "Request envelopes,
    # version 2").
    VERSION_2 = 2
    # A version 2 request's fields, in their order; +flags+ holds +dedupe+
    # (bit 1) and +stream+ (bit 2).
    REQUEST_FIELDS_V2 = %w[id method uri version headers reply_to client_addr enqueued_at_ms
                           deadline_ms flags body_len].freeze
    # Longest a deadline may lie ahead (24 h): further is no proxy's envelope.
    MAX_HOLD_MS = 24 * 3600 * 1000
    # The largest integer a request's metadata may carry: 2^53 - 1, the
    # largest every JSON implementation reads exactly (RFC 7493 section 2.2,
    # I-JSON), so every dispatcher reads an envelope the same way.
    MAX_JSON_INTEGER = (2**53) - 1
    # Largest piece of a streamed body in one chunk frame (256 KiB).
    MAX_CHUNK = 256 * 1024
    ID = /\A[A-Za-z0-9._-]{1,64}\z/
    # Moves a dead dispatcher's processing list into the reaper's own and
    # returns the moved items; nil when its heartbeat exists or another
    # reaper claimed it first (docs/protocol.md, step 8). KEYS: the dead
    # one's heartbeat, its processing list, the reaper's processing list,
    # the registry; ARGV: the dead one's id. The Rust reaper's script.
    CLAIM = <<~LUA
      if redis.call('EXISTS', KEYS[1]) == 1 then return false end
      if not redis.call('ZSCORE', KEYS[4], ARGV[1]) then return false end
      local items = {}
      while true do
        local item = redis.call('LMOVE', KEYS[2], KEYS[3], 'RIGHT', 'LEFT')
        if not item then break end
        table.insert(items, item)
      end
      redis.call('ZREM', KEYS[4], ARGV[1])
      return items
    LUA
    # What this dispatcher answers to the request kinds it knows and does
    # not serve: a request whose body follows ('U': larger than the
    # proxy's --body-buffer) gets 413 (RFC 9110 section 15.5.14), a
    # WebSocket handshake ('W') 501.
    REFUSED = {
      "U" => [413, [["content-type", "text/plain; charset=utf-8".b]],
              "this dispatcher takes request bodies up to the proxy's --body-buffer only; " \
              "raise --body-buffer on the proxy\n".b].freeze,
      "W" => [501, [["content-type", "text/plain; charset=utf-8".b]],
              "this dispatcher does not serve WebSockets\n".b].freeze
    }.freeze
    # Puts a reaped request back at the end of the queue pulled next, only
    # if it is still in the reaper's list, at most MAX_REPEATS times,
    # releasing its dedupe claim when the dead dispatcher holds it or, with
    # ARGV[5], any dispatcher whose heartbeat is gone (an orphan may be a
    # dead dispatcher's request, claimed by a reaper whose reply was lost):
    # 0 done, 1 not held, 2 repeated too often (answer it 502). KEYS: the
    # reaper's processing list, the requests list, the claim key, the
    # repeats counter; ARGV: the raw envelope, the dead dispatcher's id,
    # MAX_REPEATS, the counter's TTL in ms, the heartbeat keys' prefix
    # (+anteroom:{q}:dispatcher:+). The Rust reaper's script
    # (crates/anteroom-control/src/queue/requeue.rs).
    REQUEUE = <<~LUA
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
      return 0
    LUA
    # Takes up to ARGV[1] requests (KEYS: requests, processing): the LMOVEs
    # of a pull in one script, which Redis also runs while over its
    # maxmemory (the +allow-oom+ flag; moving grows nothing, and without it
    # nothing queued could drain). This dispatcher pulls with it always (one
    # command where a MULTI is two more). The Rust dispatcher's script
    # (crates/anteroom-control/src/queue/mod.rs).
    PULL_WHEN_FULL = <<~LUA
      #!lua flags=allow-oom
      local moved = {}
      for _ = 1, tonumber(ARGV[1]) do
        local item = redis.call('LMOVE', KEYS[1], KEYS[2], 'RIGHT', 'LEFT')
        if not item then break end
        moved[#moved + 1] = item
      end
      return moved
    LUA
    # Completes one request: the commands of a completion in one script,
    # which Redis also runs while over its maxmemory (+allow-oom+); this
    # dispatcher completes with it always. KEYS:
    # processing, the reply list; ARGV: the reply TTL in ms, the request's
    # bytes, the reply. The Rust dispatcher's script
    # (crates/anteroom-control/src/queue/complete.rs).
    COMPLETE_WHEN_FULL = <<~LUA
      #!lua flags=allow-oom
      if ARGV[3] then
        redis.call('RPUSH', KEYS[2], ARGV[3])
        redis.call('PEXPIRE', KEYS[2], ARGV[1])
      end
      redis.call('LREM', KEYS[1], 1, ARGV[2])
      return 1
    LUA
    # Completes one request and takes the next in the same script, one
    # round trip where a completion and a pull take two: the commands of
    # COMPLETE_WHEN_FULL, then, unless the queue is paused, one +LMOVE+ of
    # a pull (step 1), whose item it returns (nil: none, or paused; the
    # pause key is read in the script, so nothing is taken once a pause is
    # set). +allow-oom+, as the two it joins. KEYS: processing, the reply
    # list, the requests list, the pause key; ARGV: the reply TTL in ms, the
    # request's bytes, the reply.
    COMPLETE_AND_TAKE = <<~LUA
      #!lua flags=allow-oom
      redis.call('RPUSH', KEYS[2], ARGV[3])
      redis.call('PEXPIRE', KEYS[2], ARGV[1])
      redis.call('LREM', KEYS[1], 1, ARGV[2])
      local paused = redis.call('EXISTS', KEYS[4]) == 1
      if paused then return false end
      return redis.call('LMOVE', KEYS[3], KEYS[1], 'RIGHT', 'LEFT')
    LUA
    # Answers one request only if it is still in the processing list (an
    # orphan a lost reply left there, which another actor may have settled
    # meanwhile): LREM, and only if that removed it, the reply, even past
    # Redis's maxmemory. KEYS: processing, the reply list; ARGV: the reply
    # TTL in ms, the request's bytes, the reply. 1 when it was held. The
    # Rust dispatcher's script (crates/anteroom-control/src/queue/complete.rs).
    COMPLETE_IF_HELD = <<~LUA
      #!lua flags=allow-oom
      if redis.call('LREM', KEYS[1], 1, ARGV[2]) == 0 then return 0 end
      if ARGV[3] then
        redis.call('RPUSH', KEYS[2], ARGV[3])
        redis.call('PEXPIRE', KEYS[2], ARGV[1])
      end
      return 1
    LUA
    # Claims a +dedupe+ request in a script that may run any number of
    # times: after a claim whose answer was lost, and while Redis is over
    # its maxmemory (+allow-oom+). KEYS: the claim key; ARGV: the owner (this
    # delivery), the TTL in ms. 1 when claimed here, now or by an earlier try
    # (the key holds the owner). The Rust dispatcher's script
    # (crates/anteroom-control/src/queue/mod.rs).
    CLAIM_WHEN_FULL = <<~LUA
      #!lua flags=allow-oom
      local holder = redis.call('GET', KEYS[1])
      if holder == ARGV[1] then return 1 end
      if holder then return 0 end
      redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
      return 1
    LUA
    # Most times a request that may already have run is put back (the Rust
    # dispatcher's MAX_REPEATS).
    MAX_REPEATS = 2
    # The answer to a request whose dispatcher died while it may have run.
    INTERRUPTED = [502, [["content-type", "text/plain; charset=utf-8".b]],
                   "the backend stopped while handling this request; it may or may not have been carried out\n".b].freeze

    # Bytes that are not a frame of the expected kind.
    class DecodeError < StandardError; end

    module_function

    # The queue's clock (docs/protocol.md, "Time"): Unix time by the Redis
    # server's clock, which every deadline is read against, so a host whose
    # own clock is off neither drops requests as expired nor runs them after
    # their client's 504. It is the monotonic clock plus an offset that
    # #observe corrects from each +TIME+ reading (on connect and with every
    # heartbeat). The reading over the shortest round trip is kept (its
    # error is at most half the round trip), unless it is older by more
    # seconds than a new one's round trip is longer in milliseconds, or a
    # new one disagrees with it by more than both errors and that allowance
    # (the server's clock moved), as the Rust +anteroom_protocol::clock+.
    # Before any reading it is the host's wall clock.
    class Clock
      def initialize
        @lock = Mutex.new
        @at_zero = nil # server ms at monotonic zero
        @round_trip = nil
        @taken = nil
      end

      # Unix milliseconds by the queue's clock.
      def now_ms
        at_zero = @at_zero
        return Process.clock_gettime(Process::CLOCK_REALTIME, :millisecond) if at_zero.nil?

        (at_zero + Process.clock_gettime(Process::CLOCK_MONOTONIC, :float_millisecond)).to_i
      end

      # Takes the +TIME+ +reply+ ([seconds, microseconds]) to a command sent
      # at +sent+ and answered at +received+ (monotonic milliseconds).
      def observe(reply, sent, received)
        seconds, micros = Integer(reply[0]), Integer(reply[1])
        round_trip = received - sent
        at_zero = (seconds * 1000) + (micros / 1000.0) - (sent + (round_trip / 2.0))
        @lock.synchronize do
          if @round_trip
            allowance = (received - @taken) / 1000.0
            worse = round_trip > @round_trip + allowance
            errors = ((round_trip + @round_trip) / 2.0) + allowance
            return if worse && (at_zero - @at_zero).abs <= errors
          end
          @at_zero = at_zero
          @round_trip = round_trip
          @taken = received
        end
      end

      # Reads the server's clock through redis-rb +redis+ (+TIME+).
      def read(redis)
        sent = Clock.monotonic_ms
        reply = redis.time
        observe(reply, sent, Clock.monotonic_ms)
      end

      def self.monotonic_ms
        Process.clock_gettime(Process::CLOCK_MONOTONIC, :float_millisecond)
      end
    end

    # The process's queue clock.
    CLOCK = Clock.new

    # Unix milliseconds by the queue's clock (the Redis server's, see
    # Clock): the unit of every deadline on the wire.
    def now_ms
      CLOCK.now_ms
    end

    # One frame of +kind+ (a one-letter String) with +meta+ (a Hash;
    # +body_len+ is set here) and +body+ (a String of bytes).
    def encode(kind, meta, body = "".b)
      body = body.b
      json = JSON.generate(meta.merge("body_len" => body.bytesize)).b
      [VERSION, kind.ord, json.bytesize].pack("CCN") + json + body
    end

    # +[kind, meta, body]+ of the frame +raw+; DecodeError when it is not one.
    def decode(raw)
      raw = raw.b
      raise DecodeError, "shorter than a frame header" if raw.bytesize < 6

      version, kind, meta_len = raw.unpack("CCN")
      version_2 = version == VERSION_2 && "QUW".include?(kind.chr)
      raise DecodeError, "unsupported envelope version #{version}" unless version == VERSION || version_2
      if raw.bytesize < 6 + meta_len
        raise DecodeError, "envelope is truncated: #{6 + meta_len} bytes needed, #{raw.bytesize} available"
      end

      text = raw.byteslice(6, meta_len).force_encoding(Encoding::UTF_8)
      raise DecodeError, "metadata is not UTF-8" unless text.valid_encoding?

      begin
        meta = JSON.parse(text)
      rescue JSON::ParserError => e
        raise DecodeError, "metadata is not JSON: #{e.message.scrub[0, 200]}"
      end
      meta = request_fields(meta) if version_2
      raise DecodeError, "metadata is not a JSON object" unless meta.is_a?(Hash)

      body = raw.byteslice(6 + meta_len, raw.bytesize - 6 - meta_len)
      # A request names its body's length, even when it is 0.
      raise DecodeError, "request metadata: body_len missing" if "QUW".include?(kind.chr) && !meta.key?("body_len")

      # Frames without a body (credits, heads, ends) carry no body_len.
      # An Integer: JSON's 1.0 is no length, though Ruby's 1.0 == 1.
      body_len = meta.fetch("body_len", 0)
      unless body_len.is_a?(Integer) && body_len == body.bytesize
        raise DecodeError, "body is #{body.bytesize} bytes, body_len says #{meta["body_len"].inspect}"
      end

      [kind.chr, meta, body]
    end

    # A version 2 request's metadata array as version 1's object: the
    # first eleven elements by name (later ones are ignored), +flags+ as
    # +dedupe+ and +stream+. DecodeError when it is not such an array;
    # decode checks +body_len+ and Request every other field.
    def request_fields(meta)
      unless meta.is_a?(Array) && meta.size >= REQUEST_FIELDS_V2.size
        raise DecodeError, "version 2 request metadata is not an array of 11 elements"
      end

      fields = REQUEST_FIELDS_V2.zip(meta).to_h
      flags = fields.delete("flags")
      raise DecodeError, "request metadata: flags is not an integer from 0 to 2^53 - 1" unless json_integer?(flags)

      fields["dedupe"] = flags.anybits?(1)
      fields["stream"] = flags.anybits?(2)
      fields
    end

    # Whether +value+ is an integer of a request's metadata: from 0 to
    # MAX_JSON_INTEGER (JSON's +true+ is no Integer in Ruby).
    def json_integer?(value)
      value.is_a?(Integer) && value >= 0 && value <= MAX_JSON_INTEGER
    end

    # A header value from JSON (code points U+0000..U+00FF) as bytes.
    def latin1_bytes(text)
      text.encode(Encoding::ISO_8859_1).b
    end

    # Bytes as the JSON string of their ISO-8859-1 code points.
    def latin1_text(bytes)
      bytes.to_s.b.force_encoding(Encoding::ISO_8859_1).encode(Encoding::UTF_8)
    end

    def wire_headers(headers)
      headers.map { |name, value| [name, latin1_text(value)] }
    end

    # A whole response frame (+'R'+); +headers+ are +[name, bytes]+ pairs.
    def response(id, status, headers, body)
      encode("R", { "id" => id, "status" => status, "headers" => wire_headers(headers) }, body)
    end

    # The head of a streamed response (+'S'+). +run+ is unique to this run
    # of the request: a proxy drops a head with its stream's own +run+ as a
    # copy instead of aborting the stream (docs/protocol.md).
    def stream_head(id, status, headers, credit_to, window, run)
      encode("S", { "id" => id, "status" => status, "headers" => wire_headers(headers),
                    "credit_to" => credit_to, "window" => window, "run" => run })
    end

    # One piece of a streamed body (+'C'+), numbered from 0.
    def stream_chunk(id, seq, data)
      encode("C", { "id" => id, "seq" => seq }, data)
    end

    # The end of a streamed body (+'E'+): how many chunks, and why it was
    # cut short, if it was.
    def stream_end(id, chunks, aborted = nil)
      meta = { "id" => id, "chunks" => chunks }
      meta["aborted"] = aborted if aborted
      encode("E", meta)
    end

    # A dead letter (+'D'+) carrying +raw+, byte for byte.
    def dead_letter(raw, reason, by)
      encode("D", { "reason" => reason, "at_ms" => now_ms, "by" => by }, raw)
    end

    # A request envelope (kind +'Q'+), checked field by field.
    class Request
      FIELDS = { "id" => String, "method" => String, "uri" => String, "version" => String,
                 "reply_to" => String }.freeze

      attr_reader :id, :method, :uri, :version, :reply_to, :client_addr, :enqueued_at_ms,
                  :deadline_ms, :headers, :body

      def initialize(meta, body)
        FIELDS.each do |name, type|
          raise DecodeError, "request metadata: #{name} missing or not #{type}" unless meta[name].is_a?(type)
        end
        %w[enqueued_at_ms deadline_ms].each do |name|
          unless Protocol.json_integer?(meta[name])
            raise DecodeError, "request metadata: #{name} is not an integer from 0 to 2^53 - 1"
          end
        end
        raise DecodeError, "request metadata: headers is not a list" unless meta["headers"].is_a?(Array)

        @headers = meta["headers"].map do |pair|
          unless pair.is_a?(Array) && pair.size == 2 && pair.all?(String)
            raise DecodeError, "request metadata: a header is not [name, value]"
          end

          [pair[0], Protocol.latin1_bytes(pair[1])]
        rescue EncodingError
          raise DecodeError, "request metadata: a header value is not ISO-8859-1"
        end
        @id, @method, @uri, @version, @reply_to = meta.values_at("id", "method", "uri", "version", "reply_to")
        unless meta["client_addr"].nil? || meta["client_addr"].is_a?(String)
          raise DecodeError, "request metadata: client_addr is neither a string nor null"
        end
        %w[dedupe stream].each do |name|
          unless [true, false].include?(meta.fetch(name, false))
            raise DecodeError, "request metadata: #{name} is not a boolean"
          end
        end
        @client_addr = meta["client_addr"]
        @enqueued_at_ms = meta["enqueued_at_ms"]
        @deadline_ms = meta["deadline_ms"]
        @dedupe = meta["dedupe"] == true
        @stream = meta["stream"] == true
        @body = body
      end

      # Whether the producer asked for a single delivery (claimed by id).
      def dedupe?
        @dedupe
      end

      # Whether the producer reads streamed replies (+'S'+, +'C'+, +'E'+).
      def stream?
        @stream
      end

      # Whether a reaper may run it again: GET, HEAD or OPTIONS, or an
      # Idempotency-Key (docs/protocol.md, step 8).
      def safe_to_repeat?
        %w[GET HEAD OPTIONS].include?(@method) || @headers.any? { |name, _| name.casecmp?("idempotency-key") }
      end
    end

    # The Redis key names of one queue (docs/protocol.md, "Redis keys").
    class Keys
      attr_reader :queue, :prefix

      def initialize(queue)
        raise ArgumentError, "queue name #{queue.inspect}: 1 to 64 of A-Z a-z 0-9 . _ -" unless ID.match?(queue)

        @queue = queue
        @prefix = "anteroom:{#{queue}}:"
      end

      def requests = "#{prefix}requests"
      def dispatchers = "#{prefix}dispatchers"
      def paused = "#{prefix}paused"
      def dead = "#{prefix}dead"
      def processing(dispatcher_id) = "#{prefix}processing:#{dispatcher_id}"
      def credits(dispatcher_id) = "#{prefix}credits:#{dispatcher_id}"
      def dispatcher(dispatcher_id) = "#{prefix}dispatcher:#{dispatcher_id}"
      def claimed(request_id) = "#{prefix}claimed:#{request_id}"
      def repeats(request_id) = "#{prefix}repeats:#{request_id}"

      # Whether +key+ is a reply list of this queue: a dispatcher writes
      # to no other key, whatever an envelope says.
      def replies?(key)
        return false unless key.start_with?("#{prefix}replies:")

        ID.match?(key.delete_prefix("#{prefix}replies:"))
      end
    end
  end
end
