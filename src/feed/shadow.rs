//! The projector's shadow of the state: what the one fold needs to apply the next record,
//! kept small.
//!
//! The fold runs on a `State` (invariant 4 in docs/ARCHITECTURE.md: no second
//! interpretation of a record), but that state holds only the *warm* products, the ones
//! recent records touched, beside the pending reservations and the keys. Every other
//! product is *cold*: kept as its bincode encoding (~80 bytes for a product with a short
//! name) in a map of its own. Before a record is applied, the products it touches
//! (`event::touched`) are decoded into the state; once more than `WARM_MAX` products are
//! warm, the half touched longest ago are encoded again.
//!
//! Why: a `State`'s products live inline in a hash table (~170 bytes a bucket) whose size
//! doubles, so a million products took 370 MB there (2^21 buckets) where the cold map
//! takes ~150, and the server's own routing table holds them in ~240 bytes each. The
//! paging is a cache in front of the one fold: a record touching a product the shadow
//! misses fails the fold (and stops the feed, visibly), it is never applied another way.

use std::collections::HashMap;

use crate::domain::Product;
use crate::feed::event::{self, Event};
use crate::storage::fold::{FoldError, State};
use crate::storage::record::Record;

/// Products kept decoded at most (before the coldest half is encoded again).
pub const WARM_MAX: usize = 4096;

type Cold = HashMap<Box<str>, Box<[u8]>, foldhash::fast::RandomState>;

pub struct Shadow {
    /// The warm products, the pending reservations and the keys.
    state: State,
    cold: Cold,
    /// When each warm product was last touched (record sequence).
    touched_at: HashMap<String, u64, foldhash::fast::RandomState>,
}

fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

fn encode(product: &Product) -> Box<[u8]> {
    bincode::serde::encode_to_vec(product, config())
        .expect("a product encodes in memory")
        .into_boxed_slice()
}

fn decode(bytes: &[u8]) -> Product {
    // The bytes were written by `encode` in this process.
    bincode::serde::decode_from_slice(bytes, config())
        .expect("a cold product decodes as it was encoded")
        .0
}

impl Shadow {
    /// The shadow of `state` (recovery's): every product cold, the pending reservations
    /// and the keys copied. Ended reservations and idempotency keys are left out: no later
    /// record's fold or event reads them (`event::prune`).
    pub fn of(state: &State) -> Shadow {
        let mut cold = Cold::with_capacity_and_hasher(state.products.len(), Default::default());
        for (sku, product) in &state.products {
            cold.insert(sku.as_str().into(), encode(product));
        }
        let reservations = state
            .reservations
            .iter()
            .filter(|(_, r)| r.status == crate::domain::Status::Pending)
            .map(|(id, r)| (*id, r.clone()))
            .collect();
        Shadow {
            state: State {
                products: Default::default(),
                reservations,
                idempotency: Default::default(),
                keys: state.keys.clone(),
                // The feed folds records, never Raft entries (storage::entry).
                raft: None,
            },
            cold,
            touched_at: Default::default(),
        }
    }

    /// Applies record `seq` with the one fold and returns its events.
    pub fn project(&mut self, seq: u64, record: &Record) -> Result<Vec<Event>, FoldError> {
        for sku in event::touched(record, &self.state) {
            if let Some(bytes) = self.cold.remove(sku.as_str()) {
                let product = decode(&bytes);
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
        if self.state.products.len() > WARM_MAX {
            self.cool();
        }
        Ok(events)
    }

    /// Encodes the half of the warm products touched longest ago.
    fn cool(&mut self) {
        let mut ages: Vec<u64> = self.touched_at.values().copied().collect();
        let middle = ages.len() / 2;
        let (_, &mut cutoff, _) = ages.select_nth_unstable(middle);
        let state = &mut self.state;
        let cold = &mut self.cold;
        self.touched_at.retain(|sku, at| {
            if *at >= cutoff {
                return true;
            }
            if let Some(product) = state.products.remove(sku.as_str()) {
                cold.insert(sku.as_str().into(), encode(&product));
            }
            false
        });
        debug_assert!(state.products.len() <= WARM_MAX / 2 + 1);
    }

    /// Products in the shadow (warm and cold).
    pub fn products(&self) -> usize {
        self.state.products.len() + self.cold.len()
    }

    /// The full state the shadow stands for: every product decoded (tests).
    #[cfg(test)]
    pub fn to_state(&self) -> State {
        let mut state = self.state.clone();
        for bytes in self.cold.values() {
            let product = decode(bytes);
            state.products.insert(product.sku.clone(), product);
        }
        state
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Line;
    use uuid::Uuid;

    fn created(sku: &str, on_hand: u64) -> Record {
        Record::ProductCreated {
            sku: sku.into(),
            name: format!("n-{sku}"),
            price: None,
            on_hand,
            rules: Default::default(),
            at: 10,
            by: None,
        }
    }

    fn reserve(id: u128, sku: &str) -> Record {
        Record::ReservationCreated {
            id: Uuid::from_u128(id),
            customer_id: "c".into(),
            items: vec![Line {
                sku: sku.into(),
                quantity: 1,
            }],
            counted: Default::default(),
            created_at: 20,
            expires_at: 1_000,
            idempotency: None,
            by: None,
        }
    }

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
        records.extend((0..n).map(|i| reserve(i, &format!("S{i}"))));
        records.extend((0..n).step_by(7).map(|i| Record::ReservationCancelled {
            id: Uuid::from_u128(i),
            at: 30,
            by: None,
        }));
        records.extend((0..n).step_by(5).map(|i| Record::ProductDeleted {
            sku: format!("S{i}"),
            at: 40,
            by: None,
        }));
        // Deleting a product with reserved units is refused by the fold: keep the log
        // valid by deleting only those with none.
        records.retain(|r| match r {
            Record::ProductDeleted { sku, .. } => {
                let i: u128 = sku[1..].parse().unwrap();
                i.is_multiple_of(7)
            }
            _ => true,
        });
        let mut full = State::default();
        let mut shadow = Shadow::of(&State::default());
        for (i, record) in records.iter().enumerate() {
            let seq = i as u64 + 1;
            let want = event::project(&mut full, seq, record).unwrap();
            let got = shadow.project(seq, record).unwrap();
            assert_eq!(got, want, "record {seq}");
            assert!(shadow.state.products.len() <= WARM_MAX);
        }
        assert_eq!(shadow.to_state(), comparable(full.clone()));
        assert_eq!(shadow.products(), full.products.len());
        // A shadow built from a state (recovery's) starts cold and goes on the same way.
        let mut again = Shadow::of(&full);
        assert_eq!(again.state.products.len(), 0);
        let record = reserve(n + 1, "S1");
        let seq = records.len() as u64 + 1;
        let want = event::project(&mut full, seq, &record).unwrap();
        assert_eq!(again.project(seq, &record).unwrap(), want);
        assert_eq!(again.to_state(), comparable(full));
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
            shadow.project(3, &reserve(1, "B")),
            Err(FoldError::UnknownProduct(_))
        ));
    }
}
