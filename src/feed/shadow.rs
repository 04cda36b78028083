//! The projector's shadow of the state: what the one fold needs to apply the next record,
//! kept small.
//!
//! The fold runs on a `State` (invariant 4 in docs/ARCHITECTURE.md: no second
//! interpretation of a record), but that state holds only the *warm* products and pending
//! reservations, the ones recent records touched, beside the keys. Every other product
//! and pending reservation is *cold*: kept as its bincode encoding (~80 bytes for a
//! product with a short name, ~70 for a one-line hold) in a map of its own. Before a
//! record is applied, the reservation it names and the products it touches
//! (`event::touched`) are decoded into the state; once more than `WARM_MAX` products (or
//! reservations) are warm, the half touched longest ago is encoded again.
//!
//! Why: a `State`'s products live inline in a hash table (~170 bytes a bucket) whose size
//! doubles, so a million products took 370 MB there (2^21 buckets) where the cold map
//! takes ~150, and a million pending holds took ~400 MB as `Reservation`s in a B-tree.
//! The paging is a cache in front of the one fold: a record touching a product or a
//! reservation the shadow misses fails the fold (and stops the feed, visibly); it is
//! never applied another way.

use std::collections::HashMap;

use uuid::Uuid;

use crate::domain::{Product, Reservation, Status};
use crate::feed::event::{self, Event};
use crate::storage::fold::{FoldError, State};
use crate::storage::record::Record;

/// Products, and pending reservations, kept decoded at most (before the coldest half is
/// encoded again).
pub const WARM_MAX: usize = 4096;

type Hasher = foldhash::fast::RandomState;
type Cold = HashMap<Box<str>, Box<[u8]>, Hasher>;
type ColdReservations = HashMap<Uuid, Box<[u8]>, Hasher>;

pub struct Shadow {
    /// The warm products and pending reservations, and the keys.
    state: State,
    cold: Cold,
    cold_reservations: ColdReservations,
    /// When each warm product was last touched (record sequence).
    touched_at: HashMap<String, u64, Hasher>,
    /// When each warm reservation was last touched.
    reservation_touched_at: HashMap<Uuid, u64, Hasher>,
}

fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

