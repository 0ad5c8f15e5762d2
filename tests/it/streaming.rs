//! Streamed responses through the queue: events arrive as the app writes
//! them, large bodies cross in bounded memory and byte-exact, and a stream
//! cut short is never ended cleanly.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
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
    tagged_app(req, "inproc").await
}

/// [`app`], its events carrying `tag` (which app served them) after the
/// time, resuming after the `Last-Event-ID` a reconnecting client sends.
async fn tagged_app(req: Request<Body>, tag: &'static str) -> Result<Response<Events>, Infallible> {
    let resume = req
        .headers()
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(0, |last| last + 1);
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
                // Reconnect quickly after the stream ends (EventSource's retry).
                let retry = Bytes::from_static(b"retry: 200\n\n");
                if tx.send(Ok(Frame::data(retry))).await.is_err() {
                    return;
                }
                for i in resume..n {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    let event = format!("id: {i}\ndata: {} {tag}\n\n", now_ms());
                    if tx.send(Ok(Frame::data(Bytes::from(event)))).await.is_err() {
                        return;
                    }
                }
            }
            "/bytes" | "/counted" | "/paced" => {
                let mut sent = 0u64;
                while sent < n {
                    let len = (n - sent).min(64 * 1024);
                    let chunk = pattern(sent, len as usize);
                    if tx.send(Ok(Frame::data(chunk))).await.is_err() {
                        if path == "/counted" {
                            LEFT_AT.store(now_ms(), Ordering::SeqCst);
                        }
                        return;
                    }
                    sent += len;
                    match path.as_str() {
                        "/counted" => PRODUCED.store(sent, Ordering::SeqCst),
                        "/paced" => PACED_PRODUCED.store(sent, Ordering::SeqCst),
                        _ => {}
                    }
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

/// Bytes `/counted` has handed to its body so far, and when it noticed
/// its reader gone (Unix ms; 0: not yet). One test uses it.
static PRODUCED: AtomicU64 = AtomicU64::new(0);
static LEFT_AT: AtomicU64 = AtomicU64::new(0);
/// Bytes `/paced` has handed to its body so far (another test's).
static PACED_PRODUCED: AtomicU64 = AtomicU64::new(0);

/// A client whose sockets have a 64 KiB receive buffer: a client that
/// reads slowly then holds back its stream without the kernel taking
/// megabytes for it.
fn small_buffer_client() -> hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
> {
    let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
    connector.set_recv_buffer_size(Some(64 * 1024));
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build(connector)
}

/// A `GET` of `url` with no body.
fn get(url: impl AsRef<str>) -> Request<Full<Bytes>> {
    Request::get(url.as_ref())
        .body(Full::new(Bytes::new()))
        .unwrap()
}

/// `len` bytes of the pattern at `offset`: byte i is `(i * 31 + i / 65536) % 251`.
pub(crate) fn pattern(offset: u64, len: usize) -> Bytes {
    (offset..offset + len as u64)
        .map(|i| ((i * 31 + i / 65_536) % 251) as u8)
        .collect::<Vec<u8>>()
        .into()
}

/// Server-sent events reach the client each within 50 ms of being written:
/// from a tower service with a streaming body, and from an axum handler
/// returning `Sse`, served by the dispatcher as is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_sent_events_arrive_as_they_are_written() {
    let redis = start_redis();
    let proxy = TestProxy::start(&redis, "sse").await;
    let dispatcher = TestDispatcher::start(&redis, "sse", tower::service_fn(app));
    ten_events_arrive_at_once(&proxy.url("/events?n=10&ms=100"), "a tower service").await;
    dispatcher.stop().await;

    let axum_app = axum::Router::new().route(
        "/events",
        axum::routing::get(|| async {
            let events = futures_util::stream::unfold(0u64, |i| async move {
                if i >= 10 {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                let event = axum::response::sse::Event::default()
                    .id(i.to_string())
                    .data(format!("{} axum", now_ms()));
                Some((Ok::<_, Infallible>(event), i + 1))
            });
            axum::response::sse::Sse::new(events)
        }),
    );
    let dispatcher = TestDispatcher::start(&redis, "sse", axum_app);
    ten_events_arrive_at_once(&proxy.url("/events"), "axum's Sse").await;
    dispatcher.stop().await;
    proxy.stop().await;
}

/// Reads the ten events at `url` (served by `what`) and checks that each
/// arrived within 50 ms of being written.
async fn ten_events_arrive_at_once(url: &str, what: &str) {
    let delays = event_delays(url).await;
    println!("server-sent events from {what} through anteroom: delays {delays:?} ms");
    assert_eq!(delays.len(), 10, "every event arrived");
    assert!(
        delays.iter().all(|d| *d <= 50),
        "an event waited: {delays:?}"
    );
}

/// Reads the event stream at `url` to its end: for each event, how long
/// after it was written (the Unix ms its data starts with) it arrived.
async fn event_delays(url: &str) -> Vec<u64> {
    let resp = client().request(get(url)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(
        resp.headers()["content-type"]
            .as_bytes()
            .starts_with(b"text/event-stream")
    );
    let mut body = resp.into_body();
    let mut text = String::new();
    let mut delays = Vec::new();
    while let Some(frame) = body.frame().await {
        let data = frame.unwrap().into_data().unwrap();
        let arrived = now_ms();
        text.push_str(std::str::from_utf8(&data).unwrap());
        while let Some(end) = text.find("\n\n") {
            let event: String = text.drain(..end + 2).collect();
            let Some(data) = event.lines().find_map(|l| l.strip_prefix("data: ")) else {
                continue;
            };
            let written: u64 = data.split(' ').next().unwrap().parse().unwrap();
            delays.push(arrived.saturating_sub(written));
        }
    }
    delays
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_body_streams_byte_exact_and_a_broken_one_is_cut_short() {
    let redis = start_redis();
    let proxy = TestProxy::start(&redis, "big").await;
    let dispatcher = TestDispatcher::start(&redis, "big", tower::service_fn(app));
    let c = client();
    let size: u64 = 32 * 1024 * 1024;
    let started = Instant::now();
    let req = get(proxy.url(&format!("/bytes?n={size}")));
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
    let req = get(proxy.url("/broken"));
    let resp = c.request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let collected = resp.into_body().collect().await;
    assert!(collected.is_err(), "a broken stream ended cleanly");
    dispatcher.stop().await;
    proxy.stop().await;
}

/// [`app`] over real HTTP/1.1 on a port-0 listener, for dispatchers run as
/// processes (`anteroom dispatch --upstream`).
async fn serve_app() -> std::net::SocketAddr {
    serve_tagged_app("upstream").await
}

/// [`tagged_app`] with `tag` over real HTTP/1.1.
async fn serve_tagged_app(tag: &'static str) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                        let (parts, unread) = req.into_parts();
                        // What the client still sends is read and dropped,
                        // as a server that lingers does (RFC 9112 section
                        // 9.6): closing with it unread would reset the
                        // connection under the response.
                        tokio::spawn(async move {
                            let _ = http_body_util::BodyExt::collect(unread).await;
                        });
                        tagged_app(Request::from_parts(parts, Body::default()), tag)
                    });
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
            });
        }
    });
    addr
}

