//! `Proposer`: a leader's records on their way into the replicated log, one epoch at a
//! time (docs/REPLICATION.md, "Proposing").
//!
//! `Journal::Raft` will hold one. It keeps the journal's promises (see `journal.rs`):
//! `append` never blocks and records reach the log in the order they were appended;
//! a ticket resolves with the record's log sequence once its entry is **committed on a
//! majority and applied on this node**, with an error if it never may be; a barrier
//! resolves once every record appended before it has.
//!
//! Two tasks per epoch, joined by a channel:
//! - the *submitter* takes records in append order, numbers them `n = 1, 2, 3…` within the
//!   epoch, and hands each to the engine with `write(..).with_leader(term)`: the engine
//!   refuses it, without appending it, unless this node still leads in the epoch's term.
//!   Handing over is a message to the engine's core, so many records are in flight at
//!   once and the core batches them into one append;
//! - the *completer* waits for their results in the same order (the engine applies
//!   entries in log order) and resolves the tickets.
//!
//! The first failure **poisons** the epoch: a refusal (`ForwardToLeader`, a lease that
//! ran out, an entry cut by a new leader), an entry the fold skipped (`Outcome::Skipped`:
//! the chain has a gap), or the engine stopping. From then on every waiting and every new
//! ticket fails with `LogError::NotCommitted` (503: a retry with the same
//! `Idempotency-Key` is safe, the keys being replicated state), and `poisoned()` tells
//! whoever owns the epoch to depose or rebuild. Records are never resubmitted: a record
//! the actors decided in this epoch may be proposed only in this epoch's chain, since the
//! state it was decided on holds every record before it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use openraft::error::ClientWriteError;
use openraft::impls::ProgressResponder;
use tokio::sync::{mpsc, oneshot, watch};

use crate::storage::entry::{Epoch, Outcome};
use crate::storage::log::{LogError, Ticket};
use crate::storage::record::{self, Record};

use super::log_store::seq_of;
use super::state_machine::StockSm;
use super::types::{Proposal, Tc};

type Raft = openraft::Raft<Tc, StockSm>;
type Reply = oneshot::Sender<Result<u64, LogError>>;
type Written = openraft::type_config::alias::OneshotReceiverOf<
    Tc,
    Result<openraft::raft::ClientWriteResponse<Tc>, ClientWriteError<Tc>>,
>;

enum Submit {
    Record(Bytes, Reply),
    Barrier(Reply),
}

enum Complete {
    /// Proposal `n`, handed to the engine; its result comes on `Written`.
    Proposed(u64, Written, Reply),
    /// Proposal `n` that could not be handed over (the engine stopped).
    Failed(u64, String, Reply),
    Barrier(Reply),
}

/// One epoch's proposals. Cheap to clone; every clone appends to the same epoch.
#[derive(Clone)]
pub struct Proposer {
    epoch: Epoch,
    submit: mpsc::UnboundedSender<Submit>,
    poisoned: Arc<AtomicBool>,
    poison: watch::Receiver<Option<String>>,
}

impl Proposer {
    /// Starts proposing in `epoch` on `raft`, which must lead in `epoch.term` (its writes
    /// are refused otherwise, which poisons the epoch at its first record). Spawns the
    /// epoch's two tasks on the current runtime; they end when every clone is dropped or
    /// the epoch is poisoned.
    pub fn start(raft: Raft, epoch: Epoch) -> Proposer {
        let (submit, submitted) = mpsc::unbounded_channel();
        let (complete, completing) = mpsc::unbounded_channel();
        let (poison_tx, poison) = watch::channel(None);
        let poisoned = Arc::new(AtomicBool::new(false));
        let submitting = submitter(
            raft,
            epoch,
            submitted,
            complete,
            poisoned.clone(),
            poison.clone(),
        );
        tokio::spawn(submitting);
        tokio::spawn(completer(epoch, completing, poisoned.clone(), poison_tx));
        Proposer {
            epoch,
            submit,
            poisoned,
            poison,
        }
    }

    /// The epoch proposed in.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// Queues `record` as the epoch's next proposal; the ticket resolves once it is
    /// committed and applied here.
    pub fn append(&self, record: &Record) -> Ticket {
        let (reply, ticket) = Ticket::pending();
        let record = Bytes::from(record::encode(record));
        if let Err(mpsc::error::SendError(Submit::Record(_, reply))) =
            self.submit.send(Submit::Record(record, reply))
        {
            let _ = reply.send(Err(self.failure()));
        }
        ticket
    }

    /// A ticket that resolves once every record appended before it has resolved, with
    /// the sequence of the last of them (0 if the epoch proposed none), or fails if any
    /// of them failed.
    pub fn barrier(&self) -> Ticket {
        let (reply, ticket) = Ticket::pending();
        if let Err(mpsc::error::SendError(Submit::Barrier(reply))) =
            self.submit.send(Submit::Barrier(reply))
        {
            let _ = reply.send(Err(self.failure()));
        }
        ticket
    }

