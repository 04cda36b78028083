//! Recovery: the newest snapshot that verifies, then the log records after it, folded with
//! the one fold (`crate::storage::fold::apply`). Start-up, the snapshotter (building the next
//! snapshot, rebuilding a failed product) and the offline tools all recover this way.
//!
//! Records are applied as facts; invariant 1 (docs/ARCHITECTURE.md) is asserted after every record. A damaged
//! record or one that contradicts the state stops recovery with an error naming its
//! sequence number: serving from a log we cannot trust could oversell. A snapshot that
//! fails verification is skipped (with the reason, for a warning) and the one before it is
//! used; the log keeps every record after the oldest kept snapshot, so that works. Records
//! after the base must be contiguous: a gap means lost records, and is an error too.
//! Reservations whose deadline passed while the server was down are expired by the
//! supervisor's first tick, before the server accepts requests.

use std::path::Path;

use crate::storage::fold::{self, FoldError, State};
use crate::storage::log::{LogReader, OpenError};
use crate::storage::record::Record;
use crate::storage::snapshot::{self, SnapshotInfo};

#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error("log record {seq} cannot be applied: {source}")]
    Fold { seq: u64, source: FoldError },
    #[error("log record {expected} is missing (the next record is {found})")]
    Gap { expected: u64, found: u64 },
    #[error("cannot list snapshots in {dir}: {source}")]
    ListSnapshots { dir: String, source: std::io::Error },
    /// Recovery up to a given record found the log ending before it: records it needs
    /// were not there (dropped from under it by a truncation running meanwhile, or never
    /// written). A state short of the record asked for is never returned.
    #[error("the log ends at record {last_seq}, before record {upto} that was asked for")]
    Short { upto: u64, last_seq: u64 },
    #[error(
        "the log starts after record {truncated_through}, but no snapshot at or after it \
         verifies ({})",
        if skipped.is_empty() { "none found".to_string() } else { skipped.join("; ") }
    )]
    NoUsableSnapshot {
        truncated_through: u64,
        skipped: Vec<String>,
    },
}

impl RecoveryError {
    /// The sequence number of a damaged log record that stopped recovery, if that is why.
    pub fn damaged_seq(&self) -> Option<u64> {
        match self {
            RecoveryError::Open(OpenError::Damaged { seq, .. }) => Some(*seq),
            _ => None,
        }
    }
}

/// What recovery rebuilt.
#[derive(Debug)]
pub struct Recovered {
    pub state: State,
    /// The snapshot recovery started from (`None`: the log from its first record).
    pub snapshot: Option<SnapshotInfo>,
    /// Newer snapshots that failed verification, with the reason (skipped).
    pub skipped: Vec<String>,
    /// Log records replayed after the snapshot.
    pub records: u64,
    /// The state is the fold of records 1..=last_seq.
    pub last_seq: u64,
    /// Time spent replaying the log (reading, decoding and folding `records`).
    pub replay: std::time::Duration,
}

/// Watches recovery's fold, record by record: the change feed derives the events of the
/// records its store lacks this way, from the one fold as it runs (never a second
/// interpretation of the records: invariant 4).
pub trait FoldObserver: Send {
    /// Whether record `seq` is to be watched (`before` and `after` are called for it).
    fn wants(&self, seq: u64) -> bool;
    /// Called with the state record `seq` is about to be applied to.
    fn before(&mut self, seq: u64, record: &Record, state: &State);
    /// Called with the state after record `seq` was applied.
    fn after(&mut self, seq: u64, record: &Record, state: &State);
}

/// Recovers the state after record `upto` (`u64::MAX`: everything in the log).
pub fn recover(
    reader: &LogReader,
    snapshot_dir: &Path,
    upto: u64,
) -> Result<Recovered, RecoveryError> {
    recover_observed(reader, snapshot_dir, upto, None)
}

/// `recover`, with `observer` watching the records folded after the snapshot.
pub fn recover_observed(
    reader: &LogReader,
    snapshot_dir: &Path,
    upto: u64,
    observer: Option<&mut dyn FoldObserver>,
) -> Result<Recovered, RecoveryError> {
    let truncated_through = reader.truncated_through();
    let snapshots = list_snapshots(snapshot_dir)?;
    // The log after the newest usable snapshot is opened while that snapshot is decoded.
    let _open_ahead = snapshots
        .iter()
        .map(|(seq, _)| *seq)
        .find(|seq| *seq <= upto && *seq >= truncated_through)
        .map(|seq| reader.open_ahead(seq, 2));
    let base = base_from(snapshots, upto, truncated_through)?;
    let after = base.snapshot.as_ref().map_or(0, |s| s.seq);
    let started = std::time::Instant::now();
    let folded = fold_observed(
        reader.records_after(after),
        base.state,
        after,
        upto,
        observer,
    )?;
    finish(base.snapshot, base.skipped, folded, upto, started.elapsed())
}

