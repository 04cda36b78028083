//! The supervisor: routes by SKU, owns every reservation, and fires expiry deadlines.
//!
//! Where reservations live: all of them, in this one actor. A reservation's status changes
//! only here, one message at a time, so a confirm racing an expiry (or a cancel) is decided
//! by mailbox order and exactly one of them wins. The stock side of a transition is then
//! sent to the product actors: the record is queued to the log first, then `Release` /
//! `Commit` is sent, so a record that frees units is in the log before any product actor
//! can hand those units out again (invariant 3). The supervisor's work per message is a
//! hash-map update and a channel send; the expensive parts of a request (HTTP, JSON, the
//! flush wait) happen outside it.
//!
//! Creating a reservation is coordinated by the request's own task (`crate::service`):
//! `Resolve` (idempotency check + SKU → actor), `Hold` on each product actor, then
//! `Register` here, which logs the reservation and settles the holds. A failed hold rolls
//! back the earlier ones with `Unhold`; those holds never reached the log.
//!
//! Expiry deadlines sit in one min-heap; a 100 ms interval message (`Tick`) pops the due
//! ones. Extending a reservation pushes a new entry; a popped entry whose reservation is no
//! longer pending, or whose deadline moved, is skipped.
//!
//! Supervision: product actors are linked children. A product actor catches its own panics
//! (see `product`); if one still fails, this actor logs it and respawns it from the
//! durable state in the log (the default, which would stop the supervisor, is overridden).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};
use std::ops::Bound;
use std::time::Duration;

use ractor::concurrency::JoinHandle;
use ractor::{
    Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent,
};
use uuid::Uuid;

use crate::actors::product::{is_stock_effect, ProductActor, ProductMsg};
use crate::clock::{Millis, SharedClock};
use crate::domain::{Price, Product, Reservation, Status};
use crate::error::Error;
use crate::fold::{IdempotencyEntry, State};
use crate::limits::{EXPIRY_TICK_MS, IDEMPOTENCY_RETENTION_MS};
use crate::log::{LogHandle, Ticket};
use crate::record::{IdempotencyKey, Record};

/// An `Idempotency-Key` with the fingerprint of the request that carries it.
pub type Idempotency = (IdempotencyKey, Vec<u8>);

/// The answer to `Resolve`.
pub enum Resolved {
    /// Go ahead: hold on these actors (in the order of the request's lines).
    Proceed(Vec<ActorRef<ProductMsg>>),
    /// The key already created this reservation: answer it again once `Ticket` resolves.
    Replay(Reservation, Ticket),
}

pub enum SupervisorMsg {
    CreateProduct {
        sku: String,
        name: String,
        price: Option<Price>,
        on_hand: u64,
        reply: RpcReplyPort<Result<(Product, Ticket), Error>>,
    },
    /// Forward a message to a product's actor (or answer "not found" for it).
    Route {
        sku: String,
        msg: ProductMsg,
    },
    /// One page of product actors after `after`, and the SKU to continue after (if more).
    ListProducts {
        after: Option<String>,
        limit: usize,
        reply: RpcReplyPort<(Vec<ActorRef<ProductMsg>>, Option<String>)>,
    },
    DeleteProduct {
        sku: String,
        if_match: Option<u64>,
        reply: RpcReplyPort<Result<Ticket, Error>>,
    },
    Resolve {
        skus: Vec<String>,
        idempotency: Option<Idempotency>,
        reply: RpcReplyPort<Result<Resolved, Error>>,
    },
    /// The holds of a reservation failed: forget its in-flight idempotency key.
    AbortIdempotency(IdempotencyKey),
    /// Log and keep a reservation whose lines are held by the actors `held_by` (refused if
    /// any of them has been replaced since: its holds died with it).
    Register {
        reservation: Reservation,
        idempotency: Option<Idempotency>,
        held_by: Vec<ActorId>,
        reply: RpcReplyPort<Result<Ticket, Error>>,
    },
    GetReservation {
        id: Uuid,
        reply: RpcReplyPort<Result<Reservation, Error>>,
    },
    Confirm {
        id: Uuid,
        order_id: Option<String>,
        reply: RpcReplyPort<Result<(Reservation, Ticket), Error>>,
    },
    Cancel {
        id: Uuid,
        reply: RpcReplyPort<Result<(Reservation, Ticket), Error>>,
    },
    Extend {
        id: Uuid,
        ttl_ms: i64,
        reply: RpcReplyPort<Result<(Reservation, Ticket), Error>>,
    },
    /// Expire what is due. With a reply: answered with a barrier once done (start-up).
    Tick(Option<RpcReplyPort<Ticket>>),
    ProductPanicked {
        sku: String,
        reason: String,
    },
    /// A failed product's state was rebuilt from the log (or could not be).
    ProductRecovered {
        sku: String,
        result: Result<Option<Product>, String>,
    },
    Stats(RpcReplyPort<Stats>),
    /// Test hook: kills a product actor outright (no handler runs), as a crash would.
    #[doc(hidden)]
    KillProduct(String),
    /// Shutdown is starting: product actors that stop from now on are not restarted.
    PrepareShutdown(RpcReplyPort<()>),
}

