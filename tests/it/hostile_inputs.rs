//! Hostile inputs against real processes (the `anteroom` binary as proxy
//! and dispatcher, httpbin under gunicorn, a private redis-server), each
//! while a monitor sends ordinary requests and checks none of them fails
//! or stalls.

use std::time::{Duration, Instant};

use anteroom_protocol::{DeadLetter, HttpVersion, Keys, RequestEnvelope, ResponseEnvelope, now_ms};
use bytes::Bytes;
use http::StatusCode;

use crate::support::httpbin::HttpbinStack;
use crate::support::monitor::Monitor;
use crate::support::web::{self, client};
use crate::support::{eventually, redis_conn};

fn envelope(id: &str, reply_to: &str) -> RequestEnvelope {
    RequestEnvelope {
        id: id.into(),
        method: "GET".into(),
        uri: "/anything".into(),
        version: HttpVersion::Http11,
        headers: vec![("host".into(), Bytes::from_static(b"app.example"))],
        body: Bytes::new(),
        reply_to: reply_to.into(),
        client_addr: None,
        enqueued_at_ms: now_ms(),
        deadline_ms: now_ms() + 20_000,
        dedupe: false,
        stream: false,
        body_follows: false,
        websocket: false,
    }
}

/// Envelopes pushed straight into the queue by someone with Redis write
/// access: a `reply_to` naming an unrelated key, a deadline a year ahead,
/// 40,000 header fields (past the 32,768 at which `http::HeaderMap`
/// panics), and a reply list that is not a list. None is run against its
/// key, none panics a dispatcher, the invalid one is answered 502, and
/// ordinary requests keep flowing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_envelopes_are_set_aside_and_nothing_stalls() {
    let stack = HttpbinStack::start("foreign", &[]).await;
    let keys = Keys::new("foreign").unwrap();
    let mut conn = redis_conn(&stack.redis).await;
    let monitor = Monitor::start(format!("{}/anything", stack.url));

    let _: () = redis::cmd("SET")
        .arg("session:42")
        .arg("precious")
        .query_async(&mut conn)
        .await
        .unwrap();
    // A reply list of this queue's form that holds a string.
    let squatted = keys.replies("squatter");
    let _: () = redis::cmd("SET")
        .arg(&squatted)
        .arg("not a list")
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut far = envelope("far", &keys.replies("p"));
    far.deadline_ms = now_ms() + 365 * 24 * 3600 * 1000;
    let mut many = envelope("many", &keys.replies("victim-proxy"));
    many.headers = (0..40_000)
        .map(|i| (format!("x-h{i}"), Bytes::from_static(b"v")))
        .collect();
    for env in [
        envelope("foreign", "session:42"),
        far,
        many,
        envelope("squatted", &squatted),
    ] {
        let _: () = redis::cmd("LPUSH")
            .arg(keys.requests())
            .arg(env.encode())
            .query_async(&mut conn)
            .await
            .unwrap();
    }

    crate::support::until_llen(&conn, &keys.dead(), 3).await;
    let dead: Vec<Bytes> = redis::cmd("LRANGE")
        .arg(keys.dead())
        .arg(0)
        .arg(-1)
        .query_async(&mut conn)
        .await
        .unwrap();
    let reasons: Vec<String> = dead
        .into_iter()
        .map(|raw| DeadLetter::decode(raw).unwrap().reason)
        .collect();
    assert!(
        reasons.iter().any(|r| r.contains("is not a reply list")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("deadline")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("40000 header fields")),
        "{reasons:?}"
    );
    // The unrelated key is untouched: same value, no TTL.
    let value: String = redis::cmd("GET")
        .arg("session:42")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(value, "precious");
    let ttl: i64 = redis::cmd("PTTL")
        .arg("session:42")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(ttl, -1);
    // The invalid request's client is answered 502.
    crate::support::until_llen(&conn, &keys.replies("victim-proxy"), 1).await;
    let replies: Vec<Bytes> = redis::cmd("LRANGE")
        .arg(keys.replies("victim-proxy"))
        .arg(0)
        .arg(-1)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(replies.len(), 1);
    let reply = ResponseEnvelope::decode(replies[0].clone()).unwrap();
    assert_eq!((reply.id.as_str(), reply.status), ("many", 502));

    // The squatted reply list's completion is given up without holding
    // the others back: the monitor's requests all went through at once.
    tokio::time::sleep(Duration::from_secs(2)).await;
    monitor.check(Duration::from_secs(2)).await;
}

