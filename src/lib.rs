//! The `anteroom` command: glue between the command line and the libraries.
//!
//! [`cli`] defines the commands and their flags (each also an `ANTEROOM_*`
//! environment variable); [`run`] carries one out. `proxy` runs
//! [`anteroom_proxy::serve`], `dispatch` runs an [`anteroom_dispatcher::Dispatcher`]
//! in front of an [`anteroom_dispatcher::Upstream`], and `demo` runs both
//! with a built-in backend, starting a private `redis-server`
//! (`anteroom_redis::local`) when no Redis URL is given. [`listen`] makes the
//! proxy's listening socket (socket activation or `SO_REUSEPORT`).

mod check;
pub mod cli;
mod commands;
pub mod config;
mod demo;
pub mod listen;
mod ops;
mod status_view;

pub use commands::run;

/// `err` and its causes as one line, `outer: cause: cause`, each cause
/// once: some libraries (redis-rs) print their source in their own message
/// too, which `{:#}` would repeat.
pub fn error_chain(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}
