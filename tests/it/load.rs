//! Concurrency: no cross-talk, and the headline: stopping every dispatcher
//! suspends traffic instead of failing it.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;

use crate::support::app::test_app;
use crate::support::load::Load;
use crate::support::web::{client, send};
use crate::support::{TestDispatcher, TestProxy, keys, llen, redis_conn, start_redis};

/// Two proxies and two dispatchers on one queue. Each dispatcher completes
/// concurrent requests in batches (one MULTI for replies to both proxies),
/// so this also checks that a batch routes every reply to its own proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_each_get_their_own_response() {
    let redis = start_redis();
    let proxies = Arc::new([
        TestProxy::start(&redis, "many").await,
        TestProxy::start(&redis, "many").await,
    ]);
    // Two dispatchers competing for the same queue.
    let d1 = TestDispatcher::start(&redis, "many", test_app());
    let d2 = TestDispatcher::start(&redis, "many", test_app());
    let c = client();
    let mut tasks = Vec::new();
    for i in 0..300u32 {
        let c = c.clone();
        let url = proxies[i as usize % 2].url(&format!("/echo?n={i}"));
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
    // Every completion also removed its request from a processing list.
    let mut conn = redis_conn(&redis).await;
    let processing = keys(&mut conn, "anteroom:{many}:processing:*").await;
    for key in processing {
        assert_eq!(llen(&mut conn, &key).await, 0, "{key} still holds requests");
    }
    d1.stop().await;
    d2.stop().await;
    let [p1, p2] = Arc::try_unwrap(proxies).ok().unwrap();
    p1.stop().await;
    p2.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_every_dispatcher_suspends_traffic_without_errors() {
    const CLIENTS: usize = 16;
    let gap = Duration::from_secs(3);
    let redis = start_redis();
    let proxy = TestProxy::start(&redis, "suspend").await;
    let first = TestDispatcher::start(&redis, "suspend", test_app());
    let load = Load::start(CLIENTS, proxy.url("/echo"), |w, n| {
        format!("worker {w} request {n}")
    });

    // Steady traffic, then no dispatcher at all for `gap`, then a new one.
    tokio::time::sleep(Duration::from_secs(1)).await;
    first.stop().await;
    tokio::time::sleep(gap).await;
    let second = TestDispatcher::start(&redis, "suspend", test_app());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let summary = load.finish().await;

    summary.report("suspend test", |s| s == StatusCode::OK);
    let mangled = summary.samples.iter().filter(|s| s.body != s.sent).count();
    let longest = summary.longest();
    assert_eq!(
        summary.failed(|s| s == StatusCode::OK),
        0,
        "requests failed during the suspension"
    );
    assert_eq!(mangled, 0, "responses crossed between clients");
    assert!(
        summary.samples.len() > CLIENTS * 4,
        "too little traffic: {}",
        summary.samples.len()
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
    proxy.stop().await;
}

/// Redis clients connected right now, other than the test harness's own.
pub(crate) async fn other_clients(conn: &mut redis::aio::MultiplexedConnection) -> usize {
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
