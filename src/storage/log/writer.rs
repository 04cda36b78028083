//! The hot path: the handle every actor appends through, the tickets that resolve once a
//! record is flushed, and the writer thread's group commit.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::limits::LOG_BATCH_RECORDS_MAX;
use crate::storage::entry::Vote;
use crate::storage::record::Record;

use super::batch::{BatchBuilder, NewEntry};

use super::*;

/// Resolves when the record it stands for is durable (or the log has failed).
#[must_use = "a change is acknowledged only once its ticket resolves"]
pub struct Ticket(oneshot::Receiver<Result<u64, LogError>>);

impl Ticket {
    /// A ticket and the sender that resolves it, for journals other than the local log
    /// (a cluster leader's `Proposer`).
    pub(crate) fn pending() -> (oneshot::Sender<Result<u64, LogError>>, Ticket) {
        let (tx, rx) = oneshot::channel();
        (tx, Ticket(rx))
    }

    /// A ticket already failed with `err` (a journal that stores nothing: a cluster node
    /// that does not serve).
    pub(crate) fn refused(err: LogError) -> Ticket {
        let (tx, rx) = oneshot::channel();
        let _ = tx.send(Err(err));
        Ticket(rx)
    }

    /// Waits until the record is flushed; returns its sequence number.
    pub async fn durable(self) -> Result<u64, LogError> {
        match self.0.await {
            Ok(result) => result,
            Err(_) => Err(LogError::Unavailable("the log writer stopped".into())),
        }
    }
}

/// Called by the writer once Raft entries are on disk (after the flush and `sync_blobs`),
/// with the sequence number of the last one, or with the error that failed the log.
pub type Flushed = Box<dyn FnOnce(Result<u64, LogError>) + Send>;

/// Raft entries to store, numbered from `first` (which must be the log's next sequence
/// when the writer reaches them).
pub(super) struct EntryAppend {
    first: u64,
    entries: Vec<NewEntry>,
    flushed: Flushed,
}

pub(super) enum Command {
    Append(Record, Option<oneshot::Sender<Result<u64, LogError>>>),
    /// A cluster node's Raft entries, group-committed like records (boxed: the queue's
    /// slots stay the size they were for records).
    AppendEntries(Box<EntryAppend>),
    /// Drops every record or entry after this sequence, once everything queued before it
    /// is written.
    TruncateAfter(u64, oneshot::Sender<Result<u64, LogError>>),
    /// Numbers what comes next from this sequence, past a purge mark that passed the
    /// log's end (a snapshot installed), once everything queued before it is written.
    Restart(u64, oneshot::Sender<Result<u64, LogError>>),
    /// Resolves once every command queued before it has been flushed.
    Barrier(oneshot::Sender<Result<u64, LogError>>),
    /// Saves a cluster node's vote once every record queued before it is flushed.
    SaveVote(Vote, oneshot::Sender<Result<u64, LogError>>),
    Shutdown(oneshot::Sender<Result<u64, LogError>>),
    /// Test hook: the writer takes nothing more until the sender is dropped (`hold`).
    Hold(std::sync::mpsc::Receiver<()>),
}

/// Cheap to clone; every actor that logs holds one.
#[derive(Clone)]
pub struct LogHandle {
    tx: mpsc::Sender<Command>,
    /// Test hook: a batch holding a record at or past this sequence fails (`u64::MAX`: none).
    fail_from: Arc<AtomicU64>,
    /// Set by the writer when a write fails; the log then refuses everything.
    failed: Arc<AtomicBool>,
    /// Sequence number of the last flushed record.
    durable: Arc<AtomicU64>,
    /// The highest sequence a cluster node was told is committed (`save_committed`).
    committed: Arc<AtomicU64>,
    counters: Arc<WriterCounters>,
}

/// What the writer has done since it started, kept by the writer for `stats`.
#[derive(Default)]
pub(super) struct WriterCounters {
    batches: AtomicU64,
    records: AtomicU64,
    write_ns: AtomicU64,
    blob_files_synced: AtomicU64,
}

/// The log's figures for operators (`GET /metrics`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogStats {
    /// Sequence number of the last flushed record.
    pub durable_seq: u64,
    /// Group commits since start: records written and flushed together.
    pub batches: u64,
    /// Records written since start.
    pub records: u64,
    /// Time spent writing and flushing those batches, in nanoseconds.
    pub write_ns: u64,
    /// Files sled wrote under a segment's `blobs/` that the writer fsynced (`sync_blobs`).
    pub blob_files_synced: u64,
    /// False once a write has failed.
    pub healthy: bool,
}

