//! The closed-loop driver: `connections` workers, each sending its next request as soon as
//! the previous answer arrives, until the duration or the request budget runs out.

use std::collections::BTreeMap;
use std::future::Future;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// What one phase measured.
#[derive(Debug, Clone)]
pub struct PhaseStats {
    pub requests: u64,
    /// Requests that got no HTTP answer (connection refused or reset, timeout).
    pub transport_errors: u64,
    pub by_status: BTreeMap<u16, u64>,
    /// Latency of answered requests, in microseconds.
    pub latency_us: Histogram<u64>,
    pub elapsed: Duration,
}

impl PhaseStats {
    pub fn throughput_rps(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub fn status(&self, code: u16) -> u64 {
        self.by_status.get(&code).copied().unwrap_or(0)
    }
}

/// A phase's limits: whichever comes first.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub connections: usize,
    pub duration: Duration,
    pub requests_max: Option<u64>,
    /// A worker stops at its first unanswered request (the crash scenario kills the
    /// server mid-run and must not spin on refused connections).
    pub stop_on_error: bool,
}

/// One HTTP request as measured: its status (`None`: no answer) and latency.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub status: Option<u16>,
    pub latency_us: u64,
}

/// Times one request; the future answers the status, or `None` when there was no answer.
pub async fn timed<Fut: Future<Output = Option<u16>>>(request: Fut) -> Sample {
    let sent = Instant::now();
    let status = request.await;
    Sample {
        status,
        latency_us: sent.elapsed().as_micros() as u64,
    }
}

/// Runs `send(worker, n)` in a closed loop. One call may make several requests (a
/// checkout: reserve, then confirm): it answers a sample for each.
pub async fn closed_loop<F, Fut>(limits: Limits, send: F) -> PhaseStats
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Vec<Sample>> + Send,
{
    let send = Arc::new(send);
    let issued = Arc::new(AtomicU64::new(0));
    let answered = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let stop_at = started + limits.duration;
    let progress = tokio::spawn(progress(limits.duration, answered.clone()));
    let mut workers = Vec::with_capacity(limits.connections);
    for worker in 0..limits.connections {
        let (send, issued, answered) = (send.clone(), issued.clone(), answered.clone());
        workers.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
            let mut by_status: BTreeMap<u16, u64> = BTreeMap::new();
            let mut errors = 0u64;
            let mut n = 0u64;
            while Instant::now() < stop_at {
                let ticket = issued.fetch_add(1, Ordering::Relaxed);
                if limits.requests_max.is_some_and(|max| ticket >= max) {
                    break;
                }
                let mut failed = false;
                let samples = send(worker, n).await;
                answered.fetch_add(samples.len() as u64, Ordering::Relaxed);
                for sample in samples {
                    match sample.status {
                        Some(status) => {
                            hist.saturating_record(sample.latency_us.max(1));
                            *by_status.entry(status).or_default() += 1;
                        }
                        None => {
                            errors += 1;
                            failed = true;
                        }
                    }
                }
                n += 1;
                if failed && limits.stop_on_error {
                    break;
                }
            }
            (hist, by_status, errors)
        }));
    }
    let mut stats = PhaseStats {
        requests: 0,
        transport_errors: 0,
        by_status: BTreeMap::new(),
        latency_us: Histogram::new_with_bounds(1, 60_000_000, 3).expect("bounds"),
        elapsed: Duration::ZERO,
    };
    for worker in workers {
        let (hist, by_status, errors) = worker.await.expect("load worker panicked");
        stats.latency_us.add(&hist).expect("same bounds");
        for (status, count) in by_status {
            *stats.by_status.entry(status).or_default() += count;
            stats.requests += count;
        }
        stats.transport_errors += errors;
        stats.requests += errors;
    }
    stats.elapsed = started.elapsed();
    progress.abort();
    if std::io::stderr().is_terminal() {
        eprint!("\r{:70}\r", "");
    }
    stats
}

/// A one-line progress display on stderr, once a second, when stderr is a terminal.
async fn progress(duration: Duration, answered: Arc<AtomicU64>) {
    if !std::io::stderr().is_terminal() {
        return;
    }
    let started = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.tick().await;
    loop {
        ticker.tick().await;
        let elapsed = started.elapsed().as_secs_f64();
        let done = answered.load(Ordering::Relaxed);
        let width = 30usize;
        let filled = ((elapsed / duration.as_secs_f64()) * width as f64).min(width as f64) as usize;
        eprint!(
            "\r[{}{}] {elapsed:4.0}/{:.0} s  {done} requests  {:.0} req/s ",
            "#".repeat(filled),
            " ".repeat(width - filled),
            duration.as_secs_f64(),
            done as f64 / elapsed.max(1e-9)
        );
    }
}
