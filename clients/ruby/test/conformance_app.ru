# frozen_string_literal: true

# The conformance kit's reference app as a Rack app (docs/clients.md):
# anteroom conformance -- exe/anteroom-rack test/conformance_app.ru
require "rack"

# The body of /stream: +n+ pieces, +ms+ apart, produced as they are read.
class Chunks
  def initialize(n, ms)
    @n = n
    @ms = ms
  end

  def each
    @n.times do |i|
      sleep(@ms / 1000.0) if i.positive?
      yield "chunk #{i}\n"
    end
  end
end

# The app. It takes ids from the path itself, never from $~: the $~ of a
# block is shared by every thread that calls it at once.
run(lambda do |env|
  path = env["PATH_INFO"]
  query = Rack::Utils.parse_query(env["QUERY_STRING"])
  case path
  when "/echo"
    body = env["rack.input"].read
    target = path + (env["QUERY_STRING"].empty? ? "" : "?#{env["QUERY_STRING"]}")
    headers = [["x-method", env["REQUEST_METHOD"]], ["x-target", target]]
    env.each do |key, value|
      next unless key.start_with?("HTTP_X_TEST_")

      # Rack joins repeated fields with commas: split them back.
      value.split(",").each { |part| headers << [key[5..].downcase.tr("_", "-"), part] }
    end
    # Rack 2 carries repeated fields as one value with newlines.
    grouped = headers.group_by(&:first).transform_values { |pairs| pairs.map(&:last).join("\n") }
    [200, grouped, [body]]
  when %r{\A/status/\d+\z}
    code = Integer(path.delete_prefix("/status/"))
    [code, { "x-status" => code.to_s }, ["status #{code}\n"]]
  when %r{\A/touch/[^/]+\z}
    File.open(ENV.fetch("ANTEROOM_CONFORMANCE_LOG"), "a") { |log| log.puts(path.delete_prefix("/touch/")) }
    sleep(Integer(query.fetch("ms", "0")) / 1000.0)
    [200, { "content-type" => "text/plain" }, ["touched\n"]]
  when "/stream"
    [200, { "content-type" => "text/plain" },
     Chunks.new(Integer(query.fetch("n", "3")), Integer(query.fetch("ms", "100")))]
  else
    [404, { "content-type" => "text/plain" }, ["not found\n"]]
  end
end)
