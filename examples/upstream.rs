//! Wrapping an existing HTTP server: the dispatcher forwards each queued
//! request to it over a pooled keep-alive connection. The server needs no
//! change; this is how a Rails, Django or Node app sits behind Anteroom.
//! (`anteroom dispatch --upstream URL` does the same from the command line.)
//!
//! This example starts a stand-in "existing app" on 127.0.0.1:3000 itself.
//! Run with (Redis on 127.0.0.1:6379):
//!
//! ```text
//! cargo run -- proxy --listen 127.0.0.1:8080 --queue default
//! cargo run --example upstream
//! curl -d 'hi' http://127.0.0.1:8080/anything
//! ```
//!
//! Environment: `REDIS_URL`, `QUEUE`, `UPSTREAM_LISTEN` (default 127.0.0.1:3000).

use anteroom_dispatcher::{Dispatcher, Upstream};
use axum::Router;
use axum::http::{Method, Uri};
use tokio::net::TcpListener;

/// The stand-in for an application that already exists.
async fn existing_app(method: Method, uri: Uri, body: String) -> String {
    format!(
        "existing app saw {method} {uri} with {} body bytes\n",
        body.len()
    )
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt().init();
    let listen = std::env::var("UPSTREAM_LISTEN").unwrap_or_else(|_| "127.0.0.1:3000".into());
    let listener = TcpListener::bind(&listen).await?;
    tokio::spawn(async move {
        let app = Router::new().fallback(existing_app);
        if let Err(err) = axum::serve(listener, app).await {
            eprintln!("existing app failed: {err}");
        }
    });

    let dispatcher = Dispatcher::builder()
        .redis_url(std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into()))
        .queue(std::env::var("QUEUE").unwrap_or_else(|_| "default".into()))
        .concurrency(32)
        .build()?;
    let upstream = Upstream::new(&format!("http://{listen}"))?;
    println!("forwarding queued requests to http://{listen}");
    dispatcher
        .serve(upstream, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
