//! The processes under test, each stopped when dropped.

use std::convert::Infallible;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anteroom_testkit::{LocalRedis, free_port};
use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

/// `RUST_LOG` of the Anteroom processes started (`--anteroom-log`).
static ANTEROOM_LOG: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Sets the `RUST_LOG` of every Anteroom process started from now on
/// (the first call wins).
pub(crate) fn set_anteroom_log(filter: &str) {
    let _ = ANTEROOM_LOG.set(filter.to_owned());
}

/// The `RUST_LOG` of an Anteroom process: `--anteroom-log`, or `error`.
pub(crate) fn anteroom_log() -> &'static str {
    ANTEROOM_LOG.get().map_or("error", String::as_str)
}

/// Builds the release `anteroom` binary (a no-op when up to date) and returns its path.
pub(crate) fn build_anteroom() -> anyhow::Result<PathBuf> {
    let status = Command::new(env!("CARGO"))
        .args([
            "build",
            "--release",
            "--quiet",
            "-p",
            "anteroom",
            "--bin",
            "anteroom",
        ])
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
        .status()?;
    if !status.success() {
        bail!("cargo build --release --bin anteroom failed");
    }
    let exe = std::env::current_exe()?;
    let path = exe.with_file_name("anteroom");
    anyhow::ensure!(path.exists(), "{} not found", path.display());
    Ok(path)
}

/// A minimal keep-alive HTTP/1.1 server answering `hello` to everything.
pub(crate) async fn start_upstream() -> anyhow::Result<SocketAddr> {
    start_server(|_, _| http::Response::new(Full::new(Bytes::from_static(b"hello\n")))).await
}

/// A keep-alive HTTP/1.1 server on a free loopback port answering each
/// request with `respond(its target)`; runs until the benchmark exits.
pub(crate) async fn start_server<B>(
    respond: fn(&http::Uri, u64) -> http::Response<B>,
) -> anyhow::Result<SocketAddr>
where
    B: hyper::body::Body<Data = Bytes, Error = Infallible> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let (parts, mut body) = req.into_parts();
                    async move {
                        // The request body is read (and counted) first.
                        let mut received = 0u64;
                        while let Some(Ok(frame)) = body.frame().await {
                            received += frame.data_ref().map_or(0, |d| d.len() as u64);
                        }
                        Ok::<_, Infallible>(respond(&parts.uri, received))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(addr)
}

/// Resident memory of process `pid`, KiB (`VmRSS`).
pub(crate) fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS")
}

/// The fields of `/proc/<pid>/stat` after the command name (which may hold
/// spaces), from field 3 (`state`) on (proc(5)).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    Some(after.split_whitespace().map(str::to_owned).collect())
}

/// The direct children of process `pid` (nginx's and gunicorn's workers).
pub(crate) fn children(pid: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&child| {
            stat_fields(child).and_then(|f| f.get(1)?.parse::<u32>().ok()) == Some(pid)
        })
        .collect()
}

/// CPU time (user and system) used so far by process `pid` and its direct
/// children, in microseconds (`utime` and `stime` of proc(5), in clock
/// ticks of `getconf CLK_TCK`). 0 for a process that is gone.
pub(crate) fn cpu_micros(pid: u32) -> u64 {
    std::iter::once(pid)
        .chain(children(pid))
        .map(own_cpu_micros)
        .sum()
}

/// CPU time used so far by process `pid` alone (all its threads, none of
/// its children), in microseconds; 0 for a process that is gone.
pub(crate) fn own_cpu_micros(pid: u32) -> u64 {
    static TICK_MICROS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let tick = *TICK_MICROS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|out| {
                String::from_utf8(out.stdout)
                    .ok()?
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .filter(|&hz| hz > 0)
            .map_or(10_000, |hz| 1_000_000 / hz)
    });
    stat_fields(pid).map_or(0, |f| {
        // utime and stime are fields 14 and 15; f[0] is field 3.
        let field = |n: usize| {
            f.get(n - 3)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        (field(14) + field(15)) * tick
    })
}

/// A child process killed on drop.
pub(crate) struct Proc(Child);

