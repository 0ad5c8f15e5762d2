//! Operating a queue with the binary: pause --wait, window, status, and the
//! proxy's admin endpoint, with real processes.

use std::convert::Infallible;
use std::process::Output;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anteroom_control::{Queue, StatusReport};
use anteroom_dispatcher::Body;
use anteroom_testkit::{LocalRedis, free_port};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;

use crate::support::app::test_app;
use crate::support::bin::{BinProcess, command};
use crate::support::control;
use crate::support::web::{self, TestClient, client, send};
use crate::support::{TestDispatcher, TestProxy, dispatcher_builder, eventually, start_redis};

const READY: Duration = Duration::from_secs(15);

/// Runs `anteroom ARGS` to completion without blocking the runtime.
async fn anteroom(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || command().args(&args).output().unwrap())
        .await
        .unwrap()
}

/// `SUBCOMMAND --redis URL --queue QUEUE REST...` from `[SUBCOMMAND, REST...]`.
fn args(redis: &LocalRedis, queue: &str, cmd: &[&str]) -> Vec<String> {
    let (sub, rest) = cmd.split_first().unwrap();
    let mut v = vec![
        sub.to_string(),
        "--redis".into(),
        redis.url(),
        "--queue".into(),
        queue.into(),
    ];
    v.extend(rest.iter().map(|s| s.to_string()));
    v
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

/// A handler that sleeps for the milliseconds in the query (default 0).
fn sleepy() -> impl tower::Service<
    Request<Body>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Send,
> + Clone {
    tower::service_fn(|req: Request<Body>| async move {
        let ms: u64 = req.uri().query().and_then(|q| q.parse().ok()).unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"done"))))
    })
}