/// Resident memory of process `pid`, in bytes (`VmRSS`).
/// The most the kernel lets a TCP socket buffer grow to, bytes: `"wmem"`
/// (send) or `"rmem"` (receive), the third field of
/// `/proc/sys/net/ipv4/tcp_wmem` or `tcp_rmem`.
pub(crate) fn tcp_buffer_max(kind: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/sys/net/ipv4/tcp_{kind}"))
        .unwrap()
        .split_whitespace()
        .nth(2)
        .and_then(|v| v.parse().ok())
        .unwrap()
}

pub(crate) fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib * 1024
}

/// A download far larger than the window crosses a real proxy and a real
/// dispatcher byte-exact, each process's memory growing by at most 64 MiB.
/// 256 MiB here; `ANTEROOM_STREAM_TEST_BYTES=1073741824 cargo test --test it
/// streaming` runs the 1 GiB case.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_crosses_real_processes_in_bounded_memory() {
    let size: u64 = std::env::var("ANTEROOM_STREAM_TEST_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256 * 1024 * 1024);
    let redis = start_redis();
    let upstream = serve_app().await;
    let (proxy, base) = crate::support::bin::start_proxy(&redis, "dl", "30s").await;
    let dispatcher = crate::support::bin::BinProcess::spawn(&[
        "dispatch",
        "--redis",
        &redis.url(),
        "--queue",
        "dl",
        "--upstream",
        &format!("http://{upstream}"),
    ]);
    let c = client();
    // Warm: both processes have served one request before the baseline.
    crate::support::eventually("the dispatcher to serve", Duration::from_secs(20), || {
        let (c, url) = (c.clone(), format!("{base}/bytes?n=10"));
        async move {
            let req = get(url);
            matches!(c.request(req).await, Ok(r) if r.status() == StatusCode::OK)
        }
    })
    .await;
    let (proxy_before, dispatcher_before) = (rss(proxy.pid()), rss(dispatcher.pid()));
    let started = Instant::now();
    let req = get(format!("{base}/bytes?n={size}"));
    let resp = c.request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let (mut received, mut proxy_peak, mut dispatcher_peak) = (0u64, 0, 0);
    let mut next_sample = 0u64;
    while let Some(frame) = body.frame().await {
        let data = frame.unwrap().into_data().unwrap();
        assert_eq!(data, pattern(received, data.len()), "bytes at {received}");
        received += data.len() as u64;
        if received >= next_sample {
            proxy_peak = proxy_peak.max(rss(proxy.pid()));
            dispatcher_peak = dispatcher_peak.max(rss(dispatcher.pid()));
            next_sample += 8 * 1024 * 1024;
        }
    }
    let took = started.elapsed();
    assert_eq!(received, size);
    let rss = Growth {
        proxy: (proxy_before, proxy_peak),
        dispatcher: (dispatcher_before, dispatcher_peak),
    };
    rss.check("downloaded", size, took);
}