/// Limits and header rules hold on both protocols and cannot be talked
/// around: `--max-headers` over HTTP/2 as over HTTP/1, `Connection: host`
/// does not strip `Host`, forwarding headers the proxy does not set are
/// removed, and routes see the normalised path (and the target's
/// authority over `Host`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_and_routes_hold_on_both_protocols() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Requests routed to `admin` find no dispatcher there: 504 after 300 ms.
    let config = crate::support::config_file(
        "[[proxy.routes]]\npath_prefix = \"/admin/\"\nqueue = \"admin\"\nhold = \"300ms\"\n\n\
         [[proxy.routes]]\nhost = \"admin.example\"\nqueue = \"admin\"\nhold = \"300ms\"\n",
    );
    let stack = HttpbinStack::start("limits", &["--config", config.to_str().unwrap()]).await;
    let monitor = Monitor::start(format!("{}/anything", stack.url));

    // 600 fields, over the default 500: 431 on both protocols.
    for (c, what) in [
        (client(), "HTTP/1.1"),
        (crate::support::web::h2c_client(), "HTTP/2"),
    ] {
        let mut req = http::Request::get(format!("{}/anything", stack.url));
        for i in 0..600 {
            req = req.header(format!("x-f{i}"), "v");
        }
        let r = web::try_send(&c, req.body(Default::default()).unwrap()).await;
        let status = r
            .map(|r| r.status)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(
            status,
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "{what}"
        );
    }

    let raw = |request: String| {
        let addr = stack.proxy_addr;
        async move {
            let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
            socket.write_all(request.as_bytes()).await.unwrap();
            let mut answer = Vec::new();
            tokio::time::timeout(Duration::from_secs(10), socket.read_to_end(&mut answer))
                .await
                .expect("answered and closed")
                .unwrap();
            String::from_utf8_lossy(&answer).into_owned()
        }
    };
    // Connection: host keeps Host; spoofable forwarding headers are gone.
    let answer = raw(
        "GET /headers HTTP/1.1\r\nHost: app.example\r\nConnection: host, close\r\n\
         Forwarded: for=10.0.0.1;host=evil.example\r\nX-Forwarded-Host: evil.example\r\n\
         X-Forwarded-Port: 1\r\nX-Forwarded-Prefix: /evil\r\nX-Real-IP: 10.0.0.1\r\n\
         X-Forwarded-Server: evil.example\r\nX-Forwarded-Ssl: on\r\nX-Forwarded-Scheme: https\r\n\
         Front-End-Https: on\r\nClient-IP: 10.0.0.1\r\nX-Client-IP: 10.0.0.1\r\n\
         True-Client-IP: 10.0.0.1\r\nX-Cluster-Client-IP: 10.0.0.1\r\n\r\n"
            .into(),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"Host\": \"app.example\""), "{answer}");
    for spoofed in [
        "Forwarded",
        "X-Forwarded-Host",
        "X-Forwarded-Port",
        "X-Forwarded-Prefix",
        "X-Real-Ip",
        "X-Forwarded-Server",
        "X-Forwarded-Ssl",
        "X-Forwarded-Scheme",
        "Front-End-Https",
        "Client-Ip",
        "X-Client-Ip",
        "True-Client-Ip",
        "X-Cluster-Client-Ip",
    ] {
        assert!(
            !answer.contains(&format!("\"{spoofed}\"")),
            "{spoofed} passed: {answer}"
        );
    }

    // Routes match the normalised path, whatever spelling reaches them,
    // and the absolute-form authority, not a disagreeing Host.
    for target in [
        "/admin/x",
        "/%61dmin/x",
        "//admin/x",
        "/admin%2Fx",
        "http://admin.example/anything",
    ] {
        let answer = raw(format!(
            "GET {target} HTTP/1.1\r\nHost: app.example\r\nConnection: close\r\n\r\n"
        ))
        .await;
        assert!(
            answer.starts_with("HTTP/1.1 504"),
            "{target} was not routed to admin: {answer}"
        );
    }
    // Dot segments, which apps read differently (gunicorn serves them
    // literally), are refused rather than routed one way and read another.
    for target in [
        "/anything/../admin/x",
        "/anything/%2e%2e/admin/x",
        "/anything/./x",
    ] {
        let answer = raw(format!(
            "GET {target} HTTP/1.1\r\nHost: app.example\r\nConnection: close\r\n\r\n"
        ))
        .await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{target}: {answer}");
    }
    let answer = raw(
        "GET /anything/admin/x HTTP/1.1\r\nHost: app.example\r\nConnection: close\r\n\r\n".into(),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    monitor.check(Duration::from_secs(2)).await;
}

