//! Canary routing through the real proxy binary: a 10 % weight measured
//! over 2,000 requests, each drawn request pinned by the cookie it is
//! given, a pinned client kept on its side exactly, the header picking a
//! side, a route's `canary` table from the configuration file, and the
//! split in `anteroom status`.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;

use crate::support::bin::{BinProcess, command};
use crate::support::web::{Reply, TestClient, client, send};
use crate::support::{TestDispatcher, config_file, start_redis, wait_for_port};

/// An app that answers with the name of the queue it serves.
fn named(
    name: &'static str,
) -> impl tower::Service<
    Request<anteroom_dispatcher::Body>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Send,
> + Clone {
    tower::service_fn(move |_req| async move {
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
            name.as_bytes(),
        ))))
    })
}

async fn get(c: &TestClient, url: &str, headers: &[(&str, &str)]) -> Reply {
    let mut req = Request::get(url);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    send(c, req.body(Full::default()).unwrap()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_share_goes_to_the_canary_and_cookies_pin_clients() {
    let redis = start_redis();
    let file = config_file(
        r#"
[[proxy.routes]]
path_prefix = "/api/"
queue = "api"
canary = { queue = "api-next", weight = 100, cookie = "api_canary" }
"#,
    );
    let port = anteroom_testkit::free_port().unwrap();
    let listen = format!("127.0.0.1:{port}");
    let _proxy = BinProcess::spawn_cmd(
        command()
            .arg("--config")
            .arg(&*file)
            .args(["proxy", "--listen", &listen, "--redis", &redis.url()])
            .args(["--queue", "web", "--canary-queue", "web-canary"])
            .args([
                "--canary-weight",
                "10",
                "--canary-cookie",
                "anteroom_canary",
            ])
            .args(["--canary-header", "X-Canary"])
            .stdout(std::process::Stdio::null()),
    );
    wait_for_port(port).await;
    let _dispatchers = [
        TestDispatcher::start(&redis, "web", named("web")),
        TestDispatcher::start(&redis, "web-canary", named("web-canary")),
        TestDispatcher::start(&redis, "api", named("api")),
        TestDispatcher::start(&redis, "api-next", named("api-next")),
    ];
    let c = client();
    let base = format!("http://{listen}");

    // 2,000 requests from clients without the cookie: about 10 % to the
    // canary (binomial: 200 expected, standard deviation 13.4; the bounds
    // are five of it), each told by its cookie which side it drew.
    let workers: Vec<_> = (0..16)
        .map(|_| {
            let (c, url) = (c.clone(), format!("{base}/page"));
            tokio::spawn(async move {
                let mut sides = Vec::new();
                for _ in 0..125 {
                    let r = get(&c, &url, &[]).await;
                    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
                    let cookie = r.headers[header::SET_COOKIE].to_str().unwrap().to_owned();
                    sides.push((r.text(), cookie));
                }
                sides
            })
        })
        .collect();
    let mut canary = 0;
    for worker in workers {
        for (side, cookie) in worker.await.unwrap() {
            let pinned = if side == "web-canary" {
                canary += 1;
                "anteroom_canary=1;"
            } else {
                assert_eq!(side, "web");
                "anteroom_canary=0;"
            };
            assert!(cookie.starts_with(pinned), "{side} with {cookie}");
            assert!(
                cookie.contains("Path=/") && cookie.contains("HttpOnly"),
                "{cookie}"
            );
        }
    }
    println!("canary share: {canary} of 2000");
    assert!(
        (133..=267).contains(&canary),
        "{canary} of 2000 to the canary"
    );

    // Pinned clients stay exactly where their cookie says, and are not
    // given the cookie again; the header picks a side over the cookie.
    for (cookie, side) in [
        ("anteroom_canary=1", "web-canary"),
        ("anteroom_canary=0", "web"),
    ] {
        for _ in 0..100 {
            let r = get(&c, &format!("{base}/page"), &[("cookie", cookie)]).await;
            assert_eq!(r.text(), side, "{cookie}");
            assert!(!r.headers.contains_key(header::SET_COOKIE));
        }
    }
    let other_cookies = "session=abc; anteroom_canary=1; theme=dark";
    let r = get(&c, &format!("{base}/page"), &[("cookie", other_cookies)]).await;
    assert_eq!(r.text(), "web-canary");
    let by_header = [("x-canary", "1"), ("cookie", "anteroom_canary=0")];
    assert_eq!(
        get(&c, &format!("{base}/page"), &by_header).await.text(),
        "web-canary"
    );
    let by_header = [("x-canary", "0")];
    for _ in 0..20 {
        assert_eq!(
            get(&c, &format!("{base}/page"), &by_header).await.text(),
            "web"
        );
    }

    // The route's canary table: weight 100, its own cookie.
    let r = get(&c, &format!("{base}/api/orders"), &[]).await;
    assert_eq!(r.text(), "api-next");
    assert!(
        r.headers[header::SET_COOKIE]
            .to_str()
            .unwrap()
            .starts_with("api_canary=1;")
    );
    let r = get(
        &c,
        &format!("{base}/api/orders"),
        &[("cookie", "api_canary=0")],
    )
    .await;
    assert_eq!(r.text(), "api");

    // The split in `anteroom status`, once a heartbeat (every 2 s)
    // carries every request routed above.
    let expected = format!(
        "{} of {} routed there",
        canary + 100 + 1 + 1,
        2000 + 200 + 1 + 1 + 20
    );
    let mut shown = String::new();
    for _ in 0..50 {
        let out = command()
            .args(["status", "--redis", &redis.url(), "--queue", "web"])
            .output()
            .unwrap();
        shown = String::from_utf8_lossy(&out.stdout).into_owned();
        if shown.contains(&expected) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        shown.contains(&format!(
            "canary        10% to web-canary, pinned by cookie anteroom_canary or header x-canary: {expected}"
        )),
        "{expected:?} in {shown}"
    );
}

#[test]
fn bad_canary_settings_are_refused() {
    let out = command()
        .args([
            "proxy",
            "--canary-queue",
            "web-next",
            "--canary-weight",
            "150",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("canary weight: 150 is not 0 to 100"), "{err}");
    let file = config_file(
        r#"
[[proxy.routes]]
queue = "api"
canary = { queue = "api-next", cookie = "bad;name" }
"#,
    );
    let out = command()
        .arg("--config")
        .arg(&*file)
        .arg("proxy")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("canary cookie"), "{err}");
    let out = command()
        .args(["proxy", "--canary-weight", "5"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "--canary-weight without --canary-queue: {out:?}"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--canary-weight needs --canary-queue"),
        "{err}"
    );
}