impl LogHandle {
    /// Queues `record`; the returned ticket resolves when it is durable.
    pub fn append(&self, record: Record) -> Ticket {
        let (tx, rx) = oneshot::channel();
        if let Err(mpsc::SendError(Command::Append(_, Some(tx)))) =
            self.tx.send(Command::Append(record, Some(tx)))
        {
            let _ = tx.send(Err(LogError::Unavailable("the log writer stopped".into())));
        }
        Ticket(rx)
    }

    /// A ticket that resolves once everything queued so far is durable, with the sequence
    /// number of the last record queued before it. Used when an answer repeats an earlier
    /// change (an idempotent replay, a repeated confirm) whose own record may still be in
    /// flight, and to know exactly which records a read of the log must include.
    pub fn barrier(&self) -> Ticket {
        let (tx, rx) = oneshot::channel();
        if let Err(mpsc::SendError(Command::Barrier(tx))) = self.tx.send(Command::Barrier(tx)) {
            let _ = tx.send(Err(LogError::Unavailable("the log writer stopped".into())));
        }
        Ticket(rx)
    }

    /// Saves a cluster node's `vote` durably (`DIR/log/vote`), after every record queued
    /// before it is flushed and before any queued after it is written: the engine needs
    /// vote and log IO in one order. The ticket resolves once the file is synced, with
    /// the sequence number of the last record queued before it; a failed log saves no
    /// vote, and a vote that cannot be saved fails the log like a failed write.
    pub fn save_vote(&self, vote: Vote) -> Ticket {
        let (tx, rx) = oneshot::channel();
        if let Err(mpsc::SendError(Command::SaveVote(_, tx))) =
            self.tx.send(Command::SaveVote(vote, tx))
        {
            let _ = tx.send(Err(LogError::Unavailable("the log writer stopped".into())));
        }
        Ticket(rx)
    }

    /// Queues a cluster node's Raft `entries`, numbered from `first`: stored as batches of
    /// entries (`0x82`) in the same group commit as everything else queued, and `flushed`
    /// is called only once they are on disk (after sled's flush and `sync_blobs`), with
    /// the last one's sequence number; or with `Err` if the log has failed or fails
    /// writing them (nothing is written after that). `first` must be the log's next
    /// sequence number when the writer reaches them: any other fails the log, since the
    /// caller's idea of the log is then wrong. Returns at once.
    pub fn append_entries(&self, first: u64, entries: Vec<NewEntry>, flushed: Flushed) {
        let append = Box::new(EntryAppend {
            first,
            entries,
            flushed,
        });
        if let Err(mpsc::SendError(Command::AppendEntries(append))) =
            self.tx.send(Command::AppendEntries(append))
        {
            (append.flushed)(Err(LogError::Unavailable("the log writer stopped".into())));
        }
    }

    /// Drops every record or entry after `last` (a cluster node's uncommitted tail), once
    /// everything queued before it is written; what is queued after it is numbered from
    /// `last + 1`. Newest first, a batch holding the cut rewritten last, then flushed (as
    /// `Log::truncate_from`): a crash at any point leaves a log without a hole. The ticket
    /// resolves with the log's last sequence number afterwards (`last`, or the log's end
    /// if that is before it). Refused without harm for a `last` the front of the log was
    /// already truncated past; a failure while cutting fails the log like a failed write.
    pub fn truncate_after(&self, last: u64) -> Ticket {
        let (tx, rx) = oneshot::channel();
        if let Err(mpsc::SendError(Command::TruncateAfter(_, tx))) =
            self.tx.send(Command::TruncateAfter(last, tx))
        {
            let _ = tx.send(Err(LogError::Unavailable("the log writer stopped".into())));
        }
        Ticket(rx)
    }

    /// Numbers the next entry `next_seq`, after a purge that passed the end of the log (a
    /// cluster node that installed a snapshot covering more than its log: the engine
    /// purges through the snapshot, then appends after it). Run like a cut, after what is
    /// queued before it and before anything queued after it. Refused without harm unless
    /// the front of the log is purged through `next_seq - 1` (so the log shows no hole)
    /// and `next_seq` is past the log's end. The ticket resolves with `next_seq - 1`, the
    /// log's last sequence from then on. A restarted writer does the same by itself: a
    /// log's end is never before its purge mark (`Log::last_seq`).
    pub fn restart(&self, next_seq: u64) -> Ticket {
        let (tx, rx) = oneshot::channel();
        if let Err(mpsc::SendError(Command::Restart(_, tx))) =
            self.tx.send(Command::Restart(next_seq, tx))
        {
            let _ = tx.send(Err(LogError::Unavailable("the log writer stopped".into())));
        }
        Ticket(rx)
    }