/// The state a fold starts from: the newest snapshot at or before `upto` that verifies
/// and that the log continues (none older than the truncation mark), or the empty state
/// if the log was never truncated.
pub struct Base {
    pub snapshot: Option<SnapshotInfo>,
    pub state: State,
    /// Newer snapshots that failed verification, with the reason.
    pub skipped: Vec<String>,
}

fn list_snapshots(snapshot_dir: &Path) -> Result<Vec<(u64, std::path::PathBuf)>, RecoveryError> {
    snapshot::list(snapshot_dir).map_err(|source| RecoveryError::ListSnapshots {
        dir: snapshot_dir.display().to_string(),
        source,
    })
}

/// Loads the base of a recovery up to `upto` (see `Base`).
pub fn base_snapshot(
    snapshot_dir: &Path,
    upto: u64,
    truncated_through: u64,
) -> Result<Base, RecoveryError> {
    base_from(list_snapshots(snapshot_dir)?, upto, truncated_through)
}

/// `base_snapshot` over the snapshots listed (newest first).
fn base_from(
    snapshots: Vec<(u64, std::path::PathBuf)>,
    upto: u64,
    truncated_through: u64,
) -> Result<Base, RecoveryError> {
    let mut skipped = Vec::new();
    for (seq, path) in snapshots {
        if seq > upto {
            continue;
        }
        if seq < truncated_through {
            break; // the records between it and the log's start are gone
        }
        match snapshot::read(&path) {
            Ok((info, state)) => {
                return Ok(Base {
                    snapshot: Some(info),
                    state,
                    skipped,
                })
            }
            Err(err) => {
                tracing::warn!(error = %err, "skipping a snapshot that does not verify");
                skipped.push(err.to_string());
            }
        }
    }
    if truncated_through > 0 {
        return Err(RecoveryError::NoUsableSnapshot {
            truncated_through,
            skipped,
        });
    }
    Ok(Base {
        snapshot: None,
        state: State::default(),
        skipped,
    })
}

/// Checks that a fold up to `upto` got there, and describes what it recovered.
pub fn finish(
    snapshot: Option<SnapshotInfo>,
    skipped: Vec<String>,
    (state, records, last_seq): (State, u64, u64),
    upto: u64,
    replay: std::time::Duration,
) -> Result<Recovered, RecoveryError> {
    // Asked for the state after a given record (a rebuild, a snapshot), the fold must get
    // exactly there. A truncation can drop the segments after the base snapshot while it
    // is read (the snapshot thread truncates while the rebuild thread reads): the fold
    // would then stop early, at the base, without an error of its own.
    if upto != u64::MAX && last_seq != upto {
        return Err(RecoveryError::Short { upto, last_seq });
    }
    Ok(Recovered {
        state,
        snapshot,
        skipped,
        records,
        last_seq,
        replay,
    })
}

/// Records decoded per batch handed from the reading thread to the folding one.
const REPLAY_BATCH_RECORDS: usize = 1024;
/// Batches decoded ahead of the fold.
const REPLAY_BATCHES_AHEAD: usize = 8;

/// Folds the records after `after` (up to `upto`) onto `state`, which is the state after
/// record `after`. Returns the state, the number of records and the last sequence folded.
///
/// Two threads: one reads the log and decodes records (sled's iterator, checksums,
/// bincode), the calling one folds them, in order. They take about the same time per
/// record, so replay runs at about twice the speed of one thread doing both.
pub fn fold_records(
    reader: &LogReader,
    state: State,
    after: u64,
    upto: u64,
) -> Result<(State, u64, u64), RecoveryError> {
    fold_stream(reader.records_after(after), state, after, upto)
}

/// `fold_records` over any source of records in log order (the log, or the records a
/// server sends its snapshot worker). Records up to `after` must not be in it.
pub fn fold_stream(
    source: impl Iterator<Item = Result<(u64, Record), OpenError>> + Send,
    state: State,
    after: u64,
    upto: u64,
) -> Result<(State, u64, u64), RecoveryError> {
    fold_observed(source, state, after, upto, None)
}

