//! Webhooks: the change feed's events pushed to HTTP endpoints, signed the Standard
//! Webhooks way (<https://www.standardwebhooks.com>).
//!
//! Each endpoint has a task of its own on the runtime, outside every request's path. The
//! task reads the feed's store after its cursor (`Feed::read_after`, at most
//! `READ_CHUNK` events at a time: that, one request and its answer capped at
//! `RESPONSE_BYTES_MAX` are all it holds in memory), sends each event its filters want
//! (one request per event, one at a time, in feed order), and moves its cursor once the
//! endpoint answered 2xx. A failure (a status that is not 2xx, a connection error, the
//! request timeout) is retried with exponential backoff and jitter until the endpoint has
//! failed for `give_up` (a day by default); then it is disabled, and says so, until
//! `POST /v1/webhooks/{id}/enable`. An endpoint that is down holds up only itself: the
//! events wait in the feed's store, not in memory. Caught up, a task waits on the feed's
//! `appended` signal.
//!
//! Durability (`store`): registrations are fsynced before they are answered; a cursor is
//! written after each acknowledged delivery, before the next is sent, and fsynced every
//! second. So `kill -9` neither skips an event nor sends again one that was acknowledged
//! (only the one whose 2xx had not yet been recorded, if the kill fell between the two);
//! a power loss sends again at most the last second's acknowledged events. On a cluster
//! (`Keeper::Log`) the registrations and positions are records of the replicated log
//! instead: a registration is answered once its record is committed, and the positions are
//! committed about once a second (`WebhookPositions`), so after `kill -9` of the leader the
//! next one sends again at most what was delivered since; a leader whose epoch ends
//! proposes its last positions first (at most `LAST_POSITIONS_WAIT`), and only the
//! deliveries then in flight, abandoned, are sent again.
//!
//! https endpoints are verified against the webpki roots (Mozilla's), plus the
//! certificates of `--webhook-ca-file` (`Roots`): a shop's own CA, for endpoints whose
//! certificate no public CA signed.

pub mod store;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::cluster::journal::Journal;
use crate::domain::WebhookBook;
use crate::feed::{Feed, Filter, Gone, Kind, Position};
use crate::storage::log::LogHandle;
use crate::storage::record::Record;
use crate::sync::lock;
pub use store::{Disabled, Registration};

/// Endpoints at most.
pub const ENDPOINTS_MAX: usize = 100;
/// SKUs in one endpoint's filter, at most.
pub const SKUS_MAX: usize = 100;
/// The longest URL accepted.
pub const URL_CHARS_MAX: usize = 2048;
/// Events a task reads from the store at a time.
pub const READ_CHUNK: usize = 64;
/// Bytes of an endpoint's answer read (and thrown away) at most.
pub const RESPONSE_BYTES_MAX: usize = 64 * 1024;
/// Positions are fsynced this often.
pub const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// Bytes of a secret's key (from the OS's random source).
pub const SECRET_BYTES: usize = 32;
/// The defaults of the delivery schedule's flags.
pub const TIMEOUT_MS_DEFAULT: u64 = 10_000;
pub const RETRY_INITIAL_MS_DEFAULT: u64 = 5_000;
pub const RETRY_MAX_MS_DEFAULT: u64 = 3_600_000;
pub const GIVE_UP_SECONDS_DEFAULT: u64 = 86_400;

/// How deliveries are timed (`--webhook-*` flags).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Schedule {
    /// Every request's deadline (connect, send, answer).
    pub timeout: Duration,
    /// The wait after the first failure; each further failure doubles it...
    pub retry_initial: Duration,
    /// ...up to this.
    pub retry_max: Duration,
    /// An endpoint failing for this long is disabled.
    pub give_up: Duration,
}

impl Default for Schedule {
    fn default() -> Schedule {
        Schedule {
            timeout: Duration::from_millis(TIMEOUT_MS_DEFAULT),
            retry_initial: Duration::from_millis(RETRY_INITIAL_MS_DEFAULT),
            retry_max: Duration::from_millis(RETRY_MAX_MS_DEFAULT),
            give_up: Duration::from_secs(GIVE_UP_SECONDS_DEFAULT),
        }
    }
}

impl Schedule {
    /// The wait before the retry that follows failure number `failures` (1 for the
    /// first): `retry_initial × 2^(failures−1)`, capped at `retry_max`, times a random
    /// factor from 0.5 to 1 (jitter, so endpoints that failed together do not retry
    /// together).
    pub fn backoff(&self, failures: u32, random: u64) -> Duration {
        let doublings = failures.saturating_sub(1).min(40);
        let base = self
            .retry_initial
            .saturating_mul(1u32 << doublings.min(31))
            .min(self.retry_max);
        let fraction = 0.5 + (random >> 11) as f64 / (1u64 << 53) as f64 / 2.0;
        base.mul_f64(fraction)
    }
}

/// A new endpoint, validated (`http::input::create_webhook`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewEndpoint {
    pub url: String,
    pub types: Option<Vec<Kind>>,
    pub skus: Option<Vec<String>>,
}

/// Why a request about webhooks failed.
#[derive(Debug)]
pub enum WebhookError {
    NotFound,
    TooMany,
    /// The log's barrier failed (the log cannot be written), the store cannot be, or on a
    /// cluster the record was not committed.
    Unavailable(String),
}