    /// Records that a cluster node's log is committed through `seq` (never lowered).
    /// With each later batch, the writer writes `DIR/log/committed` = min(`seq`, the
    /// durable sequence) by a temporary file and a rename, without fsync: only a lower
    /// bound for start-up (`Log::committed`), which a stale value leaves safe and one
    /// beyond the durable log would not. Returns at once.
    pub fn save_committed(&self, seq: u64) {
        self.committed.fetch_max(seq, Ordering::SeqCst);
    }

    /// Sequence number of the last record known to be flushed (0 if none).
    pub fn durable_seq(&self) -> u64 {
        self.durable.load(Ordering::SeqCst)
    }

    /// Flushes everything queued and stops the writer. Later appends fail.
    pub async fn shutdown(&self) -> Result<u64, LogError> {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Command::Shutdown(tx)).is_err() {
            return Ok(0);
        }
        Ticket(rx).durable().await
    }

    /// The log's figures since start.
    pub fn stats(&self) -> LogStats {
        LogStats {
            durable_seq: self.durable_seq(),
            batches: self.counters.batches.load(Ordering::Relaxed),
            records: self.counters.records.load(Ordering::Relaxed),
            write_ns: self.counters.write_ns.load(Ordering::Relaxed),
            blob_files_synced: self.counters.blob_files_synced.load(Ordering::Relaxed),
            healthy: self.is_healthy(),
        }
    }

    /// False once a write has failed: the server then refuses every mutation with 503.
    pub fn is_healthy(&self) -> bool {
        !self.failed.load(Ordering::SeqCst)
    }

    /// Test hook: the writer takes no command queued after this one until the returned
    /// sender is dropped, so that what is appended meanwhile forms one group commit
    /// whatever the machine's load (up to the batch limit).
    #[doc(hidden)]
    pub fn hold(&self) -> std::sync::mpsc::Sender<()> {
        let (release, held) = std::sync::mpsc::channel();
        let _ = self.tx.send(Command::Hold(held));
        release
    }

    /// Failure injection for tests: every later write fails as if the disk refused it.
    #[doc(hidden)]
    pub fn inject_write_failure(&self) {
        self.fail_from.store(0, Ordering::SeqCst);
    }

    /// Failure injection for tests: the first batch that holds a record with sequence
    /// `seq` or later fails as if the disk refused it (and so every write after it).
    #[doc(hidden)]
    pub fn inject_write_failure_from(&self, seq: u64) {
        self.fail_from.store(seq, Ordering::SeqCst);
    }
}

impl Log {
    /// Starts the writer thread; the log is then written only through the handle. The
    /// first record written gets `next_seq`.
    pub fn start_writer(
        self,
        next_seq: u64,
    ) -> Result<(LogHandle, thread::JoinHandle<()>), OpenError> {
        let (tx, rx) = mpsc::channel();
        let fail_from = Arc::new(AtomicU64::new(u64::MAX));
        let failed = Arc::new(AtomicBool::new(false));
        let durable = Arc::new(AtomicU64::new(next_seq - 1));
        let committed_written = self.committed()?;
        let committed = Arc::new(AtomicU64::new(committed_written));
        let counters = Arc::new(WriterCounters::default());
        // Appends continue the newest segment, unless it is full (or there is none). A
        // newest segment that starts after `next_seq` was created ahead of need and never
        // written (a crash, or a cut by `truncate_from`): removed, so that no record is
        // ever stored under a later segment's name. Failing that is an error: segments must
        // follow one another, or truncation and readers would misjudge where one ends.
        let current = open_newest(&self.segments, next_seq)?;
        let writer = Writer {
            failed_flag: failed.clone(),
            durable: durable.clone(),
            committed: committed.clone(),
            committed_written,
            counters: counters.clone(),
            segments: self.segments,
            current,
            preparing: None,
            segment_records: self.segment_records,
            flush_interval: self.flush_interval,
            next_seq,
            failed: None,
            fail_from: fail_from.clone(),
            builder: BatchBuilder::default(),
            synced_blobs: BTreeSet::new(),
            #[cfg(test)]
            trace: self.trace,
        };
        let join = thread::Builder::new()
            .name("stockd-log-writer".into())
            .spawn(move || writer.run(rx))
            .expect("spawning the log writer thread");
        Ok((
            LogHandle {
                tx,
                fail_from,
                failed,
                durable,
                committed,
                counters,
            },
            join,
        ))
    }
}

