//! A real reverse-proxy stack, as a user runs it: httpbin under gunicorn
//! (from the project's virtual environment), the `anteroom` binary as the
//! proxy and as a dispatcher forwarding to it, and a private redis-server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use anteroom_testkit::{LocalRedis, free_port};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::bin::{self, BinProcess};
use super::{start_redis, venv, wait_for_port};

pub struct HttpbinStack {
    pub queue: String,
    /// The app itself, without Anteroom: `http://127.0.0.1:PORT`.
    pub direct: String,
    /// The proxy: `http://127.0.0.1:PORT`.
    pub url: String,
    pub proxy_addr: SocketAddr,
    pub app_addr: SocketAddr,
    /// The proxy's admin endpoint: `http://127.0.0.1:PORT`.
    pub admin: String,
    log: PathBuf,
    // Dropped in this order: the proxy first, the app last.
    _proxy: BinProcess,
    _dispatcher: BinProcess,
    _gunicorn: BinProcess,
    pub redis: LocalRedis,
}

impl HttpbinStack {
    /// Starts the stack; `proxy_args` are added to `anteroom proxy`'s.
    /// Returns once the proxy and the app accept connections (requests
    /// wait in the queue for the dispatcher).
    pub async fn start(queue: &str, proxy_args: &[&str]) -> Self {
        let redis = start_redis();
        let app_port = free_port().unwrap();
        let gunicorn = BinProcess::spawn_cmd(
            Command::new(venv::bin("gunicorn"))
                .args(["--bind", &format!("127.0.0.1:{app_port}")])
                .args(["--workers", "2", "--log-level", "warning", "httpbin:app"])
                .stdin(Stdio::null())
                .stdout(Stdio::null()),
        );
        let direct = format!("http://127.0.0.1:{app_port}");
        let dispatcher = BinProcess::spawn(&[
            "dispatch",
            "--redis",
            &redis.url(),
            "--queue",
            queue,
            "--upstream",
            &direct,
        ]);
        let port = free_port().unwrap();
        let admin_port = free_port().unwrap();
        let log =
            std::env::temp_dir().join(format!("anteroom-proxy-{}-{port}.log", std::process::id()));
        let listen = format!("127.0.0.1:{port}");
        let admin_listen = format!("127.0.0.1:{admin_port}");
        let proxy = BinProcess::spawn_cmd(
            bin::command()
                .args(["proxy", "--listen", &listen, "--admin", &admin_listen])
                .args(["--redis", &redis.url(), "--queue", queue])
                .args(proxy_args)
                .env("RUST_LOG", "info")
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap()),
        );
        wait_for_port(port).await;
        wait_for_port(admin_port).await;
        wait_for_port(app_port).await;
        Self {
            redis,
            queue: queue.to_owned(),
            direct,
            url: format!("http://{listen}"),
            proxy_addr: listen.parse().unwrap(),
            app_addr: format!("127.0.0.1:{app_port}").parse().unwrap(),
            admin: format!("http://{admin_listen}"),
            log,
            _proxy: proxy,
            _dispatcher: dispatcher,
            _gunicorn: gunicorn,
        }
    }

    /// What the proxy has logged so far (at INFO).
    pub fn proxy_log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The proxy's Prometheus exposition.
    pub async fn metrics(&self) -> String {
        let c = super::web::client();
        super::web::get(&c, &format!("{}/metrics", self.admin))
            .await
            .text()
    }

    /// The value of the sample `series` (e.g.
    /// `anteroom_proxy_refused_total{reason="target"}`), 0 when absent.
    pub async fn metric(&self, series: &str) -> f64 {
        self.metrics()
            .await
            .lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or(0.0)
    }
}

impl Drop for HttpbinStack {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.log);
    }
}

/// Writes `request` on a fresh connection to `addr` and reads until the
/// server closes it (at most 10 s); returns what was read.
pub async fn raw(addr: SocketAddr, request: &[u8]) -> String {
    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    // The server may answer and close before reading everything.
    let _ = socket.write_all(request).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), socket.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

/// The status code of a raw HTTP/1.x answer (0 when there is none).
pub fn status_of(answer: &str) -> u16 {
    answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// Runs `tests/apps/clients.py ARGS` with the project's Python and returns
/// the JSON object it prints.
pub async fn python_client(args: &[&str]) -> serde_json::Value {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/apps/clients.py");
    let out = tokio::process::Command::new(venv::bin("python"))
        .arg(script)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .expect("run clients.py");
    assert!(out.status.success(), "clients.py failed: {out:?}");
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("clients.py printed {:?}: {e}", out.stdout))
}
