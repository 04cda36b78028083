//! The write-ahead log: one writer thread over sled, with group commit.
//!
//! The records live in *segments*, each a sled database of its own in a directory
//! `segment-<first sequence>` of the log directory, holding a contiguous run of up to
//! 65,536 records. Keys are big-endian `u64` sequence numbers, so sled's key order is log
//! order. Each group commit is stored as **one key per segment it touches** (more if it
//! is large, see below): the key is the sequence number of its first record there, the
//! value a *batch* of its records, each framed with its own sequence number and stored
//! exactly as `crate::storage::record` encodes it (format version, checksum, payload):
//!
//! ```text
//! key:   first sequence (u64 BE)
//! value: [0x81][count: u32 LE] then count × [seq: u64 BE][len: u32 LE][record: len bytes]
//! ```
//!
//! Why batches: sled's cost is mostly per key (tree descent, a delta per key, node
//! consolidations and splits by number of keys), and a sync reserve waits for a commit
//! of many records anyway: a key per commit rather than per record cut the CPU of the
//! writer and sled's threads per sync reserve by about half
//! (docs/PERFORMANCE.md#decision-batch-layout). Why each record keeps its own framing: a
//! damaged record is still found by its own checksum and named by its own sequence number (`OpenError::Damaged`), and
//! `truncate_from` it keeps the records before it, in its batch too (rewritten to that
//! prefix); damage to the framing itself is named by the first record it makes unreadable.
//! A batch value stops growing at 4 KiB (`batch::BATCH_VALUE_BYTES_TARGET`): sled 0.34.7
//! writes larger items (a leaf node holds up to 17 values) to blob files it never fsyncs.
//!
//! Earlier builds stored one key per record, the value the encoded record alone. Both
//! are read, mixed too (an upgraded server appends batch keys after per-record ones in the
//! same segment): a record's first byte is its format version, below 0x80, a batch's is
//! 0x81 (`batch`). Readers hand out each record's bytes as a slice of the batch value
//! (`IVec::subslice`, no copy); reading from inside a batch starts at the key before the
//! first record asked for (a reverse range lookup) and skips the records before it.
//!
//! Appends go to the newest segment; the front of the log is truncated (once snapshots
//! cover it) by deleting whole segment directories. Deleting a directory costs sled
//! nothing: with one database and a tree per segment, sled's `drop_tree` freed every page
//! through its own log and then rewrote live pages on the writer's path, which slowed
//! every flush (so every sync reserve) for seconds after a large truncation. A file
//! `truncated_through` holds the truncation mark; a file `LOCK` (an exclusive `flock`)
//! keeps a second process (or a second `Log` in this one) off the directory.
//!
//! Only the newest segment stays open (the writer's); an older one is opened while it is
//! read (recovery, snapshots, rebuilds) and closed when its last reader is done, so memory
//! does not grow with the number of segments. The one exception is short-lived: the last
//! two segments a reader of Raft entries let go of stay open for a second
//! (`segments::KEEP_OPEN`), for the engine's next short read.
//!
//! Everyone else talks to the writer through a `LogHandle`: `append` queues a record and
//! returns a `Ticket` that resolves once the record is flushed. The writer takes everything
//! that arrived while the previous flush ran, encodes it straight into one batch value per
//! segment it touches (in one buffer it keeps), inserts and flushes each of those segments
//! in order, then answers every ticket of the batch. Throughput comes from the batch,
//! never from skipping the flush. A cluster node's Raft entries go through the same group
//! commit (`append_entries`, `0x82` batch values; a batch holds records or entries, never
//! both), and their callback is called at the same point, after the flush and
//! `sync_blobs`.
//!
//! The queue is FIFO, so the order in which records are queued is the order in which they
//! are numbered and stored. Callers rely on this for the log order rule (invariant 3
//! in docs/ARCHITECTURE.md): a record that frees stock is queued before the freed units are handed out.
//! Across segments the same holds: a segment is flushed before the next one is written.
//!
//! `flush()` is sled's durability point and is called only from this thread (`flush_async`
//! can deadlock under concurrent callers, sled #1308). A failed write is fatal for the log:
//! the writer answers every waiting and every later ticket with `LogError::Unavailable` and
//! never writes again, so nothing is acknowledged that is not durable. Restarting the
//! process recovers from what reached the disk.
//!
//! A log directory written by an earlier stockd (one sled database directly in it, a tree
//! per segment) is moved to a database per segment when it is opened (`migrate`; its
//! records keep a key each).
//!
//! The files: `writer` (the handle, tickets and the writer's group commit: the hot path),
//! `batch` (the value under a key: one record or a batch), `segments` (segment lifetimes
//! and the segment thread), `reader` (reading and the truncation of the front), `dir`
//! (the directory lock and the truncation mark), `migrate` (the older single-database
//! layout).

