//! Concurrency: no cross-talk, and the headline: stopping every dispatcher
//! suspends traffic instead of failing it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;

use crate::support::app::test_app;
use crate::support::web::{client, send};
use crate::support::{TestDispatcher, TestProxy, start_redis};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_each_get_their_own_response() {
    let redis = start_redis();
    let proxy = Arc::new(TestProxy::start(&redis, "many").await);
    // Two dispatchers competing for the same queue.
    let d1 = TestDispatcher::start(&redis, "many", test_app());
    let d2 = TestDispatcher::start(&redis, "many", test_app());
    let c = client();
    let mut tasks = Vec::new();
    for i in 0..300u32 {
        let c = c.clone();
        let url = proxy.url(&format!("/echo?n={i}"));
        tasks.push(tokio::spawn(async move {
            let body = format!("request number {i} {}", "x".repeat((i % 50) as usize));
            let req = Request::post(url)
                .header("x-test-n", i.to_string())
                .body(Full::new(Bytes::from(body.clone())))
                .unwrap();
            let r = send(&c, req).await;
            assert_eq!(r.status, StatusCode::OK);
            assert_eq!(r.text(), body, "request {i} got another's body");
            assert_eq!(r.headers["x-test-n"], i.to_string().as_str());
            assert_eq!(r.headers["x-path"], format!("/echo?n={i}").as_str());
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    d1.stop().await;
    d2.stop().await;
    Arc::try_unwrap(proxy).ok().unwrap().stop().await;
}

/// Outcome of one request made by the load generator.
struct Sample {
    status: StatusCode,
    intact: bool,
    latency: Duration,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_every_dispatcher_suspends_traffic_without_errors() {
    const CLIENTS: usize = 16;
    let gap = Duration::from_secs(3);
    let redis = start_redis();
    let proxy = Arc::new(TestProxy::start(&redis, "suspend").await);
    let first = TestDispatcher::start(&redis, "suspend", test_app());

    let running = Arc::new(AtomicBool::new(true));
    let mut workers = Vec::new();
    for w in 0..CLIENTS {
        let (c, proxy, running) = (client(), Arc::clone(&proxy), Arc::clone(&running));
        workers.push(tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut n = 0u64;
            while running.load(Ordering::Relaxed) {
                n += 1;
                let body = format!("worker {w} request {n}");
                let req = Request::post(proxy.url("/echo"))
                    .body(Full::new(Bytes::from(body.clone())))
                    .unwrap();
                let start = Instant::now();
                let r = send(&c, req).await;
                samples.push(Sample {
                    status: r.status,
                    intact: r.body == body.as_bytes(),
                    latency: start.elapsed(),
                });
            }
            samples
        }));
    }

    // Steady traffic, then no dispatcher at all for `gap`, then a new one.
    tokio::time::sleep(Duration::from_secs(1)).await;
    first.stop().await;
    tokio::time::sleep(gap).await;
    let second = TestDispatcher::start(&redis, "suspend", test_app());
    tokio::time::sleep(Duration::from_secs(1)).await;
    running.store(false, Ordering::Relaxed);

    let mut samples = Vec::new();
    for w in workers {
        samples.extend(w.await.unwrap());
    }
    let failed = samples
        .iter()
        .filter(|s| s.status != StatusCode::OK)
        .count();
    let mangled = samples.iter().filter(|s| !s.intact).count();
    let longest = samples.iter().map(|s| s.latency).max().unwrap();
    println!(
        "suspend test: {} requests, {failed} failed, longest wait {longest:?} for a {gap:?} gap",
        samples.len()
    );
    assert_eq!(failed, 0, "requests failed during the suspension");
    assert_eq!(mangled, 0, "responses crossed between clients");
    assert!(
        samples.len() > CLIENTS * 4,
        "too little traffic: {}",
        samples.len()
    );
    // Requests that arrived just after the stop waited out the whole gap...
    assert!(
        longest >= gap - Duration::from_millis(300),
        "nothing waited: {longest:?}"
    );
    // ...and none waited much longer than it.
    assert!(
        longest < gap + Duration::from_secs(2),
        "waited too long: {longest:?}"
    );
    second.stop().await;
    Arc::try_unwrap(proxy).ok().unwrap().stop().await;
}

/// Redis clients connected right now, other than the test harness's own.
async fn other_clients(conn: &mut redis::aio::MultiplexedConnection) -> usize {
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(conn)
        .await
        .unwrap();
    let harness = format!("name={}", crate::support::HARNESS_CLIENT);
    list.lines().filter(|l| !l.contains(&harness)).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_requests_do_not_add_redis_connections() {
    const WAITING: usize = 300;
    let redis = start_redis();
    let mut conn = crate::support::redis_conn(&redis).await;
    let proxy = Arc::new(TestProxy::start(&redis, "hold").await);
    let idle = other_clients(&mut conn).await;

    let c = client();
    let mut tasks = Vec::new();
    for i in 0..WAITING {
        let (c, url) = (c.clone(), proxy.url("/echo"));
        tasks.push(tokio::spawn(async move {
            let req = Request::post(url)
                .body(Full::new(Bytes::from(i.to_string())))
                .unwrap();
            let r = send(&c, req).await;
            assert_eq!(r.status, StatusCode::OK);
            assert_eq!(r.text(), i.to_string());
        }));
    }
    let requests = anteroom_protocol::Keys::new("hold").unwrap().requests();
    crate::support::eventually(
        "every request to be queued",
        Duration::from_secs(20),
        || {
            let (mut conn, key) = (conn.clone(), requests.clone());
            async move { crate::support::llen(&mut conn, &key).await == WAITING }
        },
    )
    .await;
    let holding = other_clients(&mut conn).await;
    println!(
        "redis clients: {idle} with the proxy idle, {holding} with {WAITING} requests waiting"
    );
    assert!(
        (1..=3).contains(&idle),
        "an idle proxy uses {idle} connections"
    );
    assert_eq!(holding, idle, "waiting requests opened Redis connections");

    let dispatcher = TestDispatcher::start(&redis, "hold", test_app());
    for t in tasks {
        t.await.unwrap();
    }
    dispatcher.stop().await;
    Arc::try_unwrap(proxy).ok().unwrap().stop().await;
}
