//! The write-ahead log: one writer thread over sled, with group commit.
//!
//! Keys are big-endian `u64` sequence numbers, so sled's key order is log order; values
//! are records encoded by `crate::record`. The records live in *segments*, each a sled
//! database of its own in a directory `segment-<first sequence>` of the log directory,
//! holding a contiguous run of up to 65,536 records. Appends go to the newest segment;
//! the front of the log is truncated (once snapshots cover it) by deleting whole segment
//! directories. Deleting a directory costs sled nothing: with one database and a tree per
//! segment, sled's `drop_tree` freed every page through its own log and then rewrote live
//! pages on the writer's path, which slowed every flush (so every sync reserve) for
//! seconds after a large truncation. A file `truncated_through` holds the truncation
//! mark; a file `LOCK` (an exclusive `flock`) keeps a second process (or a second `Log` in
//! this one) off the directory.
//!
//! Only the newest segment stays open (the writer's); an older one is opened while it is
//! read (recovery, snapshots, rebuilds) and closed when its last reader is done, so memory
//! does not grow with the number of segments.
//!
//! Everyone else talks to the writer through a `LogHandle`: `append` queues a record and
//! returns a `Ticket` that resolves once the record is flushed. The writer takes everything
//! that arrived while the previous flush ran, applies it as one sled batch per segment it
//! touches, flushes each of those segments in order, then answers every ticket of the
//! batch. Throughput comes from the batch, never
//! from skipping the flush.
//!
//! The queue is FIFO, so the order in which records are queued is the order in which they
//! are numbered and stored. Callers rely on this for the log order rule (DESIGN.md,
//! invariant 3): a record that frees stock is queued before the freed units are handed out.
//! Across segments the same holds: a segment is flushed before the next one is written.
//!
//! `flush()` is sled's durability point and is called only from this thread (`flush_async`
//! can deadlock under concurrent callers, sled #1308). A failed write is fatal for the log:
//! the writer answers every waiting and every later ticket with `LogError::Unavailable` and
//! never writes again, so nothing is acknowledged that is not durable. Restarting the
//! process recovers from what reached the disk.
//!
//! A log directory written by an earlier stockd (one sled database directly in it, a tree
//! per segment) is moved to this layout when it is opened (`migrate_single_database`).

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::limits::LOG_BATCH_RECORDS_MAX;
use crate::record::{self, DecodeError, Record};
use crate::snapshot::sync_dir;

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
    #[error("cannot use the log directory {path}: {source}")]
    Io { path: String, source: io::Error },
    #[error("the log in {path} is in use by another process or log (its lock is held)")]
    Locked { path: String },
    #[error("the log's truncation mark {path} is damaged")]
    BadMark { path: String },
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
    counters: Arc<WriterCounters>,
}

/// What the writer has done since it started, kept by the writer for `stats`.
#[derive(Default)]
struct WriterCounters {
    batches: AtomicU64,
    records: AtomicU64,
    write_ns: AtomicU64,
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
            healthy: self.is_healthy(),
        }
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

/// Records per log segment (one sled database each) before the writer starts the next one.
pub const SEGMENT_RECORDS_DEFAULT: u64 = 65_536;
/// A segment's directory in the log directory: this prefix and its first sequence number.
const SEGMENT_PREFIX: &str = "segment-";
/// A segment being deleted is renamed to this prefix first, so that a crash in the middle
/// of the deletion leaves a directory the next open removes, never half a segment.
const TRASH_PREFIX: &str = "trash-";
/// The truncation mark: the highest sequence number that may have been removed from the
/// front of the log because a kept snapshot covers it (big-endian `u64`, then its CRC32).
const MARK_FILE: &str = "truncated_through";
const LOCK_FILE: &str = "LOCK";
/// sled's page cache per open segment: more than a segment of 65,536 records holds (~10–20
/// MB), so that sled never evicts while one is written or read. Only the newest segment
/// stays open, older ones only while they are read, so this bounds little in practice.
const SEGMENT_CACHE_BYTES: u64 = 64 * 1024 * 1024;
/// Records removed per sled batch when the end of the log is cut (`truncate_from`).
const TRUNCATE_BATCH_RECORDS: usize = 10_000;
/// How long opening a segment retries while sled's lock on it is still held by the
/// instance being closed (its last handle can outlive the close by a moment).
const SEGMENT_LOCK_RETRY: Duration = Duration::from_secs(2);

fn segment_dir_name(first_seq: u64) -> String {
    format!("{SEGMENT_PREFIX}{first_seq:020}")
}

fn io_err(path: &Path) -> impl Fn(io::Error) -> OpenError + '_ {
    move |source| OpenError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn sled_err(path: &Path) -> impl Fn(sled::Error) -> OpenError + '_ {
    move |source| OpenError::Sled {
        path: path.display().to_string(),
        source,
    }
}

/// Removes the page-table snapshots sled left half written in `dir`.
///
/// sled 0.34.7 writes such a snapshot every time it opens a database whose log grew since
/// the last one (so the first time a segment is read after it was written): to
/// `snap.<lsn>.generating`, synced, then renamed to `snap.<lsn>`. Its own reader lists
/// the `.generating` files as snapshots too and takes the newest name, so a process killed
/// between the two steps left a file that made every later open fail with "Read corrupted
/// data" (seen: `kill -9` of a server replaying its log at start-up). A `.generating` file
/// is never a finished snapshot, and nobody else writes this directory while we open it
/// (the log's `LOCK`, and one open per segment in this process); without it sled falls
/// back to its previous snapshot, or to reading its log from the start.
fn remove_unfinished_sled_snapshots(dir: &Path) -> Result<(), OpenError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(err) => return Err(io_err(dir)(err)),
    };
    for entry in entries {
        let entry = entry.map_err(io_err(dir))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("snap.") && name.ends_with(".generating") {
            tracing::warn!(
                file = %entry.path().display(),
                "removing a storage snapshot left unfinished by a crash"
            );
            fs::remove_file(entry.path()).map_err(io_err(dir))?;
        }
    }
    Ok(())
}

