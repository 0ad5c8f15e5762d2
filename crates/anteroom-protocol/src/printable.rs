//! Text from the network or from Redis, made safe to print.

use std::fmt::{self, Write};

/// `text` for a log line or a terminal: control characters (C0, DEL, C1)
/// and Unicode bidirectional formatting characters are written as
/// `\u{..}` escapes, and `\` as `\\` so an escape cannot be faked, so text a client or a foreign envelope supplies
/// cannot forge a log line (a CR LF in a method) or send escape sequences
/// to an operator's terminal (a dispatcher label, a host name, a pause
/// author). Width and alignment flags apply (`{:<16}`). Everything else
/// is printed as it is.
pub fn printable(text: &str) -> Printable<'_> {
    Printable(text)
}

/// See [`printable`].
#[derive(Debug, Clone, Copy)]
pub struct Printable<'a>(&'a str);

fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

impl fmt::Display for Printable<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.0.chars().any(|c| c == '\\' || needs_escape(c)) {
            return f.pad(self.0);
        }
        let mut escaped = String::with_capacity(self.0.len() + 8);
        for c in self.0.chars() {
            if c == '\\' {
                escaped.push_str("\\\\");
            } else if needs_escape(c) {
                let _ = write!(escaped, "\\u{{{:x}}}", u32::from(c));
            } else {
                escaped.push(c);
            }
        }
        f.pad(&escaped)
    }
}

#[cfg(test)]
mod tests {
    use super::printable;

    #[test]
    fn controls_and_bidi_are_escaped() {
        assert_eq!(printable("GET").to_string(), "GET");
        assert_eq!(
            printable("GET\r\nINFO forged").to_string(),
            "GET\\u{d}\\u{a}INFO forged"
        );
        assert_eq!(printable("\u{1b}[31mred").to_string(), "\\u{1b}[31mred");
        assert_eq!(
            printable("a\u{202e}b\u{85}").to_string(),
            "a\\u{202e}b\\u{85}"
        );
        assert_eq!(printable("café").to_string(), "café");
        assert_eq!(printable("a\\u{d}").to_string(), "a\\\\u{d}");
        assert_eq!(format!("[{:<6}]", printable("ab")), "[ab    ]");
        assert_eq!(format!("[{:<8}]", printable("a\tb")), "[a\\u{9}b ]");
    }
}
