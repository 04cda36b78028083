//! Property tests of the domain rules and the one fold, against a plain reference model.
//!
//! Random operation sequences are decided by the reference model (plain arithmetic, no
//! shared code), cross-checked against the domain methods the actors use, turned into log
//! records and folded. After every step: invariant 1 in docs/ARCHITECTURE.md holds (never
//! oversell: 0 <= reserved <= on_hand) and the fold agrees with the model, per-buyer
//! purchase-limit counts included. At the end, every prefix of the produced log folds to a
//! valid state in which no counted hold took its customer past the limit in force, and
//! every record survives the codec. Records proposed by successive leaders, some refused by
//! the engine, fold entry by entry through the epoch chain to each epoch's accepted prefix.

use std::collections::BTreeMap;

use proptest::prelude::*;
use stockd::domain::{Line, LineSet, RulesPatch, Status};
use stockd::limits::STOCK_MAX;
use stockd::storage::entry::{Entry, Epoch, LogPos, Membership, NodeAddr, Outcome, Payload};
use stockd::storage::fold::{apply, apply_entry, State};
use stockd::storage::record::{decode, encode, Record};
use uuid::Uuid;

const SKUS: [&str; 3] = ["A", "B", "C"];

#[derive(Clone, Debug)]
enum Op {
    Create {
        sku: usize,
        on_hand: u64,
    },
    Replenish {
        sku: usize,
        quantity: u64,
    },
    Adjust {
        sku: usize,
        delta: i64,
    },
    Delete {
        sku: usize,
    },
    Reserve {
        customer: usize,
        lines: Vec<(usize, u64)>,
    },
    /// Sets (or removes) a product's purchase limit and sale window; the window is
    /// `start .. start + length` in steps from the first (`at` = 1000 + step).
    SetRules {
        sku: usize,
        limit: Option<u64>,
        window: Option<(i64, i64)>,
    },
    Confirm {
        res: usize,
    },
    Cancel {
        res: usize,
    },
    Expire {
        res: usize,
    },
    Extend {
        res: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..3usize, 0..6u64).prop_map(|(sku, on_hand)| Op::Create { sku, on_hand }),
        (0..3usize, 1..4u64).prop_map(|(sku, quantity)| Op::Replenish { sku, quantity }),
        (0..3usize, -4..4i64).prop_map(|(sku, delta)| Op::Adjust { sku, delta }),
        (0..3usize).prop_map(|sku| Op::Delete { sku }),
        (0..3usize, prop::collection::vec((0..3usize, 1..4u64), 1..3))
            .prop_map(|(customer, lines)| Op::Reserve { customer, lines }),
        (0..3usize, prop::collection::vec((0..3usize, 1..4u64), 1..3))
            .prop_map(|(customer, lines)| Op::Reserve { customer, lines }),
        (
            0..3usize,
            prop::option::of(1..5u64),
            prop::option::weighted(0.3, (0..80i64, 1..40i64))
        )
            .prop_map(|(sku, limit, window)| Op::SetRules { sku, limit, window }),
        (0..8usize).prop_map(|res| Op::Confirm { res }),
        (0..8usize).prop_map(|res| Op::Cancel { res }),
        (0..8usize).prop_map(|res| Op::Expire { res }),
        (0..8usize).prop_map(|res| Op::Extend { res }),
    ]
}

const CUSTOMERS: [&str; 3] = ["c0", "c1", "c2"];

/// A model reservation: id, customer, lines (with whether each was counted toward a
/// limit), still pending.
type ModelReservation = (Uuid, &'static str, Vec<(&'static str, u64, bool)>, bool);

/// A product's sale rules in the model: limit, window (start, end).
#[derive(Clone, Copy, Default)]
struct ModelRules {
    limit: Option<u64>,
    window: Option<(i64, i64)>,
}

