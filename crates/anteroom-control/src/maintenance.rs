//! Maintenance mode: `anteroom:{q}:maintenance` present means proxies
//! answer each new request of the queue with 503 and `Retry-After` at
//! once, instead of holding it; requests already queued keep waiting and
//! are served as usual (paused or not).

use std::time::Duration;

use anteroom_protocol::{Keys, MaintenanceRecord};
use anteroom_redis::{SharedConnection, Target};
use anteroom_runtime::Components;
use tokio::sync::watch;

use crate::pause::{Flag, follow};
use crate::{ControlError, Queue};

impl Queue {
    /// Turns maintenance mode on (replacing any record already set) and
    /// announces it on the control channel, so proxies switch at once.
    pub async fn maintenance_on(&self, record: &MaintenanceRecord) -> Result<(), ControlError> {
        let raw = serde_json::to_string(record).unwrap_or_default();
        redis::cmd("SET")
            .arg(self.keys.maintenance())
            .arg(raw)
            .query_async::<()>(&mut self.conn())
            .await?;
        self.announce("maintenance").await
    }

    /// Turns maintenance mode off and announces it. True when it was on.
    pub async fn maintenance_off(&self) -> Result<bool, ControlError> {
        let removed: i64 = redis::cmd("DEL")
            .arg(self.keys.maintenance())
            .query_async(&mut self.conn())
            .await?;
        self.announce("maintenance").await?;
        Ok(removed == 1)
    }

    /// The maintenance record, while maintenance mode is on.
    pub async fn maintenance(&self) -> Result<Option<MaintenanceRecord>, ControlError> {
        let raw: Option<Vec<u8>> = redis::cmd("GET")
            .arg(self.keys.maintenance())
            .query_async(&mut self.conn())
            .await?;
        Ok(raw.map(|raw| MaintenanceRecord::parse(&String::from_utf8_lossy(&raw))))
    }
}

/// Maintenance mode as a proxy sees it: `Some(record)` while it is on.
pub type MaintenanceWatch = watch::Receiver<Option<MaintenanceRecord>>;

/// Reads `keys`' maintenance flag now, then follows it in a component of
/// `components` ("maintenance watcher") until they stop, as
/// [`watch_pause`](crate::watch_pause) follows the pause flag: at once on
/// each announcement, and by reading the key every `poll` besides.
pub async fn watch_maintenance(
    target: Target,
    conn: SharedConnection,
    keys: Keys,
    poll: Duration,
    connect_timeout: Duration,
    components: &Components,
) -> Result<MaintenanceWatch, ControlError> {
    let flag = Flag {
        key: keys.maintenance(),
        parse: MaintenanceRecord::parse,
        name: "maintenance watcher",
    };
    follow(target, conn, keys, flag, poll, connect_timeout, components).await
}
