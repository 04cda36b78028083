//! The supervisor: routes by SKU, owns every reservation, and fires expiry deadlines.
//!
//! Where reservations live: all of them, in this one actor's `Reservations` (plain data:
//! see `reservations`). A reservation's status changes only here, one message at a time,
//! so a confirm racing an expiry (or a cancel) is decided by mailbox order and exactly one
//! of them wins. The book returns each change as a `Transition`; this actor queues its
//! record to the log first, then sends `Release` / `Commit` / `SettleHold` to the product
//! actors (`carry_out`), so a record that frees units is in the log before any product
//! actor can hand those units out again (invariant 3 in docs/ARCHITECTURE.md). The
//! supervisor's work per message is a map update and a channel send; the expensive parts
//! of a request (HTTP, JSON, the flush wait) happen outside it.
//!
//! Creating a reservation is a relay between this actor and the product actors: see
//! `assembly`.
//!
//! A 100 ms interval message (`Tick`) expires the due reservations, at most
//! `EXPIRIES_PER_MESSAGE_MAX` per message: if more are due (a restart after a long
//! outage), the supervisor sends itself `ExpireMore` for the next batch, so other messages
//! are served in between; ticks leave expiry to that one chain until it ends.
//!
//! Supervision: product actors are linked children. A product actor catches its own panics
//! (see `product`); if one still fails, this actor logs it and rebuilds the product from
//! the durable state (snapshot + log, by the snapshotter), off its own mailbox (the
//! default, which would stop the supervisor, is overridden).
//!
//! Virtual actors (like Orleans'): a product is in one of three states. `Active`: an actor
//! owns it. Passive: nobody touched it for `passivate_after`; its actor was stopped and
//! the product is kept here as plain data (a few hundred bytes instead of an actor's
//! ~7.8 KB), in the map of products the supervisor started from (`routes`). `Restarting`:
//! its actor failed and is being rebuilt. Start-up makes every
//! product passive (no actor is spawned per product), and a created product starts
//! passive too. A message that needs an actor (a hold, a change, a delete) activates a
//! passive product: the actor is spawned from the plain data and the message delivered.
//! Reads and stock effects decided here (settle, release, commit: an expiry, a cancel or
//! a confirm) are applied to the passive data directly with the same domain methods, so
//! expiry timers fire on time for passive products without waking them. This mailbox serializes a passive product's changes, as
//! the actor's mailbox does for an active one; a product is never both.
//!
//! Passivation asks the idle actor for its state and waits for the answer inside one
//! handler call, so no message can reach the product in between. A periodic check (once a
//! second) finds the idle actors in one scan and passivates them
//! `PASSIVATIONS_PER_MESSAGE_MAX` per message, sending itself the rest (`PassivateMore`)
//! as `Tick` does for expiries, so a backlog drains at once and other messages are served
//! in between; after a large sweep, the memory the stopped actors freed is returned to the
//! OS. The actor refuses while
//! it has holds in flight (units held for a reservation not registered yet), so a hold is
//! always registered, or rolled back, on the actor that took it.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use ractor::concurrency::JoinHandle;
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use uuid::Uuid;

use crate::actors::assembly::{Assembly, NewReservation, Parts, Reserved};
use crate::actors::product::{
    apply_without_actor, is_stock_effect, IfMatch, ProductActor, ProductMsg,
};
use crate::actors::reservations::{
    Ack, Idempotency, KeyCheck, ReservationEvents, Reservations, StockEffect, Transition,
};
use crate::actors::routes::{Route, RouteMut, Routes, Slot};
use crate::clock::{Millis, SharedClock};
use crate::cluster::Journal;
use crate::domain::{KeyId, Line, LineSet, NewProduct, Product, Reservation};
use crate::error::Error;
use crate::limits::{
    EXPIRIES_PER_MESSAGE_MAX, EXPIRY_TICK_MS, PASSIVATIONS_PER_MESSAGE_MAX,
    PASSIVATION_SWEEP_RELEASE_MIN, RETIRE_GRACE_MS,
};
use crate::memory::{
    ask_threads_to_release_freed_memory, release_freed_memory, restore_purge_delay,
    return_freed_pages_at_once, wake_idle_workers,
};
use crate::storage::fold::{IdempotencyEntry, State};
use crate::storage::log::Ticket;
use crate::storage::record::{IdempotencyKey, Record};
use crate::storage::snapshotter::{Snapshotter, TakeError};

/// What `resolve` decided.
enum Resolved {
    /// Go ahead: hold on these actors (in the order of the request's lines).
    Proceed(Vec<ActorRef<ProductMsg>>),
    Replay(Reservation, Ticket),
}

