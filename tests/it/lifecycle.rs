//! One lifecycle for every component: the dispatcher says when it is
//! serving, its errors say what kind they are, and a proxy shutting down
//! with silent sockets open and early answers still lingering stops within
//! its grace period, leaving nothing registered in Redis.

use std::convert::Infallible;
use std::time::{Duration, Instant};

use anteroom_dispatcher::{Body, Dispatcher};
use anteroom_testkit::{free_port, keys, redis_conn, start_redis};
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::support::{TestDispatcher, TestProxy, dispatcher_builder};

async fn hello(_: Request<Body>) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(Response::new(Full::new(Bytes::from_static(b"hello"))))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dispatcher_says_when_it_serves_and_what_kind_its_errors_are() {
    // A bad queue name: a configuration error, before anything connects.
    let err = Dispatcher::builder()
        .redis_url("redis://127.0.0.1:1")
        .queue("no spaces")
        .build()
        .unwrap_err();
    assert!(err.is_config() && !err.is_redis(), "{err}");

    // Nothing listens: a Redis error, and the ready signal says it never served.
    let closed = free_port().unwrap();
    let dispatcher = Dispatcher::builder()
        .redis_url(format!("redis://127.0.0.1:{closed}"))
        .queue("q")
        .redis_timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let mut ready = dispatcher.ready();
    let served = tokio::spawn(dispatcher.serve_fn(hello, std::future::pending()));
    assert!(!ready.wait().await, "never ready without redis");
    let err = served.await.unwrap().unwrap_err();
    assert!(
        err.is_redis() && !err.is_config() && !err.is_component(),
        "{err}"
    );

    // With Redis: ready while serving, not ready once stopped.
    let redis = start_redis();
    let dispatcher = dispatcher_builder(&redis, "q").build().unwrap();
    let mut ready = dispatcher.ready();
    assert!(!ready.is_ready());
    let stop = CancellationToken::new();
    let token = stop.clone();
    let served = tokio::spawn(dispatcher.serve_fn(hello, async move { token.cancelled().await }));
    assert!(ready.wait().await);
    assert!(ready.is_ready());
    stop.cancel();
    served.await.unwrap().unwrap();
    assert!(!ready.is_ready());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_stops_within_its_grace_with_silent_and_lingering_sockets() {
    let redis = start_redis();
    let grace = Duration::from_secs(3);
    let proxy = TestProxy::start_with(&redis, "q", |c| {
        c.grace = grace;
        c.max_body = 1024;
    })
    .await;
    let dispatcher = TestDispatcher::start(&redis, "q", tower::service_fn(hello));
    // Sockets that connect and say nothing.
    let mut silent = Vec::new();
    for _ in 0..3 {
        silent.push(tokio::net::TcpStream::connect(proxy.addr).await.unwrap());
    }
    // A body over the limit, still being sent: answered 413 early, and
    // its connection lingers, discarding what the client still sends.
    let mut early = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    early
        .write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\nstart")
        .await
        .unwrap();
    let mut answer = [0u8; 12];
    early.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"HTTP/1.1 413");

    let mut conn = redis_conn(&redis).await;
    assert_eq!(keys(&mut conn, "anteroom:{q}:proxy:*").await.len(), 1);
    let started = Instant::now();
    proxy.stop().await;
    let took = started.elapsed();
    assert!(
        took <= grace + Duration::from_secs(1),
        "stopped after {took:?}"
    );
    // Its heartbeat and registry entry are gone: every component stopped.
    assert!(keys(&mut conn, "anteroom:{q}:proxy:*").await.is_empty());
    let registered: Vec<String> = redis::cmd("ZRANGE")
        .arg("anteroom:{q}:proxies")
        .arg(0)
        .arg(-1)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(registered.is_empty(), "{registered:?}");
    // The silent sockets were closed, not left open.
    for mut socket in silent {
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(1), socket.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(0) | Err(_))),
            "silent socket still open: {read:?}"
        );
    }
    dispatcher.stop().await;
}