/// An endpoint as the API shows it (the secret only when just created).
#[derive(Clone, Debug, serde::Serialize)]
pub struct EndpointView {
    pub id: String,
    pub url: String,
    pub types: Option<Vec<String>>,
    pub skus: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    pub created_at: String,
    pub started_after_seq: u64,
    /// The id of the last event acknowledged or passed over by the filters (`None`:
    /// none yet).
    pub position: Option<String>,
    /// The log record of the feed's newest event minus the position's: how far behind.
    pub lag_records: u64,
    pub state: &'static str,
    pub failing_since: Option<String>,
    pub attempts: u32,
    pub next_attempt_at: Option<String>,
    pub last_attempt_at: Option<String>,
    pub last_success_at: Option<String>,
    pub last_error: Option<String>,
    pub disabled_at: Option<String>,
    pub disabled_reason: Option<String>,
    pub disabled_detail: Option<String>,
    pub deliveries: u64,
    pub failures: u64,
}

/// Figures for `/metrics`.
#[derive(Clone, Debug, Default)]
pub struct WebhookStats {
    pub endpoints: u64,
    pub disabled: u64,
    pub failing: u64,
    pub deliveries: u64,
    pub failures: u64,
    /// Per endpoint: its id and `lag_records`.
    pub lag: Vec<(String, u64)>,
}

/// What only the running server knows about an endpoint (since its start).
#[derive(Clone, Debug, Default)]
struct Live {
    position: Position,
    /// The position last written to the positions file.
    recorded: Position,
    attempts: u32,
    next_attempt_at: Option<i64>,
    last_attempt_at: Option<i64>,
    last_success_at: Option<i64>,
    last_error: Option<String>,
    deliveries: u64,
    failures: u64,
}

struct Endpoint {
    registration: Mutex<Registration>,
    live: Mutex<Live>,
    /// Enable, retry now, delete, shutdown.
    wake: Notify,
    deleted: AtomicBool,
    filter: EndpointFilter,
    key: Vec<u8>,
}

struct EndpointFilter {
    kinds: Filter,
    skus: Option<Vec<Filter>>,
}

impl EndpointFilter {
    fn new(types: &Option<Vec<String>>, skus: &Option<Vec<String>>) -> EndpointFilter {
        EndpointFilter {
            kinds: Filter {
                kinds: types
                    .as_ref()
                    .map(|t| t.iter().filter_map(|k| Kind::parse(k)).collect()),
                sku: None,
            },
            skus: skus.as_ref().map(|skus| {
                skus.iter()
                    .map(|sku| Filter {
                        kinds: None,
                        sku: Some(sku.clone()),
                    })
                    .collect()
            }),
        }
    }