/// Resident memory of a proxy and a dispatcher process before a large
/// stream and at its peak, bytes.
pub(crate) struct Growth {
    pub(crate) proxy: (u64, u64),
    pub(crate) dispatcher: (u64, u64),
}

impl Growth {
    /// Prints the stream's throughput and each process's growth, and
    /// checks that neither grew by more than 64 MiB.
    pub(crate) fn check(&self, what: &str, size: u64, took: Duration) {
        let grew = |(before, peak): (u64, u64)| peak.saturating_sub(before) / (1024 * 1024);
        let (proxy, dispatcher) = (grew(self.proxy), grew(self.dispatcher));
        println!(
            "{} MiB {what} through anteroom processes in {took:?} ({:.0} MB/s); RSS grew: proxy {proxy} MiB, dispatcher {dispatcher} MiB",
            size / (1024 * 1024),
            size as f64 / took.as_secs_f64() / 1e6
        );
        assert!(proxy <= 64, "the proxy grew {proxy} MiB");
        assert!(dispatcher <= 64, "the dispatcher grew {dispatcher} MiB");
    }
}

/// A client that reads slowly holds its own stream back (the window: the
/// app is read at most about 1 MiB ahead of the client, and nothing piles
/// up in Redis) while 100 other requests on the same proxy are answered at
/// once; a client that leaves stops the app's body within a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_holds_back_its_stream_only() {
    let redis = start_redis();
    let proxy = TestProxy::start(&redis, "slow").await;
    let dispatcher = TestDispatcher::start(&redis, "slow", tower::service_fn(app));
    let c = client();
    let size = 64 * 1024 * 1024;
    let req = get(proxy.url(&format!("/counted?n={size}")));
    // The stalled client's socket takes little: what the app runs ahead is
    // then the window and the proxy's send buffer, which stop growing at
    // once (a large receive buffer keeps autotuning on loopback for a
    // while, so the app would seem to go on producing).
    let resp = small_buffer_client().request(req).await.unwrap();
    let mut body = resp.into_body();
    // Read 256 KiB, then stop reading for a while.
    let mut received = 0;
    while received < 256 * 1024 {
        received += body
            .frame()
            .await
            .unwrap()
            .unwrap()
            .into_data()
            .unwrap()
            .len();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut conn = crate::support::redis_conn(&redis).await;
    // The reply lists and what their reader took into its popped and
    // landing lists: all of it is in Redis.
    let lists: Vec<String> = crate::support::keys(&mut conn, "anteroom:{slow}:replies:*")
        .await
        .into_iter()
        .filter(|k| !k.ends_with(":epoch"))
        .collect();
    let mut held = 0u64;
    for list in &lists {
        let items: Vec<Vec<u8>> = redis::cmd("LRANGE")
            .arg(list)
            .arg(0)
            .arg(-1)
            .query_async(&mut conn)
            .await
            .unwrap();
        held += items.iter().map(|i| i.len() as u64).sum::<u64>();
    }
    let produced = PRODUCED.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let still = PRODUCED.load(Ordering::SeqCst);
    println!(
        "a stalled stream: client read {received} bytes, the app produced {produced} then {still}, Redis holds {held}"
    );
    assert!(
        held <= 2 * 1024 * 1024,
        "{held} bytes of a stalled stream in Redis"
    );
    // The app is held back: it stopped producing while its client stopped
    // reading, far short of the body. What it ran ahead is the window plus
    // the kernel's socket buffers on loopback (several MiB), none of it in
    // Redis (above) or growing any process (the download test).
    assert_eq!(
        produced, still,
        "the app kept producing for a client that reads nothing"
    );
    assert!(
        still < size as u64 / 4,
        "the app produced {still} of {size} bytes"
    );
    // Meanwhile, other requests are answered.
    let started = Instant::now();
    let mut others = Vec::new();
    for _ in 0..100 {
        let (c, url) = (c.clone(), proxy.url("/events?n=1&ms=0"));
        others.push(tokio::spawn(async move {
            let req = get(url);
            let resp = c.request(req).await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            resp.into_body().collect().await.unwrap();
        }));
    }
    for other in others {
        other.await.unwrap();
    }
    let others_took = started.elapsed();
    assert!(others_took < Duration::from_secs(10), "{others_took:?}");
    // The slow client leaves: the app's body is dropped within a second.
    let left = now_ms();
    drop(body);
    drop(c);
    crate::support::eventually("the app to notice", Duration::from_secs(5), || async {
        LEFT_AT.load(Ordering::SeqCst) != 0
    })
    .await;
    let noticed_after = LEFT_AT.load(Ordering::SeqCst).saturating_sub(left);
    println!("the app stopped {noticed_after} ms after its client left");
    assert!(noticed_after <= 1000, "{noticed_after} ms");
    dispatcher.stop().await;
    proxy.stop().await;
}

