//! Anteroom as a reverse proxy in front of a real app (httpbin under
//! gunicorn), driven by real clients (Python's http.client, httpx over
//! HTTP/2, curl, raw sockets): answering while the client is still
//! sending (RFC 9112 §9.6, nginx's lingering close), request framing
//! (RFC 9112 §6), and request targets (§3.2).

use std::time::Duration;

use http::StatusCode;
use serde_json::Value;

use crate::support::httpbin::{HttpbinStack, python_client, raw, status_of};
use crate::support::web::{self, client};
use crate::support::{control, eventually};

const MIB: usize = 1 << 20;

/// An answer given before the request is all read (413, 400, 501, 431)
/// reaches a client that writes its whole body before reading, over
/// HTTP/1.1 (`Connection: close`, then the rest of the body is read and
/// discarded) and HTTP/2 (the stream ends after the answer). The 413 for
/// a chunked body comes once it streams past `--max-body`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_answers_reach_clients_still_sending() {
    let stack = HttpbinStack::start("early", &["--max-body", "8MiB"]).await;
    let url = format!("{}/anything", stack.url);
    let big = (16 * MIB).to_string();
    let some = (4 * MIB).to_string();
    let huge_field = format!("X-Big:{}", "a".repeat(70 * 1024));
    let cases: [(&str, Vec<&str>, u16); 6] = [
        (
            "Content-Length over --max-body",
            vec!["upload", &url, &big],
            413,
        ),
        (
            "chunked body passing --max-body",
            vec!["upload", &url, &big, "--chunked"],
            413,
        ),
        (
            "invalid Host",
            vec!["upload", &url, &some, "--header", "Host:a.example/x"],
            400,
        ),
        (
            "transfer coding other than chunked",
            vec![
                "upload",
                &url,
                &some,
                "--chunked",
                "--header",
                "Transfer-Encoding:gzip, chunked",
            ],
            501,
        ),
        (
            "head over --max-head (hyper's own answer)",
            vec!["upload", &url, &big, "--header", &huge_field],
            431,
        ),
        (
            "HTTP/2, over --max-body",
            vec!["h2-upload", &url, &big],
            413,
        ),
    ];
    for (what, args, status) in cases {
        let r = python_client(&args).await;
        assert_eq!(r["status"], status, "{what}: {r}");
        if r["version"] == "HTTP/1.1" {
            assert_eq!(r["connection"], "close", "{what}: {r}");
        } else {
            assert_eq!(r["version"], "HTTP/2", "{what}: {r}");
        }
    }

    // curl sends `Expect: 100-continue` with a large body and waits for
    // the answer before sending it; without it, it sends at once.
    let file = std::env::temp_dir().join(format!("anteroom-16mib-{}", std::process::id()));
    std::fs::write(&file, vec![b'c'; 16 * MIB]).unwrap();
    let mut outputs = Vec::new();
    for expect in ["Expect: 100-continue", "Expect:"] {
        let out = tokio::process::Command::new("curl")
            .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "-H", expect])
            .arg("--data-binary")
            .arg(format!("@{}", file.display()))
            .arg(&url)
            .output()
            .await;
        outputs.push((expect, out));
    }
    let _ = std::fs::remove_file(&file);
    for (expect, out) in outputs {
        let out = out.expect("curl runs");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "413",
            "curl with {expect:?}: {out:?}"
        );
    }

    // And the proxy goes on serving.
    let r = web::get(&client(), &url).await;
    assert_eq!(r.status, StatusCode::OK);
}

