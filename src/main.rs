//! The `anteroom` binary: glue between the command line and the libraries.
//! See `anteroom --help`.
//!
//! [`cli`] defines the commands and their flags (each also an `ANTEROOM_*`
//! environment variable); [`run`] carries one out. `proxy` runs
//! [`anteroom_proxy::serve`], `dispatch` runs an [`anteroom_dispatcher::Dispatcher`]
//! in front of an [`anteroom_dispatcher::Upstream`], and `demo` runs both
//! with a built-in backend, starting a private `redis-server`
//! (`anteroom_redis::local`) when no Redis URL is given. [`listen`] makes the
//! proxy's listening socket (socket activation or `SO_REUSEPORT`).

/// `println!` for command output: a stdout closed early (`anteroom status
/// | head -1`) ends the output quietly instead of panicking ("failed
/// printing to stdout: Broken pipe"). Other write errors are dropped too:
/// output is best effort, the exit status says what happened.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

/// `print!` for command output, as [`outln!`].
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stdout().lock(), $($arg)*);
    }};
}

mod check;
mod cli;
mod commands;
mod config;
mod conformance;
mod dead;
mod demo;
#[cfg(test)]
mod doc_tests;
mod listen;
mod ops;
mod status_view;
mod values;

use commands::run;

/// `err` and its causes as one line, `outer: cause: cause`, each cause
/// once: some libraries (redis-rs) print their source in their own message
/// too, which `{:#}` would repeat.
pub(crate) fn error_chain(err: &anyhow::Error) -> String {
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

/// mimalloc instead of the system allocator: glibc malloc and free were
/// about 18% of the CPU time of a loaded proxy (docs/performance.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let (cli, file) = config::parse();
    // Before any thread starts: taking the socket unsets LISTEN_FDS. Only
    // the proxy listens.
    let inherited = if matches!(cli.command, cli::Command::Proxy(_)) {
        match listen::take_inherited() {
            Ok(listener) => listener,
            Err(err) => {
                eprintln!(
                    "error: the socket passed by socket activation (LISTEN_FDS) is unusable: {err}"
                );
                return std::process::ExitCode::FAILURE;
            }
        }
    } else {
        None
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli, file, inherited)) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {}", error_chain(&err));
            std::process::ExitCode::FAILURE
        }
    }
}
