//! `--check-config` for every command: build what the command would run
//! without connecting or starting anything, so every error the libraries
//! would give at start is given now; warn about settings that contradict
//! each other; print every setting with where it came from (flag,
//! environment, file, default), secrets masked.

use std::process::ExitCode;

use crate::cli::{Cli, Command, ProxyArgs, QueueArgs};
use crate::config::ConfigFile;

/// Checks `cli`'s command; prints the result. Exit status 0 when valid
/// (warnings included), 2 otherwise.
pub(crate) fn check(cli: &Cli, file: Option<&ConfigFile>) -> ExitCode {
    let mut problems = Vec::new();
    let mut warnings = Vec::new();
    let mut summary = Vec::new();
    let (name, target) = match &cli.command {
        Command::Proxy(args) => {
            proxy(args, file, &mut problems, &mut warnings, &mut summary);
            durability(
                cli,
                args.durable,
                &args.target,
                &mut problems,
                &mut warnings,
            );
            ("proxy", Some(&args.target))
        }
        Command::Dispatch(args) => {
            let metrics = anteroom_metrics::DispatcherMetrics::default();
            if let Err(err) = crate::commands::dispatcher_for(args, metrics) {
                problems.push(crate::error_chain(&err));
            }
            durability(
                cli,
                args.durable,
                &args.target,
                &mut problems,
                &mut warnings,
            );
            if args.health_timeout > args.health_interval && args.health_path.is_some() {
                warnings.push(format!(
                    "--health-timeout ({:?}) is longer than --health-interval ({:?}): checks overlap",
                    args.health_timeout, args.health_interval
                ));
            }
            if args.health_path.is_none() {
                summary.push(
                    "without --health-path, a TCP connect decides when a failed upstream is back"
                        .to_owned(),
                );
            }
            ("dispatch", Some(&args.target))
        }
        Command::Pause(args) => {
            if args.timeout.is_some() && !args.wait {
                warnings.push("--timeout (or ANTEROOM_TIMEOUT) applies only with --wait".into());
            }
            ("pause", Some(&args.target))
        }
        Command::Resume(args) => ("resume", Some(args)),
        Command::Reap(args) => ("reap", Some(args)),
        Command::Maintenance(args) => ("maintenance", Some(&args.target)),
        Command::Dead(command) => ("dead", Some(command.target())),
        Command::Window(args) => {
            summary.push(format!("runs      {}", args.command.join(" ")));
            ("window", Some(&args.target))
        }
        Command::Status(args) => {
            if let Err(err) = anteroom_redis::Target::parse(&args.redis.url) {
                problems.push(format!("redis: {err}"));
            }
            if let Some(queue) = &args.queue {
                if let Err(err) = anteroom_protocol::Keys::new(queue) {
                    problems.push(format!("queue: {err}"));
                }
            }
            ("status", None)
        }
        Command::Conformance(args) => {
            if let Err(err) = anteroom_protocol::Keys::new(&args.queue) {
                problems.push(format!("queue: {err}"));
            }
            summary.push(format!("checks    {}", args.command.join(" ")));
            ("conformance", None)
        }
        Command::Demo(args) => {
            if let Err(err) = anteroom_protocol::Keys::new(&args.queue) {
                problems.push(format!("queue: {err}"));
            }
            if let Some(url) = &args.redis {
                if let Err(err) = anteroom_redis::Target::parse(url) {
                    problems.push(format!("redis: {err}"));
                }
            }
            ("demo", None)
        }
    };
    if let Some(target) = target {
        // `dispatch` serves several queues, comma-separated (checked, with
        // their weights, by `dispatcher_for` above).
        queue_target(target, name == "dispatch", &mut problems);
    }
    for warning in &warnings {
        eprintln!("warning: {warning}");
    }
    if !problems.is_empty() {
        for problem in problems {
            eprintln!("error: {problem}");
        }
        return ExitCode::from(2);
    }
    outln!("configuration is valid");
    outln!("  command   {name}");
    let width = cli.settings.iter().map(|s| s.name.len()).max().unwrap_or(0);
    for setting in &cli.settings {
        let value = if setting.value.is_empty() {
            "-"
        } else {
            &setting.value
        };
        outln!(
            "  --{:<width$}  {value}  ({})",
            setting.name,
            setting.source
        );
    }
    for line in summary {
        outln!("  {line}");
    }
    ExitCode::SUCCESS
}

/// Whether setting `name` was given (flag, environment or file), not left
/// at its default.
fn given(cli: &Cli, name: &str) -> bool {
    cli.settings
        .iter()
        .any(|s| s.name == name && !matches!(s.source.as_str(), "default" | "not set"))
}

