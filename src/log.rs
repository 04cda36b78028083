//! The write-ahead log: one writer thread over sled, with group commit.
//!
//! Keys are big-endian `u64` sequence numbers, so sled's key order is log order; values
//! are records encoded by `crate::record`. The records live in *segments*: sled trees
//! named `wal-<first sequence>`, each a contiguous run of up to 65,536 records. Appends go
//! to the newest; the front of the log is truncated (once snapshots cover it) by dropping
//! whole segments, one tree drop instead of a removal per record. A `meta` tree holds the
//! truncation mark. Everyone else talks to the writer through a
//! `LogHandle`: `append` queues a record and returns a `Ticket` that resolves once the
//! record is flushed. The writer takes everything that arrived while the previous flush
//! ran, applies it as one sled batch, calls `flush()` once, then answers every ticket of
//! the batch. Throughput comes from the batch, never from skipping the flush.
//!
//! The queue is FIFO, so the order in which records are queued is the order in which they
//! are numbered and stored. Callers rely on this for the log order rule (DESIGN.md,
//! invariant 3): a record that frees stock is queued before the freed units are handed out.
//!
//! `flush()` is sled's durability point and is called only from this thread (`flush_async`
//! can deadlock under concurrent callers, sled #1308). A failed write is fatal for the log:
//! the writer answers every waiting and every later ticket with `LogError::Unavailable` and
//! never writes again, so nothing is acknowledged that is not durable. Restarting the
//! process recovers from what reached the disk.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use tokio::sync::oneshot;

use crate::limits::LOG_BATCH_RECORDS_MAX;
use crate::record::{self, DecodeError, Record};

/// Why the log cannot acknowledge a record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LogError {
    #[error("the write-ahead log cannot be written: {0}")]
    Unavailable(String),
}

/// Why the log could not be opened or read at start-up.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot open the log in {path}: {source}")]
    Sled { path: String, source: sled::Error },
    #[error("log record {seq} is damaged ({source}); refusing to start")]
    Damaged { seq: u64, source: DecodeError },
    #[error("log key {0:?} is not a sequence number")]
    BadKey(Vec<u8>),
}

/// Resolves when the record it stands for is durable (or the log has failed).
#[must_use = "a change is acknowledged only once its ticket resolves"]
pub struct Ticket(oneshot::Receiver<Result<u64, LogError>>);

impl Ticket {
    /// Waits until the record is flushed; returns its sequence number.
    pub async fn durable(self) -> Result<u64, LogError> {
        match self.0.await {
            Ok(result) => result,
            Err(_) => Err(LogError::Unavailable("the log writer stopped".into())),
        }
    }
}

enum Command {
    Append(Record, Option<oneshot::Sender<Result<u64, LogError>>>),
    /// Resolves once every command queued before it has been flushed.
    Barrier(oneshot::Sender<Result<u64, LogError>>),
    Shutdown(oneshot::Sender<Result<u64, LogError>>),
}

/// Cheap to clone; every actor that logs holds one.
#[derive(Clone)]
pub struct LogHandle {
    tx: mpsc::Sender<Command>,
    fail_writes: Arc<AtomicBool>,
    /// Set by the writer when a write fails; the log then refuses everything.
    failed: Arc<AtomicBool>,
    /// Sequence number of the last flushed record.
    durable: Arc<AtomicU64>,
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

    /// False once a write has failed: the server then refuses every mutation with 503.
    pub fn is_healthy(&self) -> bool {
        !self.failed.load(Ordering::SeqCst)
    }

    /// Failure injection for tests: every later write fails as if the disk refused it.
    #[doc(hidden)]
    pub fn inject_write_failure(&self) {
        self.fail_writes.store(true, Ordering::SeqCst);
    }
}

/// Key of the log's one metadata entry: the highest sequence number that may have been
/// removed from the front of the log because a kept snapshot covers it (big-endian `u64`).
const TRUNCATED_THROUGH_KEY: &[u8] = b"truncated_through";
/// Records per log segment (one sled tree each) before the writer starts the next one.
pub const SEGMENT_RECORDS_DEFAULT: u64 = 65_536;
const SEGMENT_PREFIX: &str = "wal-";
/// The single tree of logs written before segments existed; read as the first segment.
const LEGACY_TREE: &str = "wal";
/// Records removed per sled batch when the end of the log is cut (`truncate_from`).
const TRUNCATE_BATCH_RECORDS: usize = 10_000;

