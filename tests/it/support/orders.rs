//! The order-taking app (tests/apps/orders_app.py) as a real process, and
//! the `anteroom` proxy and dispatcher processes in front of it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anteroom_testkit::{LocalRedis, free_port};

use super::bin::BinProcess;
use super::wait_for_port;

/// The order-taking app as a real process, SIGKILLed when dropped.
pub struct App {
    port: u16,
    data: PathBuf,
    child: Option<Child>,
}

impl App {
    /// An app on a free port keeping its records in a fresh directory; not
    /// started.
    pub fn new() -> Self {
        let port = free_port().unwrap();
        let data =
            std::env::temp_dir().join(format!("anteroom-orders-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&data);
        std::fs::create_dir_all(&data).unwrap();
        Self {
            port,
            data,
            child: None,
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Starts the app (answering its health path 503 for `warmup`) and
    /// waits until it accepts connections.
    pub async fn start(&mut self, warmup: Duration) {
        assert!(self.child.is_none(), "already running");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/apps/orders_app.py");
        let child = Command::new(super::venv::bin("python"))
            .arg(script)
            .arg(self.port.to_string())
            .arg(&self.data)
            .arg("--warmup")
            .arg(warmup.as_secs_f64().to_string())
            .stdin(Stdio::null())
            .spawn()
            .expect("the project's Python runs the test app");
        self.child = Some(child);
        wait_for_port(self.port).await;
    }

    /// SIGTERM, as `systemctl stop` or a container runtime does, and waits
    /// for it to exit.
    pub fn terminate(&mut self) {
        if let Some(mut child) = self.child.take() {
            let status = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status()
                .unwrap();
            assert!(status.success());
            child.wait().unwrap();
        }
    }

    /// SIGKILL, as a crash or an impatient supervisor does.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// Every order the app carried out, in order, as it recorded them.
    pub fn orders(&self) -> Vec<String> {
        read_lines(&self.data.join("orders.log"))
    }

    /// Every POST that reached the app, repeats included, in order.
    pub fn arrivals(&self) -> Vec<String> {
        read_lines(&self.data.join("arrivals.log"))
    }

    /// Requests that reached the app while it was still warming up.
    pub fn early_requests(&self) -> Vec<String> {
        read_lines(&self.data.join("early.log"))
    }
}

impl Drop for App {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.data);
    }
}

fn read_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .map(|text| text.lines().map(str::to_owned).collect())
        .unwrap_or_default()
}

/// `anteroom dispatch --upstream APP` with `extra` flags.
pub fn start_dispatcher(redis: &LocalRedis, queue: &str, app: &App, extra: &[&str]) -> BinProcess {
    let mut args = vec![
        "dispatch".to_owned(),
        "--redis".to_owned(),
        redis.url(),
        "--queue".to_owned(),
        queue.to_owned(),
        "--upstream".to_owned(),
        app.url(),
        "--concurrency".to_owned(),
        "8".to_owned(),
    ];
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    BinProcess::spawn(&args)
}
