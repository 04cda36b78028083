//! The report: a terminal table, Markdown, and JSON (`--json FILE`).

use std::collections::BTreeMap;

use serde::Serialize;

use crate::driver::PhaseStats;

#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Latency {
    fn of(stats: &PhaseStats) -> Latency {
        let h = &stats.latency_us;
        let ms = |us: u64| us as f64 / 1000.0;
        Latency {
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        }
    }
}

/// One second of the main phase, for the chart.
#[derive(Debug, Clone, Serialize)]
pub struct SecondView {
    pub second: usize,
    pub requests_per_second: f64,
    pub mean_ms: f64,
    pub max_ms: f64,
}

/// One round of the scenario's load.
#[derive(Debug, Clone, Serialize)]
pub struct Round {
    pub throughput_rps: f64,
    /// The mean of the ceiling phases just before and just after this round.
    pub ceiling_rps: f64,
    pub ratio: f64,
}

/// The server's group commits while the scenario ran, from its `GET /metrics` before the
/// first round and after the last (absent if the server has no such endpoint).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct GroupCommit {
    /// Group commits (records written and flushed together).
    pub batches: u64,
    pub records: u64,
    pub records_per_batch: f64,
    /// Mean time one commit took to write and flush.
    pub commit_ms_mean: f64,
}

impl GroupCommit {
    /// The figures between two scrapes of the log's counters; `None` if they are not of
    /// the same server run (it restarted, or a counter went back).
    pub fn between(before: &LogCounters, after: &LogCounters) -> Option<GroupCommit> {
        if after.start_time != before.start_time
            || after.batches < before.batches
            || after.records < before.records
            || after.write_seconds < before.write_seconds
        {
            return None;
        }
        let batches = after.batches - before.batches;
        let records = after.records - before.records;
        let seconds = after.write_seconds - before.write_seconds;
        Some(GroupCommit {
            batches,
            records,
            records_per_batch: records as f64 / batches.max(1) as f64,
            commit_ms_mean: seconds * 1000.0 / batches.max(1) as f64,
        })
    }
}

/// The log's counters in one scrape of `GET /metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LogCounters {
    pub batches: u64,
    pub records: u64,
    pub write_seconds: f64,
    /// When that server started: a restart between two scrapes resets the counters.
    pub start_time: f64,
}

impl LogCounters {
    /// Reads them from the Prometheus text; `None` if any is missing.
    pub fn parse(text: &str) -> Option<LogCounters> {
        let value = |name: &str| {
            text.lines()
                .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
                .and_then(|v| v.trim().parse::<f64>().ok())
        };
        Some(LogCounters {
            batches: value("stockd_log_batches_total")? as u64,
            records: value("stockd_log_records_total")? as u64,
            write_seconds: value("stockd_log_write_seconds_total")?,
            start_time: value("stockd_start_time_seconds")?,
        })
    }
}

/// One verification and its outcome.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

