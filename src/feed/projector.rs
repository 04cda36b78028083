//! The projector: a thread that follows the durable log with a shadow state and turns
//! each record into its events (`event::project`: the one fold, then `events_of`), appends
//! them to the store and hands them to live readers. And `Catchup`, the same projection
//! run inside recovery's fold at start-up, for the records the store lacks.
//!
//! The shadow state is a clone of the recovered state, kept small: after each record the
//! reservations it ended and every idempotency key are dropped (`event::prune`), because
//! no later record's fold or events read them. What stays is the products and the
//! pending reservations.
//!
//! Every `PROJECTOR_SYNC_MS` the store is fsynced and the record it is synced through is
//! published (`Feed::synced`): the snapshotter never takes a snapshot past it, so that at
//! the next start the newest snapshot S is at or before the store's last mark E, and
//! recovery's fold (from S) passes every record after E.

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::feed::event::{events_of, Before};
use crate::feed::shadow::Shadow;
use crate::feed::store::{Store, Stored};
use crate::feed::{Feed, PROJECTOR_POLL_MS, PROJECTOR_SYNC_MS};
use crate::storage::entry::RaftMeta;
use crate::storage::fold::State;
use crate::storage::log::{LogHandle, LogReader};
use crate::storage::record::Record;
use crate::storage::recovery::{self, FoldObserver};
use crate::sync::lock;

/// Events appended to the store (and handed to live readers) in one go, at most.
const APPEND_EVENTS_MAX: usize = 1024;
/// Records projected before the store is appended to, at most.
const APPEND_RECORDS_MAX: u64 = 4096;

/// Opens the feed's store in `dir` (before recovery: `Catchup` fills it during
/// recovery's fold).
pub fn open(dir: &std::path::Path, retention: crate::feed::Retention) -> io::Result<Store> {
    Store::open(dir, 0, retention)
}

fn stored(events: Vec<crate::feed::event::Event>) -> impl Iterator<Item = Stored> {
    events.into_iter().map(|e| Stored {
        position: e.position,
        json: e.to_json(),
    })
}

/// Recovery's observer: derives the events of the records after the store's last mark
/// from recovery's own fold, and appends them.
pub struct Catchup<'a> {
    store: &'a mut Store,
    before: Option<Before>,
    batch: Vec<Stored>,
    /// Records up to here are projected (in `batch` or in the store).
    through: u64,
    /// The first error; the rest of the catch-up is skipped.
    pub error: Option<io::Error>,
}

impl<'a> Catchup<'a> {
    pub fn new(store: &'a mut Store) -> Catchup<'a> {
        let through = store.through();
        Catchup {
            store,
            before: None,
            batch: Vec::new(),
            through,
            error: None,
        }
    }

    fn append(&mut self) {
        if self.error.is_none() && self.through > self.store.through() {
            if let Err(err) = self.store.append(&self.batch, self.through) {
                self.error = Some(err);
            }
        }
        self.batch.clear();
    }

    /// Appends what is left (recovery stopped, maybe to be run again).
    pub fn finish_partial(mut self) -> io::Result<()> {
        self.append();
        self.error.take().map_or(Ok(()), Err)
    }

    /// Appends what is left and makes the store join the recovered state: a store that
    /// ends before the snapshot S recovery started from (it is new, or older than the
    /// snapshots) starts again after S; one that ends past the log's end L (a log cut
    /// short) starts again after L. Syncs it.
    pub fn finish(mut self, snapshot_seq: u64, last_seq: u64) -> io::Result<()> {
        self.append();
        if let Some(err) = self.error.take() {
            return Err(err);
        }
        if self.store.through() < snapshot_seq {
            self.store.reset(snapshot_seq)?;
        } else if self.store.through() > last_seq {
            self.store.reset(last_seq)?;
        }
        self.store.sync().map(drop)
    }
}

impl Catchup<'_> {
    /// Whether the fold reached `seq` without a gap after the store's end; if it starts
    /// later (a new store, or one older than the newest snapshot), the feed starts again
    /// after the snapshot. `false` if that failed.
    fn continues(&mut self, seq: u64) -> bool {
        if seq != self.through + 1 {
            self.batch.clear();
            if let Err(err) = self.store.reset(seq - 1) {
                self.error = Some(err);
                return false;
            }
            self.through = seq - 1;
        }
        true
    }

