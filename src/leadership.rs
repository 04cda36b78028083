//! A cluster node's leadership: while this node leads, it serves in **epochs**
//! (docs/REPLICATION.md, "Gaining and losing the leadership").
//!
//! An epoch `(term, k)` is one run of serving: a supervisor and its product actors built
//! from the committed state, a `Proposer` that carries their records into the replicated
//! log, the keyring's table from the same state, and a clock that never runs behind the
//! newest time in the log. HTTP's service is the epoch's while it lasts, and a standby
//! (an empty state whose journal refuses every record) otherwise.
//!
//! **Beginning an epoch** (the node leads in `term`):
//! 1. A blank entry is written and awaited: once it is applied, every entry before it is
//!    folded into the state machine's state (or skipped by the epoch chain), this node's
//!    earlier epochs' included.
//! 2. The state machine lends that state to the epoch (`ClusterNode::epoch_start`,
//!    `StockSm::lend`): taken, not copied, its products and the SKUs in order it keeps
//!    becoming the supervisor's table as they are (`SupervisorArgs::from_state`). The
//!    state machine keeps only its Raft metadata while the epoch has the state.
//! 3. The epoch is `(term, k)`, `k` past every epoch of `term` the log or this node has
//!    seen, so its first proposal opens a new chain.
//! 4. The supervisor starts from that state with the epoch's journal and a `FloorClock`
//!    whose floor is the state's `clock_floor`; the keyring gets the state's keys; the
//!    webhooks start from the state's (with the feed on); the reservations that are
//!    overdue are expired (their records are the epoch's first).
//! 5. The service becomes the epoch's, then the role `Leader { ready: true }`.
//!
//! A beginning that fails is tried again while the node leads; after `HAND_OVER_AFTER` of
//! trying in one term, the node hands its leadership to another voter
//! (`ClusterNode::hand_over`) rather than keep the cluster answering 503.
//!
//! **Ending it** (the node no longer leads in `term`, a proposal failed, or the server
//! stops): the role stops being ready, the service becomes the standby, the webhooks stop
//! (their last positions proposed while the epoch can still commit them), the proposer is
//! closed (nothing more of the epoch reaches the engine; what it already took resolves
//! from the engine's answers), and the supervisor and its actors are stopped. What the
//! actors decided and the log will never hold is dropped with them: the next epoch starts
//! from the committed state again: the state machine's state is rebuilt from its
//! snapshot and log (`ClusterNode::reclaim`). If this node still leads, the next epoch
//! begins once that is done.
//!
//! Expiry and retention run in the epoch's supervisor only, so only on the leader; a
//! deposed leader's expiries are proposals of a term that has passed, which the engine
//! refuses, or which the chain skips.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use ractor::{Actor, ActorRef};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::actors::supervisor::{Supervisor, SupervisorMsg};
use crate::clock::{FloorClock, SharedClock};
use crate::cluster::node::ClusterNode;
use crate::cluster::proposer::Proposer;
use crate::cluster::Journal;
use crate::keyring::Keyring;
use crate::service::Service;
use crate::storage::entry::Epoch;
use crate::storage::log::LogHandle;
use crate::storage::snapshotter::Snapshotter;
use crate::storage::Durability;

/// How long to wait before trying again to begin an epoch that could not begin: briefly
/// for a new leader's first tries (the engine refuses its blank entry until a majority
/// has acknowledged it, a few milliseconds after the election: every millisecond here is
/// part of a failover's gap), then less often.
const RETRY_FIRST_AFTER: Duration = Duration::from_millis(10);
const RETRY_FIRST_TRIES: u32 = 20;
const RETRY_AFTER: Duration = Duration::from_millis(100);

/// How often a node that does not lead brings its keyring to the committed keys (when
/// anything was applied since).
const KEYS_EVERY: Duration = Duration::from_millis(250);

/// A leader that cannot begin an epoch says so every this many tries (the first after
/// about 1.2 s, then every 3 s).
const WARN_EVERY_TRIES: u32 = 30;
/// A leader that has been trying to begin serving for this long in one term, and failed,
/// hands its leadership to another voter (`ClusterNode::hand_over`): a node whose state
/// cannot be rebuilt, or whose blank entries never commit, would otherwise keep the
/// leadership, and the cluster would answer 503. Three times the blank entry's own
/// deadline (`COMMIT_DEADLINE`), so that a healthy leader slow to commit its first blank
/// keeps its term.
const HAND_OVER_AFTER: Duration = Duration::from_secs(15);
const _: () =
    assert!(HAND_OVER_AFTER.as_secs() >= 3 * crate::cluster::proposer::COMMIT_DEADLINE.as_secs());
/// Test hook: a node refuses to begin serving in the terms up to this one (a leader that
/// cannot serve, without breaking its disk).
const FAIL_TERMS_UPTO_ENV: &str = "STOCKD_TEST_FAIL_TERMS_UPTO";

