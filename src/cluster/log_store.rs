//! `ClusterLog`: the engine's log storage (`RaftLogStorage`, `RaftLogReader`) over
//! stockd's own write-ahead log (docs/REPLICATION.md, "The log storage").
//!
//! Entries are stored by the log's writer as `0x82` batches, in its group commit; the
//! engine's `IOFlushed` callback is called in one place only, the writer's `Flushed`
//! callback, which runs after sled's flush and `sync_blobs`. The engine needs an appended
//! entry readable as soon as `append` returns, before that flush: the **tail** holds every
//! entry not yet flushed, and the last `TAIL_FLUSHED_KEEP` flushed ones, so that recent
//! entries (what replication and apply read) are served without a sled lookup. Older
//! entries are read back with `LogReader::entries_after`, decoded and verified.
//!
//! The vote, the committed mark, truncation and purge are the writer's and the reader's
//! (`LogHandle::save_vote`, `save_committed`, `truncate_after`; `LogReader::purge_through`,
//! whose truncation mark keeps the purged entry's term: mark format 2). Vote, appends and
//! truncations go through the writer's one queue, so they reach the disk in the order the
//! engine asked for them, as it requires.
//!
//! Numbering: the engine's index `i` is log sequence `i + 1` (`seq_of`, `index_of`: the
//! only place this arithmetic is done).
//!
//! An append must continue the log exactly: its first index is the one after the last
//! entry (or after the purge mark, once the purge has passed the last entry). Anything
//! else is refused with an error and leaves the log as it is: the engine never asks for it
//! (it truncates before it overwrites, and purges before it appends past a snapshot), and
//! stockd's log never has a hole. After a purge that passed the end of the log (a snapshot
//! install that covers more than this node's log), the writer is restarted after the
//! purge mark (`LogHandle::restart`), and appends continue from there.
//!
//! A node's log opened with `open_bounded` is never purged past the oldest snapshot kept
//! in its snapshot directory: whatever the engine asks, the newest snapshot that verifies
//! (or an older one kept) plus the log after it rebuilds the state.

use std::collections::VecDeque;
use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use openraft::storage::{IOFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader};

use crate::storage::entry::LogPos;
use crate::storage::log::{Log, LogHandle, LogReader, OpenError};

use super::types::{
    log_id_of, new_entry, pos_of, raft_entry_of, vote_from_stored, vote_to_stored, LogId,
    RaftEntry, RaftVote, Tc,
};

/// Flushed entries the tail keeps beside the unflushed ones.
pub const TAIL_FLUSHED_KEEP: usize = 8192;

/// The log sequence of the engine's index `index`.
pub fn seq_of(index: u64) -> u64 {
    index + 1
}

/// The engine's index of log sequence `seq` (at least 1: 0 means "none").
pub fn index_of(seq: u64) -> u64 {
    debug_assert!(seq > 0, "sequence 0 is no entry");
    seq.saturating_sub(1)
}

/// The engine's log storage on a cluster node's log. Cheap to clone: the engine's
/// replication tasks read through clones (`get_log_reader`).
#[derive(Clone)]
pub struct ClusterLog {
    shared: Arc<Shared>,
}

struct Shared {
    handle: LogHandle,
    reader: LogReader,
    tail: Mutex<Tail>,
    /// The node's snapshot directory: a purge never passes the oldest snapshot kept there
    /// (`None`: purges go where the engine says, as in the storage suite's cases).
    snapshots: Option<std::path::PathBuf>,
}

struct Tail {
    /// Entries by index, consecutive; the last is `last` whenever this is not empty.
    entries: VecDeque<RaftEntry>,
    /// The last entry of the log, or the purge mark once the purge has passed every
    /// entry (`None`: an empty log never purged).
    last: Option<LogPos>,
    /// The sequence of the last entry given to the writer (where its next append must
    /// start, less one).
    written: u64,
    purged: Option<LogPos>,
    vote: Option<RaftVote>,
    committed: Option<LogId>,
    /// Counts the cuts and purges begun: a read from disk that saw it change meanwhile
    /// may hold entries from both sides of one, and is done again.
    cuts: u64,
}