fn open_sled(path: &Path) -> Result<sled::Db, OpenError> {
    remove_unfinished_sled_snapshots(path)?;
    let started = Instant::now();
    loop {
        let result = sled::Config::new()
            .path(path)
            .cache_capacity(SEGMENT_CACHE_BYTES)
            .flush_every_ms(None)
            .open();
        match result {
            // sled holds an exclusive lock on its file; an instance just closed by another
            // thread can hold it a moment longer. (Other processes are kept out by `LOCK`.)
            Err(sled::Error::Io(err))
                if err.to_string().contains("could not acquire lock")
                    && started.elapsed() < SEGMENT_LOCK_RETRY =>
            {
                thread::sleep(Duration::from_millis(5));
            }
            other => return other.map_err(sled_err(path)),
        }
    }
}

/// One segment of the log: a directory holding a sled database, opened while someone
/// uses it.
struct Slot {
    first: u64,
    path: PathBuf,
    state: Mutex<SlotState>,
    /// The log's count of open segment databases.
    guard: Arc<DirGuard>,
}

/// Counts the segment databases open, so that the writer's shutdown can wait until the
/// last one is closed (some close on the segment thread).
struct DirGuard {
    open: Mutex<usize>,
    closed: std::sync::Condvar,
}

impl DirGuard {
    fn count(&self, delta: isize) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        *open = open.saturating_add_signed(delta);
        if *open == 0 {
            self.closed.notify_all();
        }
    }

    /// Waits until no segment database is open (or `limit` passed); true if none is.
    fn wait_closed(&self, limit: Duration) -> bool {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let (open, _) = self
            .closed
            .wait_timeout_while(open, limit, |open| *open > 0)
            .unwrap_or_else(|e| e.into_inner());
        *open == 0
    }
}

#[derive(Default)]
struct SlotState {
    /// The open database, while `users` > 0.
    db: Option<sled::Db>,
    users: usize,
    /// Truncated: never opened again. Its directory was renamed to this trash path at
    /// once (so its name is free for a new segment); deleted once its last user is done.
    removed: bool,
    trash: Option<PathBuf>,
}

impl Slot {
    fn state(&self) -> MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A segment held open; the database is closed (and, if the segment was truncated
/// meanwhile, deleted) when the last of these is dropped.
struct SegmentRef {
    slot: Arc<Slot>,
    db: Option<sled::Db>,
}

impl SegmentRef {
    fn db(&self) -> &sled::Db {
        self.db
            .as_ref()
            .expect("a segment is open until its reference is dropped")
    }

    fn first(&self) -> u64 {
        self.slot.first
    }
}

impl Drop for SegmentRef {
    fn drop(&mut self) {
        drop(self.db.take());
        let mut state = self.slot.state();
        state.users -= 1;
        if state.users > 0 {
            return;
        }
        // Closed (sled flushes what is dirty) under the lock, so nobody reopens the
        // directory while this instance still holds it.
        let was_open = state.db.take().is_some();
        if let Some(trash) = state.trash.take() {
            if let Err(err) = fs::remove_dir_all(&trash) {
                tracing::warn!(path = %trash.display(), error = %err, "cannot delete a truncated log segment");
            }
        }
        // Counted closed only once its files are gone too: the writer's shutdown waits
        // for this, and a restart must find nothing still being deleted.
        if was_open {
            self.slot.guard.count(-1);
        }
    }
}

/// Renames a segment's directory out of the way (atomic: a crash never leaves half a
/// segment under its name; the next open removes whatever `trash-` directories remain).
/// Returns the new path once renamed, with the outcome of syncing the directory.
fn trash_segment_dir(path: &Path) -> io::Result<(PathBuf, io::Result<()>)> {
    static TRASHED: AtomicU64 = AtomicU64::new(0);
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(io::Error::other("a segment directory without a parent"));
    };
    let trash = parent.join(format!(
        "{TRASH_PREFIX}{}-{}-{}",
        name.to_string_lossy(),
        std::process::id(),
        TRASHED.fetch_add(1, Ordering::Relaxed)
    ));
    fs::rename(path, &trash)?;
    let synced = sync_dir(parent);
    Ok((trash, synced))
}

/// The segments of one log directory, and the directory's lock and truncation mark.
struct Segments {
    dir: PathBuf,
    slots: Mutex<BTreeMap<u64, Arc<Slot>>>,
    mark: Mutex<u64>,
    guard: Arc<DirGuard>,
    /// A normal-class thread that opens and closes segments for readers and the writer
    /// (see `Service`).
    service: Service,
    /// Holds the `flock` on `LOCK` for as long as anything uses the log (the writer's
    /// shutdown waits for every segment to be closed before it lets go of it).
    _lock: fs::File,
}

type ServiceJob = Box<dyn FnOnce() + Send>;

/// Opening a segment (~10 ms: sled reads its own log) and closing one (~6 ms) are done
/// off the reader's and the writer's paths, on this one thread. It is started by whoever
/// opens the log (start-up, in the normal scheduling class), not by a snapshot job: a
/// thread started from a `SCHED_IDLE` job would be idle-class too, and so would the
/// threads sled's shared pool starts from it (opening a segment hands its reads to that
/// pool, starting threads as needed), which the writer's flushes also use. For the same
/// reason it keeps the normal class: a nice-10 thread would lower those threads too.
#[derive(Clone)]
struct Service(mpsc::Sender<ServiceJob>);

impl Service {
    fn start() -> Service {
        let (tx, rx) = mpsc::channel::<ServiceJob>();
        let started = thread::Builder::new()
            .name("stockd-log-segments".into())
            .spawn(move || {
                for job in rx {
                    job();
                }
            });
        if let Err(err) = started {
            tracing::warn!(error = %err, "no segment thread: segments are opened and closed inline");
        }
        Service(tx)
    }

