//! `StockSm`: the engine's state machine (docs/REPLICATION.md, "The state machine").
//!
//! The state machine owns a `State` and folds each committed entry into it with
//! `fold::apply_entry` (or, while the state is lent, `fold::admit_entry`: the two are the
//! only places Raft entries meet the fold), answering each entry's responder with its
//! `Outcome`, on every node.
//!
//! **A leader lends its state to its epoch** (`lend`): a new epoch's supervisor takes the
//! products, reservations and idempotency keys themselves, not a copy (copying a million
//! products took 0.8 s of every failover), and the products' SKUs in order, which the
//! state machine keeps as it folds (`State::keep_sku_order`: sorted once whenever its state
//! is recovered, installed or rebuilt, then kept by the fold), so that the supervisor's
//! table is built from nothing (sorting a million SKUs took 0.3–0.6 s of a failover).
//! While the state is lent, the state machine keeps only its Raft metadata, and folds each
//! entry into that alone (`fold::admit_entry`: an entry's outcome depends on nothing
//! else), so the engine's answers are the same. The records it admits meanwhile are the
//! epoch's own proposals, which its actors already hold, or, once the node no longer
//! leads, entries that stay in the log. Giving the
//! state back (`begin_reclaim`, `Reclaim::rebuild`, `finish_reclaim`;
//! `ClusterNode::reclaim`) rebuilds it from the newest snapshot at or before the last
//! entry applied and the log through that entry, off the state machine's task, which
//! meanwhile goes on applying and keeps the records it admits; they are folded into the
//! rebuilt state at the end.
//! The epoch's actors are never read back: they may hold changes that never committed.
//! A reader of the state (the digest, the API keys of a node that does not lead, the next
//! epoch) reclaims it first.
//!
//! Snapshots are built from the log, not from the state: the builder is given the Raft
//! metadata applied so far, and the snapshot worker (a child process; or this process if
//! there is none, or it fails) folds the newest snapshot before that entry and the log's
//! entries after it, and writes the snapshot (format 4, or 5 with webhooks) into this node's snapshot
//! directory only if it holds exactly that metadata (`build_from_log`). A received
//! snapshot is installed with the verified loader (`snapshot::read`), which checks that the
//! file's Raft metadata is the engine's. `SnapshotData` is the file's path; the newest
//! file that verifies is the current snapshot, and a build keeps the newest two
//! (`SNAPSHOTS_KEPT`). A state machine without a log (the engine's storage suite) builds
//! from a copy of its state.
//!
//! At start-up the node recovers the state itself, with stockd's two-thread recovery
//! (`recovery::recover_entries`: the newest snapshot that verifies, then the log's entries
//! through the committed mark), and hands it over (`StockSm::recovered`); the engine
//! applies only what is committed after that.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use futures_util::{Stream, StreamExt};
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::{OptionalSend, RaftSnapshotBuilder};

use crate::clock::{Clock, SystemClock};
use crate::storage::entry::RaftMeta;
use crate::storage::fold::{self, State};
use crate::storage::log::{LogHandle, LogReader};
use crate::storage::record::Record;
use crate::storage::snapshot::{self, WriteHooks};
use crate::storage::snapshotter::{self, Priority};
use crate::storage::{recovery, snapshot_worker};
use crate::sync::lock;

use super::types::{
    fold_entry_of, log_id_of, stored_membership_of, LogId, RaftStoredMembership, Tc,
};

/// A snapshot's file (in the snapshot directory of the node that built or installed it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotFile {
    pub path: PathBuf,
}

pub type SnapshotMeta = openraft::type_config::alias::SnapshotMetaOf<Tc>;
pub type Snapshot = openraft::type_config::alias::SnapshotOf<Tc, SnapshotFile>;

fn other(err: impl std::fmt::Display) -> io::Error {
    io::Error::other(err.to_string())
}

