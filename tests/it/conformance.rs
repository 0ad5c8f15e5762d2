//! The conformance kit (`anteroom conformance`): the Rust dispatcher, with
//! the reference app (`examples/conformance_app.rs`), passes every case;
//! a command that is no dispatcher fails, and the kit says so and exits 1.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anteroom_testkit::start_redis;

use crate::support::bin::command;

/// `target/<profile>/examples/conformance_app`, which `cargo test` builds
/// with the tests.
fn reference_app() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile = exe.parent().and_then(|deps| deps.parent()).unwrap();
    let app = profile.join("examples").join("conformance_app");
    assert!(
        app.exists(),
        "{} is missing: `cargo test` builds it (or `cargo build --example conformance_app`)",
        app.display()
    );
    app
}

/// Runs the kit against `dispatcher` (started in `dir`, or here); its exit
/// status and output. The one runner of the kit for every implementation's
/// test (Rust here, Python and Node in their own files).
pub(crate) async fn conformance(
    redis_url: &str,
    extra: &[&str],
    dispatcher: &[&str],
    dir: Option<&Path>,
) -> (bool, String) {
    let mut cmd = tokio::process::Command::from(command());
    cmd.args(["conformance", "--redis", redis_url])
        .args(extra)
        .arg("--")
        .args(dispatcher);
    if let Some(dir) = dir {
        cmd.current_dir(dir);
    }
    let out = tokio::time::timeout(Duration::from_secs(180), cmd.output())
        .await
        .expect("the kit finishes within 3 minutes")
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    println!("{text}");
    (out.status.success(), text)
}