    /// Runs `job` on the service thread, or here if that is gone.
    fn run(&self, job: ServiceJob) {
        if let Err(mpsc::SendError(job)) = self.0.send(job) {
            job();
        }
    }

    /// Opens `slot` on the service thread; the answer comes on the returned channel.
    fn open(&self, slot: Arc<Slot>) -> mpsc::Receiver<Result<Option<SegmentRef>, OpenError>> {
        let (tx, rx) = mpsc::channel();
        self.run(Box::new(move || {
            let _ = tx.send(open_segment(&slot));
        }));
        rx
    }

    /// Closes a segment (drops this reference) on the service thread.
    fn close(&self, segment: SegmentRef) {
        self.run(Box::new(move || drop(segment)));
    }
}

impl Segments {
    fn open(dir: &Path) -> Result<Segments, OpenError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let lock = lock_dir(dir)?;
        let guard = Arc::new(DirGuard {
            open: Mutex::new(0),
            closed: std::sync::Condvar::new(),
        });
        let mut slots = BTreeMap::new();
        for entry in fs::read_dir(dir).map_err(io_err(dir))? {
            let entry = entry.map_err(io_err(dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(TRASH_PREFIX) {
                match fs::remove_dir_all(entry.path()) {
                    Err(err) if err.kind() != io::ErrorKind::NotFound => {
                        return Err(io_err(&entry.path())(err))
                    }
                    _ => continue,
                }
            }
            let Some(digits) = name.strip_prefix(SEGMENT_PREFIX) else {
                continue;
            };
            // Only the exact name a segment is given: reopening it under another spelling
            // would make a new, empty database and hide the records.
            let first = digits
                .parse::<u64>()
                .ok()
                .filter(|first| segment_dir_name(*first) == name);
            let Some(first) = first else {
                return Err(OpenError::Io {
                    path: entry.path().display().to_string(),
                    source: io::Error::other(
                        "not a log segment name (segment-<first sequence, 20 digits>); move it away",
                    ),
                });
            };
            slots.insert(first, Arc::new(new_slot(dir, first, &guard)));
        }
        let mark = read_mark(dir)?;
        Ok(Segments {
            dir: dir.to_path_buf(),
            slots: Mutex::new(slots),
            mark: Mutex::new(mark),
            guard,
            service: Service::start(),
            _lock: lock,
        })
    }

    /// The segments, oldest first.
    fn list(&self) -> Vec<Arc<Slot>> {
        self.slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// The segments that may hold records after `after`, oldest first (a segment ends
    /// where the next begins, so those that end at or before `after` are left out).
    fn after(&self, after: u64) -> Vec<Arc<Slot>> {
        let from = after.saturating_add(1);
        let mut slots = self.list();
        let skip = slots.windows(2).take_while(|w| w[1].first <= from).count();
        slots.drain(..skip);
        slots
    }

    /// Creates the segment whose first record is `first` (or opens it if it exists).
    fn create(&self, first: u64) -> Result<SegmentRef, OpenError> {
        let slot = {
            let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            slots
                .entry(first)
                .or_insert_with(|| Arc::new(new_slot(&self.dir, first, &self.guard)))
                .clone()
        };
        let segment = open_segment(&slot)?.ok_or_else(|| OpenError::Io {
            path: slot.path.display().to_string(),
            source: io::Error::other("the segment was truncated while it was created"),
        })?;
        sync_dir(&self.dir).map_err(io_err(&self.dir))?;
        Ok(segment)
    }

    /// Takes a segment out of the log: its directory is renamed away at once (a reader
    /// that holds it open reads on), and deleted now, or by its last user.
    fn remove(&self, first: u64) -> Result<(), OpenError> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let Some(slot) = slots.get(&first).cloned() else {
            return Ok(());
        };
        let mut state = slot.state();
        // Under the list's lock: nobody can create a segment of this name meanwhile.
        let (trash, synced) = trash_segment_dir(&slot.path).map_err(io_err(&slot.path))?;
        slots.remove(&first);
        drop(slots);
        state.removed = true;
        let result = synced.map_err(io_err(&self.dir));
        if state.users == 0 {
            fs::remove_dir_all(&trash).map_err(io_err(&trash))?;
        } else {
            state.trash = Some(trash);
        }
        result
    }

    fn mark(&self) -> u64 {
        *self.mark.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Raises the truncation mark (never lowers it), durably, before anything it covers
    /// is deleted.
    fn raise_mark(&self, seq: u64) -> Result<u64, OpenError> {
        let mut mark = self.mark.lock().unwrap_or_else(|e| e.into_inner());
        if seq > *mark {
            write_mark(&self.dir, seq).map_err(io_err(&self.dir))?;
            *mark = seq;
        }
        Ok(*mark)
    }

    /// Flushes every segment that is open.
    fn flush(&self) -> Result<(), OpenError> {
        for slot in self.list() {
            let db = slot.state().db.clone();
            if let Some(db) = db {
                db.flush().map_err(sled_err(&slot.path))?;
            }
        }
        Ok(())
    }
}

/// Opens a segment (or shares the instance already open); `None` if it was truncated.
fn open_segment(slot: &Arc<Slot>) -> Result<Option<SegmentRef>, OpenError> {
    let mut state = slot.state();
    if state.removed {
        return Ok(None);
    }
    if state.db.is_none() {
        state.db = Some(open_sled(&slot.path)?);
        slot.guard.count(1);
    }
    state.users += 1;
    Ok(Some(SegmentRef {
        slot: slot.clone(),
        db: state.db.clone(),
    }))
}

fn new_slot(dir: &Path, first: u64, guard: &Arc<DirGuard>) -> Slot {
    Slot {
        first,
        path: dir.join(segment_dir_name(first)),
        state: Mutex::new(SlotState::default()),
        guard: guard.clone(),
    }
}

#[cfg(unix)]
fn lock_dir(dir: &Path) -> Result<fs::File, OpenError> {
    use std::os::unix::io::AsRawFd;
    let path = dir.join(LOCK_FILE);
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_err(&path))?;
    // SAFETY: flock on a descriptor this function owns; no memory is involved.
    let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if locked != 0 {
        let err = io::Error::last_os_error();
        return Err(if err.kind() == io::ErrorKind::WouldBlock {
            OpenError::Locked {
                path: dir.display().to_string(),
            }
        } else {
            OpenError::Io {
                path: path.display().to_string(),
                source: err,
            }
        });
    }
    Ok(file)
}

#[cfg(not(unix))]
fn lock_dir(dir: &Path) -> Result<fs::File, OpenError> {
    let path = dir.join(LOCK_FILE);
    fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_err(&path))
}

fn read_mark(dir: &Path) -> Result<u64, OpenError> {
    let path = dir.join(MARK_FILE);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(err) => return Err(io_err(&path)(err)),
    };
    let bad = || OpenError::BadMark {
        path: path.display().to_string(),
    };
    let (seq, crc) = bytes.split_at_checked(8).ok_or_else(bad)?;
    let crc: [u8; 4] = crc.try_into().map_err(|_| bad())?;
    if crc32fast::hash(seq) != u32::from_le_bytes(crc) {
        return Err(bad());
    }
    Ok(u64::from_be_bytes(seq.try_into().map_err(|_| bad())?))
}

