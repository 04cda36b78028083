//! The one fold: `apply(state, record)` is the only function that turns log records into
//! state. Recovery, tests (and the snapshotter, later) use it; the live actors make the same
//! changes through the same `domain` methods.
//!
//! Recovery applies records as facts: business checks were made before the record was
//! written. But invariant 1 (docs/ARCHITECTURE.md) is asserted after every record, and a record that contradicts
//! the state (an unknown SKU, a hold beyond what is available) is an error naming the
//! problem, never a silent repair.

use std::collections::BTreeMap;

use indexmap::IndexMap;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::clock::Millis;
use crate::domain::{ApiKey, KeyId, Product, Reservation, SkuIndex, Status, WebhookBook};
use crate::storage::entry::{Chain, Entry, LogPos, Outcome, Payload, RaftMeta, StoredMembership};
use crate::storage::record::{IdempotencyKey, Record};

/// A remembered idempotency key: what it created, for which request, and when.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdempotencyEntry {
    pub reservation_id: Uuid,
    pub fingerprint: Vec<u8>,
    pub created_at: Millis,
}

/// Products by SKU. An `IndexMap`: a hash table of 8-byte indexes into one dense vector of
/// the products, so a catalogue costs its products plus a few bytes each; a `HashMap` keeps
/// its products in the table's slots, and a table just past a doubling (a million products
/// in 2^21 slots) is half empty, ~170 bytes an empty slot. Removing swaps the last product
/// into the hole (`swap_remove`): the order of iteration is nobody's business (the digest
/// sorts, and a snapshot is read back into a map). Hashed with foldhash (seeded per
/// process), not SipHash: SipHash and the rehashing of a growing table were ~31 % of the
/// fold's CPU when replaying a million-product log (perf,
/// docs/performance-history.md#restart-replay-memory-and-snapshots-with-a-million-skus).
/// SKUs come from the operator's product API, not from buyers, and the seed still differs
/// per process.
pub type Products = IndexMap<String, Product, foldhash::fast::RandomState>;

/// The SKUs of a state's products in order, when the state keeps them (`Some`): the fold
/// adds and removes a SKU with its product. A cluster node's state machine keeps them
/// (`State::keep_sku_order`), so that the state it lends a new leader's epoch comes with
/// the index a page of products walks, instead of the epoch sorting a million SKUs while
/// the cluster waits (docs/PERFORMANCE.md, "Cluster"). Derived from the products, so not
/// part of the state's value: never encoded, and not compared (two states are equal
/// whatever either keeps here).
#[derive(Clone, Debug, Default)]
pub struct SkuOrder(pub Option<SkuIndex>);

impl PartialEq for SkuOrder {
    fn eq(&self, _: &SkuOrder) -> bool {
        true
    }
}

impl Eq for SkuOrder {}

/// Everything the log describes (and what a snapshot holds).
///
/// Reservations and idempotency keys are ordered maps, not hash maps: they grow by the
/// hundred thousand during a sale, and a hash map grows by rehashing everything into a
/// table twice the size (a pause of tens of milliseconds inside the supervisor at a few
/// hundred thousand reservations, plus the zeroing of the new table's pages). A B-tree
/// grows a node at a time; reservation ids are UUID v7 (time-ordered), so new ones are
/// appended at its right edge and the recent ones, which confirms and cancels name, stay
/// close together. Snapshots encode a map the same way whichever kind it is.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub products: Products,
    pub reservations: BTreeMap<Uuid, Reservation>,
    pub idempotency: BTreeMap<IdempotencyKey, IdempotencyEntry>,
    /// API keys that are not revoked.
    pub keys: BTreeMap<KeyId, ApiKey>,
    /// A cluster's webhooks (a single server keeps its own in files: empty there).
    pub webhooks: WebhookBook,
    /// What a replicated node's state knows beside the records (`None` on a single node).
    /// Not part of the state's own encoding: snapshot formats 4 and 5 write it after the state
    /// (`None` on a single node), format 3 wrote it after the format-2 state, and formats 1
    /// and 2 have none (`storage::snapshot`).
    #[serde(skip)]
    pub raft: Option<RaftMeta>,
    /// The products' SKUs in order, if this state keeps them (see `SkuOrder`).
    #[serde(skip)]
    pub skus: SkuOrder,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FoldError {
    #[error("record names unknown product {0}")]
    UnknownProduct(String),
    #[error("record creates product {0}, which exists")]
    DuplicateProduct(String),
    #[error("record names unknown reservation {0}")]
    UnknownReservation(Uuid),
    #[error("record moves reservation {0}, which is not pending")]
    NotPending(Uuid),
    #[error("record would break invariant 1 (0 <= reserved <= on_hand <= 2^53-1) for product {0}")]
    Invariant(String),
    #[error("record deletes product {0} while it holds reserved units")]
    DeleteReserved(String),
    #[error("record sets sale rules on product {0} that are not valid")]
    Rules(String),
    #[error("record creates API key {0}, which exists")]
    DuplicateKey(KeyId),
    #[error("record revokes API key {0}, which does not exist")]
    UnknownKey(KeyId),
    #[error("Raft entry {entry:?} does not follow the last entry folded, {last:?}")]
    EntryOrder { last: Option<LogPos>, entry: LogPos },
}

