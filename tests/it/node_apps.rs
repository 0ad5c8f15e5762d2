//! The Node client (clients/node): a real Express app served by
//! `anteroom-node` through a real proxy; and the conformance kit passed.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anteroom_testkit::start_redis;
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;

use crate::support::TestProxy;
use crate::support::bin::{BinProcess, command};
use crate::support::web::{client, get, send};

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
    let hello = get(&c, &proxy.url("/hello?name=anteroom")).await;
    assert_eq!(hello.status, StatusCode::OK, "{}", hello.text());
    assert_eq!(hello.text(), "hello from express, anteroom\n");
    let req = Request::post(proxy.url("/echo"))
        .header("x-test", http::HeaderValue::from_bytes(b"caf\xe9").unwrap())
        .header("content-type", "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from("é and bytes")))
        .unwrap();
    let echo = send(&c, req).await;
    assert_eq!(echo.status, StatusCode::OK, "{}", echo.text());
    let json: serde_json::Value = serde_json::from_str(&echo.text()).unwrap();
    assert_eq!(json["framework"], "express");
    assert_eq!(json["method"], "POST");
    assert_eq!(json["path"], "/echo");
    assert_eq!(json["body"], "é and bytes");
    assert_eq!(json["header"], "caf\u{e9}");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anteroom_node_passes_the_conformance_kit() {
    installed();
    let redis = start_redis();
    let mut cmd = tokio::process::Command::from(command());
    cmd.args(["conformance", "--redis", &redis.url(), "--"])
        .args([
            "node",
            "bin/anteroom-node.js",
            "examples/conformance_app.js",
        ])
        .current_dir(node_dir());
    let out = tokio::time::timeout(Duration::from_secs(180), cmd.output())
        .await
        .expect("the kit finishes within 3 minutes")
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}");
    assert!(out.status.success(), "{text}");
    assert!(text.contains("12 passed, 0 failed"), "{text}");
}
