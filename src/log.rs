//! The write-ahead log: one writer thread over a sled tree, with group commit.
//!
//! Keys are big-endian `u64` sequence numbers, so sled's key order is log order; values
//! are records encoded by `crate::record`. Everyone else talks to the writer through a
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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;

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

/// The durable state, folded by the writer (see `LogHandle::fold_durable`).
pub type FoldResult = Result<crate::fold::State, String>;

enum Command {
    Append(Record, Option<oneshot::Sender<Result<u64, LogError>>>),
    /// Flush everything queued before it, then fold the whole log and answer the state.
    Fold(oneshot::Sender<FoldResult>),
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

    /// The state folded from exactly the records queued before this call (flushed first).
    /// Rebuilds a failed product actor. The writer thread does the read, so no sled handle
    /// ever lives outside it: when the writer stops, the log is closed.
    pub fn fold_durable(&self) -> oneshot::Receiver<FoldResult> {
        let (tx, rx) = oneshot::channel();
        if let Err(mpsc::SendError(Command::Fold(tx))) = self.tx.send(Command::Fold(tx)) {
            let _ = tx.send(Err("the log writer stopped".into()));
        }
        rx
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

/// The opened log, before its writer starts: recovery reads it, then `start_writer`.
pub struct Log {
    db: sled::Db,
    tree: sled::Tree,
    last_seq: u64,
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
        let tree = db.open_tree("wal").map_err(err)?;
        let last_seq = match tree.last().map_err(err)? {
            Some((key, _)) => seq_of(&key)?,
            None => 0,
        };
        Ok(Log { db, tree, last_seq })
    }

    /// Sequence number of the newest record (0 for an empty log).
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// A read-only view of the log, for recovery at start-up. Drop it before the server
    /// runs: the log must be closed when the writer stops.
    pub fn reader(&self) -> LogReader {
        LogReader {
            tree: self.tree.clone(),
        }
    }

    /// Starts the writer thread; the log is then written only through the handle.
    pub fn start_writer(self) -> (LogHandle, thread::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel();
        let fail_writes = Arc::new(AtomicBool::new(false));
        let failed = Arc::new(AtomicBool::new(false));
        let writer = Writer {
            failed_flag: failed.clone(),
            db: self.db,
            tree: self.tree,
            next_seq: self.last_seq + 1,
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
            },
            join,
        )
    }
}

/// Reads the log while the writer runs (sled trees are safe to read concurrently).
#[derive(Clone)]
pub struct LogReader {
    tree: sled::Tree,
}

impl LogReader {
    /// Every record in log order, verified.
    pub fn records(&self) -> impl Iterator<Item = Result<(u64, Record), OpenError>> + '_ {
        self.tree.iter().map(|item| {
            let (key, value) = item.map_err(|source| OpenError::Sled {
                path: String::from("(log)"),
                source,
            })?;
            let seq = seq_of(&key)?;
            let record =
                record::decode(&value).map_err(|source| OpenError::Damaged { seq, source })?;
            Ok((seq, record))
        })
    }
}

fn seq_of(key: &[u8]) -> Result<u64, OpenError> {
    let bytes: [u8; 8] = key
        .try_into()
        .map_err(|_| OpenError::BadKey(key.to_vec()))?;
    Ok(u64::from_be_bytes(bytes))
}

struct Writer {
    db: sled::Db,
    tree: sled::Tree,
    next_seq: u64,
    /// Set on the first failed write; the log never writes again.
    failed: Option<LogError>,
    failed_flag: Arc<AtomicBool>,
    fail_writes: Arc<AtomicBool>,
}

type Waiter = oneshot::Sender<Result<u64, LogError>>;

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Command>) {
        let mut records: Vec<(Record, Option<Waiter>)> = Vec::with_capacity(LOG_BATCH_RECORDS_MAX);
        // Each barrier with the number of this batch's records queued before it.
        let mut barriers: Vec<(Waiter, u64)> = Vec::new();
        loop {
            let mut shutdown = None;
            let mut fold = None;
            // Block for the first command, then take whatever else is already queued, up to
            // a command that must see exactly the records before it (fold, shutdown).
            match rx.recv() {
                Ok(cmd) => self.take(cmd, &mut records, &mut barriers, &mut shutdown, &mut fold),
                Err(_) => return self.finish(None),
            }
            while shutdown.is_none() && fold.is_none() && records.len() < LOG_BATCH_RECORDS_MAX {
                match rx.try_recv() {
                    Ok(cmd) => {
                        self.take(cmd, &mut records, &mut barriers, &mut shutdown, &mut fold)
                    }
                    Err(_) => break,
                }
            }
            let first_seq = self.next_seq;
            let outcome = self.write_batch(&records);
            for (i, (_, waiter)) in records.drain(..).enumerate() {
                if let Some(waiter) = waiter {
                    let _ = waiter.send(outcome.clone().map(|_| first_seq + i as u64));
                }
            }
            for (waiter, before) in barriers.drain(..) {
                let _ = waiter.send(outcome.clone().map(|_| first_seq - 1 + before));
            }
            if let Some(waiter) = fold {
                let result = match &outcome {
                    Ok(_) => {
                        let reader = LogReader {
                            tree: self.tree.clone(),
                        };
                        crate::recovery::fold_log(&reader)
                            .map(|r| r.state)
                            .map_err(|e| e.to_string())
                    }
                    Err(err) => Err(err.to_string()),
                };
                let _ = waiter.send(result);
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
        fold: &mut Option<oneshot::Sender<FoldResult>>,
    ) {
        match cmd {
            Command::Fold(waiter) => *fold = Some(waiter),
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
        let mut batch = sled::Batch::default();
        let mut seq = self.next_seq;
        for (record, _) in records {
            batch.insert(&seq.to_be_bytes(), record::encode(record));
            seq += 1;
        }
        let io = |e: sled::Error| LogError::Unavailable(e.to_string());
        self.tree.apply_batch(batch).map_err(io)?;
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
