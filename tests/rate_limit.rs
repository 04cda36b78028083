//! The per-customer rate limit on reservation attempts (docs/API.md, `--customer-rate`):
//! in-process servers with a tweaked configuration, and the real binary reading the flag
//! and its environment variable.
//!
//! The limits are low (1 a second) and the attempts immediate, so the counts are exact; a
//! pause of a second or more between attempts (a very slow machine) would let one more
//! through per second, and the checks allow exactly that and no more.

mod common;

use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use common::{Answer, ChildServer, Client, TestServer, START_MS};
use serde_json::json;
use stockd::clock::ManualClock;
use stockd::config::CustomerRate;
use stockd::{Config, Durability};

fn rate(per_second: u32, burst: u32) -> Option<CustomerRate> {
    Some(CustomerRate::new(
        NonZeroU32::new(per_second).unwrap(),
        NonZeroU32::new(burst),
    ))
}

/// An in-process server with its configuration tweaked, and product `A` (100 units) on
/// sale.
async fn start_selling(tweak: fn(&mut Config)) -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    let clock = std::sync::Arc::new(ManualClock::new(START_MS));
    let t = TestServer::start_tweaked(dir, clock, Durability::Sync, tweak).await;
    t.client.create_product("A", 100).await;
    t
}

/// `n` immediate one-unit attempts by `customer`: the answers, and how long they took.
async fn attempts(c: &Client, customer: &str, sku: &str, n: usize) -> (Vec<Answer>, Duration) {
    let started = Instant::now();
    let mut answers = Vec::new();
    for _ in 0..n {
        answers.push(c.reserve(customer, sku, 1).await);
    }
    (answers, started.elapsed())
}

/// Asserts that exactly `burst` of `answers` were created (one more per whole second they
/// took, at 1 a second) and that every other one is a well-formed 429; returns the 201s.
fn assert_burst_then_refused(answers: &[Answer], elapsed: Duration, burst: usize) -> usize {
    let created = answers.iter().filter(|a| a.status == 201).count();
    let slack = elapsed.as_secs() as usize;
    assert!(
        (burst..=burst + slack).contains(&created),
        "{created} created in {elapsed:?}, burst {burst}"
    );
    for a in answers.iter().filter(|a| a.status != 201) {
        a.assert_problem(429, "rate_limited");
        let retry: u64 = a
            .header("retry-after")
            .expect("Retry-After")
            .parse()
            .expect("whole seconds");
        assert!(retry >= 1, "{retry}");
        assert_eq!(a.body["retry_after_seconds"], retry, "{:?}", a.body);
    }
    created
}

