//! The live status page on the admin address: each queue's pause state
//! with pause and resume buttons, its waiting depth and throughput over the
//! last minutes as small charts, and its dispatchers with their in-flight
//! counts.
//!
//! Plain server-rendered HTML (inline SVG charts) and a small script with
//! no build step. The script refreshes the content every two seconds from
//! `GET /ui` and sends the buttons as `POST /pause?queue=` and
//! `POST /resume?queue=`. When the admin endpoint has a token, the page
//! asks for it once and keeps it in the tab's `sessionStorage`; a browser
//! cannot send a bearer token on navigation, so the page itself then
//! carries no data until the token is given.

use std::collections::VecDeque;
use std::fmt::Write;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anteroom_control::{Queue, QueueStatus};
use anteroom_metrics::ProxyMetrics;
use tokio_util::sync::CancellationToken;

/// One sample per second; the charts show the last five minutes.
const EVERY: Duration = Duration::from_secs(1);
const KEEP: usize = 300;

/// One second of one queue.
#[derive(Debug, Clone, Copy)]
struct Sample {
    waiting: u64,
    /// Responses per second the proxy sent for this queue.
    throughput: f64,
}

/// What the page shows of one queue.
#[derive(Debug, Default)]
struct QueueView {
    status: Option<QueueStatus>,
    history: VecDeque<Sample>,
    last_total: Option<u64>,
    error: Option<String>,
}

/// The sampled state of every queue the page shows.
pub(crate) struct Board {
    queues: Vec<(Queue, Mutex<QueueView>)>,
}

impl Board {
    pub(crate) fn new(queues: Vec<Queue>) -> Arc<Self> {
        Arc::new(Self {
            queues: queues
                .into_iter()
                .map(|q| (q, Mutex::new(QueueView::default())))
                .collect(),
        })
    }

    pub(crate) fn queue(&self, name: &str) -> Option<&Queue> {
        self.queues
            .iter()
            .map(|(q, _)| q)
            .find(|q| q.name() == name)
    }

    pub(crate) fn first(&self) -> &Queue {
        &self.queues[0].0
    }

    /// Samples every queue once a second until `stop`.
    pub(crate) async fn sample(
        self: Arc<Self>,
        metrics: Option<ProxyMetrics>,
        stop: CancellationToken,
    ) {
        loop {
            self.sample_once(metrics.as_ref()).await;
            tokio::select! {
                () = tokio::time::sleep(EVERY) => {}
                () = stop.cancelled() => return,
            }
        }
    }

    /// Takes one sample now (also after a button, so the page shows it).
    pub(crate) async fn sample_once(&self, metrics: Option<&ProxyMetrics>) {
        for (queue, view) in &self.queues {
            let status = queue.status().await;
            let total = metrics.map(|m| m.answered_total(queue.name()));
            let mut view = view.lock().unwrap_or_else(PoisonError::into_inner);
            match status {
                Ok(status) => {
                    let throughput = match (total, view.last_total) {
                        (Some(now), Some(before)) => {
                            now.saturating_sub(before) as f64 / EVERY.as_secs_f64()
                        }
                        _ => 0.0,
                    };
                    view.last_total = total;
                    view.history.push_back(Sample {
                        waiting: status.waiting,
                        throughput,
                    });
                    while view.history.len() > KEEP {
                        view.history.pop_front();
                    }
                    view.status = Some(status);
                    view.error = None;
                }
                Err(err) => view.error = Some(err.to_string()),
            }
        }
    }

    /// The page's content: one card per queue.
    pub(crate) fn render(&self, with_buttons: bool) -> String {
        let mut out = String::new();
        for (queue, view) in &self.queues {
            let view = view.lock().unwrap_or_else(PoisonError::into_inner);
            render_queue(&mut out, queue.name(), &view, with_buttons);
        }
        out
    }
}

