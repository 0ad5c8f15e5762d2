//! Test fixtures, one per real component, each stopped when dropped.

#![allow(dead_code, unreachable_pub)]

pub mod adapters;
pub mod app;
pub mod bin;
pub mod frameworks;
pub mod httpbin;
pub mod load;
pub mod mariadb;
pub mod monitor;
pub mod orders;
pub mod tls;
pub mod venv;
pub mod web;

use std::net::SocketAddr;
use std::time::Duration;

use anteroom_dispatcher::{Body, BoxError, Dispatcher, DispatcherBuilder};
use anteroom_proxy::ProxyConfig;
pub use anteroom_testkit::{
    HARNESS_CLIENT, LocalRedis, eventually, free_port, keys, llen, redis_conn, start_redis,
    until_llen, wait_for_port,
};
use bytes::Bytes;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A proxy served in-process on a port-0 listener.
pub struct TestProxy {
    pub addr: SocketAddr,
    stop: CancellationToken,
    handle: JoinHandle<Result<(), anteroom_proxy::ServeError>>,
}

impl TestProxy {
    pub async fn start(redis: &LocalRedis, queue: &str) -> Self {
        Self::start_with(redis, queue, |_| {}).await
    }

    pub async fn start_with(
        redis: &LocalRedis,
        queue: &str,
        configure: impl FnOnce(&mut ProxyConfig),
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut config = ProxyConfig::new(redis.url(), queue);
        config.grace = Duration::from_secs(5);
        configure(&mut config);
        let id = config
            .proxy_id
            .get_or_insert_with(|| format!("test-{}", addr.port()))
            .clone();
        // The first queue it serves: the default one, or its first route's.
        let served = if config.default_queue {
            queue
        } else {
            &config.routes[0].queue
        };
        let heartbeat = anteroom_protocol::Keys::new(served).unwrap().proxy(&id);
        let stop = CancellationToken::new();
        let token = stop.clone();
        let handle = tokio::spawn(anteroom_proxy::serve(listener, config, async move {
            token.cancelled().await
        }));
        // Ready once it has connected to Redis and written its heartbeat.
        let conn = redis_conn(redis).await;
        eventually("the proxy heartbeat", Duration::from_secs(10), || {
            let (mut conn, key) = (conn.clone(), heartbeat.clone());
            async move {
                redis::cmd("EXISTS")
                    .arg(&key)
                    .query_async::<bool>(&mut conn)
                    .await
                    .unwrap()
            }
        })
        .await;
        Self { addr, stop, handle }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub async fn stop(self) {
        self.stop.cancel();
        self.handle.await.unwrap().unwrap();
    }
}

/// A dispatcher served in-process.
pub struct TestDispatcher {
    pub id: String,
    stop: CancellationToken,
    handle: JoinHandle<Result<(), anteroom_dispatcher::DispatcherError>>,
}

pub fn dispatcher_builder(redis: &LocalRedis, queue: &str) -> DispatcherBuilder {
    Dispatcher::builder()
        .redis_url(redis.url())
        .queue(queue)
        .concurrency(8)
        .poll_interval(Duration::from_millis(200))
        .grace(Duration::from_secs(5))
}

impl TestDispatcher {
    /// Serves `service` on `queue` with the test defaults.
    pub fn start<S, B>(redis: &LocalRedis, queue: &str, service: S) -> Self
    where
        S: tower::Service<::http::Request<Body>, Response = ::http::Response<B>>
            + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        Self::start_built(dispatcher_builder(redis, queue).build().unwrap(), service)
    }

    pub fn start_built<S, B>(dispatcher: Dispatcher, service: S) -> Self
    where
        S: tower::Service<::http::Request<Body>, Response = ::http::Response<B>>
            + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let id = dispatcher.id().to_owned();
        let stop = CancellationToken::new();
        let token = stop.clone();
        let handle =
            tokio::spawn(dispatcher.serve(service, async move { token.cancelled().await }));
        Self { id, stop, handle }
    }

    /// Stops pulling, waits for in-flight requests, returns when done.
    pub async fn stop(self) {
        self.stop.cancel();
        self.handle.await.unwrap().unwrap();
    }
}

