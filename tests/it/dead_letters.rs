//! `anteroom dead list|show|replay|purge` against real processes: a
//! proxied request a dispatcher set aside (its deadline rewritten too far
//! ahead, as a proxy with a broken clock would write it) is replayed while
//! its client waits and answered 200; a letter whose client is gone is
//! replayed only when the operator says so; one that does not decode is
//! never replayed; purge keeps what is younger than --older-than.

use std::time::Duration;

use anteroom_protocol::{Keys, RequestEnvelope, now_ms};
use bytes::Bytes;
use http::StatusCode;
use serde_json::Value;

use crate::support::app::recording_upstream;
use crate::support::bin::{BinProcess, command, start_proxy};
use crate::support::web::{self, client};
use crate::support::{
    control, eventually, pause_acknowledged, redis_conn, start_redis, until_dispatching,
};

/// `anteroom dead ARGS --redis URL --queue Q`: status and stdout (and
/// stderr after it when it failed).
async fn dead(url: &str, queue: &str, args: &[&str]) -> (std::process::ExitStatus, String) {
    let mut all: Vec<String> = vec!["dead".into()];
    all.extend(args.iter().map(|s| s.to_string()));
    all.extend(["--redis".into(), url.into(), "--queue".into(), queue.into()]);
    let out = tokio::task::spawn_blocking(move || command().args(&all).output().unwrap())
        .await
        .unwrap();
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        // Errors go to stderr: the caller reads both.
        text.push_str(&String::from_utf8_lossy(&out.stderr));
    }
    (out.status, text)
}

