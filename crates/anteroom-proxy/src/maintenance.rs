//! The answer to a request that arrives while its queue is in maintenance
//! mode (`anteroom maintenance on`): 503 Service Unavailable with
//! `Retry-After` (RFC 9110 sections 15.6.4 and 10.2.3), and a page: HTML
//! for a client whose `Accept` takes `text/html` (a browser), JSON
//! otherwise (API clients, curl). The HTML is the configured page when
//! there is one (`--maintenance-page`), the built-in one otherwise.

use bytes::Bytes;
use http::HeaderMap;
use http::header::{self, HeaderValue};

use anteroom_protocol::MaintenanceRecord;

/// What a request arriving during maintenance is answered with (built on
/// arrival, sent as the request's answer; see `error::error_response`).
#[derive(Debug)]
pub(crate) struct MaintenancePage {
    pub(crate) retry_after_secs: u32,
    pub(crate) content_type: &'static str,
    pub(crate) body: Bytes,
}

/// Longest message shown (bytes, cut at a character boundary): the record
/// is re-read every second by every proxy.
pub(crate) const MAX_MESSAGE: usize = 4096;

/// Longest `Retry-After` sent: a day. A typo of a week would keep
/// well-behaved clients away that long.
pub(crate) const MAX_RETRY_AFTER: u32 = 24 * 3600;

/// The message pages show when the record carries none.
const DEFAULT_MESSAGE: &str = "This service is down for maintenance. Please try again shortly.";

impl MaintenancePage {
    /// The page for a request with `headers`, during `record`'s
    /// maintenance; `custom` is the configured HTML page, if any.
    pub(crate) fn new(
        record: &MaintenanceRecord,
        headers: &HeaderMap,
        custom: Option<&Bytes>,
    ) -> Self {
        let mut message = record.message.as_deref().unwrap_or(DEFAULT_MESSAGE);
        if message.len() > MAX_MESSAGE {
            let mut end = MAX_MESSAGE;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message = &message[..end];
        }
        let retry_after_secs = record.retry_after_secs.min(MAX_RETRY_AFTER);
        let (content_type, body) = if accepts_html(headers) {
            let body = match custom {
                Some(page) => page.clone(),
                None => Bytes::from(builtin_html(message)),
            };
            ("text/html; charset=utf-8", body)
        } else {
            let json = serde_json::json!({
                "error": "maintenance",
                "message": message,
                "retry_after": retry_after_secs,
            });
            let mut body = serde_json::to_vec(&json).unwrap_or_default();
            body.push(b'\n');
            ("application/json", Bytes::from(body))
        };
        Self {
            retry_after_secs,
            content_type,
            body,
        }
    }

    /// The page's `Content-Type`.
    pub(crate) fn content_type(&self) -> HeaderValue {
        HeaderValue::from_static(self.content_type)
    }
}

/// Whether the client prefers HTML to JSON, by its `Accept` (RFC 9110
/// section 12.5.1): each type gets the weight of the most specific range
/// that matches it (`text/html` over `text/*` over `*/*`), and HTML is sent
/// only when its weight is above zero and above JSON's. So `*/*` alone
/// (curl, most HTTP libraries) gets JSON, and a browser's
/// `text/html,...,*/*;q=0.8` HTML.
fn accepts_html(headers: &HeaderMap) -> bool {
    let ranges: Vec<(String, f32)> = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|range| {
            let mut parts = range.split(';');
            let media = parts.next()?.trim().to_ascii_lowercase();
            let mut weight = 1.0;
            for param in parts {
                if let Some(q) = param.trim().to_ascii_lowercase().strip_prefix("q=") {
                    // A qvalue is 0 to 1 (RFC 9110 section 12.4.2); one
                    // that is not counts as 0.
                    weight = q
                        .trim()
                        .parse::<f32>()
                        .ok()
                        .filter(|q| (0.0..=1.0).contains(q))
                        .unwrap_or(0.0);
                }
            }
            (!media.is_empty()).then_some((media, weight))
        })
        .collect();
    let weight_of = |kind: &str, sub: &str| {
        let exact = format!("{kind}/{sub}");
        let any_sub = format!("{kind}/*");
        [exact.as_str(), any_sub.as_str(), "*/*"]
            .iter()
            .find_map(|wanted| {
                ranges
                    .iter()
                    .filter(|(media, _)| media == wanted)
                    .map(|(_, q)| *q)
                    .reduce(f32::max)
            })
            .unwrap_or(0.0)
    };
    let html = weight_of("text", "html");
    html > 0.0 && html > weight_of("application", "json")
}

fn builtin_html(message: &str) -> String {
    let message = message
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;");
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width\">\
         <title>Down for maintenance</title>\
         <style>body{{font-family:system-ui,sans-serif;max-width:36em;margin:15vh auto;padding:0 1em;color:#222}}</style>\
         </head><body><h1>Down for maintenance</h1><p>{message}</p></body></html>\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accept(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::ACCEPT, HeaderValue::from_str(value).unwrap());
        headers
    }

    #[test]
    fn html_only_for_clients_that_ask_for_it() {
        let browser = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8";
        assert!(accepts_html(&accept(browser)));
        assert!(accepts_html(&accept("TEXT/*")));
        assert!(!accepts_html(&accept("application/json, text/html;q=0.1")));
        assert!(accepts_html(&accept("application/json;q=0.5, text/html")));
        assert!(!accepts_html(&accept("text/*, text/html;q=0")));
        assert!(!accepts_html(&accept("text/html;q=NaN")));
        assert!(!accepts_html(&accept("text/html;q=2")));
        assert!(!accepts_html(&accept("*/*")));
        assert!(!accepts_html(&accept("application/json")));
        assert!(!accepts_html(&accept("text/html;q=0")));
        assert!(!accepts_html(&accept("text/html; q=0.000")));
        assert!(!accepts_html(&HeaderMap::new()));
    }

    #[test]
    fn messages_are_escaped_in_the_builtin_page() {
        let record = MaintenanceRecord {
            since_ms: 0,
            by: String::new(),
            message: Some("<script>alert(1)</script> & back at 5".to_owned()),
            retry_after_secs: 30,
        };
        let page = MaintenancePage::new(&record, &accept("text/html"), None);
        let text = String::from_utf8_lossy(&page.body);
        assert!(text.contains("&lt;script&gt;alert(1)&lt;/script&gt; &amp; back at 5"));
        let json = MaintenancePage::new(&record, &accept("*/*"), None);
        let value: serde_json::Value = serde_json::from_slice(&json.body).unwrap();
        assert_eq!(value["message"], "<script>alert(1)</script> & back at 5");
        assert_eq!(value["retry_after"], 30);
    }
}
