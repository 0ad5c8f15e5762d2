//! Upstreams where apps actually listen: httpbin under gunicorn bound to a
//! Unix domain socket (`--upstream unix:/PATH`), and serving TLS with a
//! certificate the test's own CA signed (`--upstream https://...
//! --upstream-ca`), each behind the real proxy and dispatcher.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use http::StatusCode;

use crate::support::bin::{BinProcess, start_proxy};
use crate::support::tls::TestCerts;
use crate::support::web::{self, client};
use crate::support::{start_redis, venv, wait_for_port};

fn gunicorn(bind: &str, extra: &[&str]) -> BinProcess {
    BinProcess::spawn_cmd(
        Command::new(venv::bin("gunicorn"))
            .args(["--bind", bind])
            .args(extra)
            .args(["--workers", "2", "--log-level", "warning", "httpbin:app"])
            .stdin(Stdio::null())
            .stdout(Stdio::null()),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_on_a_unix_socket_is_served_and_waited_for() {
    let redis = start_redis();
    let socket = std::env::temp_dir().join(format!(
        "anteroom-app-{}-{}.sock",
        std::process::id(),
        anteroom_testkit::free_port().unwrap()
    ));
    let _ = std::fs::remove_file(&socket);
    let upstream = format!("unix:{}", socket.display());
    let (_proxy, base) = start_proxy(&redis, "unixapp", "30s").await;
    // The dispatcher starts before the app, with a health path checked
    // over the socket: requests wait until the app listens.
    let _dispatcher = BinProcess::spawn(&[
        "dispatch",
        "--redis",
        &redis.url(),
        "--queue",
        "unixapp",
        "--upstream",
        &upstream,
        "--health-path",
        "/status/200",
    ]);
    let c = client();
    let early = {
        let (c, url) = (c.clone(), format!("{base}/anything/early"));
        tokio::spawn(async move { web::get(&c, &url).await })
    };
    let ctl = crate::support::control(&redis, "unixapp").await;
    crate::support::eventually(
        "the request waiting for an unhealthy upstream",
        Duration::from_secs(10),
        || async {
            let s = ctl.status().await.unwrap();
            s.waiting == 1
                && s.dispatchers
                    .iter()
                    .any(|d| d.heartbeat.unhealthy.is_some())
        },
    )
    .await;
    assert!(!early.is_finished(), "answered before the app listened");
    let _app = gunicorn(&upstream, &[]);
    let early = tokio::time::timeout(Duration::from_secs(20), early)
        .await
        .expect("answered once the app listens")
        .unwrap();
    assert_eq!(early.status, StatusCode::OK, "{}", early.text());

    // Method, target, Host and body reach the app over the socket.
    let r = web::post(&c, &format!("{base}/post?via=socket"), "over a socket").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let echoed: serde_json::Value = serde_json::from_str(&r.text()).unwrap();
    assert_eq!(echoed["data"], "over a socket");
    assert_eq!(echoed["args"]["via"], "socket");
    let host = base.trim_start_matches("http://");
    assert_eq!(echoed["headers"]["Host"], host);
    let _ = std::fs::remove_file(&socket);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_serving_tls_is_reached_with_its_ca() {
    let certs = TestCerts::new("upstream");
    let redis = start_redis();
    let port = anteroom_testkit::free_port().unwrap();
    let (cert, key) = (
        certs.cert.display().to_string(),
        certs.key.display().to_string(),
    );
    let _app = gunicorn(
        &format!("127.0.0.1:{port}"),
        &["--certfile", &cert, "--keyfile", &key],
    );
    wait_for_port(port).await;
    let upstream = format!("https://localhost:{port}");
    let ca = certs.ca.display().to_string();
    let (_proxy, base) = start_proxy(&redis, "tlsapp", "30s").await;
    let _dispatcher = BinProcess::spawn(&[
        "dispatch",
        "--redis",
        &redis.url(),
        "--queue",
        "tlsapp",
        "--upstream",
        &upstream,
        "--upstream-ca",
        &ca,
        "--health-path",
        "/status/200",
    ]);
    let c = client();
    let r = web::post(&c, &format!("{base}/post"), "over TLS").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let echoed: serde_json::Value = serde_json::from_str(&r.text()).unwrap();
    assert_eq!(echoed["data"], "over TLS");

    // Without the CA, the certificate is not trusted: the request is never
    // delivered (so it would go back to the queue), and the CA file must
    // hold certificates.
    let mut untrusted = anteroom_dispatcher::Upstream::new(&upstream).unwrap();
    let request = http::Request::get("/get")
        .body(anteroom_dispatcher::Body::default())
        .unwrap();
    let err = tower::Service::call(&mut untrusted, request)
        .await
        .expect_err("an untrusted certificate accepted");
    assert!(err.is_not_delivered(), "{err:?}");
    let out = crate::support::bin::command()
        .args(["dispatch", "--upstream", &upstream, "--upstream-ca"])
        .arg(Path::new("/nonexistent/ca.pem"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot read CA file"), "{err}");
}
