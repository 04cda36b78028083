//! The `checkout` scenario: a realistic mix over a catalogue with Zipf-skewed popularity.
//!
//! Each iteration of a worker is one shopper action: a product read (10 %), a
//! replenishment of 5 units (2 %), or a checkout: reserve 1–3 lines of 1–2 units, then
//! confirm (60 %), cancel (20 %) or abandon it to expiry (20 %, short TTL). At the end the
//! scenario waits for the abandoned holds to expire and checks, for every SKU, the
//! conservation of units against what the clients were told:
//! `initial + replenished = on_hand + sold`, `sold` = acknowledged confirmed units,
//! `reserved` = acknowledged holds still pending (0 once the abandoned ones expired).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::driver::{run_phase, timed, PhaseStats, Sample};
use crate::report::{Check, Report};
use crate::scenarios::{get_json, post_json, Options};

/// What the clients were told, per SKU.
#[derive(Default, Clone)]
struct Tally {
    replenished: Vec<u64>,
    sold: Vec<u64>,
    /// Requests whose answer never came (their effect is unknown).
    unsure: u64,
    /// Replenishments among them (each may or may not have added 5 units).
    replenish_unsure: u64,
    /// Answers the contract does not allow for the request (e.g. a confirm refused).
    unexpected: Vec<String>,
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

struct Rng(u64);

impl Rng {
    fn new(worker: usize, n: u64) -> Rng {
        let mut r = Rng((worker as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ n.wrapping_mul(0xD1B5_4A32_D192_ED03));
        r.next();
        r
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn zipf(&mut self, cdf: &[f64]) -> usize {
        let u = self.unit();
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
}

pub(crate) struct Shared {
    client: reqwest::Client,
    base: String,
    pub skus: Vec<String>,
    cdf: Vec<f64>,
    abandon_ttl_seconds: u64,
    tally: Mutex<Tally>,
    /// Every acknowledged reservation by id, when the scenario checks them one by one.
    pub track: Option<Mutex<HashMap<String, Acked>>>,
}

pub(crate) async fn shopper(shared: Arc<Shared>, worker: usize, n: u64) -> Vec<Sample> {
    use reqwest::Method;
    let s = &*shared;
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
        let (sample, _) = request(&s.client, Method::POST, url, Some(json!({"quantity": 5}))).await;
        let mut tally = s.tally.lock().unwrap();
        match sample.status {
            Some(200) => tally.replenished[i] += 5,
            None => {
                tally.unsure += 1;
                tally.replenish_unsure += 1;
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
            s.tally.lock().unwrap().unsure += 1;
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
    if let Some(track) = &s.track {
        let acked = Acked {
            status: "pending",
            unsure: false,
            abandoned: action >= 8,
        };
        track.lock().unwrap().insert(id.clone(), acked);
    }
    if action >= 8 {
        return samples; // abandoned: expires by itself
    }
    let verb = if action < 6 { "confirm" } else { "cancel" };
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
                tally.sold[*i] += q;
            }
        }
        Some(200) => {}
        None => tally.unsure += 1,
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
        let (status, body) = post_json(
            client,
            &format!("{base}/v1/products"),
            &json!({"sku": sku, "name": "Catalogue item", "on_hand": opts.stock}),
        )
        .await?;
        if status != 201 {
            return Err(format!("creating {sku}: {status} {body}"));
        }
    }
    Ok(Arc::new(Shared {
        client: client.clone(),
        base: base.to_string(),
        cdf: zipf_cdf(skus.len(), 1.0),
        skus,
        abandon_ttl_seconds: opts.abandon_ttl_seconds,
        tally: Mutex::new(Tally {
            replenished: vec![0; opts.catalogue],
            sold: vec![0; opts.catalogue],
            ..Tally::default()
        }),
        track: track.then(|| Mutex::new(HashMap::new())),
    }))
}

/// Per-SKU figures the clients were told about.
pub(crate) struct Told {
    pub replenished: Vec<u64>,
    pub replenish_unsure: u64,
    pub sold: Vec<u64>,
    pub unexpected: Vec<String>,
}

impl Shared {
    pub(crate) fn told(&self) -> Told {
        let t = self.tally.lock().unwrap();
        Told {
            replenished: t.replenished.clone(),
            replenish_unsure: t.replenish_unsure,
            sold: t.sold.clone(),
            unexpected: t.unexpected.clone(),
        }
    }
}

pub async fn checkout(
    client: &reqwest::Client,
    base: &str,
    opts: &Options,
    ceiling: &PhaseStats,
) -> Result<Report, String> {
    let shared = setup(client, base, opts, false).await?;
    let load = shared.clone();
    let stats = run_phase(opts.limits, move |worker, n| {
        shopper(load.clone(), worker, n)
    })
    .await;

    // Abandoned holds expire within a second of their deadline.
    let settle_by = Instant::now() + Duration::from_secs(opts.abandon_ttl_seconds + 10);
    let mut products = Vec::new();
    loop {
        products.clear();
        for sku in &shared.skus {
            products.push(get_json(client, &format!("{base}/v1/products/{sku}")).await?);
        }
        let reserved: u64 = products
            .iter()
            .map(|p| p["reserved"].as_u64().unwrap_or(0))
            .sum();
        if reserved == 0 || Instant::now() > settle_by {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    let tally = shared.tally.lock().unwrap().clone();
    let exact = tally.unsure == 0 && stats.transport_errors == 0;
    let (mut oversold, mut lost, mut conservation_breaks, mut still_reserved) =
        (0u64, 0u64, Vec::new(), 0u64);
    for (i, p) in products.iter().enumerate() {
        let on_hand = p["on_hand"].as_u64().unwrap_or(0);
        let reserved = p["reserved"].as_u64().unwrap_or(0);
        let sold = p["sold"].as_u64().unwrap_or(0);
        let supplied = opts.stock + tally.replenished[i];
        oversold += reserved.saturating_sub(on_hand) + tally.sold[i].saturating_sub(supplied);
        lost += tally.sold[i].saturating_sub(sold);
        still_reserved += reserved;
        if exact && (on_hand + sold != supplied || sold != tally.sold[i]) {
            conservation_breaks.push(format!(
                "{}: initial {} + replenished {} vs on_hand {on_hand} + sold {sold}; confirmed {}",
                shared.skus[i], opts.stock, tally.replenished[i], tally.sold[i]
            ));
        }
    }
    let sold_total: u64 = tally.sold.iter().sum();
    let mut report = Report::new("checkout", &stats, ceiling);
    report.oversold = oversold;
    report.lost_acks = lost;
    report.checks = vec![
        Check::new(
            "no unit oversold",
            oversold == 0,
            format!("{oversold} units beyond stock"),
        ),
        Check::new(
            "every acknowledged confirm is sold",
            lost == 0,
            format!("{sold_total} units confirmed, {lost} missing"),
        ),
        Check::new(
            "units conserved per SKU (initial + replenished = on_hand + sold; sold = confirmed)",
            conservation_breaks.is_empty(),
            if conservation_breaks.is_empty() {
                format!(
                    "{} SKUs{}",
                    products.len(),
                    if exact {
                        ""
                    } else {
                        " (inexact: some answers never came)"
                    }
                )
            } else {
                conservation_breaks.join("; ")
            },
        ),
        Check::new(
            "reserved = acknowledged pending holds (none once abandoned holds expired)",
            still_reserved == 0,
            format!("{still_reserved} units still reserved"),
        ),
        allowed_answers(&tally.unexpected),
    ];
    report.verified = report.checks.iter().all(|c| c.ok);
    Ok(report)
}

/// The check that every answer was one the contract allows for its request.
pub(crate) fn allowed_answers(unexpected: &[String]) -> Check {
    let examples: Vec<&str> = unexpected.iter().take(3).map(String::as_str).collect();
    Check::new(
        "every answer is one the contract allows",
        unexpected.is_empty(),
        examples.join("; "),
    )
}
