//! The proxy's pure request and response steps, exposed for the fuzz
//! targets in `fuzz/` (not a stable API).

use std::net::SocketAddr;
use std::time::Duration;

use anteroom_protocol::{RequestEnvelope, ResponseEnvelope};
use bytes::Bytes;
use http::{HeaderValue, Response};
use http_body_util::Full;

use crate::translate::{self as handler, Route};

/// What the proxy puts on the queue for this request.
pub fn envelope_for(
    parts: http::request::Parts,
    body: Bytes,
    client: SocketAddr,
    client_request_id: Option<&HeaderValue>,
) -> RequestEnvelope {
    let fallback = HeaderValue::from_static("fuzz-request-id");
    let request_id = client_request_id
        .filter(|v| handler::usable_request_id(v))
        .unwrap_or(&fallback);
    handler::envelope_for(
        parts,
        body,
        Route {
            client,
            id: "fuzz",
            request_id,
            reply_to: "anteroom:{fuzz}:replies:p",
            now_ms: 1,
            hold: Duration::from_secs(30),
            dedupe: true,
            stream: false,
            body_follows: false,
            websocket: false,
        },
    )
}

/// What the proxy sends the client for this reply; `None` where the proxy
/// would answer 502 (a reply that is not valid HTTP).
pub fn response_for(reply: &ResponseEnvelope, head_request: bool) -> Option<Response<Full<Bytes>>> {
    handler::build_response(reply, head_request).ok()
}
