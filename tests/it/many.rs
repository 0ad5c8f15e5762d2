//! Many proxies and dispatchers on one Redis: two proxies, each fronting
//! two queues, and four dispatchers, two per queue. Every response reaches
//! its own client through its own proxy, a dispatcher never takes another
//! queue's request, and pause and status span all of them.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anteroom_dispatcher::Body;
use anteroom_proxy::RouteConfig;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};

use crate::support::web::{self, client};
use crate::support::{
    TestDispatcher, TestProxy, control, dispatcher_builder, eventually, llen, redis_conn,
    start_redis,
};

type Seen = Arc<Mutex<Vec<String>>>;

/// A dispatcher of `queue` that answers `<queue>:<body>` and records the
/// paths it was given.
fn dispatcher(
    redis: &anteroom_testkit::LocalRedis,
    queue: &'static str,
    seen: &Seen,
) -> TestDispatcher {
    let seen = Arc::clone(seen);
    let service = tower::service_fn(move |req: Request<Body>| {
        let seen = Arc::clone(&seen);
        async move {
            seen.lock().unwrap().push(req.uri().path().to_owned());
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let mut answer = format!("{queue}:").into_bytes();
            answer.extend_from_slice(&body);
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(answer))))
        }
    });
    TestDispatcher::start_built(
        dispatcher_builder(redis, queue)
            .concurrency(4)
            .build()
            .unwrap(),
        service,
    )
}

fn two_queues(config: &mut anteroom_proxy::ProxyConfig) {
    config.routes = vec![
        RouteConfig::new("alpha").path_prefix("/alpha/"),
        RouteConfig::new("beta").path_prefix("/beta/"),
    ];
    config.default_queue = false;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_proxies_four_dispatchers_two_queues() {
    let redis = start_redis();
    let proxies = Arc::new([
        TestProxy::start_with(&redis, "unused", two_queues).await,
        TestProxy::start_with(&redis, "unused", two_queues).await,
    ]);
    let (seen_alpha, seen_beta): (Seen, Seen) = Default::default();
    let dispatchers = vec![
        dispatcher(&redis, "alpha", &seen_alpha),
        dispatcher(&redis, "alpha", &seen_alpha),
        dispatcher(&redis, "beta", &seen_beta),
        dispatcher(&redis, "beta", &seen_beta),
    ];
    let (alpha, beta) = (
        control(&redis, "alpha").await,
        control(&redis, "beta").await,
    );
    eventually(
        "every proxy and dispatcher registered",
        Duration::from_secs(10),
        || async {
            let (a, b) = (alpha.status().await.unwrap(), beta.status().await.unwrap());
            a.dispatchers.len() == 2
                && b.dispatchers.len() == 2
                && a.proxies.len() == 2
                && b.proxies.len() == 2
        },
    )
    .await;

    // Concurrent traffic through both proxies to both queues.
    let c = client();
    let mut tasks = Vec::new();
    for i in 0..240usize {
        let queue = if i % 2 == 0 { "alpha" } else { "beta" };
        let url = proxies[(i / 2) % 2].url(&format!("/{queue}/{i}"));
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let body = format!("client {i}");
            let r = web::post(&c, &url, body.clone()).await;
            assert_eq!(r.status, StatusCode::OK, "{url}");
            assert_eq!(
                r.text(),
                format!("{queue}:{body}"),
                "{url} got another's reply"
            );
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    for (queue, seen) in [("alpha", &seen_alpha), ("beta", &seen_beta)] {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 120, "{queue} ran {} requests", seen.len());
        assert!(
            seen.iter().all(|p| p.starts_with(&format!("/{queue}/"))),
            "a {queue} dispatcher ran another queue's request: {seen:?}"
        );
    }

    // Pausing alpha stops both its dispatchers and only them.
    alpha.pause("test", None, false).await.unwrap();
    let quiet = alpha
        .wait_quiescent(Duration::from_secs(10), |_| {})
        .await
        .unwrap();
    assert_eq!(quiet.status.dispatchers.len(), 2);
    assert!(quiet.status.dispatchers.iter().all(|d| d.heartbeat.paused));
    let waiting: Vec<_> = (0..2)
        .map(|p| {
            let (c, url) = (c.clone(), proxies[p].url(&format!("/alpha/held-{p}")));
            tokio::spawn(async move { web::post(&c, &url, "held").await })
        })
        .collect();
    let mut conn = redis_conn(&redis).await;
    let requests = anteroom_protocol::Keys::new("alpha").unwrap().requests();
    eventually(
        "both alpha requests queued",
        Duration::from_secs(10),
        || {
            let (mut conn, key) = (conn.clone(), requests.clone());
            async move { llen(&mut conn, &key).await == 2 }
        },
    )
    .await;
    let r = web::post(&c, &proxies[1].url("/beta/meanwhile"), "still served").await;
    assert_eq!(r.text(), "beta:still served");
    let status = beta.status().await.unwrap();
    assert!(status.pause.is_none() && status.dispatchers.iter().all(|d| !d.heartbeat.paused));
    let status = alpha.status().await.unwrap();
    assert_eq!((status.waiting, status.proxies.len()), (2, 2));
    assert_eq!(llen(&mut conn, &requests).await, 2, "taken while paused");

    alpha.resume().await.unwrap();
    for w in waiting {
        let r = w.await.unwrap();
        assert_eq!(
            (r.status, r.text()),
            (StatusCode::OK, "alpha:held".to_owned())
        );
    }
    for d in dispatchers {
        d.stop().await;
    }
    let [p1, p2] = Arc::try_unwrap(proxies).ok().unwrap();
    p1.stop().await;
    p2.stop().await;
}
