//! The load drivers.
//!
//! - Closed loop (the default): `connections` workers, each sending its next request as
//!   soon as the previous answer arrives, until the duration or the request budget runs
//!   out. Measures what the server sustains.
//! - Open loop (`rate`): requests are *due* at a fixed arrival rate whatever the server
//!   does, and latency is measured from the moment a request was due, not from when it
//!   could be sent, so a stalled server cannot hide its stall (no coordinated omission).
//!   At most `connections` requests are in flight (HTTP/1.1 carries one request at a time
//!   per connection, so more would open connections beyond `connections`); a request due
//!   while that bound is reached waits, and its wait counts as latency.

use std::collections::BTreeMap;
use std::future::Future;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// Answers completed in one second of a phase.
#[derive(Debug, Clone, Copy, Default)]
pub struct Second {
    pub requests: u64,
    pub latency_sum_us: u64,
    pub latency_max_us: u64,
}

/// What one phase measured.
#[derive(Debug, Clone)]
pub struct PhaseStats {
    /// Per second since the phase started (for the chart).
    pub timeline: Vec<Second>,
    pub requests: u64,
    /// Requests that got no HTTP answer (connection refused or reset, timeout).
    pub transport_errors: u64,
    pub by_status: BTreeMap<u16, u64>,
    /// Latency of answered requests, in microseconds.
    pub latency_us: Histogram<u64>,
    pub elapsed: Duration,
    /// Whole seconds of `timeline` (a phase's last, partial second is not one).
    pub whole_seconds: usize,
}

impl PhaseStats {
    pub(crate) fn new() -> PhaseStats {
        PhaseStats {
            timeline: Vec::new(),
            requests: 0,
            transport_errors: 0,
            by_status: BTreeMap::new(),
            latency_us: Histogram::new_with_bounds(1, 60_000_000, 3).expect("bounds"),
            elapsed: Duration::ZERO,
            whole_seconds: 0,
        }
    }

    /// Files `sample` under its second: `offset` (the load's time before this phase) plus the
    /// time since the phase started.
    fn record(&mut self, sample: &Sample, phase_started: Instant, offset: Duration) {
        let second = (offset + phase_started.elapsed()).as_secs() as usize;
        if self.timeline.len() <= second {
            self.timeline.resize(second + 1, Second::default());
        }
        let slot = &mut self.timeline[second];
        slot.requests += 1;
        slot.latency_sum_us += sample.latency_us;
        slot.latency_max_us = slot.latency_max_us.max(sample.latency_us);
        self.requests += 1;
        match sample.status {
            Some(status) => {
                self.latency_us.saturating_record(sample.latency_us.max(1));
                *self.by_status.entry(status).or_default() += 1;
            }
            None => self.transport_errors += 1,
        }
    }

    fn merge(&mut self, other: &PhaseStats) {
        if self.timeline.len() < other.timeline.len() {
            self.timeline
                .resize(other.timeline.len(), Second::default());
        }
        for (mine, theirs) in self.timeline.iter_mut().zip(&other.timeline) {
            mine.requests += theirs.requests;
            mine.latency_sum_us += theirs.latency_sum_us;
            mine.latency_max_us = mine.latency_max_us.max(theirs.latency_max_us);
        }
        self.requests += other.requests;
        self.transport_errors += other.transport_errors;
        for (status, count) in &other.by_status {
            *self.by_status.entry(*status).or_default() += count;
        }
        self.latency_us.add(&other.latency_us).expect("same bounds");
    }