/// The engine's state machine (on every node): the state, and where its snapshots live.
pub struct StockSm {
    /// The state folded so far; while `lent`, only its Raft metadata (the rest is empty).
    state: State,
    /// `Some` while the state is lent to this node's epoch.
    lent: Option<Lent>,
    /// A fold error met while a lent state was given back: the next `apply` fails with
    /// it, and the engine stops, as on any fold error.
    broken: Option<String>,
    snapshots: PathBuf,
    /// The node's log, which snapshots are built from (`None`: from a copy of the state).
    log: Option<SnapshotSource>,
    known: Known,
    /// Held while a build or an install changes the snapshot directory: the engine runs
    /// builds in a task of their own, so an install could otherwise delete a build's base
    /// (and let the log be purged under its read), or a build's pruning an install's files.
    files: Arc<Mutex<()>>,
    /// This node's change feed, if it has one (`follow_feed`).
    feed: Option<FeedLink>,
}

/// What links a state machine to its node's change feed: the projector follows the
/// entries applied and the snapshots installed (`applied`), and a snapshot is built only
/// through entries the feed's store holds on disk (`Feed::synced`), so that a restart's fold,
/// from the newest snapshot, passes every entry whose events the store lacks.
#[derive(Clone)]
struct FeedLink {
    applied: Arc<crate::feed::Applied>,
    feed: crate::feed::Feed,
}

/// The last snapshot this state machine built or installed, with its metadata: while it
/// is the newest file, `get_current_snapshot` verifies it (a checksum pass) instead of
/// decoding the whole state to read its metadata, a second copy of the state in the
/// server each time the engine asks.
type Known = Arc<Mutex<Option<(PathBuf, SnapshotMeta)>>>;

/// A lent state.
#[derive(Default)]
struct Lent {
    /// While the state is being rebuilt through entry `.0`: the records admitted since,
    /// to fold into the rebuilt state.
    since: Option<(u64, Vec<Record>)>,
}

/// What a lent state is rebuilt from (`StockSm::begin_reclaim`).
pub struct Reclaim {
    /// The last entry applied when the rebuild began: the state is rebuilt through it.
    pub upto: u64,
    source: SnapshotSource,
    snapshots: PathBuf,
    files: Arc<Mutex<()>>,
}

impl Reclaim {
    /// The state after entry `upto`: the newest snapshot at or before it and the log's
    /// entries after that (`recovery::recover_entries_at`), once the log is durable
    /// through it (an entry is applied once a majority has it, which need not include
    /// this node's disk yet). Runs on a blocking thread, holding the snapshot directory.
    pub async fn rebuild(&self) -> Result<State, RebuildError> {
        let upto = self.upto;
        let writer = &self.source.writer;
        if writer.durable_seq() < upto {
            writer.barrier().durable().await.map_err(|err| {
                RebuildError::Failed(format!("the log is not durable through {upto}: {err}"))
            })?;
        }
        let (reader, dir, files) = (
            self.source.reader.clone(),
            self.snapshots.clone(),
            self.files.clone(),
        );
        tokio::task::spawn_blocking(move || {
            let held = lock(&files);
            let recovered = recovery::recover_entries_at(&reader, &dir, upto);
            drop(held);
            recovered
                .map(|recovered| {
                    // The directory let go first: a build need not wait for the sort.
                    let mut state = recovered.state;
                    state.keep_sku_order();
                    state
                })
                .map_err(|err| {
                    let why = format!("cannot rebuild the state through entry {upto}: {err}");
                    match err {
                        recovery::RecoveryError::Fold { .. } => RebuildError::Contradiction(why),
                        _ => RebuildError::Failed(why),
                    }
                })
        })
        .await
        .map_err(|err| RebuildError::Failed(format!("the rebuild stopped: {err}")))?
    }
}

/// Why a lent state could not be rebuilt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RebuildError {
    /// The committed log contradicts itself (a record that does not fold): the state
    /// machine stops, as on any fold error.
    Contradiction(String),
    /// Anything else (the log or the snapshots cannot be read, a snapshot was installed
    /// meanwhile): the state stays lent, and a later reclaim tries again.
    Failed(String),
}