/// `--durable` and `--durable-wait`, which the proxy and the dispatcher
/// share: a wait without `--durable` does nothing, and `WAIT` does not
/// exist on a cluster.
fn durability(
    cli: &Cli,
    durable: bool,
    target: &QueueArgs,
    problems: &mut Vec<String>,
    warnings: &mut Vec<String>,
) {
    if given(cli, "durable-wait") && !durable {
        warnings.push("--durable-wait is set but --durable is not: it has no effect".into());
    }
    if durable && target.redis.url.starts_with("redis+cluster://") {
        problems.push("--durable (WAIT) is not supported on a Redis Cluster".into());
    }
}

/// The Redis URL and queue name every queue command uses.
fn queue_target(target: &QueueArgs, list: bool, problems: &mut Vec<String>) {
    if let Err(err) = anteroom_redis::Target::parse(&target.redis.url) {
        problems.push(format!("redis: {err}"));
    }
    let queues: Vec<&str> = if list {
        target.queue.split(',').map(str::trim).collect()
    } else {
        vec![target.queue.as_str()]
    };
    for queue in queues {
        if let Err(err) = anteroom_protocol::Keys::new(queue) {
            problems.push(format!("queue: {err}"));
        }
    }
}

/// The proxy's routes and contradictions, and what each route does.
fn proxy(
    args: &ProxyArgs,
    file: Option<&ConfigFile>,
    problems: &mut Vec<String>,
    warnings: &mut Vec<String>,
    summary: &mut Vec<String>,
) {
    let mut config = crate::commands::proxy_config(args);
    match file.map(ConfigFile::routes) {
        Some(Ok(routes)) => config.routes = routes,
        Some(Err(err)) => problems.push(format!("configuration file {err}")),
        None => {}
    }
    if !config.default_queue && config.routes.is_empty() {
        problems.push("default_queue is false and there are no routes: nothing to serve".into());
    }
    if args.admin_token.is_some() && args.admin.is_none() {
        warnings.push("--admin-token is set but --admin is not: there is no admin endpoint".into());
    }
    if let Some(addr) = args.admin {
        let mut admin = anteroom_proxy::AdminConfig::new("", "");
        admin.token = args.admin_token.clone();
        admin.without_token_beyond_loopback = args.admin_without_token;
        if let Err(err) = admin.check(addr) {
            problems.push(err.to_string());
        }
    }
    if let Err(err) = config.validate() {
        problems.push(err.to_string());
    }
    if let Err(err) = crate::commands::check_pairs(args) {
        problems.push(err.to_string());
    }
    // A missing half is already said by check_pairs.
    if let Ok(Some((cert, key))) = crate::commands::tls_files(args)
        && let Err(err) = anteroom_proxy::TlsCerts::load(cert, key)
    {
        problems.push(err.to_string());
    }
    if let Some(path) = &args.maintenance_page
        && let Err(err) = crate::commands::maintenance_page(path)
    {
        problems.push(crate::error_chain(&err));
    }
    if args.body_buffer.min(args.max_body) > args.max_waiting_bytes {
        warnings.push(format!(
            "--body-buffer ({}) is above --max-waiting-bytes ({}): bodies queued whole between the two get 503",
            args.body_buffer, args.max_waiting_bytes
        ));
    }
    if args.enqueue_timeout > args.hold {
        warnings.push(format!(
            "--enqueue-timeout ({:?}) is longer than --hold ({:?}): the hold budget cuts it short",
            args.enqueue_timeout, args.hold
        ));
    }
    if args.drain > args.grace {
        warnings.push(format!(
            "--drain ({:?}) is longer than --grace ({:?}): the grace cuts it short",
            args.drain, args.grace
        ));
    }
    if args.hold > args.grace {
        warnings.push(format!(
            "--hold ({:?}) is longer than --grace ({:?}): on shutdown, requests still waiting when the grace ends are cut off",
            args.hold, args.grace
        ));
    }
    for (i, route) in config.routes.iter().enumerate() {
        summary.push(format!(
            "route {}   host {} path {} -> queue {} (hold {:?}, max waiting {}, max waiting bytes {})",
            i + 1,
            route.host.as_deref().unwrap_or("*"),
            route.path_prefix.as_deref().unwrap_or("*"),
            route.queue,
            route.hold.unwrap_or(config.hold),
            route.max_waiting.unwrap_or(config.max_waiting),
            route.max_waiting_bytes.unwrap_or(config.max_waiting_bytes)
        ));
    }
    if config.default_queue {
        summary.push(format!(
            "default   -> queue {} (hold {:?}, max waiting {})",
            config.queue, config.hold, config.max_waiting
        ));
    } else {
        summary.push("default   none: unrouted requests get 404".to_owned());
    }
}
