//! The `crash` scenario: the checkout mix while the server is killed with SIGKILL at a
//! random moment, then restarted on the same data directory.
//!
//! Verified after the restart: every reservation a client was told about exists with the
//! status it was told (a pending hold whose deadline passed may since have expired; one
//! whose confirm or cancel got no answer may be in either state); for every SKU,
//! `reserved ≤ on_hand`, `sold` covers every acknowledged confirm, and units are conserved
//! (`on_hand + sold` = initial + acknowledged replenishments, plus at most the
//! replenishments whose answer never came). The report carries the recovery time: from
//! exec of the new process to `listening on`.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::api::get_json;
use crate::checkout::{allowed_answers, setup, shopper, Acked};
use crate::driver::{run_labelled_phase, Limits, PhaseStats};
use crate::options::Options;
use crate::report::{Check, Report};
use crate::server::ServerProcess;

/// Reservation look-ups in flight at once during verification.
const VERIFY_CONNECTIONS: usize = 32;

pub async fn crash(
    client: &reqwest::Client,
    server: &mut ServerProcess,
    opts: &Options,
    ceiling: &PhaseStats,
) -> Result<Report, String> {
    let shared = setup(client, &server.base_url, opts, true).await?;
    let limits = Limits {
        stop_on_error: true,
        ..opts.limits
    };
    let load = shared.clone();
    let started = std::time::Instant::now();
    let running = tokio::spawn(run_labelled_phase(
        "crash: load to the kill",
        limits,
        move |worker, n| shopper(load.clone(), worker, n),
    ));
    // Somewhere between 30 % and 70 % of the run.
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let at = 0.3 + 0.4 * f64::from(nanos % 1000) / 1000.0;
    tokio::time::sleep(limits.duration.mul_f64(at)).await;
    server.kill9();
    let killed_at = started.elapsed();
    let stats = running.await.map_err(|e| format!("load task: {e}"))?;
    let recovery = server.restart()?;
    let base = server.base_url.clone();

    let acked: Vec<(String, Acked)> = shared
        .track
        .as_ref()
        .map(|t| t.lock().unwrap().clone().into_iter().collect())
        .unwrap_or_default();
    let (mismatches, confirmed_on_server) =
        check_reservations(client, &base, acked.clone()).await?;
    let mut products = Vec::with_capacity(shared.skus.len());
    for sku in &shared.skus {
        products.push(get_json(client, &format!("{base}/v1/products/{sku}")).await?);
    }
    let told = shared.told();
    let audit = told.audit(&shared.skus, &products, opts.stock);
    let mut report = Report::new("crash", &stats, ceiling);
    report.oversold = audit.oversold(&told);
    report.lost_acks = mismatches.len() as u64 + audit.missing;
    report.recovery_ms = Some(recovery.as_secs_f64() * 1000.0);
    report.killed_at_s = Some(killed_at.as_secs_f64());
    report.checks = vec![
        Check::new(
            "the server was killed while the load ran",
            !acked.is_empty() && stats.transport_errors > 0,
            format!(
                "killed at {:.0} % of the run ({:.1} s) after {} acknowledged reservations; \
                 {} requests then unanswered, and the load stopped there",
                at * 100.0,
                killed_at.as_secs_f64(),
                acked.len(),
                stats.transport_errors
            ),
        ),
        Check::new(
            "every acknowledged reservation survived with its acknowledged status",
            mismatches.is_empty(),
            if mismatches.is_empty() {
                format!(
                    "{} reservations checked, {confirmed_on_server} confirmed",
                    acked.len()
                )
            } else {
                mismatches
                    .iter()
                    .take(3)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("; ")
            },
        ),
    ];
    report.checks.extend(audit.checks(&told));
    let answered = stats.requests - stats.transport_errors;
    report
        .checks
        .push(allowed_answers(told.unexpected(), answered));
    report.verified = report.checks.iter().all(|c| c.ok);
    Ok(report)
}

/// Looks up every acknowledged reservation; answers the mismatches and how many are
/// confirmed on the server.
async fn check_reservations(
    client: &reqwest::Client,
    base: &str,
    acked: Vec<(String, Acked)>,
) -> Result<(Vec<String>, u64), String> {
    let acked = Arc::new(acked);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..VERIFY_CONNECTIONS {
        let (client, base, acked, next) = (
            client.clone(),
            base.to_string(),
            acked.clone(),
            next.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut mismatches = Vec::new();
            let mut confirmed = 0u64;
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some((id, a)) = acked.get(i) else { break };
                let url = format!("{base}/v1/reservations/{id}");
                let status = match get_json(&client, &url).await {
                    Ok(view) => view["status"].as_str().unwrap_or("").to_string(),
                    Err(err) => {
                        mismatches.push(format!("{id}: {err}"));
                        continue;
                    }
                };
                confirmed += u64::from(status == "confirmed");
                let ok = match (a.status, a.unsure, status.as_str()) {
                    (told, false, now) if told == now => true,
                    // An abandoned hold's deadline may have passed during the kill and the
                    // restart (the others have a 300 s TTL).
                    ("pending", false, "expired") => a.abandoned,
                    // Its confirm or cancel got no answer: it happened or it did not.
                    ("pending", true, now) => now == "pending" || Some(now) == a.sent,
                    _ => false,
                };
                if !ok {
                    mismatches.push(format!(
                        "{id}: told {}{}, server says {status}",
                        a.status,
                        if a.unsure { " (then unsure)" } else { "" }
                    ));
                }
            }
            (mismatches, confirmed)
        }));
    }
    let mut mismatches = Vec::new();
    let mut confirmed = 0;
    for task in tasks {
        let (m, c) = task.await.map_err(|e| e.to_string())?;
        mismatches.extend(m);
        confirmed += c;
    }
    tokio::time::sleep(Duration::ZERO).await;
    Ok((mismatches, confirmed))
}