impl std::fmt::Display for RebuildError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RebuildError::Contradiction(why) | RebuildError::Failed(why) => f.write_str(why),
        }
    }
}

/// Where a node's snapshots are built from: its log, read by the snapshot worker
/// (`program`, the `stockd` binary), or in this process if there is none or it cannot be
/// started.
#[derive(Clone)]
pub struct SnapshotSource {
    pub reader: LogReader,
    /// The log's writer: a build waits until what it reads is written.
    pub writer: LogHandle,
    pub program: Option<PathBuf>,
    /// The last snapshot built, and whether the worker built it (what
    /// `POST /v1/admin/snapshot` reports).
    pub last_built: Arc<Mutex<Option<(snapshot_worker::Built, bool)>>>,
}

impl StockSm {
    /// An empty state machine whose snapshots are written to (and read from) `snapshots`.
    pub fn new(snapshots: &Path) -> StockSm {
        let mut state = State::default();
        state.keep_sku_order();
        StockSm {
            state,
            lent: None,
            broken: None,
            snapshots: snapshots.to_path_buf(),
            log: None,
            known: Known::default(),
            files: Arc::default(),
            feed: None,
        }
    }

    /// A state machine that starts from `state`, recovered from this node's snapshot
    /// and log (`recovery::recover_entries`): the engine applies only what follows it.
    /// Its snapshots are built from `log`. `snapshot` is the snapshot recovery started
    /// from, with its Raft metadata: the engine's first question about its current
    /// snapshot is answered from it (while it is the newest, and verifies), not by
    /// decoding it a second time. The state's SKUs are sorted now, and kept in order from
    /// then on.
    pub fn recovered(
        snapshots: &Path,
        mut state: State,
        log: SnapshotSource,
        snapshot: Option<(PathBuf, RaftMeta)>,
    ) -> StockSm {
        state.keep_sku_order();
        let known = snapshot.and_then(|(path, raft)| {
            let meta = meta_of(&State {
                raft: Some(raft),
                ..State::default()
            });
            meta.ok().map(|meta| (path, meta))
        });
        StockSm {
            state,
            lent: None,
            broken: None,
            snapshots: snapshots.to_path_buf(),
            log: Some(log),
            known: Arc::new(Mutex::new(known)),
            files: Arc::default(),
            feed: None,
        }
    }

    /// Links this state machine to its node's change feed: it publishes the entries it
    /// applies and the snapshots it installs to `applied`, and builds no snapshot past the
    /// entry the feed's store is fsynced through (`Feed::synced`). Returns what the projector
    /// follows.
    pub fn follow_feed(&mut self, feed: &crate::feed::Feed) -> crate::feed::Followed {
        let applied = Arc::new(crate::feed::Applied::default());
        let after = applied_seq(&self.state);
        applied.applied(after);
        // The projector starts after `after`, whatever the store holds past it.
        feed.synced_at_most(after);
        self.feed = Some(FeedLink {
            applied: applied.clone(),
            feed: feed.clone(),
        });
        crate::feed::Followed {
            applied,
            snapshots: self.snapshots.clone(),
            files: self.files.clone(),
        }
    }

    /// The state as folded so far: while it is lent (`is_lent`), only its Raft metadata.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// Whether the state is lent to a leader's epoch.
    pub fn is_lent(&self) -> bool {
        self.lent.is_some()
    }

    /// Lends the state to a leader's epoch (see the module's documentation); `None` if it
    /// is lent already (reclaim it first). A state machine without a log cannot rebuild
    /// its state: it lends a copy, and stays whole.
    pub(crate) fn lend(&mut self) -> Option<State> {
        if self.lent.is_some() {
            return None;
        }
        if self.log.is_none() {
            return Some(self.state.clone());
        }
        let raft = self.state.raft.clone();
        let state = std::mem::replace(
            &mut self.state,
            State {
                raft,
                ..State::default()
            },
        );
        self.lent = Some(Lent::default());
        Some(state)
    }

