//! A reply Redis sent and the process never received (a network failure
//! between them): the command took effect, and the process must find out
//! what it did (docs/protocol.md, "Lost replies"). Here, each through a
//! relay that loses one reply: a dispatcher's pull, a proxy's enqueue, a
//! dispatcher's completion, a reaper's claim and a pause acknowledgement.

use std::sync::PoisonError;
use std::time::{Duration, Instant};

use anteroom_testkit::LocalRedis;
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;

use crate::support::adapters::{any_dispatcher, record_dispatcher, record_file, recorded};
use crate::support::app::recording_upstream;
use crate::support::bin::{BinProcess, start_proxy_on};
use crate::support::web::{client, send};
use crate::support::{
    control, eventually, pause_acknowledged, start_redis, until_dispatching, until_held,
};
use anteroom_testkit::relay::Relay;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_whose_reply_is_lost_strands_nothing() {
    let redis = start_redis();
    let relay = Relay::start(redis.port()).await;
    let queue = "lost";
    let (upstream, ran) = recording_upstream().await;
    let (listen, _proxy, _dispatcher) =
        proxy_and_dispatcher(&redis, &redis.url(), &relay.url(), queue, &upstream, "15s").await;
    let control = control(&redis, queue).await;

    let c = client();
    let ask = |method: http::Method, id: &str| {
        let request = Request::builder()
            .method(method)
            .uri(format!("{listen}/run/{id}"))
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

/// A proxy reaching `redis` at `proxy_redis` (hold budget `hold`) and a
/// dispatcher reaching it at `dispatcher_redis`, forwarding to `upstream`,
/// both for `queue`; returned once the proxy listens and the dispatcher
/// beats: the proxy's base URL and the two processes.
async fn proxy_and_dispatcher(
    redis: &LocalRedis,
    proxy_redis: &str,
    dispatcher_redis: &str,
    queue: &str,
    upstream: &str,
    hold: &str,
) -> (String, BinProcess, BinProcess) {
    let (proxy, base) = start_proxy_on(proxy_redis, queue, hold, &[]).await;
    let dispatcher = BinProcess::spawn(&[
        "dispatch",
        "--redis",
        dispatcher_redis,
        "--queue",
        queue,
        "--upstream",
        upstream,
    ]);
    until_dispatching(&control(redis, queue).await).await;
    (base, proxy, dispatcher)
}

/// Redis, a relay in front of it, and a dispatcher of the queue
/// `<name>-<language>` reaching Redis through the relay: the Rust one
/// forwarding to a recording upstream (`language` `None`, "rs" in the
/// name), or the `language`'s with its record app ([`record_dispatcher`]).
/// Its record file goes when it is dropped.
struct RelayedDispatcher {
    redis: LocalRedis,
    relay: Relay,
    queue: String,
    language: Option<String>,
    ran: crate::support::app::Ran,
    record: std::path::PathBuf,
    _dispatcher: BinProcess,
}

impl RelayedDispatcher {
    /// Started and beating.
    async fn start(name: &str, language: Option<&str>) -> Self {
        let redis = start_redis();
        let relay = Relay::start(redis.port()).await;
        let queue = format!("{name}-{}", language.unwrap_or("rs"));
        let (upstream, ran) = recording_upstream().await;
        let record = record_file();
        let mut cmd = any_dispatcher(language, &upstream, &record);
        cmd.env("ANTEROOM_REDIS", relay.url())
            .env("ANTEROOM_QUEUE", &queue)
            .stdout(std::process::Stdio::null());
        let dispatcher = BinProcess::spawn_cmd(&mut cmd);
        until_dispatching(&control(&redis, &queue).await).await;
        Self {
            redis,
            relay,
            queue,
            language: language.map(str::to_owned),
            ran,
            record,
            _dispatcher: dispatcher,
        }
    }

    /// How many times its app ran `/run/ID`.
    fn runs(&self, id: &str) -> usize {
        match self.language {
            None => runs_of(&self.ran, id),
            Some(_) => recorded(&self.record, id),
        }
    }
}

impl Drop for RelayedDispatcher {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.record);
    }
}

