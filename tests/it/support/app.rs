//! The backend used in tests, both embedded and as a real upstream server.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// Routes:
/// - `/echo`: the body back; `x-method`, `x-path`; every `x-test-*` request
///   header copied to the response (duplicates and raw bytes kept); the
///   forwarding headers and cookies it saw as `x-saw-*` (one line each).
/// - `/slow?ms=N`: sleeps, then 200.
/// - `/status/N`: answers status N.
/// - `/headers/N`: answers with N header fields `x-h-0`...
pub fn test_app() -> Router {
    Router::new()
        .route("/echo", any(echo))
        .route("/echo/{*rest}", any(echo))
        .route("/slow", any(slow))
        .route("/status/{code}", any(status))
        .route("/headers/{count}", any(many_headers))
        .layer(DefaultBodyLimit::disable())
}

async fn echo(method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let mut resp = body.into_response();
    let h = resp.headers_mut();
    h.insert("x-method", HeaderValue::from_str(method.as_str()).unwrap());
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    h.insert("x-path", HeaderValue::from_str(path).unwrap());
    for (name, value) in &headers {
        if name.as_str().starts_with("x-test-") {
            h.append(name.clone(), value.clone());
        }
    }
    // Every line of each, so a test sees how many arrived.
    for (seen, saw) in [
        ("x-forwarded-for", "x-saw-forwarded-for"),
        ("x-forwarded-proto", "x-saw-forwarded-proto"),
        ("x-request-id", "x-saw-request-id"),
        ("host", "x-saw-host"),
        ("connection", "x-saw-connection"),
        ("cookie", "x-saw-cookie"),
    ] {
        for v in headers.get_all(seen) {
            h.append(saw, v.clone());
        }
    }
    if let Some(ct) = headers.get(header::CONTENT_TYPE) {
        h.insert(header::CONTENT_TYPE, ct.clone());
    }
    resp
}

async fn slow(uri: Uri) -> &'static str {
    let ms = uri
        .query()
        .and_then(|q| q.strip_prefix("ms="))
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    tokio::time::sleep(Duration::from_millis(ms)).await;
    "done\n"
}

/// A response with `count` header fields `x-h-0`..., as an app with many
/// `Set-Cookie` or policy fields sends.
async fn many_headers(axum::extract::Path(count): axum::extract::Path<usize>) -> Response {
    let mut resp = "many headers".into_response();
    for i in 0..count {
        resp.headers_mut().insert(
            axum::http::HeaderName::from_bytes(format!("x-h-{i}").as_bytes()).unwrap(),
            HeaderValue::from_static("v"),
        );
    }
    resp
}

async fn status(axum::extract::Path(code): axum::extract::Path<u16>) -> StatusCode {
    StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_REQUEST)
}

/// `test_app()` served over real HTTP on a port-0 listener.
pub struct Upstream {
    pub addr: SocketAddr,
    handle: JoinHandle<()>,
}

impl Upstream {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let handle = tokio::spawn(async move {
            axum::serve(listener, test_app()).await.unwrap();
        });
        Self { addr, handle }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.handle.abort();
    }
}

/// What [`recording_upstream`] has run: the `ID` of each `/run/ID`, in
/// order.
pub type Ran = std::sync::Arc<std::sync::Mutex<Vec<String>>>;

/// An app that records `ID` for every request to `/run/ID` (any method, any body) and answers `ran` with an
/// `x-ran: ID` header field, after `N` ms with `?ms=N`; and echoes each
/// message of a WebSocket at `/ws` (not recorded). Returns it and the
/// record.
pub fn recording_router() -> (Router, Ran) {
    let ran = Ran::default();
    let app = Router::new()
        .route("/ws", any(echo_socket))
        .route(
            "/run/{id}",
            any(
                |axum::extract::State(ran): axum::extract::State<Ran>,
                 axum::extract::Path(id): axum::extract::Path<String>,
                 axum::extract::RawQuery(query): axum::extract::RawQuery,
                 _body: Bytes| async move {
                    ran.lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .push(id.clone());
                    let ms = query
                        .as_deref()
                        .and_then(|q| q.strip_prefix("ms="))
                        .and_then(|ms| ms.parse().ok())
                        .unwrap_or(0);
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    ([("x-ran", id)], "ran\n")
                },
            ),
        )
        .layer(DefaultBodyLimit::disable())
        .with_state(ran.clone());
    (app, ran)
}

/// Echoes each text or binary message of the socket until it closes, as
/// any axum app's WebSocket handler would.
pub async fn echo_socket(upgrade: axum::extract::ws::WebSocketUpgrade) -> Response {
    use axum::extract::ws::Message;
    upgrade.on_upgrade(|mut socket| async move {
        while let Some(Ok(message)) = socket.recv().await {
            let reply = match message {
                Message::Text(_) | Message::Binary(_) => message,
                Message::Close(_) => return,
                _ => continue,
            };
            if socket.send(reply).await.is_err() {
                return;
            }
        }
    })
}

/// [`recording_router`] served on a port-0 listener: its URL and the
/// record. It runs until the test's runtime ends.
pub async fn recording_upstream() -> (String, Ran) {
    let (app, ran) = recording_router();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, ran)
}
