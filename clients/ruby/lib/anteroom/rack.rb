# frozen_string_literal: true

require "stringio"

module Anteroom
  # Rack (the Rack specification, SPEC.rdoc of rack 2.2 and 3): a queued
  # request as a Rack environment, the app's answer as a response.
  module Rack
    # Fields that are not HTTP_* variables (the Rack spec, as CGI).
    SPECIAL = { "content-type" => "CONTENT_TYPE", "content-length" => "CONTENT_LENGTH" }.freeze

    module_function

    # The Rack environment of +request+ (a Protocol::Request). PATH_INFO
    # is the path as it came, not percent-decoded (as Puma and WEBrick
    # give it); header values are binary Strings, byte for byte.
    def env(request)
      path, query = request.uri.split("?", 2)
      path = "/" if path.nil? || path.empty?
      host = header(request, "host") || "localhost"
      name, port = split_host(host)
      proto = header(request, "x-forwarded-proto") == "https" ? "https" : "http"
      client_host, _, client_port = (request.client_addr || "").rpartition(":")
      version = request.version.start_with?("HTTP/1") ? request.version : "HTTP/1.1"
      env = {
        "REQUEST_METHOD" => request.method,
        "SCRIPT_NAME" => "",
        "PATH_INFO" => path,
        "QUERY_STRING" => query || "",
        "REQUEST_URI" => request.uri,
        "SERVER_NAME" => name,
        "SERVER_PORT" => port || (proto == "https" ? "443" : "80"),
        "SERVER_PROTOCOL" => version,
        "HTTP_VERSION" => version,
        "REMOTE_ADDR" => client_host.delete("[]"),
        "REMOTE_PORT" => client_port,
        "rack.version" => [1, 3],
        "rack.url_scheme" => proto,
        "rack.input" => StringIO.new(request.body.b),
        "rack.errors" => $stderr,
        "rack.multithread" => true,
        "rack.multiprocess" => false,
        "rack.run_once" => false,
        "rack.hijack?" => false,
        "anteroom.request_id" => request.id
      }
      request.headers.each do |field, value|
        # A name with "_" would pass for the dashed one (X_Forwarded_For as
        # X-Forwarded-For, which the proxy strips): dropped, as nginx and
        # gunicorn do (Puma since CVE-2024-45614).
        next if field.include?("_")

        key = SPECIAL[field] || "HTTP_#{field.upcase.tr("-", "_")}"
        if env.key?(key) && key.start_with?("HTTP_")
          # RFC 9110 section 5.3: repeated fields are one, comma-joined
          # (cookies with "; ", RFC 6265 section 5.4).
          env[key] = env[key] + (field == "cookie" ? "; " : ",") + value
        else
          env[key] = value
        end
      end
      env["CONTENT_LENGTH"] ||= request.body.bytesize.to_s unless request.body.empty?
      env
    end

    def header(request, name)
      request.headers.find { |field, _| field == name }&.last
    end

    # +[name, port or nil]+ of a Host value (+example.com:8080+, +[::1]:80+).
    def split_host(host)
      if (m = host.match(/\A(.*):(\d+)\z/)) && !m[1].empty?
        [m[1], m[2]]
      else
        [host, nil]
      end
    end

    # Runs +app+ on +request+: +[status, headers, body]+ with header names
    # lowercased and values as binary Strings (a Rack 2 value with
    # newlines, or a Rack 3 Array, is one field per line or element). The
    # body is a String when the app answered with an Array (all there at
    # once: +to_ary+ answers one), and otherwise the app's body itself, read with
    # +each+ as the stream goes and closed at the end (the Rack spec).
    def call(app, request)
      status, headers, body = app.call(env(request))
      answer(status, headers, body)
    rescue Exception # rubocop:disable Lint/RescueException -- the body is closed whatever failed
      body.close if body.respond_to?(:close)
      raise
    end

    # The app's answer as +[status, fields, body]+ (see #call); raises,
    # leaving the body to the caller to close, when it is not a Rack answer.
    def answer(status, headers, body)
      status = Integer(status)
      fields = []
      headers.each do |name, value|
        next if name.to_s.start_with?("rack.")

        values = value.is_a?(Array) ? value : value.to_s.split("\n")
        values.each { |v| fields << [name.to_s.downcase, v.to_s.b] }
      end
      # Rails' bodies answer to_ary with nil when they are not Arrays.
      pieces = body.respond_to?(:to_ary) ? body.to_ary : nil
      if pieces
        whole = +"".b
        pieces.each { |piece| whole << piece.to_s.b }
        body.close if body.respond_to?(:close)
        return [status, fields, whole]
      end
      unless body.respond_to?(:each)
        raise TypeError, "the Rack body responds to neither each nor to_ary (streaming bodies that take a stream are not supported)"
      end

      [status, fields, body]
    end
  end
end
