//! Ceiling phases and a scenario's load in rounds between them.
//!
//! Flash-sale and checkout split their load into rounds (`Options::rounds`) and run a
//! ceiling phase of the same length before each round and after the last: C S C S ... S C.
//! Their ratio is taken against the mean of all those ceiling phases. This machine's speed
//! drifts by tens of percent within a minute; alternating short phases makes the ceiling
//! and the scenario sample the same moments, so the drift cancels out of the ratio instead
//! of landing in it.

use std::sync::Arc;
use std::time::Duration;

use crate::driver::{run_labelled_phase, run_phase_at, timed, Limits, PhaseStats, Sample};
use crate::options::Options;
use crate::report::{Check, GroupCommit, LogCounters, Report};

/// The limits of round `round` of `rounds`: an even share of the duration and of the
/// request budget (the first rounds take the remainder).
pub(crate) fn round_limits(limits: &Limits, rounds: usize, round: usize) -> Limits {
    let rounds = rounds.max(1);
    let requests_max = limits.requests_max.map(|max| {
        let (share, rest) = (max / rounds as u64, max % rounds as u64);
        share + u64::from((round as u64) < rest)
    });
    Limits {
        duration: limits.duration / rounds as u32,
        requests_max,
        ..*limits
    }
}

/// A ceiling phase beside round `round`: the same connections and length, always closed
/// loop (the most this client and server can do).
pub(crate) fn ceiling_limits(limits: &Limits, rounds: usize, round: usize) -> Limits {
    Limits {
        rate: None,
        stop_on_error: false,
        ..round_limits(limits, rounds, round)
    }
}

/// A scenario's load run in rounds between ceiling phases.
pub(crate) struct Interleaved {
    /// The scenario's phases, one after the other.
    pub stats: PhaseStats,
    /// Each round's throughput.
    pub rounds_rps: Vec<f64>,
    /// The ceiling phases: before the first round, between rounds, after the last.
    pub ceilings: Vec<PhaseStats>,
    /// Where each round ended on the scenario's timeline (the time of its load so far):
    /// a ceiling phase ran there, which the timeline leaves out.
    pub round_ends: Vec<Duration>,
    /// The server's group commits from the first round to the last.
    pub group_commit: Option<GroupCommit>,
}

impl Interleaved {
    /// The report's figures: the ceiling is the mean of every ceiling phase, and each round
    /// is also set against the two ceiling phases either side of it.
    pub fn report(&self, scenario: &str) -> Report {
        let mut ceilings = self.ceilings.iter();
        let mut all = ceilings.next().expect("a ceiling phase").clone();
        // Only their counts and latencies are used (not their timelines).
        ceilings.for_each(|c| all.append(c));
        let mut report = Report::new(scenario, &self.stats, &all);
        let rps: Vec<f64> = self.ceilings.iter().map(|c| c.throughput_rps()).collect();
        report.set_ceilings(&rps, &self.rounds_rps);
        report.group_commit = self.group_commit;
        report.ceilings_at_s = std::iter::once(0.0)
            .chain(self.round_ends.iter().map(Duration::as_secs_f64))
            .collect();
        report
            .checks
            .push(served("every ceiling phase was served", &self.ceilings));
        report
    }
}

/// Runs `send` in `rounds` phases after the ceiling phase `first`, with a ceiling phase
/// after each. `send` gets iteration numbers unique across rounds.
pub(crate) async fn interleaved<F, Fut>(
    client: &reqwest::Client,
    base: &str,
    opts: &Options,
    rounds: usize,
    first: PhaseStats,
    send: F,
) -> Interleaved
where
    F: Fn(usize, u64) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Vec<Sample>> + Send + 'static,
{
    let rounds = rounds.max(1);
    let scenario = opts.scenario.name();
    let ceiling_label = |phase: usize| format!("ceiling {phase}/{}", rounds + 1);
    let log_before = log_counters(client, base).await;
    let mut ceilings = vec![first];
    let mut rounds_rps = Vec::with_capacity(rounds);
    let mut round_ends = Vec::with_capacity(rounds);
    let mut stats: Option<PhaseStats> = None;
    for round in 0..rounds {
        if round > 0 {
            let limits = ceiling_limits(&opts.limits, rounds, round);
            ceilings.push(ceiling(client, base, &ceiling_label(round + 1), limits).await);
        }
        let first_n = (round as u64) << 40;
        let send = send.clone();
        let phase = run_phase_at(
            &format!("{scenario} {}/{rounds}", round + 1),
            round_limits(&opts.limits, rounds, round),
            stats.as_ref().map_or(Duration::ZERO, |s| s.elapsed),
            move |worker, n| send(worker, n + first_n),
        )
        .await;
        rounds_rps.push(phase.throughput_rps());
        match &mut stats {
            Some(stats) => stats.append(&phase),
            None => stats = Some(phase),
        }
        round_ends.extend(stats.as_ref().map(|s| s.elapsed));
    }
    let log_after = log_counters(client, base).await;
    let limits = ceiling_limits(&opts.limits, rounds, rounds - 1);
    ceilings.push(ceiling(client, base, &ceiling_label(rounds + 1), limits).await);
    Interleaved {
        stats: stats.expect("at least one round"),
        rounds_rps,
        ceilings,
        round_ends,
        group_commit: log_before
            .zip(log_after)
            .and_then(|(before, after)| GroupCommit::between(&before, &after)),
    }
}

/// The server's log counters from `GET /metrics`; `None` if it has none (another server,
/// or a stockd before the endpoint): the report then leaves the figures out.
async fn log_counters(client: &reqwest::Client, base: &str) -> Option<LogCounters> {
    let res = client.get(format!("{base}/metrics")).send().await.ok()?;
    if !res.status().is_success() {
        return None;
    }
    LogCounters::parse(&res.text().await.ok()?)
}

/// Every request of every ceiling phase answered 200.
pub(crate) fn served(name: &str, phases: &[PhaseStats]) -> Check {
    let ok: u64 = phases.iter().map(|p| p.status(200)).sum();
    let requests: u64 = phases.iter().map(|p| p.requests).sum();
    let unanswered: u64 = phases.iter().map(|p| p.transport_errors).sum();
    Check::new(
        name,
        phases.iter().all(|p| p.status(200) > 0) && ok == requests,
        format!("{ok} of {requests} answered 200, {unanswered} unanswered"),
    )
}

/// A ceiling phase (GET /health), its progress line labelled `label`.
pub(crate) async fn ceiling(
    client: &reqwest::Client,
    base: &str,
    label: &str,
    limits: Limits,
) -> PhaseStats {
    let url = Arc::new(format!("{base}/health"));
    let client = client.clone();
    run_labelled_phase(label, limits, move |_, _| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            vec![
                timed(async {
                    let res = client.get(url.as_str()).send().await.ok()?;
                    let status = res.status().as_u16();
                    res.bytes().await.ok()?;
                    Some(status)
                })
                .await,
            ]
        }
    })
    .await
}