fn other(err: impl std::fmt::Display) -> io::Error {
    io::Error::other(err.to_string())
}

impl ClusterLog {
    /// Opens a cluster node's log: reads its vote, its purge mark, its last entry and its
    /// committed mark, and starts its writer after the last entry. Returns the writer's
    /// thread (joined by whoever shuts the log down, `handle().shutdown()`).
    pub fn open(log: Log) -> Result<(ClusterLog, JoinHandle<()>), OpenError> {
        let reader = log.reader();
        let purged = reader.purged()?;
        let last_seq = log.last_seq()?;
        let last = match purged {
            Some(mark) if mark.seq >= last_seq => Some(mark),
            _ => entry_at(&reader, last_seq)?,
        };
        // A vote that verifies but names no node (never written by this module).
        let vote = log.vote()?.map(|v| vote_from_stored(&v)).transpose();
        let vote = vote.map_err(|source| OpenError::Io {
            path: log.dir().join("vote").display().to_string(),
            source,
        })?;
        let committed = match log.committed()? {
            0 => None,
            seq => match purged {
                Some(mark) if mark.seq >= seq => Some(mark),
                _ => entry_at(&reader, seq)?,
            },
        };
        let (handle, join) = log.start_writer(last_seq + 1)?;
        let tail = Tail {
            entries: VecDeque::new(),
            last,
            written: last_seq,
            purged,
            vote,
            committed: committed.map(log_id_of),
            cuts: 0,
        };
        let shared = Shared {
            handle,
            reader,
            tail: Mutex::new(tail),
            snapshots: None,
        };
        Ok((
            ClusterLog {
                shared: Arc::new(shared),
            },
            join,
        ))
    }

    /// `open`, with purges bounded by the snapshots kept in `snapshots` (a cluster node's
    /// snapshot directory): the log is never purged past the oldest of them, so that the
    /// newest snapshot that verifies, or failing it an older one, plus the log after it
    /// always rebuilds the state.
    pub fn open_bounded(
        log: Log,
        snapshots: &std::path::Path,
    ) -> Result<(ClusterLog, JoinHandle<()>), OpenError> {
        let (log, writer) = ClusterLog::open(log)?;
        let Shared {
            handle,
            reader,
            tail,
            ..
        } = Arc::into_inner(log.shared).expect("a log just opened has one owner");
        let shared = Shared {
            handle,
            reader,
            tail,
            snapshots: Some(snapshots.to_path_buf()),
        };
        Ok((
            ClusterLog {
                shared: Arc::new(shared),
            },
            writer,
        ))
    }

