//! The change feed: every change is one numbered record in the log, and the feed is that
//! log told in public terms (`GET /v1/events`).
//!
//! - `event`: what a record means as events (`events_of`, pure), and their JSON.
//! - `store`: the feed's own segment files under `<data>/events/`, with retention.
//! - `projector`: the thread that follows the durable log with a shadow state, derives
//!   each record's events with the one fold, appends them to the store and hands them to
//!   live (SSE) readers; and start-up's catch-up from recovery's fold.
//! - `shadow`: that shadow state, kept small (only recently touched products decoded).
//!
//! The feed never slows a reservation: the projector reads records once they are durable,
//! on a thread of its own; live readers get events through a bounded ring
//! (`LIVE_EVENTS_BUFFERED`) that the projector never waits on. A reader that falls that
//! far behind is dropped and resumes from the store with `Last-Event-ID`.

pub mod event;
mod projector;
pub mod shadow;
pub mod store;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::{broadcast, watch, Semaphore};

pub use event::{Kind, Position};
#[cfg(test)]
pub(crate) use projector::publish;
pub use projector::{open, Applied, Catchup, Followed, Projector};
pub use shadow::Shadow;
pub use store::{Gone, Retention, Stored};

/// Events a live reader may fall behind by before it is dropped.
pub const LIVE_EVENTS_BUFFERED: usize = 1024;
/// Live (SSE) readers at once; more are refused with 503.
pub const LIVE_READERS_MAX: usize = 256;
/// How often the projector looks for newly durable records.
pub const PROJECTOR_POLL_MS: u64 = 10;
/// How often the projector fsyncs the store and publishes how far it is synced.
pub const PROJECTOR_SYNC_MS: u64 = 100;
/// A comment line sent to an idle live reader this often, so proxies keep the connection.
pub const HEARTBEAT_SECONDS: u64 = 15;
/// Defaults of `--events-retention-seconds` and `--events-max-bytes`.
pub const EVENTS_RETENTION_SECONDS_DEFAULT: u64 = 86_400;
pub const EVENTS_MAX_BYTES_DEFAULT: u64 = 2 * 1024 * 1024 * 1024;

/// The feed's retention without flags.
pub fn retention_default() -> Retention {
    Retention {
        age: Duration::from_secs(EVENTS_RETENTION_SECONDS_DEFAULT),
        max_bytes: EVENTS_MAX_BYTES_DEFAULT,
    }
}

/// The feed as readers see it: the store, the live ring, and the figures for `/metrics`.
/// Cheap to clone.
#[derive(Clone)]
pub struct Feed {
    shared: Arc<Shared>,
}

struct Shared {
    store: Mutex<store::Store>,
    live: broadcast::Sender<Arc<Stored>>,
    /// The store is fsynced through this record: a snapshot is never taken past it
    /// (`u64::MAX` once the feed failed, so that it holds snapshots back no longer).
    synced: Arc<AtomicU64>,
    /// Set when the projector stopped on an error: the feed stays as it is until a
    /// restart, which derives the missing events again.
    failed: AtomicBool,
    readers: Arc<Semaphore>,
    readers_dropped: AtomicU64,
    /// True once the server shuts down: live readers end their streams.
    closing: watch::Sender<bool>,
    /// Counts the times the store started again after an installed snapshot (a cluster
    /// node's feed, `projector::Entries::reseed`): the events between are not in it, so
    /// live readers end their streams, and their reconnection is told `events_gone`.
    started_again: watch::Sender<u64>,
    /// True once the projector's thread ended (stopped, failed or panicked): a cluster
    /// node's snapshot build no longer waits for the store.
    stopped: AtomicBool,
    /// The store's `through` after each append: webhook deliveries wait on it when they
    /// have caught up (a wake-up only; they read the events from the store).
    appended: watch::Sender<u64>,
}

/// Figures for `/metrics`.
#[derive(Clone, Debug, Default)]
pub struct FeedStats {
    pub bytes: u64,
    pub oldest_seq: u64,
    pub newest_seq: u64,
    pub through: u64,
    pub events_written: u64,
    pub readers_connected: u64,
    pub readers_dropped: u64,
    pub failed: bool,
}

/// Which events a reader wants.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    /// `None`: every type.
    pub kinds: Option<Vec<Kind>>,
    /// Only events touching this SKU (their subject, or a product in `data.products`).
    pub sku: Option<String>,
}

#[derive(Deserialize)]
struct PeekEvent<'a> {
    #[serde(rename = "type", borrow)]
    kind: &'a str,
    #[serde(borrow)]
    subject: &'a str,
    #[serde(borrow)]
    data: PeekData<'a>,
}

#[derive(Deserialize)]
struct PeekData<'a> {
    #[serde(borrow, default)]
    products: Vec<PeekProduct<'a>>,
}

#[derive(Deserialize)]
struct PeekProduct<'a> {
    #[serde(borrow)]
    sku: &'a str,
}

impl Filter {
    pub fn is_all(&self) -> bool {
        self.kinds.is_none() && self.sku.is_none()
    }

    /// Whether the event (its JSON line) passes.
    pub fn matches(&self, json: &str) -> bool {
        if self.is_all() {
            return true;
        }
        let Ok(event) = serde_json::from_str::<PeekEvent>(json) else {
            return false;
        };
        if let Some(kinds) = &self.kinds {
            if !kinds.iter().any(|k| k.as_str() == event.kind) {
                return false;
            }
        }
        if let Some(sku) = &self.sku {
            let products = &event.data.products;
            let touches = event.subject == sku
                || (event.kind != "product.deleted" && products.iter().any(|p| p.sku == sku));
            if !touches {
                return false;
            }
        }
        true
    }
}