/// Sends `body` with `key` until it is answered 201 (for 10 s at most): the first answer
/// once the customer's bucket has room again, and when it was sent.
async fn until_created(
    c: &Client,
    body: &serde_json::Value,
    key: &[(&str, &str)],
) -> (Answer, Instant) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let sent = Instant::now();
        let a = c.post_with("/v1/reservations", body.clone(), key).await;
        if a.status == 201 {
            return (a, sent);
        }
        a.assert_problem(429, "rate_limited");
        assert!(Instant::now() < deadline, "still refused after 10 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// docs/API.md: beyond its burst, a customer's attempts answer 429 `rate_limited` with
/// `Retry-After`; another customer keeps its own limit; refusals are counted.
#[tokio::test]
async fn a_customer_gets_its_burst_then_429_and_others_are_unaffected() {
    let t = start_selling(|c| c.customer_rate = rate(1, 3)).await;
    let c = &t.client;
    let (answers, elapsed) = attempts(c, "alice", "A", 10).await;
    let alice = assert_burst_then_refused(&answers, elapsed, 3);
    let (answers, elapsed) = attempts(c, "bob", "A", 4).await;
    let bob = assert_burst_then_refused(&answers, elapsed, 3);
    assert_eq!(
        c.product("A").await["reserved"],
        (alice + bob) as u64,
        "refused attempts held nothing"
    );
    assert_eq!(
        c.metric("stockd_rate_limited_total").await,
        (14 - alice - bob) as f64
    );
    assert_eq!(
        c.metric("stockd_reservations_created_total").await,
        (alice + bob) as f64
    );
    t.stop().await;
}

/// docs/API.md: a refused attempt changes nothing: no hold and no idempotency key (a retry
/// with the same key, once allowed, creates the reservation). An idempotent replay counts
/// as an attempt.
#[tokio::test]
async fn a_refused_attempt_leaves_no_trace_and_replays_count() {
    let t = start_selling(|c| c.customer_rate = rate(1, 1)).await;
    let c = &t.client;
    assert_eq!(c.reserve("alice", "A", 1).await.status, 201);
    let body = json!({"customer_id": "alice", "items": [{"sku": "A", "quantity": 2}]});
    let key = [("idempotency-key", "k-1")];
    // When the bucket was last emptied, at the latest.
    let mut emptied = Instant::now();
    let refused = c.post_with("/v1/reservations", body.clone(), &key).await;
    // (A pause of a second or more would have let it through.)
    if refused.status != 201 {
        refused.assert_problem(429, "rate_limited");
        assert_eq!(c.product("A").await["reserved"], 1, "no hold");
        // Once allowed, the same key creates the reservation: it was not remembered.
        let (created, sent) = until_created(c, &body, &key).await;
        emptied = sent;
        assert_eq!(created.header("idempotent-replayed"), None, "{created:?}");
    }
    assert_eq!(c.product("A").await["reserved"], 3);
    // The replay is an attempt too: refused while the bucket is empty, then answered.
    let replay = c.post_with("/v1/reservations", body.clone(), &key).await;
    if emptied.elapsed() < Duration::from_secs(1) {
        replay.assert_problem(429, "rate_limited");
    }
    let (replayed, _) = until_created(c, &body, &key).await;
    assert_eq!(replayed.header("idempotent-replayed"), Some("true"));
    assert_eq!(
        c.product("A").await["reserved"],
        3,
        "a replay holds nothing"
    );
    t.stop().await;
}

/// An attempt whose body is refused (422) is not counted: the customer is not known yet.
#[tokio::test]
async fn invalid_attempts_are_not_counted() {
    let t = start_selling(|c| c.customer_rate = rate(1, 1)).await;
    let c = &t.client;
    for _ in 0..3 {
        let bad = json!({"customer_id": "alice", "items": []});
        c.post("/v1/reservations", bad)
            .await
            .assert_problem(422, "validation_failed");
    }
    assert_eq!(c.reserve("alice", "A", 1).await.status, 201);
    t.stop().await;
}

/// Off by default: no limit at all.
#[tokio::test]
async fn without_the_flag_there_is_no_limit() {
    let t = TestServer::start().await;
    let c = &t.client;
    c.create_product("A", 100).await;
    for _ in 0..20 {
        assert_eq!(c.reserve("alice", "A", 1).await.status, 201);
    }
    assert_eq!(c.metric("stockd_rate_limited_total").await, 0.0);
    t.stop().await;
}

/// docs/API.md: while the limit tracks its most customers, customers it does not track
/// share one bucket; those it tracks keep theirs.
#[tokio::test]
async fn past_the_key_cap_new_customers_share_one_bucket() {
    let t = start_selling(|c| {
        c.customer_rate = rate(1, 1).map(|r| CustomerRate { keys_max: 1, ..r });
    })
    .await;
    let c = &t.client;
    let started = Instant::now();
    assert_eq!(c.reserve("alice", "A", 1).await.status, 201, "tracked");
    assert_eq!(
        c.reserve("bob", "A", 1).await.status,
        201,
        "the shared bucket"
    );
    let carol = c.reserve("carol", "A", 1).await;
    let alice = c.reserve("alice", "A", 1).await;
    if started.elapsed() < Duration::from_secs(1) {
        carol.assert_problem(429, "rate_limited");
        alice.assert_problem(429, "rate_limited");
    }
    t.stop().await;
}

/// The binary reads `--customer-rate`/`--customer-burst` and their variables.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_reads_the_flags_and_their_variables() {
    let dir = tempfile::tempdir().unwrap();
    for (flags, env, burst) in [
        (
            &["--customer-rate", "1", "--customer-burst", "2"][..],
            &[][..],
            2,
        ),
        (
            &[][..],
            &[
                ("STOCKD_CUSTOMER_RATE", "1"),
                ("STOCKD_CUSTOMER_BURST", "1"),
            ][..],
            1,
        ),
        // The default burst: twice the rate.
        (&["--customer-rate", "1"][..], &[][..], 2),
    ] {
        let sub = dir.path().join(format!("{}-{}", flags.len(), env.len()));
        let mut server = ChildServer::spawn_with_env(&sub, flags, env);
        let c = server.client.clone();
        c.create_product("A", 10).await;
        let (answers, elapsed) = attempts(&c, "alice", "A", 4).await;
        assert_burst_then_refused(&answers, elapsed, burst);
        server.terminate();
    }
}

/// `--customer-burst` without a rate, and a rate of 0 (flag or variable), are refused.
#[test]
fn the_binary_refuses_a_burst_alone_and_a_zero_rate() {
    let dir = tempfile::tempdir().unwrap();
    let run = |cmd| {
        loadtest::server::run_to_exit(cmd, Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("stockd: {e}"))
    };
    let exited = run(common::serve_command(
        dir.path(),
        &["--customer-burst", "2"],
    ));
    assert_eq!(exited.status.code(), Some(2), "{}", exited.stderr);
    assert!(
        exited.stderr.contains("--customer-rate"),
        "{}",
        exited.stderr
    );
    let exited = run(common::serve_command(dir.path(), &["--customer-rate", "0"]));
    assert_eq!(exited.status.code(), Some(2), "{}", exited.stderr);
    let mut cmd = common::serve_command(dir.path(), &[]);
    cmd.env("STOCKD_CUSTOMER_RATE", "0");
    let exited = run(cmd);
    assert_eq!(exited.status.code(), Some(2), "{}", exited.stderr);
    assert!(
        exited
            .stderr
            .contains("tip: the value comes from the environment variable STOCKD_CUSTOMER_RATE"),
        "{}",
        exited.stderr
    );
    assert!(!dir.path().join("data").exists(), "nothing started");
}
