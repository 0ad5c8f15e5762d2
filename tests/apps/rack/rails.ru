# frozen_string_literal: true

# A minimal Rails app in one rackup file, for anteroom-rack
# (tests/it/ruby_apps.rs): Debian's ruby-railties and ruby-actionpack.
require "json"
require "action_controller/railtie"

# The application: no database, no assets, nothing written to disk.
class RailsApp < Rails::Application
  config.root = __dir__
  config.eager_load = false
  config.logger = Logger.new(nil)
  config.secret_key_base = "anteroom-test-only"
  config.hosts.clear
  config.action_controller.allow_forgery_protection = false
end

# The routes every framework's test app answers.
class TestController < ActionController::Base
  def hello
    render plain: "hello from rails, #{params.fetch(:name, "world")}\n"
  end

  def echo
    render json: { framework: "rails", method: request.request_method, path: request.path,
                   body: request.raw_post.dup.force_encoding(Encoding::UTF_8),
                   header: request.headers["X-Test"]&.dup&.force_encoding(Encoding::ISO_8859_1)&.encode(Encoding::UTF_8) }
  end
end

# A streamed body: ActionController::Live writes as the action runs.
class StreamController < ActionController::Base
  include ActionController::Live

  def show
    response.headers["Content-Type"] = "text/plain"
    # Rack::ETag (in Rails' default stack) reads a whole body to digest it
    # unless it has a Last-Modified, under any server: the usual remedy.
    response.headers["Last-Modified"] = Time.now.httpdate
    response.stream.write("piece 0\n")
    sleep 0.6
    response.stream.write("piece 1\n")
  ensure
    response.stream.close
  end
end

RailsApp.routes.append do
  get "/hello" => "test#hello"
  post "/echo" => "test#echo"
  get "/stream" => "stream#show"
end
RailsApp.initialize!

run RailsApp
