//! The scenarios. Each runs the `ceiling` phase first (GET /health, same client, same
//! connections, same limits), then its own load, then verifies against the server.
//!
//! Flash-sale and checkout split their load into rounds (`Options::rounds`) and run a
//! ceiling phase of the same length before each round and after the last: C S C S ... S C.
//! Their ratio is taken against the mean of all those ceiling phases. This machine's speed
//! drifts by tens of percent within a minute; alternating short phases makes the ceiling
//! and the scenario sample the same moments, so the drift cancels out of the ratio instead
//! of landing in it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::driver::{run_phase, run_phase_at, timed, Limits, PhaseStats, Sample};
use crate::report::{Check, GroupCommit, LogCounters, Report};
use crate::server::ServerProcess;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// GET /health only: the HTTP ceiling of this machine for this client.
    Ceiling,
    /// One hot SKU with stock S; every request reserves one unit.
    FlashSale,
    /// A shopper mix over a Zipf-skewed catalogue: reads, reserve then confirm / cancel /
    /// abandon, replenishments; verified by per-SKU conservation.
    Checkout,
    /// The checkout mix while the server is killed with SIGKILL and restarted.
    Crash,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Ceiling => "ceiling",
            Scenario::FlashSale => "flash-sale",
            Scenario::Checkout => "checkout",
            Scenario::Crash => "crash",
        }
    }
}

/// Which server to load.
#[derive(Debug, Clone)]
pub enum Target {
    /// Start this `stockd` binary on a free loopback port with a fresh data directory.
    Spawn { stockd: PathBuf, durability: String },
    /// A server already running (loopback only: see `check_loopback`).
    Url(String),
}

