//! The `anteroom` binary. See `anteroom --help`.

/// mimalloc instead of the system allocator: glibc malloc and free were
/// about 18% of the CPU time of a loaded proxy (docs/performance.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let (cli, file) = anteroom::config::parse();
    // Before any thread starts: taking the socket unsets LISTEN_FDS. Only
    // the proxy listens.
    let inherited = if matches!(cli.command, anteroom::cli::Command::Proxy(_)) {
        match anteroom::listen::take_inherited() {
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
    match runtime.block_on(anteroom::run(cli, file, inherited)) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {}", anteroom::error_chain(&err));
            std::process::ExitCode::FAILURE
        }
    }
}