impl Check {
    pub fn new(name: &str, ok: bool, detail: String) -> Check {
        Check {
            name: name.to_string(),
            ok,
            detail,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub scenario: String,
    pub durability: Option<String>,
    pub connections: usize,
    pub duration_s: f64,
    pub requests: u64,
    pub throughput_rps: f64,
    /// The HTTP ceiling the ratio is taken against: the mean of every ceiling phase of the
    /// run (flash-sale and checkout alternate them with their rounds), so that a machine
    /// getting faster or slower during the run does not bias the ratio.
    pub ceiling_rps: f64,
    /// The ceiling phase before the scenario.
    pub ceiling_before_rps: f64,
    /// The ceiling phase after the scenario's last round (flash-sale and checkout; not
    /// crash, whose server was restarted).
    pub ceiling_after_rps: Option<f64>,
    /// Every ceiling phase, in order.
    pub ceilings_rps: Vec<f64>,
    /// `throughput_rps / ceiling_rps`, all from this run.
    pub ratio: f64,
    /// Flash-sale and checkout: each round, against the ceiling phases either side of it.
    pub rounds: Vec<Round>,
    pub latency_ms: Latency,
    pub ceiling_latency_ms: Latency,
    pub statuses: BTreeMap<String, u64>,
    pub transport_errors: u64,
    pub oversold: u64,
    pub lost_acks: u64,
    /// Crash scenario: from exec of the restarted server to `listening on`.
    pub recovery_ms: Option<f64>,
    pub verified: bool,
    pub checks: Vec<Check>,
    /// Per second of the main phase (the last, partial second is left out).
    pub timeline: Vec<SecondView>,
    /// Flash-sale and checkout: the server's group commits during the rounds.
    pub group_commit: Option<GroupCommit>,
    /// Where a ceiling phase ran, in seconds of the scenario's load (`timeline`'s time,
    /// which leaves the ceiling phases out): before the first round, between rounds, after
    /// the last.
    pub ceilings_at_s: Vec<f64>,
    /// Crash scenario: when the server was killed, in seconds of the load. The load
    /// stops there (each connection at its first unanswered request).
    pub killed_at_s: Option<f64>,
    /// `--follow-events`: how far behind the log a live reader of the feed fell.
    pub feed_lag: Option<crate::follow::FeedLag>,
    /// What the ceiling phases were when not `GET /health` (the `cluster` scenario sets
    /// its cluster's flash sale against the flash sale on one node).
    pub baseline: Option<String>,
    /// Failover scenario: the kill of the leader and how long the cluster served nothing.
    pub failover: Option<Failover>,
}

/// The failover scenario's figures (times in ms, on the load generator's clock).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Failover {
    /// The leader killed with SIGKILL.
    pub killed_node: u64,
    /// The kill, in milliseconds since the Unix epoch (to match the nodes' logs).
    pub killed_at_unix_ms: u64,
    /// The leader the load ended on, where the run was verified.
    pub new_leader: u64,
    /// The failover gap: from the kill to the first 2xx answered by another node.
    pub gap_ms: Option<f64>,
    /// From the last 2xx of the killed leader to the first 2xx of another node.
    pub outage_ms: Option<f64>,
    /// Holds acknowledged before the kill, and after it (by the new leader).
    pub acknowledged_before: u64,
    pub acknowledged_after: u64,
    /// Tries beyond each reservation's first (a 503, or no answer: sent again, with the
    /// same `Idempotency-Key`, to the next node).
    pub retries: u64,
    /// Replays: a retry answered with the reservation its key already held
    /// (`Idempotent-Replayed: true`).
    pub replayed: u64,
    /// The killed node, restarted on its directory: the position at which all three had
    /// the same state digest (`None`: not restarted, or no agreement).
    pub digest_seq: Option<u64>,
}

fn timeline(stats: &PhaseStats) -> Vec<SecondView> {
    let full_seconds = stats.whole_seconds;
    stats
        .timeline
        .iter()
        .take(full_seconds.max(1))
        .enumerate()
        .map(|(second, s)| SecondView {
            second,
            requests_per_second: s.requests as f64,
            mean_ms: s.latency_sum_us as f64 / s.requests.max(1) as f64 / 1000.0,
            max_ms: s.latency_max_us as f64 / 1000.0,
        })
        .collect()
}

impl Report {
    pub fn new(scenario: &str, stats: &PhaseStats, ceiling: &PhaseStats) -> Report {
        let throughput = stats.throughput_rps();
        let ceiling_rps = ceiling.throughput_rps();
        Report {
            scenario: scenario.to_string(),
            durability: None,
            connections: 0,
            duration_s: stats.elapsed.as_secs_f64(),
            requests: stats.requests,
            throughput_rps: throughput,
            ceiling_rps,
            ceiling_before_rps: ceiling_rps,
            ceiling_after_rps: None,
            ceilings_rps: vec![ceiling_rps],
            ratio: throughput / ceiling_rps.max(1e-9),
            rounds: Vec::new(),
            latency_ms: Latency::of(stats),
            ceiling_latency_ms: Latency::of(ceiling),
            statuses: stats
                .by_status
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect(),
            transport_errors: stats.transport_errors,
            oversold: 0,
            lost_acks: 0,
            recovery_ms: None,
            verified: stats.transport_errors == 0,
            checks: Vec::new(),
            timeline: timeline(stats),
            group_commit: None,
            ceilings_at_s: Vec::new(),
            killed_at_s: None,
            feed_lag: None,
            baseline: None,
            failover: None,
        }
    }

