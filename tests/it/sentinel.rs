//! Redis Sentinel: a real primary, a replica and three sentinels on
//! loopback. The primary is killed under load; the service resumes on the
//! promoted replica. Prints how many requests failed.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anteroom::local_redis::{LocalRedis, free_port};
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;

use crate::support::app::Upstream;
use crate::support::bin::BinProcess;
use crate::support::eventually;
use crate::support::load::Load;
use crate::support::web::{self, client};

const READY: Duration = Duration::from_secs(30);

/// A redis-server in sentinel mode, killed on drop.
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

fn start_sentinel(dir: &Path, master_port: u16) -> Sentinel {
    let port = free_port().unwrap();
    let conf: PathBuf = dir.join(format!("sentinel-{port}.conf"));
    std::fs::write(
        &conf,
        format!(
            "port {port}\nbind 127.0.0.1\ndaemonize no\n\
             sentinel monitor mymaster 127.0.0.1 {master_port} 2\n\
             sentinel down-after-milliseconds mymaster 1000\n\
             sentinel failover-timeout mymaster 10000\n\
             sentinel parallel-syncs mymaster 1\n"
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

/// Sends one inline command and returns the raw reply (tests only).
fn ask(port: u16, command: &str) -> String {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    let _ = s.write_all(format!("{command}\r\n").as_bytes());
    let mut buf = vec![0u8; 16 * 1024];
    let n = s.read(&mut buf).unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_killed_under_load_service_resumes_on_the_replica() {
    let dir = std::env::temp_dir().join(format!("anteroom-sentinel-{}", free_port().unwrap()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut primary = LocalRedis::start().unwrap();
    let p = primary.port();
    let replica =
        LocalRedis::start_with_args(&["--replicaof", "127.0.0.1", &p.to_string()]).unwrap();
    let replica_port = replica.port();
    eventually("the replica to sync", READY, || async move {
        ask(replica_port, "INFO replication").contains("master_link_status:up")
    })
    .await;
    let sentinels: Vec<Sentinel> = (0..3).map(|_| start_sentinel(&dir, p)).collect();
    let ports: Vec<u16> = sentinels.iter().map(|s| s.port).collect();
    eventually(
        "the sentinels to know each other and the replica",
        READY,
        || {
            let ports = ports.clone();
            async move {
                ports.iter().all(|&s| {
                    ask(s, "SENTINEL sentinels mymaster")
                        .matches("name")
                        .count()
                        == 2
                        && ask(s, "SENTINEL replicas mymaster").contains("name")
                })
            }
        },
    )
    .await;

    let url = format!(
        "redis+sentinel://{}/mymaster",
        ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    );
    let upstream = Upstream::start().await;
    let proxy_port = free_port().unwrap();
    let listen = format!("127.0.0.1:{proxy_port}");
    let _proxy = BinProcess::spawn(&[
        "proxy",
        "--listen",
        &listen,
        "--redis",
        &url,
        "--queue",
        "ha",
        "--hold",
        "30s",
        "--durable",
        "--enqueue-timeout",
        "20s",
    ]);
    let _dispatcher = BinProcess::spawn(&[
        "dispatch",
        "--redis",
        &url,
        "--queue",
        "ha",
        "--upstream",
        &upstream.url(),
        "--durable",
    ]);
    let c = client();
    let echo = format!("http://{listen}/echo");
    eventually("the first answer through sentinel", READY, || async {
        tokio::net::TcpStream::connect(("127.0.0.1", proxy_port))
            .await
            .is_ok()
            && web::post(&c, &echo, "hello").await.status == StatusCode::OK
    })
    .await;

    let load = Load::start(8, echo.clone(), |w, n| format!("{w}-{n}"));
    tokio::time::sleep(Duration::from_secs(1)).await;
    primary.kill();
    let killed = Instant::now();
    let promoted_after = tokio::spawn({
        let (s, replica) = (ports[0], replica_port);
        async move {
            while !ask(s, "SENTINEL get-master-addr-by-name mymaster")
                .contains(&replica.to_string())
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            killed.elapsed()
        }
    });
    // Requests keep arriving; the service resumes once the replica is promoted.
    let resumed_after = loop {
        let req = Request::post(&echo)
            .body(Full::new(Bytes::from_static(b"probe")))
            .unwrap();
        let start = Instant::now();
        let r = web::send(&c, req).await;
        if r.status == StatusCode::OK && start.elapsed() < Duration::from_millis(500) {
            break killed.elapsed();
        }
        assert!(
            killed.elapsed() < READY,
            "no service {READY:?} after the primary died"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let summary = load.finish().await;

    let failed = summary.failed(|s| s == StatusCode::OK);
    let promoted_after = promoted_after.await.unwrap();
    let promoted = ask(ports[0], "SENTINEL get-master-addr-by-name mymaster");
    println!(
        "sentinel failover: replica promoted {promoted_after:?} and service back {resumed_after:?} after the primary died; {} requests, {failed} failed, longest wait {:?}",
        summary.samples.len(),
        summary.longest()
    );
    assert!(
        promoted.contains(&replica.port().to_string()),
        "sentinels did not promote the replica: {promoted:?}"
    );
    assert!(
        summary
            .samples
            .iter()
            .filter(|s| s.status == Some(StatusCode::OK))
            .all(|s| s.body == s.sent)
    );
    // With --durable and a hold budget longer than the failover, the target
    // is zero failed requests.
    assert_eq!(failed, 0, "requests failed during the failover");
    drop(sentinels);
    let _ = std::fs::remove_dir_all(&dir);
}
