//! Redis under memory pressure (`maxmemory` with `noeviction`): proxies
//! answer 503 promptly instead of queueing into a full Redis, requests
//! already queued are still run and answered, a dispatcher does not look
//! dead while Redis refuses its writes, and service resumes as soon as
//! memory frees. Real processes: redis-server, the `anteroom` binary as
//! proxy and dispatcher, an upstream that records what it ran.

use std::collections::HashMap;
use std::sync::PoisonError;
use std::time::{Duration, Instant};

use anteroom_testkit::free_port;
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;

use crate::support::app::recording_upstream;
use crate::support::bin::BinProcess;
use crate::support::load::Load;
use crate::support::web::{client, send};
use crate::support::{
    control, eventually, keys, pause_acknowledged, redis_conn, start_redis, until_dispatching,
    wait_for_port,
};

/// What the test's Redis counts against its limit, and the limit (the
/// proxy's own reading, `anteroom_redis::memory_info`).
async fn memory(conn: &mut redis::aio::MultiplexedConnection) -> (u64, u64) {
    let info = anteroom_redis::memory_info(conn)
        .await
        .expect("INFO memory");
    (info.used, info.max)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_redis_gets_503s_at_once_and_loses_nothing() {
    let redis = start_redis();
    let mut conn = redis_conn(&redis).await;
    let queue = "pressure";
    let (upstream, ran) = recording_upstream().await;
    let port = free_port().unwrap();
    let listen = format!("127.0.0.1:{port}");
    let url = redis.url();
    // With an enqueue timeout, envelopes carry `dedupe`: claims too must
    // work past maxmemory.
    let _proxy = BinProcess::spawn(&[
        "proxy",
        "--listen",
        &listen,
        "--redis",
        &url,
        "--queue",
        queue,
        "--hold",
        "20s",
        "--enqueue-timeout",
        "1s",
    ]);
    let _dispatcher = BinProcess::spawn(&[
        "dispatch",
        "--redis",
        &url,
        "--queue",
        queue,
        "--upstream",
        &upstream,
        "--heartbeat-ttl",
        "2s",
    ]);
    wait_for_port(port).await;
    let control = control(&redis, queue).await;
    until_dispatching(&control).await;

    // 1. The queue paused, so requests pile up in Redis; a limit 2 MiB
    //    above what Redis uses now; 16 clients posting 200 KiB each.
    pause_acknowledged(&control, "pressure test").await;
    let (used, _) = memory(&mut conn).await;
    let limit = used + 2 * 1024 * 1024;
    set_maxmemory(&mut conn, limit).await;
    let base = format!("http://{listen}");
    // Each body starts with its request's id, the path's last segment.
    let load = Load::start_with(16, move |w, n| {
        let mut body = format!("{w}-{n}\n").into_bytes();
        body.resize(200 * 1024, b'x');
        Request::post(format!("{base}/run/{w}-{n}"))
            .body(Full::new(Bytes::from(body)))
            .unwrap()
    });
    // The proxy stops queueing at its high watermark (90 %), or at Redis's
    // own OOM (a burst can reach the limit between two readings): a new
    // request then gets 503 with Retry-After, at once. A probe sent
    // before that is queued instead (and runs after the resume).
    let c = client();
    let filling = Instant::now();
    let mut n = 0;
    let refused = loop {
        n += 1;
        let id = format!("refused-{n}");
        let probe = send(
            &c,
            Request::post(format!("http://{listen}/run/{id}"))
                .body(Full::new(Bytes::from_static(b"x")))
                .unwrap(),
        );
        if let Ok(answer) = tokio::time::timeout(Duration::from_secs(1), probe).await {
            if answer.status == StatusCode::SERVICE_UNAVAILABLE {
                assert!(answer.headers.contains_key(http::header::RETRY_AFTER));
                break id;
            }
        }
        assert!(
            filling.elapsed() < Duration::from_secs(20),
            "no 503 within 20 s of filling"
        );
    };
    println!("full in {:?}", filling.elapsed());

    // 2. Resumed: what was queued runs and is answered, its memory frees,
    //    and new requests are queued again.
    control.resume().await.unwrap();
    eventually("requests served again", Duration::from_secs(20), || async {
        ran.lock().unwrap_or_else(PoisonError::into_inner).len() > 40
    })
    .await;
    let summary = load.finish().await;

    // Every client got an answer, 200 or a prompt 503; only the 200s ran,
    // each once.
    let mut by_status: HashMap<Option<u16>, usize> = HashMap::new();
    for s in &summary.samples {
        *by_status.entry(s.status.map(|s| s.as_u16())).or_default() += 1;
    }
    let slowest_503 = summary
        .samples
        .iter()
        .filter(|s| s.status == Some(StatusCode::SERVICE_UNAVAILABLE))
        .map(|s| s.latency)
        .max()
        .unwrap_or_default();
    println!(
        "filling: {} requests {by_status:?}, slowest 503 {slowest_503:?}",
        summary.samples.len()
    );
    assert_eq!(summary.connection_errors(), 0);
    assert!(
        summary.samples.iter().all(|s| matches!(
            s.status,
            Some(StatusCode::OK | StatusCode::SERVICE_UNAVAILABLE)
        )),
        "{by_status:?}"
    );
    assert!(
        by_status.get(&Some(503)).is_some_and(|n| *n > 0),
        "{by_status:?}"
    );
    assert!(
        by_status.get(&Some(200)).is_some_and(|n| *n > 0),
        "{by_status:?}"
    );
    assert!(slowest_503 < Duration::from_secs(1), "{slowest_503:?}");
    let runs = runs(&ran);
    let twice: Vec<_> = runs.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "run twice: {twice:?}");
    assert_eq!(runs.get(&refused), None, "a request answered 503 ran");
    let id = |sent: &Bytes| {
        let line = sent.split(|b| *b == b'\n').next().unwrap_or_default();
        String::from_utf8_lossy(line).into_owned()
    };
    for s in &summary.samples {
        let id = id(&s.sent);
        let times = runs.get(&id).copied().unwrap_or(0);
        match s.status {
            Some(StatusCode::OK) => assert_eq!(times, 1, "{id} answered 200, ran {times} times"),
            _ => assert_eq!(times, 0, "{id} answered {:?}, yet ran", s.status),
        }
    }

    // 3. Redis over its maxmemory (its data grew past the limit):
    //    it refuses every write that grows memory (OOM). Requests queued
    //    before are still taken and answered, new ones get 503 at once,
    //    the dispatcher outlives its 2 s heartbeat TTL, and service
    //    resumes when the key goes.
    // Drained: the proxy queues requests again (an OOM counts until its
    // next reading of Redis's memory).
    let mut n = 0;
    eventually("the proxy queueing again", Duration::from_secs(20), || {
        n += 1;
        let (c, url) = (c.clone(), format!("http://{listen}/run/ready-{n}"));
        async move {
            let answer = send(&c, Request::post(url).body(Full::default()).unwrap()).await;
            answer.status == StatusCode::OK
        }
    })
    .await;
    pause_acknowledged(&control, "pressure test").await;
    let claims = keys(&mut conn, "anteroom:{pressure}:claimed:*").await.len();
    let held: Vec<_> = (0..4)
        .map(|i| {
            let (c, url) = (c.clone(), format!("http://{listen}/run/held-{i}"));
            tokio::spawn(async move {
                send(&c, Request::post(url).body(Full::default()).unwrap()).await
            })
        })
        .collect();
    eventually("4 requests waiting", Duration::from_secs(10), || async {
        let s = control.status().await.unwrap();
        s.waiting == 4
    })
    .await;
    // Full: the limit set below what Redis uses (as when data grows past
    // it), so Redis refuses every write that may grow memory. Half of it:
    // Redis's use falls as buffers and expiring keys are freed (a limit
    // just 256 KiB below let a later request through, once in five runs).
    let (used, _) = memory(&mut conn).await;
    set_maxmemory(&mut conn, used / 2).await;
    let full = Instant::now();
    let (used, max) = memory(&mut conn).await;
    assert!(used > max, "Redis is not over its limit: {used} of {max}");
    control.resume().await.unwrap();
    for answer in held {
        let answer = answer.await.unwrap();
        assert_eq!(
            answer.status,
            StatusCode::OK,
            "held while full: {}",
            answer.text()
        );
    }
    println!(
        "4 requests queued before Redis filled: answered in {:?}",
        full.elapsed()
    );
    assert_eq!(
        keys(&mut conn, "anteroom:{pressure}:claimed:*").await.len(),
        claims + 4,
        "the dedupe requests taken while Redis was full ran unclaimed"
    );
    refused_at_once(&c, &listen, "refused-full").await;
    // Beats' worth of refused SETs: alive only because the heartbeat is
    // kept another way (PEXPIRE). At least 3 s (its TTL is 2 s) after the
    // answers, and 5 s after Redis filled.
    let mut checks = 0;
    while checks < 12 || full.elapsed() < Duration::from_secs(5) {
        checks += 1;
        let status = control.status().await.unwrap();
        assert_eq!(
            status.dispatchers.len(),
            1,
            "the dispatcher looked dead while Redis was full ({:?} in)",
            full.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Memory frees (here: the limit goes back up).
    set_maxmemory(&mut conn, limit).await;
    let freed = Instant::now();
    let resumed = loop {
        let answer = send(
            &c,
            Request::post(format!(
                "http://{listen}/run/after-{}",
                freed.elapsed().as_millis()
            ))
            .body(Full::new(Bytes::from_static(b"x")))
            .unwrap(),
        )
        .await;
        if answer.status == StatusCode::OK {
            break freed.elapsed();
        }
        assert!(
            freed.elapsed() < Duration::from_secs(2),
            "no service 2 s after memory freed: {}",
            answer.status
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    println!("service back {resumed:?} after memory freed");
    let runs = self::runs(&ran);
    assert_eq!(runs.get("refused-full"), None, "a request answered 503 ran");
    for i in 0..4 {
        assert_eq!(runs.get(format!("held-{i}").as_str()), Some(&1));
    }
}

async fn set_maxmemory(conn: &mut redis::aio::MultiplexedConnection, bytes: u64) {
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg(bytes)
        .query_async::<()>(conn)
        .await
        .unwrap();
}

/// How often each id ran.
fn runs(ran: &crate::support::app::Ran) -> HashMap<String, usize> {
    let mut runs = HashMap::new();
    for id in ran.lock().unwrap_or_else(PoisonError::into_inner).iter() {
        *runs.entry(id.clone()).or_default() += 1;
    }
    runs
}

/// A POST to `/run/ID` gets 503 with Retry-After, within a second.
async fn refused_at_once(c: &crate::support::web::TestClient, listen: &str, id: &str) {
    let asked = Instant::now();
    let refused = send(
        c,
        Request::post(format!("http://{listen}/run/{id}"))
            .body(Full::new(Bytes::from_static(b"x")))
            .unwrap(),
    )
    .await;
    assert_eq!(
        refused.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        refused.text()
    );
    assert!(refused.headers.contains_key(http::header::RETRY_AFTER));
    assert!(
        asked.elapsed() < Duration::from_secs(1),
        "{:?}",
        asked.elapsed()
    );
}

/// `anteroom status` shows Redis's memory, and warns when its policy
/// evicts keys (any policy but `noeviction`, once there is a maxmemory);
/// `--json` carries the same.
#[test]
fn status_warns_when_redis_evicts_keys() {
    let redis = anteroom_testkit::LocalRedis::start_with_args(&[
        "--maxmemory",
        "64mb",
        "--maxmemory-policy",
        "allkeys-lru",
    ])
    .unwrap();
    let status = |args: &[&str]| {
        let out = crate::support::bin::command()
            .args(["status", "--redis", &redis.url(), "--queue", "web"])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let text = status(&[]);
    assert!(
        text.contains("of maxmemory 64.0 MiB") && text.contains("policy allkeys-lru"),
        "{text}"
    );
    assert!(
        text.contains("WARNING: maxmemory-policy allkeys-lru evicts keys"),
        "{text}"
    );
    let json: serde_json::Value = serde_json::from_str(&status(&["--json"])).unwrap();
    assert_eq!(json["memory"]["evicts"], true, "{json}");
    assert_eq!(
        json["memory"]["maxmemory_bytes"],
        64 * 1024 * 1024,
        "{json}"
    );

    let safe = anteroom_testkit::LocalRedis::start_with_args(&[
        "--maxmemory",
        "64mb",
        "--maxmemory-policy",
        "noeviction",
    ])
    .unwrap();
    let out = crate::support::bin::command()
        .args(["status", "--redis", &safe.url(), "--queue", "web"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("policy noeviction"), "{text}");
    assert!(!text.contains("WARNING"), "{text}");
}
