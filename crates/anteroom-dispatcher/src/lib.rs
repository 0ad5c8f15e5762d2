//! Anteroom's dispatcher: the library a backend embeds to take requests from
//! the queue.
//!
//! [`Dispatcher::builder`] names the Redis server, the queue and the
//! concurrency. [`Dispatcher::serve`] then runs any
//! `tower::Service<http::Request<Body>>` (an axum `Router` works unchanged),
//! [`Dispatcher::serve_fn`] an async closure, and [`Upstream`] forwards to an
//! existing HTTP server over a pooled keep-alive client.
//!
//! Flow: a puller takes the free concurrency permits and moves as many
//! envelopes from the queue's requests list into this dispatcher's
//! processing list, in one MULTI of LMOVEs (a deep queue costs one round
//! trip per batch); on an empty queue it blocks in BLMOVE for the next one.
//! A task per envelope decodes it, skips it if its deadline has passed, runs the handler (bounded
//! by the deadline; panics are caught), and in one MULTI pushes the reply to
//! `reply_to` and removes the envelope from the processing list (replies
//! that finish together share one MULTI). An envelope a proxy of this queue
//! did not write (a foreign `reply_to`, a deadline over 24 h ahead, fields
//! that are not HTTP) is set aside in the dead-letter list. A heartbeat
//! key with a TTL says the dispatcher is alive. Envelopes that do not decode
//! go to the dead-letter list. Shutdown: stop pulling, let in-flight work
//! finish within the grace period, delete the heartbeat.
//!
//! In front of an upstream server, a request the upstream never received
//! (connect failed, connection closed before it was written) goes back to
//! the front of the queue instead of failing, and the dispatcher stops
//! pulling until a [`HealthCheck`] passes (`health.rs`); meanwhile requests
//! wait in the queue as during a pause.

mod body;
mod builder;
mod complete;
mod error;
mod handle;
mod health;
mod heartbeat;
mod priority;
mod pull;
mod reconcile;
mod socket;
mod stream;
mod transport;
mod upstream;
mod worker;

pub use anteroom_metrics::DispatcherMetrics;
pub use anteroom_redis::Target;
pub use body::{Body, BodyError};
pub use builder::{Dispatcher, DispatcherBuilder, Ready, defaults};
pub use error::{BoxError, DispatcherError, FailureReason, UpstreamError};
pub use health::HealthCheck;
pub use priority::PriorityGroup;
pub use upstream::{DEFAULT_MAX_HEADERS, Upstream};
