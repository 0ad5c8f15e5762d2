//! Carrying out each command.

use anteroom_dispatcher::{Dispatcher, Upstream};
use anteroom_proxy::ProxyConfig;
use anyhow::Context;
use tokio::net::TcpListener;

use crate::cli::{Cli, Command, DispatchArgs, LogFormat, ProxyArgs};

/// Runs the command `cli` names until it finishes or a SIGINT/SIGTERM
/// arrives and its shutdown completes.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    init_tracing(cli.log_format);
    match cli.command {
        Command::Proxy(args) => proxy(args).await,
        Command::Dispatch(args) => dispatch(args).await,
        Command::Demo(args) => crate::demo::run(args).await,
    }
}

fn init_tracing(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

fn proxy_config(args: &ProxyArgs) -> ProxyConfig {
    let mut config = ProxyConfig::new(args.target.redis.clone(), args.target.queue.clone());
    config.hold = args.hold;
    config.max_body = args.max_body;
    config.grace = args.grace;
    config
}

async fn proxy(args: ProxyArgs) -> anyhow::Result<()> {
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let config = proxy_config(&args);
    anteroom_proxy::serve(listener, config, shutdown_signal())
        .await
        .context("proxy failed")
}

async fn dispatch(args: DispatchArgs) -> anyhow::Result<()> {
    let upstream = Upstream::new(&args.upstream)?;
    let dispatcher = Dispatcher::builder()
        .redis_url(args.target.redis)
        .queue(args.target.queue)
        .concurrency(args.concurrency)
        .grace(args.grace)
        .label(args.label)
        .build()?;
    tracing::info!(upstream = %args.upstream, "forwarding to upstream");
    dispatcher
        .serve(upstream, shutdown_signal())
        .await
        .context("dispatcher failed")
}

/// Completes on the first SIGINT or SIGTERM.
pub(crate) async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = interrupt => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
    tracing::info!("shutdown signal received");
}
