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

use crate::storage::entry::Entry;
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
    /// A cluster node's newest snapshot is a single server's (no Raft metadata).
    #[error(
        "snapshot {seq} in a cluster node's directory has no Raft metadata (a single server's?)"
    )]
    NotReplicated { seq: u64 },
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
    /// That snapshot's Raft metadata (a cluster node's recovery, `recover_entries` and
    /// `recover_entries_at`): what
    /// the engine asks of its current snapshot, known without decoding it again.
    pub snapshot_raft: Option<crate::storage::entry::RaftMeta>,
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
    /// Called instead of `before` and `after` for a wanted log position that folds no
    /// record (a cluster's blank or membership entry, or a proposal the chain skipped).
    fn passed(&mut self, _seq: u64) {}
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

/// A cluster node's start-up: the newest snapshot in `snapshot_dir` that verifies, then the
/// log's Raft entries after it, folded with `fold_entries` through entry `committed` (the
/// node's committed mark: entries past it may still be cut) when the log reaches past the
/// snapshot. The engine applies what is committed after it, as it learns of it.
pub fn recover_entries(
    reader: &LogReader,
    snapshot_dir: &Path,
    committed: u64,
) -> Result<Recovered, RecoveryError> {
    entries_onto_snapshot(reader, snapshot_dir, u64::MAX, committed, None)
}

/// `recover_entries`, with `observer` watching the entries folded after the snapshot.
pub fn recover_entries_observed(
    reader: &LogReader,
    snapshot_dir: &Path,
    committed: u64,
    observer: Option<&mut dyn FoldObserver>,
) -> Result<Recovered, RecoveryError> {
    entries_onto_snapshot(reader, snapshot_dir, u64::MAX, committed, observer)
}

/// A cluster node's state after entry `upto` exactly (a snapshot built without the
/// snapshot worker): the newest snapshot at or before it, and the entries after that.
pub fn recover_entries_at(
    reader: &LogReader,
    snapshot_dir: &Path,
    upto: u64,
) -> Result<Recovered, RecoveryError> {
    entries_onto_snapshot(reader, snapshot_dir, upto, upto, None)
}

/// The newest snapshot at or before `base_upto` that verifies, then the entries after it
/// through `upto` (none if the snapshot is at or past it).
fn entries_onto_snapshot(
    reader: &LogReader,
    snapshot_dir: &Path,
    base_upto: u64,
    upto: u64,
    observer: Option<&mut dyn FoldObserver>,
) -> Result<Recovered, RecoveryError> {
    let purged = reader.purged()?.map_or(0, |mark| mark.seq);
    let snapshots = list_snapshots(snapshot_dir)?;
    let base = base_from(snapshots, base_upto, purged)?;
    let after = base.snapshot.as_ref().map_or(0, |s| s.seq);
    if base.snapshot.is_some() && base.state.raft.is_none() {
        return Err(RecoveryError::NotReplicated { seq: after });
    }
    let started = std::time::Instant::now();
    let snapshot_raft = base.snapshot.as_ref().and(base.state.raft.clone());
    let recovered = if upto <= after {
        let folded = (base.state, 0, after);
        finish(
            base.snapshot,
            base.skipped,
            folded,
            after,
            started.elapsed(),
        )
    } else {
        let folded = fold_entries_observed(
            reader.entries_after(after),
            base.state,
            after,
            upto,
            observer,
        )?;
        finish(base.snapshot, base.skipped, folded, upto, started.elapsed())
    };
    recovered.map(|recovered| Recovered {
        snapshot_raft,
        ..recovered
    })
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
        snapshot_raft: None,
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
    let (records, last_seq) = pipeline(
        source,
        |(seq, _)| *seq,
        after,
        upto,
        |(seq, record)| {
            // `apply` refuses any record that would break invariant 1 (a hold beyond what is
            // available, a release beyond what is reserved...); debug builds check it again on
            // every product the record touched.
            #[cfg(debug_assertions)]
            let touched = record.clone();
            match observer.as_deref_mut() {
                Some(o) if o.wants(seq) => fold_watched(&mut state, seq, record, o)?,
                _ => fold::apply_owned(&mut state, record)
                    .map_err(|source| RecoveryError::Fold { seq, source })?,
            }
            #[cfg(debug_assertions)]
            assert!(
                record_products_hold_invariant(&state, &touched),
                "invariant 1 broken after log record {seq}"
            );
            Ok(())
        },
    )?;
    Ok((state, records, last_seq))
}