fn render_queue(out: &mut String, name: &str, view: &QueueView, with_buttons: bool) {
    let name = escape(name);
    let _ = write!(
        out,
        "<section class=\"queue\" data-queue=\"{name}\"><h2>{name}</h2>"
    );
    if let Some(err) = &view.error {
        let _ = write!(
            out,
            "<p class=\"error\">redis unavailable: {}</p>",
            escape(err)
        );
    }
    let Some(status) = &view.status else {
        out.push_str("<p>no sample yet</p></section>");
        return;
    };
    let (state, action) = match &status.pause {
        Some(p) => (
            format!(
                "<span class=\"badge paused\">paused</span> by {} for {}",
                escape(&p.record.by),
                seconds(status.checked_at_ms.saturating_sub(p.record.since_ms))
            ),
            ("resume", "Resume"),
        ),
        None => (
            "<span class=\"badge running\">running</span>".to_owned(),
            ("pause", "Pause"),
        ),
    };
    let _ = write!(out, "<p class=\"state\">{state}");
    if let Some(m) = &status.maintenance {
        let _ = write!(
            out,
            " <span class=\"badge paused\">maintenance</span> by {} for {}",
            escape(&m.by),
            seconds(status.checked_at_ms.saturating_sub(m.since_ms))
        );
    }
    if with_buttons {
        let _ = write!(
            out,
            " <button data-action=\"{}\" data-queue=\"{name}\">{}</button>",
            action.0, action.1
        );
    }
    out.push_str("</p>");
    let throughput = view.history.back().map_or(0.0, |s| s.throughput);
    let hold = status
        .proxies
        .iter()
        .filter_map(|p| p.heartbeat.hold_ms)
        .max()
        .map_or_else(|| "-".to_owned(), seconds);
    let _ = write!(
        out,
        "<p class=\"numbers\"><span class=\"waiting\">{} waiting</span> \
         ({}{} past their hold budget) · oldest {} · hold budget {hold} · \
         {:.1} responses/s · {} dead letters</p>",
        status.waiting,
        if status.expired_capped {
            "at least "
        } else {
            ""
        },
        status.expired,
        status
            .oldest_wait_ms
            .map_or_else(|| "-".to_owned(), seconds),
        throughput,
        status.dead_letters
    );
    let depth: Vec<f64> = view.history.iter().map(|s| s.waiting as f64).collect();
    let rate: Vec<f64> = view.history.iter().map(|s| s.throughput).collect();
    out.push_str("<div class=\"charts\">");
    chart(out, "requests waiting in the queue", "depth", &depth);
    chart(out, "responses per second", "rate", &rate);
    out.push_str("</div><table><tr><th>dispatcher</th><th>host</th><th>label</th><th>in flight</th><th>held</th><th>pause</th><th>upstream</th></tr>");
    for d in &status.dispatchers {
        let hb = &d.heartbeat;
        let upstream = match &hb.unhealthy {
            Some(u) => format!(
                "<span class=\"badge paused unhealthy\">unhealthy</span> for {} ({})",
                seconds(status.checked_at_ms.saturating_sub(u.since_ms)),
                escape(&u.reason)
            ),
            None => "healthy".to_owned(),
        };
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{} / {}</td><td>{}</td><td>{}</td><td>{upstream}</td></tr>",
            escape(&hb.id),
            escape(&hb.host),
            escape(&hb.label),
            hb.in_flight,
            hb.concurrency,
            d.held,
            if hb.paused { "acknowledged" } else { "-" }
        );
    }
    if status.dispatchers.is_empty() {
        out.push_str("<tr><td colspan=\"7\">no live dispatcher</td></tr>");
    }
    out.push_str("</table><table><tr><th>proxy</th><th>host</th><th>version</th><th>waiting</th><th>hold budget</th></tr>");
    for p in &status.proxies {
        let hb = &p.heartbeat;
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(&hb.id),
            escape(&hb.host),
            escape(&hb.version),
            hb.waiting,
            hb.hold_ms.map_or_else(|| "-".to_owned(), seconds)
        );
    }
    if status.proxies.is_empty() {
        out.push_str("<tr><td colspan=\"5\">no live proxy</td></tr>");
    }
    out.push_str("</table></section>");
}

