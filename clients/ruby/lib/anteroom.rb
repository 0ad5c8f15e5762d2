# frozen_string_literal: true

# Anteroom dispatchers for Ruby: serve a Rack app from an Anteroom queue in
# Redis (docs/protocol.md of the Anteroom repository), with no web server.
module Anteroom
end

require_relative "anteroom/version"
require_relative "anteroom/protocol"
require_relative "anteroom/rack"
require_relative "anteroom/dispatcher"
