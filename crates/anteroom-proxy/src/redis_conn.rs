//! Redis connections: one shared pipelined connection for commands, and a
//! dedicated one for the blocking reply read.

use std::time::Duration;

use redis::AsyncConnectionConfig;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};

/// The shared connection: reconnects by itself after errors.
pub(crate) async fn shared(
    client: &redis::Client,
    timeout: Duration,
) -> redis::RedisResult<ConnectionManager> {
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_secs(1));
    ConnectionManager::new_with_config(client.clone(), config).await
}

/// A connection for blocking commands: its response timeout must outlast the
/// command's own block time, or redis-rs would cut every idle wait short.
pub(crate) async fn blocking(
    client: &redis::Client,
    connect_timeout: Duration,
    block: Duration,
) -> redis::RedisResult<MultiplexedConnection> {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(connect_timeout))
        .set_response_timeout(Some(block + connect_timeout + Duration::from_secs(1)));
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
}