/// A client that reads its download at 1 MiB/s is served at that pace,
/// byte-exact: the app is never further ahead of it than the window
/// (1 MiB) and the socket buffers (the proxy's send buffer, at most
/// `tcp_wmem`'s largest, 4 MiB here, and the client's, kept small), while
/// without flow control it would produce the whole body at once; and 100
/// other requests on the same proxy are answered as usual. 16 MiB (16 s)
/// here;
/// `ANTEROOM_SLOW_READ_BYTES=1073741824 cargo test --test it
/// streaming::a_client_reading` runs the 1 GiB case (about 18 minutes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_reading_1_mib_per_second_is_paced_and_others_are_not() {
    let size: u64 = std::env::var("ANTEROOM_SLOW_READ_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(16 * 1024 * 1024);
    let redis = start_redis();
    let proxy = TestProxy::start(&redis, "paced").await;
    let dispatcher = TestDispatcher::start(&redis, "paced", tower::service_fn(app));
    let c = client();
    // The slow client's socket takes little ahead of its reading.
    let resp = small_buffer_client()
        .request(get(proxy.url(&format!("/paced?n={size}"))))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let others = {
        let (c, url) = (c.clone(), proxy.url("/events?n=1&ms=0"));
        tokio::spawn(async move {
            // Once the slow download is under way.
            tokio::time::sleep(Duration::from_secs(1)).await;
            let started = Instant::now();
            let mut requests = Vec::new();
            for _ in 0..100 {
                let (c, url) = (c.clone(), url.clone());
                requests.push(tokio::spawn(async move {
                    let resp = c.request(get(url)).await.unwrap();
                    assert_eq!(resp.status(), StatusCode::OK);
                    resp.into_body().collect().await.unwrap();
                }));
            }
            for request in requests {
                request.await.unwrap();
            }
            started.elapsed()
        })
    };
    let started = Instant::now();
    let (mut received, mut most_ahead) = (0u64, 0u64);
    let mut pending = bytes::BytesMut::new();
    while received < size {
        // 64 KiB every 62.5 ms: 1 MiB/s.
        while (pending.len() as u64) < (64 * 1024).min(size - received) {
            let data = body.frame().await.unwrap().unwrap().into_data().unwrap();
            pending.extend_from_slice(&data);
        }
        let take = pending.len().min(64 * 1024);
        let piece = pending.split_to(take).freeze();
        assert_eq!(piece, pattern(received, take), "bytes at {received}");
        received += take as u64;
        let ahead = PACED_PRODUCED
            .load(Ordering::SeqCst)
            .saturating_sub(received);
        most_ahead = most_ahead.max(ahead);
        let due = started + Duration::from_secs_f64(received as f64 / (1024.0 * 1024.0));
        tokio::time::sleep_until(due.into()).await;
    }
    assert!(body.frame().await.is_none(), "the stream ends at its size");
    let took = started.elapsed();
    let others_took = others.await.unwrap();
    println!(
        "{size} bytes read at 1 MiB/s in {took:?}; the app at most {most_ahead} bytes ahead of the client; 100 other requests answered in {others_took:?}"
    );
    // The window, the proxy's send buffer at its largest, and 3 MiB for
    // what hyper, the reply reader and the client's small buffer hold.
    let bound = (1 + 3) * 1024 * 1024 + tcp_buffer_max("wmem");
    assert!(
        most_ahead <= bound,
        "the app ran {most_ahead} bytes ahead of a client reading 1 MiB/s (bound {bound})"
    );
    assert!(others_took < Duration::from_secs(10), "{others_took:?}");
    dispatcher.stop().await;
    proxy.stop().await;
}

