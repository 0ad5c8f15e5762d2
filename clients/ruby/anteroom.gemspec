# frozen_string_literal: true

require_relative "lib/anteroom/version"

Gem::Specification.new do |spec|
  spec.name = "anteroom"
  spec.version = Anteroom::VERSION
  spec.summary = "Anteroom dispatcher for Ruby: serve a Rack app (Rails, Sinatra) from an Anteroom queue in Redis"
  spec.description = "anteroom-rack pulls HTTP requests queued in Redis by the Anteroom proxy, runs them " \
                     "through a Rack app in this process, with no web server, and pushes the responses back."
  spec.authors = ["The Anteroom authors"]
  spec.licenses = ["MIT", "Apache-2.0"]
  spec.required_ruby_version = ">= 3.1"
  spec.files = Dir["lib/**/*.rb", "exe/*", "README.md"]
  spec.bindir = "exe"
  spec.executables = ["anteroom-rack"]
  spec.require_paths = ["lib"]
  spec.add_dependency "rack", ">= 2.2", "< 4"
  spec.add_dependency "redis", ">= 4.8", "< 6"
  spec.add_development_dependency "minitest", "~> 5.15"
  spec.add_development_dependency "rake", ">= 13"
end