#[derive(Debug, Clone)]
pub struct Options {
    pub scenario: Scenario,
    pub target: Target,
    pub limits: Limits,
    /// Units of the hot SKU (flash-sale), or of each SKU (checkout).
    pub stock: u64,
    /// SKUs in the catalogue (checkout).
    pub catalogue: usize,
    /// TTL of the reservations shoppers abandon (checkout).
    pub abandon_ttl_seconds: u64,
    /// Flash-sale and checkout: the scenario's duration (and request budget) is split into
    /// this many phases, alternating with ceiling phases of the same length.
    pub rounds: usize,
}

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
    let (mut server, base) = match &opts.target {
        Target::Spawn { stockd, durability } => {
            let server = ServerProcess::start(stockd, durability)?;
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
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(opts.limits.connections)
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| e.to_string())?;

    // Flash-sale and checkout alternate ceiling and scenario phases (C S C ... S C), so
    // that the ceiling samples the same moments of a drifting machine as the scenario.
    // Every round (and ceiling phase) gets at least one request of a `--requests` budget.
    let rounds = match opts.scenario {
        Scenario::FlashSale | Scenario::Checkout => opts.rounds.clamp(
            1,
            opts.limits.requests_max.unwrap_or(u64::MAX).max(1) as usize,
        ),
        Scenario::Ceiling | Scenario::Crash => 1,
    };
    let first = ceiling(&client, &base, ceiling_limits(&opts.limits, rounds, 0)).await;
    let mut report = match opts.scenario {
        Scenario::Ceiling => Report::new("ceiling", &first, &first),
        Scenario::FlashSale => flash_sale(&client, &base, &opts, rounds, first).await?,
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
    };
    report.verified = report.verified && report.checks.iter().all(|c| c.ok);
    report.durability = durability;
    report.connections = opts.limits.connections;
    drop(server);
    Ok(report)
}

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
fn ceiling_limits(limits: &Limits, rounds: usize, round: usize) -> Limits {
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
    let log_before = log_counters(client, base).await;
    let mut ceilings = vec![first];
    let mut rounds_rps = Vec::with_capacity(rounds);
    let mut stats: Option<PhaseStats> = None;
    for round in 0..rounds {
        if round > 0 {
            let limits = ceiling_limits(&opts.limits, rounds, round);
            ceilings.push(ceiling(client, base, limits).await);
        }
        let first_n = (round as u64) << 40;
        let send = send.clone();
        let phase = run_phase_at(
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
    }
    let log_after = log_counters(client, base).await;
    let limits = ceiling_limits(&opts.limits, rounds, rounds - 1);
    ceilings.push(ceiling(client, base, limits).await);
    Interleaved {
        stats: stats.expect("at least one round"),
        rounds_rps,
        ceilings,
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
fn served(name: &str, phases: &[PhaseStats]) -> Check {
    let ok: u64 = phases.iter().map(|p| p.status(200)).sum();
    let requests: u64 = phases.iter().map(|p| p.requests).sum();
    let unanswered: u64 = phases.iter().map(|p| p.transport_errors).sum();
    Check::new(
        name,
        phases.iter().all(|p| p.status(200) > 0) && ok == requests,
        format!("{ok} of {requests} answered 200, {unanswered} unanswered"),
    )
}

async fn ceiling(client: &reqwest::Client, base: &str, limits: Limits) -> PhaseStats {
    let url = Arc::new(format!("{base}/health"));
    let client = client.clone();
    run_phase(limits, move |_, _| {
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

async fn post_json(
    client: &reqwest::Client,
    url: &str,
    body: &Value,
) -> Result<(u16, Value), String> {
    let res = client
        .post(url)
        .json(body)
        .send()
        .await
        .map_err(|e| format!("POST {url}: {e}"))?;
    let status = res.status().as_u16();
    let body = res.json().await.unwrap_or(Value::Null);
    Ok((status, body))
}

/// Creates a product with `on_hand` units; anything but 201 is an error.
pub(crate) async fn create_product(
    client: &reqwest::Client,
    base: &str,
    sku: &str,
    on_hand: u64,
) -> Result<(), String> {
    let body = json!({"sku": sku, "name": format!("Load-test item {sku}"), "on_hand": on_hand});
    match post_json(client, &format!("{base}/v1/products"), &body).await? {
        (201, _) => Ok(()),
        (status, body) => Err(format!("creating {sku}: {status} {body}")),
    }
}

pub(crate) async fn get_json(client: &reqwest::Client, url: &str) -> Result<Value, String> {
    let res = client
        .get(url)
        .send()
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    if !res.status().is_success() {
        return Err(format!("GET {url}: {}", res.status()));
    }
    res.json().await.map_err(|e| format!("GET {url}: {e}"))
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
    let bodies: Arc<Vec<Vec<u8>>> = Arc::new(
        (0..opts.limits.connections)
            .map(|w| {
                let body = json!({"customer_id": format!("buyer-{w}"),
                                  "items": [{"sku": sku, "quantity": 1}],
                                  "ttl_seconds": 86400});
                serde_json::to_vec(&body).expect("json")
            })
            .collect(),
    );
    let load_client = client.clone();
    let send = move |worker: usize, _| {
        let (client, url, bodies) = (load_client.clone(), url.clone(), bodies.clone());
        async move {
            vec![
                timed(async {
                    let res = client
                        .post(url.as_str())
                        .header("content-type", "application/json")
                        .body(bodies[worker].clone())
                        .send()
                        .await
                        .ok()?;
                    let status = res.status().as_u16();
                    res.bytes().await.ok()?;
                    Some(status)
                })
                .await,
            ]
        }
    };
    let run = interleaved(client, base, opts, rounds, first_ceiling, send).await;
    let stats = &run.stats;

    let product = get_json(client, &format!("{base}/v1/products/{sku}")).await?;
    let on_hand = product["on_hand"].as_u64().unwrap_or(0);
    let reserved = product["reserved"].as_u64().unwrap_or(u64::MAX);
    let acked = stats.status(201);
    let refused = stats.status(409);
    let answered = acked + refused;
    let expected = opts.stock.min(answered);
    let mut report = run.report("flash-sale");
    report.oversold = acked.saturating_sub(opts.stock) + reserved.saturating_sub(on_hand);
    report.lost_acks = acked.saturating_sub(reserved);
    report.checks.extend([
        Check::new(
            "no unit oversold (acknowledged ≤ stock, reserved ≤ on_hand)",
            report.oversold == 0,
            format!(
                "acknowledged {acked}, stock {}, reserved {reserved}, on_hand {on_hand}",
                opts.stock
            ),
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
            "exactly min(stock, attempts) acknowledged",
            stats.transport_errors > 0 || acked == expected,
            format!("acknowledged {acked}, expected {expected} ({answered} answered attempts)"),
        ),
        Check::new(
            "every answer is 201 or 409",
            answered + stats.transport_errors == stats.requests,
            format!("statuses {:?}", stats.by_status),
        ),
    ]);
    report.verified = report.checks.iter().all(|c| c.ok);
    Ok(report)
}
