//! Crashes around the dispatchers: a proxy killed mid-request, and
//! redis-server killed and restarted under load, with real processes.

use std::time::{Duration, Instant};

use anteroom_testkit::{LocalRedis, free_port};
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;

use crate::support::app::Upstream;
use crate::support::bin::BinProcess;
use crate::support::load::Load;
use crate::support::wait_for_port;
use crate::support::web::{self, client};
use crate::support::{
    TestDispatcher, TestProxy, dispatcher_builder, eventually, keys, redis_conn, start_redis,
};

const READY: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_to_a_dead_proxy_expire_and_dispatchers_carry_on() {
    let redis = start_redis();
    let dispatcher = dispatcher_builder(&redis, "pc")
        .reply_ttl(Duration::from_secs(1))
        .build()
        .unwrap();
    let d = TestDispatcher::start_built(
        dispatcher,
        tower::service_fn(|_req: Request<anteroom_dispatcher::Body>| async {
            tokio::time::sleep(Duration::from_millis(500)).await;
            Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from_static(
                b"late",
            ))))
        }),
    );
    let port = free_port().unwrap();
    let mut proxy = BinProcess::spawn(&[
        "proxy",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--redis",
        &redis.url(),
        "--queue",
        "pc",
    ]);
    wait_for_port(port).await;
    let c = client();
    let doomed = tokio::spawn({
        let c = c.clone();
        async move {
            c.request(
                Request::get(format!("http://127.0.0.1:{port}/"))
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
            .await
        }
    });
    let queue = crate::support::control(&redis, "pc").await;
    crate::support::until_held(&queue, 1).await;
    proxy.child().kill().unwrap();
    proxy.child().wait().unwrap();
    assert!(
        doomed.await.unwrap().is_err(),
        "the client of a killed proxy got an answer"
    );

    // The reply lands in the dead proxy's list, which then expires.
    let mut conn = redis_conn(&redis).await;
    eventually("the reply to arrive", READY, || {
        let mut conn = conn.clone();
        async move { !reply_lists(&mut conn, "pc").await.is_empty() }
    })
    .await;
    let reply_list = reply_lists(&mut conn, "pc").await.remove(0);
    let ttl: i64 = redis::cmd("PTTL")
        .arg(&reply_list)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(ttl > 0 && ttl <= 1000, "reply list TTL {ttl} ms");
    eventually("the dead proxy's reply list to expire", READY, || {
        let (mut conn, key) = (conn.clone(), reply_list.clone());
        async move {
            !redis::cmd("EXISTS")
                .arg(&key)
                .query_async::<bool>(&mut conn)
                .await
                .unwrap()
        }
    })
    .await;

    // Dispatchers are unaffected: a live proxy is served.
    let live = TestProxy::start(&redis, "pc").await;
    let r = web::get(&c, &live.url("/")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.text(), "late");
    d.stop().await;
    live.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_under_load() {
    let dir = std::env::temp_dir().join(format!("anteroom-aof-{}", free_port().unwrap()));
    std::fs::create_dir_all(&dir).unwrap();
    // Appendonly with fsync always: what was queued survives the crash.
    let mut redis = LocalRedis::start_with_args(&[
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
        "--dir",
        dir.to_str().unwrap(),
    ])
    .unwrap();
    let upstream = Upstream::start().await;
    let (_proxy, base) = crate::support::bin::start_proxy(&redis, "out", "15s").await;
    let listen = base.trim_start_matches("http://").to_owned();
    let _dispatcher = BinProcess::spawn(&[
        "dispatch",
        "--redis",
        &redis.url(),
        "--queue",
        "out",
        "--upstream",
        &upstream.url(),
    ]);
    let c = client();
    eventually("the first answer", READY, || async {
        web::post(&c, &format!("http://{listen}/echo"), "warm")
            .await
            .status
            == StatusCode::OK
    })
    .await;

    let load = Load::start(8, format!("http://{listen}/echo"), |w, n| {
        format!("{w}-{n}")
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    redis.kill();
    let killed = Instant::now();

    // While Redis is down, a new request is refused quickly, not left hanging.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let start = Instant::now();
    let r = web::post(&c, &format!("http://{listen}/echo"), "during the outage").await;
    let refused_in = start.elapsed();
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text());
    assert!(
        refused_in < Duration::from_secs(3),
        "503 took {refused_in:?}"
    );

    tokio::time::sleep(Duration::from_secs(2).saturating_sub(killed.elapsed())).await;
    redis.start_again().unwrap();
    let restarted = Instant::now();
    // Serving again: a fresh request succeeds.
    let recovered_in = loop {
        let req = Request::post(format!("http://{listen}/echo"))
            .body(Full::new(Bytes::from_static(b"back")))
            .unwrap();
        let r = web::send(&c, req).await;
        if r.status == StatusCode::OK {
            break restarted.elapsed();
        }
        assert!(
            restarted.elapsed() < Duration::from_secs(10),
            "not serving 10 s after restart: {}",
            r.status
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let summary = load.finish().await;

    let count = |code: StatusCode| {
        summary
            .samples
            .iter()
            .filter(|s| s.status == Some(code))
            .count()
    };
    println!(
        "redis outage of {:?}: 503 in {refused_in:?}; serving again {recovered_in:?} after restart; load: {} requests, {} ok, {} 503, {} 504, {} 502, longest {:?}",
        restarted - killed,
        summary.samples.len(),
        count(StatusCode::OK),
        count(StatusCode::SERVICE_UNAVAILABLE),
        count(StatusCode::GATEWAY_TIMEOUT),
        count(StatusCode::BAD_GATEWAY),
        summary.longest()
    );
    assert!(
        recovered_in < Duration::from_secs(2),
        "serving again took {recovered_in:?}"
    );
    // Every request got an answer: success, refusal while down, the hold
    // budget's 504, or 502 for a POST whose pull the kill cut off (its
    // reply lost: the dispatcher cannot tell whether it ran; docs/protocol.md,
    // "Lost replies"); none hung (each is bounded by the client's timeout)
    // and none got a body meant for another.
    for s in &summary.samples {
        assert!(
            [
                StatusCode::OK,
                StatusCode::SERVICE_UNAVAILABLE,
                StatusCode::GATEWAY_TIMEOUT,
                StatusCode::BAD_GATEWAY
            ]
            .contains(&s.status.expect("a response")),
            "{:?}",
            s.status
        );
        if s.status == Some(StatusCode::OK) {
            assert_eq!(s.body, s.sent);
        }
        assert!(s.latency <= Duration::from_secs(16), "{:?}", s.latency);
    }
    assert!(count(StatusCode::OK) > 0);
    let after: Vec<_> = summary
        .samples
        .iter()
        .filter(|s| s.started > restarted + recovered_in)
        .collect();
    assert!(
        !after.is_empty() && after.iter().all(|s| s.status == Some(StatusCode::OK)),
        "failures after recovery"
    );
    drop(redis);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// A client that hangs up does not take its request back: it runs once, and
/// holds its share of the waiting budget until it is answered (issue 15:
/// otherwise hanging up would fill Redis past the proxy's caps).
async fn a_client_that_disconnects_while_waiting_keeps_its_share_until_answered() {
    let redis = start_redis();
    let proxy = TestProxy::start_with(&redis, "gone", |c| c.max_waiting = 1).await;
    let runs = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = std::sync::Arc::clone(&runs);
    let d = TestDispatcher::start(
        &redis,
        "gone",
        tower::service_fn(move |_req: Request<anteroom_dispatcher::Body>| {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async {
                tokio::time::sleep(Duration::from_secs(3)).await;
                Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                    Bytes::from_static(b"done"),
                )))
            }
        }),
    );
    let queue = crate::support::control(&redis, "gone").await;
    // A raw client sends a request and hangs up before the answer.
    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(
        &mut stream,
        b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi",
    )
    .await
    .unwrap();
    crate::support::until_held(&queue, 1).await;
    drop(stream);
    // The proxy's only waiting slot (max_waiting = 1) stays taken while
    // the abandoned request runs, and is given back by its reply.
    let c = client();
    let r = web::get(&c, &proxy.url("/during")).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text());
    let held_since = Instant::now();
    let mut after = None;
    while held_since.elapsed() < Duration::from_secs(20) {
        let r = web::get(&c, &proxy.url("/after")).await;
        if r.status == StatusCode::OK {
            after = Some(held_since.elapsed());
            break;
        }
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Freed by the reply (after the handler's 3 s), long before the 30 s hold.
    let after = after.expect("the slot was given back");
    assert!(after < Duration::from_secs(10), "{after:?}");
    // The abandoned request still ran exactly once; its reply was discarded.
    eventually("the abandoned request to finish", READY, || async {
        queue
            .status()
            .await
            .unwrap()
            .dispatchers
            .iter()
            .all(|d| d.held == 0)
    })
    .await;
    assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 2);
    d.stop().await;
    proxy.stop().await;
}

/// The reply lists of `queue` (`anteroom:{q}:replies:<proxy>`), without
/// the keys each list's reader keeps beside it (`…:popped`, `…:landing`,
/// `…:epoch`).
pub(crate) async fn reply_lists(
    conn: &mut redis::aio::MultiplexedConnection,
    queue: &str,
) -> Vec<String> {
    let prefix = format!("anteroom:{{{queue}}}:replies:");
    keys(conn, &format!("{prefix}*"))
        .await
        .into_iter()
        .filter(|k| !k[prefix.len()..].contains(':'))
        .collect()
}
