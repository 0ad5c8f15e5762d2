//! Streamed request bodies (uploads) through the queue: a body over
//! `--body-buffer` flows to the app as the client sends it, byte-exact and
//! in bounded memory; while no dispatcher has taken the request the client
//! is held by TCP; limits (`--max-body`, the idle timeout) answer the
//! client and cut the app's copy short, never truncate it silently.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use anteroom_dispatcher::Body;
use anteroom_testkit::start_redis;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::{Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::mpsc;

use crate::streaming::{pattern, rss};
use crate::support::{TestDispatcher, TestProxy};

/// A request body of `size` bytes of [`pattern`], made as it is sent: with
/// a `Content-Length` (`declared`) or chunked. `sent` counts what the
/// client has handed to its connection. It can stall or fail at a byte.
struct PatternBody {
    size: u64,
    offset: u64,
    declared: bool,
    sent: Arc<AtomicU64>,
    stall_at: Option<u64>,
    fail_at: Option<u64>,
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
    /// A pause before each 64 KiB piece (a slow client).
    pace: Option<Duration>,
    paced: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl PatternBody {
    fn new(size: u64, declared: bool) -> Self {
        Self {
            size,
            offset: 0,
            declared,
            sent: Arc::default(),
            stall_at: None,
            fail_at: None,
            stalled: None,
            pace: None,
            paced: None,
        }
    }
}

impl http_body::Body for PatternBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        if self.fail_at.is_some_and(|at| self.offset >= at) {
            return Poll::Ready(Some(Err(std::io::Error::other("the client gave up"))));
        }
        if self.stall_at.is_some_and(|at| self.offset >= at) {
            let sleep = self
                .stalled
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(Duration::from_secs(3600))));
            return sleep.as_mut().poll(cx).map(|()| None);
        }
        if self.offset >= self.size {
            return Poll::Ready(None);
        }
        if let Some(pace) = self.pace {
            let sleep = self
                .paced
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(pace)));
            std::task::ready!(sleep.as_mut().poll(cx));
            self.paced = None;
        }
        let len = (self.size - self.offset).min(64 * 1024);
        let data = pattern(self.offset, len as usize);
        self.offset += len;
        self.sent.store(self.offset, Ordering::SeqCst);
        Poll::Ready(Some(Ok(Frame::data(data))))
    }

    fn size_hint(&self) -> SizeHint {
        if self.declared {
            SizeHint::with_exact(self.size)
        } else {
            SizeHint::default()
        }
    }
}

type UploadClient = Client<hyper_util::client::legacy::connect::HttpConnector, PatternBody>;

/// A client as curl and browsers are: no Nagle delay.
fn upload_client(h2: bool) -> UploadClient {
    let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .http2_only(h2)
        .build(connector)
}

fn put(url: String, body: PatternBody) -> Request<PatternBody> {
    Request::put(url).body(body).unwrap()
}

/// Reads `body`, checking it against [`pattern`]: `ok N` for N bytes all
/// as expected, `wrong byte at I`, or `cut short after N: <error>`.
async fn check<B>(body: B) -> String
where
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    check_slowly(body, Duration::ZERO).await
}

