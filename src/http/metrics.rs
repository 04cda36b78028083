//! `GET /metrics`: the server's figures in the Prometheus text format (version 0.0.4), for
//! whatever scrapes it. Counters count since the server started; gauges are read when
//! scraped. Responses are tallied by status code in one array of atomics, a relaxed
//! increment per response: no lock (both cores do touch the same counter's cache line,
//! one atomic add per response). A response is counted when stockd hands it to hyper:
//! not if the client hung up first, nor errors hyper answers itself (a malformed request
//! line, oversized headers).

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::actors::supervisor::Stats;
use crate::storage::log::LogStats;

/// Responses sent, by status code (100..=599; anything else is not counted).
pub struct Responses {
    by_status: Box<[AtomicU64]>,
}

const STATUS_MIN: u16 = 100;
const STATUS_MAX: u16 = 599;

impl Default for Responses {
    fn default() -> Responses {
        Responses {
            by_status: (STATUS_MIN..=STATUS_MAX)
                .map(|_| AtomicU64::new(0))
                .collect(),
        }
    }
}

impl Responses {
    pub fn count(&self, status: u16) {
        if let Some(slot) = status
            .checked_sub(STATUS_MIN)
            .and_then(|i| self.by_status.get(usize::from(i)))
        {
            slot.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// (status, count) for every status sent at least once, in order.
    fn sent(&self) -> impl Iterator<Item = (u16, u64)> + '_ {
        self.by_status
            .iter()
            .zip(STATUS_MIN..)
            .map(|(n, status)| (status, n.load(Ordering::Relaxed)))
            .filter(|&(_, n)| n > 0)
    }
}

/// Everything one scrape shows.
pub struct Figures<'a> {
    pub responses: &'a Responses,
    pub in_flight: usize,
    pub supervisor: Stats,
    pub log: LogStats,
    pub newest_snapshot_seq: u64,
    pub start_time_unix: f64,
    /// Diagnostic log lines not written to stderr (`crate::logging::lines_lost`).
    pub stderr_lines_lost: u64,
    /// Reservation attempts refused by the per-customer rate limit.
    pub rate_limited: u64,
    /// The change feed's figures (`None`: `--events off`).
    pub feed: Option<crate::feed::FeedStats>,
    /// Webhook figures (`None`: the change feed is off, so no webhooks).
    pub webhooks: Option<crate::webhooks::WebhookStats>,
}

