//! One actor per product: the only place a product's stock changes while the server runs.
//!
//! The mailbox orders every change to the product, so no lock guards stock. Changes that
//! the actor decides on its own (patch, replenish, adjust, delete) are queued to the log
//! inside the same `handle` call that applies them, before the next message is looked at:
//! a replenish is therefore in the log before any of its units can be held (invariant 3 in
//! docs/ARCHITECTURE.md). Changes decided elsewhere (a reservation's hold, settle,
//! commit, release) arrive as messages; their records are queued by the supervisor, which
//! owns reservations.
//!
//! A panic while handling a message must not lose the product: the message is handled
//! under `catch_unwind`, the caller gets an internal error (its reply port is dropped; a
//! reservation being assembled answers 500 from its `Drop`) and the supervisor is told. If the message had no logged effect (a read, a hold), the state
//! is put back as it was before it and the actor goes on. Otherwise the actor fails, and
//! the supervisor rebuilds it from the log, which holds every logged effect.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::actors::assembly::Assembly;
use crate::actors::supervisor::SupervisorMsg;
use crate::clock::{Millis, SharedClock};
use crate::cluster::Journal;
use crate::domain::{HoldError, KeyId, Price, Product, RulesPatch, StockError};
use crate::error::Error;
use crate::limits::RETIRE_GRACE_MS;
use crate::storage::log::Ticket;
use crate::storage::record::Record;

/// A change to a product that the product actor decides and logs itself.
#[derive(Debug)]
pub enum Change {
    Patch {
        name: Option<String>,
        price: Option<Option<Price>>,
        rules: RulesPatch,
        /// `Some(None)` clears the threshold.
        low_stock_threshold: Option<Option<u64>>,
    },
    Replenish {
        quantity: u64,
    },
    Adjust {
        delta: i64,
        reason: Option<String>,
    },
}

pub enum ProductMsg {
    Get(RpcReplyPort<Result<Product, Error>>),
    /// Hold the next line of a reservation being assembled (not logged yet), then hand
    /// the assembly back to the supervisor with the outcome.
    HoldFor(Box<Assembly>),
    /// Roll back a hold whose reservation was never registered (`uncount`: the customer
    /// whose purchase-limit count took it).
    Unhold {
        quantity: u64,
        uncount: Option<String>,
    },
    /// The reservation holding these units is registered and logged.
    SettleHold {
        quantity: u64,
        at: Millis,
    },
    /// A pending reservation was cancelled or expired (its record is already queued).
    /// `uncount`: the customer whose purchase-limit count gets the units back (the hold
    /// was counted).
    Release {
        quantity: u64,
        at: Millis,
        uncount: Option<String>,
    },
    /// A pending reservation was confirmed (its record is already queued).
    Commit {
        quantity: u64,
        at: Millis,
    },
    Change {
        /// Boxed: changes are rare, and the message stays small for the holds.
        change: Box<Change>,
        if_match: Option<IfMatch>,
        by: Option<KeyId>,
        reply: RpcReplyPort<Result<(Product, Ticket), Error>>,
    },
    Delete {
        if_match: Option<IfMatch>,
        by: Option<KeyId>,
        reply: RpcReplyPort<Result<Ticket, Error>>,
    },
    /// Stop now (sent after a grace period once deleted, so that messages already on
    /// their way are answered "not found" rather than dropped).
    Retire,
    /// Hand the product back to the supervisor as plain data (then answer 503 until
    /// `Retire`); answered `None` (and ignored) while holds are in flight or once deleted.
    Passivate(RpcReplyPort<Option<Product>>),
    /// Test hook: panics inside the actor, to exercise recovery from a failed message.
    #[doc(hidden)]
    Crash(RpcReplyPort<()>),
    /// Test hook: the next message panics while being handled.
    #[doc(hidden)]
    ArmPanic,
    /// Test hook: the actor stops reading its mailbox (a slow product) until this is
    /// notified, so tests can hold a request in flight deterministically; at most a
    /// minute, so a failing test cannot hang it forever.
    #[doc(hidden)]
    Stall(std::sync::Arc<tokio::sync::Notify>),
}

/// Messages that carry a stock effect decided elsewhere (their records are already
/// queued): they must reach the product's actor, even one being restarted.
pub fn is_stock_effect(msg: &ProductMsg) -> bool {
    matches!(
        msg,
        ProductMsg::SettleHold { .. } | ProductMsg::Release { .. } | ProductMsg::Commit { .. }
    )
}

