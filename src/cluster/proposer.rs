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
//! The first failure **poisons** the epoch, and the completer watches every proposal in
//! flight at once, so a failure anywhere poisons it at once, not when the proposals before
//! it resolve. Failures are of two kinds, and so are the errors the tickets get:
//! - *not committed* (`LogError::NotCommitted`): the engine refused the record before
//!   appending it (`ForwardToLeader`: this node no longer leads in the epoch's term, or its
//!   lease ran out), or its entry was skipped by the fold (`Outcome::Skipped`). Every later
//!   record of the epoch then follows a gap in the chain and is skipped on every node, so
//!   it is not committed either, certainly. A retry is safe.
//! - *outcome unknown* (`LogError::OutcomeUnknown`): the entry was appended but its result
//!   never came (the engine dropped it, discarded it on a leader change, or it was not
//!   applied within `COMMIT_DEADLINE`: a leader cut off from its quorum keeps its
//!   appended entries pending until it hears of a new term). Another leader may still
//!   commit it, and the records after it too. A retry may apply the change twice, except a
//!   reservation retried with the same `Idempotency-Key` (the keys are replicated state).
//!
//! The records still waiting in front of the failure are outcome unknown too; those behind
//! it get the failure's kind. `poisoned()` then resolves for the owner to depose or
//! rebuild. Records are never resubmitted: a record the actors decided in this epoch may
//! be proposed only in this epoch's chain, since the state it was decided on holds every
//! record before it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use openraft::error::ClientWriteError;
use openraft::impls::ProgressResponder;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::storage::entry::{Epoch, Outcome};
use crate::storage::log::{LogError, Ticket};
use crate::storage::record::{self, Record};

use super::log_store::seq_of;
use super::state_machine::StockSm;
use super::types::{Proposal, Tc};

/// How long a proposal may wait for its result before the epoch is given up: long enough
/// for a healthy cluster under load (an append, a majority's flush, the apply), far past
/// an election (`election_timeout_max`, 400 ms), so that a leader that cannot reach its
/// quorum fails its requests with 503 instead of holding them for as long as the
/// partition lasts.
pub const COMMIT_DEADLINE: Duration = Duration::from_secs(5);

type Raft = openraft::Raft<Tc, StockSm>;
type Reply = oneshot::Sender<Result<u64, LogError>>;
type Written = openraft::type_config::alias::OneshotReceiverOf<
    Tc,
    Result<openraft::raft::ClientWriteResponse<Tc>, ClientWriteError<Tc>>,
>;

/// Why a proposal failed, and whether it may still be committed.
#[derive(Clone, Debug)]
enum Failure {
    /// Certainly never committed (refused before being appended, or skipped).
    NotCommitted(String),
    /// Appended, its result unknown: another leader may still commit it.
    Unknown(String),
}

impl Failure {
    fn error(&self) -> LogError {
        match self {
            Failure::NotCommitted(reason) => LogError::NotCommitted(reason.clone()),
            Failure::Unknown(reason) => LogError::OutcomeUnknown(reason.clone()),
        }
    }

    fn reason(&self) -> &str {
        match self {
            Failure::NotCommitted(reason) | Failure::Unknown(reason) => reason,
        }
    }

    /// The same kind of failure, for another reason.
    fn with_reason(&self, reason: String) -> Failure {
        match self {
            Failure::NotCommitted(_) => Failure::NotCommitted(reason),
            Failure::Unknown(_) => Failure::Unknown(reason),
        }
    }
}

enum Submit {
    Record(Bytes, Reply),
    Barrier(Reply),
}

enum Complete {
    /// Proposal `n`, handed to the engine; its result comes on `Written`.
    Proposed(u64, Written, Reply),
    /// Proposal `n` that was not handed over.
    Failed(u64, Failure, Reply),
    Barrier(Reply),
}

/// One epoch's proposals. Cheap to clone; every clone appends to the same epoch.
#[derive(Clone)]
pub struct Proposer {
    submit: mpsc::UnboundedSender<Submit>,
    poisoned: Arc<AtomicBool>,
    poison: watch::Receiver<Option<Failure>>,
    /// Asks the submitter to hand nothing more to the engine (`close`).
    closing: CancellationToken,
    /// The submitter's task, awaited by `close`.
    submitting: Arc<tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>>,
    /// Test hook (`inject_gap`): the next record skips a number.
    gap: Arc<AtomicBool>,
    /// Ended by its owner's side (`abandon`), with the reason.
    abandoned: CancellationToken,
    abandoned_why: Arc<std::sync::Mutex<Option<String>>>,
}