/// Why a live reader could not be registered.
#[derive(Debug)]
pub enum Subscribe {
    TooMany,
}

/// A live reader's registration: the ring to read, the shutdown signal, and its place
/// among `LIVE_READERS_MAX`.
pub struct LiveReader {
    pub events: broadcast::Receiver<Arc<Stored>>,
    pub closing: watch::Receiver<bool>,
    /// Changes when the store starts again after a gap (`Feed::started_again`).
    pub started_again: watch::Receiver<u64>,
    _permit: tokio::sync::OwnedSemaphorePermit,
    feed: Feed,
}

impl LiveReader {
    /// Counts this reader as dropped for being too slow.
    pub fn dropped_for_lag(&self) {
        self.feed
            .shared
            .readers_dropped
            .fetch_add(1, Ordering::Relaxed);
    }
}

impl Feed {
    /// The feed over its opened (and caught up) store.
    pub fn new(store: store::Store) -> Feed {
        let synced = Arc::new(AtomicU64::new(store.through()));
        let (live, _) = broadcast::channel(LIVE_EVENTS_BUFFERED);
        let (closing, _) = watch::channel(false);
        let (started_again, _) = watch::channel(0);
        let (appended, _) = watch::channel(store.through());
        Feed {
            shared: Arc::new(Shared {
                store: Mutex::new(store),
                live,
                synced,
                failed: AtomicBool::new(false),
                readers: Arc::new(Semaphore::new(LIVE_READERS_MAX)),
                readers_dropped: AtomicU64::new(0),
                closing,
                started_again,
                stopped: AtomicBool::new(false),
                appended,
            }),
        }
    }

    fn store(&self) -> std::sync::MutexGuard<'_, store::Store> {
        // A panic while holding the lock leaves the store as consistent as any crash.
        self.shared
            .store
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The snapshot ceiling: the store is fsynced through this record.
    pub fn synced(&self) -> Arc<AtomicU64> {
        self.shared.synced.clone()
    }

    /// Up to `max` events after `cursor` (and the rest of the last record's), in order.
    pub fn read_after(&self, cursor: Position, max: usize) -> Result<store::Found, Gone> {
        self.store().read_after(cursor, max)
    }

    /// Events of the records after this one are kept.
    pub fn floor(&self) -> u64 {
        self.store().floor()
    }

    /// Registers a live reader: events appended from now on reach its ring.
    pub fn subscribe(&self) -> Result<LiveReader, Subscribe> {
        let permit = self
            .shared
            .readers
            .clone()
            .try_acquire_owned()
            .map_err(|_| Subscribe::TooMany)?;
        Ok(LiveReader {
            events: self.shared.live.subscribe(),
            closing: self.shared.closing.subscribe(),
            started_again: self.shared.started_again.subscribe(),
            _permit: permit,
            feed: self.clone(),
        })
    }

    /// Changes each time events were appended (its value: the store's `through`).
    pub fn appended(&self) -> watch::Receiver<u64> {
        self.shared.appended.subscribe()
    }

    /// The store started again after a gap: live readers end their streams (before the
    /// events after the gap reach them).
    pub(crate) fn started_again(&self) {
        self.shared.started_again.send_modify(|n| *n += 1);
    }

    /// Whether the projector's thread has ended.
    pub fn stopped(&self) -> bool {
        self.shared.stopped.load(Ordering::SeqCst)
    }

    /// Holds the snapshot ceiling at `seq` at most: a cluster node's store can reach past
    /// the entry its projector starts after, and a snapshot must not pass the projector.
    pub fn synced_at_most(&self, seq: u64) {
        self.shared.synced.fetch_min(seq, Ordering::SeqCst);
    }

    /// Holds the store's lock (tests: a projector that cannot go on).
    #[cfg(test)]
    pub(crate) fn hold_store(&self) -> std::sync::MutexGuard<'_, store::Store> {
        self.store()
    }

    /// Ends every live reader's stream (shutdown).
    pub fn close_readers(&self) {
        let _ = self.shared.closing.send(true);
    }

    pub fn stats(&self) -> FeedStats {
        let store = self.store();
        FeedStats {
            bytes: store.bytes(),
            oldest_seq: store.floor() + 1,
            newest_seq: store.newest().map_or(0, |p| p.seq),
            through: store.through(),
            events_written: store.events_written,
            readers_connected: (LIVE_READERS_MAX - self.shared.readers.available_permits()) as u64,
            readers_dropped: self.shared.readers_dropped.load(Ordering::Relaxed),
            failed: self.shared.failed.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_by_type_and_by_sku() {
        let line = |kind: &str, subject: &str, skus: &[&str]| {
            let products: Vec<_> = skus.iter().map(|s| serde_json::json!({"sku": s})).collect();
            serde_json::json!({"type": kind, "subject": subject, "data": {"products": products}})
                .to_string()
        };
        let created = line("reservation.created", "r-1", &["A", "B"]);
        let all = Filter::default();
        assert!(all.matches(&created));
        let by_kind = Filter {
            kinds: Some(vec![Kind::ReservationCreated, Kind::StockSoldOut]),
            sku: None,
        };
        assert!(by_kind.matches(&created));
        assert!(!by_kind.matches(&line("stock.replenished", "A", &["A"])));
        let by_sku = Filter {
            kinds: None,
            sku: Some("B".into()),
        };
        assert!(by_sku.matches(&created));
        assert!(by_sku.matches(&line("product.deleted", "B", &[])));
        assert!(!by_sku.matches(&line("stock.adjusted", "A", &["A"])));
    }
}
