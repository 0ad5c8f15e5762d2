//! Streamed responses through the queue: events arrive as the app writes
//! them, large bodies cross in bounded memory and byte-exact, and a stream
//! cut short is never ended cleanly.

use std::convert::Infallible;
use std::time::{Duration, Instant};

use anteroom_dispatcher::Body;
use anteroom_protocol::now_ms;
use anteroom_testkit::start_redis;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use tokio::sync::mpsc;

use crate::support::web::client;
use crate::support::{TestDispatcher, TestProxy};

type Events = StreamBody<tokio_stream_like::Receiver>;

/// A channel as a body stream (tokio's receiver is not a `Stream` by itself).
mod tokio_stream_like {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use bytes::Bytes;
    use hyper::body::Frame;

    pub(crate) struct Receiver(
        pub(crate) tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, std::io::Error>>,
    );

    impl futures_util::Stream for Receiver {
        type Item = Result<Frame<Bytes>, std::io::Error>;

        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            self.0.poll_recv(cx)
        }
    }
}

/// An app serving `/events?n=N&ms=M`: N server-sent events M ms apart, each
/// carrying the Unix milliseconds it was written at; `/bytes?n=N`: N bytes
/// of a known pattern in 64 KiB writes; `/broken`: some bytes, then an error.
async fn app(req: Request<Body>) -> Result<Response<Events>, Infallible> {
    let query = req.uri().query().unwrap_or("").to_owned();
    let param = |name: &str| {
        query
            .split('&')
            .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let (tx, rx) = mpsc::channel(4);
    let path = req.uri().path().to_owned();
    let (n, ms) = (param("n"), param("ms"));
    let content_type = if path == "/events" {
        "text/event-stream"
    } else {
        "application/octet-stream"
    };
    tokio::spawn(async move {
        match path.as_str() {
            "/events" => {
                for i in 0..n {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    let event = format!("id: {i}\ndata: {}\n\n", now_ms());
                    if tx.send(Ok(Frame::data(Bytes::from(event)))).await.is_err() {
                        return;
                    }
                }
            }
            "/bytes" => {
                let mut sent = 0u64;
                while sent < n {
                    let len = (n - sent).min(64 * 1024);
                    let chunk = pattern(sent, len as usize);
                    if tx.send(Ok(Frame::data(chunk))).await.is_err() {
                        return;
                    }
                    sent += len;
                }
            }
            _ => {
                let _ = tx
                    .send(Ok(Frame::data(Bytes::from_static(b"partial"))))
                    .await;
                tokio::time::sleep(Duration::from_millis(200)).await;
                let _ = tx.send(Err(std::io::Error::other("the app broke"))).await;
            }
        }
    });
    let body = StreamBody::new(tokio_stream_like::Receiver(rx));
    Ok(Response::builder()
        .header("content-type", content_type)
        .body(body)
        .unwrap())
}

/// `len` bytes of the pattern at `offset`: byte i is `(i * 31 + i / 65536) % 251`.
fn pattern(offset: u64, len: usize) -> Bytes {
    (offset..offset + len as u64)
        .map(|i| ((i * 31 + i / 65_536) % 251) as u8)
        .collect::<Vec<u8>>()
        .into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_sent_events_arrive_as_they_are_written() {
    let redis = start_redis();
    let proxy = TestProxy::start(&redis, "sse").await;
    let dispatcher = TestDispatcher::start(&redis, "sse", tower::service_fn(app));
    let c = client();
    let req = Request::get(proxy.url("/events?n=10&ms=100"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = c.request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.into_body();
    let mut text = String::new();
    let mut delays = Vec::new();
    while let Some(frame) = body.frame().await {
        let data = frame.unwrap().into_data().unwrap();
        let arrived = now_ms();
        text.push_str(std::str::from_utf8(&data).unwrap());
        while let Some(end) = text.find("\n\n") {
            let event: String = text.drain(..end + 2).collect();
            let written: u64 = event
                .lines()
                .find_map(|l| l.strip_prefix("data: "))
                .unwrap()
                .parse()
                .unwrap();
            delays.push(arrived.saturating_sub(written));
        }
    }
    println!("server-sent events through anteroom: delays {delays:?} ms");
    assert_eq!(delays.len(), 10, "every event arrived");
    assert!(
        delays.iter().all(|d| *d <= 50),
        "an event waited: {delays:?}"
    );
    dispatcher.stop().await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_body_streams_byte_exact_and_a_broken_one_is_cut_short() {
    let redis = start_redis();
    let proxy = TestProxy::start(&redis, "big").await;
    let dispatcher = TestDispatcher::start(&redis, "big", tower::service_fn(app));
    let c = client();
    let size: u64 = 32 * 1024 * 1024;
    let started = Instant::now();
    let req = Request::get(proxy.url(&format!("/bytes?n={size}")))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = c.request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let mut received = 0u64;
    while let Some(frame) = body.frame().await {
        let data = frame.unwrap().into_data().unwrap();
        assert_eq!(data, pattern(received, data.len()), "bytes at {received}");
        received += data.len() as u64;
    }
    assert_eq!(received, size);
    println!(
        "{size} bytes streamed through anteroom in {:?}",
        started.elapsed()
    );

    // A body that fails after its first bytes: the client's response is
    // cut short (an error reading it), not ended as if complete.
    let req = Request::get(proxy.url("/broken"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = c.request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let collected = resp.into_body().collect().await;
    assert!(collected.is_err(), "a broken stream ended cleanly");
    dispatcher.stop().await;
    proxy.stop().await;
}
