//! Flag values: durations (`30s`, `250ms`) and sizes (`8MiB`), parsed
//! from and written as text.

use std::time::Duration;

/// `duration` as a flag value (`30s`, `250ms`, `60s`): how the libraries'
/// defaults become the flags' (one source, `anteroom_proxy::defaults` and
/// `anteroom_dispatcher::defaults`).
pub(crate) fn duration_text(duration: Duration) -> String {
    // Whole seconds as seconds (`60s`, as the docs write them, not `1m`).
    if duration.subsec_nanos() == 0 {
        format!("{}s", duration.as_secs())
    } else {
        humantime::format_duration(duration).to_string()
    }
}

/// `bytes` as a flag value (`8MiB`, `64KiB`, `1000`), as [`duration_text`].
pub(crate) fn size_text(bytes: usize) -> String {
    const KIB: usize = 1024;
    const MIB: usize = 1024 * KIB;
    match bytes {
        0 => "0".to_owned(),
        n if n % MIB == 0 => format!("{}MiB", n / MIB),
        n if n % KIB == 0 => format!("{}KiB", n / KIB),
        n => n.to_string(),
    }
}

/// Parses a duration such as `30s`, `500ms` or `2m`.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 30s, 500ms, 2m)"))
}

/// Parses a size such as `8MiB`, `512KiB`, `1000000` (bytes).
pub(crate) fn parse_size(s: &str) -> Result<usize, String> {
    let size: bytesize::ByteSize = s
        .trim()
        .parse()
        .map_err(|e| format!("{e} (examples: 8MiB, 512KiB, 1048576)"))?;
    usize::try_from(size.as_u64()).map_err(|_| format!("{s} is too large"))
}