    /// Adds a phase of the same load that ran after this one, recorded with
    /// `run_phase_at(.., offset = self.elapsed, ..)`: its seconds continue this phase's (a
    /// partial last second of this phase is completed by the next), and the elapsed times
    /// add up.
    pub fn append(&mut self, later: &PhaseStats) {
        self.merge(later);
        self.elapsed += later.elapsed;
        self.whole_seconds = self.elapsed.as_secs() as usize;
    }

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
    /// Open loop at this many iterations per second; `None` for the closed loop.
    pub rate: Option<f64>,
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

/// Runs `send(worker, n)` under `limits` (closed or open loop). One call may make several
/// requests (a checkout: reserve, then confirm): it answers a sample for each.
pub async fn run_phase<F, Fut>(limits: Limits, send: F) -> PhaseStats
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Vec<Sample>> + Send + 'static,
{
    run_phase_at("load", limits, Duration::ZERO, send).await
}

/// `run_phase`, its progress line labelled `label` (which phase this is: "ceiling 2/4").
pub async fn run_labelled_phase<F, Fut>(label: &str, limits: Limits, send: F) -> PhaseStats
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Vec<Sample>> + Send + 'static,
{
    run_phase_at(label, limits, Duration::ZERO, send).await
}

/// `run_labelled_phase` for a phase that continues a load which already ran for `offset`
/// (a later round): its answers are filed on the timeline from `offset` on (see `append`).
pub async fn run_phase_at<F, Fut>(
    label: &str,
    limits: Limits,
    offset: Duration,
    send: F,
) -> PhaseStats
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Vec<Sample>> + Send + 'static,
{
    let answered = Arc::new(AtomicU64::new(0));
    let progress = tokio::spawn(progress(
        label.to_string(),
        limits.duration,
        answered.clone(),
    ));
    let started = Instant::now();
    let mut stats = match limits.rate {
        Some(rate) => open_loop(limits, rate, offset, Arc::new(send), answered).await,
        None => closed_loop(limits, offset, Arc::new(send), answered).await,
    };
    stats.elapsed = started.elapsed();
    stats.whole_seconds = (offset + stats.elapsed).as_secs() as usize;
    progress.abort();
    if std::io::stderr().is_terminal() {
        eprint!("\r{:79}\r", "");
    }
    stats
}

async fn closed_loop<F, Fut>(
    limits: Limits,
    offset: Duration,
    send: Arc<F>,
    answered: Arc<AtomicU64>,
) -> PhaseStats
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Vec<Sample>> + Send + 'static,
{
    let issued = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let stop_at = started + limits.duration;
    let mut workers = Vec::with_capacity(limits.connections);
    for worker in 0..limits.connections {
        let (send, issued, answered) = (send.clone(), issued.clone(), answered.clone());
        workers.push(tokio::spawn(async move {
            let mut stats = PhaseStats::new();
            let mut n = 0u64;
            while Instant::now() < stop_at {
                let ticket = issued.fetch_add(1, Ordering::Relaxed);
                if limits.requests_max.is_some_and(|max| ticket >= max) {
                    break;
                }
                let samples = send(worker, n).await;
                answered.fetch_add(samples.len() as u64, Ordering::Relaxed);
                samples
                    .iter()
                    .for_each(|s| stats.record(s, started, offset));
                n += 1;
                if limits.stop_on_error && samples.iter().any(|s| s.status.is_none()) {
                    break;
                }
            }
            stats
        }));
    }
    let mut stats = PhaseStats::new();
    for worker in workers {
        stats.merge(&worker.await.expect("load worker panicked"));
    }
    stats
}

async fn open_loop<F, Fut>(
    limits: Limits,
    rate: f64,
    offset: Duration,
    send: Arc<F>,
    answered: Arc<AtomicU64>,
) -> PhaseStats
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Vec<Sample>> + Send + 'static,
{
    let started = Instant::now();
    let stop_at = started + limits.duration;
    let in_flight = Arc::new(tokio::sync::Semaphore::new(limits.connections.max(1)));
    let failed = Arc::new(AtomicBool::new(false));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Vec<Sample>>();
    let collector = tokio::spawn(async move {
        let mut stats = PhaseStats::new();
        while let Some(samples) = rx.recv().await {
            samples
                .iter()
                .for_each(|s| stats.record(s, started, offset));
        }
        stats
    });
    let mut n = 0u64;
    loop {
        let due = started + Duration::from_secs_f64(n as f64 / rate);
        let over_budget = limits.requests_max.is_some_and(|max| n >= max);
        if due >= stop_at || over_budget || failed.load(Ordering::Relaxed) {
            break;
        }
        tokio::time::sleep_until(due.into()).await;
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            break;
        };
        let (send, tx, answered, failed) =
            (send.clone(), tx.clone(), answered.clone(), failed.clone());
        let worker = (n % limits.connections.max(1) as u64) as usize;
        tokio::spawn(async move {
            let _permit = permit;
            // Latency from when the request was due, not from when it could be sent: the
            // wait for a slot is added to the first request of the iteration.
            let lag_us = due.elapsed().as_micros() as u64;
            let mut samples = send(worker, n).await;
            if let Some(first) = samples.first_mut() {
                first.latency_us += lag_us;
            }
            if limits.stop_on_error && samples.iter().any(|s| s.status.is_none()) {
                failed.store(true, Ordering::Relaxed);
            }
            answered.fetch_add(samples.len() as u64, Ordering::Relaxed);
            let _ = tx.send(samples);
        });
        n += 1;
    }
    drop(tx);
    collector.await.expect("collector")
}

