//! The scenarios. Each runs the `ceiling` phase first (GET /health, same client, same
//! connections, same limits), then its own load, then verifies against the server.
//!
//! Flash-sale and checkout alternate their load with ceiling phases (`crate::rounds`).

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use crate::api::{create_product, get_json};
use crate::driver::{timed, PhaseStats};
use crate::follow::Follower;
use crate::options::{Options, Scenario, Target};
use crate::report::{Check, Report};
use crate::rounds::{ceiling, ceiling_limits, interleaved, served};
use crate::server::ServerProcess;

fn check_loopback(url: &str) -> Result<(), String> {
    let host = url
        .strip_prefix("http://")
        .and_then(|rest| rest.split(['/', ':']).next())
        .unwrap_or("");
    if matches!(host, "127.0.0.1" | "localhost" | "[::1]") {
        Ok(())
    } else {
        Err(format!(
            "refusing to load {url}: only loopback targets are allowed"
        ))
    }
}

/// Runs the scenario and verifies it. The report says whether verification passed.
pub async fn run(opts: Options) -> Result<Report, String> {
    if matches!(opts.scenario, Scenario::Failover | Scenario::Cluster) {
        return run_cluster(opts).await;
    }
    let (mut server, base) = match &opts.target {
        Target::Spawn { stockd, durability } => {
            // A live reader needs the feed, whatever the server's default.
            let args: &[&str] = if opts.follow_events {
                &["--events", "on"]
            } else {
                &[]
            };
            let server = ServerProcess::fresh_with(stockd, durability, args)?;
            let base = server.base_url.clone();
            (Some(server), base)
        }
        Target::Url(url) => {
            check_loopback(url)?;
            (None, url.trim_end_matches('/').to_string())
        }
    };
    let durability = match &opts.target {
        Target::Spawn { durability, .. } => Some(durability.clone()),
        Target::Url(_) => None,
    };
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(key) = &opts.api_key {
        let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {key}"))
            .map_err(|_| "--api-key must be printable ASCII".to_string())?;
        value.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    let client = load_client(headers, &opts)?;

    // Flash-sale and checkout alternate ceiling and scenario phases (C S C ... S C), so
    // that the ceiling samples the same moments of a drifting machine as the scenario.
    // Every round (and ceiling phase) gets at least one request of a `--requests` budget.
    let rounds = match opts.scenario {
        Scenario::FlashSale | Scenario::Checkout | Scenario::Limits => opts.rounds.clamp(
            1,
            opts.limits.requests_max.unwrap_or(u64::MAX).max(1) as usize,
        ),
        Scenario::Ceiling | Scenario::Crash | Scenario::Failover | Scenario::Cluster => 1,
    };
    let label = match opts.scenario {
        Scenario::FlashSale | Scenario::Checkout | Scenario::Limits => {
            format!("ceiling 1/{}", rounds + 1)
        }
        _ => "ceiling".to_string(),
    };
    let follower = match opts.follow_events {
        true => Some(Follower::start(&client, &base).await?),
        false => None,
    };
    let limits = ceiling_limits(&opts.limits, rounds, 0);
    let first = ceiling(&client, &base, &label, limits).await;
    let mut report = match opts.scenario {
        Scenario::Ceiling => Report::new("ceiling", &first, &first),
        Scenario::FlashSale => flash_sale(&client, &base, &opts, rounds, first).await?,
        Scenario::Limits => crate::limits::limits(&client, &base, &opts, rounds, first).await?,
        Scenario::Checkout => {
            crate::checkout::checkout(&client, &base, &opts, rounds, first).await?
        }
        Scenario::Crash => {
            let server = server
                .as_mut()
                .ok_or("the crash scenario starts its own server: give --stockd")?;
            let mut report = crate::crash::crash(&client, server, &opts, &first).await?;
            // A ratio against a ceiling the server did not serve means nothing.
            report
                .checks
                .push(served("the ceiling phase was served", &[first]));
            report
        }
        Scenario::Failover | Scenario::Cluster => unreachable!("run_cluster"),
    };
    if let Some(follower) = follower {
        let (lag, check) = follower.finish().await;
        report.feed_lag = Some(lag);
        report.checks.push(check);
    }
    report.verified = report.verified && report.checks.iter().all(|c| c.ok);
    report.durability = durability;
    report.connections = opts.limits.connections;
    drop(server);
    Ok(report)
}

/// The load's client: keep-alive connections, one per worker, 30 s per request.
fn load_client(
    headers: reqwest::header::HeaderMap,
    opts: &Options,
) -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .default_headers(headers)
        .pool_max_idle_per_host(opts.limits.connections)
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| e.to_string())
}