fn product<'a>(products: &'a mut Products, sku: &str) -> Result<&'a mut Product, FoldError> {
    products
        .get_mut(sku)
        .ok_or_else(|| FoldError::UnknownProduct(sku.to_string()))
}

fn pending(
    reservations: &mut BTreeMap<Uuid, Reservation>,
    id: Uuid,
) -> Result<&mut Reservation, FoldError> {
    let r = reservations
        .get_mut(&id)
        .ok_or(FoldError::UnknownReservation(id))?;
    if r.status != Status::Pending {
        return Err(FoldError::NotPending(id));
    }
    Ok(r)
}

impl State {
    fn product(&mut self, sku: &str) -> Result<&mut Product, FoldError> {
        product(&mut self.products, sku)
    }

    /// From now on the fold keeps this state's SKUs in order (`SkuOrder`); the index is
    /// built now if the state has none (linear in the catalogue, plus a sort of its keys).
    pub fn keep_sku_order(&mut self) {
        if self.skus.0.is_none() {
            self.skus.0 = Some(SkuIndex::of(self.products.keys().map(String::as_str)));
        }
    }

    /// The products' SKUs in order: the index this state kept, taken (the fold keeps none
    /// from now on), or one built now.
    pub fn take_sku_index(&mut self) -> SkuIndex {
        match self.skus.0.take() {
            Some(index) if index.len() == self.products.len() => index,
            kept => {
                // The fold keeps the two alike; a state built some other way is sorted.
                debug_assert!(kept.is_none(), "the SKUs kept are not the products'");
                SkuIndex::of(self.products.keys().map(String::as_str))
            }
        }
    }

    /// A digest of everything the log describes, the same for two states that hold the
    /// same things however they were built (products and per-buyer counts are hash maps:
    /// they are hashed in key order): what tests compare to say two servers, or a server
    /// and an offline fold, agree. SHA-256 over the bincode of each part, in a fixed order.
    pub fn digest(&self) -> [u8; 32] {
        use sha2::{Digest, Sha256};
        let config = bincode::config::standard();
        let mut hasher = Sha256::new();
        let mut part = |value: &dyn erased::Encode| {
            let bytes = value.encode(config);
            hasher.update((bytes.len() as u64).to_le_bytes());
            hasher.update(&bytes);
        };
        let mut skus: Vec<&String> = self.products.keys().collect();
        skus.sort_unstable();
        part(&(skus.len() as u64));
        for sku in skus {
            let p = &self.products[sku];
            part(&p.clone_without_buyers());
            let mut buyers: Vec<(&str, u64)> = p.buyers.iter().collect();
            buyers.sort_unstable();
            part(&buyers);
        }
        part(&self.reservations);
        part(&self.idempotency);
        part(&self.keys);
        // A cluster's webhooks; none on a single node (whose digest stays what it was) nor
        // on a cluster that never had one.
        if self.webhooks != WebhookBook::default() {
            part(&self.webhooks);
        }
        // A replicated state's chain and membership (its clock floor is a bound for the
        // next leader's clock, not something the log describes); none on a single node,
        // whose digest stays what it was.
        if let Some(raft) = &self.raft {
            part(&raft.chain);
            part(&raft.membership);
        }
        hasher.finalize().into()
    }

    /// Invariant 1 for every product; used by tests and after recovery.
    pub fn invariant_holds(&self) -> bool {
        self.products.values().all(Product::invariant_holds)
    }

