//! Each wire operation of `anteroom_control::queue` against a real
//! redis-server (started by `anteroom-testkit`, one per test).

use std::time::{Duration, Instant};

use anteroom_control::Queue;
use anteroom_control::queue::{self, Attempt, Done, MAX_REPEATS, Presence, Requeued, Role};
use anteroom_protocol::{
    DeadLetter, DispatcherHeartbeat, HttpVersion, Keys, RequestEnvelope, ResponseEnvelope, now_ms,
};
use anteroom_redis::{Durability, SharedConnection};
use anteroom_runtime::Components;
use anteroom_testkit::{LocalRedis, llen, redis_conn, start_redis};
use bytes::Bytes;
use redis::aio::MultiplexedConnection;

async fn setup(queue: &str) -> (LocalRedis, Keys, SharedConnection, MultiplexedConnection) {
    let redis = start_redis();
    let (_, shared) = anteroom_redis::connect(&redis.url(), Duration::from_secs(2))
        .await
        .unwrap();
    let inspect = redis_conn(&redis).await;
    (redis, Keys::new(queue).unwrap(), shared, inspect)
}

fn envelope(id: &str, method: &str, keys: &Keys) -> RequestEnvelope {
    RequestEnvelope {
        id: id.into(),
        method: method.into(),
        uri: "/".into(),
        version: HttpVersion::Http11,
        headers: vec![],
        body: Bytes::new(),
        reply_to: keys.replies("p1"),
        client_addr: None,
        enqueued_at_ms: now_ms(),
        deadline_ms: now_ms() + 60_000,
        dedupe: false,
        stream: false,
        body_follows: false,
        websocket: false,
    }
}

async fn list(conn: &mut MultiplexedConnection, key: &str) -> Vec<Vec<u8>> {
    redis::cmd("LRANGE")
        .arg(key)
        .arg(0)
        .arg(-1)
        .query_async(conn)
        .await
        .unwrap()
}

async fn pttl(conn: &mut MultiplexedConnection, key: &str) -> i64 {
    redis::cmd("PTTL").arg(key).query_async(conn).await.unwrap()
}

async fn set(conn: &mut MultiplexedConnection, key: &str, value: &str) {
    redis::cmd("SET")
        .arg(key)
        .arg(value)
        .query_async::<()>(conn)
        .await
        .unwrap();
}

/// `RPUSH key items…`.
async fn rpush(conn: &mut MultiplexedConnection, key: &str, items: &[&[u8]]) {
    redis::cmd("RPUSH")
        .arg(key)
        .arg(items)
        .query_async::<()>(conn)
        .await
        .unwrap();
}

async fn get(conn: &mut MultiplexedConnection, key: &str) -> Option<String> {
    redis::cmd("GET").arg(key).query_async(conn).await.unwrap()
}

/// Puts dispatcher `id` in the registry with no heartbeat: dead, for a
/// reaper.
async fn register_dead(conn: &mut MultiplexedConnection, keys: &Keys, id: &str) {
    redis::cmd("ZADD")
        .arg(keys.dispatchers())
        .arg(now_ms())
        .arg(id)
        .query_async::<()>(conn)
        .await
        .unwrap();
}

#[tokio::test]
async fn enqueue_then_pull_batch_keeps_arrival_order() {
    let (_redis, keys, mut shared, mut inspect) = setup("q").await;
    queue::enqueue(&mut shared, &keys.requests(), &[b"a", b"b", b"c"], None)
        .await
        .unwrap();
    queue::enqueue(&mut shared, &keys.requests(), &[b"d"], None)
        .await
        .unwrap();
    let processing = keys.processing("d1");
    let first = queue::pull_batch(&mut shared, &keys.requests(), &processing, 2)
        .await
        .unwrap();
    assert_eq!(first, vec![Bytes::from("a"), Bytes::from("b")]);
    // Asking for more than there is takes what there is.
    let rest = queue::pull_batch(&mut shared, &keys.requests(), &processing, 10)
        .await
        .unwrap();
    assert_eq!(rest, vec![Bytes::from("c"), Bytes::from("d")]);
    assert_eq!(llen(&mut inspect, &keys.requests()).await, 0);
    // Newest taken at the head of the processing list.
    assert_eq!(
        list(&mut inspect, &processing).await,
        vec![b"d".to_vec(), b"c".to_vec(), b"b".to_vec(), b"a".to_vec()]
    );
}