pub enum SupervisorMsg {
    CreateProduct {
        new: NewProduct,
        by: Option<KeyId>,
        reply: RpcReplyPort<Result<(Product, Ticket), Error>>,
    },
    /// Forward a message to a product's actor (or answer "not found" for it).
    Route {
        sku: String,
        msg: ProductMsg,
    },
    /// One page of products after `after`, and the SKU to continue after (if more).
    ListProducts {
        after: Option<String>,
        limit: usize,
        reply: RpcReplyPort<(Vec<Listed>, Option<String>)>,
    },
    DeleteProduct {
        sku: String,
        if_match: Option<IfMatch>,
        by: Option<KeyId>,
        reply: RpcReplyPort<Result<Ticket, Error>>,
    },
    /// Create this reservation: hold its lines, then log and keep it.
    Reserve {
        request: NewReservation,
        idempotency: Option<Idempotency>,
        reply: RpcReplyPort<Result<Reserved, Error>>,
    },
    /// A product actor tried to hold the next line of `assembly` (on success the line is
    /// already counted as held).
    Held {
        assembly: Box<Assembly>,
        outcome: Result<(), Error>,
    },
    /// The holds of a reservation failed away from here: forget its in-flight key.
    AbortIdempotency(IdempotencyKey),
    GetReservation {
        id: Uuid,
        reply: RpcReplyPort<Result<Reservation, Error>>,
    },
    Confirm {
        id: Uuid,
        order_id: Option<String>,
        by: Option<KeyId>,
        reply: RpcReplyPort<Result<(Reservation, Ticket), Error>>,
    },
    Cancel {
        id: Uuid,
        by: Option<KeyId>,
        reply: RpcReplyPort<Result<(Reservation, Ticket), Error>>,
    },
    Extend {
        id: Uuid,
        ttl_ms: i64,
        by: Option<KeyId>,
        reply: RpcReplyPort<Result<(Reservation, Ticket), Error>>,
    },
    /// Expire what is due. With a reply: answered with a barrier once done (start-up).
    Tick(Option<RpcReplyPort<Ticket>>),
    /// More reservations were due than one message expires: the next batch (sent by the
    /// supervisor to itself, so that other messages are served in between).
    ExpireMore,
    ProductPanicked {
        sku: String,
        reason: String,
    },
    /// A failed product's state was rebuilt from the log (or could not be).
    ProductRecovered {
        sku: String,
        result: Result<Option<Product>, TakeError>,
    },
    /// A rebuild failed a while ago: try again with a fresh barrier.
    RetryRestart(String),
    Stats(RpcReplyPort<Stats>),
    /// Test hook: kills a product actor outright (no handler runs), as a crash would.
    #[doc(hidden)]
    KillProduct(String),
    /// Shutdown is starting: product actors that stop from now on are not restarted.
    PrepareShutdown(RpcReplyPort<()>),
    /// Passivates every actor idle for `passivate_after` now, rather than at the next
    /// periodic check; answers how many were passivated (tests, operators), once all of
    /// them are (over as many `PassivateMore` messages as that takes).
    PassivateIdle(RpcReplyPort<usize>),
    /// The rest of a passivation sweep: the next batch of idle candidates, then another
    /// `PassivateMore` while candidates remain (as `Tick` does for expiries).
    PassivateMore(Sweep),
    /// A large sweep's actors have stopped: return the memory they freed to the OS.
    ReleaseFreedMemory,
    /// The end of the release window a `ReleaseFreedMemory` opened (numbered, so that
    /// only the newest one's end closes it): returns what was freed meanwhile.
    EndReleaseWindow(u64),
}

/// A passivation sweep under way: how many it has passivated so far, and who waits for
/// the total (`PassivateIdle`).
pub struct Sweep {
    done: usize,
    reply: Option<RpcReplyPort<usize>>,
}

/// A product in a page of `ListProducts`: ask its actor, or here it is.
pub enum Listed {
    Actor(String, ActorRef<ProductMsg>),
    Product(Product),
}

/// Where a product that is not passive lives (see the module documentation; a passive
/// product is plain data in the routing table).
enum Live {
    Active {
        actor: ActorRef<ProductMsg>,
        /// When this supervisor last routed something to it.
        used_at: Millis,
    },
    /// Its actor failed; the stock effects sent meanwhile, for the rebuilt product.
    Restarting(Vec<ProductMsg>),
}

/// Counters for operators and tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub products: usize,
    pub reservations: usize,
    pub pending: usize,
    pub product_panics: u64,
    pub product_restarts: u64,
    /// Products with a resident actor (the rest are passive).
    pub active_products: usize,
    pub activations: u64,
    pub passivations: u64,
    /// Reservations that moved, since the server started.
    pub events: ReservationEvents,
}

pub struct Supervisor {
    pub log: Journal,
    pub clock: SharedClock,
    /// Rebuilds failed products (the newest snapshot plus the log).
    pub snapshotter: Snapshotter,
    /// An actor idle this long is passivated (`None`: never).
    pub passivate_after: Option<Duration>,
    /// How long ended reservations (after their deadline) and idempotency keys (after
    /// their reservation's creation) are remembered.
    pub retention_ms: i64,
}

/// What the supervisor starts from: a state's products, already in the table it routes
/// by (built by `from_state`, on the caller's thread), its reservations and idempotency
/// keys (its API keys are the HTTP layer's business, its Raft metadata the state
/// machine's).
pub struct SupervisorArgs {
    routes: Routes<Live>,
    reservations: BTreeMap<Uuid, Reservation>,
    idempotency: BTreeMap<IdempotencyKey, IdempotencyEntry>,
}

impl SupervisorArgs {
    /// From a state taken over: a recovered one, or the one a cluster node's state
    /// machine lends a leader's epoch. Its products are the routing table's passive ones
    /// as they are, and the SKUs in order are the index the state kept, or one sorted now
    /// (`State::take_sku_index`).
    pub fn from_state(mut state: State) -> SupervisorArgs {
        let index = state.take_sku_index();
        let State {
            products,
            reservations,
            idempotency,
            keys: _,
            webhooks: _,
            raft: _,
            skus: _,
        } = state;
        SupervisorArgs {
            // Every product starts passive: no actor is spawned per product at start-up.
            routes: Routes::new(products, index),
            reservations,
            idempotency,
        }
    }
}

pub struct SupervisorState {
    routes: Routes<Live>,
    /// SKUs that are `Active`, for the passivation check.
    active: HashSet<String>,
    /// Actor id → SKU, to know which product a supervision event is about.
    skus_by_actor: HashMap<ActorId, String>,
    /// Every reservation, its deadline and its idempotency key.
    book: Reservations,
    product_panics: u64,
    product_restarts: u64,
    activations: u64,
    passivations: u64,
    /// When idle actors were last looked for.
    passivation_checked_at: Millis,
    /// SKUs found idle by the last scan of `active`, not yet passivated: a sweep takes
    /// them `PASSIVATIONS_PER_MESSAGE_MAX` at a time, so a backlog is drained in
    /// linear time (one scan, then one look per candidate), not a scan per batch.
    idle_candidates: VecDeque<String>,
    /// A sweep's `PassivateMore` is on its way: a periodic check does not start another.
    sweeping: bool,
    /// A `ReleaseFreedMemory` is on its way.
    release_due: bool,
    /// When the actors of a large sweep that ended while `release_due` will all have
    /// stopped: the release under way is followed by another one then.
    release_after: Option<Instant>,
    /// The number of the newest release window (`EndReleaseWindow`).
    release_window: u64,
    ticker: Option<JoinHandle<()>>,
    /// An `ExpireMore` is in the mailbox: ticks leave expiry to it, so a backlog is worked
    /// through by one chain of messages, never several.
    expiring_more: bool,
    /// Who waits for the end of that chain (start-up), answered with a barrier then.
    expiry_waiters: Vec<RpcReplyPort<Ticket>>,
    stopping: bool,
}

