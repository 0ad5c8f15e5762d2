//! Prometheus metrics, scraped from real processes while requests flow: the
//! proxy's on its admin address, a dispatcher's on `--metrics`.

use std::time::Duration;

use anteroom_protocol::Keys;
use anteroom_testkit::free_port;
use http::{Request, StatusCode};
use http_body_util::Full;

use crate::support::app::Upstream;
use crate::support::bin::BinProcess;
use crate::support::web::{self, TestClient, client, send};
use crate::support::{eventually, redis_conn, start_redis, wait_for_port};

const QUEUE: &str = "metered";
const TOKEN: &str = "scrape-secret";

/// The value of the series named exactly `series` (name and labels).
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

fn series(name: &str, labels: &str) -> String {
    if labels.is_empty() {
        format!("{name}{{queue=\"{QUEUE}\"}}")
    } else {
        format!("{name}{{queue=\"{QUEUE}\",{labels}}}")
    }
}

async fn scrape(c: &TestClient, url: &str, token: Option<&str>) -> (StatusCode, String) {
    let mut req = Request::get(url);
    if let Some(token) = token {
        req = req.header("authorization", format!("Bearer {token}"));
    }
    let r = send(c, req.body(Full::default()).unwrap()).await;
    if r.status == StatusCode::OK {
        assert!(
            r.headers["content-type"]
                .to_str()
                .unwrap()
                .starts_with("application/openmetrics-text"),
            "{:?}",
            r.headers
        );
    }
    (r.status, r.text())
}

