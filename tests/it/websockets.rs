//! WebSockets through the queue: real clients (tokio-tungstenite), a real
//! echo app in a process of its own (Python `websockets`) behind real
//! `anteroom dispatch` processes, and an in-process axum
//! `WebSocketUpgrade` handler. Messages cross byte-exact; a handshake
//! waits through a pause; a stopping dispatcher closes with 1012 and a
//! killed one with 1011; bad handshakes and bad frames get their RFC 6455
//! answers.

use std::process::Stdio;
use std::time::{Duration, Instant};

use anteroom_testkit::{LocalRedis, free_port, start_redis};
use axum::extract::ws::{Message as AxumMessage, WebSocket, WebSocketUpgrade};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};

use crate::support::bin::BinProcess;
use crate::support::httpbin::{raw, status_of};
use crate::support::{TestDispatcher, TestProxy, control, eventually, venv};

type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The Python echo app (`tests/apps/ws_echo.py`) on a free port.
struct EchoApp {
    child: tokio::process::Child,
    port: u16,
}

impl EchoApp {
    async fn start() -> Self {
        Self::start_on(free_port().unwrap()).await
    }

    async fn start_on(port: u16) -> Self {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/apps/ws_echo.py");
        let mut child = tokio::process::Command::new(venv::bin("python"))
            .arg(script)
            .arg(port.to_string())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let ready = tokio::time::timeout(Duration::from_secs(20), lines.next_line()).await;
        assert!(
            matches!(ready, Ok(Ok(Some(ref line))) if line == "ready"),
            "the echo app did not start: {ready:?}"
        );
        Self { child, port }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for EchoApp {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// `anteroom dispatch --upstream APP` for `queue`, with `extra` flags.
fn dispatcher(redis: &LocalRedis, queue: &str, app: &EchoApp, extra: &[&str]) -> BinProcess {
    let url = redis.url();
    let upstream = app.url();
    let mut args = vec![
        "dispatch",
        "--redis",
        &url,
        "--queue",
        queue,
        "--upstream",
        &upstream,
    ];
    args.extend_from_slice(extra);
    BinProcess::spawn(&args)
}

/// Connects to `path` through `proxy`, within 30 s.
async fn connect(proxy: &TestProxy, path: &str) -> Client {
    let url = format!("ws://{}{}", proxy.addr, path);
    let (ws, resp) = tokio::time::timeout(Duration::from_secs(30), connect_async(&url))
        .await
        .expect("handshake within 30 s")
        .expect("handshake accepted");
    assert_eq!(resp.status(), 101);
    ws
}

/// Sends `message` and reads the next message back, within 10 s.
async fn round_trip(ws: &mut Client, message: Message) -> Message {
    ws.send(message).await.unwrap();
    loop {
        let next = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("an echo within 10 s")
            .expect("the socket stays open")
            .unwrap();
        if !matches!(next, Message::Ping(_) | Message::Pong(_)) {
            return next;
        }
    }
}

/// Reads until the close frame, within `limit`; returns its code.
async fn close_code(ws: &mut Client, limit: Duration) -> u16 {
    let until = tokio::time::timeout(limit, async {
        while let Some(next) = ws.next().await {
            match next {
                Ok(Message::Close(frame)) => return frame.map_or(1005, |f| u16::from(f.code)),
                Ok(_) => {}
                Err(err) => panic!("the socket broke instead of closing: {err}"),
            }
        }
        panic!("the socket ended without a close frame");
    });
    until.await.expect("a close frame in time")
}

fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_cross_byte_exact_to_an_app_in_another_process() {
    let redis = start_redis();
    let app = EchoApp::start().await;
    let proxy = TestProxy::start(&redis, "ws").await;
    let _dispatcher = dispatcher(&redis, "ws", &app, &[]);
    let mut ws = connect(&proxy, "/echo").await;
    let text = "héllo, wörld ✓".to_owned();
    assert_eq!(
        round_trip(&mut ws, Message::text(text.clone())).await,
        Message::text(text)
    );
    // Up to three windows (1 MiB each): pieces of 256 KiB, credited as
    // they arrive.
    for len in [0, 1, 300 * 1024, 1024 * 1024, 3 * 1024 * 1024 + 5] {
        let data = payload(len);
        let echo = round_trip(&mut ws, Message::binary(data.clone())).await;
        assert_eq!(echo, Message::binary(data), "binary message of {len} bytes");
    }
    // The app sends its last message and closes with a code of its own
    // at once: the client gets both, in order.
    let mut closing = connect(&proxy, "/close/4001").await;
    assert_eq!(
        round_trip(&mut closing, Message::text("bye")).await,
        Message::text("bye")
    );
    assert_eq!(
        close_code(&mut closing, Duration::from_secs(10)).await,
        4001
    );
    // The client closes: the socket ends cleanly.
    ws.close(None).await.unwrap();
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_axum_websocket_upgrade_handler_works_in_process() {
    let redis = start_redis();
    let proxy = TestProxy::start(&redis, "ws").await;
    let app = axum::Router::new()
        .route(
            "/echo",
            axum::routing::get(crate::support::app::echo_socket),
        )
        .route("/plain", axum::routing::get(|| async { "not a socket" }));
    let dispatcher = TestDispatcher::start(&redis, "ws", app);
    let mut ws = connect(&proxy, "/echo").await;
    // The default limit, 16 MiB, passes both ways.
    let data = payload(16 * 1024 * 1024);
    assert_eq!(
        round_trip(&mut ws, Message::binary(data.clone())).await,
        Message::binary(data)
    );
    assert_eq!(
        round_trip(&mut ws, Message::text("ok")).await,
        Message::text("ok")
    );
    // A route that does not upgrade answers the handshake itself.
    let refused = connect_async(format!("ws://{}/plain", proxy.addr)).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 200);
            assert_eq!(resp.body().as_deref(), Some(&b"not a socket"[..]));
        }
        other => panic!("expected the app's plain answer, got {other:?}"),
    }
    // One byte over it: 1009.
    let mut over = connect(&proxy, "/echo").await;
    over.send(Message::binary(payload(16 * 1024 * 1024 + 1)))
        .await
        .unwrap();
    assert_eq!(close_code(&mut over, Duration::from_secs(20)).await, 1009);
    ws.close(None).await.unwrap();
    dispatcher.stop().await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_made_while_paused_completes_after_resume_and_open_sockets_keep_working() {
    let redis = start_redis();
    let proxy = TestProxy::start(&redis, "ws").await;
    let app = axum::Router::new().route(
        "/echo",
        axum::routing::get(crate::support::app::echo_socket),
    );
    let dispatcher = TestDispatcher::start(&redis, "ws", app);
    let mut open = connect(&proxy, "/echo").await;
    let queue = control(&redis, "ws").await;
    queue.pause("test", None, false).await.unwrap();
    // Quiescent with the socket open: a window's command can run.
    queue
        .wait_quiescent(Duration::from_secs(5), |_| {})
        .await
        .expect("quiescent with a socket open");
    let url = format!("ws://{}/echo", proxy.addr);
    let waiting = tokio::spawn(async move { connect_async(url).await });
    eventually(
        "the handshake to wait in the queue",
        Duration::from_secs(20),
        || async { queue.status().await.unwrap().waiting == 1 },
    )
    .await;
    // The open socket works through the pause; the new one waits.
    assert_eq!(
        round_trip(&mut open, Message::text("during the pause")).await,
        Message::text("during the pause")
    );
    assert!(!waiting.is_finished(), "the handshake did not wait");
    queue.resume().await.unwrap();
    let (mut ws, _) = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the handshake completes after resume")
        .unwrap()
        .unwrap();
    assert_eq!(
        round_trip(&mut ws, Message::text("after")).await,
        Message::text("after")
    );
    dispatcher.stop().await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_dispatcher_closes_with_1012_and_the_client_reconnects_to_a_new_one() {
    let redis = start_redis();
    let app = EchoApp::start().await;
    let proxy = TestProxy::start(&redis, "ws").await;
    let first = dispatcher(&redis, "ws", &app, &["--grace", "1s"]);
    let mut ws = connect(&proxy, "/echo").await;
    assert_eq!(
        round_trip(&mut ws, Message::text("one")).await,
        Message::text("one")
    );
    first.terminate();
    let started = Instant::now();
    assert_eq!(close_code(&mut ws, Duration::from_secs(15)).await, 1012);
    println!("closed 1012 {:?} after SIGTERM", started.elapsed());
    let _second = dispatcher(&redis, "ws", &app, &[]);
    let mut again = connect(&proxy, "/echo").await;
    assert_eq!(
        round_trip(&mut again, Message::text("two")).await,
        Message::text("two")
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_dispatchers_sockets_close_with_1011_within_its_heartbeat_ttl() {
    let redis = start_redis();
    let app = EchoApp::start().await;
    let proxy = TestProxy::start(&redis, "ws").await;
    let mut killed = dispatcher(&redis, "ws", &app, &["--heartbeat-ttl", "3s"]);
    let mut ws = connect(&proxy, "/echo").await;
    assert_eq!(
        round_trip(&mut ws, Message::text("one")).await,
        Message::text("one")
    );
    killed.child().kill().unwrap();
    let started = Instant::now();
    // The TTL, and the proxy's check every second.
    assert_eq!(close_code(&mut ws, Duration::from_secs(3 + 2)).await, 1011);
    println!("closed 1011 {:?} after SIGKILL", started.elapsed());
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrades_other_than_websocket_and_bad_handshakes_are_refused_with_their_status() {
    let redis = start_redis();
    let proxy = TestProxy::start_with(&redis, "ws", |c| c.max_websockets = 1).await;
    let app = axum::Router::new().route(
        "/echo",
        axum::routing::get(crate::support::app::echo_socket),
    );
    let dispatcher = TestDispatcher::start(&redis, "ws", app);
    let key = "dGhlIHNhbXBsZSBub25jZQ==";
    let handshake = |method: &str, upgrade: &str, version: &str, key: &str| {
        format!(
            "{method} /echo HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, close\r\nUpgrade: {upgrade}\r\n\
             Sec-WebSocket-Version: {version}\r\nSec-WebSocket-Key: {key}\r\nContent-Length: 0\r\n\r\n"
        )
    };
    let cases = [
        (handshake("GET", "h2c", "13", key), 501),
        (handshake("GET", "TLS/1.0", "13", key), 501),
        (handshake("GET", "websocket", "8", key), 426),
        (handshake("POST", "websocket", "13", key), 400),
        (handshake("GET", "websocket", "13", "c2hvcnQ="), 400),
        (
            "GET /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
                .to_owned(),
            400,
        ),
        (
            "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\nConnection: close\r\n\r\n"
                .to_owned(),
            501,
        ),
    ];
    for (request, status) in &cases {
        let answer = raw(proxy.addr, request.as_bytes()).await;
        assert_eq!(status_of(&answer), *status, "{request:?} got {answer:?}");
        if *status == 426 {
            assert!(
                answer
                    .to_ascii_lowercase()
                    .contains("sec-websocket-version: 13"),
                "{answer}"
            );
        }
    }
    // The one place is taken: the next handshake gets 503.
    let mut open = connect(&proxy, "/echo").await;
    let full = raw(
        proxy.addr,
        handshake("GET", "websocket", "13", key).as_bytes(),
    )
    .await;
    assert_eq!(status_of(&full), 503, "{full}");
    open.close(None).await.unwrap();
    dispatcher.stop().await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_frames_and_oversize_messages_close_that_socket_only() {
    let redis = start_redis();
    let proxy = TestProxy::start_with(&redis, "ws", |c| c.websocket_max_message = 64 * 1024).await;
    let app = axum::Router::new().route(
        "/echo",
        axum::routing::get(crate::support::app::echo_socket),
    );
    let dispatcher = TestDispatcher::start(&redis, "ws", app);
    let mut bystander = connect(&proxy, "/echo").await;

    // A client that speaks garbage after its handshake: an unmasked frame
    // with a reserved opcode (RFC 6455 section 5.2).
    let mut tcp = TcpStream::connect(proxy.addr).await.unwrap();
    tcp.write_all(
        b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        tcp.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "{head}");
    tcp.write_all(&[0x83, 0x03, b'b', b'a', b'd'])
        .await
        .unwrap();
    let mut frame = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(10), tcp.read_exact(&mut frame))
        .await
        .expect("a close frame in time")
        .unwrap();
    assert_eq!(frame[0], 0x88, "a close frame: {frame:?}");
    assert_eq!(u16::from_be_bytes([frame[2], frame[3]]), 1002);

    // A message over the limit: 1009.
    let mut big = connect(&proxy, "/echo").await;
    big.send(Message::binary(payload(100 * 1024)))
        .await
        .unwrap();
    assert_eq!(close_code(&mut big, Duration::from_secs(10)).await, 1009);

    // The other socket never noticed.
    assert_eq!(
        round_trip(&mut bystander, Message::text("still here")).await,
        Message::text("still here")
    );
    dispatcher.stop().await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_open_sockets_add_no_redis_connection() {
    const SOCKETS: usize = 1000;
    let redis = start_redis();
    let mut conn = crate::support::redis_conn(&redis).await;
    let proxy = TestProxy::start(&redis, "ws").await;
    let proxy_connections = crate::load::other_clients(&mut conn).await;
    let app = axum::Router::new().route(
        "/echo",
        axum::routing::get(crate::support::app::echo_socket),
    );
    let dispatcher = TestDispatcher::start(&redis, "ws", app);
    // One socket open, so every connection either side makes is made.
    let mut first = connect(&proxy, "/echo").await;
    assert_eq!(
        round_trip(&mut first, Message::text("first")).await,
        Message::text("first")
    );
    let before = crate::load::other_clients(&mut conn).await;
    let mut tasks = Vec::new();
    let (open_tx, mut open_rx) = tokio::sync::mpsc::channel::<()>(SOCKETS);
    let release = tokio_util::sync::CancellationToken::new();
    for i in 0..SOCKETS {
        let url = format!("ws://{}/echo", proxy.addr);
        let (open_tx, release) = (open_tx.clone(), release.clone());
        tasks.push(tokio::spawn(async move {
            let (mut ws, _) = connect_async(url).await.unwrap();
            let text = format!("socket {i}");
            let echo = round_trip(&mut ws, Message::text(text.clone())).await;
            assert_eq!(echo, Message::text(text));
            open_tx.send(()).await.unwrap();
            // Held open until every socket is.
            release.cancelled().await;
            ws.close(None).await.unwrap();
        }));
    }
    for _ in 0..SOCKETS {
        tokio::time::timeout(Duration::from_secs(60), open_rx.recv())
            .await
            .expect("every socket opens and echoes within 60 s")
            .unwrap();
    }
    let during = crate::load::other_clients(&mut conn).await;
    println!(
        "{SOCKETS} sockets open: the proxy has {proxy_connections} Redis connections; \
         proxy and dispatcher {before} with one socket, {during} with {}",
        SOCKETS + 1
    );
    assert!(
        proxy_connections <= 8,
        "the proxy has {proxy_connections} Redis connections"
    );
    assert_eq!(during, before, "open sockets added Redis connections");
    release.cancel();
    for task in tasks {
        task.await.unwrap();
    }
    first.close(None).await.unwrap();
    dispatcher.stop().await;
    proxy.stop().await;
}

/// An axum echo handler that reports, on `ended`, when its socket ends.
fn reporting_echo(ended: tokio::sync::mpsc::UnboundedSender<()>) -> axum::Router {
    axum::Router::new().route(
        "/echo",
        axum::routing::get(move |upgrade: WebSocketUpgrade| {
            let ended = ended.clone();
            async move {
                upgrade.on_upgrade(move |mut socket: WebSocket| async move {
                    while let Some(Ok(message)) = socket.recv().await {
                        if matches!(message, AxumMessage::Text(_) | AxumMessage::Binary(_))
                            && socket.send(message).await.is_err()
                        {
                            break;
                        }
                    }
                    let _ = ended.send(());
                })
            }
        }),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_proxy_closes_with_1001_and_the_apps_socket_ends() {
    let redis = start_redis();
    let proxy = TestProxy::start(&redis, "ws").await;
    let (ended_tx, mut ended) = tokio::sync::mpsc::unbounded_channel();
    let dispatcher = TestDispatcher::start(&redis, "ws", reporting_echo(ended_tx));
    let mut ws = connect(&proxy, "/echo").await;
    assert_eq!(
        round_trip(&mut ws, Message::text("one")).await,
        Message::text("one")
    );
    let stopping = tokio::spawn(proxy.stop());
    assert_eq!(close_code(&mut ws, Duration::from_secs(10)).await, 1001);
    tokio::time::timeout(Duration::from_secs(10), ended.recv())
        .await
        .expect("the app's socket ends too");
    stopping.await.unwrap();
    dispatcher.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_proxys_sockets_end_at_the_app_and_leave_nothing_in_processing() {
    let redis = start_redis();
    let (mut proxy, base) = crate::support::bin::start_proxy(&redis, "ws", "10s").await;
    let (ended_tx, mut ended) = tokio::sync::mpsc::unbounded_channel();
    let dispatcher = TestDispatcher::start(&redis, "ws", reporting_echo(ended_tx));
    let url = format!("{}/echo", base.replacen("http://", "ws://", 1));
    let (mut ws, _) = connect_async(&url).await.unwrap();
    assert_eq!(
        round_trip(&mut ws, Message::text("one")).await,
        Message::text("one")
    );
    let mut conn = crate::support::redis_conn(&redis).await;
    let processing = anteroom_protocol::Keys::new("ws")
        .unwrap()
        .processing(&dispatcher.id);
    assert_eq!(crate::support::llen(&mut conn, &processing).await, 1);
    proxy.child().kill().unwrap();
    let started = Instant::now();
    // The proxy's heartbeat TTL (10 s) and the dispatcher's check (2 s).
    tokio::time::timeout(Duration::from_secs(15), ended.recv())
        .await
        .expect("the app's socket ends within the proxy's heartbeat TTL");
    println!(
        "the app's socket ended {:?} after SIGKILL",
        started.elapsed()
    );
    crate::support::until_llen(&conn, &processing, 0).await;
    dispatcher.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_is_pinged_then_closed_and_an_idle_one_that_answers_stays() {
    let redis = start_redis();
    let proxy = TestProxy::start_with(&redis, "ws", |c| {
        c.websocket_ping_interval = Duration::from_millis(500);
    })
    .await;
    let app = axum::Router::new().route(
        "/echo",
        axum::routing::get(crate::support::app::echo_socket),
    );
    let dispatcher = TestDispatcher::start(&redis, "ws", app);
    // A client that answers pings (the library does, while it reads).
    let alive = connect(&proxy, "/echo").await;
    let (mut sink, mut stream) = alive.split();
    let reading = tokio::spawn(async move {
        let mut pings = 0;
        while let Some(Ok(message)) = stream.next().await {
            match message {
                Message::Ping(_) => pings += 1,
                Message::Text(_) => return pings,
                _ => {}
            }
        }
        panic!("the answering client was closed");
    });
    // A client that never reads, so never answers.
    let mut silent = TcpStream::connect(proxy.addr).await.unwrap();
    silent
        .write_all(
            b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
              Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Silent twice the interval after its ping: its connection is gone.
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), silent.read_to_end(&mut rest)).await;
    assert!(
        read.is_ok(),
        "the silent client's connection was not closed"
    );
    assert!(
        String::from_utf8_lossy(&rest).starts_with("HTTP/1.1 101"),
        "it was a socket: {rest:?}"
    );
    // The other one, idle as long, still works, and was pinged.
    sink.send(Message::text("still")).await.unwrap();
    let pings = tokio::time::timeout(Duration::from_secs(5), reading)
        .await
        .unwrap()
        .unwrap();
    assert!(pings >= 2, "pinged {pings} times in 3 s at 500 ms");
    dispatcher.stop().await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_made_while_the_app_restarts_waits_for_it() {
    let redis = start_redis();
    let app = EchoApp::start().await;
    let port = app.port;
    let proxy = TestProxy::start(&redis, "ws").await;
    let _dispatcher = dispatcher(&redis, "ws", &app, &[]);
    let mut open = connect(&proxy, "/echo").await;
    assert_eq!(
        round_trip(&mut open, Message::text("before")).await,
        Message::text("before")
    );
    drop(app);
    // The app's socket broke: the client's closes (going away).
    assert_eq!(close_code(&mut open, Duration::from_secs(10)).await, 1001);
    let url = format!("ws://{}/echo", proxy.addr);
    let waiting = tokio::spawn(async move { connect_async(url).await });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !waiting.is_finished(),
        "the handshake did not wait for the app"
    );
    let _back = EchoApp::start_on(port).await;
    let (mut ws, _) = tokio::time::timeout(Duration::from_secs(15), waiting)
        .await
        .expect("the handshake completes once the app is back")
        .unwrap()
        .expect("accepted, not refused");
    assert_eq!(
        round_trip(&mut ws, Message::text("after")).await,
        Message::text("after")
    );
    proxy.stop().await;
}