/// [`check`], pausing `delay` after each piece (a slow app).
async fn check_slowly<B>(body: B, delay: Duration) -> String
where
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    let mut body = std::pin::pin!(body);
    let mut received = 0u64;
    loop {
        match body.frame().await {
            None => return format!("ok {received}"),
            Some(Err(err)) => return format!("cut short after {received}: {err}"),
            Some(Ok(frame)) => {
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                if data != pattern(received, data.len()) {
                    return format!("wrong byte near {received}");
                }
                received += data.len() as u64;
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }
}

/// An app that checks each request body and answers what it found (and
/// also sends it to `seen`, for the cases where the client never sees the
/// answer).
fn checking_app(
    seen: mpsc::UnboundedSender<String>,
) -> impl tower::Service<
    Request<Body>,
    Response = Response<Full<Bytes>>,
    Error = std::convert::Infallible,
    Future = impl Send,
> + Clone {
    tower::service_fn(move |req: Request<Body>| {
        let seen = seen.clone();
        async move {
            let verdict = check(req.into_body()).await;
            let _ = seen.send(verdict.clone());
            Ok(Response::new(Full::new(Bytes::from(verdict))))
        }
    })
}

async fn answer(resp: Response<hyper::body::Incoming>) -> (StatusCode, String) {
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// 32 MiB uploads, with a `Content-Length`, chunked, and over h2c, reach
/// an in-process app byte-exact, as do small bodies queued whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_reach_the_app_byte_exact() {
    let redis = start_redis();
    let proxy = TestProxy::start(&redis, "up").await;
    let (seen, _seen_rx) = mpsc::unbounded_channel();
    let dispatcher = TestDispatcher::start(&redis, "up", checking_app(seen));
    let size = 32 * 1024 * 1024;
    for (h2, declared, size) in [
        (false, true, size),
        (false, false, size),
        (true, true, size),
        (true, false, size),
        (false, true, 1000),
        (false, false, 300 * 1024),
    ] {
        let c = upload_client(h2);
        let started = Instant::now();
        let resp = c
            .request(put(proxy.url("/upload"), PatternBody::new(size, declared)))
            .await
            .unwrap();
        let (status, text) = answer(resp).await;
        println!(
            "h2 {h2}, Content-Length {declared}: {size} bytes in {:?}",
            started.elapsed()
        );
        assert_eq!(status, StatusCode::OK, "{text}");
        assert_eq!(text, format!("ok {size}"), "h2 {h2}, declared {declared}");
    }
    dispatcher.stop().await;
    proxy.stop().await;
}

/// While the queue is paused the request waits with its body unread past
/// its first part: the envelope in Redis holds about the buffer (256 KiB),
/// the client is held by TCP far short of the body, and after resume the
/// whole body reaches the app.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_upload_waits_in_the_client() {
    let redis = start_redis();
    let proxy = TestProxy::start(&redis, "held").await;
    let (seen, _seen_rx) = mpsc::unbounded_channel();
    let dispatcher = TestDispatcher::start(&redis, "held", checking_app(seen));
    let queue = crate::support::control(&redis, "held").await;
    crate::support::eventually(
        "the dispatcher to start",
        Duration::from_secs(20),
        || async { !queue.status().await.unwrap().dispatchers.is_empty() },
    )
    .await;
    queue.pause("test", None, false).await.unwrap();
    queue
        .wait_quiescent(Duration::from_secs(5), |_| {})
        .await
        .unwrap();
    let size = 256 * 1024 * 1024;
    let body = PatternBody::new(size, true);
    let sent = Arc::clone(&body.sent);
    let c = upload_client(false);
    let request = tokio::spawn(c.request(put(proxy.url("/upload"), body)));
    let mut conn = crate::support::redis_conn(&redis).await;
    crate::support::until_llen(&conn, "anteroom:{held}:requests", 1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let queued: Vec<u8> = redis::cmd("LINDEX")
        .arg("anteroom:{held}:requests")
        .arg(0)
        .query_async(&mut conn)
        .await
        .unwrap();
    let envelope = anteroom_protocol::RequestEnvelope::decode(Bytes::from(queued)).unwrap();
    assert!(envelope.body_follows);
    // The first part, about the buffer (256 KiB), is queued.
    let queued = envelope.body.len();
    assert!(
        (256 * 1024..1024 * 1024).contains(&queued),
        "{queued} bytes queued"
    );
    assert_eq!(envelope.body, pattern(0, queued));
    let held = sent.load(Ordering::SeqCst);
    println!("paused: {queued} bytes queued; the client has sent {held} of {size} bytes");
    // What the kernel's socket buffers take on loopback (the client's send
    // buffer and the proxy's receive buffer at their largest), no more.
    let bound = crate::streaming::tcp_buffer_max("wmem")
        + crate::streaming::tcp_buffer_max("rmem")
        + 1024 * 1024;
    assert!(
        held < bound.min(size / 2),
        "the client sent {held} bytes into a paused queue (bound {bound})"
    );
    queue.resume().await.unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(60), request)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let (status, text) = answer(resp).await;
    assert_eq!((status, text), (StatusCode::OK, format!("ok {size}")));
    dispatcher.stop().await;
    proxy.stop().await;
}