/// Waits until `check` holds for a scrape of `url`.
async fn until_scraped(
    c: &TestClient,
    url: &str,
    token: Option<&str>,
    what: &str,
    check: impl Fn(&str) -> bool,
) -> String {
    let mut last = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::time::Instant::now() < deadline {
        let (status, text) = scrape(c, url, token).await;
        assert_eq!(status, StatusCode::OK, "{text}");
        if check(&text) {
            return text;
        }
        last = text;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what}: not seen within 10 s; last scrape:\n{last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_and_dispatcher_metrics_move_as_requests_flow() {
    let redis = start_redis();
    let upstream = Upstream::start().await;
    let (port, admin_port, metrics_port) = (
        free_port().unwrap(),
        free_port().unwrap(),
        free_port().unwrap(),
    );
    let listen = format!("127.0.0.1:{port}");
    let admin = format!("127.0.0.1:{admin_port}");
    let _proxy = BinProcess::spawn(&[
        "proxy",
        "--listen",
        &listen,
        "--redis",
        &redis.url(),
        "--queue",
        QUEUE,
        "--hold",
        "1s",
        "--max-waiting",
        "3",
        "--admin",
        &admin,
        "--admin-token",
        TOKEN,
    ]);
    wait_for_port(port).await;
    wait_for_port(admin_port).await;
    let c = client();
    let proxy_url = format!("http://{admin}/metrics");
    let proxy_scrape = |what: &'static str, check: fn(&str) -> bool| {
        let (c, url) = (c.clone(), proxy_url.clone());
        async move { until_scraped(&c, &url, Some(TOKEN), what, check).await }
    };

    // The token guards /metrics like /status.
    let (status, _) = scrape(&c, &proxy_url, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // Every series exists at zero before the first request (once the
    // proxy has set its queue up: the admin address may answer a moment
    // before).
    proxy_scrape("every proxy series at zero", |text| {
        [
            "anteroom_proxy_waiting_requests",
            "anteroom_proxy_shed_total",
            "anteroom_proxy_expired_total",
            "anteroom_proxy_request_duration_seconds_count",
        ]
        .iter()
        .all(|name| value(text, &series(name, "")) == Some(0.0))
    })
    .await;

    // No dispatcher: three requests wait (the waiting limit), a fourth is shed.
    let waiting: Vec<_> = (0..3)
        .map(|i| {
            let (c, url) = (c.clone(), format!("http://{listen}/echo?{i}"));
            tokio::spawn(async move { web::get(&c, &url).await.status })
        })
        .collect();
    proxy_scrape("three requests waiting", |t| {
        value(t, &series("anteroom_proxy_waiting_requests", "")) == Some(3.0)
    })
    .await;
    let shed = web::get(&c, &format!("http://{listen}/echo")).await;
    assert_eq!(shed.status, StatusCode::SERVICE_UNAVAILABLE);
    // The hold budget (1 s) runs out for the three.
    for task in waiting {
        assert_eq!(task.await.unwrap(), StatusCode::GATEWAY_TIMEOUT);
    }
    let text = proxy_scrape("the expired requests counted", |t| {
        value(t, &series("anteroom_proxy_expired_total", "")) == Some(3.0)
    })
    .await;
    assert_eq!(
        value(&text, &series("anteroom_proxy_shed_total", "")),
        Some(1.0)
    );
    assert_eq!(
        value(
            &text,
            &series("anteroom_proxy_requests_total", "status=\"503\"")
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &text,
            &series("anteroom_proxy_requests_total", "status=\"504\"")
        ),
        Some(3.0)
    );
    assert_eq!(
        value(&text, &series("anteroom_proxy_waiting_requests", "")),
        Some(0.0)
    );

    // A dispatcher arrives: it finds the three expired requests (not run),
    // then serves five more.
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let _dispatcher = BinProcess::spawn(&[
        "dispatch",
        "--redis",
        &redis.url(),
        "--queue",
        QUEUE,
        "--upstream",
        &upstream.url(),
        "--metrics",
        &metrics_addr,
    ]);
    wait_for_port(metrics_port).await;
    let dispatcher_url = format!("http://{metrics_addr}/metrics");
    until_scraped(&c, &dispatcher_url, None, "expired requests skipped", |t| {
        value(t, &series("anteroom_dispatcher_expired_total", "")) == Some(3.0)
    })
    .await;
    for i in 0..5 {
        let r = web::post(&c, &format!("http://{listen}/echo"), format!("body {i}")).await;
        assert_eq!(r.status, StatusCode::OK);
    }
    let text = proxy_scrape("five answered", |t| {
        value(
            t,
            &series("anteroom_proxy_requests_total", "status=\"200\""),
        ) == Some(5.0)
    })
    .await;
    assert_eq!(
        value(
            &text,
            &series("anteroom_proxy_request_duration_seconds_count", "")
        ),
        Some(9.0),
        "3 expired + 1 shed + 5 answered"
    );
    let text = until_scraped(&c, &dispatcher_url, None, "five handled", |t| {
        value(
            t,
            &series("anteroom_dispatcher_requests_total", "status=\"200\""),
        ) == Some(5.0)
    })
    .await;
    for (name, expected) in [
        ("anteroom_dispatcher_handler_duration_seconds_count", 5.0),
        ("anteroom_dispatcher_queue_wait_seconds_count", 8.0),
        ("anteroom_dispatcher_in_flight_requests", 0.0),
        ("anteroom_dispatcher_dead_lettered_total", 0.0),
    ] {
        assert_eq!(
            value(&text, &series(name, "")),
            Some(expected),
            "{name}:\n{text}"
        );
    }

    // An envelope that does not decode is dead-lettered, and counted.
    let mut conn = redis_conn(&redis).await;
    let _: i64 = redis::cmd("LPUSH")
        .arg(Keys::new(QUEUE).unwrap().requests())
        .arg("not an envelope")
        .query_async(&mut conn)
        .await
        .unwrap();
    until_scraped(&c, &dispatcher_url, None, "the dead letter counted", |t| {
        value(t, &series("anteroom_dispatcher_dead_lettered_total", "")) == Some(1.0)
    })
    .await;
    eventually("nothing in flight", Duration::from_secs(5), || {
        let (c, url) = (c.clone(), dispatcher_url.clone());
        async move {
            let (_, text) = scrape(&c, &url, None).await;
            value(&text, &series("anteroom_dispatcher_in_flight_requests", "")) == Some(0.0)
        }
    })
    .await;
}