#[tokio::test]
async fn enqueue_durable_waits_for_a_replica_only_when_one_is_there() {
    let (redis, keys, mut shared, mut inspect) = setup("q").await;
    let components = Components::new();
    let durability = Durability::spawn(shared.clone(), Duration::from_secs(1), &components);
    // No replica: the first write is waited for (WAIT times out at 0), and
    // from then on none is, so the queue never stalls.
    queue::enqueue(&mut shared, &keys.requests(), &[b"x"], Some(&durability))
        .await
        .unwrap();
    assert!(durability.wait().is_none(), "no replica acknowledged");
    let started = Instant::now();
    queue::enqueue(&mut shared, &keys.requests(), &[b"y"], Some(&durability))
        .await
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(1), "not waited for");
    assert_eq!(llen(&mut inspect, &keys.requests()).await, 2);
    // With a replica connected, WAIT returns its acknowledgement.
    let replica =
        LocalRedis::start_with_args(&["--replicaof", "127.0.0.1", &redis.port().to_string()])
            .unwrap();
    anteroom_testkit::eventually("the replica to sync", Duration::from_secs(20), || {
        let mut conn = shared.clone();
        async move {
            redis::cmd("INFO")
                .arg("replication")
                .query_async::<String>(&mut conn)
                .await
                .is_ok_and(|info| info.contains("state=online"))
        }
    })
    .await;
    anteroom_testkit::eventually(
        "the replica count to be read",
        Duration::from_secs(5),
        || {
            let seen = durability.wait().is_some();
            async move { seen }
        },
    )
    .await;
    let acked = queue::replicate(&mut shared, &durability).await.unwrap();
    assert_eq!(acked, Some(1));
    drop(replica);
    components.shutdown(Duration::from_secs(2)).await.unwrap();
}

/// A dedicated connection for blocking pulls of `keys`' queue, to the
/// Redis at `url`.
async fn blocking_conn(url: &str, keys: &Keys) -> MultiplexedConnection {
    let target = anteroom_redis::Target::parse(url).unwrap();
    anteroom_redis::blocking_for(
        &target,
        &keys.requests(),
        Duration::from_secs(2),
        Duration::from_secs(10),
    )
    .await
    .unwrap()
}

/// One [`queue::pull_blocking`] of `keys`' queue into `processing`.
async fn pull(
    conn: &mut MultiplexedConnection,
    keys: &Keys,
    processing: &str,
    block: Duration,
) -> redis::RedisResult<queue::Blocked> {
    queue::pull_blocking(conn, &keys.requests(), processing, block).await
}