/// A small SVG line chart of `values` (oldest first), scaled to its maximum.
fn chart(out: &mut String, title: &str, class: &str, values: &[f64]) {
    const W: f64 = 300.0;
    const H: f64 = 60.0;
    let max = values.iter().copied().fold(1.0_f64, f64::max);
    let step = W / (KEEP - 1) as f64;
    let offset = (KEEP - values.len()) as f64 * step;
    let points: Vec<String> = values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            format!(
                "{:.1},{:.1}",
                offset + i as f64 * step,
                H - 2.0 - (v / max) * (H - 4.0)
            )
        })
        .collect();
    // Axes as HTML around the plot: the value scale on the left (0 to the
    // maximum), time below (five minutes ago to now).
    let _ = write!(
        out,
        "<figure><div class=\"plot\"><div class=\"axis y\"><span>{}</span><span>0</span></div>\
         <svg class=\"{class}\" viewBox=\"0 0 {W} {H}\" width=\"{W}\" height=\"{H}\" role=\"img\" aria-label=\"{title}\">\
         <rect width=\"{W}\" height=\"{H}\" class=\"bg\"/><polyline points=\"{}\"/></svg></div>\
         <div class=\"axis x\"><span>5 min ago</span><span>now</span></div>\
         <figcaption>{title}</figcaption></figure>",
        max.round(),
        points.join(" ")
    );
}

fn seconds(ms: u64) -> String {
    match ms {
        0..=999 => format!("{ms} ms"),
        1000..=119_999 => format!("{:.1} s", ms as f64 / 1000.0),
        _ => format!("{} min", ms / 60_000),
    }
}

/// Text for HTML: heartbeat fields come from Redis and may hold anything.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The whole page. `content` is the server-rendered cards, or `None` when a
/// token is needed first.
pub(crate) fn page(content: Option<&str>) -> String {
    let (body, hidden) = match content {
        Some(content) => (format!("<main id=\"content\">{content}</main>"), " hidden"),
        None => (
            "<main id=\"content\"><p id=\"needs-token\">This page needs the admin token: \
             the proxy's <code>--admin-token</code> (<code>ANTEROOM_ADMIN_TOKEN</code>). \
             Enter it above; it is kept in this browser tab only.</p></main>"
                .to_owned(),
            "",
        ),
    };
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>Anteroom status</title><style>{STYLE}</style></head><body>\
         <header><h1>Anteroom</h1><form id=\"token\"{hidden}>\
         <label for=\"token-input\">Admin token</label> \
         <input id=\"token-input\" type=\"password\" name=\"token\" placeholder=\"admin token\" autocomplete=\"off\">\
         <button>Use token</button> <span id=\"token-refused\" class=\"error\" hidden>this token was refused</span>\
         </form></header>{body}<script>{SCRIPT}</script></body></html>"
    )
}

const STYLE: &str = "body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}\
h1{font-size:1.3em;margin:0 0 .5em}h2{margin:.2em 0}\
.queue{border:1px solid #ccc;border-radius:6px;padding:.8em 1em;margin:0 0 1em;max-width:56em}\
.badge{padding:.1em .5em;border-radius:4px;color:#fff}.paused{background:#c92a2a}.running{background:#2b8a3e}\
.waiting{font-weight:600}.charts{display:flex;gap:1.5em;flex-wrap:wrap}figure{margin:0}\
figcaption{font-size:12px;color:#555}svg .bg{fill:#f8f9fa}\
svg polyline{fill:none;stroke-width:2}svg.depth polyline{stroke:#e8590c}svg.rate polyline{stroke:#1971c2}\
table{border-collapse:collapse;margin-top:.6em}td,th{border-bottom:1px solid #eee;padding:.2em .8em;text-align:left}\
.error{color:#c92a2a}button{cursor:pointer}\
.plot{display:flex}.axis{font-size:11px;color:#555}\
.axis.y{display:flex;flex-direction:column;justify-content:space-between;text-align:right;min-width:2.5em;padding-right:4px}\
.axis.x{display:flex;justify-content:space-between;margin-left:calc(2.5em + 4px)}";