fn segment_name(first_seq: u64) -> String {
    format!("{SEGMENT_PREFIX}{first_seq:020}")
}

/// The log's segments, oldest first: (first sequence number, tree name, tree). A segment
/// is a sled tree holding a contiguous run of records; dropping a whole segment is how
/// the front of the log is truncated (one tree drop instead of a removal per record).
fn segments(db: &sled::Db, dir: &str) -> Result<Vec<(u64, Vec<u8>, sled::Tree)>, OpenError> {
    let err = |source| OpenError::Sled {
        path: dir.to_string(),
        source,
    };
    let mut found = Vec::new();
    for name in db.tree_names() {
        let text = String::from_utf8_lossy(&name).into_owned();
        let first = if let Some(digits) = text.strip_prefix(SEGMENT_PREFIX) {
            digits.parse::<u64>().ok()
        } else if text == LEGACY_TREE {
            let tree = db.open_tree(&name).map_err(err)?;
            match tree.first().map_err(err)? {
                Some((key, _)) => Some(seq_of(&key)?),
                None => None,
            }
        } else {
            None
        };
        if let Some(first) = first {
            let tree = db.open_tree(&name).map_err(err)?;
            found.push((first, name.to_vec(), tree));
        }
    }
    found.sort_by_key(|(first, _, _)| *first);
    Ok(found)
}

/// The opened log, before its writer starts: recovery reads it, then `start_writer`.
pub struct Log {
    db: sled::Db,
    meta: sled::Tree,
    dir: String,
    segment_records: u64,
    flush_interval: Duration,
}