    /// Begins giving a lent state back: from now on, the records this state machine
    /// admits are kept until `finish_reclaim`. Returns what to rebuild the state from
    /// (`None`: it is not lent). One reclaim at a time (`ClusterNode::reclaim`).
    pub(crate) fn begin_reclaim(&mut self) -> Option<Reclaim> {
        let lent = self.lent.as_mut()?;
        let source = self.log.clone()?;
        let upto = applied_seq(&self.state);
        lent.since = Some((upto, Vec::new()));
        Some(Reclaim {
            upto,
            source,
            snapshots: self.snapshots.clone(),
            files: self.files.clone(),
        })
    }

    /// Ends giving a lent state back: `rebuilt` is the state through entry `upto`
    /// (`Reclaim::rebuild`); the records admitted since are folded into it, and it
    /// becomes this state machine's. If it could not be rebuilt, the state stays lent, and
    /// if the log contradicts itself, the next `apply` fails (the engine stops). If an
    /// installed snapshot made the state whole meanwhile, `rebuilt` is dropped.
    pub(crate) fn finish_reclaim(
        &mut self,
        upto: u64,
        rebuilt: Result<State, RebuildError>,
    ) -> Result<(), String> {
        let Some(lent) = self.lent.as_mut() else {
            drop_elsewhere(rebuilt.ok());
            return Ok(());
        };
        if !matches!(lent.since, Some((from, _)) if from == upto) {
            drop_elsewhere(rebuilt.ok());
            return Err(format!("no rebuild through entry {upto} was under way"));
        }
        let (_, since) = lent.since.take().expect("checked above");
        let mut state = match rebuilt {
            Ok(state) => state,
            Err(RebuildError::Contradiction(err)) => {
                self.broken = Some(err.clone());
                return Err(err);
            }
            Err(RebuildError::Failed(err)) => return Err(err),
        };
        let rebuilt_through = applied_seq(&state);
        if rebuilt_through != upto {
            drop_elsewhere(Some(state));
            return Err(format!(
                "the state was rebuilt through entry {rebuilt_through}, not {upto}"
            ));
        }
        for record in since {
            if let Err(err) = fold::apply_owned(&mut state, record) {
                let err = format!("folding a record applied during a rebuild: {err}");
                self.broken = Some(err.clone());
                return Err(err);
            }
        }
        state.raft = self.state.raft.take();
        self.state = state;
        self.lent = None;
        Ok(())
    }

    /// The last entry folded, and the membership in force, as the engine's.
    fn applied(state: &State) -> io::Result<(Option<LogId>, RaftStoredMembership)> {
        match &state.raft {
            None => Ok((None, RaftStoredMembership::default())),
            Some(raft) => Ok((
                raft.last_applied.map(log_id_of),
                stored_membership_of(&raft.membership)?,
            )),
        }
    }
}

/// Frees a state this state machine does not keep on a blocking thread, not on its own
/// task (a million products take hundreds of milliseconds to free, and the engine's
/// applies would wait for it).
fn drop_elsewhere(state: Option<State>) {
    if let Some(state) = state {
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(move || drop(state))),
            Err(_) => drop(state),
        }
    }
}

/// The last entry `state` folded (0: none).
fn applied_seq(state: &State) -> u64 {
    state
        .raft
        .as_ref()
        .and_then(|raft| raft.last_applied)
        .map_or(0, |pos| pos.seq)
}

/// A snapshot's metadata, read from its state's Raft metadata.
fn meta_of(state: &State) -> io::Result<SnapshotMeta> {
    let (last_log_id, last_membership) = StockSm::applied(state)?;
    Ok(SnapshotMeta {
        last_log_id,
        last_membership,
    })
}