    /// Where a purge the engine asks for through `wanted` may go: through `wanted`, or
    /// through the oldest kept snapshot if that is before it (`None`: not at all, no
    /// snapshot being kept, or the bound already purged).
    async fn purge_bound(&self, wanted: LogPos) -> io::Result<Option<LogPos>> {
        let Some(dir) = self.shared.snapshots.clone() else {
            return Ok(Some(wanted));
        };
        // Past the end of the log: the engine installed a snapshot that covers all of it
        // (the only one kept then), and the log continues after it.
        if wanted.seq > self.tail().written {
            return Ok(Some(wanted));
        }
        let listed = tokio::task::spawn_blocking(move || crate::storage::snapshot::list(&dir))
            .await
            .map_err(other)?;
        let oldest = match listed {
            Ok(files) => files.last().map(|(seq, _)| *seq),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        let Some(oldest) = oldest else {
            tracing::debug!(
                wanted = wanted.seq,
                "no snapshot kept: the log is not purged"
            );
            return Ok(None);
        };
        if oldest >= wanted.seq {
            return Ok(Some(wanted));
        }
        if self.tail().purged.is_some_and(|p| p.seq >= oldest) {
            return Ok(None);
        }
        // The term of the entry the oldest snapshot ends at: in the log, since nothing
        // past the purge mark is purged.
        let entries = self
            .clone()
            .try_get_log_entries(index_of(oldest)..index_of(oldest) + 1)
            .await?;
        match entries.first() {
            Some(entry) => {
                tracing::debug!(
                    wanted = wanted.seq,
                    bound = oldest,
                    "the log is purged only through the oldest snapshot kept"
                );
                Ok(Some(pos_of(&entry.log_id)))
            }
            None => Err(other(format!(
                "the oldest snapshot kept ends at {oldest}, which the log does not hold"
            ))),
        }
    }

    /// A reader of the log (start-up's recovery, the snapshot worker's feed).
    pub fn reader(&self) -> &LogReader {
        &self.shared.reader
    }

    /// The sequence of the last entry this node knows to be committed (0: none).
    pub fn committed_seq(&self) -> u64 {
        self.tail().committed.map_or(0, |id| pos_of(&id).seq)
    }

    /// The log's writer (its shutdown, its durable sequence, its test hooks).
    pub fn handle(&self) -> &LogHandle {
        &self.shared.handle
    }

    fn tail(&self) -> MutexGuard<'_, Tail> {
        self.shared.tail.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Entries `from..to` (indexes) from disk, on a blocking thread.
    async fn read_stored(&self, from: u64, to: u64) -> io::Result<Vec<RaftEntry>> {
        let reader = self.shared.reader.clone();
        let read = move || -> io::Result<Vec<RaftEntry>> {
            let mut out = Vec::new();
            for stored in reader.entries_after(seq_of(from) - 1) {
                let stored = stored.map_err(other)?;
                let index = index_of(stored.pos.seq);
                if index >= to {
                    break;
                }
                // A purge may have removed the front meanwhile (what is missing at the
                // start was purged); anything else missing is a hole.
                let expected = from + out.len() as u64;
                if !out.is_empty() && index != expected {
                    return Err(other(format!(
                        "the log holds entry {} where {} was expected",
                        stored.pos.seq,
                        seq_of(expected)
                    )));
                }
                out.push(raft_entry_of(stored)?);
            }
            Ok(out)
        };
        tokio::task::spawn_blocking(read).await.map_err(other)?
    }
}

/// The position of the entry at `seq` in the log (`None` for 0).
fn entry_at(reader: &LogReader, seq: u64) -> Result<Option<LogPos>, OpenError> {
    if seq == 0 {
        return Ok(None);
    }
    match reader.entries_after(seq - 1).next() {
        Some(Ok(entry)) if entry.pos.seq == seq => Ok(Some(entry.pos)),
        Some(Err(err)) => Err(err),
        _ => Err(OpenError::Io {
            path: format!("log entry {seq}"),
            source: io::Error::other("the log has no entry there"),
        }),
    }
}

/// `range` as indexes `[start, end)`.
fn bounds(range: &impl RangeBounds<u64>) -> (u64, u64) {
    let start = match range.start_bound() {
        Bound::Included(&i) => i,
        Bound::Excluded(&i) => i.saturating_add(1),
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(&i) => i.saturating_add(1),
        Bound::Excluded(&i) => i,
        Bound::Unbounded => u64::MAX,
    };
    (start, end)
}

impl RaftLogReader<Tc> for ClusterLog {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<RaftEntry>, io::Error> {
        let (start, end) = bounds(&range);
        // What the tail holds is taken under its lock; what is older comes from disk. A
        // cut or a purge while the disk is read could mix entries from before and after
        // it (a cut reaches the disk only below the tail's 8,192 flushed entries): the
        // read is then done again, on the log as it is after it.
        for _ in 0..READ_ATTEMPTS {
            let (cuts, disk, from_tail) = match self.plan_read(start, end) {
                None => return Ok(Vec::new()),
                Some(plan) => plan,
            };
            let read = if disk.is_empty() {
                Ok(Vec::new())
            } else {
                self.read_stored(disk.start, disk.end).await
            };
            // A read that failed because entries went meanwhile is done again too.
            if disk.is_empty() || self.tail().cuts == cuts {
                let mut entries = read?;
                entries.extend(from_tail);
                return Ok(entries);
            }
        }
        Err(other(format!(
            "entries {start}..{end} changed under {READ_ATTEMPTS} reads (cut or purged)"
        )))
    }

