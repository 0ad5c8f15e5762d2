//! How Anteroom's long-running components live and serve HTTP.
//!
//! - [`Components`]: one lifecycle for every background task of a process
//!   (reply readers, heartbeats, enqueuers, pullers' helpers, the completer,
//!   the reaper, the admin and metrics endpoints). Each is started with
//!   [`Components::spawn`] (tracked by a `tokio_util` `TaskTracker`, never
//!   detached), signalled through one `CancellationToken`
//!   ([`Components::stopping`]), and awaited with a grace period
//!   ([`Components::shutdown`]). A component that fails (an error or a
//!   panic) is reported at once by [`Components::failed`], with its name
//!   and error; its owner then stops in its usual order and returns it.
//! - [`http`]: the one accept loop ([`http::accept_until`]) behind the
//!   proxy's listener and the side endpoints ([`http::serve_side`]: the
//!   admin endpoint and the metrics endpoint), and the protocol sniff
//!   ([`http::request_started`]) that bounds a silent socket.

mod components;
pub mod http;

pub use components::{ComponentFailed, Components, Exit};