/// The limits of a streamed body: chunked past `--max-body` is answered
/// 413 (a declared one is refused before it is queued); a client that
/// stalls past the idle timeout is answered 408; a client that leaves
/// mid-body. In each case the app's copy of the body is cut short with an
/// error, never ended as if complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_body_that_breaks_a_limit_is_cut_short_at_the_app() {
    let redis = start_redis();
    let proxy = TestProxy::start_with(&redis, "limits", |c| {
        c.max_body = 4 * 1024 * 1024;
        c.body_buffer = 64 * 1024;
        c.stream_idle_timeout = Duration::from_secs(1);
    })
    .await;
    let (seen, mut seen_rx) = mpsc::unbounded_channel();
    let mut registry = anteroom_metrics::Registry::default();
    let metrics = anteroom_dispatcher::DispatcherMetrics::register(&mut registry);
    let dispatcher = TestDispatcher::start_built(
        crate::support::dispatcher_builder(&redis, "limits")
            .stream_idle_timeout(Duration::from_secs(5))
            .metrics(metrics)
            .build()
            .unwrap(),
        checking_app(seen),
    );
    let c = upload_client(false);
    let url = proxy.url("/upload");

    // Declared over the limit: 413 before anything is queued.
    let resp = c
        .request(put(url.clone(), PatternBody::new(5 * 1024 * 1024, true)))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);

    // Chunked, over the limit once streaming: the answer reaches the
    // client still sending (the proxy lingers; it does not reset).
    let resp = c
        .request(put(url.clone(), PatternBody::new(8 * 1024 * 1024, false)))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let verdict = tokio::time::timeout(Duration::from_secs(10), seen_rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(verdict.starts_with("cut short"), "{verdict}");

    // Stalls after 1 MiB: 408 after the idle timeout.
    let mut body = PatternBody::new(3 * 1024 * 1024, true);
    body.stall_at = Some(1024 * 1024);
    let started = Instant::now();
    let resp = tokio::time::timeout(Duration::from_secs(10), c.request(put(url.clone(), body)))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), StatusCode::REQUEST_TIMEOUT);
    println!("stalled upload answered 408 after {:?}", started.elapsed());
    let verdict = tokio::time::timeout(Duration::from_secs(10), seen_rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(verdict.starts_with("cut short after"), "{verdict}");

    // Leaves after 1 MiB: the app's body fails within a second or two.
    let mut body = PatternBody::new(3 * 1024 * 1024, false);
    body.fail_at = Some(1024 * 1024);
    let left = Instant::now();
    let _ = c.request(put(url.clone(), body)).await;
    let verdict = tokio::time::timeout(Duration::from_secs(5), seen_rx.recv())
        .await
        .unwrap()
        .unwrap();
    println!(
        "the client left; the app knew after {:?}: {verdict}",
        left.elapsed()
    );
    assert!(verdict.starts_with("cut short after"), "{verdict}");
    // Each of the three counted where the app read it.
    let text = anteroom_metrics::encode(&registry);
    assert!(
        text.contains("anteroom_dispatcher_request_bodies_cut_total{queue=\"limits\"} 3"),
        "{text}"
    );
    dispatcher.stop().await;
    proxy.stop().await;
}

/// An upstream over real HTTP/1.1 that checks each request body (see
/// [`check`]) and answers what it found; and how many `/upload` requests
/// it has been sent.
async fn serve_checking_upstream() -> (std::net::SocketAddr, Arc<AtomicU64>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let uploads = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&uploads);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let counter = Arc::clone(&counter);
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                        if req.uri().path() == "/upload" {
                            counter.fetch_add(1, Ordering::SeqCst);
                        }
                        async move {
                            let verdict = check(req.into_body()).await;
                            Ok::<_, std::convert::Infallible>(Response::new(Full::new(
                                Bytes::from(verdict),
                            )))
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, uploads)
}

