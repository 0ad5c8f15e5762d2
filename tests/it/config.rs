//! The configuration file through the real binary: precedence flag >
//! environment > file > default, `--check-config`, errors that name the key,
//! and a proxy whose routes come from the file.

use std::path::PathBuf;

use anteroom_testkit::free_port;
use http::{Request, StatusCode};
use http_body_util::Full;

use crate::support::app::Upstream;
use crate::support::bin::{BinProcess, command};
use crate::support::wait_for_port;
use crate::support::web::{client, send};
use crate::support::{config_file, start_redis};

fn check(path: &PathBuf, args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = command()
        .args(["proxy", "--check-config", "--config"])
        .arg(path)
        .args(args)
        .env_remove("ANTEROOM_HOLD")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn flag_beats_environment_beats_file_beats_default() {
    let path = config_file(
        "redis = \"redis://:hunter2@127.0.0.1:6390\"\nqueue = \"from-file\"\n\
         [proxy]\nhold = \"45s\"\nmax_waiting = 9\n",
    );
    let (code, out, err) = check(&path, &[], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("queue from-file (hold 45s, max waiting 9)"),
        "{out}"
    );
    assert!(!out.contains("hunter2"), "the password is printed:\n{out}");
    let (_, out, _) = check(&path, &[], &[("ANTEROOM_HOLD", "7s")]);
    assert!(out.contains("(hold 7s,"), "environment over file:\n{out}");
    let (_, out, _) = check(&path, &["--hold", "5s"], &[("ANTEROOM_HOLD", "7s")]);
    assert!(out.contains("(hold 5s,"), "flag over environment:\n{out}");
    let path = config_file("queue = \"q\"\n");
    let (_, out, _) = check(&path, &[], &[]);
    assert!(
        out.contains("(hold 30s, max waiting 20000)"),
        "defaults:\n{out}"
    );
}

#[test]
fn a_bad_file_is_refused_naming_the_key() {
    for (text, expected) in [
        (
            "[proxy]\nhold = \"3 fortnights\"\n",
            "[proxy] hold = \"3 fortnights\": invalid value",
        ),
        (
            "[proxy]\nmax_wating = 3\n",
            "[proxy] max_wating: unknown key",
        ),
        ("[proxy\n", "not valid TOML"),
        (
            "[[proxy.routes]]\nqueue = \"no spaces allowed\"\n",
            "[[proxy.routes]] #1 queue",
        ),
        (
            "[proxy]\ndefault_queue = false\n",
            "no routes: nothing to serve",
        ),
    ] {
        let path = config_file(text);
        let (code, _, err) = check(&path, &[], &[]);
        assert_eq!(code, 2, "{text:?}: {err}");
        assert!(err.contains(expected), "{text:?} gave:\n{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_routes_as_its_file_says() {
    let redis = start_redis();
    let upstream = Upstream::start().await;
    let port = free_port().unwrap();
    let path = config_file(&format!(
        "redis = \"{}\"\nqueue = \"unused\"\n\
         [proxy]\nlisten = \"127.0.0.1:{port}\"\ndefault_queue = false\n\
         [[proxy.routes]]\npath_prefix = \"/echo\"\nqueue = \"echoes\"\n\
         [dispatch]\nqueue = \"echoes\"\nupstream = \"{}\"\n",
        redis.url(),
        upstream.url()
    ));
    let config = path.to_str().unwrap();
    let _proxy = BinProcess::spawn(&["proxy", "--config", config]);
    let _dispatcher = BinProcess::spawn(&["dispatch", "--config", config]);
    wait_for_port(port).await;
    let c = client();
    let req = Request::post(format!("http://127.0.0.1:{port}/echo"))
        .body(Full::new(bytes::Bytes::from_static(b"routed by the file")))
        .unwrap();
    let r = send(&c, req).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.text(), "routed by the file");
    let req = Request::get(format!("http://127.0.0.1:{port}/other"))
        .body(Full::default())
        .unwrap();
    assert_eq!(send(&c, req).await.status, StatusCode::NOT_FOUND);
}

/// The documented example (docs/configuration.md) is a valid file.
#[test]
fn the_documented_example_is_valid() {
    let path = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/anteroom.toml"
    ));
    let (code, out, err) = check(&path, &[], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("route 1   host api.example.com path * -> queue api (hold 10s"),
        "{out}"
    );
    assert!(out.contains("default   -> queue web"), "{out}");
    let docs = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/configuration.md"
    ))
    .unwrap();
    let example = std::fs::read_to_string(&path).unwrap();
    assert!(
        docs.contains(example.trim()),
        "docs/configuration.md must quote examples/anteroom.toml as it is"
    );
}

