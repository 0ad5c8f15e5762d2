//! Hostile clients: oversized heads, slow heads and bodies, too many
//! connections. Each gets the right status or a closed connection, and none
//! stalls other clients.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::app::test_app;
use crate::support::web::{self, client};
use crate::support::{TestDispatcher, TestProxy, start_redis};

/// Writes `head` on a fresh connection and reads until the server closes it
/// or `limit` passes; returns what was read.
async fn raw_exchange(addr: std::net::SocketAddr, head: &[u8], limit: Duration) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    // The server may answer and close before reading everything we send.
    let _ = stream.write_all(head).await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(limit, stream.read_to_end(&mut buf)).await;
    String::from_utf8_lossy(&buf).into_owned()
}

fn status_line(response: &str) -> &str {
    response.lines().next().unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_heads_get_431() {
    let redis = start_redis();
    let proxy = TestProxy::start_with(&redis, "big", |c| {
        c.max_headers = 20;
        c.max_head_bytes = 16 * 1024;
    })
    .await;
    let mut many = String::from("GET /echo HTTP/1.1\r\nHost: x\r\n");
    for i in 0..50 {
        many.push_str(&format!("X-Field-{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let r = raw_exchange(proxy.addr, many.as_bytes(), Duration::from_secs(5)).await;
    assert!(status_line(&r).starts_with("HTTP/1.1 431"), "{r:?}");

    let huge = format!(
        "GET /echo HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let r = raw_exchange(proxy.addr, huge.as_bytes(), Duration::from_secs(5)).await;
    assert!(
        status_line(&r).starts_with("HTTP/1.1 431"),
        "{:?}",
        status_line(&r)
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_off_without_stalling_others() {
    let redis = start_redis();
    let proxy = TestProxy::start_with(&redis, "slow", |c| {
        c.header_read_timeout = Duration::from_millis(500);
        c.body_read_timeout = Duration::from_millis(500);
    })
    .await;
    let d = TestDispatcher::start(&redis, "slow", test_app());

    // Slowloris: half a head, then nothing. The connection is closed.
    let addr = proxy.addr;
    let loris = tokio::spawn(async move {
        let start = Instant::now();
        let r = raw_exchange(
            addr,
            b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Slow: ",
            Duration::from_secs(10),
        )
        .await;
        (r, start.elapsed())
    });
    // A slow body: Content-Length 100, ten bytes sent. 408.
    let drip = tokio::spawn(async move {
        let start = Instant::now();
        let head = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789";
        let r = raw_exchange(addr, head, Duration::from_secs(10)).await;
        (r, start.elapsed())
    });
    // Meanwhile everyone else is served at once.
    let c = client();
    for i in 0..20 {
        let start = Instant::now();
        let r = web::post(&c, &proxy.url("/echo"), format!("fine {i}")).await;
        assert_eq!(r.text(), format!("fine {i}"));
        assert!(
            start.elapsed() < Duration::from_millis(400),
            "stalled: {:?}",
            start.elapsed()
        );
    }
    let (r, took) = loris.await.unwrap();
    assert!(
        took < Duration::from_secs(5),
        "slowloris held its connection {took:?}"
    );
    assert!(
        r.is_empty() || status_line(&r).starts_with("HTTP/1.1 408"),
        "{r:?}"
    );
    let (r, took) = drip.await.unwrap();
    assert!(status_line(&r).starts_with("HTTP/1.1 408"), "{r:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    d.stop().await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_cap_are_closed() {
    let redis = start_redis();
    let proxy = TestProxy::start_with(&redis, "cap", |c| c.max_connections = 3).await;
    let d = TestDispatcher::start(&redis, "cap", test_app());
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(TcpStream::connect(proxy.addr).await.unwrap());
    }
    // Let the proxy accept all three.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = raw_exchange(
        proxy.addr,
        b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(r.is_empty(), "over the cap yet answered: {r:?}");
    // A slot frees when a connection closes.
    drop(idle.pop());
    let mut served = false;
    for _ in 0..50 {
        let addr = proxy.addr;
        let r = raw_exchange(
            addr,
            b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            Duration::from_secs(5),
        )
        .await;
        if status_line(&r).starts_with("HTTP/1.1 200") {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(served, "no slot freed after a connection closed");
    d.stop().await;
    proxy.stop().await;
}
