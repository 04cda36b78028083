//! The actors: one per product (`product`), and the supervisor that owns the routes and
//! supervises the product actors (`supervisor`). The supervisor keeps its reservations in
//! a plain `reservations::Reservations` (no actor in it, unit-tested directly), and a
//! reservation being assembled travels between the actors as an `assembly::Assembly`.

pub mod assembly;
pub mod product;
pub mod reservations;
pub mod routes;
pub mod supervisor;

use ractor::rpc::CallResult;
use ractor::{ActorRef, Message, RpcReplyPort};

use crate::error::Error;

/// Why an actor call produced no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AskError {
    /// The actor is not running (stopped, or failed and being restarted).
    Gone,
    /// The actor dropped the reply port: it failed while handling the message.
    Dropped,
}

impl From<AskError> for Error {
    fn from(err: AskError) -> Self {
        match err {
            AskError::Gone => Error::Unavailable("the product is being restarted; retry".into()),
            AskError::Dropped => Error::Internal("the request failed inside the server".into()),
        }
    }
}

/// Calls an actor and waits for its answer.
///
/// There is deliberately no deadline: a call that timed out could still be carried out
/// afterwards (a hold nobody rolls back, an idempotency key left "in flight"). Our actors
/// never wait on anything slow, so an answer always comes; load is bounded before it gets
/// here, by admission control in the HTTP layer.
pub async fn ask<M: Message, T: Send + 'static>(
    actor: &ActorRef<M>,
    build: impl FnOnce(RpcReplyPort<T>) -> M,
) -> std::result::Result<T, AskError> {
    match actor.call(build, None).await {
        Ok(CallResult::Success(value)) => Ok(value),
        Ok(CallResult::Timeout) | Ok(CallResult::SenderError) => Err(AskError::Dropped),
        Err(_) => Err(AskError::Gone),
    }
}