/// The newest snapshot in `dir` that verifies, with its state.
fn newest_snapshot(dir: &Path) -> io::Result<Option<(PathBuf, State)>> {
    let files = match snapshot::list(dir) {
        Ok(files) => files,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    // `list` gives the newest first.
    for (_, path) in files {
        match snapshot::read(&path) {
            Ok((_, state)) if state.raft.is_some() => return Ok(Some((path, state))),
            Ok(_) => {
                tracing::warn!(path = %path.display(), "a snapshot without Raft metadata in a cluster node's directory; skipped")
            }
            Err(err) => {
                tracing::warn!(path = %path.display(), error = %err, "a snapshot that does not verify; skipped")
            }
        }
    }
    Ok(None)
}

/// A test hook (tests/cluster_serving.rs kills a node there): milliseconds an install
/// waits once its snapshot is the only one kept, before the engine moves the log past it.
const INSTALL_PAUSE_ENV: &str = "STOCKD_TEST_INSTALL_PAUSE_MS";

/// Sleeps for the milliseconds the environment variable `name` says, if it is set.
fn pause_for_a_test(name: &str) {
    let Some(ms) = std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok()) else {
        return;
    };
    tracing::warn!(pause_ms = ms, hook = name, "pausing for a test");
    std::thread::sleep(std::time::Duration::from_millis(ms));
}

/// Snapshots a node keeps after building one: the new one, and the one before it (which a
/// transfer to a lagging follower may still be reading).
const SNAPSHOTS_KEPT: usize = 2;

/// Writes `state` as a snapshot in `dir`; returns the file.
fn write_snapshot(dir: &Path, state: &State) -> io::Result<PathBuf> {
    let seq = state
        .raft
        .as_ref()
        .and_then(|raft| raft.last_applied)
        .map_or(0, |pos| pos.seq);
    let info = snapshot::write(dir, seq, state, SystemClock.now_ms(), WriteHooks::default())?;
    Ok(info.path)
}

/// Builds one snapshot: of the state after the last entry applied when it was made.
pub struct SnapshotJob {
    from: Build,
    snapshots: PathBuf,
    known: Known,
    files: Arc<Mutex<()>>,
    /// The node's change feed, whose store a build waits for (`None`: no feed).
    feed: Option<crate::feed::Feed>,
}

/// How often a snapshot build waiting for the change feed looks again.
const FEED_WAIT_POLL_MS: u64 = 10;

enum Build {
    /// A copy of the state (a state machine without a log: the engine's storage suite).
    Copy(State),
    /// The snapshot worker folds the log through the entry `meta` says was applied onto
    /// the newest snapshot before it (no copy of the state in the server), and must reach
    /// exactly `meta`.
    Log {
        source: SnapshotSource,
        meta: RaftMeta,
    },
}

impl SnapshotJob {
    /// Builds the snapshot (blocking); returns its metadata and file.
    fn build(from: Build, dir: &Path) -> io::Result<(SnapshotMeta, PathBuf)> {
        let (meta, path) = match from {
            Build::Copy(state) => (meta_of(&state)?, write_snapshot(dir, &state)?),
            Build::Log { source, meta } => {
                let path = build_from_log(&source, &meta, dir)?;
                let state = State {
                    raft: Some(meta),
                    ..State::default()
                };
                (meta_of(&state)?, path)
            }
        };
        snapshot::prune(dir, SNAPSHOTS_KEPT)?;
        Ok((meta, path))
    }
}

