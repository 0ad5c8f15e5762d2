//! Redis key names. Every key of a queue carries the queue name as a Redis
//! Cluster hash tag (`{queue}`), so all of a queue's keys live in one slot.

/// A set of every queue name that a proxy or dispatcher has served. The one
/// key without a queue hash tag (on Redis Cluster it lives in its own slot).
pub const QUEUES_KEY: &str = "anteroom:queues";

/// Longest queue name or component id accepted.
const MAX_NAME_LEN: usize = 64;

/// A queue name or id that cannot be used in a key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {name:?}: use 1 to 64 characters from A-Z a-z 0-9 . _ -")]
pub struct NameError {
    what: &'static str,
    name: String,
}

fn validate(what: &'static str, name: &str) -> Result<(), NameError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(NameError {
            what,
            name: name.to_owned(),
        })
    }
}

/// Checks a proxy or dispatcher id for use in key names.
pub fn validate_id(id: &str) -> Result<(), NameError> {
    validate("id", id)
}

/// The key names of one queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    queue: String,
    prefix: String,
}

impl Keys {
    /// Key names for `queue`, which must be 1 to 64 characters of `[A-Za-z0-9._-]`.
    pub fn new(queue: &str) -> Result<Self, NameError> {
        validate("queue name", queue)?;
        Ok(Self {
            queue: queue.to_owned(),
            prefix: format!("anteroom:{{{queue}}}:"),
        })
    }

    /// The queue name.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// `anteroom:{q}:requests`: the list requests wait in (LPUSH in, pop from the right).
    pub fn requests(&self) -> String {
        format!("{}requests", self.prefix)
    }

    /// `anteroom:{q}:processing:<dispatcher>`: requests one dispatcher holds.
    pub fn processing(&self, dispatcher_id: &str) -> String {
        format!("{}processing:{dispatcher_id}", self.prefix)
    }

    /// `anteroom:{q}:replies:<proxy>`: the reply list of one proxy.
    pub fn replies(&self, proxy_id: &str) -> String {
        format!("{}replies:{proxy_id}", self.prefix)
    }

    /// Whether `key` is a reply list of this queue: `anteroom:{q}:replies:<id>`
    /// with an `id` that [`validate_id`] accepts. A dispatcher writes only
    /// to such keys, whatever an envelope's `reply_to` says.
    pub fn is_replies(&self, key: &str) -> bool {
        key.strip_prefix(self.prefix.as_str())
            .and_then(|rest| rest.strip_prefix("replies:"))
            .is_some_and(|id| validate_id(id).is_ok())
    }

    /// `anteroom:{q}:credits:<dispatcher-id>`: credits proxies send a
    /// dispatcher for its streamed replies (a list with a TTL).
    pub fn credits(&self, dispatcher_id: &str) -> String {
        format!("{}credits:{dispatcher_id}", self.prefix)
    }

    /// Whether `key` is a credit list of this queue (see [`credits`](Self::credits));
    /// a proxy pushes credits only to such keys, whatever a stream head says.
    pub fn is_credits(&self, key: &str) -> bool {
        key.strip_prefix(self.prefix.as_str())
            .and_then(|rest| rest.strip_prefix("credits:"))
            .is_some_and(|id| validate_id(id).is_ok())
    }

    /// The heartbeat key of the dispatcher whose credit list is `key`
    /// (`anteroom:{q}:dispatcher:<id>` for `anteroom:{q}:credits:<id>`), if
    /// it is one of this queue's. A proxy watches it while it relays that
    /// dispatcher's WebSockets.
    pub fn dispatcher_of_credits(&self, key: &str) -> Option<String> {
        self.is_credits(key)
            .then(|| key.rsplit_once(':').map(|(_, id)| self.dispatcher(id)))
            .flatten()
    }

    /// The heartbeat key of the proxy whose reply list is `key`
    /// (`anteroom:{q}:proxy:<id>` for `anteroom:{q}:replies:<id>`), if it
    /// is one of this queue's. A dispatcher watches it while it relays
    /// that proxy's WebSockets.
    pub fn proxy_of_replies(&self, key: &str) -> Option<String> {
        self.is_replies(key)
            .then(|| key.rsplit_once(':').map(|(_, id)| self.proxy(id)))
            .flatten()
    }

    /// `anteroom:{q}:dispatcher:<id>`: a dispatcher's heartbeat (a string with a TTL).
    pub fn dispatcher(&self, dispatcher_id: &str) -> String {
        format!("{}dispatcher:{dispatcher_id}", self.prefix)
    }

