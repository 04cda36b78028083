//! The snapshotter: one background thread that builds snapshots and drops the log records
//! no kept snapshot needs.
//!
//! A snapshot is built without pausing traffic and without a cut across actors: the newest
//! snapshot is loaded, the log records after it up to a sequence S that is already durable
//! are folded onto it (the one fold: invariant 4 in docs/ARCHITECTURE.md), and the result is written as "the state
//! after record S". A running server does that in its snapshot worker process, fed the log
//! by this thread (`crate::storage::snapshot_worker`); offline, or without a worker, this thread
//! does it itself. The actors never stop; the writer keeps appending records after S.
//!
//! When: every `every_records` durable records, every `every` period if anything changed,
//! on demand (`POST /v1/admin/snapshot`, `Service::snapshot`), and at clean shutdown. The
//! newest `keep` snapshots are kept; once at least two are kept (one to fall back to), the
//! log is truncated through the oldest kept one, so a damaged newest snapshot can always be
//! replaced by an older one plus the log. With `keep = 1` there is no fallback by choice.
//!
//! A thread beside it rebuilds a failed product actor's state (`fold_to`), the same work
//! (the newest snapshot at or before a sequence, plus the log up to it) but urgent: it
//! never waits behind a snapshot.
//!
//! Both read the log through a `LogReader`; the snapshotter must be stopped (`stop`, then
//! join) before the log writer, so that the log is closed when the writer stops.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::oneshot;

use crate::clock::{Millis, SharedClock};
use crate::storage::fold::State;
use crate::storage::log::{LogError, LogHandle, LogReader, OpenError};
use crate::storage::recovery;
use crate::storage::snapshot::{self, WriteHooks};
use crate::storage::snapshot_worker;

/// When snapshots are taken and how many are kept.
#[derive(Clone, Debug)]
pub struct SnapshotPolicy {
    /// Take a snapshot once this many records are durable after the newest one (0: never).
    pub every_records: u64,
    /// Take a snapshot this often if anything changed (`None`: never on a timer).
    pub every: Option<Duration>,
    /// Snapshots kept on disk (at least 1).
    pub keep: usize,
    /// Take one at clean shutdown.
    pub on_shutdown: bool,
}

impl Default for SnapshotPolicy {
    fn default() -> Self {
        SnapshotPolicy {
            every_records: crate::limits::SNAPSHOT_EVERY_RECORDS_DEFAULT,
            every: Some(Duration::from_secs(
                crate::limits::SNAPSHOT_EVERY_SECONDS_DEFAULT,
            )),
            keep: crate::limits::SNAPSHOTS_KEPT_DEFAULT,
            on_shutdown: true,
        }
    }
}

/// A snapshot that was taken (or found already current).
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Taken {
    /// The snapshot is the state after this log record.
    pub sequence: u64,
    /// The file's name inside the snapshot directory.
    pub file: String,
    pub size_bytes: u64,
    /// False when the newest snapshot was already at this sequence (nothing written).
    pub created: bool,
    /// Log records folded onto the previous snapshot to build it.
    pub records_folded: u64,
    /// Log records dropped because no kept snapshot needs them any more.
    pub log_records_dropped: u64,
    pub elapsed_ms: u64,
    /// Where the time went: loading the previous snapshot and folding the log onto it,
    /// then writing and syncing the new file.
    pub build_ms: u64,
    pub write_ms: u64,
    /// True when the state was built in a child process (the snapshot worker), false
    /// when in the server itself (no worker configured, or it could not be started).
    pub worker: bool,
}

/// How much CPU a job may take from requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Priority {
    /// Only CPU time no request wants (`SCHED_IDLE` on Linux): automatic and on-demand
    /// snapshots while the server serves.
    Background,
    /// A fair share, at a lower weight (nice 10): an automatic snapshot that is overdue
    /// (twice the record threshold behind), so a load that keeps every core busy cannot
    /// starve snapshots for ever and let the log grow without bound.
    Overdue,
    /// The normal class, on the snapshot thread itself: someone waits for it and no
    /// requests compete (the final snapshot at shutdown).
    Urgent,
}

