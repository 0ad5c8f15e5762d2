# A Rack app that records each request it runs: the path of every request
# to /run/ID is appended to the file named by RECORD_FILE, and answered 200
# `ran`; with the query `hang=1` only after 60 s. For the tests of lost
# replies and partitions with the Ruby dispatcher (tests/it/lost_replies.rs,
# tests/it/faults.rs).
run lambda { |env|
  path = env["PATH_INFO"].to_s
  File.open(ENV.fetch("RECORD_FILE"), "a") { |f| f.puts(path.delete_prefix("/run/")) } if path.start_with?("/run/")
  sleep 60 if env["QUERY_STRING"].to_s.split("&").include?("hang=1")
  [200, { "content-type" => "text/plain" }, ["ran\n"]]
}