    /// `anteroom:{q}:proxy:<id>`: a proxy's heartbeat (a string with a TTL).
    pub fn proxy(&self, proxy_id: &str) -> String {
        format!("{}proxy:{proxy_id}", self.prefix)
    }

    /// `anteroom:{q}:dispatchers`: sorted set of dispatcher ids, scored by
    /// the Unix milliseconds of their last heartbeat.
    pub fn dispatchers(&self) -> String {
        format!("{}dispatchers", self.prefix)
    }

    /// `anteroom:{q}:proxies`: sorted set of proxy ids, scored like `dispatchers`.
    pub fn proxies(&self) -> String {
        format!("{}proxies", self.prefix)
    }

    /// `anteroom:{q}:control`: pub/sub channel announcing pause and resume.
    pub fn control(&self) -> String {
        format!("{}control", self.prefix)
    }

    /// `anteroom:{q}:claimed:<request-id>`: a dispatcher's claim on a request
    /// marked `dedupe`, so a duplicate delivery is not run again.
    pub fn claimed(&self, request_id: &str) -> String {
        format!("{}claimed:{request_id}", self.prefix)
    }

    /// `anteroom:{q}:repeats:<request-id>`: how often a request that may
    /// already have run was put back in the queue (see
    /// `anteroom_control::requeue`); expires with the request.
    pub fn repeats(&self, request_id: &str) -> String {
        format!("{}repeats:{request_id}", self.prefix)
    }

    /// `anteroom:{q}:paused`: present while the queue is paused.
    pub fn paused(&self) -> String {
        format!("{}paused", self.prefix)
    }

    /// `anteroom:{q}:maintenance`: present while the queue is in maintenance
    /// mode (a [`MaintenanceRecord`](crate::MaintenanceRecord)): proxies
    /// answer new requests 503 at once instead of queueing them.
    pub fn maintenance(&self) -> String {
        format!("{}maintenance", self.prefix)
    }

    /// `anteroom:{q}:dead`: envelopes that could not be decoded.
    pub fn dead(&self) -> String {
        format!("{}dead", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_this_queues_reply_lists_are_reply_lists() {
        let k = Keys::new("billing").unwrap();
        assert!(k.is_replies(&k.replies("p1")));
        for key in [
            "anteroom:{billing}:replies:",
            "anteroom:{billing}:replies:a b",
            "anteroom:{billing}:replies:p1:x",
            "anteroom:{other}:replies:p1",
            "anteroom:{billing}:requests",
            "anteroom:{billing}:paused",
            "session:42",
        ] {
            assert!(!k.is_replies(key), "{key}");
        }
    }

    #[test]
    fn a_peers_heartbeat_is_found_only_from_this_queues_lists() {
        let k = Keys::new("billing").unwrap();
        assert_eq!(
            k.dispatcher_of_credits(&k.credits("d1")),
            Some(k.dispatcher("d1"))
        );
        assert_eq!(k.proxy_of_replies(&k.replies("p1")), Some(k.proxy("p1")));
        let other = Keys::new("other").unwrap();
        assert_eq!(k.dispatcher_of_credits(&other.credits("d1")), None);
        assert_eq!(k.proxy_of_replies(&k.credits("p1")), None);
        assert_eq!(k.dispatcher_of_credits("anteroom:{billing}:credits:"), None);
    }

    #[test]
    fn keys_carry_the_hash_tag() {
        let k = Keys::new("billing").unwrap();
        assert_eq!(k.requests(), "anteroom:{billing}:requests");
        assert_eq!(k.processing("d1"), "anteroom:{billing}:processing:d1");
        assert_eq!(k.repeats("r1"), "anteroom:{billing}:repeats:r1");
        assert_eq!(k.replies("p1"), "anteroom:{billing}:replies:p1");
        assert_eq!(k.dispatcher("d1"), "anteroom:{billing}:dispatcher:d1");
        assert_eq!(k.paused(), "anteroom:{billing}:paused");
        assert_eq!(k.dead(), "anteroom:{billing}:dead");
        assert_eq!(k.dispatchers(), "anteroom:{billing}:dispatchers");
        assert_eq!(k.proxies(), "anteroom:{billing}:proxies");
        assert_eq!(k.control(), "anteroom:{billing}:control");
    }

    #[test]
    fn names_that_would_break_the_tag_are_refused() {
        for bad in ["", "a}b", "a{b", "with space", "x:y", &"a".repeat(65)] {
            assert!(Keys::new(bad).is_err(), "{bad:?} accepted");
        }
        assert!(Keys::new("api-v2.orders_1").is_ok());
    }
}