/// The reference model: counters and statuses, nothing else.
#[derive(Clone, Default)]
struct Model {
    /// sku → (on_hand, reserved, sold)
    stock: BTreeMap<&'static str, (u64, u64, u64)>,
    rules: BTreeMap<&'static str, ModelRules>,
    /// (sku, customer) → units counted toward the limit (pending and confirmed holds made
    /// while the product had a limit).
    counted: BTreeMap<(&'static str, &'static str), u64>,
    reservations: Vec<ModelReservation>,
}

impl Model {
    /// Decides the op; returns the record it produces, if accepted.
    fn step(&mut self, op: &Op, at: i64) -> Option<Record> {
        match op {
            Op::Create { sku, on_hand } => {
                let sku = SKUS[*sku];
                if self.stock.contains_key(sku) {
                    return None;
                }
                self.stock.insert(sku, (*on_hand, 0, 0));
                Some(Record::ProductCreated {
                    by: None,
                    rules: Default::default(),
                    low_stock_threshold: None,
                    sku: sku.into(),
                    name: "n".into(),
                    price: None,
                    on_hand: *on_hand,
                    at,
                })
            }
            Op::Replenish { sku, quantity } => {
                let sku = SKUS[*sku];
                let s = self.stock.get_mut(sku)?;
                s.0 += quantity;
                Some(Record::Replenished {
                    by: None,
                    sku: sku.into(),
                    quantity: *quantity,
                    at,
                })
            }
            Op::Adjust { sku, delta } => {
                let sku = SKUS[*sku];
                let s = self.stock.get_mut(sku)?;
                let result = s.0 as i64 + delta;
                if *delta == 0 || result < s.1 as i64 {
                    return None;
                }
                s.0 = result as u64;
                Some(Record::Adjusted {
                    by: None,
                    sku: sku.into(),
                    delta: *delta,
                    reason: None,
                    at,
                })
            }
            Op::Delete { sku } => {
                let sku = SKUS[*sku];
                let s = self.stock.get(sku)?;
                if s.1 > 0 {
                    return None;
                }
                self.stock.remove(sku);
                self.rules.remove(sku);
                self.counted.retain(|(s, _), _| *s != sku);
                Some(Record::ProductDeleted {
                    by: None,
                    sku: sku.into(),
                    at,
                })
            }
            Op::Reserve { customer, lines } => {
                let customer = CUSTOMERS[*customer];
                let mut seen = Vec::new();
                let mut decided = Vec::new();
                for (sku, quantity) in lines {
                    let sku = SKUS[*sku];
                    let s = self.stock.get(sku)?;
                    let rules = self.rules.get(sku).copied().unwrap_or_default();
                    if seen.contains(&sku) || s.0 - s.1 < *quantity {
                        return None;
                    }
                    if rules
                        .window
                        .is_some_and(|(start, end)| at < start || at >= end)
                    {
                        return None;
                    }
                    let held = self.counted.get(&(sku, customer)).copied().unwrap_or(0);
                    if rules.limit.is_some_and(|limit| held + quantity > limit) {
                        return None;
                    }
                    seen.push(sku);
                    decided.push((sku, *quantity, rules.limit.is_some()));
                }
                let mut counted = LineSet::EMPTY;
                for (i, (sku, q, is_counted)) in decided.iter().enumerate() {
                    self.stock.get_mut(sku).unwrap().1 += q;
                    if *is_counted {
                        *self.counted.entry((sku, customer)).or_insert(0) += q;
                        counted.insert(i);
                    }
                }
                let lines: Vec<_> = decided.iter().map(|(s, q, _)| (*s, *q)).collect();
                let id = Uuid::now_v7();
                self.reservations.push((id, customer, decided, true));
                Some(Record::ReservationCreated {
                    by: None,
                    counted,
                    id,
                    customer_id: customer.into(),
                    items: lines
                        .iter()
                        .map(|(s, q)| Line {
                            sku: s.to_string(),
                            quantity: *q,
                        })
                        .collect(),
                    created_at: at,
                    expires_at: at + 1000,
                    idempotency: None,
                })
            }
            Op::SetRules { sku, limit, window } => {
                let sku = SKUS[*sku];
                self.stock.get(sku)?;
                let window = window.map(|(start, length)| (1_000 + start, 1_000 + start + length));
                self.rules.insert(
                    sku,
                    ModelRules {
                        limit: *limit,
                        window,
                    },
                );
                Some(Record::ProductPatched {
                    by: None,
                    sku: sku.into(),
                    name: None,
                    price: None,
                    rules: RulesPatch {
                        max_per_customer: Some(*limit),
                        starts_at: Some(window.map(|w| w.0)),
                        ends_at: Some(window.map(|w| w.1)),
                    },
                    low_stock_threshold: None,
                    at,
                })
            }
            Op::Confirm { res } | Op::Cancel { res } | Op::Expire { res } | Op::Extend { res } => {
                let (id, customer, lines, pending) = self.reservations.get_mut(*res)?;
                if !*pending {
                    return None;
                }
                let id = *id;
                if let Op::Extend { .. } = op {
                    return Some(Record::ReservationExtended {
                        by: None,
                        id,
                        expires_at: at + 5000,
                        at,
                    });
                }
                *pending = false;
                for (sku, q, is_counted) in lines.iter() {
                    let s = self.stock.get_mut(sku).unwrap();
                    s.1 -= q;
                    if let Op::Confirm { .. } = op {
                        s.0 -= q;
                        s.2 += q;
                    } else if *is_counted {
                        let count = self.counted.get_mut(&(*sku, *customer)).unwrap();
                        *count -= q;
                        if *count == 0 {
                            self.counted.remove(&(*sku, *customer));
                        }
                    }
                }
                Some(match op {
                    Op::Confirm { .. } => Record::ReservationConfirmed {
                        by: None,
                        id,
                        order_id: None,
                        at,
                    },
                    Op::Cancel { .. } => Record::ReservationCancelled { by: None, id, at },
                    _ => Record::ReservationExpired { id, at },
                })
            }
        }
    }
}

