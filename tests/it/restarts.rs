//! The application behind `anteroom dispatch --upstream` restarts, crashes
//! or is not up yet: requests wait in the queue instead of failing. Real
//! processes throughout: redis-server, the `anteroom` binary (proxy and
//! dispatcher), and a Python app server (tests/apps/orders_app.py) that
//! records each order it carries out in a file.

use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

use anteroom_control::Queue;
use anteroom_testkit::free_port;
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Full;

use crate::support::bin::start_proxy;
use crate::support::load::{Load, Summary};
use crate::support::orders::{App, start_dispatcher};
use crate::support::web::{client, get, send};
use crate::support::{control, eventually, start_redis};

const READY: Duration = Duration::from_secs(20);

/// Waits until one dispatcher serves `queue` and is `healthy` (or not).
async fn until_dispatcher_healthy(queue: &Queue, healthy: bool) {
    eventually("the dispatcher's upstream health", READY, || async {
        queue
            .status()
            .await
            .unwrap()
            .dispatchers
            .iter()
            .any(|d| d.heartbeat.unhealthy.is_none() == healthy)
    })
    .await;
}

/// Mixed traffic: each client alternates a GET and a POST of an order with
/// an `Idempotency-Key` (`{client}-{n}`), as a payment or checkout API does.
fn mixed_load(base: &str) -> Load {
    let base = base.to_owned();
    Load::start_with(8, move |w, n| {
        if n % 2 == 0 {
            Request::get(format!("{base}/items/{w}-{n}"))
                .body(Full::default())
                .unwrap()
        } else {
            let key = format!("{w}-{n}");
            Request::post(format!("{base}/orders"))
                .header("idempotency-key", &key)
                .body(Full::new(Bytes::from(key)))
                .unwrap()
        }
    })
}

/// Every acknowledged order was carried out exactly once, and nothing else
/// was: the app's own record against the clients' acknowledgements. And
/// Anteroom repeated only what the app may have been running when it died:
/// each order reached the app at most `1 + MAX_REPEATS` times, and few were
/// repeated at all (at most the dispatcher's concurrency per failure).
fn assert_orders_exactly_once(summary: &Summary, app: &App) {
    let mut arrived: HashMap<String, usize> = HashMap::new();
    for order in app.arrivals() {
        *arrived.entry(order).or_default() += 1;
    }
    let repeated: Vec<_> = arrived.iter().filter(|(_, n)| **n > 1).collect();
    println!(
        "{} orders reached the app, {} of them more than once",
        arrived.len(),
        repeated.len()
    );
    let limit = 1 + anteroom_control::queue::MAX_REPEATS as usize;
    assert!(
        repeated.iter().all(|(_, n)| **n <= limit),
        "delivered too often: {repeated:?}"
    );
    assert!(repeated.len() <= 8, "too many repeats: {repeated:?}");
    let mut carried_out: HashMap<String, usize> = HashMap::new();
    for order in app.orders() {
        *carried_out.entry(order).or_default() += 1;
    }
    let twice: Vec<_> = carried_out.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "orders carried out twice: {twice:?}");
    let acknowledged: Vec<String> = summary
        .samples
        .iter()
        .filter(|s| s.method == Method::POST && s.status.is_some_and(|s| s.is_success()))
        .map(|s| String::from_utf8_lossy(&s.sent).into_owned())
        .collect();
    assert!(!acknowledged.is_empty(), "no order was acknowledged");
    for order in &acknowledged {
        assert!(
            carried_out.contains_key(order),
            "order {order} acknowledged but never carried out"
        );
    }
    assert_eq!(
        carried_out.len(),
        acknowledged.len(),
        "the app carried out orders no client saw acknowledged"
    );
}

