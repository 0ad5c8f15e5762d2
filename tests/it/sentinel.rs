//! Redis Sentinel: a real primary, a replica and three sentinels on
//! loopback. The primary is killed under load; the service resumes on the
//! promoted replica. Prints how many requests failed.

use std::time::{Duration, Instant};

use anteroom_testkit::free_port;
use anteroom_testkit::sentinel::{LocalSentinel, primary_port_at};
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;

use crate::support::app::Upstream;
use crate::support::bin::BinProcess;
use crate::support::eventually;
use crate::support::load::Load;
use crate::support::web::{self, client};

const READY: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_killed_under_load_service_resumes_on_the_replica() {
    let mut sentinel = tokio::task::spawn_blocking(LocalSentinel::start)
        .await
        .unwrap();
    let url = sentinel.url();
    let replica_port = sentinel.replica.port();
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
    sentinel.primary.kill();
    let killed = Instant::now();
    let promoted_after = tokio::spawn({
        let first = sentinel.sentinel_ports()[0];
        async move {
            while primary_port_at(first) != Some(replica_port) {
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
    let promoted = sentinel.primary_port();
    println!(
        "sentinel failover: replica promoted {promoted_after:?} and service back {resumed_after:?} after the primary died; {} requests, {failed} failed, longest wait {:?}",
        summary.samples.len(),
        summary.longest()
    );
    assert_eq!(
        promoted,
        Some(replica_port),
        "sentinels did not promote the replica"
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
}
