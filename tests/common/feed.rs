//! The change feed in tests: a server with it on, and a live reader of its stream.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use stockd::clock::ManualClock;
use stockd::{Config, Durability};

use super::{TestServer, START_MS};

/// The feed on, with its default retention (it is off by default).
pub fn with_feed(config: &mut Config) {
    config.events = Some(stockd::feed::retention_default());
}

/// An in-process server with the feed on.
pub async fn start_with_feed() -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(START_MS));
    TestServer::start_tweaked(dir, clock, Durability::Sync, with_feed).await
}

/// One Server-Sent Event.
#[derive(Debug, Clone)]
pub struct SseEvent {
    pub id: String,
    pub kind: String,
    pub data: Value,
}

/// A live reader of `GET /v1/events` (Server-Sent Events).
pub struct Sse {
    response: reqwest::Response,
    buf: String,
}

impl Sse {
    /// Opens the stream at `base` with `query` (`""` or `"?type=..."`), resuming after
    /// `last_event_id` if given.
    pub async fn open(base: &str, query: &str, last_event_id: Option<&str>) -> Sse {
        let client = reqwest::Client::new();
        let mut req = client
            .get(format!("{base}/v1/events{query}"))
            .header("accept", "text/event-stream");
        if let Some(id) = last_event_id {
            req = req.header("last-event-id", id);
        }
        let response = req.send().await.expect("the stream opens");
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.headers()["content-type"].to_str().unwrap(),
            "text/event-stream"
        );
        Sse {
            response,
            buf: String::new(),
        }
    }

    /// The next event; `None` when the stream ends (or fails, or `limit` passes).
    pub async fn next(&mut self, limit: Duration) -> Option<SseEvent> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            while let Some(end) = self.buf.find("\n\n") {
                let frame: String = self.buf.drain(..end + 2).collect();
                let (mut id, mut kind, mut data) = (None, None, None);
                for line in frame.lines() {
                    if let Some(v) = line.strip_prefix("id:") {
                        id = Some(v.trim().to_string());
                    } else if let Some(v) = line.strip_prefix("event:") {
                        kind = Some(v.trim().to_string());
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data = Some(serde_json::from_str(v.trim()).expect("data is JSON"));
                    }
                }
                if let (Some(id), Some(kind), Some(data)) = (id, kind, data) {
                    return Some(SseEvent { id, kind, data });
                }
            }
            match tokio::time::timeout_at(deadline, self.response.chunk()).await {
                Ok(Ok(Some(bytes))) => self.buf.push_str(&String::from_utf8_lossy(&bytes)),
                _ => return None,
            }
        }
    }

    /// The next event's (id, type); `None` as `next`.
    pub async fn next_id_and_type(&mut self, limit: Duration) -> Option<(String, String)> {
        self.next(limit).await.map(|e| (e.id, e.kind))
    }
}