/// The domain methods (what the actors call) must agree with the model's decision.
fn domain_agrees(state: &State, op: &Op, accepted: bool, at: i64) -> bool {
    match op {
        Op::Adjust { sku, delta } if *delta != 0 => match state.products.get(SKUS[*sku]) {
            Some(p) => p.check_adjust(*delta).is_ok() == accepted,
            None => !accepted,
        },
        Op::Replenish { sku, quantity } => match state.products.get(SKUS[*sku]) {
            Some(p) => p.check_replenish(*quantity).is_ok() == accepted,
            None => !accepted,
        },
        Op::Reserve { customer, lines } if lines.len() == 1 => {
            match state.products.get(SKUS[lines[0].0]) {
                Some(p) => {
                    let held = p.clone().hold_for(CUSTOMERS[*customer], lines[0].1, at);
                    held.is_ok() == accepted
                }
                None => !accepted,
            }
        }
        _ => true,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn fold_matches_the_reference_model(ops in prop::collection::vec(op(), 1..80)) {
        let mut model = Model::default();
        let mut state = State::default();
        // As a cluster node's state machine keeps it: the fold keeps its SKUs in order.
        state.keep_sku_order();
        let mut log = Vec::new();
        for (i, op) in ops.iter().enumerate() {
            let at = 1_000 + i as i64;
            let record = model.step(op, at);
            prop_assert!(domain_agrees(&state, op, record.is_some(), at), "domain disagrees on {op:?}");
            if let Some(record) = record {
                apply(&mut state, &record).map_err(|e| TestCaseError::fail(format!("{op:?}: {e}")))?;
                log.push(record);
            }
            prop_assert!(state.invariant_holds());
            for (sku, (on_hand, reserved, sold)) in &model.stock {
                let p = &state.products[*sku];
                prop_assert_eq!((p.on_hand, p.reserved, p.sold), (*on_hand, *reserved, *sold));
                prop_assert!(p.on_hand <= STOCK_MAX);
            }
            prop_assert_eq!(state.products.len(), model.stock.len());
            let kept: Vec<&str> = state.skus.0.as_ref().expect("kept").after(None).collect();
            let in_order: Vec<&str> = model.stock.keys().copied().collect();
            prop_assert_eq!(kept, in_order, "the SKUs in order after {:?}", op);
            let mut counts = BTreeMap::new();
            for (sku, p) in &state.products {
                for (customer, n) in p.buyers.iter() {
                    counts.insert((sku.clone(), customer.to_string()), n);
                }
            }
            let expected: BTreeMap<_, _> = model
                .counted
                .iter()
                .map(|((s, c), n)| ((s.to_string(), c.to_string()), *n))
                .collect();
            prop_assert_eq!(counts, expected, "per-buyer counts after {:?}", op);
            let holds = state.pending_holds();
            for (sku, p) in &state.products {
                prop_assert_eq!(p.reserved, holds.get(sku).copied().unwrap_or(0));
            }
        }
        // Every prefix of the log folds to a valid state (the log order rule's consequence).
        let mut prefix = State::default();
        for record in &log {
            let decoded = decode(&encode(record));
            prop_assert_eq!(decoded.as_ref(), Ok(record));
            apply(&mut prefix, record).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert!(prefix.invariant_holds());
            if let Record::ReservationCreated { customer_id, items, counted, created_at, .. } = record {
                for (i, line) in items.iter().enumerate() {
                    let p = &prefix.products[&line.sku];
                    if let Some(limit) = p.rules.max_per_customer {
                        prop_assert!(counted.contains(i));
                        prop_assert!(p.buyers.held(customer_id) <= limit, "over the limit at the hold");
                    }
                    let (start, end) = (p.rules.starts_at, p.rules.ends_at);
                    prop_assert!(start.is_none_or(|s| *created_at >= s) && end.is_none_or(|e| *created_at < e));
                }
            }
        }
        prop_assert!(prefix == state, "prefix fold of the whole log equals the live fold");
        let pending = model.reservations.iter().filter(|r| r.3).count();
        prop_assert_eq!(
            state.reservations.values().filter(|r| r.status == Status::Pending).count(),
            pending
        );
    }
}

/// One leader's turn in `the_epoch_chain_folds_each_epochs_accepted_prefix`: whether it
/// starts a new term (else a fresh start in the same term), and its ops, each with a roll
/// deciding whether the engine refuses its proposal and one deciding what entry follows.
type Turn = (bool, Vec<(Op, u8, u8)>);

fn turn() -> impl Strategy<Value = Turn> {
    (
        any::<bool>(),
        prop::collection::vec((op(), 0..100u8, 0..100u8), 0..30),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(192))]

    /// docs/REPLICATION.md, "The epoch chain": each leader decides records on the state
    /// folded so far (the reference model), numbering its proposals 1, 2, 3… within its
    /// epoch; the engine refuses some (they never reach the log), and blanks, membership
    /// changes and stale proposals of earlier terms come between. Folding the log entry by
    /// entry with `apply_entry` applies exactly each epoch's proposals before its first
    /// refusal and skips every other, so that after every entry the state never oversells
    /// and no counted hold is above its limit, after each epoch it equals the plain fold of
    /// the accepted records, and the clock floor is the newest decision applied.
    #[test]
    fn the_epoch_chain_folds_each_epochs_accepted_prefix(
        turns in prop::collection::vec(turn(), 1..6)
    ) {
        let mut accepted = Model::default();
        let mut reference = State::default();
        let mut state = State::default();
        let mut epoch = Epoch { term: 0, k: 0 };
        let mut seq = 0u64;
        let mut at = 1_000i64;
        let mut newest_applied_at = 0i64;
        // Proposals logged in earlier terms: replayed later as stale entries.
        let mut logged: Vec<(Epoch, u64, Record)> = Vec::new();
        for (new_term, steps) in turns {
            epoch = if new_term || epoch.term == 0 {
                Epoch { term: epoch.term + 1, k: 0 }
            } else {
                Epoch { term: epoch.term, k: epoch.k + 1 }
            };
            let mut leader = accepted.clone();
            // A new leadership's first entry is the engine's blank.
            let mut entries = vec![(Payload::Blank, Outcome::Applied)];
            let mut n = 0;
            let mut refused = false;
            let earlier_terms = logged.iter().filter(|(e, ..)| e.term < epoch.term).count();
            for (op, refuse, then) in &steps {
                at += 1;
                let Some(record) = leader.step(op, at) else { continue };
                n += 1;
                if *refuse < 12 {
                    // Refused by the engine: never in the log; the chain breaks here.
                    refused = true;
                    continue;
                }
                let outcome = if refused {
                    Outcome::Skipped
                } else {
                    accepted = leader.clone();
                    apply(&mut reference, &record).map_err(|e| TestCaseError::fail(e.to_string()))?;
                    newest_applied_at = newest_applied_at.max(record.at());
                    Outcome::Applied
                };
                logged.push((epoch, n, record.clone()));
                entries.push((Payload::Normal { epoch, n, record }, outcome));
                match then {
                    0..=7 => entries.push((Payload::Blank, Outcome::Applied)),
                    8..=11 => entries.push((Payload::Membership(membership(*then)), Outcome::Applied)),
                    12..=17 if earlier_terms > 0 => {
                        let (e, n, record) = logged[*then as usize % earlier_terms].clone();
                        entries.push((Payload::Normal { epoch: e, n, record }, Outcome::Skipped));
                    }
                    _ => {}
                }
            }
            for (payload, expected) in entries {
                seq += 1;
                let pos = LogPos { term: epoch.term, seq };
                let record = match &payload {
                    Payload::Normal { record, .. } => Some(record.clone()),
                    _ => None,
                };
                let outcome = apply_entry(&mut state, Entry { pos, payload })
                    .map_err(|e| TestCaseError::fail(format!("entry {seq}: {e}")))?;
                prop_assert_eq!(outcome, expected, "entry {}", seq);
                prop_assert!(state.invariant_holds(), "oversold after entry {}", seq);
                let raft = state.raft.as_ref().expect("raft metadata");
                prop_assert_eq!(raft.last_applied, Some(pos));
                if let (Outcome::Applied, Some(Record::ReservationCreated { customer_id, items, .. })) = (outcome, &record) {
                    for line in items {
                        let p = &state.products[&line.sku];
                        if let Some(limit) = p.rules.max_per_customer {
                            prop_assert!(p.buyers.held(customer_id) <= limit, "over the limit at entry {}", seq);
                        }
                    }
                }
            }
            let raft = state.raft.clone().expect("raft metadata");
            prop_assert_eq!(raft.clock_floor, newest_applied_at);
            let folded = State { raft: None, ..state.clone() };
            prop_assert!(folded == reference, "the fold of the log equals the accepted records' after term {}", epoch.term);
        }
    }
}

