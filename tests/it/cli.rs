//! The `anteroom` binary as users run it: real processes, real signals.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::Duration;

use anteroom_protocol::Keys;
use anteroom_testkit::free_port;
use http::StatusCode;

use crate::support::app::{Upstream, test_app};
use crate::support::bin::{BinProcess, command};
use crate::support::wait_for_port as wait_for_listener;
use crate::support::web::{self, client};
use crate::support::{TestDispatcher, eventually, keys, llen, redis_conn, start_redis};

const READY: Duration = Duration::from_secs(15);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_and_upstream_dispatcher_processes_round_trip() {
    let redis = start_redis();
    let upstream = Upstream::start().await;
    let (_proxy, base) = crate::support::bin::start_proxy(&redis, "cli", "10s").await;
    // Configured through the environment instead of flags.
    let _dispatcher = BinProcess::spawn_cmd(
        command()
            .arg("dispatch")
            .env("ANTEROOM_REDIS", redis.url())
            .env("ANTEROOM_QUEUE", "cli")
            .env("ANTEROOM_UPSTREAM", upstream.url())
            .env("ANTEROOM_CONCURRENCY", "4")
            .stdout(Stdio::null()),
    );
    let c = client();
    let r = web::post(&c, &format!("{base}/echo"), "through two processes").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.text(), "through two processes");
    let mut conn = redis_conn(&redis).await;
    let live = keys(&mut conn, "anteroom:{cli}:dispatcher:*").await;
    assert_eq!(live.len(), 1);
    let hb: String = redis::cmd("GET")
        .arg(&live[0])
        .query_async(&mut conn)
        .await
        .unwrap();
    let hb: serde_json::Value = serde_json::from_str(&hb).unwrap();
    assert_eq!(hb["concurrency"], 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_waiting_request_finish_then_exits_zero() {
    let redis = start_redis();
    let port = free_port().unwrap();
    let listen = format!("127.0.0.1:{port}");
    let mut proxy = BinProcess::spawn(&[
        "proxy",
        "--listen",
        &listen,
        "--redis",
        &redis.url(),
        "--queue",
        "term",
        "--grace",
        "20s",
    ]);
    wait_for_listener(port).await;

    // A request waits in Redis: no dispatcher yet.
    let c = client();
    let url = format!("http://{listen}/echo");
    let waiting = tokio::spawn({
        let c = c.clone();
        async move { web::post(&c, &url, "patience").await }
    });
    let requests = Keys::new("term").unwrap().requests();
    let mut conn = redis_conn(&redis).await;
    eventually("the request to be queued", READY, || {
        let (mut conn, key) = (conn.clone(), requests.clone());
        async move { llen(&mut conn, &key).await == 1 }
    })
    .await;

    proxy.terminate();
    // The proxy stops accepting new connections...
    eventually("the listener to close", READY, || async move {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
    })
    .await;
    assert!(
        proxy.child().try_wait().unwrap().is_none(),
        "exited with a request waiting"
    );
    // ...but the waiting request is answered once a dispatcher appears.
    let dispatcher = TestDispatcher::start(&redis, "term", test_app());
    let r = waiting.await.unwrap();
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.text(), "patience");
    let status = proxy.wait(READY).await;
    assert!(status.success(), "proxy exited with {status}");
    dispatcher.stop().await;
    assert_eq!(llen(&mut conn, &requests).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispatcher_sigterm_finishes_in_flight_work() {
    let redis = start_redis();
    let upstream = Upstream::start().await;
    let proxy = crate::support::TestProxy::start(&redis, "drain").await;
    let mut dispatcher = BinProcess::spawn(&[
        "dispatch",
        "--redis",
        &redis.url(),
        "--queue",
        "drain",
        "--upstream",
        &upstream.url(),
    ]);
    let c = client();
    let slow = tokio::spawn({
        let (c, url) = (c.clone(), proxy.url("/slow?ms=1500"));
        async move { web::get(&c, &url).await }
    });
    // Wait until the dispatcher holds the request, then stop it.
    let mut conn = redis_conn(&redis).await;
    eventually("the dispatcher to take the request", READY, || {
        let mut conn = conn.clone();
        async move {
            let held = keys(&mut conn, "anteroom:{drain}:processing:*").await;
            !held.is_empty()
        }
    })
    .await;
    dispatcher.terminate();
    let r = slow.await.unwrap();
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.text(), "done\n");
    let status = dispatcher.wait(READY).await;
    assert!(status.success(), "dispatcher exited with {status}");
    // Clean exit: heartbeat and processing list gone.
    assert!(
        keys(&mut conn, "anteroom:{drain}:dispatcher:*")
            .await
            .is_empty()
    );
    assert!(
        keys(&mut conn, "anteroom:{drain}:processing:*")
            .await
            .is_empty()
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_serves_the_quickstart_requests() {
    let port = free_port().unwrap();
    let mut demo = BinProcess::spawn_cmd(
        command()
            .args(["demo", "--listen", &format!("127.0.0.1:{port}")])
            .stdout(Stdio::piped()),
    );
    let stdout = demo.child().stdout.take().unwrap();
    let banner = tokio::task::spawn_blocking(move || {
        let mut lines = Vec::new();
        let mut reader = BufReader::new(stdout);
        // Up to the last line, `... resume --redis URL --queue demo`.
        while !lines
            .last()
            .is_some_and(|l: &String| l.contains(" resume "))
        {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap() == 0 {
                break;
            }
            lines.push(line);
        }
        lines
    })
    .await
    .unwrap();
    assert_eq!(
        banner[0].trim(),
        format!("Anteroom demo is up: http://127.0.0.1:{port}/")
    );
    // The printed status line works as pasted, on the demo's own Redis.
    let status_line = banner
        .iter()
        .find(|l| l.contains(" status --redis "))
        .expect("a ready-to-paste status line");
    let words: Vec<&str> = status_line.split_whitespace().collect();
    let out = std::process::Command::new(words[0])
        .args(&words[1..])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{status_line}");
    assert!(text.contains("queue demo: running"), "{text}");
    let c = client();
    // The printed pause and resume lines, as pasted: a request waits in
    // Redis while paused (the status line shows it), and is answered on
    // resume.
    let run_line = |needle: &'static str| {
        let line = banner
            .iter()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("a ready-to-paste{needle}line"))
            .clone();
        async move {
            let words: Vec<String> = line.split_whitespace().map(String::from).collect();
            tokio::task::spawn_blocking(move || {
                std::process::Command::new(&words[0])
                    .args(&words[1..])
                    .output()
                    .unwrap()
            })
            .await
            .unwrap()
        }
    };
    let paused = run_line(" pause --redis ").await;
    assert!(paused.status.success(), "{paused:?}");
    let waiting = {
        let (c, url) = (c.clone(), format!("http://127.0.0.1:{port}/hello"));
        tokio::spawn(async move { web::get(&c, &url).await })
    };
    crate::support::eventually("the request waiting", Duration::from_secs(10), || async {
        let out = run_line(" status --redis ").await;
        String::from_utf8_lossy(&out.stdout).contains("waiting       1")
    })
    .await;
    assert!(!waiting.is_finished(), "answered while paused");
    let resumed = run_line(" resume --redis ").await;
    assert!(resumed.status.success(), "{resumed:?}");
    let r = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("answered after resume")
        .unwrap();
    assert_eq!(r.status, StatusCode::OK);
    let r = web::get(&c, &format!("http://127.0.0.1:{port}/hello")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.text().contains("travelled through Redis"), "{}", r.text());
    let r = web::post(&c, &format!("http://127.0.0.1:{port}/echo"), "ping").await;
    assert_eq!(r.text(), "ping");
    // The banner's upload, run as printed: 100 MB streamed through Redis
    // to the app and back.
    let upload = banner
        .iter()
        .find(|l| l.contains("curl -sT"))
        .expect("an upload line");
    let out = tokio::process::Command::new("sh")
        .args(["-c", upload.trim()])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{upload}: {out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "104857600");
    // The banner's event stream: each event arrives as it is written, the
    // second about its interval after the first.
    assert!(
        banner
            .iter()
            .any(|l| l.contains("curl -N") && l.contains("/events"))
    );
    let req = http::Request::get(format!("http://127.0.0.1:{port}/events?n=2&ms=300"))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let resp = c.request(req).await.unwrap();
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.into_body();
    let mut arrivals = Vec::new();
    while let Some(frame) = http_body_util::BodyExt::frame(&mut body).await {
        if frame
            .unwrap()
            .into_data()
            .is_ok_and(|d| d.starts_with(b"id: "))
        {
            arrivals.push(std::time::Instant::now());
        }
    }
    assert_eq!(arrivals.len(), 2);
    let apart = arrivals[1] - arrivals[0];
    assert!(
        apart >= Duration::from_millis(200),
        "events arrived together ({apart:?})"
    );
    // Asked for over plain HTTP, it says what to upgrade to (RFC 9110
    // section 15.5.22: a 426 carries Upgrade, through the proxy too).
    let plain = web::get(&c, &format!("http://127.0.0.1:{port}/ws")).await;
    assert_eq!(plain.status, StatusCode::UPGRADE_REQUIRED);
    assert_eq!(plain.headers["upgrade"], "websocket");
    // The banner's WebSocket echoes.
    assert!(
        banner
            .iter()
            .any(|l| l.contains(&format!("ws://127.0.0.1:{port}/ws")))
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}/ws"))
        .await
        .unwrap();
    use futures_util::{SinkExt, StreamExt};
    ws.send(tokio_tungstenite::tungstenite::Message::text(
        "through Redis",
    ))
    .await
    .unwrap();
    let echo = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(echo.into_text().unwrap().as_str(), "through Redis");
    ws.close(None).await.unwrap();
    demo.terminate();
    let status = demo.wait(READY).await;
    assert!(status.success(), "demo exited with {status}");
}

#[test]
fn invalid_flags_are_refused_with_usage() {
    let out = command()
        .args(["proxy", "--hold", "soon"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--hold"), "{err}");

    let out = command()
        .args([
            "dispatch",
            "--queue",
            "no{braces}",
            "--upstream",
            "http://127.0.0.1:1",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("invalid queue name"), "{err}");
}

#[test]
fn demo_without_redis_server_says_what_to_install() {
    let out = command()
        .args(["demo", "--listen", "127.0.0.1:0"])
        .env("PATH", "/nonexistent")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("redis-server was not found on PATH"), "{err}");
    assert!(err.contains("apt-get install redis-server"), "{err}");
}

/// The README's control examples, run as written against a queue a proxy
/// and a dispatcher serve: only the Redis address (the `export` line), the
/// binary's path and the window's script are this test's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_control_examples_run_as_written() {
    let redis = start_redis();
    let proxy = crate::support::TestProxy::start(&redis, "web").await;
    let dispatcher = TestDispatcher::start(&redis, "web", crate::support::app::test_app());
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let block = readme
        .split("```sh\n")
        .find(|b| b.starts_with("export ANTEROOM_REDIS="))
        .and_then(|b| b.split("```").next())
        .expect("the README's control examples");
    let mut ran = 0;
    for line in block.lines().filter(|l| l.starts_with("anteroom ")) {
        let example = line.split(" #").next().unwrap().trim();
        let words: Vec<&str> = example
            .split_whitespace()
            .skip(1)
            .map(|w| {
                if w == "./switch-db-primary.sh" {
                    "true"
                } else {
                    w
                }
            })
            .collect();
        let out = command()
            .args(&words)
            .env("ANTEROOM_REDIS", redis.url())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{example}: {}\n{stdout}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains(&redis.url()),
            "{example} did not name its redis:\n{stdout}"
        );
        ran += 1;
    }
    assert_eq!(ran, 4, "{block}");
    dispatcher.stop().await;
    proxy.stop().await;
}

/// A component that fails stops its process at once, with its name and
/// its error: the demo's proxy and dispatcher cannot reach Redis, and the
/// demo exits 1 within the connect timeout instead of serving half.
#[test]
fn a_failed_component_stops_the_process_with_its_name() {
    let closed = free_port().unwrap();
    let started = std::time::Instant::now();
    let out = command()
        .args(["demo", "--listen", "127.0.0.1:0", "--redis"])
        .arg(format!("redis://127.0.0.1:{closed}"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("proxy failed") || err.contains("dispatcher failed"),
        "{err}"
    );
    assert!(err.contains("redis"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
}

/// Output to a pipe its reader has closed (`anteroom status | head -1`)
/// ends quietly: exit 0, no panic ("failed printing to stdout").
#[test]
fn output_to_a_closed_pipe_ends_quietly() {
    let redis = start_redis();
    let mut child = command()
        .args(["status", "--redis", &redis.url()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Closed before it writes: it connects to Redis first.
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert!(out.status.success(), "{:?}: {err}", out.status);
}
