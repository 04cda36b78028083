//! The one fold: `apply(state, record)` is the only function that turns log records into
//! state. Recovery, tests (and the snapshotter, later) use it; the live actors make the same
//! changes through the same `domain` methods.
//!
//! Recovery applies records as facts: business checks were made before the record was
//! written. But invariant 1 is asserted after every record, and a record that contradicts
//! the state (an unknown SKU, a hold beyond what is available) is an error naming the
//! problem, never a silent repair.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::clock::Millis;
use crate::domain::{Product, Reservation, Status};
use crate::record::{IdempotencyKey, Record};

/// A remembered idempotency key: what it created, for which request, and when.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdempotencyEntry {
    pub reservation_id: Uuid,
    pub fingerprint: Vec<u8>,
    pub created_at: Millis,
}

/// Everything the log describes (and what a snapshot holds).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub products: BTreeMap<String, Product>,
    pub reservations: HashMap<Uuid, Reservation>,
    pub idempotency: HashMap<IdempotencyKey, IdempotencyEntry>,
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
    #[error("record would break invariant 1 (0 <= reserved <= on_hand) for product {0}")]
    Invariant(String),
    #[error("record deletes product {0} while it holds reserved units")]
    DeleteReserved(String),
}

impl State {
    fn product(&mut self, sku: &str) -> Result<&mut Product, FoldError> {
        self.products
            .get_mut(sku)
            .ok_or_else(|| FoldError::UnknownProduct(sku.to_string()))
    }

    fn pending(&mut self, id: Uuid) -> Result<&mut Reservation, FoldError> {
        let r = self
            .reservations
            .get_mut(&id)
            .ok_or(FoldError::UnknownReservation(id))?;
        if r.status != Status::Pending {
            return Err(FoldError::NotPending(id));
        }
        Ok(r)
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

/// Applies one record to the state. On error the state may be partly changed: the caller
/// stops (recovery refuses to start on a contradictory log).
pub fn apply(state: &mut State, record: &Record) -> Result<(), FoldError> {
    match record {
        Record::ProductCreated {
            sku,
            name,
            price,
            on_hand,
            at,
        } => {
            if state.products.contains_key(sku) {
                return Err(FoldError::DuplicateProduct(sku.clone()));
            }
            let p = Product::new(sku.clone(), name.clone(), price.clone(), *on_hand, *at);
            if !p.invariant_holds() {
                return Err(FoldError::Invariant(sku.clone()));
            }
            state.products.insert(sku.clone(), p);
        }
        Record::ProductPatched {
            sku,
            name,
            price,
            at,
        } => state.product(sku)?.patch(name.clone(), price.clone(), *at),
        Record::Replenished { sku, quantity, at } => {
            let p = state.product(sku)?;
            p.check_replenish(*quantity)
                .map_err(|_| FoldError::Invariant(sku.clone()))?;
            p.replenish(*quantity, *at);
        }
        Record::Adjusted { sku, delta, at, .. } => {
            let p = state.product(sku)?;
            p.check_adjust(*delta)
                .map_err(|_| FoldError::Invariant(sku.clone()))?;
            p.adjust(*delta, *at);
        }
        Record::ProductDeleted { sku, .. } => {
            if state.product(sku)?.reserved != 0 {
                return Err(FoldError::DeleteReserved(sku.clone()));
            }
            state.products.remove(sku);
        }
        Record::ReservationCreated {
            id,
            customer_id,
            items,
            created_at,
            expires_at,
            idempotency,
        } => {
            for line in items {
                let p = state.product(&line.sku)?;
                p.hold(line.quantity)
                    .map_err(|_| FoldError::Invariant(line.sku.clone()))?;
                p.settle_hold(line.quantity, *created_at);
            }
            let r = Reservation::new(
                *id,
                customer_id.clone(),
                items.clone(),
                *created_at,
                *expires_at,
            );
            state.reservations.insert(*id, r);
            if let Some((key, fingerprint)) = idempotency {
                state.idempotency.insert(
                    key.clone(),
                    IdempotencyEntry {
                        reservation_id: *id,
                        fingerprint: fingerprint.clone(),
                        created_at: *created_at,
                    },
                );
            }
        }
        Record::ReservationConfirmed { id, order_id, at } => {
            let r = state.pending(*id)?;
            r.confirm(order_id.clone(), *at);
            let items = r.items.clone();
            for line in &items {
                let p = state.product(&line.sku)?;
                if p.reserved < line.quantity {
                    return Err(FoldError::Invariant(line.sku.clone()));
                }
                p.commit(line.quantity, *at);
            }
        }
        Record::ReservationCancelled { id, at } | Record::ReservationExpired { id, at } => {
            let r = state.pending(*id)?;
            if matches!(record, Record::ReservationCancelled { .. }) {
                r.cancel();
            } else {
                r.expire();
            }
            let items = r.items.clone();
            for line in &items {
                let p = state.product(&line.sku)?;
                if p.reserved < line.quantity {
                    return Err(FoldError::Invariant(line.sku.clone()));
                }
                p.release(line.quantity, *at);
            }
        }
        Record::ReservationExtended { id, expires_at, .. } => {
            state.pending(*id)?.extend(*expires_at);
        }
    }
    Ok(())
}
