//! One dispatcher process serving several queues in priority order
//! (`anteroom dispatch --queue critical,bulk`), with real proxies and a
//! recording app: strictly, every waiting `critical` request runs before
//! any `bulk` one; with `--queue-weights`, `bulk` gets its share while
//! `critical` still has a backlog, also while `bulk` holds open
//! WebSockets. The requests wait in Redis before the dispatcher starts,
//! so both queues have a backlog from its first pull (but for the
//! WebSockets' case, whose sockets need the dispatcher first).

use std::time::Duration;

use http::StatusCode;

use crate::support::app::{Ran, recording_upstream};
use crate::support::bin::{BinProcess, start_proxy};
use crate::support::web::{self, client};
use crate::support::{LocalRedis, control, eventually, start_redis};

/// One dispatcher process serving `critical` then `bulk` on `redis`,
/// forwarding to `upstream`, with `extra` flags.
fn dispatch_both(redis: &LocalRedis, upstream: &str, extra: &[&str]) -> BinProcess {
    let url = redis.url();
    let mut args = vec![
        "dispatch",
        "--redis",
        url.as_str(),
        "--queue",
        "critical,bulk",
        "--upstream",
        upstream,
    ];
    args.extend_from_slice(extra);
    BinProcess::spawn(&args)
}

/// Waits (30 s each) for every request's answer: 200.
async fn all_ok(answers: Vec<tokio::task::JoinHandle<web::Reply>>) {
    for answer in answers {
        let answer = tokio::time::timeout(Duration::from_secs(30), answer)
            .await
            .expect("answered")
            .unwrap();
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    }
}

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
    let _dispatcher = dispatch_both(&redis, &upstream, extra);
    all_ok(answers).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_websockets_do_not_use_up_a_lower_queues_share() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    // Weights 3,1 of 4: bulk is guaranteed one place while it has
    // requests. Two WebSockets open on bulk gave their places back on
    // opening, so they must not count against that one.
    let redis = start_redis();
    let (upstream, ran): (String, Ran) = recording_upstream().await;
    let (_critical_proxy, critical_url) = start_proxy(&redis, "critical", "60s").await;
    let (_bulk_proxy, bulk_url) = start_proxy(&redis, "bulk", "60s").await;
    let critical = control(&redis, "critical").await;
    let _dispatcher = dispatch_both(
        &redis,
        &upstream,
        &["--concurrency", "4", "--queue-weights", "3,1"],
    );
    let ws_url = format!("{}/ws", bulk_url.replacen("http://", "ws://", 1));
    let mut sockets = Vec::new();
    for i in 0..2 {
        let (mut ws, resp) = tokio::time::timeout(
            Duration::from_secs(30),
            tokio_tungstenite::connect_async(&ws_url),
        )
        .await
        .expect("handshake within 30 s")
        .expect("handshake accepted");
        assert_eq!(resp.status(), 101);
        // An echo: the socket is open at the dispatcher.
        ws.send(Message::text(format!("socket {i}"))).await.unwrap();
        let echo = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("an echo within 10 s")
            .expect("the socket stays open")
            .unwrap();
        assert_eq!(echo, Message::text(format!("socket {i}")));
        sockets.push(ws);
    }
    let c = client();
    let mut answers = Vec::new();
    for i in 0..36 {
        let (c, url) = (c.clone(), format!("{critical_url}/run/c{i}?ms=100"));
        answers.push(tokio::spawn(async move { web::get(&c, &url).await }));
    }
    // A backlog of critical (36 requests of 100 ms on 4 places: it lasts
    // about a second) before bulk's requests arrive.
    eventually("a critical backlog", Duration::from_secs(10), || async {
        critical.status().await.unwrap().waiting >= 12
    })
    .await;
    for i in 0..4 {
        let (c, url) = (c.clone(), format!("{bulk_url}/run/b{i}?ms=100"));
        answers.push(tokio::spawn(async move { web::get(&c, &url).await }));
    }
    all_ok(answers).await;
    let order = ran.lock().unwrap().clone();
    println!("with two sockets open on bulk: {order:?}");
    assert_eq!(order.len(), 40, "{order:?}");
    // Bulk keeps its one place through critical's backlog: its four
    // requests (100 ms each) run one after another while critical's
    // take about a second on three places. Without that place at most the
    // first runs early: its member, blocked on its empty queue when it
    // arrived, takes it with no check.
    let last_critical = order.iter().rposition(|id| id.starts_with('c')).unwrap();
    let bulk_before = order[..last_critical]
        .iter()
        .filter(|id| id.starts_with('b'))
        .count();
    assert!(
        bulk_before >= 2,
        "bulk starved while critical had a backlog, its open sockets counted as its share: {order:?}"
    );
    // The sockets still work.
    for ws in &mut sockets {
        ws.send(Message::text("still open")).await.unwrap();
        let echo = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("an echo within 10 s")
            .expect("the socket stays open")
            .unwrap();
        assert_eq!(echo, Message::text("still open"));
    }
}
