//! `anteroom conformance -- COMMAND...`: proves a dispatcher speaks the
//! protocol (docs/protocol.md) by driving it as a producer would.
//!
//! The kit starts COMMAND with `ANTEROOM_REDIS`, `ANTEROOM_QUEUE`,
//! `ANTEROOM_HEARTBEAT_TTL` (3s), `ANTEROOM_GRACE` (10s) and
//! `ANTEROOM_CONFORMANCE_LOG` (a file) in its environment; COMMAND must
//! serve the reference app of docs/clients.md ("The conformance kit") on
//! that queue. The kit pushes envelopes itself, reads the replies from a
//! reply list of its own, pauses and resumes the queue, and signals the
//! process; it prints one line per case and `N passed, M failed`, and
//! exits 1 on any failure.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anteroom_control::Queue;
use anteroom_control::queue;
use anteroom_protocol::{
    DeadLetter, DispatcherHeartbeat, EnvelopeVersion, HeaderList, HttpVersion, Reply,
    RequestEnvelope, now_ms,
};
use anteroom_redis::local::LocalRedis;
use anyhow::Context;
use bytes::Bytes;
use tokio::process::{Child, Command};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::cli::ConformanceArgs;

/// The heartbeat TTL the kit asks for: a killed dispatcher is dead this
/// soon.
const HEARTBEAT_TTL: Duration = Duration::from_secs(3);
/// How long a reply may take in the cases that expect one.
const REPLY_WAIT: Duration = Duration::from_secs(10);
/// How long the command may take to reap a dead dispatcher's list (the
/// Rust dispatcher reaps every 5 s).
const REAP_WAIT: Duration = Duration::from_secs(20);
/// The proxy id of the kit's reply list.
const KIT_ID: &str = "conformance-kit";

/// What came back for one request: a whole reply or an assembled stream.
#[derive(Debug, Default)]
struct Answer {
    status: u16,
    headers: HeaderList,
    body: Vec<u8>,
    streamed: bool,
    done: bool,
    aborted: Option<String>,
}

/// The kit's reply list, read in the background.
#[derive(Default)]
struct Replies {
    answers: Mutex<HashMap<String, Answer>>,
    arrived: Notify,
}

impl Replies {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Answer>> {
        self.answers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn deliver(&self, raw: Bytes) {
        let Ok(reply) = Reply::decode(raw) else {
            return;
        };
        let mut answers = self.lock();
        let answer = answers.entry(reply.id().to_owned()).or_default();
        match reply {
            Reply::Complete(r) => {
                answer.status = r.status;
                answer.headers = r.headers;
                answer.body = r.body.to_vec();
                answer.done = true;
            }
            Reply::Head(h) => {
                answer.status = h.status;
                answer.headers = h.headers;
                answer.streamed = true;
            }
            Reply::Chunk(c) => answer.body.extend_from_slice(&c.data),
            Reply::End(e) => {
                answer.aborted = e.aborted;
                answer.done = true;
            }
            _ => {}
        }
        drop(answers);
        self.arrived.notify_waiters();
    }

    /// The answer to `id`, once whole, within `wait`.
    async fn wait(&self, id: &str, wait: Duration) -> Option<Answer> {
        let until = tokio::time::Instant::now() + wait;
        loop {
            let arrived = self.arrived.notified();
            if self.lock().get(id).is_some_and(|a| a.done) {
                return self.lock().remove(id);
            }
            if tokio::time::timeout_at(until, arrived).await.is_err() {
                return None;
            }
        }
    }

    /// Whether anything at all came for `id`.
    fn any(&self, id: &str) -> bool {
        self.lock().contains_key(id)
    }
}

/// The kit's state: the queue, its reply list, the dispatcher under test.
struct Kit {
    queue: Queue,
    replies: Arc<Replies>,
    reply_to: String,
    command: Vec<String>,
    env: Vec<(String, String)>,
    log: PathBuf,
    dir: PathBuf,
    child: Option<Child>,
    starts: u32,
    /// libfaketime and the offset the next start runs the command with
    /// (`LD_PRELOAD`, `FAKETIME`), for the host-clock case.
    faked: Option<(PathBuf, &'static str)>,
}

/// One case's outcome: a detail when it passed, why when it failed.
type Outcome = Result<String, String>;

impl Kit {
    fn envelope(
        &self,
        method: &str,
        uri: &str,
        headers: HeaderList,
        body: &[u8],
    ) -> RequestEnvelope {
        let now = now_ms();
        RequestEnvelope {
            id: uuid::Uuid::new_v4().hyphenated().to_string(),
            method: method.to_owned(),
            uri: uri.to_owned(),
            version: HttpVersion::Http11,
            headers,
            body: Bytes::copy_from_slice(body),
            reply_to: self.reply_to.clone(),
            client_addr: Some("127.0.0.1:1".to_owned()),
            enqueued_at_ms: now,
            deadline_ms: now + 30_000,
            dedupe: false,
            stream: false,
            body_follows: false,
            websocket: false,
        }
    }

    async fn push(&self, envelope: &RequestEnvelope) -> anyhow::Result<()> {
        self.push_raw(&envelope.encode()).await
    }

    /// Queues `envelopes` in one `LPUSH`, the first taken first.
    async fn push_all(&self, envelopes: &[RequestEnvelope]) -> anyhow::Result<()> {
        let mut conn = self.queue.connection();
        let mut lpush = redis::cmd("LPUSH");
        lpush.arg(self.queue.keys().requests());
        for envelope in envelopes {
            lpush.arg(envelope.encode());
        }
        lpush
            .query_async::<()>(&mut conn)
            .await
            .context("LPUSH to the requests list")
    }