/// How long an ending epoch's supervisor and actors get to stop.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// What every epoch is built with.
pub struct LeadershipArgs {
    pub node: Arc<ClusterNode>,
    /// The service HTTP answers with (`http::App::service`).
    pub slot: Arc<ArcSwap<Service>>,
    /// The service between epochs.
    pub standby: Arc<Service>,
    pub keyring: Arc<Keyring>,
    /// The node's clock; each epoch reads it through a `FloorClock`.
    pub clock: SharedClock,
    /// The local log (its figures, and its health).
    pub log: LogHandle,
    pub snapshotter: Snapshotter,
    pub passivate_after: Option<Duration>,
    pub retention_ms: i64,
    pub default_ttl_seconds: u64,
    /// The node's change feed (`None`: `--events off`).
    pub feed: Option<crate::feed::Feed>,
    /// How an epoch's webhooks deliver (they need the feed).
    pub webhook_schedule: crate::webhooks::Schedule,
    pub webhook_roots: crate::webhooks::Roots,
}

/// The running leadership task.
pub struct Leadership {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Leadership {
    /// Starts watching the node's engine: an epoch begins each time it leads.
    pub fn start(args: LeadershipArgs) -> Leadership {
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(args, stop.clone()));
        Leadership { stop, task }
    }

    /// Ends the epoch being served, if any, and stops. Requests still waiting for their
    /// records get their answers from the engine (or 503).
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// An epoch being served.
struct Serving {
    epoch: Epoch,
    proposer: Proposer,
    supervisor: ActorRef<SupervisorMsg>,
    /// The epoch's webhooks (`None`: the feed is off).
    webhooks: Option<crate::webhooks::Webhooks>,
}

async fn run(args: LeadershipArgs, stop: CancellationToken) {
    let mut last: Option<Epoch> = None;
    // The term this node is trying to begin serving in, since when (from its first try,
    // however long that took), and its failed tries there; cleared once it serves.
    let mut trying: Option<(u64, Instant)> = None;
    let mut tries = 0u32;
    let refuse_upto: u64 = std::env::var(FAIL_TERMS_UPTO_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if refuse_upto > 0 {
        tracing::warn!(
            upto = refuse_upto,
            "{FAIL_TERMS_UPTO_ENV} is set: this node refuses to serve in those terms (a test \
             hook, never for production)"
        );
    }
    // The position the keyring's table was last read at (`u64::MAX`: never).
    let mut keys_at = u64::MAX;
    loop {
        // While it does not lead, its keyring follows the committed keys.
        let term = loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                term = args.node.leading() => match term {
                    Some(term) => break term,
                    None => return, // the engine stopped
                },
                _ = tokio::time::sleep(KEYS_EVERY) => {
                    if args.node.applied_seq() == keys_at {
                        continue;
                    }
                    match args.node.applied_keys().await {
                        Ok((applied, keys)) => {
                            args.keyring.replace_keys(keys).await;
                            keys_at = applied;
                        }
                        Err(err) => tracing::warn!(error = %err, "cannot read the committed API keys"),
                    }
                }
            }
        };
        // Not cancelled midway: an epoch half begun would have nobody to end it. Every
        // wait in it is bounded.
        if trying.is_none_or(|(t, _)| t != term) {
            trying = Some((term, Instant::now()));
            tries = 0;
        }
        let begun = if term <= refuse_upto {
            Err(format!("refused by {FAIL_TERMS_UPTO_ENV} (a test)"))
        } else {
            begin(&args, term, last).await
        };
        let serving = match begun {
            Ok(serving) => serving,
            Err(why) => {
                // A new leader's first tries are refused until a majority has acknowledged
                // it: only a leader that keeps failing is worth a warning.
                tries += 1;
                let since = trying.map_or_else(Instant::now, |(_, since)| since);
                if since.elapsed() >= HAND_OVER_AFTER {
                    match args.node.hand_over().await {
                        Some(to) => {
                            tracing::warn!(term, tries, reason = %why, to, "cannot begin serving as the leader: asked the engine to hand the leadership to another voter")
                        }
                        None => {
                            tracing::warn!(term, tries, reason = %why, "cannot begin serving as the leader, and no other voter can take the leadership; trying again")
                        }
                    }
                    trying = Some((term, Instant::now()));
                } else if tries.is_multiple_of(WARN_EVERY_TRIES) {
                    tracing::warn!(term, tries, reason = %why, "cannot begin serving as the leader; trying again");
                } else {
                    tracing::debug!(term, tries, reason = %why, "cannot begin serving as the leader yet; trying again");
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(if tries <= RETRY_FIRST_TRIES { RETRY_FIRST_AFTER } else { RETRY_AFTER }) => continue,
                }
            }
        };
        last = Some(serving.epoch);
        trying = None;
        keys_at = u64::MAX;
        let why = tokio::select! {
            _ = stop.cancelled() => "the server is stopping".to_string(),
            reason = serving.proposer.poisoned() => format!("the epoch ended: {reason}"),
            _ = args.node.deposed(term) => "this node no longer leads in its term".to_string(),
        };
        end(&args, serving, &why).await;
        if stop.is_cancelled() {
            return;
        }
        // The actors are gone: the state machine's state is rebuilt from the log now, not
        // at its next reader.
        tokio::select! {
            _ = stop.cancelled() => return,
            reclaimed = args.node.reclaim() => if let Err(err) = reclaimed {
                tracing::warn!(error = %err, "cannot rebuild the state machine's state; the next reader tries again after a pause");
            },
        }
    }
}

