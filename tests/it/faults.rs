//! Network faults between a dispatcher and Redis, and between a proxy and
//! Redis, made by a relay in the test (anteroom_testkit::relay): 200 ms added each
//! way, 5 % of segments as late as a TCP retransmission makes a lost one,
//! and a 10 s partition that then heals. Under a steady load of GETs and
//! POSTs, every client gets an answer within its hold budget, nothing that
//! must not run twice does, and after the partition service resumes
//! within 2 s. The figures are printed.

use std::collections::HashMap;
use std::sync::PoisonError;
use std::time::{Duration, Instant};

use anteroom_testkit::free_port;
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;

use crate::support::app::{Ran, recording_upstream};
use crate::support::bin::BinProcess;
use crate::support::load::{Load, Summary};
use crate::support::web::{client, send};
use crate::support::{control, start_redis, until_dispatching, wait_for_port};
use anteroom_testkit::relay::Relay;

/// Which process reaches Redis through the relay.
#[derive(Debug, Clone, Copy)]
enum Link {
    Dispatcher,
    Proxy,
}

/// A proxy and a dispatcher, one of them behind a relay, serving an
/// upstream that records what it ran.
struct Setup {
    _redis: anteroom_testkit::LocalRedis,
    relay: Relay,
    base: String,
    ran: Ran,
    _proxy: BinProcess,
    _dispatcher: BinProcess,
}

impl Setup {
    async fn start(link: Link) -> Self {
        let redis = start_redis();
        let relay = Relay::start(redis.port()).await;
        let (upstream, ran) = recording_upstream().await;
        let port = free_port().unwrap();
        let listen = format!("127.0.0.1:{port}");
        let (direct, relayed) = (redis.url(), relay.url());
        let (proxy_url, dispatcher_url) = match link {
            Link::Dispatcher => (&direct, &relayed),
            Link::Proxy => (&relayed, &direct),
        };
        let proxy = BinProcess::spawn(&[
            "proxy", "--listen", &listen, "--redis", proxy_url, "--queue", "faults", "--hold",
            "30s",
        ]);
        let dispatcher = BinProcess::spawn(&[
            "dispatch",
            "--redis",
            dispatcher_url,
            "--queue",
            "faults",
            "--upstream",
            &upstream,
        ]);
        wait_for_port(port).await;
        until_dispatching(&control(&redis, "faults").await).await;
        Self {
            _redis: redis,
            relay,
            base: format!("http://{listen}"),
            ran,
            _proxy: proxy,
            _dispatcher: dispatcher,
        }
    }

    /// 8 clients, GETs and POSTs in turn, each request naming itself in
    /// its path and body (`phase-client-n`).
    fn load(&self, phase: &str) -> Load {
        let (base, phase) = (self.base.clone(), phase.to_owned());
        Load::start_with(8, move |w, n| {
            let id = format!("{phase}-{w}-{n}");
            let uri = format!("{base}/run/{id}");
            let builder = if n % 2 == 0 {
                Request::get(uri)
            } else {
                Request::post(uri)
            };
            builder.body(Full::new(Bytes::from(id))).unwrap()
        })
    }

