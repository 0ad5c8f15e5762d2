//! Redis Cluster: three primaries and three replicas on loopback, three
//! queues on three shards, two proxies and a dispatcher per queue, all
//! through `redis+cluster://`. Then a primary is killed under load.

use std::time::{Duration, Instant};

use anteroom_testkit::free_port;
use http::StatusCode;

use crate::support::app::Upstream;
use crate::support::bin::BinProcess;
use crate::support::load::Load;
use crate::support::web::{self, client};
use crate::support::{config_file, wait_for_port};
use anteroom_testkit::cluster::{LocalCluster, queues_on_three_shards};

/// A configuration file routing `/echo/<queue>/` to each queue.
fn routes_file(url: &str, queues: &[String]) -> crate::support::TempFile {
    let mut text = format!(
        "redis = \"{url}\"\nqueue = \"{}\"\n[proxy]\ndefault_queue = false\n",
        queues[0]
    );
    for q in queues {
        text.push_str(&format!(
            "[[proxy.routes]]\npath_prefix = \"/echo/{q}/\"\nqueue = \"{q}\"\n"
        ));
    }
    config_file(&text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queues_on_three_shards_survive_a_primary_failover() {
    let cluster = LocalCluster::start();
    let url = cluster.url();
    let queues = queues_on_three_shards();
    let upstream = Upstream::start().await;
    let config = routes_file(&url, &queues);
    let config = config.to_str().unwrap();
    let ports = [free_port().unwrap(), free_port().unwrap()];
    let _proxies: Vec<BinProcess> = ports
        .iter()
        .map(|port| {
            BinProcess::spawn(&[
                "proxy",
                "--config",
                config,
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--hold",
                "20s",
                // As for Sentinel (docs/operations.md): a push cut off by the
                // failover is retried, at most once run thanks to `dedupe`.
                "--enqueue-timeout",
                "10s",
            ])
        })
        .collect();
    let _dispatchers: Vec<BinProcess> = queues
        .iter()
        .map(|q| {
            BinProcess::spawn(&[
                "dispatch",
                "--redis",
                &url,
                "--queue",
                q,
                "--upstream",
                &upstream.url(),
            ])
        })
        .collect();
    for port in ports {
        wait_for_port(port).await;
    }

    // Every queue, through both proxies.
    let c = client();
    for (i, q) in queues.iter().enumerate() {
        for port in ports {
            let body = format!("to {q} through {port} ({i})");
            let r = web::post(
                &c,
                &format!("http://127.0.0.1:{port}/echo/{q}/x"),
                body.clone(),
            )
            .await;
            assert_eq!(r.status, StatusCode::OK, "{q} via {port}: {}", r.text());
            assert_eq!(r.text(), body);
        }
    }

    // The CLI on the cluster: pause (and wait for the dispatcher), status, resume.
    let cli = |args: &[&str]| {
        let out = crate::support::bin::command()
            .args(args)
            .args(["--redis", &url, "--queue", &queues[0]])
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    cli(&["pause", "--wait", "--timeout", "10s"]);
    let status: serde_json::Value = serde_json::from_str(&cli(&["status", "--json"])).unwrap();
    let queue = &status["queues"][0];
    assert_eq!(queue["queue"], queues[0].as_str());
    assert!(queue["pause"].is_object(), "{status}");
    assert_eq!(queue["dispatchers"][0]["paused"], true, "{status}");
    assert_eq!(
        queue["proxies"].as_array().map(Vec::len),
        Some(2),
        "{status}"
    );
    cli(&["resume"]);
    let r = web::post(
        &c,
        &format!("http://127.0.0.1:{}/echo/{}/x", ports[0], queues[0]),
        "after resume",
    )
    .await;
    assert_eq!(r.text(), "after resume");

    // Load on the victim's queue and on another, then kill the victim's primary.
    let victim = &queues[1];
    let other = &queues[2];
    let victim_load = Load::start(
        4,
        format!("http://127.0.0.1:{}/echo/{victim}/x", ports[0]),
        |w, n| format!("victim {w}-{n}"),
    );
    let other_load = Load::start(
        4,
        format!("http://127.0.0.1:{}/echo/{other}/x", ports[1]),
        |w, n| format!("other {w}-{n}"),
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let primary = cluster.primary_for(anteroom_redis::key_slot(victim.as_bytes()));
    let mut cluster = cluster;
    let killed_at = Instant::now();
    cluster.nodes[primary].kill();
    // The replica takes over after the node timeout (1 s) and an election.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let victim_summary = victim_load.finish().await;
    let other_summary = other_load.finish().await;
    let ok = |s: StatusCode| s == StatusCode::OK;
    victim_summary.report("queue on the failed shard", ok);
    other_summary.report("queue on another shard", ok);
    let failed = victim_summary.failed(ok);
    let longest = victim_summary.longest();
    println!(
        "failover: {} of {} requests on the failed shard's queue failed; the longest request took {longest:?}; {} of {} on another shard failed ({:?} after the kill)",
        failed,
        victim_summary.samples.len(),
        other_summary.failed(ok),
        other_summary.samples.len(),
        killed_at.elapsed()
    );
    for failure in victim_summary
        .samples
        .iter()
        .filter(|s| !s.status.is_some_and(ok))
    {
        println!(
            "failed on the failed shard: {:?} {:?}",
            failure.status,
            String::from_utf8_lossy(&failure.body)
        );
    }
    // Served again after the failover: the last requests succeeded.
    let tail = &victim_summary.samples[victim_summary.samples.len().saturating_sub(4)..];
    assert!(
        tail.iter().all(|s| s.status == Some(StatusCode::OK)),
        "not served again after the failover"
    );
    assert_eq!(other_summary.failed(ok), 0, "another shard's queue failed");
    // Replication is asynchronous: a push or move the dead primary had not
    // yet passed on can be lost (that request then gets its 504). Seen: 0.
    assert!(failed <= 5, "{failed} requests failed on the failed shard");
}