/// Builds the snapshot of the state after the entry `meta` says was applied, from the log
/// and the newest snapshot before it: in the snapshot worker, or here if there is none.
fn build_from_log(source: &SnapshotSource, meta: &RaftMeta, dir: &Path) -> io::Result<PathBuf> {
    let started = std::time::Instant::now();
    let upto = meta.last_applied.map_or(0, |pos| pos.seq);
    let reader = &source.reader;
    let job = snapshot_worker::Job {
        snapshot_dir: dir.to_path_buf(),
        upto,
        truncated_through: reader.purged().map_err(other)?.map_or(0, |mark| mark.seq),
        now: SystemClock.now_ms(),
        pause_before_rename: None,
        entries: true,
        expect_raft: Some(meta.clone()),
    };
    // The engine stops on a failed build: a worker that fails (killed, out of memory, a
    // broken pipe) is followed by a build here before that.
    let mut built = None;
    if let Some(program) = &source.program {
        match snapshot_worker::build(program, reader, &job) {
            Ok(done) => built = Some((done, true)),
            Err(err) => {
                tracing::warn!(error = %err, "the snapshot worker failed; building the snapshot in the server instead");
            }
        }
    }
    let (built, worker) = match built {
        Some(built) => built,
        None => {
            let recovered = recovery::recover_entries_at(reader, dir, upto).map_err(other)?;
            let built = snapshot_worker::write(&job, recovered, started).map_err(other)?;
            (built, false)
        }
    };
    for skipped in &built.skipped {
        tracing::warn!(reason = %skipped, "skipped a snapshot that does not verify");
    }
    if built.raft.as_ref() != Some(meta) {
        return Err(other(format!(
            "the snapshot built at {upto} holds {:?}, not what was applied ({meta:?})",
            built.raft
        )));
    }
    *lock(&source.last_built) = Some((built.clone(), worker));
    tracing::info!(
        sequence = built.sequence,
        entries_folded = built.records_folded,
        size_bytes = built.size_bytes,
        build_ms = built.build_ms,
        write_ms = built.write_ms,
        worker,
        "snapshot built"
    );
    Ok(dir.join(snapshot::file_name(upto)))
}

/// Waits until the feed's store is fsynced through entry `upto`. The feed follows the log
/// the build has just made durable, so it is soon there. A feed that failed holds nothing
/// back (`Feed::synced` is `u64::MAX` then); one whose projector stopped (the node stops)
/// fails the build, which must not pass the store.
async fn wait_for_feed(feed: &crate::feed::Feed, upto: u64) -> io::Result<()> {
    use std::sync::atomic::Ordering;
    let synced = feed.synced();
    let started = std::time::Instant::now();
    let mut warned = false;
    while synced.load(Ordering::SeqCst) < upto {
        if feed.stopped() {
            return Err(other(format!(
                "no snapshot through entry {upto}: the change feed stopped before it"
            )));
        }
        if !warned && started.elapsed() >= std::time::Duration::from_secs(10) {
            tracing::warn!(
                upto,
                synced = synced.load(Ordering::SeqCst),
                "a snapshot waits for the change feed to reach its last entry"
            );
            warned = true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(FEED_WAIT_POLL_MS)).await;
    }
    Ok(())
}

impl RaftSnapshotBuilder<Tc> for SnapshotJob {
    type SnapshotData = SnapshotFile;

    async fn build_snapshot(&mut self) -> Result<Snapshot, io::Error> {
        let from = std::mem::replace(&mut self.from, Build::Copy(State::default()));
        let mut upto = None;
        // An entry is applied once a majority has it, which need not include this node's
        // disk yet: the worker reads the log from disk, so it waits for it.
        if let Build::Log { source, meta } = &from {
            let seq = meta.last_applied.map_or(0, |pos| pos.seq);
            upto = Some(seq);
            if source.writer.durable_seq() < seq {
                source.writer.barrier().durable().await.map_err(other)?;
            }
            if let Some(feed) = &self.feed {
                wait_for_feed(feed, seq).await?;
            }
        }
        let (dir, files, known) = (
            self.snapshots.clone(),
            self.files.clone(),
            self.known.clone(),
        );
        // At a lower weight (nice 10), not `SCHED_IDLE` as a single server's background
        // snapshots: the engine asks again only once this one is done, so a load that kept
        // every core busy would otherwise starve every snapshot, and the log would grow
        // without bound.
        let (meta, path) = tokio::task::spawn_blocking(move || {
            snapshotter::on_lowered_thread(Priority::Overdue, || {
                let _files = lock(&files);
                // A snapshot installed since the build began, at or past its entry, has
                // replaced the files and the log it would read: it is the answer (the
                // engine keeps the newer of the two).
                if let (Some(upto), Some((path, meta))) = (upto, lock(&known).clone()) {
                    let covers = meta
                        .last_log_id
                        .as_ref()
                        .is_some_and(|id| super::types::pos_of(id).seq >= upto);
                    if covers && path.exists() {
                        return Ok((meta, path));
                    }
                }
                SnapshotJob::build(from, &dir)
            })
        })
        .await
        .map_err(other)???;
        *lock(&self.known) = Some((path.clone(), meta.clone()));
        Ok(Snapshot {
            meta,
            snapshot: SnapshotFile { path },
        })
    }
}

