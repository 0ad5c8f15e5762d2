//! An axum app served through Anteroom's dispatcher library: the `Router`
//! is handed to the dispatcher unchanged, and takes its requests from Redis
//! instead of from a socket.
//!
//! Run with (three terminals, Redis on 127.0.0.1:6379):
//!
//! ```text
//! cargo run -- proxy --listen 127.0.0.1:8080 --queue default
//! cargo run --example embedded_axum
//! curl http://127.0.0.1:8080/hello/world
//! ```
//!
//! Environment: `REDIS_URL` (default `redis://127.0.0.1:6379`), `QUEUE`
//! (default `default`). Ctrl-C stops pulling, finishes in-flight requests,
//! and exits; requests that arrive meanwhile wait in Redis for the next run.

use std::time::Duration;

use anteroom_dispatcher::Dispatcher;
use axum::Json;
use axum::Router;
use axum::extract::Path;
use axum::routing::{get, post};

async fn hello(Path(name): Path<String>) -> String {
    format!("hello, {name}\n")
}

async fn sum(Json(numbers): Json<Vec<i64>>) -> Json<i64> {
    Json(numbers.iter().sum())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt().init();
    let app = Router::new()
        .route("/hello/{name}", get(hello))
        .route("/sum", post(sum));

    let dispatcher = Dispatcher::builder()
        .redis_url(std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into()))
        .queue(std::env::var("QUEUE").unwrap_or_else(|_| "default".into()))
        .concurrency(32)
        .grace(Duration::from_secs(10))
        .build()?;
    println!("serving queue with dispatcher {}", dispatcher.id());
    dispatcher
        .serve(app, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
