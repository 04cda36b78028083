//! Segments: each a sled database in its own directory `segment-<first sequence>`, opened
//! while someone uses it and closed (and, once truncated, deleted) by its last user; and
//! the one thread that opens and closes them off the reader's and the writer's paths.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use crate::storage::snapshot::sync_dir;

use super::*;

/// Records per log segment (one sled database each) before the writer starts the next one.
pub const SEGMENT_RECORDS_DEFAULT: u64 = 65_536;
/// A segment's directory in the log directory: this prefix and its first sequence number.
pub(super) const SEGMENT_PREFIX: &str = "segment-";
/// A segment being deleted is renamed to this prefix first, so that a crash in the middle
/// of the deletion leaves a directory the next open removes, never half a segment.
pub(super) const TRASH_PREFIX: &str = "trash-";
/// sled's page cache per open segment: more than a segment of 65,536 records holds (~10–20
/// MB), so that sled never evicts while one is written or read. Only the newest segment
/// stays open, older ones only while they are read (and two, a second longer, for readers
/// of Raft entries: `KEEP_OPEN`), so this bounds little in practice.
pub(super) const SEGMENT_CACHE_BYTES: u64 = 64 * 1024 * 1024;
/// `SEGMENT_CACHE_BYTES`, or in a `memory-probe` build `STOCKD_SEGMENT_CACHE_BYTES`.
fn segment_cache_bytes() -> u64 {
    #[cfg(feature = "memory-probe")]
    if let Some(bytes) = std::env::var("STOCKD_SEGMENT_CACHE_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return bytes;
    }
    SEGMENT_CACHE_BYTES
}
/// How long opening a segment retries while sled's lock on it is still held by the
/// instance being closed (its last handle can outlive the close by a moment).
pub(super) const SEGMENT_LOCK_RETRY: Duration = Duration::from_secs(2);