    fn matches(&self, json: &str) -> bool {
        self.kinds.matches(json)
            && self
                .skus
                .as_ref()
                .is_none_or(|skus| skus.iter().any(|f| f.matches(json)))
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn rfc3339(ms: i64) -> String {
    crate::clock::rfc3339(ms)
}

fn random_u64() -> u64 {
    getrandom::u64().unwrap_or(0x9e37_79b9_7f4a_7c15)
}

/// A new secret: `whsec_` and the base64 of `SECRET_BYTES` random bytes.
fn new_secret() -> Result<String, WebhookError> {
    let mut key = [0u8; SECRET_BYTES];
    getrandom::fill(&mut key)
        .map_err(|e| WebhookError::Unavailable(format!("no random source: {e}")))?;
    Ok(format!("whsec_{}", BASE64.encode(key)))
}

fn secret_key(secret: &str) -> Vec<u8> {
    BASE64
        .decode(secret.strip_prefix("whsec_").unwrap_or(secret))
        .unwrap_or_default()
}

/// The `webhook-signature` value: `v1,` + base64 of HMAC-SHA256(key, `{id}.{ts}.{body}`).
pub fn sign(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes a key of any length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1,{}", BASE64.encode(mac.finalize().into_bytes()))
}

/// The webhooks of one server. Cheap to clone.
#[derive(Clone)]
pub struct Webhooks {
    inner: Arc<Inner>,
}

struct Inner {
    feed: Feed,
    /// Where a registration's "after" is read (its barrier), and, on a cluster, where
    /// registrations and positions go.
    journal: Journal,
    /// On a cluster, every record up to here was committed before this epoch began: an
    /// endpoint registered in it starts after it at least (the epoch's own barrier says 0
    /// until it has proposed something).
    committed_before: u64,
    schedule: Schedule,
    client: reqwest::Client,
    keeper: Keeper,
    /// Changes of the registrations are made one at a time (and so saved in order).
    registering: tokio::sync::Mutex<()>,
    endpoints: RwLock<BTreeMap<Uuid, Arc<Endpoint>>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    closing: watch::Sender<bool>,
    deliveries: AtomicU64,
    failures: AtomicU64,
}

/// Where registrations and positions are kept.
enum Keeper {
    /// A single server: `<data>/webhooks/` (`store`).
    Files(Mutex<store::Store>),
    /// A cluster leader's epoch: records in the replicated log, `WebhookSaved` and
    /// `WebhookRemoved` for the registrations (answered once committed: one endpoint a
    /// record, so a record stays small) and `WebhookPositions` for the positions,
    /// sent by the flusher about once a second (`unsent`: positions recorded since). A new
    /// leader delivers from the last positions committed: at most about the last second's
    /// acknowledged events are sent again.
    Log {
        unsent: Mutex<BTreeMap<Uuid, Position>>,
    },
}

/// One change of the registrations: what a cluster records (a single server rewrites
/// them all).
enum Change {
    Saved(Registration),
    Removed(Uuid),
}

/// How often a cluster's endpoint whose position is before what the leader's feed keeps
/// looks again.
const GONE_RETRY: Duration = Duration::from_secs(5);

/// How long a cluster leader's last positions may take to commit as its epoch ends.
const LAST_POSITIONS_WAIT: Duration = Duration::from_secs(2);

impl Inner {
    /// Saves the registrations, `all` of them after `change`, durably: the files'
    /// rewrite (on a blocking thread, never on a runtime worker serving requests), or the
    /// change's record, committed.
    async fn save_all(
        self: &Arc<Inner>,
        all: Vec<Registration>,
        change: Change,
    ) -> Result<(), String> {
        match &self.keeper {
            Keeper::Files(_) => {
                let inner = self.clone();
                tokio::task::spawn_blocking(move || match &inner.keeper {
                    Keeper::Files(store) => lock(store).save_registrations(&all),
                    Keeper::Log { .. } => unreachable!("a keeper never changes"),
                })
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("cannot save the webhooks: {e}"))
            }
            Keeper::Log { .. } => self
                .journal
                .append(match change {
                    Change::Saved(registration) => Record::WebhookSaved {
                        registration,
                        at: now_ms(),
                    },
                    Change::Removed(id) => Record::WebhookRemoved { id, at: now_ms() },
                })
                .durable()
                .await
                .map(drop)
                .map_err(|e| format!("cannot save the webhooks: {e}")),
        }
    }

    /// Records an endpoint's position: written to the positions file (before the next
    /// delivery), or kept for the flusher's next record. Answers whether it was.
    fn record_position(&self, id: Uuid, position: Position) -> bool {
        match &self.keeper {
            Keeper::Files(store) => match lock(store).record(id, position) {
                Ok(()) => true,
                Err(err) => {
                    tracing::error!(error = %err, "cannot write a webhook's position");
                    false
                }
            },
            Keeper::Log { unsent } => {
                lock(unsent).insert(id, position);
                true
            }
        }
    }

    /// Records the positions the filters alone moved, then makes the positions durable:
    /// the positions file fsynced (compacted first when it has grown), or the positions
    /// recorded since the last flush committed in one `WebhookPositions`. An error says
    /// they are not durable (logged here; a later flush tries again).
    async fn flush(self: &Arc<Inner>) -> Result<(), String> {
        let endpoints: Vec<(Uuid, Arc<Endpoint>)> = self
            .endpoints
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(id, e)| (*id, e.clone()))
            .collect();
        match &self.keeper {
            Keeper::Files(_) => {
                let inner = self.clone();
                tokio::task::spawn_blocking(move || sync_positions(&inner, &endpoints))
                    .await
                    .map_err(|e| e.to_string())?
            }
            Keeper::Log { unsent } => {
                for (id, endpoint) in &endpoints {
                    let mut live = lock(&endpoint.live);
                    if live.recorded != live.position {
                        lock(unsent).insert(*id, live.position);
                        live.recorded = live.position;
                    }
                }
                let taken = std::mem::take(&mut *lock(unsent));
                if taken.is_empty() {
                    return Ok(());
                }
                let positions = taken.iter().map(|(id, p)| (*id, p.seq, p.index)).collect();
                let sent = self
                    .journal
                    .append(Record::WebhookPositions {
                        positions,
                        at: now_ms(),
                    })
                    .durable()
                    .await;
                if let Err(err) = sent {
                    tracing::warn!(error = %err, "cannot record the webhooks' positions");
                    // Sent again with the next flush, unless a later one replaced them.
                    let mut unsent = lock(unsent);
                    for (id, position) in taken {
                        unsent.entry(id).or_insert(position);
                    }
                    return Err(format!("cannot record the webhooks' positions: {err}"));
                }
                Ok(())
            }
        }
    }
}

/// Certificates trusted as roots for https endpoints beside the webpki roots (the
/// certificates of `--webhook-ca-file`; none by default). Loaded and checked at start-up,
/// before recovery (`Roots::load`), so a wrong file stops the server at once rather than
/// failing every delivery later.
#[derive(Clone, Default)]
pub struct Roots(Vec<reqwest::Certificate>);

impl std::fmt::Debug for Roots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Roots({} certificates)", self.0.len())
    }
}

