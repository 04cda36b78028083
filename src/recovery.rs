//! Start-up recovery: fold the log into the state the server had acknowledged.
//!
//! Records are applied as facts with the one fold (`crate::fold::apply`); invariant 1 is
//! asserted after every record. A damaged record or one that contradicts the state stops
//! start-up with an error naming its sequence number: serving from a log we cannot trust
//! could oversell. Reservations whose deadline passed while the server was down are
//! expired by the supervisor's first tick, before the server accepts requests.

use crate::fold::{self, FoldError, State};
use crate::log::{LogReader, OpenError};

#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error("log record {seq} cannot be applied: {source}")]
    Fold { seq: u64, source: FoldError },
}

/// What recovery rebuilt.
pub struct Recovered {
    pub state: State,
    pub records: u64,
    pub last_seq: u64,
}

/// Folds every record of the log into a fresh state.
pub fn fold_log(reader: &LogReader) -> Result<Recovered, RecoveryError> {
    let mut state = State::default();
    let mut records = 0;
    let mut last_seq = 0;
    for item in reader.records() {
        let (seq, record) = item?;
        debug_assert!(seq > last_seq, "log keys are strictly increasing");
        fold::apply(&mut state, &record).map_err(|source| RecoveryError::Fold { seq, source })?;
        assert!(
            record_products_hold_invariant(&state, &record),
            "invariant 1 broken after log record {seq}"
        );
        records += 1;
        last_seq = seq;
    }
    Ok(Recovered {
        state,
        records,
        last_seq,
    })
}

/// Invariant 1 for the products the record touched (checking all would be quadratic).
fn record_products_hold_invariant(state: &State, record: &crate::record::Record) -> bool {
    use crate::record::Record::*;
    let check = |sku: &str| state.products.get(sku).is_none_or(|p| p.invariant_holds());
    match record {
        ProductCreated { sku, .. }
        | ProductPatched { sku, .. }
        | Replenished { sku, .. }
        | Adjusted { sku, .. }
        | ProductDeleted { sku, .. } => check(sku),
        ReservationCreated { items, .. } => items.iter().all(|l| check(&l.sku)),
        ReservationConfirmed { id, .. }
        | ReservationCancelled { id, .. }
        | ReservationExpired { id, .. }
        | ReservationExtended { id, .. } => state
            .reservations
            .get(id)
            .is_none_or(|r| r.items.iter().all(|l| check(&l.sku))),
    }
}