/// Runs `id` with `method` (and an `Idempotency-Key` when `key`) through
/// the proxy at `base` (`http://HOST:PORT`): its status.
async fn run(base: &str, method: http::Method, id: &str, key: bool) -> StatusCode {
    let mut request = Request::builder()
        .method(method)
        .uri(format!("{base}/run/{id}"));
    if key {
        request = request.header("idempotency-key", id);
    }
    let request = request.body(Full::new(Bytes::new())).unwrap();
    send(&client(), request).await.status
}

fn runs_of(ran: &crate::support::app::Ran, id: &str) -> usize {
    ran.lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .filter(|r| r.as_str() == id)
        .count()
}

/// A proxy's `LPUSH` whose reply is lost has queued the request: the
/// proxy cannot tell. An unsafe request waits for its reply as any queued
/// one (it used to be answered 503 while it ran anyway). With
/// `--enqueue-timeout` (every envelope `dedupe`) the push is repeated and
/// the request runs once; without it, a request its client may repeat (a
/// GET, a POST with `Idempotency-Key`) may be answered 503 at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enqueue_whose_reply_is_lost_is_answered_not_failed() {
    let redis = start_redis();
    let relay = Relay::start(redis.port()).await;
    let queue = "lost-enqueue";
    let (upstream, ran) = recording_upstream().await;
    let (plain, _proxy, _dispatcher) =
        proxy_and_dispatcher(&redis, &relay.url(), &redis.url(), queue, &upstream, "15s").await;
    // A second proxy, through the same relay, that repeats pushes.
    let relayed = relay.url();
    let (_retrying_proxy, retrying) =
        start_proxy_on(&relayed, queue, "15s", &["--enqueue-timeout", "5s"]).await;
    for listen in [&plain, &retrying] {
        assert_eq!(
            run(listen, http::Method::GET, "warm", false).await,
            StatusCode::OK
        );
    }

    for (listen, method, id, key) in [
        (&plain, http::Method::POST, "enqueue-post", false),
        (&retrying, http::Method::POST, "enqueue-retried-post", false),
        (&retrying, http::Method::POST, "enqueue-keyed-post", true),
        (&retrying, http::Method::GET, "enqueue-get", false),
    ] {
        let lost = relay.lost();
        relay.lose_reply_to(format!("/run/{id}").as_bytes());
        let started = Instant::now();
        let status = run(listen, method.clone(), id, key).await;
        let took = started.elapsed();
        assert_eq!(relay.lost(), lost + 1, "the relay lost no reply for {id}");
        println!("{method} {id} whose LPUSH reply was lost: {status} after {took:?}");
        assert_eq!(status, StatusCode::OK, "{id}");
        assert!(took < Duration::from_secs(5), "{id}: {took:?}");
        let runs = runs_of(&ran, id);
        if method == http::Method::GET {
            assert!((1..=2).contains(&runs), "{id} ran {runs} times");
        } else {
            assert_eq!(runs, 1, "{id} ran {runs} times");
        }
    }
}

/// A completion whose reply is lost is sent again: the client gets its
/// answer (the second copy of the reply is discarded), the request ran
/// once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_whose_reply_is_lost_is_sent_again() {
    completion_lost(None, Lost::Reply).await;
}

