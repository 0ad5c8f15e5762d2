//! Nothing lost, nothing run twice when unsafe: dispatchers killed with
//! SIGKILL under load, the reaper, and poison messages.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anteroom_protocol::{DeadLetter, HttpVersion, Keys, RequestEnvelope, now_ms};
use axum::Router;
use axum::http::HeaderMap;
use axum::routing::any;
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;

use crate::support::app::test_app;
use crate::support::bin::BinProcess;
use crate::support::control;
use crate::support::web::{self, client, send};
use crate::support::{TestDispatcher, TestProxy, eventually, llen, redis_conn, start_redis};

const READY: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_envelopes_go_to_the_dead_letter_list_with_the_reason() {
    let redis = start_redis();
    let proxy = TestProxy::start(&redis, "poison").await;
    let d = TestDispatcher::start(&redis, "poison", test_app());
    let keys = Keys::new("poison").unwrap();
    let mut conn = redis_conn(&redis).await;
    let garbage = b"GET / HTTP/1.1\r\n\r\n".to_vec();
    let mut future_version = vec![9u8, b'Q', 0, 0, 0, 2];
    future_version.extend_from_slice(b"{}");
    for raw in [&garbage, &future_version] {
        redis::cmd("LPUSH")
            .arg(keys.requests())
            .arg(raw.as_slice())
            .query_async::<()>(&mut conn)
            .await
            .unwrap();
    }
    // The dispatcher carries on serving.
    let c = client();
    let r = web::post(&c, &proxy.url("/echo"), "still here").await;
    assert_eq!(r.text(), "still here");
    eventually("two dead letters", READY, || {
        let (mut conn, key) = (conn.clone(), keys.dead());
        async move { llen(&mut conn, &key).await == 2 }
    })
    .await;
    let dead: Vec<Bytes> = redis::cmd("LRANGE")
        .arg(keys.dead())
        .arg(0)
        .arg(-1)
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut letters: Vec<DeadLetter> = dead
        .into_iter()
        .map(|raw| DeadLetter::decode(raw).unwrap())
        .collect();
    letters.sort_by_key(|l| l.original.len());
    assert_eq!(letters[0].original, future_version.as_slice());
    assert!(
        letters[0].reason.contains("unsupported envelope version 9"),
        "{}",
        letters[0].reason
    );
    assert_eq!(letters[1].original, garbage.as_slice());
    assert!(
        letters[1].reason.contains("does not decode"),
        "{}",
        letters[1].reason
    );
    assert_eq!(letters[1].by, d.id);
    assert_eq!(
        control(&redis, "poison")
            .await
            .status()
            .await
            .unwrap()
            .dead_letters,
        2
    );
    d.stop().await;
    proxy.stop().await;
}

/// A dispatcher `dead` that died holding `held`: registered, its
/// processing list full, no heartbeat.
async fn died_holding(
    conn: &mut redis::aio::MultiplexedConnection,
    keys: &Keys,
    held: &[RequestEnvelope],
) {
    for env in held {
        redis::cmd("LPUSH")
            .arg(keys.processing("dead"))
            .arg(env.encode())
            .query_async::<()>(&mut *conn)
            .await
            .unwrap();
    }
    redis::cmd("ZADD")
        .arg(keys.dispatchers())
        .arg(1)
        .arg("dead")
        .query_async::<()>(&mut *conn)
        .await
        .unwrap();
}

fn envelope(id: usize, method: &str, reply_to: &str) -> RequestEnvelope {
    RequestEnvelope {
        id: format!("req-{id}"),
        method: method.into(),
        uri: "/".into(),
        version: HttpVersion::Http11,
        headers: vec![],
        body: Bytes::new(),
        reply_to: reply_to.into(),
        client_addr: None,
        enqueued_at_ms: now_ms(),
        deadline_ms: now_ms() + 60_000,
        dedupe: false,
        stream: false,
        body_follows: false,
        websocket: false,
    }
}