/// Connections that hold a slot without doing anything are closed: one
/// that sends nothing, one that sends half the HTTP/2 preface, an HTTP/2
/// connection idle after its preface (at the header timeout); and clients
/// that do not read their answer (an HTTP/1 socket never read, an HTTP/2
/// window kept at 0) lose their connection at the send timeout. With the
/// connection cap at 8, ordinary requests get through afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_non_reading_clients_lose_their_connections() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let stack = HttpbinStack::start(
        "silent",
        &[
            "--max-connections",
            "8",
            "--header-timeout",
            "1s",
            "--send-timeout",
            "1s",
        ],
    )
    .await;
    let closes = |mut socket: tokio::net::TcpStream| async move {
        let started = Instant::now();
        let mut sink = vec![0u8; 64 * 1024];
        loop {
            match tokio::time::timeout(Duration::from_secs(15), socket.read(&mut sink)).await {
                Ok(Ok(0) | Err(_)) => return started.elapsed(),
                Ok(Ok(_)) => {}
                Err(_) => panic!("still open after 15 s"),
            }
        }
    };
    let mut held = Vec::new();
    for opening in [
        &b""[..],
        &b""[..],
        &b""[..],
        &b""[..],
        &b""[..],
        b"PRI * HTTP/2.0\r\n",
        // The whole preface and an empty SETTINGS frame, then nothing.
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00",
    ] {
        let mut socket = tokio::net::TcpStream::connect(stack.proxy_addr)
            .await
            .unwrap();
        socket.write_all(opening).await.unwrap();
        held.push(tokio::spawn(closes(socket)));
    }
    let mut latest = Duration::ZERO;
    for closed in held {
        let after = closed.await.unwrap();
        assert!(after < Duration::from_secs(10), "closed after {after:?}");
        latest = latest.max(after);
    }
    println!(
        "silent, half-preface and idle HTTP/2 sockets: all closed within {latest:?} (header timeout 1 s)"
    );
    let r = web::get(&client(), &format!("{}/anything", stack.url)).await;
    assert_eq!(r.status, StatusCode::OK);
    // An idle HTTP/2 connection is closed even while PINGs keep bytes
    // moving on it.
    let r = crate::support::httpbin::python_client(&[
        "h2-idle-pings",
        &format!("{}/anything", stack.url),
        "0",
    ])
    .await;
    let after = r["closed_after"].as_f64().unwrap_or_else(|| panic!("{r}"));
    assert!(after < 10.0, "{r}");
    println!(
        "idle HTTP/2 connection sending PINGs: closed {after} s after its last answer (header timeout 1 s)"
    );

    let monitor = Monitor::start(format!("{}/anything", stack.url));
    // HTTP/1: 100 pipelined requests for 100 KB each, from a client with a
    // 4 KiB receive buffer that never reads.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut socket = socket.connect(stack.proxy_addr).await.unwrap();
    socket
        .write_all(&b"GET /bytes/102400 HTTP/1.1\r\nHost: x\r\n\r\n".repeat(100))
        .await
        .unwrap();
    eventually(
        "the stalled answer to be dropped",
        Duration::from_secs(20),
        || {
            let stack = &stack;
            async move { stack.proxy_log().contains("client not reading its answer") }
        },
    )
    .await;
    drop(socket);
    // HTTP/2: a window of 0, never opened.
    let r = crate::support::httpbin::python_client(&[
        "h2-stall",
        &format!("{}/bytes/1000", stack.url),
        "0",
    ])
    .await;
    let after = r["closed_after"].as_f64().unwrap_or_else(|| panic!("{r}"));
    assert!(after < 10.0, "{r}");
    println!(
        "HTTP/2 client with a window of 0: connection closed after {after} s (send timeout 1 s)"
    );
    monitor.check(Duration::from_secs(2)).await;
}

