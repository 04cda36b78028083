//! Reading the log: records in order from any point (recovery, snapshots, rebuilds,
//! `stockd log dump`), with the next segment opened ahead on the segment thread, and the
//! truncation of its front once snapshots cover it.

use std::io;
use std::sync::{mpsc, Arc};

use crate::storage::record::Record;

use crate::storage::entry::{decode_entry, Entry, LogPos};

use super::batch::{Stored, Unpacked};
use super::*;

/// Reads the log while the writer runs (sled is safe to read concurrently), and drops its
/// front once snapshots cover it.
#[derive(Clone)]
pub struct LogReader {
    pub(super) segments: Arc<Segments>,
}

/// A Raft entry as the log stores it: its position, its frame's checksum and its payload.
#[derive(Clone, Debug)]
pub struct RawEntry {
    pub seq: u64,
    pub term: u64,
    pub crc: u32,
    pub payload: sled::IVec,
}

/// What `stockd log dump` reports.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct LogSummary {
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    pub records: u64,
    /// Encoded record bytes (each record's version, checksum and payload: the same in
    /// either layout; batch framing and sled's own overhead are not counted).
    pub record_bytes: u64,
    /// Segments (a sled database each) the records are in.
    pub segments: usize,
    /// Records up to here may have been dropped (snapshots cover them).
    pub truncated_through: u64,
    /// Records per kind, e.g. `ReservationCreated`.
    pub kinds: std::collections::BTreeMap<String, u64>,
    /// The first damaged record, if any (the summary stops counting there).
    pub damaged_at: Option<u64>,
}

impl std::fmt::Display for LogSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let range = match (self.first_seq, self.last_seq) {
            (Some(first), Some(last)) => format!("{first}..={last}"),
            _ => "empty".to_string(),
        };
        writeln!(f, "records:           {} ({range})", self.records)?;
        writeln!(f, "record bytes:      {}", self.record_bytes)?;
        writeln!(f, "segments:          {}", self.segments)?;
        writeln!(
            f,
            "truncated through: {} (covered by snapshots)",
            self.truncated_through
        )?;
        for (kind, count) in &self.kinds {
            writeln!(f, "  {kind:<22} {count}")?;
        }
        if let Some(seq) = self.damaged_at {
            writeln!(f, "DAMAGED record at:  {seq} (counting stopped there)")?;
        }
        Ok(())
    }
}