fn membership(roll: u8) -> Membership {
    let voters: std::collections::BTreeSet<u64> = (1..=3 + u64::from(roll % 2) * 2).collect();
    Membership {
        configs: vec![voters.clone()],
        nodes: voters
            .iter()
            .map(|id| {
                let addr = NodeAddr {
                    api: format!("127.0.0.1:{}", 8000 + id),
                    raft: format!("127.0.0.1:{}", 9000 + id),
                };
                (*id, addr)
            })
            .collect(),
    }
}

#[test]
fn a_hold_beyond_stock_is_a_fold_error_not_an_oversell() {
    let mut state = State::default();
    apply(
        &mut state,
        &Record::ProductCreated {
            by: None,
            rules: Default::default(),
            low_stock_threshold: None,
            sku: "A".into(),
            name: "a".into(),
            price: None,
            on_hand: 1,
            at: 0,
        },
    )
    .unwrap();
    let take = |n: u64| Record::ReservationCreated {
        by: None,
        counted: Default::default(),
        id: Uuid::now_v7(),
        customer_id: "c".into(),
        items: vec![Line {
            sku: "A".into(),
            quantity: n,
        }],
        created_at: 1,
        expires_at: 2,
        idempotency: None,
    };
    apply(&mut state, &take(1)).unwrap();
    assert!(apply(&mut state, &take(1)).is_err());
}