/// Written to a temporary file, synced, renamed into place, directory synced.
fn write_mark(dir: &Path, seq: u64) -> io::Result<()> {
    let tmp = dir.join(format!("{MARK_FILE}.tmp"));
    let mut bytes = seq.to_be_bytes().to_vec();
    bytes.extend(crc32fast::hash(&seq.to_be_bytes()).to_le_bytes());
    let mut file = fs::File::create(&tmp)?;
    file.write_all(&bytes)?;
    file.sync_all()?;
    fs::rename(&tmp, dir.join(MARK_FILE))?;
    sync_dir(dir)
}

/// Moves a log written by an earlier stockd (one sled database directly in `dir`, a tree
/// `wal` or `wal-<first>` per segment, the mark in a tree `meta`) to a database per
/// segment. Crash-safe: the old database is removed only after every record and the mark
/// are durable in the new layout, and its `db` file goes first; until then, the next open
/// starts the move again from scratch.
fn migrate_single_database(segments: &Segments, segment_records: u64) -> Result<(), OpenError> {
    let dir = &segments.dir;
    let (db_file, conf_file) = (dir.join("db"), dir.join("conf"));
    if !db_file.is_file() {
        if conf_file.is_file() {
            remove_single_database_leftovers(dir); // a move that ended after its `db` went
        }
        return Ok(());
    }
    tracing::info!(dir = %dir.display(), "moving the log to one database per segment");
    for slot in segments.list() {
        segments.remove(slot.first)?; // left by an interrupted move
    }
    remove_unfinished_sled_snapshots(dir)?;
    let old = sled::Config::new()
        .path(dir)
        .flush_every_ms(None)
        .open()
        .map_err(sled_err(dir))?;
    let meta = old.open_tree("meta").map_err(sled_err(dir))?;
    let mark = match meta.get(b"truncated_through").map_err(sled_err(dir))? {
        Some(bytes) => seq_of(&bytes)?,
        None => 0,
    };
    let mut trees = Vec::new();
    for name in old.tree_names() {
        let text = String::from_utf8_lossy(&name).into_owned();
        if text == "wal" || text.starts_with("wal-") {
            let tree = old.open_tree(&name).map_err(sled_err(dir))?;
            if let Some((key, _)) = tree.first().map_err(sled_err(dir))? {
                trees.push((seq_of(&key)?, tree));
            }
        }
    }
    trees.sort_by_key(|(first, _)| *first);
    let mut moved = 0u64;
    let mut current: Option<SegmentRef> = None;
    let mut batch = sled::Batch::default();
    let mut in_batch = 0;
    for (_, tree) in &trees {
        for item in tree.iter() {
            let (key, value) = item.map_err(sled_err(dir))?;
            let seq = seq_of(&key)?;
            let full = current
                .as_ref()
                .is_none_or(|s| seq >= s.first() + segment_records);
            if full || in_batch == TRUNCATE_BATCH_RECORDS {
                if let Some(segment) = &current {
                    let batch = std::mem::take(&mut batch);
                    segment.db().apply_batch(batch).map_err(sled_err(dir))?;
                    segment.db().flush().map_err(sled_err(dir))?;
                    in_batch = 0;
                }
            }
            if full {
                current = Some(segments.create(seq)?);
            }
            batch.insert(key, value);
            in_batch += 1;
            moved += 1;
        }
    }
    if let Some(segment) = &current {
        segment.db().apply_batch(batch).map_err(sled_err(dir))?;
        segment.db().flush().map_err(sled_err(dir))?;
    }
    drop(current);
    segments.raise_mark(mark)?;
    drop((meta, trees, old));
    sync_dir(dir).map_err(io_err(dir))?;
    fs::remove_file(&db_file).map_err(io_err(&db_file))?;
    sync_dir(dir).map_err(io_err(dir))?;
    remove_single_database_leftovers(dir);
    tracing::info!(records = moved, "log moved to one database per segment");
    Ok(())
}

/// What is left of a single-database log once its `db` file is gone (best effort: none of
/// it is read again).
fn remove_single_database_leftovers(dir: &Path) {
    let _ = fs::remove_file(dir.join("conf"));
    let _ = fs::remove_dir_all(dir.join("blobs"));
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with("snap.") {
                let _ = fs::remove_file(entry.path());
            }
        }
    }
}

/// The opened log, before its writer starts: recovery reads it, then `start_writer`.
pub struct Log {
    segments: Arc<Segments>,
    segment_records: u64,
    flush_interval: Duration,
}