impl Roots {
    /// The certificates of the PEM file at `path` (one or more `CERTIFICATE` blocks; other
    /// blocks, such as a private key, are ignored). A file that cannot be read, holds no
    /// certificate, or holds one that cannot be a trust anchor is refused, saying why.
    pub fn load(path: &std::path::Path) -> Result<Roots, String> {
        let bytes = std::fs::read(path).map_err(|e| format!("cannot read it: {e}"))?;
        let certificates = reqwest::Certificate::from_pem_bundle(&bytes)
            .map_err(|e| format!("it is not a PEM file of certificates: {}", source_chain(&e)))?;
        if certificates.is_empty() {
            return Err("it holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into());
        }
        let roots = Roots(certificates);
        // The TLS stack parses the certificates when a client is built: build one now.
        client(&Schedule::default(), &roots)
            .map_err(|e| format!("a certificate in it cannot be used: {}", source_chain(&e)))?;
        Ok(roots)
    }

    /// How many certificates.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The HTTP client of the deliveries: the schedule's timeouts, no redirects, the webpki
/// roots and `roots`.
fn client(schedule: &Schedule, roots: &Roots) -> reqwest::Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder()
        .timeout(schedule.timeout)
        .connect_timeout(schedule.timeout)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("stockd-webhooks/", env!("CARGO_PKG_VERSION")));
    for certificate in &roots.0 {
        builder = builder.add_root_certificate(certificate.clone());
    }
    builder.build()
}

impl Webhooks {
    /// Opens `<data>/webhooks` and starts a task per endpoint (inside a Tokio runtime).
    /// https endpoints are verified against the webpki roots and `roots`.
    pub fn start(
        dir: &std::path::Path,
        feed: Feed,
        log: LogHandle,
        schedule: Schedule,
        roots: &Roots,
    ) -> std::io::Result<Webhooks> {
        let opened = store::Store::open(dir)?;
        let keeper = Keeper::Files(Mutex::new(opened.store));
        let webhooks = Webhooks::new(feed, Journal::Local(log), 0, schedule, roots, keeper)?;
        // The feed ends here after recovery. A position past it means the log was cut
        // short (`--truncate-damaged-log`) behind records already delivered: the records
        // written from now on reuse those numbers, and an endpoint left past them would
        // skip them. It starts again at the feed's end.
        let through = webhooks.inner.feed.stats().through;
        for registration in opened.registrations {
            let mut position = opened
                .positions
                .get(&registration.id)
                .copied()
                .unwrap_or(Position::after_record(registration.started_after_seq));
            if position.seq > through {
                tracing::warn!(
                    endpoint = %registration.id,
                    position = %position.id(),
                    feed_through = through,
                    "a webhook endpoint's position is past the end of the log (the log was \
                     cut short): it goes on after the log's last record"
                );
                position = Position::after_record(through);
            }
            webhooks.add(registration, position);
        }
        webhooks.start_flusher();
        Ok(webhooks)
    }

    /// A cluster leader's webhooks for its epoch: the endpoints and positions of the
    /// committed state (`book`), kept through the epoch's `journal`, delivering the
    /// node's feed. `committed_before`: the entry the epoch began after.
    pub fn start_replicated(
        book: WebhookBook,
        feed: Feed,
        journal: Journal,
        committed_before: u64,
        schedule: Schedule,
        roots: &Roots,
    ) -> std::io::Result<Webhooks> {
        let keeper = Keeper::Log {
            unsent: Mutex::default(),
        };
        let webhooks = Webhooks::new(feed, journal, committed_before, schedule, roots, keeper)?;
        for registration in book.endpoints {
            let position = match book.positions.get(&registration.id) {
                Some(&(seq, index)) => Position { seq, index },
                None => Position::after_record(registration.started_after_seq),
            };
            webhooks.add(registration, position);
        }
        webhooks.start_flusher();
        Ok(webhooks)
    }

    fn new(
        feed: Feed,
        journal: Journal,
        committed_before: u64,
        schedule: Schedule,
        roots: &Roots,
        keeper: Keeper,
    ) -> std::io::Result<Webhooks> {
        let client = client(&schedule, roots).map_err(std::io::Error::other)?;
        let (closing, _) = watch::channel(false);
        Ok(Webhooks {
            inner: Arc::new(Inner {
                feed,
                journal,
                committed_before,
                schedule,
                client,
                keeper,
                registering: tokio::sync::Mutex::new(()),
                endpoints: RwLock::new(BTreeMap::new()),
                tasks: Mutex::new(Vec::new()),
                closing,
                deliveries: AtomicU64::new(0),
                failures: AtomicU64::new(0),
            }),
        })
    }

    fn start_flusher(&self) {
        let flusher = tokio::spawn(flush_positions(self.inner.clone()));
        lock(&self.inner.tasks).push(flusher);
    }

    fn add(&self, registration: Registration, position: Position) {
        let endpoint = Arc::new(Endpoint {
            filter: EndpointFilter::new(&registration.types, &registration.skus),
            key: secret_key(&registration.secret),
            registration: Mutex::new(registration.clone()),
            live: Mutex::new(Live {
                position,
                recorded: position,
                ..Live::default()
            }),
            wake: Notify::new(),
            deleted: AtomicBool::new(false),
        });
        self.inner
            .endpoints
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(registration.id, endpoint.clone());
        let task = tokio::spawn(deliver(self.inner.clone(), endpoint));
        let mut tasks = lock(&self.inner.tasks);
        tasks.retain(|t| !t.is_finished());
        tasks.push(task);
    }

    fn get(&self, id: Uuid) -> Option<Arc<Endpoint>> {
        self.inner
            .endpoints
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned()
    }