/// The segment appends continue: the newest, unless it is full (or there is none). A
/// newest segment that starts after `next_seq` was created ahead of need and never written
/// (a crash, or a cut by `truncate_from`): removed, so that no record is ever stored under
/// a later segment's name. Failing that is an error: segments must follow one another, or
/// truncation and readers would misjudge where one ends.
fn open_newest(segments: &Segments, next_seq: u64) -> Result<Option<SegmentRef>, OpenError> {
    while let Some(slot) = segments.list().pop() {
        let Some(segment) = open_segment(&slot)? else {
            break;
        };
        if slot.first > next_seq && segment.db().is_empty() {
            drop(segment);
            segments.remove(slot.first)?;
            continue;
        }
        return Ok(Some(segment));
    }
    Ok(None)
}

/// Test hook: what the writer did, in order, for tests of when it acknowledges.
#[cfg(test)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Step {
    /// A segment's part of a batch was flushed by sled, through this sequence.
    Flushed(u64),
    /// `sync_blobs` returned after that flush, through this sequence.
    BlobsSynced(u64),
    /// Something outside the writer heard that the log is durable through this sequence
    /// (pushed by the tests' own callbacks).
    Acknowledged(u64),
}

#[cfg(test)]
pub(super) type Trace = Arc<std::sync::Mutex<Vec<Step>>>;

/// What ends the collection of a batch: a command run once the batch is written, or one
/// of the other kind (a record after entries, entries after records), held for the next.
pub(super) enum Stop {
    Vote(Vote, Waiter),
    Truncate(u64, Waiter),
    Restart(u64, Waiter),
    Held(Command),
}

/// What the writer stores: records, or a cluster node's Raft entries, each kind in batch
/// values of its own.
pub(super) trait Framed: Sized {
    /// Encodes items from the front of `items` (numbered from `first`) into one batch
    /// value; returns it and how many items it holds.
    fn fill<'b>(builder: &'b mut BatchBuilder, first: u64, items: &[Self]) -> (&'b [u8], usize);
}

impl Framed for (Record, Option<Waiter>) {
    fn fill<'b>(builder: &'b mut BatchBuilder, first: u64, items: &[Self]) -> (&'b [u8], usize) {
        builder.fill(first, items)
    }
}

impl Framed for NewEntry {
    fn fill<'b>(builder: &'b mut BatchBuilder, first: u64, items: &[Self]) -> (&'b [u8], usize) {
        builder.fill_entries(first, items)
    }
}

pub(super) struct Writer {
    pub(super) segments: Arc<Segments>,
    /// The segment being appended to.
    pub(super) current: Option<SegmentRef>,
    /// The next segment, being created ahead of need on the segment thread: (its first
    /// sequence, the answer).
    pub(super) preparing: Option<(u64, mpsc::Receiver<Result<SegmentRef, OpenError>>)>,
    pub(super) segment_records: u64,
    pub(super) flush_interval: Duration,
    pub(super) next_seq: u64,
    /// Set on the first failed write; the log never writes again.
    pub(super) failed: Option<LogError>,
    pub(super) failed_flag: Arc<AtomicBool>,
    pub(super) fail_from: Arc<AtomicU64>,
    pub(super) durable: Arc<AtomicU64>,
    pub(super) committed: Arc<AtomicU64>,
    /// What `DIR/log/committed` holds (as far as this writer knows).
    pub(super) committed_written: u64,
    pub(super) counters: Arc<WriterCounters>,
    /// Encodes each batch value (its buffer is kept from one batch to the next).
    pub(super) builder: BatchBuilder,
    /// The files under the current segment's `blobs/` already fsynced.
    pub(super) synced_blobs: BTreeSet<OsString>,
    #[cfg(test)]
    pub(super) trace: Option<Trace>,
}

pub(super) type Waiter = oneshot::Sender<Result<u64, LogError>>;