/// The headline: the app is SIGKILLed under load and started again 2 s
/// later, and nothing fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn app_killed_and_restarted_under_load_fails_nothing() {
    let redis = start_redis();
    let mut app = App::new();
    app.start(Duration::ZERO).await;
    let (_proxy, base) = start_proxy(&redis, "orders", "30s").await;
    let _dispatcher = start_dispatcher(&redis, "orders", &app, &[]);
    let queue = control(&redis, "orders").await;
    until_dispatcher_healthy(&queue, true).await;

    let load = mixed_load(&base);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    app.kill();
    let killed = Instant::now();
    // While it is down the dispatcher says why (the first failure may be
    // a request cut off in the app; then its checks are refused).
    eventually("the status to say the app is down", READY, || async {
        queue.status().await.unwrap().dispatchers[0]
            .heartbeat
            .unhealthy
            .as_ref()
            .is_some_and(|u| u.reason == "connection refused")
    })
    .await;
    let noticed = killed.elapsed();
    tokio::time::sleep(Duration::from_secs(2).saturating_sub(killed.elapsed())).await;
    app.start(Duration::ZERO).await;
    let gap = killed.elapsed();
    until_dispatcher_healthy(&queue, true).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let summary = load.finish().await;

    summary.report("app killed and restarted", |s| s.is_success());
    println!(
        "app down for {gap:?}; the status said \"connection refused\" {noticed:?} after the kill; {} orders carried out",
        app.orders().len()
    );
    assert_eq!(summary.failed(|s| s.is_success()), 0, "requests failed");
    assert_orders_exactly_once(&summary, &app);
    // Requests ran after the restart too.
    assert!(
        summary
            .samples
            .iter()
            .any(|s| s.started > killed + gap && s.status.is_some_and(|s| s.is_success()))
    );
    // The longest wait is about the gap, not a hold budget.
    assert!(
        summary.longest() < gap + Duration::from_secs(3),
        "longest wait {:?} for a gap of {gap:?}",
        summary.longest()
    );
}

/// The "restart the app, nothing else" playbook of docs/operations.md, as
/// written: the dispatcher runs with `--health-path` (default interval and
/// timeout) and the app is restarted as `systemctl restart` does (SIGTERM,
/// start). The restarted app answers its health path 503 for 3 s while it
/// warms up, and gets no request until it answers 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restarted_app_gets_no_request_until_healthy() {
    let redis = start_redis();
    let mut app = App::new();
    app.start(Duration::ZERO).await;
    let (_proxy, base) = start_proxy(&redis, "warm", "30s").await;
    let _dispatcher = start_dispatcher(&redis, "warm", &app, &["--health-path", "/health"]);
    let queue = control(&redis, "warm").await;
    until_dispatcher_healthy(&queue, true).await;

    let load = mixed_load(&base);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let killed = Instant::now();
    app.terminate();
    tokio::time::sleep(Duration::from_secs(2)).await;
    app.start(Duration::from_secs(3)).await;
    // Warming up: up, but its health path says 503, and the status says so.
    eventually("the status to show the warm-up", READY, || async {
        queue.status().await.unwrap().dispatchers[0]
            .heartbeat
            .unhealthy
            .as_ref()
            .is_some_and(|u| u.reason == "status 503")
    })
    .await;
    until_dispatcher_healthy(&queue, true).await;
    let back = killed.elapsed();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let summary = load.finish().await;

    summary.report("app restarted with a warm-up", |s| s.is_success());
    println!("healthy again {back:?} after the kill");
    assert_eq!(summary.failed(|s| s.is_success()), 0, "requests failed");
    assert_eq!(
        app.early_requests(),
        Vec::<String>::new(),
        "requests reached the app while it was warming up"
    );
    assert!(
        back >= Duration::from_secs(5),
        "taken back after {back:?}, before the warm-up ended"
    );
    assert_orders_exactly_once(&summary, &app);
}