/// A dispatcher killed mid-stream: the client's response is cut short
/// (never ended as if complete) within the proxy's idle timeout, and the
/// proxy counts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dispatcher_killed_mid_stream_cuts_the_response_short() {
    let redis = start_redis();
    let upstream = serve_app().await;
    let port = anteroom_testkit::free_port().unwrap();
    let admin = anteroom_testkit::free_port().unwrap();
    let _proxy = crate::support::bin::BinProcess::spawn(&[
        "proxy",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--admin",
        &format!("127.0.0.1:{admin}"),
        "--redis",
        &redis.url(),
        "--queue",
        "kill",
        "--stream-idle-timeout",
        "2s",
    ]);
    crate::support::wait_for_port(port).await;
    let mut dispatcher = crate::support::bin::BinProcess::spawn(&[
        "dispatch",
        "--redis",
        &redis.url(),
        "--queue",
        "kill",
        "--upstream",
        &format!("http://{upstream}"),
    ]);
    let c = client();
    let req = get(format!("http://127.0.0.1:{port}/events?n=100&ms=100"));
    let resp = tokio::time::timeout(Duration::from_secs(20), c.request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    // The first event has arrived: the stream is under way.
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("id: 0") {
        let data = body.frame().await.unwrap().unwrap().into_data().unwrap();
        seen.extend_from_slice(&data);
    }
    dispatcher.child().kill().unwrap();
    let killed = Instant::now();
    let ending = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match body.frame().await {
                Some(Ok(_)) => continue,
                Some(Err(err)) => break Err(err),
                None => break Ok(()),
            }
        }
    })
    .await
    .expect("the stream neither ended nor aborted");
    assert!(
        ending.is_err(),
        "a killed dispatcher's stream ended cleanly"
    );
    println!(
        "stream cut short {:?} after its dispatcher was killed",
        killed.elapsed()
    );
    let metrics = crate::support::web::send(&c, get(format!("http://127.0.0.1:{admin}/metrics")))
        .await
        .text();
    assert!(
        metrics.contains("anteroom_proxy_streams_aborted_total{queue=\"kill\"} 1"),
        "{metrics}"
    );
}

