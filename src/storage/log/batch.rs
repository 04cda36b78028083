//! The value stored under one sled key: one record (the per-record layout of earlier
//! builds) or a *batch* of consecutive records (what the writer stores now).
//!
//! A batch value, under the key of its first record's sequence number `first`:
//!
//! ```text
//! [BATCH_FORMAT: u8 = 0x81][count: u32 LE]
//! count × [seq: u64 BE][len: u32 LE][record: len bytes]
//! ```
//!
//! Each `record` is exactly what `record::encode` makes (`[version][crc32][payload]`), the
//! bytes the per-record layout stored as a whole value: readers hand out a slice of the
//! batch (`IVec::subslice`, no copy) and verify it as before, so a damaged record is
//! still found by its own checksum and named by its own sequence number. The frames'
//! `seq` must run `first, first + 1, ...` and their lengths must tile the value exactly:
//! damage to the framing is named by the sequence number of the first record it makes
//! unreadable (`OpenError::Damaged`), and `truncate_from` that record keeps the prefix.
//!
//! Told apart by the first byte: a record starts with its format version, which stays
//! below 0x80 (`record::RECORD_FORMAT_VERSION`); a batch starts with `BATCH_FORMAT`, which
//! has the high bit set. So a log written one key per record, or a mix (a server upgraded
//! in the middle of a segment appends batch keys after per-record ones), reads as is.
//!
//! A cluster node's log will hold batches of Raft entries instead (docs/REPLICATION.md,
//! "Entries on disk"), under `ENTRY_BATCH_FORMAT`, each frame with the entry's term and a
//! checksum of its own before the payload:
//!
//! ```text
//! [ENTRY_BATCH_FORMAT: u8 = 0x82][count: u32 LE]
//! count × [seq: u64 BE][term: u64 LE][len: u32 LE][crc32 of term and payload: u32 LE][payload: len bytes]
//! ```
//!
//! Their framing is walked, cut and damaged exactly as a record batch's is. The readers of
//! records (recovery, snapshots, the feed, `log dump`) refuse such a frame
//! (`OpenError::RaftEntry`, naming its sequence) instead of decoding its payload as a
//! record: only the cluster's own reader folds entries. The writer stores them
//! (`LogHandle::append_entries`, `BatchBuilder::fill_entries`) for a cluster node only.

use sled::IVec;

use crate::storage::record::{self, DecodeError, Record, RECORD_FORMAT_VERSION};

use super::OpenError;

/// First byte of a batch value (batch format 1; a record's version is below 0x80).
pub(super) const BATCH_FORMAT: u8 = 0x81;
/// First byte of a batch of Raft entries (a cluster node's log).
pub(super) const ENTRY_BATCH_FORMAT: u8 = 0x82;
const _: () = assert!(RECORD_FORMAT_VERSION < 0x80);
const HEADER_BYTES: usize = 5;
const FRAME_HEADER_BYTES: usize = 12;
/// An entry frame's header: sequence, term, length, checksum.
const ENTRY_FRAME_HEADER_BYTES: usize = 24;

/// A batch value holds records until it reaches this size; the writer starts another key
/// for the rest of the group commit. Why a bound: sled 0.34.7 writes any log item over a
/// quarter of its 512 KiB segment (a value, or a whole leaf node, up to 17 values, when it
/// consolidates or splits one) to a file of its own under `blobs/`, which it never
/// fsyncs: the writer then has to fsync each such file itself (`writer::sync_blobs`), and
/// every such item costs a file. A value is at most 4 KiB, or one record alone if that
/// record is larger, and ~30 records a key already saves almost all of the per-key work the
/// batch layout is for. Records are bounded only by the request limits (a reservation of
/// 100 lines with an idempotency key, whose fingerprint repeats its lines, is ~16 KiB), and
/// sled splits a leaf above 16 items, so 8 or 9 such records in a row can still make a leaf
/// that sled writes to a blob: `sync_blobs` is what makes that flush durable.
pub(super) const BATCH_VALUE_BYTES_TARGET: usize = 4096;

/// Builds batch values in one reused buffer: records are encoded straight into it.
#[derive(Default)]
pub(super) struct BatchBuilder {
    buf: Vec<u8>,
}

