# frozen_string_literal: true

# A Sinatra app for anteroom-rack (tests/it/ruby_apps.rs), and under Puma
# for the benchmark's Rack scenario.
require "json"
require "sinatra/base"

# The test app: the routes every framework's test app answers.
class SinatraApp < Sinatra::Base
  set :logging, false

  get "/hello" do
    content_type "text/plain"
    "hello from sinatra, #{params.fetch("name", "world")}\n"
  end

  post "/echo" do
    content_type :json
    JSON.generate(framework: "sinatra", method: request.request_method, path: request.path_info,
                  body: request.body.read.force_encoding(Encoding::UTF_8),
                  header: env["HTTP_X_TEST"]&.dup&.force_encoding(Encoding::ISO_8859_1)&.encode(Encoding::UTF_8))
  end

  get "/stream" do
    content_type "text/plain"
    stream do |out|
      out << "piece 0\n"
      sleep 0.6
      out << "piece 1\n"
    end
  end
end

run SinatraApp
