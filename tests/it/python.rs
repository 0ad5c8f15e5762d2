//! The wire format as a contract: `examples/python_dispatcher` (redis-py,
//! written from docs/protocol.md alone) serves a queue behind the Rust
//! proxy, honours a pause, and sets aside what does not decode.

use std::process::{Command, Stdio};
use std::time::Duration;

use anteroom_protocol::Keys;
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;

use crate::support::web::{self, client, send};
use crate::support::{TestProxy, control, eventually, llen, redis_conn, start_redis, venv};

const SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/examples/python_dispatcher/dispatcher.py"
);

/// The Python dispatcher as a child process, stopped with SIGTERM on drop.
struct PythonDispatcher(std::process::Child);

impl Drop for PythonDispatcher {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_dispatcher_serves_the_rust_proxy() {
    let python = venv::bin("python");
    let has_redis_py = Command::new(&python)
        .args(["-c", "import redis"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        has_redis_py,
        "redis-py is missing from the project's virtual environment: `bash scripts/test.sh` installs tests/requirements.txt"
    );
    let redis = start_redis();
    let proxy = TestProxy::start(&redis, "py").await;
    let child = Command::new(&python)
        .args([SCRIPT, &redis.url(), "py"])
        .stdin(Stdio::null())
        .spawn()
        .expect("start the python dispatcher");
    let python = PythonDispatcher(child);
    let queue = control(&redis, "py").await;
    eventually(
        "the python dispatcher's heartbeat",
        Duration::from_secs(20),
        || async { queue.status().await.unwrap().dispatchers.len() == 1 },
    )
    .await;

    let c = client();
    let r = web::get(&c, &proxy.url("/hello")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.text(), "hello from python\n");
    // Bytes round-trip both ways, header values included (Latin-1 in JSON).
    let body = Bytes::from_static(b"\x00\x01 binary \xff\xfe");
    let req = Request::post(proxy.url("/echo?x=1"))
        .header("content-type", "application/octet-stream")
        .header(
            "x-test-raw",
            http::HeaderValue::from_bytes(b"caf\xe9").unwrap(),
        )
        .body(Full::new(body.clone()))
        .unwrap();
    let r = send(&c, req).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body, body);
    assert_eq!(r.headers["x-test-raw"].as_bytes(), b"caf\xe9");
    assert_eq!(r.headers["x-method"], "POST");
    assert!(r.headers.contains_key("x-request-id"));
    let r = web::get(&c, &proxy.url("/missing")).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);

    // A pause is acknowledged in the heartbeat; nothing runs until resume.
    queue.pause("test", None, false).await.unwrap();
    let quiet = queue
        .wait_quiescent(Duration::from_secs(10), |_| {})
        .await
        .unwrap();
    assert!(quiet.quiescent);
    let waiting = tokio::spawn({
        let (c, url) = (c.clone(), proxy.url("/hello"));
        async move { web::get(&c, &url).await }
    });
    let mut conn = redis_conn(&redis).await;
    let keys = Keys::new("py").unwrap();
    eventually(
        "the request to wait in redis",
        Duration::from_secs(10),
        || {
            let (mut conn, key) = (conn.clone(), keys.requests());
            async move { llen(&mut conn, &key).await == 1 }
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        llen(&mut conn, &keys.requests()).await,
        1,
        "taken while paused"
    );
    queue.resume().await.unwrap();
    let r = waiting.await.unwrap();
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.text(), "hello from python\n");

    // What does not decode becomes a dead letter, and the queue goes on.
    let _: i64 = redis::cmd("LPUSH")
        .arg(keys.requests())
        .arg(&b"\x09Qgarbage"[..])
        .query_async(&mut conn)
        .await
        .unwrap();
    eventually("the dead letter", Duration::from_secs(10), || {
        let (mut conn, key) = (conn.clone(), keys.dead());
        async move { llen(&mut conn, &key).await == 1 }
    })
    .await;
    let dead: Vec<u8> = redis::cmd("LINDEX")
        .arg(keys.dead())
        .arg(0)
        .query_async(&mut conn)
        .await
        .unwrap();
    let dead = anteroom_protocol::DeadLetter::decode(Bytes::from(dead)).unwrap();
    assert_eq!(&dead.original[..], b"\x09Qgarbage");
    assert!(dead.reason.contains("does not decode"), "{}", dead.reason);
    let r = web::get(&c, &proxy.url("/hello")).await;
    assert_eq!(r.status, StatusCode::OK);

    // A clean stop removes its heartbeat.
    drop(python);
    eventually("the heartbeat to go", Duration::from_secs(10), || async {
        queue.status().await.unwrap().dispatchers.is_empty()
    })
    .await;
    proxy.stop().await;
}
