//! Hostile inputs against real processes (the `anteroom` binary as proxy
//! and dispatcher, httpbin under gunicorn, a private redis-server), each
//! while a monitor sends ordinary requests and checks none of them fails
//! or stalls.

use std::time::{Duration, Instant};

use anteroom_protocol::{DeadLetter, HttpVersion, Keys, RequestEnvelope, ResponseEnvelope, now_ms};
use bytes::Bytes;
use http::StatusCode;

use crate::support::httpbin::HttpbinStack;
use crate::support::web::{self, client};
use crate::support::{eventually, redis_conn};

/// Ordinary GETs through the proxy, one every 100 ms, until stopped.
struct Monitor {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<Vec<(StatusCode, Duration)>>,
}

impl Monitor {
    fn start(url: String) -> Self {
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            let c = client();
            let mut seen = Vec::new();
            while !*stopped.borrow() {
                let started = Instant::now();
                let status = match tokio::time::timeout(
                    Duration::from_secs(10),
                    web::try_send(
                        &c,
                        http::Request::get(&url).body(Default::default()).unwrap(),
                    ),
                )
                .await
                {
                    Ok(Ok(reply)) => reply.status,
                    _ => StatusCode::GATEWAY_TIMEOUT,
                };
                seen.push((status, started.elapsed()));
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(100)) => {}
                    _ = stopped.changed() => {}
                }
            }
            seen
        });
        Self { stop, task }
    }

    /// Stops, and checks every request was answered 200 within `limit`.
    async fn check(self, limit: Duration) {
        let _ = self.stop.send(true);
        let seen = self.task.await.unwrap();
        assert!(
            seen.len() >= 5,
            "the monitor sent only {} requests",
            seen.len()
        );
        let worst = seen.iter().map(|(_, took)| *took).max().unwrap();
        let failed: Vec<_> = seen.iter().filter(|(s, _)| *s != StatusCode::OK).collect();
        assert!(failed.is_empty(), "ordinary requests failed: {failed:?}");
        assert!(
            worst < limit,
            "an ordinary request took {worst:?} (of {})",
            seen.len()
        );
    }
}

fn envelope(id: &str, reply_to: &str) -> RequestEnvelope {
    RequestEnvelope {
        id: id.into(),
        method: "GET".into(),
        uri: "/anything".into(),
        version: HttpVersion::Http11,
        headers: vec![("host".into(), Bytes::from_static(b"app.example"))],
        body: Bytes::new(),
        reply_to: reply_to.into(),
        client_addr: None,
        enqueued_at_ms: now_ms(),
        deadline_ms: now_ms() + 20_000,
        dedupe: false,
    }
}

/// Envelopes pushed straight into the queue by someone with Redis write
/// access: a `reply_to` naming an unrelated key, a deadline a year ahead,
/// 40,000 header fields (past the 32,768 at which `http::HeaderMap`
/// panics), and a reply list that is not a list. None is run against its
/// key, none panics a dispatcher, the invalid one is answered 502, and
/// ordinary requests keep flowing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_envelopes_are_set_aside_and_nothing_stalls() {
    let stack = HttpbinStack::start("foreign", &[]).await;
    let keys = Keys::new("foreign").unwrap();
    let mut conn = redis_conn(&stack.redis).await;
    let monitor = Monitor::start(format!("{}/anything", stack.url));

    let _: () = redis::cmd("SET")
        .arg("session:42")
        .arg("precious")
        .query_async(&mut conn)
        .await
        .unwrap();
    // A reply list of this queue's form that holds a string.
    let squatted = keys.replies("squatter");
    let _: () = redis::cmd("SET")
        .arg(&squatted)
        .arg("not a list")
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut far = envelope("far", &keys.replies("p"));
    far.deadline_ms = now_ms() + 365 * 24 * 3600 * 1000;
    let mut many = envelope("many", &keys.replies("victim-proxy"));
    many.headers = (0..40_000)
        .map(|i| (format!("x-h{i}"), Bytes::from_static(b"v")))
        .collect();
    for env in [
        envelope("foreign", "session:42"),
        far,
        many,
        envelope("squatted", &squatted),
    ] {
        let _: () = redis::cmd("LPUSH")
            .arg(keys.requests())
            .arg(env.encode())
            .query_async(&mut conn)
            .await
            .unwrap();
    }

    eventually("three dead letters", Duration::from_secs(20), || {
        let (mut conn, key) = (conn.clone(), keys.dead());
        async move {
            redis::cmd("LLEN")
                .arg(key)
                .query_async::<usize>(&mut conn)
                .await
                .unwrap()
                == 3
        }
    })
    .await;
    let dead: Vec<Bytes> = redis::cmd("LRANGE")
        .arg(keys.dead())
        .arg(0)
        .arg(-1)
        .query_async(&mut conn)
        .await
        .unwrap();
    let reasons: Vec<String> = dead
        .into_iter()
        .map(|raw| DeadLetter::decode(raw).unwrap().reason)
        .collect();
    assert!(
        reasons.iter().any(|r| r.contains("is not a reply list")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("deadline")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("40000 header fields")),
        "{reasons:?}"
    );
    // The unrelated key is untouched: same value, no TTL.
    let value: String = redis::cmd("GET")
        .arg("session:42")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(value, "precious");
    let ttl: i64 = redis::cmd("PTTL")
        .arg("session:42")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(ttl, -1);
    // The invalid request's client is answered 502.
    eventually("the 502 reply", Duration::from_secs(10), || {
        let (mut conn, key) = (conn.clone(), keys.replies("victim-proxy"));
        async move {
            redis::cmd("LLEN")
                .arg(key)
                .query_async::<usize>(&mut conn)
                .await
                .unwrap()
                == 1
        }
    })
    .await;
    let replies: Vec<Bytes> = redis::cmd("LRANGE")
        .arg(keys.replies("victim-proxy"))
        .arg(0)
        .arg(-1)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(replies.len(), 1);
    let reply = ResponseEnvelope::decode(replies[0].clone()).unwrap();
    assert_eq!((reply.id.as_str(), reply.status), ("many", 502));

    // The squatted reply list's completion is given up without holding
    // the others back: the monitor's requests all went through at once.
    tokio::time::sleep(Duration::from_secs(2)).await;
    monitor.check(Duration::from_secs(2)).await;
}