/// Begins an epoch in `term` (see the module's documentation); `last` is the epoch this
/// node served before, if any.
async fn begin(args: &LeadershipArgs, term: u64, last: Option<Epoch>) -> Result<Serving, String> {
    let started = Instant::now();
    // A state still lent to an earlier epoch is rebuilt first; while rebuilds fail, this
    // fails at once, before a blank entry is written for nothing.
    args.node.reclaim().await?;
    let blank_seq = args.node.write_blank().await?;
    if args.node.leading_term() != Some(term) {
        return Err("it no longer leads in its term".into());
    }
    let blank_ms = started.elapsed().as_millis() as u64;
    let (lent, meta, keys, webhooks) = args.node.epoch_start(blank_seq).await?;
    let lent_ms = started.elapsed().as_millis() as u64;
    let applied = meta.last_applied.map_or(0, |pos| pos.seq);
    debug_assert!(applied >= blank_seq, "lent only past the blank entry");
    // Past every epoch of this term that the log holds, and every one this node began
    // (one whose proposals were all refused leaves nothing in the log).
    let mut k = match meta.chain.epoch {
        seen if seen.term == term => seen.k + 1,
        _ => 1,
    };
    if let Some(last) = last.filter(|last| last.term == term) {
        k = k.max(last.k + 1);
    }
    let epoch = Epoch { term, k };
    let proposer = args.node.proposer(epoch);
    let journal = Journal::Raft {
        proposer: proposer.clone(),
        log: args.log.clone(),
    };
    let clock: SharedClock = Arc::new(FloorClock::new(args.clock.clone(), meta.clock_floor));
    let supervisor = Supervisor {
        log: journal.clone(),
        clock: clock.clone(),
        snapshotter: args.snapshotter.clone(),
        passivate_after: args.passivate_after,
        retention_ms: args.retention_ms,
    };
    let supervisor = match Actor::spawn(None, supervisor, lent).await {
        Ok((supervisor, _)) => supervisor,
        Err(err) => {
            proposer.close().await;
            return Err(format!("cannot start the actors: {err}"));
        }
    };
    let actors_ms = started.elapsed().as_millis() as u64;
    // The committed webhooks deliver the node's feed from where the last leader recorded
    // them: none without the feed.
    let webhooks = match &args.feed {
        Some(feed) => match crate::webhooks::Webhooks::start_replicated(
            webhooks,
            feed.clone(),
            journal.clone(),
            applied,
            args.webhook_schedule,
            &args.webhook_roots,
        ) {
            Ok(webhooks) => Some(webhooks),
            Err(err) => {
                let why = format!("cannot start the webhooks: {err}");
                end(
                    args,
                    Serving {
                        epoch,
                        proposer,
                        supervisor,
                        webhooks: None,
                    },
                    &why,
                )
                .await;
                return Err(why);
            }
        },
        None => None,
    };
    let service = Service {
        supervisor: supervisor.clone(),
        log: journal.clone(),
        durability: Durability::Sync,
        default_ttl_seconds: args.default_ttl_seconds,
        snapshotter: args.snapshotter.clone(),
        feed: args.feed.clone(),
        webhooks: webhooks.clone(),
        serves: true,
    };
    args.keyring.begin_epoch(keys, journal, clock).await;
    let serving = Serving {
        epoch,
        proposer,
        supervisor,
        webhooks,
    };
    // What fell due while no leader served is expired before anything else is decided.
    if let Err(err) = service.expire_due_now().await {
        let why = format!("cannot expire the overdue reservations: {err}");
        end(args, serving, &why).await;
        return Err(why);
    }
    args.slot.store(Arc::new(service));
    args.node.set_serving(Some(term));
    tracing::info!(
        term,
        k,
        applied_seq = applied,
        elapsed_ms = started.elapsed().as_millis() as u64,
        blank_ms,
        lent_ms,
        actors_ms,
        "serving as the leader"
    );
    Ok(serving)
}

/// Ends `serving` (see the module's documentation).
async fn end(args: &LeadershipArgs, serving: Serving, why: &str) {
    args.node.set_serving(None);
    args.slot.store(args.standby.clone());
    // Deliveries stop, and their last positions are proposed while the epoch may still
    // commit them.
    if let Some(webhooks) = serving.webhooks {
        webhooks.shutdown().await;
    }
    serving.proposer.close().await;
    let supervisor = serving.supervisor;
    let _ = crate::actors::ask(&supervisor, SupervisorMsg::PrepareShutdown).await;
    supervisor
        .stop_children_and_wait(Some("the epoch ended".into()), Some(STOP_TIMEOUT))
        .await;
    let _ = supervisor
        .stop_and_wait(Some("the epoch ended".into()), Some(STOP_TIMEOUT))
        .await;
    tracing::warn!(
        term = serving.epoch.term,
        k = serving.epoch.k,
        reason = why,
        "stopped serving as the leader"
    );
}