impl BatchBuilder {
    /// Encodes records from the front of `records` (numbered from `first`) into one batch
    /// value, until it reaches `BATCH_VALUE_BYTES_TARGET` (at least one record). Returns
    /// the value and the number of records in it.
    pub(super) fn fill<'r, W: 'r>(
        &mut self,
        first: u64,
        records: impl IntoIterator<Item = &'r (Record, W)>,
    ) -> (&[u8], usize) {
        self.buf.clear();
        self.buf.extend_from_slice(&[BATCH_FORMAT, 0, 0, 0, 0]);
        let mut count = 0usize;
        for (record, _) in records {
            let start = self.buf.len();
            self.buf
                .extend_from_slice(&(first + count as u64).to_be_bytes());
            self.buf.extend_from_slice(&[0; 4]);
            record::encode_into(record, &mut self.buf);
            let len = (self.buf.len() - start - FRAME_HEADER_BYTES) as u32;
            self.buf[start + 8..start + FRAME_HEADER_BYTES].copy_from_slice(&len.to_le_bytes());
            if count > 0 && self.buf.len() > BATCH_VALUE_BYTES_TARGET {
                // It starts the next value instead (encoded again there).
                self.buf.truncate(start);
                break;
            }
            count += 1;
        }
        debug_assert!(count > 0, "a batch holds at least one record");
        self.buf[1..HEADER_BYTES].copy_from_slice(&(count as u32).to_le_bytes());
        (&self.buf, count)
    }
}

impl BatchBuilder {
    /// `fill` for Raft entries: encodes entries from the front of `entries` (numbered from
    /// `first`) into one `ENTRY_BATCH_FORMAT` value, each frame with its term and the
    /// checksum of its term and payload (`entry::frame_crc`), until the value reaches
    /// `BATCH_VALUE_BYTES_TARGET` (at least one entry). Returns the value and the number
    /// of entries in it.
    pub(super) fn fill_entries(&mut self, first: u64, entries: &[NewEntry]) -> (&[u8], usize) {
        self.buf.clear();
        self.buf
            .extend_from_slice(&[ENTRY_BATCH_FORMAT, 0, 0, 0, 0]);
        let mut count = 0usize;
        for entry in entries {
            let payload = &entry.payload[..];
            let start = self.buf.len();
            if count > 0
                && start + ENTRY_FRAME_HEADER_BYTES + payload.len() > BATCH_VALUE_BYTES_TARGET
            {
                break; // it starts the next value
            }
            self.buf
                .extend_from_slice(&(first + count as u64).to_be_bytes());
            self.buf.extend_from_slice(&entry.term.to_le_bytes());
            self.buf
                .extend_from_slice(&(payload.len() as u32).to_le_bytes());
            let crc = crate::storage::entry::frame_crc(entry.term, payload);
            self.buf.extend_from_slice(&crc.to_le_bytes());
            self.buf.extend_from_slice(payload);
            count += 1;
        }
        debug_assert!(count > 0, "a batch holds at least one entry");
        self.buf[1..HEADER_BYTES].copy_from_slice(&(count as u32).to_le_bytes());
        (&self.buf, count)
    }
}

/// A Raft entry for the writer to store (`LogHandle::append_entries`): its term and its
/// payload, exactly as `entry::encode_proposal`, `encode_blank` or `encode_membership`
/// made it. Shared (`Bytes`), so that the in-memory tail the engine reads before the flush
/// and the writer hold the same bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewEntry {
    pub term: u64,
    pub payload: bytes::Bytes,
}

fn damaged(seq: u64, what: String) -> OpenError {
    OpenError::Damaged {
        seq,
        source: DecodeError::Framing(what),
    }
}

/// Whether `value` is a batch, of records or of entries (else it is one record, stored
/// whole under its key).
pub(super) fn is_batch(value: &[u8]) -> bool {
    matches!(
        value.first(),
        Some(&BATCH_FORMAT) | Some(&ENTRY_BATCH_FORMAT)
    )
}

/// Whether `value` is a batch of Raft entries.
pub(super) fn is_entry_batch(value: &[u8]) -> bool {
    value.first() == Some(&ENTRY_BATCH_FORMAT)
}

/// The number of records a batch says it holds (`None`: its header is cut short).
fn declared_count(value: &[u8]) -> Option<u64> {
    let count: [u8; 4] = value.get(1..HEADER_BYTES)?.try_into().ok()?;
    Some(u64::from(u32::from_le_bytes(count)))
}

/// Records stored under one key, as its header says (1 for a single record). What a
/// removal of the key counts; reading checks it against the frames.
pub(super) fn records_in(value: &[u8]) -> u64 {
    if is_batch(value) {
        declared_count(value).unwrap_or(1)
    } else {
        1
    }
}

/// One frame of a batch value, located and checked (its record is not verified).
pub(super) struct Frame {
    pub(super) seq: u64,
    /// An entry's term and stored checksum (`None`: a record's frame).
    pub(super) entry: Option<(u64, u32)>,
    /// The record's (or the entry's payload's) bytes: `value[start..end]`.
    pub(super) start: usize,
    pub(super) end: usize,
}