    async fn read_vote(&mut self) -> Result<Option<RaftVote>, io::Error> {
        Ok(self.tail().vote)
    }
}

/// Reads of `try_get_log_entries` before it gives up on a log being cut under it.
const READ_ATTEMPTS: usize = 8;

impl ClusterLog {
    /// What a read of indexes `start..end` takes from disk and what from the tail, with
    /// the count of cuts it was planned at (`None`: nothing in the range).
    fn plan_read(
        &self,
        start: u64,
        end: u64,
    ) -> Option<(u64, std::ops::Range<u64>, Vec<RaftEntry>)> {
        let tail = self.tail();
        let floor = tail.purged.map_or(0, |p| index_of(p.seq) + 1);
        let after_last = tail.last.map_or(0, |p| index_of(p.seq) + 1);
        let (start, end) = (start.max(floor), end.min(after_last));
        if start >= end {
            return None;
        }
        let tail_first = tail.entries.front().map_or(after_last, |e| e.log_id.index);
        let skip = start.saturating_sub(tail_first) as usize;
        let take = end.saturating_sub(start.max(tail_first)) as usize;
        let from_tail: Vec<RaftEntry> =
            tail.entries.iter().skip(skip).take(take).cloned().collect();
        Some((tail.cuts, start..end.min(tail_first), from_tail))
    }
}

impl RaftLogStorage<Tc> for ClusterLog {
    type LogReader = ClusterLog;