impl RaftStateMachine<Tc> for StockSm {
    type SnapshotData = SnapshotFile;
    type SnapshotBuilder = SnapshotJob;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, RaftStoredMembership), io::Error> {
        StockSm::applied(&self.state)
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<Tc>, io::Error>> + Unpin + OptionalSend,
    {
        if let Some(err) = &self.broken {
            return Err(other(err));
        }
        let mut last = None;
        while let Some(item) = entries.next().await {
            let (entry, responder) = item?;
            let entry = fold_entry_of(entry)?;
            let seq = entry.pos.seq;
            // A fold error is a log that contradicts itself (or entries out of order):
            // the state may be partly changed, so the engine must stop here.
            let outcome = match &mut self.lent {
                None => fold::apply_entry(&mut self.state, entry),
                // Lent: the metadata alone; a record is kept only while a rebuild runs.
                Some(lent) => {
                    fold::admit_entry(&mut self.state.raft, entry).map(|(outcome, record)| {
                        if let (Some(record), Some((_, since))) = (record, lent.since.as_mut()) {
                            since.push(record);
                        }
                        outcome
                    })
                }
            }
            .map_err(|e| other(format!("folding entry {seq}: {e}")))?;
            last = Some(seq);
            if let Some(responder) = responder {
                responder.send(outcome);
            }
        }
        if let (Some(feed), Some(seq)) = (&self.feed, last) {
            feed.applied.applied(seq);
        }
        // SKUs created in order (an import) leave the index's nodes half full: it is
        // rebuilt full once they are an eighth of it (amortized, `SkuIndex::compact`).
        if let Some(index) = &mut self.state.skus.0 {
            index.compact();
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        let from = match (&self.log, &self.state.raft) {
            (Some(source), Some(meta)) => Build::Log {
                source: source.clone(),
                meta: meta.clone(),
            },
            _ => Build::Copy(self.state.clone()),
        };
        SnapshotJob {
            from,
            snapshots: self.snapshots.clone(),
            known: self.known.clone(),
            files: self.files.clone(),
            feed: self.feed.as_ref().map(|link| link.feed.clone()),
        }
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: SnapshotFile,
    ) -> Result<(), io::Error> {
        let dir = self.snapshots.clone();
        let meta = meta.clone();
        let installed = meta.clone();
        let (files, known) = (self.files.clone(), self.known.clone());
        let state = tokio::task::spawn_blocking(move || -> io::Result<State> {
            let held = lock(&files);
            let (_, mut state) = snapshot::read(&snapshot.path).map_err(other)?;
            if meta_of(&state)? != meta {
                return Err(other(format!(
                    "snapshot {} does not hold what its metadata says ({meta:?})",
                    snapshot.path.display()
                )));
            }
            // Kept in this node's own directory (a received file may live elsewhere),
            // and the only one kept: the engine's rule for an installed snapshot.
            let kept = if snapshot.path.parent() == Some(dir.as_path()) {
                snapshot.path
            } else {
                write_snapshot(&dir, &state)?
            };
            for (_, path) in snapshot::list(&dir)? {
                if path != kept {
                    std::fs::remove_file(&path)?;
                }
            }
            // Known while the directory is still held: a build that takes it next sees
            // that this snapshot replaced its base.
            *lock(&known) = Some((kept, installed));
            pause_for_a_test(INSTALL_PAUSE_ENV);
            drop(held);
            state.keep_sku_order();
            Ok(state)
        })
        .await
        .map_err(other)??;
        // Whole again if it was lent: what the epoch's actors hold is never read back.
        self.state = state;
        self.lent = None;
        if let Some(feed) = &self.feed {
            feed.applied.installed(applied_seq(&self.state));
        }
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, io::Error> {
        let dir = self.snapshots.clone();
        let known = lock(&self.known).clone();
        let newest = tokio::task::spawn_blocking(move || -> io::Result<_> {
            if let Some((path, meta)) = known {
                let newest = snapshot::list(&dir).ok().and_then(|l| l.into_iter().next());
                if newest.is_some_and(|(_, newest)| newest == path)
                    && snapshot::verify(&path).is_ok()
                {
                    return Ok(Some((path, meta)));
                }
            }
            match newest_snapshot(&dir)? {
                Some((path, state)) => Ok(Some((path, meta_of(&state)?))),
                None => Ok(None),
            }
        })
        .await
        .map_err(other)??;
        Ok(newest.map(|(path, meta)| Snapshot {
            meta,
            snapshot: SnapshotFile { path },
        }))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::storage::entry::{loopback_membership, LogPos, RaftMeta, StoredMembership};

    /// A state that has applied through `seq`, with a membership the engine accepts.
    fn state_at(seq: u64) -> State {
        State {
            raft: Some(RaftMeta {
                last_applied: Some(LogPos { term: 1, seq }),
                membership: StoredMembership {
                    pos: Some(LogPos { term: 1, seq: 1 }),
                    membership: loopback_membership(3, &[&[1, 2, 3]]),
                },
                ..RaftMeta::default()
            }),
            ..State::default()
        }
    }

    /// Damages the file at `path` in its middle byte (a snapshot then fails to verify).
    pub(crate) fn flip_middle_byte(path: &Path) {
        let mut bytes = std::fs::read(path).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0xff;
        std::fs::write(path, bytes).unwrap();
    }

    fn last_seq(snapshot: &Snapshot) -> Option<u64> {
        snapshot
            .meta
            .last_log_id
            .as_ref()
            .map(|id| crate::cluster::types::pos_of(id).seq)
    }

    /// The current snapshot (what a lagging follower is sent) is the newest that verifies,
    /// not the oldest; a damaged newest one is passed over for the next.
    #[tokio::test]
    async fn the_current_snapshot_is_the_newest_that_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let mut paths = Vec::new();
        for seq in [2, 9, 5] {
            paths.push(write_snapshot(dir.path(), &state_at(seq)).unwrap());
        }
        let mut sm = StockSm::new(dir.path());
        let current = sm
            .get_current_snapshot()
            .await
            .unwrap()
            .expect("a snapshot");
        assert_eq!(last_seq(&current), Some(9));
        assert_eq!(current.snapshot.path, paths[1]);

        flip_middle_byte(&paths[1]);
        let current = sm
            .get_current_snapshot()
            .await
            .unwrap()
            .expect("a snapshot");
        assert_eq!(last_seq(&current), Some(5), "the newest that verifies");
    }

    /// Building snapshots keeps the newest two: the directory does not grow with each.
    #[tokio::test]
    async fn building_snapshots_keeps_the_newest_two() {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = StockSm::new(dir.path());
        for seq in [3, 6, 9, 12] {
            sm.state = state_at(seq);
            let built = sm
                .get_snapshot_builder()
                .await
                .build_snapshot()
                .await
                .unwrap();
            assert_eq!(last_seq(&built), Some(seq));
        }
        let kept: Vec<u64> = snapshot::list(dir.path())
            .unwrap()
            .into_iter()
            .map(|(seq, _)| seq)
            .collect();
        assert_eq!(kept, vec![12, 9]);
        let current = sm
            .get_current_snapshot()
            .await
            .unwrap()
            .expect("a snapshot");
        assert_eq!(last_seq(&current), Some(12));

        // The one it built is known without a decode, but only while it verifies.
        let path = current.snapshot.path;
        flip_middle_byte(&path);
        let current = sm
            .get_current_snapshot()
            .await
            .unwrap()
            .expect("a snapshot");
        assert_eq!(last_seq(&current), Some(9), "the newest that verifies");
    }
}