impl Log {
    pub fn open(dir: &Path) -> Result<Log, OpenError> {
        let err = |source| OpenError::Sled {
            path: dir.display().to_string(),
            source,
        };
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(64 * 1024 * 1024)
            .flush_every_ms(None)
            .open()
            .map_err(err)?;
        let meta = db.open_tree("meta").map_err(err)?;
        Ok(Log {
            db,
            meta,
            dir: dir.display().to_string(),
            segment_records: SEGMENT_RECORDS_DEFAULT,
            flush_interval: Duration::ZERO,
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
        let reader = self.reader();
        let mut last = 0;
        for (_, _, tree) in segments(&self.db, &self.dir)?.iter().rev() {
            if let Some((key, _)) = tree.last().map_err(|e| reader.sled_err(e))? {
                last = seq_of(&key)?;
                break;
            }
        }
        Ok(last.max(reader.truncated_through()?))
    }

    /// A view of the log for reading (recovery, snapshots). Every clone must be dropped
    /// before the writer stops, so that the log is closed when it does.
    pub fn reader(&self) -> LogReader {
        LogReader {
            db: self.db.clone(),
            meta: self.meta.clone(),
            dir: self.dir.clone(),
        }
    }

    /// Removes record `seq` and every later one, and flushes: the operator's explicit
    /// choice when a damaged record stops start-up (`--truncate-damaged-log`). Returns the
    /// number of records removed. Works from the newest record backwards, so whatever part
    /// of it a crash lets reach the disk leaves a log without a hole (sled persists a prefix
    /// of its operations).
    pub fn truncate_from(&self, seq: u64) -> Result<u64, OpenError> {
        let reader = self.reader();
        let mut removed = 0;
        for (first, name, tree) in segments(&self.db, &self.dir)?.into_iter().rev() {
            if first >= seq {
                removed += tree.len() as u64;
                self.db.drop_tree(&name).map_err(|e| reader.sled_err(e))?;
                continue;
            }
            loop {
                let keys: Vec<_> = tree
                    .range(seq.to_be_bytes()..)
                    .keys()
                    .rev()
                    .take(TRUNCATE_BATCH_RECORDS)
                    .collect::<Result<_, _>>()
                    .map_err(|e| reader.sled_err(e))?;
                if keys.is_empty() {
                    break;
                }
                let mut batch = sled::Batch::default();
                for key in &keys {
                    batch.remove(key.clone());
                }
                tree.apply_batch(batch).map_err(|e| reader.sled_err(e))?;
                removed += keys.len() as u64;
            }
            break;
        }
        self.flush()?;
        Ok(removed)
    }

    /// Flushes everything written so far (only while no writer runs).
    pub fn flush(&self) -> Result<(), OpenError> {
        self.db
            .flush()
            .map(drop)
            .map_err(|e| self.reader().sled_err(e))
    }

    /// Starts the writer thread; the log is then written only through the handle. The
    /// first record written gets `next_seq`.
    pub fn start_writer(self, next_seq: u64) -> (LogHandle, thread::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel();
        let fail_writes = Arc::new(AtomicBool::new(false));
        let failed = Arc::new(AtomicBool::new(false));
        let durable = Arc::new(AtomicU64::new(next_seq - 1));
        // Appends continue the newest segment, unless it is full (or there is none).
        let current = segments(&self.db, &self.dir)
            .ok()
            .and_then(|segs| segs.into_iter().last())
            .map(|(first, _, tree)| (first, tree));
        let writer = Writer {
            failed_flag: failed.clone(),
            durable: durable.clone(),
            db: self.db,
            current,
            segment_records: self.segment_records,
            flush_interval: self.flush_interval,
            next_seq,
            failed: None,
            fail_writes: fail_writes.clone(),
        };
        let join = thread::Builder::new()
            .name("stockd-log-writer".into())
            .spawn(move || writer.run(rx))
            .expect("spawning the log writer thread");
        (
            LogHandle {
                tx,
                fail_writes,
                failed,
                durable,
            },
            join,
        )
    }
}

/// Reads the log while the writer runs (sled trees are safe to read concurrently), and
/// drops its front once snapshots cover it.
#[derive(Clone)]
pub struct LogReader {
    db: sled::Db,
    meta: sled::Tree,
    dir: String,
}

/// What `stockd log dump` reports.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct LogSummary {
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    pub records: u64,
    /// Encoded record bytes (what sled stores as values; its own overhead is not counted).
    pub record_bytes: u64,
    /// Segments (sled trees) the records are in.
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
    fn sled_err(&self, source: sled::Error) -> OpenError {
        OpenError::Sled {
            path: self.dir.clone(),
            source,
        }
    }

    /// Every record after `after`, in log order, verified.
    pub fn records_after(
        &self,
        after: u64,
    ) -> impl Iterator<Item = Result<(u64, Record), OpenError>> + '_ {
        let from = after.saturating_add(1);
        let (segs, listed) = match segments(&self.db, &self.dir) {
            Ok(segs) => (segs, None),
            Err(err) => (Vec::new(), Some(Err(err))),
        };
        // Skip the segments that end before `from`: a segment ends where the next begins.
        let starts: Vec<u64> = segs.iter().map(|(first, _, _)| *first).collect();
        let skip = starts.windows(2).take_while(|w| w[1] <= from).count();
        let trees = segs.into_iter().skip(skip).map(|(_, _, tree)| tree);
        listed.into_iter().chain(
            trees
                .flat_map(move |tree| tree.range(from.to_be_bytes()..))
                .map(|item| {
                    let (key, value) = item.map_err(|e| self.sled_err(e))?;
                    let seq = seq_of(&key)?;
                    let record = record::decode(&value)
                        .map_err(|source| OpenError::Damaged { seq, source })?;
                    Ok((seq, record))
                }),
        )
    }

