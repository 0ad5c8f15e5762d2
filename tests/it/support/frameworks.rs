//! What every framework's test app (Flask, Django, FastAPI, Express) must
//! answer through a proxy, checked the same way for each.

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
    json
}