    /// Appends the batch once it is large, or covers many records.
    fn append_if_large(&mut self) {
        if self.batch.len() >= APPEND_EVENTS_MAX
            || self.through - self.store.through() >= APPEND_RECORDS_MAX
        {
            self.append();
        }
    }
}

impl FoldObserver for Catchup<'_> {
    fn wants(&self, seq: u64) -> bool {
        self.error.is_none() && seq > self.through
    }

    fn before(&mut self, seq: u64, record: &Record, state: &State) {
        if self.continues(seq) {
            self.before = Some(Before::of(record, state));
        }
    }

    fn passed(&mut self, seq: u64) {
        if self.continues(seq) {
            self.through = seq;
            self.append_if_large();
        }
    }

    fn after(&mut self, seq: u64, record: &Record, state: &State) {
        let Some(before) = self.before.take() else {
            return; // `before` failed
        };
        self.batch
            .extend(stored(events_of(&before, seq, record, state)));
        self.through = seq;
        self.append_if_large();
    }
}

/// The running projector; `stop` it before the log writer stops (it reads the log).
pub struct Projector {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Projector {
    /// Starts following the log after record `after`, whose state `shadow` stands for.
    pub fn start(
        feed: Feed,
        reader: LogReader,
        log: LogHandle,
        shadow: Shadow,
        after: u64,
    ) -> Projector {
        Projector::spawn(feed, reader, log, shadow, after, Follow::Records)
    }

    /// Starts following a cluster node's log after entry `after`, whose state `shadow`
    /// and Raft metadata `raft` stand for: the entries its state machine applied
    /// (`cluster`), each admitted by the same rule (`fold::admit_entry`).
    pub fn start_entries(
        feed: Feed,
        reader: LogReader,
        log: LogHandle,
        shadow: Shadow,
        raft: Option<RaftMeta>,
        after: u64,
        cluster: Followed,
    ) -> Projector {
        let follow = Follow::Entries(Entries {
            raft,
            cluster,
            read_failures: 0,
        });
        Projector::spawn(feed, reader, log, shadow, after, follow)
    }

    fn spawn(
        feed: Feed,
        reader: LogReader,
        log: LogHandle,
        shadow: Shadow,
        after: u64,
        follow: Follow,
    ) -> Projector {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = thread::Builder::new()
            .name("stockd-projector".into())
            .spawn({
                let stop = stop.clone();
                move || run(feed, reader, log, shadow, after, follow, stop)
            })
            .expect("spawning the projector thread");
        Projector {
            stop,
            thread: Some(thread),
        }
    }

    /// Projects every record durable now, syncs the store, and stops the thread.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Projector {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// How far a cluster node's state machine applied, and the snapshots it installed: what
/// its projector follows (`Projector::start_entries`). The state machine moves it
/// (`cluster::StockSm`).
#[derive(Debug, Default)]
pub struct Applied {
    /// The last snapshot installed since start-up (0: none).
    installed: AtomicU64,
    /// The last entry applied.
    applied: AtomicU64,
}

impl Applied {
    /// Entries through `seq` are applied.
    pub fn applied(&self, seq: u64) {
        self.applied.fetch_max(seq, Ordering::SeqCst);
    }

    /// A snapshot through entry `seq` was installed: the state jumped there.
    pub fn installed(&self, seq: u64) {
        // Before `applied`: a projector that sees the new applied position sees the
        // install too (it reads them the other way round).
        self.installed.fetch_max(seq, Ordering::SeqCst);
        self.applied(seq);
    }