impl LogReader {
    /// Every record after `after`, in log order, verified. A segment truncated while this
    /// runs is read on if it was already opened; otherwise the stream skips it if nothing
    /// was read yet, else ends there (the caller sees a shorter log, never a hole or a
    /// wrong record).
    pub fn records_after(
        &self,
        after: u64,
    ) -> impl Iterator<Item = Result<(u64, Record), OpenError>> + Send + 'static {
        self.raw_records_after(after).map(|item| {
            let (seq, bytes) = item?;
            Ok((seq, decode_at(seq, &bytes)?))
        })
    }

    /// Every record after `after`, in log order, as stored (encoded, not verified: the
    /// snapshot worker verifies what it is sent). A record in a batch is a slice of the
    /// batch's value (no copy). Damaged batch framing ends the stream with
    /// `OpenError::Damaged`, naming the first record it makes unreadable.
    pub fn raw_records_after(
        &self,
        after: u64,
    ) -> impl Iterator<Item = Result<(u64, sled::IVec), OpenError>> + Send + 'static {
        self.stored_after(after, false).map(|item| {
            let stored = item?;
            debug_assert!(stored.entry.is_none(), "records only");
            Ok((stored.seq, stored.bytes))
        })
    }

    /// Every Raft entry after `after`, in log order, decoded and verified (the frame's
    /// checksum, then the payload by its kind: docs/REPLICATION.md, "Entries on disk"). A
    /// damaged entry is `OpenError::Damaged` naming it; a record (a single server's log)
    /// ends the stream with `OpenError::NotAnEntry`.
    pub fn entries_after(
        &self,
        after: u64,
    ) -> impl Iterator<Item = Result<Entry, OpenError>> + Send + 'static {
        self.stored_after(after, true).map(|item| {
            let stored = item?;
            let (term, crc) = stored.entry.expect("entries only");
            decode_entry(stored.seq, term, &stored.bytes, crc).map_err(|source| {
                OpenError::Damaged {
                    seq: stored.seq,
                    source,
                }
            })
        })
    }

    /// Every Raft entry after `after`, in log order, as stored (not verified: the snapshot
    /// worker verifies what it is sent, `entry::decode_entry`). Ends as `entries_after`.
    pub fn raw_entries_after(
        &self,
        after: u64,
    ) -> impl Iterator<Item = Result<RawEntry, OpenError>> + Send + 'static {
        self.stored_after(after, true).map(|item| {
            let stored = item?;
            let (term, crc) = stored.entry.expect("entries only");
            Ok(RawEntry {
                seq: stored.seq,
                term,
                crc,
                payload: stored.bytes,
            })
        })
    }

    /// What the log stores after `after`: records, or Raft entries (`entries`); an item
    /// of the other kind ends the stream with an error naming it.
    fn stored_after(&self, after: u64, entries: bool) -> Records {
        Records {
            service: self.segments.service.clone(),
            slots: self.segments.after(after).into(),
            from: after.saturating_add(1),
            entries,
            current: None,
            unpacking: None,
            opening: None,
            failed: false,
            yielded: false,
        }
    }

    /// Opens, on the segment thread, the first segments holding records after `after`, and
    /// keeps them open until the returned guard is dropped. Recovery calls it before it
    /// decodes the snapshot, so that opening the log (sled reads each segment's own log
    /// when it opens it) overlaps decoding instead of following it.
    pub fn open_ahead(&self, after: u64, segments: usize) -> OpenAhead {
        let service = &self.segments.service;
        let opening = self
            .segments
            .after(after)
            .into_iter()
            .take(segments)
            .map(|slot| service.open(slot))
            .collect();
        OpenAhead {
            service: service.clone(),
            opening,
        }
    }

    /// Every record in log order, verified.
    pub fn records(&self) -> impl Iterator<Item = Result<(u64, Record), OpenError>> + Send {
        self.records_after(0)
    }

    /// The highest sequence number that may have been dropped from the front of the log
    /// (0: none).
    pub fn truncated_through(&self) -> u64 {
        self.segments.mark()
    }

    /// Drops the records up to and including `seq` (a kept snapshot covers them), a whole
    /// segment at a time: segments that end at or before `seq` are deleted, the one that
    /// straddles it stays until a later truncation. The mark is written (durably) before
    /// anything is deleted and never lowered. A segment someone is reading is deleted when
    /// its reader is done. Returns the number of records dropped.
    pub fn truncate_through(&self, seq: u64) -> Result<u64, OpenError> {
        self.truncate_front(seq, None)
    }

    /// `truncate_through` for a cluster node's log (the engine's purge): the mark keeps
    /// the position `through` (its term too: mark format 2), which `purged` reads back.
    /// What stays of a straddling segment up to the mark is there, but purged: readers of
    /// Raft entries start after the mark.
    pub fn purge_through(&self, through: LogPos) -> Result<u64, OpenError> {
        self.truncate_front(through.seq, Some(through.term))
    }

    /// Where the front of a cluster node's log was purged through (`purge_through`), or
    /// `None` if it never was. A format-1 mark (a single server's) is
    /// `OpenError::BadMark`: a cluster node's purge always knows the term.
    pub fn purged(&self) -> Result<Option<LogPos>, OpenError> {
        match self.segments.mark_pos() {
            Mark { seq: 0, .. } => Ok(None),
            Mark {
                seq,
                term: Some(term),
            } => Ok(Some(LogPos { term, seq })),
            Mark { term: None, .. } => Err(OpenError::BadMark {
                path: self.segments.dir.join(MARK_FILE).display().to_string(),
            }),
        }
    }

    fn truncate_front(&self, seq: u64, term: Option<u64>) -> Result<u64, OpenError> {
        let mark = self.segments.raise_mark(seq, term)?;
        let slots = self.segments.list();
        let mut dropped = 0;
        for pair in slots.windows(2) {
            let (slot, next) = (&pair[0], &pair[1]);
            if next.first > mark.saturating_add(1) {
                break;
            }
            self.segments.remove(slot.first)?;
            dropped += next.first - slot.first;
        }
        Ok(dropped)
    }

    /// Sequence range, counts and sizes, decoding every record (for `stockd log dump`).
    pub fn summary(&self) -> Result<LogSummary, OpenError> {
        let mut summary = LogSummary {
            truncated_through: self.truncated_through(),
            segments: self.segments.list().len(),
            ..LogSummary::default()
        };
        for item in self.raw_records_after(0) {
            let decoded = item.and_then(|(seq, bytes)| Ok((seq, decode_at(seq, &bytes)?, bytes)));
            let (seq, record, bytes) = match decoded {
                Ok(decoded) => decoded,
                Err(OpenError::Damaged { seq, .. }) => {
                    summary.damaged_at = Some(seq);
                    return Ok(summary);
                }
                Err(err) => return Err(err),
            };
            summary.first_seq.get_or_insert(seq);
            summary.last_seq = Some(seq);
            summary.records += 1;
            summary.record_bytes += bytes.len() as u64;
            *summary.kinds.entry(record.kind().to_string()).or_insert(0) += 1;
        }
        Ok(summary)
    }
}

type Opening = mpsc::Receiver<Result<Option<SegmentRef>, OpenError>>;

/// Segments held open by `LogReader::open_ahead` (a failure to open one is left for the
/// read itself to report). Dropping it lets them close, on the segment thread.
pub struct OpenAhead {
    service: Service,
    opening: Vec<Opening>,
}

impl Drop for OpenAhead {
    fn drop(&mut self) {
        for opening in self.opening.drain(..) {
            if let Ok(Ok(Some(segment))) = opening.recv() {
                self.service.close(segment);
            }
        }
    }
}

