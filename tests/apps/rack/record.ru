# A Rack app that records each request it runs: the path of every request
# to /run/ID is appended to the file named by RECORD_FILE, and answered 200
# `ran`. For the tests of lost replies with the Ruby dispatcher
# (tests/it/lost_replies.rs).
run lambda { |env|
  path = env["PATH_INFO"].to_s
  File.open(ENV.fetch("RECORD_FILE"), "a") { |f| f.puts(path.delete_prefix("/run/")) } if path.start_with?("/run/")
  [200, { "content-type" => "text/plain" }, ["ran\n"]]
}
