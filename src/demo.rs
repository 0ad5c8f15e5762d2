//! `anteroom demo`: proxy, dispatcher and a small backend in one process.

use std::convert::Infallible;
use std::time::Duration;

use anteroom_dispatcher::{Body, Dispatcher};
use anteroom_runtime::Components;
use anyhow::Context;
use bytes::Bytes;
use futures_util::stream::BoxStream;
use http::{Request, Response, StatusCode, header};
use http_body::Frame;
use http_body_util::{Either, StreamBody};
use tokio::net::TcpListener;

use crate::cli::DemoArgs;
use crate::commands::shutdown_signal;
use anteroom_redis::local::LocalRedis;

pub(crate) async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let (redis_url, _private_redis) = match args.redis {
        Some(url) => (url, None),
        None => {
            let redis = tokio::task::spawn_blocking(LocalRedis::start)
                .await
                .context("starting redis-server")??;
            tracing::info!(port = redis.port(), "started a private redis-server");
            (redis.url(), Some(redis))
        }
    };
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;

    // The proxy and the dispatcher are two components of one process: one
    // failing stops the other, and the demo exits with its error.
    let parts = Components::new();
    let mut config = anteroom_proxy::ProxyConfig::new(redis_url.clone(), args.queue.clone());
    config.grace = Duration::from_secs(5);
    let stop = parts.stopping();
    parts.spawn(
        "proxy",
        anteroom_proxy::serve(listener, config, async move { stop.cancelled().await }),
    );
    let dispatcher = Dispatcher::builder()
        .redis_url(redis_url.clone())
        .queue(args.queue.clone())
        .concurrency(64)
        .grace(Duration::from_secs(5))
        .label("demo")
        .build()?;
    let mut ready = dispatcher.ready();
    let stop = parts.stopping();
    parts.spawn(
        "dispatcher",
        dispatcher.serve_fn(backend, async move { stop.cancelled().await }),
    );
    // The banner only once the dispatcher serves (Redis answered): a demo
    // that cannot start says why instead.
    let serving = tokio::select! {
        serving = ready.wait() => serving,
        _ = parts.failed() => false,
    };
    if !serving {
        parts.shutdown(Duration::from_secs(10)).await?;
        anyhow::bail!("the demo stopped before it served");
    }

    // Written at once, and a closed stdout (e.g. `| head -1`) is not an error.
    let exe = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "anteroom".to_owned());
    let target = format!(
        "--redis {} --queue {queue}",
        crate::ops::redact(&redis_url),
        queue = args.queue
    );
    let banner = format!(
        "Anteroom demo is up: http://{addr}/\n  curl http://{addr}/hello\n  curl -d 'any bytes' http://{addr}/echo\n  curl 'http://{addr}/slow?ms=2000'\n  curl -N 'http://{addr}/events?n=5&ms=1000'\n  ws://{addr}/ws echoes WebSocket messages (a browser console: new WebSocket('ws://{addr}/ws'))\n  head -c 100M /dev/urandom | curl -sT - http://{addr}/echo | wc -c\nEach request waits in Redis until the dispatcher takes it. Ctrl-C stops.\nIts queue, from another terminal:\n  {exe} status {target}\n  {exe} pause {target}\n  {exe} resume {target}\n"
    );
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(banner.as_bytes()).and_then(|()| out.flush());
    }

    tokio::select! {
        () = shutdown_signal() => {}
        _ = parts.failed() => {}
    }
    // Both drain within their 5 s grace periods.
    parts.shutdown(Duration::from_secs(10)).await?;
    Ok(())
}

/// A demo response body: whole, or (for `/events`) streamed.
type DemoBody = Either<Body, StreamBody<BoxStream<'static, Result<Frame<Bytes>, Infallible>>>>;

/// The demo backend: `/events?n=N&ms=M` (N server-sent events, M ms apart,
/// streamed as written: `curl -N`), and the plain routes of [`plain`].
async fn backend(req: Request<Body>) -> Result<Response<DemoBody>, Infallible> {
    if req.uri().path() == "/ws" {
        return Ok(websocket_echo(req).map(Either::Left));
    }
    if req.uri().path() != "/events" {
        let resp = plain(req).await?;
        return Ok(resp.map(Either::Left));
    }
    let query = req.uri().query().unwrap_or("");
    let param = |name: &str, default: u64, max: u64| {
        query
            .split('&')
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(default)
            .min(max)
    };
    let (n, ms) = (param("n", 5, 1000), param("ms", 1000, 10_000));
    let events = futures_util::stream::unfold(0, move |i| async move {
        if i >= n {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(ms)).await;
        let event = format!(
            "id: {i}\ndata: event {} of {n}, sent through Redis as it was written\n\n",
            i + 1
        );
        Some((Ok(Frame::data(Bytes::from(event))), i + 1))
    });
    let body = StreamBody::new(Box::pin(events) as BoxStream<'static, _>);
    Ok(Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Either::Right(body))
        .unwrap_or_else(|_| Response::new(Either::Left(Body::default()))))
}

/// `/ws`: a WebSocket that sends every text and binary message back (RFC
/// 6455 handshake answered here; the dispatcher serves the backend over a
/// connection with upgrades, so the connection is handed over as hyper
/// hands over any upgraded connection).
fn websocket_echo(mut req: Request<Body>) -> Response<Body> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
    let key = req.headers().get(header::SEC_WEBSOCKET_KEY).cloned();
    let Some(key) = key.filter(|_| req.headers().contains_key(header::UPGRADE)) else {
        return Response::builder()
            .status(StatusCode::UPGRADE_REQUIRED)
            .header(header::UPGRADE, "websocket")
            .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
            .body(Body::from(
                "/ws is a WebSocket: connect to it with ws://, not http://\n",
            ))
            .unwrap_or_default();
    };
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else {
            return;
        };
        let io = hyper_util::rt::TokioIo::new(upgraded);
        let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            io,
            tokio_tungstenite::tungstenite::protocol::Role::Server,
            None,
        )
        .await;
        while let Some(Ok(message)) = ws.next().await {
            if (message.is_text() || message.is_binary()) && ws.send(message).await.is_err() {
                return;
            }
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::UPGRADE, "websocket")
        .header(header::CONNECTION, "upgrade")
        .header(
            header::SEC_WEBSOCKET_ACCEPT,
            derive_accept_key(key.as_bytes()),
        )
        .body(Body::default())
        .unwrap_or_default()
}

/// `/hello`, `/echo` (returns the body, streamed as it arrives when it
/// is large) and `/slow?ms=N`.
async fn plain(req: Request<Body>) -> Result<Response<Body>, Infallible> {
    let text = |status: StatusCode, body: String| {
        Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
            .body(Body::from(body))
            .unwrap_or_default()
    };
    let path = req.uri().path().to_owned();
    Ok(match path.as_str() {
        "/" | "/hello" => text(
            StatusCode::OK,
            format!(
                "Hello from Anteroom! This {} {} travelled through Redis.\n",
                req.method(),
                path
            ),
        ),
        "/echo" => {
            let content_type = req.headers().get(header::CONTENT_TYPE).cloned();
            let mut resp = Response::new(req.into_body());
            if let Some(ct) = content_type {
                resp.headers_mut().insert(header::CONTENT_TYPE, ct);
            }
            resp
        }
        "/slow" => {
            let ms = req
                .uri()
                .query()
                .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("ms=")))
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(1000)
                .min(10_000);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            text(StatusCode::OK, format!("slept {ms} ms\n"))
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n".to_owned()),
    })
}