    /// (the last entry applied, the last snapshot installed)
    fn read(&self) -> (u64, u64) {
        let applied = self.applied.load(Ordering::SeqCst);
        (applied, self.installed.load(Ordering::SeqCst))
    }
}

/// What a cluster node's projector needs besides its log: how far the state machine
/// applied, and its snapshots (with the lock under which they are read and changed), to
/// start again from an installed one.
#[derive(Clone)]
pub struct Followed {
    pub applied: Arc<Applied>,
    pub snapshots: PathBuf,
    pub files: Arc<Mutex<()>>,
}

/// What the projector follows.
enum Follow {
    /// A single server's records, once durable.
    Records,
    /// A cluster node's entries, once applied (so committed: never cut) and durable here.
    Entries(Entries),
}

struct Entries {
    /// The Raft metadata after the last entry projected: admits the next one.
    raft: Option<RaftMeta>,
    cluster: Followed,
    /// Reads of the log that failed in a row (an entry being cut past the applied
    /// position can fail a read ahead): the feed stops after `READ_FAILURES_MAX`.
    read_failures: u32,
}

/// Failed reads of a cluster node's log in a row (one a poll) before the feed stops.
const READ_FAILURES_MAX: u32 = 100;

fn run(
    feed: Feed,
    reader: LogReader,
    log: LogHandle,
    mut shadow: Shadow,
    mut pos: u64,
    mut follow: Follow,
    stop: Arc<AtomicBool>,
) {
    // However the thread ends, the feed says so; a panic is a failure like any other, so
    // that nothing waits on a feed that no longer moves.
    struct Ended(Feed);
    impl Drop for Ended {
        fn drop(&mut self) {
            if thread::panicking() {
                fail(&self.0, "the projector panicked".into());
            }
            self.0.shared.stopped.store(true, Ordering::SeqCst);
        }
    }
    let _ended = Ended(feed.clone());
    let mut last_sync = Instant::now();
    loop {
        let stopping = stop.load(Ordering::SeqCst);
        let durable = log.durable_seq();
        let followed = match &mut follow {
            Follow::Records if durable > pos => {
                follow_records(&feed, &reader, &mut shadow, pos, durable)
            }
            Follow::Records => Ok(pos),
            Follow::Entries(entries) => entries.follow(&feed, &reader, &mut shadow, pos, durable),
        };
        match followed {
            Ok(through) => pos = through,
            Err(err) => return fail(&feed, err),
        }
        if stopping || last_sync.elapsed() >= Duration::from_millis(PROJECTOR_SYNC_MS) {
            // The fsync runs without the store's lock: readers never wait for the disk.
            let taken = {
                let mut store = feed.store();
                store.to_sync().map(|file| (file, store.through()))
            };
            // Never past the projector: a cluster node's store can reach past the entry
            // it started after (`publish`), and a snapshot must not pass the projector.
            let synced = taken.and_then(|(file, through)| match file {
                Some(file) => file.sync_data().map(|()| through.min(pos)),
                None => Ok(through.min(pos)),
            });
            match synced {
                Ok(through) => {
                    feed.shared.synced.fetch_max(through, Ordering::SeqCst);
                }
                Err(err) => return fail(&feed, format!("cannot sync the store: {err}")),
            }
            last_sync = Instant::now();
        }
        // A single server stops once what is durable is projected; a cluster's other nodes
        // may go on committing: what was applied when the stop was asked for is
        // projected, and no more waited for.
        if stopping && (matches!(follow, Follow::Entries(_)) || durable <= pos) {
            return;
        }
        thread::sleep(Duration::from_millis(PROJECTOR_POLL_MS));
    }
}

impl Entries {
    /// Projects the entries after `pos` that are applied and durable; returns the last
    /// one projected. After a snapshot was installed past `pos`, starts again from it
    /// (`reseed`).
    fn follow(
        &mut self,
        feed: &Feed,
        reader: &LogReader,
        shadow: &mut Shadow,
        pos: u64,
        durable: u64,
    ) -> Result<u64, String> {
        let (applied, installed) = self.cluster.applied.read();
        if installed > pos {
            return match self.reseed(feed, reader, shadow, installed) {
                // Another install replaced that snapshot meanwhile: the next poll starts
                // from the newer one.
                Err(_) if self.cluster.applied.read().1 > installed => Ok(pos),
                reseeded => reseeded,
            };
        }
        let limit = applied.min(durable);
        if limit <= pos {
            return Ok(pos);
        }
        let mut pending = Pending::after(pos);
        let mut failed = None;
        for item in reader.entries_after(pos) {
            let entry = match item {
                Ok(entry) if entry.pos.seq == pending.through + 1 => entry,
                Ok(entry) if entry.pos.seq > limit => break,
                Ok(entry) => {
                    failed = Some(format!(
                        "log entry {} is missing (found {})",
                        pending.through + 1,
                        entry.pos.seq
                    ));
                    break;
                }
                Err(err) => {
                    failed = Some(format!("cannot read the log: {err}"));
                    break;
                }
            };
            if entry.pos.seq > limit {
                break;
            }
            let seq = entry.pos.seq;
            let (_, record) = crate::storage::fold::admit_entry(&mut self.raft, entry)
                .map_err(|e| format!("log entry {seq} cannot be applied: {e}"))?;
            let events = match record {
                Some(record) => shadow
                    .project(seq, &record)
                    .map_err(|e| format!("log entry {seq} cannot be applied: {e}"))?,
                None => Vec::new(),
            };
            pending.projected(feed, seq, events)?;
        }
        let through = pending.finish(feed)?;
        match failed {
            // Stopped short of the limit: a snapshot installed meanwhile purged the log
            // (the next poll starts from it), or a read failed; tried again next poll.
            Some(err) if through < limit => {
                if self.cluster.applied.read().1 <= through {
                    self.read_failures += 1;
                    if self.read_failures >= READ_FAILURES_MAX {
                        return Err(err);
                    }
                }
            }
            _ => self.read_failures = 0,
        }
        Ok(through)
    }