    fn registrations(&self) -> Vec<Registration> {
        self.inner
            .endpoints
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|e| lock(&e.registration).clone())
            .collect()
    }

    /// Registers an endpoint, durably, starting after the last record logged so far.
    pub async fn register(&self, new: NewEndpoint) -> Result<EndpointView, WebhookError> {
        let _one = self.inner.registering.lock().await;
        if self.inner.endpoints.read().map_or(0, |e| e.len()) >= ENDPOINTS_MAX {
            return Err(WebhookError::TooMany);
        }
        // Every record queued before this moment is "before the registration".
        let after = self
            .inner
            .journal
            .barrier()
            .durable()
            .await
            .map_err(|e| WebhookError::Unavailable(e.to_string()))?
            .max(self.inner.committed_before);
        let registration = Registration {
            id: Uuid::now_v7(),
            url: new.url,
            types: new
                .types
                .map(|t| t.into_iter().map(|k| k.as_str().to_string()).collect()),
            skus: new.skus,
            secret: new_secret()?,
            created_at: now_ms(),
            started_after_seq: after,
            failing_since: None,
            disabled: None,
        };
        let mut all = self.registrations();
        all.push(registration.clone());
        self.save(all, Change::Saved(registration.clone())).await?;
        let position = Position::after_record(after);
        self.add(registration.clone(), position);
        let endpoint = self.get(registration.id).expect("just added");
        let mut view = self.view(&endpoint);
        view.secret = Some(registration.secret);
        Ok(view)
    }

    async fn save(&self, all: Vec<Registration>, change: Change) -> Result<(), WebhookError> {
        self.inner
            .save_all(all, change)
            .await
            .map_err(WebhookError::Unavailable)
    }

    /// Every endpoint, oldest first.
    pub fn list(&self) -> Vec<EndpointView> {
        let endpoints: Vec<Arc<Endpoint>> = self
            .inner
            .endpoints
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        endpoints.iter().map(|e| self.view(e)).collect()
    }

    pub fn show(&self, id: Uuid) -> Result<EndpointView, WebhookError> {
        let endpoint = self.get(id).ok_or(WebhookError::NotFound)?;
        Ok(self.view(&endpoint))
    }

    /// Removes an endpoint, durably; its task stops (a delivery in flight is abandoned).
    pub async fn delete(&self, id: Uuid) -> Result<(), WebhookError> {
        let _one = self.inner.registering.lock().await;
        if self.get(id).is_none() {
            return Err(WebhookError::NotFound);
        }
        let all: Vec<Registration> = self
            .registrations()
            .into_iter()
            .filter(|r| r.id != id)
            .collect();
        self.save(all, Change::Removed(id)).await?;
        let removed = self
            .inner
            .endpoints
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        if let Some(endpoint) = removed {
            endpoint.deleted.store(true, Ordering::SeqCst);
            endpoint.wake.notify_one();
        }
        Ok(())
    }

    /// Enables a disabled endpoint (durably), or has a failing one retry now. One whose
    /// position fell behind the feed's store (disabled for it on a single server, waiting
    /// on a cluster) resumes at the oldest event kept (the gap is its `last_error`).
    pub async fn enable(&self, id: Uuid) -> Result<EndpointView, WebhookError> {
        let _one = self.inner.registering.lock().await;
        let endpoint = self.get(id).ok_or(WebhookError::NotFound)?;
        let was = lock(&endpoint.registration).clone();
        let behind = lock(&endpoint.live).position.seq < self.inner.feed.floor();
        if was.disabled.is_some() || was.failing_since.is_some() || behind {
            let mut all = self.registrations();
            let mut enabled = was.clone();
            enabled.disabled = None;
            enabled.failing_since = None;
            for r in all.iter_mut().filter(|r| r.id == id) {
                *r = enabled.clone();
            }
            if enabled != was {
                self.save(all, Change::Saved(enabled)).await?;
            }
            {
                let mut registration = lock(&endpoint.registration);
                registration.disabled = None;
                registration.failing_since = None;
            }
            let floor = self.inner.feed.floor();
            let skipped_to = {
                let mut live = lock(&endpoint.live);
                live.attempts = 0;
                live.next_attempt_at = None;
                if live.position.seq < floor {
                    live.last_error = Some(format!(
                        "resumed after the events of log records {} to {floor}, no longer \
                         kept, were skipped",
                        live.position.seq + 1
                    ));
                    live.position = Position::after_record(floor);
                    Some(live.position)
                } else {
                    None
                }
            };
            if let Some(position) = skipped_to {
                if self.inner.record_position(id, position) {
                    lock(&endpoint.live).recorded = position;
                }
                // Answered once the skip is durable (committed, on a cluster), so that
                // neither a restart nor the next leader takes the endpoint back behind
                // the floor. A failure is a 503; enabling again is safe.
                self.inner
                    .flush()
                    .await
                    .map_err(WebhookError::Unavailable)?;
            }
        }
        endpoint.wake.notify_one();
        Ok(self.view(&endpoint))
    }

    fn view(&self, endpoint: &Endpoint) -> EndpointView {
        let r = lock(&endpoint.registration).clone();
        let live = lock(&endpoint.live).clone();
        let newest = self.inner.feed.stats().newest_seq;
        let state = if r.disabled.is_some() {
            "disabled"
        } else if r.failing_since.is_some() {
            "failing"
        } else {
            "active"
        };
        EndpointView {
            id: r.id.to_string(),
            url: r.url,
            types: r.types,
            skus: r.skus,
            secret: None,
            created_at: rfc3339(r.created_at),
            started_after_seq: r.started_after_seq,
            position: (live.position.index != u32::MAX).then(|| live.position.id()),
            lag_records: newest.saturating_sub(live.position.seq),
            state,
            failing_since: r.failing_since.map(rfc3339),
            attempts: live.attempts,
            next_attempt_at: live.next_attempt_at.map(rfc3339),
            last_attempt_at: live.last_attempt_at.map(rfc3339),
            last_success_at: live.last_success_at.map(rfc3339),
            last_error: live.last_error,
            disabled_at: r.disabled.as_ref().map(|d| rfc3339(d.at)),
            disabled_reason: r.disabled.as_ref().map(|d| d.reason.clone()),
            disabled_detail: r.disabled.map(|d| d.detail),
            deliveries: live.deliveries,
            failures: live.failures,
        }
    }

    pub fn stats(&self) -> WebhookStats {
        let views = self.list();
        WebhookStats {
            endpoints: views.len() as u64,
            disabled: views.iter().filter(|v| v.state == "disabled").count() as u64,
            failing: views.iter().filter(|v| v.state == "failing").count() as u64,
            deliveries: self.inner.deliveries.load(Ordering::Relaxed),
            failures: self.inner.failures.load(Ordering::Relaxed),
            lag: views.into_iter().map(|v| (v.id, v.lag_records)).collect(),
        }
    }

    /// Stops every task (deliveries in flight are abandoned: not acknowledged, they are
    /// sent again after the restart, or by the next leader) and makes the positions
    /// durable (a cluster's epoch waits `LAST_POSITIONS_WAIT` at most).
    pub async fn shutdown(&self) {
        let _ = self.inner.closing.send(true);
        let tasks: Vec<JoinHandle<()>> = lock(&self.inner.tasks).drain(..).collect();
        for task in tasks {
            task.abort();
            let _ = task.await;
        }
        match self.inner.keeper {
            // The fsync of the positions file, however long the disk takes (an error is
            // logged: the restart sends what follows the last durable position).
            Keeper::Files(_) => drop(self.inner.flush().await),
            Keeper::Log { .. } => {
                let flushed = tokio::time::timeout(LAST_POSITIONS_WAIT, self.inner.flush()).await;
                if !matches!(flushed, Ok(Ok(()))) {
                    tracing::warn!(
                        "the webhooks' last positions were not committed (in time): the next \
                         leader sends their events again"
                    );
                }
            }
        }
    }
}

