//! Pausing a queue: dispatchers stop promptly, requests wait, resume
//! releases them oldest first, and the hold budget still bounds every wait.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anteroom_dispatcher::Body;
use anteroom_protocol::Keys;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;

use crate::support::app::test_app;
use crate::support::control;
use crate::support::web::{self, client, send};
use crate::support::{
    TestDispatcher, TestProxy, dispatcher_builder, eventually, llen, redis_conn, start_redis,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_stops_every_dispatcher_promptly_through_the_announcement() {
    let redis = start_redis();
    // Fallback polling and pull timeouts of 10 s: only the announcement and
    // CLIENT UNBLOCK can make the dispatchers stop quickly.
    let slow_fallback = |name: &str| {
        dispatcher_builder(&redis, "prompt")
            .label(name)
            .pause_poll(Duration::from_secs(10))
            .poll_interval(Duration::from_secs(10))
            .build()
            .unwrap()
    };
    let d1 = TestDispatcher::start_built(slow_fallback("one"), test_app());
    let d2 = TestDispatcher::start_built(slow_fallback("two"), test_app());
    let queue = control(&redis, "prompt").await;
    eventually(
        "both dispatchers to be live",
        Duration::from_secs(10),
        || async { queue.status().await.unwrap().dispatchers.len() == 2 },
    )
    .await;
    // Let both settle into a blocking pull.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let start = Instant::now();
    queue.pause("test", None, false).await.unwrap();
    let quiet = queue
        .wait_quiescent(Duration::from_secs(5), |_| {})
        .await
        .unwrap();
    let took = start.elapsed();
    println!("both dispatchers acknowledged the pause in {took:?}");
    assert!(quiet.status.dispatchers.iter().all(|d| d.heartbeat.paused));
    assert!(
        took < Duration::from_secs(2),
        "took {took:?}: the announcement path is not working"
    );

    // Nothing is taken while paused.
    let proxy = TestProxy::start_with(&redis, "prompt", |c| c.hold = Duration::from_secs(20)).await;
    let c = client();
    let waiting = tokio::spawn({
        let (c, url) = (c.clone(), proxy.url("/echo"));
        async move { web::post(&c, &url, "after the pause").await }
    });
    let mut conn = redis_conn(&redis).await;
    let requests = Keys::new("prompt").unwrap().requests();
    eventually("the request to be queued", Duration::from_secs(10), || {
        let (mut conn, key) = (conn.clone(), requests.clone());
        async move { llen(&mut conn, &key).await == 1 }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        llen(&mut conn, &requests).await,
        1,
        "a paused dispatcher took a request"
    );

    let start = Instant::now();
    queue.resume().await.unwrap();
    let r = waiting.await.unwrap();
    assert_eq!(r.status, StatusCode::OK);
    println!(
        "resumed request answered {:?} after resume",
        start.elapsed()
    );
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "resume took {:?}",
        start.elapsed()
    );
    d1.stop().await;
    d2.stop().await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missed_announcement_is_caught_by_polling() {
    let redis = start_redis();
    let dispatcher = dispatcher_builder(&redis, "poll")
        .pause_poll(Duration::from_millis(200))
        .build()
        .unwrap();
    let d = TestDispatcher::start_built(dispatcher, test_app());
    let queue = control(&redis, "poll").await;
    eventually(
        "the dispatcher to be live",
        Duration::from_secs(10),
        || async { queue.status().await.unwrap().dispatchers.len() == 1 },
    )
    .await;
    // Set the flag behind the dispatchers' back: no PUBLISH.
    let mut conn = redis_conn(&redis).await;
    let record = r#"{"id":"by-hand","since_ms":1,"by":"redis-cli"}"#;
    redis::cmd("SET")
        .arg(Keys::new("poll").unwrap().paused())
        .arg(record)
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    let quiet = queue
        .wait_quiescent(Duration::from_secs(5), |_| {})
        .await
        .unwrap();
    assert_eq!(
        quiet.status.dispatchers[0].heartbeat.pause_id.as_deref(),
        Some("by-hand")
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_releases_waiting_requests_oldest_first() {
    const N: usize = 20;
    let redis = start_redis();
    let queue = control(&redis, "order").await;
    queue.pause("test", None, false).await.unwrap();
    let proxy = TestProxy::start(&redis, "order").await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&seen);
    let dispatcher = dispatcher_builder(&redis, "order")
        .concurrency(1)
        .build()
        .unwrap();
    let d = TestDispatcher::start_built(
        dispatcher,
        tower::service_fn(move |req: Request<Body>| {
            let n: usize = req.uri().query().unwrap().parse().unwrap();
            log.lock().unwrap().push(n);
            async { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok")))) }
        }),
    );
    // Requests arrive one after another while paused.
    let c = client();
    let mut conn = redis_conn(&redis).await;
    let requests = Keys::new("order").unwrap().requests();
    let mut tasks = Vec::new();
    for n in 0..N {
        let (c, url) = (c.clone(), proxy.url(&format!("/?{n}")));
        tasks.push(tokio::spawn(async move { web::get(&c, &url).await }));
        eventually("the request to be queued", Duration::from_secs(10), || {
            let (mut conn, key) = (conn.clone(), requests.clone());
            async move { llen(&mut conn, &key).await == n + 1 }
        })
        .await;
    }
    let status = queue.status().await.unwrap();
    assert_eq!(status.waiting, N as u64);
    assert!(seen.lock().unwrap().is_empty(), "ran while paused");
    queue.resume().await.unwrap();
    for t in tasks {
        assert_eq!(t.await.unwrap().status, StatusCode::OK);
    }
    assert_eq!(*seen.lock().unwrap(), (0..N).collect::<Vec<_>>());
    assert_eq!(llen(&mut conn, &requests).await, 0);
    d.stop().await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_longer_than_the_hold_budget_gives_504_and_never_runs_them() {
    let redis = start_redis();
    let queue = control(&redis, "long").await;
    let runs = Arc::new(Mutex::new(0usize));
    let counter = Arc::clone(&runs);
    let d = TestDispatcher::start(
        &redis,
        "long",
        tower::service_fn(move |_req: Request<Body>| {
            *counter.lock().unwrap() += 1;
            async { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ran")))) }
        }),
    );
    queue.pause("test", None, false).await.unwrap();
    queue
        .wait_quiescent(Duration::from_secs(5), |_| {})
        .await
        .unwrap();
    let proxy =
        TestProxy::start_with(&redis, "long", |c| c.hold = Duration::from_millis(300)).await;
    let c = client();
    for _ in 0..3 {
        assert_eq!(
            web::post(&c, &proxy.url("/pay"), "x").await.status,
            StatusCode::GATEWAY_TIMEOUT
        );
    }
    assert_eq!(queue.status().await.unwrap().waiting, 3);
    queue.resume().await.unwrap();
    eventually(
        "the expired requests to be dropped",
        Duration::from_secs(10),
        || async {
            let s = queue.status().await.unwrap();
            s.waiting == 0 && s.dispatchers.iter().all(|d| d.held == 0)
        },
    )
    .await;
    assert_eq!(
        *runs.lock().unwrap(),
        0,
        "an expired request ran after resume"
    );
    // The dispatcher serves again.
    assert_eq!(web::get(&c, &proxy.url("/")).await.status, StatusCode::OK);
    assert_eq!(*runs.lock().unwrap(), 1);
    d.stop().await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_waiting_requests_get_503_with_retry_after() {
    let redis = start_redis();
    let proxy = TestProxy::start_with(&redis, "cap", |c| {
        c.max_waiting = 3;
        c.max_waiting_bytes = 1000;
        c.hold = Duration::from_secs(20);
    })
    .await;
    let c = client();
    let mut conn = redis_conn(&redis).await;
    let requests = Keys::new("cap").unwrap().requests();
    let mut waiting = Vec::new();
    for i in 0..3 {
        let (c, url) = (c.clone(), proxy.url("/echo"));
        waiting.push(tokio::spawn(async move {
            web::post(&c, &url, format!("w{i}")).await
        }));
    }
    eventually("three requests waiting", Duration::from_secs(10), || {
        let (mut conn, key) = (conn.clone(), requests.clone());
        async move { llen(&mut conn, &key).await == 3 }
    })
    .await;
    let r = web::get(&c, &proxy.url("/echo")).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.headers["retry-after"], "1");
    assert_eq!(r.text(), "too many requests waiting; retry shortly\n");
    assert_eq!(
        llen(&mut conn, &requests).await,
        3,
        "the shed request was queued"
    );

    // Once a dispatcher drains them, there is room again.
    let d = TestDispatcher::start(&redis, "cap", test_app());
    for w in waiting {
        assert_eq!(w.await.unwrap().status, StatusCode::OK);
    }
    assert_eq!(
        web::get(&c, &proxy.url("/echo")).await.status,
        StatusCode::OK
    );
    // The byte cap: one body of 1001 bytes cannot wait, 1000 can.
    let req = Request::post(proxy.url("/echo"))
        .body(Full::new(Bytes::from(vec![b'x'; 1001])))
        .unwrap();
    assert_eq!(send(&c, req).await.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        web::post(&c, &proxy.url("/echo"), vec![b'x'; 1000])
            .await
            .status,
        StatusCode::OK
    );
    d.stop().await;
    proxy.stop().await;
}
