//! The Ruby client (clients/ruby): real Sinatra and Rails apps (Debian's
//! ruby-sinatra and ruby-railties) served by `anteroom-rack` through a real
//! proxy; and the conformance kit passed, streaming.

use std::path::Path;
use std::process::Stdio;

use anteroom_testkit::start_redis;

use crate::support::TestProxy;
use crate::support::bin::BinProcess;
use crate::support::web::client;

fn ruby_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/clients/ruby"))
}

/// `anteroom-rack` serving the rackup file `tests/apps/rack/<file>` on `queue`.
fn serve(redis_url: &str, queue: &str, file: &str) -> BinProcess {
    let rackup = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/apps/rack")).join(file);
    let mut cmd = std::process::Command::new("ruby");
    cmd.arg(ruby_dir().join("exe/anteroom-rack"))
        .args(["--threads", "4"])
        .arg(rackup)
        .env("ANTEROOM_REDIS", redis_url)
        .env("ANTEROOM_QUEUE", queue)
        .env("ANTEROOM_GRACE", "2s")
        .stdout(Stdio::null());
    BinProcess::spawn_cmd(&mut cmd)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sinatra_and_rails_apps_are_served_through_the_proxy() {
    let redis = start_redis();
    let c = client();
    for (framework, file) in [("sinatra", "sinatra.ru"), ("rails", "rails.ru")] {
        let proxy = TestProxy::start(&redis, framework).await;
        let _app = serve(&redis.url(), framework, file);
        crate::support::frameworks::framework_app(&c, &proxy, framework).await;
        crate::support::frameworks::streams_in_pieces(&c, &proxy, framework).await;
        proxy.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anteroom_rack_passes_the_conformance_kit() {
    let command = [
        "ruby",
        "exe/anteroom-rack",
        "--threads",
        "8",
        "test/conformance_app.ru",
    ];
    let text = crate::conformance::passes(&command, ruby_dir()).await;
    assert!(
        text.contains("ok    streamed response (streamed)"),
        "{text}"
    );
}