/// Why a snapshot (or the fold for a product's rebuild) could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TakeError {
    #[error("the snapshot thread has stopped")]
    Stopped,
    #[error("cannot start a thread for the snapshot: {0}")]
    Thread(io::Error),
    #[error("cannot {action} in {dir}: {source}")]
    Dir {
        action: &'static str,
        dir: String,
        source: io::Error,
    },
    #[error(transparent)]
    Log(#[from] OpenError),
    /// The barrier a rebuild waits for failed: the log cannot be written.
    #[error(transparent)]
    LogFailed(#[from] LogError),
    #[error(transparent)]
    Recovery(#[from] recovery::RecoveryError),
    #[error(transparent)]
    Worker(#[from] snapshot_worker::WorkerError),
}

impl TakeError {
    fn dir(action: &'static str, dir: &Path) -> impl FnOnce(io::Error) -> TakeError {
        let dir = dir.display().to_string();
        move |source| TakeError::Dir {
            action,
            dir,
            source,
        }
    }
}

enum Job {
    Take {
        upto: u64,
        priority: Priority,
        reply: oneshot::Sender<Result<Taken, TakeError>>,
    },
    Stop,
}

/// A request to the rebuild thread: the state after record `upto`.
struct Rebuild {
    upto: u64,
    reply: oneshot::Sender<Result<State, TakeError>>,
}

/// Cheap to clone: a handle on the snapshot thread (and on the rebuild thread beside it:
/// a product's rebuild never waits behind a snapshot being built).
#[derive(Clone)]
pub struct Snapshotter {
    tx: mpsc::Sender<Job>,
    /// `None` stops the rebuild thread.
    rebuilds: mpsc::Sender<Option<Rebuild>>,
    newest: Arc<AtomicU64>,
}

/// Everything the snapshot thread needs.
pub struct SnapshotterArgs {
    pub reader: LogReader,
    pub log: LogHandle,
    pub dir: PathBuf,
    pub policy: SnapshotPolicy,
    pub clock: SharedClock,
    pub hooks: WriteHooks,
    /// Sequence of the newest snapshot at start-up (0: none).
    pub newest: u64,
    /// The `stockd` binary to build snapshots in a child process with
    /// (`crate::storage::snapshot_worker`); `None`: in this process.
    pub worker: Option<PathBuf>,
    /// No snapshot is taken past this record (`None`: no ceiling): the change feed's store
    /// is synced through it (`crate::feed::Feed::synced`). A snapshot past the feed's store
    /// would leave records whose events no restart could derive again.
    pub ceiling: Option<Arc<AtomicU64>>,
}

/// How long a snapshot waits for the ceiling to reach the sequence asked for, before it
/// is taken at the ceiling instead (the projector syncs every `PROJECTOR_SYNC_MS`).
const CEILING_WAIT_MS: u64 = 2_000;

impl Snapshotter {
    /// Starts the thread; `stop` it, then join the handle.
    pub fn start(args: SnapshotterArgs) -> (Snapshotter, thread::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel();
        let newest = Arc::new(AtomicU64::new(args.newest));
        let worker = Worker {
            newest: newest.clone(),
            last_taken: Instant::now(),
            retry_at: None,
            args,
        };
        // Rebuilds of failed products get a thread of their own, in the normal class: the
        // product answers 503 until its rebuild is done, so it must not wait for a
        // snapshot that requests keep from running (a background snapshot yields the CPU
        // to every request). Reading the log beside a snapshot being built is safe; if a
        // truncation pulls records from under a rebuild, recovery reports the log short
        // of the barrier (`RecoveryError::Short`) and the supervisor tries again with a
        // fresh barrier.
        let (rebuilds, rebuild_rx) = mpsc::channel();
        let rebuild_args = (worker.args.reader.clone(), worker.args.dir.clone());
        let rebuilder = thread::Builder::new()
            .name("stockd-rebuild".into())
            .spawn(move || rebuild(rebuild_args.0, rebuild_args.1, rebuild_rx))
            .expect("spawning the rebuild thread");
        let join = thread::Builder::new()
            .name("stockd-snapshotter".into())
            .spawn(move || {
                // Both threads read the log: neither may outlive the snapshotter, which
                // must be stopped before the log writer so that the log is closed. A guard,
                // so that this holds even if the snapshot thread panics.
                let _rebuilder = JoinOnDrop(Some(rebuilder));
                worker.run(rx);
            })
            .expect("spawning the snapshot thread");
        (
            Snapshotter {
                tx,
                rebuilds,
                newest,
            },
            join,
        )
    }

    /// Takes a snapshot of the state after record `upto` (which must be durable), at the
    /// given priority.
    pub async fn take(&self, upto: u64, priority: Priority) -> Result<Taken, TakeError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job::Take {
                upto,
                priority,
                reply,
            })
            .map_err(|_| TakeError::Stopped)?;
        rx.await.map_err(|_| TakeError::Stopped)?
    }

    /// The state after record `upto` (which must be durable), from the newest snapshot
    /// at or before it plus the log.
    pub fn fold_to(&self, upto: u64) -> oneshot::Receiver<Result<State, TakeError>> {
        let (reply, rx) = oneshot::channel();
        if let Err(mpsc::SendError(Some(Rebuild { reply, .. }))) =
            self.rebuilds.send(Some(Rebuild { upto, reply }))
        {
            let _ = reply.send(Err(TakeError::Stopped));
        }
        rx
    }

    /// Stops the threads after the jobs queued before this; join the handle afterwards.
    pub fn stop(&self) {
        let _ = self.rebuilds.send(None);
        let _ = self.tx.send(Job::Stop);
    }

    /// Sequence of the newest snapshot taken (0: none).
    pub fn newest_seq(&self) -> u64 {
        self.newest.load(Ordering::SeqCst)
    }
}

struct Worker {
    args: SnapshotterArgs,
    newest: Arc<AtomicU64>,
    last_taken: Instant,
    /// After a failed automatic snapshot: not again before this, and the next pause.
    retry_at: Option<(Instant, Duration)>,
}

/// How often the thread checks the automatic policy.
const POLICY_CHECK_MS: u64 = 500;

/// Runs `job` at `priority`: urgent jobs on the snapshot thread itself (which keeps the
/// normal class), the others on a thread of their own that lowers its class first. Linux
/// schedules threads, not processes, and the replay thread a job starts inherits the
/// class. A lowered thread is never raised again (that needs privileges), hence a thread
/// per job rather than switching the snapshot thread back and forth.
///
/// Why `SCHED_IDLE` for background work: at nice 10 a snapshot still took its share of the
/// 2 cores, and a request thread waking up waited for it to be preempted (reserve p99
/// during a 1M-product snapshot went 2.7 -> 10 ms). In `SCHED_IDLE` it runs only on CPU
/// time no request wants, and a waking request thread preempts it at once.
fn run_at<T: Send>(
    priority: Priority,
    job: impl FnOnce() -> Result<T, TakeError> + Send,
) -> Result<T, TakeError> {
    if priority == Priority::Urgent {
        return job();
    }
    on_lowered_thread(priority, job).map_err(TakeError::Thread)?
}

/// Runs `job` on a thread of its own that lowers its scheduling class to `priority`
/// first, and waits for it (see `run_at`; a cluster node's snapshot builds run this way,
/// and the snapshot worker they start inherits the class). Fails if the thread cannot be
/// started; a panic in `job` is raised again here.
pub fn on_lowered_thread<T: Send>(
    priority: Priority,
    job: impl FnOnce() -> T + Send,
) -> std::io::Result<T> {
    thread::scope(|scope| {
        let handle = thread::Builder::new()
            .name("stockd-snapshot-job".into())
            .spawn_scoped(scope, move || {
                lower_priority(priority);
                let result = job();
                crate::memory::release_freed_memory();
                result
            })?;
        match handle.join() {
            Ok(result) => Ok(result),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Lowers the calling thread's scheduling class (see `run_at`).
fn lower_priority(priority: Priority) {
    #[cfg(target_os = "linux")]
    {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: plain system calls about the calling thread, with valid parameters.
        let done = unsafe {
            match priority {
                Priority::Background => libc::sched_setscheduler(0, libc::SCHED_IDLE, &param),
                Priority::Overdue => {
                    let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
                    libc::setpriority(libc::PRIO_PROCESS, tid, 10)
                }
                // Never asked: `run_at` runs urgent jobs on the calling thread as they are.
                Priority::Urgent => 0,
            }
        };
        if done != 0 {
            tracing::debug!(?priority, "cannot lower the snapshot job's priority");
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = priority;
}

/// Joins a thread when dropped (also while unwinding).
struct JoinOnDrop(Option<thread::JoinHandle<()>>);

impl Drop for JoinOnDrop {
    fn drop(&mut self) {
        if let Some(handle) = self.0.take() {
            let _ = handle.join();
        }
    }
}

/// The rebuild thread: the state after a sequence, for a failed product's rebuild.
fn rebuild(reader: LogReader, dir: PathBuf, rx: mpsc::Receiver<Option<Rebuild>>) {
    while let Ok(Some(Rebuild { upto, reply })) = rx.recv() {
        let result = recovery::recover(&reader, &dir, upto)
            .map(|r| r.state)
            .map_err(TakeError::from);
        let _ = reply.send(result);
    }
}

impl Worker {
    fn run(mut self, rx: mpsc::Receiver<Job>) {
        loop {
            match rx.recv_timeout(Duration::from_millis(POLICY_CHECK_MS)) {
                Ok(Job::Take {
                    upto,
                    priority,
                    reply,
                }) => {
                    let _ = reply.send(self.take(upto, priority));
                }
                Err(mpsc::RecvTimeoutError::Timeout) => self.check_policy(),
                Ok(Job::Stop) | Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
        }
    }

    fn check_policy(&mut self) {
        if !self.args.log.is_healthy() {
            return;
        }
        if self.retry_at.is_some_and(|(at, _)| Instant::now() < at) {
            return;
        }
        let durable = self.args.log.durable_seq();
        let newest = self.newest.load(Ordering::SeqCst);
        if durable <= newest {
            return;
        }
        let policy = &self.args.policy;
        let by_count = policy.every_records > 0 && durable - newest >= policy.every_records;
        let by_time = policy
            .every
            .is_some_and(|every| self.last_taken.elapsed() >= every);
        if !(by_count || by_time) {
            return;
        }
        let overdue = policy.every_records > 0 && durable - newest >= 2 * policy.every_records;
        let priority = if overdue {
            Priority::Overdue
        } else {
            Priority::Background
        };
        match self.take(durable, priority) {
            Ok(taken) => {
                self.retry_at = None;
                tracing::info!(
                    sequence = taken.sequence,
                    size_bytes = taken.size_bytes,
                    records_folded = taken.records_folded,
                    log_records_dropped = taken.log_records_dropped,
                    elapsed_ms = taken.elapsed_ms,
                    "snapshot taken"
                )
            }
            Err(err) => {
                // Retried after a pause that doubles up to 5 minutes; the log keeps
                // everything meanwhile.
                let pause = self.retry_at.map_or(Duration::from_secs(5), |(_, p)| {
                    (p * 2).min(Duration::from_secs(300))
                });
                self.retry_at = Some((Instant::now() + pause, pause));
                tracing::error!(error = %err, retry_in_s = pause.as_secs(), "cannot take a snapshot");
            }
        }
    }

    /// `upto`, or less if the ceiling stays below it for `CEILING_WAIT_MS`.
    fn below_ceiling(&self, upto: u64) -> u64 {
        let Some(ceiling) = &self.args.ceiling else {
            return upto;
        };
        let deadline = Instant::now() + Duration::from_millis(CEILING_WAIT_MS);
        loop {
            let at = ceiling.load(Ordering::SeqCst);
            if at >= upto || Instant::now() >= deadline {
                return upto.min(at);
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    fn take(&mut self, upto: u64, priority: Priority) -> Result<Taken, TakeError> {
        let upto = self.below_ceiling(upto);
        let now = self.args.clock.now_ms();
        let args = &self.args;
        let started = Instant::now();
        let built = run_at(priority, || {
            build_snapshot(
                &args.reader,
                &args.dir,
                upto,
                now,
                args.hooks,
                args.worker.as_deref(),
            )
        })?;
        self.newest.fetch_max(built.sequence, Ordering::SeqCst);
        // On this thread, in the normal class: removing log segments takes the segment
        // list's lock, which the log writer needs when it starts a segment; a low-priority
        // thread holding it would hold up the writer (and every acknowledgement) while
        // preempted. (Deleting the directories is cheap: no work inside sled.)
        let taken = drop_unneeded_after(built, &args.reader, &args.dir, args.policy.keep, started)?;
        self.last_taken = Instant::now();
        Ok(taken)
    }
}

/// Builds the snapshot after record `upto` (newest snapshot + log, folded), writes it,
/// keeps the newest `keep` snapshots and drops the log records none of them needs. If the
/// newest snapshot is already at `upto` and verifies, nothing is written.
pub fn take_snapshot(
    reader: &LogReader,
    dir: &Path,
    upto: u64,
    keep: usize,
    now: Millis,
    hooks: WriteHooks,
) -> Result<Taken, TakeError> {
    let started = Instant::now();
    let built = build_snapshot(reader, dir, upto, now, hooks, None)?;
    drop_unneeded_after(built, reader, dir, keep, started)
}

/// The second half of `take_snapshot`: once a snapshot was written, prunes the old ones
/// and drops the log records none of the kept ones needs.
fn drop_unneeded_after(
    mut taken: Taken,
    reader: &LogReader,
    dir: &Path,
    keep: usize,
    started: Instant,
) -> Result<Taken, TakeError> {
    if taken.created {
        taken.log_records_dropped = drop_unneeded(reader, dir, keep)?;
        taken.elapsed_ms = started.elapsed().as_millis() as u64;
    }
    Ok(taken)
}

/// The first half of `take_snapshot`: builds and writes the snapshot after `upto` (or
/// finds it already there); prunes nothing and drops no log records. With a `worker`
/// binary, the state is built in a child process (`crate::storage::snapshot_worker`); if that
/// cannot even be started, here.
fn build_snapshot(
    reader: &LogReader,
    dir: &Path,
    upto: u64,
    now: Millis,
    hooks: WriteHooks,
    worker: Option<&Path>,
) -> Result<Taken, TakeError> {
    let started = Instant::now();
    // The newest snapshot that verifies, if it is already at (or past: a job queued behind
    // a later one) `upto`, is the answer: nothing older is ever written over it.
    let listed = snapshot::list(dir).map_err(TakeError::dir("list the snapshots", dir))?;
    for (seq, path) in listed {
        if seq < upto {
            break;
        }
        if let Ok(info) = snapshot::verify(&path) {
            return Ok(Taken {
                sequence: seq,
                file: snapshot::file_name(seq),
                size_bytes: info.size_bytes,
                created: false,
                records_folded: 0,
                log_records_dropped: 0,
                elapsed_ms: started.elapsed().as_millis() as u64,
                build_ms: 0,
                write_ms: 0,
                worker: false,
            });
        }
    }
    let job = snapshot_worker::Job {
        snapshot_dir: dir.to_path_buf(),
        upto,
        truncated_through: reader.truncated_through(),
        now,
        pause_before_rename: hooks.pause_before_rename,
        entries: false,
        expect_raft: None,
    };
    if let Some(program) = worker {
        match snapshot_worker::build(program, reader, &job) {
            Ok(built) => {
                for skipped in &built.skipped {
                    tracing::warn!(reason = %skipped, "skipped a snapshot that does not verify");
                }
                return Ok(created(built, started, true));
            }
            Err(err @ snapshot_worker::WorkerError::Spawn { .. }) => {
                tracing::warn!(error = %err, "building the snapshot in the server instead");
            }
            Err(err) => return Err(err.into()),
        }
    }
    let recovered = recovery::recover(reader, dir, upto)?;
    let built = snapshot_worker::write(&job, recovered, started)?;
    Ok(created(built, started, false))
}

/// What `build_snapshot` answers for a snapshot it wrote (in a worker or here).
fn created(built: snapshot_worker::Built, started: Instant, worker: bool) -> Taken {
    Taken {
        sequence: built.sequence,
        file: snapshot::file_name(built.sequence),
        size_bytes: built.size_bytes,
        created: true,
        records_folded: built.records_folded,
        log_records_dropped: 0,
        elapsed_ms: started.elapsed().as_millis() as u64,
        build_ms: built.build_ms,
        write_ms: built.write_ms,
        worker,
    }
}

/// Prunes old snapshots, then the log records before the oldest kept one, once there is
/// a snapshot to fall back to (or `keep` is 1, the operator's choice of no fallback).
fn drop_unneeded(reader: &LogReader, dir: &Path, keep: usize) -> Result<u64, TakeError> {
    let keep = keep.max(1);
    snapshot::prune(dir, keep).map_err(TakeError::dir("prune the snapshots", dir))?;
    let kept = snapshot::list(dir).map_err(TakeError::dir("list the snapshots", dir))?;
    if kept.len() < keep.min(2) {
        return Ok(0); // the whole log is the fallback of the only snapshot
    }
    let oldest = kept.last().map_or(0, |(seq, _)| *seq);
    reader.truncate_through(oldest).map_err(TakeError::from)
}

/// `stockd snapshot`: takes a snapshot of a stopped server's data directory (the log in
/// `log_dir`), prunes, truncates the log, and flushes. Fails if a server has the log open.
/// `ceiling`, called with the log once it is open (and so locked against a server), names
/// a record the snapshot may not pass (the change feed's store ends there).
pub fn take_offline(
    log_dir: &Path,
    snapshot_dir: &Path,
    keep: usize,
    now: Millis,
    ceiling: &dyn Fn(&LogReader) -> io::Result<Option<u64>>,
) -> Result<Taken, TakeError> {
    let log = crate::storage::log::Log::open(log_dir)?;
    let ceiling = ceiling(&log.reader()).map_err(TakeError::dir(
        "bring the change feed's store up to date",
        log_dir,
    ))?;
    let upto = log.last_seq()?.min(ceiling.unwrap_or(u64::MAX));
    let taken = take_snapshot(
        &log.reader(),
        snapshot_dir,
        upto,
        keep,
        now,
        WriteHooks::default(),
    )?;
    log.flush()?;
    Ok(taken)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_os = "linux")]
    fn class_and_nice() -> (libc::c_int, libc::c_int) {
        // SAFETY: plain queries about the calling thread.
        unsafe {
            let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
            (
                libc::sched_getscheduler(0),
                libc::getpriority(libc::PRIO_PROCESS, tid),
            )
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn jobs_run_at_their_priority_and_leave_the_snapshot_thread_alone() {
        let before = class_and_nice();
        let background = run_at(
            Priority::Background,
            || Ok::<_, TakeError>(class_and_nice()),
        );
        assert_eq!(background.unwrap().0, libc::SCHED_IDLE);
        let overdue = run_at(Priority::Overdue, || Ok::<_, TakeError>(class_and_nice()));
        let overdue = overdue.unwrap();
        assert_eq!(overdue.0, libc::SCHED_OTHER);
        if before.1 <= 10 {
            assert_eq!(overdue.1, 10);
        }
        let urgent = run_at(Priority::Urgent, || Ok::<_, TakeError>(class_and_nice()));
        assert_eq!(urgent.unwrap(), before);
        // The calling thread (the snapshot thread) keeps its class for the next job.
        assert_eq!(class_and_nice(), before);
    }

    #[test]
    fn a_job_error_comes_back() {
        let failed = run_at(Priority::Background, || Err::<(), _>(TakeError::Stopped));
        assert!(matches!(failed, Err(TakeError::Stopped)));
    }
}