/// A deploy with a long-lived event stream, followed by a real EventSource
/// client (Node's `eventsource`): the old dispatcher, given SIGTERM, keeps
/// the stream for its grace period, then ends it cleanly; the client
/// reconnects with `Last-Event-ID` and the new dispatcher (another app)
/// carries on from the next event: no gap, no repeat, exit 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_hands_an_event_stream_to_the_new_dispatcher() {
    use tokio::io::AsyncBufReadExt;
    let redis = start_redis();
    let (old_app, new_app) = (serve_tagged_app("old").await, serve_tagged_app("new").await);
    let (_proxy, base) = crate::support::bin::start_proxy(&redis, "deploy", "30s").await;
    let dispatcher = |upstream: std::net::SocketAddr| {
        crate::support::bin::BinProcess::spawn(&[
            "dispatch",
            "--redis",
            &redis.url(),
            "--queue",
            "deploy",
            "--upstream",
            &format!("http://{upstream}"),
            "--grace",
            "2s",
        ])
    };
    let mut old = dispatcher(old_app);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/apps/sse/client.mjs");
    assert!(
        std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/apps/sse/node_modules/eventsource"
        ))
        .exists(),
        "the EventSource client is not installed: run `bash scripts/test.sh` (npm ci in tests/apps/sse)"
    );
    let mut client = tokio::process::Command::new("node")
        .arg(script)
        .arg(format!("{base}/events?n=1000&ms=100"))
        .arg("60")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("node runs");
    let mut lines = tokio::io::BufReader::new(client.stdout.take().unwrap()).lines();
    let mut events: Vec<(u64, String, u64)> = Vec::new();
    let mut opens = 0;
    let mut terminated_at = None;
    let mut new = None;
    let read = async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let words: Vec<&str> = line.split(' ').collect();
            match words[0] {
                "open" => opens += 1,
                "event" => {
                    let id: u64 = words[1].parse().unwrap();
                    events.push((id, words[3].to_owned(), words[4].parse().unwrap()));
                    if id == 10 {
                        // Deploy: stop the old dispatcher, start the new one.
                        old.terminate();
                        terminated_at = Some(now_ms());
                        new = Some(dispatcher(new_app));
                    }
                }
                _ => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(60), read)
        .await
        .expect("the client finished within 60 s");
    let status = client.wait().await.unwrap();
    assert!(status.success(), "the client exited {status:?}");
    let ids: Vec<u64> = events.iter().map(|e| e.0).collect();
    assert_eq!(ids, (0..60).collect::<Vec<_>>(), "events lost or repeated");
    let terminated_at = terminated_at.unwrap();
    let old_after = events
        .iter()
        .filter(|e| e.1 == "old" && e.2 > terminated_at)
        .count();
    let switch = events
        .iter()
        .position(|e| e.1 == "new")
        .expect("the new dispatcher served");
    assert!(events[switch..].iter().all(|e| e.1 == "new"), "{events:?}");
    println!(
        "deploy: the old dispatcher kept the stream {old_after} more events after SIGTERM, the client reconnected ({opens} opens) and the new one went on from event {}",
        events[switch].0
    );
    assert!(
        old_after >= 10,
        "the stream was cut at SIGTERM, not kept for the grace"
    );
    assert_eq!(opens, 2, "one reconnection");
    assert!(old.wait(Duration::from_secs(10)).await.success());
    drop(new);
}