/// The records of a run of segments. Opening a segment (sled reads its own log) and
/// closing it take ~10 and ~6 ms: the next segment is opened on the segment thread while
/// this one is read, and a finished one is closed there too, off the reader's path.
struct Records {
    service: Service,
    slots: std::collections::VecDeque<Arc<Slot>>,
    from: u64,
    /// Raft entries are read, not records.
    entries: bool,
    /// The segment being read. (The iterator comes before the reference, so it is dropped
    /// first: the database closes when both are gone.)
    current: Option<Box<(sled::Iter, SegmentRef)>>,
    /// The records of the key being read (one, or a batch).
    unpacking: Option<Unpacked>,
    opening: Option<Opening>,
    failed: bool,
    /// A record was read: a segment missing after this ends the stream.
    yielded: bool,
}

impl Records {
    fn open_next(&mut self) -> Option<Result<Option<SegmentRef>, OpenError>> {
        let opening = match self.opening.take() {
            Some(opening) => opening,
            // Through the segment thread as well: a reader may be an idle-class job.
            None => self.service.open(self.slots.pop_front()?),
        };
        let opened = opening.recv().unwrap_or_else(|_| {
            Err(OpenError::Io {
                path: String::new(),
                source: io::Error::other("the log's segment thread stopped"),
            })
        });
        if let Some(next) = self.slots.pop_front() {
            self.opening = Some(self.service.open(next));
        }
        Some(opened)
    }
}

impl Iterator for Records {
    type Item = Result<Stored, OpenError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if self.failed {
                return None;
            }
            if let Some(unpacking) = &mut self.unpacking {
                match unpacking.next() {
                    Some(item) => {
                        // Damaged framing: nothing after it can be read without a hole.
                        self.failed = item.is_err();
                        self.yielded = true;
                        return Some(item);
                    }
                    None => self.unpacking = None,
                }
            }
            if let Some(reading) = &mut self.current {
                let (iter, segment) = &mut **reading;
                if let Some(item) = iter.next() {
                    let item = item.map_err(sled_err(&segment.slot.path));
                    match item.and_then(|(key, value)| Ok((seq_of(&key)?, value))) {
                        Ok((key, value)) => {
                            self.unpacking = Some(match self.entries {
                                true => Unpacked::entries(key, value, self.from),
                                false => Unpacked::new(key, value, self.from),
                            });
                            continue;
                        }
                        Err(err) => {
                            self.yielded = true;
                            return Some(Err(err));
                        }
                    }
                }
                if let Some(done) = self.current.take() {
                    let (iter, segment) = *done;
                    drop(iter);
                    self.release(segment);
                }
            }
            match self.open_next()? {
                // (A segment truncated after it was opened is read all the same: its
                // records are still right, and the reader wants them.)
                Ok(Some(segment)) => match batch_start(&segment, self.from) {
                    Ok(start) => {
                        let iter = segment.db().range(start.to_be_bytes()..);
                        self.current = Some(Box::new((iter, segment)));
                    }
                    Err(err) => {
                        self.failed = true;
                        return Some(Err(err));
                    }
                },
                // Truncated before it was opened: skipped if nothing was read yet (the
                // reader starts later), else the end of what can be read without a hole.
                Ok(None) if self.yielded => {
                    self.failed = true;
                    return None;
                }
                Ok(None) => {}
                Err(err) => {
                    self.failed = true;
                    return Some(Err(err));
                }
            }
        }
    }
}

/// Where to start reading `segment` for records from `from` on: the key of the batch
/// that holds `from` (a reverse range lookup: the last key at or before it), whose earlier
/// records the reader skips; `from` itself if the segment has no key at or before it.
fn batch_start(segment: &SegmentRef, from: u64) -> Result<u64, OpenError> {
    let holder = segment.db().range(..=from.to_be_bytes()).keys().next_back();
    match holder.transpose().map_err(sled_err(&segment.slot.path))? {
        Some(key) => seq_of(&key),
        None => Ok(from),
    }
}

impl Records {
    /// Lets go of a segment this stream is done with: a reader of Raft entries (the
    /// engine's reads, and on a cluster node recovery and the snapshot worker's feed too)
    /// leaves it open on the segment thread for a moment (the engine's next short read is
    /// likely to want it: `Service::keep`); a reader of records (a single server's
    /// recovery and snapshots, a dump) reads each segment once, and closes it.
    fn release(&self, segment: SegmentRef) {
        match self.entries {
            true => self.service.keep(segment),
            false => self.service.close(segment),
        }
    }
}

impl Drop for Records {
    fn drop(&mut self) {
        if let Some(current) = self.current.take() {
            let (iter, segment) = *current;
            drop(iter);
            self.release(segment);
        }
        // An opening ahead holds a reference once it is done: let go after it.
        if let Some(Ok(Ok(Some(segment)))) = self.opening.take().map(|o| o.recv()) {
            self.release(segment);
        }
    }
}
