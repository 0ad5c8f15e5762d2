# frozen_string_literal: true

require "logger"
require "optparse"
require "uri"

require_relative "dispatcher"
require_relative "rack"
require_relative "version"

module Anteroom
  # +anteroom-rack [options] [config.ru]+: serve a Rack app from an Anteroom queue.
  module CLI
    UNITS = { "ms" => 0.001, "s" => 1, "m" => 60, "h" => 3600, nil => 1 }.freeze

    # The rackup file is not there (an app's own boot errors stay its own).
    class NoRackup < StandardError; end

    module_function

    # +"3s"+, +"500ms"+, +"1m"+ or plain seconds, as Float seconds;
    # OptionParser::InvalidArgument otherwise.
    def duration(text)
      m = text.to_s.strip.match(/\A([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h)?\z/)
      raise OptionParser::InvalidArgument, "not a duration: #{text.inspect} (e.g. 3s, 500ms, 1m)" unless m

      m[1].to_f * UNITS[m[2]]
    end

    # The variable +name+ of +env+ (or +default+) parsed by the block; an
    # error naming the variable when it does not parse.
    def from_env(env, name, default)
      yield env.fetch(name, default)
    rescue ArgumentError, OptionParser::ParseError => e
      raise OptionParser::InvalidArgument, "#{name}: #{e.message}"
    end

    # The options of +argv+ over those of +env+ (a Hash of the environment);
    # OptionParser::ParseError or ArgumentError when they are not valid.
    def options(argv, env = ENV)
      opts = {
        redis: env.fetch("ANTEROOM_REDIS", "redis://127.0.0.1:6379"),
        queue: env.fetch("ANTEROOM_QUEUE", "default"),
        threads: from_env(env, "ANTEROOM_THREADS", "8") { |v| Integer(v, 10) },
        heartbeat_ttl: from_env(env, "ANTEROOM_HEARTBEAT_TTL", "10s") { |v| duration(v) },
        grace: from_env(env, "ANTEROOM_GRACE", "30s") { |v| duration(v) }
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
        o.on("--heartbeat-ttl D", String, "heartbeat lifetime: silent this long, this dispatcher counts as dead " \
                                  "(env ANTEROOM_HEARTBEAT_TTL; default 10s)") { |v| opts[:heartbeat_ttl] = duration(v) }
        o.on("--grace D", "on SIGTERM or SIGINT, how long requests in hand may finish " \
                          "(env ANTEROOM_GRACE; default 30s)") { |v| opts[:grace] = duration(v) }
        o.on("-v", "--version", "print the version") do
          puts "anteroom-rack #{VERSION}"
          exit
        end
        o.on("-h", "--help", "print this help") do
          puts o
          exit
        end
        o.separator("\nEnvironment: ANTEROOM_REDIS, ANTEROOM_QUEUE, ANTEROOM_THREADS, ANTEROOM_HEARTBEAT_TTL,\n" \
                    "ANTEROOM_GRACE, ANTEROOM_LOG (debug, info, warning, error). The app's own environment\n" \
                    "(RACK_ENV, RAILS_ENV) is the app's: set RACK_ENV=production for production.")
      end
      rest = parser.parse(argv)
      raise OptionParser::NeedlessArgument, rest[1..].join(" ") if rest.size > 1
      raise OptionParser::InvalidArgument, "--threads #{opts[:threads]}: at least 1" if opts[:threads] < 1

      Protocol::Keys.new(opts[:queue]) # the name is checked before the app boots
      unless %w[redis rediss unix].include?(URI.parse(opts[:redis]).scheme)
        raise OptionParser::InvalidArgument, "--redis #{redacted(opts[:redis])}: a redis://, rediss:// or unix:// URL"
      end
      opts[:config] = rest.first || "config.ru"
      opts
    end

    # +url+ with its password hidden, for messages.
    def redacted(url)
      uri = URI.parse(url)
      uri.password = "***" if uri.password
      uri.to_s
    rescue URI::Error
      "(not a URL)"
    end

    # The Logger level named +name+ (debug, info, warn or warning, error,
    # fatal; any case, as Python's logging names them too); exits 2 otherwise.
    def log_level(name)
      level = name.to_s.downcase.sub(/\Awarning\z/, "warn")
      return level if %w[debug info warn error fatal].include?(level)

      warn "anteroom-rack: ANTEROOM_LOG=#{name.inspect} is not a log level (debug, info, warning, error, fatal)"
      exit 2
    end

    # The app a rackup file builds (rack 2's parse_file answers [app, options]).
    def load_app(path)
      require "rack"
      unless File.file?(path)
        raise NoRackup, "#{path}: no such rackup file (run from the app's directory, where config.ru is, " \
                             "or name the file)"
      end

      built = ::Rack::Builder.parse_file(path)
      built.is_a?(Array) ? built.first : built
    end

    def main(argv)
      opts = begin
        options(argv)
      rescue OptionParser::ParseError, ArgumentError => e
        warn "anteroom-rack: #{e.message} (see --help)"
        exit 2
      rescue URI::Error
        warn "anteroom-rack: --redis: not a URL (see --help)"
        exit 2
      end
      $stdout.sync = true
      logger = Logger.new($stderr, level: log_level(ENV.fetch("ANTEROOM_LOG", "info")), progname: "anteroom")
      app = begin
        load_app(opts[:config])
      rescue NoRackup => e
        warn "anteroom-rack: #{e.message}"
        exit 2
      end
      Dispatcher.new(->(request) { Anteroom::Rack.call(app, request) },
                     redis_url: opts[:redis], queue: opts[:queue], threads: opts[:threads],
                     heartbeat_ttl: opts[:heartbeat_ttl], grace: opts[:grace], label: "rack",
                     logger: logger).run
    rescue Redis::BaseError => e
      warn "anteroom-rack: cannot use Redis at #{redacted(opts[:redis])}: #{e.message}"
      exit 1
    end
  end
end