mod batch;
mod dir;
mod migrate;
mod reader;
mod segments;
#[cfg(test)]
pub(crate) mod tests;
mod writer;

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::storage::record::{self, DecodeError, Record};

use dir::*;
use migrate::*;
use segments::*;

pub use batch::NewEntry;
pub use reader::{LogReader, LogSummary, OpenAhead, RawEntry};
pub use segments::SEGMENT_RECORDS_DEFAULT;
pub use writer::{Flushed, LogHandle, LogStats, Ticket};

/// Why the log cannot acknowledge a record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LogError {
    #[error("the write-ahead log cannot be written: {0}")]
    Unavailable(String),
    /// A cluster leader's record that certainly was not committed (refused before it was
    /// appended, or after a gap in its epoch's chain): retrying the change is safe.
    #[error("the change was not made: the cluster did not commit it ({0}); it is safe to retry")]
    NotCommitted(String),
    /// A cluster leader's record whose fate is unknown: appended, but its result never
    /// came (a leader change, or no quorum within the deadline). Another leader may still
    /// commit it.
    #[error("the change may or may not have been made ({0}): read before retrying; a reservation retried with the same Idempotency-Key is never held twice")]
    OutcomeUnknown(String),
}

/// Why the log could not be opened or read at start-up.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot open the log in {path}: {source}")]
    Sled { path: String, source: sled::Error },
    #[error("log record {seq} is damaged ({source})")]
    Damaged { seq: u64, source: DecodeError },
    #[error("log key {0:?} is not a sequence number")]
    BadKey(Vec<u8>),
    #[error("cannot use the log directory {path}: {source}")]
    Io { path: String, source: io::Error },
    #[error("the log in {path} is locked by another stockd process")]
    Locked { path: String },
    #[error("the log's truncation mark {path} is damaged")]
    BadMark { path: String },
    /// A Raft entry where a record was read: the log of a cluster node, which only the
    /// cluster's own reader folds (docs/REPLICATION.md, "Entries on disk").
    #[error(
        "log entry {seq} is a Raft entry: this is a cluster node's log, not a single server's"
    )]
    RaftEntry { seq: u64 },
    #[error("the cluster vote file {path} is damaged")]
    BadVote { path: String },
    /// A record where a Raft entry was read: a single server's log.
    #[error("log record {seq} is a single server's record, not a Raft entry: this log was not written by a cluster node")]
    NotAnEntry { seq: u64 },
}

/// Keys removed per sled batch when the end of the log is cut (`truncate_from`), and
/// records moved per sled batch by the migration of a single-database log.
pub(super) const TRUNCATE_BATCH_KEYS: usize = 10_000;

pub(super) fn io_err(path: &Path) -> impl Fn(io::Error) -> OpenError + '_ {
    move |source| OpenError::Io {
        path: path.display().to_string(),
        source,
    }
}

pub(super) fn sled_err(path: &Path) -> impl Fn(sled::Error) -> OpenError + '_ {
    move |source| OpenError::Sled {
        path: path.display().to_string(),
        source,
    }
}

/// The opened log, before its writer starts: recovery reads it, then `start_writer`.
pub struct Log {
    segments: Arc<Segments>,
    pub(super) segment_records: u64,
    pub(super) flush_interval: Duration,
    /// Test hook: the writer notes its flushes here (`writer::Step`).
    #[cfg(test)]
    trace: Option<writer::Trace>,
}

impl Log {
    pub fn open(dir: &Path) -> Result<Log, OpenError> {
        Log::open_moving(dir, SEGMENT_RECORDS_DEFAULT, TRUNCATE_BATCH_KEYS)
    }

