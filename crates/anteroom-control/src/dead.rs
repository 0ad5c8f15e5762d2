//! The dead-letter list, `anteroom:{q}:dead`, for operators: read it,
//! put a letter's request back in the queue, remove letters.
//!
//! A dispatcher (or a reaper) sets a request aside *before* running it,
//! when it cannot or must not run it (it does not decode, its `reply_to`
//! is no reply list of the queue, its deadline is impossibly far ahead,
//! it is no valid HTTP request): every dead letter is a request that never
//! ran. Whether someone still waits for its answer is another matter, which
//! [`LetterView::client`] tells.
//!
//! Letters are read whole (their bodies included), at most
//! [`DEAD_READ_LIMIT`] per call, and removed one `LREM` each: an operator's
//! tool for a list that should stay short, not a bulk pipeline.

use anteroom_protocol::{DeadLetter, EnvelopeVersion, RequestEnvelope, now_ms};
use bytes::Bytes;

use crate::{ControlError, Queue};

/// Most letters one call reads ([`Queue::dead_letters`]).
pub const DEAD_READ_LIMIT: usize = 10_000;

/// Letters read per `LRANGE`.
const PAGE: isize = 100;

/// Removes one letter and puts its request at the front of the queue, only
/// if the letter is still there (so two operators replaying at once do not
/// queue it twice), and deletes the request's `dedupe` claim: a letter a
/// dispatcher set aside after claiming it (no valid HTTP request) would
/// otherwise be dropped by the replay's delivery as claimed, for as long as
/// the claim lives. `KEYS`: dead, requests, the claim; `ARGV`: letter,
/// envelope.
const REPLAY: &str = r"
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 1 then
  redis.call('RPUSH', KEYS[2], ARGV[2])
  redis.call('DEL', KEYS[3])
  return 1
end
return 0";

/// One letter as found in the list.
#[derive(Debug, Clone)]
pub struct LetterView {
    /// The letter's bytes in the list, exactly (what [`Queue::replay_dead`]
    /// and [`Queue::remove_dead`] remove).
    pub raw: Bytes,
    /// Its place counted from the oldest (1 = the oldest); stable while
    /// newer letters arrive.
    pub position: u64,
    /// The letter, or `None` when the list holds something that is no
    /// dead letter.
    pub letter: Option<DeadLetter>,
    /// The request it holds, when that decodes.
    pub request: Option<RequestEnvelope>,
    /// Whether the request's proxy still runs (its heartbeat is present).
    pub proxy_alive: bool,
}

/// Whether anyone waits for a dead-lettered request's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Client {
    /// Its proxy runs and its deadline has not passed: the client waits.
    Waiting,
    /// Its deadline passed: the client already had its `504`.
    Expired,
    /// The proxy whose reply list it names is gone, and the client with it.
    ProxyGone,
    /// The original does not decode as a request: no one can be told.
    Unknown,
    /// It is no valid HTTP request: the dispatcher that set it aside
    /// answered its client 502 already.
    Answered,
}

/// The reason a dispatcher gives a request it set aside and answered 502
/// (see `anteroom_dispatcher`'s handling of an invalid request).
pub const ANSWERED_REASON: &str = "not a valid HTTP request";

impl Client {
    /// The word `anteroom dead` prints and its JSON carries.
    pub fn as_str(self) -> &'static str {
        match self {
            Client::Waiting => "waiting",
            Client::Expired => "expired",
            Client::ProxyGone => "proxy-gone",
            Client::Unknown => "unknown",
            Client::Answered => "answered",
        }
    }
}

impl LetterView {
    /// The id operators name it by: the request's id when it decodes,
    /// `#POSITION` otherwise.
    pub fn id(&self) -> String {
        match &self.request {
            Some(request) => request.id.clone(),
            None => format!("#{}", self.position),
        }
    }

    /// Whether anyone still waits for its answer, at `now` (Unix ms by the
    /// queue's clock).
    pub fn client(&self, now: u64) -> Client {
        let answered = self
            .letter
            .as_ref()
            .is_some_and(|l| l.reason.starts_with(ANSWERED_REASON));
        match &self.request {
            None => Client::Unknown,
            Some(_) if answered => Client::Answered,
            Some(request) if request.deadline_ms <= now => Client::Expired,
            Some(_) if !self.proxy_alive => Client::ProxyGone,
            Some(_) => Client::Waiting,
        }
    }
}

