//! What every framework's test app (Flask, Django, FastAPI, Express) must
//! answer through a proxy, checked the same way for each.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;

use super::TestProxy;
use super::web::{TestClient, get, send};

/// The checks every framework's test app passes through `proxy`: `/hello`
/// with a query, and `/echo` of a UTF-8 body and an ISO-8859-1 header (one
/// byte, as PEP 3333 and Node hand it to the app), answered as JSON; the
/// JSON, for checks of the framework's own.
pub(crate) async fn framework_app(
    c: &TestClient,
    proxy: &TestProxy,
    framework: &str,
) -> serde_json::Value {
    let hello = get(c, &proxy.url("/hello?name=anteroom")).await;
    assert_eq!(
        hello.status,
        StatusCode::OK,
        "{framework}: {}",
        hello.text()
    );
    assert_eq!(hello.text(), format!("hello from {framework}, anteroom\n"));
    let req = Request::post(proxy.url("/echo"))
        .header("x-test", http::HeaderValue::from_bytes(b"caf\xe9").unwrap())
        .header("content-type", "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from("é and bytes")))
        .unwrap();
    let echo = send(c, req).await;
    assert_eq!(echo.status, StatusCode::OK, "{framework}: {}", echo.text());
    let json: serde_json::Value = serde_json::from_str(&echo.text()).unwrap();
    assert_eq!(json["framework"], framework);
    assert_eq!(json["method"], "POST");
    assert_eq!(json["path"], "/echo");
    assert_eq!(json["body"], "é and bytes");
    assert_eq!(json["header"], "caf\u{e9}");
    // A body well over the proxy's --body-buffer (256 KiB; the proxy may
    // read one read past it before it decides) comes as a 'U', which the
    // adapters do not take yet: refused at once, with why.
    let started = Instant::now();
    let req = Request::post(proxy.url("/echo"))
        .header("content-type", "application/octet-stream")
        .body(Full::new(Bytes::from(vec![b'x'; 2 << 20])))
        .unwrap();
    let big = send(c, req).await;
    let said: String = big.text().chars().take(300).collect();
    assert_eq!(
        big.status,
        StatusCode::PAYLOAD_TOO_LARGE,
        "{framework}: {said}"
    );
    assert!(said.contains("--body-buffer"), "{framework}: {said}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{framework}: the refusal took {:?}",
        started.elapsed()
    );
    json
}

/// `/stream` of a framework's test app through `proxy`: `piece 0\n` and,
/// 600 ms later, `piece 1\n`, arriving as the app writes them (the first
/// well before the second), not together at the end.
pub(crate) async fn streams_in_pieces(c: &TestClient, proxy: &TestProxy, framework: &str) {
    let req = Request::get(proxy.url("/stream"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = c.request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "{framework}");
    let mut body = resp.into_body();
    let mut arrivals = Vec::new();
    let mut text = Vec::new();
    while let Some(frame) = http_body_util::BodyExt::frame(&mut body).await {
        let frame = frame.unwrap_or_else(|e| panic!("{framework}: the stream broke: {e}"));
        if let Ok(data) = frame.into_data() {
            arrivals.push(Instant::now());
            text.extend_from_slice(&data);
        }
    }
    assert_eq!(text, b"piece 0\npiece 1\n", "{framework}");
    let spread = *arrivals.last().unwrap() - arrivals[0];
    assert!(
        spread >= Duration::from_millis(400),
        "{framework}: the pieces arrived together ({spread:?})"
    );
}
