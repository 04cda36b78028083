//! `StockSm`: the engine's state machine (docs/REPLICATION.md, "The state machine").
//!
//! The state machine owns a `State` and folds each committed entry into it with
//! `fold::apply_entry` (the only place Raft entries meet the fold), answering each entry's
//! responder with its `Outcome`, on every node, **the leader included**: a leader's epoch
//! starts its actors from a copy of what they need of this state (`crate::leadership`,
//! `SupervisorArgs::copy_of`), whose proposals come
//! back here committed, so the committed state is always at hand and an epoch that ends
//! needs no rebuild (docs/REPLICATION.md, "The state machine", on what that costs).
//!
//! Snapshots are built from the log, not from the state: the builder is given the Raft
//! metadata applied so far, and the snapshot worker (a child process; or this process if
//! there is none, or it fails) folds the newest snapshot before that entry and the log's
//! entries after it, and writes the snapshot (format 4) into this node's snapshot
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
use crate::storage::snapshot::{self, WriteHooks};
use crate::storage::{recovery, snapshot_worker};

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
    state: State,
    snapshots: PathBuf,
    /// The node's log, which snapshots are built from (`None`: from a copy of the state).
    log: Option<SnapshotSource>,
    known: Known,
    /// Held while a build or an install changes the snapshot directory: the engine runs
    /// builds in a task of their own, so an install could otherwise delete a build's base
    /// (and let the log be purged under its read), or a build's pruning an install's files.
    files: Arc<Mutex<()>>,
}

/// The last snapshot this state machine built or installed, with its metadata: while it
/// is the newest file, `get_current_snapshot` verifies it (a checksum pass) instead of
/// decoding the whole state to read its metadata, a second copy of the state in the
/// server each time the engine asks.
type Known = Arc<Mutex<Option<(PathBuf, SnapshotMeta)>>>;

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
        StockSm {
            state: State::default(),
            snapshots: snapshots.to_path_buf(),
            log: None,
            known: Known::default(),
            files: Arc::default(),
        }
    }

    /// A state machine that starts from `state`, recovered from this node's snapshot
    /// and log (`recovery::recover_entries`): the engine applies only what follows it.
    /// Its snapshots are built from `log`.
    pub fn recovered(snapshots: &Path, state: State, log: SnapshotSource) -> StockSm {
        StockSm {
            state,
            snapshots: snapshots.to_path_buf(),
            log: Some(log),
            known: Known::default(),
            files: Arc::default(),
        }
    }

    /// The state as folded so far.
    pub fn state(&self) -> &State {
        &self.state
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

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
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
}

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

impl RaftSnapshotBuilder<Tc> for SnapshotJob {
    type SnapshotData = SnapshotFile;

    async fn build_snapshot(&mut self) -> Result<Snapshot, io::Error> {
        let from = std::mem::replace(&mut self.from, Build::Copy(State::default()));
        // An entry is applied once a majority has it, which need not include this node's
        // disk yet: the worker reads the log from disk, so it waits for it.
        if let Build::Log { source, meta } = &from {
            let upto = meta.last_applied.map_or(0, |pos| pos.seq);
            if source.writer.durable_seq() < upto {
                source.writer.barrier().durable().await.map_err(other)?;
            }
        }
        let (dir, files) = (self.snapshots.clone(), self.files.clone());
        let (meta, path) = tokio::task::spawn_blocking(move || {
            let _files = lock(&files);
            SnapshotJob::build(from, &dir)
        })
        .await
        .map_err(other)??;
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
        while let Some(item) = entries.next().await {
            let (entry, responder) = item?;
            let entry = fold_entry_of(entry)?;
            let seq = entry.pos.seq;
            // A fold error is a log that contradicts itself (or entries out of order):
            // the state may be partly changed, so the engine must stop here.
            let outcome = fold::apply_entry(&mut self.state, entry)
                .map_err(|e| other(format!("folding entry {seq}: {e}")))?;
            if let Some(responder) = responder {
                responder.send(outcome);
            }
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
        let files = self.files.clone();
        let (state, kept) = tokio::task::spawn_blocking(move || -> io::Result<(State, PathBuf)> {
            let _files = lock(&files);
            let (_, state) = snapshot::read(&snapshot.path).map_err(other)?;
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
            pause_for_a_test(INSTALL_PAUSE_ENV);
            Ok((state, kept))
        })
        .await
        .map_err(other)??;
        self.state = state;
        *lock(&self.known) = Some((kept, installed));
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
mod tests {
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

        let mut bytes = std::fs::read(&paths[1]).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0xff;
        std::fs::write(&paths[1], bytes).unwrap();
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
        let mut bytes = std::fs::read(&path).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0xff;
        std::fs::write(&path, bytes).unwrap();
        let current = sm
            .get_current_snapshot()
            .await
            .unwrap()
            .expect("a snapshot");
        assert_eq!(last_seq(&current), Some(9), "the newest that verifies");
    }
}
