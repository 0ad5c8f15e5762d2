//! The deploy playbooks in examples/, run as written under steady load:
//! a rolling deploy, "stop all, deploy, start all", and a database failover
//! window with real PostgreSQL. Each asserts 0 failed requests and reports
//! the longest wait.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anteroom_control::Queue;
use anteroom_testkit::LocalRedis;
use axum::Router;
use axum::routing::any;
use http::StatusCode;

use crate::support::bin::BinProcess;
use crate::support::load::Load;
use crate::support::{TestProxy, eventually, start_redis};

const READY: Duration = Duration::from_secs(20);
const BIN: &str = env!("CARGO_BIN_EXE_anteroom");

fn example(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(path)
}

/// An upstream app that answers every request with its version.
async fn version_upstream(version: &'static str) -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let app = Router::new().fallback(any(move || async move { version }));
    let handle = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, handle)
}

fn dispatch_args(redis: &LocalRedis, queue: &str, upstream: &str, label: &str) -> Vec<String> {
    [
        "dispatch",
        "--redis",
        &redis.url(),
        "--queue",
        queue,
        "--upstream",
        upstream,
        "--label",
        label,
        "--concurrency",
        "4",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Runs a playbook script with the anteroom environment set.
async fn run_script(
    redis: &LocalRedis,
    queue: &str,
    script: PathBuf,
    args: Vec<String>,
    extra_env: Vec<(&'static str, String)>,
) -> Output {
    let (url, queue) = (redis.url(), queue.to_owned());
    tokio::task::spawn_blocking(move || {
        Command::new(script)
            .args(args)
            .env("ANTEROOM", BIN)
            .env("ANTEROOM_REDIS", url)
            .env("ANTEROOM_QUEUE", queue)
            .env("RUST_LOG", "warn")
            .envs(extra_env)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

/// The last line of a script's output: the pid of what it started.
fn started_pid(out: &Output) -> u32 {
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .last()
        .unwrap()
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("no pid in {stdout:?}"))
}

async fn stop_pid(queue: &Queue, pid: u32) {
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    eventually("the dispatcher to leave", READY, || async {
        !queue
            .status()
            .await
            .unwrap()
            .dispatchers
            .iter()
            .any(|d| d.heartbeat.pid == pid)
    })
    .await;
}

async fn live_labels(queue: &Queue) -> Vec<String> {
    let mut labels: Vec<String> = queue
        .status()
        .await
        .unwrap()
        .dispatchers
        .into_iter()
        .map(|d| d.heartbeat.label)
        .collect();
    labels.sort();
    labels
}

fn spawn_dispatcher(args: &[String]) -> BinProcess {
    BinProcess::spawn(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_deploy_under_load_fails_nothing() {
    let redis = start_redis();
    let (v1_url, _v1) = version_upstream("v1").await;
    let (v2_url, _v2) = version_upstream("v2").await;
    let proxy = TestProxy::start(&redis, "roll").await;
    let queue = crate::support::control(&redis, "roll").await;
    // Both versions serve metrics on one address, as on one host.
    let metrics = format!("127.0.0.1:{}", anteroom_testkit::free_port().unwrap());
    let with_metrics = |mut args: Vec<String>| {
        args.extend(["--metrics".to_owned(), metrics.clone()]);
        args
    };
    let mut v1 = spawn_dispatcher(&with_metrics(dispatch_args(&redis, "roll", &v1_url, "v1")));
    eventually("v1 to be live", READY, || async {
        live_labels(&queue).await == ["v1"]
    })
    .await;

    let load = Load::start(8, proxy.url("/"), |w, n| format!("{w}-{n}"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut args = vec![v1.pid().to_string(), "v2".into(), "--".into(), BIN.into()];
    args.extend(with_metrics(dispatch_args(&redis, "roll", &v2_url, "v2")));
    let out = run_script(&redis, "roll", example("deploy/rolling.sh"), args, vec![]).await;
    assert!(
        out.status.success(),
        "rolling.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v2_pid = started_pid(&out);
    let rolled = std::time::Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let summary = load.finish().await;

    summary.report("rolling deploy", |s| s == StatusCode::OK);
    assert_eq!(summary.failed(|s| s == StatusCode::OK), 0);
    let served_by = |v: &str| summary.samples.iter().filter(|s| s.body == v).count();
    assert!(
        served_by("v1") > 0 && served_by("v2") > 0,
        "v1 {} v2 {}",
        served_by("v1"),
        served_by("v2")
    );
    assert!(
        summary
            .samples
            .iter()
            .filter(|s| s.started > rolled)
            .all(|s| s.body == "v2"),
        "v1 served after it was stopped"
    );
    let status = v1.wait(READY).await;
    assert!(status.success(), "v1 exited with {status}");
    assert_eq!(live_labels(&queue).await, ["v2"]);
    stop_pid(&queue, v2_pid).await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_all_deploy_start_all_under_load_fails_nothing() {
    let redis = start_redis();
    let (v1_url, _v1) = version_upstream("v1").await;
    let (v2_url, _v2) = version_upstream("v2").await;
    let proxy = TestProxy::start(&redis, "all").await;
    let queue = crate::support::control(&redis, "all").await;
    let mut a = spawn_dispatcher(&dispatch_args(&redis, "all", &v1_url, "v1"));
    let mut b = spawn_dispatcher(&dispatch_args(&redis, "all", &v1_url, "v1"));
    eventually("both v1 to be live", READY, || async {
        live_labels(&queue).await == ["v1", "v1"]
    })
    .await;

    let load = Load::start(8, proxy.url("/"), |w, n| format!("{w}-{n}"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let deploy = Duration::from_secs(1);
    let mut args = vec![format!("{} {}", a.pid(), b.pid()), "--".into(), BIN.into()];
    args.extend(dispatch_args(&redis, "all", &v2_url, "v2"));
    let out = run_script(
        &redis,
        "all",
        example("deploy/stop_all.sh"),
        args,
        vec![("DEPLOY", format!("sleep {}", deploy.as_secs()))],
    )
    .await;
    assert!(
        out.status.success(),
        "stop_all.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v2_pid = started_pid(&out);
    eventually("v2 to be live", READY, || async {
        live_labels(&queue).await == ["v2"]
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let summary = load.finish().await;

    summary.report("stop all, deploy, start all", |s| s == StatusCode::OK);
    assert_eq!(summary.failed(|s| s == StatusCode::OK), 0);
    // Requests waited through the deploy rather than failing.
    assert!(
        summary.longest() >= deploy,
        "nothing waited: {:?}",
        summary.longest()
    );
    assert!(
        summary.longest() < deploy + Duration::from_secs(5),
        "{:?}",
        summary.longest()
    );
    assert!(summary.samples.iter().any(|s| s.body == "v2"));
    assert!(a.wait(READY).await.success());
    assert!(b.wait(READY).await.success());
    stop_pid(&queue, v2_pid).await;
    proxy.stop().await;
}

/// stop_all.sh fails loudly, saying that nothing serves the queue and how
/// to recover, when the deploy step fails or the new release never takes
/// requests (here: a typo in its command); it never reports success then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_all_says_when_nothing_serves_the_queue() {
    let redis = start_redis();
    let (v1_url, _v1) = version_upstream("v1").await;
    let queue = crate::support::control(&redis, "fail").await;
    for (deploy, typo) in [("false", false), ("true", true)] {
        let mut old = spawn_dispatcher(&dispatch_args(&redis, "fail", &v1_url, "v1"));
        eventually("v1 to be live", READY, || async {
            live_labels(&queue).await == ["v1"]
        })
        .await;
        let mut args = vec![old.pid().to_string(), "--".into(), BIN.into()];
        let mut new = dispatch_args(&redis, "fail", &v1_url, "v2");
        if typo {
            new[5] = "--upstrem".into();
        }
        args.extend(new);
        let out = run_script(
            &redis,
            "fail",
            example("deploy/stop_all.sh"),
            args,
            vec![("DEPLOY", deploy.to_owned())],
        )
        .await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        let why = if typo {
            "the new dispatcher exited"
        } else {
            "the deploy step failed: false"
        };
        assert!(stderr.contains(why), "{stderr}");
        assert!(
            stderr.contains("NO DISPATCHER SERVES queue fail now")
                && stderr.contains("get 504 once their hold budget passes")
                && stderr.contains("to recover, start a dispatcher"),
            "{stderr}"
        );
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("is live"),
            "reported success"
        );
        assert!(old.wait(READY).await.success());
        assert!(live_labels(&queue).await.is_empty());
    }
}

/// rolling.sh stops nothing until the new dispatcher itself takes requests
/// (a live dispatcher with the same label does not count), and touches
/// nothing when OLD_PID is not a live dispatcher.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_keeps_the_old_dispatcher_unless_the_new_one_is_ready() {
    let redis = start_redis();
    let (v1_url, _v1) = version_upstream("v1").await;
    let queue = crate::support::control(&redis, "keep").await;
    let mut old = spawn_dispatcher(&dispatch_args(&redis, "keep", &v1_url, "v1"));
    eventually("v1 to be live", READY, || async {
        live_labels(&queue).await == ["v1"]
    })
    .await;
    let dead = format!(
        "http://127.0.0.1:{}",
        anteroom_testkit::free_port().unwrap()
    );
    // The same label, an upstream that is not there.
    let mut args = vec![old.pid().to_string(), "v1".into(), "--".into(), BIN.into()];
    args.extend(dispatch_args(&redis, "keep", &dead, "v1"));
    args.extend(["--health-path".into(), "/up".into()]);
    let out = run_script(
        &redis,
        "keep",
        example("deploy/rolling.sh"),
        args,
        vec![("READY_WAIT", "2".to_owned())],
    )
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("taking requests: not after 2s")
            && stderr.contains("the old one still serves the queue"),
        "{stderr}"
    );
    eventually("only v1 left", READY, || async {
        live_labels(&queue).await == ["v1"]
    })
    .await;
    assert!(
        old.child().try_wait().unwrap().is_none(),
        "the old dispatcher was stopped"
    );

    // A pid that is no dispatcher: nothing started, nothing stopped.
    let mut args = vec!["999999".to_owned(), "v2".into(), "--".into(), BIN.into()];
    args.extend(dispatch_args(&redis, "keep", &v1_url, "v2"));
    let out = run_script(&redis, "keep", example("deploy/rolling.sh"), args, vec![]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("pid 999999 is not a live dispatcher"),
        "{stderr}"
    );
    assert_eq!(live_labels(&queue).await, ["v1"]);
    old.terminate();
    assert!(old.wait(READY).await.success());
}

/// The test's own PostgreSQL databases, dropped at the end.
struct Databases {
    admin: tokio_postgres::Client,
    names: [String; 2],
}

const PG: &str = "host=127.0.0.1 port=5432 user=postgres";

fn pg_dsn() -> String {
    std::env::var("ANTEROOM_TEST_PG").unwrap_or_else(|_| PG.to_owned())
}

impl Databases {
    async fn create(tag: &str) -> Self {
        let (admin, connection) = tokio_postgres::connect(
            &format!("{} dbname=postgres", pg_dsn()),
            tokio_postgres::NoTls,
        )
        .await
        .expect("PostgreSQL on 127.0.0.1:5432 (trust auth), or set ANTEROOM_TEST_PG");
        tokio::spawn(connection);
        let names = ["a", "b"].map(|s| format!("anteroom_{tag}_{}_{s}", std::process::id()));
        for name in &names {
            admin
                .batch_execute(&format!("drop database if exists {name} with (force)"))
                .await
                .unwrap();
            admin
                .batch_execute(&format!("create database {name}"))
                .await
                .unwrap();
            let (db, connection) =
                tokio_postgres::connect(&Self::dsn_of(name), tokio_postgres::NoTls)
                    .await
                    .unwrap();
            let task = tokio::spawn(connection);
            db.batch_execute(
                "create table orders (id bigserial primary key, note text not null unique)",
            )
            .await
            .unwrap();
            drop(db);
            let _ = task.await;
        }
        Self { admin, names }
    }

    fn dsn_of(name: &str) -> String {
        format!("{} dbname={name}", pg_dsn())
    }

    fn dsn(&self, i: usize) -> String {
        Self::dsn_of(&self.names[i])
    }

    async fn notes(&self, i: usize) -> Vec<String> {
        let (db, connection) = tokio_postgres::connect(&self.dsn(i), tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        let rows = db
            .query("select note from orders order by id", &[])
            .await
            .unwrap();
        rows.iter().map(|r| r.get(0)).collect()
    }

    async fn drop_all(self) {
        for name in &self.names {
            let _ = self
                .admin
                .batch_execute(&format!("drop database if exists {name} with (force)"))
                .await;
        }
    }
}

/// `anteroom window --queue QUEUE --timeout 10s -- examples/SCRIPT ARGS`
/// with `env`, to completion; its output and how long it took.
async fn run_window(
    redis: &LocalRedis,
    queue: &str,
    script: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> (Output, Duration) {
    let mut cmd = Command::new(BIN);
    cmd.args(["window", "--redis", &redis.url(), "--queue", queue])
        .args(["--timeout", "10s", "--"])
        .arg(example(script))
        .args(args)
        .envs(env.iter().copied())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null());
    let started = std::time::Instant::now();
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    (out, started.elapsed())
}

/// The example binary the test runs, built by `cargo test` beside this one.
fn example_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap();
    let path = profile_dir.join("examples").join(name);
    assert!(
        path.exists(),
        "{} not built; run the tests with `cargo test`",
        path.display()
    );
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_failover_window_under_load_fails_nothing() {
    let dbs = Databases::create("failover").await;
    let redis = start_redis();
    let dsn_file = std::env::temp_dir().join(format!("anteroom-dsn-{}", std::process::id()));
    std::fs::write(&dsn_file, dbs.dsn(0)).unwrap();
    let proxy = TestProxy::start(&redis, "fo").await;
    let queue = crate::support::control(&redis, "fo").await;
    let mut backend = BinProcess::spawn_cmd(
        Command::new(example_binary("failover_backend"))
            .env("ANTEROOM_REDIS", redis.url())
            .env("ANTEROOM_QUEUE", "fo")
            .env("DSN_FILE", &dsn_file)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null()),
    );
    eventually("the backend to be live", READY, || async {
        live_labels(&queue).await == ["failover-backend"]
    })
    .await;

    let load = Load::start(8, proxy.url("/orders"), |w, n| format!("order {w}-{n}"));
    tokio::time::sleep(Duration::from_millis(700)).await;
    let file = dsn_file.display().to_string();
    let (out, window) = run_window(
        &redis,
        "fo",
        "failover/switch_primary.sh",
        &[&dbs.dsn(0), &dbs.dsn(1), &file],
        &[],
    )
    .await;
    assert!(
        out.status.success(),
        "window failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    let summary = load.finish().await;

    summary.report("failover window", |s| s == StatusCode::CREATED);
    println!("the window (pause, quiet, switch, resume) took {window:?}");
    assert_eq!(summary.failed(|s| s == StatusCode::CREATED), 0);
    assert!(
        summary.longest() <= window + Duration::from_secs(1),
        "{:?}",
        summary.longest()
    );
    let db_of = |s: &crate::support::load::Sample| {
        String::from_utf8_lossy(&s.body)
            .split_whitespace()
            .nth(1)
            .unwrap_or("")
            .to_owned()
    };
    let (a_name, b_name) = (&dbs.names[0], &dbs.names[1]);
    assert!(
        summary.samples.iter().any(|s| db_of(s) == *a_name),
        "nothing went to the old primary"
    );
    assert!(
        summary.samples.iter().any(|s| db_of(s) == *b_name),
        "nothing went to the new primary"
    );
    // Every acknowledged order is in the new primary exactly once.
    let in_b = dbs.notes(1).await;
    let mut acknowledged: Vec<String> = summary
        .samples
        .iter()
        .map(|s| String::from_utf8_lossy(&s.sent).into_owned())
        .collect();
    acknowledged.sort();
    let mut in_b_sorted = in_b.clone();
    in_b_sorted.sort();
    assert_eq!(
        in_b_sorted, acknowledged,
        "the new primary does not hold exactly the acknowledged orders"
    );
    // The old primary got nothing after the switch.
    let in_a = dbs.notes(0).await;
    assert!(in_a.len() < in_b.len());
    assert_eq!(in_a[..], in_b[..in_a.len()], "the old primary diverged");

    backend.terminate();
    assert!(backend.wait(READY).await.success());
    proxy.stop().await;
    let _ = std::fs::remove_file(&dsn_file);
    dbs.drop_all().await;
}

/// The MySQL role swap of the talk that started the project, for real: two
/// MariaDB servers of the test's own, the replica following the primary by
/// GTID; an order-taking app under `anteroom-wsgi` that writes through a
/// floating address (a forwarder whose target is a file); steady write
/// load through the proxy; `anteroom window` running
/// examples/failover/mysql_role_swap.sh as written. No request fails,
/// every acknowledged order is on the new primary exactly once, and the old
/// primary then replicates from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_role_swap_under_write_load_fails_nothing() {
    use crate::support::mariadb::MariaDb;
    let (primary, replica) =
        tokio::join!(MariaDb::start("primary", 1), MariaDb::start("replica", 2));
    let accounts = "CREATE USER 'admin'@'%' IDENTIFIED BY 'admin-pw'; \
         GRANT ALL PRIVILEGES ON *.* TO 'admin'@'%'; \
         CREATE USER 'repl'@'%' IDENTIFIED BY 'repl-pw'; \
         GRANT REPLICATION SLAVE ON *.* TO 'repl'@'%'; \
         CREATE USER 'app'@'%' IDENTIFIED BY 'app-pw'; \
         GRANT ALL PRIVILEGES ON shop.* TO 'app'@'%';";
    for server in [&primary, &replica] {
        // Each server's own accounts, kept out of the binary log.
        server
            .sql(&format!("SET sql_log_bin = 0; {accounts}"))
            .await;
    }
    primary
        .sql("CREATE DATABASE shop; CREATE TABLE shop.orders (id BIGINT AUTO_INCREMENT PRIMARY KEY, note VARCHAR(200) NOT NULL UNIQUE)")
        .await;
    replica
        .sql(&format!(
            "SET GLOBAL gtid_slave_pos = ''; CHANGE MASTER TO MASTER_HOST = '127.0.0.1', \
             MASTER_PORT = {}, MASTER_USER = 'repl', MASTER_PASSWORD = 'repl-pw', \
             MASTER_USE_GTID = slave_pos; START SLAVE; SET GLOBAL read_only = ON",
            primary.port
        ))
        .await;
    eventually("the replica to follow", READY, || async {
        replica
            .try_sql("SHOW TABLES FROM shop")
            .await
            .is_ok_and(|t| t.contains("orders"))
    })
    .await;

    // The floating address, on the primary.
    let dir = std::env::temp_dir().join(format!(
        "anteroom-vip-{}-{}",
        std::process::id(),
        primary.port
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let address_file = dir.join("address");
    std::fs::write(&address_file, primary.address()).unwrap();
    let vip_port = anteroom_testkit::free_port().unwrap();
    let apps = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/apps");
    let _vip = BinProcess::spawn_cmd(
        Command::new(crate::support::venv::bin("python"))
            .arg(apps.join("floating_address.py"))
            .arg(vip_port.to_string())
            .arg(&address_file)
            .stdin(Stdio::null())
            .stdout(Stdio::null()),
    );
    crate::support::wait_for_port(vip_port).await;

    let redis = start_redis();
    let proxy = TestProxy::start(&redis, "mysql").await;
    let queue = crate::support::control(&redis, "mysql").await;
    let _app = BinProcess::spawn_cmd(
        Command::new(crate::support::venv::bin("anteroom-wsgi"))
            .args(["--threads", "8", "mysql_orders:app"])
            .current_dir(&apps)
            .env("ANTEROOM_REDIS", redis.url())
            .env("ANTEROOM_QUEUE", "mysql")
            .env("ORDERS_DB_PORT", vip_port.to_string())
            .env("ORDERS_DB_USER", "app")
            .env("ORDERS_DB_PASSWORD", "app-pw")
            .env("ORDERS_DB_NAME", "shop")
            .stdin(Stdio::null())
            .stdout(Stdio::null()),
    );
    crate::support::until_dispatching(&queue).await;

    let load = Load::start(8, proxy.url("/orders"), |w, n| format!("order {w}-{n}"));
    // Steady writes before the window (100 orders) and after it (100
    // more, on the new primary).
    const ORDERS: &str = "SELECT COUNT(*) FROM shop.orders";
    eventually("100 orders on the primary", READY, || async {
        primary.number(ORDERS).await >= 100
    })
    .await;
    let file = address_file.display().to_string();
    let swap_env = [
        ("MYSQL_USER", "admin"),
        ("MYSQL_PWD", "admin-pw"),
        ("REPL_USER", "repl"),
        ("REPL_PASSWORD", "repl-pw"),
    ];
    // A swap that cannot be done (the replica's replication stopped)
    // changes nothing: the script says why and exits 1, the window
    // resumes onto the old primary, and no request fails.
    replica.sql("STOP SLAVE").await;
    let (out, _) = run_window(
        &redis,
        "mysql",
        "failover/mysql_role_swap.sh",
        &[&primary.address(), &replica.address(), &file],
        &swap_env,
    )
    .await;
    assert!(
        !out.status.success(),
        "a swap onto a stopped replica went ahead"
    );
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("is not replicating"), "{said}");
    assert_eq!(primary.sql("SELECT @@read_only").await.trim(), "0");
    assert_eq!(
        std::fs::read_to_string(&address_file).unwrap().trim(),
        primary.address()
    );
    replica.sql("START SLAVE").await;
    let before = primary.number(ORDERS).await;
    eventually("orders after the refused swap", READY, || async {
        primary.number(ORDERS).await >= before + 20
    })
    .await;
    let (out, window) = run_window(
        &redis,
        "mysql",
        "failover/mysql_role_swap.sh",
        &[&primary.address(), &replica.address(), &file],
        &swap_env,
    )
    .await;
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "window failed: {said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains("swapped:"), "{said}");
    // Load on the new primary for a while after the window.
    let orders_before = replica.number(ORDERS).await;
    eventually("100 orders on the new primary", READY, || async {
        replica.number(ORDERS).await >= orders_before + 100
    })
    .await;
    let summary = load.finish().await;
    summary.report("mysql role swap", |s| s == StatusCode::CREATED);
    println!("the MySQL role swap window (pause, quiet, swap, resume) took {window:?}");
    for line in said
        .lines()
        .filter(|l| l.contains("window") || l.contains("swapped"))
    {
        println!("  {line}");
    }
    assert_eq!(summary.failed(|s| s == StatusCode::CREATED), 0);
    // Orders went to each server in turn: server 1, then server 2.
    let server_of = |s: &crate::support::load::Sample| {
        String::from_utf8_lossy(&s.body)
            .split_whitespace()
            .nth(1)
            .unwrap_or("")
            .to_owned()
    };
    let on_1 = summary
        .samples
        .iter()
        .filter(|s| server_of(s) == "1")
        .count();
    let on_2 = summary
        .samples
        .iter()
        .filter(|s| server_of(s) == "2")
        .count();
    println!(
        "orders acknowledged: {} ({on_1} by the old primary, {on_2} by the new one)",
        summary.samples.len()
    );
    assert!(
        on_1 > 0 && on_2 > 0,
        "{on_1} on the old primary, {on_2} on the new"
    );
    // Every acknowledged order is on the new primary exactly once (the
    // column is UNIQUE, and the count matches).
    let mut acknowledged: Vec<String> = summary
        .samples
        .iter()
        .map(|s| String::from_utf8_lossy(&s.sent).into_owned())
        .collect();
    acknowledged.sort();
    let rows = replica
        .sql("SELECT note FROM shop.orders ORDER BY note")
        .await;
    let mut on_new: Vec<String> = rows.lines().map(str::to_owned).collect();
    on_new.sort();
    assert_eq!(
        on_new, acknowledged,
        "the new primary does not hold exactly the acknowledged orders"
    );
    // The old primary is read-only and replicates from the new one.
    assert_eq!(primary.sql("SELECT @@read_only").await.trim(), "1");
    eventually("the old primary to catch up", READY, || async {
        primary.sql("SELECT COUNT(*) FROM shop.orders").await.trim()
            == acknowledged.len().to_string()
    })
    .await;
    let _ = std::fs::remove_dir_all(&dir);
}