/// A walk through the frames of the batch value stored under `first`, checking their
/// framing. It holds no borrow of the value (the caller passes it to each step), so that
/// `Unpacked` can own the value it walks.
pub(super) struct FrameCursor {
    first: u64,
    /// The frames are entries' (`ENTRY_BATCH_FORMAT`).
    entries: bool,
    count: u64,
    index: u64,
    /// Where the next frame starts (the end of those walked so far).
    offset: usize,
    done: bool,
}

impl FrameCursor {
    pub(super) fn new(first: u64, value: &[u8]) -> FrameCursor {
        FrameCursor {
            first,
            entries: is_entry_batch(value),
            count: declared_count(value).unwrap_or(0),
            index: 0,
            offset: HEADER_BYTES,
            done: false,
        }
    }

    /// The next frame; `None` once every frame was read and the value ends there. An
    /// error (named by the first record it makes unreadable) is the last item.
    pub(super) fn next(&mut self, value: &[u8]) -> Option<Result<Frame, OpenError>> {
        if self.done {
            return None;
        }
        let seq = self.first + self.index;
        let result = if value.len() < HEADER_BYTES {
            Err(damaged(
                seq,
                format!("a batch header of {} bytes", value.len()),
            ))
        } else if self.count == 0 {
            Err(damaged(seq, "a batch of no records".into()))
        } else if self.index == self.count {
            self.done = true;
            if self.offset == value.len() {
                return None;
            }
            Err(damaged(
                seq,
                format!(
                    "{} bytes after the batch's last record",
                    value.len() - self.offset
                ),
            ))
        } else {
            self.frame(value, seq)
        };
        if result.is_err() {
            self.done = true;
        }
        Some(result)
    }

    fn frame(&mut self, value: &[u8], seq: u64) -> Result<Frame, OpenError> {
        let header_bytes = if self.entries {
            ENTRY_FRAME_HEADER_BYTES
        } else {
            FRAME_HEADER_BYTES
        };
        let Some(header) = value.get(self.offset..self.offset + header_bytes) else {
            return Err(damaged(seq, "the batch ends before this record".into()));
        };
        let stored = u64::from_be_bytes(header[..8].try_into().expect("8 bytes"));
        if stored != seq {
            return Err(damaged(seq, format!("its frame says record {stored}")));
        }
        let u32_at = |at: usize| u32::from_le_bytes(header[at..at + 4].try_into().expect("4"));
        let (len, entry) = if self.entries {
            let term = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
            (u32_at(16) as usize, Some((term, u32_at(20))))
        } else {
            (u32_at(8) as usize, None)
        };
        let start = self.offset + header_bytes;
        let end = start
            .checked_add(len)
            .filter(|end| *end <= value.len())
            .ok_or_else(|| damaged(seq, format!("{len} bytes long, past the batch's end")))?;
        self.offset = end;
        self.index += 1;
        Ok(Frame {
            seq,
            entry,
            start,
            end,
        })
    }
}

/// What one key stores, item by item, as stored (not verified: `decode_at` or
/// `entry::decode_entry` does that).
pub(super) struct Stored {
    pub(super) seq: u64,
    /// An entry's term and its frame's checksum (`None`: a record).
    pub(super) entry: Option<(u64, u32)>,
    /// The record's bytes, or the entry's payload: a slice of the value (no copy).
    pub(super) bytes: IVec,
}

/// The records (or, for `Unpacked::entries`, the Raft entries) stored under one key, in
/// order, as stored, skipping those before `from`. A per-record value is its one record;
/// a batch yields slices of its value (no copy). An item of the other kind ends the walk
/// with an error naming it (`OpenError::RaftEntry`, `OpenError::NotAnEntry`), as does a
/// framing error.
pub(super) struct Unpacked {
    value: IVec,
    from: u64,
    /// `None` for a single record, numbered by its key.
    frames: Option<FrameCursor>,
    key: u64,
    /// Raft entries are wanted, not records.
    entries: bool,
    done: bool,
}

impl Unpacked {
    /// The records under `key`; an entry is refused.
    pub(super) fn new(key: u64, value: IVec, from: u64) -> Unpacked {
        Unpacked::of_kind(key, value, from, false)
    }

    /// The Raft entries under `key`; a record is refused.
    pub(super) fn entries(key: u64, value: IVec, from: u64) -> Unpacked {
        Unpacked::of_kind(key, value, from, true)
    }

    fn of_kind(key: u64, value: IVec, from: u64, entries: bool) -> Unpacked {
        let frames = is_batch(&value).then(|| FrameCursor::new(key, &value));
        Unpacked {
            value,
            from,
            frames,
            key,
            entries,
            done: false,
        }
    }
}

impl Iterator for Unpacked {
    type Item = Result<Stored, OpenError>;

