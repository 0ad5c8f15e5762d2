//! The Node client (clients/node): a real Express app served by
//! `anteroom-node` through a real proxy, streams included; and the
//! conformance kit passed, streaming.

use std::path::Path;
use std::process::Stdio;

use anteroom_testkit::start_redis;

use crate::support::TestProxy;
use crate::support::bin::BinProcess;
use crate::support::web::client;

fn node_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/clients/node"))
}

/// Fails, naming what to run, when `npm ci` has not been run there.
fn installed() {
    assert!(
        node_dir().join("node_modules/light-my-request").exists(),
        "clients/node/node_modules is missing: `bash scripts/test.sh` runs `npm ci` there"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_express_app_is_served_through_the_proxy() {
    installed();
    let redis = start_redis();
    let proxy = TestProxy::start(&redis, "express").await;
    let mut cmd = std::process::Command::new("node");
    cmd.args(["bin/anteroom-node.js", "examples/express_app.js"])
        .current_dir(node_dir())
        .env("ANTEROOM_REDIS", redis.url())
        .env("ANTEROOM_QUEUE", "express")
        .env("ANTEROOM_GRACE", "2s")
        .stdout(Stdio::null());
    let _app = BinProcess::spawn_cmd(&mut cmd);
    let c = client();
    crate::support::frameworks::framework_app(&c, &proxy, "express").await;
    crate::support::frameworks::streams_in_pieces(&c, &proxy, "express").await;
    // An error after the head (Express destroys the connection): the
    // client's response is cut short, never ended cleanly, and the
    // dispatcher lives on.
    let resp = c
        .request(
            http::Request::get(proxy.url("/fail-after-head"))
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), http::StatusCode::OK);
    let body = http_body_util::BodyExt::collect(resp.into_body()).await;
    assert!(body.is_err(), "a failed stream must not end cleanly");
    crate::support::frameworks::framework_app(&c, &proxy, "express").await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anteroom_node_passes_the_conformance_kit() {
    installed();
    let command = [
        "node",
        "bin/anteroom-node.js",
        "examples/conformance_app.js",
    ];
    let text = crate::conformance::passes(&command, node_dir()).await;
    assert!(
        text.contains("ok    streamed response (streamed)"),
        "{text}"
    );
}