/// A completion whose command is lost on its way (Redis never saw it) is
/// sent again: without the retry the client would wait out its hold
/// budget. The Rust dispatcher here, the Python, Node and Ruby ones below,
/// each also with the reply lost instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_whose_command_is_lost_is_sent_again() {
    completion_lost(None, Lost::Command).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_dispatcher_sends_a_lost_completion_again() {
    completion_lost(Some("py"), Lost::Command).await;
    completion_lost(Some("py"), Lost::Reply).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_dispatcher_sends_a_lost_completion_again() {
    completion_lost(Some("node"), Lost::Command).await;
    completion_lost(Some("node"), Lost::Reply).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ruby_dispatcher_sends_a_lost_completion_again() {
    completion_lost(Some("rb"), Lost::Command).await;
    completion_lost(Some("rb"), Lost::Reply).await;
}

/// What of a completion the relay loses.
#[derive(Debug, Clone, Copy)]
enum Lost {
    /// The reply: Redis applied it.
    Reply,
    /// The command: Redis never saw it.
    Command,
}

/// A POST whose completion (`lost`) the relay between the Rust dispatcher
/// (`None`) or the `language`'s ([`record_dispatcher`]) and Redis loses:
/// answered 200 within 5 s, run once.
async fn completion_lost(language: Option<&str>, lost: Lost) {
    let d = RelayedDispatcher::start("lost-completion", language).await;
    let relay = &d.relay;
    let (_proxy, listen) = start_proxy_on(&d.redis.url(), &d.queue, "15s", &[]).await;

    // The completion carries the request's envelope (its `LREM`), so its
    // path; the pull and the heartbeat never send it.
    let id = "completed-post";
    let marker = format!("/run/{id}");
    match lost {
        Lost::Reply => relay.lose_reply_to(marker.as_bytes()),
        Lost::Command => relay.lose_command_containing(marker.as_bytes()),
    }
    let started = Instant::now();
    let status = run(&listen, http::Method::POST, id, false).await;
    let took = started.elapsed();
    // The answer can reach the client through the proxy's own connection
    // before the relay has dropped the reply on its way to the dispatcher.
    eventually("the relay to lose it", Duration::from_secs(5), || async {
        relay.lost() == 1
    })
    .await;
    println!("{language:?}: POST whose completion's {lost:?} was lost: {status} after {took:?}");
    assert_eq!(status, StatusCode::OK);
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert_eq!(d.runs(id), 1);
}

/// A reaper's claim whose reply is lost has moved a dead dispatcher's
/// requests into the claimer's own processing list, where no task of it
/// holds them: the claimer settles them as orphans (the GET and the POST
/// with `Idempotency-Key` run, the POST, which may have run on the dead
/// dispatcher, gets 502) instead of leaving them there until their
/// clients' 504. The envelopes are `dedupe` (the proxy's
/// `--enqueue-timeout`) and the dead dispatcher had claimed each: settling
/// an orphan releases the claim of a dispatcher whose heartbeat is gone,
/// or the next delivery finds it taken and drops the request (the chaos
/// soak's 504 at the hold budget, seed 1796117894).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_whose_reply_is_lost_strands_nothing() {
    claim_lost(None).await;
}

/// The Python dispatcher as the claimer likewise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_dispatcher_settles_a_lost_claim_too() {
    claim_lost(Some("py")).await;
}

/// The Node dispatcher as the claimer likewise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_dispatcher_settles_a_lost_claim_too() {
    claim_lost(Some("node")).await;
}

/// The Ruby dispatcher as the claimer likewise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ruby_dispatcher_settles_a_lost_claim_too() {
    claim_lost(Some("rb")).await;
}