/// Fsyncs the positions file (compacting it first when it has grown).
fn sync_positions(inner: &Inner, endpoints: &[(Uuid, Arc<Endpoint>)]) -> Result<(), String> {
    let Keeper::Files(store) = &inner.keeper else {
        return Ok(());
    };
    let taken = {
        let mut store = lock(store);
        // Positions moved by the filters alone (no delivery wrote them).
        for (id, endpoint) in endpoints {
            let mut live = lock(&endpoint.live);
            if live.recorded != live.position && store.record(*id, live.position).is_ok() {
                live.recorded = live.position;
            }
        }
        if store.wants_compaction() {
            let positions: Vec<(Uuid, Position)> = endpoints
                .iter()
                .map(|(id, e)| (*id, lock(&e.live).recorded))
                .collect();
            if let Err(err) = store.compact(&positions) {
                tracing::error!(error = %err, "cannot compact the webhooks' positions");
            }
        }
        store.to_sync()
    };
    let synced = match taken {
        Ok(Some(file)) => file.sync_data(),
        Ok(None) => Ok(()),
        Err(err) => Err(err),
    };
    synced.map_err(|err| {
        tracing::error!(error = %err, "cannot fsync the webhooks' positions");
        format!("cannot fsync the webhooks' positions: {err}")
    })
}

async fn flush_positions(inner: Arc<Inner>) {
    let mut closing = inner.closing.subscribe();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(FLUSH_EVERY) => {}
            _ = closing.changed() => return,
        }
        // A failure is logged, and the next flush tries again.
        let _ = inner.flush().await;
    }
}

/// How one attempt ended.
enum Attempt {
    Acknowledged,
    Failed(String),
}

/// Sends one event once.
async fn attempt(inner: &Inner, endpoint: &Endpoint, url: &str, id: &str, body: &str) -> Attempt {
    let timestamp = now_ms() / 1000;
    let signature = sign(&endpoint.key, id, timestamp, body.as_bytes());
    let sent = inner
        .client
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header("webhook-id", id)
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", signature)
        .body(body.to_string())
        .send()
        .await;
    let mut response = match sent {
        Ok(response) => response,
        Err(err) => return Attempt::Failed(describe(&err, inner.schedule.timeout)),
    };
    // The answer's body is read (so the connection can be used again) but never kept:
    // at most RESPONSE_BYTES_MAX of it, within the request's timeout.
    let mut read = 0;
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                read += chunk.len();
                if read > RESPONSE_BYTES_MAX {
                    break;
                }
            }
            Ok(None) => break,
            Err(err) => {
                if response.status().is_success() {
                    return Attempt::Failed(describe(&err, inner.schedule.timeout));
                }
                break;
            }
        }
    }
    let status = response.status();
    if status.is_success() {
        Attempt::Acknowledged
    } else {
        Attempt::Failed(format!("the endpoint answered {status}"))
    }
}