/// Counters for operators and tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub products: usize,
    pub reservations: usize,
    pub pending: usize,
    pub product_panics: u64,
    pub product_restarts: u64,
}

pub struct Supervisor {
    pub log: LogHandle,
    pub clock: SharedClock,
}

/// What the supervisor starts from: the recovered state.
pub struct SupervisorArgs {
    pub state: State,
}

pub struct SupervisorState {
    routes: BTreeMap<String, ActorRef<ProductMsg>>,
    /// Actor id → SKU, to know which product a supervision event is about.
    skus_by_actor: HashMap<ActorId, String>,
    reservations: HashMap<Uuid, Reservation>,
    deadlines: BinaryHeap<Reverse<(Millis, Uuid)>>,
    idempotency: HashMap<IdempotencyKey, IdempotencyEntry>,
    /// Keys in creation order, for pruning after the retention period.
    idempotency_order: VecDeque<(Millis, IdempotencyKey)>,
    /// Keys whose first request is still being served.
    in_flight: HashMap<IdempotencyKey, Vec<u8>>,
    /// Products whose actor failed and is being rebuilt from the log, with the stock
    /// effects that arrived meanwhile (delivered, in order, to the new actor). Requests
    /// for them answer 503 until then; an entry stays if the rebuild failed.
    restarting: HashMap<String, Vec<ProductMsg>>,
    pending: usize,
    product_panics: u64,
    product_restarts: u64,
    ticker: Option<JoinHandle<()>>,
    stopping: bool,
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
        let State {
            products,
            reservations,
            idempotency,
        } = args.state;
        let mut state = SupervisorState {
            routes: BTreeMap::new(),
            skus_by_actor: HashMap::new(),
            deadlines: BinaryHeap::new(),
            idempotency_order: VecDeque::new(),
            in_flight: HashMap::new(),
            restarting: HashMap::new(),
            pending: 0,
            product_panics: 0,
            product_restarts: 0,
            ticker: None,
            stopping: false,
            reservations,
            idempotency,
        };
        for r in state.reservations.values() {
            if r.status == Status::Pending {
                state.deadlines.push(Reverse((r.expires_at, r.id)));
                state.pending += 1;
            }
        }
        let mut order: Vec<_> = state
            .idempotency
            .iter()
            .map(|(k, e)| (e.created_at, k.clone()))
            .collect();
        order.sort_by_key(|(created_at, _)| *created_at);
        state.idempotency_order = order.into();
        for (_, product) in products {
            self.spawn_product(&myself, &mut state, product).await?;
        }
        Ok(state)
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
            SupervisorMsg::CreateProduct {
                sku,
                name,
                price,
                on_hand,
                reply,
            } => {
                let result = self
                    .create_product(&myself, state, sku, name, price, on_hand)
                    .await;
                let _ = reply.send(result);
            }
            SupervisorMsg::Route { sku, msg } => {
                if state.restarting.contains_key(&sku) {
                    msg.reply_err(restarting(&sku));
                } else {
                    self.send_to_product(state, &sku, msg);
                }
            }
            SupervisorMsg::ListProducts {
                after,
                limit,
                reply,
            } => {
                let start = match &after {
                    Some(after) => Bound::Excluded(after.clone()),
                    None => Bound::Unbounded,
                };
                let mut page: Vec<_> = state
                    .routes
                    .range((start, Bound::Unbounded))
                    .take(limit + 1)
                    .collect();
                let more = page.len() > limit;
                page.truncate(limit);
                let next_after = more.then(|| page.last().map(|(sku, _)| (*sku).clone()));
                let actors = page.into_iter().map(|(_, a)| a.clone()).collect();
                let _ = reply.send((actors, next_after.flatten()));
            }
            SupervisorMsg::DeleteProduct {
                sku,
                if_match,
                reply,
            } => {
                let result = self.delete_product(state, &sku, if_match).await;
                let _ = reply.send(result);
            }
            SupervisorMsg::Resolve {
                skus,
                idempotency,
                reply,
            } => {
                let now = self.clock.now_ms();
                let _ = reply.send(self.resolve(state, skus, idempotency, now));
            }
            SupervisorMsg::AbortIdempotency(key) => {
                state.in_flight.remove(&key);
            }
            SupervisorMsg::Register {
                reservation,
                idempotency,
                held_by,
                reply,
            } => {
                let _ = reply.send(self.register(state, reservation, idempotency, held_by));
            }
            SupervisorMsg::GetReservation { id, reply } => {
                let now = self.clock.now_ms();
                self.expire_if_due(state, id, now);
                let result = state
                    .reservations
                    .get(&id)
                    .cloned()
                    .ok_or_else(|| not_found(id));
                let _ = reply.send(result);
            }
            SupervisorMsg::Confirm {
                id,
                order_id,
                reply,
            } => {
                let now = self.clock.now_ms();
                let _ = reply.send(self.confirm(state, id, order_id, now));
            }
            SupervisorMsg::Cancel { id, reply } => {
                let now = self.clock.now_ms();
                let _ = reply.send(self.cancel(state, id, now));
            }
            SupervisorMsg::Extend { id, ttl_ms, reply } => {
                let now = self.clock.now_ms();
                let _ = reply.send(self.extend(state, id, ttl_ms, now));
            }
            SupervisorMsg::Tick(reply) => {
                let now = self.clock.now_ms();
                self.expire_due(state, now);
                prune_idempotency(state, now);
                if let Some(reply) = reply {
                    let _ = reply.send(self.log.barrier());
                }
            }
            SupervisorMsg::ProductRecovered { sku, result } => {
                self.finish_restart(&myself, state, sku, result).await?;
            }
            SupervisorMsg::ProductPanicked { sku, reason } => {
                state.product_panics += 1;
                tracing::error!(%sku, %reason, "a product actor recovered from a panic");
            }
            SupervisorMsg::KillProduct(sku) => {
                if let Some(actor) = state.routes.get(&sku) {
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
            SupervisorMsg::Stats(reply) => {
                let _ = reply.send(Stats {
                    products: state.routes.len(),
                    reservations: state.reservations.len(),
                    pending: state.pending,
                    product_panics: state.product_panics,
                    product_restarts: state.product_restarts,
                });
            }
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
            return Ok(());
        };
        if state.stopping {
            return Ok(());
        }
        let still_routed = state
            .routes
            .get(&sku)
            .is_some_and(|a| a.get_id() == cell.get_id());
        if !still_routed {
            return Ok(()); // deleted on purpose
        }
        state.routes.remove(&sku);
        tracing::error!(%sku, %reason, "product actor stopped unexpectedly; restarting it from the log");
        self.begin_restart(&myself, state, sku, cell);
        Ok(())
    }
}