    /// Every record in log order, verified.
    pub fn records(&self) -> impl Iterator<Item = Result<(u64, Record), OpenError>> + '_ {
        self.records_after(0)
    }

    /// The highest sequence number that may have been dropped from the front of the log
    /// (0: none).
    pub fn truncated_through(&self) -> Result<u64, OpenError> {
        match self
            .meta
            .get(TRUNCATED_THROUGH_KEY)
            .map_err(|e| self.sled_err(e))?
        {
            Some(bytes) => seq_of(&bytes),
            None => Ok(0),
        }
    }

    /// Drops the records up to and including `seq` (a kept snapshot covers them), a whole
    /// segment at a time: segments that end at or before `seq` are dropped, the one that
    /// straddles it stays until a later truncation. The mark is written before anything is
    /// dropped and never lowered. Not flushed here: the writer's next flush makes it durable
    /// (only the writer flushes); if a crash loses it, the records are simply still there.
    /// Returns the number of records dropped.
    pub fn truncate_through(&self, seq: u64) -> Result<u64, OpenError> {
        if seq <= self.truncated_through()? {
            return Ok(0);
        }
        self.meta
            .insert(TRUNCATED_THROUGH_KEY, &seq.to_be_bytes())
            .map_err(|e| self.sled_err(e))?;
        let segs = segments(&self.db, &self.dir)?;
        let mut dropped = 0;
        for pair in segs.windows(2) {
            let ((first, name, _), (next_first, _, _)) = (&pair[0], &pair[1]);
            if *next_first > seq.saturating_add(1) {
                break;
            }
            self.db.drop_tree(name).map_err(|e| self.sled_err(e))?;
            dropped += next_first - first;
        }
        Ok(dropped)
    }

    /// Sequence range, counts and sizes, decoding every record (for `stockd log dump`).
    pub fn summary(&self) -> Result<LogSummary, OpenError> {
        let mut summary = LogSummary {
            truncated_through: self.truncated_through()?,
            segments: segments(&self.db, &self.dir)?.len(),
            ..LogSummary::default()
        };
        for (_, _, tree) in segments(&self.db, &self.dir)? {
            for item in tree.iter() {
                let (key, value) = item.map_err(|e| self.sled_err(e))?;
                let seq = seq_of(&key)?;
                let record = match record::decode(&value) {
                    Ok(record) => record,
                    Err(_) => {
                        summary.damaged_at = Some(seq);
                        return Ok(summary);
                    }
                };
                summary.first_seq.get_or_insert(seq);
                summary.last_seq = Some(seq);
                summary.records += 1;
                summary.record_bytes += value.len() as u64;
                *summary.kinds.entry(record.kind().to_string()).or_insert(0) += 1;
            }
        }
        Ok(summary)
    }
}

fn seq_of(key: &[u8]) -> Result<u64, OpenError> {
    let bytes: [u8; 8] = key
        .try_into()
        .map_err(|_| OpenError::BadKey(key.to_vec()))?;
    Ok(u64::from_be_bytes(bytes))
}

/// Test hook: overwrites the stored bytes of record `seq` with a damaged copy, as a bad
/// disk would. Only for a log no server has open.
#[doc(hidden)]
pub fn damage_record(dir: &Path, seq: u64) -> Result<(), OpenError> {
    let log = Log::open(dir)?;
    let reader = log.reader();
    let key = seq.to_be_bytes();
    for (_, _, tree) in segments(&log.db, &log.dir)? {
        if let Some(value) = tree.get(key).map_err(|e| reader.sled_err(e))? {
            let mut value = value.to_vec();
            if let Some(last) = value.last_mut() {
                *last ^= 0x5a;
            }
            tree.insert(key, value).map_err(|e| reader.sled_err(e))?;
        }
    }
    log.flush()
}

struct Writer {
    db: sled::Db,
    /// The segment being appended to, with its first sequence number.
    current: Option<(u64, sled::Tree)>,
    segment_records: u64,
    flush_interval: Duration,
    next_seq: u64,
    /// Set on the first failed write; the log never writes again.
    failed: Option<LogError>,
    failed_flag: Arc<AtomicBool>,
    fail_writes: Arc<AtomicBool>,
    durable: Arc<AtomicU64>,
}

