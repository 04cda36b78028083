//! The `limits` scenario: a flash sale with a purchase limit. One hot SKU carries
//! `max_per_customer`; every other request comes from one of a few greedy buyers who keep
//! asking, the rest from buyers who ask once. Verified: no buyer holds more than the limit
//! (counted by the client from its 201s, and asked of the server), nothing oversold, every
//! acknowledged hold held.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde_json::json;

use crate::api::post_json;
use crate::driver::{timed, PhaseStats};
use crate::options::Options;
use crate::report::{Check, Report};
use crate::rounds::interleaved;
use crate::scenarios::{check_hot_sku, post_json_body};

/// How many greedy buyers share half of the requests.
pub const GREEDY_BUYERS: usize = 16;

fn greedy_id(run: u32, g: usize) -> String {
    format!("greedy-{run}-{g}")
}

pub(crate) async fn limits(
    client: &reqwest::Client,
    base: &str,
    opts: &Options,
    rounds: usize,
    first_ceiling: PhaseStats,
) -> Result<Report, String> {
    let run = std::process::id();
    let sku = format!("LIMITED-{run}");
    let limit = opts.max_per_customer;
    let body = json!({"sku": sku, "name": "Load-test limited item", "on_hand": opts.stock,
                      "max_per_customer": limit});
    match post_json(client, &format!("{base}/v1/products"), &body).await? {
        (201, _) => {}
        (status, body) => return Err(format!("creating {sku}: {status} {body}")),
    }
    let url = Arc::new(format!("{base}/v1/reservations"));
    let greedy_acked: Arc<Vec<AtomicU64>> =
        Arc::new((0..GREEDY_BUYERS).map(|_| AtomicU64::new(0)).collect());
    let load_client = client.clone();
    let (load_sku, acked) = (Arc::new(sku.clone()), greedy_acked.clone());
    let send = move |worker: usize, iteration: u64| {
        let (client, url, sku, acked) = (
            load_client.clone(),
            url.clone(),
            load_sku.clone(),
            acked.clone(),
        );
        async move {
            // Even iterations: a greedy buyer (each worker cycles through them); odd: a
            // buyer of this worker and iteration, who asks once.
            let greedy = iteration
                .is_multiple_of(2)
                .then(|| (worker + (iteration / 2) as usize) % GREEDY_BUYERS);
            let customer = match greedy {
                Some(g) => greedy_id(run, g),
                None => format!("once-{run}-{worker}-{iteration}"),
            };
            let body = json!({"customer_id": customer,
                              "items": [{"sku": *sku, "quantity": 1}],
                              "ttl_seconds": 86400});
            let body = serde_json::to_vec(&body).expect("json");
            vec![
                timed(async {
                    let status = post_json_body(&client, &url, body).await?;
                    if let (201, Some(g)) = (status, greedy) {
                        acked[g].fetch_add(1, Ordering::Relaxed);
                    }
                    Some(status)
                })
                .await,
            ]
        }
    };
    let run_stats = interleaved(client, base, opts, rounds, first_ceiling, send).await;
    let stats = &run_stats.stats;

    // Ask the server each greedy buyer's count: a request for more than the limit is
    // always refused by the limit, with the count (and holds nothing).
    let mut over_limit = Vec::new();
    let mut disagree = Vec::new();
    for (g, client_count) in greedy_acked.iter().enumerate() {
        let client_count = client_count.load(Ordering::Relaxed);
        let probe = json!({"customer_id": greedy_id(run, g),
                           "items": [{"sku": sku, "quantity": limit + 1}]});
        let (status, body) = post_json(client, &format!("{base}/v1/reservations"), &probe).await?;
        let held = match (status, body["code"].as_str(), body["held"].as_u64()) {
            (409, Some("customer_limit_exceeded"), Some(held)) => held,
            _ => return Err(format!("probing {}: {status} {body}", greedy_id(run, g))),
        };
        if held > limit || client_count > limit {
            over_limit.push(format!("greedy-{g}: server {held}, client {client_count}"));
        }
        if stats.transport_errors == 0 && held != client_count {
            disagree.push(format!("greedy-{g}: server {held}, client {client_count}"));
        }
    }
    let greedy_total: u64 = greedy_acked.iter().map(|a| a.load(Ordering::Relaxed)).sum();
    let mut report = run_stats.report("limits");
    check_hot_sku(client, base, &sku, opts.stock, stats, &mut report).await?;
    report.checks.extend([
        Check::new(
            "no buyer above the limit (server and client counts)",
            over_limit.is_empty(),
            if over_limit.is_empty() {
                format!(
                    "limit {limit}; {GREEDY_BUYERS} greedy buyers hold {greedy_total} between them"
                )
            } else {
                over_limit.join("; ")
            },
        ),
        Check::new(
            "the server's count of each greedy buyer is what was acknowledged to it",
            disagree.is_empty(),
            if disagree.is_empty() {
                format!("{GREEDY_BUYERS} buyers probed")
            } else {
                disagree.join("; ")
            },
        ),
    ]);
    report.verified = report.checks.iter().all(|c| c.ok);
    Ok(report)
}
