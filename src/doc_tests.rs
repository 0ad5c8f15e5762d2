//! The CLI against the files that describe it: the README names every flag;
//! docker-compose.yml (which cannot be run here: no Docker engine) agrees
//! with the CLI: every command parses, and names and ports line up.

use std::collections::BTreeMap;

use crate::cli::{Cli, Command};
use clap::Parser;
use serde::Deserialize;

#[derive(Debug, Deserialize)]
struct Compose {
    services: BTreeMap<String, Service>,
}

#[derive(Debug, Deserialize)]
struct Service {
    image: Option<String>,
    build: Option<serde_json::Value>,
    #[serde(default)]
    command: Vec<String>,
    #[serde(default)]
    ports: Vec<String>,
    #[serde(default)]
    depends_on: Vec<String>,
}

fn load() -> Compose {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docker-compose.yml"))
        .expect("docker-compose.yml");
    serde_saphyr::from_str(&text).expect("valid compose YAML")
}

fn parse(service: &Service) -> Command {
    let args = std::iter::once("anteroom".to_owned()).chain(service.command.iter().cloned());
    Cli::try_parse_from(args)
        .unwrap_or_else(|e| panic!("compose command does not parse: {e}"))
        .command
}

/// `redis://HOST:PORT` or `http://HOST:PORT` -> (host, port).
fn host_port(url: &str) -> (String, u16) {
    let rest = url.split("://").nth(1).expect("scheme");
    let authority = rest.split('/').next().unwrap();
    let (host, port) = authority.rsplit_once(':').expect("explicit port");
    (host.to_owned(), port.parse().unwrap())
}

#[test]
fn compose_services_agree_with_the_cli() {
    let compose = load();
    let s = &compose.services;
    for name in ["redis", "backend", "proxy", "dispatcher"] {
        assert!(s.contains_key(name), "service {name} missing");
    }
    assert!(s["redis"].image.as_deref().unwrap().starts_with("redis:"));
    for name in ["proxy", "dispatcher"] {
        assert!(
            s[name].build.is_some(),
            "{name} must build from the Dockerfile"
        );
        assert!(s[name].depends_on.contains(&"redis".to_owned()));
    }

    let Command::Proxy(proxy) = parse(&s["proxy"]) else {
        panic!("proxy service does not run `anteroom proxy`")
    };
    let Command::Dispatch(dispatch) = parse(&s["dispatcher"]) else {
        panic!("dispatcher service does not run `anteroom dispatch`")
    };
    // Both talk to the redis service on Redis's default port.
    assert_eq!(
        host_port(&proxy.target.redis.url),
        ("redis".to_owned(), 6379)
    );
    assert_eq!(
        host_port(&dispatch.target.redis.url),
        ("redis".to_owned(), 6379)
    );
    assert_eq!(proxy.target.queue, dispatch.target.queue);
    // The proxy listens on all interfaces, on the container port it publishes.
    assert!(
        proxy.listen.ip().is_unspecified(),
        "proxy must listen on 0.0.0.0"
    );
    let published: Vec<u16> = s["proxy"]
        .ports
        .iter()
        .map(|p| p.rsplit(':').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(published, [proxy.listen.port()]);
    // The dispatcher forwards to the backend service on the port it listens on.
    let (host, port) = host_port(&dispatch.upstream);
    assert_eq!(host, "backend");
    let backend_cmd = s["backend"].command.join(" ");
    assert!(
        backend_cmd.contains(&format!("--port {port}"))
            || backend_cmd.contains(&format!("--port={port}")),
        "backend does not listen on {port}: {backend_cmd:?}"
    );
}

#[test]
fn dockerfile_builds_and_runs_the_binary() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Dockerfile"))
        .expect("Dockerfile");
    assert!(text.contains("cargo build --release"));
    assert!(text.contains(r#"ENTRYPOINT ["/usr/local/bin/anteroom"]"#));
}

/// The README documents every flag: each long flag of every command
/// (global ones included) appears there as `--flag`.
#[test]
fn the_readme_names_every_flag() {
    use clap::CommandFactory;
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let cli = Cli::command();
    let mut missing = Vec::new();
    // Every command, nested ones (`dead list`) included.
    let mut commands = vec![&cli];
    let mut i = 0;
    while i < commands.len() {
        commands.extend(commands[i].get_subcommands());
        i += 1;
    }
    for command in commands {
        for arg in command.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if matches!(long, "help" | "version") {
                continue;
            }
            if !readme.contains(&format!("--{long}")) {
                missing.push(format!("{} --{long}", command.get_name()));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "flags the README does not name: {missing:?}"
    );
}
