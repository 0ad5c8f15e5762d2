//! Upgrading the proxy under load without a failed request: a new proxy
//! binds the same address (SO_REUSEPORT) before the old one gets SIGTERM,
//! or both are started on a socket that outlives them (systemd socket
//! activation, `LISTEN_FDS`). Real `anteroom proxy` processes and real
//! keep-alive clients, which open a new connection when the old proxy
//! closes theirs.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anteroom_testkit::free_port;
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};

use crate::support::app::test_app;
use crate::support::bin::BinProcess;
use crate::support::load::{Load, Summary};
use crate::support::web::{client, get};
use crate::support::{TestDispatcher, start_redis, wait_for_port};

const READY: Duration = Duration::from_secs(20);

/// Mixed traffic on `base`: GETs and POSTs to the echo route.
fn echo_load(base: &str) -> Load {
    let base = base.to_owned();
    Load::start_with(8, move |w, n| {
        let url = format!("{base}/echo/{w}/{n}");
        if n % 2 == 0 {
            Request::get(url).body(Full::default()).unwrap()
        } else {
            Request::post(url)
                .body(Full::new(Bytes::from(format!("{w}-{n}"))))
                .unwrap()
        }
    })
}

/// Every request answered 200 with its own body, none lost to a closed
/// connection.
fn assert_nothing_failed(summary: &Summary) {
    assert_eq!(summary.connection_errors(), 0, "connection errors");
    assert_eq!(
        summary.failed(|s| s == StatusCode::OK),
        0,
        "failed requests"
    );
    for s in &summary.samples {
        assert_eq!(s.body, s.sent, "a reply meant for another request");
    }
}

fn proxy_args<'a>(redis_url: &'a str, listen: &'a str, admin: &'a str) -> Vec<&'a str> {
    vec![
        "proxy", "--listen", listen, "--admin", admin, "--redis", redis_url, "--queue", "up",
        "--hold", "20s",
    ]
}

/// The "upgrade the proxy" playbook of docs/operations.md, as written:
/// examples/deploy/upgrade_proxy.sh starts the new proxy on the old one's
/// address, waits until it is live, and stops the old one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upgrade_proxy_playbook_under_load_fails_nothing() {
    let redis = start_redis();
    let _dispatcher = TestDispatcher::start(&redis, "up", test_app());
    let port = free_port().unwrap();
    let listen = format!("127.0.0.1:{port}");
    // Both proxies serve the admin endpoint on one address too.
    let admin = format!("127.0.0.1:{}", free_port().unwrap());
    let url = redis.url();
    let mut old = BinProcess::spawn(&proxy_args(&url, &listen, &admin));
    wait_for_port(port).await;

    let load = echo_load(&format!("http://{listen}"));
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let started = Instant::now();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/deploy/upgrade_proxy.sh");
    let mut command = tokio::process::Command::new(script);
    command
        .arg(old.pid().to_string())
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_anteroom"))
        .args(proxy_args(&url, &listen, &admin))
        .env("ANTEROOM", env!("CARGO_BIN_EXE_anteroom"))
        .env("ANTEROOM_REDIS", &url)
        .env("ANTEROOM_QUEUE", "up")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null());
    let output = tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .expect("the playbook finishes")
        .unwrap();
    let took = started.elapsed();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let _new = KillOnDrop(stdout.lines().last().unwrap_or_default().to_owned());
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let status = old.wait(Duration::from_secs(5)).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let summary = load.finish().await;

    // The admin endpoint is served throughout.
    let healthz = get(&client(), &format!("http://{admin}/healthz")).await;
    assert_eq!(healthz.status, StatusCode::OK);
    summary.report("proxy upgrade (SO_REUSEPORT)", |s| s == StatusCode::OK);
    println!("the playbook took {took:?}; the old proxy exited with {status}");
    assert!(status.success(), "old proxy: {status}");
    assert_nothing_failed(&summary);
    // The new proxy alone served the last second.
    let after: Vec<_> = summary
        .samples
        .iter()
        .filter(|s| s.started > started + took)
        .collect();
    assert!(
        after.len() > 10,
        "only {} requests after the old proxy left",
        after.len()
    );
}

/// A process the test did not start itself, stopped with SIGTERM when
/// dropped (by pid).
struct KillOnDrop(String);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if !self.0.is_empty() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &self.0])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// `socket_activate.py` driven from a test: the socket it holds and the
/// proxy it runs on it. Stops the proxy when dropped.
struct Activator {
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
    port: u16,
    proxies: Vec<KillOnDrop>,
}

impl Activator {
    async fn start(command: &[&str]) -> Self {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/apps/socket_activate.py");
        let mut child = tokio::process::Command::new(crate::support::venv::bin("python"))
            .arg(script)
            .arg("0")
            .arg("--")
            .arg(env!("CARGO_BIN_EXE_anteroom"))
            .args(command)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("the project's Python runs socket_activate.py");
        let stdin = child.stdin.take().unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = lines.next_line().await.unwrap().unwrap();
        let port = first.strip_prefix("listening ").unwrap().parse().unwrap();
        Self {
            child,
            stdin,
            lines,
            port,
            proxies: Vec::new(),
        }
    }

    /// Sends `command` and returns the answer's argument.
    async fn say(&mut self, command: &str) -> String {
        self.stdin
            .write_all(format!("{command}\n").as_bytes())
            .await
            .unwrap();
        let answer = tokio::time::timeout(READY, self.lines.next_line())
            .await
            .expect("socket_activate.py answers")
            .unwrap()
            .unwrap();
        let (_, argument) = answer.split_once(' ').unwrap();
        argument.to_owned()
    }

    async fn start_proxy(&mut self) {
        let pid = self.say("start").await;
        self.proxies.push(KillOnDrop(pid));
    }

    async fn stop_proxy(&mut self) -> String {
        self.say("stop").await
    }
}

impl Drop for Activator {
    fn drop(&mut self) {
        self.proxies.clear();
        let _ = self.child.start_kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn proxy_restarted_on_a_socket_activation_socket_fails_nothing() {
    let redis = start_redis();
    let _dispatcher = TestDispatcher::start(&redis, "up", test_app());
    let url = redis.url();
    // --listen names a port nobody serves: the proxy must use fd 3.
    let unused = format!("127.0.0.1:{}", free_port().unwrap());
    let admin = format!("127.0.0.1:{}", free_port().unwrap());
    let mut activator = Activator::start(&proxy_args(&url, &unused, &admin)).await;
    let base = format!("http://127.0.0.1:{}", activator.port);
    activator.start_proxy().await;
    // The socket accepts before the proxy runs; ready once it answers.
    let c = client();
    let first = get(&c, &format!("{base}/echo/first")).await;
    assert_eq!(first.status, StatusCode::OK);

    let load = echo_load(&base);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    // `systemctl restart`: stop, then start, the socket open throughout.
    let restarting = Instant::now();
    let stopped = activator.stop_proxy().await;
    let gap = restarting.elapsed();
    activator.start_proxy().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let summary = load.finish().await;

    summary.report("proxy restart (socket activation)", |s| s == StatusCode::OK);
    println!("the old proxy took {gap:?} to stop (exit status {stopped})");
    assert_eq!(stopped, "0", "old proxy's exit status");
    assert_nothing_failed(&summary);
    assert!(
        summary.samples.iter().any(|s| s.started > restarting + gap),
        "nothing served after the restart"
    );
    // Nobody listens on --listen: the proxy never bound it.
    let port: u16 = unused.rsplit_once(':').unwrap().1.parse().unwrap();
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
    );
}
