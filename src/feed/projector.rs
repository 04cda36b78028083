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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crate::feed::event::{events_of, Before};
use crate::feed::shadow::Shadow;
use crate::feed::store::{Store, Stored};
use crate::feed::{Feed, PROJECTOR_POLL_MS, PROJECTOR_SYNC_MS};
use crate::storage::fold::State;
use crate::storage::log::{LogHandle, LogReader};
use crate::storage::record::Record;
use crate::storage::recovery::FoldObserver;

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

impl FoldObserver for Catchup<'_> {
    fn wants(&self, seq: u64) -> bool {
        self.error.is_none() && seq > self.through
    }

    fn before(&mut self, seq: u64, record: &Record, state: &State) {
        if seq != self.through + 1 {
            // The fold starts after the store's end (a new store, or one older than the
            // newest snapshot): the feed starts again after the snapshot.
            self.batch.clear();
            if let Err(err) = self.store.reset(seq - 1) {
                self.error = Some(err);
                return;
            }
            self.through = seq - 1;
        }
        self.before = Some(Before::of(record, state));
    }

    fn after(&mut self, seq: u64, record: &Record, state: &State) {
        let Some(before) = self.before.take() else {
            return; // `before` failed
        };
        self.batch
            .extend(stored(events_of(&before, seq, record, state)));
        self.through = seq;
        if self.batch.len() >= APPEND_EVENTS_MAX
            || self.through - self.store.through() >= APPEND_RECORDS_MAX
        {
            self.append();
        }
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
        let stop = Arc::new(AtomicBool::new(false));
        let thread = thread::Builder::new()
            .name("stockd-projector".into())
            .spawn({
                let stop = stop.clone();
                move || run(feed, reader, log, shadow, after, stop)
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

fn run(
    feed: Feed,
    reader: LogReader,
    log: LogHandle,
    mut shadow: Shadow,
    mut pos: u64,
    stop: Arc<AtomicBool>,
) {
    let mut last_sync = Instant::now();
    loop {
        let stopping = stop.load(Ordering::SeqCst);
        let durable = log.durable_seq();
        if durable > pos {
            match follow(&feed, &reader, &mut shadow, pos, durable) {
                Ok(through) => pos = through,
                Err(err) => return fail(&feed, err),
            }
        }
        if stopping || last_sync.elapsed() >= Duration::from_millis(PROJECTOR_SYNC_MS) {
            // The fsync runs without the store's lock: readers never wait for the disk.
            let taken = {
                let mut store = feed.store();
                store.to_sync().map(|file| (file, store.through()))
            };
            let synced = taken.and_then(|(file, through)| match file {
                Some(file) => file.sync_data().map(|()| through),
                None => Ok(through),
            });
            match synced {
                Ok(through) => {
                    feed.shared.synced.fetch_max(through, Ordering::SeqCst);
                }
                Err(err) => return fail(&feed, format!("cannot sync the store: {err}")),
            }
            last_sync = Instant::now();
        }
        if stopping && log.durable_seq() <= pos {
            return;
        }
        thread::sleep(Duration::from_millis(PROJECTOR_POLL_MS));
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
fn follow(
    feed: &Feed,
    reader: &LogReader,
    shadow: &mut Shadow,
    pos: u64,
    durable: u64,
) -> Result<u64, String> {
    let mut batch = Vec::new();
    let mut through = pos;
    let mut appended = pos;
    for item in reader.records_after(pos) {
        let (seq, record) = item.map_err(|e| format!("cannot read the log: {e}"))?;
        if seq > durable {
            break;
        }
        if seq != through + 1 {
            return Err(format!("log record {} is missing", through + 1));
        }
        let events = shadow
            .project(seq, &record)
            .map_err(|e| format!("log record {seq} cannot be applied: {e}"))?;
        batch.extend(stored(events));
        through = seq;
        if batch.len() >= APPEND_EVENTS_MAX || through - appended >= APPEND_RECORDS_MAX {
            publish(feed, &mut batch, through)?;
            appended = through;
        }
    }
    publish(feed, &mut batch, through)?;
    Ok(through)
}

/// Appends `batch` (the events of the records up to `through`) and hands it to live
/// readers, in that order: a reader that subscribed before it finds it in the ring, one
/// that subscribes after it in the store.
fn publish(feed: &Feed, batch: &mut Vec<Stored>, through: u64) -> Result<(), String> {
    feed.store()
        .append(batch, through)
        .map_err(|e| format!("cannot append to the store: {e}"))?;
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