impl SupervisorState {
    /// Once the actors of a large passivation sweep have stopped, before their memory is
    /// returned: the routing index rebuilt if SKUs were added meanwhile (its nodes pinned
    /// the allocator's pages among the actors' blocks, `Routes::compact`), and the tables
    /// sized for the resident actors shrunk to the actors left. The index only when few
    /// actors are left (a backlog drained, not a sweep in the middle of an import that
    /// activates what it creates): nodes rebuilt among live actors' blocks would pin
    /// pages again, and the next rebuild waits for as many SKUs added again.
    fn compact_tables(&mut self) {
        let started = Instant::now();
        // A `memory-probe` build measures the server without it (the A/B of
        // docs/PERFORMANCE.md) with `STOCKD_COMPACT_TABLES=off`.
        #[cfg(feature = "memory-probe")]
        if std::env::var("STOCKD_COMPACT_TABLES").as_deref() == Ok("off") {
            return;
        }
        let rebuilt = self.active.len() <= PASSIVATION_SWEEP_RELEASE_MIN && self.routes.compact();
        self.routes.shrink_live();
        self.active.shrink_to_fit();
        self.skus_by_actor.shrink_to_fit();
        self.idle_candidates.shrink_to_fit();
        tracing::debug!(
            rebuilt,
            took_ms = started.elapsed().as_secs_f64() * 1e3,
            "compacted the supervisor's tables"
        );
    }
}

