//! A private `redis-server` on a free loopback port, stopped when dropped.
//! Used by `anteroom demo`, and by the tests and the benchmark through
//! `anteroom-testkit`.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a fresh redis-server gets to answer PING.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a private redis-server could not be started.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// `redis-server` is not on PATH.
    #[error(
        "redis-server was not found on PATH; install it (Debian/Ubuntu: sudo apt-get install redis-server) or pass --redis URL"
    )]
    NotInstalled,
    /// The process could not be spawned, or no free port was found.
    #[error("cannot start redis-server")]
    Spawn(#[source] std::io::Error),
    /// The server exited or did not answer PING in time.
    #[error("redis-server on port {port} did not become ready: {reason}")]
    NotReady {
        /// The port it was started on.
        port: u16,
        /// What went wrong.
        reason: String,
    },
}

/// A running private redis-server. Killed when dropped.
#[derive(Debug)]
pub struct LocalRedis {
    child: Child,
    port: u16,
    binary: PathBuf,
    extra: Vec<String>,
}

impl LocalRedis {
    /// Starts `redis-server` (no persistence) on a free 127.0.0.1 port and
    /// waits until it answers PING.
    pub fn start() -> Result<Self, StartError> {
        Self::start_with_args(&[])
    }

    /// Like [`start`](Self::start), with extra `redis-server` arguments.
    /// Extra arguments come last, so they override the defaults (e.g.
    /// `--appendonly yes` for a server whose data survives a restart).
    pub fn start_with_args(extra: &[&str]) -> Result<Self, StartError> {
        let binary = find_on_path("redis-server").ok_or(StartError::NotInstalled)?;
        let port = free_port().map_err(StartError::Spawn)?;
        let extra: Vec<String> = extra.iter().map(|s| (*s).to_owned()).collect();
        let child = spawn(&binary, port, &extra)?;
        let mut server = Self {
            child,
            port,
            binary,
            extra,
        };
        server.wait_ready()?;
        Ok(server)
    }

    /// Kills the server with SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the server again on the same port with the same arguments.
    pub fn start_again(&mut self) -> Result<(), StartError> {
        self.kill();
        self.child = spawn(&self.binary, self.port, &self.extra)?;
        self.wait_ready()
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn wait_ready(&mut self) -> Result<(), StartError> {
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(StartError::NotReady {
                    port: self.port,
                    reason: format!("it exited with {status}"),
                });
            }
            if ping(self.port).is_ok() {
                return Ok(());
            }
            if started.elapsed() > READY_TIMEOUT {
                return Err(StartError::NotReady {
                    port: self.port,
                    reason: format!("no PONG within {READY_TIMEOUT:?}"),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for LocalRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(binary: &PathBuf, port: u16, extra: &[String]) -> Result<Child, StartError> {
    Command::new(binary)
        .args(["--port", &port.to_string()])
        .args(["--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .args(["--daemonize", "no", "--protected-mode", "yes"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(StartError::Spawn)
}

fn ping(port: u16) -> std::io::Result<()> {
    let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port))?;
    stream.set_read_timeout(Some(Duration::from_millis(500)))?;
    stream.write_all(b"PING\r\n")?;
    let mut buf = [0u8; 7];
    stream.read_exact(&mut buf)?;
    // A server with a password answers NOAUTH: it is up all the same.
    if &buf == b"+PONG\r\n" || buf.starts_with(b"-NOAUTH") {
        Ok(())
    } else {
        Err(std::io::Error::other("unexpected PING reply"))
    }
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}