/// An upload far larger than the window crosses a real proxy and a real
/// dispatcher (in front of a real HTTP upstream) byte-exact, each process
/// growing by at most 64 MiB. 256 MiB here;
/// `ANTEROOM_STREAM_TEST_BYTES=1073741824 cargo test --test it uploads`
/// runs the 1 GiB case.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_crosses_real_processes_in_bounded_memory() {
    let size: u64 = std::env::var("ANTEROOM_STREAM_TEST_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256 * 1024 * 1024);
    let redis = start_redis();
    let (upstream, _) = serve_checking_upstream().await;
    let (proxy, base) = crate::support::bin::start_proxy(&redis, "ul", "30s").await;
    let dispatcher = crate::support::bin::BinProcess::spawn(&[
        "dispatch",
        "--redis",
        &redis.url(),
        "--queue",
        "ul",
        "--upstream",
        &format!("http://{upstream}"),
    ]);
    let c = upload_client(false);
    // Warm: both processes have served one upload before the baseline.
    crate::support::eventually("the dispatcher to serve", Duration::from_secs(20), || {
        let (c, url) = (c.clone(), format!("{base}/warm"));
        async move {
            let req = put(url, PatternBody::new(1024 * 1024, true));
            matches!(c.request(req).await, Ok(r) if r.status() == StatusCode::OK)
        }
    })
    .await;
    let (proxy_before, dispatcher_before) = (rss(proxy.pid()), rss(dispatcher.pid()));
    let body = PatternBody::new(size, true);
    let sent = Arc::clone(&body.sent);
    let started = Instant::now();
    let request = tokio::spawn(c.request(put(format!("{base}/upload"), body)));
    let (mut proxy_peak, mut dispatcher_peak) = (0, 0);
    while !request.is_finished() {
        proxy_peak = proxy_peak.max(rss(proxy.pid()));
        dispatcher_peak = dispatcher_peak.max(rss(dispatcher.pid()));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let resp = request.await.unwrap().unwrap();
    let took = started.elapsed();
    let (status, text) = answer(resp).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert_eq!(text, format!("ok {size}"));
    assert_eq!(sent.load(Ordering::SeqCst), size);
    let rss = crate::streaming::Growth {
        proxy: (proxy_before, proxy_peak),
        dispatcher: (dispatcher_before, dispatcher_peak),
    };
    rss.check("uploaded", size, took);
}

/// A dispatcher killed mid-upload: the request cannot run again (its body
/// has gone), so once another dispatcher's reaper finds it the client gets
/// 502, never a repeat with part of the body, and never a hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dispatcher_killed_mid_upload_answers_502() {
    let redis = start_redis();
    let (upstream, uploads) = serve_checking_upstream().await;
    let (_proxy, base) = crate::support::bin::start_proxy(&redis, "ulkill", "60s").await;
    let dispatcher = || {
        crate::support::bin::BinProcess::spawn(&[
            "dispatch",
            "--redis",
            &redis.url(),
            "--queue",
            "ulkill",
            "--upstream",
            &format!("http://{upstream}"),
        ])
    };
    let mut first = dispatcher();
    let queue = crate::support::control(&redis, "ulkill").await;
    crate::support::eventually(
        "the dispatcher to start",
        Duration::from_secs(20),
        || async { !queue.status().await.unwrap().dispatchers.is_empty() },
    )
    .await;
    let mut body = PatternBody::new(64 * 1024 * 1024, true);
    body.stall_at = Some(8 * 1024 * 1024);
    let sent = Arc::clone(&body.sent);
    let c = upload_client(false);
    let request = tokio::spawn(c.request(put(format!("{base}/upload"), body)));
    crate::support::eventually(
        "the upload to be under way",
        Duration::from_secs(20),
        || {
            let sent = Arc::clone(&sent);
            async move { sent.load(Ordering::SeqCst) >= 8 * 1024 * 1024 }
        },
    )
    .await;
    first.child().kill().unwrap();
    let killed = Instant::now();
    let _second = dispatcher();
    let resp = tokio::time::timeout(Duration::from_secs(40), request)
        .await
        .expect("the client was left hanging")
        .unwrap()
        .unwrap();
    println!(
        "a killed dispatcher's upload answered {} after {:?}",
        resp.status(),
        killed.elapsed()
    );
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    // Run once: the reaper answered it; nothing sent it to the app again.
    assert_eq!(uploads.load(Ordering::SeqCst), 1);
}