/// The admin endpoint without a token answers only to IP-address or
/// localhost `Host`s (DNS rebinding), refuses cross-site and form POSTs,
/// forbids framing, and holds at most 64 connections, which silent clients
/// lose after 10 s; an empty token, or no token beyond loopback, is
/// refused at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_endpoint_resists_browsers_and_idle_sockets() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let stack = HttpbinStack::start("adm", &[]).await;
    let admin: std::net::SocketAddr = stack.admin.trim_start_matches("http://").parse().unwrap();
    let exchange = |request: String| async move {
        let mut socket = tokio::net::TcpStream::connect(admin).await.unwrap();
        socket.write_all(request.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), socket.read_to_end(&mut answer))
            .await
            .expect("answered")
            .unwrap();
        String::from_utf8_lossy(&answer).into_owned()
    };
    let queue = crate::support::control(&stack.redis, "adm").await;
    for (what, extra) in [
        (
            "a cross-site form",
            "Origin: http://evil.example\r\nSec-Fetch-Site: cross-site\r\n\
             Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 0\r\n",
        ),
        ("a foreign Origin", "Origin: http://evil.example\r\n"),
        (
            "a form content type",
            "Content-Type: text/plain\r\nContent-Length: 0\r\n",
        ),
    ] {
        let answer = exchange(format!(
            "POST /pause HTTP/1.1\r\nHost: {admin}\r\n{extra}Connection: close\r\n\r\n"
        ))
        .await;
        assert!(answer.starts_with("HTTP/1.1 403"), "{what}: {answer}");
        assert!(
            queue.pause_state().await.unwrap().is_none(),
            "{what} paused the queue"
        );
    }
    let answer = exchange(
        "GET /status HTTP/1.1\r\nHost: evil.example:9180\r\nConnection: close\r\n\r\n".into(),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    let answer = exchange(format!(
        "GET / HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n"
    ))
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let lower = answer.to_ascii_lowercase();
    assert!(lower.contains("x-frame-options: deny"), "{answer}");
    assert!(lower.contains("frame-ancestors 'none'"), "{answer}");
    // What curl sends still works; the page's own fetch (same origin) too.
    let answer = exchange(format!(
        "POST /pause HTTP/1.1\r\nHost: {admin}\r\nOrigin: http://{admin}\r\nSec-Fetch-Site: same-origin\r\nConnection: close\r\n\r\n"
    ))
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(queue.pause_state().await.unwrap().is_some());
    queue.resume().await.unwrap();

    // 64 silent sockets fill the admin endpoint; the proxy itself is not
    // affected, and they are closed after 10 s.
    let monitor = Monitor::start(format!("{}/anything", stack.url));
    let mut silent = Vec::new();
    for _ in 0..64 {
        silent.push(tokio::net::TcpStream::connect(admin).await.unwrap());
    }
    let r = web::get(&client(), &format!("{}/anything", stack.url)).await;
    assert_eq!(r.status, StatusCode::OK);
    let started = Instant::now();
    for mut socket in silent {
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(20), socket.read(&mut buf))
            .await
            .expect("a silent admin socket was closed")
            .unwrap_or(0);
        assert_eq!(n, 0);
    }
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    let r = web::get(&client(), &format!("{}/healthz", stack.admin)).await;
    assert_eq!(r.status, StatusCode::OK);
    monitor.check(Duration::from_secs(2)).await;

    // Refused at start: an empty token; no token beyond loopback, unless
    // said so.
    let check = |args: &[&str]| {
        let out = crate::support::bin::command()
            .args(["proxy", "--check-config", "--admin"])
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = check(&["127.0.0.1:9180", "--admin-token", ""]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("admin token is empty"), "{err}");
    let (code, err) = check(&["0.0.0.0:9180"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--admin-without-token"), "{err}");
    let (code, err) = check(&["0.0.0.0:9180", "--admin-without-token"]);
    assert_eq!(code, Some(0), "{err}");
}

/// Text from envelopes and heartbeats reaches logs and terminals escaped:
/// a CR LF in an envelope's method cannot forge a dispatcher log line, and
/// escape sequences in a dispatcher's label reach `anteroom status` (table
/// and `--lines`) as `\u{1b}`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_characters_never_reach_logs_or_terminals_raw() {
    use crate::support::bin::{BinProcess, command};
    let redis = crate::support::start_redis();
    let keys = Keys::new("esc").unwrap();
    let upstream = crate::support::app::Upstream::start().await;
    let log = std::env::temp_dir().join(format!("anteroom-esc-{}.log", std::process::id()));
    let _dispatcher = BinProcess::spawn_cmd(
        command()
            .args(["dispatch", "--redis", &redis.url(), "--queue", "esc"])
            .args([
                "--upstream",
                &upstream.url(),
                "--label",
                "evil\u{1b}[2J\r\nforged",
            ])
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap()),
    );
    let queue = crate::support::control(&redis, "esc").await;
    eventually(
        "the dispatcher's heartbeat",
        Duration::from_secs(20),
        || async { queue.status().await.unwrap().dispatchers.len() == 1 },
    )
    .await;
    let mut conn = redis_conn(&redis).await;
    let mut forged = envelope("forged", &keys.replies("p"));
    forged.method = "GET\r\n2026-11-29T00:00:00Z  INFO forged line".into();
    let _: () = redis::cmd("LPUSH")
        .arg(keys.requests())
        .arg(forged.encode())
        .query_async(&mut conn)
        .await
        .unwrap();
    crate::support::until_llen(&conn, &keys.dead(), 1).await;
    let text = std::fs::read_to_string(&log).unwrap();
    let _ = std::fs::remove_file(&log);
    assert!(text.contains("GET\\u{d}\\u{a}"), "{text}");
    assert!(
        !text.lines().any(|l| l.starts_with("2026-11-29T00:00:00Z")),
        "a forged log line: {text}"
    );

    for args in [&["status"][..], &["status", "--lines"][..]] {
        let out = command()
            .args(args)
            .args(["--redis", &redis.url(), "--queue", "esc"])
            .output()
            .unwrap();
        let shown = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{shown}");
        assert!(
            !shown.contains('\u{1b}'),
            "raw escape in {args:?}: {shown:?}"
        );
        assert!(
            shown.contains("evil\\u{1b}[2J\\u{d}\\u{a}forged"),
            "{shown}"
        );
        assert!(!shown.lines().any(|l| l.starts_with("forged")), "{shown}");
    }
}