    fn next(&mut self) -> Option<Self::Item> {
        let Some(frames) = &mut self.frames else {
            if std::mem::replace(&mut self.done, true) || self.key < self.from {
                return None;
            }
            if self.entries {
                return Some(Err(OpenError::NotAnEntry { seq: self.key }));
            }
            return Some(Ok(Stored {
                seq: self.key,
                entry: None,
                bytes: self.value.clone(),
            }));
        };
        loop {
            match frames.next(&self.value)? {
                // Records before `from` are walked over (their framing says where the
                // next one starts), never handed out.
                Ok(frame) if frame.seq < self.from => {}
                // An entry is not a record (its payload is never handed out as one), nor
                // a record an entry.
                Ok(frame) if frame.entry.is_some() != self.entries => {
                    frames.done = true;
                    let seq = frame.seq;
                    return Some(Err(match self.entries {
                        true => OpenError::NotAnEntry { seq },
                        false => OpenError::RaftEntry { seq },
                    }));
                }
                Ok(frame) => {
                    let bytes = self.value.subslice(frame.start, frame.end - frame.start);
                    return Some(Ok(Stored {
                        seq: frame.seq,
                        entry: frame.entry,
                        bytes,
                    }));
                }
                Err(err) => return Some(Err(err)),
            }
        }
    }
}

/// The sequence number of the last record or entry stored under `first` (a batch's
/// frames are walked, of either kind: the header's count has no checksum of its own).
pub(super) fn last_in(first: u64, value: &[u8]) -> Result<u64, OpenError> {
    if !is_batch(value) {
        return Ok(first);
    }
    let mut frames = FrameCursor::new(first, value);
    let mut last = first;
    while let Some(frame) = frames.next(value) {
        last = frame?.seq;
    }
    Ok(last)
}

/// Test hook: a batch value of Raft entries numbered from `first`, each `(term,
/// payload)` framed as a cluster node's writer will store it.
#[cfg(test)]
pub(super) fn entry_batch(first: u64, entries: &[(u64, Vec<u8>)]) -> Vec<u8> {
    let mut value = vec![ENTRY_BATCH_FORMAT];
    value.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for (i, (term, payload)) in entries.iter().enumerate() {
        value.extend_from_slice(&(first + i as u64).to_be_bytes());
        value.extend_from_slice(&term.to_le_bytes());
        value.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        let crc = crate::storage::entry::frame_crc(*term, payload);
        value.extend_from_slice(&crc.to_le_bytes());
        value.extend_from_slice(payload);
    }
    value
}

/// What cutting the log at `seq` does to the key before it (see `cut`).
pub(super) enum Cut {
    /// It holds nothing at or after `seq`.
    Keep,
    /// Nothing in it can be kept: the key goes (with this many records).
    Remove(u64),
    /// It is rewritten to this value, its records before `seq`, dropping this many.
    Rewrite(Vec<u8>, u64),
}

/// What cutting the log at `seq` does to the value stored under `first` (< `seq`): a
/// batch that runs on past `seq` keeps its records before it, and only up to the first
/// one whose framing is damaged (the rest could not be read without a hole).
pub(super) fn cut(first: u64, value: &[u8], seq: u64) -> Cut {
    if !is_batch(value) {
        return Cut::Keep; // one record, numbered `first` < `seq`
    }
    let mut frames = FrameCursor::new(first, value);
    let mut kept = 0u64;
    let mut end = HEADER_BYTES;
    loop {
        match frames.next(value) {
            // Every frame is before `seq` and the value ends with them.
            None => return Cut::Keep,
            Some(Ok(frame)) if frame.seq < seq => {
                kept += 1;
                end = frame.end;
            }
            Some(_) => break,
        }
    }
    let declared = declared_count(value).unwrap_or(0);
    let dropped = declared.saturating_sub(kept);
    if kept == 0 {
        return Cut::Remove(dropped);
    }
    let mut kept_value = Vec::with_capacity(end);
    kept_value.push(value[0]); // a batch of records, or of entries, as it was
    kept_value.extend_from_slice(&(kept as u32).to_le_bytes());
    kept_value.extend_from_slice(&value[HEADER_BYTES..end]);
    Cut::Rewrite(kept_value, dropped)
}

/// Test hook: `value` (stored under `first`) with the last byte of record `seq`'s bytes
/// flipped, as a bad disk would (`None`: the key does not hold `seq`).
pub(super) fn damaged_copy(first: u64, value: &[u8], seq: u64) -> Option<Vec<u8>> {
    let at = if is_batch(value) {
        let mut frames = FrameCursor::new(first, value);
        let frame = std::iter::from_fn(|| frames.next(value))
            .map_while(Result::ok)
            .find(|frame| frame.seq == seq)?;
        frame.end.checked_sub(1).filter(|at| *at >= frame.start)?
    } else if first == seq {
        value.len().checked_sub(1)?
    } else {
        return None;
    };
    let mut copy = value.to_vec();
    copy[at] ^= 0x5a;
    Some(copy)
}