impl Log {
    pub fn open(dir: &Path) -> Result<Log, OpenError> {
        let segments = Segments::open(dir)?;
        migrate_single_database(&segments, SEGMENT_RECORDS_DEFAULT)?;
        Ok(Log {
            segments: Arc::new(segments),
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
        let mut last = 0;
        for slot in self.segments.list().iter().rev() {
            let Some(segment) = open_segment(slot)? else {
                continue;
            };
            if let Some((key, _)) = segment.db().last().map_err(sled_err(&slot.path))? {
                last = seq_of(&key)?;
                break;
            }
        }
        Ok(last.max(self.segments.mark()))
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
    /// goes at once, by a rename; sled persists a prefix of its operations).
    pub fn truncate_from(&self, seq: u64) -> Result<u64, OpenError> {
        let mut removed = 0;
        for slot in self.segments.list().into_iter().rev() {
            let Some(segment) = open_segment(&slot)? else {
                continue;
            };
            let err = sled_err(&slot.path);
            if slot.first >= seq {
                removed += segment.db().len() as u64;
                drop(segment);
                self.segments.remove(slot.first)?;
                continue;
            }
            loop {
                let keys: Vec<_> = segment
                    .db()
                    .range(seq.to_be_bytes()..)
                    .keys()
                    .rev()
                    .take(TRUNCATE_BATCH_RECORDS)
                    .collect::<Result<_, _>>()
                    .map_err(&err)?;
                if keys.is_empty() {
                    break;
                }
                let mut batch = sled::Batch::default();
                for key in &keys {
                    batch.remove(key.clone());
                }
                segment.db().apply_batch(batch).map_err(&err)?;
                removed += keys.len() as u64;
            }
            segment.db().flush().map_err(&err)?;
            break;
        }
        self.flush()?;
        Ok(removed)
    }

    /// Flushes everything written so far (only while no writer runs).
    pub fn flush(&self) -> Result<(), OpenError> {
        self.segments.flush()
    }

    /// Starts the writer thread; the log is then written only through the handle. The
    /// first record written gets `next_seq`.
    pub fn start_writer(
        self,
        next_seq: u64,
    ) -> Result<(LogHandle, thread::JoinHandle<()>), OpenError> {
        let (tx, rx) = mpsc::channel();
        let fail_writes = Arc::new(AtomicBool::new(false));
        let failed = Arc::new(AtomicBool::new(false));
        let durable = Arc::new(AtomicU64::new(next_seq - 1));
        let counters = Arc::new(WriterCounters::default());
        // Appends continue the newest segment, unless it is full (or there is none). A
        // newest segment that starts after `next_seq` was created ahead of need and never
        // written (a crash, or a cut by `truncate_from`): removed, so that no record is
        // ever stored under a later segment's name. Failing that is an error: segments must
        // follow one another, or truncation and readers would misjudge where one ends.
        let mut current = None;
        while let Some(slot) = self.segments.list().pop() {
            let Some(segment) = open_segment(&slot)? else {
                break;
            };
            if slot.first > next_seq && segment.db().is_empty() {
                drop(segment);
                self.segments.remove(slot.first)?;
                continue;
            }
            current = Some(segment);
            break;
        }
        let writer = Writer {
            failed_flag: failed.clone(),
            durable: durable.clone(),
            counters: counters.clone(),
            segments: self.segments,
            current,
            preparing: None,
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
        Ok((
            LogHandle {
                tx,
                fail_writes,
                failed,
                durable,
                counters,
            },
            join,
        ))
    }
}

/// Reads the log while the writer runs (sled is safe to read concurrently), and drops its
/// front once snapshots cover it.
#[derive(Clone)]
pub struct LogReader {
    segments: Arc<Segments>,
}

/// What `stockd log dump` reports.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct LogSummary {
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    pub records: u64,
    /// Encoded record bytes (what sled stores as values; its own overhead is not counted).
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
    /// snapshot worker verifies what it is sent).
    pub fn raw_records_after(
        &self,
        after: u64,
    ) -> impl Iterator<Item = Result<(u64, sled::IVec), OpenError>> + Send + 'static {
        Records {
            service: self.segments.service.clone(),
            slots: self.segments.after(after).into(),
            from: after.saturating_add(1),
            current: None,
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
        let mark = self.segments.raise_mark(seq)?;
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
        let slots = self.segments.list();
        let mut summary = LogSummary {
            truncated_through: self.truncated_through(),
            segments: slots.len(),
            ..LogSummary::default()
        };
        for slot in slots {
            let Some(segment) = open_segment(&slot)? else {
                continue;
            };
            for item in segment.db().iter() {
                let (key, value) = item.map_err(sled_err(&slot.path))?;
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
    /// The segment being read. (The iterator comes before the reference, so it is dropped
    /// first: the database closes when both are gone.)
    current: Option<Box<(sled::Iter, SegmentRef)>>,
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
    type Item = Result<(u64, sled::IVec), OpenError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if self.failed {
                return None;
            }
            if let Some(reading) = &mut self.current {
                let (iter, segment) = &mut **reading;
                if let Some(item) = iter.next() {
                    self.yielded = true;
                    let item = item.map_err(sled_err(&segment.slot.path));
                    return Some(item.and_then(|(key, value)| Ok((seq_of(&key)?, value))));
                }
                let done = self.current.take();
                self.service.run(Box::new(move || drop(done)));
            }
            match self.open_next()? {
                // (A segment truncated after it was opened is read all the same: its
                // records are still right, and the reader wants them.)
                Ok(Some(segment)) => {
                    let iter = segment.db().range(self.from.to_be_bytes()..);
                    self.current = Some(Box::new((iter, segment)));
                }
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

impl Drop for Records {
    fn drop(&mut self) {
        let current = self.current.take();
        self.service.run(Box::new(move || drop(current)));
        // An opening ahead holds a reference once it is done: closed after it.
        if let Some(Ok(Ok(Some(segment)))) = self.opening.take().map(|o| o.recv()) {
            self.service.close(segment);
        }
    }
}

/// Decodes and verifies the stored bytes of record `seq` (a failure names the record).
pub fn decode_at(seq: u64, bytes: &[u8]) -> Result<Record, OpenError> {
    record::decode(bytes).map_err(|source| OpenError::Damaged { seq, source })
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
    let key = seq.to_be_bytes();
    for slot in log.segments.list() {
        let Some(segment) = open_segment(&slot)? else {
            continue;
        };
        let err = sled_err(&slot.path);
        if let Some(value) = segment.db().get(key).map_err(&err)? {
            let mut value = value.to_vec();
            if let Some(last) = value.last_mut() {
                *last ^= 0x5a;
            }
            segment.db().insert(key, value).map_err(&err)?;
            segment.db().flush().map_err(&err)?;
        }
    }
    Ok(())
}

struct Writer {
    segments: Arc<Segments>,
    /// The segment being appended to.
    current: Option<SegmentRef>,
    /// The next segment, being created ahead of need on the segment thread: (its first
    /// sequence, the answer).
    preparing: Option<(u64, mpsc::Receiver<Result<SegmentRef, OpenError>>)>,
    segment_records: u64,
    flush_interval: Duration,
    next_seq: u64,
    /// Set on the first failed write; the log never writes again.
    failed: Option<LogError>,
    failed_flag: Arc<AtomicBool>,
    fail_writes: Arc<AtomicBool>,
    durable: Arc<AtomicU64>,
    counters: Arc<WriterCounters>,
}

type Waiter = oneshot::Sender<Result<u64, LogError>>;

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Command>) {
        let mut records: Vec<(Record, Option<Waiter>)> = Vec::with_capacity(LOG_BATCH_RECORDS_MAX);
        // Each barrier with the number of this batch's records queued before it.
        let mut barriers: Vec<(Waiter, u64)> = Vec::new();
        let mut last_flush = Instant::now();
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
            last_flush = Instant::now();
            while shutdown.is_none() && records.len() < LOG_BATCH_RECORDS_MAX {
                match rx.try_recv() {
                    Ok(cmd) => self.take(cmd, &mut records, &mut barriers, &mut shutdown),
                    Err(_) => break,
                }
            }
            let first_seq = self.next_seq;
            let started = Instant::now();
            let outcome = self.write_batch(&records);
            if let Ok(last) = outcome {
                self.durable.store(last, Ordering::SeqCst);
                if !records.is_empty() {
                    let c = &self.counters;
                    c.batches.fetch_add(1, Ordering::Relaxed);
                    c.records.fetch_add(records.len() as u64, Ordering::Relaxed);
                    let ns = started.elapsed().as_nanos().min(u128::from(u64::MAX)) as u64;
                    c.write_ns.fetch_add(ns, Ordering::Relaxed);
                }
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
        // Each segment gets one sled batch of the records that fit in it, and is flushed
        // before the next segment is written: the disk always holds a prefix of the log.
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
                continue;
            }
            let (now, later) = rest.split_at(rest.len().min(room as usize));
            let segment = self.current.as_ref().expect("a segment is open");
            let mut batch = sled::Batch::default();
            for (record, _) in now {
                batch.insert(&seq.to_be_bytes(), record::encode(record));
                seq += 1;
            }
            segment.db().apply_batch(batch).map_err(io)?;
            segment.db().flush().map_err(io)?;
            rest = later;
        }
        debug_assert!(seq == self.next_seq + records.len() as u64);
        self.next_seq = seq;
        self.prepare_next_segment();
        Ok(seq - 1)
    }

    /// Once the current segment is half full, its successor is created on the segment thread
    /// (sled creates its files, the directory is synced: a few milliseconds that would
    /// otherwise stall every waiting acknowledgement when the segment fills up).
    fn prepare_next_segment(&mut self) {
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
    fn next_segment(&mut self, first: u64) -> Result<SegmentRef, OpenError> {
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

    fn finish(mut self, shutdown: Option<Waiter>) {
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
        if !self.segments.guard.wait_closed(Duration::from_secs(30)) {
            tracing::warn!("log segments still open 30 s after the writer stopped");
        }
        drop(self.segments);
        if let Some(waiter) = shutdown {
            let _ = waiter.send(result);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn created(i: u64) -> Record {
        Record::ProductCreated {
            sku: format!("SKU-{i}"),
            name: "n".into(),
            price: None,
            on_hand: i,
            at: 1,
        }
    }

    /// Writes records `1..=n` through the real writer, in segments of `per_segment`.
    fn write(dir: &Path, n: u64, per_segment: u64) {
        let log = Log::open(dir).unwrap().with_segment_records(per_segment);
        let next = log.last_seq().unwrap() + 1;
        let (handle, join) = log.start_writer(next).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(async {
            let tickets: Vec<_> = (next..next + n)
                .map(|i| handle.append(created(i)))
                .collect();
            for ticket in tickets {
                ticket.durable().await.unwrap();
            }
            handle.shutdown().await.unwrap();
        });
        join.join().unwrap();
    }

    fn segment_dirs(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name.starts_with(SEGMENT_PREFIX))
            .collect();
        names.sort();
        names
    }

    /// Polls `done` for up to 10 s (work finishing on the segment thread); the caller
    /// asserts the outcome.
    fn wait_until(done: impl Fn() -> bool) {
        let started = Instant::now();
        while !done() && started.elapsed() < Duration::from_secs(10) {
            thread::sleep(Duration::from_millis(10));
        }
    }

    fn seqs(reader: &LogReader) -> Vec<u64> {
        reader.records().map(|r| r.unwrap().0).collect()
    }

    #[test]
    fn truncation_deletes_whole_segment_directories() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("log");
        write(&dir, 50, 10);
        assert_eq!(segment_dirs(&dir).len(), 5);
        let log = Log::open(&dir).unwrap();
        let reader = log.reader();
        // Segments 1-10 and 11-20 end at or before 25; 21-30 straddles it and stays.
        assert_eq!(reader.truncate_through(25).unwrap(), 20);
        assert_eq!(
            segment_dirs(&dir),
            vec![
                segment_dir_name(21),
                segment_dir_name(31),
                segment_dir_name(41)
            ]
        );
        assert_eq!(seqs(&reader), (21..=50).collect::<Vec<_>>());
        assert_eq!(reader.truncated_through(), 25);
        // The mark is durable and never lowered.
        assert_eq!(reader.truncate_through(5).unwrap(), 0);
        drop((reader, log));
        let log = Log::open(&dir).unwrap();
        assert_eq!(log.reader().truncated_through(), 25);
        assert_eq!(log.last_seq().unwrap(), 50);
    }

    #[test]
    fn a_segment_truncated_while_it_is_read_goes_when_its_reader_is_done() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("log");
        write(&dir, 30, 10);
        let log = Log::open(&dir).unwrap();
        let reader = log.reader();
        let mut records = reader.records();
        assert_eq!(records.next().unwrap().unwrap().0, 1);
        reader.truncate_through(20).unwrap();
        // Truncated segments leave their names at once (a new segment could take them)...
        assert_eq!(segment_dirs(&dir), vec![segment_dir_name(21)]);
        // ...but one being read is read on to its end; the second is read too if it was
        // already opened ahead, else the stream ends there (never a hole, never a wrong
        // or reordered record: a fold then reports the log short of what it asked for).
        let rest: Vec<u64> = records.map(|r| r.unwrap().0).collect();
        let all: Vec<u64> = (2..=30).collect();
        let ended: Vec<u64> = (2..=10).collect();
        assert!(rest == all || rest == ended, "{rest:?}");
        drop(reader);
        // Segments are closed on the segment thread once read; then the trash goes.
        let entries = || fs::read_dir(&dir).unwrap().count();
        wait_until(|| entries() <= 3);
        // LOCK, truncated_through, segment-21.
        assert_eq!(
            entries(),
            3,
            "{:?}",
            fs::read_dir(&dir).unwrap().collect::<Vec<_>>()
        );
        assert_eq!(segment_dirs(&dir), vec![segment_dir_name(21)]);
    }

    /// A segment removed while someone reads it gives up its name at once: a segment
    /// created under that name meanwhile is a new one, untouched when the reader lets go
    /// of the old one (whose files are deleted then).
    #[test]
    fn a_name_freed_by_a_removal_can_be_taken_while_the_old_segment_is_read() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("log");
        write(&dir, 8, 10);
        let log = Log::open(&dir).unwrap();
        let reader = log.reader();
        let mut records = reader.records();
        assert_eq!(records.next().unwrap().unwrap().0, 1);
        log.segments.remove(1).unwrap();
        let new = log.segments.create(1).unwrap();
        new.db().insert(100u64.to_be_bytes(), vec![1]).unwrap();
        new.db().flush().unwrap();
        drop(new);
        // The reader still reads the old segment to its end.
        let rest: Vec<u64> = records.map(|r| r.unwrap().0).collect();
        assert_eq!(rest, (2..=8).collect::<Vec<_>>());
        drop(reader);
        let trash = || {
            fs::read_dir(&dir)
                .unwrap()
                .filter(|e| {
                    let name = e.as_ref().unwrap().file_name();
                    name.to_string_lossy().starts_with(TRASH_PREFIX)
                })
                .count()
        };
        wait_until(|| trash() == 0);
        assert_eq!(trash(), 0, "the old segment's files are deleted");
        assert_eq!(segment_dirs(&dir), vec![segment_dir_name(1)]);
        let slot = log.segments.list()[0].clone();
        let segment = open_segment(&slot).unwrap().unwrap();
        assert_eq!(segment.db().len(), 1, "the new segment is intact");
    }

    #[test]
    fn a_segment_directory_under_another_spelling_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("log");
        write(&dir, 5, 10);
        fs::rename(dir.join(segment_dir_name(1)), dir.join("segment-1")).unwrap();
        let err = Log::open(&dir).err().expect("refused");
        assert!(err.to_string().contains("segment-1"), "{err}");
        assert!(err.to_string().contains("not a log segment name"), "{err}");
    }

    #[test]
    fn a_second_open_of_the_same_log_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("log");
        let log = Log::open(&dir).unwrap();
        let err = Log::open(&dir).err().expect("the directory is locked");
        assert!(matches!(err, OpenError::Locked { .. }), "{err}");
        drop(log);
        Log::open(&dir).unwrap();
    }

    /// sled writes a page-table snapshot when a database is opened (here: read the first
    /// time after writing), to `snap.<lsn>.generating` and then renamed; `kill -9` between
    /// the two left a file that made every later open of that segment fail.
    #[test]
    fn a_storage_snapshot_left_half_written_by_a_crash_does_not_stop_the_log_opening() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("log");
        write(&dir, 25, 10);
        let segments = segment_dirs(&dir);
        assert_eq!(segments.len(), 3);
        // The segment at the front has never been reopened: a crash during its first
        // snapshot leaves only the unfinished file.
        fs::write(
            dir.join(&segments[0])
                .join("snap.FFFFFFFFFFFFFFFF.generating"),
            vec![7u8; 4096],
        )
        .unwrap();
        // The second has been read once (sled wrote `snap.<lsn>`); a crash during the next
        // snapshot leaves half of one beside it, under a name that sorts after it.
        {
            let log = Log::open(&dir).unwrap();
            assert_eq!(seqs(&log.reader()), (1..=25).collect::<Vec<_>>());
        }
        let second = dir.join(&segments[1]);
        let finished = fs::read_dir(&second)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .find(|name| name.starts_with("snap.") && !name.ends_with(".generating"))
            .expect("sled wrote a snapshot when the segment was first read");
        let bytes = fs::read(second.join(&finished)).unwrap();
        fs::write(
            second.join(format!("{finished}.generating")),
            &bytes[..bytes.len() / 2],
        )
        .unwrap();

        let log = Log::open(&dir).unwrap();
        assert_eq!(seqs(&log.reader()), (1..=25).collect::<Vec<_>>());
        for segment in &segments {
            let left: Vec<_> = fs::read_dir(dir.join(segment))
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|name| name.ends_with(".generating"))
                .collect();
            assert!(left.is_empty(), "{segment}: {left:?}");
        }
    }

    #[test]
    fn appends_continue_the_newest_segment_across_restarts() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("log");
        write(&dir, 7, 10);
        write(&dir, 7, 10);
        assert_eq!(
            segment_dirs(&dir),
            vec![segment_dir_name(1), segment_dir_name(11)]
        );
        let log = Log::open(&dir).unwrap();
        assert_eq!(seqs(&log.reader()), (1..=14).collect::<Vec<_>>());
    }

