//! A private `redis-server` on a free loopback port, stopped when dropped.
//! Used by `anteroom demo`, and by the tests and the benchmark through
//! `anteroom-testkit`.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a fresh redis-server gets to answer.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Ports tried before giving up (another process may take a port between
/// [`free_port`] and redis-server's bind).
pub const PORT_ATTEMPTS: u32 = 5;

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
    /// The server exited, or did not answer in time.
    #[error("redis-server on port {port} did not become ready: {reason}")]
    NotReady {
        /// The port it was started on.
        port: u16,
        /// What went wrong.
        reason: String,
    },
    /// Another redis-server answered on the port chosen (taken between the
    /// choice and the bind), [`PORT_ATTEMPTS`] times in a row.
    #[error("redis-server could not get a free port: {port} was taken by another (pid {pid})")]
    PortTaken {
        /// The last port tried.
        port: u16,
        /// The pid of the server that answered there.
        pid: u32,
    },
}

/// A running private redis-server. Killed when dropped.
#[derive(Debug)]
pub struct LocalRedis {
    child: Child,
    port: u16,
    binary: PathBuf,
    extra: Vec<String>,
    /// Its working directory, removed on drop: whatever it writes (the
    /// snapshot a replica's full sync makes, an append-only file) stays
    /// its own, never loaded by the next server started in the same
    /// current directory.
    dir: PathBuf,
}

impl LocalRedis {
    /// Starts `redis-server` (no persistence) on a free 127.0.0.1 port and
    /// waits until it answers as itself (`INFO server` names its pid: a
    /// port another process took between the choice and the bind is
    /// noticed, and another port tried, up to [`PORT_ATTEMPTS`] times).
    pub fn start() -> Result<Self, StartError> {
        Self::start_with_args(&[])
    }

    /// Like [`start`](Self::start), with extra `redis-server` arguments.
    /// Extra arguments come last, so they override the defaults (e.g.
    /// `--appendonly yes` for a server whose data survives a restart).
    pub fn start_with_args(extra: &[&str]) -> Result<Self, StartError> {
        let binary = find_on_path("redis-server").ok_or(StartError::NotInstalled)?;
        let extra: Vec<String> = extra.iter().map(|s| (*s).to_owned()).collect();
        let mut attempt = 1;
        loop {
            let port = free_port().map_err(StartError::Spawn)?;
            let dir = std::env::temp_dir().join(format!(
                "anteroom-redis-{}-{port}-{attempt}",
                std::process::id()
            ));
            std::fs::create_dir_all(&dir).map_err(StartError::Spawn)?;
            let child = spawn(&binary, port, &dir, &extra)?;
            let mut server = Self {
                child,
                port,
                binary: binary.clone(),
                extra: extra.clone(),
                dir,
            };
            match server.wait_ready() {
                Ok(()) => return Ok(server),
                Err(StartError::PortTaken { .. }) if attempt < PORT_ATTEMPTS => attempt += 1,
                Err(err) => return Err(err),
            }
        }
    }

    /// Kills the server with SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the server again on the same port with the same arguments.
    pub fn start_again(&mut self) -> Result<(), StartError> {
        self.kill();
        self.child = spawn(&self.binary, self.port, &self.dir, &self.extra)?;
        self.wait_ready()
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
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
            match probe(self.port) {
                Ok(Some(pid)) if pid == self.child.id() => return Ok(()),
                Ok(Some(pid)) => {
                    return Err(StartError::PortTaken {
                        port: self.port,
                        pid,
                    });
                }
                // A password hides the pid: it is up, and ours if it is
                // still running a moment later (a failed bind exits at once).
                Ok(None) => {
                    std::thread::sleep(Duration::from_millis(100));
                    if matches!(self.child.try_wait(), Ok(None)) {
                        return Ok(());
                    }
                }
                Err(_) => {}
            }
            if started.elapsed() > READY_TIMEOUT {
                return Err(StartError::NotReady {
                    port: self.port,
                    reason: format!("no answer within {READY_TIMEOUT:?}"),
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
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// In a process group of its own: a Ctrl-C at the terminal goes to the
/// program that started it (which stops it last, once its own parts have
/// stopped using it), not to it directly.
fn spawn(binary: &PathBuf, port: u16, dir: &Path, extra: &[String]) -> Result<Child, StartError> {
    use std::os::unix::process::CommandExt;
    Command::new(binary)
        .process_group(0)
        .args(["--port", &port.to_string()])
        .arg("--dir")
        .arg(dir)
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

/// The pid of the redis-server on `port` (`INFO server`), or `None` when
/// it wants a password first (`NOAUTH`).
fn probe(port: u16) -> std::io::Result<Option<u32>> {
    let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port))?;
    stream.set_read_timeout(Some(Duration::from_millis(500)))?;
    stream.write_all(b"INFO server\r\n")?;
    let mut reply = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Err(std::io::Error::other("closed before answering"));
        }
        reply.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&reply);
        if text.starts_with("-NOAUTH") {
            return Ok(None);
        }
        if text.starts_with('-') {
            return Err(std::io::Error::other(text.trim().to_owned()));
        }
        // The whole `process_id:N\r\n` line, not a read cut inside it.
        let pid = text.split_once("process_id:").and_then(|(_, rest)| {
            let (pid, _) = rest.split_once("\r\n")?;
            pid.parse().ok()
        });
        if let Some(pid) = pid {
            return Ok(Some(pid));
        }
        if reply.len() > 64 * 1024 {
            return Err(std::io::Error::other("INFO reply without process_id"));
        }
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
