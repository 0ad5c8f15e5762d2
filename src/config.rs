//! The configuration file: TOML, as an alternative to flags and environment
//! variables, with the precedence flag > environment > file > default.
//!
//! Keys are the long flag names with `_` for `-` (`max_waiting` for
//! `--max-waiting`). Top-level keys apply to every command that has the
//! flag (`redis`, `queue`, `log_format`); a `[proxy]`, `[dispatch]`,
//! `[pause]`... table applies to that command and wins over the top level.
//! `[[proxy.routes]]` tables configure routing, which has no flags. The file
//! is named by `--config` or `ANTEROOM_CONFIG`. docs/configuration.md has a
//! full example.
//!
//! How the precedence is made: each value from the file becomes the default
//! of its flag before clap parses, so a flag or an environment variable
//! still wins, and the built-in default applies only when the file is
//! silent.

use anteroom_proxy::RouteConfig;
use clap::{CommandFactory, FromArgMatches};
use serde::Deserialize;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::cli::{Cli, parse_duration, parse_size};

/// Where a problem in the configuration file is.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {problem}")]
pub(crate) struct ConfigError {
    path: String,
    problem: String,
}

/// A loaded configuration file.
#[derive(Debug, Clone)]
pub(crate) struct ConfigFile {
    path: PathBuf,
    table: toml::Table,
}

impl ConfigFile {
    /// Reads and parses `path`; a syntax error names the line.
    pub(crate) fn load(path: &Path) -> Result<Self, ConfigError> {
        let fail = |problem: String| ConfigError {
            path: path.display().to_string(),
            problem,
        };
        let text = std::fs::read_to_string(path).map_err(|e| fail(format!("cannot read: {e}")))?;
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            fail(format!("not valid TOML: {}", e.to_string().trim_end()))
        })?;
        Ok(Self {
            path: path.to_owned(),
            table,
        })
    }

    fn error(&self, problem: String) -> ConfigError {
        ConfigError {
            path: self.path.display().to_string(),
            problem,
        }
    }

    /// Makes the file's values the defaults of `cmd`'s flags, checking each
    /// with the flag's own parser.
    pub(crate) fn apply(&self, mut cmd: clap::Command) -> Result<clap::Command, ConfigError> {
        let commands: Vec<String> = cmd
            .get_subcommands()
            .map(|sc| sc.get_name().to_owned())
            .collect();
        // Every key must mean something.
        for (key, value) in &self.table {
            if let Some(section) = value.as_table() {
                if !commands.contains(key) {
                    return Err(self.error(format!(
                        "unknown table [{key}]; tables are named after commands: {}",
                        commands.join(", ")
                    )));
                }
                let sc = cmd.find_subcommand(key).expect("listed above");
                for name in section.keys() {
                    if !(key == "proxy" && name == "routes") && find_arg(sc, name).is_none() {
                        return Err(self.error(format!(
                            "[{key}] {name}: unknown key (`anteroom {key} --help` lists the flags; write them with _ for -)"
                        )));
                    }
                }
            } else if find_arg(&cmd, key).is_none()
                && !cmd.get_subcommands().any(|sc| find_arg(sc, key).is_some())
            {
                return Err(self.error(format!("{key}: unknown key")));
            }
        }
        // Flags of `anteroom` itself (`log_format`), from top-level keys.
        let mut global = Vec::new();
        for (key, value) in &self.table {
            if let Some(arg) = find_arg(&cmd, key) {
                global.push(self.checked(arg, value, key)?);
            }
        }
        for (id, text) in global {
            cmd = cmd.mut_arg(id, |arg| arg.default_value(text));
        }
        for name in commands {
            let section = self.table.get(&name).and_then(toml::Value::as_table);
            let mut values: Vec<(String, &toml::Value, String)> = Vec::new();
            for (key, value) in &self.table {
                if !value.is_table() {
                    values.push((key.clone(), value, key.clone()));
                }
            }
            for (key, value) in section.into_iter().flatten() {
                if !(name == "proxy" && key == "routes") {
                    values.retain(|(k, _, _)| k != key);
                    values.push((key.clone(), value, format!("[{name}] {key}")));
                }
            }
            let mut checked = Vec::new();
            {
                let sc = cmd.find_subcommand(&name).expect("listed above");
                for (key, value, location) in values {
                    // A top-level key may be for other commands only.
                    if let Some(arg) = find_arg(sc, &key) {
                        checked.push(self.checked(arg, value, &location)?);
                    }
                }
            }
            cmd = cmd.mut_subcommand(&name, |mut sc| {
                for (id, text) in checked {
                    // A value from the file satisfies a required flag.
                    sc = sc.mut_arg(id, |arg| arg.default_value(text).required(false));
                }
                sc
            });
        }
        Ok(cmd)
    }

    /// `value` as the text of `arg`, checked by the flag's own parser;
    /// errors name `location` (`key` or `[command] key`).
    fn checked(
        &self,
        arg: &clap::Arg,
        value: &toml::Value,
        location: &str,
    ) -> Result<(clap::Id, String), ConfigError> {
        let text = scalar(value).ok_or_else(|| {
            self.error(format!("{location}: must be a string, number or boolean"))
        })?;
        check_value(arg, &text)
            .map_err(|detail| self.error(format!("{location} = {value}: {detail}")))?;
        Ok((arg.get_id().clone(), text))
    }

    /// `[[proxy.routes]]`, checked.
    pub(crate) fn routes(&self) -> Result<Vec<RouteConfig>, ConfigError> {
        let Some(raw) = self
            .table
            .get("proxy")
            .and_then(|p| p.get("routes"))
            .cloned()
        else {
            return Ok(Vec::new());
        };
        let routes: Vec<RouteFile> = raw.try_into().map_err(|e: toml::de::Error| {
            self.error(format!("[[proxy.routes]]: {}", e.message()))
        })?;
        routes
            .into_iter()
            .enumerate()
            .map(|(i, r)| {
                let at = |field: &str| format!("[[proxy.routes]] #{} {field}", i + 1);
                let mut route = RouteConfig::new(r.queue);
                route.host = r.host.map(|h| h.to_ascii_lowercase());
                route.path_prefix = r.path_prefix;
                // The library's rule, named by key.
                route.check().map_err(|problem| {
                    self.error(format!("[[proxy.routes]] #{} {problem}", i + 1))
                })?;
                route.hold = r
                    .hold
                    .map(|h| parse_duration(&h))
                    .transpose()
                    .map_err(|e| self.error(format!("{}: {e}", at("hold"))))?;
                route.max_waiting = r.max_waiting;
                route.canary = r.canary.map(|c| {
                    let mut canary =
                        anteroom_proxy::CanaryConfig::new(c.queue, c.weight.unwrap_or(0.0));
                    canary.cookie = c.cookie;
                    canary.header = c.header;
                    canary
                });
                if let Some(canary) = &route.canary {
                    canary.check().map_err(|problem| {
                        self.error(format!("[[proxy.routes]] #{} {problem}", i + 1))
                    })?;
                }
                route.max_waiting_bytes =
                    r.max_waiting_bytes
                        .map(|b| parse_size(&b))
                        .transpose()
                        .map_err(|e| self.error(format!("{}: {e}", at("max_waiting_bytes"))))?;
                Ok(route)
            })
            .collect()
    }
}