/// The lost claim above, with the Rust dispatcher (`None`) or the
/// `language`'s ([`record_dispatcher`]) as the claimer.
async fn claim_lost(language: Option<&str>) {
    let redis = start_redis();
    let relay = Relay::start(redis.port()).await;
    let queue = format!("lost-claim-{}", language.unwrap_or("rs"));
    let queue = queue.as_str();
    let (upstream, ran) = recording_upstream().await;
    let record = record_file();
    // The first dispatcher's app takes requests and never answers.
    let black_hole = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hole = format!("http://{}", black_hole.local_addr().unwrap());
    let holding = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = black_hole.accept().await {
            held.push(socket);
        }
    });
    let (through_relay, url) = (relay.url(), redis.url());
    let (_proxy, listen) = start_proxy_on(&url, queue, "30s", &["--enqueue-timeout", "5s"]).await;
    let mut first = BinProcess::spawn(&[
        "dispatch",
        "--redis",
        &url,
        "--queue",
        queue,
        "--upstream",
        &hole,
        "--heartbeat-ttl",
        "3s",
    ]);
    let control = control(&redis, queue).await;
    until_dispatching(&control).await;
    let get = tokio::spawn({
        let listen = listen.clone();
        async move {
            let started = Instant::now();
            let status = run(&listen, http::Method::GET, "claimed-get", false).await;
            (status, started.elapsed())
        }
    });
    let post = tokio::spawn({
        let listen = listen.clone();
        async move { run(&listen, http::Method::POST, "claimed-post", false).await }
    });
    let keyed = tokio::spawn({
        let listen = listen.clone();
        async move { run(&listen, http::Method::POST, "claimed-keyed", true).await }
    });
    until_held(&control, 3).await;
    // Each claimed (so the first dispatcher may have run it) before it dies.
    let inspect = crate::support::redis_conn(&redis).await;
    let claims = format!("anteroom:{{{queue}}}:claimed:*");
    eventually("the three claims", Duration::from_secs(10), || {
        let (mut inspect, claims) = (inspect.clone(), claims.clone());
        async move { anteroom_testkit::keys(&mut inspect, &claims).await.len() == 3 }
    })
    .await;
    first.child().kill().unwrap();
    first.wait(Duration::from_secs(5)).await;
    eventually(
        "the dead dispatcher's heartbeat to expire",
        Duration::from_secs(10),
        || async { control.status().await.unwrap().dispatchers.is_empty() },
    )
    .await;

    // The claimer reaches Redis through the relay, which loses the reply
    // to its first claim (the script's text is in no other command).
    relay.lose_reply_to(b"if redis.call('EXISTS'");
    let _claimer = match language {
        None => BinProcess::spawn(&[
            "dispatch",
            "--redis",
            &through_relay,
            "--queue",
            queue,
            "--upstream",
            &upstream,
            "--reap-every",
            "1s",
        ]),
        Some(language) => {
            let mut cmd = record_dispatcher(language, &record);
            cmd.env("ANTEROOM_REDIS", &through_relay)
                .env("ANTEROOM_QUEUE", queue)
                .stdout(std::process::Stdio::null());
            BinProcess::spawn_cmd(&mut cmd)
        }
    };
    let runs = |id: &str| match language {
        None => runs_of(&ran, id),
        Some(_) => recorded(&record, id),
    };
    let (status, took) = get.await.unwrap();
    assert_eq!(relay.lost(), 1, "the relay lost no reply");
    println!("{language:?}: GET whose claim reply was lost: {status} after {took:?}");
    assert_eq!(status, StatusCode::OK);
    assert!(took < Duration::from_secs(25), "{took:?}");
    assert_eq!(post.await.unwrap(), StatusCode::BAD_GATEWAY);
    assert_eq!(keyed.await.unwrap(), StatusCode::OK);
    assert_eq!(runs("claimed-get"), 1);
    assert_eq!(runs("claimed-post"), 0);
    assert_eq!(runs("claimed-keyed"), 1);
    until_held(&control, 0).await;
    holding.abort();
    let _ = std::fs::remove_file(&record);
}

