//! Network faults between a dispatcher and Redis, and between a proxy and
//! Redis, made by a relay in the test (anteroom_testkit::relay): 200 ms added each
//! way, 5 % of segments as late as a TCP retransmission makes a lost one,
//! and a 10 s partition that then heals. Under a steady load of GETs and
//! POSTs, every client gets an answer within its hold budget, nothing that
//! must not run twice does, and after the partition service resumes
//! within 2 s. The figures are printed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use anteroom_testkit::free_port;
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;

use crate::support::adapters::{record_dispatcher, record_file, recorded};
use crate::support::app::{Ran, recording_upstream};
use crate::support::bin::{BinProcess, command, start_proxy_on};
use crate::support::load::{Load, Summary};
use crate::support::web::{client, send};
use crate::support::{
    control, eventually, redis_conn, start_redis, until_dispatching, wait_for_port,
};
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
    /// and each answered 200 ran exactly once; no GET answered 502 (a
    /// safe request is run again, never given up); what `allowed` says
    /// about other statuses. Prints the figures; returns the median
    /// latency.
    fn check(&self, name: &str, summary: &Summary, allowed: &[StatusCode]) -> Duration {
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
            } else {
                assert_ne!(status, StatusCode::BAD_GATEWAY, "{name}: GET {id} got 502");
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
        p50
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
    let p50 = setup.check(&format!("{link:?} link, 200 ms each way"), &summary, &[]);
    // Every request crosses the link at least once each way.
    assert!(
        p50 >= Duration::from_millis(400),
        "{link:?} link: p50 {p50:?} with 200 ms each way: the latency was not applied"
    );

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

/// A dispatcher cut off from Redis for longer than its heartbeat TTL is
/// reaped while alive: a reaper takes its processing list and removes its
/// registry entry. After the heal it is in the registry again before it
/// pulls anything, so a request it then pulls and dies holding is found
/// by a reaper and run again. (Found by the chaos soak: a dispatcher
/// killed just after such a heal held a GET no reaper looked for, which
/// waited out its hold budget for a 504.) The Rust dispatcher here, the
/// Python, Node and Ruby ones below.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dispatcher_reaped_while_cut_off_registers_before_it_pulls() {
    registers_before_it_pulls(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_dispatcher_registers_before_it_pulls_too() {
    registers_before_it_pulls(Some("py")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_dispatcher_registers_before_it_pulls_too() {
    registers_before_it_pulls(Some("node")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ruby_dispatcher_registers_before_it_pulls_too() {
    registers_before_it_pulls(Some("rb")).await;
}

/// The test above with the Rust dispatcher (`None`: its app takes requests
/// and never answers) or the `language`'s ([`record_dispatcher`]: its app
/// holds `/run/ID?hang=1` for 60 s) as the one cut off. The one that runs
/// the GET again is a Rust dispatcher whose app answers at once.
async fn registers_before_it_pulls(language: Option<&str>) {
    let queue = format!("reaped-alive-{}", language.unwrap_or("rs"));
    let redis = start_redis();
    let relay = Relay::start(redis.port()).await;
    let (upstream, ran) = recording_upstream().await;
    let (_proxy, base) = start_proxy_on(&redis.url(), &queue, "60s", &[]).await;
    let registry = format!("anteroom:{{{queue}}}:dispatchers");
    let mut conn = redis_conn(&redis).await;
    let record = record_file();
    let (mut cmd, received): (_, Box<dyn Fn() -> bool + Send + Sync>) = match language {
        None => {
            let (hanging, received) = hanging_upstream().await;
            let mut cmd = command();
            cmd.args(["dispatch", "--upstream", &hanging, "--concurrency", "1"]);
            (cmd, Box::new(move || received.load(Ordering::Acquire)))
        }
        Some(language) => {
            let record = record.clone();
            let cmd = record_dispatcher(language, &record);
            let received = move || recorded(&record, "held") > 0;
            (cmd, Box::new(received))
        }
    };
    cmd.env("ANTEROOM_REDIS", relay.url())
        .env("ANTEROOM_QUEUE", &queue)
        .env("ANTEROOM_HEARTBEAT_TTL", "6s")
        .stdout(std::process::Stdio::null());
    let mut cut_off = BinProcess::spawn_cmd(&mut cmd);
    let control = control(&redis, &queue).await;
    until_dispatching(&control).await;
    let members: Vec<String> = redis::cmd("ZRANGE")
        .arg(&registry)
        .arg(0)
        .arg(-1)
        .query_async(&mut conn)
        .await
        .unwrap();
    let [id] = members.as_slice() else {
        panic!("one dispatcher expected in the registry: {members:?}");
    };
    let heartbeat = format!("anteroom:{{{queue}}}:dispatcher:{id}");

    // Cut off until its heartbeat expires; a reaping pass (by hand, so no
    // other dispatcher takes the request below) removes its entry. Its
    // connections are reset before the heal, so no beat it sent during
    // the partition lands afterwards: it must write one itself.
    relay.set_partitioned(true);
    eventually("the heartbeat to expire", Duration::from_secs(15), || {
        let (mut conn, heartbeat) = (conn.clone(), heartbeat.clone());
        async move {
            let exists: bool = redis::cmd("EXISTS")
                .arg(&heartbeat)
                .query_async(&mut conn)
                .await
                .unwrap();
            !exists
        }
    })
    .await;
    let reaped = command()
        .args(["reap", "--redis", &redis.url(), "--queue", &queue])
        .output()
        .unwrap();
    assert!(reaped.status.success(), "{reaped:?}");
    let score: Option<f64> = redis::cmd("ZSCORE")
        .arg(&registry)
        .arg(id)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(score, None, "the reaping pass left the registry entry");

    // A GET waits; the heal; the dispatcher pulls it, and its app holds
    // it. At that moment the dispatcher must be registered and beating.
    let waiting = tokio::spawn({
        let uri = format!("{base}/run/held?hang=1");
        async move { send(&client(), Request::get(uri).body(Full::default()).unwrap()).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    relay.reset();
    relay.set_partitioned(false);
    eventually(
        "the app to receive the GET",
        Duration::from_secs(15),
        || {
            let received = received();
            async move { received }
        },
    )
    .await;
    let (score, exists): (Option<f64>, bool) = redis::pipe()
        .cmd("ZSCORE")
        .arg(&registry)
        .arg(id)
        .cmd("EXISTS")
        .arg(&heartbeat)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        score.is_some() && exists,
        "{language:?}: a request pulled while the dispatcher is not registered (entry \
         {score:?}, heartbeat {exists}): no reaper would find it"
    );

    // It dies holding the GET: a reaper finds it, another dispatcher runs
    // it, and the client gets 200.
    let _ = cut_off.child().kill();
    let _ = cut_off.child().wait();
    let started = Instant::now();
    let _rescuer = BinProcess::spawn(&[
        "dispatch",
        "--redis",
        &redis.url(),
        "--queue",
        &queue,
        "--upstream",
        &upstream,
        "--reap-every",
        "1s",
    ]);
    let answer = tokio::time::timeout(Duration::from_secs(30), waiting)
        .await
        .expect("the GET answered within 30 s")
        .unwrap();
    println!(
        "{language:?}: GET held by a dispatcher reaped while cut off, then killed: {} after {:?}",
        answer.status,
        started.elapsed()
    );
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(
        ran.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|r| r.as_str() == "held")
            .count(),
        1
    );
    let _ = std::fs::remove_file(&record);
}

/// An app that accepts connections, reads each request's head and never
/// answers: its URL, and a flag set when the first request arrives.
async fn hanging_upstream() -> (String, Arc<AtomicBool>) {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let received = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&received);
    tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((mut socket, _)) = listener.accept().await {
            let mut head = [0u8; 1024];
            // A health check connects and leaves; a request sends a head.
            if matches!(socket.read(&mut head).await, Ok(n) if n > 0) {
                flag.store(true, Ordering::Release);
            }
            open.push(socket);
        }
    });
    (url, received)
}