    /// Sets the ceiling phases of an interleaved run (`ceilings`: one more than `rounds`,
    /// in order): the ratio is taken against their mean, and each round against the two
    /// either side of it.
    pub fn set_ceilings(&mut self, ceilings: &[f64], rounds: &[f64]) {
        debug_assert_eq!(ceilings.len(), rounds.len() + 1);
        let mean = ceilings.iter().sum::<f64>() / ceilings.len().max(1) as f64;
        self.ceiling_rps = mean;
        self.ceiling_before_rps = ceilings.first().copied().unwrap_or(0.0);
        self.ceiling_after_rps = ceilings.last().copied();
        self.ceilings_rps = ceilings.to_vec();
        self.ratio = self.throughput_rps / mean.max(1e-9);
        self.rounds = rounds
            .iter()
            .zip(ceilings.windows(2))
            .map(|(&rps, pair)| {
                let ceiling = (pair[0] + pair[1]) / 2.0;
                Round {
                    throughput_rps: rps,
                    ceiling_rps: ceiling,
                    ratio: rps / ceiling.max(1e-9),
                }
            })
            .collect();
    }

    /// Markdown: a results table and the checks (used for the terminal too).
    pub fn markdown(&self) -> String {
        let l = &self.latency_ms;
        let c = &self.ceiling_latency_ms;
        let phases = self.ceilings_rps.len();
        let mut out = format!(
            "### {} ({} connections, durability {})\n\n\
             | phase | requests/s | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms |\n\
             | --- | ---: | ---: | ---: | ---: | ---: | ---: |\n\
             | {}{} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |\n\
             | {}{} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |\n\n\
             ratio to {}: **{:.2}**{} · requests: {} · statuses: {:?} · unanswered: {}\n\n",
            self.scenario,
            self.connections,
            self.durability.as_deref().unwrap_or("unknown"),
            self.baseline.as_deref().unwrap_or("ceiling (GET /health"),
            match (phases > 1, self.baseline.is_some()) {
                (true, true) => format!(", {phases} phases"),
                (true, false) => format!(", {phases} phases)"),
                (false, true) => String::new(),
                (false, false) => ")".to_string(),
            },
            self.ceiling_rps,
            c.p50,
            c.p90,
            c.p99,
            c.p999,
            c.max,
            self.scenario,
            if self.rounds.len() > 1 {
                format!(", {} rounds", self.rounds.len())
            } else {
                String::new()
            },
            self.throughput_rps,
            l.p50,
            l.p90,
            l.p99,
            l.p999,
            l.max,
            if self.baseline.is_some() {
                "baseline"
            } else {
                "ceiling"
            },
            self.ratio,
            if phases > 1 {
                format!(
                    " (of {:.0}, the mean of {phases} {} phases)",
                    self.ceiling_rps,
                    if self.baseline.is_some() {
                        "baseline"
                    } else {
                        "ceiling"
                    }
                )
            } else {
                String::new()
            },
            self.requests,
            self.statuses,
            self.transport_errors,
        );
        if phases > 1 {
            let list = |v: Vec<String>| v.join(" · ");
            out.push_str(&format!(
                "{} phases, req/s: {}\n\n",
                if self.baseline.is_some() {
                    "baseline"
                } else {
                    "ceiling"
                },
                list(
                    self.ceilings_rps
                        .iter()
                        .map(|r| format!("{r:.0}"))
                        .collect()
                )
            ));
        }
        if !self.rounds.is_empty() {
            out.push_str(&format!(
                "rounds, req/s (ratio to the {} phases either side): {}\n\n",
                if self.baseline.is_some() {
                    "baseline"
                } else {
                    "ceiling"
                },
                self.rounds
                    .iter()
                    .map(|r| format!("{:.0} ({:.2})", r.throughput_rps, r.ratio))
                    .collect::<Vec<_>>()
                    .join(" · ")
            ));
        }
        if let Some(g) = &self.group_commit {
            out.push_str(&format!(
                "group commits (the server's /metrics, over the rounds and the ceiling phases \
                 between them): {} of {:.1} records each on average, {:.2} ms each to write \
                 and flush\n\n",
                g.batches, g.records_per_batch, g.commit_ms_mean
            ));
        }
        if let Some(f) = &self.feed_lag {
            out.push_str(&format!(
                "live reader of the change feed: {} events, reconnected {} times; records \
                 behind the log p50 {:.0} / p99 {:.0} / max {:.0} (the projector's own: p99 \
                 {:.0}); from durable to received p50 {:.0} / p99 {:.0} / max {:.0} ms \
                 ({} scrapes of /metrics, every 100 ms)\n\n",
                f.events_received,
                f.reconnects,
                f.records_behind.p50,
                f.records_behind.p99,
                f.records_behind.max,
                f.projector_behind.p99,
                f.delay_ms.p50,
                f.delay_ms.p99,
                f.delay_ms.max,
                f.scrapes,
            ));
        }
        for check in &self.checks {
            let mark = if check.ok { "ok  " } else { "FAIL" };
            out.push_str(&format!("- {mark} {}: {}\n", check.name, check.detail));
        }
        if let Some(ms) = self.recovery_ms {
            out.push_str(&format!(
                "\nrecovery after kill -9: {ms:.0} ms to serving\n"
            ));
        }
        if let Some(f) = &self.failover {
            let ms = |v: Option<f64>| v.map_or("none".to_string(), |v| format!("{v:.0} ms"));
            out.push_str(&format!(
                "\nfailover: leader node {} killed (SIGKILL) {:.1} s into the load; node {} \
                 leads after it. **Gap** from the kill to the first 2xx of another node: \
                 **{}**; from the killed leader's last 2xx: {}. Acknowledged {} holds before \
                 the kill and {} after; {} retries (same Idempotency-Key, next node), {} \
                 replayed\n",
                f.killed_node,
                self.killed_at_s.unwrap_or(0.0),
                f.new_leader,
                ms(f.gap_ms),
                ms(f.outage_ms),
                f.acknowledged_before,
                f.acknowledged_after,
                f.retries,
                f.replayed,
            ));
        } else if let Some(at) = self.killed_at_s {
            out.push_str(&format!(
                "\nthe load stopped at the kill, {at:.1} s in: its figures are of the load \
                 before it (the restarted server is only verified, not loaded)\n"
            ));
        }
        out.push_str(&format!(
            "\noversold: {} · lost acknowledgements: {} · verified: {}\n",
            self.oversold, self.lost_acks, self.verified
        ));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_commits_come_from_two_scrapes_of_metrics() {
        let scrape = |batches: u64, records: u64, seconds: f64, started: u64| {
            format!(
                "# HELP stockd_log_batches_total x\n# TYPE stockd_log_batches_total counter\n\
                 stockd_log_batches_total {batches}\n\
                 stockd_log_records_total {records}\n\
                 stockd_log_records_total_other 999\n\
                 stockd_log_write_seconds_total {seconds}\n\
                 stockd_start_time_seconds {started}\n"
            )
        };
        let before = LogCounters::parse(&scrape(10, 100, 0.5, 7)).unwrap();
        let after = LogCounters::parse(&scrape(30, 1100, 0.6, 7)).unwrap();
        assert_eq!(before.records, 100, "an exact name, not a prefix");
        // Another run of the server in between: no figures rather than wrong ones.
        let restarted = LogCounters::parse(&scrape(40, 2000, 0.9, 8)).unwrap();
        assert_eq!(GroupCommit::between(&before, &restarted), None);
        let reset = LogCounters::parse(&scrape(5, 50, 0.1, 7)).unwrap();
        assert_eq!(GroupCommit::between(&before, &reset), None);
        let g = GroupCommit::between(&before, &after).unwrap();
        assert_eq!((g.batches, g.records), (20, 1000));
        assert!((g.records_per_batch - 50.0).abs() < 1e-9);
        assert!((g.commit_ms_mean - 5.0).abs() < 1e-6, "{g:?}");
        assert_eq!(LogCounters::parse("stockd_log_batches_total 1\n"), None);
        assert_eq!(LogCounters::parse("<html>not found</html>"), None);
    }
}