impl Actor for Supervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = SupervisorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<SupervisorMsg>,
        args: SupervisorArgs,
    ) -> Result<SupervisorState, ActorProcessingErr> {
        let SupervisorArgs {
            routes,
            reservations,
            idempotency,
        } = args;
        let now = self.clock.now_ms();
        let _ = myself;
        Ok(SupervisorState {
            routes,
            active: HashSet::new(),
            skus_by_actor: HashMap::new(),
            book: Reservations::new(reservations, idempotency, self.retention_ms, now),
            product_panics: 0,
            product_restarts: 0,
            activations: 0,
            passivations: 0,
            passivation_checked_at: now,
            idle_candidates: VecDeque::new(),
            sweeping: false,
            release_due: false,
            release_after: None,
            release_window: 0,
            ticker: None,
            expiring_more: false,
            expiry_waiters: Vec::new(),
            stopping: false,
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<SupervisorMsg>,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        state.ticker = Some(
            myself.send_interval(Duration::from_millis(EXPIRY_TICK_MS), || {
                SupervisorMsg::Tick(None)
            }),
        );
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<SupervisorMsg>,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(ticker) = state.ticker.take() {
            ticker.abort();
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<SupervisorMsg>,
        msg: SupervisorMsg,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SupervisorMsg::CreateProduct { new, by, reply } => {
                let result = self.create_product(state, new, by);
                let _ = reply.send(result);
            }
            SupervisorMsg::Route { sku, msg } => {
                self.deliver(&myself, state, &sku, msg).await;
            }
            SupervisorMsg::ListProducts {
                after,
                limit,
                reply,
            } => {
                let _ = reply.send(list_products(state, after, limit));
            }
            SupervisorMsg::DeleteProduct {
                sku,
                if_match,
                by,
                reply,
            } => {
                let result = self
                    .delete_product(&myself, state, &sku, if_match, by)
                    .await;
                let _ = reply.send(result);
            }
            SupervisorMsg::Reserve {
                request,
                idempotency,
                reply,
            } => {
                self.reserve(&myself, state, request, idempotency, reply)
                    .await;
            }
            SupervisorMsg::Held { assembly, outcome } => match outcome {
                Ok(()) => self.hold_next(state, assembly),
                Err(err) => self.fail(state, assembly.finish(), err),
            },
            SupervisorMsg::AbortIdempotency(key) => state.book.abort(&key),
            SupervisorMsg::GetReservation { id, reply } => {
                let mut out = Vec::new();
                let result = state.book.get(id, self.clock.now_ms(), &mut out);
                // Nobody waits on an expiry found here: a crash before it is flushed is
                // repaired by the start-up expiry, since the deadline has passed either way.
                drop(self.carry_out(state, out));
                let _ = reply.send(result);
            }
            SupervisorMsg::Confirm {
                id,
                order_id,
                by,
                reply,
            } => {
                let mut out = Vec::new();
                let now = self.clock.now_ms();
                let result = state.book.confirm(id, order_id, now, by, &mut out);
                let _ = reply.send(self.answer(state, result, out));
            }
            SupervisorMsg::Cancel { id, by, reply } => {
                let mut out = Vec::new();
                let result = state.book.cancel(id, self.clock.now_ms(), by, &mut out);
                let _ = reply.send(self.answer(state, result, out));
            }
            SupervisorMsg::Extend {
                id,
                ttl_ms,
                by,
                reply,
            } => {
                let mut out = Vec::new();
                let now = self.clock.now_ms();
                let result = state.book.extend(id, ttl_ms, now, by, &mut out);
                let _ = reply.send(self.answer(state, result, out));
            }
            SupervisorMsg::ExpireMore => {
                state.expiring_more = false;
                self.expire_batch(&myself, state);
            }
            SupervisorMsg::Tick(reply) => self.tick(&myself, state, reply).await,
            SupervisorMsg::PassivateIdle(reply) if state.sweeping => {
                // One sweep at a time (two would share one queue of candidates and each
                // count only its own): asked again once the running one has ended.
                myself.send_after(Duration::from_millis(SWEEP_WAIT_MS), move || {
                    SupervisorMsg::PassivateIdle(reply)
                });
            }
            SupervisorMsg::PassivateIdle(reply) => {
                self.find_idle(state, self.clock.now_ms());
                let sweep = Sweep {
                    done: 0,
                    reply: Some(reply),
                };
                self.sweep(&myself, state, sweep).await;
            }
            SupervisorMsg::PassivateMore(sweep) => self.sweep(&myself, state, sweep).await,
            SupervisorMsg::ReleaseFreedMemory => {
                state.release_due = false;
                // The actors of a large sweep that ended after this release was scheduled
                // stop later: a second release follows once they have. (Before, such a
                // sweep asked for none, and what its actors freed after the release
                // was not returned: after draining 100,000 passivations RSS was measured
                // anywhere from 122 to 286 MiB, depending on where the last sweep fell.)
                if let Some(after) = state.release_after.take() {
                    let now = Instant::now();
                    if after > now {
                        state.release_due = true;
                        myself.send_after(after - now, || SupervisorMsg::ReleaseFreedMemory);
                    }
                }
                // mimalloc keeps the pages the stopped actors freed, in the heaps of the
                // threads that ran them: each worker thread returns its own once idle
                // (the runtime's park hook), and a blocking thread returns what is shared
                // (abandoned pages, arenas), off this mailbox. For a window, pages freed
                // to mimalloc's arena go back to the OS at once, see `EndReleaseWindow`.
                if !state.release_due {
                    // The last release of this drain: the actors have stopped.
                    state.compact_tables();
                }
                return_freed_pages_at_once();
                state.release_window += 1;
                let window = state.release_window;
                myself.send_after(Duration::from_millis(RELEASE_WINDOW_MS), move || {
                    SupervisorMsg::EndReleaseWindow(window)
                });
                ask_threads_to_release_freed_memory();
                release_off_the_mailbox();
            }
            SupervisorMsg::EndReleaseWindow(window) if window == state.release_window => {
                // The collections above miss what is freed after them (blocks freed into
                // a page whose owner has already collected, a page purge skipped because
                // another thread was purging), and while the delay is 0 mimalloc's forced
                // purge skips the pages scheduled before: with the delay back, each thread
                // collects once more. Nothing else would purge them once the server is
                // idle: mimalloc purges on its allocation paths. Measured after draining
                // 100,000 passivations (`IMPORT_PRODUCTS=100000 IMPORT_ACTIVATE=1
                // IMPORT_PASSIVATE_AFTER=5 cargo bench --bench import`, alternated in one
                // session, docs/PERFORMANCE.md): 115–130 MiB against 157–230 MiB before
                // the second release, the window and this pass (37–44 MiB restarted from a
                // snapshot). Only a sweep of `PASSIVATION_SWEEP_RELEASE_MIN` actors opens
                // a window; a flash sale's requests do not.
                restore_purge_delay();
                ask_threads_to_release_freed_memory();
                release_off_the_mailbox();
            }
            SupervisorMsg::EndReleaseWindow(_) => {} // a newer window is open
            SupervisorMsg::ProductRecovered { sku, result } => {
                self.finish_restart(&myself, state, sku, result);
            }
            SupervisorMsg::RetryRestart(sku) => {
                if matches!(
                    state.routes.get(&sku),
                    Some(Route::Live(Live::Restarting(_)))
                ) && !state.stopping
                {
                    self.begin_restart(&myself, state, sku);
                }
            }
            SupervisorMsg::ProductPanicked { sku, reason } => {
                state.product_panics += 1;
                tracing::error!(%sku, %reason, "a product actor recovered from a panic");
            }
            SupervisorMsg::KillProduct(sku) => {
                if let Some(actor) = self.activate(&myself, state, &sku).await {
                    actor.kill();
                }
            }
            SupervisorMsg::PrepareShutdown(reply) => {
                state.stopping = true;
                if let Some(ticker) = state.ticker.take() {
                    ticker.abort();
                }
                let _ = reply.send(());
            }
            SupervisorMsg::Stats(reply) => drop(reply.send(stats(state))),
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<SupervisorMsg>,
        event: SupervisionEvent,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        // Overrides the default, which would stop the supervisor with its child.
        let (cell, reason) = match event {
            SupervisionEvent::ActorFailed(cell, err) => (cell, err.to_string()),
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                (cell, reason.unwrap_or_default())
            }
            _ => return Ok(()),
        };
        let Some(sku) = state.skus_by_actor.remove(&cell.get_id()) else {
            return Ok(()); // passivated or retired on purpose
        };
        if state.stopping {
            return Ok(());
        }
        let still_routed = matches!(
            state.routes.get(&sku),
            Some(Route::Live(Live::Active { actor, .. })) if actor.get_id() == cell.get_id()
        );
        if !still_routed {
            return Ok(()); // deleted on purpose
        }
        // A cluster leader's epoch ends instead: the next one starts every product from
        // the committed state (which the snapshotter's local fold cannot read).
        let why = format!("the actor of product {sku} stopped unexpectedly: {reason}");
        if self.log.abandon_epoch(why) {
            tracing::error!(%sku, %reason, "product actor stopped unexpectedly; the leader's epoch ends");
            state.active.remove(&sku);
            state.routes.set_live(&sku, Live::Restarting(Vec::new()));
            return Ok(());
        }
        tracing::error!(%sku, %reason, "product actor stopped unexpectedly; rebuilding it from the log");
        self.begin_restart(&myself, state, sku);
        Ok(())
    }
}

/// Pause before a failed product rebuild is tried again.
const RESTART_RETRY_MS: u64 = 1_000;

/// How often (by the supervisor's clock) idle actors are looked for.
const PASSIVATION_CHECK_MS: i64 = 1_000;

/// Margin after a passivated actor's retirement before the memory it freed is returned.
const RELEASE_AFTER_RETIRE_MS: u64 = 1_000;

/// How long after a release pages freed to the allocator's arena are returned to the OS at
/// once (`return_freed_pages_at_once`), before the second collection.
const RELEASE_WINDOW_MS: u64 = 500;

/// How long an operator's `PassivateIdle` waits for a running sweep before asking again.
const SWEEP_WAIT_MS: u64 = 10;

/// A release's work that is not the supervisor's: a blocking thread returns what is shared
/// (abandoned pages, arenas) and then wakes the idle workers, each of which returns its own
/// heap's freed memory as it parks again (`memory::wake_idle_workers`).
fn release_off_the_mailbox() {
    let runtime = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        release_freed_memory();
        wake_idle_workers(&runtime);
    });
}