/// A reaper answers only reply lists of its queue: a dead dispatcher's
/// list holding envelopes whose `reply_to` names another key (a POST,
/// answered 502 otherwise; a GET, requeued otherwise) has them
/// dead-lettered, and the key is left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reaper_writes_only_to_reply_lists_of_its_queue() {
    let redis = start_redis();
    let keys = Keys::new("rq2").unwrap();
    let mut conn = redis_conn(&redis).await;
    let held = [
        envelope(0, "POST", "session:42"),
        envelope(1, "GET", "session:42"),
    ];
    died_holding(&mut conn, &keys, &held).await;
    let queue = control(&redis, "rq2").await;
    let report = queue.reap("reaper", Duration::from_secs(60)).await.unwrap();
    assert_eq!(
        (report.dead_lettered, report.answered, report.requeued),
        (2, 0, 0)
    );
    let exists: u64 = redis::cmd("EXISTS")
        .arg("session:42")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(exists, 0, "the reaper wrote to a foreign key");
    assert_eq!(llen(&mut conn, &keys.dead()).await, 2);
    assert_eq!(llen(&mut conn, &keys.requests()).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_one_reaper_wins_each_list() {
    const HELD: usize = 50;
    let redis = start_redis();
    let keys = Keys::new("race").unwrap();
    let mut conn = redis_conn(&redis).await;
    let held: Vec<_> = (0..HELD)
        .map(|i| {
            let method = if i % 2 == 0 { "GET" } else { "POST" };
            envelope(i, method, "anteroom:{race}:replies:p")
        })
        .collect();
    died_holding(&mut conn, &keys, &held).await;
    let queue = control(&redis, "race").await;
    let reapers: Vec<_> = (0..4)
        .map(|i| {
            let queue = queue.clone();
            tokio::spawn(async move {
                queue
                    .reap(&format!("reaper-{i}"), Duration::from_secs(60))
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut winners = 0;
    let (mut requeued, mut answered) = (0, 0);
    for r in reapers {
        let report = r.await.unwrap();
        winners += report.dispatchers;
        requeued += report.requeued;
        answered += report.answered;
    }
    assert_eq!(winners, 1, "more than one reaper claimed the list");
    assert_eq!((requeued, answered), (HELD / 2, HELD / 2));
    assert_eq!(llen(&mut conn, &keys.requests()).await, HELD / 2);
    assert_eq!(llen(&mut conn, "anteroom:{race}:replies:p").await, HELD / 2);
    for i in 0..4 {
        assert_eq!(
            llen(&mut conn, &keys.processing(&format!("reaper-{i}"))).await,
            0
        );
    }
    assert_eq!(llen(&mut conn, &keys.processing("dead")).await, 0);
}

/// An upstream that counts executions per `x-test-id` and takes 300 ms.
async fn counting_upstream() -> (String, Arc<Mutex<HashMap<String, usize>>>) {
    let runs: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let log = Arc::clone(&runs);
    let app = Router::new().fallback(any(move |headers: HeaderMap| {
        let log = Arc::clone(&log);
        async move {
            let id = headers["x-test-id"].to_str().unwrap().to_owned();
            *log.lock().unwrap().entry(id.clone()).or_default() += 1;
            tokio::time::sleep(Duration::from_millis(300)).await;
            id
        }
    }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, runs)
}

fn dispatcher_process(
    redis: &anteroom_testkit::LocalRedis,
    queue: &str,
    upstream: &str,
) -> BinProcess {
    BinProcess::spawn(&[
        "dispatch",
        "--redis",
        &redis.url(),
        "--queue",
        queue,
        "--upstream",
        upstream,
        "--concurrency",
        "8",
        "--heartbeat-ttl",
        "1s",
        "--reap-every",
        "300ms",
    ])
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Get,
    Post,
    IdempotentPost,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_dispatchers_lose_no_safe_request_and_run_no_unsafe_one_twice() {
    let redis = start_redis();
    let (upstream, runs) = counting_upstream().await;
    let proxy = Arc::new(TestProxy::start(&redis, "crash").await);
    let queue = control(&redis, "crash").await;
    let mut victim = dispatcher_process(&redis, "crash", &upstream);
    let _survivor = dispatcher_process(&redis, "crash", &upstream);
    eventually("two live dispatchers", READY, || async {
        queue.status().await.unwrap().dispatchers.len() == 2
    })
    .await;

    let running = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let mut clients = Vec::new();
    for w in 0..12 {
        let (c, proxy, running) = (client(), Arc::clone(&proxy), Arc::clone(&running));
        clients.push(tokio::spawn(async move {
            let mut outcomes = Vec::new();
            let mut n = 0;
            while running.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                let id = format!("{w}-{n}");
                let kind = [Kind::Get, Kind::Post, Kind::IdempotentPost][(w + n) % 3];
                let mut req = Request::builder()
                    .uri(proxy.url("/"))
                    .header("x-test-id", &id);
                req = match kind {
                    Kind::Get => req.method("GET"),
                    Kind::Post => req.method("POST"),
                    Kind::IdempotentPost => req.method("POST").header("idempotency-key", &id),
                };
                let r = send(&c, req.body(Full::new(Bytes::new())).unwrap()).await;
                outcomes.push((id, kind, r.status, r.text()));
            }
            outcomes
        }));
    }
    // Kill the victim while it holds requests.
    let victim_id = loop {
        let s = queue.status().await.unwrap();
        if let Some(d) = s
            .dispatchers
            .iter()
            .find(|d| d.heartbeat.pid == victim.pid() && d.held > 0)
        {
            break d.heartbeat.id.clone();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    victim.child().kill().unwrap();
    victim.child().wait().unwrap();
    let victim_list = Keys::new("crash").unwrap().processing(&victim_id);
    let mut conn = redis_conn(&redis).await;
    let held_at_kill = llen(&mut conn, &victim_list).await;
    // Heartbeat TTL (1 s) plus a reap interval, then more traffic.
    eventually("the victim to be reaped", READY, || async {
        let s = queue.status().await.unwrap();
        !s.dispatchers.iter().any(|d| d.heartbeat.id == victim_id) && s.orphaned.is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    running.store(false, std::sync::atomic::Ordering::Relaxed);

    let mut outcomes = Vec::new();
    for c in clients {
        outcomes.extend(c.await.unwrap());
    }
    let runs = runs.lock().unwrap().clone();
    let interrupted: Vec<_> = outcomes
        .iter()
        .filter(|o| o.2 == StatusCode::BAD_GATEWAY)
        .collect();
    let twice = runs.values().filter(|&&n| n > 1).count();
    println!(
        "dispatcher crash: {} requests; the killed dispatcher held {held_at_kill}; {} answered 502 (unsafe, interrupted), {} safe ones ran twice",
        outcomes.len(),
        interrupted.len(),
        twice
    );
    for (id, kind, status, body) in &outcomes {
        match kind {
            Kind::Get | Kind::IdempotentPost => {
                assert_eq!(
                    *status,
                    StatusCode::OK,
                    "safe request {id} lost: {status} {body}"
                );
                assert_eq!(body, id);
            }
            Kind::Post => {
                assert!(
                    *status == StatusCode::OK || *status == StatusCode::BAD_GATEWAY,
                    "{id}: {status}"
                );
                if *status == StatusCode::BAD_GATEWAY {
                    assert!(
                        body.contains("may or may not have been carried out"),
                        "{body}"
                    );
                }
                assert!(
                    runs.get(id).copied().unwrap_or(0) <= 1,
                    "unsafe request {id} ran twice"
                );
            }
        }
    }
    // The kill left requests behind, and the reaper settled every one.
    assert!(held_at_kill > 0, "the killed dispatcher held nothing");
    assert_eq!(llen(&mut conn, &victim_list).await, 0);
    Arc::try_unwrap(proxy).ok().unwrap().stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anteroom_reap_settles_a_dead_dispatchers_requests() {
    let redis = start_redis();
    let (upstream, _runs) = counting_upstream().await;
    let proxy = TestProxy::start(&redis, "manual").await;
    let queue = control(&redis, "manual").await;
    let mut victim = BinProcess::spawn(&[
        "dispatch",
        "--redis",
        &redis.url(),
        "--queue",
        "manual",
        "--upstream",
        &upstream,
        "--heartbeat-ttl",
        "1s",
        "--reap-every",
        "0s",
    ]);
    let c = client();
    let send_one = |method: &'static str, id: &'static str| {
        let (c, url) = (c.clone(), proxy.url("/"));
        tokio::spawn(async move {
            let req = Request::builder()
                .method(method)
                .uri(url)
                .header("x-test-id", id);
            send(&c, req.body(Full::new(Bytes::new())).unwrap()).await
        })
    };
    let get = send_one("GET", "safe");
    let post = send_one("POST", "unsafe");
    crate::support::until_held(&queue, 2).await;
    victim.child().kill().unwrap();
    victim.child().wait().unwrap();
    eventually("the heartbeat to expire", READY, || async {
        !queue.status().await.unwrap().orphaned.is_empty()
    })
    .await;

    let out = tokio::task::spawn_blocking({
        let url = redis.url();
        move || {
            crate::support::bin::command()
                .args(["reap", "--redis", &url, "--queue", "manual"])
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("1 dead dispatcher(s) reaped; 1 request(s) re-queued, 1 answered 502"),
        "{stdout}"
    );
    let r = post.await.unwrap();
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    // The GET waits at the front of the queue for the next dispatcher.
    assert_eq!(queue.status().await.unwrap().waiting, 1);
    let d = TestDispatcher::start(
        &redis,
        "manual",
        anteroom_dispatcher::Upstream::new(&upstream).unwrap(),
    );
    let r = get.await.unwrap();
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.text(), "safe");
    let s = queue.status().await.unwrap();
    assert!(s.orphaned.is_empty(), "{s:?}");
    d.stop().await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dedupe_envelope_delivered_twice_runs_once() {
    let redis = start_redis();
    let runs = Arc::new(Mutex::new(0usize));
    let counter = Arc::clone(&runs);
    let d = TestDispatcher::start(
        &redis,
        "dup",
        tower::service_fn(move |_req: Request<anteroom_dispatcher::Body>| {
            *counter.lock().unwrap() += 1;
            async {
                Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                    Bytes::from_static(b"ran"),
                )))
            }
        }),
    );
    let keys = Keys::new("dup").unwrap();
    let mut conn = redis_conn(&redis).await;
    let mut env = envelope(1, "POST", "anteroom:{dup}:replies:p");
    env.dedupe = true;
    // The same envelope twice, as a proxy retrying an ambiguous push may leave it.
    for _ in 0..2 {
        redis::cmd("LPUSH")
            .arg(keys.requests())
            .arg(env.encode())
            .query_async::<()>(&mut conn)
            .await
            .unwrap();
    }
    eventually("both deliveries handled", READY, || {
        let mut conn = conn.clone();
        let keys = keys.clone();
        async move {
            llen(&mut conn, &keys.requests()).await == 0
                && crate::support::keys(&mut conn, "anteroom:{dup}:processing:*")
                    .await
                    .is_empty()
        }
    })
    .await;
    assert_eq!(*runs.lock().unwrap(), 1, "a duplicate delivery ran again");
    assert_eq!(
        llen(&mut conn, "anteroom:{dup}:replies:p").await,
        1,
        "exactly one reply"
    );
    d.stop().await;
}

/// `anteroom_control::queue::requeue` against a real redis-server: guarded by its
/// LREM (run again after a lost answer, it queues no second copy), releases
/// only the claim its caller names, and counts repeats of requests that may
/// have run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requeue_is_guarded_releases_only_its_own_claim_and_counts_repeats() {
    use anteroom_control::queue::{Attempt, MAX_REPEATS, Requeued, requeue};
    let redis = start_redis();
    let queue = control(&redis, "rq").await;
    let mut shared = queue.connection();
    let keys = Keys::new("rq").unwrap();
    let mut conn = redis_conn(&redis).await;
    let list = keys.processing("d1");
    let raw = Bytes::from(envelope(1, "GET", "anteroom:{rq}:replies:p").encode());
    let take = |mut conn: redis::aio::MultiplexedConnection, list: String| async move {
        redis::cmd("LMOVE")
            .arg(Keys::new("rq").unwrap().requests())
            .arg(list)
            .arg("RIGHT")
            .arg("LEFT")
            .query_async::<Option<Vec<u8>>>(&mut conn)
            .await
            .unwrap()
            .expect("a request to take")
    };
    let set_claim = |mut conn: redis::aio::MultiplexedConnection, owner: &'static str| async move {
        redis::cmd("SET")
            .arg(Keys::new("rq").unwrap().claimed("req-1"))
            .arg(owner)
            .query_async::<()>(&mut conn)
            .await
            .unwrap();
    };
    let claim = |mut conn: redis::aio::MultiplexedConnection| async move {
        redis::cmd("GET")
            .arg(Keys::new("rq").unwrap().claimed("req-1"))
            .query_async::<Option<String>>(&mut conn)
            .await
            .unwrap()
    };
    redis::cmd("RPUSH")
        .arg(&list)
        .arg(raw.as_ref())
        .query_async::<()>(&mut conn)
        .await
        .unwrap();

    // Never started: back in the queue, someone else's claim untouched.
    set_claim(conn.clone(), "d2").await;
    let done = requeue(
        &mut shared,
        &keys,
        &list,
        &raw,
        "req-1",
        Attempt::NotStarted { claimed_by: "d1" },
    )
    .await;
    assert_eq!(done.unwrap(), Requeued::Requeued);
    // The same call again, as after a lost answer: no second copy.
    let again = requeue(
        &mut shared,
        &keys,
        &list,
        &raw,
        "req-1",
        Attempt::NotStarted { claimed_by: "d1" },
    )
    .await;
    assert_eq!(again.unwrap(), Requeued::NotHeld);
    assert_eq!(llen(&mut conn, &keys.requests()).await, 1);
    assert_eq!(llen(&mut conn, &list).await, 0);
    assert_eq!(claim(conn.clone()).await.as_deref(), Some("d2"));
    // Never started after its dispatcher claimed it: the claim goes with
    // it, so the next delivery runs (it used to be dropped as claimed).
    // A claim names the delivery, `<dispatcher id>/<n>` (older
    // dispatchers wrote the id alone): released by that dispatcher's id,
    // never by an id it merely starts with.
    for (holder, released) in [("d1", true), ("d1/7", true), ("d10/1", false)] {
        assert_eq!(take(conn.clone(), list.clone()).await, raw.to_vec());
        set_claim(conn.clone(), holder).await;
        let done = requeue(
            &mut shared,
            &keys,
            &list,
            &raw,
            "req-1",
            Attempt::NotStarted { claimed_by: "d1" },
        )
        .await;
        assert_eq!(done.unwrap(), Requeued::Requeued);
        let expected = if released { None } else { Some(holder) };
        assert_eq!(claim(conn.clone()).await.as_deref(), expected, "{holder}");
    }
    redis::cmd("DEL")
        .arg(keys.claimed("req-1"))
        .query_async::<()>(&mut conn)
        .await
        .unwrap();

    // May have run: counted; the claim released only when d1 holds it.
    let may_have_run = Attempt::MayHaveRun {
        claimed_by: "d1",
        ttl: Duration::from_secs(60),
    };
    for round in 1..=MAX_REPEATS {
        assert_eq!(take(conn.clone(), list.clone()).await, raw.to_vec());
        set_claim(conn.clone(), if round == 1 { "d2" } else { "d1" }).await;
        let done = requeue(&mut shared, &keys, &list, &raw, "req-1", may_have_run).await;
        assert_eq!(done.unwrap(), Requeued::Requeued, "repeat {round}");
        let expected = if round == 1 { Some("d2") } else { None };
        assert_eq!(
            claim(conn.clone()).await.as_deref(),
            expected,
            "repeat {round}"
        );
    }
    assert_eq!(take(conn.clone(), list.clone()).await, raw.to_vec());
    let done = requeue(&mut shared, &keys, &list, &raw, "req-1", may_have_run).await;
    assert_eq!(done.unwrap(), Requeued::TooManyRepeats);
    // Nothing moved: the caller answers it from its list.
    assert_eq!(llen(&mut conn, &list).await, 1);
    assert_eq!(llen(&mut conn, &keys.requests()).await, 0);
    let ttl: i64 = redis::cmd("PTTL")
        .arg(keys.repeats("req-1"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        ttl > 0 && ttl <= 60_000,
        "the count expires with the request: {ttl}"
    );
}

/// A dispatcher whose grace period runs out with a request still running
/// removes its heartbeat but keeps its registry entry while its processing
/// list holds anything, so a reaper finds what it left: the GET runs again
/// on another dispatcher instead of waiting out its hold budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dispatcher_stopped_with_a_request_running_leaves_it_to_the_reaper() {
    let redis = start_redis();
    let queue = "graceless";
    let proxy = TestProxy::start(&redis, queue).await;
    let never = tower::service_fn(|_: Request<anteroom_dispatcher::Body>| async {
        tokio::time::sleep(Duration::from_secs(120)).await;
        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from_static(
            b"too late",
        ))))
    });
    let stuck = TestDispatcher::start_built(
        crate::support::dispatcher_builder(&redis, queue)
            .grace(Duration::from_millis(300))
            .reap_interval(None)
            .build()
            .unwrap(),
        never,
    );
    let url = proxy.url("/item");
    let answer = tokio::spawn(async move { web::get(&client(), &url).await });
    let control = control(&redis, queue).await;
    crate::support::until_held(&control, 1).await;
    let id = stuck.id.clone();
    stuck.stop().await;

    let keys = Keys::new(queue).unwrap();
    let mut conn = redis_conn(&redis).await;
    let beating: bool = redis::cmd("EXISTS")
        .arg(keys.dispatcher(&id))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(!beating, "the heartbeat outlived the stop");
    assert!(
        registered(&mut conn, &keys, &id).await,
        "the registry entry went with a request held"
    );
    assert_eq!(llen(&mut conn, &keys.processing(&id)).await, 1);

    // Another dispatcher reaps the list and runs the GET again.
    let fresh = TestDispatcher::start_built(
        crate::support::dispatcher_builder(&redis, queue)
            .reap_interval(Some(Duration::from_millis(200)))
            .build()
            .unwrap(),
        tower::service_fn(|_: Request<anteroom_dispatcher::Body>| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from_static(
                b"again",
            ))))
        }),
    );
    let reply = answer.await.unwrap();
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    assert_eq!(reply.body, Bytes::from_static(b"again"));
    assert!(
        !registered(&mut conn, &keys, &id).await,
        "the reaper left the dead entry"
    );
    fresh.stop().await;
    proxy.stop().await;
}

/// Whether dispatcher `id` is in the registry of `keys`' queue.
async fn registered(conn: &mut redis::aio::MultiplexedConnection, keys: &Keys, id: &str) -> bool {
    redis::cmd("ZSCORE")
        .arg(keys.dispatchers())
        .arg(id)
        .query_async::<Option<f64>>(conn)
        .await
        .unwrap()
        .is_some()
}