    /// Starts again from the snapshot installed through entry `installed`: the shadow
    /// and the metadata become its state's. The events of the entries between the last
    /// one projected and the snapshot are not in this node's log (the snapshot replaced
    /// them): the feed starts again after the snapshot, unless it already reaches past it.
    fn reseed(
        &mut self,
        feed: &Feed,
        reader: &LogReader,
        shadow: &mut Shadow,
        installed: u64,
    ) -> Result<u64, String> {
        let started = Instant::now();
        let recovered = {
            let _files = lock(&self.cluster.files);
            recovery::recover_entries_at(reader, &self.cluster.snapshots, installed)
        }
        .map_err(|e| {
            format!("cannot read the snapshot installed through entry {installed}: {e}")
        })?;
        if recovered.last_seq != installed {
            return Err(format!(
                "the snapshot installed through entry {installed} is gone (the newest at or \
                 before it ends at {})",
                recovered.last_seq
            ));
        }
        *shadow = Shadow::of(&recovered.state);
        self.raft = recovered.state.raft.clone();
        self.read_failures = 0;
        {
            let mut store = feed.store();
            if store.through() < installed {
                store
                    .reset(installed)
                    .map_err(|e| format!("cannot start the store again: {e}"))?;
                feed.started_again();
            }
        }
        tracing::info!(
            installed,
            products = shadow.products(),
            ms = started.elapsed().as_millis() as u64,
            "the change feed follows the installed snapshot"
        );
        Ok(installed)
    }
}

/// The feed stops where it is (a restart derives the rest from the log) and no longer
/// holds snapshots back.
fn fail(feed: &Feed, err: String) {
    tracing::error!(error = %err, "the change feed stopped; a restart derives the missing events from the log");
    feed.shared.failed.store(true, Ordering::SeqCst);
    feed.shared.synced.store(u64::MAX, Ordering::SeqCst);
}

/// Projects the records after `pos` up to `durable`; returns the last one projected.
fn follow_records(
    feed: &Feed,
    reader: &LogReader,
    shadow: &mut Shadow,
    pos: u64,
    durable: u64,
) -> Result<u64, String> {
    let mut pending = Pending::after(pos);
    for item in reader.records_after(pos) {
        let (seq, record) = item.map_err(|e| format!("cannot read the log: {e}"))?;
        if seq > durable {
            break;
        }
        if seq != pending.through + 1 {
            return Err(format!("log record {} is missing", pending.through + 1));
        }
        let events = shadow
            .project(seq, &record)
            .map_err(|e| format!("log record {seq} cannot be applied: {e}"))?;
        pending.projected(feed, seq, events)?;
    }
    pending.finish(feed)
}

/// The events of the records projected since the last append: appended once there are
/// many, or they cover many records, and at the end of each pass.
struct Pending {
    batch: Vec<Stored>,
    /// The last record projected.
    through: u64,
    /// The last record appended.
    appended: u64,
}

impl Pending {
    fn after(pos: u64) -> Pending {
        Pending {
            batch: Vec::new(),
            through: pos,
            appended: pos,
        }
    }

