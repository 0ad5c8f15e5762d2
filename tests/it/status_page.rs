//! The live status page in a real browser: headless Chromium renders the
//! admin address, and the screenshot must show a paused queue's depth
//! chart rising as requests arrive.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anteroom_testkit::free_port;
use http::{Request, StatusCode};
use http_body_util::Full;

use crate::support::bin::BinProcess;
use crate::support::web::{self, client, send};
use crate::support::{control, eventually, llen, redis_conn, start_redis, wait_for_port};

/// Chromium, if this machine has it (`.ci/run` installs Debian's).
fn chromium() -> Option<PathBuf> {
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .find_map(|name| {
            let path = std::env::var_os("PATH")?;
            std::env::split_paths(&path)
                .map(|dir| dir.join(name))
                .find(|p| p.is_file())
        })
}

async fn headless(browser: &Path, args: &[&str], url: &str) -> Vec<u8> {
    let run = tokio::process::Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1000,700",
        ])
        .args(args)
        .arg(url)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(90), run)
        .await
        .expect("chromium finished within 90 s")
        .expect("chromium runs");
    assert!(out.status.success(), "chromium failed: {out:?}");
    out.stdout
}

/// Rows of the screenshot holding the depth line's colour (#e8590c): the
/// line's vertical extent in pixels.
fn depth_line_extent(png_path: &Path) -> usize {
    let decoder = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(png_path).unwrap(),
    ));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    let channels = info.color_type.samples();
    let row_len = info.line_size;
    let is_orange = |px: &[u8]| {
        // Close to the line's colour only: the red "paused" badge is not.
        px[0].abs_diff(0xe8) < 24 && px[1].abs_diff(0x59) < 24 && px[2].abs_diff(0x0c) < 40
    };
    (0..info.height as usize)
        .filter(|y| {
            buf[y * row_len..(y + 1) * row_len]
                .chunks(channels)
                .any(is_orange)
        })
        .count()
}

/// A proxy process serving `queue` with an admin address; returns the
/// process, its port and the admin address, both accepting.
async fn proxy_with_admin(
    redis: &anteroom_testkit::LocalRedis,
    queue: &str,
    extra: &[&str],
) -> (BinProcess, u16, String) {
    let (port, admin_port) = (free_port().unwrap(), free_port().unwrap());
    let admin = format!("127.0.0.1:{admin_port}");
    let listen = format!("127.0.0.1:{port}");
    let url = redis.url();
    let mut args = vec![
        "proxy", "--listen", &listen, "--admin", &admin, "--redis", &url, "--queue", queue,
    ];
    args.extend_from_slice(extra);
    let proxy = BinProcess::spawn(&args);
    wait_for_port(port).await;
    wait_for_port(admin_port).await;
    (proxy, port, admin)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_a_paused_queues_depth_rising() {
    let browser = chromium().expect(
        "no chromium on this machine: this test needs it (`bash scripts/test.sh` installs Debian's chromium)",
    );
    let redis = start_redis();
    let (_proxy, port, admin) = proxy_with_admin(&redis, "shop", &["--hold", "60s"]).await;
    let queue = control(&redis, "shop").await;
    queue.pause("test", None, false).await.unwrap();
    let page = format!("http://{admin}/");
    let dir = std::env::temp_dir().join(format!("anteroom-page-{port}"));
    std::fs::create_dir_all(&dir).unwrap();
    let (before, after) = (dir.join("before.png"), dir.join("after.png"));
    // Give the sampler (one sample a second) time to record the pause.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    headless(
        &browser,
        &[&format!("--screenshot={}", before.display())],
        &page,
    )
    .await;

    // Requests arrive one by one while paused: the depth rises.
    let c = client();
    let conn = redis_conn(&redis).await;
    let requests = anteroom_protocol::Keys::new("shop").unwrap().requests();
    let mut waiting = Vec::new();
    for n in 1..=6 {
        waiting.push(tokio::spawn({
            let (c, url) = (c.clone(), format!("http://127.0.0.1:{port}/order/{n}"));
            async move { web::get(&c, &url).await.status }
        }));
        eventually(
            "the request to wait in redis",
            Duration::from_secs(10),
            || {
                let (mut conn, key) = (conn.clone(), requests.clone());
                async move { llen(&mut conn, &key).await == n }
            },
        )
        .await;
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;
    headless(
        &browser,
        &[&format!("--screenshot={}", after.display())],
        &page,
    )
    .await;
    let dom = String::from_utf8(headless(&browser, &["--dump-dom"], &page).await).unwrap();
    assert!(dom.contains("6 waiting"), "{dom}");
    assert!(dom.contains(">paused<"), "{dom}");
    assert!(dom.contains("data-action=\"resume\""), "{dom}");

    let (flat, risen) = (depth_line_extent(&before), depth_line_extent(&after));
    println!("depth line: {flat} px tall before, {risen} px after");
    assert!(
        flat <= 6,
        "no request waited, yet the depth line spans {flat} px"
    );
    assert!(
        risen >= 30,
        "the depth line spans only {risen} px after six requests"
    );

    // The page's resume button posts here; the token-free admin allows it.
    let req = Request::post(format!("http://{admin}/resume?queue=shop"))
        .body(Full::default())
        .unwrap();
    assert_eq!(send(&c, req).await.status, StatusCode::OK);
    let req = Request::post(format!("http://{admin}/pause?queue=elsewhere"))
        .body(Full::default())
        .unwrap();
    assert_eq!(send(&c, req).await.status, StatusCode::NOT_FOUND);
    assert!(queue.status().await.unwrap().pause.is_none());
    for w in waiting {
        // No dispatcher serves them; the proxy stops with the test.
        w.abort();
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_the_page_carries_no_data_until_given_one() {
    let redis = start_redis();
    let (_proxy, _, admin) =
        proxy_with_admin(&redis, "private", &["--admin-token", "page-token"]).await;
    let c = client();
    let page = web::get(&c, &format!("http://{admin}/")).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.text().contains("This page needs the admin token"));
    assert!(
        !page.text().contains("data-queue=\"private\""),
        "data without the token"
    );
    // In a browser: a labelled token box and a sentence saying what it
    // needs, not a "loading" that never ends.
    {
        let browser = chromium().expect(
            "no chromium on this machine: this test needs it (`bash scripts/test.sh` installs Debian's chromium)",
        );
        let dom = headless(&browser, &["--dump-dom"], &format!("http://{admin}/")).await;
        let dom = String::from_utf8_lossy(&dom);
        assert!(
            dom.contains("This page needs the admin token")
                && dom.contains("<label for=\"token-input\">Admin token</label>")
                && !dom.contains("loading"),
            "{dom}"
        );
    }
    let ui = web::get(&c, &format!("http://{admin}/ui")).await;
    assert_eq!(ui.status, StatusCode::UNAUTHORIZED);
    let req = Request::get(format!("http://{admin}/ui"))
        .header("authorization", "Bearer page-token")
        .body(Full::default())
        .unwrap();
    eventually("a sample of the queue", Duration::from_secs(10), || {
        let (c, req) = (c.clone(), req.clone());
        async move { send(&c, req).await.text().contains("0 waiting") }
    })
    .await;
}