/// A pause acknowledgement (the heartbeat that says "paused") whose reply
/// is lost was written all the same, and is written again with the next
/// beat: the pause is acknowledged, and the resume honoured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_acknowledgement_whose_reply_is_lost_still_counts() {
    pause_acknowledgement_lost(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_dispatcher_acknowledges_a_pause_whose_reply_is_lost() {
    pause_acknowledgement_lost(Some("py")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_dispatcher_acknowledges_a_pause_whose_reply_is_lost() {
    pause_acknowledgement_lost(Some("node")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ruby_dispatcher_acknowledges_a_pause_whose_reply_is_lost() {
    pause_acknowledgement_lost(Some("rb")).await;
}

/// The lost pause acknowledgement above, with the Rust dispatcher
/// (`None`) or the `language`'s ([`record_dispatcher`]).
async fn pause_acknowledgement_lost(language: Option<&str>) {
    let d = RelayedDispatcher::start("lost-ack", language).await;
    let relay = &d.relay;
    let (_proxy, listen) = start_proxy_on(&d.redis.url(), &d.queue, "15s", &[]).await;
    let control = control(&d.redis, &d.queue).await;
    let runs = |id: &str| d.runs(id);

    // The heartbeat's JSON, as each language writes it (Python's json
    // puts a space after the colon).
    let marker: &[u8] = if language == Some("py") {
        b"\"paused\": true"
    } else {
        b"\"paused\":true"
    };
    relay.lose_reply_to(marker);
    let started = Instant::now();
    pause_acknowledged(&control, "lost-ack-test").await;
    // The acknowledgement can be read before the relay has dropped its
    // reply on the way back.
    eventually("the relay to lose it", Duration::from_secs(5), || async {
        relay.lost() == 1
    })
    .await;
    println!(
        "{language:?}: pause acknowledged, its reply lost, after {:?}",
        started.elapsed()
    );
    let waiting = tokio::spawn({
        let listen = listen.clone();
        async move { run(&listen, http::Method::POST, "after-pause", false).await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(runs("after-pause"), 0, "ran while paused");
    control.resume().await.unwrap();
    assert_eq!(waiting.await.unwrap(), StatusCode::OK);
    assert_eq!(runs("after-pause"), 1);
}

/// The proxy's take of its reply list whose reply is lost: Redis has
/// moved the replies out of the list, the proxy never saw them. They are
/// in its popped list, delivered again once it is connected again (it
/// used to lose them: the client waited for a 504).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_pop_whose_reply_is_lost_is_delivered_again() {
    let redis = start_redis();
    let relay = Relay::start(redis.port()).await;
    let queue = "lost-pop";
    let (upstream, ran) = recording_upstream().await;
    let (listen, _proxy, _dispatcher) =
        proxy_and_dispatcher(&redis, &relay.url(), &redis.url(), queue, &upstream, "15s").await;

    for (method, id) in [
        (http::Method::GET, "popped-get"),
        (http::Method::POST, "popped-post"),
    ] {
        let lost = relay.lost();
        // The app's `x-ran: ID` is in the reply envelope the pop carries,
        // and in no other reply to the proxy.
        relay.lose_reply_containing(id.as_bytes());
        let started = Instant::now();
        let status = run(&listen, method.clone(), id, false).await;
        let took = started.elapsed();
        assert_eq!(relay.lost(), lost + 1, "the relay lost no reply for {id}");
        println!("{method} {id} whose reply pop was lost: {status} after {took:?}");
        assert_eq!(status, StatusCode::OK, "{id}");
        assert!(took < Duration::from_secs(5), "{id}: {took:?}");
        assert_eq!(runs_of(&ran, id), 1, "{id}");
    }
}

/// A chunk of a streamed response pushed again after its answer was lost
/// reaches the proxy twice: the copy is dropped, and the client gets the
/// body exactly (the stream used to be aborted: "chunk 1 where 2 was
/// due").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_chunk_pushed_twice_is_delivered_once() {
    // The push carrying the second part.
    a_stream_frame_pushed_twice("lost-chunk", b"<part-1-of").await;
}

/// A stream head pushed again after its answer was lost reaches the proxy
/// twice, as it does when the proxy's reader delivers again what its last
/// take carried: the copy bears the same `run` as the stream's own head
/// and is dropped, and the client gets the body exactly (the stream used
/// to be aborted as "answered again from the start"; the chaos soak saw
/// it after every partition between a proxy and Redis that overlapped a
/// stream's start).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_head_delivered_twice_is_not_a_second_run() {
    // The push carrying the head, the only frame naming a credit list.
    a_stream_frame_pushed_twice("lost-head", b"credit_to").await;
}

/// A streamed response of three parts, 200 ms apart, whose dispatcher
/// reaches Redis through a relay that loses the answer to the first push
/// containing `marker`, so the dispatcher pushes that frame again: the
/// client gets the body exactly.
async fn a_stream_frame_pushed_twice(queue: &str, marker: &[u8]) {
    let redis = start_redis();
    let relay = Relay::start(redis.port()).await;
    let app = axum::Router::new().route(
        "/parts",
        axum::routing::get(|| async {
            let parts = futures_util::stream::unfold(0u8, |i| async move {
                if i >= 3 {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                let part = Bytes::from(format!("<part-{i}-of-the-streamed-body>"));
                Some((Ok::<_, std::convert::Infallible>(part), i + 1))
            });
            axum::body::Body::from_stream(parts)
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let (listen, _proxy, _dispatcher) =
        proxy_and_dispatcher(&redis, &redis.url(), &relay.url(), queue, &upstream, "15s").await;

    relay.lose_reply_to(marker);
    let answer = crate::support::web::get(&client(), &format!("{listen}/parts")).await;
    assert_eq!(relay.lost(), 1, "the relay lost no reply");
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(
        answer.text(),
        "<part-0-of-the-streamed-body><part-1-of-the-streamed-body><part-2-of-the-streamed-body>"
    );
}

/// The Python dispatcher (`anteroom-wsgi`) settles the orphans of a lost
/// pull reply as the Rust one does: the GET runs, the POST gets 502 and
/// never runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_dispatcher_settles_a_lost_pull_too() {
    settles_a_lost_pull("py").await;
}

/// The Node dispatcher (`anteroom-node`) likewise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_dispatcher_settles_a_lost_pull_too() {
    settles_a_lost_pull("node").await;
}

/// The Ruby dispatcher (`anteroom-rack`) likewise (it also sweeps its
/// list every 2 s: redis-rb does not always report a reply lost with its
/// connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ruby_dispatcher_settles_a_lost_pull_too() {
    settles_a_lost_pull("rb").await;
}

/// A GET and a POST whose pull replies a relay loses, with the `name`d
/// dispatcher ([`record_dispatcher`]): the GET answered 200 and run once,
/// the POST 502 and never run, each within 5 s (not 504 at the 15 s hold
/// budget).
async fn settles_a_lost_pull(name: &str) {
    let redis = start_redis();
    let relay = Relay::start(redis.port()).await;
    let queue = format!("lost-{name}");
    let record = record_file();
    let _ = std::fs::remove_file(&record);
    let (_proxy, listen) = start_proxy_on(&redis.url(), &queue, "15s", &[]).await;
    let mut cmd = record_dispatcher(name, &record);
    cmd.env("ANTEROOM_REDIS", relay.url())
        .env("ANTEROOM_QUEUE", &queue)
        .env("ANTEROOM_GRACE", "2s")
        .stdout(std::process::Stdio::null());
    let _dispatcher = BinProcess::spawn_cmd(&mut cmd);
    until_dispatching(&control(&redis, &queue).await).await;
    let runs = |id: &str| recorded(&record, id);
    for (method, expect, ran) in [
        (http::Method::GET, StatusCode::OK, 1),
        (http::Method::POST, StatusCode::BAD_GATEWAY, 0),
    ] {
        let id = format!("{name}-lost-{method}");
        let lost = relay.lost();
        relay.lose_reply_containing(format!("/run/{id}").as_bytes());
        let started = Instant::now();
        let status = run(&listen, method.clone(), &id, false).await;
        let took = started.elapsed();
        assert_eq!(relay.lost(), lost + 1, "the relay lost no reply for {id}");
        println!(
            "{method} {id} whose pull reply the {name} dispatcher lost: {status} after {took:?}"
        );
        assert_eq!(status, expect, "{id}");
        assert!(took < Duration::from_secs(5), "{id}: {took:?}");
        assert_eq!(runs(&id), ran, "{id}");
    }
    let _ = std::fs::remove_file(&record);
}

/// The orphan of a lost pull settled by a dispatcher running as the
/// documented Redis user (docs/operations.md; the proxy as its own): its
/// `COMPLETE_IF_HELD` script declares the reply list, and Redis checks an
/// `EVAL`'s declared keys for reading and writing. With the reply lists
/// `%W` (the line before), Redis refused the script: the POST waited out
/// its 15 s for a 504 and `ACL LOG` held the refusal. Now 502 within 5 s,
/// never run, nothing refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_dispatcher_user_settles_a_lost_pull() {
    let redis = start_redis();
    let mut admin = crate::support::documented_users(&redis).await;
    let relay = Relay::start(redis.port()).await;
    let as_user =
        |user: &str, url: String| url.replacen("redis://", &format!("redis://{user}:pw@"), 1);
    let (upstream, ran) = recording_upstream().await;
    let (listen, _proxy, _dispatcher) = proxy_and_dispatcher(
        &redis,
        &as_user("anteroom-proxy", redis.url()),
        &as_user("anteroom-dispatcher", relay.url()),
        "web",
        &upstream,
        "15s",
    )
    .await;
    relay.lose_reply_containing(b"/run/acl-lost-post");
    let started = Instant::now();
    let status = run(&listen, http::Method::POST, "acl-lost-post", false).await;
    let took = started.elapsed();
    assert_eq!(relay.lost(), 1, "the relay lost no reply");
    println!("POST whose pull reply was lost, as the documented user: {status} after {took:?}");
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert_eq!(runs_of(&ran, "acl-lost-post"), 0);
    crate::support::assert_acl_log_empty(&mut admin).await;
}

/// A `dedupe` claim (`SET NX`) whose answer is lost may have been made by
/// this delivery, or refused because another delivery holds the claim:
/// the dispatcher asks again with a script that knows its own claim
/// (docs/protocol.md, step 3). Its own: run once and answered. Another
/// delivery's: not run (a lost answer used to count as claimed, so a
/// second delivery of a request already claimed elsewhere ran too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dedupe_claim_whose_answer_is_lost_runs_once() {
    dedupe_claim_lost(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_dispatcher_asks_a_lost_dedupe_claim_again() {
    dedupe_claim_lost(Some("py")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_dispatcher_asks_a_lost_dedupe_claim_again() {
    dedupe_claim_lost(Some("node")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ruby_dispatcher_asks_a_lost_dedupe_claim_again() {
    dedupe_claim_lost(Some("rb")).await;
}

/// The lost `dedupe` claim above, with the Rust dispatcher (`None`) or
/// the `language`'s ([`record_dispatcher`]), on envelopes pushed as a
/// proxy pushes them.
async fn dedupe_claim_lost(language: Option<&str>) {
    use anteroom_protocol::{HttpVersion, Keys, RequestEnvelope, now_ms};
    let d = RelayedDispatcher::start("lost-dedupe", language).await;
    let (relay, queue) = (&d.relay, &d.queue);
    let keys = Keys::new(queue).unwrap();
    let mut conn = crate::support::redis_conn(&d.redis).await;
    let runs = |id: &str| d.runs(id);
    for (n, (id, held_elsewhere)) in [("own-claim", false), ("claimed-elsewhere", true)]
        .into_iter()
        .enumerate()
    {
        let claim_key = keys.claimed(id);
        if held_elsewhere {
            redis::cmd("SET")
                .arg(&claim_key)
                .arg("another-dispatcher/0")
                .arg("PX")
                .arg(60_000)
                .query_async::<()>(&mut conn)
                .await
                .unwrap();
        }
        let reply_to = keys.replies(&format!("p{n}"));
        let envelope = RequestEnvelope {
            id: id.to_owned(),
            method: "POST".into(),
            uri: format!("/run/{id}"),
            version: HttpVersion::Http11,
            headers: vec![],
            body: Bytes::new(),
            reply_to: reply_to.clone(),
            client_addr: None,
            enqueued_at_ms: now_ms(),
            deadline_ms: now_ms() + 15_000,
            dedupe: true,
            stream: false,
            body_follows: false,
            websocket: false,
        };
        relay.lose_reply_to(claim_key.as_bytes());
        redis::cmd("LPUSH")
            .arg(keys.requests())
            .arg(envelope.encode())
            .query_async::<()>(&mut conn)
            .await
            .unwrap();
        // Settled: taken, its claim's answer lost, gone from the
        // processing list (answered, or dropped as another's).
        let processing = format!("anteroom:{{{queue}}}:processing:*");
        eventually(&format!("{id} settled"), Duration::from_secs(10), || {
            let (mut conn, requests, processing) =
                (conn.clone(), keys.requests(), processing.clone());
            let lost = relay.lost();
            async move {
                lost == n + 1
                    && crate::support::llen(&mut conn, &requests).await == 0
                    && crate::support::keys(&mut conn, &processing)
                        .await
                        .is_empty()
            }
        })
        .await;
        if held_elsewhere {
            // Give a wrongly run copy time to show, then look.
            tokio::time::sleep(Duration::from_millis(500)).await;
            assert_eq!(
                runs(id),
                0,
                "{language:?}: {id} ran though another delivery held its claim"
            );
            assert_eq!(
                crate::support::llen(&mut conn, &reply_to).await,
                0,
                "{language:?}: {id} answered"
            );
        } else {
            eventually(&format!("{id} answered"), Duration::from_secs(10), || {
                let (mut conn, reply_to) = (conn.clone(), reply_to.clone());
                async move { crate::support::llen(&mut conn, &reply_to).await == 1 }
            })
            .await;
            assert_eq!(runs(id), 1, "{language:?}: {id}");
        }
        println!(
            "{language:?}: {id}, its claim's answer lost: run {} times",
            runs(id)
        );
    }
}