impl Proposer {
    /// Starts proposing in `epoch` on `raft`, which must lead in `epoch.term` (its writes
    /// are refused otherwise, which poisons the epoch at its first record). Spawns the
    /// epoch's two tasks on the current runtime; they end when every clone is dropped or
    /// the epoch is poisoned.
    pub fn start(raft: Raft, epoch: Epoch) -> Proposer {
        let (submit, submitted) = mpsc::unbounded_channel();
        let (complete, completing) = mpsc::unbounded_channel();
        let (poison_tx, poison) = watch::channel(None::<Failure>);
        let poisoned = Arc::new(AtomicBool::new(false));
        let closing = CancellationToken::new();
        let gap = Arc::new(AtomicBool::new(false));
        let submitting = tokio::spawn(submitter(
            Submitter {
                raft,
                epoch,
                complete,
                poisoned: poisoned.clone(),
                poison: poison.clone(),
                closing: closing.clone(),
                gap: gap.clone(),
            },
            submitted,
        ));
        tokio::spawn(completer(epoch, completing, poisoned.clone(), poison_tx));
        Proposer {
            submit,
            poisoned,
            poison,
            closing,
            submitting: Arc::new(tokio::sync::Mutex::new(Some(submitting))),
            gap,
            abandoned: CancellationToken::new(),
            abandoned_why: Arc::new(std::sync::Mutex::new(None)),
        }
    }

    /// Ends the epoch from the serving side (a part of it failed, and the state it
    /// decides on can no longer be trusted): nothing more is proposed in it, and
    /// `poisoned()` resolves with `why`, so that its owner ends it and begins another from
    /// the committed state. What was already handed over resolves as usual.
    pub fn abandon(&self, why: String) {
        let mut slot = self.abandoned_why.lock().unwrap_or_else(|e| e.into_inner());
        slot.get_or_insert(why);
        self.poisoned.store(true, Ordering::Release);
        self.abandoned.cancel();
    }

    /// Test hook: the next record is handed over with the number after its own, as if
    /// the proposal before it had been refused. It is appended and committed, and
    /// skipped by the epoch chain on every node, so its ticket fails and the epoch ends.
    #[doc(hidden)]
    pub fn inject_gap(&self) {
        self.gap.store(true, Ordering::Release);
    }

