# frozen_string_literal: true

require "logger"
require "optparse"

require_relative "dispatcher"
require_relative "rack"

module Anteroom
  # +anteroom-rack [options] [config.ru]+: serve a Rack app from an Anteroom queue.
  module CLI
    UNITS = { "ms" => 0.001, "s" => 1, "m" => 60, "h" => 3600, nil => 1 }.freeze

    module_function

    # +"3s"+, +"500ms"+, +"1m"+ or plain seconds, as Float seconds;
    # OptionParser::InvalidArgument otherwise.
    def duration(text)
      m = text.to_s.strip.match(/\A([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h)?\z/)
      raise OptionParser::InvalidArgument, "not a duration: #{text.inspect} (e.g. 3s, 500ms, 1m)" unless m

      m[1].to_f * UNITS[m[2]]
    end

    def options(argv, env = ENV)
      opts = {
        redis: env.fetch("ANTEROOM_REDIS", "redis://127.0.0.1:6379"),
        queue: env.fetch("ANTEROOM_QUEUE", "default"),
        threads: Integer(env.fetch("ANTEROOM_THREADS", "8")),
        heartbeat_ttl: duration(env.fetch("ANTEROOM_HEARTBEAT_TTL", "10s")),
        grace: duration(env.fetch("ANTEROOM_GRACE", "30s"))
      }
      parser = OptionParser.new do |o|
        o.banner = "Usage: anteroom-rack [options] [config.ru]\n\n" \
                   "Serve a Rack app (Rails, Sinatra, Hanami, Roda) from an Anteroom queue in Redis.\n" \
                   "config.ru defaults to ./config.ru.\n\n"
        o.on("--redis URL", "Redis URL (env ANTEROOM_REDIS; default redis://127.0.0.1:6379)") { |v| opts[:redis] = v }
        o.on("--queue Q", "queue name (env ANTEROOM_QUEUE; default 'default')") { |v| opts[:queue] = v }
        o.on("--threads N", Integer, "requests run at once, each in a thread (env ANTEROOM_THREADS; default 8)") do |v|
          opts[:threads] = v
        end
        o.on("--heartbeat-ttl D", "heartbeat lifetime: silent this long, this dispatcher counts as dead " \
                                  "(env ANTEROOM_HEARTBEAT_TTL; default 10s)") { |v| opts[:heartbeat_ttl] = duration(v) }
        o.on("--grace D", "on SIGTERM or SIGINT, how long requests in hand may finish " \
                          "(env ANTEROOM_GRACE; default 30s)") { |v| opts[:grace] = duration(v) }
        o.on("-v", "--version", "print the version") do
          puts "anteroom-rack #{VERSION}"
          exit
        end
      end
      rest = parser.parse(argv)
      raise OptionParser::NeedlessArgument, rest[1..].join(" ") if rest.size > 1

      opts[:config] = rest.first || "config.ru"
      opts
    end

    # The Logger level named +name+ (debug, info, warn or warning, error,
    # fatal; any case, as Python's logging names them too); exits 2 otherwise.
    def log_level(name)
      level = name.to_s.downcase.sub(/\Awarning\z/, "warn")
      return level if %w[debug info warn error fatal].include?(level)

      warn "anteroom-rack: ANTEROOM_LOG=#{name.inspect} is not a log level (debug, info, warning, error)"
      exit 2
    end

    # The app a rackup file builds (rack 2's parse_file answers [app, options]).
    def load_app(path)
      require "rack"
      raise ArgumentError, "#{path}: no such file" unless File.file?(path)

      built = ::Rack::Builder.parse_file(path)
      built.is_a?(Array) ? built.first : built
    end

    def main(argv)
      opts = begin
        options(argv)
      rescue OptionParser::ParseError, ArgumentError => e
        warn "anteroom-rack: #{e.message} (see --help)"
        exit 2
      end
      $stdout.sync = true
      logger = Logger.new($stderr, level: log_level(ENV.fetch("ANTEROOM_LOG", "info")), progname: "anteroom")
      app = load_app(opts[:config])
      Dispatcher.new(->(request) { Anteroom::Rack.call(app, request) },
                     redis_url: opts[:redis], queue: opts[:queue], threads: opts[:threads],
                     heartbeat_ttl: opts[:heartbeat_ttl], grace: opts[:grace], label: "rack",
                     logger: logger).run
    end
  end
end