async fn listed(url: &str, queue: &str) -> Vec<Value> {
    let (status, out) = dead(url, queue, &["list", "--json"]).await;
    assert!(status.success(), "{out}");
    serde_json::from_str(&out).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_shown_replayed_and_purged() {
    let redis = start_redis();
    let url = redis.url();
    let queue = "letters";
    let keys = Keys::new(queue).unwrap();
    let mut conn = redis_conn(&redis).await;
    let (upstream, ran) = recording_upstream().await;
    let (_proxy, base) = start_proxy(&redis, queue, "60s").await;
    let _dispatcher = BinProcess::spawn(&[
        "dispatch",
        "--redis",
        &url,
        "--queue",
        queue,
        "--upstream",
        &upstream,
    ]);
    let ctl = control(&redis, queue).await;
    until_dispatching(&ctl).await;

    // A client's POST waits while the queue is paused; its envelope is
    // rewritten with a deadline three days ahead, which the dispatcher
    // refuses to run: a dead letter whose client still waits.
    pause_acknowledged(&ctl, "dead letter test").await;
    let c = client();
    let waiting = {
        let (c, url) = (c.clone(), format!("{base}/run/kept"));
        tokio::spawn(async move { web::post(&c, &url, "an order").await })
    };
    eventually("the request queued", Duration::from_secs(10), || async {
        ctl.status().await.unwrap().waiting == 1
    })
    .await;
    let raw: Vec<u8> = redis::cmd("RPOP")
        .arg(keys.requests())
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut envelope = RequestEnvelope::decode(Bytes::from(raw)).unwrap();
    let id = envelope.id.clone();
    envelope.deadline_ms = now_ms() + 3 * 24 * 3600 * 1000;
    // `dedupe` (as a proxy with `--enqueue-timeout` writes it), and claimed
    // by a delivery that is no more: the replay must release the claim, or
    // its delivery drops the request as claimed.
    envelope.dedupe = true;
    redis::cmd("SET")
        .arg(keys.claimed(&id))
        .arg("gone/1")
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    // One whose proxy is gone (a reply list no proxy reads), and bytes
    // that are no request at all.
    let mut orphan = envelope.clone();
    orphan.id = "orphan-1".into();
    orphan.uri = "/run/orphan".into();
    orphan.reply_to = keys.replies("gone-proxy");
    orphan.deadline_ms = envelope.deadline_ms;
    // The orphan as a proxy run with `--envelope-version 1` writes it: a
    // replay puts it back in that layout.
    for raw in [
        envelope.encode(),
        orphan.encode_as(anteroom_protocol::EnvelopeVersion::V1),
        b"not an envelope".to_vec(),
    ] {
        redis::cmd("LPUSH")
            .arg(keys.requests())
            .arg(raw)
            .query_async::<()>(&mut conn)
            .await
            .unwrap();
    }
    ctl.resume().await.unwrap();
    eventually("three dead letters", Duration::from_secs(10), || async {
        ctl.status().await.unwrap().dead_letters == 3
    })
    .await;

    // list: newest first, each with its client's state.
    let letters = listed(&url, queue).await;
    assert_eq!(letters.len(), 3, "{letters:?}");
    let by_id = |id: &str| {
        letters
            .iter()
            .find(|l| l["id"] == id)
            .unwrap_or_else(|| panic!("{id} in {letters:?}"))
            .clone()
    };
    let kept = by_id(&id);
    assert_eq!(kept["client"], "waiting");
    assert_eq!(kept["method"], "POST");
    assert_eq!(kept["target"], "/run/kept");
    assert!(
        kept["reason"].as_str().unwrap().contains("deadline"),
        "{kept}"
    );
    assert_eq!(by_id("orphan-1")["client"], "proxy-gone");
    let garbage = letters
        .iter()
        .find(|l| l["client"] == "unknown")
        .expect("the undecodable letter");
    let garbage_id = garbage["id"].as_str().unwrap().to_owned();
    assert!(garbage_id.starts_with('#'), "{garbage_id}");
    let (status, text) = dead(&url, queue, &["list"]).await;
    assert!(status.success());
    assert!(text.contains("POST /run/kept"), "{text}");

    // show: the whole request, the body byte-exact.
    let (status, shown) = dead(&url, queue, &["show", &id, "--json"]).await;
    assert!(status.success(), "{shown}");
    let shown: Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(shown["body"], "an order");
    assert!(shown["headers"].as_array().unwrap().len() > 1, "{shown}");
    let (status, text) = dead(&url, queue, &["show", &garbage_id]).await;
    assert!(status.success());
    assert!(text.contains("not an envelope"), "{text}");
    let (status, text) = dead(&url, queue, &["show", "no-such-letter"]).await;
    assert!(!status.success());
    assert!(text.contains("no dead letter \"no-such-letter\""), "{text}");

    // replay of one whose client is gone, or that does not decode:
    // refused, and it stays.
    let (status, text) = dead(&url, queue, &["replay", "orphan-1"]).await;
    assert!(!status.success(), "{text}");
    assert!(text.contains("--without-client"), "{text}");
    let (status, text) = dead(&url, queue, &["replay", &garbage_id]).await;
    assert!(!status.success(), "{text}");

    // replay of the waiting one: queued with a fresh deadline, run once,
    // and its client answered.
    let (status, text) = dead(&url, queue, &["replay", &id]).await;
    assert!(status.success(), "{text}");
    let answer = tokio::time::timeout(Duration::from_secs(20), waiting)
        .await
        .expect("the client answered after the replay")
        .unwrap();
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(answer.headers["x-ran"], "kept");

    // --all --without-client: the orphan runs too (no one reads its
    // answer); the undecodable one stays. Queued while paused, it is seen
    // to go back in version 1, the layout it was written in.
    pause_acknowledged(&ctl, "replay in the letter's own version").await;
    let (status, text) = dead(
        &url,
        queue,
        &["replay", "--all", "--without-client", "--json"],
    )
    .await;
    assert!(status.success(), "{text}");
    let report: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(report["replayed"], 1, "{report}");
    assert_eq!(report["skipped"], 1, "{report}");
    let queued: Vec<Vec<u8>> = redis::cmd("LRANGE")
        .arg(keys.requests())
        .arg(0)
        .arg(-1)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(queued.len(), 1);
    assert_eq!(queued[0][0], 1, "replayed in version 1");
    ctl.resume().await.unwrap();
    eventually("the orphan run", Duration::from_secs(10), || async {
        ran.lock().unwrap().iter().any(|r| r == "orphan")
    })
    .await;
    let left = listed(&url, queue).await;
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0]["client"], "unknown");

    // purge: a letter set aside two hours ago goes with --older-than 1h,
    // the younger one stays; then all goes.
    let old_letter = anteroom_protocol::DeadLetter {
        reason: "set aside long ago".into(),
        at_ms: now_ms() - 2 * 3600 * 1000,
        by: "test".into(),
        original: Bytes::from_static(b"old bytes"),
    };
    redis::cmd("RPUSH")
        .arg(keys.dead())
        .arg(old_letter.encode())
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    let (status, text) = dead(&url, queue, &["purge", "--older-than", "1h", "--json"]).await;
    assert!(status.success());
    let purged: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        (purged["purged"].as_u64(), purged["kept"].as_u64()),
        (Some(1), Some(1))
    );
    let (status, text) = dead(&url, queue, &["replay", "--all", "--hold", "25h"]).await;
    assert!(!status.success(), "{text}");
    assert!(text.contains("at most 24h"), "{text}");
    let (status, text) = dead(&url, queue, &["purge"]).await;
    assert!(status.success(), "{text}");
    assert!(text.contains("purged 1 "), "{text}");
    assert!(listed(&url, queue).await.is_empty());
    let ran = ran.lock().unwrap().clone();
    assert_eq!(ran.iter().filter(|r| *r == "kept").count(), 1, "{ran:?}");
    assert_eq!(ran.iter().filter(|r| *r == "orphan").count(), 1, "{ran:?}");
}
