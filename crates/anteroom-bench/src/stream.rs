//! The `stream` scenario: a large download, an upload of the same size,
//! and server-sent events fanned out to many clients, through nginx
//! (`proxy_buffering off`, `proxy_request_buffering off`) and through
//! Anteroom (proxy + dispatcher forwarding to the same upstream), one after
//! the other in one run.
//!
//! Prints, per setup: the download's and the upload's throughput (MB/s)
//! and how much each process's resident memory grew (nginx: master and
//! workers; Anteroom: proxy and dispatcher; both: Redis is Anteroom's), and
//! the delay of each event from being written by the upstream to reaching
//! its client (p50, p99, max) over every event of every stream.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use anteroom_protocol::now_ms;

use anteroom_testkit::LocalRedis;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::TokioExecutor;

use crate::setups::{Forwarding, Nginx};

/// What one setup measured.
#[derive(Debug)]
pub(crate) struct StreamFigures {
    pub(crate) setup: &'static str,
    pub(crate) download_bytes: u64,
    pub(crate) download_mb_s: f64,
    /// Peak RSS growth during the download, MiB, per process.
    pub(crate) rss_growth: Vec<(&'static str, u64)>,
    pub(crate) upload_mb_s: f64,
    /// Peak RSS growth during the upload, MiB, per process.
    pub(crate) upload_rss_growth: Vec<(&'static str, u64)>,
    pub(crate) streams: usize,
    pub(crate) events: usize,
    pub(crate) delay_p50_ms: u64,
    pub(crate) delay_p99_ms: u64,
    pub(crate) delay_max_ms: u64,
    pub(crate) errors: usize,
}

/// A channel as a body stream.
struct Frames(tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, Infallible>>);

impl futures_util::Stream for Frames {
    type Item = Result<Frame<Bytes>, Infallible>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.0.poll_recv(cx)
    }
}

/// The streaming upstream: `/hello`; `/bytes?n=N`, N bytes in 64 KiB
/// writes; `/events?n=N&ms=M`, N events M ms apart, each carrying the Unix
/// milliseconds it was written at.
pub(crate) async fn start_upstream() -> anyhow::Result<SocketAddr> {
    crate::setups::start_server(respond).await
}

fn respond(uri: &http::Uri, received: u64) -> http::Response<StreamBody<Frames>> {
    let query = uri.query().unwrap_or("").to_owned();
    let param = |name: &str| {
        query
            .split('&')
            .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let (path, n, ms) = (uri.path().to_owned(), param("n"), param("ms"));
    let content_type = if path == "/events" {
        "text/event-stream"
    } else {
        "application/octet-stream"
    };
    tokio::spawn(async move {
        match path.as_str() {
            "/bytes" => {
                let block = Bytes::from(vec![b'x'; 64 * 1024]);
                let mut sent = 0u64;
                while sent < n {
                    let len = (n - sent).min(block.len() as u64) as usize;
                    if tx.send(Ok(Frame::data(block.slice(..len)))).await.is_err() {
                        return;
                    }
                    sent += len as u64;
                }
            }
            "/events" => {
                for i in 0..n {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    let event = format!("id: {i}\ndata: {}\n\n", now_ms());
                    if tx.send(Ok(Frame::data(Bytes::from(event)))).await.is_err() {
                        return;
                    }
                }
            }
            "/upload" => {
                let _ = tx
                    .send(Ok(Frame::data(Bytes::from(received.to_string()))))
                    .await;
            }
            _ => {
                let _ = tx
                    .send(Ok(Frame::data(Bytes::from_static(b"hello\n"))))
                    .await;
            }
        }
    });
    let mut resp = http::Response::new(StreamBody::new(Frames(rx)));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    resp
}

fn rss_mib(pid: u32) -> u64 {
    crate::setups::rss_kib(pid).map_or(0, |kib| kib / 1024)
}

/// RSS of `pid` and its children (nginx's workers), MiB.
fn rss_tree_mib(pid: u32) -> u64 {
    rss_tree_kib(pid) / 1024
}

/// RSS of `pid` and its children (nginx's workers), KiB.
pub(crate) fn rss_tree_kib(pid: u32) -> u64 {
    let kib = |pid| crate::setups::rss_kib(pid).unwrap_or(0);
    kib(pid)
        + crate::setups::children(pid)
            .into_iter()
            .map(kib)
            .sum::<u64>()
}

/// A process whose memory is watched: its name, pid, and whether its
/// children count (nginx's workers).
type Watched = (&'static str, u32, bool);

type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Empty<Bytes>,
>;

/// A request body of `left` bytes of `x`, made as it is sent, with its
/// length known (a `Content-Length` upload).
struct Upload {
    left: u64,
    block: Bytes,
}

impl hyper::body::Body for Upload {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        let len = self.left.min(self.block.len() as u64);
        self.left -= len;
        Poll::Ready(Some(Ok(Frame::data(self.block.slice(..len as usize)))))
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.left)
    }
}

type UploadClient =
    hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, Upload>;

/// Peak RSS growth of `processes` (MiB each) while `work` runs, sampled
/// every 50 ms.
async fn watching<T>(
    processes: &[Watched],
    work: impl std::future::Future<Output = T>,
) -> (T, Vec<(&'static str, u64)>) {
    let rss = |(_, pid, tree): &Watched| {
        if *tree {
            rss_tree_mib(*pid)
        } else {
            rss_mib(*pid)
        }
    };
    let before: Vec<u64> = processes.iter().map(rss).collect();
    let mut peak = before.clone();
    let mut work = std::pin::pin!(work);
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    let out = loop {
        tokio::select! {
            out = &mut work => break out,
            _ = tick.tick() => {
                for (i, process) in processes.iter().enumerate() {
                    peak[i] = peak[i].max(rss(process));
                }
            }
        }
    };
    let growth = processes
        .iter()
        .zip(peak.iter().zip(&before))
        .map(|((name, _, _), (peak, before))| (*name, peak.saturating_sub(*before)))
        .collect();
    (out, growth)
}

/// Uploads `bytes` to `url` (`PUT`, with a `Content-Length`) and checks
/// the upstream counted them all: MB/s, peak growth per process.
async fn upload(
    client: &UploadClient,
    url: &str,
    bytes: u64,
    processes: &[Watched],
) -> anyhow::Result<(f64, Vec<(&'static str, u64)>)> {
    let body = Upload {
        left: bytes,
        block: Bytes::from(vec![b'x'; 64 * 1024]),
    };
    let request = http::Request::put(url).body(body)?;
    let started = Instant::now();
    let (answer, growth) = watching(processes, async {
        let resp = client.request(request).await?;
        let status = resp.status();
        let text = resp.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, text))
    })
    .await;
    let (status, text) = answer?;
    let secs = started.elapsed().as_secs_f64();
    anyhow::ensure!(status == 200, "upload answered {status}");
    anyhow::ensure!(
        text == bytes.to_string(),
        "the upstream received {} of {bytes} bytes",
        String::from_utf8_lossy(&text)
    );
    Ok((bytes as f64 / secs / 1e6, growth))
}

/// Downloads `url` whole, watching `processes`' RSS (see [`watching`]):
/// bytes, MB/s, peak growth per process.
async fn download(
    client: &Client,
    url: &str,
    processes: &[Watched],
) -> anyhow::Result<(u64, f64, Vec<(&'static str, u64)>)> {
    let started = Instant::now();
    let (received, growth) = watching(processes, async {
        let resp = client.get(url.parse()?).await?;
        anyhow::ensure!(resp.status() == 200, "download answered {}", resp.status());
        let mut body = resp.into_body();
        let mut received = 0u64;
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame?.into_data() {
                received += data.len() as u64;
            }
        }
        anyhow::Ok(received)
    })
    .await;
    let received = received?;
    let secs = started.elapsed().as_secs_f64();
    Ok((received, received as f64 / secs / 1e6, growth))
}

/// Opens `streams` event streams at once and returns every event's delay
/// (ms) and how many streams failed.
async fn fan_out(client: &Client, url: &str, streams: usize) -> (Vec<u64>, usize) {
    let tasks: Vec<_> = (0..streams)
        .map(|_| {
            let (client, url) = (client.clone(), url.to_owned());
            tokio::spawn(async move {
                let resp = client.get(url.parse().ok()?).await.ok()?;
                let mut body = resp.into_body();
                let (mut text, mut delays) = (String::new(), Vec::new());
                while let Some(frame) = body.frame().await {
                    let data = frame.ok()?.into_data().ok()?;
                    let arrived = now_ms();
                    text.push_str(std::str::from_utf8(&data).ok()?);
                    while let Some(end) = text.find("\n\n") {
                        let event: String = text.drain(..end + 2).collect();
                        if let Some(written) = event
                            .lines()
                            .find_map(|l| l.strip_prefix("data: "))
                            .and_then(|d| d.parse::<u64>().ok())
                        {
                            delays.push(arrived.saturating_sub(written));
                        }
                    }
                }
                Some(delays)
            })
        })
        .collect();
    let (mut delays, mut errors) = (Vec::new(), 0);
    for task in tasks {
        match task.await {
            Ok(Some(d)) => delays.extend(d),
            _ => errors += 1,
        }
    }
    (delays, errors)
}

pub(crate) fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

/// Runs the scenario through nginx and through Anteroom.
pub(crate) async fn run(
    anteroom: &Path,
    redis: &LocalRedis,
    download_bytes: u64,
    streams: usize,
) -> anyhow::Result<Vec<StreamFigures>> {
    let upstream = start_upstream().await?;
    let nginx = Nginx::start_streaming(upstream)?;
    // A stream holds a dispatcher slot while it lasts: room for all.
    let forwarding =
        Forwarding::start_with(anteroom, redis, upstream, "bench-stream", streams + 8)?;
    let client: Client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(streams)
        .build_http();
    let upload_client: UploadClient =
        hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http();
    let (proxy_pid, dispatcher_pid) = forwarding.pids();
    let setups: [(&'static str, String, Vec<Watched>); 2] = [
        (
            "nginx -> upstream",
            nginx.url(""),
            vec![("nginx", nginx.pid(), true)],
        ),
        (
            "anteroom -> upstream",
            forwarding.url(""),
            vec![
                ("proxy", proxy_pid, false),
                ("dispatcher", dispatcher_pid, false),
                ("redis", redis.pid(), false),
            ],
        ),
    ];
    let mut figures = Vec::new();
    for (setup, base, processes) in setups {
        let (bytes, mb_s, rss_growth) = download(
            &client,
            &format!("{base}/bytes?n={download_bytes}"),
            &processes,
        )
        .await?;
        let (upload_mb_s, upload_rss_growth) = upload(
            &upload_client,
            &format!("{base}/upload"),
            download_bytes,
            &processes,
        )
        .await?;
        let events_url = format!("{base}/events?n=10&ms=500");
        let (mut delays, errors) = fan_out(&client, &events_url, streams).await;
        delays.sort_unstable();
        figures.push(StreamFigures {
            setup,
            download_bytes: bytes,
            download_mb_s: mb_s,
            rss_growth,
            upload_mb_s,
            upload_rss_growth,
            streams,
            events: delays.len(),
            delay_p50_ms: percentile(&delays, 0.5),
            delay_p99_ms: percentile(&delays, 0.99),
            delay_max_ms: delays.last().copied().unwrap_or(0),
            errors,
        });
    }
    Ok(figures)
}

/// `proxy +17, dispatcher +30`: each process's growth in MiB.
fn growth_text(growth: &[(&'static str, u64)]) -> String {
    growth
        .iter()
        .map(|(name, mib)| format!("{name} +{mib}"))
        .collect::<Vec<_>>()
        .join(", ")
}

pub(crate) fn print(figures: &[StreamFigures]) {
    println!("\nStreams: a large download, then server-sent events to many clients at once");
    println!(
        "  {:<22} {:>10} {:>9}  {:<44} {:>8} {:>7} {:>7} {:>7} {:>6}",
        "setup",
        "download",
        "MB/s",
        "RSS growth during the download (MiB)",
        "events",
        "p50",
        "p99",
        "max",
        "errors"
    );
    for f in figures {
        let rss = growth_text(&f.rss_growth);
        println!(
            "  {:<22} {:>7} MiB {:>9.0}  {:<44} {:>8} {:>5}ms {:>5}ms {:>5}ms {:>6}",
            f.setup,
            f.download_bytes / (1024 * 1024),
            f.download_mb_s,
            rss,
            f.events,
            f.delay_p50_ms,
            f.delay_p99_ms,
            f.delay_max_ms,
            f.errors
        );
    }
    if let Some(f) = figures.first() {
        println!(
            "  ({} streams of 10 events 500 ms apart per setup; delay: written by the upstream to read by the client)",
            f.streams
        );
    }
    println!("\nUploads: the same size, PUT with a Content-Length, counted by the upstream");
    println!(
        "  {:<22} {:>10} {:>9}  {:<44}",
        "setup", "upload", "MB/s", "RSS growth during the upload (MiB)"
    );
    for f in figures {
        let rss = growth_text(&f.upload_rss_growth);
        println!(
            "  {:<22} {:>7} MiB {:>9.0}  {:<44}",
            f.setup,
            f.download_bytes / (1024 * 1024),
            f.upload_mb_s,
            rss
        );
    }
}