    /// Ends the epoch: every record appended from now on, and every one still queued, is
    /// refused (`NotCommitted`), and once this returns **nothing more of the epoch reaches
    /// the engine**. The records already handed over keep their tickets, which resolve
    /// from the engine's answers (or at the deadline), like any others.
    ///
    /// The next epoch's owner calls this before anything that must come after every record
    /// of this one in the log (a blank entry, then the state the next epoch
    /// starts from): a record handed over after it would be folded into the committed
    /// state but not into the next epoch's actors.
    pub async fn close(&self) {
        self.poisoned.store(true, Ordering::Release);
        self.closing.cancel();
        let task = self.submitting.lock().await.take();
        if let Some(task) = task {
            // A panicked submitter hands nothing over either.
            let _ = task.await;
        }
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

    /// Resolves once the epoch is poisoned (a proposal failed, or it was abandoned), with
    /// the reason.
    pub async fn poisoned(&self) -> String {
        let mut poison = self.poison.clone();
        let reason = tokio::select! {
            failed = poison.wait_for(Option::is_some) => match failed {
                Ok(failure) => failure.as_ref().map(|f| f.reason().to_string()),
                Err(_) => None,
            },
            _ = self.abandoned.cancelled() => self
                .abandoned_why
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        };
        reason.unwrap_or_else(|| "the epoch's tasks stopped".into())
    }

    /// The error of a record appended after the epoch ended (never handed over).
    fn failure(&self) -> LogError {
        let reason = self
            .poison
            .borrow()
            .as_ref()
            .map(|f| f.reason().to_string());
        LogError::NotCommitted(reason.unwrap_or_else(|| "the epoch has ended".into()))
    }
}

/// What the submitter task works with.
struct Submitter {
    raft: Raft,
    epoch: Epoch,
    complete: mpsc::UnboundedSender<Complete>,
    poisoned: Arc<AtomicBool>,
    poison: watch::Receiver<Option<Failure>>,
    closing: CancellationToken,
    gap: Arc<AtomicBool>,
}

/// Hands records to the engine in queue order, numbered within the epoch.
async fn submitter(s: Submitter, mut submitted: mpsc::UnboundedReceiver<Submit>) {
    let Submitter {
        raft,
        epoch,
        complete,
        poisoned,
        poison,
        closing,
        gap,
    } = s;
    let ended = |poison: &watch::Receiver<Option<Failure>>| {
        let reason = poison.borrow().as_ref().map(|f| f.reason().to_string());
        Failure::NotCommitted(reason.unwrap_or_else(|| "the epoch has ended".into()))
    };
    let mut n = 0;
    loop {
        // Closing is noticed only between records, never while one is being handed over:
        // once `close` has awaited this task, nothing more reaches the engine.
        let item = tokio::select! {
            biased;
            _ = closing.cancelled() => None,
            item = submitted.recv() => item,
        };
        let Some(item) = item else {
            // Closed (or every clone dropped): what is still queued was never handed over.
            submitted.close();
            while let Ok(item) = submitted.try_recv() {
                let reply = match item {
                    Submit::Record(_, reply) | Submit::Barrier(reply) => reply,
                };
                let _ = reply.send(Err(ended(&poison).error()));
            }
            return;
        };
        let next = match item {
            Submit::Barrier(reply) => Complete::Barrier(reply),
            // Nothing more is proposed in a poisoned epoch: never handed over, so never
            // committed.
            Submit::Record(_, reply) if poisoned.load(Ordering::Acquire) => {
                Complete::Failed(n + 1, ended(&poison), reply)
            }
            Submit::Record(record, reply) => {
                if gap.swap(false, Ordering::AcqRel) {
                    n += 1;
                }
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
                        let reason = format!("the engine stopped: {fatal}");
                        Complete::Failed(n, Failure::NotCommitted(reason), reply)
                    }
                }
            }
        };
        if let Err(mpsc::error::SendError(item)) = complete.send(next) {
            // The completer has stopped: the epoch is poisoned. This record and every one
            // still queued fail with the epoch's failure kind (if the engine took this
            // one, it follows the failure in the chain).
            let failure = poison.borrow().clone().unwrap_or_else(|| ended(&poison));
            let error = match item {
                // Never handed over: its own failure.
                Complete::Failed(_, own, reply) => (reply, own.error()),
                Complete::Proposed(_, _, reply) | Complete::Barrier(reply) => {
                    (reply, failure.error())
                }
            };
            let _ = error.0.send(Err(error.1));
            submitted.close();
            while let Some(item) = submitted.recv().await {
                let reply = match item {
                    Submit::Record(_, reply) | Submit::Barrier(reply) => reply,
                };
                let _ = reply.send(Err(ended(&poison).error()));
            }
            return;
        }
    }
}

fn reply_of(item: Complete) -> Reply {
    match item {
        Complete::Barrier(reply)
        | Complete::Failed(_, _, reply)
        | Complete::Proposed(_, _, reply) => reply,
    }
}

/// A proposal or a barrier waiting to be resolved, in queue order.
enum Waiting {
    Proposal {
        n: u64,
        reply: Reply,
        /// `None` while its result has not come.
        result: Option<Result<u64, Failure>>,
        since: Instant,
    },
    Barrier(Reply),
}

/// What the engine's answer for a proposal means.
fn result_of(
    answer: Result<
        Result<openraft::raft::ClientWriteResponse<Tc>, ClientWriteError<Tc>>,
        impl std::fmt::Display,
    >,
) -> Result<u64, Failure> {
    match answer {
        Ok(Ok(response)) if response.data == Outcome::Applied => Ok(seq_of(response.log_id.index)),
        Ok(Ok(response)) => Err(Failure::NotCommitted(format!(
            "its entry {} was skipped: an earlier proposal of the epoch was not committed",
            seq_of(response.log_id.index)
        ))),
        Ok(Err(ClientWriteError::ForwardToLeader(forward))) => Err(Failure::NotCommitted(format!(
            "this node no longer leads in its term ({:?})",
            forward.reason
        ))),
        Ok(Err(other)) => Err(Failure::Unknown(other.to_string())),
        Err(dropped) => Err(Failure::Unknown(format!(
            "the engine dropped it ({dropped})"
        ))),
    }
}