/// A dispatcher started before its app: requests wait until the app is up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dispatcher_started_before_its_app_holds_requests_until_it_is_up() {
    let redis = start_redis();
    let mut app = App::new();
    let (_proxy, base) = start_proxy(&redis, "early", "30s").await;
    let _dispatcher = start_dispatcher(&redis, "early", &app, &[]);
    let queue = control(&redis, "early").await;
    until_dispatcher_healthy(&queue, false).await;

    let started = Instant::now();
    let requests: Vec<_> = (0..6)
        .map(|i| {
            let (c, base) = (client(), base.clone());
            tokio::spawn(async move {
                let req = if i % 2 == 0 {
                    Request::get(format!("{base}/items/{i}"))
                        .body(Full::default())
                        .unwrap()
                } else {
                    Request::post(format!("{base}/orders"))
                        .body(Full::new(Bytes::from(format!("plain-{i}"))))
                        .unwrap()
                };
                send(&c, req).await
            })
        })
        .collect();
    eventually("the requests to wait in the queue", READY, || async {
        queue.status().await.unwrap().waiting == 6
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    app.start(Duration::ZERO).await;
    let up = started.elapsed();
    for request in requests {
        let reply = request.await.unwrap();
        assert!(
            reply.status.is_success(),
            "{} {}",
            reply.status,
            reply.text()
        );
    }
    println!(
        "6 requests sent before the app was up ({up:?}) all answered after {:?}",
        started.elapsed()
    );
    // POSTs without a key were never sent before the app was up, so each
    // ran exactly once.
    let mut orders = app.orders();
    orders.sort();
    assert_eq!(orders, ["plain-1", "plain-3", "plain-5"]);
    let mut arrivals = app.arrivals();
    arrivals.sort();
    assert_eq!(arrivals, orders, "each POST reached the app once");
}

/// An app that stays down: requests get 504 at their hold budget (not 502),
/// and the status and the metrics say why.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn app_that_stays_down_gives_504_and_the_status_says_why() {
    let redis = start_redis();
    let app = App::new();
    let (_proxy, base) = start_proxy(&redis, "down", "1s").await;
    let metrics_port = free_port().unwrap();
    let metrics = format!("127.0.0.1:{metrics_port}");
    let _dispatcher = start_dispatcher(&redis, "down", &app, &["--metrics", &metrics]);
    let queue = control(&redis, "down").await;
    until_dispatcher_healthy(&queue, false).await;

    let c = client();
    let started = Instant::now();
    let reply = get(&c, &format!("{base}/items/1")).await;
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
    assert!(started.elapsed() >= Duration::from_secs(1));
    let reply = crate::support::web::post(&c, &format!("{base}/orders"), "x").await;
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);

    let json = Command::new(env!("CARGO_BIN_EXE_anteroom"))
        .args([
            "status",
            "--json",
            "--redis",
            &redis.url(),
            "--queue",
            "down",
        ])
        .output()
        .unwrap();
    assert!(json.status.success());
    let report: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    let unhealthy = &report["queues"][0]["dispatchers"][0]["unhealthy"];
    assert_eq!(unhealthy["reason"], "connection refused", "{report}");
    assert!(unhealthy["since_ms"].as_u64().unwrap() > 0);

    let text = Command::new(env!("CARGO_BIN_EXE_anteroom"))
        .args(["status", "--redis", &redis.url(), "--queue", "down"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    println!("{text}");
    assert!(
        text.contains("upstream unhealthy") && text.contains("connection refused"),
        "{text}"
    );

    let scraped = get(&c, &format!("http://{metrics}/metrics")).await.text();
    for line in [
        "anteroom_dispatcher_upstream_healthy{queue=\"down\"} 0",
        "anteroom_dispatcher_upstream_failures_total{queue=\"down\",reason=\"refused\"}",
    ] {
        assert!(scraped.contains(line), "{line} missing in:\n{scraped}");
    }
}

/// A request that breaks the app's connection every time (a poison request,
/// or a front that accepts connections for a dead app) is not retried until
/// its deadline: a GET is delivered 1 + MAX_REPEATS times, then 502; a POST
/// gets 502 at once. Each delivery is counted by the upstream itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_that_breaks_the_connection_every_time_gets_502_after_a_few_tries() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::AsyncReadExt;

    let redis = start_redis();
    let proxy = crate::support::TestProxy::start(&redis, "rude").await;
    // Reads each request, then closes the connection without answering.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let deliveries = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&deliveries);
    let server = tokio::spawn(async move {
        loop {
            let (mut socket, _) = listener.accept().await.unwrap();
            let counted = Arc::clone(&counted);
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                counted.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    let upstream = anteroom_dispatcher::Upstream::new(&url).unwrap();
    // A plain TCP check, which this server passes every time.
    let check = upstream.health_check(None).unwrap();
    let dispatcher = crate::support::TestDispatcher::start_built(
        crate::support::dispatcher_builder(&redis, "rude")
            .health_check(check)
            .build()
            .unwrap(),
        upstream,
    );

    let c = client();
    let started = Instant::now();
    let reply = get(&c, &proxy.url("/poison")).await;
    let took = started.elapsed();
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{}", reply.text());
    assert!(reply.text().contains("may or may not"), "{}", reply.text());
    let tries = 1 + anteroom_control::queue::MAX_REPEATS as usize;
    assert_eq!(deliveries.load(Ordering::SeqCst), tries);
    println!("a poison GET: {tries} deliveries, 502 after {took:?}");

    let reply = crate::support::web::post(&c, &proxy.url("/poison"), "x").await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{}", reply.text());
    assert_eq!(
        deliveries.load(Ordering::SeqCst),
        tries + 1,
        "a POST is not repeated"
    );
    dispatcher.stop().await;
    proxy.stop().await;
    server.abort();
}

/// A dispatcher whose upstream is not there says so at start, once, with
/// the upstream's address and the cause; not one line per request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_upstream_is_reported_once_with_its_address() {
    let redis = start_redis();
    let app = App::new();
    let log = std::env::temp_dir().join(format!("anteroom-dispatch-{}.log", free_port().unwrap()));
    let mut dispatcher = crate::support::bin::BinProcess::spawn_cmd(
        crate::support::bin::command()
            .args(["dispatch", "--redis", &redis.url(), "--queue", "gone"])
            .args(["--upstream", &app.url()])
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap()),
    );
    let queue = control(&redis, "gone").await;
    until_dispatcher_healthy(&queue, false).await;
    eventually("the start-up warning", READY, || async {
        std::fs::read_to_string(&log).is_ok_and(|t| t.contains("not reachable at start"))
    })
    .await;
    dispatcher.terminate();
    dispatcher.wait(READY).await;
    let text = std::fs::read_to_string(&log).unwrap();
    let _ = std::fs::remove_file(&log);
    let address = app.url().trim_start_matches("http://").to_owned();
    let warning = text
        .lines()
        .find(|l| l.contains("not reachable at start"))
        .unwrap();
    assert!(
        warning.contains(&address) && warning.contains("connection refused"),
        "{warning}"
    );
    assert_eq!(
        text.matches("connection refused").count(),
        1,
        "repeated while nothing changed:\n{text}"
    );
}

/// A `dedupe` request (the proxy runs with `--enqueue-timeout`) taken just
/// as the app went away: the dispatcher had claimed it, the app never
/// received it, so it goes back to the queue with its claim released and
/// runs once the app is back. (The claim used to stay: the next delivery
/// found it claimed and was dropped, and the client got 504.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claimed_request_the_app_never_received_runs_when_it_is_back() {
    let redis = start_redis();
    let queue = "claimed-unsent";
    let mut app = App::new();
    app.start(Duration::ZERO).await;
    let (_proxy, base) = crate::support::bin::start_proxy_on(
        &redis.url(),
        queue,
        "10s",
        &["--enqueue-timeout", "5s"],
    )
    .await;
    let _dispatcher = start_dispatcher(&redis, queue, &app, &[]);
    let control = control(&redis, queue).await;
    until_dispatcher_healthy(&control, true).await;
    let order = |body: &'static str| {
        let base = base.clone();
        async move {
            let request = Request::post(format!("{base}/orders"))
                .body(Full::new(Bytes::from_static(body.as_bytes())))
                .unwrap();
            send(&client(), request).await.status
        }
    };
    assert_eq!(order("first").await, StatusCode::CREATED);
    // The app goes away; the dispatcher does not know yet: it takes the
    // next order, claims it, and finds the app's port refusing it.
    app.kill();
    let second = tokio::spawn(order("second"));
    until_dispatcher_healthy(&control, false).await;
    app.start(Duration::ZERO).await;
    let status = second.await.unwrap();
    assert_eq!(
        status,
        StatusCode::CREATED,
        "the order taken as the app went away"
    );
    assert_eq!(app.orders(), vec!["first", "second"]);
}