impl Writer {
    pub(super) fn run(mut self, rx: mpsc::Receiver<Command>) {
        let mut records: Vec<(Record, Option<Waiter>)> = Vec::with_capacity(LOG_BATCH_RECORDS_MAX);
        // A cluster node's entries, and each append's callback with the number of this
        // batch's entries up to its end. A batch holds records or entries, never both.
        let mut entries: Vec<NewEntry> = Vec::new();
        let mut appends: Vec<(Flushed, u64, u64)> = Vec::new();
        // Each barrier with the number of this batch's records (or entries) queued before it.
        let mut barriers: Vec<(Waiter, u64)> = Vec::new();
        let mut held = None;
        let mut last_flush = Instant::now();
        loop {
            let mut shutdown = None;
            let mut stop = None;
            // Block for the first command, then take whatever else is already queued, up to
            // a shutdown (which must see exactly the records before it), a vote or a cut
            // (run after the records before it, before any after it), or a command of the
            // other kind than the batch's (held for the next batch).
            let first = match held.take() {
                Some(cmd) => cmd,
                None => match rx.recv() {
                    Ok(cmd) => cmd,
                    Err(_) => return self.finish(None),
                },
            };
            let of_entries = matches!(first, Command::AppendEntries(_));
            if of_entries {
                let lists = (&mut entries, &mut appends, &mut barriers);
                Self::take_entries(first, lists, &mut shutdown, &mut stop);
            } else {
                self.take(first, &mut records, &mut barriers, &mut shutdown, &mut stop);
            }
            let since = last_flush.elapsed();
            if shutdown.is_none() && stop.is_none() && since < self.flush_interval {
                thread::sleep(self.flush_interval - since);
            }
            last_flush = Instant::now();
            if of_entries {
                while shutdown.is_none() && stop.is_none() && entries.len() < LOG_BATCH_RECORDS_MAX
                {
                    let Ok(cmd) = rx.try_recv() else { break };
                    let lists = (&mut entries, &mut appends, &mut barriers);
                    Self::take_entries(cmd, lists, &mut shutdown, &mut stop);
                }
            } else {
                while shutdown.is_none() && stop.is_none() && records.len() < LOG_BATCH_RECORDS_MAX
                {
                    match rx.try_recv() {
                        Ok(cmd) => {
                            self.take(cmd, &mut records, &mut barriers, &mut shutdown, &mut stop)
                        }
                        Err(_) => break,
                    }
                }
            }
            let first_seq = self.next_seq;
            let started = Instant::now();
            let (outcome, written) = if of_entries {
                (self.write_entries(&entries, &appends), entries.len())
            } else {
                (self.write_batch(&records), records.len())
            };
            if let Ok(last) = outcome {
                self.durable.store(last, Ordering::SeqCst);
                self.write_committed(last);
                if written > 0 {
                    let c = &self.counters;
                    c.batches.fetch_add(1, Ordering::Relaxed);
                    c.records.fetch_add(written as u64, Ordering::Relaxed);
                    let ns = started.elapsed().as_nanos().min(u128::from(u64::MAX)) as u64;
                    c.write_ns.fetch_add(ns, Ordering::Relaxed);
                }
            }
            for (i, (_, waiter)) in records.drain(..).enumerate() {
                if let Some(waiter) = waiter {
                    let _ = waiter.send(outcome.clone().map(|_| first_seq + i as u64));
                }
            }
            // The one place a cluster node's entries are reported on disk: after the
            // flush and `sync_blobs` of every segment they went to (`write_entries`).
            entries.clear();
            for (flushed, _, end) in appends.drain(..) {
                flushed(outcome.clone().map(|_| first_seq - 1 + end));
            }
            for (waiter, before) in barriers.drain(..) {
                let _ = waiter.send(outcome.clone().map(|_| first_seq - 1 + before));
            }
            match stop {
                Some(Stop::Vote(vote, waiter)) => {
                    let saved = outcome.and_then(|last| self.save_vote(&vote).map(|()| last));
                    let _ = waiter.send(saved);
                }
                Some(Stop::Truncate(last, waiter)) => {
                    let cut = outcome.and_then(|_| self.truncate_after(last));
                    let _ = waiter.send(cut);
                }
                Some(Stop::Restart(next, waiter)) => {
                    let restarted = outcome.and_then(|_| self.restart(next));
                    let _ = waiter.send(restarted);
                }
                Some(Stop::Held(cmd)) => held = Some(cmd),
                None => {}
            }
            if shutdown.is_some() {
                return self.finish(shutdown);
            }
        }
    }

    pub(super) fn take(
        &self,
        cmd: Command,
        records: &mut Vec<(Record, Option<Waiter>)>,
        barriers: &mut Vec<(Waiter, u64)>,
        shutdown: &mut Option<Waiter>,
        stop: &mut Option<Stop>,
    ) {
        match cmd {
            Command::Append(record, waiter) => records.push((record, waiter)),
            Command::Barrier(waiter) => barriers.push((waiter, records.len() as u64)),
            Command::Shutdown(waiter) => *shutdown = Some(waiter),
            Command::SaveVote(v, waiter) => *stop = Some(Stop::Vote(v, waiter)),
            Command::TruncateAfter(last, waiter) => *stop = Some(Stop::Truncate(last, waiter)),
            Command::Restart(next, waiter) => *stop = Some(Stop::Restart(next, waiter)),
            cmd @ Command::AppendEntries(_) => *stop = Some(Stop::Held(cmd)),
            // Blocks this thread until released (a test's sender dropped).
            Command::Hold(held) => while held.recv().is_ok() {},
        }
    }

