//! Carrying out each command.

use anteroom_dispatcher::{Dispatcher, Upstream};
use std::process::ExitCode;

use anteroom_proxy::{AdminConfig, ProxyConfig, serve_admin};
use anteroom_runtime::Components;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::cli::{Cli, Command, DispatchArgs, LogFormat, ProxyArgs};
use crate::ops;

/// Runs the command `cli` names until it finishes or a SIGINT/SIGTERM
/// arrives and its shutdown completes.
///
/// `file` is the configuration file the command line was parsed with
/// ([`crate::config::parse`]); the proxy takes its routes from it.
/// `inherited` is a listening socket from socket activation
/// ([`crate::listen::take_inherited`]), which the proxy uses instead of
/// binding `--listen`.
pub(crate) async fn run(
    cli: Cli,
    file: Option<crate::config::ConfigFile>,
    inherited: Option<std::net::TcpListener>,
) -> anyhow::Result<ExitCode> {
    if cli.check_config {
        return Ok(crate::check::check(&cli, file.as_ref()));
    }
    init_tracing(cli.log_format);
    if matches!(cli.command, Command::Proxy(_) | Command::Dispatch(_)) {
        // SIGHUP's default action ends the process at once: `kill -HUP`
        // meant for a proxy's certificate must not stop a dispatcher or a
        // proxy without TLS (nor one whose reloader has not started yet).
        keep_running_on_sighup();
    }
    let done = |r: anyhow::Result<()>| r.map(|()| ExitCode::SUCCESS);
    match cli.command {
        Command::Proxy(args) => {
            let routes = match file.as_ref().map(crate::config::ConfigFile::routes) {
                Some(Ok(routes)) => routes,
                Some(Err(err)) => {
                    eprintln!("error: configuration file {err}");
                    return Ok(ExitCode::from(2));
                }
                None => Vec::new(),
            };
            let mut config = proxy_config(&args);
            config.routes = routes;
            done(proxy(args, config, inherited).await)
        }
        Command::Dispatch(args) => done(dispatch(args).await),
        Command::Pause(args) => ops::pause(args).await,
        Command::Resume(args) => ops::resume(args).await,
        Command::Status(args) => ops::status(args).await,
        Command::Reap(args) => ops::reap(args).await,
        Command::Window(args) => ops::window(args).await,
        Command::Maintenance(args) => ops::maintenance(args).await,
        Command::Dead(command) => crate::dead::run(command).await,
        Command::Demo(args) => done(crate::demo::run(args).await),
        Command::Conformance(args) => crate::conformance::run(args).await,
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

pub(crate) fn proxy_config(args: &ProxyArgs) -> ProxyConfig {
    let mut config = ProxyConfig::new(args.target.redis.url.clone(), args.target.queue.clone());
    config.default_queue = args.default_queue;
    config.hold = args.hold;
    config.max_body = args.max_body;
    config.body_buffer = args.body_buffer;
    config.grace = args.grace;
    config.drain = args.drain;
    config.max_waiting = args.max_waiting;
    config.max_waiting_bytes = args.max_waiting_bytes;
    config.max_connections = args.max_connections;
    config.max_headers = args.max_headers;
    config.max_head_bytes = args.max_head;
    config.header_read_timeout = args.header_timeout;
    config.body_read_timeout = args.body_timeout;
    config.send_timeout = args.send_timeout;
    config.stream_idle_timeout = args.stream_idle_timeout;
    config.max_websockets = args.max_websockets;
    config.websocket_max_message = args.websocket_max_message;
    config.websocket_ping_interval = args.websocket_ping;
    config.enqueue_timeout = args.enqueue_timeout;
    config.redis_high_watermark = args.redis_high_watermark;
    config.durable = args.durable.then_some(args.durable_wait);
    // clap allows 1 and 2 only.
    config.envelope_version =
        anteroom_protocol::EnvelopeVersion::from_byte(args.envelope_version).unwrap_or_default();
    config.canary = args.canary_queue.as_ref().map(|queue| {
        let weight = args.canary_weight.unwrap_or(0.0);
        let mut canary = anteroom_proxy::CanaryConfig::new(queue.clone(), weight);
        canary.cookie = args.canary_cookie.clone();
        canary.header = args.canary_header.clone();
        canary
    });
    config
}

/// Most bytes of a `--maintenance-page` (kept in memory, sent whole).
const MAX_MAINTENANCE_PAGE: u64 = 1024 * 1024;

/// The `--maintenance-page` file, at most [`MAX_MAINTENANCE_PAGE`] bytes.
pub(crate) fn maintenance_page(path: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    use std::io::Read;
    let shown = path.display();
    let file = std::fs::File::open(path)
        .with_context(|| format!("cannot read --maintenance-page {shown}"))?;
    let mut page = Vec::new();
    file.take(MAX_MAINTENANCE_PAGE + 1)
        .read_to_end(&mut page)
        .with_context(|| format!("cannot read --maintenance-page {shown}"))?;
    if page.len() as u64 > MAX_MAINTENANCE_PAGE {
        anyhow::bail!("--maintenance-page {shown} is over 1 MiB");
    }
    Ok(page)
}

/// Settings that need another one (checked here rather than by clap,
/// which ignores values from the configuration file): the TLS key and
/// certificate together, the canary's weight, cookie and header only with
/// its queue.
pub(crate) fn check_pairs(args: &ProxyArgs) -> anyhow::Result<()> {
    tls_files(args)?;
    let set = [
        ("--canary-weight", args.canary_weight.is_some()),
        ("--canary-cookie", args.canary_cookie.is_some()),
        ("--canary-header", args.canary_header.is_some()),
    ];
    if args.canary_queue.is_none()
        && let Some((flag, _)) = set.iter().find(|(_, set)| *set)
    {
        anyhow::bail!("{flag} needs --canary-queue (ANTEROOM_CANARY_QUEUE, canary_queue)");
    }
    Ok(())
}

/// The TLS certificate and key, both or neither (from flags, environment
/// or file alike).
pub(crate) fn tls_files(
    args: &ProxyArgs,
) -> anyhow::Result<Option<(&std::path::Path, &std::path::Path)>> {
    match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Ok(Some((cert, key))),
        (None, None) => Ok(None),
        (Some(_), None) => anyhow::bail!("--tls-cert needs --tls-key (ANTEROOM_TLS_KEY, tls_key)"),
        (None, Some(_)) => {
            anyhow::bail!("--tls-key needs --tls-cert (ANTEROOM_TLS_CERT, tls_cert)")
        }
    }
}

async fn proxy(
    args: ProxyArgs,
    mut config: ProxyConfig,
    inherited: Option<std::net::TcpListener>,
) -> anyhow::Result<()> {
    let listener = match inherited {
        Some(listener) => {
            listener
                .set_nonblocking(true)
                .context("cannot use the socket passed by socket activation")?;
            tracing::info!(
                addr = ?listener.local_addr().ok(),
                "listening on the socket passed by socket activation (LISTEN_FDS); --listen is not used"
            );
            listener
        }
        None => crate::listen::bind_shared(args.listen)
            .with_context(|| format!("cannot listen on {}", args.listen))?,
    };
    let listener = TcpListener::from_std(listener).context("cannot register the listener")?;
    // The side endpoint runs beside the proxy: if it fails, the proxy
    // stops at once and the process exits with its error.
    let side = Components::new();
    check_pairs(&args)?;
    if let Some((cert, key)) = tls_files(&args)? {
        let certs = anteroom_proxy::TlsCerts::load(cert, key)?;
        side.spawn(
            "certificate reloader",
            reload_on_sighup(Arc::clone(&certs), side.stopping()),
        );
        config.tls = Some(certs);
    }
    if let Some(path) = &args.maintenance_page {
        config.maintenance_page = Some(maintenance_page(path)?.into());
    }
    let mut registry = anteroom_metrics::Registry::default();
    let metrics = anteroom_metrics::ProxyMetrics::register(&mut registry);
    let registry = std::sync::Arc::new(registry);
    if let Some(addr) = args.admin {
        // Shared like --listen, so a new proxy can start beside this one.
        let admin_listener = crate::listen::bind_shared(addr)
            .and_then(TcpListener::from_std)
            .with_context(|| format!("cannot listen on {addr} for the admin endpoint"))?;
        let mut admin_config =
            AdminConfig::new(args.target.redis.url.clone(), args.target.queue.clone());
        admin_config.token = args.admin_token.clone();
        admin_config.without_token_beyond_loopback = args.admin_without_token;
        admin_config.check(addr)?;
        admin_config.registry = Some(std::sync::Arc::clone(&registry));
        admin_config.metrics = Some(metrics.clone());
        admin_config.more_queues = config.routes.iter().map(|r| r.queue.clone()).collect();
        let stop = side.stopping();
        side.spawn(
            "admin endpoint",
            serve_admin(admin_listener, admin_config, async move {
                stop.cancelled().await
            }),
        );
    }
    config.metrics = metrics;
    let served = anteroom_proxy::serve(listener, config, stop_signal(&side))
        .await
        .with_context(|| {
            format!(
                "proxy failed (redis {} from --redis or ANTEROOM_REDIS)",
                crate::ops::redact(&args.target.redis.url)
            )
        });
    let stopped = side.shutdown(SIDE_GRACE).await;
    served?;
    Ok(stopped?)
}

async fn dispatch(args: DispatchArgs) -> anyhow::Result<()> {
    let mut registry = anteroom_metrics::Registry::default();
    let metrics = anteroom_metrics::DispatcherMetrics::register(&mut registry);
    let redis_url = args.target.redis.url.clone();
    let (dispatchers, upstream) = dispatcher_for(&args, metrics)?;
    let side = Components::new();
    if let Some(addr) = args.metrics {
        // Shared, so a new dispatcher can start beside this one (a
        // rolling deploy on one host).
        let listener = crate::listen::bind_shared(addr)
            .and_then(TcpListener::from_std)
            .with_context(|| format!("cannot listen on {addr} for metrics"))?;
        let stop = side.stopping();
        side.spawn(
            "metrics endpoint",
            anteroom_metrics::serve(listener, std::sync::Arc::new(registry), async move {
                stop.cancelled().await
            }),
        );
    }
    tracing::info!(
        upstream = %args.upstream,
        health_path = args.health_path.as_deref().unwrap_or("(none: a connection after a failure)"),
        "forwarding to upstream"
    );
    // One dispatcher per queue (several: a priority group); one stopping
    // or failing stops them all.
    let stop = tokio_util::sync::CancellationToken::new();
    let signal = stop_signal(&side);
    let serving = dispatchers.into_iter().map(|dispatcher| {
        let (upstream, stop) = (upstream.clone(), stop.clone());
        async move {
            let served = dispatcher
                .serve(upstream, stop.clone().cancelled_owned())
                .await;
            stop.cancel();
            served
        }
    });
    let relay = {
        let stop = stop.clone();
        async move {
            tokio::select! {
                () = signal => stop.cancel(),
                () = stop.cancelled() => {}
            }
        }
    };
    let (served, ()) = tokio::join!(futures_util::future::join_all(serving), relay);
    let served = served
        .into_iter()
        .collect::<Result<Vec<()>, _>>()
        .with_context(|| {
            format!(
                "dispatcher failed (redis {} from --redis or ANTEROOM_REDIS)",
                crate::ops::redact(&redis_url)
            )
        });
    let stopped = side.shutdown(SIDE_GRACE).await;
    served?;
    Ok(stopped?)
}

/// Takes SIGHUP over from its default action (ending the process) for the
/// process's whole life; a proxy with TLS reloads on it besides
/// ([`reload_on_sighup`]).
fn keep_running_on_sighup() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::hangup()) {
        Ok(mut hangups) => {
            tokio::spawn(async move {
                while hangups.recv().await.is_some() {
                    tracing::debug!("SIGHUP received");
                }
            });
        }
        Err(err) => tracing::warn!(error = %err, "cannot take over SIGHUP"),
    }
}