/// Control operations on `queue` of this test's Redis.
pub async fn control(redis: &LocalRedis, queue: &str) -> anteroom_control::Queue {
    anteroom_control::Queue::connect(&redis.url(), queue, Duration::from_secs(2))
        .await
        .unwrap()
}

/// Waits until a live dispatcher of `queue` beats (at most 20 s).
pub async fn until_dispatching(queue: &anteroom_control::Queue) {
    eventually(
        "a dispatcher's heartbeat",
        Duration::from_secs(20),
        || async { !queue.status().await.unwrap().dispatchers.is_empty() },
    )
    .await;
}

/// Pauses `queue` (as `by`) and waits until every live dispatcher says in
/// its heartbeat that it takes nothing (at most 10 s).
pub async fn pause_acknowledged(queue: &anteroom_control::Queue, by: &str) {
    queue.pause(by, None, false).await.unwrap();
    eventually(
        "the pause acknowledged",
        Duration::from_secs(10),
        || async {
            queue
                .status()
                .await
                .unwrap()
                .dispatchers
                .iter()
                .all(|d| d.heartbeat.paused)
        },
    )
    .await;
}

/// Waits until some live dispatcher of `queue` holds exactly `n` requests.
pub async fn until_held(queue: &anteroom_control::Queue, n: u64) {
    eventually(
        "a dispatcher to hold the requests",
        Duration::from_secs(20),
        || async {
            queue
                .status()
                .await
                .unwrap()
                .dispatchers
                .iter()
                .any(|d| d.held == n)
        },
    )
    .await;
}

/// A configuration file written for one test, removed when dropped.
pub struct TempFile(std::path::PathBuf);

impl std::ops::Deref for TempFile {
    type Target = std::path::PathBuf;
    fn deref(&self) -> &std::path::PathBuf {
        &self.0
    }
}

impl AsRef<std::path::Path> for TempFile {
    fn as_ref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Writes `text` to a fresh configuration file; removed when the returned
/// guard is dropped.
pub fn config_file(text: &str) -> TempFile {
    let path = std::env::temp_dir().join(format!(
        "anteroom-config-{}-{}.toml",
        std::process::id(),
        free_port().unwrap()
    ));
    std::fs::write(&path, text).unwrap();
    TempFile(path)
}

/// Runs the `ACL SETUSER` lines of docs/operations.md on `redis`, with the
/// password `pw` (the proxy, dispatcher and operator users): an admin
/// connection.
pub async fn documented_users(
    redis: &anteroom_testkit::LocalRedis,
) -> redis::aio::MultiplexedConnection {
    let docs = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/operations.md"))
        .unwrap();
    let mut admin = redis_conn(redis).await;
    let mut users = 0;
    for line in docs.lines().filter(|l| l.starts_with("ACL SETUSER ")) {
        let mut cmd = redis::cmd("ACL");
        for word in line.split_whitespace().skip(1) {
            cmd.arg(if word == ">PASSWORD" { ">pw" } else { word });
        }
        cmd.query_async::<()>(&mut admin).await.unwrap();
        users += 1;
    }
    assert_eq!(users, 3, "the proxy, dispatcher and operator users");
    admin
}

/// Asserts that Redis refused no command for want of permission (`ACL
/// LOG` empty), read over the admin connection `admin`.
pub async fn assert_acl_log_empty(admin: &mut redis::aio::MultiplexedConnection) {
    let log: Vec<redis::Value> = redis::cmd("ACL")
        .arg("LOG")
        .query_async(admin)
        .await
        .unwrap();
    assert!(log.is_empty(), "commands refused: {log:?}");
}