fn encode<T: serde::Serialize>(value: &T) -> Box<[u8]> {
    bincode::serde::encode_to_vec(value, config())
        .expect("a product or reservation encodes in memory")
        .into_boxed_slice()
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> T {
    // The bytes were written by `encode` in this process.
    bincode::serde::decode_from_slice(bytes, config())
        .expect("a cold product or reservation decodes as it was encoded")
        .0
}

/// The reservation a record names, if any.
fn named_reservation(record: &Record) -> Option<Uuid> {
    match record {
        Record::ReservationCreated { id, .. }
        | Record::ReservationConfirmed { id, .. }
        | Record::ReservationCancelled { id, .. }
        | Record::ReservationExpired { id, .. }
        | Record::ReservationExtended { id, .. } => Some(*id),
        _ => None,
    }
}

/// Encodes the half of `warm` touched longest ago (`touched_at`) into `cold`.
fn cool_half<K, V>(
    touched_at: &mut HashMap<K, u64, Hasher>,
    mut take: impl FnMut(&K) -> Option<V>,
    mut put: impl FnMut(&K, Box<[u8]>),
) where
    K: std::hash::Hash + Eq,
    V: serde::Serialize,
{
    let mut ages: Vec<u64> = touched_at.values().copied().collect();
    if ages.is_empty() {
        return;
    }
    let middle = ages.len() / 2;
    let (_, &mut cutoff, _) = ages.select_nth_unstable(middle);
    touched_at.retain(|key, at| {
        if *at >= cutoff {
            return true;
        }
        if let Some(value) = take(key) {
            put(key, encode(&value));
        }
        false
    });
}

impl Shadow {
    /// The shadow of `state` (recovery's): every product and pending reservation cold
    /// (encoded), the keys copied. Ended reservations and idempotency keys are left out: no
    /// later record's fold or event reads them (`event::prune`).
    pub fn of(state: &State) -> Shadow {
        let mut cold = Cold::with_capacity_and_hasher(state.products.len(), Default::default());
        for (sku, product) in &state.products {
            cold.insert(sku.as_str().into(), encode(product));
        }
        let cold_reservations = state
            .reservations
            .iter()
            .filter(|(_, r)| r.status == Status::Pending)
            .map(|(id, r)| (*id, encode(r)))
            .collect();
        Shadow {
            state: State {
                products: Default::default(),
                reservations: Default::default(),
                idempotency: Default::default(),
                keys: state.keys.clone(),
                // A cluster's webhooks give no event, and no event reads them.
                webhooks: Default::default(),
                // The feed folds records, never Raft entries (storage::entry).
                raft: None,
                skus: Default::default(),
            },
            cold,
            cold_reservations,
            touched_at: Default::default(),
            reservation_touched_at: Default::default(),
        }
    }

    /// Applies record `seq` with the one fold and returns its events.
    pub fn project(&mut self, seq: u64, record: &Record) -> Result<Vec<Event>, FoldError> {
        let named = named_reservation(record);
        if let Some(id) = named {
            if let Some(bytes) = self.cold_reservations.remove(&id) {
                let reservation: Reservation = decode(&bytes);
                debug_assert_eq!(reservation.id, id);
                self.state.reservations.insert(id, reservation);
            }
        }
        for sku in event::touched(record, &self.state) {
            if let Some(bytes) = self.cold.remove(sku.as_str()) {
                let product: Product = decode(&bytes);
                debug_assert_eq!(product.sku, sku);
                self.state.products.insert(sku.clone(), product);
            }
            self.touched_at.insert(sku, seq);
        }
        let events = event::project(&mut self.state, seq, record)?;
        event::prune(&mut self.state, record);
        if let Record::ProductDeleted { sku, .. } = record {
            self.touched_at.remove(sku.as_str());
        }
        if let Some(id) = named {
            // Still pending (created, extended) stays warm for now; ended was pruned.
            if self.state.reservations.contains_key(&id) {
                self.reservation_touched_at.insert(id, seq);
            } else {
                self.reservation_touched_at.remove(&id);
            }
        }
        if self.state.products.len() > WARM_MAX {
            let (products, cold) = (&mut self.state.products, &mut self.cold);
            cool_half(
                &mut self.touched_at,
                |sku: &String| products.swap_remove(sku.as_str()),
                |sku, bytes| {
                    cold.insert(sku.as_str().into(), bytes);
                },
            );
            // Products touched by the same record share its sequence: ties at the median
            // stay, at most one reservation's lines.
            debug_assert!(
                self.state.products.len() <= WARM_MAX / 2 + crate::limits::RESERVATION_LINES_MAX
            );
        }
        if self.state.reservations.len() > WARM_MAX {
            let (reservations, cold) = (&mut self.state.reservations, &mut self.cold_reservations);
            cool_half(
                &mut self.reservation_touched_at,
                |id: &Uuid| reservations.remove(id),
                |id, bytes| {
                    cold.insert(*id, bytes);
                },
            );
            // One reservation per record: no ties.
            debug_assert!(self.state.reservations.len() <= WARM_MAX / 2 + 1);
        }
        Ok(events)
    }

    /// Products in the shadow (warm and cold).
    pub fn products(&self) -> usize {
        self.state.products.len() + self.cold.len()
    }

    /// Pending reservations in the shadow (warm and cold).
    pub fn reservations(&self) -> usize {
        self.state.reservations.len() + self.cold_reservations.len()
    }

    /// The full state the shadow stands for: every product decoded (tests).
    #[cfg(test)]
    pub fn to_state(&self) -> State {
        let mut state = self.state.clone();
        for bytes in self.cold.values() {
            let product: Product = decode(bytes);
            state.products.insert(product.sku.clone(), product);
        }
        for bytes in self.cold_reservations.values() {
            let reservation: Reservation = decode(bytes);
            state.reservations.insert(reservation.id, reservation);
        }
        state
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::feed::event::tests::{created, created_with_threshold, reserve};

    /// Pending reservations and products as a full fold has them (the shadow drops ended
    /// reservations and idempotency keys by design).
    fn comparable(mut state: State) -> State {
        state
            .reservations
            .retain(|_, r| r.status == crate::domain::Status::Pending);
        state.idempotency.clear();
        state
    }

    #[test]
    fn the_shadow_gives_the_events_and_state_of_the_full_fold_across_cooling() {
        // More products than stay warm, each touched again long after it went cold.
        let n = (WARM_MAX * 3) as u128;
        let mut records: Vec<Record> = (0..n).map(|i| created(&format!("S{i}"), 5)).collect();
        records.extend((0..n).map(|i| reserve(i, &[(&format!("S{i}"), 1)])));
        // Then, long after they went cold, each hold one thing (or nothing) by i % 10;
        // the products whose hold ended are deleted.
        let id = Uuid::from_u128;
        records.extend((0..n).filter_map(|i| match i % 10 {
            0 => Some(Record::ReservationCancelled {
                id: id(i),
                at: 30,
                by: None,
            }),
            1 => Some(Record::ReservationExtended {
                id: id(i),
                expires_at: 2_000,
                at: 31,
                by: None,
            }),
            2 => Some(Record::ReservationConfirmed {
                id: id(i),
                order_id: Some(format!("o-{i}")),
                at: 32,
                by: None,
            }),
            3 => Some(Record::ReservationExpired {
                id: id(i),
                at: 2_001,
            }),
            _ => None,
        }));
        // Holds of 100 lines each (the most a reservation has): the products of one record
        // are touched at the same sequence, which cooling must cope with. Then cancelled,
        // so that the deletions below find nothing reserved.
        let wide = |j: u128| {
            let skus: Vec<String> = (j * 100..(j + 1) * 100).map(|i| format!("S{i}")).collect();
            let lines: Vec<(&str, u64)> = skus.iter().map(|s| (s.as_str(), 1)).collect();
            reserve(1_000_000 + j, &lines)
        };
        records.extend((0..n / 100).map(wide));
        records.extend((0..n / 100).map(|j| Record::ReservationCancelled {
            id: id(1_000_000 + j),
            at: 33,
            by: None,
        }));
        records.extend((0..n).filter(|i| matches!(i % 10, 0 | 2 | 3)).map(|i| {
            Record::ProductDeleted {
                sku: format!("S{i}"),
                at: 40,
                by: None,
            }
        }));
        let mut full = State::default();
        let mut shadow = Shadow::of(&State::default());
        for (i, record) in records.iter().enumerate() {
            let seq = i as u64 + 1;
            let want = event::project(&mut full, seq, record).unwrap();
            let got = shadow.project(seq, record).unwrap();
            assert_eq!(got, want, "record {seq}");
            assert!(shadow.state.products.len() <= WARM_MAX);
            assert!(shadow.state.reservations.len() <= WARM_MAX);
        }
        assert!(shadow.cold_reservations.len() > WARM_MAX, "holds went cold");
        assert_eq!(shadow.to_state(), comparable(full.clone()));
        assert_eq!(shadow.products(), full.products.len());
        assert_eq!(
            shadow.reservations(),
            comparable(full.clone()).reservations.len()
        );
        // A shadow built from a state (recovery's) starts cold and goes on the same way.
        let mut again = Shadow::of(&full);
        assert_eq!(again.state.products.len(), 0);
        assert_eq!(again.state.reservations.len(), 0);
        let record = reserve(n + 1, &[("S1", 1)]);
        let seq = records.len() as u64 + 1;
        let want = event::project(&mut full, seq, &record).unwrap();
        assert_eq!(again.project(seq, &record).unwrap(), want);
        assert_eq!(again.to_state(), comparable(full));
    }

    /// Products gone cold keep their low-stock threshold: touched again, they give the
    /// same `stock.low` and `stock.low_cleared` as the full fold.
    #[test]
    fn cold_products_keep_their_threshold() {
        let n = (WARM_MAX * 2) as u128;
        let mut records: Vec<Record> = (0..n)
            .map(|i| created_with_threshold(&format!("S{i}"), 5, 4))
            .collect();
        records.extend((0..n).map(|i| reserve(i, &[(&format!("S{i}"), 1)])));
        records.extend((0..n).map(|i| Record::ReservationCancelled {
            id: Uuid::from_u128(i),
            at: 30,
            by: None,
        }));
        let mut full = State::default();
        let mut shadow = Shadow::of(&State::default());
        let mut low = 0;
        for (i, record) in records.iter().enumerate() {
            let seq = i as u64 + 1;
            let want = event::project(&mut full, seq, record).unwrap();
            let got = shadow.project(seq, record).unwrap();
            assert_eq!(got, want, "record {seq}");
            low += got
                .iter()
                .filter(|e| matches!(e.kind, event::Kind::StockLow | event::Kind::StockLowCleared))
                .count();
        }
        assert_eq!(
            low,
            2 * n as usize,
            "one stock.low and one stock.low_cleared each"
        );
        assert_eq!(shadow.to_state(), comparable(full));
    }

    #[test]
    fn a_record_for_a_product_the_shadow_lacks_fails_the_fold() {
        let mut shadow = Shadow::of(&State::default());
        shadow.project(1, &created("A", 1)).unwrap();
        assert!(matches!(
            shadow.project(2, &created("A", 1)),
            Err(FoldError::DuplicateProduct(_))
        ));
        assert!(matches!(
            shadow.project(3, &reserve(1, &[("B", 1)])),
            Err(FoldError::UnknownProduct(_))
        ));
    }
}