/// Handles, on a product kept as plain data (a passive product, a rebuilt one), the
/// messages that need no actor: a read, and the stock effects of reservations. Gives any
/// other message back. The actor handles the same messages with this same function.
pub fn apply_without_actor(p: &mut Product, msg: ProductMsg) -> Result<(), ProductMsg> {
    match msg {
        ProductMsg::Get(reply) => drop(reply.send(Ok(p.clone_without_buyers()))),
        ProductMsg::SettleHold { quantity, at } => p.settle_hold(quantity, at),
        ProductMsg::Release {
            quantity,
            at,
            uncount,
        } => {
            p.release(quantity, at);
            if let Some(customer) = uncount {
                p.uncount(&customer, quantity);
            }
        }
        ProductMsg::Commit { quantity, at } => p.commit(quantity, at),
        other => return Err(other),
    }
    debug_assert!(p.invariant_holds());
    Ok(())
}

impl ProductMsg {
    /// Answers a message addressed to a product that does not exist.
    pub fn reply_not_found(self, sku: &str) {
        self.reply_err(Error::ProductNotFound {
            sku: sku.to_string(),
        });
    }

    /// Answers a message with an error (messages without a reply port are dropped, which is
    /// only correct for those without a stock effect).
    pub fn reply_err(self, err: Error) {
        match self {
            ProductMsg::Get(reply) => drop(reply.send(Err(err))),
            ProductMsg::HoldFor(assembly) => assembly.abandon(err),
            ProductMsg::Change { reply, .. } => drop(reply.send(Err(err))),
            ProductMsg::Delete { reply, .. } => drop(reply.send(Err(err))),
            ProductMsg::Passivate(reply) => drop(reply.send(None)),
            ProductMsg::Crash(_)
            | ProductMsg::ArmPanic
            | ProductMsg::Stall(_)
            | ProductMsg::Retire
            | ProductMsg::Unhold { .. } => {}
            // Settles, releases and commits are only sent for products that hold reserved
            // units, which cannot be deleted: reaching here is a bug.
            ProductMsg::SettleHold { .. }
            | ProductMsg::Release { .. }
            | ProductMsg::Commit { .. } => {
                tracing::error!(error = %err, "stock effect for a product without an actor");
                debug_assert!(false, "stock effect lost: {err}");
            }
        }
    }
}

pub struct ProductActor {
    pub log: Journal,
    pub clock: SharedClock,
    pub supervisor: ActorRef<SupervisorMsg>,
}

pub struct ProductState {
    product: Product,
    /// Set by a successful delete; the actor then answers "not found" until it stops.
    deleted: bool,
    /// Set once the product was handed back to the supervisor: the actor is stopping, and
    /// a message that reaches it anyway (a hold from a lookup made before) gets a 503.
    passivated: bool,
    /// Test hook (`ArmPanic`): panic while handling the next message.
    panic_next: bool,
}

impl Actor for ProductActor {
    type Msg = ProductMsg;
    type State = ProductState;
    type Arguments = Product;