/// Sends a request the `sleepy` handler takes `ms` to answer, and returns
/// once a dispatcher holds it.
async fn hold_slow_request(
    proxy: &TestProxy,
    queue: &Queue,
    ms: u64,
) -> tokio::task::JoinHandle<crate::support::web::Reply> {
    let (c, url) = (client(), proxy.url(&format!("/?{ms}")));
    let slow = tokio::spawn(async move { web::get(&c, &url).await });
    crate::support::until_held(queue, 1).await;
    slow
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_wait_returns_once_in_flight_work_is_done() {
    let redis = start_redis();
    let proxy = TestProxy::start(&redis, "pw").await;
    let d = TestDispatcher::start(&redis, "pw", sleepy());
    let queue = control(&redis, "pw").await;
    let c = client();
    let slow = tokio::spawn({
        let (c, url) = (c.clone(), proxy.url("/?800"));
        async move {
            let r = web::get(&c, &url).await;
            (r.status, Instant::now())
        }
    });
    crate::support::until_held(&queue, 1).await;
    let out = anteroom(args(&redis, "pw", &["pause", "--wait", "--timeout", "10s"])).await;
    let returned = Instant::now();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("is quiet"),
        "{}",
        text(&out.stdout)
    );
    let (status, finished) = slow.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert!(
        finished <= returned,
        "pause --wait returned while a request was in flight"
    );
    let s = queue.status().await.unwrap();
    assert!(s.pause.is_some());
    assert!(
        s.dispatchers
            .iter()
            .all(|d| d.held == 0 && d.heartbeat.paused)
    );

    // Already quiet: returns at once; still paused until resumed.
    let out = anteroom(args(&redis, "pw", &["resume"])).await;
    assert!(
        text(&out.stdout).contains("resumed queue \"pw\""),
        "{}",
        text(&out.stdout)
    );
    assert!(queue.status().await.unwrap().pause.is_none());
    d.stop().await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_wait_fails_clearly_when_work_does_not_finish_in_time() {
    let redis = start_redis();
    let proxy = TestProxy::start(&redis, "stuck").await;
    let d = TestDispatcher::start(&redis, "stuck", sleepy());
    let queue = control(&redis, "stuck").await;
    let slow = hold_slow_request(&proxy, &queue, 3000).await;
    let out = anteroom(args(
        &redis,
        "stuck",
        &["pause", "--wait", "--timeout", "300ms"],
    ))
    .await;
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("did not become quiet within 300ms"), "{err}");
    assert!(err.contains("1 in flight, 1 held"), "{err}");
    assert!(err.contains("anteroom resume"), "{err}");
    assert!(
        queue.status().await.unwrap().pause.is_some(),
        "the pause must stay"
    );
    assert_eq!(slow.await.unwrap().status, StatusCode::OK);
    queue.resume().await.unwrap();
    d.stop().await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn window_runs_the_command_while_quiet_and_resumes_after_it_fails() {
    let redis = start_redis();
    let proxy = TestProxy::start(&redis, "win").await;
    let d = TestDispatcher::start(&redis, "win", test_app());
    let queue = control(&redis, "win").await;
    // Inside the window the queue is paused and quiet; the command sees it.
    let status_cmd = format!(
        "{} status --redis {} --queue win --json > \"$0\"; exit 7",
        env!("CARGO_BIN_EXE_anteroom"),
        redis.url()
    );
    let dir = std::env::temp_dir().join(format!("anteroom-win-{}", std::process::id()));
    let seen_file = dir.with_extension("json");
    let out = anteroom(args(
        &redis,
        "win",
        &[
            "window",
            "--timeout",
            "10s",
            "--",
            "sh",
            "-c",
            &status_cmd,
            seen_file.to_str().unwrap(),
        ],
    ))
    .await;
    assert_eq!(out.status.code(), Some(7), "{}", text(&out.stderr));
    let seen: StatusReport =
        serde_json::from_str(&std::fs::read_to_string(&seen_file).unwrap()).unwrap();
    let _ = std::fs::remove_file(&seen_file);
    let inside = &seen.queues[0];
    let pause = inside.pause.as_ref().expect("paused inside the window");
    assert!(pause.record.by.starts_with("window@"));
    assert!(pause.expires_in_ms.is_some(), "a window's pause is a lease");
    assert!(
        inside
            .dispatchers
            .iter()
            .all(|d| d.heartbeat.paused && d.held == 0)
    );
    // Resumed afterwards, and traffic flows.
    assert!(queue.status().await.unwrap().pause.is_none());
    let c = client();
    assert_eq!(
        web::get(&c, &proxy.url("/echo")).await.status,
        StatusCode::OK
    );
    d.stop().await;
    proxy.stop().await;
}

/// `anteroom window -- sleep 30` on `name`, once it has paused the queue.
async fn open_window(
    redis: &LocalRedis,
    name: &str,
    queue: &anteroom_control::Queue,
) -> BinProcess {
    let window = BinProcess::spawn(
        &args(redis, name, &["window", "--", "sleep", "30"])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    eventually("the window to pause the queue", READY, || async {
        queue.status().await.unwrap().pause.is_some()
    })
    .await;
    window
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn window_interrupted_stops_the_command_and_resumes() {
    let redis = start_redis();
    let proxy = TestProxy::start(&redis, "intr").await;
    let d = TestDispatcher::start(&redis, "intr", test_app());
    let queue = control(&redis, "intr").await;
    let mut window = open_window(&redis, "intr", &queue).await;
    // Give it time to reach the command, then stop it as a supervisor would.
    eventually("the command to start", READY, || async {
        std::process::Command::new("pgrep")
            .args(["-P", &window.pid().to_string(), "sleep"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    })
    .await;
    window.terminate();
    let status = window.wait(READY).await;
    assert_eq!(status.code(), Some(128 + 15), "exit status {status}");
    assert!(queue.status().await.unwrap().pause.is_none(), "left paused");
    d.stop().await;
    proxy.stop().await;
}

/// A window or `pause --wait` pointed at a queue nobody serves (a typo, or
/// the wrong Redis) refuses instead of running the command while traffic
/// flows; every control command names the Redis and queue it acts on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_commands_refuse_a_queue_nobody_serves_and_name_their_target() {
    let redis = start_redis();
    let proxy = TestProxy::start(&redis, "web").await;
    let d = TestDispatcher::start(&redis, "web", test_app());
    let typo = control(&redis, "wbe").await;
    let marker = std::env::temp_dir().join(format!("anteroom-typo-{}", free_port().unwrap()));
    let touch = ["window", "--", "touch", marker.to_str().unwrap()];

    let out = anteroom(args(&redis, "wbe", &touch)).await;
    assert_eq!(out.status.code(), Some(1));
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(
        stdout.contains(&format!(
            "queue \"wbe\" on {}: 0 proxies and 0 dispatchers",
            redis.url()
        )),
        "{stdout}"
    );
    assert!(
        stderr.contains("no proxy and no dispatcher serve queue \"wbe\"")
            && stderr.contains("queues known on this redis: web")
            && stderr.contains("the command was not run")
            && stderr.contains("--force"),
        "{stderr}"
    );
    assert!(!marker.exists(), "the command ran against nothing");
    assert!(typo.status().await.unwrap().pause.is_none());

    let out = anteroom(args(&redis, "wbe", &["pause", "--wait"])).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        typo.status().await.unwrap().pause.is_none(),
        "paused anyway"
    );

    // --force does it anyway, with a warning, and says how long it took.
    let mut forced = args(&redis, "wbe", &["window", "--force"]);
    forced.extend(touch[1..].iter().map(|s| s.to_string()));
    let out = anteroom(forced).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(marker.exists());
    let stderr = text(&out.stderr);
    assert!(stderr.contains("pausing anyway (--force)"), "{stderr}");
    assert!(stderr.contains("the window lasted"), "{stderr}");
    let _ = std::fs::remove_file(&marker);

    // The served queue: each command says what it acts on.
    let out = anteroom(args(&redis, "web", &["pause"])).await;
    assert!(
        text(&out.stdout).contains("1 proxy and 1 dispatcher serve it"),
        "{}",
        text(&out.stdout)
    );
    let out = anteroom(args(&redis, "web", &["resume"])).await;
    assert!(
        text(&out.stdout).contains(&redis.url()),
        "{}",
        text(&out.stdout)
    );
    // --timeout without --wait is not silently dropped.
    let out = anteroom(args(&redis, "web", &["pause", "--timeout", "5s"])).await;
    assert!(
        text(&out.stderr).contains("applies only with --wait"),
        "{}",
        text(&out.stderr)
    );
    let _ = anteroom(args(&redis, "web", &["resume"])).await;
    let out = anteroom(vec!["status".into(), "--redis".into(), redis.url()]).await;
    assert!(
        text(&out.stdout).starts_with(&format!("redis {}\n", redis.url())),
        "{}",
        text(&out.stdout)
    );

    // A typo'd queue in status says which queues exist.
    let out = anteroom(args(&redis, "wbe", &["status"])).await;
    assert!(
        text(&out.stdout).contains(
            "no proxy or dispatcher has registered queue \"wbe\" on this redis; known queues: web"
        ),
        "{}",
        text(&out.stdout)
    );
    // A window whose command does not exist: the shell's 127, resumed.
    let out = anteroom(args(
        &redis,
        "web",
        &["window", "--", "/nonexistent/command"],
    ))
    .await;
    assert_eq!(out.status.code(), Some(127), "{}", text(&out.stderr));
    assert!(
        control(&redis, "web")
            .await
            .status()
            .await
            .unwrap()
            .pause
            .is_none()
    );

    // An unreachable Redis: its address (no password), the cause once, and
    // what sets it.
    let port = free_port().unwrap();
    let out = anteroom(vec![
        "status".into(),
        "--redis".into(),
        format!("redis://:hunter2@127.0.0.1:{port}"),
    ])
    .await;
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "redis://***@127.0.0.1:{port} (set by --redis or ANTEROOM_REDIS)"
        )),
        "{stderr}"
    );
    assert!(!stderr.contains("hunter2"), "{stderr}");
    assert_eq!(stderr.matches("Connection refused").count(), 1, "{stderr}");
    d.stop().await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn window_that_cannot_get_quiet_does_not_run_the_command() {
    let redis = start_redis();
    let proxy = TestProxy::start(&redis, "busy").await;
    let d = TestDispatcher::start(&redis, "busy", sleepy());
    let queue = control(&redis, "busy").await;
    let slow = hold_slow_request(&proxy, &queue, 3000).await;
    let marker = std::env::temp_dir().join(format!("anteroom-ran-{}", free_port().unwrap()));
    let out = anteroom(args(
        &redis,
        "busy",
        &[
            "window",
            "--timeout",
            "300ms",
            "--",
            "touch",
            marker.to_str().unwrap(),
        ],
    ))
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("the command was not run"),
        "{}",
        text(&out.stderr)
    );
    assert!(!marker.exists(), "the command ran without a quiet queue");
    assert!(queue.status().await.unwrap().pause.is_none(), "left paused");
    assert_eq!(slow.await.unwrap().status, StatusCode::OK);

    // A queue someone else paused is not taken over (nor resumed) by a window.
    queue.pause("operator", None, false).await.unwrap();
    let out = anteroom(args(&redis, "busy", &["window", "--", "true"])).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("already paused"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(
        queue.status().await.unwrap().pause.unwrap().record.by,
        "operator"
    );
    queue.resume().await.unwrap();
    d.stop().await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_the_known_state() {
    let redis = start_redis();
    let proxy = TestProxy::start(&redis, "known").await;
    let blue = TestDispatcher::start_built(
        dispatcher_builder(&redis, "known")
            .label("blue")
            .concurrency(3)
            .build()
            .unwrap(),
        test_app(),
    );
    let green = TestDispatcher::start_built(
        dispatcher_builder(&redis, "known")
            .label("green")
            .build()
            .unwrap(),
        test_app(),
    );
    let queue = control(&redis, "known").await;
    // Both live before the pause: one that registers after the quiescence
    // check could start pulling before it sees the pause.
    eventually("both dispatchers' heartbeats", READY, || async {
        queue.status().await.unwrap().dispatchers.len() == 2
    })
    .await;
    queue.pause("test", None, false).await.unwrap();
    queue.wait_quiescent(READY, |_| {}).await.unwrap();
    let c = client();
    let mut waiting = Vec::new();
    for _ in 0..4 {
        let (c, url) = (c.clone(), proxy.url("/echo"));
        waiting.push(tokio::spawn(async move { web::get(&c, &url).await }));
    }
    eventually("four requests waiting", READY, || async {
        queue.status().await.unwrap().waiting == 4
    })
    .await;
    tokio::time::sleep(Duration::from_millis(50)).await;

    let out = anteroom(vec![
        "status".into(),
        "--redis".into(),
        redis.url(),
        "--json".into(),
    ])
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report: StatusReport = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report.queues.len(), 1);
    let s = &report.queues[0];
    assert_eq!(s.queue, "known");
    assert_eq!(s.pause.as_ref().unwrap().record.by, "test");
    assert_eq!(s.pause.as_ref().unwrap().expires_in_ms, None);
    assert_eq!(s.waiting, 4);
    assert!(s.oldest_wait_ms.unwrap() >= 50, "{:?}", s.oldest_wait_ms);
    assert_eq!(s.dead_letters, 0);
    let mut labels: Vec<_> = s
        .dispatchers
        .iter()
        .map(|d| d.heartbeat.label.as_str())
        .collect();
    labels.sort();
    assert_eq!(labels, ["blue", "green"]);
    let blue_status = s
        .dispatchers
        .iter()
        .find(|d| d.heartbeat.label == "blue")
        .unwrap();
    assert_eq!(blue_status.heartbeat.id, blue.id);
    assert_eq!(blue_status.heartbeat.concurrency, 3);
    assert!(
        s.dispatchers
            .iter()
            .all(|d| d.held == 0 && d.heartbeat.in_flight == 0)
    );
    assert_eq!(s.proxies.len(), 1);

    // The table says the same.
    let out = anteroom(vec!["status".into(), "--redis".into(), redis.url()]).await;
    let table = text(&out.stdout);
    assert!(table.contains("queue known: PAUSED"), "{table}");
    assert!(table.contains("waiting       4"), "{table}");
    assert!(table.contains("dispatchers   2 live"), "{table}");

    queue.resume().await.unwrap();
    for w in waiting {
        assert_eq!(w.await.unwrap().status, StatusCode::OK);
    }
    blue.stop().await;
    green.stop().await;
    proxy.stop().await;
    // Dispatchers that stopped cleanly leave the registry.
    let s = queue.status().await.unwrap();
    assert!(s.dispatchers.is_empty() && s.orphaned.is_empty(), "{s:?}");
}

async fn admin_call(
    c: &crate::support::web::TestClient,
    method: &str,
    url: &str,
    token: Option<&str>,
) -> crate::support::web::Reply {
    let mut req = Request::builder().method(method).uri(url);
    if let Some(token) = token {
        req = req.header("authorization", format!("Bearer {token}"));
    }
    send(c, req.body(Full::default()).unwrap()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoint_pauses_and_resumes_under_load_and_reports_the_truth() {
    let redis = start_redis();
    let (port, admin_port) = (free_port().unwrap(), free_port().unwrap());
    let listen = format!("127.0.0.1:{port}");
    let admin = format!("http://127.0.0.1:{admin_port}");
    let _proxy = BinProcess::spawn_cmd(
        command()
            .args([
                "proxy",
                "--listen",
                &listen,
                "--redis",
                &redis.url(),
                "--queue",
                "adm",
            ])
            .args(["--admin", &format!("127.0.0.1:{admin_port}")])
            .env("ANTEROOM_ADMIN_TOKEN", "s3cret")
            .stdout(std::process::Stdio::null()),
    );
    let d = TestDispatcher::start(&redis, "adm", test_app());
    let c = client();
    eventually("the admin endpoint", READY, || async move {
        tokio::net::TcpStream::connect(("127.0.0.1", admin_port))
            .await
            .is_ok()
            && tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
    })
    .await;

    // Health needs no token; everything else does.
    assert_eq!(
        admin_call(&c, "GET", &format!("{admin}/healthz"), None)
            .await
            .status,
        StatusCode::OK
    );
    for (method, path) in [("GET", "/status"), ("POST", "/pause"), ("POST", "/resume")] {
        for token in [None, Some("wrong"), Some("s3cret-but-longer")] {
            let r = admin_call(&c, method, &format!("{admin}{path}"), token).await;
            assert_eq!(
                r.status,
                StatusCode::UNAUTHORIZED,
                "{method} {path} with {token:?}"
            );
            assert_eq!(r.headers["www-authenticate"], "Bearer realm=\"anteroom\"");
        }
    }
    let r = admin_call(&c, "GET", &format!("{admin}/pause"), Some("s3cret")).await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    let queue = control(&redis, "adm").await;
    assert!(
        queue.status().await.unwrap().pause.is_none(),
        "a refused call paused the queue"
    );

    // Steady load, paused and resumed through the admin endpoint.
    let running = Arc::new(AtomicBool::new(true));
    let mut load = Vec::new();
    for w in 0..8 {
        let (c, running, url) = (
            c.clone(),
            Arc::clone(&running),
            format!("http://{listen}/echo"),
        );
        load.push(tokio::spawn(async move {
            let mut statuses = Vec::new();
            while running.load(Ordering::Relaxed) {
                let r = web::post(&c, &url, format!("w{w}")).await;
                statuses.push((r.status, r.text() == format!("w{w}")));
            }
            statuses
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = admin_call(&c, "POST", &format!("{admin}/pause"), Some("s3cret")).await;
    assert_eq!(r.status, StatusCode::OK);
    let report: StatusReport = serde_json::from_slice(&r.body).unwrap();
    assert!(
        report.queues[0]
            .pause
            .as_ref()
            .unwrap()
            .record
            .by
            .starts_with("admin@")
    );
    queue.wait_quiescent(READY, |_| {}).await.unwrap();
    eventually("all eight clients to be waiting", READY, || async {
        let r = admin_call(&c, "GET", &format!("{admin}/status"), Some("s3cret")).await;
        let report: StatusReport = serde_json::from_slice(&r.body).unwrap();
        let s = &report.queues[0];
        s.waiting == 8 && s.proxies.iter().map(|p| p.heartbeat.waiting).sum::<usize>() == 8
    })
    .await;
    let r = admin_call(&c, "GET", &format!("{admin}/status"), Some("s3cret")).await;
    let s = &serde_json::from_slice::<StatusReport>(&r.body)
        .unwrap()
        .queues[0];
    assert!(s.pause.is_some());
    assert_eq!(s.dispatchers.len(), 1);
    assert!(s.dispatchers[0].heartbeat.paused && s.dispatchers[0].held == 0);
    // `anteroom status` tells the same story as the admin endpoint.
    let out = anteroom(args(&redis, "adm", &["status", "--json"])).await;
    let cli = &serde_json::from_slice::<StatusReport>(&out.stdout)
        .unwrap()
        .queues[0];
    assert_eq!(cli.waiting, 8);
    assert_eq!(
        cli.pause.as_ref().map(|p| &p.record.id),
        s.pause.as_ref().map(|p| &p.record.id)
    );
    assert!(
        cli.dispatchers
            .iter()
            .all(|d| d.heartbeat.paused && d.held == 0)
    );
    // Health is answered by the proxy itself while paused.
    assert_eq!(
        admin_call(&c, "GET", &format!("{admin}/healthz"), None)
            .await
            .status,
        StatusCode::OK
    );

    let r = admin_call(&c, "POST", &format!("{admin}/resume"), Some("s3cret")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(
        serde_json::from_slice::<StatusReport>(&r.body)
            .unwrap()
            .queues[0]
            .pause
            .is_none()
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    running.store(false, Ordering::Relaxed);
    let mut total = 0;
    for l in load {
        for (status, intact) in l.await.unwrap() {
            total += 1;
            assert_eq!(status, StatusCode::OK);
            assert!(intact);
        }
    }
    println!("admin pause/resume under load: {total} requests, all 200");
    assert!(total > 16);
    d.stop().await;
}

/// Runs `anteroom ARGS` under a pseudo-terminal (`script`), as an operator
/// would; returns what the terminal showed.
async fn on_a_terminal(args: &[&str]) -> String {
    let cmdline = std::iter::once(env!("CARGO_BIN_EXE_anteroom"))
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ");
    let out = tokio::process::Command::new("script")
        .args(["-qec", &cmdline, "/dev/null"])
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .expect("script (util-linux) runs commands under a pseudo-terminal");
    assert!(out.status.success(), "{args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).replace('\r', "")
}

/// Sends a request that takes `ms` and waits until the (one) dispatcher
/// holds it; the task answers its status.
async fn hold_a_slow_request(
    c: &TestClient,
    proxy: &TestProxy,
    queue: &Queue,
    ms: u64,
) -> tokio::task::JoinHandle<StatusCode> {
    let slow = tokio::spawn({
        let (c, url) = (c.clone(), proxy.url(&format!("/slow?ms={ms}")));
        async move { web::get(&c, &url).await.status }
    });
    eventually(
        "the slow request to be held",
        Duration::from_secs(10),
        || async {
            queue
                .status()
                .await
                .unwrap()
                .dispatchers
                .first()
                .is_some_and(|d| d.held == 1)
        },
    )
    .await;
    slow
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_wait_shows_busy_dispatchers_on_a_terminal_only() {
    let redis = start_redis();
    let proxy = TestProxy::start(&redis, "tty").await;
    let dispatcher = TestDispatcher::start(&redis, "tty", test_app());
    let queue = control(&redis, "tty").await;
    let url = redis.url();
    let c = client();
    // Each round: a slow request in flight, then `pause --wait` as given.
    let mut seen = Vec::new();
    for quiet in [false, true] {
        let slow = hold_a_slow_request(&c, &proxy, &queue, 1500).await;
        let mut args = vec!["pause", "--wait", "--redis", &url, "--queue", "tty"];
        if quiet {
            args.push("--quiet");
        }
        seen.push(on_a_terminal(&args).await);
        assert_eq!(slow.await.unwrap(), StatusCode::OK);
        queue.resume().await.unwrap();
    }
    let (shown, quiet) = (&seen[0], &seen[1]);
    assert!(shown.contains("waiting for 1 dispatcher(s)"), "{shown}");
    assert!(shown.contains("1 in flight, 1 held"), "{shown}");
    assert!(shown.contains("is quiet"), "{shown}");
    assert!(
        !quiet.contains("waiting for"),
        "--quiet still showed:\n{quiet}"
    );
    assert!(quiet.contains("is quiet"), "{quiet}");

    // Not a terminal: no progress either.
    let slow = hold_a_slow_request(&c, &proxy, &queue, 1000).await;
    let out = command()
        .args(["pause", "--wait", "--redis", &url, "--queue", "tty"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("waiting for"),
        "progress on a pipe:\n{stderr}"
    );
    assert_eq!(slow.await.unwrap(), StatusCode::OK);
    queue.resume().await.unwrap();
    dispatcher.stop().await;
    proxy.stop().await;
}

/// `status` tells the requests whose clients already got 504 from the live
/// ones, shows the hold budget and each process's pid, and says who will
/// settle what a dead dispatcher left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_counts_expired_requests_apart_and_says_what_to_do() {
    let redis = start_redis();
    let short = TestProxy::start_with(&redis, "exp", |c| c.hold = Duration::from_millis(300)).await;
    // Expired requests of both envelope versions: the count reads the
    // deadline of each (docs/protocol.md, "Request envelopes, version 2").
    let short_v1 = TestProxy::start_with(&redis, "exp", |c| {
        c.hold = Duration::from_millis(300);
        c.envelope_version = anteroom_protocol::EnvelopeVersion::V1;
    })
    .await;
    let long = TestProxy::start_with(&redis, "exp", |c| {
        c.hold = Duration::from_secs(30);
        c.proxy_id = Some("long".into());
    })
    .await;
    let queue = control(&redis, "exp").await;
    queue.pause("test", None, false).await.unwrap();
    let c = client();
    for proxy in [&short, &short_v1, &short] {
        assert_eq!(
            web::get(&c, &proxy.url("/echo")).await.status,
            StatusCode::GATEWAY_TIMEOUT
        );
    }
    let live: Vec<_> = (0..2)
        .map(|_| {
            let (c, url) = (c.clone(), long.url("/echo"));
            tokio::spawn(async move { web::get(&c, &url).await })
        })
        .collect();
    eventually("five requests waiting", READY, || async {
        queue.status().await.unwrap().waiting == 5
    })
    .await;
    // A dispatcher that died holding a request: registered, no heartbeat.
    let keys = anteroom_protocol::Keys::new("exp").unwrap();
    let mut conn = crate::support::redis_conn(&redis).await;
    redis::pipe()
        .cmd("ZADD")
        .arg(keys.dispatchers())
        .arg(1)
        .arg("deadbeef0000")
        .cmd("RPUSH")
        .arg(keys.processing("deadbeef0000"))
        .arg("x")
        .query_async::<()>(&mut conn)
        .await
        .unwrap();

    let s = queue.status().await.unwrap();
    assert_eq!((s.waiting, s.expired, s.expired_capped), (5, 3, false));
    let out = anteroom(args(&redis, "exp", &["status"])).await;
    let table = text(&out.stdout);
    assert!(
        table.contains("waiting       5 (3 past their hold budget"),
        "{table}"
    );
    assert!(table.contains("hold budget   30.0s"), "{table}");
    assert!(
        table.contains(&format!("  {}  ", std::process::id())),
        "no pid column:\n{table}"
    );
    assert!(
        table.contains("1 request(s) left in its processing list: no live dispatcher will reap them; run `anteroom reap`"),
        "{table}"
    );
    queue.resume().await.unwrap();
    let d = TestDispatcher::start(&redis, "exp", test_app());
    for w in live {
        assert_eq!(w.await.unwrap().status, StatusCode::OK);
    }
    d.stop().await;
    short.stop().await;
    short_v1.stop().await;
    long.stop().await;
}

/// A Redis that needs a password, given none: every command stops at once
/// naming the Redis and NOAUTH, instead of a proxy that says "ready" and
/// then answers 503 while its reader retries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_redis_password_stops_every_command_at_once() {
    let redis =
        anteroom_testkit::LocalRedis::start_with_args(&["--requirepass", "s3cret"]).unwrap();
    let url = format!("redis://127.0.0.1:{}", redis.port());
    let port = free_port().unwrap();
    for cmd in [
        vec![
            "proxy".to_owned(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
        ],
        vec![
            "dispatch".into(),
            "--upstream".into(),
            "http://127.0.0.1:9".into(),
        ],
        vec!["status".into()],
        vec!["pause".into(), "--queue".into(), "web".into()],
    ] {
        let mut cmd = cmd.clone();
        cmd.extend(["--redis".into(), url.clone()]);
        let started = Instant::now();
        let out = anteroom(cmd.clone()).await;
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{cmd:?}: {stderr}");
        assert!(
            stderr.contains(&url) && stderr.contains("NOAUTH"),
            "{cmd:?}: {stderr}"
        );
        assert!(started.elapsed() < Duration::from_secs(10), "{cmd:?}");
    }
}

/// `pause` during a window does not silently join the window's lease (and
/// vanish when the window resumes): it refuses and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_during_a_window_refuses_instead_of_vanishing_with_it() {
    let redis = start_redis();
    let proxy = TestProxy::start(&redis, "lease").await;
    let d = TestDispatcher::start(&redis, "lease", test_app());
    let queue = control(&redis, "lease").await;
    let mut window = open_window(&redis, "lease", &queue).await;
    let out = anteroom(args(&redis, "lease", &["pause"])).await;
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("already paused by window@") && stderr.contains("would be lifted with it"),
        "{stderr}"
    );
    window.terminate();
    window.wait(READY).await;
    assert!(queue.status().await.unwrap().pause.is_none());
    // A plain pause held by someone else is joined, and says so.
    queue.pause("operator", None, false).await.unwrap();
    let out = anteroom(args(&redis, "lease", &["pause"])).await;
    assert!(out.status.success());
    assert!(
        text(&out.stdout).contains("was already paused by operator"),
        "{}",
        text(&out.stdout)
    );
    queue.resume().await.unwrap();
    d.stop().await;
    proxy.stop().await;
}