/// One page of products after `after`, and the SKU to continue after (if more).
fn list_products(
    state: &SupervisorState,
    after: Option<String>,
    limit: usize,
) -> (Vec<Listed>, Option<String>) {
    // Products being rebuilt are left out of the page, like one mid-delete.
    let mut page: Vec<(&str, Listed)> = state
        .routes
        .after(after.as_deref())
        .filter_map(|(sku, route)| match route {
            Route::Live(Live::Active { actor, .. }) => {
                Some((sku, Listed::Actor(sku.to_string(), actor.clone())))
            }
            Route::Passive(p) => Some((sku, Listed::Product(p.clone_without_buyers()))),
            Route::Live(Live::Restarting(_)) => None,
        })
        .take(limit + 1)
        .collect();
    let more = page.len() > limit;
    page.truncate(limit);
    let next_after = if more {
        page.last().map(|(sku, _)| sku.to_string())
    } else {
        None
    };
    (page.into_iter().map(|(_, l)| l).collect(), next_after)
}

fn stats(state: &SupervisorState) -> Stats {
    Stats {
        products: state.routes.len(),
        reservations: state.book.len(),
        pending: state.book.pending(),
        product_panics: state.product_panics,
        product_restarts: state.product_restarts,
        active_products: state.active.len(),
        activations: state.activations,
        passivations: state.passivations,
        events: state.book.events(),
    }
}

/// Why a request for `sku` cannot be delivered now, if it cannot: no such product (404), or
/// it is being restarted (503).
fn unroutable(state: &SupervisorState, sku: &str) -> Option<Error> {
    match state.routes.get(sku) {
        None => Some(Error::ProductNotFound {
            sku: sku.to_string(),
        }),
        Some(Route::Live(Live::Restarting(_))) => Some(restarting(sku)),
        Some(_) => None,
    }
}

fn restarting(sku: &str) -> Error {
    Error::Unavailable(format!("product {sku} is being restarted; retry"))
}

impl Supervisor {
    /// `Reserve`: the idempotency check and SKU → actor here, then the relay of the
    /// assembly through the products of its lines (see `assembly`).
    async fn reserve(
        &self,
        myself: &ActorRef<SupervisorMsg>,
        state: &mut SupervisorState,
        request: NewReservation,
        idempotency: Option<Idempotency>,
        reply: RpcReplyPort<Result<Reserved, Error>>,
    ) {
        let resolved = self
            .resolve(myself, state, &request.items, idempotency.as_ref())
            .await;
        match resolved {
            Err(err) => drop(reply.send(Err(err))),
            Ok(Resolved::Replay(original, ticket)) => {
                drop(reply.send(Ok(Reserved::Replay(original, ticket))))
            }
            Ok(Resolved::Proceed(actors)) => {
                let parts = Parts {
                    request,
                    idempotency,
                    actors,
                    held: 0,
                    counted: LineSet::EMPTY,
                    reply,
                    supervisor: myself.clone(),
                };
                self.hold_next(state, Assembly::new(parts));
            }
        }
    }

    /// The periodic work: expiries (one chain at a time), retention, and the search for
    /// idle actors to passivate.
    async fn tick(
        &self,
        myself: &ActorRef<SupervisorMsg>,
        state: &mut SupervisorState,
        reply: Option<RpcReplyPort<Ticket>>,
    ) {
        let now = self.clock.now_ms();
        state.expiry_waiters.extend(reply);
        // While a chain of `ExpireMore` runs, it expires everything due.
        if !state.expiring_more {
            self.expire_batch(myself, state);
        }
        if let Some(forgotten) = state.book.forget_if_due(now) {
            drop(self.log.append(forgotten.record));
            tracing::info!(
                reservations = forgotten.reservations,
                idempotency_keys = forgotten.idempotency_keys,
                "forgot ended reservations and idempotency keys past retention"
            );
        }
        if now - state.passivation_checked_at >= PASSIVATION_CHECK_MS && !state.sweeping {
            state.passivation_checked_at = now;
            self.find_idle(state, now);
            let sweep = Sweep {
                done: 0,
                reply: None,
            };
            self.sweep(myself, state, sweep).await;
        }
    }

    async fn spawn_product(
        &self,
        myself: &ActorRef<SupervisorMsg>,
        state: &mut SupervisorState,
        product: Product,
    ) -> Result<ActorRef<ProductMsg>, ActorProcessingErr> {
        let sku = product.sku.clone();
        let actor = ProductActor {
            log: self.log.clone(),
            clock: self.clock.clone(),
            supervisor: myself.clone(),
        };
        let (actor_ref, _join) =
            Actor::spawn_linked(None, actor, product, myself.get_cell()).await?;
        state.skus_by_actor.insert(actor_ref.get_id(), sku.clone());
        state.active.insert(sku.clone());
        state.routes.set_live(
            &sku,
            Live::Active {
                actor: actor_ref.clone(),
                used_at: self.clock.now_ms(),
            },
        );
        Ok(actor_ref)
    }

    /// The actor of `sku`, spawned from its passive state if need be (`None`: no such
    /// product, it is being restarted, or spawning failed).
    async fn activate(
        &self,
        myself: &ActorRef<SupervisorMsg>,
        state: &mut SupervisorState,
        sku: &str,
    ) -> Option<ActorRef<ProductMsg>> {
        let now = self.clock.now_ms();
        let product = match state.routes.get_mut(sku)? {
            RouteMut::Live(Live::Active { actor, used_at }) => {
                *used_at = now;
                return Some(actor.clone());
            }
            RouteMut::Live(Live::Restarting(_)) => return None,
            // The per-buyer counts move to the actor (they can be large); the rest is
            // copied, so the table keeps a product if the spawn fails.
            RouteMut::Passive(p) => {
                let mut product = p.clone_without_buyers();
                product.buyers = std::mem::take(&mut p.buyers);
                product
            }
        };
        match self.spawn_product(myself, state, product).await {
            Ok(actor) => {
                state.activations += 1;
                Some(actor)
            }
            Err(err) => {
                // The request gets a 503. The passive product lost its counts to the
                // failed spawn: it is rebuilt from the log, which has them.
                tracing::error!(%sku, error = %err, "cannot activate the product actor; rebuilding it");
                self.begin_restart(myself, state, sku.to_string());
                None
            }
        }
    }