    async fn pre_start(
        &self,
        _myself: ActorRef<ProductMsg>,
        product: Product,
    ) -> Result<ProductState, ActorProcessingErr> {
        assert!(product.invariant_holds(), "starting from a broken product");
        Ok(ProductState {
            product,
            deleted: false,
            passivated: false,
            panic_next: false,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<ProductMsg>,
        msg: ProductMsg,
        state: &mut ProductState,
    ) -> Result<(), ActorProcessingErr> {
        if state.passivated {
            if let ProductMsg::Retire = msg {
                myself.stop(Some("passivated".into()));
            } else {
                msg.reply_err(Error::Unavailable(format!(
                    "product {} was just passivated; retry",
                    state.product.sku
                )));
            }
            return Ok(());
        }
        if state.deleted {
            if let ProductMsg::Retire = msg {
                myself.stop(Some("deleted".into()));
            } else {
                msg.reply_not_found(&state.product.sku);
            }
            return Ok(());
        }
        match msg {
            ProductMsg::Passivate(reply) => {
                if state.product.holding > 0 {
                    let _ = reply.send(None);
                } else {
                    state.passivated = true;
                    // Handed over whole: the per-buyer counts move, they are not copied.
                    let mut handed = state.product.clone_without_buyers();
                    handed.buyers = std::mem::take(&mut state.product.buyers);
                    let _ = reply.send(Some(handed));
                    // Messages already on their way (a hold from an earlier lookup) are
                    // answered 503 for a while rather than dropped; then it stops.
                    myself.send_after(Duration::from_millis(RETIRE_GRACE_MS), || {
                        ProductMsg::Retire
                    });
                }
                return Ok(());
            }
            ProductMsg::ArmPanic => {
                state.panic_next = true;
                return Ok(());
            }
            ProductMsg::Stall(release) => {
                let _ = tokio::time::timeout(Duration::from_secs(60), release.notified()).await;
                return Ok(());
            }
            _ => {}
        }
        // Only a message whose effect is not in the log may be undone by restoring the
        // state: a read, or a hold (the reservation being assembled is dropped with the
        // message, and its `Drop` releases its other holds). Anything else may already be logged, or be the stock effect of a logged
        // record; undoing it would make memory and the log disagree.
        let restorable = matches!(
            msg,
            ProductMsg::Get(_) | ProductMsg::HoldFor(_) | ProductMsg::Crash(_)
        );
        // Only what can be restored is copied (the settles and releases of every
        // reservation would otherwise clone the product's strings for nothing), and
        // without the per-buyer counts, which can be large: a hold adds to them as its
        // very last step, after everything that can fail, so they never need restoring.
        let before = restorable.then(|| state.product.clone_without_buyers());
        let panic_now = std::mem::take(&mut state.panic_next);
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            if panic_now {
                panic!("injected panic in product actor {}", state.product.sku);
            }
            self.process(msg, &mut state.product)
        }));
        match outcome {
            Ok(Processed::Continue) => {}
            Ok(Processed::Deleted) => {
                state.deleted = true;
                // Requests that looked up this actor before the supervisor dropped its route
                // may still be on their way: answer them "not found" for a while, then stop.
                myself.send_after(Duration::from_millis(RETIRE_GRACE_MS), || {
                    ProductMsg::Retire
                });
            }
            Err(panic) => {
                let reason = panic_message(panic.as_ref());
                let sku = state.product.sku.clone();
                let _ = self.supervisor.cast(SupervisorMsg::ProductPanicked {
                    sku: sku.clone(),
                    reason: reason.clone(),
                });
                let Some(before) = before else {
                    // Fail: the supervisor rebuilds this product from the log, which holds
                    // every logged effect, this message's included.
                    tracing::error!(%sku, reason, "product actor panicked on a logged effect; failing it");
                    return Err(format!("panicked on a logged effect: {reason}").into());
                };
                let buyers = std::mem::take(&mut state.product.buyers);
                state.product = Product { buyers, ..before };
                tracing::error!(
                    %sku,
                    reason,
                    "product actor panicked; restored its state from before the message"
                );
            }
        }
        debug_assert!(state.product.invariant_holds());
        Ok(())
    }
}

enum Processed {
    Continue,
    Deleted,
}

impl ProductActor {
    fn process(&self, msg: ProductMsg, p: &mut Product) -> Processed {
        let msg = match apply_without_actor(p, msg) {
            Ok(()) => return Processed::Continue,
            Err(msg) => msg,
        };
        match msg {
            ProductMsg::HoldFor(mut assembly) => {
                let quantity = assembly.next_quantity();
                let now = self.clock.now_ms();
                let outcome = match p.hold_for(assembly.customer_id(), quantity, now) {
                    Ok(counted) => {
                        assembly.held_next(counted);
                        Ok(())
                    }
                    Err(err) => Err(hold_error(p, quantity, err)),
                };
                // If the supervisor is gone, the assembly is dropped with the message and
                // rolls its holds back, this one included.
                let _ = self
                    .supervisor
                    .cast(SupervisorMsg::Held { assembly, outcome });
            }
            ProductMsg::Unhold { quantity, uncount } => {
                p.unhold(quantity);
                if let Some(customer) = uncount {
                    p.uncount(&customer, quantity);
                }
            }
            // Handled by `apply_without_actor` above.
            ProductMsg::Get(_)
            | ProductMsg::SettleHold { .. }
            | ProductMsg::Release { .. }
            | ProductMsg::Commit { .. } => {}
            ProductMsg::Change {
                change,
                if_match,
                by,
                reply,
            } => {
                let result =
                    check_version(p, if_match.as_ref()).and_then(|()| self.change(p, *change, by));
                let _ = reply.send(result);
            }
            ProductMsg::Delete {
                if_match,
                by,
                reply,
            } => {
                let result = check_version(p, if_match.as_ref()).and_then(|()| self.delete(p, by));
                let deleted = result.is_ok();
                let _ = reply.send(result);
                if deleted {
                    return Processed::Deleted;
                }
            }
            // Only acted on once deleted / handled before `process`.
            ProductMsg::Retire
            | ProductMsg::ArmPanic
            | ProductMsg::Stall(_)
            | ProductMsg::Passivate(_) => {}
            ProductMsg::Crash(_reply) => panic!("injected panic in product actor {}", p.sku),
        }
        Processed::Continue
    }

