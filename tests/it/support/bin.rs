//! The `anteroom` binary as a real child process, killed when dropped.

use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anteroom_testkit::{LocalRedis, free_port};

pub struct BinProcess {
    child: Child,
}

pub fn command() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_anteroom"));
    cmd.env("RUST_LOG", "warn")
        .env_remove("ANTEROOM_REDIS")
        .env_remove("ANTEROOM_QUEUE")
        .stdin(Stdio::null());
    cmd
}

impl BinProcess {
    pub fn spawn(args: &[&str]) -> Self {
        Self::spawn_cmd(command().args(args).stdout(Stdio::null()))
    }

    pub fn spawn_cmd(cmd: &mut Command) -> Self {
        Self {
            child: cmd.spawn().expect("spawn anteroom"),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Sends SIGTERM (through `kill`, to keep `unsafe` out of the tests).
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
    }

    /// Waits for the process to exit, at most `timeout`.
    pub async fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                start.elapsed() < timeout,
                "process did not exit within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for BinProcess {
    /// SIGTERM first, so the process can stop what it started (the demo's
    /// private redis-server); SIGKILL if it has not exited within 5 s.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = Command::new("kill")
                .args(["-TERM", &self.pid().to_string()])
                .status();
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(5) {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `anteroom proxy` for `queue` on a free port, ready when it accepts
/// connections; returns it and its base URL (`http://127.0.0.1:PORT`).
pub async fn start_proxy(redis: &LocalRedis, queue: &str, hold: &str) -> (BinProcess, String) {
    start_proxy_on(&redis.url(), queue, hold, &[]).await
}

/// [`start_proxy`] reaching Redis at `redis_url` (e.g. through a test
/// relay), with `extra` arguments.
pub async fn start_proxy_on(
    redis_url: &str,
    queue: &str,
    hold: &str,
    extra: &[&str],
) -> (BinProcess, String) {
    let port = free_port().unwrap();
    let listen = format!("127.0.0.1:{port}");
    let mut args = vec![
        "proxy", "--listen", &listen, "--redis", redis_url, "--queue", queue, "--hold", hold,
    ];
    args.extend_from_slice(extra);
    let proxy = BinProcess::spawn(&args);
    super::wait_for_port(port).await;
    (proxy, format!("http://{listen}"))
}