const SCRIPT: &str = r#"
const store = window.sessionStorage;
const auth = () => store.getItem('anteroom-token') ? {Authorization: 'Bearer ' + store.getItem('anteroom-token')} : {};
const form = document.getElementById('token');
async function refresh() {
  try {
    const r = await fetch('/ui', {headers: auth()});
    if (r.status === 401) {
      form.hidden = false;
      document.getElementById('token-refused').hidden = !store.getItem('anteroom-token');
      return;
    }
    form.hidden = true;
    if (r.ok) document.getElementById('content').innerHTML = await r.text();
  } catch (e) { /* the proxy is restarting: try again next tick */ }
}
form.addEventListener('submit', e => {
  e.preventDefault();
  store.setItem('anteroom-token', form.token.value);
  refresh();
});
document.addEventListener('click', async e => {
  const b = e.target.closest('button[data-action]');
  if (!b) return;
  b.disabled = true;
  await fetch('/' + b.dataset.action + '?queue=' + encodeURIComponent(b.dataset.queue), {method: 'POST', headers: auth()});
  refresh();
});
refresh();
setInterval(refresh, 2000);
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_from_redis_is_escaped() {
        assert_eq!(
            escape("<script>alert('x')&\"</script>"),
            "&lt;script&gt;alert(&#39;x&#39;)&amp;&quot;&lt;/script&gt;"
        );
    }

    #[test]
    fn an_unhealthy_upstream_shows_since_when_and_why() {
        let heartbeat = |id: &str, unhealthy| anteroom_protocol::DispatcherHeartbeat {
            id: id.to_owned(),
            host: "app-1".to_owned(),
            pid: 1,
            label: String::new(),
            concurrency: 16,
            in_flight: 0,
            websockets: 0,
            paused: false,
            pause_id: None,
            started_at_ms: 0,
            unhealthy,
        };
        let dispatcher = |hb| anteroom_control::DispatcherStatus {
            heartbeat: hb,
            held: 0,
            last_seen_ms: 10_000,
        };
        let view = QueueView {
            status: Some(QueueStatus {
                queue: "web".to_owned(),
                checked_at_ms: 10_000,
                pause: None,
                maintenance: None,
                waiting: 3,
                expired: 1,
                expired_capped: false,
                oldest_wait_ms: Some(2_500),
                dead_letters: 0,
                dispatchers: vec![
                    dispatcher(heartbeat(
                        "down",
                        Some(anteroom_protocol::Unhealthy {
                            since_ms: 7_500,
                            reason: "status <503>".to_owned(),
                        }),
                    )),
                    dispatcher(heartbeat("up", None)),
                ],
                orphaned: Vec::new(),
                proxies: Vec::new(),
            }),
            ..QueueView::default()
        };
        let mut out = String::new();
        render_queue(&mut out, "web", &view, false);
        assert!(
            out.contains("unhealthy</span> for 2.5 s (status &lt;503&gt;)</td>"),
            "{out}"
        );
        assert!(out.contains("<td>healthy</td>"), "{out}");
        assert!(out.contains("(1 past their hold budget)"), "{out}");
        assert!(out.contains("no live proxy"), "{out}");
    }

    #[test]
    fn charts_rise_with_their_values() {
        let mut out = String::new();
        chart(&mut out, "t", "depth", &[0.0, 5.0, 10.0]);
        // The last point is at the top (y = 2), the first at the bottom.
        assert!(out.contains(",58.0 "), "{out}");
        assert!(out.contains("300.0,2.0\""), "{out}");
    }
}
