//! `--follow-events`: a live reader of the change feed during the run, as a shop's
//! consumer would be, and how far behind the log it fell.
//!
//! The reader follows `GET /v1/events` as Server-Sent Events from the feed's end at the
//! start (and, if the server drops it, reconnects with `Last-Event-ID`, counting the
//! drop). Every 100 ms a scraper reads `/metrics`: `stockd_log_durable_sequence` (the last
//! record flushed) and `stockd_events_through_seq` (the last record the feed has passed).
//! At the end: how many log records the reader was behind the log at each scrape, and how
//! long after a record was durable the reader had an event of it or of a later record.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::task::JoinHandle;
use tokio::time::sleep;
use tokio_util::sync::CancellationToken;

use crate::report::Check;

/// How often `/metrics` is scraped.
const SCRAPE_MS: u64 = 100;
/// How long the reader may take, after the load, to reach the log's end.
const CATCH_UP_LIMIT: Duration = Duration::from_secs(10);

#[derive(Clone, Debug, Default, Serialize)]
pub struct Spread {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

impl Spread {
    fn of(mut values: Vec<f64>) -> Spread {
        if values.is_empty() {
            return Spread::default();
        }
        values.sort_by(f64::total_cmp);
        let at = |p: f64| values[((values.len() as f64 * p) as usize).min(values.len() - 1)];
        Spread {
            p50: at(0.5),
            p99: at(0.99),
            max: values[values.len() - 1],
        }
    }
}

/// What the live reader saw.
#[derive(Clone, Debug, Default, Serialize)]
pub struct FeedLag {
    pub events_received: u64,
    /// Times the server ended the stream (too slow a reader) and it reconnected.
    pub reconnects: u64,
    /// Log records the reader was behind the log, at each scrape.
    pub records_behind: Spread,
    /// Records the feed's projector was behind the log, at the same scrapes.
    pub projector_behind: Spread,
    /// Milliseconds from a scrape that saw record D durable to the reader having an event
    /// of D or later (0 when it had one already).
    pub delay_ms: Spread,
    pub scrapes: usize,
    /// The last record the reader had an event of, and the feed's end, after the load.
    pub reader_through: u64,
    pub feed_through: u64,
}

#[derive(Default)]
struct Seen {
    /// (when, record) of each event received, in feed order.
    received: Vec<(Instant, u64)>,
    reconnects: u64,
    error: Option<String>,
}

pub struct Follower {
    /// The feed's end when the reader started: it reads the events after it.
    after: u64,
    client: reqwest::Client,
    base: String,
    seen: Arc<Mutex<Seen>>,
    reader: JoinHandle<()>,
    scraper: JoinHandle<Vec<(Instant, u64, u64)>>,
    /// Stops the reader and the scraper. A token, not a `Notify`: a task that is not
    /// waiting at the moment it is told (the scraper mid-request) still sees it after.
    stop: CancellationToken,
}

async fn metrics(client: &reqwest::Client, base: &str) -> Result<(u64, u64), String> {
    let text = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .map_err(|e| e.to_string())?
        .text()
        .await
        .map_err(|e| e.to_string())?;
    let value = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok())
    };
    let durable = value("stockd_log_durable_sequence").ok_or("no stockd_log_durable_sequence")?;
    let through = value("stockd_events_through_seq")
        .ok_or("the server has no change feed (start it with --events on)")?;
    Ok((durable as u64, through as u64))
}

/// Follows the stream after `after` until stopped; reconnects where it stopped.
async fn read(
    client: reqwest::Client,
    base: String,
    after: u64,
    seen: Arc<Mutex<Seen>>,
    stop: CancellationToken,
) {
    let mut last_id: Option<String> = None;
    loop {
        let mut request = client
            .get(format!("{base}/v1/events?after={after}"))
            .header("accept", "text/event-stream")
            .timeout(Duration::from_secs(3600));
        if let Some(id) = &last_id {
            request = request.header("last-event-id", id);
        }
        let response = tokio::select! {
            r = request.send() => r,
            () = stop.cancelled() => return,
        };
        let mut response = match response {
            Ok(r) if r.status().is_success() => r,
            Ok(r) => {
                seen.lock().unwrap().error = Some(format!("GET /v1/events: {}", r.status()));
                return;
            }
            Err(e) => {
                seen.lock().unwrap().error = Some(format!("GET /v1/events: {e}"));
                return;
            }
        };
        let mut pending = Vec::new();
        loop {
            let chunk = tokio::select! {
                c = response.chunk() => c,
                () = stop.cancelled() => return,
            };
            let Ok(Some(chunk)) = chunk else { break };
            pending.extend_from_slice(&chunk);
            let now = Instant::now();
            // Whole lines only; the rest waits for the next chunk.
            let Some(end) = pending.iter().rposition(|&b| b == b'\n') else {
                continue;
            };
            let mut seen = seen.lock().unwrap();
            for line in pending[..end].split(|&b| b == b'\n') {
                if let Some(id) = line.strip_prefix(b"id:") {
                    let id = String::from_utf8_lossy(id).trim().to_string();
                    let seq = id.split('.').next().and_then(|s| s.parse().ok());
                    if let Some(seq) = seq {
                        seen.received.push((now, seq));
                    }
                    last_id = Some(id);
                }
            }
            pending.drain(..=end);
        }
        seen.lock().unwrap().reconnects += 1;
    }
}