pub(super) fn segment_dir_name(first_seq: u64) -> String {
    format!("{SEGMENT_PREFIX}{first_seq:020}")
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
pub(super) fn remove_unfinished_sled_snapshots(dir: &Path) -> Result<(), OpenError> {
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

pub(super) fn open_sled(path: &Path) -> Result<sled::Db, OpenError> {
    remove_unfinished_sled_snapshots(path)?;
    let started = Instant::now();
    loop {
        let result = sled::Config::new()
            .path(path)
            .cache_capacity(segment_cache_bytes())
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
pub(super) struct Slot {
    pub(super) first: u64,
    pub(super) path: PathBuf,
    pub(super) state: Mutex<SlotState>,
    /// The log's count of open segment databases.
    pub(super) guard: Arc<DirGuard>,
}

/// Counts the segment databases open, so that the writer's shutdown can wait until the
/// last one is closed (some close on the segment thread).
pub(super) struct DirGuard {
    pub(super) open: Mutex<usize>,
    pub(super) closed: std::sync::Condvar,
    /// Segment databases opened since the log was (what keeping them open saves).
    pub(super) opened: AtomicU64,
}

impl DirGuard {
    pub(super) fn count(&self, delta: isize) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        *open = open.saturating_add_signed(delta);
        if *open == 0 {
            self.closed.notify_all();
        }
    }

    /// Waits until no segment database is open (or `limit` passed); true if none is.
    pub(super) fn wait_closed(&self, limit: Duration) -> bool {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let (open, _) = self
            .closed
            .wait_timeout_while(open, limit, |open| *open > 0)
            .unwrap_or_else(|e| e.into_inner());
        *open == 0
    }
}

#[derive(Default)]
pub(super) struct SlotState {
    /// The open database, while `users` > 0.
    pub(super) db: Option<sled::Db>,
    pub(super) users: usize,
    /// Truncated: never opened again. Its directory was renamed to this trash path at
    /// once (so its name is free for a new segment); deleted once its last user is done.
    pub(super) removed: bool,
    pub(super) trash: Option<PathBuf>,
}

impl Slot {
    pub(super) fn state(&self) -> MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A segment held open; the database is closed (and, if the segment was truncated
/// meanwhile, deleted) when the last of these is dropped.
pub(super) struct SegmentRef {
    pub(super) slot: Arc<Slot>,
    pub(super) db: Option<sled::Db>,
}

impl SegmentRef {
    pub(super) fn db(&self) -> &sled::Db {
        self.db
            .as_ref()
            .expect("a segment is open until its reference is dropped")
    }

    pub(super) fn first(&self) -> u64 {
        self.slot.first
    }

    /// The segment's directory.
    pub(super) fn path(&self) -> &std::path::Path {
        &self.slot.path
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
pub(super) fn trash_segment_dir(path: &Path) -> io::Result<(PathBuf, io::Result<()>)> {
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
pub(super) struct Segments {
    pub(super) dir: PathBuf,
    pub(super) slots: Mutex<BTreeMap<u64, Arc<Slot>>>,
    pub(super) mark: Mutex<Mark>,
    pub(super) guard: Arc<DirGuard>,
    /// A normal-class thread that opens and closes segments for readers and the writer
    /// (see `Service`).
    pub(super) service: Service,
    /// Holds the `flock` on `LOCK` for as long as anything uses the log (the writer's
    /// shutdown waits for every segment to be closed before it lets go of it).
    pub(super) _lock: DirLock,
}

pub(super) type ServiceJob = Box<dyn FnOnce() + Send>;

/// How long a segment a reader of Raft entries is done with stays open on the segment
/// thread (`Service::keep`). The engine reads the log in short ranges (a replay on
/// start-up, a lagging follower's catch-up): without this, every one of them would open
/// a sealed segment and close it again (~16 ms of sled's start-up and shut-down each).
pub(super) const KEEP_OPEN: Duration = Duration::from_secs(1);
/// Segments kept open that way at most (the newest kept; the active segment is open
/// anyway, so two cover a read crossing from a sealed segment into it).
pub(super) const KEEP_OPEN_MAX: usize = 2;

/// What the segment thread is asked to do.
enum Job {
    Run(ServiceJob),
    /// Keep this reference until `KEEP_OPEN` after the last time it was kept.
    Keep(SegmentRef),
    /// Drop the references kept of the segment starting at this sequence (`None`: all).
    Forget(Option<u64>),
}

/// The segments the thread keeps open for readers, oldest first.
#[derive(Default)]
struct Kept(Vec<(SegmentRef, Instant)>);

impl Kept {
    fn keep(&mut self, segment: SegmentRef) {
        // A truncated segment is deleted by its last user: not kept from it.
        if segment.slot.state().removed {
            return;
        }
        self.forget(Some(segment.first()));
        self.0.push((segment, Instant::now() + KEEP_OPEN));
        if self.0.len() > KEEP_OPEN_MAX {
            self.0.remove(0);
        }
    }

    fn forget(&mut self, first: Option<u64>) {
        self.0
            .retain(|(segment, _)| first.is_some_and(|first| segment.first() != first));
    }

    fn expire(&mut self) {
        let now = Instant::now();
        self.0.retain(|(_, until)| *until > now);
    }

    /// Until the next one expires.
    fn next_expiry(&self) -> Option<Duration> {
        let until = self.0.iter().map(|(_, until)| *until).min()?;
        Some(until.saturating_duration_since(Instant::now()))
    }
}

/// Opening a segment (~10 ms: sled reads its own log) and closing one (~6 ms) are done
/// off the reader's and the writer's paths, on this one thread. It is started by whoever
/// opens the log (start-up, in the normal scheduling class), not by a snapshot job: a
/// thread started from a `SCHED_IDLE` job would be idle-class too, and so would the
/// threads sled's shared pool starts from it (opening a segment hands its reads to that
/// pool, starting threads as needed), which the writer's flushes also use. For the same
/// reason it keeps the normal class: a nice-10 thread would lower those threads too.
///
/// It also keeps the segments readers of Raft entries were done with open a little longer
/// (`keep`), so that the engine's consecutive short reads open a sealed segment once.
#[derive(Clone)]
pub(super) struct Service(mpsc::Sender<Job>);

impl Service {
    pub(super) fn start() -> Service {
        let (tx, rx) = mpsc::channel::<Job>();
        let started = thread::Builder::new()
            .name("stockd-log-segments".into())
            .spawn(move || {
                let mut kept = Kept::default();
                loop {
                    let job = match kept.next_expiry() {
                        Some(wait) => rx.recv_timeout(wait),
                        None => rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected),
                    };
                    match job {
                        Ok(Job::Run(job)) => job(),
                        Ok(Job::Keep(segment)) => kept.keep(segment),
                        Ok(Job::Forget(first)) => kept.forget(first),
                        Err(mpsc::RecvTimeoutError::Timeout) => {}
                        Err(mpsc::RecvTimeoutError::Disconnected) => break,
                    }
                    kept.expire();
                }
            });
        if let Err(err) = started {
            tracing::warn!(error = %err, "no segment thread: segments are opened and closed inline");
        }
        Service(tx)
    }

    /// Runs `job` on the service thread, or here if that is gone.
    pub(super) fn run(&self, job: ServiceJob) {
        if let Err(mpsc::SendError(Job::Run(job))) = self.0.send(Job::Run(job)) {
            job();
        }
    }

    /// Opens `slot` on the service thread; the answer comes on the returned channel.
    pub(super) fn open(
        &self,
        slot: Arc<Slot>,
    ) -> mpsc::Receiver<Result<Option<SegmentRef>, OpenError>> {
        let (tx, rx) = mpsc::channel();
        self.run(Box::new(move || {
            let _ = tx.send(open_segment(&slot));
        }));
        rx
    }

    /// Closes a segment (drops this reference) on the service thread.
    pub(super) fn close(&self, segment: SegmentRef) {
        self.run(Box::new(move || drop(segment)));
    }

    /// Hands a reader's segment to the service thread, which keeps it open for
    /// `KEEP_OPEN` (a reader opening it meanwhile shares it), then closes it.
    pub(super) fn keep(&self, segment: SegmentRef) {
        // With no thread, the reference is dropped here: closed now.
        let _ = self.0.send(Job::Keep(segment));
    }

    /// Closes what the service thread keeps open of the segment starting at `first`
    /// (`None`: every segment): a truncated segment, or the log shutting down.
    pub(super) fn forget(&self, first: Option<u64>) {
        let _ = self.0.send(Job::Forget(first));
    }
}

impl Segments {
    pub(super) fn open(dir: &Path) -> Result<Segments, OpenError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let lock = lock_dir(dir)?;
        let guard = Arc::new(DirGuard {
            open: Mutex::new(0),
            closed: std::sync::Condvar::new(),
            opened: AtomicU64::new(0),
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
    pub(super) fn list(&self) -> Vec<Arc<Slot>> {
        self.slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// The segments that may hold records after `after`, oldest first (a segment ends
    /// where the next begins, so those that end at or before `after` are left out).
    pub(super) fn after(&self, after: u64) -> Vec<Arc<Slot>> {
        let from = after.saturating_add(1);
        let mut slots = self.list();
        let skip = slots.windows(2).take_while(|w| w[1].first <= from).count();
        slots.drain(..skip);
        slots
    }

    /// Creates the segment whose first record is `first` (or opens it if it exists).
    pub(super) fn create(&self, first: u64) -> Result<SegmentRef, OpenError> {
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
    pub(super) fn remove(&self, first: u64) -> Result<(), OpenError> {
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
        // Kept open for readers: deleted once the service thread lets go of it.
        self.service.forget(Some(first));
        let result = synced.map_err(io_err(&self.dir));
        if state.users == 0 {
            fs::remove_dir_all(&trash).map_err(io_err(&trash))?;
        } else {
            state.trash = Some(trash);
        }
        result
    }

    pub(super) fn mark(&self) -> u64 {
        self.mark_pos().seq
    }

    /// The truncation mark with its term (`None`: a format-1 mark, or none).
    pub(super) fn mark_pos(&self) -> Mark {
        *self.mark.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Raises the truncation mark (never lowers it), durably, before anything it covers
    /// is deleted. `term` is the term of the entry at `seq` in a cluster node's log (a
    /// format-2 mark), `None` for a single server's records.
    pub(super) fn raise_mark(&self, seq: u64, term: Option<u64>) -> Result<u64, OpenError> {
        let mut mark = self.mark.lock().unwrap_or_else(|e| e.into_inner());
        if seq > mark.seq {
            let raised = Mark { seq, term };
            write_mark(&self.dir, raised).map_err(io_err(&self.dir))?;
            *mark = raised;
        }
        Ok(mark.seq)
    }

    /// Flushes every segment that is open.
    pub(super) fn flush(&self) -> Result<(), OpenError> {
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
pub(super) fn open_segment(slot: &Arc<Slot>) -> Result<Option<SegmentRef>, OpenError> {
    let mut state = slot.state();
    if state.removed {
        return Ok(None);
    }
    if state.db.is_none() {
        state.db = Some(open_sled(&slot.path)?);
        slot.guard.count(1);
        slot.guard.opened.fetch_add(1, Ordering::Relaxed);
    }
    state.users += 1;
    Ok(Some(SegmentRef {
        slot: slot.clone(),
        db: state.db.clone(),
    }))
}

pub(super) fn new_slot(dir: &Path, first: u64, guard: &Arc<DirGuard>) -> Slot {
    Slot {
        first,
        path: dir.join(segment_dir_name(first)),
        state: Mutex::new(SlotState::default()),
        guard: guard.clone(),
    }
}