impl Proc {
    pub(crate) fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Proc {
    /// SIGTERM first, so that a process can stop what it started (nginx's
    /// master takes its workers down; SIGKILL would orphan them), then
    /// SIGKILL after 5 s.
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = Command::new("kill")
                .args(["-TERM", &self.0.id().to_string()])
                .status();
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(5) {
                if let Ok(Some(_)) = self.0.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn spawn(cmd: &mut Command) -> anyhow::Result<Proc> {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    Ok(Proc(child))
}

/// Waits until `GET path` on `port` answers 200.
pub(crate) fn wait_ready(port: u16, path: &str) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            let mut buf = [0u8; 12];
            if s.write_all(req.as_bytes()).is_ok()
                && s.read_exact(&mut buf).is_ok()
                && buf.ends_with(b"200")
            {
                return Ok(());
            }
        }
        if start.elapsed() > Duration::from_secs(20) {
            bail!("nothing answers 200 on port {port}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// nginx reverse-proxying to the upstream with keep-alive connections.
pub(crate) struct Nginx {
    _proc: Proc,
    port: u16,
    dir: PathBuf,
}

/// What keeps nginx's upstream connections alive: no `Connection: close`
/// passed on.
const KEEPALIVE: &str = "proxy_set_header Connection \"\";\n      ";

impl Nginx {
    pub(crate) fn start(upstream: SocketAddr) -> anyhow::Result<Self> {
        Self::start_with(upstream, KEEPALIVE)
    }

    /// nginx for streams: responses and request bodies passed on as they
    /// arrive (`proxy_buffering off`, as one configures it for SSE and
    /// large downloads; `proxy_request_buffering off` and no body size
    /// limit for uploads), read timeouts long enough for them.
    pub(crate) fn start_streaming(upstream: SocketAddr) -> anyhow::Result<Self> {
        Self::start_with(
            upstream,
            &format!(
                "{KEEPALIVE}proxy_buffering off;\n      proxy_request_buffering off;\n      client_max_body_size 0;\n      proxy_read_timeout 300s;\n      "
            ),
        )
    }

    /// nginx proxying WebSockets, as its documentation configures it
    /// (`Upgrade` and `Connection: upgrade` passed on, HTTP/1.1 to the
    /// upstream, an hour's read timeout).
    pub(crate) fn start_websocket(upstream: SocketAddr) -> anyhow::Result<Self> {
        Self::start_with(
            upstream,
            "proxy_set_header Upgrade $http_upgrade;\n      proxy_set_header Connection $connection_upgrade;\n      proxy_read_timeout 3600s;\n      ",
        )
    }

    /// The pid of nginx's master process (its workers are its children).
    pub(crate) fn pid(&self) -> u32 {
        self._proc.pid()
    }

    fn start_with(upstream: SocketAddr, location: &str) -> anyhow::Result<Self> {
        let port = free_port()?;
        let dir = std::env::temp_dir().join(format!("anteroom-bench-nginx-{port}"));
        std::fs::create_dir_all(&dir)?;
        let conf = dir.join("nginx.conf");
        std::fs::write(&conf, nginx_conf(&dir, port, upstream, location))?;
        let proc = spawn(
            Command::new(crate::tools::find("nginx").unwrap_or_else(|| "nginx".into()))
                .arg("-c")
                .arg(&conf)
                .arg("-p")
                .arg(&dir),
        )
        .context("nginx (install: sudo apt-get install nginx-light)")?;
        wait_ready(port, "/hello")?;
        Ok(Self {
            _proc: proc,
            port,
            dir,
        })
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn nginx_conf(dir: &Path, port: u16, upstream: SocketAddr, location: &str) -> String {
    let d = dir.display();
    format!(
        "daemon off;\nworker_processes auto;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
         worker_rlimit_nofile 20000;\nevents {{ worker_connections 16384; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
           fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
           map $http_upgrade $connection_upgrade {{ default upgrade; '' ''; }}\n\
           upstream app {{ server {upstream}; keepalive 128; }}\n\
           server {{\n    listen 127.0.0.1:{port};\n    location / {{\n      proxy_pass http://app;\n\
               proxy_http_version 1.1;\n      {location}}}\n  }}\n}}\n"
    )
}

/// `anteroom proxy` for `queue`, listening on `port` of 127.0.0.1.
pub(crate) fn spawn_proxy(
    anteroom: &Path,
    redis: &LocalRedis,
    queue: &str,
    port: u16,
) -> anyhow::Result<Proc> {
    spawn(
        Command::new(anteroom)
            .args(["proxy", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--redis", &redis.url(), "--queue", queue])
            .env("RUST_LOG", anteroom_log()),
    )
}

/// `anteroom dispatch` forwarding `queue` to `upstream`, concurrency 64.
pub(crate) fn spawn_dispatcher(
    anteroom: &Path,
    redis: &LocalRedis,
    queue: &str,
    upstream: SocketAddr,
) -> anyhow::Result<Proc> {
    spawn_dispatcher_with(anteroom, redis, queue, upstream, 64)
}

/// [`spawn_dispatcher`] with `concurrency` (a stream holds its slot while
/// it lasts).
pub(crate) fn spawn_dispatcher_with(
    anteroom: &Path,
    redis: &LocalRedis,
    queue: &str,
    upstream: SocketAddr,
    concurrency: usize,
) -> anyhow::Result<Proc> {
    spawn(
        Command::new(anteroom)
            .args(["dispatch", "--redis", &redis.url(), "--queue", queue])
            .args([
                "--upstream",
                &format!("http://{upstream}"),
                "--concurrency",
                &concurrency.to_string(),
            ])
            .env("RUST_LOG", anteroom_log()),
    )
}

/// `anteroom demo`: proxy, dispatcher and an in-process handler, one process.
pub(crate) struct InProcess {
    _proc: Proc,
    port: u16,
}

impl InProcess {
    pub(crate) fn start(anteroom: &Path, redis: &LocalRedis) -> anyhow::Result<Self> {
        Self::start_on(anteroom, redis, "bench-inproc")
    }

    /// Like [`start`](Self::start), on `queue`.
    pub(crate) fn start_on(
        anteroom: &Path,
        redis: &LocalRedis,
        queue: &str,
    ) -> anyhow::Result<Self> {
        let port = free_port()?;
        let proc = spawn(
            Command::new(anteroom)
                .args(["demo", "--listen", &format!("127.0.0.1:{port}")])
                .args(["--redis", &redis.url(), "--queue", queue])
                .env("RUST_LOG", anteroom_log()),
        )?;
        wait_ready(port, "/hello")?;
        Ok(Self { _proc: proc, port })
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// The process's pid.
    pub(crate) fn pid(&self) -> u32 {
        self._proc.pid()
    }
}

/// `anteroom proxy` and `anteroom dispatch --upstream`: two processes.
pub(crate) struct Forwarding {
    _proxy: Proc,
    _dispatcher: Proc,
    port: u16,
}

impl Forwarding {
    pub(crate) fn start(
        anteroom: &Path,
        redis: &LocalRedis,
        upstream: SocketAddr,
    ) -> anyhow::Result<Self> {
        Self::start_with(anteroom, redis, upstream, "bench-fwd", 64)
    }

    /// Like [`start`](Self::start), on `queue`, the dispatcher with
    /// `concurrency`.
    pub(crate) fn start_with(
        anteroom: &Path,
        redis: &LocalRedis,
        upstream: SocketAddr,
        queue: &str,
        concurrency: usize,
    ) -> anyhow::Result<Self> {
        let port = free_port()?;
        let proxy = spawn_proxy(anteroom, redis, queue, port)?;
        let dispatcher = spawn_dispatcher_with(anteroom, redis, queue, upstream, concurrency)?;
        wait_ready(port, "/hello")?;
        Ok(Self {
            _proxy: proxy,
            _dispatcher: dispatcher,
            port,
        })
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// The proxy's and the dispatcher's pids.
    pub(crate) fn pids(&self) -> (u32, u32) {
        (self._proxy.pid(), self._dispatcher.pid())
    }
}