    /// The SKUs of the actors idle for `passivate_after` by `now`, queued for passivation
    /// (replacing the candidates of an earlier scan: this one has them all).
    fn find_idle(&self, state: &mut SupervisorState, now: Millis) {
        state.idle_candidates.clear();
        let Some(after) = self.passivate_after else {
            return;
        };
        let idle_ms = after.as_millis() as i64;
        let routes = &state.routes;
        let idle = state.active.iter().filter(|sku| {
            matches!(
                routes.get(sku),
                Some(Route::Live(Live::Active { used_at, .. })) if now - *used_at >= idle_ms
            )
        });
        state.idle_candidates.extend(idle.cloned());
    }

    /// Passivates the next `PASSIVATIONS_PER_MESSAGE_MAX` candidates, then sends itself the
    /// rest of the sweep if candidates remain, so other messages are served in between; at
    /// the end answers whoever asked for the sweep, and after a large one returns the
    /// freed memory to the OS once the passivated actors have stopped.
    async fn sweep(
        &self,
        myself: &ActorRef<SupervisorMsg>,
        state: &mut SupervisorState,
        mut sweep: Sweep,
    ) {
        sweep.done += self
            .passivate_batch(state, PASSIVATIONS_PER_MESSAGE_MAX)
            .await;
        if !state.idle_candidates.is_empty() {
            state.sweeping = true;
            if let Err(err) = myself.cast(SupervisorMsg::PassivateMore(sweep)) {
                // Stopping: the rest of the sweep no longer matters.
                tracing::debug!(error = %err, "passivation sweep not continued");
                state.sweeping = false;
            }
            return;
        }
        state.sweeping = false;
        if sweep.done >= PASSIVATION_SWEEP_RELEASE_MIN {
            // A passivated actor stops `RETIRE_GRACE_MS` after it answered; its memory is
            // freed then.
            let stopped = Duration::from_millis(RETIRE_GRACE_MS + RELEASE_AFTER_RETIRE_MS);
            if state.release_due {
                state.release_after = Some(Instant::now() + stopped);
            } else {
                state.release_due = true;
                myself.send_after(stopped, || SupervisorMsg::ReleaseFreedMemory);
            }
        }
        if let Some(reply) = sweep.reply {
            let _ = reply.send(sweep.done);
        }
    }

    /// Passivates up to `max` of the idle candidates that are still active and idle;
    /// returns how many.
    async fn passivate_batch(&self, state: &mut SupervisorState, max: usize) -> usize {
        let Some(after) = self.passivate_after else {
            state.idle_candidates.clear();
            return 0;
        };
        let idle_ms = after.as_millis() as i64;
        let now = self.clock.now_ms();
        let mut done = 0;
        for _ in 0..max {
            let Some(sku) = state.idle_candidates.pop_front() else {
                break;
            };
            // Used (or passivated, deleted, failed) since the scan: not a candidate now.
            let actor = match state.routes.get(&sku) {
                Some(Route::Live(Live::Active { actor, used_at })) if now - *used_at >= idle_ms => {
                    actor.clone()
                }
                _ => continue,
            };
            // Waited for here, so that nothing reaches the product in between. Product
            // actors answer at once (they never wait on anything).
            let answer = crate::actors::ask(&actor, ProductMsg::Passivate).await;
            match answer {
                Ok(Some(product)) => {
                    debug_assert!(product.invariant_holds());
                    debug_assert_eq!(product.holding, 0);
                    state.skus_by_actor.remove(&actor.get_id());
                    state.active.remove(&sku);
                    state.routes.set_passive(sku, product);
                    state.passivations += 1;
                    done += 1;
                }
                // Holds in flight: it stays active, and is looked at again later.
                Ok(None) => {
                    if let Some(RouteMut::Live(Live::Active { used_at, .. })) =
                        state.routes.get_mut(&sku)
                    {
                        *used_at = now;
                    }
                }
                // It failed meanwhile: its supervision event rebuilds it.
                Err(_) => {}
            }
        }
        done
    }

    fn create_product(
        &self,
        state: &mut SupervisorState,
        new: NewProduct,
        by: Option<KeyId>,
    ) -> Result<(Product, Ticket), Error> {
        let NewProduct {
            sku,
            name,
            price,
            on_hand,
            rules,
            low_stock_threshold,
        } = new;
        // HTTP checks them with the request; checked again here, since rules the fold would
        // refuse must never reach the log (recovery would stop on them).
        rules.check().map_err(|err| Error::InvalidRules {
            field: err.field().into(),
            detail: err.to_string(),
        })?;
        match state.routes.get(&sku) {
            Some(Route::Live(Live::Restarting(_))) => return Err(restarting(&sku)),
            Some(_) => return Err(Error::SkuExists { sku }),
            None => {}
        }
        let at = self.clock.now_ms();
        let mut product = Product::new(sku.clone(), name.clone(), price.clone(), on_hand, at);
        product.rules.set(rules);
        product.rules.set_low_stock_threshold(low_stock_threshold);
        // Queued before the product can be reached (it is in the routing table only below),
        // so before any of its units are held.
        let ticket = self.log.append(Record::ProductCreated {
            sku,
            name,
            price,
            on_hand,
            rules,
            low_stock_threshold,
            at,
            by,
        });
        // It starts passive, as a recovered product does: plain data (a few hundred bytes)
        // until its first change or reservation activates it. Spawning an actor per create
        // made a catalogue import cost an actor's ~10 KB per product until passivation
        // caught up (docs/PERFORMANCE.md, "Catalogue import over HTTP").
        state
            .routes
            .set_passive(product.sku.clone(), product.clone());
        Ok((product, ticket))
    }