/// Resolves tickets in proposal order, watching every proposal in flight at once; the
/// first failure anywhere poisons the epoch.
async fn completer(
    epoch: Epoch,
    mut completing: mpsc::UnboundedReceiver<Complete>,
    poisoned: Arc<AtomicBool>,
    poison: watch::Sender<Option<Failure>>,
) {
    let mut last = 0;
    let mut queue: VecDeque<Waiting> = VecDeque::new();
    let mut in_flight = FuturesUnordered::new();
    let mut open = true;
    let failure = loop {
        // The oldest proposal still without a result sets the deadline.
        let oldest = queue.iter().find_map(|w| match w {
            Waiting::Proposal {
                result: None,
                since,
                n,
                ..
            } => Some((*n, *since)),
            _ => None,
        });
        tokio::select! {
            item = completing.recv(), if open => match item {
                None => open = false,
                Some(Complete::Barrier(reply)) => queue.push_back(Waiting::Barrier(reply)),
                Some(Complete::Failed(n, failure, reply)) => queue.push_back(Waiting::Proposal {
                    n,
                    reply,
                    result: Some(Err(failure)),
                    since: Instant::now(),
                }),
                Some(Complete::Proposed(n, written, reply)) => {
                    queue.push_back(Waiting::Proposal { n, reply, result: None, since: Instant::now() });
                    in_flight.push(async move { (n, result_of(written.await)) });
                }
            },
            Some((n, result)) = in_flight.next(), if !in_flight.is_empty() => {
                for w in queue.iter_mut() {
                    if let Waiting::Proposal { n: m, result: slot, .. } = w {
                        if *m == n {
                            *slot = Some(result);
                            break;
                        }
                    }
                }
            }
            _ = tokio::time::sleep_until(oldest.map_or_else(Instant::now, |(_, since)| since + COMMIT_DEADLINE)), if oldest.is_some() => {
                // Its own failure: it ends the epoch below, like any other.
                let (n, _) = oldest.expect("checked");
                let reason = format!("not applied within {COMMIT_DEADLINE:?}");
                for w in queue.iter_mut() {
                    if let Waiting::Proposal { n: m, result: slot, .. } = w {
                        if *m == n {
                            *slot = Some(Err(Failure::Unknown(reason)));
                            break;
                        }
                    }
                }
            }
        }
        // Resolve what is resolved at the front, in order.
        while let Some(front) = queue.front() {
            match front {
                Waiting::Barrier(_) => {
                    if let Some(Waiting::Barrier(reply)) = queue.pop_front() {
                        let _ = reply.send(Ok(last));
                    }
                }
                Waiting::Proposal {
                    result: Some(Ok(seq)),
                    ..
                } => {
                    let seq = *seq;
                    debug_assert!(seq > last, "proposals are applied in order");
                    last = seq;
                    if let Some(Waiting::Proposal { reply, .. }) = queue.pop_front() {
                        let _ = reply.send(Ok(seq));
                    }
                }
                _ => break,
            }
        }
        // A failure anywhere ends the epoch now.
        let failed = queue.iter().find_map(|w| match w {
            Waiting::Proposal {
                n,
                result: Some(Err(failure)),
                ..
            } => Some(
                failure.with_reason(format!("proposal {n} of the epoch: {}", failure.reason())),
            ),
            _ => None,
        });
        if let Some(failure) = failed {
            break failure;
        }
        if !open && queue.is_empty() {
            return; // every clone dropped, everything resolved
        }
    };
    poisoned.store(true, Ordering::Release);
    let _ = poison.send(Some(failure.clone()));
    tracing::warn!(
        term = epoch.term,
        k = epoch.k,
        reason = %failure.reason(),
        "an epoch's proposal failed: the epoch ends"
    );
    // Those in front of the failure may still be committed by another leader; the failed
    // one and those behind it share its kind.
    let mut behind = false;
    for w in queue {
        match w {
            Waiting::Barrier(reply) => {
                let _ = reply.send(Err(failure.error()));
            }
            Waiting::Proposal { reply, result, .. } => {
                let error = match result {
                    Some(Ok(seq)) => {
                        // Resolved behind a proposal still waiting: committed.
                        let _ = reply.send(Ok(seq));
                        continue;
                    }
                    Some(Err(own)) => {
                        behind = true;
                        own.error()
                    }
                    None if behind => failure.error(),
                    None => LogError::OutcomeUnknown(format!(
                        "a later proposal of its epoch failed: {}",
                        failure.reason()
                    )),
                };
                let _ = reply.send(Err(error));
            }
        }
    }
    // Closing the channel makes the submitter stop: it fails what it still holds.
    completing.close();
    while let Some(item) = completing.recv().await {
        let error = match &item {
            Complete::Failed(_, own, _) => own.error(),
            _ => failure.error(),
        };
        let _ = reply_of(item).send(Err(error));
    }
}