/// The Prometheus text exposition of `f`.
pub fn render(f: &Figures) -> String {
    let mut out = String::with_capacity(4096);
    let mut family = |name: &str, kind: &str, help: &str, samples: &[(String, f64)]| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    let labelled = |label: &str, values: &[(&str, u64)]| -> Vec<(String, f64)> {
        values
            .iter()
            .map(|(v, n)| (format!("{{{label}=\"{v}\"}}"), *n as f64))
            .collect()
    };
    let codes: Vec<(String, f64)> = f
        .responses
        .sent()
        .map(|(status, n)| (format!("{{code=\"{status}\"}}"), n as f64))
        .collect();
    family(
        "stockd_http_responses_total",
        "counter",
        "HTTP responses sent, by status code.",
        &codes,
    );
    let e = f.supervisor.events;
    family(
        "stockd_reservations_ended_total",
        "counter",
        "Pending reservations that ended, by outcome (start-up expiries included).",
        &labelled(
            "outcome",
            &[
                ("confirmed", e.confirmed),
                ("cancelled", e.cancelled),
                ("expired", e.expired),
            ],
        ),
    );
    let (s, log) = (&f.supervisor, &f.log);
    let gauge = |name, help, value| (name, "gauge", help, value);
    let counter = |name, help, value| (name, "counter", help, value);
    let single: [(&str, &str, &str, f64); 19] = [
        gauge(
            "stockd_http_requests_in_flight",
            "Requests being served now (admission control refuses beyond its limit).",
            f.in_flight as f64,
        ),
        gauge(
            "stockd_products",
            "Products in the catalogue.",
            s.products as f64,
        ),
        gauge(
            "stockd_products_resident",
            "Products with a running actor (the others are passive until touched).",
            s.active_products as f64,
        ),
        gauge(
            "stockd_reservations_pending",
            "Pending reservations (holding stock).",
            s.pending as f64,
        ),
        gauge(
            "stockd_reservations_remembered",
            "Reservations in memory: pending, and ended ones within retention.",
            s.reservations as f64,
        ),
        counter(
            "stockd_reservations_created_total",
            "Reservations created (idempotent replays not counted).",
            e.created as f64,
        ),
        counter(
            "stockd_product_failures_total",
            "Panics in product actors (a bug) caught by the supervisor, restored in place \
             or rebuilt.",
            s.product_panics as f64,
        ),
        counter(
            "stockd_product_restarts_total",
            "Product actors rebuilt from the snapshot and the log (after a panic or a kill).",
            s.product_restarts as f64,
        ),
        counter(
            "stockd_product_activations_total",
            "Passive products given an actor again.",
            s.activations as f64,
        ),
        counter(
            "stockd_product_passivations_total",
            "Idle product actors stopped (their state kept in the supervisor).",
            s.passivations as f64,
        ),
        gauge(
            "stockd_log_healthy",
            "1 while the write-ahead log can be written; 0 once a write failed.",
            if log.healthy { 1.0 } else { 0.0 },
        ),
        gauge(
            "stockd_log_durable_sequence",
            "Sequence number of the last record flushed to the write-ahead log.",
            log.durable_seq as f64,
        ),
        counter(
            "stockd_log_records_total",
            "Records written to the write-ahead log since start.",
            log.records as f64,
        ),
        counter(
            "stockd_log_batches_total",
            "Group commits since start: records written and flushed together, their \
             waiters answered at once.",
            log.batches as f64,
        ),
        counter(
            "stockd_log_write_seconds_total",
            "Time spent writing and flushing group commits.",
            log.write_ns as f64 / 1e9,
        ),
        gauge(
            "stockd_snapshot_sequence",
            "Log sequence number the newest snapshot covers (0: none).",
            f.newest_snapshot_seq as f64,
        ),
        gauge(
            "stockd_start_time_seconds",
            "When the server started serving, in seconds since the Unix epoch.",
            f.start_time_unix,
        ),
        counter(
            "stockd_rate_limited_total",
            "Reservation attempts refused (429) by the per-customer rate limit.",
            f.rate_limited as f64,
        ),
        counter(
            "stockd_stderr_lines_lost_total",
            "Diagnostic log lines not written to stderr: it failed (a full disk, a closed \
             pipe), or it was so slow that the queue of lines was full.",
            f.stderr_lines_lost as f64,
        ),
    ];
    for (name, kind, help, value) in single {
        family(name, kind, help, &[(String::new(), value)]);
    }
    if let Some(feed) = &f.feed {
        let feed_figures = [
            (
                "stockd_events_store_bytes",
                "gauge",
                "Bytes in the change feed's store (<data>/events).",
                feed.bytes as f64,
            ),
            (
                "stockd_events_oldest_seq",
                "gauge",
                "The oldest log record whose events the feed still keeps.",
                feed.oldest_seq as f64,
            ),
            (
                "stockd_events_newest_seq",
                "gauge",
                "Log sequence number of the newest event (0: none yet).",
                feed.newest_seq as f64,
            ),
            (
                "stockd_events_through_seq",
                "gauge",
                "The feed holds the events of every log record up to this one.",
                feed.through as f64,
            ),
            (
                "stockd_events_written_total",
                "counter",
                "Events appended to the feed's store since start.",
                feed.events_written as f64,
            ),
            (
                "stockd_events_sse_clients",
                "gauge",
                "Live (Server-Sent Events) readers connected.",
                feed.readers_connected as f64,
            ),
            (
                "stockd_events_sse_dropped_total",
                "counter",
                "Live readers dropped for falling too far behind (they resume with Last-Event-ID).",
                feed.readers_dropped as f64,
            ),
            (
                "stockd_events_failed",
                "gauge",
                "1 once the feed's projector stopped on an error (a restart derives the rest).",
                if feed.failed { 1.0 } else { 0.0 },
            ),
        ];
        for (name, kind, help, value) in feed_figures {
            family(name, kind, help, &[(String::new(), value)]);
        }
    }
    if let Some(w) = &f.webhooks {
        let figures = [
            (
                "stockd_webhook_endpoints",
                "gauge",
                "Webhook endpoints registered.",
                w.endpoints as f64,
            ),
            (
                "stockd_webhook_endpoints_failing",
                "gauge",
                "Webhook endpoints whose last delivery attempt failed (being retried).",
                w.failing as f64,
            ),
            (
                "stockd_webhook_endpoints_disabled",
                "gauge",
                "Webhook endpoints disabled (gave up after the retry period, or fell behind \
                 the feed's retention) until enabled again.",
                w.disabled as f64,
            ),
            (
                "stockd_webhook_deliveries_total",
                "counter",
                "Webhook deliveries acknowledged with a 2xx.",
                w.deliveries as f64,
            ),
            (
                "stockd_webhook_delivery_failures_total",
                "counter",
                "Webhook delivery attempts that failed (not 2xx, no connection, timeout).",
                w.failures as f64,
            ),
        ];
        for (name, kind, help, value) in figures {
            family(name, kind, help, &[(String::new(), value)]);
        }
        let lag: Vec<(String, f64)> = w
            .lag
            .iter()
            .map(|(id, lag)| (format!("{{endpoint=\"{id}\"}}"), *lag as f64))
            .collect();
        family(
            "stockd_webhook_lag_records",
            "gauge",
            "Per webhook endpoint: the log record of the feed's newest event minus that of \
             the endpoint's position.",
            &lag,
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_are_counted_by_status_and_odd_statuses_ignored() {
        let r = Responses::default();
        for status in [201, 201, 409, 599, 100, 99, 600, 0, u16::MAX] {
            r.count(status);
        }
        assert_eq!(
            r.sent().collect::<Vec<_>>(),
            vec![(100, 1), (201, 2), (409, 1), (599, 1)]
        );
    }

    #[test]
    fn every_sample_line_follows_the_text_format() {
        let r = Responses::default();
        r.count(200);
        let text = render(&Figures {
            responses: &r,
            in_flight: 3,
            supervisor: Stats::default(),
            log: LogStats {
                write_ns: 1_500_000_000,
                healthy: true,
                ..LogStats::default()
            },
            newest_snapshot_seq: 7,
            start_time_unix: 1.5e9,
            stderr_lines_lost: 4,
            rate_limited: 5,
            feed: None,
            webhooks: Some(crate::webhooks::WebhookStats {
                endpoints: 2,
                disabled: 1,
                failing: 0,
                deliveries: 9,
                failures: 3,
                lag: vec![("0193a4b2-7c1e-7d3a-9f10-2b3c4d5e6f70".into(), 12)],
            }),
        });
        let mut helped = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                helped.insert(rest.split(' ').next().unwrap().to_string());
                continue;
            }
            if line.starts_with("# TYPE ") {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').expect(line);
            let name = series.split('{').next().unwrap();
            assert!(helped.contains(name), "{line}: no HELP before it");
            assert!(name.starts_with("stockd_"), "{line}");
            value.parse::<f64>().expect(line);
        }
        assert!(text.contains("stockd_http_responses_total{code=\"200\"} 1\n"));
        assert!(text.contains("stockd_log_write_seconds_total 1.5\n"));
        assert!(text.contains("stockd_snapshot_sequence 7\n"));
        assert!(text.contains("stockd_log_healthy 1\n"));
        assert!(text.contains("stockd_stderr_lines_lost_total 4\n"));
        assert!(text.contains("stockd_rate_limited_total 5\n"));
        assert!(text.contains("stockd_webhook_endpoints_disabled 1\n"));
        assert!(text.contains("stockd_webhook_deliveries_total 9\n"));
        assert!(text.contains(
            "stockd_webhook_lag_records{endpoint=\"0193a4b2-7c1e-7d3a-9f10-2b3c4d5e6f70\"} 12\n"
        ));
    }
}