fn restarting(sku: &str) -> Error {
    Error::Unavailable(format!("product {sku} is being restarted; retry"))
}

fn not_found(id: Uuid) -> Error {
    Error::ReservationNotFound { id: id.to_string() }
}

fn prune_idempotency(state: &mut SupervisorState, now: Millis) {
    while let Some((created_at, _)) = state.idempotency_order.front() {
        if now - *created_at < IDEMPOTENCY_RETENTION_MS {
            break;
        }
        let (created_at, key) = state.idempotency_order.pop_front().expect("front exists");
        if state
            .idempotency
            .get(&key)
            .is_some_and(|e| e.created_at == created_at)
        {
            state.idempotency.remove(&key);
        }
    }
}

impl Supervisor {
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
        state.routes.insert(sku, actor_ref.clone());
        Ok(actor_ref)
    }

    async fn create_product(
        &self,
        myself: &ActorRef<SupervisorMsg>,
        state: &mut SupervisorState,
        sku: String,
        name: String,
        price: Option<Price>,
        on_hand: u64,
    ) -> Result<(Product, Ticket), Error> {
        if state.restarting.contains_key(&sku) {
            return Err(restarting(&sku));
        }
        if state.routes.contains_key(&sku) {
            return Err(Error::SkuExists { sku });
        }
        let at = self.clock.now_ms();
        let product = Product::new(sku.clone(), name.clone(), price.clone(), on_hand, at);
        // Queued before the actor exists, so before any of its units can be held.
        let ticket = self.log.append(Record::ProductCreated {
            sku,
            name,
            price,
            on_hand,
            at,
        });
        self.spawn_product(myself, state, product.clone())
            .await
            .map_err(|e| Error::Internal(format!("spawning the product actor: {e}")))?;
        Ok((product, ticket))
    }

    async fn delete_product(
        &self,
        state: &mut SupervisorState,
        sku: &str,
        if_match: Option<u64>,
    ) -> Result<Ticket, Error> {
        if state.restarting.contains_key(sku) {
            return Err(restarting(sku));
        }
        let not_found = || Error::ProductNotFound {
            sku: sku.to_string(),
        };
        let actor = state.routes.get(sku).cloned().ok_or_else(not_found)?;
        // Awaiting a product actor here is safe and short: product actors never wait.
        let asked = crate::service::ask(&actor, |reply| ProductMsg::Delete { if_match, reply });
        let ticket = match asked.await {
            Ok(result) => result?,
            Err(crate::service::AskError::Gone) => return Err(not_found()),
            Err(err) => return Err(err.into()),
        };
        state.routes.remove(sku);
        Ok(ticket)
    }

    /// Starts rebuilding a failed product from the log, off this actor's mailbox. The fold
    /// includes exactly the records queued before this call: stock effects sent from now
    /// on are buffered and delivered to the new actor.
    fn begin_restart(
        &self,
        myself: &ActorRef<SupervisorMsg>,
        state: &mut SupervisorState,
        sku: String,
        _dead: ActorCell,
    ) {
        state.restarting.insert(sku.clone(), Vec::new());
        // Queued now, so the fold sees exactly the records queued before this point.
        let folded = self.log.fold_durable();
        let myself = myself.clone();
        tokio::spawn(async move {
            let result = match folded.await {
                Ok(Ok(durable)) => Ok(durable.products.get(&sku).cloned()),
                Ok(Err(err)) => Err(err),
                Err(_) => Err("the log writer stopped".to_string()),
            };
            let _ = myself.cast(SupervisorMsg::ProductRecovered { sku, result });
        });
    }

    async fn finish_restart(
        &self,
        myself: &ActorRef<SupervisorMsg>,
        state: &mut SupervisorState,
        sku: String,
        result: Result<Option<Product>, String>,
    ) -> Result<(), ActorProcessingErr> {
        let product = match result {
            Ok(Some(product)) => product,
            Ok(None) => {
                // Not in the log (its creation never became durable): nothing to restart.
                state.restarting.remove(&sku);
                return Ok(());
            }
            Err(err) => {
                // The product stays "restarting": its requests answer 503 rather than
                // risk serving (or re-creating) it from a state we could not rebuild.
                tracing::error!(%sku, error = %err, "cannot rebuild the product from the log");
                return Ok(());
            }
        };
        let actor = match self.spawn_product(myself, state, product).await {
            Ok(actor) => actor,
            Err(err) => {
                // Stays "restarting" (503) with its buffered effects; nothing is lost.
                tracing::error!(%sku, error = %err, "cannot spawn the rebuilt product actor");
                return Ok(());
            }
        };
        let buffered = state.restarting.remove(&sku).unwrap_or_default();
        for msg in buffered {
            if actor.send_message(msg).is_err() {
                tracing::error!(%sku, "restarted product actor stopped at once");
            }
        }
        state.product_restarts += 1;
        tracing::warn!(%sku, "product actor restarted from its last acknowledged state");
        Ok(())
    }

    fn resolve(
        &self,
        state: &mut SupervisorState,
        skus: Vec<String>,
        idempotency: Option<Idempotency>,
        now: Millis,
    ) -> Result<Resolved, Error> {
        if let Some((key, fingerprint)) = &idempotency {
            if let Some(entry) = state.idempotency.get(key) {
                if entry.fingerprint != *fingerprint {
                    return Err(Error::IdempotencyKeyReused);
                }
                if now - entry.created_at < IDEMPOTENCY_RETENTION_MS {
                    let original =
                        state
                            .reservations
                            .get(&entry.reservation_id)
                            .ok_or_else(|| {
                                Error::Internal("remembered reservation is missing".into())
                            })?;
                    return Ok(Resolved::Replay(original.clone(), self.log.barrier()));
                }
            }
            match state.in_flight.get(key) {
                Some(f) if f == fingerprint => return Err(Error::IdempotencyKeyInFlight),
                Some(_) => return Err(Error::IdempotencyKeyReused),
                None => {}
            }
        }
        let mut actors = Vec::with_capacity(skus.len());
        for sku in skus {
            if state.restarting.contains_key(&sku) {
                return Err(restarting(&sku));
            }
            match state.routes.get(&sku) {
                Some(actor) => actors.push(actor.clone()),
                None => return Err(Error::ProductNotFound { sku }),
            }
        }
        if let Some((key, fingerprint)) = idempotency {
            state.in_flight.insert(key, fingerprint);
        }
        Ok(Resolved::Proceed(actors))
    }

    fn register(
        &self,
        state: &mut SupervisorState,
        reservation: Reservation,
        idempotency: Option<Idempotency>,
        held_by: Vec<ActorId>,
    ) -> Result<Ticket, Error> {
        debug_assert_eq!(reservation.status, Status::Pending);
        debug_assert_eq!(reservation.items.len(), held_by.len());
        let replaced = reservation
            .items
            .iter()
            .zip(&held_by)
            .find(|(line, id)| state.routes.get(&line.sku).map(|a| a.get_id()) != Some(**id));
        if let Some((line, _)) = replaced {
            if let Some((key, _)) = &idempotency {
                state.in_flight.remove(key);
            }
            return Err(restarting(&line.sku));
        }
        let id = reservation.id;
        let at = reservation.created_at;
        if let Some((key, fingerprint)) = &idempotency {
            state.in_flight.remove(key);
            state.idempotency.insert(
                key.clone(),
                IdempotencyEntry {
                    reservation_id: id,
                    fingerprint: fingerprint.clone(),
                    created_at: at,
                },
            );
            state.idempotency_order.push_back((at, key.clone()));
        }
        // A take: queued after the holds it records (invariant 3 allows it).
        let ticket = self.log.append(Record::ReservationCreated {
            id,
            customer_id: reservation.customer_id.clone(),
            items: reservation.items.clone(),
            created_at: at,
            expires_at: reservation.expires_at,
            idempotency,
        });
        for line in &reservation.items {
            let quantity = line.quantity;
            self.send_stock(state, &line.sku, ProductMsg::SettleHold { quantity, at });
        }
        state.deadlines.push(Reverse((reservation.expires_at, id)));
        state.pending += 1;
        state.reservations.insert(id, reservation);
        Ok(ticket)
    }

    /// Sends a stock effect (whose record is already queued) to a product that holds
    /// reserved units, so exists; buffered while the product is being restarted.
    fn send_stock(&self, state: &mut SupervisorState, sku: &str, msg: ProductMsg) {
        debug_assert!(is_stock_effect(&msg));
        if let Some(buffer) = state.restarting.get_mut(sku) {
            buffer.push(msg);
            return;
        }
        self.send_to_product(state, sku, msg);
    }

    /// Sends to a product's actor. A message for an actor that has just failed is answered
    /// with 503; a stock effect is then recovered from the log by the restart.
    fn send_to_product(&self, state: &SupervisorState, sku: &str, msg: ProductMsg) {
        match state.routes.get(sku) {
            Some(actor) => {
                if let Err(ractor::MessagingErr::SendErr(msg)) = actor.send_message(msg) {
                    if !is_stock_effect(&msg) {
                        msg.reply_err(restarting(sku));
                    }
                }
            }
            None => msg.reply_not_found(sku),
        }
    }

    /// Ends a pending reservation without a sale. The record is queued before the units are
    /// released (invariant 3).
    fn end_pending(
        &self,
        state: &mut SupervisorState,
        id: Uuid,
        expired: bool,
        at: Millis,
    ) -> Option<Ticket> {
        let r = state.reservations.get_mut(&id)?;
        debug_assert_eq!(r.status, Status::Pending);
        let record = if expired {
            r.expire();
            Record::ReservationExpired { id, at }
        } else {
            r.cancel();
            Record::ReservationCancelled { id, at }
        };
        let items = r.items.clone();
        state.pending -= 1;
        let ticket = self.log.append(record);
        for line in items {
            let quantity = line.quantity;
            self.send_stock(state, &line.sku, ProductMsg::Release { quantity, at });
        }
        Some(ticket)
    }

    fn expire_if_due(&self, state: &mut SupervisorState, id: Uuid, now: Millis) {
        if state.reservations.get(&id).is_some_and(|r| r.is_due(now)) {
            // Nobody waits on this record: a crash before it is flushed is repaired by the
            // start-up expiry, since the deadline has passed either way.
            drop(self.end_pending(state, id, true, now));
        }
    }

    fn expire_due(&self, state: &mut SupervisorState, now: Millis) {
        while let Some(Reverse((deadline, id))) = state.deadlines.peek().copied() {
            if deadline > now {
                break;
            }
            state.deadlines.pop();
            self.expire_if_due(state, id, now);
        }
    }

    fn confirm(
        &self,
        state: &mut SupervisorState,
        id: Uuid,
        order_id: Option<String>,
        now: Millis,
    ) -> Result<(Reservation, Ticket), Error> {
        self.expire_if_due(state, id, now);
        let r = state
            .reservations
            .get_mut(&id)
            .ok_or_else(|| not_found(id))?;
        match r.status {
            Status::Confirmed => return Ok((r.clone(), self.log.barrier())),
            Status::Cancelled => return Err(Error::ReservationCancelled { id }),
            Status::Expired => return Err(Error::ReservationExpired { id }),
            Status::Pending => {}
        }
        r.confirm(order_id.clone(), now);
        let view = r.clone();
        state.pending -= 1;
        let ticket = self.log.append(Record::ReservationConfirmed {
            id,
            order_id,
            at: now,
        });
        for line in &view.items {
            let quantity = line.quantity;
            self.send_stock(state, &line.sku, ProductMsg::Commit { quantity, at: now });
        }
        Ok((view, ticket))
    }

    fn cancel(
        &self,
        state: &mut SupervisorState,
        id: Uuid,
        now: Millis,
    ) -> Result<(Reservation, Ticket), Error> {
        self.expire_if_due(state, id, now);
        let r = state.reservations.get(&id).ok_or_else(|| not_found(id))?;
        match r.status {
            Status::Cancelled => Ok((r.clone(), self.log.barrier())),
            Status::Confirmed => Err(Error::ReservationConfirmed { id }),
            Status::Expired => Err(Error::ReservationExpired { id }),
            Status::Pending => {
                let ticket = self
                    .end_pending(state, id, false, now)
                    .ok_or_else(|| not_found(id))?;
                Ok((state.reservations[&id].clone(), ticket))
            }
        }
    }

    fn extend(
        &self,
        state: &mut SupervisorState,
        id: Uuid,
        ttl_ms: i64,
        now: Millis,
    ) -> Result<(Reservation, Ticket), Error> {
        self.expire_if_due(state, id, now);
        let r = state
            .reservations
            .get_mut(&id)
            .ok_or_else(|| not_found(id))?;
        match r.status {
            Status::Confirmed => return Err(Error::ReservationConfirmed { id }),
            Status::Cancelled => return Err(Error::ReservationCancelled { id }),
            Status::Expired => return Err(Error::ReservationExpired { id }),
            Status::Pending => {}
        }
        let expires_at = now + ttl_ms;
        r.extend(expires_at);
        let view = r.clone();
        state.deadlines.push(Reverse((expires_at, id)));
        let ticket = self.log.append(Record::ReservationExtended {
            id,
            expires_at,
            at: now,
        });
        Ok((view, ticket))
    }
}
