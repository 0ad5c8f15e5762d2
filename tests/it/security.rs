//! Redis AUTH (password and ACL user in the URL) and TLS (`rediss://`).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anteroom_testkit::{LocalRedis, free_port};
use http::StatusCode;

use crate::support::app::Upstream;
use crate::support::bin::{BinProcess, command};
use crate::support::eventually;
use crate::support::web::{self, client};

const READY: Duration = Duration::from_secs(20);

/// Runs proxy and dispatcher processes against `url`; returns the proxy port.
fn start_pair(url: &str, upstream: &str, env: &[(&str, &str)]) -> (u16, BinProcess, BinProcess) {
    let port = free_port().unwrap();
    let listen = format!("127.0.0.1:{port}");
    let proxy = BinProcess::spawn_cmd(
        command()
            .args([
                "proxy", "--listen", &listen, "--redis", url, "--queue", "sec",
            ])
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::null()),
    );
    let dispatcher = BinProcess::spawn_cmd(
        command()
            .args([
                "dispatch",
                "--redis",
                url,
                "--queue",
                "sec",
                "--upstream",
                upstream,
            ])
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::null()),
    );
    (port, proxy, dispatcher)
}

async fn round_trip(port: u16) {
    let c = client();
    eventually("the proxy to listen", READY, || async move {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
    })
    .await;
    let r = web::post(
        &c,
        &format!("http://127.0.0.1:{port}/echo"),
        "secret handshake",
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.text(), "secret handshake");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_and_acl_user_in_the_url() {
    let redis = LocalRedis::start_with_args(&[
        "--requirepass",
        "s3cret",
        "--user",
        "alice",
        "on",
        ">wonderland",
        "~*",
        "&*",
        "+@all",
    ])
    .unwrap();
    let upstream = Upstream::start().await;
    let with_password = format!("redis://:s3cret@127.0.0.1:{}", redis.port());
    let (port, _p, _d) = start_pair(&with_password, &upstream.url(), &[]);
    round_trip(port).await;

    let as_alice = format!("redis://alice:wonderland@127.0.0.1:{}", redis.port());
    let out = command()
        .args(["status", "--redis", &as_alice, "--queue", "sec", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A wrong password is a clear startup error, not a hang; and the
    // password does not appear in the message.
    let wrong = format!("redis://:not-it@127.0.0.1:{}", redis.port());
    let out = command()
        .args(["proxy", "--listen", "127.0.0.1:0", "--redis", &wrong])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot connect to redis"), "{err}");
    assert!(!err.contains("not-it"), "password leaked: {err}");
}

/// A CA and a server certificate for 127.0.0.1, made with openssl.
fn make_certificates(dir: &Path) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "1",
        "-subj",
        "/CN=anteroom test CA",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "1",
        "-extfile",
        "ext.cnf",
    ]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_rediss_urls() {
    let dir = std::env::temp_dir().join(format!("anteroom-tls-{}", free_port().unwrap()));
    std::fs::create_dir_all(&dir).unwrap();
    make_certificates(&dir);
    let tls_port = free_port().unwrap();
    let file = |name: &str| dir.join(name).to_str().unwrap().to_owned();
    let _redis = LocalRedis::start_with_args(&[
        "--tls-port",
        &tls_port.to_string(),
        "--tls-cert-file",
        &file("server.crt"),
        "--tls-key-file",
        &file("server.key"),
        "--tls-ca-cert-file",
        &file("ca.crt"),
        "--tls-auth-clients",
        "no",
    ])
    .unwrap();
    let upstream = Upstream::start().await;
    let url = format!("rediss://127.0.0.1:{tls_port}");
    let ca = file("ca.crt");
    let (port, _p, _d) = start_pair(&url, &upstream.url(), &[("SSL_CERT_FILE", &ca)]);
    round_trip(port).await;

    // The certificate is verified: without our CA the connection is refused.
    let out = command()
        .args(["status", "--redis", &url, "--queue", "sec"])
        .env("SSL_CERT_FILE", "/nonexistent")
        .env("SSL_CERT_DIR", "/nonexistent")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "connected without trusting the server"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