/// One `[[proxy.routes]]` table as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteFile {
    queue: String,
    host: Option<String>,
    path_prefix: Option<String>,
    hold: Option<String>,
    max_waiting: Option<usize>,
    max_waiting_bytes: Option<String>,
    canary: Option<CanaryFile>,
}

/// A route's `canary` table as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CanaryFile {
    queue: String,
    weight: Option<f64>,
    cookie: Option<String>,
    header: Option<String>,
}

/// Runs `text` through `arg`'s own parser (a copy of the flag, alone, with
/// no environment variable), so a bad value is caught with the key's name.
fn check_value(arg: &clap::Arg, text: &str) -> Result<(), String> {
    if !arg.get_action().takes_values() {
        return match text {
            "true" | "false" => Ok(()),
            _ => Err("expected true or false".into()),
        };
    }
    let Some(long) = arg.get_long() else {
        return Ok(());
    };
    let probe = arg
        .clone()
        .env(None::<&'static str>)
        .default_value(None::<&'static str>)
        .required(false);
    clap::Command::new("config")
        .no_binary_name(true)
        .disable_help_flag(true)
        .disable_version_flag(true)
        .arg(probe)
        .try_get_matches_from([format!("--{long}={text}")])
        .map(drop)
        .map_err(|err| {
            let text = err.to_string();
            let first = text.lines().next().unwrap_or_default();
            first.trim_start_matches("error: ").to_owned()
        })
}

fn find_arg<'a>(cmd: &'a clap::Command, key: &str) -> Option<&'a clap::Arg> {
    let long = key.replace('_', "-");
    cmd.get_arguments()
        .find(|a| a.get_long() == Some(long.as_str()) && long != "config")
}