    /// Record `seq` gave `events` (none: a position that is no change).
    fn projected(
        &mut self,
        feed: &Feed,
        seq: u64,
        events: Vec<crate::feed::event::Event>,
    ) -> Result<(), String> {
        self.batch.extend(stored(events));
        self.through = seq;
        if self.batch.len() >= APPEND_EVENTS_MAX
            || self.through - self.appended >= APPEND_RECORDS_MAX
        {
            publish(feed, &mut self.batch, self.through)?;
            self.appended = self.through;
        }
        Ok(())
    }

    /// Appends what is left; returns the last record projected.
    fn finish(mut self, feed: &Feed) -> Result<u64, String> {
        publish(feed, &mut self.batch, self.through)?;
        Ok(self.through)
    }
}

/// Appends `batch` (the events of the records up to `through`) and hands it to live
/// readers, in that order: a reader that subscribed before it finds it in the ring, one
/// that subscribes after it in the store. Events of records the store holds already are
/// left out: a cluster node's store can reach past the entries its start-up folded (its
/// committed mark on disk lags what it applied), and past an installed snapshot.
pub(crate) fn publish(feed: &Feed, batch: &mut Vec<Stored>, through: u64) -> Result<(), String> {
    {
        let mut store = feed.store();
        let held = store.through();
        if through <= held {
            batch.clear();
            return Ok(());
        }
        batch.retain(|event| event.position.seq > held);
        store
            .append(batch, through)
            .map_err(|e| format!("cannot append to the store: {e}"))?;
    }
    for event in batch.drain(..) {
        // No reader connected is not an error.
        let _ = feed.shared.live.send(Arc::new(event));
    }
    feed.shared.appended.send_replace(through);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::feed::Position;

    fn created(sku: &str) -> Record {
        Record::ProductCreated {
            sku: sku.into(),
            name: sku.into(),
            price: None,
            on_hand: 1,
            rules: Default::default(),
            low_stock_threshold: None,
            at: 1,
            by: None,
        }
    }

    /// Runs `records` (numbered from `first`) through a catch-up as recovery's fold would.
    fn observe<'a>(store: &'a mut Store, first: u64, records: &[Record]) -> Catchup<'a> {
        let mut state = State::default();
        let mut catchup = Catchup::new(store);
        for (i, record) in records.iter().enumerate() {
            let seq = first + i as u64;
            let wanted = catchup.wants(seq);
            if wanted {
                catchup.before(seq, record, &state);
            }
            crate::storage::fold::apply(&mut state, record).unwrap();
            if wanted {
                catchup.after(seq, record, &state);
            }
        }
        catchup
    }