/// A body whose client stops short (its connection closes before the
/// `Content-Length` is reached, or before the last chunk of a chunked
/// body) reaches the app as an error, never as a body that ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_cut_short_by_its_client_never_reaches_the_app_whole() {
    use tokio::io::AsyncWriteExt;
    let redis = start_redis();
    let proxy = TestProxy::start(&redis, "cut").await;
    let (seen, mut seen_rx) = mpsc::unbounded_channel();
    let dispatcher = TestDispatcher::start(&redis, "cut", checking_app(seen));
    let part = pattern(0, 1024 * 1024);
    let mut chunked = Vec::new();
    for piece in part.chunks(64 * 1024) {
        chunked.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        chunked.extend_from_slice(piece);
        chunked.extend_from_slice(b"\r\n");
    }
    for (head, body) in [
        (
            "PUT /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 2097152\r\n\r\n",
            part.to_vec(),
        ),
        (
            "PUT /upload HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n",
            chunked.clone(),
        ),
    ] {
        let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(&body).await.unwrap();
        // The client's data and its end of stream arrive together.
        stream.shutdown().await.unwrap();
        let verdict = tokio::time::timeout(Duration::from_secs(10), seen_rx.recv())
            .await
            .expect("the app never finished reading")
            .unwrap();
        println!("{}: {verdict}", head.lines().nth(2).unwrap_or(""));
        assert!(verdict.starts_with("cut short after"), "{verdict}");
    }
    dispatcher.stop().await;
    proxy.stop().await;
}

/// Uploads that take longer than the hold budget are not answered 504
/// while they move: a client that sends slowly, and an app that reads
/// slowly (each piece well within the idle timeout, the last window after
/// the client has sent everything slower than one idle timeout). The
/// answer is due one idle timeout after the body's last progress; the
/// proxy follows the app's reading through the dispatcher's credits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_that_outlast_the_hold_complete() {
    let redis = start_redis();
    let idle = Duration::from_secs(2);
    let proxy = TestProxy::start_with(&redis, "long", |c| {
        c.hold = Duration::from_secs(1);
        c.stream_idle_timeout = idle;
    })
    .await;
    let app = tower::service_fn(|req: Request<Body>| async move {
        // The slow app reads about 430 KB/s.
        let delay = match req.uri().path() {
            "/slow" => Duration::from_millis(600),
            _ => Duration::ZERO,
        };
        let verdict = check_slowly(req.into_body(), delay).await;
        Ok::<_, std::convert::Infallible>(Response::new(Body::from(verdict)))
    });
    let dispatcher = TestDispatcher::start_built(
        crate::support::dispatcher_builder(&redis, "long")
            .stream_idle_timeout(idle)
            .build()
            .unwrap(),
        app,
    );
    let size = 4 * 1024 * 1024;
    let mut slow_client = PatternBody::new(size, true);
    slow_client.pace = Some(Duration::from_millis(60));
    for (path, body) in [
        ("/upload", slow_client),
        ("/slow", PatternBody::new(size, true)),
    ] {
        let started = Instant::now();
        let resp = upload_client(false)
            .request(put(proxy.url(path), body))
            .await
            .unwrap();
        let (status, text) = answer(resp).await;
        let took = started.elapsed();
        println!("{path}: {size} bytes took {took:?} with a 1 s hold: {status} {text}");
        assert!(
            took > Duration::from_secs(3),
            "{path} was not slow: {took:?}"
        );
        assert_eq!(
            (status, text),
            (StatusCode::OK, format!("ok {size}")),
            "{path}"
        );
    }
    dispatcher.stop().await;
    proxy.stop().await;
}

/// Apps that do not just read and answer: one that refuses an upload
/// without reading it (the client still sending gets the answer, and the
/// proxy stops reading), one that echoes the body as it reads it (the
/// response streams while the request body still does), and a client that
/// waits for `100 Continue` (curl).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apps_that_refuse_or_echo_an_upload_and_clients_that_expect_100_continue() {
    let redis = start_redis();
    let proxy = TestProxy::start(&redis, "apps").await;
    let app = tower::service_fn(|req: Request<Body>| async move {
        let resp = match req.uri().path() {
            "/reject" => Response::builder()
                .status(StatusCode::FORBIDDEN)
                .body(Body::from("no uploads here"))
                .unwrap(),
            "/echo" => Response::new(req.into_body()),
            _ => Response::new(Body::from(check(req.into_body()).await)),
        };
        Ok::<_, std::convert::Infallible>(resp)
    });
    let dispatcher = TestDispatcher::start(&redis, "apps", app);
    let c = upload_client(false);

    let resp = c
        .request(put(
            proxy.url("/reject"),
            PatternBody::new(64 * 1024 * 1024, true),
        ))
        .await
        .unwrap();
    let (status, text) = answer(resp).await;
    assert_eq!(
        (status, text.as_str()),
        (StatusCode::FORBIDDEN, "no uploads here")
    );

    let size = 16 * 1024 * 1024;
    for h2 in [false, true] {
        let resp = upload_client(h2)
            .request(put(proxy.url("/echo"), PatternBody::new(size, false)))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let verdict = check(resp.into_body()).await;
        assert_eq!(verdict, format!("ok {size}"), "echoed over h2: {h2}");
    }

    let file = std::env::temp_dir().join(format!("anteroom-upload-{}", std::process::id()));
    std::fs::write(&file, pattern(0, 3 * 1024 * 1024)).unwrap();
    let out = tokio::process::Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "30",
            "-H",
            "Expect: 100-continue",
            "-T",
        ])
        .arg(&file)
        .arg(proxy.url("/upload"))
        .output()
        .await
        .expect("curl runs");
    let _ = std::fs::remove_file(&file);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("ok {}", 3 * 1024 * 1024)
    );
    dispatcher.stop().await;
    proxy.stop().await;
}

