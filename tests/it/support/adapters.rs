//! The other-language dispatchers serving the record apps
//! (`tests/apps/wsgi_record.py`, `record_app.js`, `rack/record.ru`): each
//! appends the `ID` of every `/run/ID` it runs to the file `RECORD_FILE`
//! names, and answers `/run/ID?hang=1` only after 60 s.

use std::path::Path;
use std::process::Command;

/// The command running `language`'s dispatcher (`py`: `anteroom-wsgi`,
/// `node`: `anteroom-node`, `rb`: `anteroom-rack`) with its record app,
/// which records into `record`. Redis and the queue come from the
/// caller's `ANTEROOM_REDIS` and `ANTEROOM_QUEUE`. Panics on another name.
pub fn record_dispatcher(language: &str, record: &Path) -> Command {
    let root = env!("CARGO_MANIFEST_DIR");
    let mut cmd = match language {
        "py" => {
            let mut cmd = Command::new(super::venv::bin("anteroom-wsgi"));
            cmd.args(["--threads", "4", "wsgi_record:app"])
                .current_dir(format!("{root}/tests/apps"));
            cmd
        }
        "node" => {
            let mut cmd = Command::new("node");
            cmd.args([
                "bin/anteroom-node.js".to_owned(),
                format!("{root}/tests/apps/record_app.js"),
            ])
            .current_dir(format!("{root}/clients/node"));
            cmd
        }
        "rb" => {
            let mut cmd = Command::new("ruby");
            cmd.args([
                format!("{root}/clients/ruby/exe/anteroom-rack"),
                "--threads".to_owned(),
                "4".to_owned(),
                format!("{root}/tests/apps/rack/record.ru"),
            ]);
            cmd
        }
        other => panic!("no dispatcher for {other}"),
    };
    cmd.env("RECORD_FILE", record);
    cmd
}

/// A fresh path for a record app's `RECORD_FILE` (not created).
pub fn record_file() -> std::path::PathBuf {
    std::env::temp_dir().join(format!(
        "anteroom-record-{}-{}",
        std::process::id(),
        anteroom_testkit::free_port().unwrap()
    ))
}

/// How many times the record at `record` says `/run/ID` ran.
pub fn recorded(record: &Path, id: &str) -> usize {
    std::fs::read_to_string(record)
        .unwrap_or_default()
        .lines()
        .filter(|l| *l == id)
        .count()
}

/// The Rust dispatcher forwarding to `upstream` (`language` `None`), or
/// [`record_dispatcher`] recording into `record`; Redis and the queue
/// come from the caller's `ANTEROOM_REDIS` and `ANTEROOM_QUEUE`.
pub fn any_dispatcher(language: Option<&str>, upstream: &str, record: &Path) -> Command {
    match language {
        None => {
            let mut cmd = super::bin::command();
            cmd.args(["dispatch", "--upstream", upstream]);
            cmd
        }
        Some(language) => record_dispatcher(language, record),
    }
}
