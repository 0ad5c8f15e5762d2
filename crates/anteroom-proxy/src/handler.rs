//! One request: read the body, enqueue the envelope, wait for the reply.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anteroom_protocol::{Failure, RequestEnvelope, ResponseEnvelope, now_ms, strip_hop_by_hop};
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use tracing::Instrument;

use crate::config::ProxyConfig;
use crate::enqueue::{Enqueuer, PushError};
use crate::error::{ProxyError, failure_response};
use crate::replies::Demux;

static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// Longest client-supplied `X-Request-Id` kept; longer or non-visible ones are replaced.
const MAX_REQUEST_ID_LEN: usize = 200;

/// What every request handler shares.
pub(crate) struct State {
    pub(crate) config: ProxyConfig,
    pub(crate) queue: String,
    pub(crate) reply_key: String,
    pub(crate) conn: anteroom_redis::SharedConnection,
    pub(crate) demux: Arc<Demux>,
    pub(crate) budget: Arc<crate::budget::Budget>,
    pub(crate) enqueuer: Enqueuer,
}

/// Serves one request; never fails (errors become responses).
pub(crate) async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
    client: SocketAddr,
) -> Response<Full<Bytes>> {
    let id = uuid::Uuid::now_v7().to_string();
    let request_id = req
        .headers()
        .get(&X_REQUEST_ID)
        .filter(|v| usable_request_id(v))
        .cloned()
        .unwrap_or_else(|| HeaderValue::from_str(&id).unwrap_or(HeaderValue::from_static("-")));
    let span = tracing::info_span!(
        "request",
        request_id = %String::from_utf8_lossy(request_id.as_bytes()),
        queue = %state.queue,
        method = %req.method(),
        path = %req.uri().path(),
    );
    async move {
        let started = Instant::now();
        let mut resp = match forward(&state, req, client, &id, &request_id).await {
            Ok(resp) => resp,
            Err(err) => {
                let failure = err.failure();
                match failure {
                    Failure::BadRequest
                    | Failure::ClientTimeout
                    | Failure::BodyTooLarge
                    | Failure::HoldExpired
                    | Failure::Overloaded => {
                        tracing::info!(error = %err, "request failed")
                    }
                    _ => tracing::warn!(error = %err, cause = ?std::error::Error::source(&err), "request failed"),
                }
                failure_response(failure)
            }
        };
        resp.headers_mut().insert(X_REQUEST_ID.clone(), request_id);
        tracing::info!(
            status = resp.status().as_u16(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "answered"
        );
        resp
    }
    .instrument(span)
    .await
}

pub(crate) fn usable_request_id(v: &HeaderValue) -> bool {
    let b = v.as_bytes();
    !b.is_empty() && b.len() <= MAX_REQUEST_ID_LEN && b.iter().all(|c| c.is_ascii_graphic())
}

async fn forward(
    state: &State,
    req: Request<Incoming>,
    client: SocketAddr,
    id: &str,
    request_id: &HeaderValue,
) -> Result<Response<Full<Bytes>>, ProxyError> {
    let limit = state.config.max_body;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ProxyError::BodyTooLarge { limit });
    }
    let (parts, body) = req.into_parts();
    let body_timeout = state.config.body_read_timeout;
    let body = tokio::time::timeout(body_timeout, Limited::new(body, limit).collect())
        .await
        .map_err(|_| ProxyError::BodyTimeout(body_timeout))?
        .map_err(|err| {
            if err.downcast_ref::<LengthLimitError>().is_some() {
                ProxyError::BodyTooLarge { limit }
            } else {
                ProxyError::BodyRead(err)
            }
        })?
        .to_bytes();

    let head_request = parts.method == Method::HEAD;
    let hold = state.config.hold;
    let now = now_ms();
    let envelope = envelope_for(
        parts,
        body,
        Route {
            client,
            id,
            request_id,
            reply_to: &state.reply_key,
            now_ms: now,
            hold,
            dedupe: !state.config.enqueue_timeout.is_zero(),
        },
    );
    let deadline = tokio::time::Instant::now() + hold;

    let _reservation = state
        .budget
        .reserve(envelope.body.len())
        .map_err(|(waiting, bytes)| ProxyError::Overloaded { waiting, bytes })?;
    // Register before enqueueing: a fast dispatcher may answer at once.
    let waiter = state.demux.register(id);
    enqueue(state, &envelope).await?;
    drop(envelope);

    let reply = match tokio::time::timeout_at(deadline, wait(waiter)).await {
        Ok(reply) => reply?,
        Err(_) => return Err(ProxyError::HoldExpired),
    };
    tracing::debug!(waited = ?Duration::from_millis(now_ms().saturating_sub(now)), "reply received");
    build_response(&reply, head_request)
}