    /// `take` for a batch of entries: a record is held for the next batch.
    #[allow(clippy::type_complexity)]
    fn take_entries(
        cmd: Command,
        (entries, appends, barriers): (
            &mut Vec<NewEntry>,
            &mut Vec<(Flushed, u64, u64)>,
            &mut Vec<(Waiter, u64)>,
        ),
        shutdown: &mut Option<Waiter>,
        stop: &mut Option<Stop>,
    ) {
        match cmd {
            Command::AppendEntries(append) => {
                let EntryAppend {
                    first,
                    entries: new,
                    flushed,
                } = *append;
                entries.extend(new);
                appends.push((flushed, first, entries.len() as u64));
            }
            Command::Barrier(waiter) => barriers.push((waiter, entries.len() as u64)),
            Command::Shutdown(waiter) => *shutdown = Some(waiter),
            Command::SaveVote(v, waiter) => *stop = Some(Stop::Vote(v, waiter)),
            Command::TruncateAfter(last, waiter) => *stop = Some(Stop::Truncate(last, waiter)),
            Command::Restart(next, waiter) => *stop = Some(Stop::Restart(next, waiter)),
            cmd @ Command::Append(..) => *stop = Some(Stop::Held(cmd)),
            Command::Hold(held) => while held.recv().is_ok() {},
        }
    }

    /// Writes the committed mark, min(what `save_committed` was told, `durable`), if that
    /// is more than the file holds. A failure is only warned about: the file is a lower
    /// bound, and a stale one is safe.
    fn write_committed(&mut self, durable: u64) {
        let committed = self.committed.load(Ordering::SeqCst).min(durable);
        if committed <= self.committed_written {
            return;
        }
        match write_committed(&self.segments.dir, committed) {
            Ok(()) => self.committed_written = committed,
            Err(err) => tracing::warn!(error = %err, "cannot write the log's committed mark"),
        }
    }

    /// Marks the log failed: nothing is written or acknowledged after `err`.
    fn fail(&mut self, err: LogError) -> LogError {
        tracing::error!(error = %err, "write-ahead log failed; refusing all further writes");
        self.failed = Some(err.clone());
        self.failed_flag.store(true, Ordering::SeqCst);
        err
    }

    /// Writes and flushes one batch of entries (`appends`: each append's first sequence
    /// and where it ends in `entries`), after checking that each append continues the log
    /// where the one before it ends.
    fn write_entries(
        &mut self,
        entries: &[NewEntry],
        appends: &[(Flushed, u64, u64)],
    ) -> Result<u64, LogError> {
        if let Some(err) = &self.failed {
            return Err(err.clone());
        }
        let mut next = self.next_seq;
        for (_, first, end) in appends {
            if *first != next {
                let err =
                    format!("Raft entries appended at {first}, where the log's next is {next}");
                return Err(self.fail(LogError::Unavailable(err)));
            }
            next = self.next_seq + end;
        }
        self.write_batch(entries)
    }

    /// Drops everything after `last` (see `LogHandle::truncate_after`); returns the log's
    /// last sequence afterwards.
    fn truncate_after(&mut self, last: u64) -> Result<u64, LogError> {
        if let Some(err) = &self.failed {
            return Err(err.clone());
        }
        let end = self.next_seq - 1;
        if last >= end {
            return Ok(end);
        }
        let mark = self.segments.mark();
        if last < mark {
            return Err(LogError::Unavailable(format!(
                "cannot cut the log after {last}: its front is truncated through {mark}"
            )));
        }
        // The engine never cuts a committed entry; whatever a caller does, the committed
        // mark never claims more than the log holds: lowered first, so that a crash
        // during the cut leaves it lower, never higher.
        self.committed.fetch_min(last, Ordering::SeqCst);
        if self.committed_written > last {
            if let Err(e) = write_committed(&self.segments.dir, last) {
                let err = format!("lowering the committed mark to {last}: {e}");
                return Err(self.fail(LogError::Unavailable(err)));
            }
            self.committed_written = last;
        }
        // The segment prepared ahead starts after the cut: it goes with the rest, and so
        // does the current one if it starts after it (the writer's references are
        // dropped, so that their directories are deleted).
        if let Some((_, answer)) = self.preparing.take() {
            drop(answer.recv());
        }
        let cut = truncate_segments(&self.segments, last + 1, &mut || true)
            .map_err(|e| LogError::Unavailable(format!("cutting the log after {last}: {e}")));
        if self.current.as_ref().is_some_and(|c| c.first() > last) {
            drop(self.current.take());
        }
        self.synced_blobs.clear();
        if let Err(err) = cut {
            return Err(self.fail(err));
        }
        self.next_seq = last + 1;
        self.durable.store(last, Ordering::SeqCst);
        if self.current.is_none() {
            match open_newest(&self.segments, self.next_seq) {
                Ok(current) => self.current = current,
                Err(e) => return Err(self.fail(LogError::Unavailable(e.to_string()))),
            }
        }
        Ok(last)
    }

