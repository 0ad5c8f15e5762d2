//! Where Redis is: one server by URL, the primary that Sentinel names, or
//! a Redis Cluster.

use std::sync::Arc;

use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{IntoConnectionInfo, RedisResult};
use tokio::sync::Mutex;

/// A Redis URL that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error(
    "invalid redis url: {reason} (expected redis://[USER:PASSWORD@]HOST:PORT[/DB], rediss://..., \
     redis+sentinel://HOST:PORT[,HOST:PORT...]/MASTER or redis+cluster://HOST:PORT[,...])"
)]
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
    Cluster {
        /// `redis://[USER:PASSWORD@]HOST:PORT` of each seed node.
        seeds: Vec<String>,
        /// `USER:PASSWORD@` or empty, for connections to other nodes.
        userinfo: String,
    },
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print credentials.
        match &self.kind {
            Kind::Direct(_) => f.write_str("Target::Direct"),
            Kind::Sentinel { master, .. } => write!(f, "Target::Sentinel({master})"),
            Kind::Cluster { seeds, .. } => write!(f, "Target::Cluster({} seeds)", seeds.len()),
        }
    }
}

/// Where it points, for logs: `HOST:PORT` (or the socket path) of one
/// server, the master name of a Sentinel setup, the seed nodes of a
/// Cluster; never credentials.
impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            Kind::Direct(client) => write!(f, "{}", client.get_connection_info().addr()),
            Kind::Sentinel { master, .. } => write!(f, "sentinel master {master}"),
            Kind::Cluster { seeds, .. } => {
                let hosts: Vec<&str> = seeds
                    .iter()
                    .map(|seed| {
                        let seed = seed.strip_prefix("redis://").unwrap_or(seed);
                        seed.rsplit_once('@').map_or(seed, |(_, host)| host)
                    })
                    .collect();
                write!(f, "cluster {}", hosts.join(","))
            }
        }
    }
}