    /// Units held by pending reservations, per SKU (must equal each product's `reserved`
    /// once no reservation is being assembled).
    pub fn pending_holds(&self) -> BTreeMap<String, u64> {
        let mut holds = BTreeMap::new();
        for r in self.reservations.values() {
            if r.status == Status::Pending {
                for line in &r.items {
                    *holds.entry(line.sku.clone()).or_insert(0) += line.quantity;
                }
            }
        }
        holds
    }
}

/// Encoding for `State::digest`, over values of different types.
mod erased {
    pub trait Encode {
        fn encode(&self, config: bincode::config::Configuration) -> Vec<u8>;
    }

    impl<T: serde::Serialize> Encode for T {
        fn encode(&self, config: bincode::config::Configuration) -> Vec<u8> {
            // Plain data into a Vec: no I/O, no size limit.
            bincode::serde::encode_to_vec(self, config).expect("encoding into memory")
        }
    }
}

/// Retention (`Record::Forgotten`): drops the reservations that ended with a deadline
/// before `before` and the idempotency keys created before it. A pending reservation is
/// never dropped; an ended one's deadline is at or after the moment it ended (confirm,
/// cancel and expiry all happen by the deadline), so it is dropped only once it ended
/// before `before`. A key created before `before` is dropped only once its reservation
/// is (a reservation extended for days keeps its key), so a replay never misses its
/// original and never creates a second hold.
pub fn forget(
    reservations: &mut BTreeMap<Uuid, Reservation>,
    idempotency: &mut BTreeMap<IdempotencyKey, IdempotencyEntry>,
    before: Millis,
) {
    reservations.retain(|_, r| r.status == Status::Pending || r.expires_at >= before);
    idempotency
        .retain(|_, e| e.created_at >= before || reservations.contains_key(&e.reservation_id));
}

/// Folds one Raft entry: the only place Raft entries meet the fold (invariant 4 in
/// docs/ARCHITECTURE.md). A proposal is folded with `apply_owned` only if it continues its
/// epoch's chain, or opens a newer epoch, in an entry of its own epoch's term
/// (`Chain::admits`); any other is skipped. A membership entry is kept in
/// `State::raft`; a blank changes nothing. Every entry becomes `last_applied`, and must
/// follow the last one: the next sequence, in a term no older (the first entry a state
/// folds is sequence 1). On error the state may be partly changed, as with `apply`.
pub fn apply_entry(state: &mut State, entry: Entry) -> Result<Outcome, FoldError> {
    let (outcome, record) = admit_entry(&mut state.raft, entry)?;
    if let Some(record) = record {
        apply_owned(state, record)?;
    }
    Ok(outcome)
}

/// `apply_entry`'s part in the Raft metadata alone: checks the entry's order, decides its
/// outcome by the chain, and moves the metadata past it (`last_applied`, the chain, the
/// clock's floor, the membership). Returns the record to fold, if the entry is a proposal
/// the chain admits. The outcome never depends on anything but the metadata, so a state
/// machine whose products are lent to a leader's epoch keeps deciding it
/// (`cluster::state_machine`).
pub fn admit_entry(
    raft: &mut Option<RaftMeta>,
    entry: Entry,
) -> Result<(Outcome, Option<Record>), FoldError> {
    let last = raft.as_ref().and_then(|raft| raft.last_applied);
    let in_order = match last {
        Some(last) => entry.pos.seq == last.seq + 1 && entry.pos.term >= last.term,
        None => entry.pos.seq == 1,
    };
    if !in_order {
        return Err(FoldError::EntryOrder {
            last,
            entry: entry.pos,
        });
    }
    let raft = raft.get_or_insert_with(RaftMeta::default);
    let admitted = match entry.payload {
        Payload::Blank => (Outcome::Applied, None),
        Payload::Membership(membership) => {
            raft.membership = StoredMembership {
                pos: Some(entry.pos),
                membership,
            };
            (Outcome::Applied, None)
        }
        Payload::Normal { epoch, n, record } => {
            if epoch.term == entry.pos.term && raft.chain.admits(epoch, n) {
                raft.chain = Chain {
                    epoch,
                    next_n: n + 1,
                };
                raft.clock_floor = raft.clock_floor.max(record.at());
                (Outcome::Applied, Some(record))
            } else {
                (Outcome::Skipped, None)
            }
        }
    };
    raft.last_applied = Some(entry.pos);
    Ok(admitted)
}