    /// `open`, moving a single-database log (`migrate`) into segments of
    /// `segment_records` records, `batch_keys` records per sled batch (tests use small
    /// ones to see several of each in a small log).
    pub(super) fn open_moving(
        dir: &Path,
        segment_records: u64,
        batch_keys: usize,
    ) -> Result<Log, OpenError> {
        let segments = Segments::open(dir)?;
        migrate_single_database(&segments, segment_records, batch_keys)?;
        Ok(Log {
            segments: Arc::new(segments),
            segment_records: SEGMENT_RECORDS_DEFAULT,
            flush_interval: Duration::ZERO,
            #[cfg(test)]
            trace: None,
        })
    }

    /// Records per segment from now on (tests use small segments to see truncation).
    pub fn with_segment_records(mut self, records: u64) -> Log {
        self.segment_records = records.max(1);
        self
    }

    /// The writer starts a flush at most this often (zero: as soon as the previous one
    /// ended): records that arrive meanwhile join the batch, so each flush (whose cost
    /// inside sled is mostly per flush, not per record) carries more of them. The server
    /// sets `SYNC_FLUSH_INTERVAL_US` or `ASYNC_FLUSH_INTERVAL_MS` by durability.
    pub fn with_flush_interval(mut self, interval: Duration) -> Log {
        self.flush_interval = interval;
        self
    }

    /// Sequence number of the newest record, or of the last one truncated away (0 for a
    /// log that never held a record).
    pub fn last_seq(&self) -> Result<u64, OpenError> {
        let mut last = 0;
        for slot in self.segments.list().iter().rev() {
            let Some(segment) = open_segment(slot)? else {
                continue;
            };
            if let Some((key, value)) = segment.db().last().map_err(sled_err(&slot.path))? {
                // The frames are walked, not the header's count trusted (it has no
                // checksum of its own): the writer continues after this record, so a
                // wrong figure would leave a hole or number two records alike.
                last = batch::last_in(seq_of(&key)?, &value)?;
                break;
            }
        }
        Ok(last.max(self.segments.mark()))
    }

    /// The log's directory.
    pub fn dir(&self) -> &Path {
        &self.segments.dir
    }

    /// A view of the log for reading (recovery, snapshots). Every clone must be dropped
    /// before the writer stops, so that the log is closed when it does.
    pub fn reader(&self) -> LogReader {
        LogReader {
            segments: self.segments.clone(),
        }
    }

    /// Removes record `seq` and every later one, and flushes: the operator's explicit
    /// choice when a damaged record stops start-up (`--truncate-damaged-log`). Returns the
    /// number of records removed. Works from the newest record backwards, so whatever part
    /// of it a crash lets reach the disk leaves a log without a hole (a segment directory
    /// goes at once, by a rename; sled persists a prefix of its operations). A batch that
    /// holds `seq` and earlier records is rewritten last, in one insert, to its records
    /// before `seq`: until then it is whole, so the log still has no hole.
    pub fn truncate_from(&self, seq: u64) -> Result<u64, OpenError> {
        truncate_segments(&self.segments, seq, &mut || true)
    }

    /// Test hook: `truncate_from` as a crash would leave it after its first `steps`
    /// changes (each a change sled or the file system persists whole: a segment removed,
    /// a batch of key removals, the rewrite of the batch holding the cut), with those
    /// changes flushed.
    #[cfg(test)]
    pub(super) fn truncate_from_crashing(&self, seq: u64, steps: usize) -> Result<u64, OpenError> {
        let mut left = steps;
        truncate_segments(&self.segments, seq, &mut || {
            let go = left > 0;
            left = left.saturating_sub(1);
            go
        })
    }

    /// The vote a cluster node saved last (`DIR/log/vote`; `None`: none ever). A damaged
    /// file is an error (`OpenError::BadVote`). Saving goes through the writer
    /// (`LogHandle::save_vote`), in order with the records.
    pub fn vote(&self) -> Result<Option<crate::storage::entry::Vote>, OpenError> {
        read_vote(&self.segments.dir)
    }

    /// A cluster node's committed mark (`LogHandle::save_committed`): its log is
    /// committed at least through this sequence (0: not known). Only a lower bound: start-up
    /// recovers through it, and the engine brings the rest.
    pub fn committed(&self) -> Result<u64, OpenError> {
        read_committed(&self.segments.dir)
    }