/// The waiting budget is taken on arrival: from `Content-Length` before
/// the body is read, and as bytes arrive for a chunked body. Over it, 503
/// with `Retry-After` at once, which the still-sending client reads.
/// (Bodies queued whole count; `--body-buffer` is raised so these are.
/// A streamed body counts only its first part: the rest waits in the
/// client, `uploads::a_paused_upload_waits_in_the_client`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_waiting_budget_answers_503_before_the_body() {
    let stack = HttpbinStack::start(
        "shed",
        &[
            "--max-waiting",
            "2",
            "--max-waiting-bytes",
            "9MiB",
            "--body-buffer",
            "8MiB",
        ],
    )
    .await;
    // Ordinary traffic on another proxy of the same app is not affected.
    let other = HttpbinStack::start("shed-monitor", &[]).await;
    let monitor = crate::support::monitor::Monitor::start(format!("{}/anything", other.url));
    let queue = control(&stack.redis, "shed").await;
    queue.pause("test", None, false).await.unwrap();
    let url = format!("{}/anything", stack.url);
    let waiting = r#"anteroom_proxy_waiting_requests{queue="shed"}"#;

    // 5 MiB held while the queue is paused.
    let held = {
        let url = url.clone();
        tokio::spawn(async move { web::post(&client(), &url, vec![b'h'; 5 * MIB]).await })
    };
    eventually("the first request to wait", Duration::from_secs(10), || {
        let stack = &stack;
        async move { stack.metric(waiting).await == 1.0 }
    })
    .await;
    let five = (5 * MIB).to_string();
    for args in [
        vec!["upload", &url, &five],
        vec!["upload", &url, &five, "--chunked"],
    ] {
        let r = python_client(&args).await;
        assert_eq!(r["status"], 503, "{args:?}: {r}");
        assert_eq!(r["retry_after"], "1", "{r}");
        assert_eq!(r["connection"], "close", "{r}");
    }
    // Refused on arrival, not once the body is in: a client that declares
    // 5 MiB and withholds it, or sends one 5 MiB chunk and stops, gets its
    // 503 at once (not a 408 at the body timeout).
    let started = std::time::Instant::now();
    let declared = format!(
        "POST /anything HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        5 * MIB
    );
    let mut chunked = format!(
        "POST /anything HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n",
        5 * MIB
    )
    .into_bytes();
    chunked.extend(vec![b'c'; 5 * MIB]);
    chunked.extend(b"\r\n");
    for request in [declared.into_bytes(), chunked] {
        let answer = raw(stack.proxy_addr, &request).await;
        assert_eq!(status_of(&answer), 503, "{answer}");
    }
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );

    // The count: a second request fits, a third does not.
    let second = {
        let url = url.clone();
        tokio::spawn(async move { web::get(&client(), &url).await })
    };
    eventually(
        "the second request to wait",
        Duration::from_secs(10),
        || {
            let stack = &stack;
            async move { stack.metric(waiting).await == 2.0 }
        },
    )
    .await;
    let r = python_client(&["upload", &url, "1024"]).await;
    assert_eq!(r["status"], 503, "{r}");
    assert_eq!(
        stack
            .metric(r#"anteroom_proxy_shed_total{queue="shed"}"#)
            .await,
        5.0
    );

    queue.resume().await.unwrap();
    let held = held.await.unwrap();
    assert_eq!(held.status, StatusCode::OK);
    let echoed: Value = serde_json::from_slice(&held.body).unwrap();
    assert_eq!(echoed["data"].as_str().map(str::len), Some(5 * MIB));
    assert_eq!(second.await.unwrap().status, StatusCode::OK);
    monitor.check(Duration::from_secs(2)).await;
}