    #[test]
    fn a_segment_created_ahead_is_never_written_under_its_name_too_early() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("log");
        // 15 records: the second segment is half full, so the third is created ahead;
        // a clean shutdown removes it again.
        write(&dir, 15, 10);
        assert_eq!(
            segment_dirs(&dir),
            vec![segment_dir_name(1), segment_dir_name(11)]
        );
        // After a crash it would still be there, empty: appends go on in the second.
        drop(open_sled(&dir.join(segment_dir_name(21))).unwrap());
        write(&dir, 3, 10);
        assert_eq!(
            segment_dirs(&dir),
            vec![segment_dir_name(1), segment_dir_name(11)]
        );
        let log = Log::open(&dir).unwrap();
        assert_eq!(seqs(&log.reader()), (1..=18).collect::<Vec<_>>());
        drop(log);
        // Across many segments, every one holds exactly its own records.
        write(&dir, 100, 10);
        let log = Log::open(&dir).unwrap();
        assert_eq!(seqs(&log.reader()), (1..=118).collect::<Vec<_>>());
        for slot in log.segments.list() {
            let segment = open_segment(&slot).unwrap().unwrap();
            let (first, _) = segment.db().first().unwrap().unwrap();
            assert_eq!(seq_of(&first).unwrap(), slot.first);
        }
    }

    #[test]
    fn a_damaged_mark_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("log");
        write(&dir, 30, 10);
        Log::open(&dir)
            .unwrap()
            .reader()
            .truncate_through(12)
            .unwrap();
        let mut bytes = fs::read(dir.join(MARK_FILE)).unwrap();
        bytes[3] ^= 1;
        fs::write(dir.join(MARK_FILE), bytes).unwrap();
        let err = Log::open(&dir).err().expect("a damaged mark");
        assert!(matches!(err, OpenError::BadMark { .. }), "{err}");
    }

    #[test]
    fn cutting_the_end_removes_later_segments_and_part_of_one() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("log");
        write(&dir, 30, 10);
        let log = Log::open(&dir).unwrap();
        assert_eq!(log.truncate_from(15).unwrap(), 16);
        assert_eq!(seqs(&log.reader()), (1..=14).collect::<Vec<_>>());
        drop(log);
        assert_eq!(segment_dirs(&dir).len(), 2);
        write(&dir, 10, 10);
        let log = Log::open(&dir).unwrap();
        assert_eq!(seqs(&log.reader()), (1..=24).collect::<Vec<_>>());
    }

    /// Writes the layout of earlier versions: one sled database in `dir`, a tree per
    /// segment, the mark in `meta`.
    fn write_single_database(dir: &Path, n: u64, per_tree: u64, mark: u64) {
        let db = sled::Config::new().path(dir).open().unwrap();
        let mut first = 1;
        while first <= n {
            let name = if first == 1 {
                "wal".to_string()
            } else {
                format!("wal-{first:020}")
            };
            let tree = db.open_tree(name).unwrap();
            for seq in first..(first + per_tree).min(n + 1) {
                tree.insert(seq.to_be_bytes(), record::encode(&created(seq)))
                    .unwrap();
            }
            first += per_tree;
        }
        if mark > 0 {
            let meta = db.open_tree("meta").unwrap();
            meta.insert(b"truncated_through", &mark.to_be_bytes())
                .unwrap();
        }
        db.flush().unwrap();
    }

    #[test]
    fn a_single_database_log_is_moved_to_a_database_per_segment() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("log");
        write_single_database(&dir, 100_000, 40_000, 3);
        let log = Log::open(&dir).unwrap();
        assert!(!dir.join("db").exists() && !dir.join("conf").exists());
        assert_eq!(segment_dirs(&dir).len(), 2); // 65,536 records per segment
        let reader = log.reader();
        assert_eq!(reader.truncated_through(), 3);
        let read: Vec<(u64, Record)> = reader.records().map(|r| r.unwrap()).collect();
        assert_eq!(read.len(), 100_000);
        assert!(read.iter().all(|(seq, record)| *record == created(*seq)));
        drop((reader, log));
        write(&dir, 5, SEGMENT_RECORDS_DEFAULT);
        assert_eq!(Log::open(&dir).unwrap().last_seq().unwrap(), 100_005);
    }

    #[test]
    fn an_interrupted_move_starts_again() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("log");
        write_single_database(&dir, 30, 16, 0);
        // What a crash in the middle of a move (by a build with other segment sizes) can
        // leave: a partial new segment beside the old database.
        {
            let partial = open_sled(&dir.join(segment_dir_name(17))).unwrap();
            partial
                .insert(17u64.to_be_bytes(), record::encode(&created(17)))
                .unwrap();
            partial.flush().unwrap();
        }
        let log = Log::open(&dir).unwrap();
        assert_eq!(seqs(&log.reader()), (1..=30).collect::<Vec<_>>());
        assert!(!dir.join("db").exists());
        assert_eq!(segment_dirs(&dir), vec![segment_dir_name(1)]);
    }
}