fn describe(err: &reqwest::Error, timeout: Duration) -> String {
    if err.is_timeout() {
        format!("no answer within {} ms (timeout)", timeout.as_millis())
    } else if err.is_connect() {
        format!("cannot connect: {}", source_chain(err))
    } else {
        source_chain(err)
    }
}

fn source_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// One endpoint's task: reads its events from the feed's store and delivers them in order.
async fn deliver(inner: Arc<Inner>, endpoint: Arc<Endpoint>) {
    let mut appended = inner.feed.appended();
    let mut closing = inner.closing.subscribe();
    let id = lock(&endpoint.registration).id;
    loop {
        if *closing.borrow() || endpoint.deleted.load(Ordering::SeqCst) {
            return;
        }
        if lock(&endpoint.registration).disabled.is_some() {
            tokio::select! {
                _ = endpoint.wake.notified() => {}
                _ = closing.changed() => {}
            }
            continue;
        }
        // Appends from now on wake the wait below, if the read finds nothing.
        appended.borrow_and_update();
        let cursor = lock(&endpoint.live).position;
        let feed = inner.feed.clone();
        let read = tokio::task::spawn_blocking(move || feed.read_after(cursor, READ_CHUNK)).await;
        let found = match read {
            Ok(Ok(found)) => found,
            Ok(Err(Gone { oldest_seq })) => {
                if let Keeper::Log { .. } = inner.keeper {
                    // A cluster's leader may lack events the others keep (its feed started
                    // again after a snapshot it installed): not committed as disabled, the
                    // endpoint waits for a leader that has them, or for an operator's
                    // enable, which skips to the oldest event kept.
                    let detail = format!(
                        "this leader's change feed no longer holds the events after its \
                         position (log record {}): the oldest it keeps are those of record \
                         {oldest_seq}; waiting for a leader that has them (enable skips them)",
                        cursor.seq
                    );
                    let new = {
                        let mut live = lock(&endpoint.live);
                        let new = live.last_error.as_deref() != Some(detail.as_str());
                        live.last_error = Some(detail.clone());
                        new
                    };
                    if new {
                        tracing::warn!(endpoint = %id, %detail, "a webhook endpoint waits");
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(GONE_RETRY) => {}
                        _ = endpoint.wake.notified() => {}
                        _ = closing.changed() => {}
                    }
                    continue;
                }
                let detail = format!(
                    "its position (after log record {}) fell behind the change feed's \
                     retention: the oldest events kept are those of record {oldest_seq}",
                    cursor.seq
                );
                disable(&inner, &endpoint, "events_gone", detail).await;
                continue;
            }
            Err(err) => {
                tracing::error!(error = %err, "reading the change feed for a webhook");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if found.events.is_empty() {
            // Caught up: wait for the projector's next append (the timeout is a safety net).
            tokio::select! {
                _ = appended.changed() => {}
                _ = endpoint.wake.notified() => {}
                _ = closing.changed() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            continue;
        }
        for event in found.events {
            if !endpoint.filter.matches(&event.json) {
                lock(&endpoint.live).position = event.position;
                // Written by the next acknowledged delivery, or by the flusher within a
                // second (sending a filtered event again is never needed).
                continue;
            }
            match deliver_one(&inner, &endpoint, &event.position.id(), &event.json).await {
                Some(true) => {
                    // Recorded before the next event is sent. Never with `live` held: the
                    // positions file is locked before an endpoint's `live` everywhere.
                    lock(&endpoint.live).position = event.position;
                    if inner.record_position(id, event.position) {
                        lock(&endpoint.live).recorded = event.position;
                    }
                }
                // Disabled, deleted or shutting down: the cursor stays before this event.
                _ => break,
            }
            if *closing.borrow() {
                return;
            }
        }
    }
}

/// Delivers one event, retrying as the schedule says. `Some(true)`: acknowledged;
/// `None`: the endpoint was disabled, deleted, or the server is shutting down.
async fn deliver_one(
    inner: &Arc<Inner>,
    endpoint: &Endpoint,
    id: &str,
    body: &str,
) -> Option<bool> {
    let mut closing = inner.closing.subscribe();
    loop {
        if endpoint.deleted.load(Ordering::SeqCst) || *closing.borrow() {
            return None;
        }
        let url = lock(&endpoint.registration).url.clone();
        let started = now_ms();
        let result = attempt(inner, endpoint, &url, id, body).await;
        let finished = now_ms();
        match result {
            Attempt::Acknowledged => {
                inner.deliveries.fetch_add(1, Ordering::Relaxed);
                let was_failing = {
                    let mut live = lock(&endpoint.live);
                    live.last_attempt_at = Some(started);
                    live.last_success_at = Some(finished);
                    live.attempts = 0;
                    live.next_attempt_at = None;
                    live.deliveries += 1;
                    lock(&endpoint.registration).failing_since.is_some()
                };
                if was_failing {
                    set_failing(inner, endpoint, None).await;
                }
                return Some(true);
            }
            Attempt::Failed(error) => {
                inner.failures.fetch_add(1, Ordering::Relaxed);
                // What the view shows first, then the state that is saved.
                let attempts = {
                    let mut live = lock(&endpoint.live);
                    live.last_attempt_at = Some(started);
                    live.last_error = Some(error.clone());
                    live.attempts = live.attempts.saturating_add(1);
                    live.failures += 1;
                    live.attempts
                };
                let since = lock(&endpoint.registration).failing_since;
                let since = match since {
                    Some(since) => since,
                    None => {
                        set_failing(inner, endpoint, Some(started)).await;
                        started
                    }
                };
                let failing_for = Duration::from_millis((finished - since).max(0) as u64);
                tracing::debug!(endpoint = %lock(&endpoint.registration).id, event = id, %error, "webhook delivery failed");
                if failing_for >= inner.schedule.give_up {
                    let detail = format!(
                        "failing since {} ({attempts} attempts since this start); last error: {error}",
                        rfc3339(since)
                    );
                    disable(inner, endpoint, "failing", detail).await;
                    return None;
                }
                // The last retry falls at the give-up time, not after it.
                let left = inner.schedule.give_up - failing_for;
                let wait = inner.schedule.backoff(attempts, random_u64()).min(left);
                lock(&endpoint.live).next_attempt_at = Some(finished + wait.as_millis() as i64);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = endpoint.wake.notified() => {}
                    _ = closing.changed() => return None,
                }
                lock(&endpoint.live).next_attempt_at = None;
            }
        }
    }
}

/// Saves a change of the endpoint's registration (durably; a failure to save is logged,
/// and the change still holds in memory).
async fn persist(inner: &Arc<Inner>, endpoint: &Endpoint, change: impl FnOnce(&mut Registration)) {
    let _one = inner.registering.lock().await;
    if endpoint.deleted.load(Ordering::SeqCst) {
        return;
    }
    let updated = {
        let mut registration = lock(&endpoint.registration);
        change(&mut registration);
        registration.clone()
    };
    let all: Vec<Registration> = inner
        .endpoints
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .values()
        .map(|e| lock(&e.registration).clone())
        .collect();
    debug_assert!(
        all.contains(&updated),
        "an endpoint not deleted is registered"
    );
    if let Err(err) = inner.save_all(all, Change::Saved(updated)).await {
        tracing::error!(error = %err, "cannot save the webhooks");
    }
}

async fn set_failing(inner: &Arc<Inner>, endpoint: &Endpoint, since: Option<i64>) {
    persist(inner, endpoint, |r| r.failing_since = since).await;
}

async fn disable(inner: &Arc<Inner>, endpoint: &Endpoint, reason: &str, detail: String) {
    tracing::warn!(endpoint = %lock(&endpoint.registration).id, reason, %detail, "webhook endpoint disabled");
    let disabled = Disabled {
        at: now_ms(),
        reason: reason.to_string(),
        detail,
    };
    persist(inner, endpoint, |r| r.disabled = Some(disabled)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of the Standard Webhooks specification (its reference libraries' test
    /// vector): this secret, id, timestamp and body sign to this value.
    #[test]
    fn signs_as_the_standard_webhooks_example() {
        let key = secret_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
        let signature = sign(
            &key,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn secrets_are_whsec_and_32_random_bytes() {
        let a = new_secret().unwrap();
        let b = new_secret().unwrap();
        assert!(a.starts_with("whsec_"));
        assert_eq!(secret_key(&a).len(), SECRET_BYTES);
        assert_ne!(a, b);
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_with_jitter_in_half_to_one() {
        let s = Schedule {
            timeout: Duration::from_secs(1),
            retry_initial: Duration::from_millis(100),
            retry_max: Duration::from_millis(1000),
            give_up: Duration::from_secs(60),
        };
        assert!(s.backoff(1, u64::MAX) <= Duration::from_millis(100));
        assert!(s.backoff(1, u64::MAX) > Duration::from_millis(99));
        assert_eq!(s.backoff(1, 0), Duration::from_millis(50));
        assert_eq!(s.backoff(2, 0), Duration::from_millis(100));
        assert_eq!(s.backoff(3, 0), Duration::from_millis(200));
        assert_eq!(
            s.backoff(5, 0),
            Duration::from_millis(500),
            "capped at 1000 × 0.5"
        );
        assert_eq!(s.backoff(u32::MAX, 0), Duration::from_millis(500));
        for failures in 1..50 {
            let wait = s.backoff(failures, random_u64());
            assert!(wait >= Duration::from_millis(50) && wait <= Duration::from_millis(1000));
        }
    }

    #[test]
    fn filters_by_type_and_by_any_of_the_skus() {
        let line = |kind: &str, subject: &str, skus: &[&str]| {
            let products: Vec<_> = skus.iter().map(|s| serde_json::json!({"sku": s})).collect();
            serde_json::json!({"type": kind, "subject": subject, "data": {"products": products}})
                .to_string()
        };
        let f = EndpointFilter::new(
            &Some(vec!["stock.sold_out".into(), "reservation.created".into()]),
            &Some(vec!["A".into(), "B".into()]),
        );
        assert!(f.matches(&line("stock.sold_out", "B", &["B"])));
        assert!(f.matches(&line("reservation.created", "r", &["C", "A"])));
        assert!(!f.matches(&line("reservation.created", "r", &["C"])));
        assert!(!f.matches(&line("stock.replenished", "A", &["A"])));
        let all = EndpointFilter::new(&None, &None);
        assert!(all.matches(&line("stock.replenished", "Z", &["Z"])));
    }
}
