//! TLS termination in the proxy with real clients: curl over HTTP/1.1 and
//! HTTP/2 (ALPN), the app told `X-Forwarded-Proto: https`; a certificate
//! replaced and reloaded on SIGHUP while a Python client's connection,
//! which trusts only the old CA, stays open and keeps working; a reload
//! of a broken pair keeps the pair in use.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::app::test_app;
use crate::support::bin::{BinProcess, command};
use crate::support::tls::TestCerts;
use crate::support::{TestDispatcher, eventually, start_redis, venv, wait_for_port};

/// `curl` to `url` trusting only `ca`, with `extra` flags; its exit code
/// and what it printed (`-w` output last).
async fn curl(url: &str, ca: &Path, extra: &[&str]) -> (Option<i32>, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "-D", "-", "--max-time", "10", "--cacert"])
        .arg(ca)
        .args(extra)
        .arg(url);
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.code(), text)
}

/// A Python client (the standard library's `http.client` and `ssl`) with
/// one connection, trusting only `ca`: it sends a request, then another
/// on the same connection each time it reads a line, printing the status
/// and whether the socket is still the first one.
const KEEP_ALIVE_CLIENT: &str = r#"
import http.client, ssl, sys
ctx = ssl.create_default_context(cafile=sys.argv[1])
conn = http.client.HTTPSConnection("localhost", int(sys.argv[2]), context=ctx, timeout=10)
first = None
for line in sys.stdin:
    conn.request("GET", "/echo/" + line.strip())
    resp = conn.getresponse()
    resp.read()
    if first is None:
        first = conn.sock
    print(resp.status, resp.getheader("x-saw-forwarded-proto"), conn.sock is first, flush=True)
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_is_terminated_with_alpn_and_reloaded_on_sighup() {
    let redis = start_redis();
    let old = TestCerts::new("proxy-old");
    let new = TestCerts::new("proxy-new");
    // The proxy reads the pair from files of its own, replaced below.
    let dir = old.ca.parent().unwrap().join("served");
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::copy(&old.cert, &cert).unwrap();
    std::fs::copy(&old.key, &key).unwrap();
    let port = anteroom_testkit::free_port().unwrap();
    let listen = format!("127.0.0.1:{port}");
    let log = dir.join("proxy.log");
    let proxy = BinProcess::spawn_cmd(
        command()
            .args(["proxy", "--listen", &listen, "--redis", &redis.url()])
            .args(["--queue", "tls", "--tls-cert"])
            .arg(&cert)
            .arg("--tls-key")
            .arg(&key)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap()),
    );
    let logged = |what: &'static str| {
        let log = log.clone();
        async move {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains(what)
        }
    };
    wait_for_port(port).await;
    let _dispatcher = TestDispatcher::start(&redis, "tls", test_app());
    let url = format!("https://localhost:{port}/echo");

    // HTTP/1.1 and HTTP/2 by ALPN; the app hears it was HTTPS.
    for (flag, version) in [("--http1.1", "1.1"), ("--http2", "2")] {
        let (code, text) = curl(&url, &old.ca, &[flag, "-w", "version=%{http_version}"]).await;
        assert_eq!(code, Some(0), "{text}");
        assert!(text.contains(&format!("version={version}")), "{text}");
        assert!(text.contains("x-saw-forwarded-proto: https"), "{text}");
    }
    // Plain HTTP to the TLS port is not served.
    let (code, _) = curl(&url.replace("https://", "http://"), &old.ca, &[]).await;
    assert_ne!(code, Some(0));

    // A client connection opened before the reload.
    let mut python = Command::new(venv::bin("python"))
        .args(["-c", KEEP_ALIVE_CLIENT])
        .arg(&old.ca)
        .arg(port.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut to_python = python.stdin.take().unwrap();
    let mut from_python = BufReader::new(python.stdout.take().unwrap());
    let mut ask = move |path: &str| {
        writeln!(to_python, "{path}").unwrap();
        to_python.flush().unwrap();
        let mut line = String::new();
        from_python.read_line(&mut line).unwrap();
        line.trim().to_owned()
    };
    assert_eq!(ask("before"), "200 https True");

    // The certificate replaced, then SIGHUP: new connections get the new
    // one (curl trusting only the new CA passes, only the old one fails).
    std::fs::copy(&new.cert, &cert).unwrap();
    std::fs::copy(&new.key, &key).unwrap();
    let hup = |pid: u32| {
        let status = Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    };
    hup(proxy.pid());
    eventually("the reload logged", Duration::from_secs(10), || {
        logged("TLS certificate reloaded")
    })
    .await;
    eventually(
        "the new certificate served",
        Duration::from_secs(10),
        || async { curl(&url, &new.ca, &[]).await.0 == Some(0) },
    )
    .await;
    let (code, text) = curl(&url, &old.ca, &[]).await;
    assert_ne!(code, Some(0), "the old certificate still served: {text}");

    // The connection from before the reload was not dropped: the same
    // socket, still trusting only the old CA, is answered.
    assert_eq!(ask("after"), "200 https True");

    // A broken pair (a key that does not fit) is refused; the new pair
    // stays in use and the proxy keeps serving.
    std::fs::copy(&old.key, &key).unwrap();
    hup(proxy.pid());
    eventually("the refusal logged", Duration::from_secs(10), || {
        logged("TLS certificate not reloaded")
    })
    .await;
    for _ in 0..3 {
        let (code, text) = curl(&url, &new.ca, &[]).await;
        assert_eq!(code, Some(0), "{text}");
    }
    assert_eq!(ask("last"), "200 https True");
    drop(python.stdin.take());
    let _ = python.kill();
    let _ = python.wait();
    drop(proxy);
}

#[test]
fn a_key_that_does_not_fit_is_refused_at_start() {
    let a = TestCerts::new("mismatch-a");
    let b = TestCerts::new("mismatch-b");
    let out = command()
        .args(["proxy", "--listen", "127.0.0.1:0", "--tls-cert"])
        .arg(&a.cert)
        .arg("--tls-key")
        .arg(&b.key)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not fit the certificate"), "{err}");
    // --tls-cert without --tls-key is refused, however each is given
    // (flag, environment, file): never plain HTTP by mistake.
    let out = command()
        .args(["proxy", "--tls-cert"])
        .arg(&a.cert)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--tls-cert needs --tls-key"));
    let file = crate::support::config_file(&format!(
        "[proxy]\ntls_cert = {:?}\n",
        a.cert.display().to_string()
    ));
    let out = command()
        .arg("--config")
        .arg(&*file)
        .args(["proxy", "--check-config"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("--tls-cert needs --tls-key")
            || String::from_utf8_lossy(&out.stderr).contains("--tls-cert needs --tls-key"),
        "{out:?}"
    );
    let out = command()
        .arg("--config")
        .arg(&*file)
        .args(["proxy", "--tls-key"])
        .arg(&a.key)
        .args(["--check-config"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
}