impl Follower {
    /// Starts following from the feed's end now.
    pub async fn start(client: &reqwest::Client, base: &str) -> Result<Follower, String> {
        let (_, after) = metrics(client, base).await?;
        let seen = Arc::new(Mutex::new(Seen::default()));
        let stop = CancellationToken::new();
        let reader = tokio::spawn(read(
            client.clone(),
            base.to_string(),
            after,
            seen.clone(),
            stop.clone(),
        ));
        let scraper = tokio::spawn({
            let (client, base, stop) = (client.clone(), base.to_string(), stop.clone());
            async move {
                let mut samples = Vec::new();
                loop {
                    if let Ok((durable, through)) = metrics(&client, &base).await {
                        samples.push((Instant::now(), durable, through));
                    }
                    tokio::select! {
                        () = sleep(Duration::from_millis(SCRAPE_MS)) => {}
                        () = stop.cancelled() => return samples,
                    }
                }
            }
        });
        Ok(Follower {
            after,
            client: client.clone(),
            base: base.to_string(),
            seen,
            reader,
            scraper,
            stop,
        })
    }

    /// Stops the scraper, gives the reader a bounded time to reach the feed's end, and
    /// reports; with a check that it kept up (reached the end, no error).
    pub async fn finish(self) -> (FeedLag, Check) {
        // Without the feed's end there is nothing to have kept up with: an error.
        let (feed_through, end_error) = match metrics(&self.client, &self.base).await {
            Ok((_, through)) => (through, None),
            Err(err) => (u64::MAX, Some(format!("reading the feed's end: {err}"))),
        };
        let deadline = Instant::now() + CATCH_UP_LIMIT;
        let after = self.after;
        let reached = |seen: &Seen| seen.received.last().map_or(after, |r| r.1);
        while end_error.is_none()
            && reached(&self.seen.lock().unwrap()) < feed_through
            && Instant::now() < deadline
        {
            sleep(Duration::from_millis(20)).await;
        }
        self.stop.cancel();
        let samples = self.scraper.await.unwrap_or_default();
        self.reader.abort();
        let seen = self.seen.lock().unwrap();
        let times: Vec<Instant> = seen.received.iter().map(|r| r.0).collect();
        let seqs: Vec<u64> = seen.received.iter().map(|r| r.1).collect();
        let (mut behind, mut projector, mut delays) = (Vec::new(), Vec::new(), Vec::new());
        for &(at, durable, through) in &samples {
            projector.push(durable.saturating_sub(through) as f64);
            let i = times.partition_point(|t| *t <= at);
            let got = if i > 0 { seqs[i - 1] } else { self.after };
            behind.push(durable.saturating_sub(got) as f64);
            if got >= durable {
                delays.push(0.0);
            } else {
                let j = seqs.partition_point(|s| *s < durable).max(i);
                if let Some(t) = times.get(j) {
                    delays.push(t.duration_since(at).as_secs_f64() * 1000.0);
                }
            }
        }
        let error = seen.error.clone().or(end_error);
        let feed_through = if feed_through == u64::MAX {
            0
        } else {
            feed_through
        };
        let lag = FeedLag {
            events_received: seqs.len() as u64,
            reconnects: seen.reconnects,
            records_behind: Spread::of(behind),
            projector_behind: Spread::of(projector),
            delay_ms: Spread::of(delays),
            scrapes: samples.len(),
            reader_through: reached(&seen),
            feed_through,
        };
        let check = Check::new(
            "the live reader of the change feed kept up",
            error.is_none() && lag.reader_through >= feed_through,
            match &error {
                Some(err) => err.clone(),
                None => format!(
                    "{} events received; had every record through {} of the feed's {}; \
                     reconnected {} times",
                    lag.events_received, lag.reader_through, feed_through, lag.reconnects
                ),
            },
        );
        (lag, check)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spreads_take_percentiles_of_what_they_are_given() {
        let s = Spread::of((1..=100).map(f64::from).collect());
        assert_eq!((s.p50, s.p99, s.max), (51.0, 100.0, 100.0));
        let none = Spread::of(Vec::new());
        assert_eq!(none.max, 0.0);
    }
}
