# frozen_string_literal: true

require "json"
require "logger"
require "securerandom"
require "socket"
require "redis"
begin
  require "redis/connection/hiredis"
rescue LoadError
  nil # the pure-Ruby driver
end

require_relative "protocol"

module Anteroom
  # The dispatcher loop (docs/protocol.md, "What a dispatcher does") for
  # any handler +call(request) -> [status, [[name, bytes]], body]+, where
  # body is a String (answered whole), or an object with +each+ yielding
  # Strings, streamed to a proxy that reads streams ("Streamed replies": a
  # head, chunks paced by the proxy's credits, an end) and joined for one
  # that does not. A body that responds to +close+ is closed once done.
  #
  # One thread pulls into this dispatcher's processing list, at most as
  # many held as there are worker threads: every free thread's worth at once
  # (+LMOVE+s in one script, one round trip), blocking with +BLMOVE+ only
  # when the queue is empty (docs/protocol.md, step 1). +threads+ workers
  # run the handler, and each completion takes the next request in the
  # same round trip while the queue holds one (so a busy worker never
  # waits for the pulling thread); one thread beats and one reads credits.
  # Each has its own Redis connection, so a blocked pull never holds up a
  # completion. Pauses
  # are seen before each pull and acknowledged in the heartbeat; SIGTERM or
  # SIGINT stops pulling, lets the requests in hand finish within the grace
  # period (seconds), then removes the heartbeat.
  class Dispatcher
    # How long a reply list lives without a new reply (as the Rust dispatcher), ms.
    REPLY_TTL_MS = 60_000
    # How long one blocked pull waits (s): a pause is seen at most this late.
    PULL_BLOCK_S = 0.1
    # Most bytes of a streamed body sent and not yet credited (1 MiB, the
    # Rust dispatcher's default window).
    WINDOW = 1024 * 1024
    # A stream whose client reads nothing with the window full this long
    # (s) is aborted (as the Rust dispatcher's --stream-idle-timeout).
    STREAM_IDLE_S = 60.0
    # redis-rb's driver: hiredis when it loaded, else the pure-Ruby one.
    DRIVER = defined?(Redis::Connection::Hiredis) ? :hiredis : :ruby
    # How often this dispatcher reaps dead ones (s; as the Rust dispatcher).
    REAP_EVERY_S = 5.0
    # How often the pause key is re-read while serving (s).
    PAUSE_POLL_S = 0.05
    # How long the reaper waits for a pass under way when stopping (s,
    # with 5 more): a reply is retried until its request's deadline.
    RETRY_S = 10.0
    # The pause between two tries of a failed write (s).
    RETRY_DELAY_S = 0.2
    # How long removing a request with no reply is retried (s; the Rust
    # dispatcher's minute).
    DISCARD_S = 60.0
    # After a failed pull, the processing list is looked at again once a
    # pull the failed connection had sent would surely have landed
    # (docs/protocol.md, "Lost replies").
    RECHECK_AFTER_S = PULL_BLOCK_S + 3.0
    # And every this long in any case: redis-rb does not always report a
    # reply lost with its connection (seen in tests: the pull returned as
    # if nothing had come), so the list is also swept on a timer (one
    # LRANGE of at most --threads items).
    SWEEP_EVERY_S = 2.0
    # A settling of orphans that failed is tried again after this long.
    RECONCILE_RETRY_S = 1.0
    # The answer to a handler that raised.
    FAILED = [502, [["content-type", "text/plain; charset=utf-8".b]],
              "the backend failed to handle the request\n".b].freeze

    attr_reader :id

    # +handler+ answers requests (see the class comment); +redis_url+ and
    # +queue+ say where from; +heartbeat_ttl+ and +grace+ are seconds.
    def initialize(handler, redis_url:, queue:, threads: 8, heartbeat_ttl: 10.0, grace: 30.0,
                   label: "ruby", logger: Logger.new($stderr))
      @handler = handler
      @redis_url = redis_url
      @keys = Protocol::Keys.new(queue)
      @threads = [threads.to_i, 1].max
      @heartbeat_ttl = [heartbeat_ttl.to_f, 0.3].max
      @grace = grace.to_f
      @label = label
      @log = logger
      @id = "rb-#{SecureRandom.hex(8)}"
      @processing = @keys.processing(@id)
      @credits_key = @keys.credits(@id)
      @started_at_ms = Protocol.now_ms
      @lock = Mutex.new
      @changed = ConditionVariable.new
      @in_flight = 0
      @stopping = false
      # Set once the grace period is over: the heartbeat and the credit
      # reader run until then, for the requests still in hand.
      @done = false
      @beat_now = false
      @acknowledged = nil
      @jobs = Queue.new
      # Reaped requests whose settling failed (raw => the dead dispatcher),
      # the reaper thread's alone.
      @unsettled = {}
      # Streams by request id: [bytes credited so far, whether the client is gone].
      @streams = {}
      # How many copies of each request (by its bytes) are in hand, under
      # @lock: what the processing list holds beyond these is an orphan of
      # a lost reply.
      @held = Hash.new(0)
      # Settling orphans and reaping exclude each other: what a reaping
      # pass claimed into the processing list is its own.
      @settling = Mutex.new
      # Set after a pull or a reaping pass failed (under @lock).
      @orphans_possible = false
      @recheck_at = nil
      # Completions under way that take the next request too (under @lock),
      # and whether a settling of orphans waits for them to land.
      @taking = 0
      @reconciling = false
      # The <n> of each claim's owner (hex, under @lock), from a random start:
      # a dispatcher restarted with a fixed id never takes an earlier run's
      # claim for its own.
      @deliveries = SecureRandom.random_number(2**48)
      # When the last heartbeat Redis took was sent (monotonic ms; nil: none).
      @beat_sent_at = nil
      @next_sweep = 0.0
      @reconcile_after = 0.0
    end

    # Serves until SIGTERM or SIGINT (trapped here, so call it from the
    # main thread) or until #stop.
    def run
      %w[TERM INT].each { |sig| trap(sig) { Thread.new { stop } } }
      redis = connect
      Protocol::CLOCK.read(redis)
      @started_at_ms = Protocol.now_ms
      redis.sadd?("anteroom:queues", @keys.queue)
      beat(redis)
      reaping = Thread.new { reaper }
      helpers = [Thread.new { heartbeat }, Thread.new { read_credits }]
      workers = Array.new(@threads) { Thread.new { work } }
      @log.info("dispatcher #{@id} serving queue #{@keys.queue} with #{@threads} threads")
      pull(redis)
      finish(redis, workers, helpers, reaping)
    end

    # Stops pulling; #run returns once the requests in hand are done or
    # the grace period is over.
    def stop
      @lock.synchronize do
        @stopping = true
        @beat_now = true
        @changed.broadcast
      end
    end

    private

    # A connection of its own for the calling thread. redis-rb's retry of
    # a command after a lost reply is turned off (reconnect_attempts 0): a
    # MULTI or a push run again could land twice; the callers here decide
    # what to retry. The C reply parser (hiredis, redis-rb's documented
    # fast driver) is used when installed.
    def connect
      Redis.new(url: @redis_url, reconnect_attempts: 0, timeout: 5.0, driver: DRIVER)
    end

    def stopping?
      @lock.synchronize { @stopping }
    end

    def done?
      @lock.synchronize { @done }
    end

    def finish(redis, workers, helpers, reaping)
      deadline = monotonic + @grace
      @lock.synchronize do
        while @in_flight.positive? && (left = deadline - monotonic).positive?
          @changed.wait(@lock, left)
        end
      end
      # A reap pass under way finishes first: what it claimed is in this
      # dispatcher's list, which must not lose its registry entry.
      reaping.join(RETRY_S + 5)
      left = @lock.synchronize { @in_flight }
      @threads.times { @jobs << nil }
      workers.each { |w| w.join(0.1) }
      @lock.synchronize do
        @done = true
        @changed.broadcast
      end
      helpers.each { |h| h.join(1.5) }
      redis.del(@keys.dispatcher(@id))
      # What is left in the processing list goes to the reaper, which
      # finds it through the registry entry: it stays while the list holds
      # anything.
      if redis.llen(@processing).zero?
        redis.zrem(@keys.dispatchers, @id)
      else
        @log.warn("grace period over with #{left} requests running; the reaper takes them from the processing list")
      end
      @log.info("dispatcher #{@id} stopped")
    end

    def monotonic
      Process.clock_gettime(Process::CLOCK_MONOTONIC)
    end

    # -- pulling -------------------------------------------------------------

    def paused(redis)
      record = redis.get(@keys.paused)
      return nil if record.nil?

      id = begin
        JSON.parse(record.dup.force_encoding(Encoding::UTF_8))["id"]
      rescue JSON::ParserError, EncodingError, TypeError, NoMethodError
        nil
      end
      # Anything else still means paused; its raw value is the id.
      id.is_a?(String) ? id : Protocol.latin1_text(record)
    end

    def pull(redis)
      checked = -PAUSE_POLL_S
      pause_id = nil
      until stopping?
        reconcile_or_retry(redis) if orphans_due?
        begin
          # The pause key is re-read every PAUSE_POLL_S, not before every
          # pull: a pull between a pause and its acknowledgement is allowed
          # (the pause waits for the acknowledgement).
          if monotonic - checked >= PAUSE_POLL_S
            pause_id = paused(redis)
            checked = monotonic
          end
          if pause_id != @acknowledged
            # No pull is outstanding here: acknowledged at once.
            @acknowledged = pause_id
            wake_heartbeat
          end
          if pause_id
            sleep 0.05
            next
          end
          free = wait_free(0.05)
          next if free.zero?

          # Pulled only while this dispatcher's heartbeat is known to live
          # (its last beat sent under half the TTL ago): cut off longer than
          # the TTL, it was reaped (its registry entry removed), and a
          # request pulled before its next beat would have no reaper should
          # it die. (redis-rb reconnects by itself, so a failed pull is not
          # always seen.)
          beat(redis) if beat_stale?
          take(redis, free).each { |raw| @jobs << raw }
        rescue Redis::BaseError => e
          @log.warn("pulling failed: #{e.message}; retrying")
          pull_failed
          sleep 0.5
        end
      end
    end

    # -- orphans of lost replies (docs/protocol.md, "Lost replies") ----------

    # A pull (or a completion's take) failed: its reply may have been lost
    # after Redis moved requests into the processing list. Looked at now,
    # and again once a pull the failed connection sent would have landed.
    def pull_failed
      @lock.synchronize do
        @orphans_possible = true
        @recheck_at = monotonic + RECHECK_AFTER_S
      end
    end

    # Whether the processing list is to be looked at now (the pull loop
    # asks, with no pull outstanding): after a failure, at its recheck, and
    # every SWEEP_EVERY_S.
    def orphans_due?
      now = monotonic
      @lock.synchronize do
        if (@recheck_at && now >= @recheck_at) || now >= @next_sweep
          @recheck_at = nil if @recheck_at && now >= @recheck_at
          @next_sweep = now + SWEEP_EVERY_S
          @orphans_possible = true
        end
        @orphans_possible && now >= @reconcile_after
      end
    end

    # #reconcile, unless a reaping pass is under way (the pull loop does
    # not wait for it: tried again shortly, as after a failure).
    def reconcile_or_retry(redis)
      @lock.synchronize { @orphans_possible = false }
      return retry_reconcile unless @settling.try_lock

      begin
        reconcile(redis) if takes_landed
      ensure
        @lock.synchronize { @reconciling = false }
        @settling.unlock
      end
    rescue Redis::BaseError => e
      @log.warn("settling orphans failed (#{e.message}); trying again shortly")
      retry_reconcile
    end

    # Stops completions from taking requests and waits (at most 1 s) for
    # those under way to land and count what they took as held: false (the
    # settling is tried again shortly) when they did not.
    def takes_landed
      deadline = monotonic + 1.0
      @lock.synchronize do
        @reconciling = true
        while @taking.positive? && (left = deadline - monotonic).positive?
          @changed.wait(@lock, left)
        end
        return true if @taking.zero?
      end
      retry_reconcile
      false
    end

    def retry_reconcile
      @lock.synchronize do
        @orphans_possible = true
        @reconcile_after = monotonic + RECONCILE_RETRY_S
      end
    end

    # Settles what the processing list holds beyond the requests in hand,
    # as the Rust dispatcher does: a copy of a request in hand (a producer's
    # repeated push) is only removed; any other item, a request whose pull
    # reply was lost (never run) or that a lost claim reply moved here, is
    # settled as a reaper settles a dead dispatcher's, its 502 pushed only
    # if it is still in the list. The caller holds @settling.
    def reconcile(redis)
      in_hand = @lock.synchronize { @held.dup }
      copies = []
      orphans = []
      redis.lrange(@processing, 0, -1).each do |raw|
        if in_hand[raw].positive?
          in_hand[raw] -= 1
        elsif in_hand.key?(raw)
          copies << raw
        elsif !@unsettled.key?(raw) # else the reaper's, retried by it
          orphans << raw
        end
      end
      copies.each { |raw| redis.lrem(@processing, 1, raw) }
      orphans.each { |raw| settle(redis, raw, @id, guarded: true) }
      return if copies.empty? && orphans.empty?

      @log.warn("settled #{orphans.size} requests in the processing list that no task held (a lost reply); " \
                "removed #{copies.size} copies of requests in hand")
    end

    # How many more requests may be held (waits up to +timeout+ s for one).
    def wait_free(timeout)
      @lock.synchronize do
        @changed.wait(@lock, timeout) if @in_flight >= @threads
        @threads - @in_flight
      end
    end

    # Moves up to +free+ requests into the processing list: their LMOVEs in
    # one script (PULL_WHEN_FULL, which also runs while Redis is over its
    # maxmemory), then a BLMOVE for one when that found none. Each taken
    # request counts as in flight from here.
    def take(redis, free)
      taken = redis.eval(Protocol::PULL_WHEN_FULL, keys: [@keys.requests, @processing], argv: [free])
      if taken.empty?
        raw = redis.blmove(@keys.requests, @processing, "RIGHT", "LEFT", timeout: PULL_BLOCK_S)
        taken = raw ? [raw] : []
      end
      @lock.synchronize do
        @in_flight += taken.size
        taken.each { |raw| @held[raw] += 1 }
      end
      taken
    end

    # Runs requests from @jobs, and each next one its completion took
    # (#complete_and_take), which keeps the finished one's place.
    def work
      redis = connect
      raw = @jobs.pop
      while raw
        taken = nil
        begin
          taken = handle(redis, raw)
        rescue StandardError => e
          @log.error("handling a request failed (the reaper answers it once this dispatcher is gone): " \
                     "#{e.class}: #{e.message}")
        ensure
          @lock.synchronize do
            @held.delete(raw) if (@held[raw] -= 1) <= 0
            unless taken
              @in_flight -= 1
              @changed.broadcast
            end
          end
        end
        raw = taken || @jobs.pop
      end
    end

    # -- one request ---------------------------------------------------------

    # +[kind, request]+ of +raw+ when it is a request a producer of this
    # queue could have written (docs/protocol.md, step 2); otherwise it is
    # set aside, the reason prefixed with +found+, and nil.
    def accepted(redis, raw, found = "")
      begin
        kind, meta, body = Protocol.decode(raw)
        raise Protocol::DecodeError, "kind #{kind.inspect} is not a request" unless %w[Q U W].include?(kind)

        request = Protocol::Request.new(meta, body)
      rescue Protocol::DecodeError, EncodingError, JSON::JSONError => e
        set_aside(redis, raw, "#{found}does not decode: #{e.message}")
        return nil
      end
      unless @keys.replies?(request.reply_to)
        set_aside(redis, raw, "#{found}reply_to #{request.reply_to.inspect} is not a reply list of queue #{@keys.queue}")
        return nil
      end

      [kind, request]
    end

    # Serves +raw+; the next request when its completion took one
    # (#complete_and_take), else nil.
    def handle(redis, raw)
      kind, request = accepted(redis, raw)
      return nil unless request

      now = Protocol.now_ms
      if request.deadline_ms - now > Protocol::MAX_HOLD_MS
        set_aside(redis, raw, "deadline more than 24 h ahead")
        return nil
      end
      if now >= request.deadline_ms # the client has its 504
        discard(redis, raw, request)
        return nil
      end

      if (refused = Protocol::REFUSED[kind])
        # Known, not served: the client hears why at once, instead of
        # waiting out its hold budget while the request lies dead.
        @log.warn("refusing #{request.method} #{request.uri}: #{refused[2].strip}")
        complete(redis, raw, request, Protocol.response(request.id, *refused))
        return nil
      end

      if request.dedupe?
        ttl = [request.deadline_ms - now + REPLY_TTL_MS, 1].max
        unless claim(redis, request, ttl) # another delivery has it
          discard(redis, raw, request)
          return nil
        end
      end

      status, headers, out = answer(request)
      unless out.is_a?(String)
        stream(redis, raw, request, status, headers, out)
        return nil
      end
      complete_and_take(redis, raw, request, Protocol.response(request.id, status, headers, out))
    end

    # The handler's answer; a body that is not a String becomes one unless
    # the producer reads streams.
    def answer(request)
      status, headers, out = @handler.call(request)
      return [status, headers, out] if out.is_a?(String) || request.stream?

      whole = +"".b
      begin
        out.each { |piece| whole << piece.to_s.b }
      ensure
        out.close if out.respond_to?(:close)
      end
      [status, headers, whole]
    rescue Exception => e # rubocop:disable Lint/RescueException -- as Puma: the app's failure is the client's 502
      raise if e.is_a?(SignalException) || e.is_a?(SystemExit)

      @log.error("the app failed on #{request.method} #{request.uri}: #{e.class}: #{e.message}")
      FAILED
    end

    # Pushes the last frame of +request+ and removes it from the processing
    # list in one script (docs/protocol.md, step 5; COMPLETE_WHEN_FULL,
    # which also runs while Redis is over its maxmemory). A lost connection
    # or any other failure is retried until +until_ms+ (#retrying; by
    # default the request's deadline); a reply Redis refuses for good
    # (WRONGTYPE, NOPERM) is given up and the request removed alone.
    def complete(redis, raw, request, frame, until_ms = request.deadline_ms)
      retrying(request, until_ms) do
        redis.eval(Protocol::COMPLETE_WHEN_FULL, keys: [@processing, request.reply_to], argv: [REPLY_TTL_MS, raw, frame])
      rescue Redis::CommandError => e
        raise unless refused_for_good?(e)

        @log.error("Redis refused the reply to #{request.id} (#{e.message}); giving it up")
        redis.lrem(@processing, 1, raw)
      end
    end

    # #complete, taking the next request in the same round trip when this
    # dispatcher would pull now (COMPLETE_AND_TAKE: not while stopping,
    # paused, settling orphans or with a heartbeat that may be near its
    # end): the request taken, counted as held, or nil. After a failure the
    # take may have landed with its reply lost: the completion is retried
    # alone, and the processing list looked at as after a failed pull.
    def complete_and_take(redis, raw, request, frame)
      chain = @lock.synchronize do
        next false if @stopping || @acknowledged || @reconciling || beat_stale?

        @taking += 1
      end
      return complete(redis, raw, request, frame).then { nil } unless chain

      taken = nil
      begin
        keys = [@processing, request.reply_to, @keys.requests, @keys.paused]
        taken = redis.eval(Protocol::COMPLETE_AND_TAKE, keys: keys, argv: [REPLY_TTL_MS, raw, frame])
      rescue Redis::BaseError => e
        @log.warn("completing #{request.id} and taking the next failed (#{e.message}); completing it alone")
        lost = !refused_for_good?(e)
      ensure
        @lock.synchronize do
          @taking -= 1
          @held[taken] += 1 if taken
          @changed.broadcast if @reconciling && @taking.zero?
        end
      end
      pull_failed if lost
      complete(redis, raw, request, frame) if e
      taken
    end

    # Runs the block; after a Redis failure (a lost connection, a
    # failover, OOM, READONLY) again every RETRY_DELAY_S until +until_ms+:
    # by default +request+'s deadline, as the Rust dispatcher does
    # (docs/protocol.md, step 5), since a reply after it reaches no one; a
    # stream, which outlives its deadline, passes its own (#stream_until).
    # A refusal for good (WRONGTYPE, NOPERM) is raised at once, the last
    # failure then.
    def retrying(request, until_ms = request.deadline_ms)
      yield
    rescue Redis::BaseError => e
      raise if refused_for_good?(e) || Protocol.now_ms + (RETRY_DELAY_S * 1000) >= until_ms

      @log.warn("writing for #{request.id} failed (#{e.message}); retrying")
      sleep RETRY_DELAY_S
      retry
    end

    # Removes +raw+ from the processing list with no reply (expired,
    # another delivery's, its client gone): housekeeping, retried for
    # DISCARD_S as the Rust dispatcher does; what is left stays for the
    # reaper should this dispatcher die.
    def discard(redis, raw, request)
      retrying(request, Protocol.now_ms + (DISCARD_S * 1000).to_i) { redis.lrem(@processing, 1, raw) }
    rescue Redis::BaseError => e
      @log.error("cannot remove #{request.id} from the processing list (#{e.message})")
    end

    # A token unique to one run of one request, "<dispatcher id>/<n>": a
    # claim's owner, and a stream head's run.
    def delivery
      "#{@id}/#{@lock.synchronize { @deliveries += 1 }.to_s(16)}"
    end

    # Claims a +dedupe+ request (SET NX, docs/protocol.md step 3): false
    # when another delivery has it. The claim names this delivery,
    # "<dispatcher id>/<n>". After a failure (its answer may be what was
    # lost; or Redis, over its maxmemory, refused the SET) it is asked again
    # with the CLAIM_WHEN_FULL script, which also knows this delivery's own
    # claim, until the deadline; past it the request is not run (as the Rust
    # dispatcher).
    def claim(redis, request, ttl)
      key = @keys.claimed(request.id)
      owner = delivery
      begin
        return redis.set(key, owner, nx: true, px: ttl) ? true : false
      rescue Redis::BaseError => e
        @log.warn("claiming #{request.id} failed (#{e.message}); asking again") unless full?(e)
      end
      retrying(request) { redis.eval(Protocol::CLAIM_WHEN_FULL, keys: [key], argv: [owner, ttl]) } == 1
    rescue Redis::BaseError => e
      @log.warn("cannot claim #{request.id} (#{e.message}) by its deadline; not running it")
      false
    end

    # Until when a write of a stream is retried: a stream may run past its
    # request's deadline, so at least STREAM_IDLE_S from now (as the Rust
    # dispatcher's stream writes).
    def stream_until(request)
      [request.deadline_ms, Protocol.now_ms + (STREAM_IDLE_S * 1000).to_i].max
    end

    # Whether Redis refused for want of memory (OOM: maxmemory reached
    # under noeviction). Inside a MULTI, redis-rb 4.8 reports it as
    # EXECABORT without the cause, which the allow-oom scripts then retry:
    # they do the same, and fail as the MULTI would for any other cause.
    def full?(error)
      error.message.start_with?("OOM", "EXECABORT") || error.message.include?("maxmemory")
    end

    # Whether Redis refused a write for good: a reply list that holds
    # something else, or an ACL that forbids it; retrying cannot help. (A
    # command a script runs that the ACL forbids answers "ERR The user
    # executing the script can't run this command"; an ACL refusal inside a
    # MULTI reaches redis-rb 4.8 as EXECABORT, which is retried until the
    # deadline.)
    def refused_for_good?(error)
      error.is_a?(Redis::CommandError) &&
        (error.message.start_with?("WRONGTYPE", "NOPERM") || error.message.include?("executing the script can't run"))
    end

    def push(redis, request, frame)
      retrying(request, stream_until(request)) do
        redis.pipelined do |p|
          p.rpush(request.reply_to, frame)
          p.pexpire(request.reply_to, REPLY_TTL_MS)
        end
      end
    end

    # Streams +body+ (each yields Strings): the head now, a chunk for each
    # piece as the window allows, then the end with the request's removal
    # from the processing list in one script. A client that is gone (a
    # cancel) gets nothing more; an app that fails mid-body, or a client
    # that reads nothing for STREAM_IDLE_S, gets an aborted end.
    def stream(redis, raw, request, status, headers, body)
      @lock.synchronize { @streams[request.id] = [0, false] }
      seq = 0
      sent = 0
      aborted = nil
      push(redis, request, Protocol.stream_head(request.id, status, headers, @credits_key, WINDOW, delivery))
      begin
        body.each do |chunk|
          chunk = chunk.to_s.b
          (0...chunk.bytesize).step(Protocol::MAX_CHUNK) do |at|
            piece = chunk.byteslice(at, Protocol::MAX_CHUNK)
            case room(request.id, sent, piece.bytesize)
            when :gone
              discard(redis, raw, request) # the client is gone
              return
            when :idle
              raise IOError, "the client read nothing for #{STREAM_IDLE_S.round}s"
            end
            push(redis, request, Protocol.stream_chunk(request.id, seq, piece))
            seq += 1
            sent += piece.bytesize
          end
        end
      rescue StandardError => e # the stream is cut short, never ended cleanly
        @log.warn("stream aborted: #{e.message}")
        aborted = e.message.empty? ? e.class.name : e.message
      end
      complete(redis, raw, request, Protocol.stream_end(request.id, seq, aborted), stream_until(request))
    ensure
      @lock.synchronize { @streams.delete(request.id) }
      body.close if body.respond_to?(:close)
    end

    # Waits until +length+ more bytes fit in the window: :ok, :gone (the
    # client cancelled) or :idle (nothing credited within STREAM_IDLE_S).
    def room(request_id, sent, length)
      deadline = monotonic + STREAM_IDLE_S
      @lock.synchronize do
        loop do
          consumed, cancel = @streams.fetch(request_id, [0, true])
          return :gone if cancel
          return :ok if sent + length <= [consumed, sent].min + WINDOW || sent == consumed

          left = deadline - monotonic
          return :idle if left <= 0

          @changed.wait(@lock, left)
        end
      end
    end

    # Pops this dispatcher's credit list (+'A'+ frames from proxies) until it stops.
    def read_credits
      redis = connect
      until done?
        begin
          popped = redis.call("BLMPOP", 1, 1, @credits_key, "LEFT", "COUNT", 256)
        rescue Redis::BaseError => e
          @log.warn("reading credits failed: #{e.message}")
          sleep 0.5
          next
        end
        Array(popped && popped[1]).each { |frame| credit(frame) }
      end
    end

    def credit(frame)
      kind, meta, = Protocol.decode(frame)
      return unless kind == "A"

      @lock.synchronize do
        state = @streams[meta.fetch("id")]
        if state
          state[0] = [state[0], Integer(meta.fetch("consumed", 0))].max
          state[1] ||= meta["cancel"] == true
          @changed.broadcast
        end
      end
    rescue Protocol::DecodeError, KeyError, TypeError, ArgumentError
      @log.warn("discarding a credit-list frame that does not decode")
    end

    def set_aside(redis, raw, reason)
      reason = reason.dup.force_encoding(Encoding::UTF_8).scrub
      @log.error("moving an envelope to the dead-letter list: #{reason}")
      redis.multi do |m|
        m.lpush(@keys.dead, Protocol.dead_letter(raw, reason, @id))
        m.lrem(@processing, 1, raw)
      end
    end

    # -- reaping (docs/protocol.md, step 8) ----------------------------------

    # Reaps every REAP_EVERY_S until this dispatcher stops.
    def reaper
      redis = connect
      until stopping?
        deadline = monotonic + REAP_EVERY_S
        @lock.synchronize do
          # @changed wakes on every completion: wait out the whole interval.
          until @stopping || (left = deadline - monotonic) <= 0
            @changed.wait(@lock, left)
          end
        end
        next if stopping?

        begin
          @settling.synchronize { reap(redis) }
        rescue StandardError => e # the next pass tries again
          # A claim whose reply was lost has moved a dead dispatcher's
          # requests into this one's list unseen.
          @lock.synchronize { @orphans_possible = true }
          @log.warn("reaping failed: #{e.message}")
        end
      end
    end

    # One pass: claims the processing list of each registered dispatcher
    # whose heartbeat is gone (the CLAIM script, so one reaper wins each
    # list) into this one's, then settles each request.
    def reap(redis)
      @unsettled.to_a.each { |raw, dead| settle_or_keep(redis, raw, dead) }
      redis.zrange(@keys.dispatchers, 0, -1).each do |dead|
        next if dead == @id
        return if stopping?

        items = redis.eval(Protocol::CLAIM, keys: [@keys.dispatcher(dead), @keys.processing(dead), @processing,
                                                   @keys.dispatchers], argv: [dead])
        next if items.nil? || items.empty?

        @log.warn("reaping #{items.size} requests of dispatcher #{dead}, whose heartbeat expired")
        items.each { |raw| settle_or_keep(redis, raw, dead) }
      end
    end

    # Settles +raw+; when that fails it stays in this dispatcher's list and
    # is tried again at the next pass, and the others go on.
    def settle_or_keep(redis, raw, dead)
      settle(redis, raw, dead)
      @unsettled.delete(raw)
    rescue StandardError => e
      @log.warn("settling a reaped request failed (#{e.message}); trying again at the next pass")
      @unsettled[raw] = dead
    end

    # A dead dispatcher's request, now in this one's processing list: set
    # aside when no producer of this queue wrote it; dropped when past its
    # deadline; put back at the end pulled next when safe to repeat, at
    # most MAX_REPEATS times; otherwise answered 502, since it may or may
    # not have run. +dead+ is the dispatcher it was claimed from (this
    # one's own id for an orphan of a lost reply, which is +guarded+: its
    # 502 is pushed only if it is still in the list).
    def settle(redis, raw, dead, guarded: false)
      found = guarded ? "found in the processing list with no task holding it; " : "found in a dead dispatcher's list; "
      kind, request = accepted(redis, raw, found)
      return unless request

      now = Protocol.now_ms
      return discard(redis, raw, request) if now >= request.deadline_ms

      if kind == "Q" && request.safe_to_repeat?
        done = redis.eval(Protocol::REQUEUE,
                          keys: [@processing, @keys.requests, @keys.claimed(request.id), @keys.repeats(request.id)],
                          argv: [raw, dead, Protocol::MAX_REPEATS, [request.deadline_ms - now, 1].max,
                                 @keys.dispatcher("")])
        return unless done == 2 # back in the queue, or no longer this reaper's
      end
      # Bounded by RETRY_S too: a stop waits for the reaper's pass.
      until_ms = [request.deadline_ms, Protocol.now_ms + (RETRY_S * 1000).to_i].min
      frame = Protocol.response(request.id, *Protocol::INTERRUPTED)
      if guarded
        retrying(request, until_ms) do
          redis.eval(Protocol::COMPLETE_IF_HELD, keys: [@processing, request.reply_to],
                                                 argv: [REPLY_TTL_MS, raw, frame])
        end
        return
      end
      complete(redis, raw, request, frame, until_ms)
    end

    # -- heartbeat -----------------------------------------------------------

    def wake_heartbeat
      @lock.synchronize do
        @beat_now = true
        @changed.broadcast
      end
    end

    def beat(redis)
      pause_id = @acknowledged
      record = { id: @id, host: Socket.gethostname, pid: Process.pid, label: @label,
                 concurrency: @threads, in_flight: @lock.synchronize { @in_flight },
                 paused: !pause_id.nil?, pause_id: pause_id, started_at_ms: @started_at_ms }
      sent = Protocol::Clock.monotonic_ms
      # TIME first: each beat also reads the queue's clock.
      ttl_ms = (@heartbeat_ttl * 1000).to_i
      reply = redis.pipelined do |p|
        p.time
        p.set(@keys.dispatcher(@id), JSON.generate(record), px: ttl_ms)
        p.zadd(@keys.dispatchers, Protocol.now_ms, @id)
      end
      @beat_sent_at = sent
      Protocol::CLOCK.observe(reply[0], sent, Protocol::Clock.monotonic_ms)
    rescue Redis::CommandError => e
      # Redis over its maxmemory refuses the SET, not PEXPIRE: the heartbeat
      # lives on with its last contents, so this dispatcher does not look
      # dead to the reapers.
      raise unless full?(e) && redis.pexpire(@keys.dispatcher(@id), ttl_ms)

      @beat_sent_at = sent
    end

    # Whether the heartbeat may be near its end: the last one Redis took was
    # sent half its TTL ago or more (it lives at least the TTL from its
    # sending), so it is written again before the next pull.
    def beat_stale?
      @beat_sent_at.nil? || Protocol::Clock.monotonic_ms - @beat_sent_at >= @heartbeat_ttl * 500
    end

    def heartbeat
      redis = connect
      loop do
        @lock.synchronize do
          deadline = monotonic + (@heartbeat_ttl / 3)
          until @beat_now || @done || (left = deadline - monotonic) <= 0
            @changed.wait(@lock, left)
          end
          @beat_now = false
        end
        return if done?

        begin
          beat(redis)
        rescue StandardError => e # a missed beat is absorbed by the TTL
          @log.warn("heartbeat failed: #{e.message}")
        end
      end
    end
  end
end
