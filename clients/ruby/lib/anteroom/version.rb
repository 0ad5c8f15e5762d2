# frozen_string_literal: true

module Anteroom
  # The gem's version; the wire protocol has its own (Protocol::VERSION).
  VERSION = "0.1.0"
end
