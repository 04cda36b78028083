//! The `failover` scenario: the flash sale against a three-node cluster
//! (`crate::cluster`) whose leader is killed with SIGKILL mid-run (30–70 % of it), the
//! load going on against the two survivors.
//!
//! The client acts as a shop's checkout: every reservation has its own `Idempotency-Key`;
//! it is sent to the node that last served one, follows a follower's 307 to the leader,
//! and on a 503 (no leader ready, or an epoch that ended) or no answer (the killed node)
//! is sent again, with the same key and body, to the next node, backing off from 5 ms to
//! 100 ms (each wait drawn from its upper half), for at most `GIVE_UP`. (It does not wait
//! the 503's `Retry-After: 1`: the gap measured is the cluster's, not the client's.) Its sample is the whole attempt: its final status and
//! the time from the first try to it.
//!
//! Verified on the leader after the load: every acknowledged hold exists and is pending
//! (`GET /v1/reservations/{id}`), no two keys were given the same reservation, the server's
//! `reserved` is the number of acknowledged holds (no retry held twice, none lost; plus at
//! most the attempts given up), nothing oversold, every final answer 201 or 409. Then the
//! killed node is restarted on its directory, and all three must have the same state
//! digest at the same position. Reported: the failover gap, from the kill to the first 2xx
//! answered by another node, and from the killed leader's last 2xx to that one.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::api::get_json;
use crate::cluster::LocalCluster;
use crate::driver::{run_labelled_phase, Sample};
use crate::options::Options;
use crate::report::{Check, Failover, Report};
use crate::rounds::{ceiling, ceiling_limits, served};

/// How long one reservation is retried before it counts as unanswered.
pub const GIVE_UP: Duration = Duration::from_secs(30);
/// Reservation look-ups in flight at once during verification.
const VERIFY_CONNECTIONS: usize = 32;

/// When 2xx answers came, in nanoseconds since the load started, around the kill.
struct Clock {
    started: Instant,
    /// The kill, in ns since `started` (`u64::MAX` until then).
    kill_ns: AtomicU64,
    /// The node killed (0 until then).
    killed: AtomicU64,
    /// The last 2xx of the killed leader (or of any node before the kill), + 1 (0: none).
    last_before: AtomicU64,
    /// The first 2xx of another node after the kill (`u64::MAX`: none).
    first_after: AtomicU64,
    acked_before: AtomicU64,
    acked_after: AtomicU64,
}

impl Clock {
    /// Nothing killed and nothing acknowledged yet, the load started at `started`.
    fn new(started: Instant) -> Clock {
        Clock {
            started,
            kill_ns: AtomicU64::new(u64::MAX),
            killed: AtomicU64::new(0),
            last_before: AtomicU64::new(0),
            first_after: AtomicU64::new(u64::MAX),
            acked_before: AtomicU64::new(0),
            acked_after: AtomicU64::new(0),
        }
    }
}

