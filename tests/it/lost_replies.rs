//! A reply Redis sent and the process never received (a network failure
//! between them): the command took effect, and the process must find out
//! what it did (docs/protocol.md, "Lost replies"). Here: a dispatcher's
//! pull, through a relay that loses the reply carrying the request.

use std::sync::PoisonError;
use std::time::{Duration, Instant};

use anteroom_testkit::free_port;
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;

use crate::support::app::recording_upstream;
use crate::support::bin::BinProcess;
use crate::support::relay::Relay;
use crate::support::web::{client, send};
use crate::support::{
    control, eventually, start_redis, until_dispatching, until_held, wait_for_port,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_whose_reply_is_lost_strands_nothing() {
    let redis = start_redis();
    let relay = Relay::start(redis.port()).await;
    let queue = "lost";
    let (upstream, ran) = recording_upstream().await;
    let port = free_port().unwrap();
    let listen = format!("127.0.0.1:{port}");
    let url = redis.url();
    let _proxy = BinProcess::spawn(&[
        "proxy", "--listen", &listen, "--redis", &url, "--queue", queue, "--hold", "15s",
    ]);
    // The dispatcher reaches Redis only through the relay.
    let through_relay = relay.url();
    let _dispatcher = BinProcess::spawn(&[
        "dispatch",
        "--redis",
        &through_relay,
        "--queue",
        queue,
        "--upstream",
        &upstream,
    ]);
    wait_for_port(port).await;
    let control = control(&redis, queue).await;
    until_dispatching(&control).await;
    let c = client();
    let ask = |method: http::Method, id: &str| {
        let request = Request::builder()
            .method(method)
            .uri(format!("http://{listen}/run/{id}"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let c = c.clone();
        async move {
            let started = Instant::now();
            let answer = send(&c, request).await;
            (answer, started.elapsed())
        }
    };
    let runs = |id: &str| {
        ran.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|r| r.as_str() == id)
            .count()
    };

    // A POST in hand meanwhile (its app answers after 1.5 s), which the
    // settling of orphans must leave alone.
    let running = tokio::spawn(ask(http::Method::POST, "running?ms=1500"));
    eventually("the POST running", Duration::from_secs(10), || async {
        runs("running") == 1
    })
    .await;

    // A GET whose pull reply is lost: found in the processing list once
    // the dispatcher is connected again, put back, and run, well within
    // its 15 s hold budget (before, it waited it out for a 504).
    relay.lose_reply_containing(b"/run/lost-get");
    let (answer, took) = ask(http::Method::GET, "lost-get").await;
    assert_eq!(relay.lost(), 1, "the relay lost no reply");
    println!(
        "GET whose pull reply was lost: {} after {took:?}",
        answer.status
    );
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert_eq!(runs("lost-get"), 1);

    let (answer, _) = running.await.unwrap();
    assert_eq!(
        answer.status,
        StatusCode::OK,
        "the POST in hand: {}",
        answer.text()
    );

    // A POST: it never ran, but this dispatcher cannot tell that from a
    // request whose handling ended leaving it in the list, so it is
    // answered 502 ("may or may not have been carried out"), never run.
    relay.lose_reply_containing(b"/run/lost-post");
    let (answer, took) = ask(http::Method::POST, "lost-post").await;
    assert_eq!(relay.lost(), 2, "the relay lost no reply");
    println!(
        "POST whose pull reply was lost: {} after {took:?}",
        answer.status
    );
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY, "{}", answer.text());
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert_eq!(runs("lost-post"), 0);

    // And the dispatcher goes on, its list empty; nothing ran twice, the
    // lost POST never, also after the dispatcher's second look at its list
    // (a pull the lost connection sent could land late).
    let (answer, _) = ask(http::Method::POST, "after").await;
    assert_eq!(answer.status, StatusCode::OK);
    until_held(&control, 0).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(runs("running"), 1);
    assert_eq!(runs("lost-get"), 1);
    assert_eq!(runs("lost-post"), 0);
}