/// Pushes the envelope through the enqueuer (one LPUSH per batch, then
/// `WAIT` for a replica when durable). While Redis is away, retries for up
/// to the enqueue timeout: always when no connection could be made (nothing
/// was sent), and after an ambiguous failure (the push may have happened)
/// only for requests safe to repeat, so an unsafe request is never queued
/// twice.
async fn enqueue(state: &State, envelope: &RequestEnvelope) -> Result<(), ProxyError> {
    let payload = Bytes::from(envelope.encode());
    let give_up = tokio::time::Instant::now() + state.config.enqueue_timeout.min(state.config.hold);
    let mut backoff = anteroom_redis::Backoff::new();
    loop {
        let PushError { error, never_sent } = match state.enqueuer.push(payload.clone()).await {
            Ok(()) => return Ok(()),
            Err(err) => err,
        };
        let delay = backoff.next_delay();
        // A repeated push of a `dedupe` envelope runs at most once.
        let may_retry = never_sent || envelope.dedupe || envelope.is_safe_to_repeat();
        if !may_retry || tokio::time::Instant::now() + delay >= give_up {
            return Err(ProxyError::Enqueue(error));
        }
        tracing::debug!(%error, "enqueue failed; retrying");
        tokio::time::sleep(delay).await;
    }
}

async fn wait(mut waiter: crate::replies::Waiter) -> Result<ResponseEnvelope, ProxyError> {
    (&mut waiter.rx).await.map_err(|_| ProxyError::ReaderGone)
}

/// Where a request goes and on whose behalf: everything besides the
/// request itself that its envelope records.
pub(crate) struct Route<'a> {
    pub(crate) client: SocketAddr,
    pub(crate) id: &'a str,
    pub(crate) request_id: &'a HeaderValue,
    pub(crate) reply_to: &'a str,
    pub(crate) now_ms: u64,
    pub(crate) hold: Duration,
    /// Whether enqueues may be repeated (see `RequestEnvelope::dedupe`).
    pub(crate) dedupe: bool,
}

/// The envelope for a request: hop-by-hop headers removed, forwarding
/// headers set, deadline `hold` from now. Pure, so it can be fuzzed.
pub(crate) fn envelope_for(
    parts: http::request::Parts,
    body: Bytes,
    route: Route<'_>,
) -> RequestEnvelope {
    let mut headers = parts.headers;
    strip_hop_by_hop(&mut headers);
    prepare_forwarded_headers(&mut headers, &parts.uri, route.client, route.request_id);
    RequestEnvelope {
        id: route.id.to_owned(),
        method: parts.method.as_str().to_owned(),
        uri: origin_form(&parts.uri),
        version: parts.version.into(),
        headers: anteroom_protocol::headers_from_map(&headers),
        body,
        reply_to: route.reply_to.to_owned(),
        client_addr: Some(route.client.to_string()),
        enqueued_at_ms: route.now_ms,
        deadline_ms: route
            .now_ms
            .saturating_add(u64::try_from(route.hold.as_millis()).unwrap_or(u64::MAX)),
        dedupe: route.dedupe,
    }
}