impl Clock {
    fn answered(&self, node: Option<u64>) {
        let at = self.started.elapsed().as_nanos() as u64;
        let killed = self.killed.load(Ordering::SeqCst);
        let kill = self.kill_ns.load(Ordering::SeqCst);
        // An answer of the killed node read after the kill was sent before it.
        if at < kill || node == Some(killed) {
            self.last_before.fetch_max(at + 1, Ordering::SeqCst);
            self.acked_before.fetch_add(1, Ordering::Relaxed);
        } else {
            self.first_after.fetch_min(at, Ordering::SeqCst);
            self.acked_after.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// What the load shares.
struct Shared {
    client: reqwest::Client,
    /// Every node: its id, `http://API/v1/reservations`, and its API port.
    nodes: Vec<(u64, String, u16)>,
    /// The index in `nodes` to try first: the one that last served.
    hint: AtomicUsize,
    bodies: Vec<Vec<u8>>,
    prefix: String,
    clock: Clock,
    retries: AtomicU64,
    replayed: AtomicU64,
    /// The id of every acknowledged hold.
    ids: Mutex<Vec<String>>,
}

impl Shared {
    /// One reservation, tried until a definite answer (not 503, and an answer) or
    /// `GIVE_UP`.
    async fn reserve(self: Arc<Self>, worker: usize, n: u64) -> Vec<Sample> {
        let key = format!("{}-{worker}-{n}", self.prefix);
        let started = Instant::now();
        let mut backoff = Duration::from_millis(5);
        let mut tries = 0u64;
        let status = loop {
            let at = self.hint.load(Ordering::Relaxed) % self.nodes.len();
            if let Some(status) = self.try_once(at, &key, worker).await {
                break Some(status);
            }
            tries += 1;
            // Another connection may have moved on already.
            let _ = self.hint.compare_exchange(
                at,
                (at + 1) % self.nodes.len(),
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
            if started.elapsed() > GIVE_UP {
                break None;
            }
            // Jittered, so that the connections that failed together do not come back
            // together (they would sample the new leader's start in lockstep).
            tokio::time::sleep(backoff.mul_f64(0.5 + fastrand::f64() / 2.0)).await;
            backoff = (backoff * 2).min(Duration::from_millis(100));
        };
        self.retries.fetch_add(tries, Ordering::Relaxed);
        vec![Sample {
            status,
            latency_us: started.elapsed().as_micros() as u64,
        }]
    }

    /// One try on node `at` (following a 307): the final status, or `None` for a 503 or
    /// no (whole) answer.
    async fn try_once(&self, at: usize, key: &str, worker: usize) -> Option<u16> {
        let res = self
            .client
            .post(&self.nodes[at].1)
            .header("content-type", "application/json")
            .header("idempotency-key", key)
            .body(self.bodies[worker].clone())
            .send()
            .await
            .ok()?;
        let status = res.status().as_u16();
        if status == 503 {
            return None;
        }
        let port = res.url().port();
        let replayed = res.headers().contains_key("idempotent-replayed");
        let body = res.bytes().await.ok()?;
        if (200..300).contains(&status) {
            let served = self.nodes.iter().position(|n| Some(n.2) == port);
            self.clock.answered(served.map(|i| self.nodes[i].0));
            if let Some(i) = served {
                self.hint.store(i, Ordering::Relaxed);
            }
            self.replayed
                .fetch_add(u64::from(replayed), Ordering::Relaxed);
            let id = serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|v| Some(v["id"].as_str()?.to_string()))
                .unwrap_or_default();
            self.ids.lock().unwrap().push(id);
        }
        Some(status)
    }
}

/// Runs the scenario on a cluster of `stockd` it starts; the report says whether it
/// verified. `restart_killed`: restart the killed node and compare the digests.
pub async fn failover(
    client: &reqwest::Client,
    stockd: &std::path::Path,
    opts: &Options,
) -> Result<Report, String> {
    let path = stockd.to_path_buf();
    let mut cluster = tokio::task::spawn_blocking(move || LocalCluster::start(&path))
        .await
        .map_err(|e| format!("starting the cluster: {e}"))??;
    let result = run(client, &mut cluster, opts).await;
    // Every node stops here, whatever happened (and on a panic, when dropped).
    drop(cluster);
    result
}

async fn run(
    client: &reqwest::Client,
    cluster: &mut LocalCluster,
    opts: &Options,
) -> Result<Report, String> {
    let leader = cluster.serving_leader(client, None).await?;
    let base = cluster.base(leader);
    let sku = format!("FLASH-{}", std::process::id());
    create_product_retrying(client, &cluster.bases(), &sku, opts.stock).await?;

    let first = ceiling(client, &base, "ceiling", ceiling_limits(&opts.limits, 1, 0)).await;

    let nodes: Vec<(u64, String, u16)> = cluster
        .bases()
        .into_iter()
        .map(|(id, base)| {
            let port = base.rsplit(':').next().and_then(|p| p.parse().ok());
            (id, format!("{base}/v1/reservations"), port.unwrap_or(0))
        })
        .collect();
    let bodies = crate::scenarios::flash_sale_bodies(&sku, opts.limits.connections);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let started = Instant::now();
    let shared = Arc::new(Shared {
        client: client.clone(),
        hint: AtomicUsize::new(nodes.iter().position(|n| n.0 == leader).unwrap_or(0)),
        nodes,
        bodies,
        prefix: format!("fo-{}-{}", std::process::id(), now.as_millis()),
        clock: Clock::new(started),
        retries: AtomicU64::new(0),
        replayed: AtomicU64::new(0),
        ids: Mutex::new(Vec::new()),
    });

    // Somewhere between 30 % and 70 % of the run: of its duration, or of its request
    // budget, whichever comes first.
    let at = 0.3 + 0.4 * f64::from(now.subsec_nanos() % 1000) / 1000.0;
    let limits = opts.limits;
    let counted = Arc::new(AtomicU64::new(0));
    let load = shared.clone();
    let issued = counted.clone();
    let running = tokio::spawn(run_labelled_phase("failover", limits, move |worker, n| {
        issued.fetch_add(1, Ordering::Relaxed);
        load.clone().reserve(worker, n)
    }));
    let kill_after = limits.duration.mul_f64(at);
    let kill_at_request = limits.requests_max.map(|max| (max as f64 * at) as u64);
    loop {
        let due = started.elapsed() >= kill_after
            || kill_at_request.is_some_and(|n| counted.load(Ordering::Relaxed) >= n);
        if due || running.is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let killed = cluster.serving_leader(client, None).await?;
    let killed_while_running = !running.is_finished();
    shared.clock.killed.store(killed, Ordering::SeqCst);
    let kill_ns = started.elapsed().as_nanos() as u64;
    shared.clock.kill_ns.store(kill_ns, Ordering::SeqCst);
    let killed_at_unix_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    cluster.kill9(killed);
    let stats = running.await.map_err(|e| format!("load task: {e}"))?;

    let new_leader = cluster.serving_leader(client, Some(killed)).await?;
    let new_base = cluster.base(new_leader);
    let mut ids = std::mem::take(&mut *shared.ids.lock().unwrap());
    let acked = ids.len() as u64;
    let mut report = Report::new("failover", &stats, &first);
    let clock = &shared.clock;
    let first_after = clock.first_after.load(Ordering::SeqCst);
    let last_before = clock.last_before.load(Ordering::SeqCst);
    let ms = |ns: u64| ns as f64 / 1e6;
    let gap_ms = (first_after != u64::MAX).then(|| ms(first_after.saturating_sub(kill_ns)));
    let outage_ms = (first_after != u64::MAX && last_before > 0)
        .then(|| ms(first_after.saturating_sub(last_before - 1)));
    report.killed_at_s = Some(ms(kill_ns) / 1000.0);
    let mut figures = Failover {
        killed_node: killed,
        killed_at_unix_ms,
        new_leader,
        gap_ms,
        outage_ms,
        acknowledged_before: clock.acked_before.load(Ordering::Relaxed),
        acknowledged_after: clock.acked_after.load(Ordering::Relaxed),
        retries: shared.retries.load(Ordering::Relaxed),
        replayed: shared.replayed.load(Ordering::Relaxed),
        digest_seq: None,
    };

    // On the new leader: every acknowledged hold, each once, and nothing else.
    let mismatches = check_holds(client, &new_base, &ids).await;
    ids.sort_unstable();
    ids.dedup();
    let distinct = ids.len() as u64;
    let product = get_json(client, &format!("{new_base}/v1/products/{sku}")).await?;
    let on_hand = product["on_hand"].as_u64().unwrap_or(0);
    let reserved = product["reserved"].as_u64().unwrap_or(u64::MAX);
    let gave_up = stats.transport_errors;
    let answered = acked + stats.status(409);
    report.oversold = acked.saturating_sub(opts.stock) + reserved.saturating_sub(on_hand);
    report.lost_acks = mismatches.len() as u64 + acked.saturating_sub(reserved);
    report.checks.extend([
        served("the ceiling phase was served", std::slice::from_ref(&first)),
        Check::new(
            "the leader was killed while the load ran, and another served after it",
            killed_while_running && new_leader != killed && gap_ms.is_some(),
            format!(
                "node {killed} killed at {:.0} % of the run ({:.1} s) after {} \
                 acknowledged holds; node {new_leader} leads after it, {} holds \
                 acknowledged after the kill",
                at * 100.0,
                ms(kill_ns) / 1000.0,
                figures.acknowledged_before,
                figures.acknowledged_after
            ),
        ),
        Check::new(
            "every acknowledged hold exists on the new leader",
            mismatches.is_empty(),
            if mismatches.is_empty() {
                format!("{acked} reservations checked, all pending")
            } else {
                let some: Vec<String> = mismatches.iter().take(3).cloned().collect();
                format!("{} of {acked}: {}", mismatches.len(), some.join("; "))
            },
        ),
        Check::new(
            "one reservation per acknowledged key",
            distinct == acked,
            format!("{acked} keys acknowledged, {distinct} distinct reservations"),
        ),
        Check::new(
            "server reserved = acknowledged holds (no retry held twice)",
            reserved >= acked && reserved <= acked + gave_up,
            format!(
                "server reserved {reserved}, acknowledged {acked}, given up after \
                 {GIVE_UP:?} {gave_up} (may hold or not)"
            ),
        ),
        Check::new(
            "no unit oversold (acknowledged ≤ stock, reserved ≤ on_hand)",
            report.oversold == 0,
            format!(
                "acknowledged {acked}, stock {}, reserved {reserved}, on_hand {on_hand}",
                opts.stock
            ),
        ),
        Check::new(
            "exactly min(stock, attempts) acknowledged",
            acked == opts.stock.min(answered) || gave_up > 0,
            format!("acknowledged {acked} of {answered} answered attempts"),
        ),
        Check::new(
            "no reservation went unanswered",
            gave_up == 0,
            format!("{gave_up} given up after {GIVE_UP:?} of 503s and no answers"),
        ),
        Check::new(
            "every final answer is 201 or 409",
            answered + gave_up == stats.requests,
            format!("statuses {:?}, given up {gave_up}", stats.by_status),
        ),
    ]);

    // The killed node comes back on its directory and catches up to the same state.
    let restarted = tokio::task::block_in_place(|| cluster.restart(killed));
    let digest_check = match restarted {
        Err(err) => Check::new("the killed node restarts", false, err),
        Ok(_) => match cluster.digests(client).await {
            Ok((seq, digests)) => {
                let first = digests.values().next().cloned().unwrap_or_default();
                let same = digests.len() == 3 && digests.values().all(|d| *d == first);
                if same {
                    figures.digest_seq = Some(seq);
                }
                Check::new(
                    "restarted, the killed node has the others' state digest",
                    same,
                    format!("at applied_seq {seq}: {digests:?}"),
                )
            }
            Err(err) => Check::new(
                "restarted, the killed node has the others' state digest",
                false,
                err,
            ),
        },
    };
    report.checks.push(digest_check);
    report.failover = Some(figures);
    report.verified = report.checks.iter().all(|c| c.ok);
    Ok(report)
}

/// Creates the product on whichever node serves (following a 307, retrying a 503 or no
/// answer on the next node).
async fn create_product_retrying(
    client: &reqwest::Client,
    bases: &[(u64, String)],
    sku: &str,
    on_hand: u64,
) -> Result<(), String> {
    let body = json!({"sku": sku, "name": format!("Load-test item {sku}"), "on_hand": on_hand});
    let deadline = Instant::now() + GIVE_UP;
    let mut last = String::new();
    for turn in 0.. {
        let url = format!("{}/v1/products", bases[turn % bases.len()].1);
        match crate::api::post_json(client, &url, &body).await {
            Ok((201, _)) => return Ok(()),
            Ok((503, body)) => last = format!("503 {body}"),
            Ok((status, body)) => return Err(format!("creating {sku}: {status} {body}")),
            Err(err) => last = err,
        }
        if Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    Err(format!("creating {sku}: {last}"))
}

/// Looks up every acknowledged reservation on `base`: answers what is missing or not
/// pending.
async fn check_holds(client: &reqwest::Client, base: &str, ids: &[String]) -> Vec<String> {
    let ids = Arc::new(ids.to_vec());
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..VERIFY_CONNECTIONS {
        let (client, base, ids, next) =
            (client.clone(), base.to_string(), ids.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut mismatches = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(id) = ids.get(i) else { break };
                if id.is_empty() {
                    mismatches.push("a 201 without a reservation id".to_string());
                    continue;
                }
                match get_json(&client, &format!("{base}/v1/reservations/{id}")).await {
                    Ok(view) if view["status"] == "pending" => {}
                    Ok(view) => mismatches.push(format!("{id}: {}", view["status"])),
                    Err(err) => mismatches.push(format!("{id}: {err}")),
                }
            }
            mismatches
        }));
    }
    let mut mismatches = Vec::new();
    for task in tasks {
        match task.await {
            Ok(m) => mismatches.extend(m),
            Err(e) => mismatches.push(format!("a look-up task: {e}")),
        }
    }
    mismatches
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clock() -> Clock {
        Clock::new(Instant::now())
    }

    #[test]
    fn an_answer_of_the_killed_leader_read_after_the_kill_is_not_the_new_leaders() {
        let c = clock();
        c.answered(Some(1));
        c.killed.store(1, Ordering::SeqCst);
        c.kill_ns.store(1, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(2));
        // Read after the kill, but sent by the killed node before it.
        c.answered(Some(1));
        assert_eq!(c.first_after.load(Ordering::SeqCst), u64::MAX);
        assert!(c.last_before.load(Ordering::SeqCst) > 1_000_000);
        c.answered(Some(2));
        let first = c.first_after.load(Ordering::SeqCst);
        assert!(first > c.last_before.load(Ordering::SeqCst) - 1);
        c.answered(Some(3));
        assert_eq!(c.first_after.load(Ordering::SeqCst), first, "the first one");
        assert_eq!(c.acked_before.load(Ordering::SeqCst), 2);
        assert_eq!(c.acked_after.load(Ordering::SeqCst), 2);
    }
}
