//! Requests through proxy + dispatcher, embedded and upstream, byte-exact.

use anteroom_dispatcher::Upstream as UpstreamService;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, StatusCode};
use http_body_util::Full;

use crate::support::app::{Upstream, test_app};
use crate::support::web::{self, Reply, client, h2c_client, send};
use crate::support::{TestDispatcher, TestProxy, start_redis};

/// The two ways a backend sits behind Anteroom.
enum Backend {
    Embedded,
    Upstream,
}

/// Starts redis, a proxy, and a dispatcher of the given kind; runs `check`.
async fn with_stack<F, Fut>(backend: Backend, check: F)
where
    F: FnOnce(TestProxy) -> Fut,
    Fut: std::future::Future<Output = TestProxy>,
{
    let redis = start_redis();
    let proxy = TestProxy::start(&redis, "rt").await;
    let upstream;
    let dispatcher = match backend {
        Backend::Embedded => TestDispatcher::start(&redis, "rt", test_app()),
        Backend::Upstream => {
            upstream = Upstream::start().await;
            TestDispatcher::start(&redis, "rt", UpstreamService::new(&upstream.url()).unwrap())
        }
    };
    let proxy = check(proxy).await;
    dispatcher.stop().await;
    proxy.stop().await;
}

async fn methods(proxy: &TestProxy) {
    let c = client();
    for method in [
        Method::GET,
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::PATCH,
    ] {
        let body = format!("body of {method}");
        let req = Request::builder()
            .method(method.clone())
            .uri(proxy.url("/echo/items/7?q=a%20b&x=1"))
            .header("content-type", "text/plain")
            .body(Full::new(Bytes::from(body.clone())))
            .unwrap();
        let r = send(&c, req).await;
        assert_eq!(r.status, StatusCode::OK, "{method}: {}", r.text());
        assert_eq!(r.headers["x-method"], method.as_str());
        assert_eq!(r.headers["x-path"], "/echo/items/7?q=a%20b&x=1");
        assert_eq!(r.headers["content-type"], "text/plain");
        assert_eq!(r.text(), body);
    }
    // Application statuses pass through untouched.
    let r = web::get(&c, &proxy.url("/status/418")).await;
    assert_eq!(r.status, StatusCode::IM_A_TEAPOT);
    let r = web::get(&c, &proxy.url("/nowhere")).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn methods_through_embedded_dispatcher() {
    with_stack(Backend::Embedded, |proxy| async move {
        methods(&proxy).await;
        proxy
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn methods_through_upstream_dispatcher() {
    with_stack(Backend::Upstream, |proxy| async move {
        methods(&proxy).await;
        proxy
    })
    .await;
}

/// 1 MiB of every byte value, both ways, and non-UTF-8 / duplicate headers.
async fn exact_bytes(proxy: &TestProxy) {
    let c = client();
    let body: Vec<u8> = (0..1024 * 1024).map(|i| (i * 7 % 256) as u8).collect();
    let req = Request::post(proxy.url("/echo"))
        .header("content-type", "application/octet-stream")
        .header("x-test-dup", "first")
        .header("x-test-dup", "second")
        .header(
            "x-test-bin",
            HeaderValue::from_bytes(b"caf\xe9 \xff\x80").unwrap(),
        )
        .body(Full::new(Bytes::from(body.clone())))
        .unwrap();
    let r: Reply = send(&c, req).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body.len(), body.len());
    assert!(r.body == body, "body changed in transit");
    let dups: Vec<_> = r.headers.get_all("x-test-dup").iter().collect();
    assert_eq!(dups, ["first", "second"]);
    assert_eq!(r.headers["x-test-bin"].as_bytes(), b"caf\xe9 \xff\x80");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_body_and_raw_headers_embedded() {
    with_stack(Backend::Embedded, |proxy| async move {
        exact_bytes(&proxy).await;
        proxy
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_body_and_raw_headers_upstream() {
    with_stack(Backend::Upstream, |proxy| async move {
        exact_bytes(&proxy).await;
        proxy
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_and_request_id() {
    with_stack(Backend::Upstream, |proxy| async move {
        let c = client();
        // No request id: the proxy makes one, sends it on and returns it.
        let req = Request::get(proxy.url("/echo"))
            .header("connection", "keep-alive, x-secret")
            .header("x-secret", "hop-by-hop")
            .header("x-forwarded-for", "203.0.113.9")
            .body(Full::default())
            .unwrap();
        let r = send(&c, req).await;
        assert_eq!(r.status, StatusCode::OK);
        let id = r.headers["x-request-id"].to_str().unwrap().to_owned();
        assert!(id.len() >= 32, "generated id {id:?}");
        assert_eq!(r.headers["x-saw-request-id"], id.as_str());
        assert_eq!(r.headers["x-saw-forwarded-for"], "203.0.113.9, 127.0.0.1");
        assert_eq!(r.headers["x-saw-forwarded-proto"], "http");
        assert_eq!(r.headers["x-saw-host"], proxy.addr.to_string().as_str());
        assert!(!r.headers.contains_key("x-test-secret"));
        // A client's own request id is kept.
        let req = Request::get(proxy.url("/echo"))
            .header("x-request-id", "client-chosen-42")
            .body(Full::default())
            .unwrap();
        let r = send(&c, req).await;
        assert_eq!(r.headers["x-request-id"], "client-chosen-42");
        assert_eq!(r.headers["x-saw-request-id"], "client-chosen-42");
        proxy
    })
    .await;
}

/// Headers the proxy edits keep every line a client or a load balancer
/// sent (RFC 9110 §5.3), and HTTP/2 cookie fields reach an HTTP/1.1 app as
/// one `Cookie` (RFC 9113 §8.2.3); through a real upstream server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_forwarding_lines_and_h2_cookies_reach_the_app_whole() {
    with_stack(Backend::Upstream, |proxy| async move {
        let lines = |r: &Reply, name: &str| -> Vec<String> {
            r.headers
                .get_all(name)
                .iter()
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .collect()
        };
        for (c, h2) in [(client(), false), (h2c_client(), true)] {
            let req = Request::get(proxy.url("/echo"))
                .header("x-forwarded-for", "198.51.100.1")
                .header("x-forwarded-for", "203.0.113.2")
                .header("cookie", "a=1")
                .header("cookie", "b=2")
                .body(Full::default())
                .unwrap();
            let r = send(&c, req).await;
            assert_eq!(r.status, StatusCode::OK);
            assert_eq!(
                lines(&r, "x-saw-forwarded-for"),
                ["198.51.100.1, 203.0.113.2, 127.0.0.1"]
            );
            let cookies = lines(&r, "x-saw-cookie");
            if h2 {
                assert_eq!(cookies, ["a=1; b=2"]);
            } else {
                // HTTP/1.1 carries what the client sent.
                assert_eq!(cookies, ["a=1", "b=2"]);
            }
        }
        proxy
    })
    .await;
}

/// An app answering with more header fields than hyper's default of 100
/// (many `Set-Cookie` lines, say) is passed through whole, as nginx does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_with_many_header_fields_pass_through() {
    with_stack(Backend::Upstream, |proxy| async move {
        // A client that itself accepts that many.
        let c: crate::support::web::TestClient =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .http1_max_headers(1000)
                .build_http();
        let r = web::get(&c, &proxy.url("/headers/110")).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert!((0..110).all(|i| r.headers.contains_key(format!("x-h-{i}").as_str())));
        assert_eq!(r.text(), "many headers");
        proxy
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_clients_are_served() {
    with_stack(Backend::Embedded, |proxy| async move {
        let c = h2c_client();
        let req = Request::post(proxy.url("/echo"))
            .body(Full::new(Bytes::from_static(b"over h2c")))
            .unwrap();
        let r = send(&c, req).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.text(), "over h2c");
        // HTTP/2 has no Host header; the proxy supplies it from :authority.
        assert_eq!(r.headers["x-method"], "POST");
        proxy
    })
    .await;
}

/// RFC 9112 §3.2: an HTTP/1.1 request without `Host`, or with two, or with
/// one that is not `host[:port]`, gets 400 and never reaches the app;
/// HTTP/1.0 may omit it; with an absolute-form target the target's
/// authority is the host (§3.2.2). Raw bytes on a real socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_fields_follow_rfc_9112() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    with_stack(Backend::Upstream, |proxy| async move {
        let raw = |request: &'static str| {
            let addr = proxy.addr;
            async move {
                let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
                socket.write_all(request.as_bytes()).await.unwrap();
                let mut answer = Vec::new();
                tokio::time::timeout(
                    std::time::Duration::from_secs(10),
                    socket.read_to_end(&mut answer),
                )
                .await
                .expect("the proxy answered and closed")
                .unwrap();
                String::from_utf8_lossy(&answer).into_owned()
            }
        };
        for bad in [
            "GET /echo HTTP/1.1\r\nConnection: close\r\n\r\n",
            "GET /echo HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\nConnection: close\r\n\r\n",
            "GET /echo HTTP/1.1\r\nHost: user@a.example\r\nConnection: close\r\n\r\n",
            "GET /echo HTTP/1.1\r\nHost: a.example/x\r\nConnection: close\r\n\r\n",
        ] {
            let answer = raw(bad).await;
            assert!(answer.starts_with("HTTP/1.1 400"), "{bad:?} got {answer}");
            assert!(!answer.contains("x-saw-host"), "reached the app: {answer}");
        }
        let answer = raw("GET /echo HTTP/1.0\r\n\r\n").await;
        assert!(answer.starts_with("HTTP/1.0 200"), "{answer}");
        let answer = raw(
            "GET http://example.org/echo HTTP/1.1\r\nHost: other.example\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.contains("x-saw-host: example.org\r\n"), "{answer}");

        // HTTP/2: a Host beside an :authority naming another host is
        // malformed (RFC 9113 §8.3.1); the same host passes.
        let c = h2c_client();
        let authority = proxy.addr.to_string();
        for (host, status) in [
            ("other.example", StatusCode::BAD_REQUEST),
            (authority.as_str(), StatusCode::OK),
        ] {
            let req = Request::get(proxy.url("/echo"))
                .header("host", host)
                .body(Full::default())
                .unwrap();
            let r = send(&c, req).await;
            assert_eq!(r.status, status, "Host {host} with :authority {authority}");
        }
        proxy
    })
    .await;
}