/// Folds `record`, at position `seq`, into `state`, with `observer` shown the state
/// before and after it.
fn fold_watched(
    state: &mut State,
    seq: u64,
    record: Record,
    observer: &mut dyn FoldObserver,
) -> Result<(), RecoveryError> {
    observer.before(seq, &record, state);
    let watched = record.clone();
    fold::apply_owned(state, record).map_err(|source| RecoveryError::Fold { seq, source })?;
    observer.after(seq, &watched, state);
    Ok(())
}

/// `fold_stream` for a cluster node: Raft entries (a node's log, or the entries a node
/// sends its snapshot worker), folded with `fold::apply_entry`, onto `state`, the state
/// after entry `after`. Returns the state, the number of entries and the last sequence
/// folded.
pub fn fold_entries(
    source: impl Iterator<Item = Result<Entry, OpenError>> + Send,
    state: State,
    after: u64,
    upto: u64,
) -> Result<(State, u64, u64), RecoveryError> {
    fold_entries_observed(source, state, after, upto, None)
}

/// `fold_entries`, with `observer` watching each entry it wants: `before` and `after`
/// around the record an entry folds, `passed` for one that folds none.
fn fold_entries_observed(
    source: impl Iterator<Item = Result<Entry, OpenError>> + Send,
    mut state: State,
    after: u64,
    upto: u64,
    mut observer: Option<&mut dyn FoldObserver>,
) -> Result<(State, u64, u64), RecoveryError> {
    let (entries, last_seq) = pipeline(
        source,
        |entry| entry.pos.seq,
        after,
        upto,
        |entry| {
            let seq = entry.pos.seq;
            #[cfg(debug_assertions)]
            let touched = match &entry.payload {
                crate::storage::entry::Payload::Normal { record, .. } => Some(record.clone()),
                _ => None,
            };
            let fold_err = |source| RecoveryError::Fold { seq, source };
            match observer.as_deref_mut() {
                Some(o) if o.wants(seq) => {
                    match fold::admit_entry(&mut state.raft, entry).map_err(fold_err)? {
                        (_, Some(record)) => fold_watched(&mut state, seq, record, o)?,
                        (_, None) => o.passed(seq),
                    }
                }
                _ => {
                    fold::apply_entry(&mut state, entry).map_err(fold_err)?;
                }
            }
            #[cfg(debug_assertions)]
            if let Some(touched) = touched {
                assert!(
                    record_products_hold_invariant(&state, &touched),
                    "invariant 1 broken after log entry {seq}"
                );
            }
            Ok(())
        },
    )?;
    Ok((state, entries, last_seq))
}

