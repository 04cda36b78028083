//! A reservation being assembled: its lines are held one product at a time, then the
//! supervisor registers it.
//!
//! Creating a reservation is one call from the request (`Reserve`) and a relay between the
//! supervisor and the product actors: the idempotency check and SKU → actor in the
//! supervisor, then the request's lines are held one product at a time (`HoldFor`: the
//! product holds and sends the assembly back with `Held`), then the supervisor registers
//! it, which logs it and settles the holds. The assembly travels inside those messages, so
//! no task has to wait in between, and a client that hangs up cannot strand a hold. A
//! failed hold rolls back the earlier ones with `Unhold`; those holds never reached the
//! log. An assembly dropped unfinished (an actor failed with it in its mailbox) does the
//! same from its `Drop`.

use ractor::{ActorRef, RpcReplyPort};
use uuid::Uuid;

use crate::actors::product::ProductMsg;
use crate::actors::reservations::Idempotency;
use crate::actors::supervisor::SupervisorMsg;
use crate::domain::{KeyId, Line, LineSet, Reservation};
use crate::error::Error;
use crate::storage::log::Ticket;

/// The answer to `Reserve`; either way, answer the request once `Ticket` resolves.
pub enum Reserved {
    /// Held, registered and queued to the log.
    Created(Reservation, Ticket),
    /// The idempotency key already created this reservation.
    Replay(Reservation, Ticket),
}

/// A reservation asked for: its timestamps are set when it is registered, once every line
/// is held, so the time its holds took neither shortens its TTL nor lets it be registered
/// already expired.
pub struct NewReservation {
    /// UUIDv7, made by the request's task (off the supervisor).
    pub id: Uuid,
    pub customer_id: String,
    pub items: Vec<Line>,
    pub ttl_ms: i64,
    /// The API key making the request.
    pub by: Option<KeyId>,
}

/// A reservation being assembled: its lines are held one product at a time, then it is
/// registered. It travels inside `ProductMsg::HoldFor` and `SupervisorMsg::Held`.
///
/// Dropped unfinished (a product actor failed or stopped with it in its mailbox, or the
/// supervisor is gone), it releases the holds it took, forgets its idempotency key and
/// answers the request with an internal error, so no hold outlives its reservation.
pub struct Assembly {
    /// `Some` until the assembly is finished (registered or abandoned).
    parts: Option<Parts>,
}

pub(crate) struct Parts {
    pub(crate) request: NewReservation,
    pub(crate) idempotency: Option<Idempotency>,
    /// The actor of each line.
    pub(crate) actors: Vec<ActorRef<ProductMsg>>,
    /// How many lines are held (always the first ones).
    pub(crate) held: usize,
    /// The held lines that were counted toward a purchase limit.
    pub(crate) counted: LineSet,
    pub(crate) reply: RpcReplyPort<Result<Reserved, Error>>,
    pub(crate) supervisor: ActorRef<SupervisorMsg>,
}

impl Assembly {
    pub(crate) fn new(parts: Parts) -> Box<Assembly> {
        Box::new(Assembly { parts: Some(parts) })
    }

    pub(crate) fn parts(&self) -> &Parts {
        self.parts
            .as_ref()
            .expect("an assembly is finished only by value")
    }

    pub(crate) fn finish(mut self: Box<Self>) -> Parts {
        self.parts.take().expect("an assembly is finished once")
    }

    /// The units of the next line to hold.
    pub fn next_quantity(&self) -> u64 {
        let parts = self.parts();
        parts.request.items[parts.held].quantity
    }

    /// The customer the reservation is for.
    pub fn customer_id(&self) -> &str {
        &self.parts().request.customer_id
    }

    /// The product of the next line has held its units (`counted`: toward its purchase
    /// limit).
    pub fn held_next(&mut self, counted: bool) {
        let parts = self.parts.as_mut().expect("an assembly in progress");
        debug_assert!(parts.held < parts.actors.len());
        if counted {
            parts.counted.insert(parts.held);
        }
        // Last: nothing may panic between counting the hold and sending it on (a panic
        // would restore the product's state without the hold, and the Drop would release
        // a hold that is not there).
        parts.held += 1;
    }

    /// Ends the assembly with `err`, away from the supervisor (from a product actor).
    pub fn abandon(self: Box<Self>, err: Error) {
        self.finish().abandon(err);
    }
}

impl Drop for Assembly {
    fn drop(&mut self) {
        if let Some(parts) = self.parts.take() {
            parts.abandon(Error::Internal(
                "the request failed inside the server".into(),
            ));
        }
    }
}

impl Parts {
    /// Ends the assembly away from the supervisor: the supervisor is asked to forget the
    /// in-flight key (before the answer, so a retry cannot overtake it); see `answer_err`.
    fn abandon(self, err: Error) {
        if let Some((key, _)) = &self.idempotency {
            let _ = self
                .supervisor
                .cast(SupervisorMsg::AbortIdempotency(key.clone()));
        }
        self.answer_err(err);
    }

    /// Rolls back the holds taken (they never reached the log) and answers `err`.
    pub(crate) fn answer_err(self, err: Error) {
        let lines = self.request.items.iter().zip(&self.actors).take(self.held);
        for (i, (line, actor)) in lines.enumerate() {
            // An actor that is gone took its holds with it.
            let _ = actor.cast(ProductMsg::Unhold {
                quantity: line.quantity,
                uncount: self
                    .counted
                    .contains(i)
                    .then(|| self.request.customer_id.clone()),
            });
        }
        let _ = self.reply.send(Err(err));
    }
}
