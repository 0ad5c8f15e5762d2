//! The conformance kit's reference app (docs/clients.md, "The conformance
//! kit") served by the Rust dispatcher library: what `anteroom conformance`
//! drives to check the Rust dispatcher, as each client library's own
//! reference app is driven to check it.
//!
//! ```text
//! cargo build --example conformance_app
//! anteroom conformance -- target/debug/examples/conformance_app
//! ```
//!
//! Reads `ANTEROOM_REDIS`, `ANTEROOM_QUEUE`, `ANTEROOM_HEARTBEAT_TTL`,
//! `ANTEROOM_GRACE` and `ANTEROOM_CONFORMANCE_LOG` (the kit sets them);
//! SIGTERM or SIGINT stops it gracefully.

use std::convert::Infallible;
use std::io::Write;
use std::time::Duration;

use anteroom_dispatcher::Dispatcher;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, Request};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};

/// `/echo`: the body back, with `x-method`, `x-target` and every `x-test-*`
/// request header (in order, repeats kept).
async fn echo(req: Request) -> Response {
    let method = req.method().as_str().to_owned();
    let target = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let mut headers = HeaderMap::new();
    for (name, value) in req.headers() {
        if name.as_str().starts_with("x-test-") {
            headers.append(name.clone(), value.clone());
        }
    }
    let body = axum::body::to_bytes(req.into_body(), usize::MAX)
        .await
        .unwrap_or_default();
    let mut resp = body.into_response();
    resp.headers_mut().extend(headers);
    for (name, value) in [("x-method", method), ("x-target", target)] {
        if let Ok(value) = HeaderValue::from_str(&value) {
            resp.headers_mut()
                .insert(HeaderName::from_static(name), value);
        }
    }
    resp
}

/// `/status/{code}`: that status, with `x-status`.
async fn status(Path(code): Path<u16>) -> Response {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_REQUEST);
    (
        status,
        [("x-status", code.to_string())],
        format!("status {code}\n"),
    )
        .into_response()
}

#[derive(serde::Deserialize)]
struct Delay {
    ms: Option<u64>,
}

/// `/touch/{id}?ms=N`: appends `id` to the log, then answers after N ms.
async fn touch(Path(id): Path<String>, Query(delay): Query<Delay>) -> &'static str {
    if let Some(log) = std::env::var_os("ANTEROOM_CONFORMANCE_LOG") {
        if let Ok(mut file) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
        {
            // One write: lines of requests run at once must not interleave
            // (`writeln!` may write the id and the newline apart).
            let _ = file.write_all(format!("{id}\n").as_bytes());
        }
    }
    tokio::time::sleep(Duration::from_millis(delay.ms.unwrap_or(0))).await;
    "touched\n"
}

#[derive(serde::Deserialize)]
struct Chunks {
    n: Option<u64>,
    ms: Option<u64>,
}

/// `/stream?n=N&ms=M`: `chunk 0\n` ... `chunk N-1\n`, M ms apart.
async fn stream(Query(chunks): Query<Chunks>) -> Body {
    let (n, ms) = (chunks.n.unwrap_or(3), chunks.ms.unwrap_or(100));
    let pieces = futures_util::stream::unfold(0, move |i| async move {
        if i >= n {
            return None;
        }
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        Some((
            Ok::<_, Infallible>(Bytes::from(format!("chunk {i}\n"))),
            i + 1,
        ))
    });
    Body::from_stream(pieces)
}

fn duration(name: &str, default: Duration) -> Duration {
    std::env::var(name)
        .ok()
        .and_then(|v| humantime::parse_duration(&v).ok())
        .unwrap_or(default)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt().init();
    let app = Router::new()
        .route("/echo", any(echo))
        .route("/status/{code}", any(status))
        .route("/touch/{id}", any(touch))
        .route("/stream", get(stream));
    let dispatcher = Dispatcher::builder()
        .redis_url(std::env::var("ANTEROOM_REDIS").unwrap_or("redis://127.0.0.1:6379".into()))
        .queue(std::env::var("ANTEROOM_QUEUE").unwrap_or("default".into()))
        .heartbeat_ttl(duration("ANTEROOM_HEARTBEAT_TTL", Duration::from_secs(10)))
        .grace(duration("ANTEROOM_GRACE", Duration::from_secs(30)))
        .build()?;
    let stop = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("a SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    dispatcher.serve(app, stop).await?;
    Ok(())
}