impl Target {
    /// Parses a Redis URL:
    /// - `redis://[USER:PASSWORD@]HOST:PORT[/DB]`, `rediss://...` (TLS),
    ///   `unix:///path/to/socket`: one server;
    /// - `redis+sentinel://[USER:PASSWORD@]HOST:PORT[,HOST:PORT...]/MASTER[/DB]`:
    ///   the primary the Sentinels at those addresses name for `MASTER`;
    ///   USER, PASSWORD and DB apply to the primary;
    /// - `redis+cluster://[USER:PASSWORD@]HOST:PORT[,HOST:PORT...]`: a Redis
    ///   Cluster, found through any of these seed nodes.
    pub fn parse(url: &str) -> Result<Self, TargetError> {
        if let Some(rest) = url.strip_prefix("redis+sentinel://") {
            return Self::sentinel(rest);
        }
        if let Some(rest) = url.strip_prefix("redis+cluster://") {
            return Self::cluster(rest);
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

    fn cluster(rest: &str) -> Result<Self, TargetError> {
        let (userinfo, hosts) = match rest.rsplit_once('@') {
            Some((userinfo, hosts)) => (format!("{userinfo}@"), hosts),
            None => (String::new(), rest),
        };
        let hosts = hosts.trim_end_matches('/');
        if hosts.contains('/') {
            return Err(TargetError::new(
                "redis+cluster:// takes no database: a cluster has only database 0",
            ));
        }
        let seeds: Vec<String> = hosts
            .split(',')
            .filter(|h| !h.is_empty())
            .map(|h| format!("redis://{userinfo}{h}"))
            .collect();
        if seeds.is_empty() {
            return Err(TargetError::new(
                "redis+cluster:// needs at least one HOST:PORT",
            ));
        }
        for seed in &seeds {
            seed.as_str()
                .into_connection_info()
                .map_err(|e| TargetError::new(e.to_string()))?;
        }
        Ok(Self {
            kind: Kind::Cluster { seeds, userinfo },
        })
    }

    /// A client for the server to use now: for Sentinel the current primary,
    /// for a cluster the first seed node (enough for pub/sub, which a
    /// cluster broadcasts to every node).
    pub async fn client(&self) -> RedisResult<redis::Client> {
        match &self.kind {
            Kind::Direct(client) => Ok((**client).clone()),
            Kind::Sentinel { client, .. } => client.lock().await.async_get_client().await,
            Kind::Cluster { seeds, .. } => redis::Client::open(seeds[0].as_str()),
        }
    }

    /// A client for the server holding `key`: for a cluster, the primary
    /// that owns the key's hash slot now (asked of the seed nodes), for
    /// blocking commands, which need a connection of their own to it.
    pub async fn client_for_key(
        &self,
        key: &[u8],
        timeout: std::time::Duration,
    ) -> RedisResult<redis::Client> {
        let Kind::Cluster { seeds, userinfo } = &self.kind else {
            return self.client().await;
        };
        let slot = key_slot(key);
        let mut last = None;
        for seed in seeds {
            match primary_for_slot(seed, slot, timeout).await {
                Ok((host, port)) => {
                    return redis::Client::open(format!("redis://{userinfo}{host}:{port}"));
                }
                Err(err) => last = Some(err),
            }
        }
        Err(last.unwrap_or_else(|| {
            redis::RedisError::from((redis::ErrorKind::Io, "no cluster seed answered"))
        }))
    }

    /// The cluster client, for a cluster target: it follows `MOVED` and
    /// `ASK` and a failover by itself. `timeout` bounds connecting and each
    /// command.
    pub fn cluster_client(
        &self,
        timeout: std::time::Duration,
    ) -> Option<RedisResult<redis::cluster::ClusterClient>> {
        match &self.kind {
            Kind::Cluster { seeds, .. } => Some(
                redis::cluster::ClusterClient::builder(seeds.clone())
                    .connection_timeout(timeout)
                    .response_timeout(timeout)
                    .build(),
            ),
            _ => None,
        }
    }

    /// True for a Sentinel target.
    pub fn is_sentinel(&self) -> bool {
        matches!(self.kind, Kind::Sentinel { .. })
    }

    /// True for a cluster target.
    pub fn is_cluster(&self) -> bool {
        matches!(self.kind, Kind::Cluster { .. })
    }
}

/// The cluster hash slot of `key`: CRC16 (XMODEM) of its hash tag (the part
/// between the first `{` and the next `}`, when not empty) or of the whole
/// key, modulo 16384.
pub fn key_slot(key: &[u8]) -> u16 {
    let hashed = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            rest.iter()
                .position(|&b| b == b'}')
                .filter(|&close| close > 0)
                .map(|close| &rest[..close])
        })
        .unwrap_or(key);
    let mut crc: u16 = 0;
    for &byte in hashed {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}

/// Asks `seed` (`CLUSTER SLOTS`) which primary serves `slot`.
async fn primary_for_slot(
    seed: &str,
    slot: u16,
    timeout: std::time::Duration,
) -> RedisResult<(String, u16)> {
    let client = redis::Client::open(seed)?;
    let ask = async {
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async::<Vec<redis::Value>>(&mut conn)
            .await
    };
    let ranges = tokio::time::timeout(timeout, ask)
        .await
        .unwrap_or_else(|_| {
            Err(redis::RedisError::from((
                redis::ErrorKind::Io,
                "cluster seed timed out",
            )))
        })?;
    for range in ranges {
        let redis::Value::Array(fields) = range else {
            continue;
        };
        let (Some(start), Some(end), Some(primary)) =
            (fields.first(), fields.get(1), fields.get(2))
        else {
            continue;
        };
        let (Ok(start), Ok(end)) = (
            redis::from_redis_value_ref::<u16>(start),
            redis::from_redis_value_ref::<u16>(end),
        ) else {
            continue;
        };
        if !(start..=end).contains(&slot) {
            continue;
        }
        if let redis::Value::Array(node) = primary {
            if let (Some(host), Some(port)) = (node.first(), node.get(1)) {
                let host: String = redis::from_redis_value_ref(host)?;
                let port: u16 = redis::from_redis_value_ref(port)?;
                return Ok((host, port));
            }
        }
    }
    Err(redis::RedisError::from((
        redis::ErrorKind::Io,
        "no primary serves the slot (cluster not ready?)",
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_redis() {
        // Values from `CLUSTER KEYSLOT`.
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"bar"), 5061);
        assert_eq!(key_slot(b"somekey"), 11058);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        assert_eq!(key_slot(b"foo{}{bar}"), key_slot(b"foo{}{bar}"));
        assert_eq!(
            key_slot(b"anteroom:{web}:requests"),
            key_slot(b"anteroom:{web}:replies:p1")
        );
    }

    /// What logs show of a target: where it points, never a password.
    #[test]
    fn targets_display_where_without_credentials() {
        for (url, shown) in [
            ("redis://user:secret@10.0.0.5:6380/2", "10.0.0.5:6380"),
            ("redis://127.0.0.1:6379", "127.0.0.1:6379"),
            ("unix:///run/redis.sock", "/run/redis.sock"),
            (
                "redis+sentinel://:secret@10.0.0.1:26379,10.0.0.2:26379/main",
                "sentinel master main",
            ),
            (
                "redis+cluster://:secret@10.0.0.1:7000,10.0.0.2:7001",
                "cluster 10.0.0.1:7000,10.0.0.2:7001",
            ),
        ] {
            let text = Target::parse(url).unwrap().to_string();
            assert_eq!(text, shown, "{url}");
            assert!(!text.contains("secret"), "{url}");
        }
    }

    #[test]
    fn cluster_urls_parse() {
        let t = Target::parse("redis+cluster://:pw@10.0.0.1:7000,10.0.0.2:7001").unwrap();
        assert!(t.is_cluster());
        assert_eq!(format!("{t:?}"), "Target::Cluster(2 seeds)");
        assert!(Target::parse("redis+cluster://").is_err());
        assert!(Target::parse("redis+cluster://h:1/2").is_err());
    }

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