/// Applies one record to the state. On error the state may be partly changed: the caller
/// stops (recovery refuses to start on a contradictory log).
pub fn apply(state: &mut State, record: &Record) -> Result<(), FoldError> {
    apply_owned(state, record.clone())
}

/// `apply`, taking the record by value so that its strings move into the state instead of
/// being copied (recovery folds millions of records: this is its hot path).
pub fn apply_owned(state: &mut State, record: Record) -> Result<(), FoldError> {
    match record {
        Record::ProductCreated {
            sku,
            name,
            price,
            on_hand,
            rules,
            low_stock_threshold,
            at,
            ..
        } => {
            if state.products.contains_key(&sku) {
                return Err(FoldError::DuplicateProduct(sku));
            }
            let mut p = Product::new(sku.clone(), name, price, on_hand, at);
            if !p.invariant_holds() {
                return Err(FoldError::Invariant(sku));
            }
            if rules.check().is_err() {
                return Err(FoldError::Rules(sku));
            }
            p.rules.set(rules);
            p.rules.set_low_stock_threshold(low_stock_threshold);
            if let Some(index) = &mut state.skus.0 {
                index.insert(&sku);
                debug_assert_eq!(index.len(), state.products.len() + 1);
            }
            state.products.insert(sku, p);
        }
        Record::ProductPatched {
            sku,
            name,
            price,
            rules,
            low_stock_threshold,
            at,
            ..
        } => {
            let p = state.product(&sku)?;
            if p.rules.patched(rules).check().is_err() {
                return Err(FoldError::Rules(sku));
            }
            p.patch(name, price, rules, low_stock_threshold, at);
        }
        Record::Replenished {
            sku, quantity, at, ..
        } => {
            let p = state.product(&sku)?;
            if !p.can_apply_replenish(quantity) {
                return Err(FoldError::Invariant(sku));
            }
            p.replenish(quantity, at);
        }
        Record::Adjusted { sku, delta, at, .. } => {
            let p = state.product(&sku)?;
            if !p.can_apply_adjust(delta) {
                return Err(FoldError::Invariant(sku));
            }
            p.adjust(delta, at);
        }
        Record::ProductDeleted { sku, .. } => {
            if state.product(&sku)?.reserved != 0 {
                return Err(FoldError::DeleteReserved(sku));
            }
            state.products.swap_remove(&sku);
            if let Some(index) = &mut state.skus.0 {
                index.remove(&sku);
                debug_assert_eq!(index.len(), state.products.len());
            }
        }
        Record::ReservationCreated {
            id,
            customer_id,
            items,
            counted,
            created_at,
            expires_at,
            idempotency,
            ..
        } => {
            for (i, line) in items.iter().enumerate() {
                let p = state.product(&line.sku)?;
                p.hold(line.quantity)
                    .map_err(|_| FoldError::Invariant(line.sku.clone()))?;
                p.settle_hold(line.quantity, created_at);
                if counted.contains(i) {
                    p.buyers.add(&customer_id, line.quantity);
                    // The hold was checked against the limit in force when it was made;
                    // a limit lowered since may be below the count, never one that was
                    // in force at the hold (held in the product's actor).
                }
            }
            let mut r = Reservation::new(id, customer_id, items, created_at, expires_at);
            r.counted = counted;
            state.reservations.insert(id, r);
            if let Some((key, fingerprint)) = idempotency {
                state.idempotency.insert(
                    key,
                    IdempotencyEntry {
                        reservation_id: id,
                        fingerprint,
                        created_at,
                    },
                );
            }
        }
        Record::ReservationConfirmed {
            id, order_id, at, ..
        } => {
            let State {
                products,
                reservations,
                ..
            } = state;
            let r = pending(reservations, id)?;
            r.confirm(order_id, at);
            for line in &r.items {
                let p = product(products, &line.sku)?;
                if p.reserved < line.quantity {
                    return Err(FoldError::Invariant(line.sku.clone()));
                }
                p.commit(line.quantity, at);
            }
        }
        Record::ReservationCancelled { id, at, .. } | Record::ReservationExpired { id, at } => {
            let cancelled = matches!(record, Record::ReservationCancelled { .. });
            let State {
                products,
                reservations,
                ..
            } = state;
            let r = pending(reservations, id)?;
            if cancelled {
                r.cancel();
            } else {
                r.expire();
            }
            for (i, line) in r.items.iter().enumerate() {
                let p = product(products, &line.sku)?;
                if p.reserved < line.quantity {
                    return Err(FoldError::Invariant(line.sku.clone()));
                }
                p.release(line.quantity, at);
                if r.counted.contains(i) {
                    p.uncount(&r.customer_id, line.quantity);
                }
            }
        }
        Record::ReservationExtended { id, expires_at, .. } => {
            pending(&mut state.reservations, id)?.extend(expires_at);
        }
        Record::Forgotten { before, .. } => {
            forget(&mut state.reservations, &mut state.idempotency, before);
        }
        Record::KeyCreated { key, .. } => {
            if state.keys.contains_key(&key.id) {
                return Err(FoldError::DuplicateKey(key.id));
            }
            state.keys.insert(key.id, key);
        }
        Record::KeyRevoked { id, .. } => {
            if state.keys.remove(&id).is_none() {
                return Err(FoldError::UnknownKey(id));
            }
        }
        Record::WebhookSaved { registration, .. } => state.webhooks.save(registration),
        Record::WebhookRemoved { id, .. } => state.webhooks.remove(id),
        Record::WebhookPositions { positions, .. } => state.webhooks.record(&positions),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Line;

    #[test]
    fn a_replenishment_logged_before_sold_counted_toward_the_limit_still_folds() {
        // Written by a build that bounded only on_hand: a full shelf, two units sold, and
        // the shelf filled up again. Requests are now refused that last step (on_hand +
        // sold would pass 2^53-1), but the log records it as a fact and must replay.
        const MAX: u64 = crate::limits::STOCK_MAX;
        let id = Uuid::from_u128(1);
        let mut state = State::default();
        for record in [
            Record::ProductCreated {
                by: None,
                rules: Default::default(),
                low_stock_threshold: None,
                sku: "A".into(),
                name: "a".into(),
                price: None,
                on_hand: MAX,
                at: 1,
            },
            Record::ReservationCreated {
                by: None,
                counted: Default::default(),
                id,
                customer_id: "c".into(),
                items: vec![Line {
                    sku: "A".into(),
                    quantity: 2,
                }],
                created_at: 2,
                expires_at: 1000,
                idempotency: None,
            },
            Record::ReservationConfirmed {
                by: None,
                id,
                order_id: None,
                at: 3,
            },
            Record::Replenished {
                by: None,
                sku: "A".into(),
                quantity: 2,
                at: 4,
            },
            Record::Adjusted {
                by: None,
                sku: "A".into(),
                delta: -1,
                reason: None,
                at: 5,
            },
            Record::Adjusted {
                by: None,
                sku: "A".into(),
                delta: 1,
                reason: None,
                at: 6,
            },
        ] {
            apply(&mut state, &record).unwrap();
        }
        let p = &state.products["A"];
        assert_eq!((p.on_hand, p.sold, p.reserved), (MAX, 2, 0));
        // Past the shelf's own bound a record is still refused.
        let past = Record::Replenished {
            by: None,
            sku: "A".into(),
            quantity: 1,
            at: 7,
        };
        assert!(matches!(
            apply(&mut state, &past),
            Err(FoldError::Invariant(_))
        ));
    }

    /// Two states holding the same things, built in different orders, have one digest; any
    /// difference changes it.
    fn created(sku: &str, on_hand: u64, at: Millis) -> Record {
        Record::ProductCreated {
            sku: sku.into(),
            name: "n".into(),
            price: None,
            on_hand,
            rules: Default::default(),
            low_stock_threshold: None,
            at,
            by: None,
        }
    }

    fn replenished(sku: &str, quantity: u64, at: Millis) -> Record {
        Record::Replenished {
            sku: sku.into(),
            quantity,
            at,
            by: None,
        }
    }

    fn normal(term: u64, k: u32, n: u64, record: Record) -> Payload {
        Payload::Normal {
            epoch: crate::storage::entry::Epoch { term, k },
            n,
            record,
        }
    }

    /// Folds `payloads` as entries 1, 2, 3… of the terms given; returns the outcomes.
    fn fold_entries(state: &mut State, payloads: Vec<(u64, Payload)>) -> Vec<Outcome> {
        let first = state
            .raft
            .as_ref()
            .and_then(|r| r.last_applied)
            .map_or(1, |p| p.seq + 1);
        payloads
            .into_iter()
            .enumerate()
            .map(|(i, (term, payload))| {
                let pos = LogPos {
                    term,
                    seq: first + i as u64,
                };
                apply_entry(state, Entry { pos, payload }).unwrap()
            })
            .collect()
    }

    /// The epoch chain (docs/REPLICATION.md): within an epoch only `n == next_n` folds, so
    /// a gap (a refused proposal) skips the rest of that epoch; a newer epoch opens with
    /// `n == 1` only; an older epoch, or a proposal in an entry of another term, is
    /// skipped; blanks and membership entries always apply; every entry is
    /// `last_applied`, and the clock floor is the newest decision folded.
    #[test]
    fn apply_entry_folds_each_epochs_chain_and_skips_the_rest() {
        use crate::storage::entry::{Epoch, Membership, NodeAddr};
        use Outcome::{Applied, Skipped};
        let mut state = State::default();
        let outcomes = fold_entries(
            &mut state,
            vec![
                (1, Payload::Blank),
                (1, normal(1, 0, 1, created("A", 1, 10))),
                (1, normal(1, 0, 2, replenished("A", 1, 12))),
                // Proposal 3 was refused: 4 and 5 never fold.
                (1, normal(1, 0, 4, replenished("A", 100, 30))),
                (1, normal(1, 0, 5, replenished("A", 100, 31))),
                // A fresh start in the same term, but not at 1: skipped too.
                (1, normal(1, 1, 2, replenished("A", 100, 32))),
                (1, normal(1, 1, 1, replenished("A", 4, 14))),
                (1, normal(1, 1, 2, replenished("A", 4, 15))),
                // An older epoch, even with the number it would have needed.
                (1, normal(1, 0, 3, replenished("A", 100, 40))),
                // A proposal of term 3 in an entry of term 2.
                (2, normal(3, 0, 1, replenished("A", 100, 41))),
                (2, Payload::Blank),
                (2, normal(2, 0, 1, replenished("A", 1, 13))),
            ],
        );
        assert_eq!(
            outcomes,
            [
                Applied, Applied, Applied, Skipped, Skipped, Skipped, Applied, Applied, Skipped,
                Skipped, Applied, Applied
            ]
        );
        assert_eq!(state.products["A"].on_hand, 1 + 1 + 4 + 4 + 1);
        let raft = state.raft.clone().unwrap();
        assert_eq!(raft.last_applied, Some(LogPos { term: 2, seq: 12 }));
        assert_eq!(
            raft.chain,
            Chain {
                epoch: Epoch { term: 2, k: 0 },
                next_n: 2
            }
        );
        assert_eq!(
            raft.clock_floor, 15,
            "the newest decision folded, not the skipped ones"
        );
        assert_eq!(raft.membership, StoredMembership::default());

        let membership = Membership {
            configs: vec![[1, 2, 3].into()],
            nodes: (1..=3)
                .map(|id| {
                    let addr = NodeAddr {
                        api: format!("a{id}:1"),
                        raft: format!("a{id}:2"),
                    };
                    (id, addr)
                })
                .collect(),
        };
        let before = state.digest();
        let outcomes = fold_entries(
            &mut state,
            vec![(2, Payload::Membership(membership.clone()))],
        );
        assert_eq!(outcomes, [Applied]);
        let raft = state.raft.as_ref().unwrap();
        assert_eq!(raft.membership.membership, membership);
        assert_eq!(raft.membership.pos, Some(LogPos { term: 2, seq: 13 }));
        assert_ne!(state.digest(), before, "the membership is in the digest");
    }

    /// Entries fold in order: the first is sequence 1, each next one the sequence after
    /// the last, in a term no older; anything else is an error, and changes nothing.
    #[test]
    fn apply_entry_refuses_entries_out_of_order() {
        let entry = |term, seq| Entry {
            pos: LogPos { term, seq },
            payload: Payload::Blank,
        };
        let mut state = State::default();
        assert!(matches!(
            apply_entry(&mut state, entry(1, 2)),
            Err(FoldError::EntryOrder { last: None, .. })
        ));
        assert_eq!(state, State::default());
        apply_entry(&mut state, entry(2, 1)).unwrap();
        let after = state.clone();
        for (term, seq) in [(2, 1), (2, 3), (1, 2), (2, 0)] {
            assert!(
                matches!(
                    apply_entry(&mut state, entry(term, seq)),
                    Err(FoldError::EntryOrder { .. })
                ),
                "{term}/{seq}"
            );
            assert_eq!(state, after);
        }
        apply_entry(&mut state, entry(3, 2)).unwrap();
    }

    /// A state without Raft metadata (a single node's) digests as before; the chain is
    /// part of a replicated state's digest, the clock floor is not.
    #[test]
    fn the_digest_covers_the_chain_not_the_clock_floor() {
        let mut a = State::default();
        a.products
            .insert("A".into(), Product::new("A".into(), "n".into(), None, 3, 1));
        let single = a.digest();
        let mut b = a.clone();
        b.raft = Some(RaftMeta::default());
        assert_ne!(b.digest(), single);
        let mut c = b.clone();
        c.raft.as_mut().unwrap().clock_floor = 99;
        assert_eq!(c.digest(), b.digest());
        c.raft.as_mut().unwrap().chain.next_n = 7;
        assert_ne!(c.digest(), b.digest());
    }

    #[test]
    fn the_digest_depends_on_what_a_state_holds_not_how_it_was_built() {
        let build = |skus: &[&str], buyers: &[&str]| {
            let mut state = State::default();
            for sku in skus {
                let mut p = Product::new(sku.to_string(), "n".into(), None, 10, 1);
                p.rules.max_per_customer = Some(5);
                for buyer in buyers {
                    p.hold_for(buyer, 1, 1).unwrap();
                    p.settle_hold(1, 1);
                }
                state.products.insert(sku.to_string(), p);
            }
            state
        };
        let skus: Vec<String> = (0..64).map(|i| format!("SKU-{i}")).collect();
        let skus: Vec<&str> = skus.iter().map(String::as_str).collect();
        let reversed: Vec<&str> = skus.iter().rev().copied().collect();
        let a = build(&skus, &["x", "y", "z"]);
        let b = build(&reversed, &["z", "y", "x"]);
        assert_eq!(a, b);
        assert_eq!(a.digest(), b.digest());
        let mut c = build(&skus, &["x", "y", "z"]);
        c.products.get_mut("SKU-7").unwrap().sold += 1;
        assert_ne!(a.digest(), c.digest());
        let d = build(&skus, &["x", "y", "w"]);
        assert_ne!(a.digest(), d.digest(), "another buyer");
        assert_ne!(a.digest(), State::default().digest());
    }

    #[test]
    fn forget_keeps_pending_and_recent_and_drops_ended_and_old() {
        let line = |sku: &str| Line {
            sku: sku.into(),
            quantity: 1,
        };
        let mut reservations = BTreeMap::new();
        let mut keys = BTreeMap::new();
        for (n, expires_at, status) in [
            (1u128, 50, Status::Pending),
            (2, 50, Status::Confirmed),
            (3, 150, Status::Cancelled),
            (4, 99, Status::Expired),
        ] {
            let mut r = Reservation::new(
                Uuid::from_u128(n),
                "c".into(),
                vec![line("A")],
                10,
                expires_at,
            );
            r.status = status;
            reservations.insert(r.id, r);
            keys.insert(
                IdempotencyKey {
                    customer_id: "c".into(),
                    key: n.to_string(),
                },
                IdempotencyEntry {
                    reservation_id: Uuid::from_u128(n),
                    fingerprint: vec![],
                    created_at: 80 + n as i64 * 10,
                },
            );
        }
        forget(&mut reservations, &mut keys, 100);
        let mut left: Vec<u128> = reservations.keys().map(|id| id.as_u128()).collect();
        left.sort();
        assert_eq!(left, vec![1, 3], "pending, and ended at or after 100");
        let mut kept: Vec<&str> = keys.keys().map(|k| k.key.as_str()).collect();
        kept.sort();
        assert_eq!(
            kept,
            vec!["1", "2", "3", "4"],
            "key 1 is old, but its reservation is pending"
        );
        reservations.clear();
        forget(&mut reservations, &mut keys, 100);
        let mut kept: Vec<&str> = keys.keys().map(|k| k.key.as_str()).collect();
        kept.sort();
        assert_eq!(kept, vec!["2", "3", "4"], "created at or after 100");
    }
}