impl Queue {
    /// The queue's dead letters, at most [`DEAD_READ_LIMIT`]: the newest,
    /// newest first, or with `oldest` the oldest, oldest first (what
    /// purging and replaying work through: run again for the rest); and
    /// how many the list holds in all. Read from the oldest end, each
    /// letter's [`position`](LetterView::position) is exact whatever
    /// arrives meanwhile.
    pub async fn dead_letters(&self, oldest: bool) -> Result<(Vec<LetterView>, u64), ControlError> {
        let mut conn = self.conn();
        let dead = self.keys.dead();
        let total: u64 = redis::cmd("LLEN").arg(&dead).query_async(&mut conn).await?;
        let mut views = Vec::new();
        let mut start: isize = 0;
        while views.len() < DEAD_READ_LIMIT {
            // Dispatchers LPUSH: the oldest letter is at the right end.
            let (first, last) = if oldest {
                (-(start + PAGE), -(start + 1))
            } else {
                (start, start + PAGE - 1)
            };
            let mut page: Vec<Vec<u8>> = redis::cmd("LRANGE")
                .arg(&dead)
                .arg(first)
                .arg(last)
                .query_async(&mut conn)
                .await?;
            let got = page.len();
            if oldest {
                page.reverse();
            }
            for (i, raw) in page.into_iter().enumerate() {
                let index = start as u64 + i as u64;
                let raw = Bytes::from(raw);
                let letter = DeadLetter::decode(raw.clone()).ok();
                let request = letter
                    .as_ref()
                    .and_then(|l| RequestEnvelope::decode(l.original.clone()).ok());
                views.push(LetterView {
                    raw,
                    position: if oldest {
                        index + 1
                    } else {
                        total.saturating_sub(index)
                    },
                    letter,
                    request,
                    proxy_alive: false,
                });
            }
            if got < PAGE as usize {
                break;
            }
            start += PAGE;
        }
        views.truncate(DEAD_READ_LIMIT);
        // Which of their proxies still run: one EXISTS per distinct proxy.
        let mut proxies: Vec<String> = views
            .iter()
            .filter_map(|v| v.request.as_ref())
            .filter_map(|r| self.keys.proxy_of_replies(&r.reply_to))
            .collect();
        proxies.sort();
        proxies.dedup();
        let mut alive = Vec::new();
        for key in proxies {
            let exists: bool = redis::cmd("EXISTS")
                .arg(&key)
                .query_async(&mut conn)
                .await?;
            if exists {
                alive.push(key);
            }
        }
        for view in &mut views {
            let key = view
                .request
                .as_ref()
                .and_then(|r| self.keys.proxy_of_replies(&r.reply_to));
            view.proxy_alive = key.is_some_and(|k| alive.contains(&k));
        }
        Ok((views, total))
    }

    /// Puts `view`'s request back at the front of the queue with the
    /// deadline `deadline_ms` (Unix ms by the queue's clock), removing the
    /// letter and releasing the request's `dedupe` claim (a replay is a
    /// delivery the operator asks for), in one script. False when the letter was no longer there
    /// (someone replayed or removed it meanwhile): nothing queued.
    ///
    /// Errors: [`ControlError::NotReplayable`] when the letter holds no
    /// request that a dispatcher of this queue would run (undecodable, a
    /// `reply_to` of another queue, a body that streamed from its client
    /// and is gone), or Redis failing.
    pub async fn replay_dead(
        &self,
        view: &LetterView,
        deadline_ms: u64,
    ) -> Result<bool, ControlError> {
        let mut request = replayable(self, view)?.clone();
        request.deadline_ms = deadline_ms.max(now_ms());
        // In the layout it was written in: a letter written in version 1
        // while dispatchers that read only that still run goes back as one.
        let version = view
            .letter
            .as_ref()
            .and_then(|letter| letter.original.first())
            .and_then(|&byte| EnvelopeVersion::from_byte(byte))
            .unwrap_or_default();
        let replayed: i64 = redis::cmd("EVAL")
            .arg(REPLAY)
            .arg(3)
            .arg(self.keys.dead())
            .arg(self.keys.requests())
            .arg(self.keys.claimed(&request.id))
            .arg(view.raw.as_ref())
            .arg(request.encode_as(version))
            .query_async(&mut self.conn())
            .await?;
        Ok(replayed == 1)
    }

    /// Removes one letter (`LREM dead 1 letter`). False when it was no
    /// longer there.
    pub async fn remove_dead(&self, view: &LetterView) -> Result<bool, ControlError> {
        let removed: i64 = redis::cmd("LREM")
            .arg(self.keys.dead())
            .arg(1)
            .arg(view.raw.as_ref())
            .query_async(&mut self.conn())
            .await?;
        Ok(removed == 1)
    }
}

/// The request in `view`, if a dispatcher of `queue` would run it.
pub fn replayable<'a>(
    queue: &Queue,
    view: &'a LetterView,
) -> Result<&'a RequestEnvelope, ControlError> {
    let not = |why: &str| ControlError::NotReplayable {
        id: view.id(),
        why: why.to_owned(),
    };
    let request = view
        .request
        .as_ref()
        .ok_or_else(|| not("it holds no request that decodes"))?;
    if !queue.keys.is_replies(&request.reply_to) {
        return Err(not("its reply_to is no reply list of this queue"));
    }
    if request.body_follows {
        return Err(not(
            "its body streamed from the client after its head, and is gone",
        ));
    }
    Ok(request)
}