    async fn delete_product(
        &self,
        myself: &ActorRef<SupervisorMsg>,
        state: &mut SupervisorState,
        sku: &str,
        if_match: Option<IfMatch>,
        by: Option<KeyId>,
    ) -> Result<Ticket, Error> {
        if let Some(err) = unroutable(state, sku) {
            return Err(err);
        }
        let actor = self
            .activate(myself, state, sku)
            .await
            .ok_or_else(|| restarting(sku))?;
        // Awaiting a product actor here is safe and short: product actors never wait.
        let asked = crate::actors::ask(&actor, |reply| ProductMsg::Delete {
            if_match,
            by,
            reply,
        });
        let ticket = match asked.await {
            Ok(result) => result?,
            Err(crate::actors::AskError::Gone) => return Err(restarting(sku)),
            Err(err) => return Err(err.into()),
        };
        state.routes.remove(sku);
        state.active.remove(sku);
        Ok(ticket)
    }

    /// Starts rebuilding a failed product, off this actor's mailbox: the durable state as
    /// of exactly the records queued before this call (a barrier's sequence), folded by
    /// the snapshotter. Stock effects sent from now on wait in the slot.
    fn begin_restart(
        &self,
        myself: &ActorRef<SupervisorMsg>,
        state: &mut SupervisorState,
        sku: String,
    ) {
        state.active.remove(&sku);
        state.routes.set_live(&sku, Live::Restarting(Vec::new()));
        // Queued now, so its sequence is that of the last record queued before this point.
        let barrier = self.log.barrier();
        let snapshotter = self.snapshotter.clone();
        let myself = myself.clone();
        tokio::spawn(async move {
            let result = match barrier.durable().await {
                Ok(seq) => match snapshotter.fold_to(seq).await {
                    Ok(Ok(durable)) => Ok(durable.products.get(&sku).cloned()),
                    Ok(Err(err)) => Err(err),
                    Err(_) => Err(TakeError::Stopped),
                },
                Err(err) => Err(err.into()),
            };
            let _ = myself.cast(SupervisorMsg::ProductRecovered { sku, result });
        });
    }

    /// The rebuilt product becomes passive, with the stock effects that waited applied in
    /// order; its next request activates it.
    fn finish_restart(
        &self,
        myself: &ActorRef<SupervisorMsg>,
        state: &mut SupervisorState,
        sku: String,
        result: Result<Option<Product>, TakeError>,
    ) {
        let mut product = match result {
            Ok(Some(product)) => product,
            Ok(None) => {
                // Not in the log (its creation never became durable): nothing to restart.
                state.routes.remove(&sku);
                return;
            }
            Err(err) => {
                // The product stays "restarting" (503) rather than be served from a state we
                // could not rebuild, and the rebuild is tried again later with a fresh
                // barrier: every effect waiting in the slot has its record before that
                // barrier, so the new fold includes them all (the slot is emptied).
                tracing::error!(%sku, error = %err, "cannot rebuild the product from the log; retrying");
                myself.send_after(Duration::from_millis(RESTART_RETRY_MS), move || {
                    SupervisorMsg::RetryRestart(sku)
                });
                return;
            }
        };
        let waiting = match state.routes.remove(&sku) {
            Some(Slot::Live(Live::Restarting(waiting))) => waiting,
            other => {
                debug_assert!(
                    other.is_none(),
                    "a restarting slot changed under the rebuild"
                );
                Vec::new()
            }
        };
        for msg in waiting {
            if apply_without_actor(&mut product, msg).is_err() {
                debug_assert!(false, "only stock effects wait for a restart");
            }
        }
        assert!(
            product.invariant_holds(),
            "rebuilt product {sku} breaks invariant 1"
        );
        state.routes.set_passive(sku.clone(), product);
        state.product_restarts += 1;
        tracing::warn!(%sku, "product rebuilt from its last acknowledged state");
    }

    async fn resolve(
        &self,
        myself: &ActorRef<SupervisorMsg>,
        state: &mut SupervisorState,
        items: &[Line],
        idempotency: Option<&Idempotency>,
    ) -> Result<Resolved, Error> {
        if let KeyCheck::Replay(original) = state.book.check_key(idempotency)? {
            return Ok(Resolved::Replay(original, self.log.barrier()));
        }
        let mut actors = Vec::with_capacity(items.len());
        for line in items {
            let sku = line.sku.as_str();
            if let Some(err) = unroutable(state, sku) {
                return Err(err);
            }
            match self.activate(myself, state, sku).await {
                Some(actor) => actors.push(actor),
                None => return Err(restarting(sku)),
            }
        }
        state.book.begin(idempotency);
        Ok(Resolved::Proceed(actors))
    }

    /// Sends the assembly to the product of its next line, or registers it once every line
    /// is held.
    fn hold_next(&self, state: &mut SupervisorState, assembly: Box<Assembly>) {
        let parts = assembly.parts();
        let Some(actor) = parts.actors.get(parts.held).cloned() else {
            return self.register(state, assembly.finish());
        };
        match actor.send_message(ProductMsg::HoldFor(assembly)) {
            Ok(()) => {}
            // It has stopped since it was resolved: failed (its supervision event will
            // rebuild it), or passivated or deleted in the meantime.
            Err(ractor::MessagingErr::SendErr(ProductMsg::HoldFor(assembly))) => {
                let parts = assembly.finish();
                let sku = &parts.request.items[parts.held].sku;
                let err = unroutable(state, sku).unwrap_or_else(|| {
                    Error::Unavailable(format!(
                        "product {sku} was passivated while the reservation was assembled; retry"
                    ))
                });
                self.fail(state, parts, err);
            }
            // Not given back: dropped, the assembly rolls itself back.
            Err(_) => {}
        }
    }

    /// Ends an assembly that cannot go on: its holds are rolled back, its key forgotten.
    fn fail(&self, state: &mut SupervisorState, parts: Parts, err: Error) {
        if let Some((key, _)) = &parts.idempotency {
            state.book.abort(key);
        }
        parts.answer_err(err);
    }