/// A stream that keeps moving outlives the send timeout (which is for
/// answers the client does not read, not for long ones), on both HTTP/1.1
/// and HTTP/2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moving_stream_outlives_the_send_timeout() {
    let redis = start_redis();
    let proxy = TestProxy::start_with(&redis, "long", |c| {
        c.send_timeout = Duration::from_secs(1);
    })
    .await;
    let dispatcher = TestDispatcher::start(&redis, "long", tower::service_fn(app));
    for c in [client(), crate::support::web::h2c_client()] {
        let req = get(proxy.url("/events?n=25&ms=100"));
        let resp = c.request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let body = resp
            .into_body()
            .collect()
            .await
            .expect("the stream ran to its end");
        let text = String::from_utf8(body.to_bytes().to_vec()).unwrap();
        assert!(text.contains("id: 24\n"), "{text}");
    }
    dispatcher.stop().await;
    proxy.stop().await;
}

/// The Redis users docs/operations.md gives (its `ACL SETUSER` lines, as
/// written) run a proxy, a dispatcher and `anteroom status` through whole
/// and streamed replies and a streamed request body, with nothing refused
/// (`ACL LOG` empty).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_redis_users_carry_streams() {
    let redis = start_redis();
    let mut admin = crate::support::documented_users(&redis).await;
    let url = |user: &str| format!("redis://{user}:pw@127.0.0.1:{}", redis.port());
    let upstream = serve_app().await;
    let port = anteroom_testkit::free_port().unwrap();
    let _proxy = crate::support::bin::BinProcess::spawn(&[
        "proxy",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--redis",
        &url("anteroom-proxy"),
        "--queue",
        "web",
    ]);
    crate::support::wait_for_port(port).await;
    let mut dispatcher = crate::support::bin::BinProcess::spawn(&[
        "dispatch",
        "--redis",
        &url("anteroom-dispatcher"),
        "--queue",
        "web",
        "--upstream",
        &format!("http://{upstream}"),
    ]);
    let c = client();
    for (path, expect) in [
        ("/bytes?n=6", 6),
        ("/events?n=3&ms=10", 3),
        ("/bytes?n=3000000", 3_000_000),
    ] {
        let req = get(format!("http://127.0.0.1:{port}{path}"));
        let resp = tokio::time::timeout(Duration::from_secs(20), c.request(req))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{path}");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        if path.starts_with("/events") {
            assert_eq!(
                String::from_utf8_lossy(&body).matches("data: ").count(),
                expect
            );
        } else {
            assert_eq!(body.len(), expect, "{path}");
        }
    }
    // A body that streams (over --body-buffer): the taken frame, chunks,
    // credits and the cancel of an app that does not read it.
    let req = Request::put(format!("http://127.0.0.1:{port}/bytes?n=6"))
        .body(Full::new(Bytes::from(vec![7u8; 3_000_000])))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(20), c.request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "the upload");
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body.len(), 6);
    let status = crate::support::bin::command()
        .args([
            "status",
            "--redis",
            &url("anteroom-operator"),
            "--queue",
            "web",
        ])
        .output()
        .unwrap();
    assert!(status.status.success(), "{status:?}");
    // The operator's other commands: maintenance on (the proxy, with its
    // own user, follows it: 503), off (served again), the dead letters.
    let operator = |args: &[&str]| {
        let out = crate::support::bin::command()
            .args(args)
            .args(["--redis", &url("anteroom-operator"), "--queue", "web"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
    };
    let answered = |expect: StatusCode| {
        let c = c.clone();
        async move {
            let req = get(format!("http://127.0.0.1:{port}/bytes?n=1"));
            tokio::time::timeout(Duration::from_secs(5), c.request(req))
                .await
                .is_ok_and(|r| r.is_ok_and(|r| r.status() == expect))
        }
    };
    operator(&["maintenance", "on"]);
    crate::support::eventually("maintenance followed", Duration::from_secs(5), || {
        answered(StatusCode::SERVICE_UNAVAILABLE)
    })
    .await;
    operator(&["maintenance", "off"]);
    crate::support::eventually("served again", Duration::from_secs(5), || {
        answered(StatusCode::OK)
    })
    .await;
    operator(&["dead", "list", "--json"]);
    operator(&["dead", "purge"]);
    // A clean stop too (its LEAVE script), before the log is read.
    dispatcher.terminate();
    assert!(dispatcher.wait(Duration::from_secs(15)).await.success());
    crate::support::assert_acl_log_empty(&mut admin).await;
}

/// The Python (WSGI), Node and Ruby dispatchers run as the documented
/// `anteroom-dispatcher` user (docs/operations.md says they may): each
/// serves 20 POSTs at once (pulls, and completions that take the next
/// request in the same script), honours a pause and stops cleanly, and
/// `ACL LOG` stays empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_dispatcher_user_runs_every_adapter() {
    use crate::support::adapters::{record_dispatcher, record_file, recorded};
    use crate::support::bin::{BinProcess, start_proxy_on};

    let redis = start_redis();
    let mut admin = crate::support::documented_users(&redis).await;
    let url = |user: &str| format!("redis://{user}:pw@127.0.0.1:{}", redis.port());
    let (_proxy, listen) = start_proxy_on(&url("anteroom-proxy"), "web", "15s", &[]).await;
    let control =
        anteroom_control::Queue::connect(&url("anteroom-operator"), "web", Duration::from_secs(2))
            .await
            .unwrap();
    let c = client();
    let post = |id: String| {
        let c = c.clone();
        let uri = format!("{listen}/run/{id}");
        async move {
            let req = Request::post(uri).body(Full::new(Bytes::new())).unwrap();
            crate::support::web::send(&c, req).await.status
        }
    };
    for language in ["py", "node", "rb"] {
        let record = record_file();
        let mut dispatcher = BinProcess::spawn_cmd(
            record_dispatcher(language, &record)
                .env("ANTEROOM_REDIS", url("anteroom-dispatcher"))
                .env("ANTEROOM_QUEUE", "web"),
        );
        let ids: Vec<String> = (0..20).map(|i| format!("{language}-{i}")).collect();
        let statuses = futures_util::future::join_all(ids.iter().cloned().map(post)).await;
        assert!(
            statuses.iter().all(|s| *s == StatusCode::OK),
            "{language}: {statuses:?}"
        );
        for id in &ids {
            assert_eq!(recorded(&record, id), 1, "{id}");
        }
        // Listed (so the acknowledgement below is this dispatcher's).
        crate::support::until_dispatching(&control).await;
        crate::support::pause_acknowledged(&control, "the ACL test").await;
        control.resume().await.unwrap();
        assert_eq!(
            post(format!("{language}-after")).await,
            StatusCode::OK,
            "{language}"
        );
        dispatcher.terminate();
        assert!(
            dispatcher.wait(Duration::from_secs(15)).await.success(),
            "{language}"
        );
        let _ = std::fs::remove_file(&record);
    }
    crate::support::assert_acl_log_empty(&mut admin).await;
}