/// The request target in origin form: the path (`/` when empty, as in the
/// absolute-form `http://host?x`) and the query.
fn origin_form(uri: &http::Uri) -> String {
    let path = match uri.path() {
        "" => "/",
        path => path,
    };
    match uri.query() {
        Some(query) => format!("{path}?{query}"),
        None => path.to_owned(),
    }
}

/// Sets `X-Request-Id`, appends the client to `X-Forwarded-For`, sets
/// `X-Forwarded-Proto` to this hop's scheme, and fills in `Host` from the
/// authority of HTTP/2 requests.
fn prepare_forwarded_headers(
    headers: &mut HeaderMap,
    uri: &http::Uri,
    client: SocketAddr,
    request_id: &HeaderValue,
) {
    headers.insert(X_REQUEST_ID.clone(), request_id.clone());
    let ip = client.ip().to_string();
    let forwarded_for = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prior) if !prior.trim().is_empty() => format!("{prior}, {ip}"),
        _ => ip,
    };
    if let Ok(value) = HeaderValue::from_str(&forwarded_for) {
        headers.insert(X_FORWARDED_FOR.clone(), value);
    }
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("http"));
    if !headers.contains_key(header::HOST) {
        if let Some(value) = uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        {
            headers.insert(header::HOST, value);
        }
    }
}

pub(crate) fn build_response(
    reply: &ResponseEnvelope,
    head_request: bool,
) -> Result<Response<Full<Bytes>>, ProxyError> {
    let resp = reply.to_http().map_err(ProxyError::BadReply)?;
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    if !head_request {
        // hyper sets Content-Length from the body; a stale value would break framing.
        parts.headers.remove(header::CONTENT_LENGTH);
    }
    Ok(Response::from_parts(parts, Full::new(body)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_for_is_appended() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "10.0.0.1".parse().unwrap());
        let uri: http::Uri = "/".parse().unwrap();
        let rid = HeaderValue::from_static("abc");
        prepare_forwarded_headers(&mut h, &uri, "192.0.2.7:4000".parse().unwrap(), &rid);
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 192.0.2.7");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-request-id"], "abc");
    }

    #[test]
    fn host_comes_from_the_h2_authority() {
        let mut h = HeaderMap::new();
        let uri: http::Uri = "http://example.org:8080/x".parse().unwrap();
        let rid = HeaderValue::from_static("abc");
        prepare_forwarded_headers(&mut h, &uri, "[::1]:4000".parse().unwrap(), &rid);
        assert_eq!(h["host"], "example.org:8080");
        assert_eq!(h["x-forwarded-for"], "::1");
    }

    /// Found by the `proxy_request` fuzz target: absolute-form with an
    /// empty path used to give the envelope the target `?b=1`.
    #[test]
    fn targets_are_always_origin_form() {
        for (target, expected) in [
            ("st://a?b=1", "/?b=1"),
            ("http://example.com", "/"),
            ("http://example.com/x/y?z", "/x/y?z"),
            ("/plain?q=1", "/plain?q=1"),
            ("*", "*"),
        ] {
            let uri: http::Uri = target.parse().unwrap();
            let origin = origin_form(&uri);
            assert_eq!(origin, expected, "{target}");
            assert!(
                origin.parse::<http::Uri>().is_ok(),
                "{origin} does not parse"
            );
        }
    }

    #[test]
    fn request_ids_must_be_visible_ascii() {
        assert!(usable_request_id(&HeaderValue::from_static("req-1")));
        assert!(!usable_request_id(&HeaderValue::from_static("")));
        assert!(!usable_request_id(&HeaderValue::from_static("a b")));
        let long = "x".repeat(MAX_REQUEST_ID_LEN + 1);
        assert!(!usable_request_id(&HeaderValue::from_str(&long).unwrap()));
    }
}