/// The kit against `dispatcher` passes every case.
pub(crate) async fn passes(dispatcher: &[&str], dir: &Path) -> String {
    let redis = start_redis();
    // The test's own redis-server: the kit may make it refuse writes.
    let (ok, text) = conformance(&redis.url(), &["--refuse-writes"], dispatcher, Some(dir)).await;
    assert!(ok, "{text}");
    assert!(text.contains("18 passed, 0 failed"), "{text}");
    assert!(!text.contains("skipped"), "{text}");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rust_dispatcher_passes_every_case() {
    let redis = start_redis();
    let app = reference_app();
    let (ok, text) = conformance(
        &redis.url(),
        &["--refuse-writes"],
        &[app.to_str().unwrap()],
        None,
    )
    .await;
    assert!(ok, "{text}");
    assert!(text.contains("18 passed, 0 failed"), "{text}");
    assert!(!text.contains("skipped"), "{text}");
    for case in [
        "taken and answered while Redis is over its maxmemory",
        "binary bodies byte-exact",
        "repeated and Latin-1 header values",
        "expired deadline never run",
        "garbage envelope dead-lettered",
        "pause acknowledged and resume honoured",
        "nothing taken after a pause lands under load",
        "graceful SIGTERM finishes in-flight work",
        "SIGKILL mid-request, then reaped",
        "streamed response (streamed)",
        "deadlines by Redis's clock, host clock off",
    ] {
        assert!(text.contains(&format!("ok    {case}")), "{case}: {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_that_is_no_dispatcher_fails_the_kit() {
    let redis = start_redis();
    let (ok, text) = conformance(
        &redis.url(),
        &["--start-timeout", "2s"],
        &["sleep", "30"],
        None,
    )
    .await;
    assert!(!ok, "{text}");
    assert!(text.contains("FAIL  starts and beats"), "{text}");
    assert!(text.contains("0 passed, 1 failed"), "{text}");
}

/// A command that exits before its first heartbeat fails at once, with its
/// exit status and the end of its output, not after the whole start wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_that_exits_fails_at_once_with_its_output() {
    let redis = start_redis();
    let started = std::time::Instant::now();
    let (ok, text) = conformance(
        &redis.url(),
        &["--start-timeout", "60s"],
        &[
            "sh",
            "-c",
            "echo cannot load such file -- redis >&2; exit 3",
        ],
        None,
    )
    .await;
    assert!(!ok, "{text}");
    assert!(
        text.contains("exited (exit status: 3) before its first heartbeat"),
        "{text}"
    );
    assert!(text.contains("cannot load such file -- redis"), "{text}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the kit waited {:?}",
        started.elapsed()
    );
}

/// The Lua scripts (the reaper's CLAIM and REQUEUE, the dispatcher's
/// PULL_WHEN_FULL, COMPLETE_WHEN_FULL and CLAIM_WHEN_FULL) that the Python, Ruby and
/// Node clients ship are the Rust ones, line for line: each client
/// must carry its own copy, and this keeps the copies from drifting.
#[test]
fn the_clients_carry_the_rust_reapers_scripts() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let read = |path: &str| std::fs::read_to_string(root.join(path)).unwrap();
    // A script is the raw string after `const NAME: &str = r"`.
    let script = |source: &str, name: &str| -> Vec<String> {
        let start = source
            .find(&format!("const {name}: &str = r\""))
            .unwrap_or_else(|| panic!("{name} not found"));
        let body = &source[start..];
        let body = &body[body.find('"').unwrap() + 1..];
        body[..body.find('"').unwrap()]
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect()
    };
    let scripts = [
        script(&read("crates/anteroom-control/src/queue/reap.rs"), "CLAIM"),
        script(
            &read("crates/anteroom-control/src/queue/requeue.rs"),
            "REQUEUE",
        ),
        script(
            &read("crates/anteroom-control/src/queue/mod.rs"),
            "PULL_WHEN_FULL",
        ),
        script(
            &read("crates/anteroom-control/src/queue/complete.rs"),
            "COMPLETE_WHEN_FULL",
        ),
        script(
            &read("crates/anteroom-control/src/queue/mod.rs"),
            "CLAIM_WHEN_FULL",
        ),
    ];
    // For settling the orphans of a lost reply.
    let settling = [script(
        &read("crates/anteroom-control/src/queue/complete.rs"),
        "COMPLETE_IF_HELD",
    )];
    for client in [
        "clients/python/src/anteroom/protocol.py",
        "clients/ruby/lib/anteroom/protocol.rb",
        "clients/node/lib/protocol.js",
    ] {
        // The closing quote of a Python or JavaScript string may end the
        // script's last line.
        let lines: Vec<String> = read(client)
            .lines()
            .map(|l| l.trim().trim_end_matches(['"', '`', ';']).to_owned())
            .collect();
        for lua in scripts.iter().chain(&settling) {
            let found = lines
                .windows(lua.len())
                .any(|window| window == lua.as_slice());
            assert!(found, "{client} lacks the script starting {:?}", lua[0]);
        }
    }
}

/// COMPLETE_AND_TAKE (docs/protocol.md, step 5), which the Rust dispatcher
/// does not use: the Python and Node clients carry the Ruby one's, line for
/// line, and it reads the pause key before it takes.
#[test]
fn the_clients_complete_and_take_with_one_script() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let read = |path: &str| std::fs::read_to_string(root.join(path)).unwrap();
    let lines = |path: &str| -> Vec<String> {
        read(path)
            .lines()
            .map(|l| l.trim().trim_end_matches(['"', '`', ';']).to_owned())
            .filter(|l| !l.is_empty())
            .collect()
    };
    let ruby = lines("clients/ruby/lib/anteroom/protocol.rb");
    let start = ruby
        .iter()
        .position(|l| l == "COMPLETE_AND_TAKE = <<~LUA")
        .expect("the Ruby client's COMPLETE_AND_TAKE")
        + 1;
    let end = start + ruby[start..].iter().position(|l| l == "LUA").unwrap();
    let lua = &ruby[start..end];
    assert_eq!(lua[0], "#!lua flags=allow-oom");
    let pause = lua.iter().position(|l| l.contains("KEYS[4]")).unwrap();
    let take = lua.iter().position(|l| l.contains("'LMOVE'")).unwrap();
    assert!(pause < take, "{lua:?}");
    for client in [
        "clients/python/src/anteroom/protocol.py",
        "clients/node/lib/protocol.js",
    ] {
        let found = lines(client).windows(lua.len()).any(|w| w == lua);
        assert!(found, "{client} lacks the Ruby client's COMPLETE_AND_TAKE");
    }
}
