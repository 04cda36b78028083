//! The `checkout` scenario: a realistic mix over a catalogue with Zipf-skewed popularity.
//!
//! Each iteration of a worker is one shopper action: a product read (10 %), a
//! replenishment of 5 units (2 %), or a checkout: reserve 1–3 lines of 1–2 units, then
//! confirm (60 %), cancel (20 %) or abandon it to expiry (20 %, short TTL).
//!
//! While it runs, every acknowledged hold is counted as outstanding for its SKU until the
//! client sends its cancel, its confirm is acknowledged (then it counts as sold), or its
//! deadline has surely passed (send time + TTL: the server's deadline is later). At every
//! acknowledged hold, outstanding + sold must fit in the units supplied (initial + every
//! replenishment sent): two buyers told they hold the last unit is an oversell even if one
//! of them later cancels. At the end, once abandoned holds expired, for every SKU:
//! `initial + replenished = on_hand + sold` and `sold` = acknowledged confirms, each within
//! the bounds that requests whose answer never came allow.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::api::{create_product, get_json};
use crate::driver::{timed, PhaseStats, Sample};
use crate::options::Options;
use crate::report::{Check, Report};
use crate::rounds::interleaved;

/// What the clients were told, per SKU (index into the catalogue).
#[derive(Default, Clone)]
struct Tally {
    /// Units of acknowledged replenishments.
    replenished: Vec<u64>,
    /// Units of replenishments sent (acknowledged or not): the most that can be supplied.
    replenish_sent: Vec<u64>,
    /// Units of replenishments whose answer never came.
    replenish_unsure: Vec<u64>,
    /// Units of acknowledged confirms.
    sold: Vec<u64>,
    /// Units of confirms whose answer never came (held or sold: unknown).
    confirm_unsure: Vec<u64>,
    /// Units of reservations whose answer never came (held until their deadline, or not).
    reserve_unsure: Vec<u64>,
    /// Acknowledged holds not yet released by the client (cancel not sent, confirm not
    /// acknowledged), abandoned ones excepted.
    held: Vec<u64>,
    /// Abandoned acknowledged holds: (a time by which the server surely has not yet
    /// released them, units).
    abandoned: Vec<Vec<(Instant, u64)>>,
    /// Times a client was told it holds units that, with every other acknowledged
    /// hold and sale, exceed the supply; with the excess in units.
    oversells: Vec<(String, u64)>,
    /// Requests whose answer never came (their effect is unknown).
    unsure: u64,
    /// Answers the contract does not allow for the request (e.g. a confirm refused).
    unexpected: Vec<String>,
}

impl Tally {
    fn new(skus: usize) -> Tally {
        Tally {
            replenished: vec![0; skus],
            replenish_sent: vec![0; skus],
            replenish_unsure: vec![0; skus],
            sold: vec![0; skus],
            confirm_unsure: vec![0; skus],
            reserve_unsure: vec![0; skus],
            held: vec![0; skus],
            abandoned: vec![Vec::new(); skus],
            ..Tally::default()
        }
    }

    /// Records an acknowledged hold and checks that it fits in the supply.
    fn hold(
        &mut self,
        sku: usize,
        quantity: u64,
        abandoned_until: Option<Instant>,
        stock: u64,
        name: &str,
    ) {
        match abandoned_until {
            Some(until) => self.abandoned[sku].push((until, quantity)),
            None => self.held[sku] += quantity,
        }
        let now = Instant::now();
        self.abandoned[sku].retain(|(until, _)| *until > now);
        let outstanding: u64 =
            self.held[sku] + self.abandoned[sku].iter().map(|(_, q)| q).sum::<u64>();
        let supply = stock + self.replenish_sent[sku];
        let claimed = outstanding + self.sold[sku];
        if claimed > supply {
            self.oversells.push((
                format!("{name}: {claimed} units told held or sold, {supply} supplied"),
                claimed - supply,
            ));
        }
    }
}

