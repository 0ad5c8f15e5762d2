//! Logs as operators get them: `--log-format json` from real processes at
//! `RUST_LOG=debug`, one span per request carrying the request id and the
//! queue, and neither request bodies nor secrets anywhere.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anteroom_testkit::{LocalRedis, free_port};
use http::{Request, StatusCode};
use http_body_util::Full;

use crate::support::app::Upstream;
use crate::support::bin::{BinProcess, command};
use crate::support::wait_for_port;
use crate::support::web::{client, send};

const BODY_MARKER: &str = "body-marker-7f3a91";
const PASSWORD: &str = "pw-marker-5c21d0";
const ADMIN_TOKEN: &str = "token-marker-93be44";
const AUTH_HEADER: &str = "Bearer auth-marker-0d8e12";

/// Starts the binary with its stderr in a file (a pipe nobody reads could
/// fill up and stall it).
fn spawn_logged(args: &[&str]) -> (BinProcess, PathBuf) {
    let path = std::env::temp_dir().join(format!(
        "anteroom-logs-{}-{}.log",
        std::process::id(),
        free_port().unwrap()
    ));
    let file = std::fs::File::create(&path).unwrap();
    let process = BinProcess::spawn_cmd(
        command()
            .args(args)
            .env("RUST_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(file),
    );
    (process, path)
}

/// Everything the process wrote to stderr, after SIGTERM.
async fn stop_and_read((process, path): (BinProcess, PathBuf)) -> String {
    let mut process = process;
    process.terminate();
    process.wait(Duration::from_secs(20)).await;
    let text = std::fs::read_to_string(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_request_spans_and_no_bodies_or_secrets() {
    let redis = LocalRedis::start_with_args(&["--requirepass", PASSWORD]).unwrap();
    let url = format!("redis://:{PASSWORD}@127.0.0.1:{}", redis.port());
    let upstream = Upstream::start().await;
    let (port, admin_port) = (free_port().unwrap(), free_port().unwrap());
    let listen = format!("127.0.0.1:{port}");
    let admin = format!("127.0.0.1:{admin_port}");
    let proxy = spawn_logged(&[
        "proxy",
        "--log-format",
        "json",
        "--listen",
        &listen,
        "--redis",
        &url,
        "--queue",
        "logged",
        "--admin",
        &admin,
        "--admin-token",
        ADMIN_TOKEN,
    ]);
    let dispatcher = spawn_logged(&[
        "dispatch",
        "--log-format",
        "json",
        "--redis",
        &url,
        "--queue",
        "logged",
        "--upstream",
        &upstream.url(),
    ]);
    wait_for_port(port).await;
    wait_for_port(admin_port).await;

    let c = client();
    let req = Request::post(format!("http://{listen}/echo"))
        .header("authorization", AUTH_HEADER)
        .header("x-request-id", "logged-request-1")
        .body(Full::new(bytes::Bytes::from(format!(
            "secret {BODY_MARKER}"
        ))))
        .unwrap();
    let r = send(&c, req).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.text().contains(BODY_MARKER), "the echo itself works");
    let admin_req = Request::get(format!("http://{admin}/status"))
        .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
        .body(Full::default())
        .unwrap();
    assert_eq!(send(&c, admin_req).await.status, StatusCode::OK);

    let proxy_log = stop_and_read(proxy).await;
    let dispatcher_log = stop_and_read(dispatcher).await;
    for (who, log) in [("proxy", &proxy_log), ("dispatcher", &dispatcher_log)] {
        assert!(!log.is_empty(), "{who} wrote no logs");
        for line in log.lines() {
            let parsed: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{who}: not a JSON line ({e}): {line}"));
            assert!(parsed.get("level").is_some(), "{who}: no level: {line}");
        }
        for secret in [BODY_MARKER, PASSWORD, ADMIN_TOKEN, AUTH_HEADER] {
            assert!(!log.contains(secret), "{who} logged {secret:?}:\n{log}");
        }
        // The request's events carry its span: request id and queue.
        let in_span = log.lines().any(|line| {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            v["span"]["name"] == "request"
                && v["span"]["request_id"] == "logged-request-1"
                && v["span"]["queue"] == "logged"
        });
        assert!(in_span, "{who}: no event inside the request's span:\n{log}");
    }
}
