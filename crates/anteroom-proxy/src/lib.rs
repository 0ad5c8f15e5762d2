//! Anteroom's front proxy.
//!
//! [`serve`] accepts HTTP/1.1 and h2c connections on a listener the caller
//! bound. For each request the handler reads the body (up to a limit),
//! encodes a [`RequestEnvelope`](anteroom_protocol::RequestEnvelope) naming
//! this proxy's reply list in `reply_to`, and LPUSHes it onto the queue's
//! requests list over one shared, pipelined Redis connection; envelopes
//! that arrive together go in one LPUSH (`enqueue.rs`). It then waits, at
//! most the hold budget, for its reply.
//!
//! With [`ProxyConfig::tls`], connections are TLS (rustls, ALPN `h2` and
//! `http/1.1`; `tls.rs`), the certificate reloadable while they stay open.
//!
//! One reply reader per queue served blocks on that queue's reply list with
//! a take into its popped list (`anteroom_control::queue::follow_list`) on a dedicated connection and hands each response to the waiting
//! request by id (the demultiplexer), so the proxy holds a constant handful
//! of Redis connections however many requests wait. A watchdog per client
//! connection closes idle and silent ones and drops those that read none
//! of their answer (`connection.rs`); connections that answered early linger
//! (`linger.rs`). Failures become HTTP statuses in
//! one place ([`anteroom_protocol::Failure`], through `error.rs`).
//!
//! A queue in maintenance mode (`anteroom_control::watch_maintenance`,
//! followed per queue served) has its new requests answered 503 with
//! `Retry-After` and a page at once (`maintenance.rs`); what it already
//! holds keeps waiting.
//!
//! Shutdown: stop accepting, let in-flight requests finish within the grace
//! period, then stop the background components (reply readers, heartbeats,
//! enqueuers: `anteroom_runtime::Components`).

mod activity;
mod admin;
mod arrival;
mod budget;
mod canary;
mod checks;
mod config;
mod connection;
mod enqueue;
mod error;
#[doc(hidden)]
pub mod fuzzing;
mod handler;
mod linger;
mod maintenance;
mod replies;
mod router;
mod server;
mod socket;
mod status_page;
mod stream;
mod tls;
mod translate;
mod upload;

pub use admin::{AdminConfig, serve_admin};
pub use config::{CanaryConfig, DEFAULT_MAX_HEADERS, ProxyConfig, RouteConfig, defaults};
pub use error::ServeError;
pub use server::serve;
pub use tls::{TlsCerts, TlsError};