/// `failover` and `cluster`: they always start their own servers (a cluster, and for
/// `cluster` one node too) from the `stockd` binary given, on loopback.
async fn run_cluster(opts: Options) -> Result<Report, String> {
    let Target::Spawn { stockd, .. } = &opts.target else {
        return Err(format!(
            "the {} scenario starts its own cluster: give --stockd, not --target",
            opts.scenario.name()
        ));
    };
    if opts.follow_events {
        return Err("cluster nodes have no change feed: --follow-events is refused".into());
    }
    // The nodes run open on loopback: no key is sent.
    let client = load_client(reqwest::header::HeaderMap::new(), &opts)?;
    let mut report = match opts.scenario {
        Scenario::Failover => crate::failover::failover(&client, stockd, &opts).await?,
        _ => {
            let rounds = opts.rounds.clamp(
                1,
                opts.limits.requests_max.unwrap_or(u64::MAX).max(1) as usize,
            );
            crate::cluster_ratio::cluster_ratio(&client, stockd, &opts, rounds).await?
        }
    };
    if report.durability.is_none() {
        report.durability = Some("the cluster's (commit on a majority)".into());
    }
    report.connections = opts.limits.connections;
    Ok(report)
}

/// POSTs a JSON body and reads the whole answer: its status, or `None` if none came.
pub async fn post_json_body(client: &reqwest::Client, url: &str, body: Vec<u8>) -> Option<u16> {
    let res = client
        .post(url)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .ok()?;
    let status = res.status().as_u16();
    res.bytes().await.ok()?;
    Some(status)
}

/// The flash sale's request bodies, one per connection: a buyer of its own reserving one
/// unit of `sku` for a day (the `flash-sale`, `cluster` and `failover` scenarios).
pub(crate) fn flash_sale_bodies(sku: &str, connections: usize) -> Vec<Vec<u8>> {
    (0..connections)
        .map(|w| {
            let body = json!({"customer_id": format!("buyer-{w}"),
                              "items": [{"sku": sku, "quantity": 1}],
                              "ttl_seconds": 86400});
            serde_json::to_vec(&body).expect("json")
        })
        .collect()
}

async fn flash_sale(
    client: &reqwest::Client,
    base: &str,
    opts: &Options,
    rounds: usize,
    first_ceiling: PhaseStats,
) -> Result<Report, String> {
    let sku = format!("FLASH-{}", std::process::id());
    create_product(client, base, &sku, opts.stock).await?;
    let url = Arc::new(format!("{base}/v1/reservations"));
    let bodies = Arc::new(flash_sale_bodies(&sku, opts.limits.connections));
    let load_client = client.clone();
    let send = move |worker: usize, _| {
        let (client, url, bodies) = (load_client.clone(), url.clone(), bodies.clone());
        async move { vec![timed(post_json_body(&client, &url, bodies[worker].clone())).await] }
    };
    let run = interleaved(client, base, opts, rounds, first_ceiling, send).await;
    let stats = &run.stats;
    let mut report = run.report("flash-sale");
    check_hot_sku(client, base, &sku, opts.stock, stats, &mut report).await?;
    let acked = stats.status(201);
    let answered = acked + stats.status(409);
    let expected = opts.stock.min(answered);
    report.checks.push(Check::new(
        "exactly min(stock, attempts) acknowledged",
        stats.transport_errors > 0 || acked == expected,
        format!("acknowledged {acked}, expected {expected} ({answered} answered attempts)"),
    ));
    report.verified = report.checks.iter().all(|c| c.ok);
    Ok(report)
}

/// What every scenario that reserves one hot SKU checks against the server's figures:
/// nothing oversold, every acknowledged hold held and nothing else, every answer 201 or
/// 409 (`report.oversold` and `report.lost_acks` are set here).
pub(crate) async fn check_hot_sku(
    client: &reqwest::Client,
    base: &str,
    sku: &str,
    stock: u64,
    stats: &PhaseStats,
    report: &mut Report,
) -> Result<(), String> {
    let product = get_json(client, &format!("{base}/v1/products/{sku}")).await?;
    let on_hand = product["on_hand"].as_u64().unwrap_or(0);
    let reserved = product["reserved"].as_u64().unwrap_or(u64::MAX);
    let acked = stats.status(201);
    let answered = acked + stats.status(409);
    report.oversold = acked.saturating_sub(stock) + reserved.saturating_sub(on_hand);
    report.lost_acks = acked.saturating_sub(reserved);
    report.checks.extend([
        Check::new(
            "no unit oversold (acknowledged ≤ stock, reserved ≤ on_hand)",
            report.oversold == 0,
            format!("acknowledged {acked}, stock {stock}, reserved {reserved}, on_hand {on_hand}"),
        ),
        Check::new(
            "every acknowledged hold is held by the server",
            report.lost_acks == 0,
            format!("acknowledged {acked}, server reserved {reserved}"),
        ),
        Check::new(
            "nothing held that was not acknowledged",
            stats.transport_errors > 0 || reserved == acked,
            format!(
                "server reserved {reserved}, acknowledged {acked}, unanswered {}",
                stats.transport_errors
            ),
        ),
        Check::new(
            "every answer is 201 or 409",
            answered + stats.transport_errors == stats.requests,
            format!("statuses {:?}", stats.by_status),
        ),
    ]);
    Ok(())
}
