//! The `cluster` scenario: the flash sale on a three-node cluster (`crate::cluster`),
//! sent to its leader, against the flash sale on one node (`stockd serve --durability
//! sync`), both started by the run and both running throughout, with the same client and
//! connections, alternating: one node, cluster, one node, ... cluster, one node (O K O K O
//! K O with `--rounds 3`, every phase `--duration / R` long). The ratio is the cluster's
//! throughput over the mean of all the one-node phases, and each cluster round is also
//! set against the one-node phases either side of it: the same scheme as the ceiling
//! phases of `crate::rounds`, with the one-node flash sale as the baseline. Each server
//! has its own hot SKU of `--stock` units; both are verified as the flash sale is
//! (nothing oversold, every acknowledged hold held and nothing else, every answer 201 or
//! 409), and the cluster's leader must not change during the run.
//!
//! The request is the flash sale's (no `Idempotency-Key`), sent to the leader's address:
//! a 307 (the leadership moved) would be followed, and shows as a leader change.

use std::sync::Arc;
use std::time::Duration;

use crate::api::create_product;
use crate::cluster::LocalCluster;
use crate::driver::{run_phase_at, timed, PhaseStats, Sample};
use crate::options::Options;
use crate::report::{Check, Report};
use crate::rounds::round_limits;
use crate::scenarios::{check_hot_sku, post_json_body};
use crate::server::ServerProcess;

/// What one flash-sale request needs: the reservations URL and each worker's body.
type Sender = Arc<dyn Fn(usize, u64) -> SampleFuture + Send + Sync>;
type SampleFuture = std::pin::Pin<Box<dyn std::future::Future<Output = Vec<Sample>> + Send>>;

fn flash_sender(client: &reqwest::Client, base: &str, sku: &str, connections: usize) -> Sender {
    let url = Arc::new(format!("{base}/v1/reservations"));
    let bodies = Arc::new(crate::scenarios::flash_sale_bodies(sku, connections));
    let client = client.clone();
    Arc::new(move |worker, _| {
        let (client, url, bodies) = (client.clone(), url.clone(), bodies.clone());
        Box::pin(
            async move { vec![timed(post_json_body(&client, &url, bodies[worker].clone())).await] },
        )
    })
}

pub async fn cluster_ratio(
    client: &reqwest::Client,
    stockd: &std::path::Path,
    opts: &Options,
    rounds: usize,
) -> Result<Report, String> {
    let single = ServerProcess::fresh(stockd, "sync")?;
    let path = stockd.to_path_buf();
    let cluster = tokio::task::spawn_blocking(move || LocalCluster::start(&path))
        .await
        .map_err(|e| format!("starting the cluster: {e}"))??;
    let result = run(client, &single, &cluster, opts, rounds).await;
    // Every process stops here, whatever happened (and on a panic, when dropped).
    drop(cluster);
    drop(single);
    result
}

async fn run(
    client: &reqwest::Client,
    single: &ServerProcess,
    cluster: &LocalCluster,
    opts: &Options,
    rounds: usize,
) -> Result<Report, String> {
    let rounds = rounds.max(1);
    let leader = cluster.serving_leader(client, None).await?;
    let leader_base = cluster.base(leader);
    let sku = format!("FLASH-{}", std::process::id());
    create_product(client, &single.base_url, &sku, opts.stock).await?;
    create_product(client, &leader_base, &sku, opts.stock).await?;
    let on_single = flash_sender(client, &single.base_url, &sku, opts.limits.connections);
    let on_cluster = flash_sender(client, &leader_base, &sku, opts.limits.connections);

    let phase = |label: String, send: Sender, round: usize, offset: Duration| async move {
        let limits = round_limits(&opts.limits, rounds, round);
        let first_n = (round as u64) << 40;
        run_phase_at(&label, limits, offset, move |w, n| send(w, n + first_n)).await
    };
    let mut singles: Vec<PhaseStats> = Vec::with_capacity(rounds + 1);
    let mut single_all: Option<PhaseStats> = None;
    let mut clustered: Option<PhaseStats> = None;
    let mut rounds_rps = Vec::with_capacity(rounds);
    let mut round_ends = Vec::with_capacity(rounds);
    for round in 0..=rounds {
        let label = format!("one node {}/{}", round + 1, rounds + 1);
        let offset = single_all.as_ref().map_or(Duration::ZERO, |s| s.elapsed);
        let s = phase(label, on_single.clone(), round.min(rounds - 1), offset).await;
        match &mut single_all {
            Some(all) => all.append(&s),
            None => single_all = Some(s.clone()),
        }
        singles.push(s);
        if round == rounds {
            break;
        }
        let label = format!("cluster {}/{rounds}", round + 1);
        let offset = clustered.as_ref().map_or(Duration::ZERO, |s| s.elapsed);
        let k = phase(label, on_cluster.clone(), round, offset).await;
        rounds_rps.push(k.throughput_rps());
        match &mut clustered {
            Some(all) => all.append(&k),
            None => clustered = Some(k),
        }
        round_ends.extend(clustered.as_ref().map(|s| s.elapsed));
    }
    let stats = clustered.expect("a cluster round");
    let single_all = single_all.expect("a one-node phase");
    let mut report = Report::new("cluster", &stats, &single_all);
    let rps: Vec<f64> = singles.iter().map(|s| s.throughput_rps()).collect();
    report.set_ceilings(&rps, &rounds_rps);
    report.baseline = Some("flash sale, one node (sync)".to_string());
    report.durability = Some("sync (one node) / the cluster's (commit on a majority)".into());
    report.ceilings_at_s = std::iter::once(0.0)
        .chain(round_ends.iter().map(Duration::as_secs_f64))
        .collect();

    // Each server against its own answers.
    let mut one = Report::new("one node", &single_all, &single_all);
    check_hot_sku(
        client,
        &single.base_url,
        &sku,
        opts.stock,
        &single_all,
        &mut one,
    )
    .await?;
    check_hot_sku(client, &leader_base, &sku, opts.stock, &stats, &mut report).await?;
    for check in &mut report.checks {
        check.name = format!("cluster: {}", check.name);
    }
    report.checks.extend(one.checks.into_iter().map(|mut c| {
        c.name = format!("one node: {}", c.name);
        c
    }));
    let still = cluster.serving_leader(client, None).await?;
    report.checks.push(Check::new(
        "the cluster's leader did not change during the run",
        still == leader,
        format!("node {leader} at the start, node {still} at the end"),
    ));
    report.checks.push(Check::new(
        "no phase ran sold out (a 409 is cheaper than a hold: give more --stock)",
        single_all.status(409) == 0 && stats.status(409) == 0,
        format!(
            "409s: one node {}, cluster {}",
            single_all.status(409),
            stats.status(409)
        ),
    ));
    report.verified = report.checks.iter().all(|c| c.ok)
        && stats.transport_errors == 0
        && single_all.transport_errors == 0;
    Ok(report)
}