    /// False once the epoch is poisoned: nothing more can be committed in it.
    pub fn is_healthy(&self) -> bool {
        !self.poisoned.load(Ordering::Acquire)
    }

    /// Resolves once the epoch is poisoned, with the reason.
    pub async fn poisoned(&self) -> String {
        let mut poison = self.poison.clone();
        let reason = match poison.wait_for(Option::is_some).await {
            Ok(reason) => reason.clone().unwrap_or_default(),
            Err(_) => "the epoch's tasks stopped".into(),
        };
        reason
    }

    fn failure(&self) -> LogError {
        let reason = self.poison.borrow().clone();
        LogError::NotCommitted(reason.unwrap_or_else(|| "the epoch has ended".into()))
    }
}

/// Hands records to the engine in queue order, numbered within the epoch.
async fn submitter(
    raft: Raft,
    epoch: Epoch,
    mut submitted: mpsc::UnboundedReceiver<Submit>,
    complete: mpsc::UnboundedSender<Complete>,
    poisoned: Arc<AtomicBool>,
    poison: watch::Receiver<Option<String>>,
) {
    let mut n = 0;
    while let Some(item) = submitted.recv().await {
        let next = match item {
            Submit::Barrier(reply) => Complete::Barrier(reply),
            // Nothing more is proposed in a poisoned epoch (the chain would skip it).
            Submit::Record(_, reply) if poisoned.load(Ordering::Acquire) => {
                let reason = poison.borrow().clone().unwrap_or_default();
                Complete::Failed(n + 1, reason, reply)
            }
            Submit::Record(record, reply) => {
                n += 1;
                let (responder, written) = ProgressResponder::complete_only();
                let proposal = Proposal { epoch, n, record };
                match raft
                    .write(proposal)
                    .with_leader(epoch.term)
                    .responder(responder)
                    .await
                {
                    Ok(()) => Complete::Proposed(n, written, reply),
                    Err(fatal) => {
                        Complete::Failed(n, format!("the engine stopped: {fatal}"), reply)
                    }
                }
            }
        };
        if let Err(mpsc::error::SendError(item)) = complete.send(next) {
            // The completer has stopped: the epoch is poisoned, and so is this record
            // (if the engine took it, the chain skips it everywhere).
            let reason = poison.borrow().clone().unwrap_or_default();
            let reply = match item {
                Complete::Barrier(reply)
                | Complete::Failed(_, _, reply)
                | Complete::Proposed(_, _, reply) => reply,
            };
            let _ = reply.send(Err(LogError::NotCommitted(reason)));
            return;
        }
    }
}

/// Resolves tickets in proposal order; the first failure poisons the epoch.
async fn completer(
    epoch: Epoch,
    mut completing: mpsc::UnboundedReceiver<Complete>,
    poisoned: Arc<AtomicBool>,
    poison: watch::Sender<Option<String>>,
) {
    let mut last = 0;
    while let Some(item) = completing.recv().await {
        let failed = match item {
            Complete::Barrier(reply) => {
                let _ = reply.send(Ok(last));
                continue;
            }
            Complete::Failed(n, reason, reply) => fail(reply, n, reason),
            Complete::Proposed(n, written, reply) => match written.await {
                Ok(Ok(response)) if response.data == Outcome::Applied => {
                    let seq = seq_of(response.log_id.index);
                    debug_assert!(seq > last, "proposals are applied in order");
                    last = seq;
                    let _ = reply.send(Ok(seq));
                    continue;
                }
                Ok(Ok(response)) => fail(
                    reply,
                    n,
                    format!(
                        "its entry {} was skipped: an earlier proposal of the epoch was not committed",
                        seq_of(response.log_id.index)
                    ),
                ),
                Ok(Err(refused)) => fail(reply, n, refusal(&refused)),
                Err(_) => fail(reply, n, "the engine dropped it".into()),
            },
        };
        poisoned.store(true, Ordering::Release);
        let _ = poison.send(Some(failed.clone()));
        tracing::warn!(
            term = epoch.term,
            k = epoch.k,
            reason = %failed,
            "an epoch's proposal failed: the epoch ends"
        );
        // Everything queued behind it fails with the same reason; closing the channel
        // makes the submitter stop and later appends fail at once.
        completing.close();
        while let Some(item) = completing.recv().await {
            let reply = match item {
                Complete::Barrier(reply)
                | Complete::Failed(_, _, reply)
                | Complete::Proposed(_, _, reply) => reply,
            };
            let _ = reply.send(Err(LogError::NotCommitted(failed.clone())));
        }
        return;
    }
}

/// Fails `reply` for proposal `n`; returns the reason the epoch ends with.
fn fail(reply: Reply, n: u64, reason: String) -> String {
    let reason = format!("proposal {n} of the epoch: {reason}");
    let _ = reply.send(Err(LogError::NotCommitted(reason.clone())));
    reason
}

fn refusal(err: &ClientWriteError<Tc>) -> String {
    match err {
        ClientWriteError::ForwardToLeader(forward) => {
            format!(
                "this node no longer leads in its term ({:?})",
                forward.reason
            )
        }
        other => other.to_string(),
    }
}