/// The two threads under every fold: one reads `source` (sled's iterator, checksums,
/// bincode) and hands its items over in batches, the calling one passes them to `fold`, in
/// order. They take about the same time per item, so replay runs at about twice the speed
/// of one thread doing both. Items must follow `after` without a gap (`seq` numbers them);
/// one past `upto` ends the read. Returns the number of items folded and the last sequence.
fn pipeline<T: Send>(
    source: impl Iterator<Item = Result<T, OpenError>> + Send,
    seq: fn(&T) -> u64,
    after: u64,
    upto: u64,
    mut fold: impl FnMut(T) -> Result<(), RecoveryError>,
) -> Result<(u64, u64), RecoveryError> {
    let mut folded = 0;
    let mut last_seq = after;
    std::thread::scope(|scope| -> Result<(), RecoveryError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(REPLAY_BATCHES_AHEAD);
        scope.spawn(move || {
            let mut batch = Vec::with_capacity(REPLAY_BATCH_RECORDS);
            for item in source {
                // An item past `upto` ends the read, damaged or not: it is not asked for.
                let past = match &item {
                    Ok(item) => seq(item) > upto,
                    Err(OpenError::Damaged { seq, .. }) => *seq > upto,
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
                let item = item?;
                let at = seq(&item);
                if at != last_seq + 1 {
                    return Err(RecoveryError::Gap {
                        expected: last_seq + 1,
                        found: at,
                    });
                }
                fold(item)?;
                folded += 1;
                last_seq = at;
            }
        }
        // Which half of the pipeline limits replay: if the fold mostly waited, reading and
        // decoding the log did.
        tracing::debug!(
            items = folded,
            elapsed_ms = started.elapsed().as_millis() as u64,
            fold_waited_for_log_ms = waited.as_millis() as u64,
            "log replayed"
        );
        Ok(())
    })?;
    Ok((folded, last_seq))
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
        Forgotten { .. }
        | KeyCreated { .. }
        | KeyRevoked { .. }
        | WebhookSaved { .. }
        | WebhookRemoved { .. }
        | WebhookPositions { .. } => true,
        ReservationConfirmed { id, .. }
        | ReservationCancelled { id, .. }
        | ReservationExpired { id, .. }
        | ReservationExtended { id, .. } => state
            .reservations
            .get(id)
            .is_none_or(|r| r.items.iter().all(|l| check(&l.sku))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::entry::{encode_blank, encode_proposal, Epoch, LogPos};
    use crate::storage::log::tests::created;
    use crate::storage::log::{Log, NewEntry};
    use crate::storage::record;
    use crate::storage::snapshot::WriteHooks;

    /// Entries 1..=n in term 1: proposals of one epoch, every fifth a blank.
    fn entries(n: u64) -> Vec<NewEntry> {
        let mut proposals = 0;
        (1..=n)
            .map(|seq| {
                let mut payload = Vec::new();
                if seq % 5 == 0 {
                    encode_blank(&mut payload);
                } else {
                    proposals += 1;
                    let record = record::encode(&created(seq));
                    encode_proposal(Epoch { term: 1, k: 1 }, proposals, &record, &mut payload);
                }
                NewEntry {
                    term: 1,
                    payload: payload.into(),
                }
            })
            .collect()
    }

    /// Entries 1..=through folded one by one, on this thread (what the pipeline must match).
    fn folded_through(reader: &LogReader, through: u64) -> State {
        let mut state = State::default();
        for entry in reader.entries_after(0).take(through as usize) {
            fold::apply_entry(&mut state, entry.unwrap()).unwrap();
        }
        state
    }

    /// A cluster node starts from its newest snapshot and its log's entries through the
    /// committed mark, never past it; a log its snapshots do not reach, or one short of
    /// the mark, is an error.
    #[test]
    fn a_cluster_node_recovers_its_snapshot_and_its_log_through_the_committed_mark() {
        let tmp = tempfile::tempdir().unwrap();
        let snapshots = tmp.path().join("snapshots");
        let log = Log::open(&tmp.path().join("log"))
            .unwrap()
            .with_segment_records(16);
        let reader = log.reader();
        let (handle, join) = log.start_writer(1).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        handle.append_entries(1, entries(40), Box::new(move |done| tx.send(done).unwrap()));
        assert_eq!(rx.recv().unwrap(), Ok(40));

        // No snapshot: the log from its start, through the committed mark only.
        let recovered = recover_entries(&reader, &snapshots, 30).unwrap();
        assert_eq!((recovered.records, recovered.last_seq), (30, 30));
        assert!(recovered.snapshot.is_none() && recovered.snapshot_raft.is_none());
        let at_30 = folded_through(&reader, 30);
        assert_eq!(recovered.state.digest(), at_30.digest());
        assert_eq!(recovered.state.products.len(), 24);
        let applied = recovered.state.raft.as_ref().unwrap().last_applied;
        assert_eq!(applied, Some(LogPos { term: 1, seq: 30 }));

        // A snapshot at 12: the entries after it.
        let at_12 = folded_through(&reader, 12);
        let written = snapshot::write(&snapshots, 12, &at_12, 0, WriteHooks::default()).unwrap();
        let recovered = recover_entries(&reader, &snapshots, 30).unwrap();
        assert_eq!(recovered.snapshot.as_ref().map(|s| s.seq), Some(12));
        assert_eq!((recovered.records, recovered.last_seq), (18, 30));
        assert_eq!(recovered.state.digest(), at_30.digest());
        // The snapshot's own metadata, not the state's after the fold.
        assert_eq!(recovered.snapshot_raft, at_12.raft);

        // A committed mark before the snapshot (it holds committed entries only): the
        // snapshot alone.
        let recovered = recover_entries(&reader, &snapshots, 7).unwrap();
        assert_eq!((recovered.records, recovered.last_seq), (0, 12));
        assert_eq!(recovered.state.digest(), at_12.digest());

        // A mark past the log's end: short, never a state before it.
        let short = recover_entries(&reader, &snapshots, 45);
        assert!(
            matches!(
                short,
                Err(RecoveryError::Short {
                    upto: 45,
                    last_seq: 40
                })
            ),
            "{short:?}"
        );

        // Purged through 12 with that snapshot gone: nothing rebuilds the front.
        reader.purge_through(LogPos { term: 1, seq: 12 }).unwrap();
        std::fs::remove_file(&written.path).unwrap();
        let lost = recover_entries(&reader, &snapshots, 30);
        assert!(
            matches!(lost, Err(RecoveryError::NoUsableSnapshot { .. })),
            "{lost:?}"
        );

        // A single server's snapshot (no Raft metadata) is refused, not folded onto.
        snapshot::write(&snapshots, 12, &State::default(), 0, WriteHooks::default()).unwrap();
        let single = recover_entries(&reader, &snapshots, 30);
        assert!(
            matches!(single, Err(RecoveryError::NotReplicated { seq: 12 })),
            "{single:?}"
        );

        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(handle.shutdown()).unwrap();
        join.join().unwrap();
    }
}