/// Writes `records` to a fresh log in `dir` through the real writer; returns a reader.
fn write_log(dir: &std::path::Path, records: &[Record]) -> stockd::storage::log::LogReader {
    // Small segments, so that truncation really drops some.
    write_log_in_segments(dir, records, 4)
}

fn write_log_in_segments(
    dir: &std::path::Path,
    records: &[Record],
    segment_records: u64,
) -> stockd::storage::log::LogReader {
    let log = stockd::storage::log::Log::open(dir)
        .unwrap()
        .with_segment_records(segment_records);
    let reader = log.reader();
    let (handle, join) = log.start_writer(1).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(async {
        let tickets: Vec<_> = records.iter().map(|r| handle.append(r.clone())).collect();
        for ticket in tickets {
            ticket.durable().await.unwrap();
        }
        handle.shutdown().await.unwrap();
    });
    join.join().unwrap();
    reader
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// Recovery from (snapshot + log tail) equals folding the whole log, wherever the
    /// snapshots are cut, before and after the log is truncated behind them.
    #[test]
    fn snapshot_plus_tail_equals_the_full_fold(
        ops in prop::collection::vec(op(), 1..60),
        cuts in (0.0..1.0f64, 0.0..1.0f64),
    ) {
        let mut model = Model::default();
        let mut records = Vec::new();
        for (i, op) in ops.iter().enumerate() {
            if let Some(record) = model.step(op, 1_000 + i as i64) {
                records.push(record);
            }
        }
        let mut full = State::default();
        for record in &records {
            apply(&mut full, record).unwrap();
        }
        let tmp = tempfile::tempdir().unwrap();
        let reader = write_log(&tmp.path().join("log"), &records);
        let snapshots = tmp.path().join("snapshots");
        let n = records.len() as u64;
        let (a, b) = (cuts.0.min(cuts.1), cuts.0.max(cuts.1));
        let (first, second) = ((a * n as f64) as u64, (b * n as f64) as u64);
        let hooks = stockd::storage::snapshot::WriteHooks::default();
        let taken = stockd::storage::snapshotter::take_snapshot(&reader, &snapshots, first, 2, 0, hooks)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(taken.sequence, first);
        let r = stockd::storage::recovery::recover(&reader, &snapshots, u64::MAX)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(r.snapshot.map(|s| s.seq), Some(first));
        prop_assert_eq!(r.records, n - first);
        prop_assert!(r.state == full, "one snapshot at {} + tail", first);

        // A second snapshot: the log is truncated through the first (the fallback). At the
        // same sequence, nothing is written and nothing truncated.
        let again = stockd::storage::snapshotter::take_snapshot(&reader, &snapshots, second, 2, 0, hooks)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(again.created, second > first);
        let truncated = if second > first { first } else { 0 };
        prop_assert_eq!(reader.truncated_through(), truncated);
        let left = reader.records().count() as u64;
        prop_assert!(left <= n - truncated + 4, "whole segments before the mark are dropped");
        prop_assert!(left >= n - truncated);
        let r = stockd::storage::recovery::recover(&reader, &snapshots, u64::MAX)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert!(r.state == full, "snapshots at {}, {} + tail", first, second);
        // And the state at the first cut is still reachable (what a product rebuild uses).
        let mut at_first = State::default();
        for record in &records[..first as usize] {
            apply(&mut at_first, record).unwrap();
        }
        let r = stockd::storage::recovery::recover(&reader, &snapshots, first)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert!(r.state == at_first);
    }
}