type Waiter = oneshot::Sender<Result<u64, LogError>>;

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Command>) {
        let mut records: Vec<(Record, Option<Waiter>)> = Vec::with_capacity(LOG_BATCH_RECORDS_MAX);
        // Each barrier with the number of this batch's records queued before it.
        let mut barriers: Vec<(Waiter, u64)> = Vec::new();
        let mut last_flush = std::time::Instant::now();
        loop {
            let mut shutdown = None;
            // Block for the first command, then take whatever else is already queued, up to
            // a shutdown (which must see exactly the records before it).
            match rx.recv() {
                Ok(cmd) => self.take(cmd, &mut records, &mut barriers, &mut shutdown),
                Err(_) => return self.finish(None),
            }
            let since = last_flush.elapsed();
            if shutdown.is_none() && since < self.flush_interval {
                thread::sleep(self.flush_interval - since);
            }
            last_flush = std::time::Instant::now();
            while shutdown.is_none() && records.len() < LOG_BATCH_RECORDS_MAX {
                match rx.try_recv() {
                    Ok(cmd) => self.take(cmd, &mut records, &mut barriers, &mut shutdown),
                    Err(_) => break,
                }
            }
            let first_seq = self.next_seq;
            let outcome = self.write_batch(&records);
            if let Ok(last) = outcome {
                self.durable.store(last, Ordering::SeqCst);
            }
            for (i, (_, waiter)) in records.drain(..).enumerate() {
                if let Some(waiter) = waiter {
                    let _ = waiter.send(outcome.clone().map(|_| first_seq + i as u64));
                }
            }
            for (waiter, before) in barriers.drain(..) {
                let _ = waiter.send(outcome.clone().map(|_| first_seq - 1 + before));
            }
            if shutdown.is_some() {
                return self.finish(shutdown);
            }
        }
    }

    fn take(
        &self,
        cmd: Command,
        records: &mut Vec<(Record, Option<Waiter>)>,
        barriers: &mut Vec<(Waiter, u64)>,
        shutdown: &mut Option<Waiter>,
    ) {
        match cmd {
            Command::Append(record, waiter) => records.push((record, waiter)),
            Command::Barrier(waiter) => barriers.push((waiter, records.len() as u64)),
            Command::Shutdown(waiter) => *shutdown = Some(waiter),
        }
    }
    /// Writes and flushes one batch; returns the sequence number of its last record.
    fn write_batch(&mut self, records: &[(Record, Option<Waiter>)]) -> Result<u64, LogError> {
        if let Some(err) = &self.failed {
            return Err(err.clone());
        }
        if records.is_empty() {
            return Ok(self.next_seq - 1);
        }
        let result = self.try_write(records);
        match result {
            Ok(last) => Ok(last),
            Err(err) => {
                tracing::error!(error = %err, "write-ahead log failed; refusing all further writes");
                self.failed = Some(err.clone());
                self.failed_flag.store(true, Ordering::SeqCst);
                Err(err)
            }
        }
    }

    fn try_write(&mut self, records: &[(Record, Option<Waiter>)]) -> Result<u64, LogError> {
        if self.fail_writes.load(Ordering::SeqCst) {
            return Err(LogError::Unavailable("injected write failure".into()));
        }
        let io = |e: sled::Error| LogError::Unavailable(e.to_string());
        // Each segment gets one sled batch of the records that fit in it; a full segment is
        // followed by a new one. The flush below makes all of them durable together.
        let mut seq = self.next_seq;
        let mut rest = records;
        while !rest.is_empty() {
            let room = match &self.current {
                Some((first, _)) => (first + self.segment_records).saturating_sub(seq),
                None => 0,
            };
            if room == 0 {
                let tree = self.db.open_tree(segment_name(seq)).map_err(io)?;
                self.current = Some((seq, tree));
                continue;
            }
            let (now, later) = rest.split_at(rest.len().min(room as usize));
            let (_, tree) = self.current.as_ref().expect("a segment is open");
            let mut batch = sled::Batch::default();
            for (record, _) in now {
                batch.insert(&seq.to_be_bytes(), record::encode(record));
                seq += 1;
            }
            tree.apply_batch(batch).map_err(io)?;
            rest = later;
        }
        self.db.flush().map_err(io)?;
        self.next_seq = seq;
        Ok(seq - 1)
    }

    fn finish(self, shutdown: Option<Waiter>) {
        let result = match &self.failed {
            Some(err) => Err(err.clone()),
            None => self
                .db
                .flush()
                .map(|_| self.next_seq - 1)
                .map_err(|e| LogError::Unavailable(e.to_string())),
        };
        if let Some(waiter) = shutdown {
            let _ = waiter.send(result);
        }
    }
}
