//! The project's Python virtual environment: `.venv`, which
//! `scripts/test.sh` makes from `tests/requirements.txt` (or the one named
//! by `ANTEROOM_TEST_VENV`). The tests run every Python program with its
//! interpreter and tools, never the system's.

use std::path::PathBuf;

/// The environment's directory.
pub fn dir() -> PathBuf {
    std::env::var_os("ANTEROOM_TEST_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv"))
}

/// `bin/NAME` in the environment (`python`, `gunicorn`, ...). Panics,
/// naming what is missing and how to get it, when it is not there.
pub fn bin(name: &str) -> PathBuf {
    let path = dir().join("bin").join(name);
    assert!(
        path.exists(),
        "{} is missing: this test runs Python programs from the project's \
         virtual environment; `bash scripts/test.sh` creates it from \
         tests/requirements.txt",
        path.display()
    );
    path
}