    /// Logs and keeps a reservation whose lines are all held (refused if an actor holding
    /// one has been replaced since: its holds died with it).
    fn register(&self, state: &mut SupervisorState, parts: Parts) {
        debug_assert_eq!(parts.request.items.len(), parts.held);
        // Holds live in the actor that took them; an actor never passivates with holds in
        // flight, so a different (or no) actor here means the holder failed.
        let replaced = parts
            .request
            .items
            .iter()
            .zip(&parts.actors)
            .find(|(line, held_by)| {
                !matches!(
                    state.routes.get(&line.sku),
                    Some(Route::Live(Live::Active { actor, .. })) if actor.get_id() == held_by.get_id()
                )
            });
        if let Some((line, _)) = replaced {
            let err = restarting(&line.sku);
            return self.fail(state, parts, err);
        }
        let Parts {
            request,
            idempotency,
            reply,
            counted,
            ..
        } = parts;
        let (reservation, created) = state.book.register(
            request.id,
            request.customer_id,
            request.items,
            counted,
            request.ttl_ms,
            idempotency,
            self.clock.now_ms(),
            request.by,
        );
        let ticket = self.carry_out_one(state, created);
        let _ = reply.send(Ok(Reserved::Created(reservation, ticket)));
    }

    /// Expires up to `EXPIRIES_PER_MESSAGE_MAX` due reservations. If more are due, sends
    /// `ExpireMore` to continue after whatever else waits in the mailbox (a restart after
    /// a long outage); otherwise answers whoever waits (start-up) with a barrier behind the
    /// expiries' records.
    fn expire_batch(&self, myself: &ActorRef<SupervisorMsg>, state: &mut SupervisorState) {
        let mut out = Vec::new();
        let more = state
            .book
            .expire_due(self.clock.now_ms(), EXPIRIES_PER_MESSAGE_MAX, &mut out);
        // Nobody waits on these records (see `GetReservation`).
        drop(self.carry_out(state, out));
        if more {
            state.expiring_more = true;
            let _ = myself.cast(SupervisorMsg::ExpireMore);
        } else {
            for waiter in state.expiry_waiters.drain(..) {
                let _ = waiter.send(self.log.barrier());
            }
        }
    }

    /// Carries out the book's transitions in order: each record is queued to the log, then
    /// its stock effect is sent to its products, so a record that frees units is in the
    /// log before any product can hand them out again (invariant 3). Returns the ticket of
    /// the last record.
    fn carry_out(&self, state: &mut SupervisorState, out: Vec<Transition>) -> Option<Ticket> {
        let mut last = None;
        for transition in out {
            last = Some(self.carry_out_one(state, transition));
        }
        last
    }

    fn carry_out_one(&self, state: &mut SupervisorState, transition: Transition) -> Ticket {
        let Transition {
            record,
            stock,
            lines,
            at,
            uncount,
        } = transition;
        let ticket = self.log.append(record);
        if let Some(effect) = stock {
            for (i, line) in lines.into_iter().enumerate() {
                let quantity = line.quantity;
                let msg = match effect {
                    StockEffect::Settle => ProductMsg::SettleHold { quantity, at },
                    StockEffect::Release => ProductMsg::Release {
                        quantity,
                        at,
                        uncount: uncount
                            .as_ref()
                            .filter(|(_, counted)| counted.contains(i))
                            .map(|(customer, _)| customer.clone()),
                    },
                    StockEffect::Commit => ProductMsg::Commit { quantity, at },
                };
                self.send_stock(state, &line.sku, msg);
            }
        }
        ticket
    }

    /// Carries out `out` and pairs an answer about a reservation with the ticket to wait
    /// for: its own record's, or a barrier if nothing changed.
    fn answer(
        &self,
        state: &mut SupervisorState,
        result: Result<(Reservation, Ack), Error>,
        out: Vec<Transition>,
    ) -> Result<(Reservation, Ticket), Error> {
        let last = self.carry_out(state, out);
        let (reservation, ack) = result?;
        let ticket = match (ack, last) {
            (Ack::Record, Some(ticket)) => ticket,
            (Ack::Record, None) => {
                debug_assert!(false, "a change without its record");
                self.log.barrier()
            }
            (Ack::Barrier, _) => self.log.barrier(),
        };
        Ok((reservation, ticket))
    }

    /// Sends a stock effect (whose record is already queued) to a product that holds
    /// reserved units, so exists: to its actor, or applied to its passive data, or kept
    /// for the rebuilt product while it is being restarted.
    fn send_stock(&self, state: &mut SupervisorState, sku: &str, msg: ProductMsg) {
        debug_assert!(is_stock_effect(&msg));
        match state.routes.get_mut(sku) {
            Some(RouteMut::Live(Live::Restarting(waiting))) => waiting.push(msg),
            Some(RouteMut::Passive(product)) => {
                let applied = apply_without_actor(product, msg);
                debug_assert!(applied.is_ok());
                debug_assert!(product.invariant_holds());
            }
            Some(RouteMut::Live(Live::Active { actor, used_at })) => {
                *used_at = self.clock.now_ms();
                // An actor that has just failed loses it; the rebuild reads it from the log.
                let _ = actor.send_message(msg);
            }
            None => msg.reply_not_found(sku),
        }
    }

    /// Delivers a request to a product: answered from its passive data when that is
    /// enough (a read), otherwise by its actor, activated if need be.
    async fn deliver(
        &self,
        myself: &ActorRef<SupervisorMsg>,
        state: &mut SupervisorState,
        sku: &str,
        msg: ProductMsg,
    ) {
        let msg = match state.routes.get_mut(sku) {
            None => return msg.reply_not_found(sku),
            Some(RouteMut::Live(Live::Restarting(_))) => return msg.reply_err(restarting(sku)),
            Some(RouteMut::Passive(product)) => match apply_without_actor(product, msg) {
                Ok(()) => return,
                Err(msg) => msg,
            },
            Some(RouteMut::Live(Live::Active { .. })) => msg,
        };
        let Some(actor) = self.activate(myself, state, sku).await else {
            return msg.reply_err(restarting(sku));
        };
        if let Err(ractor::MessagingErr::SendErr(msg)) = actor.send_message(msg) {
            // It has just failed: its supervision event will rebuild it.
            msg.reply_err(restarting(sku));
        }
    }
}
