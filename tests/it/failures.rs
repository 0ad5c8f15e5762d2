//! Every broker failure gets its documented status, and nothing hangs.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anteroom_dispatcher::{Body, Upstream as UpstreamService};
use anteroom_protocol::Keys;
use anteroom_testkit::free_port;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;

use crate::support::app::test_app;
use crate::support::web::{self, client, send};
use crate::support::{
    TestDispatcher, TestProxy, dispatcher_builder, eventually, keys, llen, redis_conn, start_redis,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_over_the_limit_is_413() {
    let redis = start_redis();
    let proxy = TestProxy::start_with(&redis, "big", |c| c.max_body = 1000).await;
    let dispatcher = TestDispatcher::start(&redis, "big", test_app());
    let c = client();
    // Declared too large.
    let r = web::post(&c, &proxy.url("/echo"), vec![b'x'; 1001]).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    // Streamed (no Content-Length) and too large.
    let chunks = chunked_body(vec![vec![b'y'; 600], vec![b'y'; 600]]);
    let req = Request::post(proxy.url("/echo")).body(chunks).unwrap();
    let resp = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http()
        .request(req)
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    // At the limit is fine.
    let r = web::post(&c, &proxy.url("/echo"), vec![b'x'; 1000]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body.len(), 1000);
    dispatcher.stop().await;
    proxy.stop().await;
}

type Frames = std::vec::IntoIter<Result<hyper::body::Frame<Bytes>, Infallible>>;

/// A body sent in chunks without a Content-Length.
fn chunked_body(
    chunks: Vec<Vec<u8>>,
) -> http_body_util::StreamBody<futures_util::stream::Iter<Frames>> {
    let frames: Vec<Result<hyper::body::Frame<Bytes>, Infallible>> = chunks
        .into_iter()
        .map(|c| Ok(hyper::body::Frame::data(Bytes::from(c))))
        .collect();
    http_body_util::StreamBody::new(futures_util::stream::iter(frames))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_dispatcher_means_504_after_the_hold_budget() {
    let redis = start_redis();
    let hold = Duration::from_millis(400);
    let proxy = TestProxy::start_with(&redis, "idle", |c| c.hold = hold).await;
    let c = client();
    let start = Instant::now();
    let r = web::get(&c, &proxy.url("/echo")).await;
    let waited = start.elapsed();
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT);
    assert!(
        waited >= hold,
        "answered before the hold budget: {waited:?}"
    );
    assert!(r.headers.contains_key("x-request-id"));
    assert_eq!(r.text(), "no response within the hold budget\n");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_past_its_deadline_is_never_executed() {
    let redis = start_redis();
    let proxy =
        TestProxy::start_with(&redis, "late", |c| c.hold = Duration::from_millis(300)).await;
    let c = client();
    for _ in 0..3 {
        let r = web::post(&c, &proxy.url("/echo"), "charge the card").await;
        assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT);
    }
    let keys_ = Keys::new("late").unwrap();
    let mut conn = redis_conn(&redis).await;
    assert_eq!(
        llen(&mut conn, &keys_.requests()).await,
        3,
        "the expired requests should still be queued"
    );

    let runs = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&runs);
    let dispatcher = dispatcher_builder(&redis, "late").build().unwrap();
    let processing = keys_.processing(dispatcher.id());
    let dispatcher = TestDispatcher::start_built(
        dispatcher,
        tower::service_fn(move |_req: Request<Body>| {
            counter.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ran")))) }
        }),
    );
    eventually("the queue to drain", Duration::from_secs(10), || {
        let mut conn = conn.clone();
        let (requests, processing) = (keys_.requests(), processing.clone());
        async move {
            llen(&mut conn, &requests).await == 0 && llen(&mut conn, &processing).await == 0
        }
    })
    .await;
    assert_eq!(
        runs.load(Ordering::SeqCst),
        0,
        "an expired request was executed"
    );
    // A fresh request is executed, so the dispatcher was working all along.
    let proxy2 = TestProxy::start(&redis, "late").await;
    let r = web::get(&c, &proxy2.url("/")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    dispatcher.stop().await;
    proxy.stop().await;
    proxy2.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_errors_and_panics_are_502_and_the_dispatcher_goes_on() {
    let redis = start_redis();
    let proxy = TestProxy::start(&redis, "err").await;
    let dispatcher = TestDispatcher::start(
        &redis,
        "err",
        tower::service_fn(|req: Request<Body>| async move {
            match req.uri().path() {
                "/error" => Err::<Response<Full<Bytes>>, _>(std::io::Error::other(
                    "database password is hunter2",
                )),
                "/panic" => panic!("handler bug"),
                _ => Ok(Response::new(Full::new(Bytes::from_static(b"fine")))),
            }
        }),
    );
    let c = client();
    for path in ["/error", "/panic", "/error"] {
        let r = web::get(&c, &proxy.url(path)).await;
        assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{path}");
        assert!(
            !r.text().contains("hunter2"),
            "internal detail leaked: {}",
            r.text()
        );
    }
    let r = web::get(&c, &proxy.url("/ok")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.text(), "fine");
    dispatcher.stop().await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_down_is_504_at_the_hold_budget_and_the_dispatcher_goes_on() {
    let redis = start_redis();
    let proxy = TestProxy::start_with(&redis, "down", |c| {
        c.hold = Duration::from_millis(800);
    })
    .await;
    let nothing_listens = format!("http://127.0.0.1:{}", free_port().unwrap());
    // Embedded without a health check: after a refused connection the
    // request goes back to the queue and pulling pauses for a second.
    let dispatcher = TestDispatcher::start(
        &redis,
        "down",
        UpstreamService::new(&nothing_listens).unwrap(),
    );
    let c = client();
    for _ in 0..2 {
        let started = Instant::now();
        let r = web::get(&c, &proxy.url("/echo")).await;
        assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT, "{}", r.text());
        assert!(started.elapsed() >= Duration::from_millis(800));
        let r = web::post(&c, &proxy.url("/echo"), "not carried out").await;
        assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT, "{}", r.text());
    }
    let mut conn = redis_conn(&redis).await;
    let live = keys(&mut conn, "anteroom:{down}:dispatcher:*").await;
    assert_eq!(live.len(), 1, "dispatcher heartbeat gone: {live:?}");
    dispatcher.stop().await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_unreachable_is_503() {
    let redis = start_redis();
    let proxy = TestProxy::start_with(&redis, "gone", |c| {
        c.redis_timeout = Duration::from_millis(300);
    })
    .await;
    let c = client();
    drop(redis); // kill redis-server under the running proxy
    let start = Instant::now();
    let r = send(
        &c,
        Request::get(proxy.url("/echo"))
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "took {:?}",
        start.elapsed()
    );
    proxy.stop().await;
}