    /// Numbers what comes next from `next` (see `LogHandle::restart`); returns the log's
    /// last sequence afterwards, `next - 1`.
    fn restart(&mut self, next: u64) -> Result<u64, LogError> {
        if let Some(err) = &self.failed {
            return Err(err.clone());
        }
        let mark = self.segments.mark();
        if next <= self.next_seq || next > mark.saturating_add(1) {
            return Err(LogError::Unavailable(format!(
                "cannot number the log's next entry {next}: its next is {}, and its front is \
                 purged through {mark}",
                self.next_seq
            )));
        }
        // What is on disk up to the mark is purged; the current segment takes the next
        // entries if they fit its range, else a new one starts at `next` (`try_write`).
        self.next_seq = next;
        self.durable.store(next - 1, Ordering::SeqCst);
        Ok(next - 1)
    }

    /// Writes the vote file (after this batch's records are flushed). A failure is a
    /// failure of the log: nothing is saved or acknowledged after it.
    pub(super) fn save_vote(&mut self, vote: &Vote) -> Result<(), LogError> {
        if let Some(err) = &self.failed {
            return Err(err.clone());
        }
        write_vote(&self.segments.dir, vote)
            .map_err(|e| self.fail(LogError::Unavailable(format!("saving the vote: {e}"))))
    }

    /// Writes and flushes one batch; returns the sequence number of its last record.
    pub(super) fn write_batch<T: Framed>(&mut self, records: &[T]) -> Result<u64, LogError> {
        if let Some(err) = &self.failed {
            return Err(err.clone());
        }
        if records.is_empty() {
            return Ok(self.next_seq - 1);
        }
        self.try_write(records).map_err(|err| self.fail(err))
    }

    pub(super) fn try_write<T: Framed>(&mut self, records: &[T]) -> Result<u64, LogError> {
        let last = self.next_seq + records.len() as u64 - 1;
        if last >= self.fail_from.load(Ordering::SeqCst) {
            return Err(LogError::Unavailable("injected write failure".into()));
        }
        let io = |e: sled::Error| LogError::Unavailable(e.to_string());
        // Each segment gets the records that fit in it, and is flushed before the next
        // segment is written: the disk always holds a prefix of the log.
        let mut seq = self.next_seq;
        let mut rest = records;
        while !rest.is_empty() {
            let room = match &self.current {
                Some(segment) => (segment.first() + self.segment_records).saturating_sub(seq),
                None => 0,
            };
            if room == 0 {
                let next = self
                    .next_segment(seq)
                    .map_err(|e| LogError::Unavailable(e.to_string()))?;
                if let Some(full) = self.current.replace(next) {
                    // Closed on the segment thread (it is already flushed).
                    self.segments.service.close(full);
                }
                self.synced_blobs.clear();
                continue;
            }
            let (mut now, later) = rest.split_at(rest.len().min(room as usize));
            let segment = self.current.as_ref().expect("a segment is open");
            // The records for this segment go into as few keys as fit (one key per batch
            // value, each encoded straight into the builder's reused buffer; see
            // `batch`), applied as one sled batch, atomically: a crash keeps all of this
            // segment's part of the commit or none of it, never a hole (a commit of 36–42
            // records is one key, sometimes two, so the batch costs next to nothing).
            let mut keys = sled::Batch::default();
            while !now.is_empty() {
                let (value, count) = T::fill(&mut self.builder, seq, now);
                keys.insert(&seq.to_be_bytes(), value);
                seq += count as u64;
                now = &now[count..];
            }
            segment.db().apply_batch(keys).map_err(io)?;
            segment.db().flush().map_err(io)?;
            #[cfg(test)]
            self.note(Step::Flushed(seq - 1));
            let synced = sync_blobs(segment.path(), &mut self.synced_blobs)
                .map_err(|e| LogError::Unavailable(format!("syncing the log's blob files: {e}")))?;
            #[cfg(test)]
            self.note(Step::BlobsSynced(seq - 1));
            if synced > 0 {
                self.counters
                    .blob_files_synced
                    .fetch_add(synced, Ordering::Relaxed);
            }
            rest = later;
        }
        debug_assert!(seq == self.next_seq + records.len() as u64);
        self.next_seq = seq;
        self.prepare_next_segment();
        Ok(seq - 1)
    }

