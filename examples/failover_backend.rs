//! A backend that writes to PostgreSQL, for the failover-window playbook:
//! each `POST /orders` inserts a row and answers with its id and the
//! database it went to. The database is whatever DSN the file `DSN_FILE`
//! names, re-read on every request, so a failover is: pause, wait for
//! quiet, switch the file (and the data), resume: `anteroom window`.
//!
//! Run with (Redis on 127.0.0.1:6379, PostgreSQL on 127.0.0.1:5432):
//!
//! ```text
//! psql -h 127.0.0.1 -U postgres -c 'create database shop_a' -c 'create database shop_b'
//! for db in shop_a shop_b; do psql -h 127.0.0.1 -U postgres $db \
//!   -c 'create table orders (id bigserial primary key, note text not null)'; done
//! echo 'host=127.0.0.1 user=postgres dbname=shop_a' > /tmp/dsn
//! DSN_FILE=/tmp/dsn cargo run --example failover_backend &
//! cargo run -- proxy --queue default &
//! curl -d 'first order' http://127.0.0.1:8080/orders
//! cargo run -- window --queue default -- examples/failover/switch_primary.sh \
//!   'host=127.0.0.1 user=postgres dbname=shop_a' 'host=127.0.0.1 user=postgres dbname=shop_b' /tmp/dsn
//! curl -d 'second order' http://127.0.0.1:8080/orders   # now in shop_b
//! ```
//!
//! Environment: `ANTEROOM_REDIS`, `ANTEROOM_QUEUE`, `DSN_FILE` (required).

use std::sync::Arc;
use std::time::Duration;

use anteroom_dispatcher::Dispatcher;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use tokio::sync::Mutex;

/// The connection in use and the DSN it was opened with.
struct Db {
    dsn_file: String,
    current: Mutex<Option<(String, Arc<tokio_postgres::Client>)>>,
}

impl Db {
    /// A client for the DSN the file names now, reconnecting when it changed.
    async fn client(&self) -> Result<(String, Arc<tokio_postgres::Client>), String> {
        // A few bytes: reading them synchronously is cheaper than a thread hop.
        let dsn = std::fs::read_to_string(&self.dsn_file)
            .map_err(|e| format!("cannot read {}: {e}", self.dsn_file))?
            .trim()
            .to_owned();
        let mut current = self.current.lock().await;
        if let Some((open_dsn, client)) = current.as_ref() {
            if *open_dsn == dsn && !client.is_closed() {
                return Ok((dsn, Arc::clone(client)));
            }
        }
        let (client, connection) = tokio_postgres::connect(&dsn, tokio_postgres::NoTls)
            .await
            .map_err(|e| format!("cannot connect: {e}"))?;
        tokio::spawn(connection);
        let client = Arc::new(client);
        *current = Some((dsn.clone(), Arc::clone(&client)));
        Ok((dsn, client))
    }
}

async fn create_order(State(db): State<Arc<Db>>, note: String) -> (StatusCode, String) {
    let result = async {
        let (_, client) = db.client().await?;
        let row = client
            .query_one(
                "insert into orders (note) values ($1) returning id, current_database()",
                &[&note],
            )
            .await
            .map_err(|e| format!("insert failed: {e}"))?;
        let (id, database): (i64, String) = (row.get(0), row.get(1));
        Ok::<_, String>(format!("{id} {database}\n"))
    }
    .await;
    match result {
        Ok(body) => (StatusCode::CREATED, body),
        Err(err) => {
            eprintln!("order failed: {err}");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "order failed\n".to_owned(),
            )
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dsn_file =
        std::env::var("DSN_FILE").map_err(|_| "set DSN_FILE to a file holding the DSN")?;
    let db = Arc::new(Db {
        dsn_file,
        current: Mutex::new(None),
    });
    let app = Router::new()
        .route("/orders", post(create_order))
        .with_state(db);
    let dispatcher = Dispatcher::builder()
        .redis_url(
            std::env::var("ANTEROOM_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into()),
        )
        .queue(std::env::var("ANTEROOM_QUEUE").unwrap_or_else(|_| "default".into()))
        .concurrency(8)
        .label("failover-backend")
        .grace(Duration::from_secs(10))
        .build()?;
    dispatcher
        .serve(app, async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("install SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        })
        .await?;
    Ok(())
}