#[tokio::test]
async fn pull_blocking_waits_times_out_and_is_unblocked() {
    let (redis, keys, mut shared, _inspect) = setup("q").await;
    let mut blocking = blocking_conn(&redis.url(), &keys).await;
    let processing = keys.processing("d1");
    // Empty: returns nothing after the block time.
    let started = Instant::now();
    let none = pull(
        &mut blocking,
        &keys,
        &processing,
        Duration::from_millis(100),
    )
    .await
    .unwrap();
    assert_eq!(none.item, None);
    assert_eq!(none.waiting, Some(0));
    assert!(started.elapsed() >= Duration::from_millis(100));
    // A request pushed while it blocks is moved.
    let pulled = {
        let mut blocking = blocking.clone();
        let (keys, processing) = (keys.clone(), processing.clone());
        tokio::spawn(async move {
            pull(&mut blocking, &keys, &processing, Duration::from_secs(5)).await
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    queue::enqueue(&mut shared, &keys.requests(), &[b"r", b"s"], None)
        .await
        .unwrap();
    // The oldest is moved; the LLEN of the same round trip counts the other.
    let pulled = pulled.await.unwrap().unwrap();
    assert_eq!(pulled.item, Some(Bytes::from("r")));
    assert_eq!(pulled.waiting, Some(1));
    let last = pull(&mut blocking, &keys, &processing, Duration::from_secs(1))
        .await
        .unwrap();
    assert_eq!((last.item, last.waiting), (Some(Bytes::from("s")), Some(0)));
    // CLIENT UNBLOCK cuts a long block short, moving nothing.
    let id = queue::pull_client_id(&mut blocking).await.unwrap();
    let cut = {
        let (keys, processing) = (keys.clone(), processing.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            let got = pull(&mut blocking, &keys, &processing, Duration::from_secs(8)).await;
            (got, started.elapsed())
        })
    };
    anteroom_testkit::eventually("the pull to block", Duration::from_secs(5), || {
        let mut conn = shared.clone();
        async move {
            redis::cmd("CLIENT")
                .arg("LIST")
                .query_async::<String>(&mut conn)
                .await
                .is_ok_and(|list| list.contains("cmd=blmove"))
        }
    })
    .await;
    queue::unblock(&mut shared, id).await.unwrap();
    let (got, waited) = cut.await.unwrap();
    assert_eq!(got.unwrap().item, None);
    assert!(waited < Duration::from_secs(8));
}

/// The `LLEN` beside the `BLMOVE` is a hint: when it fails (here a user
/// without `+llen`), the request the `BLMOVE` moved is still returned, not
/// an error that would leave it an orphan of a pull thought failed.
#[tokio::test]
async fn pull_blocking_returns_the_request_when_its_llen_fails() {
    let (redis, keys, mut shared, mut inspect) = setup("q").await;
    redis::cmd("ACL")
        .arg(&[
            "SETUSER", "nollen", "on", ">pw", "~*", "&*", "+@all", "-llen",
        ])
        .exec_async(&mut inspect)
        .await
        .unwrap();
    let url = redis.url().replacen("redis://", "redis://nollen:pw@", 1);
    let mut blocking = blocking_conn(&url, &keys).await;
    queue::enqueue(&mut shared, &keys.requests(), &[b"r"], None)
        .await
        .unwrap();
    let processing = keys.processing("d1");
    let pulled = pull(&mut blocking, &keys, &processing, Duration::from_secs(1))
        .await
        .unwrap();
    assert_eq!(pulled.item, Some(Bytes::from("r")));
    assert_eq!(pulled.waiting, None, "the LLEN was refused");
    assert_eq!(list(&mut inspect, &processing).await, vec![b"r".to_vec()]);
}

#[tokio::test]
async fn complete_pushes_replies_sets_their_ttl_and_removes_the_requests() {
    let (_redis, keys, mut shared, mut inspect) = setup("q").await;
    let processing = keys.processing("d1");
    let a = envelope("a", "GET", &keys).encode();
    let b = envelope("b", "GET", &keys).encode();
    let mut other = envelope("c", "GET", &keys);
    other.reply_to = keys.replies("p2");
    let c = other.encode();
    rpush(&mut inspect, &processing, &[&a, &b, &c]).await;
    let reply = |id: &str| {
        ResponseEnvelope {
            id: id.into(),
            status: 200,
            headers: vec![],
            body: Bytes::from("ok"),
        }
        .encode()
    };
    let (ra, rb) = (reply("a"), reply("b"));
    let p1 = keys.replies("p1");
    let p2 = keys.replies("p2");
    let done = [
        Done {
            reply_to: &p1,
            reply: Some(&ra),
            raw: &a,
            from_tail: false,
        },
        Done {
            reply_to: &p1,
            reply: Some(&rb),
            raw: &b,
            from_tail: true,
        },
        // No reply (its deadline passed): only removed.
        Done {
            reply_to: &p2,
            reply: None,
            raw: &c,
            from_tail: false,
        },
    ];
    queue::complete_now(&mut shared, &processing, Duration::from_secs(60), &done)
        .await
        .unwrap();
    assert_eq!(list(&mut inspect, &p1).await, vec![ra.clone(), rb.clone()]);
    let ttl = pttl(&mut inspect, &p1).await;
    assert!((1..=60_000).contains(&ttl), "reply list ttl {ttl}");
    assert_eq!(llen(&mut inspect, &p2).await, 0);
    assert_eq!(llen(&mut inspect, &processing).await, 0);
    // The proxy's side: both replies in one pop, oldest first.
    let popped = queue::pop_replies(&mut shared, &p1, Duration::from_millis(100), 256)
        .await
        .unwrap();
    assert_eq!(popped, vec![Bytes::from(ra), Bytes::from(rb)]);
    let empty = queue::pop_replies(&mut shared, &p1, Duration::from_millis(100), 256)
        .await
        .unwrap();
    assert!(empty.is_empty());
}

#[tokio::test]
async fn requeue_is_guarded_and_counts_repeats_of_what_may_have_run() {
    let (_redis, keys, mut shared, mut inspect) = setup("q").await;
    let processing = keys.processing("d1");
    let raw = Bytes::from(envelope("r1", "GET", &keys).encode());
    rpush(&mut inspect, &processing, &[raw.as_ref()]).await;
    let requeue = |shared: &mut SharedConnection, attempt| {
        let (keys, processing, raw) = (keys.clone(), processing.clone(), raw.clone());
        let mut conn = shared.clone();
        async move {
            queue::requeue(&mut conn, &keys, &processing, &raw, "r1", attempt)
                .await
                .unwrap()
        }
    };
    assert_eq!(
        requeue(&mut shared, Attempt::NotStarted { claimed_by: "d1" }).await,
        Requeued::Requeued
    );
    assert_eq!(
        list(&mut inspect, &keys.requests()).await,
        vec![raw.to_vec()]
    );
    // Again, as after a lost answer: nothing held, no second copy.
    assert_eq!(
        requeue(&mut shared, Attempt::NotStarted { claimed_by: "d1" }).await,
        Requeued::NotHeld
    );
    assert_eq!(llen(&mut inspect, &keys.requests()).await, 1);
    // May have run: counted, and refused past MAX_REPEATS.
    let may_have_run = Attempt::MayHaveRun {
        claimed_by: "d1",
        ttl: Duration::from_secs(60),
    };
    for _ in 0..MAX_REPEATS {
        queue::pull_batch(&mut shared, &keys.requests(), &processing, 1)
            .await
            .unwrap();
        assert_eq!(requeue(&mut shared, may_have_run).await, Requeued::Requeued);
    }
    queue::pull_batch(&mut shared, &keys.requests(), &processing, 1)
        .await
        .unwrap();
    assert_eq!(
        requeue(&mut shared, may_have_run).await,
        Requeued::TooManyRepeats
    );
    assert_eq!(
        llen(&mut inspect, &processing).await,
        1,
        "left for the caller to answer"
    );
}

#[tokio::test]
async fn dead_letter_moves_the_envelope_with_its_reason() {
    let (_redis, keys, mut shared, mut inspect) = setup("q").await;
    let processing = keys.processing("d1");
    let raw = Bytes::from_static(b"not an envelope");
    rpush(&mut inspect, &processing, &[raw.as_ref()]).await;
    queue::dead_letter(
        &mut shared,
        &keys,
        &processing,
        &raw,
        "does not decode",
        "d1",
    )
    .await
    .unwrap();
    assert_eq!(llen(&mut inspect, &processing).await, 0);
    let dead = list(&mut inspect, &keys.dead()).await;
    assert_eq!(dead.len(), 1);
    let letter = DeadLetter::decode(Bytes::from(dead[0].clone())).unwrap();
    assert_eq!(letter.reason, "does not decode");
    assert_eq!(letter.by, "d1");
    assert_eq!(letter.original, raw);
}

#[tokio::test]
async fn claim_is_taken_once_and_remove_takes_one_copy() {
    let (_redis, keys, mut shared, mut inspect) = setup("q").await;
    let key = keys.claimed("r1");
    assert!(
        queue::claim(&mut shared, &key, "d1", Duration::from_secs(5))
            .await
            .unwrap()
    );
    assert!(
        !queue::claim(&mut shared, &key, "d2", Duration::from_secs(5))
            .await
            .unwrap()
    );
    let ttl = pttl(&mut inspect, &key).await;
    assert!((1..=5_000).contains(&ttl), "claim ttl {ttl}");
    let processing = keys.processing("d1");
    rpush(&mut inspect, &processing, &[b"x", b"x"]).await;
    queue::remove(&mut shared, &processing, b"x").await.unwrap();
    assert_eq!(llen(&mut inspect, &processing).await, 1);
}

fn heartbeat(id: &str) -> DispatcherHeartbeat {
    DispatcherHeartbeat {
        id: id.into(),
        host: "test".into(),
        pid: 1,
        label: String::new(),
        concurrency: 1,
        in_flight: 0,
        websockets: 0,
        paused: false,
        pause_id: None,
        started_at_ms: now_ms(),
        unhealthy: None,
    }
}

#[tokio::test]
async fn keep_present_beats_on_time_and_on_wake_and_leaves_on_stop() {
    let (_redis, keys, shared, mut inspect) = setup("q").await;
    let presence = Presence::new(&keys, Role::Dispatcher, "d1", Duration::from_secs(30));
    let stop = tokio_util::sync::CancellationToken::new();
    let wake = tokio::sync::Notify::new();
    let beats = std::sync::atomic::AtomicUsize::new(0);
    let keep = queue::keep_present(
        &presence,
        shared.clone(),
        Duration::from_secs(60),
        &wake,
        &stop,
        || {
            beats.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            heartbeat("d1")
        },
    );
    let check = async {
        anteroom_testkit::eventually("the first beat", Duration::from_secs(5), || {
            let mut conn = inspect.clone();
            let key = keys.dispatcher("d1");
            async move {
                redis::cmd("EXISTS")
                    .arg(key)
                    .query_async::<bool>(&mut conn)
                    .await
                    .unwrap()
            }
        })
        .await;
        let ttl = pttl(&mut inspect, &keys.dispatcher("d1")).await;
        assert!((1..=30_000).contains(&ttl), "heartbeat ttl {ttl}");
        let score: Option<u64> = redis::cmd("ZSCORE")
            .arg(keys.dispatchers())
            .arg("d1")
            .query_async(&mut inspect)
            .await
            .unwrap();
        assert!(score.is_some(), "in the registry");
        let known: bool = redis::cmd("SISMEMBER")
            .arg(anteroom_protocol::QUEUES_KEY)
            .arg("q")
            .query_async(&mut inspect)
            .await
            .unwrap();
        assert!(!known, "keeping a heartbeat registers no queue");
        // A wake beats at once, long before the 60 s interval.
        wake.notify_one();
        anteroom_testkit::eventually("a beat on wake", Duration::from_secs(5), || {
            let n = beats.load(std::sync::atomic::Ordering::SeqCst);
            async move { n >= 2 }
        })
        .await;
        stop.cancel();
    };
    tokio::join!(keep, check);
    let exists: bool = redis::cmd("EXISTS")
        .arg(keys.dispatcher("d1"))
        .query_async(&mut inspect)
        .await
        .unwrap();
    assert!(!exists, "heartbeat removed on stop");
    let score: Option<u64> = redis::cmd("ZSCORE")
        .arg(keys.dispatchers())
        .arg("d1")
        .query_async(&mut inspect)
        .await
        .unwrap();
    assert_eq!(score, None, "registry entry removed on stop");
    // A proxy or dispatcher registers its queue itself.
    presence.register_queue(&mut shared.clone()).await;
    let known: bool = redis::cmd("SISMEMBER")
        .arg(anteroom_protocol::QUEUES_KEY)
        .arg("q")
        .query_async(&mut inspect)
        .await
        .unwrap();
    assert!(known, "the queue is registered");
}

#[tokio::test]
async fn reap_once_settles_a_dead_dispatchers_list_and_leaves_no_trace() {
    let (redis, keys, mut shared, mut inspect) = setup("q").await;
    register_dead(&mut inspect, &keys, "dead").await;
    let get = Bytes::from(envelope("g", "GET", &keys).encode());
    let post = Bytes::from(envelope("p", "POST", &keys).encode());
    let mut late = envelope("l", "GET", &keys);
    late.deadline_ms = now_ms() - 1;
    let late = Bytes::from(late.encode());
    queue::enqueue(
        &mut shared,
        &keys.processing("dead"),
        &[get.clone(), post, late, Bytes::from_static(b"garbage")],
        None,
    )
    .await
    .unwrap();
    let control = Queue::connect(&redis.url(), "q", Duration::from_secs(2))
        .await
        .unwrap();
    let report = control.reap_once(Duration::from_secs(60)).await.unwrap();
    assert_eq!(report.dispatchers, 1);
    assert_eq!(report.requeued, 1, "the GET");
    assert_eq!(report.answered, 1, "the POST, 502");
    assert_eq!(report.expired, 1, "the late GET");
    assert_eq!(report.dead_lettered, 1, "the garbage");
    assert_eq!(
        list(&mut inspect, &keys.requests()).await,
        vec![get.to_vec()]
    );
    let replies = list(&mut inspect, &keys.replies("p1")).await;
    assert_eq!(replies.len(), 1);
    let reply = ResponseEnvelope::decode(Bytes::from(replies[0].clone())).unwrap();
    assert_eq!((reply.id.as_str(), reply.status), ("p", 502));
    // The reaper's own presence and list are gone; so is the dead one's.
    let registry: Vec<String> = redis::cmd("ZRANGE")
        .arg(keys.dispatchers())
        .arg(0)
        .arg(-1)
        .query_async(&mut inspect)
        .await
        .unwrap();
    assert!(registry.is_empty(), "registry left: {registry:?}");
    let left = anteroom_testkit::keys(&mut inspect, "anteroom:{q}:processing:*").await;
    assert!(left.is_empty(), "processing lists left: {left:?}");
    // An operator's reap names no queue as served (a typo'd --queue must
    // not show up in `anteroom status` for good).
    let known: Vec<String> = redis::cmd("SMEMBERS")
        .arg(anteroom_protocol::QUEUES_KEY)
        .query_async(&mut inspect)
        .await
        .unwrap();
    assert!(known.is_empty(), "{known:?}");
}

/// A reaped request's `dedupe` claim is released when the dead dispatcher
/// holds it, or any dispatcher without a heartbeat: an orphan of a reaper
/// whose claim reply was lost, or a list reaped from a reaper that died
/// mid-way, holds requests a third, dead, dispatcher claimed (the chaos
/// soak's 504: the claim outlived its holder, and every later delivery
/// found it taken). A live dispatcher's claim is kept, and so is every
/// claim but the caller's own on a dispatcher's own requeue.
#[tokio::test]
async fn a_reaped_requests_claim_is_released_when_its_holder_is_dead() {
    let (_redis, keys, mut shared, mut inspect) = setup("q").await;
    let processing = keys.processing("me");
    let raw = Bytes::from(envelope("r1", "GET", &keys).encode());
    set(&mut inspect, &keys.dispatcher("live"), "{}").await;
    let ttl = Duration::from_secs(60);
    let reaped = Attempt::Reaped { dead: "me", ttl };
    let own = Attempt::MayHaveRun {
        claimed_by: "me/1",
        ttl,
    };
    let cases = [
        (
            "gone/7",
            reaped,
            false,
            "a delivery of a dispatcher without heartbeat",
        ),
        (
            "gone",
            reaped,
            false,
            "an older claim, the id alone, without heartbeat",
        ),
        ("me/2", reaped, false, "the dead dispatcher's own delivery"),
        ("live/3", reaped, true, "a live dispatcher's delivery"),
        (
            "gone/7",
            own,
            true,
            "another's claim, on a dispatcher's own requeue",
        ),
        (
            "me/1",
            own,
            false,
            "this delivery's claim, on its own requeue",
        ),
    ];
    for (holder, attempt, kept, case) in cases {
        redis::cmd("DEL")
            .arg(keys.requests())
            .arg(keys.repeats("r1"))
            .query_async::<()>(&mut inspect)
            .await
            .unwrap();
        rpush(&mut inspect, &processing, &[raw.as_ref()]).await;
        set(&mut inspect, &keys.claimed("r1"), holder).await;
        let done = queue::requeue(&mut shared, &keys, &processing, &raw, "r1", attempt)
            .await
            .unwrap();
        assert_eq!(done, Requeued::Requeued, "{case}");
        let claim = get(&mut inspect, &keys.claimed("r1")).await;
        assert_eq!(claim.is_some(), kept, "{case}: claim {claim:?}");
    }
}

/// A reaper that died mid-way is reaped in turn: the requests it had
/// claimed from another dead dispatcher run again (their claims, held by
/// the first dead one, released).
#[tokio::test]
async fn a_dead_reapers_list_is_reaped_with_the_claims_of_the_dispatcher_it_reaped() {
    let (redis, keys, mut shared, mut inspect) = setup("q").await;
    register_dead(&mut inspect, &keys, "reaper").await;
    let mut keyed = envelope("k", "POST", &keys);
    keyed.headers = vec![("idempotency-key".into(), Bytes::from_static(b"k-1"))];
    keyed.dedupe = true;
    let keyed = Bytes::from(keyed.encode());
    queue::enqueue(
        &mut shared,
        &keys.processing("reaper"),
        std::slice::from_ref(&keyed),
        None,
    )
    .await
    .unwrap();
    // Claimed by "first", whose list the dead reaper had taken.
    set(&mut inspect, &keys.claimed("k"), "first/a1").await;
    let control = Queue::connect(&redis.url(), "q", Duration::from_secs(2))
        .await
        .unwrap();
    let report = control.reap_once(Duration::from_secs(60)).await.unwrap();
    assert_eq!((report.dispatchers, report.requeued), (1, 1));
    assert_eq!(
        list(&mut inspect, &keys.requests()).await,
        vec![keyed.to_vec()]
    );
    assert_eq!(
        get(&mut inspect, &keys.claimed("k")).await,
        None,
        "the dead dispatcher's claim is released"
    );
}

/// A completion `from_tail` removes the copy nearest the tail (`LREM -1`),
/// one without it the copy nearest the head (`LREM 1`).
#[tokio::test]
async fn complete_looks_for_the_request_from_the_end_it_is_told() {
    let (_redis, keys, mut shared, mut inspect) = setup("q").await;
    let processing = keys.processing("d1");
    let (x, y) = (b"x".to_vec(), b"y".to_vec());
    rpush(&mut inspect, &processing, &[&x, &y, &x]).await;
    let p1 = keys.replies("p1");
    let done = |from_tail| Done {
        reply_to: &p1,
        reply: None,
        raw: &x,
        from_tail,
    };
    let ttl = Duration::from_secs(60);
    queue::complete_now(&mut shared, &processing, ttl, &[done(true)])
        .await
        .unwrap();
    assert_eq!(
        list(&mut inspect, &processing).await,
        vec![x.clone(), y.clone()]
    );
    rpush(&mut inspect, &processing, &[&x]).await;
    queue::complete_now(&mut shared, &processing, ttl, &[done(false)])
        .await
        .unwrap();
    assert_eq!(list(&mut inspect, &processing).await, vec![y, x]);
}