/// `n` products created, SKU-0 .. SKU-{n-1}, one record each.
fn products_created(n: u64) -> Vec<Record> {
    (0..n)
        .map(|i| Record::ProductCreated {
            by: None,
            rules: Default::default(),
            low_stock_threshold: None,
            sku: format!("SKU-{i}"),
            name: "n".into(),
            price: None,
            on_hand: i,
            at: 1,
        })
        .collect()
}

/// Across segments, a damaged record is reported as that record (not as a gap, not
/// skipped), everything before it replays in log order, and a replay that stops before
/// it (a rebuild up to an earlier sequence) does not trip on it.
#[test]
fn a_damaged_record_in_a_later_segment_is_named() {
    let records = products_created(30);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    drop(write_log(&dir, &records));

    let log = stockd::storage::log::Log::open(&dir).unwrap();
    let full = stockd::storage::recovery::fold_log(&log.reader()).unwrap();
    assert_eq!((full.records, full.last_seq), (30, 30));
    let in_order: Vec<u64> = log.reader().records().map(|r| r.unwrap().0).collect();
    assert_eq!(in_order, (1..=30).collect::<Vec<_>>());
    let mut expected = State::default();
    for record in &records {
        apply(&mut expected, record).unwrap();
    }
    assert!(full.state == expected);
    drop(log);

    stockd::storage::log::damage_record(&dir, 22).unwrap();
    let log = stockd::storage::log::Log::open(&dir).unwrap();
    let err = stockd::storage::recovery::fold_log(&log.reader()).unwrap_err();
    assert_eq!(err.damaged_seq(), Some(22), "{err}");
    // Up to the record before it, recovery still works (what a rebuild would ask for).
    let upto =
        stockd::storage::recovery::fold_records(&log.reader(), State::default(), 0, 21).unwrap();
    assert_eq!((upto.1, upto.2), (21, 21));
}

