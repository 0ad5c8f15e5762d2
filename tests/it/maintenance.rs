//! Maintenance mode with real processes: `anteroom maintenance on|off` and
//! the admin endpoint's `/maintenance/on|off` make two proxies answer new
//! requests 503 at once (HTML or JSON, the configured page), while a held
//! request keeps waiting; `/healthz` stays 200 through pause and
//! maintenance, and answers 503 only while the node is drained.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::Full;

use crate::support::app::recording_upstream;
use crate::support::bin::{BinProcess, command, start_proxy_on};
use crate::support::web::{Reply, TestClient, client, send};
use crate::support::{control, eventually, pause_acknowledged, start_redis, until_dispatching};

fn request(method: &str, url: &str, accept: &str) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri(url)
        .header(header::ACCEPT, accept)
        .body(Full::new(Bytes::from_static(b"order")))
        .unwrap()
}

async fn anteroom(args: Vec<String>) -> std::process::Output {
    tokio::task::spawn_blocking(move || command().args(&args).output().unwrap())
        .await
        .unwrap()
}

async fn admin_post(c: &TestClient, url: String, body: &'static str) -> Reply {
    let req = Request::post(url)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap();
    send(c, req).await
}

/// Ids of probes answered 503, which must never run.
static REFUSED_PROBES: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// Sends GET `/run/NAME-N` (a fresh N each time) until one is answered
/// `status` (at most 5 s); returns that answer. Probes
/// answered 503 are recorded in [`REFUSED_PROBES`].
async fn until_status(c: &TestClient, base: &str, status: StatusCode, name: &str) -> Reply {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let started = std::time::Instant::now();
    loop {
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = format!("{name}-{n}");
        let url = format!("{base}/run/{id}");
        // A probe sent just before a paused queue's proxies switched is
        // queued, and waits for the resume (it may then run): not an
        // answer yet.
        let sent = send(c, request("GET", &url, "*/*"));
        let Ok(answer) = tokio::time::timeout(Duration::from_secs(1), sent).await else {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "no {status} within 10 s"
            );
            continue;
        };
        if answer.status == StatusCode::SERVICE_UNAVAILABLE {
            REFUSED_PROBES.lock().unwrap().push(id);
        }
        if answer.status == status {
            return answer;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "no {status} within 5 s: {}",
            answer.status
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

const BROWSER: &str = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_answers_new_requests_at_once_and_keeps_held_ones() {
    let redis = start_redis();
    let queue = "upkeep";
    let (upstream, ran) = recording_upstream().await;
    let admin_port = anteroom_testkit::free_port().unwrap();
    let admin = format!("127.0.0.1:{admin_port}");
    let (_proxy, base) =
        start_proxy_on(&redis.url(), queue, "60s", &["--admin", admin.as_str()]).await;
    // A second proxy with its own page: both switch, each answers its way.
    let page = std::env::temp_dir().join(format!("anteroom-page-{admin_port}.html"));
    std::fs::write(&page, "<h1>our own page</h1>\n").unwrap();
    let page_arg = page.display().to_string();
    let (_custom, custom_base) = start_proxy_on(
        &redis.url(),
        queue,
        "60s",
        &["--maintenance-page", page_arg.as_str()],
    )
    .await;
    let _dispatcher = BinProcess::spawn(&[
        "dispatch",
        "--redis",
        &redis.url(),
        "--queue",
        queue,
        "--upstream",
        &upstream,
    ]);
    let ctl = control(&redis, queue).await;
    until_dispatching(&ctl).await;
    let c = client();
    let healthz = format!("http://{admin}/healthz");

    // Paused: a request waits in Redis.
    pause_acknowledged(&ctl, "maintenance test").await;
    let held = {
        let (c, url) = (c.clone(), format!("{base}/run/held"));
        tokio::spawn(async move { send(&c, request("POST", &url, "*/*")).await })
    };
    eventually("the request waiting", Duration::from_secs(10), || async {
        ctl.status().await.unwrap().waiting == 1
    })
    .await;

    // Maintenance on, from the CLI.
    let url = redis.url();
    let out = anteroom(
        [
            "maintenance",
            "on",
            "--redis",
            &url,
            "--queue",
            queue,
            "--message",
            "Back at 5 <pm>",
            "--retry-after",
            "45",
        ]
        .map(String::from)
        .to_vec(),
    )
    .await;
    assert!(out.status.success(), "{out:?}");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("maintenance on for queue \"upkeep\""),
        "{said}"
    );
    // Both proxies follow the announcement.
    for b in [&base, &custom_base] {
        until_status(&c, b, StatusCode::SERVICE_UNAVAILABLE, "probe").await;
    }
    // A browser gets the built-in page with the message, escaped; an API
    // client JSON; each at once, with Retry-After; nothing runs.
    let asked = Instant::now();
    let html = send(&c, request("GET", &format!("{base}/run/browser"), BROWSER)).await;
    let json = send(&c, request("POST", &format!("{base}/run/api"), "*/*")).await;
    let custom = send(
        &c,
        request("GET", &format!("{custom_base}/run/b2"), BROWSER),
    )
    .await;
    let custom_json = send(&c, request("GET", &format!("{custom_base}/run/a2"), "*/*")).await;
    let head = send(&c, request("HEAD", &format!("{base}/run/head"), BROWSER)).await;
    let took = asked.elapsed();
    assert_eq!(head.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(head.body.is_empty(), "a HEAD answered with content");
    assert_eq!(head.headers[header::RETRY_AFTER], "45");
    assert!(
        took < Duration::from_secs(1),
        "maintenance answers took {took:?}"
    );
    for r in [&html, &json, &custom, &custom_json] {
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text());
        assert_eq!(r.headers[header::RETRY_AFTER], "45");
        assert_eq!(r.headers[header::CACHE_CONTROL], "no-store");
        assert_eq!(r.headers[header::VARY], "accept");
    }
    assert!(
        html.headers[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    assert!(
        html.text().contains("Back at 5 &lt;pm&gt;"),
        "{}",
        html.text()
    );
    assert_eq!(json.headers[header::CONTENT_TYPE], "application/json");
    let body: serde_json::Value = serde_json::from_str(&json.text()).unwrap();
    assert_eq!(body["error"], "maintenance");
    assert_eq!(body["message"], "Back at 5 <pm>");
    assert_eq!(body["retry_after"], 45);
    assert_eq!(custom.text(), "<h1>our own page</h1>\n");
    assert_eq!(
        custom_json.headers[header::CONTENT_TYPE],
        "application/json"
    );

    // The balancer's health check: 200 through pause and maintenance;
    // 503 only while this node is drained.
    assert_eq!(
        send(&c, request("GET", &healthz, "*/*")).await.status,
        StatusCode::OK
    );
    let drained = admin_post(&c, format!("http://{admin}/drain"), "").await;
    assert_eq!(drained.status, StatusCode::OK, "{}", drained.text());
    let health = send(&c, request("GET", &healthz, "*/*")).await;
    assert_eq!(health.status, StatusCode::SERVICE_UNAVAILABLE);
    admin_post(&c, format!("http://{admin}/undrain"), "").await;
    assert_eq!(
        send(&c, request("GET", &healthz, "*/*")).await.status,
        StatusCode::OK
    );

    // The status names it.
    let out = anteroom(
        ["status", "--redis", &url, "--queue", queue]
            .map(String::from)
            .to_vec(),
    )
    .await;
    let status = String::from_utf8_lossy(&out.stdout);
    assert!(status.contains("MAINTENANCE"), "{status}");
    assert!(status.contains("Retry-After 45 s"), "{status}");

    // Off; the held request is answered once the queue resumes.
    let out = anteroom(
        ["maintenance", "off", "--redis", &url, "--queue", queue]
            .map(String::from)
            .to_vec(),
    )
    .await;
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("maintenance off"),
        "{out:?}"
    );
    ctl.resume().await.unwrap();
    let held = held.await.unwrap();
    assert_eq!(held.status, StatusCode::OK, "{}", held.text());
    until_status(&c, &base, StatusCode::OK, "after").await;

    // The same through the admin endpoint, with a JSON body.
    let on = admin_post(
        &c,
        format!("http://{admin}/maintenance/on"),
        r#"{"message": "from the admin endpoint", "retry_after": 7}"#,
    )
    .await;
    assert_eq!(on.status, StatusCode::OK, "{}", on.text());
    let on_status: serde_json::Value = serde_json::from_str(&on.text()).unwrap();
    assert_eq!(
        on_status["queues"][0]["maintenance"]["message"],
        "from the admin endpoint"
    );
    eventually(
        "maintenance from the admin",
        Duration::from_secs(3),
        || async {
            let r = send(&c, request("GET", &format!("{base}/run/probe2"), "*/*")).await;
            r.status == StatusCode::SERVICE_UNAVAILABLE && r.headers[header::RETRY_AFTER] == "7"
        },
    )
    .await;
    let bad = admin_post(
        &c,
        format!("http://{admin}/maintenance/on"),
        "{\"retry\": 1}",
    )
    .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST, "{}", bad.text());
    let off = admin_post(&c, format!("http://{admin}/maintenance/off"), "").await;
    assert_eq!(off.status, StatusCode::OK, "{}", off.text());
    eventually(
        "served after the admin's off",
        Duration::from_secs(3),
        || async {
            let r = send(&c, request("GET", &format!("{base}/run/last"), "*/*")).await;
            r.status == StatusCode::OK
        },
    )
    .await;

    // Only what was queued or sent outside maintenance ran.
    let ran = ran.lock().unwrap().clone();
    for refused in ["browser", "api", "b2", "a2", "probe", "probe2"] {
        assert!(
            !ran.iter().any(|id| id == refused),
            "{refused} ran: {ran:?}"
        );
    }
    assert_eq!(ran.iter().filter(|id| *id == "held").count(), 1, "{ran:?}");
    let _ = std::fs::remove_file(&page);
}