/// An HTTP/2 upload waiting in the queue (its route has no dispatcher)
/// does not hold up the other streams of its connection: their bodies
/// still flow (the connection's window covers every stream's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_h2_upload_does_not_block_its_connection() {
    let redis = start_redis();
    let proxy = TestProxy::start_with(&redis, "open", |c| {
        c.routes = vec![anteroom_proxy::RouteConfig::new("nobody").path_prefix("/held/")];
        c.hold = Duration::from_secs(20);
    })
    .await;
    let (seen, _seen_rx) = mpsc::unbounded_channel();
    let dispatcher = TestDispatcher::start(&redis, "open", checking_app(seen));
    let c = upload_client(true);
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(tokio::spawn(c.request(put(
            proxy.url("/held/x"),
            PatternBody::new(16 * 1024 * 1024, true),
        ))));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let size = 8 * 1024 * 1024;
    let resp = tokio::time::timeout(
        Duration::from_secs(15),
        c.request(put(proxy.url("/upload"), PatternBody::new(size, true))),
    )
    .await
    .expect("an upload on the connection was held up by the waiting ones")
    .unwrap();
    let (status, text) = answer(resp).await;
    assert_eq!((status, text), (StatusCode::OK, format!("ok {size}")));
    for request in held {
        request.abort();
    }
    dispatcher.stop().await;
    proxy.stop().await;
}

/// Streams in both directions add no Redis connection: 16 uploads echoed
/// back as they arrive (request and response bodies streaming at once),
/// through one proxy and one dispatcher, use the connections an idle proxy
/// and dispatcher hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_add_no_redis_connections() {
    let redis = start_redis();
    let mut conn = crate::support::redis_conn(&redis).await;
    let proxy = TestProxy::start(&redis, "conns").await;
    let echo = tower::service_fn(|req: Request<Body>| async move {
        Ok::<_, std::convert::Infallible>(Response::new(req.into_body()))
    });
    let dispatcher = TestDispatcher::start_built(
        crate::support::dispatcher_builder(&redis, "conns")
            .concurrency(16)
            .build()
            .unwrap(),
        echo,
    );
    // Both ready: one request answered.
    let c = upload_client(false);
    let resp = c
        .request(put(proxy.url("/warm"), PatternBody::new(10, true)))
        .await
        .unwrap();
    assert_eq!(check(resp.into_body()).await, "ok 10");
    let idle = crate::load::other_clients(&mut conn).await;
    let size = 4 * 1024 * 1024;
    let mut uploads = Vec::new();
    for _ in 0..16 {
        let mut body = PatternBody::new(size, true);
        body.pace = Some(Duration::from_millis(20));
        let (c, url) = (c.clone(), proxy.url("/echo"));
        uploads.push(tokio::spawn(async move {
            let resp = c.request(put(url, body)).await.unwrap();
            check(resp.into_body()).await
        }));
    }
    let mut busiest = 0;
    while uploads.iter().any(|u| !u.is_finished()) {
        busiest = busiest.max(crate::load::other_clients(&mut conn).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for upload in uploads {
        assert_eq!(upload.await.unwrap(), format!("ok {size}"));
    }
    println!("redis clients: {idle} idle, at most {busiest} with 16 streams each way");
    assert_eq!(busiest, idle);
    dispatcher.stop().await;
    proxy.stop().await;
}