/// Segments larger than the replay's read-ahead (8 batches of 1,024 records), four of
/// them: replay must not stall between segments while its reader is ahead. (A reader
/// per segment, tried once, kept a finished segment's queue open while blocked on a later
/// one and hung here for ever.)
#[test]
fn replay_of_segments_longer_than_the_read_ahead() {
    let n = 62_000u64;
    let mut records = vec![Record::ProductCreated {
        by: None,
        rules: Default::default(),
        low_stock_threshold: None,
        sku: "A".into(),
        name: "n".into(),
        price: None,
        on_hand: 0,
        at: 1,
    }];
    records.extend((1..n).map(|_| Record::Replenished {
        by: None,
        sku: "A".into(),
        quantity: 1,
        at: 1,
    }));
    let tmp = tempfile::tempdir().unwrap();
    let reader = write_log_in_segments(&tmp.path().join("log"), &records, 20_000);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(stockd::storage::recovery::fold_log(&reader).map(|r| (r.records, r.state)));
    });
    let (folded, state) = rx
        .recv_timeout(std::time::Duration::from_secs(60))
        .expect("replay finishes")
        .unwrap();
    assert_eq!(folded, n);
    assert_eq!(state.products["A"].on_hand, n - 1);
}

/// Recovery up to a record the log does not reach is an error, never the state short of
/// it (what a rebuild would get if a truncation dropped the records it was reading).
#[test]
fn recovery_up_to_a_record_past_the_log_end_is_an_error() {
    let records = products_created(10);
    let tmp = tempfile::tempdir().unwrap();
    let reader = write_log(&tmp.path().join("log"), &records);
    let snapshots = tmp.path().join("snapshots");
    let at_ten = stockd::storage::recovery::recover(&reader, &snapshots, 10).unwrap();
    assert_eq!((at_ten.records, at_ten.last_seq), (10, 10));
    let at_four = stockd::storage::recovery::recover(&reader, &snapshots, 4).unwrap();
    assert_eq!(at_four.last_seq, 4);
    let err = stockd::storage::recovery::recover(&reader, &snapshots, 12).unwrap_err();
    assert!(
        matches!(
            err,
            stockd::storage::recovery::RecoveryError::Short {
                upto: 12,
                last_seq: 10
            }
        ),
        "{err}"
    );
}