/// `cdf[i]` = P(rank ≤ i) for a Zipf distribution with exponent `s` over `n` items.
fn zipf_cdf(n: usize, s: f64) -> Vec<f64> {
    let weights: Vec<f64> = (1..=n).map(|k| 1.0 / (k as f64).powf(s)).collect();
    let total: f64 = weights.iter().sum();
    let mut acc = 0.0;
    weights
        .iter()
        .map(|w| {
            acc += w / total;
            acc
        })
        .collect()
}

/// A shopper's choices: the same worker and iteration always choose the same.
struct Rng(fastrand::Rng);

impl Rng {
    fn new(worker: usize, n: u64) -> Rng {
        let seed = (worker as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ n.wrapping_mul(0xD1B5_4A32_D192_ED03);
        Rng(fastrand::Rng::with_seed(seed))
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0.u64(..n)
    }

    fn zipf(&mut self, cdf: &[f64]) -> usize {
        let u = self.0.f64();
        cdf.partition_point(|&p| p < u).min(cdf.len() - 1)
    }
}

async fn request(
    client: &reqwest::Client,
    method: reqwest::Method,
    url: String,
    body: Option<Value>,
) -> (Sample, Value) {
    let mut answer = Value::Null;
    let sample = timed(async {
        let mut req = client.request(method, &url);
        if let Some(body) = &body {
            req = req.json(body);
        }
        let res = req.send().await.ok()?;
        let status = res.status().as_u16();
        answer = res.json().await.unwrap_or(Value::Null);
        Some(status)
    })
    .await;
    (sample, answer)
}

/// A reservation a client was told about (crash scenario: checked after the restart).
#[derive(Debug, Clone)]
pub(crate) struct Acked {
    /// The last status a 2xx answer showed.
    pub status: &'static str,
    /// A confirm or cancel was sent and its answer never came.
    pub unsure: bool,
    /// Left to expire (short TTL).
    pub abandoned: bool,
    /// The status a confirm or cancel that was sent would lead to.
    pub sent: Option<&'static str>,
}

pub(crate) struct Shared {
    client: reqwest::Client,
    base: String,
    pub skus: Vec<String>,
    cdf: Vec<f64>,
    abandon_ttl_seconds: u64,
    /// Initial units of every SKU.
    stock: u64,
    tally: Mutex<Tally>,
    /// Every acknowledged reservation by id, when the scenario checks them one by one.
    pub track: Option<Mutex<HashMap<String, Acked>>>,
}

pub(crate) async fn shopper(shared: Arc<Shared>, worker: usize, n: u64) -> Vec<Sample> {
    use reqwest::Method;
    let s = &*shared;
    let stock = s.stock;
    let mut rng = Rng::new(worker, n);
    let roll = rng.below(100);
    if roll < 10 {
        let sku = &s.skus[rng.zipf(&s.cdf)];
        let (sample, _) = request(
            &s.client,
            Method::GET,
            format!("{}/v1/products/{sku}", s.base),
            None,
        )
        .await;
        return vec![sample];
    }
    if roll < 12 {
        let i = rng.zipf(&s.cdf);
        let url = format!("{}/v1/products/{}/replenish", s.base, s.skus[i]);
        // Counted as supplied from the moment it is sent: its units may be held before
        // its answer arrives.
        s.tally.lock().unwrap().replenish_sent[i] += 5;
        let (sample, _) = request(&s.client, Method::POST, url, Some(json!({"quantity": 5}))).await;
        let mut tally = s.tally.lock().unwrap();
        match sample.status {
            Some(200) => tally.replenished[i] += 5,
            None => {
                tally.unsure += 1;
                tally.replenish_unsure[i] += 5;
            }
            Some(other) => tally.unexpected.push(format!("replenish answered {other}")),
        }
        return vec![sample];
    }
    // A checkout.
    let mut lines: Vec<(usize, u64)> = Vec::new();
    let wanted = 1 + rng.below(3) as usize;
    for _ in 0..wanted * 3 {
        let i = rng.zipf(&s.cdf);
        if lines.len() < wanted && !lines.iter().any(|(j, _)| *j == i) {
            lines.push((i, 1 + rng.below(2)));
        }
    }
    let action = rng.below(10);
    let ttl = if action >= 8 {
        s.abandon_ttl_seconds
    } else {
        300
    };
    let items: Vec<Value> = lines
        .iter()
        .map(|(i, q)| json!({"sku": s.skus[*i], "quantity": q}))
        .collect();
    let body =
        json!({"customer_id": format!("shopper-{worker}"), "items": items, "ttl_seconds": ttl});
    let sent_at = Instant::now();
    let (reserved, answer) = request(
        &s.client,
        Method::POST,
        format!("{}/v1/reservations", s.base),
        Some(body),
    )
    .await;
    let mut samples = vec![reserved];
    match reserved.status {
        Some(201) => {}
        Some(409) => return samples, // not enough stock: nothing held
        None => {
            let mut tally = s.tally.lock().unwrap();
            tally.unsure += 1;
            for (i, q) in &lines {
                tally.reserve_unsure[*i] += q;
            }
            return samples;
        }
        Some(other) => {
            s.tally
                .lock()
                .unwrap()
                .unexpected
                .push(format!("reserve answered {other}: {answer}"));
            return samples;
        }
    }
    let id = answer["id"].as_str().unwrap_or_default().to_string();
    let abandoned = action >= 8;
    let verb = if action < 6 { "confirm" } else { "cancel" };
    {
        // The server's deadline is at least the send time plus the TTL.
        let until = abandoned.then(|| sent_at + Duration::from_secs(ttl));
        let mut tally = s.tally.lock().unwrap();
        for (i, q) in &lines {
            tally.hold(*i, *q, until, stock, &s.skus[*i]);
        }
        if verb == "cancel" && !abandoned {
            // Released by the server any time after it receives the cancel.
            for (i, q) in &lines {
                tally.held[*i] -= q;
            }
        }
    }
    if let Some(track) = &s.track {
        let acked = Acked {
            status: "pending",
            unsure: false,
            abandoned,
            sent: (!abandoned).then_some(if verb == "confirm" {
                "confirmed"
            } else {
                "cancelled"
            }),
        };
        track.lock().unwrap().insert(id.clone(), acked);
    }
    if abandoned {
        return samples; // expires by itself
    }
    let (sample, answer) = request(
        &s.client,
        Method::POST,
        format!("{}/v1/reservations/{id}/{verb}", s.base),
        Some(json!({})),
    )
    .await;
    samples.push(sample);
    if let Some(track) = &s.track {
        if let Some(acked) = track.lock().unwrap().get_mut(&id) {
            match sample.status {
                Some(200) if verb == "confirm" => acked.status = "confirmed",
                Some(200) => acked.status = "cancelled",
                _ => acked.unsure = true,
            }
        }
    }
    let mut tally = s.tally.lock().unwrap();
    match sample.status {
        Some(200) if verb == "confirm" => {
            for (i, q) in &lines {
                tally.held[*i] -= q;
                tally.sold[*i] += q;
            }
        }
        Some(200) => {}
        None => {
            tally.unsure += 1;
            if verb == "confirm" {
                // Still counted as held: held or sold, it is not available either way.
                for (i, q) in &lines {
                    tally.confirm_unsure[*i] += q;
                }
            }
        }
        Some(other) => tally
            .unexpected
            .push(format!("{verb} answered {other}: {answer}")),
    }
    samples
}

/// Creates the catalogue and the shared state of the shoppers.
pub(crate) async fn setup(
    client: &reqwest::Client,
    base: &str,
    opts: &Options,
    track: bool,
) -> Result<Arc<Shared>, String> {
    let prefix = format!("CO-{}-", std::process::id());
    let skus: Vec<String> = (0..opts.catalogue)
        .map(|i| format!("{prefix}{i:05}"))
        .collect();
    for sku in &skus {
        create_product(client, base, sku, opts.stock).await?;
    }
    Ok(Arc::new(Shared {
        client: client.clone(),
        base: base.to_string(),
        cdf: zipf_cdf(skus.len(), 1.0),
        skus,
        abandon_ttl_seconds: opts.abandon_ttl_seconds,
        stock: opts.stock,
        tally: Mutex::new(Tally::new(opts.catalogue)),
        track: track.then(|| Mutex::new(HashMap::new())),
    }))
}

/// What the clients were told, with the bounds that unanswered requests allow.
pub(crate) struct Told {
    tally: Tally,
}

/// One SKU's figures as the server shows them.
pub(crate) struct Shown {
    pub on_hand: u64,
    pub reserved: u64,
    pub sold: u64,
}

impl Shown {
    pub fn of(product: &Value) -> Shown {
        Shown {
            on_hand: product["on_hand"].as_u64().unwrap_or(0),
            reserved: product["reserved"].as_u64().unwrap_or(u64::MAX),
            sold: product["sold"].as_u64().unwrap_or(0),
        }
    }
}

impl Told {
    /// Oversells seen while the load ran.
    pub fn oversells(&self) -> &[(String, u64)] {
        &self.tally.oversells
    }

