//! Deadlines do not depend on host clocks (docs/protocol.md, "Time"): a
//! proxy or a dispatcher whose host clock runs 60 s ahead or behind
//! (libfaketime preloaded into the real `anteroom` binary) neither fails
//! requests nor runs one after its client got 504. The dispatchers of the
//! other languages are checked the same way by the conformance kit.

use std::path::PathBuf;
use std::sync::PoisonError;
use std::time::Duration;

use anteroom_testkit::free_port;
use futures_util::future::join_all;
use http::StatusCode;

use crate::support::bin::{BinProcess, command};
use crate::support::web::{client, get};
use crate::support::{
    control, eventually, pause_acknowledged, start_redis, until_dispatching, wait_for_port,
};

/// libfaketime as Debian and Ubuntu install it (`apt-get install
/// faketime`; scripts/test.sh does).
fn faketime_lib() -> PathBuf {
    [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/faketime/libfaketime.so.1",
        "/usr/local/lib/faketime/libfaketime.so.1",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.is_file())
    .expect("libfaketime is missing: apt-get install faketime (scripts/test.sh installs it)")
}

/// `anteroom ARGS` with its host clock shifted by `offset` (`"+60s"`,
/// `"-60s"`; `None` for the real clock). Preloaded into the process
/// itself: the `faketime` wrapper would fork.
fn spawn_at(offset: Option<&str>, args: &[&str]) -> BinProcess {
    let mut cmd = command();
    cmd.args(args).stdout(std::process::Stdio::null());
    if let Some(offset) = offset {
        cmd.env("LD_PRELOAD", faketime_lib())
            .env("FAKETIME", offset);
    }
    BinProcess::spawn_cmd(&mut cmd)
}

/// One proxy and one dispatcher with their clocks at `proxy` and
/// `dispatcher`: 40 requests at once all answered 200; then, with the
/// queue paused, 5 requests answered 504 at their 4 s hold budget are not
/// run once the queue resumes.
async fn deadlines_hold(proxy_clock: Option<&str>, dispatcher_clock: Option<&str>) {
    let label = format!("proxy {proxy_clock:?}, dispatcher {dispatcher_clock:?}");
    let redis = start_redis();
    let queue = "clocks";
    let (upstream, ran) = crate::support::app::recording_upstream().await;
    let port = free_port().unwrap();
    let listen = format!("127.0.0.1:{port}");
    let url = redis.url();
    let _proxy = spawn_at(
        proxy_clock,
        &[
            "proxy", "--listen", &listen, "--redis", &url, "--queue", queue, "--hold", "4s",
        ],
    );
    let _dispatcher = spawn_at(
        dispatcher_clock,
        &[
            "dispatch",
            "--redis",
            &url,
            "--queue",
            queue,
            "--upstream",
            &upstream,
        ],
    );
    wait_for_port(port).await;
    let control = control(&redis, queue).await;
    until_dispatching(&control).await;

    let c = client();
    let answers = join_all((0..40).map(|i| {
        let (c, url) = (&c, format!("http://{listen}/run/served-{i}"));
        async move { get(c, &url).await }
    }))
    .await;
    let statuses: Vec<u16> = answers.iter().map(|a| a.status.as_u16()).collect();
    let failed = statuses.iter().filter(|s| **s != 200).count();
    assert_eq!(failed, 0, "{label}: {failed} of 40 failed: {statuses:?}");

    pause_acknowledged(&control, "clocks test").await;
    let late = join_all((0..5).map(|i| {
        let (c, url) = (&c, format!("http://{listen}/run/late-{i}"));
        async move { get(c, &url).await }
    }))
    .await;
    assert!(
        late.iter().all(|a| a.status == StatusCode::GATEWAY_TIMEOUT),
        "{label}: paused requests were not answered 504: {:?}",
        late.iter().map(|a| a.status.as_u16()).collect::<Vec<_>>()
    );
    control.resume().await.unwrap();
    // The dispatcher takes the expired requests and removes them unrun.
    eventually(
        "the expired requests removed",
        Duration::from_secs(10),
        || async {
            let status = control.status().await.unwrap();
            status.waiting == 0 && status.dispatchers.iter().all(|d| d.held == 0)
        },
    )
    .await;
    // A served request after them: the dispatcher has dealt with them.
    let after = get(&c, &format!("http://{listen}/run/after")).await;
    assert_eq!(after.status, StatusCode::OK, "{label}");
    let ran = ran.lock().unwrap_or_else(PoisonError::into_inner).clone();
    let late_runs: Vec<_> = ran.iter().filter(|id| id.starts_with("late-")).collect();
    assert!(
        late_runs.is_empty(),
        "{label}: requests run after their client's 504: {late_runs:?}"
    );
    assert_eq!(
        ran.iter().filter(|id| id.starts_with("served-")).count(),
        40,
        "{label}: every served request ran once"
    );
    println!(
        "{label}: 40 of 40 requests answered 200, each run once; {} paused past their \
         hold budget answered 504, run {} times after",
        late.len(),
        late_runs.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_whose_clock_runs_ahead_or_behind_fails_nothing() {
    deadlines_hold(Some("+60s"), None).await;
    deadlines_hold(Some("-60s"), None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dispatcher_whose_clock_runs_ahead_or_behind_fails_nothing() {
    deadlines_hold(None, Some("+60s")).await;
    deadlines_hold(None, Some("-60s")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_and_a_dispatcher_two_minutes_apart_fail_nothing() {
    deadlines_hold(Some("+60s"), Some("-60s")).await;
    deadlines_hold(Some("-60s"), Some("+60s")).await;
}
