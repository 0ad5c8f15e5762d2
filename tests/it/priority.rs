//! One dispatcher process serving several queues in priority order
//! (`anteroom dispatch --queue critical,bulk`), with real proxies and a
//! recording app: strictly, every waiting `critical` request runs before
//! any `bulk` one; with `--queue-weights`, `bulk` gets its share while
//! `critical` still has a backlog. The requests wait in Redis before the
//! dispatcher starts, so both queues have a backlog from its first pull.

use std::time::Duration;

use http::StatusCode;

use crate::support::app::{Ran, recording_upstream};
use crate::support::bin::{BinProcess, start_proxy};
use crate::support::web::{self, client};
use crate::support::{control, eventually, start_redis};

/// Queues `bulk` then `critical` requests (each `/run/ID?ms=MS`) while
/// no dispatcher runs, then starts one process serving both; waits for
/// every answer; returns the order the app ran them in.
async fn run_backlog(extra: &[&str], n_critical: usize, n_bulk: usize, ms: u64) -> Vec<String> {
    let redis = start_redis();
    let (upstream, ran): (String, Ran) = recording_upstream().await;
    let (_critical_proxy, critical_url) = start_proxy(&redis, "critical", "60s").await;
    let (_bulk_proxy, bulk_url) = start_proxy(&redis, "bulk", "60s").await;
    let critical = control(&redis, "critical").await;
    let bulk = control(&redis, "bulk").await;
    let c = client();
    let mut answers = Vec::new();
    for (base, prefix, n, queue) in [
        (&bulk_url, "b", n_bulk, &bulk),
        (&critical_url, "c", n_critical, &critical),
    ] {
        for i in 0..n {
            let (c, url) = (c.clone(), format!("{base}/run/{prefix}{i}?ms={ms}"));
            answers.push(tokio::spawn(async move { web::get(&c, &url).await }));
        }
        eventually("the requests queued", Duration::from_secs(10), || async {
            queue.status().await.unwrap().waiting == n as u64
        })
        .await;
    }
    let url = redis.url();
    let mut args = vec![
        "dispatch",
        "--redis",
        url.as_str(),
        "--queue",
        "critical,bulk",
        "--upstream",
        upstream.as_str(),
    ];
    args.extend_from_slice(extra);
    let _dispatcher = BinProcess::spawn(&args);
    for answer in answers {
        let answer = tokio::time::timeout(Duration::from_secs(30), answer)
            .await
            .expect("answered")
            .unwrap();
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    }
    // Each queue has its own dispatcher in the status.
    for queue in [&critical, &bulk] {
        assert_eq!(queue.status().await.unwrap().dispatchers.len(), 1);
    }
    let order = ran.lock().unwrap().clone();
    assert_eq!(order.len(), n_critical + n_bulk, "{order:?}");
    order
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_non_empty_queue_is_served_first() {
    let order = run_backlog(&["--concurrency", "2"], 12, 6, 20).await;
    let last_critical = order.iter().rposition(|id| id.starts_with('c')).unwrap();
    let first_bulk = order.iter().position(|id| id.starts_with('b')).unwrap();
    println!("strict: {order:?}");
    assert!(
        last_critical < first_bulk,
        "a bulk request ran while critical ones waited: {order:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_keep_a_share_for_lower_queues() {
    // Weights 3,1 of 4: bulk is guaranteed one of the four while it has
    // requests, critical the rest.
    let order = run_backlog(
        &["--concurrency", "4", "--queue-weights", "3,1"],
        24,
        6,
        100,
    )
    .await;
    println!("weighted: {order:?}");
    let last_critical = order.iter().rposition(|id| id.starts_with('c')).unwrap();
    let first_bulk = order.iter().position(|id| id.starts_with('b')).unwrap();
    assert!(
        first_bulk < last_critical,
        "bulk starved until critical was empty: {order:?}"
    );
    // While both had requests, critical had most of the places.
    let early_critical = order[..12].iter().filter(|id| id.starts_with('c')).count();
    assert!(
        early_critical >= 7,
        "critical got {early_critical} of the first 12: {order:?}"
    );
}
