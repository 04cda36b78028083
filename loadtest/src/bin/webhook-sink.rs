//! `webhook-sink`: a webhook receiver for measurements on loopback. It answers every
//! HTTP/1.1 request `204 No Content` at once, on keep-alive connections, and counts them;
//! it checks nothing (tests/webhooks.rs verifies signatures). Small on purpose, so that the
//! receiver takes as little of the machine's CPU as it can from the server measured.
//!
//!   webhook-sink [ADDR]     (default 127.0.0.1:0; prints `listening on ADDR`)
//!
//! On SIGTERM it prints `requests N` and exits.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const HEADERS_MAX: usize = 64 * 1024;

/// Serves one connection until the peer closes it or sends something that is not a
/// request with a Content-Length (or none) this sink understands.
async fn serve(mut stream: TcpStream, count: Arc<AtomicU64>) -> std::io::Result<()> {
    let mut buf: Vec<u8> = Vec::with_capacity(8192);
    loop {
        // Read until the end of the headers.
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if buf.len() > HEADERS_MAX {
                return Ok(());
            }
            let mut chunk = [0u8; 8192];
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        while buf.len() < end + length {
            let mut chunk = [0u8; 8192];
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        buf.drain(..end + length);
        count.fetch_add(1, Ordering::Relaxed);
        stream
            .write_all(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n")
            .await?;
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:0".into());
    let listener = TcpListener::bind(&addr).await?;
    println!("listening on {}", listener.local_addr()?);
    let count = Arc::new(AtomicU64::new(0));
    let accept = {
        let count = count.clone();
        async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                tokio::spawn(serve(stream, count.clone()));
            }
        }
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = accept => {}
        _ = term.recv() => {}
    }
    println!("requests {}", count.load(Ordering::Relaxed));
    Ok(())
}