/// Reads the TLS certificate and key again on each SIGHUP until `stop`:
/// new handshakes get the new pair, open connections keep theirs; a pair
/// that does not load is logged and the one in use stays.
async fn reload_on_sighup(
    certs: Arc<anteroom_proxy::TlsCerts>,
    stop: tokio_util::sync::CancellationToken,
) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangups = match signal(SignalKind::hangup()) {
        Ok(hangups) => hangups,
        Err(err) => {
            tracing::warn!(error = %err, "cannot listen for SIGHUP; the certificate will not be reloaded");
            return stop.cancelled().await;
        }
    };
    loop {
        tokio::select! {
            got = hangups.recv() => if got.is_none() { return },
            () = stop.cancelled() => return,
        }
        match certs.reload() {
            Ok(()) => tracing::info!("SIGHUP: TLS certificate reloaded; new connections get it"),
            Err(err) => {
                tracing::error!(error = %err, "SIGHUP: TLS certificate not reloaded; keeping the one in use")
            }
        }
    }
}

/// How long a side endpoint (admin, metrics) gets to drain once the proxy
/// or dispatcher beside it has stopped.
const SIDE_GRACE: std::time::Duration = std::time::Duration::from_secs(6);

/// Completes on SIGINT or SIGTERM, or at once when a side endpoint in
/// `side` fails (logged; [`Components::shutdown`] then returns its error).
fn stop_signal(side: &Components) -> impl std::future::Future<Output = ()> + Send + 'static {
    let side = side.clone();
    async move {
        tokio::select! {
            () = shutdown_signal() => {}
            failure = side.failed() => tracing::error!(%failure, "stopping"),
        }
    }
}