    pub fn unexpected(&self) -> &[String] {
        &self.tally.unexpected
    }

    /// Units sold that no acknowledged confirm (or unanswered one) accounts for, and the
    /// acknowledged confirms missing from `sold`; for SKU `i`.
    pub fn sold_errors(&self, i: usize, shown: &Shown) -> (u64, u64) {
        let t = &self.tally;
        let most = t.sold[i] + t.confirm_unsure[i];
        (
            shown.sold.saturating_sub(most),
            t.sold[i].saturating_sub(shown.sold),
        )
    }

    /// `on_hand + sold` must equal the initial stock plus the replenishments, within the
    /// unanswered ones.
    pub fn conservation_error(
        &self,
        i: usize,
        stock: u64,
        shown: &Shown,
        name: &str,
    ) -> Option<String> {
        let t = &self.tally;
        let least = stock + t.replenished[i];
        let most = least + t.replenish_unsure[i];
        let total = shown.on_hand + shown.sold;
        (total < least || total > most).then(|| {
            format!(
                "{name}: on_hand {} + sold {} = {total}, expected {least}..={most}",
                shown.on_hand, shown.sold
            )
        })
    }

    /// Units that may legitimately still be reserved once abandoned holds have expired.
    pub fn reserved_most(&self, i: usize) -> u64 {
        let t = &self.tally;
        t.held[i] + t.reserve_unsure[i]
    }
}

impl Shared {
    pub(crate) fn told(&self) -> Told {
        Told {
            tally: self.tally.lock().unwrap().clone(),
        }
    }
}

pub async fn checkout(
    client: &reqwest::Client,
    base: &str,
    opts: &Options,
    rounds: usize,
    first_ceiling: PhaseStats,
) -> Result<Report, String> {
    let shared = setup(client, base, opts, false).await?;
    let load = shared.clone();
    let send = move |worker, n| shopper(load.clone(), worker, n);
    let run = interleaved(client, base, opts, rounds, first_ceiling, send).await;

    // Abandoned holds expire within a second of their deadline.
    let settle_by = Instant::now() + Duration::from_secs(opts.abandon_ttl_seconds + 10);
    let mut products = Vec::new();
    loop {
        products.clear();
        for sku in &shared.skus {
            products.push(get_json(client, &format!("{base}/v1/products/{sku}")).await?);
        }
        let told = shared.told();
        let settled = products
            .iter()
            .enumerate()
            .all(|(i, p)| Shown::of(p).reserved <= told.reserved_most(i));
        if settled || Instant::now() > settle_by {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    let told = shared.told();
    let audit = told.audit(&shared.skus, &products, opts.stock);
    let mut report = run.report("checkout");
    report.oversold = audit.oversold(&told);
    report.lost_acks = audit.missing;
    report.checks.extend(audit.checks(&told));
    report.checks.push(Check::new(
        "reserved = acknowledged holds still pending (none once abandoned holds expired)",
        audit.over_reserved.is_empty(),
        if audit.over_reserved.is_empty() {
            format!(
                "{} SKUs, none reserving more than its pending acknowledged holds",
                shared.skus.len()
            )
        } else {
            audit.over_reserved.join("; ")
        },
    ));
    let answered = run.stats.requests - run.stats.transport_errors;
    report
        .checks
        .push(allowed_answers(told.unexpected(), answered));
    report.verified = report.checks.iter().all(|c| c.ok);
    Ok(report)
}

/// The server's end state of every SKU, audited against what the clients were told.
pub(crate) struct Audit {
    /// Units sold or reserved that no acknowledged (or unanswered) request accounts for.
    pub unaccounted: u64,
    /// Acknowledged confirmed units missing from `sold`.
    pub missing: u64,
    /// SKUs whose `on_hand + sold` is outside the supply.
    pub breaks: Vec<String>,
    /// SKUs with more reserved than pending acknowledged (or unanswered) holds explain.
    pub over_reserved: Vec<String>,
}

impl Told {
    /// Audits `products` (the server's views of `skus`, in the same order).
    pub fn audit(&self, skus: &[String], products: &[Value], stock: u64) -> Audit {
        let mut audit = Audit {
            unaccounted: 0,
            missing: 0,
            breaks: Vec::new(),
            over_reserved: Vec::new(),
        };
        for (i, (name, p)) in skus.iter().zip(products).enumerate() {
            let shown = Shown::of(p);
            let (extra, missing) = self.sold_errors(i, &shown);
            audit.unaccounted += extra + shown.reserved.saturating_sub(shown.on_hand);
            audit.missing += missing;
            audit
                .breaks
                .extend(self.conservation_error(i, stock, &shown, name));
            if shown.reserved > self.reserved_most(i) {
                audit.over_reserved.push(format!(
                    "{name}: {} reserved, at most {} explained",
                    shown.reserved,
                    self.reserved_most(i)
                ));
            }
        }
        audit
    }
}

impl Audit {
    /// Oversold units: seen live while the load ran, plus unaccounted at the end.
    pub fn oversold(&self, told: &Told) -> u64 {
        told.oversells().iter().map(|(_, q)| q).sum::<u64>() + self.unaccounted
    }

    /// The checks every scenario with a shopper mix makes.
    pub fn checks(&self, told: &Told) -> Vec<Check> {
        let breaks = if self.breaks.is_empty() {
            "every SKU".to_string()
        } else {
            self.breaks.join("; ")
        };
        vec![
            oversold_check(told, self.unaccounted),
            Check::new(
                "every acknowledged confirm is sold",
                self.missing == 0,
                format!("{} confirmed units missing from sold", self.missing),
            ),
            Check::new(
                "units conserved per SKU (initial + replenished = on_hand + sold)",
                self.breaks.is_empty(),
                breaks,
            ),
        ]
    }
}

/// No client was told it holds a unit beyond the supply, and the server's end state
/// shows no sale or reservation that acknowledged requests do not account for.
fn oversold_check(told: &Told, unaccounted: u64) -> Check {
    let live = told.oversells();
    let detail = if live.is_empty() {
        format!("{unaccounted} units sold or reserved beyond what was acknowledged")
    } else {
        let examples: Vec<&str> = live.iter().take(3).map(|(d, _)| d.as_str()).collect();
        format!(
            "{} oversells seen live, e.g. {}",
            live.len(),
            examples.join("; ")
        )
    };
    Check::new(
        "no unit oversold",
        live.is_empty() && unaccounted == 0,
        detail,
    )
}

/// The check that every answer (of `answered`) was one the contract allows for its
/// request.
pub(crate) fn allowed_answers(unexpected: &[String], answered: u64) -> Check {
    let detail = if unexpected.is_empty() {
        format!("{answered} answers, none outside the contract")
    } else {
        let examples: Vec<&str> = unexpected.iter().take(3).map(String::as_str).collect();
        format!(
            "{} of {answered}, e.g. {}",
            unexpected.len(),
            examples.join("; ")
        )
    };
    Check::new(
        "every answer is one the contract allows",
        unexpected.is_empty(),
        detail,
    )
}