    #[cfg(test)]
    fn note(&self, step: Step) {
        if let Some(trace) = &self.trace {
            trace.lock().unwrap().push(step);
        }
    }

    /// Once the current segment is half full, its successor is created on the segment thread
    /// (sled creates its files, the directory is synced: a few milliseconds that would
    /// otherwise stall every waiting acknowledgement when the segment fills up).
    pub(super) fn prepare_next_segment(&mut self) {
        let Some(current) = &self.current else { return };
        let first = current.first() + self.segment_records;
        if self.preparing.is_some() || (self.next_seq - current.first()) * 2 < self.segment_records
        {
            return;
        }
        let segments = self.segments.clone();
        let (tx, rx) = mpsc::channel();
        self.segments.service.run(Box::new(move || {
            let created = segments.create(first);
            drop(segments); // before the answer: the writer's shutdown may follow it
            let _ = tx.send(created);
        }));
        self.preparing = Some((first, rx));
    }

    /// The segment that starts at `first`: the prepared one, or created now.
    pub(super) fn next_segment(&mut self, first: u64) -> Result<SegmentRef, OpenError> {
        if let Some((prepared, answer)) = self.preparing.take() {
            match answer.recv() {
                Ok(Ok(segment)) if prepared == first => return Ok(segment),
                Ok(Err(err)) => {
                    tracing::warn!(error = %err, "preparing the next log segment failed; trying again")
                }
                // Not the one needed (cannot happen while segments are full-sized): removed,
                // so that no empty segment is left ahead of the records.
                Ok(Ok(unused)) => {
                    drop(unused);
                    self.segments.remove(prepared)?;
                }
                Err(_) => {}
            }
        }
        self.segments.create(first)
    }

    pub(super) fn finish(mut self, shutdown: Option<Waiter>) {
        let result = match &self.failed {
            Some(err) => Err(err.clone()),
            None => match &self.current {
                Some(segment) => segment
                    .db()
                    .flush()
                    .map(|_| self.next_seq - 1)
                    .map_err(|e| LogError::Unavailable(e.to_string())),
                None => Ok(self.next_seq - 1),
            },
        };
        // A prepared segment that never got a record is removed again.
        if let Some((first, answer)) = self.preparing.take() {
            if let Ok(Ok(prepared)) = answer.recv() {
                let empty = prepared.db().is_empty();
                drop(prepared);
                if empty {
                    // Left behind, it is removed by the next `start_writer` (or stops it).
                    if let Err(err) = self.segments.remove(first) {
                        tracing::warn!(error = %err, "cannot remove the unused log segment");
                    }
                }
            }
        }
        // Closed before the answer: when shutdown returns, the log is closed (segments
        // being closed on the segment thread included; readers are stopped before).
        drop(self.current.take());
        self.segments.service.forget(None);
        if !self.segments.guard.wait_closed(Duration::from_secs(30)) {
            tracing::warn!("log segments still open 30 s after the writer stopped");
        }
        drop(self.segments);
        if let Some(waiter) = shutdown {
            let _ = waiter.send(result);
        }
    }
}

/// Fsyncs the files sled wrote under the segment's `blobs/` since the last call, then the
/// directory, so that a flush that returned is durable whole. sled 0.34.7 writes an item
/// over ~128 KiB (a value, or a whole leaf node of up to 17 values when it rewrites one)
/// to a file of its own there, before its flush returns, and never fsyncs it: without this,
/// a power loss or kernel crash right after an acknowledgement could lose that item (a
/// killed process loses nothing: the bytes are in the page cache). Batch values stop at
/// 4 KiB, so this happens only for a run of very large records; otherwise it costs one
/// `read_dir` of a missing or empty directory per flush. `synced` holds the names already
/// synced (the names present now, once this returns). Returns how many were synced.
pub(super) fn sync_blobs(segment: &Path, synced: &mut BTreeSet<OsString>) -> io::Result<u64> {
    let dir = segment.join("blobs");
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut present = BTreeSet::new();
    let mut new = 0;
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        if !synced.contains(&name) {
            match File::open(entry.path()) {
                Ok(file) => {
                    file.sync_all()?;
                    new += 1;
                }
                // Removed by sled since the listing: nothing refers to it any more.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            }
        }
        present.insert(name);
    }
    if new > 0 {
        File::open(&dir)?.sync_all()?;
    }
    *synced = present;
    Ok(new)
}
