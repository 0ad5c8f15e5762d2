//! Anteroom's dispatcher: the library a backend embeds to take requests from
//! the queue.
//!
//! [`Dispatcher::builder`] names the Redis server, the queue and the
//! concurrency. [`Dispatcher::serve`] then runs any
//! `tower::Service<http::Request<Body>>` (an axum `Router` works unchanged),
//! [`Dispatcher::serve_fn`] an async closure, and [`Upstream`] forwards to an
//! existing HTTP server over a pooled keep-alive client.
//!
//! Flow: a puller takes a concurrency permit, then BLMOVEs one envelope from
//! the queue's requests list into this dispatcher's processing list. A task
//! decodes it, skips it if its deadline has passed, runs the handler (bounded
//! by the deadline; panics are caught), and in one MULTI pushes the reply to
//! `reply_to` and removes the envelope from the processing list. A heartbeat
//! key with a TTL says the dispatcher is alive. Envelopes that do not decode
//! go to the dead-letter list. Shutdown: stop pulling, let in-flight work
//! finish within the grace period, delete the heartbeat.

mod builder;
mod error;
mod upstream;
mod worker;

pub use builder::{Dispatcher, DispatcherBuilder};
pub use error::{BoxError, DispatcherError, UpstreamError};
pub use upstream::Upstream;

/// The request body type handlers receive: the whole body, already read.
pub type Body = http_body_util::Full<bytes::Bytes>;