/// `--check-config` works for every command: it builds what the command
/// would run without connecting, lists every setting with its source
/// (secrets masked), and warns about settings that contradict each other.
#[test]
fn every_command_checks_its_configuration() {
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let out = command()
            .arg(args[0])
            .arg("--check-config")
            .args(&args[1..])
            .envs(env.iter().copied())
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, err) = run(
        &[
            "dispatch",
            "--upstream",
            "http://127.0.0.1:3000",
            "--label",
            "v2",
        ],
        &[("ANTEROOM_REDIS", "redis://:hunter2@10.0.0.5:6379")],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("command   dispatch"), "{out}");
    assert!(
        out.contains("redis://***@10.0.0.5:6379  (env ANTEROOM_REDIS)"),
        "{out}"
    );
    assert!(
        out.contains("--label") && out.contains("v2  (flag)"),
        "{out}"
    );
    assert!(
        out.contains("--health-interval") && out.contains("1s  (default)"),
        "{out}"
    );
    assert!(!out.contains("hunter2") && !err.contains("hunter2"));

    let (code, _, err) = run(
        &[
            "dispatch",
            "--upstream",
            "http://127.0.0.1:3000",
            "--health-path",
            "up",
        ],
        &[],
    );
    assert_eq!(code, 2);
    assert!(err.contains("invalid health check path \"up\""), "{err}");
    // A hold budget dispatchers would refuse is refused at once.
    let (code, _, err) = run(&["proxy", "--hold", "25h"], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("at most 24h"), "{err}");
    // Credentials in the upstream URL are refused, and never echoed.
    let (code, out, err) = run(
        &[
            "dispatch",
            "--upstream",
            "http://app:s3cret@127.0.0.1:3000/x",
        ],
        &[],
    );
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("http://***@127.0.0.1:3000/x"), "{err}");
    assert!(err.contains("carries credentials"), "{err}");
    assert!(
        !out.contains("s3cret") && !err.contains("s3cret"),
        "{out}{err}"
    );
    let (code, _, err) = run(&["dispatch", "--upstream", "ftp://x"], &[]);
    assert_eq!(code, 2);
    assert!(err.contains("invalid upstream url"), "{err}");

    let (code, out, err) = run(
        &["proxy", "--admin-token", "s3cret", "--durable-wait", "1s"],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("--admin-token is set but --admin is not"),
        "{err}"
    );
    assert!(
        err.contains("--durable-wait is set but --durable is not"),
        "{err}"
    );
    assert!(!out.contains("s3cret"), "{out}");

    let (code, _, err) = run(&["proxy", "--hold", "0s"], &[]);
    assert_eq!(code, 2);
    assert!(err.contains("the hold budget must be above zero"), "{err}");
    let (code, _, err) = run(
        &[
            "dispatch",
            "--upstream",
            "http://127.0.0.1:3000",
            "--heartbeat-ttl",
            "100ms",
        ],
        &[],
    );
    assert_eq!(code, 2);
    assert!(
        err.contains("heartbeat ttl must be at least 300ms"),
        "{err}"
    );
    let (code, _, err) = run(&["pause", "--timeout", "5s"], &[]);
    assert_eq!(code, 0);
    assert!(err.contains("applies only with --wait"), "{err}");
    let (code, _, err) = run(&["pause", "--queue", "no spaces"], &[]);
    assert_eq!(code, 2);
    assert!(err.contains("queue:"), "{err}");
    let (code, out, _) = run(&["window", "--", "true"], &[]);
    assert_eq!(code, 0);
    assert!(
        out.contains("command   window") && out.contains("--lease"),
        "{out}"
    );
    assert!(out.contains("runs      true"), "{out}");
    let (code, _, err) = run(&["status", "--redis", "http://nope"], &[]);
    assert_eq!(code, 2, "{err}");
}