    async fn get_log_state(&mut self) -> Result<LogState<Tc>, io::Error> {
        let tail = self.tail();
        Ok(LogState {
            last_purged_log_id: tail.purged.map(log_id_of),
            last_log_id: tail.last.map(log_id_of),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &RaftVote) -> Result<(), io::Error> {
        let ticket = self.shared.handle.save_vote(vote_to_stored(vote));
        ticket.durable().await.map_err(other)?;
        self.tail().vote = Some(*vote);
        Ok(())
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        if let Some(log_id) = committed {
            self.shared.handle.save_committed(seq_of(log_id.index));
            self.tail().committed = Some(log_id);
        }
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        Ok(self.tail().committed)
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<Tc>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = RaftEntry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<RaftEntry> = entries.into_iter().collect();
        let Some(first) = entries.first().map(|e| e.log_id) else {
            callback.io_completed(Ok(()));
            return Ok(());
        };
        let mut tail = self.tail();
        let next = tail.last.map_or(0, |p| index_of(p.seq) + 1);
        let consecutive = entries
            .iter()
            .enumerate()
            .all(|(i, e)| e.log_id.index == first.index + i as u64);
        if first.index != next || seq_of(first.index) != tail.written + 1 || !consecutive {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "entries appended from index {} do not continue the log, whose next index is \
                     {next} (written through sequence {})",
                    first.index, tail.written
                ),
            ));
        }
        let stored = entries.iter().map(new_entry).collect();
        let last = pos_of(&entries[entries.len() - 1].log_id);
        tail.entries.extend(entries);
        tail.last = Some(last);
        tail.written = last.seq;
        // Sent under the tail's lock: the writer's queue has the appends in log order.
        self.shared.handle.append_entries(
            seq_of(first.index),
            stored,
            Box::new(move |flushed| callback.io_completed(flushed.map(|_| ()).map_err(other))),
        );
        // Flushed entries beyond the newest `TAIL_FLUSHED_KEEP` leave the tail (they are
        // read from disk from then on); unflushed ones never do.
        let durable = self.shared.handle.durable_seq();
        let unflushed = last.seq.saturating_sub(durable) as usize;
        while tail.entries.len() > TAIL_FLUSHED_KEEP + unflushed {
            tail.entries.pop_front();
        }
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let last = last_log_id.map(|id| pos_of(&id));
        let cut = last.map_or(0, |p| p.seq);
        let ticket = {
            let mut tail = self.tail();
            if tail.last.is_none_or(|l| l.seq <= cut) {
                return Ok(());
            }
            if tail.purged.is_some_and(|p| p.seq > cut) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("cannot cut the log after {cut}: it is purged through it"),
                ));
            }
            tail.cuts += 1;
            while tail
                .entries
                .back()
                .is_some_and(|e| seq_of(e.log_id.index) > cut)
            {
                tail.entries.pop_back();
            }
            tail.last = last.or(tail.purged);
            tail.written = tail.written.min(cut);
            if tail.committed.is_some_and(|c| seq_of(c.index) > cut) {
                tail.committed = last_log_id;
            }
            self.shared.handle.truncate_after(cut)
        };
        ticket.durable().await.map_err(other)?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        let Some(through) = self.purge_bound(pos_of(&log_id)).await? else {
            return Ok(());
        };
        self.tail().cuts += 1;
        let reader = self.shared.reader.clone();
        tokio::task::spawn_blocking(move || reader.purge_through(through))
            .await
            .map_err(other)?
            .map_err(other)?;
        let restart = {
            let mut tail = self.tail();
            if tail.purged.is_none_or(|p| p.seq < through.seq) {
                tail.purged = Some(through);
            }
            while tail
                .entries
                .front()
                .is_some_and(|e| seq_of(e.log_id.index) <= through.seq)
            {
                tail.entries.pop_front();
            }
            if tail.last.is_none_or(|l| l.seq < through.seq) {
                tail.last = Some(through);
            }
            // Past the end of what was written (a snapshot installed that covers more
            // than this log): the writer numbers the next entry after the purge mark.
            (tail.written < through.seq).then(|| {
                tail.written = through.seq;
                self.shared.handle.restart(through.seq + 1)
            })
        };
        if let Some(ticket) = restart {
            ticket.durable().await.map_err(other)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use openraft::type_config::TypeConfigExt;

    use super::*;

    fn blank(term: u64, index: u64) -> RaftEntry {
        openraft::Entry {
            log_id: LogId::new_term_index(term, index),
            payload: openraft::EntryPayload::Blank,
        }
    }

    /// Appended entries are readable as soon as `append` returns, while the writer has
    /// not flushed them (it is held); the engine hears of the flush only once the writer
    /// has done it; and then the same entries read back from disk alone, after a restart.
    #[tokio::test]
    async fn entries_are_readable_from_the_tail_before_their_flush() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, writer) = ClusterLog::open(Log::open(dir.path()).unwrap()).unwrap();
        let held = log.handle().hold();
        let (tx, mut flushed) = Tc::oneshot();
        let entries: Vec<RaftEntry> = (0..5).map(|i| blank(1, i)).collect();
        log.append(entries.clone(), IOFlushed::signal(tx))
            .await
            .unwrap();
        assert_eq!(log.try_get_log_entries(..).await.unwrap(), entries);
        assert_eq!(log.try_get_log_entries(2..4).await.unwrap(), entries[2..4]);
        assert_eq!(log.handle().durable_seq(), 0);
        assert!(flushed.try_recv().is_err(), "not flushed yet");
        drop(held);
        flushed.await.unwrap().unwrap();
        assert_eq!(log.handle().durable_seq(), 5);
        log.handle().shutdown().await.unwrap();
        drop(log);
        writer.join().unwrap();
        let (mut log, _writer) = ClusterLog::open(Log::open(dir.path()).unwrap()).unwrap();
        assert_eq!(log.try_get_log_entries(..).await.unwrap(), entries);
        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_log_id, Some(LogId::new_term_index(1, 4)));
    }

    async fn append(log: &mut ClusterLog, entries: Vec<RaftEntry>) {
        let (tx, flushed) = Tc::oneshot();
        log.append(entries, IOFlushed::signal(tx)).await.unwrap();
        flushed.await.unwrap().unwrap();
    }

    /// Stops the log's writer and waits for its thread, so that the directory can be
    /// opened again.
    async fn close(log: ClusterLog, writer: JoinHandle<()>) {
        log.handle().shutdown().await.unwrap();
        drop(log);
        writer.join().unwrap();
    }

    /// What the engine reads at start-up comes back after a restart: the purge mark with
    /// its term, the last entry, the vote and the committed mark; reads start after the
    /// purge, and appends continue after the last entry. A purge past the last entry
    /// makes the purge mark the log's end.
    #[tokio::test]
    async fn a_reopened_log_keeps_its_purge_last_entry_vote_and_committed_mark() {
        let dir = tempfile::tempdir().unwrap();
        let open = || ClusterLog::open(Log::open(dir.path()).unwrap()).unwrap();
        let (mut log, writer) = open();
        append(&mut log, (0..3).map(|i| blank(1, i)).collect()).await;
        append(&mut log, (3..10).map(|i| blank(2, i)).collect()).await;
        let vote = RaftVote::new_committed(2, 3);
        log.save_vote(&vote).await.unwrap();
        log.save_committed(Some(LogId::new_term_index(2, 8)))
            .await
            .unwrap();
        log.purge(LogId::new_term_index(1, 2)).await.unwrap();
        close(log, writer).await;

        let (mut log, writer) = open();
        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id, Some(LogId::new_term_index(1, 2)));
        assert_eq!(state.last_log_id, Some(LogId::new_term_index(2, 9)));
        assert_eq!(log.read_vote().await.unwrap(), Some(vote));
        assert_eq!(
            log.read_committed().await.unwrap(),
            Some(LogId::new_term_index(2, 8))
        );
        let entries = log.try_get_log_entries(..).await.unwrap();
        assert_eq!(entries, (3..10).map(|i| blank(2, i)).collect::<Vec<_>>());
        append(&mut log, vec![blank(3, 10)]).await;
        log.purge(LogId::new_term_index(4, 20)).await.unwrap();
        close(log, writer).await;

        let (mut log, _writer) = open();
        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id, Some(LogId::new_term_index(4, 20)));
        assert_eq!(state.last_log_id, Some(LogId::new_term_index(4, 20)));
        assert!(log.try_get_log_entries(..).await.unwrap().is_empty());
    }

    /// A single server's log (records, not entries) is not a cluster node's.
    #[tokio::test]
    async fn a_single_servers_log_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (handle, writer) = Log::open(dir.path()).unwrap().start_writer(1).unwrap();
        let record = crate::storage::record::Record::ProductDeleted {
            sku: "A".into(),
            at: 1,
            by: None,
        };
        handle.append(record).durable().await.unwrap();
        handle.shutdown().await.unwrap();
        writer.join().unwrap();
        let refused = ClusterLog::open(Log::open(dir.path()).unwrap());
        assert!(matches!(refused, Err(OpenError::NotAnEntry { seq: 1 })));
    }

    /// An append that does not continue the log is refused and changes nothing.
    #[tokio::test]
    async fn an_append_that_leaves_a_hole_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _writer) = ClusterLog::open(Log::open(dir.path()).unwrap()).unwrap();
        for (first, len) in [(1, 2), (0, 0)] {
            let entries: Vec<RaftEntry> = (first..first + len).map(|i| blank(1, i)).collect();
            let (tx, flushed) = Tc::oneshot();
            let appended = log.append(entries, IOFlushed::signal(tx)).await;
            if len == 0 {
                appended.unwrap();
                flushed.await.unwrap().unwrap();
            } else {
                let err = appended.expect_err("a hole");
                assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
            }
        }
        let (tx, flushed) = Tc::oneshot();
        log.append([blank(1, 0)], IOFlushed::signal(tx))
            .await
            .unwrap();
        flushed.await.unwrap().unwrap();
        assert!(log.handle().is_healthy());
        assert_eq!(log.try_get_log_entries(..).await.unwrap(), [blank(1, 0)]);
    }
}
