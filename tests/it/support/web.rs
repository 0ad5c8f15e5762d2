//! A real HTTP client.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

pub type TestClient = Client<HttpConnector, Full<Bytes>>;

/// Upper bound on any one test request: nothing in these tests may hang.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

pub fn client() -> TestClient {
    Client::builder(TokioExecutor::new()).build_http()
}

pub fn h2c_client() -> TestClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

pub async fn send(client: &TestClient, req: Request<Full<Bytes>>) -> Reply {
    try_send(client, req).await.expect("request failed")
}

/// Sends `req`; `Err` describes a failed connection (with its causes).
/// Panics if no answer comes within [`REQUEST_TIMEOUT`].
pub async fn try_send(client: &TestClient, req: Request<Full<Bytes>>) -> Result<Reply, String> {
    let describe = |err: &dyn std::error::Error| {
        let mut text = err.to_string();
        let mut source = err.source();
        while let Some(cause) = source {
            text.push_str(&format!(": {cause}"));
            source = cause.source();
        }
        text
    };
    let fut = async {
        let resp = client.request(req).await.map_err(|e| describe(&e))?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.map_err(|e| describe(&e))?.to_bytes();
        Ok(Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    };
    tokio::time::timeout(REQUEST_TIMEOUT, fut)
        .await
        .expect("request hung")
}

pub async fn get(client: &TestClient, url: &str) -> Reply {
    send(client, Request::get(url).body(Full::default()).unwrap()).await
}

pub async fn post(client: &TestClient, url: &str, body: impl Into<Bytes>) -> Reply {
    send(
        client,
        Request::post(url).body(Full::new(body.into())).unwrap(),
    )
    .await
}
