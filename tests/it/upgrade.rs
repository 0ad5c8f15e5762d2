//! Upgrading the proxy under load without a failed request: a new proxy
//! binds the same address (SO_REUSEPORT) before the old one gets SIGTERM,
//! or both are started on a socket that outlives them (systemd socket
//! activation, `LISTEN_FDS`). Real `anteroom proxy` processes and real
//! keep-alive clients, which open a new connection when the old proxy
//! closes theirs.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anteroom::local_redis::free_port;
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};

use crate::support::app::test_app;
use crate::support::bin::BinProcess;
use crate::support::load::{Load, Summary};
use crate::support::web::{client, get};
use crate::support::{TestDispatcher, control, eventually, start_redis, wait_for_port};

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
    assert_eq!(summary.failed(|s| s == StatusCode::OK), 0, "failed requests");
    for s in &summary.samples {
        assert_eq!(s.body, s.sent, "a reply meant for another request");
    }
}

fn proxy_args<'a>(redis_url: &'a str, listen: &'a str) -> Vec<&'a str> {
    vec![
        "proxy", "--listen", listen, "--redis", redis_url, "--queue", "up", "--hold", "20s",
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn new_proxy_on_the_same_address_then_sigterm_to_the_old_fails_nothing() {
    let redis = start_redis();
    let _dispatcher = TestDispatcher::start(&redis, "up", test_app());
    let port = free_port().unwrap();
    let listen = format!("127.0.0.1:{port}");
    let url = redis.url();
    let mut old = BinProcess::spawn(&proxy_args(&url, &listen));
    wait_for_port(port).await;
    let queue = control(&redis, "up").await;

    let load = echo_load(&format!("http://{listen}"));
    tokio::time::sleep(Duration::from_millis(1000)).await;
    // The new proxy binds the address the old one still serves.
    let _new = BinProcess::spawn(&proxy_args(&url, &listen));
    eventually("both proxies to be up", READY, || async {
        queue.status().await.unwrap().proxies.len() == 2
    })
    .await;
    let stopping = Instant::now();
    old.terminate();
    let status = old.wait(Duration::from_secs(20)).await;
    let old_took = stopping.elapsed();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let summary = load.finish().await;

    summary.report("proxy upgrade (SO_REUSEPORT)", |s| s == StatusCode::OK);
    println!("the old proxy exited {status} after {old_took:?}");
    assert!(status.success(), "old proxy: {status}");
    assert_nothing_failed(&summary);
    // The new proxy alone served the last second.
    let after: Vec<_> = summary
        .samples
        .iter()
        .filter(|s| s.started > stopping + old_took)
        .collect();
    assert!(after.len() > 10, "only {} requests after the old proxy left", after.len());
}

/// `socket_activate.py` driven from a test: the socket it holds and the
/// proxy it runs on it. Stops the proxy when dropped.
struct Activator {
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
    port: u16,
    pids: Vec<String>,
}

impl Activator {
    async fn start(command: &[&str]) -> Self {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/apps/socket_activate.py");
        let mut child = tokio::process::Command::new("python3")
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
            .expect("python3 runs socket_activate.py");
        let stdin = child.stdin.take().unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = lines.next_line().await.unwrap().unwrap();
        let port = first.strip_prefix("listening ").unwrap().parse().unwrap();
        Self {
            child,
            stdin,
            lines,
            port,
            pids: Vec::new(),
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
        self.pids.push(pid);
    }

    async fn stop_proxy(&mut self) -> String {
        self.say("stop").await
    }
}

impl Drop for Activator {
    fn drop(&mut self) {
        for pid in &self.pids {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", pid])
                .stderr(Stdio::null())
                .status();
        }
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
    let mut activator = Activator::start(&proxy_args(&url, &unused)).await;
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

    summary.report("proxy restart (socket activation)", |s| {
        s == StatusCode::OK
    });
    println!("the old proxy took {gap:?} to stop (exit status {stopped})");
    assert_eq!(stopped, "0", "old proxy's exit status");
    assert_nothing_failed(&summary);
    assert!(
        summary.samples.iter().any(|s| s.started > restarting + gap),
        "nothing served after the restart"
    );
    // Nobody listens on --listen: the proxy never bound it.
    let port: u16 = unused.rsplit_once(':').unwrap().1.parse().unwrap();
    assert!(tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err());
}