    /// Flushes everything written so far (only while no writer runs).
    pub fn flush(&self) -> Result<(), OpenError> {
        self.segments.flush()
    }
}

/// Removes record (or entry) `seq` and every later one, and flushes; returns how many
/// were removed (`Log::truncate_from`, and the writer's `truncate_after`). Works from the
/// newest backwards, so whatever part of it a crash lets reach the disk leaves a log
/// without a hole: a segment directory goes at once, by a rename; sled persists a prefix
/// of its operations; a batch that holds `seq` and earlier ones is rewritten last, in one
/// insert, to its part before `seq`. `step` is asked before each of those changes; once it
/// answers false nothing more is changed, and what was done is flushed (tests: a crash).
fn truncate_segments(
    segments: &Segments,
    seq: u64,
    step: &mut dyn FnMut() -> bool,
) -> Result<u64, OpenError> {
    let mut removed = 0;
    'segments: for slot in segments.list().into_iter().rev() {
        let Some(segment) = open_segment(&slot)? else {
            continue;
        };
        let err = sled_err(&slot.path);
        if slot.first >= seq {
            if !step() {
                break 'segments;
            }
            for value in segment.db().iter().values() {
                removed += batch::records_in(&value.map_err(&err)?);
            }
            drop(segment);
            segments.remove(slot.first)?;
            continue;
        }
        // Keys (records, or batches starting) at or after `seq`, newest first.
        loop {
            let entries: Vec<_> = segment
                .db()
                .range(seq.to_be_bytes()..)
                .rev()
                .take(TRUNCATE_BATCH_KEYS)
                .map(|item| item.map(|(key, value)| (key, batch::records_in(&value))))
                .collect::<Result<_, _>>()
                .map_err(&err)?;
            if entries.is_empty() {
                break;
            }
            if !step() {
                break 'segments;
            }
            let mut removal = sled::Batch::default();
            for (key, records) in entries {
                removal.remove(key);
                removed += records;
            }
            segment.db().apply_batch(removal).map_err(&err)?;
        }
        // The key before `seq`: a batch may run on past it.
        let before = segment.db().range(..seq.to_be_bytes()).next_back();
        if let Some((key, value)) = before.transpose().map_err(&err)? {
            match batch::cut(seq_of(&key)?, &value, seq) {
                batch::Cut::Keep => {}
                _ if !step() => break 'segments,
                batch::Cut::Remove(dropped) => {
                    segment.db().remove(key).map_err(&err)?;
                    removed += dropped;
                }
                batch::Cut::Rewrite(kept, dropped) => {
                    segment.db().insert(key, kept).map_err(&err)?;
                    removed += dropped;
                }
            }
        }
        segment.db().flush().map_err(&err)?;
        break;
    }
    segments.flush()?;
    Ok(removed)
}

/// Decodes and verifies the stored bytes of record `seq` (a failure names the record).
pub fn decode_at(seq: u64, bytes: &[u8]) -> Result<Record, OpenError> {
    record::decode(bytes).map_err(|source| OpenError::Damaged { seq, source })
}

pub(super) fn seq_of(key: &[u8]) -> Result<u64, OpenError> {
    let bytes: [u8; 8] = key
        .try_into()
        .map_err(|_| OpenError::BadKey(key.to_vec()))?;
    Ok(u64::from_be_bytes(bytes))
}

/// Test hook: overwrites the stored bytes of record `seq` with a damaged copy, as a bad
/// disk would (inside its batch, if it is in one: that record's checksum fails, and it is
/// named exactly). Only for a log no server has open.
#[doc(hidden)]
pub fn damage_record(dir: &Path, seq: u64) -> Result<(), OpenError> {
    let log = Log::open(dir)?;
    for slot in log.segments.list() {
        let Some(segment) = open_segment(&slot)? else {
            continue;
        };
        let err = sled_err(&slot.path);
        // The key holding `seq`: its own, or the batch's that starts at or before it.
        let holder = segment.db().range(..=seq.to_be_bytes()).next_back();
        if let Some((key, value)) = holder.transpose().map_err(&err)? {
            if let Some(damaged) = batch::damaged_copy(seq_of(&key)?, &value, seq) {
                segment.db().insert(key, damaged).map_err(&err)?;
                segment.db().flush().map_err(&err)?;
            }
        }
    }
    Ok(())
}