    /// Every client answered within the hold budget; no POST ran twice,
    /// and each answered 200 ran exactly once; what `allowed` says about
    /// other statuses. Prints the figures.
    fn check(&self, name: &str, summary: &Summary, allowed: &[StatusCode]) {
        let mut runs: HashMap<String, usize> = HashMap::new();
        for id in self
            .ran
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            *runs.entry(id.clone()).or_default() += 1;
        }
        let mut by_status: HashMap<Option<u16>, usize> = HashMap::new();
        let mut latencies: Vec<Duration> = Vec::new();
        for s in &summary.samples {
            *by_status.entry(s.status.map(|s| s.as_u16())).or_default() += 1;
            latencies.push(s.latency);
        }
        latencies.sort();
        let p50 = latencies
            .get(latencies.len() / 2)
            .copied()
            .unwrap_or_default();
        println!(
            "{name}: {} requests {by_status:?}, p50 {p50:?}, longest {:?}",
            summary.samples.len(),
            summary.longest()
        );
        assert_eq!(summary.connection_errors(), 0, "{name}");
        assert!(summary.longest() < Duration::from_secs(31), "{name}");
        for s in &summary.samples {
            let id = String::from_utf8_lossy(&s.sent).into_owned();
            let times = runs.get(&id).copied().unwrap_or(0);
            let status = s.status.unwrap();
            if s.method == http::Method::POST {
                assert!(times <= 1, "{name}: POST {id} ran {times} times");
            }
            if status == StatusCode::OK {
                assert!(times >= 1, "{name}: {id} answered 200 but never ran");
            } else if status == StatusCode::SERVICE_UNAVAILABLE {
                // Refused: its client may send it again, so it must not
                // have run (nor run later).
                assert_eq!(times, 0, "{name}: {id} answered 503 but ran");
                assert!(allowed.contains(&status), "{name}: {id} got {status}");
            } else {
                assert!(allowed.contains(&status), "{name}: {id} got {status}");
            }
        }
    }

    /// How long until a fresh GET is answered 200, at most `limit`.
    async fn service_back(&self, limit: Duration) -> Duration {
        let c = client();
        let started = Instant::now();
        let mut n = 0;
        loop {
            n += 1;
            let uri = format!("{}/run/probe-{n}", self.base);
            let req = Request::get(uri).body(Full::default()).unwrap();
            if let Ok(answer) =
                tokio::time::timeout(Duration::from_millis(500), send(&c, req)).await
            {
                if answer.status == StatusCode::OK {
                    return started.elapsed();
                }
            }
            assert!(started.elapsed() < limit, "no service within {limit:?}");
        }
    }
}

async fn slow_network(link: Link) {
    let setup = Setup::start(link).await;
    setup.relay.set_latency(Duration::from_millis(200));
    let load = setup.load("latency");
    tokio::time::sleep(Duration::from_secs(4)).await;
    let summary = load.finish().await;
    setup.check(&format!("{link:?} link, 200 ms each way"), &summary, &[]);

    setup.relay.set_latency(Duration::ZERO);
    setup.relay.set_slow_every(20);
    let load = setup.load("loss");
    tokio::time::sleep(Duration::from_secs(4)).await;
    let summary = load.finish().await;
    setup.check(
        &format!("{link:?} link, 5 % of segments retransmitted"),
        &summary,
        &[],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_or_lossy_network_to_the_dispatcher_fails_nothing() {
    slow_network(Link::Dispatcher).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_or_lossy_network_to_the_proxy_fails_nothing() {
    slow_network(Link::Proxy).await;
}

/// The dispatcher cut off from Redis for 10 s under load: requests wait in
/// Redis and are answered after the heal. What its connections had sent
/// arrives after the heal too, their replies lost (the dispatcher gave
/// them up): a POST whose pull was among them is answered 502, never run
/// twice (docs/protocol.md, "Lost replies").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_between_dispatcher_and_redis_heals_without_failures() {
    partition(
        Link::Dispatcher,
        "dispatcher partitioned 10 s",
        &[StatusCode::BAD_GATEWAY],
    )
    .await;
}

/// The proxy cut off from Redis for 10 s under load: pushes that went out
/// land after the heal and are answered (the proxy waits for them instead
/// of answering 503 while they may be queued); pushes that could not even
/// connect are refused with 503 and never run; replies the reader took
/// before the cut are in its popped list. Service resumes within 2 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_between_proxy_and_redis_heals_without_failures() {
    partition(
        Link::Proxy,
        "proxy partitioned 10 s",
        &[StatusCode::SERVICE_UNAVAILABLE],
    )
    .await;
}

/// 10 s of partition on `link` under load, then the heal: the checks of
/// [`Setup::check`] (with `allowed` statuses besides 200), and service
/// back within 2 s of the heal.
async fn partition(link: Link, name: &str, allowed: &[StatusCode]) {
    let setup = Setup::start(link).await;
    let load = setup.load("partition");
    tokio::time::sleep(Duration::from_secs(2)).await;
    setup.relay.set_partitioned(true);
    tokio::time::sleep(Duration::from_secs(10)).await;
    setup.relay.set_partitioned(false);
    let back = setup.service_back(Duration::from_secs(10)).await;
    println!("{name}: service back {back:?} after the heal");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let summary = load.finish().await;
    setup.check(name, &summary, allowed);
    assert!(
        back < Duration::from_secs(2),
        "{name}: service back only {back:?} after the heal"
    );
}