/// The dispatcher and upstream `anteroom dispatch` runs, built and checked
/// without connecting (also what `--check-config` checks).
/// The dispatchers `args` describe, one per queue of `--queue` (several,
/// comma-separated, form a [`PriorityGroup`](anteroom_dispatcher::PriorityGroup)
/// in that order, with `--queue-weights`), and the upstream they share.
pub(crate) fn dispatcher_for(
    args: &DispatchArgs,
    metrics: anteroom_metrics::DispatcherMetrics,
) -> anyhow::Result<(Vec<Dispatcher>, Upstream)> {
    let upstream = Upstream::with_ca_file(&args.upstream, args.upstream_ca.as_deref())?
        .idle_timeout(args.upstream_idle_timeout)
        .max_headers(args.upstream_max_headers);
    let health_check = upstream
        .health_check(args.health_path.as_deref())?
        .interval(args.health_interval)
        .timeout(args.health_timeout);
    let queues: Vec<&str> = args.target.queue.split(',').map(str::trim).collect();
    for (i, queue) in queues.iter().enumerate() {
        anyhow::ensure!(
            !queues[..i].contains(queue),
            "--queue names {queue:?} twice: each queue once, in priority order"
        );
    }
    anyhow::ensure!(
        args.queue_weights.is_none() || queues.len() > 1,
        "--queue-weights is for several queues (--queue critical,default,bulk)"
    );
    let weights = match &args.queue_weights {
        None => vec![None; queues.len()],
        Some(text) => {
            let weights = text
                .split(',')
                .map(|w| w.trim().parse::<u32>().map(Some))
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| {
                    format!("--queue-weights {text:?}: expected whole numbers, one per queue")
                })?;
            anyhow::ensure!(
                weights.len() == queues.len(),
                "--queue-weights gives {} weight(s) for {} queues: one each",
                weights.len(),
                queues.len()
            );
            weights
        }
    };
    let group =
        (queues.len() > 1).then(|| anteroom_dispatcher::PriorityGroup::new(args.concurrency));
    let mut dispatchers = Vec::new();
    for (queue, weight) in queues.iter().zip(weights) {
        let mut builder = Dispatcher::builder()
            .redis_url(args.target.redis.url.clone())
            .queue(*queue)
            .concurrency(args.concurrency)
            .grace(args.grace)
            .label(args.label.clone())
            .heartbeat_ttl(args.heartbeat_ttl)
            .reap_interval(Some(args.reap_every).filter(|d| !d.is_zero()))
            .durable(args.durable.then_some(args.durable_wait))
            .metrics(metrics.clone())
            .health_check(health_check.clone())
            .stream_idle_timeout(args.stream_idle_timeout)
            .websocket_max_message(args.websocket_max_message)
            .stream_window(args.stream_window);
        if let Some(group) = &group {
            builder = builder.priority(group, weight);
        }
        dispatchers.push(builder.build()?);
    }
    Ok((dispatchers, upstream))
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