/// Requests whose clients hang up still wait in Redis until their
/// deadline, so they keep their share of the waiting budget until then:
/// 40 clients that send a 1 MiB POST and hang up leave at most
/// `--max-waiting` envelopes in Redis, not 40. A client resetting HTTP/2
/// streams faster than they are answered loses its connection after 100.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_requests_keep_their_budget_and_resets_are_capped() {
    use tokio::io::AsyncWriteExt;
    let stack = HttpbinStack::start("gone", &["--max-waiting", "10", "--hold", "3s"]).await;
    let keys = Keys::new("gone").unwrap();
    let queue = crate::support::control(&stack.redis, "gone").await;
    queue.pause("test", None, false).await.unwrap();
    let conn = redis_conn(&stack.redis).await;
    let body = vec![b'g'; 1 << 20];
    for _ in 0..40 {
        let mut socket = tokio::net::TcpStream::connect(stack.proxy_addr)
            .await
            .unwrap();
        let head = format!(
            "POST /anything HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        socket.write_all(head.as_bytes()).await.unwrap();
        socket.write_all(&body).await.unwrap();
        // Give the proxy the time to queue it, then hang up.
        tokio::time::sleep(Duration::from_millis(30)).await;
        drop(socket);
    }
    let waiting = r#"anteroom_proxy_waiting_requests{queue="gone"}"#;
    let queued = || {
        let (mut conn, key) = (conn.clone(), keys.requests());
        async move {
            redis::cmd("LLEN")
                .arg(key)
                .query_async::<usize>(&mut conn)
                .await
                .unwrap()
        }
    };
    assert!(
        queued().await <= 10,
        "{} envelopes in Redis",
        queued().await
    );
    assert_eq!(stack.metric(waiting).await, 10.0, "budget given back early");
    // At the deadline the budget comes back.
    eventually(
        "the budget back at the deadline",
        Duration::from_secs(10),
        || {
            let stack = &stack;
            async move { stack.metric(waiting).await == 0.0 }
        },
    )
    .await;
    queue.resume().await.unwrap();

    // With room in the budget (the default), resets are what stops them.
    let stack = HttpbinStack::start("resets", &["--hold", "3s"]).await;
    let queue = crate::support::control(&stack.redis, "resets").await;
    queue.pause("test", None, false).await.unwrap();
    let r = crate::support::httpbin::python_client(&[
        "h2-resets",
        &format!("{}/anything", stack.url),
        "400",
    ])
    .await;
    assert_eq!(r["goaway"], true, "{r}");
    let opened = r["opened"].as_u64().unwrap();
    assert!(opened < 400, "{r}");
    queue.resume().await.unwrap();
}
