//! Where Redis is: one server by URL, or the primary that Sentinel names.

use std::sync::Arc;

use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{IntoConnectionInfo, RedisResult};
use tokio::sync::Mutex;

/// A Redis URL that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("invalid redis url: {reason}")]
pub struct TargetError {
    reason: String,
}

impl TargetError {
    fn new(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
        }
    }
}

/// The Redis server to talk to. Resolved again on every (re)connect, so a
/// Sentinel failover is followed.
#[derive(Clone)]
pub struct Target {
    kind: Kind,
}

#[derive(Clone)]
enum Kind {
    Direct(Box<redis::Client>),
    Sentinel {
        client: Arc<Mutex<SentinelClient>>,
        master: String,
    },
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print credentials.
        match &self.kind {
            Kind::Direct(_) => f.write_str("Target::Direct"),
            Kind::Sentinel { master, .. } => write!(f, "Target::Sentinel({master})"),
        }
    }
}

impl Target {
    /// Parses a Redis URL:
    /// - `redis://[USER:PASSWORD@]HOST:PORT[/DB]`, `rediss://...` (TLS),
    ///   `unix:///path/to/socket`: one server;
    /// - `redis+sentinel://[USER:PASSWORD@]HOST:PORT[,HOST:PORT...]/MASTER[/DB]`:
    ///   the primary the Sentinels at those addresses name for `MASTER`;
    ///   USER, PASSWORD and DB apply to the primary.
    pub fn parse(url: &str) -> Result<Self, TargetError> {
        if let Some(rest) = url.strip_prefix("redis+sentinel://") {
            return Self::sentinel(rest);
        }
        let client = redis::Client::open(url).map_err(|e| TargetError::new(e.to_string()))?;
        Ok(Self {
            kind: Kind::Direct(Box::new(client)),
        })
    }

    fn sentinel(rest: &str) -> Result<Self, TargetError> {
        let (userinfo, rest) = match rest.rsplit_once('@') {
            Some((userinfo, rest)) => (Some(userinfo), rest),
            None => (None, rest),
        };
        let (hosts, path) = rest.split_once('/').ok_or_else(|| {
            TargetError::new("redis+sentinel:// needs /MASTER_NAME after the sentinel addresses")
        })?;
        let mut path = path.split('/');
        let master = path.next().unwrap_or("").to_owned();
        if master.is_empty() {
            return Err(TargetError::new("redis+sentinel:// needs a master name"));
        }
        let db = path.next().filter(|d| !d.is_empty()).unwrap_or("0");
        let sentinels: Vec<String> = hosts
            .split(',')
            .filter(|h| !h.is_empty())
            .map(|h| format!("redis://{h}"))
            .collect();
        if sentinels.is_empty() {
            return Err(TargetError::new(
                "redis+sentinel:// needs at least one HOST:PORT",
            ));
        }
        // Credentials and database of the primary, parsed the usual way.
        let primary_url = match userinfo {
            Some(userinfo) => format!("redis://{userinfo}@placeholder/{db}"),
            None => format!("redis://placeholder/{db}"),
        };
        let primary = primary_url
            .into_connection_info()
            .map_err(|e| TargetError::new(e.to_string()))?;
        let node = SentinelNodeConnectionInfo::default()
            .set_redis_connection_info(primary.redis_settings().clone());
        let client = SentinelClient::build(
            sentinels,
            master.clone(),
            Some(node),
            SentinelServerType::Master,
        )
        .map_err(|e| TargetError::new(e.to_string()))?;
        Ok(Self {
            kind: Kind::Sentinel {
                client: Arc::new(Mutex::new(client)),
                master,
            },
        })
    }

    /// A client for the server to use now (for Sentinel: the current primary).
    pub async fn client(&self) -> RedisResult<redis::Client> {
        match &self.kind {
            Kind::Direct(client) => Ok((**client).clone()),
            Kind::Sentinel { client, .. } => client.lock().await.async_get_client().await,
        }
    }

    /// True for a Sentinel target.
    pub fn is_sentinel(&self) -> bool {
        matches!(self.kind, Kind::Sentinel { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_or_say_why_not() {
        assert!(
            !Target::parse("redis://127.0.0.1:6379/2")
                .unwrap()
                .is_sentinel()
        );
        assert!(Target::parse("rediss://h:1").is_ok());
        let t =
            Target::parse("redis+sentinel://:pw@10.0.0.1:26379,10.0.0.2:26379/mymaster/3").unwrap();
        assert!(t.is_sentinel());
        assert_eq!(format!("{t:?}"), "Target::Sentinel(mymaster)");
        for bad in [
            "redis+sentinel://10.0.0.1:26379",
            "redis+sentinel://10.0.0.1:26379/",
            "redis+sentinel:///mymaster",
            "http://x",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad} accepted");
        }
    }
}