    async fn push_raw(&self, raw: &[u8]) -> anyhow::Result<()> {
        let mut conn = self.queue.connection();
        redis::cmd("LPUSH")
            .arg(self.queue.keys().requests())
            .arg(raw)
            .query_async::<()>(&mut conn)
            .await
            .context("LPUSH to the requests list")
    }

    /// Sends `envelope` and waits for its whole answer.
    async fn ask(&self, envelope: &RequestEnvelope) -> Result<Answer, String> {
        self.ask_raw(envelope, &envelope.encode()).await
    }

    /// [`ask`](Self::ask) with the bytes pushed given: `envelope` encoded,
    /// or altered.
    async fn ask_raw(&self, envelope: &RequestEnvelope, raw: &[u8]) -> Result<Answer, String> {
        self.push_raw(raw).await.map_err(|e| e.to_string())?;
        self.replies
            .wait(&envelope.id, REPLY_WAIT)
            .await
            .ok_or_else(|| {
                format!(
                    "no answer to {} {} within {REPLY_WAIT:?}",
                    envelope.method, envelope.uri
                )
            })
    }

    /// Starts the command and waits for its heartbeat.
    async fn start(&mut self, wait: Duration) -> Result<(), String> {
        self.starts += 1;
        let out = std::fs::File::create(self.dir.join(format!("dispatcher-{}.log", self.starts)))
            .map_err(|e| e.to_string())?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let mut command = Command::new(&self.command[0]);
        command
            .args(&self.command[1..])
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        if let Some((lib, offset)) = &self.faked {
            // In the command's own process (the `faketime` wrapper would
            // fork, and the kit signals and finds the command by its pid).
            let preload = match std::env::var_os("LD_PRELOAD") {
                Some(others) if !others.is_empty() => {
                    let mut all = lib.clone().into_os_string();
                    all.push(":");
                    all.push(others);
                    all
                }
                _ => lib.clone().into_os_string(),
            };
            command.env("LD_PRELOAD", preload).env("FAKETIME", offset);
        }
        command.stdout(out).stderr(err).kill_on_drop(true);
        let child = command
            .spawn()
            .map_err(|e| format!("cannot start {:?}: {e}", self.command[0]))?;
        let pid = child.id();
        self.child = Some(child);
        let log = self.dir.join(format!("dispatcher-{}.log", self.starts));
        let found = tokio::time::timeout(wait, async {
            loop {
                let beating = self.heartbeats().await.iter().any(|h| Some(h.pid) == pid);
                if beating {
                    return Ok(());
                }
                // A command that exited will not beat: say so now, not
                // after the whole wait.
                if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                    return Err(format!(
                        "the command exited ({status}) before its first heartbeat; the end of its output ({}):\n{}",
                        log.display(),
                        tail(&log, 10)
                    ));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        found.unwrap_or_else(|_| {
            Err(format!(
                "no heartbeat from the command within {wait:?} (its output: {})",
                self.dir.display()
            ))
        })
    }

    async fn heartbeats(&self) -> Vec<DispatcherHeartbeat> {
        self.queue
            .status()
            .await
            .map(|s| s.dispatchers.into_iter().map(|d| d.heartbeat).collect())
            .unwrap_or_default()
    }

    /// Requests held in processing lists now.
    async fn held(&self) -> u64 {
        self.queue
            .status()
            .await
            .map(|s| {
                s.dispatchers.iter().map(|d| d.held).sum::<u64>()
                    + s.orphaned.iter().map(|o| o.held).sum::<u64>()
            })
            .unwrap_or(0)
    }

    async fn until_held(&self, n: u64, wait: Duration) -> Result<(), String> {
        let until = tokio::time::Instant::now() + wait;
        while self.held().await != n {
            if tokio::time::Instant::now() >= until {
                return Err(format!(
                    "the dispatcher did not take {n} request(s) within {wait:?}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    fn touched(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .map(|t| t.lines().map(str::to_owned).collect())
            .unwrap_or_default()
    }

    /// After SIGTERM: the command (process `pid`) exits 0 within 15 s and
    /// leaves no heartbeat behind.
    async fn stopped_cleanly(&mut self, pid: Option<u32>) -> Result<(), String> {
        let mut child = self.child.take().ok_or("no process")?;
        let status = tokio::time::timeout(Duration::from_secs(15), child.wait())
            .await
            .map_err(|_| "did not exit within 15 s of SIGTERM".to_owned())?
            .map_err(|e| e.to_string())?;
        if !status.success() {
            return Err(format!("exited with {status} after SIGTERM"));
        }
        if self.heartbeats().await.iter().any(|h| Some(h.pid) == pid) {
            return Err("its heartbeat was left behind".into());
        }
        Ok(())
    }

    fn signal(&self, signal: &str) -> Result<(), String> {
        let pid = self
            .child
            .as_ref()
            .and_then(Child::id)
            .ok_or("the command is not running")?;
        let status = std::process::Command::new("kill")
            .args([format!("-{signal}"), pid.to_string()])
            .status()
            .map_err(|e| e.to_string())?;
        status
            .success()
            .then_some(())
            .ok_or_else(|| format!("kill -{signal} failed"))
    }
}

fn header<'a>(answer: &'a Answer, name: &str) -> Vec<&'a [u8]> {
    answer
        .headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_ref())
        .collect()
}

async fn binary_bodies(kit: &mut Kit) -> Outcome {
    let body: Vec<u8> = (0..4).flat_map(|_| 0..=255u8).collect();
    let answer = kit
        .ask(&kit.envelope("POST", "/echo", Vec::new(), &body))
        .await?;
    if answer.status != 200 || answer.body != body {
        return Err(format!(
            "status {}, {} bytes back of {}",
            answer.status,
            answer.body.len(),
            body.len()
        ));
    }
    Ok(format!("{} bytes, every byte value", body.len()))
}

async fn header_values(kit: &mut Kit) -> Outcome {
    let sent: HeaderList = vec![
        ("x-test-repeat".into(), Bytes::from_static(b"one")),
        ("x-test-repeat".into(), Bytes::from_static(b"two")),
        ("x-test-latin".into(), Bytes::from_static(b"caf\xe9")),
    ];
    let answer = kit
        .ask(&kit.envelope("GET", "/echo?x=1", sent, b""))
        .await?;
    let repeat = header(&answer, "x-test-repeat");
    let latin = header(&answer, "x-test-latin");
    if repeat != [&b"one"[..], b"two"] || latin != [&b"caf\xe9"[..]] {
        return Err(format!("x-test-repeat {repeat:?}, x-test-latin {latin:?}"));
    }
    let method = header(&answer, "x-method");
    let target = header(&answer, "x-target");
    if method != [&b"GET"[..]] || target != [&b"/echo?x=1"[..]] {
        return Err(format!("x-method {method:?}, x-target {target:?}"));
    }
    Ok("repeated and ISO-8859-1 values, method and target".into())
}

/// The same request in each envelope version (docs/protocol.md, "Request
/// envelopes, version 2"): a dispatcher must read version 1 from proxies
/// of earlier releases, or run with `--envelope-version 1`, as well as
/// version 2.
async fn both_versions(kit: &mut Kit) -> Outcome {
    let body: Vec<u8> = (0..=255u8).rev().collect();
    for version in [EnvelopeVersion::V1, EnvelopeVersion::V2] {
        let sent: HeaderList = vec![("x-test-latin".into(), Bytes::from_static(b"caf\xe9"))];
        let envelope = kit.envelope("PUT", "/echo?v", sent, &body);
        kit.push_raw(&envelope.encode_as(version))
            .await
            .map_err(|e| e.to_string())?;
        let answer = kit
            .replies
            .wait(&envelope.id, REPLY_WAIT)
            .await
            .ok_or_else(|| {
                format!(
                    "version {}: no answer within {REPLY_WAIT:?}",
                    version.byte()
                )
            })?;
        let latin = header(&answer, "x-test-latin");
        let method = header(&answer, "x-method");
        if answer.status != 200
            || answer.body != body
            || latin != [&b"caf\xe9"[..]]
            || method != [&b"PUT"[..]]
        {
            return Err(format!(
                "version {}: status {}, {} bytes back of {}, x-test-latin {latin:?}, x-method {method:?}",
                version.byte(),
                answer.status,
                answer.body.len(),
                body.len()
            ));
        }
    }
    Ok("version 1 (fields by name) and version 2 (an array), each echoed".into())
}

async fn status_passed(kit: &mut Kit) -> Outcome {
    let answer = kit
        .ask(&kit.envelope("GET", "/status/418", Vec::new(), b""))
        .await?;
    if answer.status != 418 || header(&answer, "x-status") != [&b"418"[..]] {
        return Err(format!(
            "status {}, x-status {:?}",
            answer.status,
            header(&answer, "x-status")
        ));
    }
    Ok("418 and its header".into())
}

async fn concurrent(kit: &mut Kit) -> Outcome {
    let envelopes: Vec<RequestEnvelope> = (0..20)
        .map(|i| {
            kit.envelope(
                "POST",
                "/echo",
                Vec::new(),
                format!("request {i}").as_bytes(),
            )
        })
        .collect();
    for envelope in &envelopes {
        kit.push(envelope).await.map_err(|e| e.to_string())?;
    }
    for envelope in &envelopes {
        let answer = kit
            .replies
            .wait(&envelope.id, REPLY_WAIT)
            .await
            .ok_or("not every request was answered")?;
        if answer.body != envelope.body {
            return Err(format!(
                "{:?} got {:?}",
                envelope.body,
                String::from_utf8_lossy(&answer.body)
            ));
        }
    }
    Ok("20 at once, each its own answer".into())
}

async fn streamed(kit: &mut Kit) -> Outcome {
    let mut envelope = kit.envelope("GET", "/stream?n=3&ms=100", Vec::new(), b"");
    envelope.stream = true;
    let answer = kit.ask(&envelope).await?;
    let want = b"chunk 0\nchunk 1\nchunk 2\n";
    if answer.status != 200 || answer.body != want || answer.aborted.is_some() {
        return Err(format!(
            "status {}, body {:?}, aborted {:?}",
            answer.status,
            String::from_utf8_lossy(&answer.body),
            answer.aborted
        ));
    }
    Ok(if answer.streamed {
        "streamed"
    } else {
        "whole (the dispatcher does not stream)"
    }
    .into())
}

async fn expired(kit: &mut Kit) -> Outcome {
    let mut envelope = kit.envelope("GET", "/touch/expired", Vec::new(), b"");
    envelope.enqueued_at_ms -= 60_000;
    envelope.deadline_ms = now_ms() - 1;
    kit.push(&envelope).await.map_err(|e| e.to_string())?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    if kit.touched().iter().any(|t| t == "expired") {
        return Err("the app ran a request past its deadline".into());
    }
    if kit.replies.any(&envelope.id) {
        return Err("a reply came for a request past its deadline".into());
    }
    let waiting = kit.queue.status().await.map(|s| s.waiting).unwrap_or(1);
    if waiting != 0 || kit.held().await != 0 {
        return Err("the expired request was not removed".into());
    }
    Ok("not run, no reply, removed".into())
}

/// A dead dispatcher's processing list (registered, no heartbeat) holding
/// a GET and a POST: the command reaps it by itself (docs/protocol.md,
/// "What a dispatcher does", step 8), so the GET runs and is answered and
/// the POST is answered 502 without running.
async fn reaps_the_dead(kit: &mut Kit) -> Outcome {
    let dead = format!("dead-{}", uuid::Uuid::new_v4().simple());
    let safe = kit.envelope("GET", "/touch/reaped-safe", Vec::new(), b"");
    let unsafe_ = kit.envelope("POST", "/touch/reaped-unsafe", Vec::new(), b"");
    let keys = kit.queue.keys();
    let mut conn = kit.queue.connection();
    redis::pipe()
        .cmd("LPUSH")
        .arg(keys.processing(&dead))
        .arg(&safe.encode()[..])
        .arg(&unsafe_.encode()[..])
        .ignore()
        .cmd("ZADD")
        .arg(keys.dispatchers())
        .arg(now_ms())
        .arg(&dead)
        .ignore()
        .query_async::<()>(&mut conn)
        .await
        .map_err(|e| e.to_string())?;
    let mut outcome = reaped(kit, &safe.id, &unsafe_.id).await;
    if outcome.is_ok() {
        // Reaped means moved and settled: nothing left in the dead list,
        // its registry entry gone, nothing held by the command.
        let left: (u64, Option<f64>) = redis::pipe()
            .cmd("LLEN")
            .arg(keys.processing(&dead))
            .cmd("ZSCORE")
            .arg(keys.dispatchers())
            .arg(&dead)
            .query_async(&mut conn)
            .await
            .map_err(|e| e.to_string())?;
        if left != (0, None) {
            outcome = Err(format!(
                "answered, but the dead list still holds {} and its registry entry is {}",
                left.0,
                if left.1.is_some() {
                    "still there"
                } else {
                    "gone"
                }
            ));
        } else if kit.held().await != 0 {
            outcome = Err("answered, but the reaped requests stay in the command's list".into());
        }
    }
    // Whatever happened, no dead list is left for the cases after this one.
    let _ = redis::pipe()
        .cmd("DEL")
        .arg(keys.processing(&dead))
        .ignore()
        .cmd("ZREM")
        .arg(keys.dispatchers())
        .arg(&dead)
        .ignore()
        .query_async::<()>(&mut conn)
        .await;
    outcome
}

/// The answers to the GET (`safe`) and POST (`unsafe_`) of
/// [`reaps_the_dead`], and what the app ran.
async fn reaped(kit: &Kit, safe: &str, unsafe_: &str) -> Outcome {
    let post = kit
        .replies
        .wait(unsafe_, REAP_WAIT)
        .await
        .ok_or(format!("the POST in a dead dispatcher's list got no answer within {REAP_WAIT:?}: the command does not reap"))?;
    let get = kit
        .replies
        .wait(safe, REPLY_WAIT)
        .await
        .ok_or("the GET in a dead dispatcher's list was not run again")?;
    if post.status != 502 || get.status != 200 {
        return Err(format!(
            "the POST got {} (502 expected), the GET {} (200 expected)",
            post.status, get.status
        ));
    }
    let runs = |name: &str| kit.touched().iter().filter(|t| *t == name).count();
    if runs("reaped-safe") != 1 || runs("reaped-unsafe") != 0 {
        return Err(format!(
            "ran the GET {} and the POST {} times (1 and 0 expected)",
            runs("reaped-safe"),
            runs("reaped-unsafe")
        ));
    }
    Ok("GET run again, POST answered 502".into())
}

async fn garbage(kit: &mut Kit) -> Outcome {
    let raw = b"\x01Qnot an envelope at all";
    kit.push_raw(raw).await.map_err(|e| e.to_string())?;
    set_aside(kit, raw).await
}

/// Requests otherwise well formed whose `enqueued_at_ms` or `flags` is
/// 2^53 (above the range every dispatcher reads alike, docs/protocol.md)
/// or whose `enqueued_at_ms` is -1, in either version: each is set aside,
/// none runs; one whose `enqueued_at_ms` is 2^53 - 1 runs.
async fn integers_out_of_range(kit: &mut Kit) -> Outcome {
    let over = serde_json::Value::from(1u64 << 53);
    let minus_one = serde_json::Value::from(-1);
    let cases = [
        (
            "version 2, enqueued_at_ms 2^53",
            EnvelopeVersion::V2,
            "7",
            over.clone(),
        ),
        (
            "version 2, flags 2^53",
            EnvelopeVersion::V2,
            "9",
            over.clone(),
        ),
        (
            "version 1, enqueued_at_ms 2^53",
            EnvelopeVersion::V1,
            "enqueued_at_ms",
            over,
        ),
        (
            "version 1, enqueued_at_ms -1",
            EnvelopeVersion::V1,
            "enqueued_at_ms",
            minus_one,
        ),
    ];
    let mut reasons = Vec::new();
    for (i, (what, version, field, value)) in cases.into_iter().enumerate() {
        let envelope = kit.envelope("GET", &format!("/touch/out-of-range-{i}"), Vec::new(), b"");
        let raw = with_meta_field(&envelope.encode_as(version), field, value)
            .map_err(|e| format!("{what}: {e}"))?;
        kit.push_raw(&raw).await.map_err(|e| e.to_string())?;
        let reason = set_aside(kit, &raw)
            .await
            .map_err(|why| format!("{what}: {why}"))?;
        if kit
            .touched()
            .iter()
            .any(|t| *t == format!("out-of-range-{i}"))
        {
            return Err(format!("{what}: the app ran it"));
        }
        if kit.replies.any(&envelope.id) {
            return Err(format!("{what}: a reply came for it"));
        }
        reasons.push(format!("{what}: {reason}"));
    }
    // The largest in range is read: a dispatcher with a narrower limit
    // fails here.
    let envelope = kit.envelope("GET", "/touch/in-range", Vec::new(), b"");
    let max = serde_json::Value::from((1u64 << 53) - 1);
    let raw = with_meta_field(&envelope.encode_as(EnvelopeVersion::V2), "7", max)?;
    let answer = kit
        .ask_raw(&envelope, &raw)
        .await
        .map_err(|why| format!("enqueued_at_ms 2^53 - 1: {why}"))?;
    if answer.status != 200 {
        return Err(format!(
            "enqueued_at_ms 2^53 - 1: answered {}, not 200",
            answer.status
        ));
    }
    reasons.push("enqueued_at_ms 2^53 - 1: run and answered 200".to_owned());
    Ok(reasons.join("; "))
}

/// `raw`, a request envelope without a body (`[version][kind][meta_len u32
/// BE][meta]`), with its metadata's `field` (an object's key, or an
/// array's index) set to `value`.
fn with_meta_field(raw: &[u8], field: &str, value: serde_json::Value) -> Result<Vec<u8>, String> {
    let mut meta: serde_json::Value =
        serde_json::from_slice(raw.get(6..).unwrap_or_default()).map_err(|e| e.to_string())?;
    let slot = meta
        .pointer_mut(&format!("/{field}"))
        .ok_or_else(|| format!("no metadata field {field}"))?;
    *slot = value;
    let meta = serde_json::to_vec(&meta).map_err(|e| e.to_string())?;
    let mut framed = raw.get(..2).unwrap_or_default().to_vec();
    framed.extend_from_slice(&u32::try_from(meta.len()).unwrap_or(u32::MAX).to_be_bytes());
    framed.extend_from_slice(&meta);
    Ok(framed)
}

/// Waits (5 s) until `raw` is in the dead-letter list and out of the
/// processing list; the reason it was set aside.
async fn set_aside(kit: &Kit, raw: &[u8]) -> Outcome {
    let dead_key = kit.queue.keys().dead();
    for _ in 0..100 {
        let mut conn = kit.queue.connection();
        let dead: Vec<Vec<u8>> = redis::cmd("LRANGE")
            .arg(&dead_key)
            .arg(0)
            .arg(-1)
            .query_async(&mut conn)
            .await
            .map_err(|e| e.to_string())?;
        if let Some(letter) = dead
            .into_iter()
            .filter_map(|d| DeadLetter::decode(Bytes::from(d)).ok())
            .find(|d| d.original.as_ref() == raw)
        {
            if kit.held().await != 0 {
                return Err("dead-lettered but still in the processing list".into());
            }
            return Ok(format!("reason: {}", letter.reason));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err("not in the dead-letter list within 5 s".into())
}

/// Pauses the queue (a 60 s lease) and waits at most 10 s for quiescence
/// (the pause acknowledged, every processing list empty); resumes and
/// says why when it does not come.
async fn paused_quiet(kit: &Kit) -> Result<(), String> {
    kit.queue
        .pause("conformance kit", Some(Duration::from_secs(60)), false)
        .await
        .map_err(|e| e.to_string())?;
    let quiet = kit
        .queue
        .wait_quiescent(Duration::from_secs(10), |_| {})
        .await;
    if let Err(err) = quiet {
        let _ = kit.queue.resume().await;
        return Err(err.to_string());
    }
    Ok(())
}

async fn pause_and_resume(kit: &mut Kit) -> Outcome {
    paused_quiet(kit)
        .await
        .map_err(|err| format!("the pause was not acknowledged: {err}"))?;
    let envelope = kit.envelope("POST", "/echo", Vec::new(), b"after the pause");
    kit.push(&envelope).await.map_err(|e| e.to_string())?;
    let early = kit.replies.wait(&envelope.id, Duration::from_secs(1)).await;
    kit.queue.resume().await.map_err(|e| e.to_string())?;
    if early.is_some() {
        return Err("a request ran while the queue was paused".into());
    }
    let answer = kit
        .replies
        .wait(&envelope.id, REPLY_WAIT)
        .await
        .ok_or("no answer after resume")?;
    if answer.body != b"after the pause" {
        return Err("the wrong answer after resume".into());
    }
    Ok("acknowledged in its heartbeat, nothing taken while paused, served after resume".into())
}

/// A pause that lands while requests flow (a backlog of slow GETs being
/// taken as fast as the command completes them, which is when a dispatcher
/// that takes the next request with a completion does so): the flow stops
/// with requests still queued, and once the acknowledgement is in (every
/// processing list empty) nothing more is taken or run for a second; after
/// resume every request is answered, each run once. The backlog, queued in
/// one `LPUSH`, is 40 per place the heartbeats give (`concurrency`), from
/// 100 to 4,000, so the pause lands with requests left whatever the
/// command's concurrency.
async fn pause_under_load(kit: &mut Kit) -> Outcome {
    /// How many run before the pause is set.
    const FIRST: usize = 8;
    let places: usize = kit.heartbeats().await.iter().map(|b| b.concurrency).sum();
    let backlog = places.saturating_mul(40).clamp(100, 4_000);
    let envelopes: Vec<RequestEnvelope> = (0..backlog)
        .map(|i| kit.envelope("GET", &format!("/touch/flow-{i}?ms=50"), Vec::new(), b""))
        .collect();
    kit.push_all(&envelopes).await.map_err(|e| e.to_string())?;
    let runs = |kit: &Kit| {
        kit.touched()
            .iter()
            .filter(|t| t.starts_with("flow-"))
            .count()
    };
    let until = tokio::time::Instant::now() + REPLY_WAIT;
    while runs(kit) < FIRST {
        if tokio::time::Instant::now() >= until {
            return Err("the backlog did not start within 10 s".into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    if let Err(err) = paused_quiet(kit).await {
        return Err(format!(
            "the pause was not acknowledged with every request done within 10 s \
             ({} of {backlog} run): {err}",
            runs(kit)
        ));
    }
    let (ran, waiting) = (runs(kit), kit.queue.status().await.map(|s| s.waiting));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (ran_later, waiting_later) = (runs(kit), kit.queue.status().await.ok().map(|s| s.waiting));
    let held = kit.held().await;
    kit.queue.resume().await.map_err(|e| e.to_string())?;
    let waiting = waiting.map_err(|e| e.to_string())?;
    if ran_later != ran || waiting_later != Some(waiting) || held != 0 {
        return Err(format!(
            "after the acknowledgement {} more ran, the queue went from {waiting} to {waiting_later:?} \
             waiting, {held} held",
            ran_later.saturating_sub(ran)
        ));
    }
    if waiting == 0 {
        return Err(format!(
            "all {backlog} were taken although the pause was set after {FIRST} had run: it did not stop the flow"
        ));
    }
    for envelope in &envelopes {
        let answer = kit
            .replies
            .wait(&envelope.id, REPLY_WAIT)
            .await
            .ok_or_else(|| format!("{} was not answered after resume", envelope.uri))?;
        if answer.status != 200 {
            return Err(format!("{} answered {}", envelope.uri, answer.status));
        }
    }
    let twice = runs(kit).saturating_sub(backlog);
    if twice != 0 {
        return Err(format!("{twice} runs more than requests"));
    }
    Ok(format!(
        "{ran} run before the acknowledgement, {waiting} held back for 1 s, all {backlog} answered once after resume"
    ))
}

async fn heartbeat_present(kit: &mut Kit) -> Outcome {
    let beats = kit.heartbeats().await;
    let beat = beats.first().ok_or("no heartbeat")?;
    if beat.concurrency == 0 {
        return Err("a heartbeat with concurrency 0".into());
    }
    Ok(format!(
        "pid {}, concurrency {}",
        beat.pid, beat.concurrency
    ))
}

/// Redis over its `maxmemory` (`CONFIG SET maxmemory 1` under
/// `noeviction`: every command that may grow memory is refused, `OOM`)
/// for longer than the heartbeat TTL: a request queued before is still
/// taken and answered, and the command's heartbeat outlives its TTL
/// (docs/protocol.md, steps 1, 5 and 6; docs/operations.md, "Redis
/// settings"). A dispatcher that only retries its writes answers nothing
/// until memory frees, and looks dead meanwhile. Needs `CONFIG SET` and
/// `noeviction` (the kit's own Redis has both); `maxmemory` is put back
/// whatever the case found (a failure to put it back says so).
async fn full_redis(kit: &mut Kit) -> Outcome {
    let conn = kit.queue.connection();
    let config = |name: &'static str| {
        let mut conn = conn.clone();
        async move {
            redis::cmd("CONFIG")
                .arg("GET")
                .arg(name)
                .query_async::<Vec<String>>(&mut conn)
                .await
                .map_err(|e| format!("CONFIG GET {name}: {e}"))?
                .pop()
                .ok_or_else(|| format!("CONFIG GET {name}: no value"))
        }
    };
    let policy = config("maxmemory-policy").await?;
    if policy != "noeviction" {
        return Err(format!(
            "needs maxmemory-policy noeviction, this Redis has {policy} (run the kit without --redis)"
        ));
    }
    let limit = config("maxmemory").await?;
    let set = |value: String| {
        let mut conn = conn.clone();
        async move {
            redis::cmd("CONFIG")
                .arg("SET")
                .arg("maxmemory")
                .arg(&value)
                .query_async::<()>(&mut conn)
                .await
                .map_err(|e| format!("CONFIG SET maxmemory {value}: {e}"))
        }
    };
    // Queued while paused, so it is taken only once Redis is full.
    kit.queue
        .pause("conformance kit", Some(Duration::from_secs(60)), false)
        .await
        .map_err(|e| e.to_string())?;
    let quiet = kit.queue.wait_quiescent(REPLY_WAIT, |_| {}).await;
    if let Err(err) = quiet {
        let _ = kit.queue.resume().await;
        return Err(format!("the pause was not acknowledged: {err}"));
    }
    let envelope = kit.envelope("GET", "/touch/full", Vec::new(), b"");
    let pushed = kit.push(&envelope).await.map_err(|e| e.to_string());
    let full = match pushed {
        Ok(()) => set("1".to_owned()).await,
        Err(err) => Err(err),
    };
    let since = tokio::time::Instant::now();
    // DEL and PUBLISH, which a full Redis still takes.
    let resumed = kit.queue.resume().await.map_err(|e| e.to_string());
    let outcome = async {
        full?;
        resumed?;
        let answer =
            kit.replies.wait(&envelope.id, REPLY_WAIT).await.ok_or(
                "a request queued before Redis filled was not answered while it stayed full",
            )?;
        if answer.status != 200 {
            return Err(format!("got {} while Redis was full", answer.status));
        }
        let answered = since.elapsed();
        // Full past the heartbeat TTL: still registered only if the
        // heartbeat is kept some way Redis allows (PEXPIRE).
        tokio::time::sleep_until(since + HEARTBEAT_TTL + Duration::from_millis(750)).await;
        let pid = kit.child.as_ref().and_then(Child::id);
        if !kit.heartbeats().await.iter().any(|h| Some(h.pid) == pid) {
            return Err(format!(
                "its heartbeat expired while Redis was full ({HEARTBEAT_TTL:?} TTL)"
            ));
        }
        Ok(format!(
            "answered {answered:.1?} into the refusal; heartbeat kept past its TTL"
        ))
    }
    .await;
    set(limit.clone()).await.map_err(|e| {
        format!("{e}: this Redis still refuses writes; run CONFIG SET maxmemory {limit} on it")
    })?;
    outcome
}

async fn graceful_stop(kit: &mut Kit) -> Outcome {
    let envelope = kit.envelope("GET", "/touch/graceful?ms=1500", Vec::new(), b"");
    kit.push(&envelope).await.map_err(|e| e.to_string())?;
    kit.until_held(1, REPLY_WAIT).await?;
    let pid = kit.child.as_ref().and_then(Child::id);
    kit.signal("TERM")?;
    let answer = kit
        .replies
        .wait(&envelope.id, REPLY_WAIT)
        .await
        .ok_or("the in-flight request got no answer")?;
    if answer.status != 200 {
        return Err(format!("the in-flight request got {}", answer.status));
    }
    kit.stopped_cleanly(pid).await?;
    Ok("in-flight request answered, exit 0, heartbeat removed".into())
}

async fn killed_and_reaped(kit: &mut Kit) -> Outcome {
    kit.start(Duration::from_secs(30)).await?;
    let safe = kit.envelope("GET", "/touch/safe?ms=4000", Vec::new(), b"");
    let unsafe_ = kit.envelope("POST", "/touch/unsafe?ms=4000", Vec::new(), b"");
    kit.push(&safe).await.map_err(|e| e.to_string())?;
    kit.push(&unsafe_).await.map_err(|e| e.to_string())?;
    kit.until_held(2, REPLY_WAIT).await?;
    // Both running (the app has touched both) before the kill.
    let until = tokio::time::Instant::now() + REPLY_WAIT;
    while !(kit.touched().contains(&"safe".to_owned())
        && kit.touched().contains(&"unsafe".to_owned()))
    {
        if tokio::time::Instant::now() >= until {
            return Err("the app did not start both requests".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    kit.signal("KILL")?;
    if let Some(mut child) = kit.child.take() {
        let _ = child.wait().await;
    }
    // Dead once its heartbeat expires; then reaped.
    tokio::time::sleep(HEARTBEAT_TTL + Duration::from_millis(500)).await;
    let report = kit
        .queue
        .reap_once(Duration::from_secs(60))
        .await
        .map_err(|e| e.to_string())?;
    kit.start(Duration::from_secs(30)).await?;
    let unsafe_answer = kit
        .replies
        .wait(&unsafe_.id, REPLY_WAIT)
        .await
        .ok_or("the unsafe request got no answer")?;
    let safe_answer = kit
        .replies
        .wait(&safe.id, REPLY_WAIT)
        .await
        .ok_or("the safe request got no answer")?;
    if unsafe_answer.status != 502 {
        return Err(format!(
            "the unsafe request got {}, not 502",
            unsafe_answer.status
        ));
    }
    if safe_answer.status != 200 {
        return Err(format!("the safe request got {}", safe_answer.status));
    }
    let runs = |name: &str| kit.touched().iter().filter(|t| *t == name).count();
    if runs("safe") != 2 || runs("unsafe") != 1 {
        return Err(format!(
            "ran safe {} and unsafe {} times",
            runs("safe"),
            runs("unsafe")
        ));
    }
    Ok(format!(
        "{} re-queued and run again, {} answered 502",
        report.requeued, report.answered
    ))
}

/// Where libfaketime usually lies: Debian's and Ubuntu's multiarch
/// directories, then the prefixes of a build from source.
const FAKETIME_LIBS: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
    "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
    "/usr/lib/faketime/libfaketime.so.1",
    "/usr/local/lib/faketime/libfaketime.so.1",
];

/// libfaketime: the one given, or the first of [`FAKETIME_LIBS`] present.
fn faketime_lib(given: Option<&PathBuf>) -> Result<PathBuf, String> {
    if let Some(path) = given {
        return if path.is_file() {
            Ok(path.clone())
        } else {
            Err(format!("--faketime-lib {}: no such file", path.display()))
        };
    }
    FAKETIME_LIBS
        .iter()
        .map(PathBuf::from)
        .find(|path| path.is_file())
        .ok_or_else(|| {
            "needs libfaketime (Debian and Ubuntu: apt-get install faketime), or its path in \
             --faketime-lib"
                .to_owned()
        })
}

/// Deadlines are read by the queue's clock, Redis's (docs/protocol.md,
/// "Time"), not the host's: restarted with its host clock 60 s ahead, then
/// 60 s behind (libfaketime), the command still runs a request with 30 s
/// left, and still does not run one whose deadline has passed. A
/// dispatcher that reads its host's clock drops the first when ahead and
/// runs the second when behind. Leaves the command running (60 s behind).
async fn host_clock_off(kit: &mut Kit, lib: PathBuf) -> Outcome {
    for (offset, name) in [("+60s", "ahead"), ("-60s", "behind")] {
        let pid = kit.child.as_ref().and_then(Child::id);
        kit.signal("TERM")?;
        kit.stopped_cleanly(pid).await?;
        kit.faked = Some((lib.clone(), offset));
        let started = kit.start(Duration::from_secs(30)).await;
        kit.faked = None;
        started.map_err(|e| format!("with the host clock {offset}: {e}"))?;
        let mut expired = kit.envelope(
            "GET",
            &format!("/touch/clock-{name}-expired"),
            Vec::new(),
            b"",
        );
        expired.deadline_ms = now_ms() - 1;
        let fresh = kit.envelope(
            "GET",
            &format!("/touch/clock-{name}-fresh"),
            Vec::new(),
            b"",
        );
        kit.push(&expired).await.map_err(|e| e.to_string())?;
        let answer = kit.ask(&fresh).await.map_err(|e| {
            format!("host clock {name} by 60 s: a request with 30 s left was not run ({e})")
        })?;
        if answer.status != 200 {
            return Err(format!("host clock {name} by 60 s: got {}", answer.status));
        }
        kit.until_held(0, REPLY_WAIT).await?;
        if kit.touched().contains(&format!("clock-{name}-expired")) || kit.replies.any(&expired.id)
        {
            return Err(format!(
                "host clock {name} by 60 s: a request past its deadline (by Redis's clock) was run"
            ));
        }
    }
    Ok("60 s ahead and behind: fresh run, expired not".into())
}

/// Runs the kit; exit status 0 when every case passed.
pub(crate) async fn run(args: ConformanceArgs) -> anyhow::Result<ExitCode> {
    let (redis_url, _private) = match &args.redis {
        Some(url) => (url.clone(), None),
        None => {
            let redis = tokio::task::spawn_blocking(LocalRedis::start)
                .await
                .context("starting redis-server")??;
            (redis.url(), Some(redis))
        }
    };
    let dir = std::env::temp_dir().join(format!("anteroom-conformance-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let log = dir.join("touched");
    let queue = Queue::connect(&redis_url, &args.queue, Duration::from_secs(5)).await?;
    let (target, _) = anteroom_redis::connect(&redis_url, Duration::from_secs(5)).await?;
    let reply_to = queue.keys().replies(KIT_ID);
    let replies = Arc::new(Replies::default());
    let stop = CancellationToken::new();
    let reader = {
        let (replies, stop, reply_to) = (Arc::clone(&replies), stop.clone(), reply_to.clone());
        tokio::spawn(async move {
            let deliver = |raw| replies.deliver(raw);
            queue::follow_list(
                &target,
                &reply_to,
                Duration::from_secs(5),
                &stop,
                "conformance reader",
                deliver,
            )
            .await;
        })
    };
    let env = vec![
        ("ANTEROOM_REDIS".to_owned(), redis_url.clone()),
        ("ANTEROOM_QUEUE".to_owned(), args.queue.clone()),
        (
            "ANTEROOM_HEARTBEAT_TTL".to_owned(),
            humantime::format_duration(HEARTBEAT_TTL).to_string(),
        ),
        ("ANTEROOM_GRACE".to_owned(), "10s".to_owned()),
        (
            "ANTEROOM_CONFORMANCE_LOG".to_owned(),
            log.display().to_string(),
        ),
    ];
    let mut kit = Kit {
        queue,
        replies,
        reply_to,
        command: args.command.clone(),
        env,
        log,
        dir: dir.clone(),
        child: None,
        starts: 0,
        faked: None,
    };
    println!(
        "conformance: {} on queue {:?}",
        args.command.join(" "),
        args.queue
    );
    let (mut passed, mut failed, mut skipped) = (0, 0, 0);
    let mut report = |name: &str, outcome: Outcome| match outcome {
        Ok(detail) => {
            passed += 1;
            println!("  ok    {name} ({detail})");
        }
        Err(why) => {
            failed += 1;
            println!("  FAIL  {name}: {why}");
        }
    };
    match kit.start(args.start_timeout).await {
        Err(why) => report("starts and beats", Err(why)),
        Ok(()) => {
            report("heartbeat present", heartbeat_present(&mut kit).await);
            report("binary bodies byte-exact", binary_bodies(&mut kit).await);
            report(
                "repeated and Latin-1 header values",
                header_values(&mut kit).await,
            );
            report(
                "both request envelope versions read",
                both_versions(&mut kit).await,
            );
            report(
                "status and headers passed through",
                status_passed(&mut kit).await,
            );
            report(
                "concurrent requests not crossed",
                concurrent(&mut kit).await,
            );
            report("streamed response", streamed(&mut kit).await);
            if args.redis.is_none() || args.refuse_writes {
                report(
                    "taken and answered while Redis is over its maxmemory",
                    full_redis(&mut kit).await,
                );
            } else {
                skipped += 1;
                println!(
                    "  skip  taken and answered while Redis is over its maxmemory: it would make the \
                     --redis server refuse writes for 4 s; pass --refuse-writes for a Redis of the kit's alone"
                );
            }
            report("expired deadline never run", expired(&mut kit).await);
            report("garbage envelope dead-lettered", garbage(&mut kit).await);
            report(
                "integers out of range dead-lettered, not run",
                integers_out_of_range(&mut kit).await,
            );
            report(
                "reaps a dead dispatcher's requests",
                reaps_the_dead(&mut kit).await,
            );
            report(
                "pause acknowledged and resume honoured",
                pause_and_resume(&mut kit).await,
            );
            report(
                "nothing taken after a pause lands under load",
                pause_under_load(&mut kit).await,
            );
            report(
                "graceful SIGTERM finishes in-flight work",
                graceful_stop(&mut kit).await,
            );
            report(
                "SIGKILL mid-request, then reaped",
                killed_and_reaped(&mut kit).await,
            );
            match faketime_lib(args.faketime_lib.as_ref()) {
                Ok(lib) => report(
                    "deadlines by Redis's clock, host clock off",
                    host_clock_off(&mut kit, lib).await,
                ),
                Err(why) => {
                    skipped += 1;
                    println!("  skip  deadlines by Redis's clock, host clock off: {why}");
                }
            }
            report(
                "clean stop removes the heartbeat",
                clean_stop(&mut kit).await,
            );
        }
    }
    if let Some(mut child) = kit.child.take() {
        let _ = child.kill().await;
    }
    stop.cancel();
    let _ = reader.await;
    if skipped > 0 {
        println!("{passed} passed, {failed} failed, {skipped} skipped");
    } else {
        println!("{passed} passed, {failed} failed");
    }
    if failed == 0 {
        let _ = std::fs::remove_dir_all(&dir);
        Ok(ExitCode::SUCCESS)
    } else {
        println!("(the command's output: {})", dir.display());
        Ok(ExitCode::from(1))
    }
}

async fn clean_stop(kit: &mut Kit) -> Outcome {
    let pid = kit.child.as_ref().and_then(Child::id);
    kit.signal("TERM")?;
    kit.stopped_cleanly(pid).await?;
    Ok("exit 0, heartbeat removed".into())
}

/// The last `lines` lines of the file at `path`, indented (empty when it
/// cannot be read).
fn tail(path: &std::path::Path, lines: usize) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..]
        .iter()
        .map(|line| format!("        {line}"))
        .collect::<Vec<_>>()
        .join("\n")
}