fn scalar(value: &toml::Value) -> Option<String> {
    match value {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Float(f) => Some(f.to_string()),
        toml::Value::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

/// The file named by `--config FILE` (or `--config=FILE`) among `args`, or
/// by `ANTEROOM_CONFIG`.
fn config_path(args: &[OsString]) -> Option<PathBuf> {
    let mut iter = args.iter().skip(1);
    while let Some(arg) = iter.next() {
        if arg == "--" {
            break;
        }
        if arg == "--config" {
            return iter.next().map(PathBuf::from);
        }
        if let Some(path) = arg.to_str().and_then(|a| a.strip_prefix("--config=")) {
            return Some(PathBuf::from(path));
        }
    }
    std::env::var_os("ANTEROOM_CONFIG")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
}

/// One setting of a command as it will run, for `--check-config`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Setting {
    /// The long flag, without dashes (`hold`).
    pub(crate) name: String,
    /// Its value as given (secrets masked); empty when not set.
    pub(crate) value: String,
    /// Where it came from: `flag`, `env NAME`, `file`, `default`, or
    /// `not set`.
    pub(crate) source: String,
}

/// Every flag of the command `matches` ran, with its effective value and
/// where it came from; the Redis password and the admin token masked.
fn settings(
    cmd: &clap::Command,
    matches: &clap::ArgMatches,
    file: Option<&ConfigFile>,
) -> Vec<Setting> {
    use clap::parser::ValueSource;
    let Some((name, sub)) = matches.subcommand() else {
        return Vec::new();
    };
    let Some(sub_cmd) = cmd.find_subcommand(name) else {
        return Vec::new();
    };
    let in_file = |key: &str| {
        file.is_some_and(|f| {
            f.table.get(key).is_some_and(|v| !v.is_table())
                || f.table
                    .get(name)
                    .and_then(toml::Value::as_table)
                    .is_some_and(|t| t.contains_key(key))
        })
    };
    // In the order `--help` lists them (file values were moved last).
    let order: Vec<String> = Cli::command()
        .find_subcommand(name)
        .map(|c| c.get_arguments().map(|a| a.get_id().to_string()).collect())
        .unwrap_or_default();
    let mut args: Vec<&clap::Arg> = sub_cmd.get_arguments().collect();
    args.sort_by_key(|a| {
        order
            .iter()
            .position(|id| id == a.get_id().as_str())
            .unwrap_or(usize::MAX)
    });
    let mut out = Vec::new();
    for arg in args {
        let Some(long) = arg.get_long() else { continue };
        if matches!(long, "help" | "version" | "check-config" | "config") {
            continue;
        }
        let id = arg.get_id().as_str();
        let key = long.replace('-', "_");
        let raw: Vec<String> = sub
            .get_raw(id)
            .map(|values| values.map(|v| v.to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        let mut value = raw.join(" ");
        if long == "redis" {
            value = crate::ops::redact(&value);
        } else if long == "admin-token" && !value.is_empty() {
            value = "***".to_owned();
        }
        let source = match sub.value_source(id) {
            Some(ValueSource::CommandLine) => "flag".to_owned(),
            Some(ValueSource::EnvVariable) => format!(
                "env {}",
                arg.get_env()
                    .map_or_else(String::new, |e| e.to_string_lossy().into_owned())
            ),
            Some(ValueSource::DefaultValue) if in_file(&key) => "file".to_owned(),
            Some(_) => "default".to_owned(),
            None => "not set".to_owned(),
        };
        out.push(Setting {
            name: long.to_owned(),
            value,
            source,
        });
    }
    out
}

/// Parses the command line with the configuration file, if any, in effect.
/// Exits with clap's message and status 2 on bad flags or a bad file.
pub(crate) fn parse() -> (Cli, Option<ConfigFile>) {
    let args: Vec<OsString> = std::env::args_os().collect();
    let file = config_path(&args)
        .map(|path| ConfigFile::load(&path).unwrap_or_else(|err| usage_error(&err.to_string())));
    let cmd = match &file {
        Some(file) => file
            .apply(Cli::command())
            .unwrap_or_else(|err| usage_error(&err.to_string())),
        None => Cli::command(),
    };
    let matches = cmd
        .clone()
        .try_get_matches_from(&args)
        .unwrap_or_else(|e| e.exit());
    let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    if cli.check_config {
        cli.settings = settings(&cmd, &matches, file.as_ref());
    }
    (cli, file)
}

fn usage_error(message: &str) -> ! {
    eprintln!("error: configuration file {message}");
    std::process::exit(2)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn file(text: &str) -> ConfigFile {
        ConfigFile {
            path: PathBuf::from("test.toml"),
            table: text.parse().unwrap(),
        }
    }

    fn parse_with(text: &str, args: &[&str]) -> Result<Cli, String> {
        let cmd = file(text)
            .apply(Cli::command())
            .map_err(|e| e.to_string())?;
        let args: Vec<&str> = std::iter::once("anteroom")
            .chain(args.iter().copied())
            .collect();
        let matches = cmd.try_get_matches_from(args).map_err(|e| e.to_string())?;
        Cli::from_arg_matches(&matches).map_err(|e| e.to_string())
    }

    fn proxy(cli: Cli) -> crate::cli::ProxyArgs {
        match cli.command {
            crate::cli::Command::Proxy(args) => args,
            other => panic!("not proxy: {other:?}"),
        }
    }

    #[test]
    fn file_values_fill_in_and_flags_win() {
        let text = "queue = \"shared\"\n[proxy]\nhold = \"45s\"\nmax_waiting = 7\ndurable = true\n";
        let args = proxy(parse_with(text, &["proxy"]).unwrap());
        assert_eq!(args.hold, Duration::from_secs(45));
        assert_eq!(args.max_waiting, 7);
        assert!(args.durable);
        assert_eq!(args.target.queue, "shared");
        let args = proxy(parse_with(text, &["proxy", "--hold", "5s"]).unwrap());
        assert_eq!(args.hold, Duration::from_secs(5), "a flag beats the file");
        // Untouched by the file: the built-in default.
        assert_eq!(args.max_body, anteroom_proxy::defaults::MAX_BODY);
    }

    #[test]
    fn errors_name_the_key_and_the_problem() {
        for (text, expected) in [
            (
                "[proxy]\nhold = \"3 fortnights\"\n",
                "test.toml: [proxy] hold = \"3 fortnights\": invalid value",
            ),
            (
                "[proxy]\nholdd = \"3s\"\n",
                "test.toml: [proxy] holdd: unknown key",
            ),
            (
                "[proxi]\nhold = \"3s\"\n",
                "test.toml: unknown table [proxi]",
            ),
            ("colour = \"blue\"\n", "test.toml: colour: unknown key"),
            (
                "[proxy]\nmax_waiting = [1]\n",
                "test.toml: [proxy] max_waiting: must be a string",
            ),
        ] {
            let err = parse_with(text, &["proxy"]).err().unwrap_or_default();
            assert!(err.starts_with(expected), "{text:?} gave {err:?}");
        }
    }

    #[test]
    fn routes_are_checked() {
        let ok = file(
            "[[proxy.routes]]\nhost = \"API.example.com\"\nqueue = \"api\"\nhold = \"1m\"\nmax_waiting_bytes = \"1MiB\"\n\
             [[proxy.routes]]\npath_prefix = \"/admin/\"\nqueue = \"admin\"\n",
        );
        let routes = ok.routes().unwrap();
        assert_eq!(routes.len(), 2);
        assert_eq!(routes[0].host.as_deref(), Some("api.example.com"));
        assert_eq!(routes[0].hold, Some(Duration::from_secs(60)));
        assert_eq!(routes[0].max_waiting_bytes, Some(1024 * 1024));
        assert_eq!(routes[1].path_prefix.as_deref(), Some("/admin/"));
        for (text, expected) in [
            (
                "[[proxy.routes]]\nqueue = \"bad name!\"\n",
                "[[proxy.routes]] #1 queue",
            ),
            (
                "[[proxy.routes]]\nqueue = \"a\"\nhold = \"soon\"\n",
                "[[proxy.routes]] #1 hold",
            ),
            (
                "[[proxy.routes]]\nqueue = \"a\"\npath_prefix = \"api\"\n",
                "#1 path_prefix: must start with /",
            ),
            (
                "[[proxy.routes]]\nqueue = \"a\"\nhots = \"x\"\n",
                "unknown field `hots`",
            ),
        ] {
            let err = file(text).routes().unwrap_err().to_string();
            assert!(err.contains(expected), "{text:?} gave {err:?}");
        }
    }

    #[test]
    fn the_config_flag_is_found_before_parsing() {
        let args = |a: &[&str]| a.iter().map(OsString::from).collect::<Vec<_>>();
        assert_eq!(
            config_path(&args(&["anteroom", "proxy", "--config", "a.toml"])),
            Some(PathBuf::from("a.toml"))
        );
        assert_eq!(
            config_path(&args(&["anteroom", "--config=b.toml", "proxy"])),
            Some(PathBuf::from("b.toml"))
        );
        assert_eq!(
            config_path(&args(&["anteroom", "window", "--", "x", "--config", "c"])),
            std::env::var_os("ANTEROOM_CONFIG").map(PathBuf::from)
        );
    }
}