/// RFC 9112 §6: message framing, each case on a raw socket through the
/// proxy to the app.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_framing_follows_rfc_9112_section_6() {
    let stack = HttpbinStack::start("framing", &[]).await;
    let refused: [(&str, &str, u16); 11] = [
        (
            "a transfer coding the proxy does not implement (§6.1)",
            "Transfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            501,
        ),
        (
            "the same, over two lines",
            "Transfer-Encoding: deflate\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            501,
        ),
        (
            "chunked applied twice (§6.1)",
            "Transfer-Encoding: chunked, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            400,
        ),
        (
            "chunked not the final coding (§6.3)",
            "Transfer-Encoding: chunked, gzip\r\n\r\nhello",
            400,
        ),
        (
            "no chunked at all (§6.3)",
            "Transfer-Encoding: gzip\r\n\r\nhello",
            400,
        ),
        (
            "Content-Length lines that disagree (§6.3)",
            "Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
            400,
        ),
        (
            "a Content-Length list (RFC 9110 §8.6 allows refusing it)",
            "Content-Length: 5, 5\r\n\r\nhello",
            400,
        ),
        (
            "a signed Content-Length",
            "Content-Length: +5\r\n\r\nhello",
            400,
        ),
        (
            "a negative Content-Length",
            "Content-Length: -1\r\n\r\nhello",
            400,
        ),
        (
            "a Content-Length past 2^64",
            "Content-Length: 99999999999999999999\r\n\r\nhello",
            400,
        ),
        (
            "a bad chunk size",
            "Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
            400,
        ),
    ];
    for (what, rest, status) in refused {
        let request = format!("POST /anything HTTP/1.1\r\nHost: app.example\r\n{rest}");
        let answer = raw(stack.proxy_addr, request.as_bytes()).await;
        assert_eq!(status_of(&answer), status, "{what}: {answer}");
        assert!(
            !answer.contains("\"data\""),
            "{what} reached the app: {answer}"
        );
    }

    // Transfer-Encoding in HTTP/1.0, which has none (§6.1): 400.
    let answer = raw(
        stack.proxy_addr,
        b"POST /anything HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&answer), 400, "{answer}");

    // Content-Length and Transfer-Encoding together (§6.3): framed by
    // Transfer-Encoding alone, the app gets "hello", and the connection
    // closes after the answer, so the request smuggled behind the
    // Content-Length framing is never answered.
    let answer = raw(
        stack.proxy_addr,
        b"POST /anything HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n\
          5\r\nhello\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&answer), 200, "{answer}");
    assert!(answer.contains("\"data\": \"hello\""), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );
    assert_eq!(answer.matches("HTTP/1.1 ").count(), 1, "{answer}");

    // Identical Content-Length lines are one value (RFC 9110 §8.6).
    let answer = raw(
        stack.proxy_addr,
        b"POST /anything HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
    )
    .await;
    assert_eq!(status_of(&answer), 200, "{answer}");
    assert!(answer.contains("\"data\": \"hello\""), "{answer}");

    // CONNECT (authority-form, §3.2.3) is for forward proxies: 501.
    let answer = raw(
        stack.proxy_addr,
        b"CONNECT app.example:443 HTTP/1.1\r\nHost: app.example:443\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&answer), 501, "{answer}");

    // The asterisk form (§3.2.4) reaches the app, which answers as it
    // does without the proxy.
    let options = b"OPTIONS * HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let direct = raw(stack.app_addr, options).await;
    let proxied = raw(stack.proxy_addr, options).await;
    assert_ne!(status_of(&direct), 0, "{direct}");
    assert_eq!(status_of(&proxied), status_of(&direct), "{proxied}");
}

/// Request targets with characters RFC 3986 says to percent-encode but
/// real clients send raw: what hyper accepts reaches the app exactly as it
/// does without the proxy; what it refuses (`"`, `<`, `>` in the query;
/// `<`, `>`, `` ` `` in the path; hyper's `http` crate) gets 400, logged
/// and counted, never silently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_targets_reach_the_app_as_sent_or_are_refused_visibly() {
    let stack = HttpbinStack::start("targets", &[]).await;
    let request = |target: &str| {
        format!("GET {target} HTTP/1.1\r\nHost: app.example\r\nConnection: close\r\n\r\n")
    };
    let json = |answer: &str| -> Value {
        let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {answer}"))
    };
    for target in [
        "/anything/{\"a\":1}|x",
        "/anything/[a]\\b^c",
        "/anything/%7B%22a%22%7D",
        "/anything/caf\u{e9}",
        "/anything?ids=[a1]&q={x}|y\\z^w`v'u",
        "/anything?name=caf\u{e9}&pct=%22",
        "/anything?a=1&a=2&empty=&flag",
    ] {
        let direct = raw(stack.app_addr, request(target).as_bytes()).await;
        let proxied = raw(stack.proxy_addr, request(target).as_bytes()).await;
        // gunicorn itself refuses raw non-ASCII in the request line; the
        // proxy passes it on and the app's answer comes back.
        assert_eq!(
            status_of(&proxied),
            status_of(&direct),
            "{target}: {proxied}\ndirect: {direct}"
        );
        if !target.is_ascii() {
            continue;
        }
        assert_eq!(status_of(&proxied), 200, "{target}: {proxied}");
        let (direct, proxied) = (json(&direct), json(&proxied));
        assert_eq!(proxied["url"], direct["url"], "{target}");
        assert_eq!(proxied["args"], direct["args"], "{target}");
    }

    let refused = r#"anteroom_proxy_refused_total{reason="target"}"#;
    for (n, target) in [
        "/anything?ids=[\"a1\"]",
        "/anything?a=<b>",
        "/anything/<b>",
        "/anything/`b`",
    ]
    .into_iter()
    .enumerate()
    {
        let answer = raw(stack.proxy_addr, request(target).as_bytes()).await;
        assert_eq!(status_of(&answer), 400, "{target}: {answer}");
        eventually("the refusal to be counted", Duration::from_secs(5), || {
            let stack = &stack;
            async move { stack.metric(refused).await == (n + 1) as f64 }
        })
        .await;
    }
    let log = stack.proxy_log();
    assert_eq!(
        log.matches("request refused by the HTTP parser").count(),
        4,
        "{log}"
    );
    assert!(log.contains("reason=\"target\""), "{log}");
}

/// Only a connection that answered early lingers: others close at once and
/// give back their `--max-connections` slot; a small refused body is read
/// and discarded so its connection stays open; an idle keep-alive
/// connection closed at the header timeout is not counted as refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_the_proxy_closes_are_not_held() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let stack = HttpbinStack::start(
        "closes",
        &[
            "--max-connections",
            "3",
            "--header-timeout",
            "1s",
            "--max-body",
            "16",
        ],
    )
    .await;
    // Three clients whose `Connection: close` requests were answered and
    // which keep their end open, as an idle pool does.
    let mut kept = Vec::new();
    for _ in 0..3 {
        let mut socket = tokio::net::TcpStream::connect(stack.proxy_addr)
            .await
            .unwrap();
        socket
            .write_all(b"GET /anything HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), socket.read_to_end(&mut answer))
            .await
            .expect("answered and closed")
            .unwrap();
        assert_eq!(status_of(&String::from_utf8_lossy(&answer)), 200);
        kept.push(socket);
    }
    // Their slots are free: a fourth client is served at once.
    let answer = raw(
        stack.proxy_addr,
        b"GET /anything HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&answer), 200, "{answer}");
    drop(kept);

    // A small body over --max-body is read and discarded: 413, and the
    // same connection serves the next request.
    let mut socket = tokio::net::TcpStream::connect(stack.proxy_addr)
        .await
        .unwrap();
    socket
        .write_all(
            b"POST /anything HTTP/1.1\r\nHost: x\r\nContent-Length: 20\r\n\r\n01234567890123456789\
              GET /anything HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), socket.read_to_end(&mut answer))
        .await
        .expect("both answered")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("too large\nHTTP/1.1 200"), "{answer}");

    // An idle keep-alive connection is closed at the header timeout, but
    // that is not a refused request.
    let mut socket = tokio::net::TcpStream::connect(stack.proxy_addr)
        .await
        .unwrap();
    socket
        .write_all(b"GET /anything HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), socket.read_to_end(&mut answer))
        .await
        .expect("closed at the header timeout")
        .unwrap();
    assert_eq!(status_of(&String::from_utf8_lossy(&answer)), 200);
    let metrics = stack.metrics().await;
    assert!(
        !metrics.contains("anteroom_proxy_refused_total{"),
        "{metrics}"
    );
    let log = stack.proxy_log();
    assert!(!log.contains("request refused"), "{log}");
}
