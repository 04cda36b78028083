//! The bundled load test, run small against the real binary, and against a fake server
//! that acknowledges holds it does not keep, to prove its verification can fail.

use std::time::Duration;

use loadtest::driver::Limits;
use loadtest::{Options, Scenario, Target};
use warp::Filter;

fn limits() -> Limits {
    Limits {
        connections: 8,
        duration: Duration::from_secs(10),
        requests_max: Some(400),
        stop_on_error: false,
        rate: None,
    }
}

/// The real binary, sync durability.
fn stockd() -> Target {
    Target::Spawn {
        stockd: env!("CARGO_BIN_EXE_stockd").into(),
        durability: "sync".into(),
    }
}

/// A run of `scenario` under the test limits: one SKU of 150 units, three rounds.
fn options(scenario: Scenario, target: Target) -> Options {
    Options {
        scenario,
        target,
        limits: limits(),
        stock: 150,
        catalogue: 1,
        abandon_ttl_seconds: 1,
        rounds: 3,
        max_per_customer: 2,
        api_key: None,
        follow_events: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_keeps_every_buyer_within_the_limit_and_verifies() {
    let mut opts = options(Scenario::Limits, stockd());
    opts.stock = 1_000;
    let report = loadtest::run(opts).await.expect("run");
    assert!(report.verified, "{}", report.markdown());
    assert_eq!(report.requests, 400);
    // About half the attempts come from the 16 greedy buyers, who get at most 2 each and
    // are refused after (the stock, 1,000, refuses no one: every 409 is the limit's); the
    // others ask once and all get their unit.
    let greedy_max = loadtest::limits::GREEDY_BUYERS as u64 * 2;
    let created = report.statuses.get("201").copied().unwrap_or(0);
    let refused = report.statuses.get("409").copied().unwrap_or(0);
    assert_eq!(created + refused, 400, "{:?}", report.statuses);
    assert!(
        refused >= 100 && created > greedy_max,
        "{:?}",
        report.statuses
    );
    assert_eq!((report.oversold, report.lost_acks), (0, 0));
    assert!(report.markdown().contains("no buyer above the limit"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flash_sale_sells_exactly_the_stock_and_verifies() {
    let opts = options(Scenario::FlashSale, stockd());
    let report = loadtest::run(opts).await.expect("run");
    assert!(report.verified, "{}", report.markdown());
    assert_eq!(report.requests, 400);
    assert_eq!(report.statuses.get("201"), Some(&150));
    assert_eq!(report.statuses.get("409"), Some(&250));
    assert_eq!((report.oversold, report.lost_acks), (0, 0));
    assert!(report.ceiling_rps > 0.0 && report.ratio > 0.0);
    // Interleaved: C S C S C S C, the ceiling is the mean of the four ceiling phases, and
    // each round is set against the two either side of it.
    assert_eq!(report.ceilings_rps.len(), 4, "{}", report.markdown());
    assert!(report.ceilings_rps.iter().all(|&rps| rps > 0.0));
    let mean = report.ceilings_rps.iter().sum::<f64>() / 4.0;
    assert!((report.ceiling_rps - mean).abs() < 1e-6);
    assert!((report.ratio - report.throughput_rps / mean).abs() < 1e-9);
    assert_eq!(report.ceiling_before_rps, report.ceilings_rps[0]);
    assert_eq!(report.ceiling_after_rps, Some(report.ceilings_rps[3]));
    assert_eq!(report.rounds.len(), 3);
    for (i, round) in report.rounds.iter().enumerate() {
        let either_side = (report.ceilings_rps[i] + report.ceilings_rps[i + 1]) / 2.0;
        assert!((round.ceiling_rps - either_side).abs() < 1e-6);
        assert!(round.throughput_rps > 0.0);
        assert!((round.ratio - round.throughput_rps / either_side).abs() < 1e-9);
    }
    assert!(report.markdown().contains("the mean of 4 ceiling phases"));
    // The server's group commits during the rounds, from its /metrics: each of the 150
    // reservations is one record (the 409s write none).
    let commits = report.group_commit.expect("stockd serves /metrics");
    assert_eq!(commits.records, 150, "{commits:?}");
    assert!(
        commits.batches >= 1 && commits.batches <= 150,
        "{commits:?}"
    );
    assert!((commits.records_per_batch - 150.0 / commits.batches as f64).abs() < 1e-9);
    assert!(commits.commit_ms_mean > 0.0, "{commits:?}");
    assert!(report.markdown().contains("group commits"));
    let json = serde_json::to_value(&report).unwrap();
    for key in [
        "scenario",
        "requests",
        "throughput_rps",
        "ceiling_rps",
        "ratio",
        "oversold",
        "lost_acks",
        "verified",
    ] {
        assert!(json.get(key).is_some(), "{key} in the JSON report");
    }
    for key in ["p50", "p90", "p99", "p999", "max"] {
        assert!(json["latency_ms"].get(key).is_some());
    }
    let per_second: u64 = report
        .timeline
        .iter()
        .map(|s| s.requests_per_second as u64)
        .sum();
    assert!(
        per_second <= report.requests,
        "the timeline counts answers once"
    );
    let svg = loadtest::chart::svg(&report);
    assert!(
        svg.starts_with("<svg") && svg.contains("<polyline"),
        "{svg}"
    );
}

/// Serves a fake stockd on 127.0.0.1:0; stops when the sender is used or dropped.
async fn serve_fake<F>(routes: F) -> (String, tokio::sync::oneshot::Sender<()>)
where
    F: Filter<Error = warp::Rejection> + Clone + Send + Sync + 'static,
    F::Extract: warp::Reply,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(
        warp::serve(routes)
            .incoming(listener)
            .graceful(async move {
                let _ = rx.await;
            })
            .run(),
    );
    (format!("http://{addr}"), tx)
}

/// A server that says 201 to every reservation but holds nothing.
async fn lying_server() -> (String, tokio::sync::oneshot::Sender<()>) {
    let health =
        warp::path("health").map(|| warp::reply::json(&serde_json::json!({"status": "ok"})));
    let create = warp::post().and(warp::path!("v1" / "products")).map(|| {
        warp::reply::with_status(
            warp::reply::json(&serde_json::json!({})),
            warp::http::StatusCode::CREATED,
        )
    });
    let reserve = warp::post()
        .and(warp::path!("v1" / "reservations"))
        .map(|| {
            warp::reply::with_status(
                warp::reply::json(&serde_json::json!({})),
                warp::http::StatusCode::CREATED,
            )
        });
    let product = warp::get()
        .and(warp::path!("v1" / "products" / String))
        .map(|_| warp::reply::json(&serde_json::json!({"on_hand": 20, "reserved": 20})));
    let routes = health.or(create).or(reserve).or(product);
    serve_fake(routes).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_budget_smaller_than_the_rounds_runs_fewer_rounds() {
    let opts = Options {
        limits: Limits {
            requests_max: Some(2),
            ..limits()
        },
        stock: 5,
        ..options(Scenario::FlashSale, stockd())
    };
    let report = loadtest::run(opts).await.expect("run");
    assert!(report.verified, "{}", report.markdown());
    assert_eq!(report.requests, 2);
    assert_eq!((report.rounds.len(), report.ceilings_rps.len()), (2, 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_reader_of_the_feed_follows_the_flash_sale_to_its_end() {
    let opts = Options {
        limits: Limits {
            requests_max: Some(300),
            ..limits()
        },
        stock: 200,
        follow_events: true,
        ..options(Scenario::FlashSale, stockd())
    };
    let report = loadtest::run(opts).await.expect("run");
    assert!(report.verified, "{}", report.markdown());
    let lag = report.feed_lag.as_ref().expect("the lag is reported");
    // The reader starts before the hot SKU is created: its creation, 200 holds (one
    // event each) and the sold-out; the 100 refusals change nothing.
    assert_eq!(lag.events_received, 202, "{}", report.markdown());
    assert_eq!(lag.reader_through, lag.feed_through);
    assert!(
        report.markdown().contains("live reader of the change feed"),
        "{}",
        report.markdown()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_of_a_server_without_the_feed_is_an_error_not_a_pass() {
    let dir = tempfile::tempdir().unwrap();
    let server = loadtest::server::Launch::serve(env!("CARGO_BIN_EXE_stockd"), dir.path())
        .args(["--events", "off"])
        .start()
        .expect("starts");
    let opts = Options {
        limits: Limits {
            requests_max: Some(20),
            ..limits()
        },
        follow_events: true,
        ..options(Scenario::FlashSale, Target::Url(server.base_url.clone()))
    };
    let err = loadtest::run(opts).await.expect_err("no feed to follow");
    assert!(err.contains("no change feed"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verification_catches_an_overselling_server() {
    let (url, stop) = lying_server().await;
    let opts = Options {
        limits: Limits {
            requests_max: Some(100),
            ..limits()
        },
        stock: 20,
        ..options(Scenario::FlashSale, Target::Url(url))
    };
    let report = loadtest::run(opts).await.expect("run");
    assert!(!report.verified, "{}", report.markdown());
    assert_eq!(report.oversold, 80);
    assert_eq!(report.lost_acks, 80);
    assert_eq!(report.group_commit, None, "a server without /metrics");
    let _ = stop.send(());
}

#[tokio::test]
async fn refuses_non_loopback_targets() {
    let opts = Options {
        stock: 1,
        rounds: 1,
        ..options(
            Scenario::Ceiling,
            Target::Url("http://10.1.2.3:8080".into()),
        )
    };
    assert!(loadtest::run(opts).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkout_mix_conserves_every_unit() {
    let opts = Options {
        limits: Limits {
            requests_max: Some(600),
            ..limits()
        },
        // Small stock on a skewed catalogue: the popular SKUs run out, so 409s happen.
        stock: 100,
        catalogue: 10,
        ..options(Scenario::Checkout, stockd())
    };
    let report = loadtest::run(opts).await.expect("run");
    assert!(report.verified, "{}", report.markdown());
    assert!(
        report.statuses.get("201").copied().unwrap_or(0) > 50,
        "{:?}",
        report.statuses
    );
    let refused = report.statuses.get("409").copied().unwrap_or(0);
    assert!(refused > 0, "popular SKUs sold out: {:?}", report.statuses);
    assert_eq!((report.oversold, report.lost_acks), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_mid_load_loses_no_acknowledged_change() {
    let opts = Options {
        limits: Limits {
            duration: Duration::from_secs(3),
            requests_max: None,
            ..limits()
        },
        stock: 50,
        catalogue: 10,
        rounds: 1,
        ..options(Scenario::Crash, stockd())
    };
    let report = loadtest::run(opts).await.expect("run");
    assert!(report.verified, "{}", report.markdown());
    assert!(report.recovery_ms.is_some());
    assert!(
        report.statuses.get("201").copied().unwrap_or(0) > 0,
        "{:?}",
        report.statuses
    );
}

/// A three-node cluster of the real binary, its leader killed mid-run: every acknowledged
/// hold on the new leader, each once, and the restarted node at the same state. Times are
/// reported, not asserted (a loaded machine may take longer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_of_the_leader_loses_no_acknowledged_hold() {
    // Whichever ends first: 600 reservations or 10 s (a slow machine may not get through
    // the budget, and the kill comes at 30-70 % of either).
    let opts = Options {
        limits: Limits {
            requests_max: Some(600),
            ..limits()
        },
        stock: 10_000,
        rounds: 1,
        ..options(Scenario::Failover, stockd())
    };
    let report = loadtest::run(opts).await.expect("run");
    assert!(report.verified, "{}", report.markdown());
    let f = report.failover.clone().expect("the failover figures");
    assert_ne!(f.killed_node, f.new_leader);
    assert!(
        f.acknowledged_before > 0 && f.acknowledged_after > 0,
        "{f:?}"
    );
    assert!(f.gap_ms.is_some() && f.digest_seq.is_some(), "{f:?}");
    // Every attempt ended in a hold: the stock refuses none, and none was given up.
    assert!(report.requests > 0 && report.requests <= 600);
    assert_eq!(
        report.statuses.get("201"),
        Some(&report.requests),
        "{:?}",
        report.statuses
    );
    assert_eq!(report.transport_errors, 0);
    assert_eq!((report.oversold, report.lost_acks), (0, 0));
    assert!(
        report.markdown().contains("**Gap**"),
        "{}",
        report.markdown()
    );
    println!("{}", report.markdown());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_flash_sale_is_set_against_one_nodes_and_verifies() {
    let opts = Options {
        limits: Limits {
            requests_max: Some(300),
            ..limits()
        },
        stock: 10_000,
        rounds: 2,
        ..options(Scenario::Cluster, stockd())
    };
    let report = loadtest::run(opts).await.expect("run");
    assert!(report.verified, "{}", report.markdown());
    // One node, cluster, one node, cluster, one node: each phase a round's share of the
    // budget, 150 requests.
    assert_eq!(report.requests, 300);
    assert_eq!(report.statuses.get("201"), Some(&300));
    assert_eq!(report.ceilings_rps.len(), 3, "{}", report.markdown());
    assert_eq!(report.rounds.len(), 2);
    assert!(report.ratio > 0.0);
    let md = report.markdown();
    assert!(md.contains("flash sale, one node (sync)"), "{md}");
    assert!(
        md.contains("cluster: every acknowledged hold is held by the server"),
        "{md}"
    );
    assert!(
        md.contains("one node: every acknowledged hold is held by the server"),
        "{md}"
    );
}

#[tokio::test]
async fn the_cluster_scenarios_start_their_own_cluster() {
    for scenario in [Scenario::Failover, Scenario::Cluster] {
        let opts = options(scenario, Target::Url("http://127.0.0.1:9".into()));
        let err = loadtest::run(opts).await.expect_err("refused");
        assert!(err.contains("give --stockd"), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_sends_at_the_given_rate_and_verifies() {
    let opts = Options {
        limits: Limits {
            duration: Duration::from_secs(2),
            requests_max: None,
            rate: Some(100.0),
            ..limits()
        },
        rounds: 1,
        ..options(Scenario::FlashSale, stockd())
    };
    let report = loadtest::run(opts).await.expect("run");
    assert!(report.verified, "{}", report.markdown());
    // 100 per second for 2 seconds: the arrival schedule, not the server, sets the count.
    assert!(
        (190..=200).contains(&report.requests),
        "{} requests",
        report.requests
    );
    assert_eq!(report.statuses.get("201"), Some(&150));
}

/// A server that acknowledges every reservation, confirm and replenishment but applies
/// none of them: the checkout scenario must see the oversells, the lost sales and the
/// broken conservation.
async fn careless_server(stock: u64) -> (String, tokio::sync::oneshot::Sender<()>) {
    use warp::http::StatusCode;
    let json = |v: serde_json::Value, code: StatusCode| {
        warp::reply::with_status(warp::reply::json(&v), code)
    };
    let health =
        warp::path("health").map(move || json(serde_json::json!({"status": "ok"}), StatusCode::OK));
    let create = warp::post()
        .and(warp::path!("v1" / "products"))
        .map(move || json(serde_json::json!({}), StatusCode::CREATED));
    let product = warp::get()
        .and(warp::path!("v1" / "products" / String))
        .map(move |_| {
            json(
                serde_json::json!({"on_hand": stock, "reserved": 0, "sold": 0}),
                StatusCode::OK,
            )
        });
    let replenish = warp::post()
        .and(warp::path!("v1" / "products" / String / "replenish"))
        .map(move |_| json(serde_json::json!({}), StatusCode::OK));
    let reserve = warp::post()
        .and(warp::path!("v1" / "reservations"))
        .map(move || {
            json(
                serde_json::json!({"id": uuid::Uuid::now_v7().to_string()}),
                StatusCode::CREATED,
            )
        });
    let settle = warp::post()
        .and(warp::path!("v1" / "reservations" / String / String))
        .map(move |_, _| json(serde_json::json!({}), StatusCode::OK));
    let routes = health
        .or(create)
        .or(product)
        .or(replenish)
        .or(reserve)
        .or(settle);
    serve_fake(routes).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkout_verification_catches_a_careless_server() {
    let (url, stop) = careless_server(3).await;
    let opts = Options {
        limits: Limits {
            requests_max: Some(300),
            ..limits()
        },
        stock: 3,
        catalogue: 2,
        ..options(Scenario::Checkout, Target::Url(url))
    };
    let report = loadtest::run(opts).await.expect("run");
    assert!(!report.verified, "{}", report.markdown());
    assert!(report.oversold > 0, "oversells seen: {}", report.markdown());
    assert!(
        report.lost_acks > 0,
        "lost confirms seen: {}",
        report.markdown()
    );
    let conservation = report
        .checks
        .iter()
        .find(|c| c.name.starts_with("units conserved"))
        .unwrap();
    assert!(!conservation.ok, "{}", report.markdown());
    let _ = stop.send(());
}

/// `loadtest/run.sh` without a scenario prints its usage (every flag it documents, no
/// line of the script itself) and exits 2, before building anything.
#[test]
fn run_sh_without_arguments_prints_its_usage() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/loadtest/run.sh");
    let out = std::process::Command::new("bash")
        .arg(script)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let usage = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "SCENARIO",
        "--duration",
        "--connections",
        "--rounds",
        "--durability",
        "--requests",
        "--rate R",
        "--target URL",
        "--json FILE",
        "--markdown FILE",
        "--svg FILE",
    ] {
        assert!(usage.contains(flag), "{flag} missing from:\n{usage}");
    }
    assert!(!usage.contains("set -euo"), "{usage}");
    assert!(!usage.contains("#"), "{usage}");
}

/// Against a server with API keys, the load test sends its key on every request; without
/// one its set-up is refused and the run says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_with_keys_is_loaded_with_the_key_given() {
    const KEY: &str = "load-test-admin-key-0123";
    let dir = tempfile::tempdir().unwrap();
    let server = loadtest::server::Launch::serve(env!("CARGO_BIN_EXE_stockd"), dir.path())
        .env("STOCKD_ADMIN_KEY", KEY)
        .start()
        .expect("a keyed server starts");
    let target = || Target::Url(server.base_url.clone());
    let opts = Options {
        limits: Limits {
            requests_max: Some(60),
            ..limits()
        },
        stock: 20,
        api_key: Some(KEY.into()),
        ..options(Scenario::FlashSale, target())
    };
    let report = loadtest::run(opts).await.expect("run");
    assert!(report.verified, "{}", report.markdown());
    assert_eq!(report.statuses.get("201"), Some(&20));
    let opts = Options {
        limits: Limits {
            requests_max: Some(10),
            ..limits()
        },
        ..options(Scenario::FlashSale, target())
    };
    let Err(err) = loadtest::run(opts).await else {
        panic!("the run went ahead without a key");
    };
    assert!(err.contains("401"), "{err}");
}