/// A one-line progress display on stderr, once a second, when stderr is a terminal,
/// starting with the phase's label.
async fn progress(label: String, duration: Duration, answered: Arc<AtomicU64>) {
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
        let width = 20usize;
        let filled = ((elapsed / duration.as_secs_f64()) * width as f64).min(width as f64) as usize;
        eprint!(
            "\r{label:<20} [{}{}] {elapsed:4.0}/{:.0} s  {done} requests  {:.0} req/s ",
            "#".repeat(filled),
            " ".repeat(width - filled),
            duration.as_secs_f64(),
            done as f64 / elapsed.max(1e-9)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A phase of `elapsed_ms` that started `offset_ms` into the load and answered
    /// `per_second[i]` requests in the load's second `i` (as `record` files them).
    fn phase(per_second: &[u64], offset_ms: u64, elapsed_ms: u64) -> PhaseStats {
        let mut stats = PhaseStats::new();
        for (second, &n) in per_second.iter().enumerate() {
            stats.timeline.push(Second {
                requests: n,
                latency_sum_us: n * 1000,
                latency_max_us: 1000,
            });
            stats.requests += n;
            *stats.by_status.entry(200).or_default() += n;
            if n > 0 {
                stats
                    .latency_us
                    .record_n(1000 * (second as u64 + 1), n)
                    .unwrap();
            }
        }
        stats.elapsed = Duration::from_millis(elapsed_ms);
        stats.whole_seconds = ((offset_ms + elapsed_ms) / 1000) as usize;
        stats
    }

    #[test]
    fn appended_phases_follow_each_other_on_the_timeline() {
        // 2.5 s, then 1.5 s filed from 2.5 s on: the second phase completes the first one's
        // partial third second, and every answer is on the timeline exactly once.
        let mut first = phase(&[10, 20, 5], 0, 2_500);
        let second = phase(&[0, 0, 30, 7], 2_500, 1_500);
        first.append(&second);
        let per_second: Vec<u64> = first.timeline.iter().map(|s| s.requests).collect();
        assert_eq!(per_second, vec![10, 20, 35, 7]);
        assert_eq!(first.whole_seconds, 4);
        assert_eq!(first.elapsed, Duration::from_millis(4_000));
        assert_eq!(first.requests, 72);
        assert_eq!(first.status(200), 72);
        assert_eq!(first.latency_us.len(), 72);
    }

    #[test]
    fn rounds_shorter_than_a_second_keep_every_answer_on_the_timeline() {
        let mut load = phase(&[4], 0, 300);
        load.append(&phase(&[6], 300, 300));
        load.append(&phase(&[3, 2], 600, 600));
        let per_second: Vec<u64> = load.timeline.iter().map(|s| s.requests).collect();
        assert_eq!(per_second, vec![13, 2]);
        assert_eq!(load.whole_seconds, 1);
        assert_eq!(load.requests, 15);
    }

    #[tokio::test]
    async fn a_phase_files_its_answers_from_its_offset() {
        let limits = Limits {
            connections: 2,
            duration: Duration::from_secs(5),
            requests_max: Some(10),
            stop_on_error: false,
            rate: None,
        };
        let send = |_, _| async {
            vec![Sample {
                status: Some(200),
                latency_us: 10,
            }]
        };
        let stats = run_phase_at("test", limits, Duration::from_millis(3_200), send).await;
        assert_eq!(stats.requests, 10);
        assert_eq!(stats.timeline.len(), 4, "filed in the load's fourth second");
        assert_eq!(stats.timeline[3].requests, 10);
        assert_eq!(stats.whole_seconds, 3);
    }
}
