//! One proxy in front of several queues: routes by host and path prefix
//! (first match wins), a default queue or 404, and each route's own hold
//! budget and waiting caps.

use std::convert::Infallible;
use std::time::Duration;

use anteroom_dispatcher::Body;
use anteroom_proxy::RouteConfig;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;

use crate::support::web::{TestClient, client, send};
use crate::support::{TestDispatcher, TestProxy, control, start_redis};

/// A backend that names its queue in the body.
fn named(
    queue: &'static str,
) -> impl tower::Service<
    Request<Body>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future: Send + 'static,
> + Clone
+ Send
+ 'static {
    tower::service_fn(move |req: Request<Body>| async move {
        let body = format!("{queue} {}", req.uri().path());
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))))
    })
}

async fn get(c: &TestClient, proxy: &TestProxy, host: &str, path: &str) -> (StatusCode, String) {
    let req = Request::get(proxy.url(path))
        .header("host", host)
        .body(Full::default())
        .unwrap();
    let r = send(c, req).await;
    (r.status, r.text())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_pick_the_queue_by_host_then_path_first_match_wins() {
    let redis = start_redis();
    let proxy = TestProxy::start_with(&redis, "site", |c| {
        c.routes = vec![
            RouteConfig::new("api").host("api.example.com"),
            RouteConfig::new("admin").path_prefix("/admin/"),
            // Never reached for /admin/ paths: the route above comes first.
            RouteConfig::new("never").path_prefix("/admin/x"),
        ];
    })
    .await;
    let _site = TestDispatcher::start(&redis, "site", named("site"));
    let _api = TestDispatcher::start(&redis, "api", named("api"));
    let _admin = TestDispatcher::start(&redis, "admin", named("admin"));
    let c = client();
    for (host, path, expected) in [
        ("api.example.com", "/admin/x", "api /admin/x"),
        ("API.Example.com:8080", "/v1", "api /v1"),
        ("www.example.com", "/admin/x/y", "admin /admin/x/y"),
        ("www.example.com", "/administrators", "site /administrators"),
        ("www.example.com", "/", "site /"),
    ] {
        let (status, body) = get(&c, &proxy, host, path).await;
        assert_eq!(status, StatusCode::OK, "{host}{path}");
        assert_eq!(body, expected, "{host}{path}");
    }
    // The proxy heartbeats on every queue it serves, and on no other.
    for (queue, expected) in [("site", 1), ("api", 1), ("admin", 1), ("never", 1)] {
        let status = control(&redis, queue).await.status().await.unwrap();
        assert_eq!(status.proxies.len(), expected, "{queue}");
    }
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_default_queue_unrouted_requests_get_404() {
    let redis = start_redis();
    let proxy = TestProxy::start_with(&redis, "unused", |c| {
        c.routes = vec![RouteConfig::new("api").path_prefix("/api/")];
        c.default_queue = false;
    })
    .await;
    let _api = TestDispatcher::start(&redis, "api", named("api"));
    let c = client();
    let (status, body) = get(&c, &proxy, "x.example", "/api/ping").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "api /api/ping"));
    let (status, body) = get(&c, &proxy, "x.example", "/elsewhere").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body, "no queue serves this host and path on this proxy\n");
    // The default queue is not served at all.
    let status = control(&redis, "unused").await.status().await.unwrap();
    assert!(status.proxies.is_empty());
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_route_has_its_own_hold_budget_and_caps() {
    let redis = start_redis();
    let proxy = TestProxy::start_with(&redis, "main", |c| {
        c.hold = Duration::from_secs(20);
        c.routes = vec![{
            let mut quick = RouteConfig::new("quick").path_prefix("/quick/");
            quick.hold = Some(Duration::from_millis(300));
            quick.max_waiting = Some(1);
            quick
        }];
    })
    .await;
    // No dispatchers: everything waits.
    let c = client();
    let started = std::time::Instant::now();
    let first = tokio::spawn({
        let c = c.clone();
        let url = proxy.url("/quick/1");
        async move { crate::support::web::get(&c, &url).await.status }
    });
    let main = tokio::spawn({
        let c = c.clone();
        let url = proxy.url("/main");
        async move { crate::support::web::get(&c, &url).await.status }
    });
    crate::support::eventually(
        "the quick request to wait",
        Duration::from_secs(5),
        || async {
            control(&redis, "quick")
                .await
                .status()
                .await
                .unwrap()
                .waiting
                == 1
        },
    )
    .await;
    // The quick route holds one request at most; the main route is not full.
    let (status, _) = get(&c, &proxy, "h", "/quick/2").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(first.await.unwrap(), StatusCode::GATEWAY_TIMEOUT);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the quick route's 300 ms hold was not applied"
    );
    assert!(
        !main.is_finished(),
        "the main route's 20 s hold was cut short"
    );
    let _main_dispatcher = TestDispatcher::start(&redis, "main", named("main"));
    assert_eq!(main.await.unwrap(), StatusCode::OK);
    proxy.stop().await;
}