/// `fold_stream`, with `observer` watching each record it wants.
fn fold_observed(
    source: impl Iterator<Item = Result<(u64, Record), OpenError>> + Send,
    mut state: State,
    after: u64,
    upto: u64,
    mut observer: Option<&mut dyn FoldObserver>,
) -> Result<(State, u64, u64), RecoveryError> {
    let mut records = 0;
    let mut last_seq = after;
    std::thread::scope(|scope| -> Result<(), RecoveryError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(REPLAY_BATCHES_AHEAD);
        scope.spawn(move || {
            let mut batch = Vec::with_capacity(REPLAY_BATCH_RECORDS);
            for item in source {
                // A record past `upto` ends the read, damaged or not: it is not asked for.
                let past = match &item {
                    Ok((seq, _)) | Err(OpenError::Damaged { seq, .. }) => *seq > upto,
                    Err(_) => false,
                };
                let stop = past || item.is_err();
                if !past {
                    batch.push(item);
                }
                if stop || batch.len() == REPLAY_BATCH_RECORDS {
                    let full =
                        std::mem::replace(&mut batch, Vec::with_capacity(REPLAY_BATCH_RECORDS));
                    // The fold stopped (an error): nobody listens any more.
                    if tx.send(full).is_err() || stop {
                        return;
                    }
                }
            }
            let _ = tx.send(batch);
        });
        let started = std::time::Instant::now();
        let mut waited = std::time::Duration::ZERO;
        loop {
            let asked = std::time::Instant::now();
            let Ok(batch) = rx.recv() else { break };
            waited += asked.elapsed();
            for item in batch {
                let (seq, record) = item?;
                if seq != last_seq + 1 {
                    return Err(RecoveryError::Gap {
                        expected: last_seq + 1,
                        found: seq,
                    });
                }
                // `apply` refuses any record that would break invariant 1 (a hold beyond
                // what is available, a release beyond what is reserved...); debug builds
                // check it again on every product the record touched.
                #[cfg(debug_assertions)]
                let touched = record.clone();
                let watched = match observer.as_deref_mut() {
                    Some(o) if o.wants(seq) => {
                        o.before(seq, &record, &state);
                        Some(record.clone())
                    }
                    _ => None,
                };
                fold::apply_owned(&mut state, record)
                    .map_err(|source| RecoveryError::Fold { seq, source })?;
                if let (Some(o), Some(record)) = (observer.as_deref_mut(), watched) {
                    o.after(seq, &record, &state);
                }
                #[cfg(debug_assertions)]
                assert!(
                    record_products_hold_invariant(&state, &touched),
                    "invariant 1 broken after log record {seq}"
                );
                records += 1;
                last_seq = seq;
            }
        }
        // Which half of the pipeline limits replay: if the fold mostly waited, reading and
        // decoding the log did.
        tracing::debug!(
            records,
            elapsed_ms = started.elapsed().as_millis() as u64,
            fold_waited_for_log_ms = waited.as_millis() as u64,
            "log replayed"
        );
        Ok(())
    })?;
    Ok((state, records, last_seq))
}

/// Folds every record of the log into a fresh state, ignoring snapshots (tests, tools).
pub fn fold_log(reader: &LogReader) -> Result<Recovered, RecoveryError> {
    let started = std::time::Instant::now();
    let folded = fold_records(reader, State::default(), 0, u64::MAX)?;
    finish(None, Vec::new(), folded, u64::MAX, started.elapsed())
}

/// Invariant 1 for the products the record touched (checking all would be quadratic).
#[cfg(debug_assertions)]
fn record_products_hold_invariant(state: &State, record: &Record) -> bool {
    use crate::storage::record::Record::*;
    let check = |sku: &str| state.products.get(sku).is_none_or(|p| p.invariant_holds());
    match record {
        ProductCreated { sku, .. }
        | ProductPatched { sku, .. }
        | Replenished { sku, .. }
        | Adjusted { sku, .. }
        | ProductDeleted { sku, .. } => check(sku),
        ReservationCreated { items, .. } => items.iter().all(|l| check(&l.sku)),
        Forgotten { .. } | KeyCreated { .. } | KeyRevoked { .. } => true,
        ReservationConfirmed { id, .. }
        | ReservationCancelled { id, .. }
        | ReservationExpired { id, .. }
        | ReservationExtended { id, .. } => state
            .reservations
            .get(id)
            .is_none_or(|r| r.items.iter().all(|l| check(&l.sku))),
    }
}
