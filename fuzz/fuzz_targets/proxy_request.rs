//! The proxy's request path on arbitrary client bytes: hyper parses them as
//! it does on a real connection; each request is turned into an envelope,
//! encoded and decoded, turned back into a request as a dispatcher would,
//! echoed as a reply, and turned into the client's response by the proxy.
//! Redis is left out; everything the proxy does to the bytes is in.
#![no_main]

use std::convert::Infallible;
use std::sync::OnceLock;
use std::time::Duration;

use anteroom_protocol::{RequestEnvelope, ResponseEnvelope};
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    })
}

async fn handle(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let Ok(Ok(collected)) = tokio::time::timeout(
        Duration::from_millis(50),
        Limited::new(body, 64 * 1024).collect(),
    )
    .await
    else {
        return Ok(Response::builder()
            .status(StatusCode::PAYLOAD_TOO_LARGE)
            .body(Full::default())
            .unwrap());
    };
    let head = parts.method == Method::HEAD;
    let client_id = parts.headers.get("x-request-id").cloned();
    let envelope = anteroom_proxy::fuzzing::envelope_for(
        parts,
        collected.to_bytes(),
        "192.0.2.1:4000".parse().unwrap(),
        client_id.as_ref(),
    );
    let decoded =
        RequestEnvelope::decode(Bytes::from(envelope.encode())).expect("own envelope decodes");
    assert_eq!(decoded, envelope);
    // The dispatcher's side; a request hyper accepted must still be valid HTTP.
    let request = decoded
        .to_http()
        .expect("an accepted request converts back");
    // Echo the request's headers as the reply, the worst a handler can send.
    let reply = ResponseEnvelope::from_http(
        &decoded.id,
        StatusCode::OK,
        request.headers(),
        request.body().clone(),
    );
    let reply = ResponseEnvelope::decode(Bytes::from(reply.encode())).expect("own reply decodes");
    let response =
        anteroom_proxy::fuzzing::response_for(&reply, head).expect("echoed reply is valid HTTP");
    Ok(response)
}

fuzz_target!(|data: &[u8]| {
    runtime().block_on(async {
        let (mut client, server) = tokio::io::duplex(256 * 1024);
        let conn = hyper::server::conn::http1::Builder::new()
            .max_buf_size(64 * 1024)
            .serve_connection(TokioIo::new(server), service_fn(handle));
        let serve = tokio::spawn(conn);
        let _ = client.write_all(data).await;
        let _ = client.shutdown().await;
        let mut sink = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(1), client.read_to_end(&mut sink)).await;
        drop(client);
        // A panic in the service surfaces here.
        if let Ok(Err(join)) = tokio::time::timeout(Duration::from_secs(1), serve).await {
            if join.is_panic() {
                std::panic::resume_unwind(join.into_panic());
            }
        }
    });
});