    fn retention() -> crate::feed::Retention {
        crate::feed::retention_default()
    }

    #[test]
    fn events_the_store_holds_already_are_not_appended_again() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path(), 0, retention()).unwrap();
        let event = |seq| Stored {
            position: Position { seq, index: 0 },
            json: format!("{{\"id\":\"{seq}\"}}"),
        };
        store.append(&[event(1), event(2)], 2).unwrap();
        let feed = Feed::new(store);
        // A cluster node's projector starting at entry 1 (its committed mark on disk lagged
        // what it had applied): entry 2's event is in the store, entry 3's is not.
        publish(&feed, &mut vec![event(2), event(3)], 3).unwrap();
        publish(&feed, &mut vec![event(3)], 3).unwrap();
        let read = feed.read_after(Position::default(), 10).unwrap();
        let seqs: Vec<u64> = read.events.iter().map(|e| e.position.seq).collect();
        assert_eq!(seqs, vec![1, 2, 3]);
        assert_eq!(read.through, 3);
    }

    /// A cluster node's fold passes entries that fold no record (blank and membership
    /// entries): the catch-up goes on past them, without starting the store again.
    #[test]
    fn positions_that_fold_no_record_keep_the_catch_up_contiguous() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path(), 0, retention()).unwrap();
        let mut state = State::default();
        let mut catchup = Catchup::new(&mut store);
        catchup.passed(1);
        for (seq, record) in [(2, created("A")), (4, created("B"))] {
            if seq == 4 {
                catchup.passed(3);
            }
            assert!(catchup.wants(seq));
            catchup.before(seq, &record, &state);
            crate::storage::fold::apply(&mut state, &record).unwrap();
            catchup.after(seq, &record, &state);
        }
        catchup.passed(5);
        catchup.finish(0, u64::MAX).unwrap();
        assert_eq!(
            (store.floor(), store.through()),
            (0, 5),
            "never started again"
        );
        let read = store.read_after(Position::default(), 10).unwrap();
        let seqs: Vec<u64> = read.events.iter().map(|e| e.position.seq).collect();
        assert_eq!(seqs, vec![2, 4]);
    }

    #[test]
    fn recovery_derives_the_events_after_the_store_and_only_those() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path(), 0, retention()).unwrap();
        observe(&mut store, 1, &[created("A")])
            .finish(0, 1)
            .unwrap();
        assert_eq!(store.through(), 1);
        // The next start folds from the beginning again: record 1 is in the store already.
        observe(&mut store, 1, &[created("A"), created("B")])
            .finish(0, 2)
            .unwrap();
        let read = store.read_after(Position::default(), 10).unwrap();
        let seqs: Vec<u64> = read.events.iter().map(|e| e.position.seq).collect();
        assert_eq!(seqs, vec![1, 2], "no duplicate, no gap");
    }

    #[test]
    fn a_store_behind_the_snapshot_or_past_the_log_starts_again() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path(), 0, retention()).unwrap();
        // Recovery starts from a snapshot after record 6: the feed starts after it.
        observe(&mut store, 7, &[created("A")])
            .finish(6, 7)
            .unwrap();
        assert_eq!((store.floor(), store.through()), (6, 7));
        // No record after the snapshot at all.
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path(), 0, retention()).unwrap();
        observe(&mut store, 1, &[]).finish(9, 9).unwrap();
        assert_eq!((store.floor(), store.through()), (9, 9));
        // A log cut short (--truncate-damaged-log) below the store's end.
        store.append(&[], 20).unwrap();
        observe(&mut store, 10, &[]).finish(9, 12).unwrap();
        assert_eq!((store.floor(), store.through()), (12, 12));
    }
}
