//! Canary splits: which of a route's requests go to its canary queue
//! (docs/operations.md, "Canary routing"). In order:
//! 1. the configured header field says `1` (canary) or `0` (main);
//! 2. the configured cookie says `1` or `0` (a client pinned to a side;
//!    `1` only while the weight is above 0, so setting it to 0 brings
//!    every pinned client back);
//! 3. otherwise a random draw with the split's weight, and with a cookie
//!    configured the answer sets it (`Set-Cookie`, RFC 6265 section 4.1),
//!    so the client's next requests stay on the side it drew.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anteroom_protocol::CanarySplit;
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Request};
use rand::Rng;

use crate::config::CanaryConfig;
use crate::handler::State;

/// How long a drawn side sticks: a day (`Max-Age`, seconds).
const PIN_SECONDS: u32 = 24 * 3600;

/// One route's canary split.
pub(crate) struct Split {
    /// The canary queue's state.
    pub(crate) target: Arc<State>,
    weight_ppm: u32,
    cookie: Option<String>,
    header: Option<HeaderName>,
    to_canary: AtomicU64,
    to_main: AtomicU64,
}

/// Where one request goes, and the cookie that pins its client there.
pub(crate) struct Choice {
    pub(crate) canary: bool,
    pub(crate) set_cookie: Option<HeaderValue>,
}

impl Split {
    /// The split `config` describes, to `target` (a checked config: see
    /// [`CanaryConfig::check`]).
    pub(crate) fn new(config: &CanaryConfig, target: Arc<State>) -> Self {
        Self {
            target,
            weight_ppm: (config.weight.clamp(0.0, 100.0) * 10_000.0).round() as u32,
            cookie: config.cookie.clone(),
            header: config
                .header
                .as_deref()
                .and_then(|h| HeaderName::from_bytes(h.as_bytes()).ok()),
            to_canary: AtomicU64::new(0),
            to_main: AtomicU64::new(0),
        }
    }

    /// Where `req` goes.
    pub(crate) fn choose<B>(&self, req: &Request<B>) -> Choice {
        let said = |value: &[u8]| match value.trim_ascii() {
            b"1" => Some(true),
            b"0" => Some(false),
            _ => None,
        };
        let by_header = self
            .header
            .as_ref()
            .and_then(|name| req.headers().get(name))
            .and_then(|v| said(v.as_bytes()));
        // At weight 0 (the canary rolled back) a cookie saying `1` is
        // not honoured: its client is drawn again, to the main queue, and
        // re-pinned there. The header still picks the canary.
        let by_cookie = || {
            let name = self.cookie.as_deref()?;
            cookie_value(req.headers(), name)
                .and_then(said)
                .filter(|canary| !canary || self.weight_ppm > 0)
        };
        let choice = match by_header.or_else(by_cookie) {
            Some(canary) => Choice {
                canary,
                set_cookie: None,
            },
            None => {
                let canary = rand::rng().random_range(0..1_000_000) < self.weight_ppm;
                Choice {
                    canary,
                    set_cookie: self.cookie.as_deref().and_then(|name| pin(name, canary)),
                }
            }
        };
        let counter = if choice.canary {
            &self.to_canary
        } else {
            &self.to_main
        };
        counter.fetch_add(1, Ordering::Relaxed);
        choice
    }

    /// The split as the main queue's heartbeat reports it.
    pub(crate) fn report(&self) -> CanarySplit {
        CanarySplit {
            queue: self.target.queue.clone(),
            weight_ppm: self.weight_ppm,
            cookie: self.cookie.clone(),
            header: self.header.as_ref().map(|h| h.as_str().to_owned()),
            to_canary: self.to_canary.load(Ordering::Relaxed),
            to_main: self.to_main.load(Ordering::Relaxed),
        }
    }
}

/// The value of cookie `name` in the request's `Cookie` fields (RFC 6265
/// section 5.4: `name=value` pairs separated by `; `; HTTP/2 may split
/// them over several fields, RFC 9113 section 8.2.3); the first if sent
/// twice.
fn cookie_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a [u8]> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b';'))
        .find_map(|pair| {
            let pair = pair.trim_ascii();
            let eq = pair.iter().position(|b| *b == b'=')?;
            (pair[..eq].trim_ascii() == name.as_bytes()).then(|| pair[eq + 1..].trim_ascii())
        })
}

/// `Set-Cookie: NAME=1|0; Path=/; Max-Age=86400; HttpOnly; SameSite=Lax`.
fn pin(name: &str, canary: bool) -> Option<HeaderValue> {
    let side = if canary { 1 } else { 0 };
    HeaderValue::from_str(&format!(
        "{name}={side}; Path=/; Max-Age={PIN_SECONDS}; HttpOnly; SameSite=Lax"
    ))
    .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    #[test]
    fn cookies_are_found_by_exact_name_in_any_field() {
        let h = headers(&[("cookie", "a=1; canary_x=0"), ("cookie", "canary=1; b=2")]);
        assert_eq!(cookie_value(&h, "canary"), Some(&b"1"[..]));
        assert_eq!(cookie_value(&h, "canary_x"), Some(&b"0"[..]));
        assert_eq!(cookie_value(&h, "b"), Some(&b"2"[..]));
        assert_eq!(cookie_value(&h, "c"), None);
        assert_eq!(
            cookie_value(&headers(&[("cookie", "canary")]), "canary"),
            None
        );
    }

    #[test]
    fn pins_are_cookies_for_the_whole_site() {
        let value = pin("anteroom_canary", true).unwrap();
        assert_eq!(
            value,
            "anteroom_canary=1; Path=/; Max-Age=86400; HttpOnly; SameSite=Lax"
        );
    }
}
