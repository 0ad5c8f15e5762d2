//! The Python client (clients/python): real Flask and Django apps served by
//! `anteroom-wsgi` and a real FastAPI app by `anteroom-asgi`, through a
//! real proxy; both servers pass the conformance kit.

use std::path::Path;
use std::process::Stdio;

use anteroom_testkit::{LocalRedis, start_redis};

use crate::support::bin::BinProcess;
use crate::support::web::client;
use crate::support::{TestProxy, venv};

/// `SERVER APP` (`anteroom-wsgi` or `anteroom-asgi`) on `queue`, run from
/// `dir` (where APP's module is).
fn serve(server: &str, redis: &LocalRedis, queue: &str, dir: &Path, app: &str) -> BinProcess {
    let mut cmd = std::process::Command::new(venv::bin(server));
    cmd.args(["--threads", "4", app])
        .current_dir(dir)
        .env("ANTEROOM_REDIS", redis.url())
        .env("ANTEROOM_QUEUE", queue)
        .env("ANTEROOM_GRACE", "2s")
        .stdout(Stdio::null());
    BinProcess::spawn_cmd(&mut cmd)
}

fn apps_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/apps"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flask_django_and_fastapi_apps_are_served_through_the_proxy() {
    let redis = start_redis();
    let c = client();
    for (server, queue, app, framework) in [
        ("anteroom-wsgi", "flask", "wsgi_flask:app", "flask"),
        (
            "anteroom-wsgi",
            "django",
            "wsgi_django:application",
            "django",
        ),
        ("anteroom-asgi", "fastapi", "asgi_fastapi:app", "fastapi"),
    ] {
        let proxy = TestProxy::start(&redis, queue).await;
        let _app = serve(server, &redis, queue, apps_dir(), app);
        let json = crate::support::frameworks::framework_app(&c, &proxy, framework).await;
        if framework == "fastapi" {
            assert_eq!(json["lifespan_started"], true, "ASGI lifespan startup ran");
        }
        if framework != "django" {
            crate::support::frameworks::streams_in_pieces(&c, &proxy, framework).await;
        }
        proxy.stop().await;
    }
}

/// Runs the conformance kit against `server` serving `app` (a reference
/// app in clients/python/tests); it passes, streaming.
async fn conformance(server: &str, app: &str) {
    let dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/clients/python/tests"));
    let server = venv::bin(server);
    let command = [server.to_str().unwrap(), "--threads", "8", app];
    let text = crate::conformance::passes(&command, dir).await;
    assert!(
        text.contains("ok    streamed response (streamed)"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anteroom_wsgi_passes_the_conformance_kit() {
    conformance("anteroom-wsgi", "conformance_app:app").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anteroom_asgi_passes_the_conformance_kit() {
    conformance("anteroom-asgi", "asgi_conformance_app:app").await;
}
