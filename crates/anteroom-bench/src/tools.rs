//! The programs the benchmark drives, installed from the distribution's
//! packages when missing (apt-get, through sudo when not root).

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, bail};

/// (program, Debian package).
const TOOLS: [(&str, &str); 3] = [
    ("redis-server", "redis-server"),
    ("nginx", "nginx-light"),
    ("wrk", "wrk"),
];

/// Where `program` is: a directory of `PATH`, or an sbin directory (nginx
/// lives in /usr/sbin, which an ordinary user's `PATH` may lack).
pub(crate) fn find(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

/// Installs whichever of redis-server, nginx and wrk is missing.
pub(crate) fn ensure(install: bool) -> anyhow::Result<()> {
    ensure_programs(install, &TOOLS)
}

/// Installs Puma when missing, for the adapters scenario (Ruby, Sinatra
/// and the rest come from `scripts/test.sh`).
pub(crate) fn ensure_adapters(install: bool) -> anyhow::Result<()> {
    ensure_programs(install, &[("puma", "puma")])
}

/// Installs the Debian package of each (program, package) whose program is
/// missing.
fn ensure_programs(install: bool, tools: &[(&str, &str)]) -> anyhow::Result<()> {
    let missing: Vec<&str> = tools
        .iter()
        .filter(|(program, _)| find(program).is_none())
        .map(|&(_, package)| package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let hint = format!("sudo apt-get install -y {}", missing.join(" "));
    if !install {
        bail!("missing: {}; install with: {hint}", missing.join(", "));
    }
    eprintln!(
        "anteroom-bench: installing {} from the distribution's packages",
        missing.join(" ")
    );
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| out.stdout.trim_ascii() == b"0");
    let apt = |args: &[&str]| {
        let mut cmd = if root {
            Command::new("apt-get")
        } else {
            let mut sudo = Command::new("sudo");
            sudo.arg("apt-get");
            sudo
        };
        cmd.args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|status| status.success())
    };
    let mut install_args = vec!["install", "-y", "-q"];
    install_args.extend(&missing);
    // A fresh machine's package lists may be empty: update, then retry.
    let installed = apt(&install_args) || (apt(&["update", "-q"]) && apt(&install_args));
    if !installed {
        bail!(
            "could not install {}; install them with: {hint}",
            missing.join(", ")
        );
    }
    for &(program, package) in tools {
        find(program)
            .with_context(|| format!("{program} still missing after installing {package}"))?;
    }
    Ok(())
}
