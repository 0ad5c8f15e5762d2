//! Redis Sentinel on loopback: a primary, a replica and three sentinels
//! monitoring them as `mymaster`, stopped when dropped.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{LocalRedis, free_port};

/// How long the replica and the sentinels get to find each other.
const READY: Duration = Duration::from_secs(30);

/// The name the sentinels monitor the primary under.
pub const MASTER_NAME: &str = "mymaster";

/// A redis-server in sentinel mode, killed on drop.
#[derive(Debug)]
struct Sentinel {
    child: Child,
    port: u16,
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A primary, its replica, and three sentinels (quorum 2, down after 1 s).
#[derive(Debug)]
pub struct LocalSentinel {
    /// The primary at start (kill it to make the sentinels fail over).
    pub primary: LocalRedis,
    /// Its replica, promoted by a failover.
    pub replica: LocalRedis,
    sentinels: Vec<Sentinel>,
    dir: PathBuf,
}

impl Drop for LocalSentinel {
    fn drop(&mut self) {
        self.sentinels.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl LocalSentinel {
    /// Starts everything and waits (at most 30 s) until the replica has
    /// synced and each sentinel knows the other two and the replica.
    /// Panics when it cannot: this is test support.
    pub fn start() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "anteroom-sentinel-{}-{}",
            std::process::id(),
            free_port().unwrap()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let primary = LocalRedis::start().expect("start the primary");
        let p = primary.port();
        let replica = LocalRedis::start_with_args(&["--replicaof", "127.0.0.1", &p.to_string()])
            .expect("start the replica");
        let replica_port = replica.port();
        wait("the replica to sync", || {
            ask(replica_port, "INFO replication").contains("master_link_status:up")
        });
        let sentinels: Vec<Sentinel> = (0..3).map(|_| start_sentinel(&dir, p)).collect();
        wait("the sentinels to know each other and the replica", || {
            sentinels.iter().all(|s| {
                ask(s.port, &format!("SENTINEL sentinels {MASTER_NAME}"))
                    .matches("name")
                    .count()
                    == 2
                    && ask(s.port, &format!("SENTINEL replicas {MASTER_NAME}")).contains("name")
            })
        });
        Self {
            primary,
            replica,
            sentinels,
            dir,
        }
    }

    /// `redis+sentinel://127.0.0.1:A,127.0.0.1:B,127.0.0.1:C/mymaster`.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .sentinel_ports()
            .iter()
            .map(|port| format!("127.0.0.1:{port}"))
            .collect();
        format!("redis+sentinel://{}/{MASTER_NAME}", hosts.join(","))
    }

    /// The sentinels' ports.
    pub fn sentinel_ports(&self) -> Vec<u16> {
        self.sentinels.iter().map(|s| s.port).collect()
    }

    /// The sentinels' process ids (they live as long as this value).
    pub fn sentinel_pids(&self) -> Vec<u32> {
        self.sentinels.iter().map(|s| s.child.id()).collect()
    }

    /// The port of the server the first sentinel names as primary now.
    pub fn primary_port(&self) -> Option<u16> {
        primary_port_at(self.sentinels[0].port)
    }
}

/// The port of the server the sentinel on `sentinel_port` names as
/// primary now (`None` while it cannot say).
pub fn primary_port_at(sentinel_port: u16) -> Option<u16> {
    let reply = ask(
        sentinel_port,
        &format!("SENTINEL get-master-addr-by-name {MASTER_NAME}"),
    );
    // An array of two bulk strings: host, then port.
    reply
        .lines()
        .nth(4)
        .and_then(|port| port.trim().parse().ok())
}

fn start_sentinel(dir: &Path, master_port: u16) -> Sentinel {
    let port = free_port().unwrap();
    let conf: PathBuf = dir.join(format!("sentinel-{port}.conf"));
    std::fs::write(
        &conf,
        format!(
            "port {port}\nbind 127.0.0.1\ndaemonize no\n\
             sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} 2\n\
             sentinel down-after-milliseconds {MASTER_NAME} 1000\n\
             sentinel failover-timeout {MASTER_NAME} 10000\n\
             sentinel parallel-syncs {MASTER_NAME} 1\n"
        ),
    )
    .unwrap();
    let child = Command::new("redis-server")
        .arg(&conf)
        .arg("--sentinel")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start redis-server --sentinel");
    Sentinel { child, port }
}

/// Polls `ready` every 50 ms; panics after [`READY`].
fn wait(what: &str, mut ready: impl FnMut() -> bool) {
    let started = Instant::now();
    while !ready() {
        assert!(started.elapsed() < READY, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sends one inline command to 127.0.0.1:`port` and returns the raw RESP
/// reply ("" when nothing answers within 500 ms).
pub fn ask(port: u16, command: &str) -> String {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    let _ = s.write_all(format!("{command}\r\n").as_bytes());
    let mut buf = vec![0u8; 16 * 1024];
    let n = s.read(&mut buf).unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).into_owned()
}