    fn change(
        &self,
        p: &mut Product,
        change: Change,
        by: Option<KeyId>,
    ) -> Result<(Product, Ticket), Error> {
        let at = self.clock.now_ms();
        let sku = p.sku.clone();
        let record = match change {
            Change::Patch {
                name,
                price,
                rules,
                low_stock_threshold,
            } => {
                // Checked against the product's rules as they are now, in the same step
                // as the change (a window's end must stay after its start).
                p.rules
                    .patched(rules)
                    .check()
                    .map_err(|err| Error::InvalidRules {
                        field: err.field().into(),
                        detail: err.to_string(),
                    })?;
                p.patch(name.clone(), price.clone(), rules, low_stock_threshold, at);
                Record::ProductPatched {
                    sku,
                    name,
                    price,
                    rules,
                    low_stock_threshold,
                    at,
                    by,
                }
            }
            Change::Replenish { quantity } => {
                p.check_replenish(quantity)
                    .map_err(|e| stock_error(p, quantity, "quantity", e))?;
                p.replenish(quantity, at);
                Record::Replenished {
                    sku,
                    quantity,
                    at,
                    by,
                }
            }
            Change::Adjust { delta, reason } => {
                p.check_adjust(delta)
                    .map_err(|e| stock_error(p, delta.unsigned_abs(), "delta", e))?;
                p.adjust(delta, at);
                Record::Adjusted {
                    sku,
                    delta,
                    reason,
                    at,
                    by,
                }
            }
        };
        // Queued before this handler returns, so before the next message can hand out
        // any unit this change freed (invariant 3).
        let ticket = self.log.append(record);
        Ok((p.clone_without_buyers(), ticket))
    }

    fn delete(&self, p: &Product, by: Option<KeyId>) -> Result<Ticket, Error> {
        if p.reserved > 0 || p.holding > 0 {
            return Err(Error::ProductHasReservations { sku: p.sku.clone() });
        }
        Ok(self.log.append(Record::ProductDeleted {
            sku: p.sku.clone(),
            at: self.clock.now_ms(),
            by,
        }))
    }
}

/// An `If-Match` precondition other than `*`: the versions a change may find the product
/// at. Weak tags (`W/"7"`) and tags that are no version of ours (`"abc"`) never match, since
/// `If-Match` compares strongly (RFC 9110 13.1.1): they are simply not in the list.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IfMatch {
    pub versions: Vec<u64>,
}

/// Checked in the same step as the change, so no change can slip in between.
fn check_version(p: &Product, if_match: Option<&IfMatch>) -> Result<(), Error> {
    match if_match {
        Some(m) if !m.versions.contains(&p.version) => Err(Error::VersionMismatch {
            sku: p.sku.clone(),
            current: p.version,
        }),
        _ => Ok(()),
    }
}

fn stock_error(p: &Product, requested: u64, field: &str, err: StockError) -> Error {
    match err {
        StockError::Insufficient { available } => Error::InsufficientStock {
            sku: p.sku.clone(),
            requested,
            available,
        },
        StockError::Overflow => Error::StockOverflow {
            field: field.into(),
            detail: format!(
                "the change would take on_hand of {} above 2^53-1 less its {} sold units \
                 (sold counts toward the limit, so that it stays exact in every JSON client)",
                p.sku, p.sold
            ),
        },
    }
}

/// The answer to a refused hold.
fn hold_error(p: &Product, requested: u64, err: HoldError) -> Error {
    match err {
        HoldError::Stock(err) => stock_error(p, requested, "quantity", err),
        HoldError::NotStarted { starts_at, now } => Error::SaleNotStarted {
            sku: p.sku.clone(),
            starts_at,
            wait_ms: starts_at - now,
        },
        HoldError::Ended { ended_at } => Error::SaleEnded {
            sku: p.sku.clone(),
            ended_at,
        },
        HoldError::CustomerLimit {
            limit,
            held,
            requested,
        } => Error::CustomerLimitExceeded {
            sku: p.sku.clone(),
            limit,
            held,
            requested,
        },
    }
}

pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".into()
    }
}
