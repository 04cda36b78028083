//! `Journal`: what the supervisor, the product actors, the service and the keyring append
//! their records through (docs/REPLICATION.md, "Proposing: `Journal` replaces
//! `LogHandle`").
//!
//! A single node's is `Local`: the local write-ahead log, whose ticket resolves once the
//! record is flushed. A cluster leader's is `Raft`: one epoch's `Proposer`, whose ticket
//! resolves once the record is committed on a majority and applied on the leader. A
//! cluster node that does not lead holds `Cluster`, which refuses every record. The calls
//! and their promises are the same for all, so callers never know which they hold:
//!
//! - `append(record)` never blocks, and records are stored in the order they were
//!   appended (the log order rule, invariant 3 in docs/ARCHITECTURE.md, relies on it);
//!   its `Ticket` resolves with the record's sequence number once the record is durable
//!   (a 2xx may then be sent: invariant 2), or with `LogError` if it may never be.
//! - `barrier()` resolves once every record appended before it has resolved, with the
//!   sequence number of the last of them.
//! - `is_healthy()` is false once nothing more can be made durable.

use crate::storage::log::{LogError, LogHandle, LogStats, Ticket};
use crate::storage::record::Record;

use super::proposer::Proposer;

/// Where records go to become durable. Cheap to clone; every part that logs holds one.
#[derive(Clone)]
pub enum Journal {
    /// A single node: the local write-ahead log (group commit, one flush per batch).
    Local(LogHandle),
    /// A cluster node that does not serve (a follower, or a leader between epochs): its
    /// log holds the cluster's entries, which only the engine writes, so every append and
    /// barrier is refused (503) and nothing is stored. Health and figures are the local
    /// log's.
    Cluster(LogHandle),
    /// A cluster leader's epoch: records become proposals, durable once committed on a
    /// majority and applied here. Health is the epoch's and the local log's; figures are
    /// the local log's.
    Raft { proposer: Proposer, log: LogHandle },
}

/// Why a cluster node's journal refuses a record.
fn not_serving() -> LogError {
    LogError::Unavailable("this cluster node does not accept changes yet".into())
}

impl From<LogHandle> for Journal {
    fn from(log: LogHandle) -> Journal {
        Journal::Local(log)
    }
}

impl Journal {
    /// Queues `record`; the returned ticket resolves when it is durable.
    pub fn append(&self, record: Record) -> Ticket {
        match self {
            Journal::Local(log) => log.append(record),
            Journal::Cluster(_) => Ticket::refused(not_serving()),
            Journal::Raft { proposer, .. } => proposer.append(&record),
        }
    }

    /// A ticket that resolves once everything appended so far is durable, with the
    /// sequence number of the last record appended before it.
    pub fn barrier(&self) -> Ticket {
        match self {
            Journal::Local(log) => log.barrier(),
            Journal::Cluster(_) => Ticket::refused(not_serving()),
            Journal::Raft { proposer, .. } => proposer.barrier(),
        }
    }

    /// False once a write has failed: every change is then refused with 503.
    pub fn is_healthy(&self) -> bool {
        match self {
            Journal::Local(log) | Journal::Cluster(log) => log.is_healthy(),
            Journal::Raft { proposer, log } => proposer.is_healthy() && log.is_healthy(),
        }
    }

    /// Sequence number of the last record known to be durable (0 if none).
    pub fn durable_seq(&self) -> u64 {
        match self {
            Journal::Local(log) | Journal::Cluster(log) | Journal::Raft { log, .. } => {
                log.durable_seq()
            }
        }
    }

    /// The local write-ahead log's figures since start (`GET /metrics`).
    pub fn log_stats(&self) -> LogStats {
        match self {
            Journal::Local(log) | Journal::Cluster(log) | Journal::Raft { log, .. } => log.stats(),
        }
    }

    /// On a cluster leader, ends the epoch (`Proposer::abandon`): its serving state is
    /// started again from the committed state. Answers whether it did; elsewhere (a
    /// single node, a node that does not serve) nothing happens.
    pub fn abandon_epoch(&self, why: String) -> bool {
        match self {
            Journal::Raft { proposer, .. } => {
                proposer.abandon(why);
                true
            }
            Journal::Local(_) | Journal::Cluster(_) => false,
        }
    }

    /// Test hook: on a cluster leader, the next record leaves a gap in its epoch's chain
    /// (`Proposer::inject_gap`); elsewhere, nothing.
    #[doc(hidden)]
    pub fn inject_proposal_gap(&self) {
        if let Journal::Raft { proposer, .. } = self {
            proposer.inject_gap();
        }
    }

    /// Failure injection for tests: every later write fails as if the disk refused it.
    #[doc(hidden)]
    pub fn inject_write_failure(&self) {
        match self {
            Journal::Local(log) | Journal::Cluster(log) | Journal::Raft { log, .. } => {
                log.inject_write_failure()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::log::Log;
    use crate::storage::record::Record;

    fn record(i: u64) -> Record {
        Record::Forgotten {
            before: i as i64,
            at: i as i64,
        }
    }

    /// The local journal is the log: tickets resolve in append order with consecutive
    /// sequence numbers, a barrier with the last of them, and a failed write fails every
    /// ticket and turns the journal unhealthy.
    #[tokio::test]
    async fn a_local_journal_keeps_the_logs_promises() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(dir.path()).unwrap();
        let (handle, writer) = log.start_writer(5).unwrap();
        let journal = Journal::from(handle.clone());
        let tickets: Vec<_> = (0..10).map(|i| journal.append(record(i))).collect();
        let barrier = journal.barrier();
        for (i, ticket) in tickets.into_iter().enumerate() {
            assert_eq!(ticket.durable().await.unwrap(), 5 + i as u64);
        }
        assert_eq!(barrier.durable().await.unwrap(), 14);
        assert_eq!(journal.durable_seq(), 14);
        assert_eq!(journal.log_stats().durable_seq, 14);
        assert!(journal.is_healthy());
        journal.inject_write_failure();
        assert!(journal.append(record(99)).durable().await.is_err());
        assert!(journal.barrier().durable().await.is_err());
        assert!(!journal.is_healthy());
        assert!(!journal.log_stats().healthy);
        let _ = handle.shutdown().await;
        writer.join().unwrap();
    }

    /// A cluster node's journal stores nothing: every append and barrier is refused, and
    /// the log's sequence does not move; its health and figures are the log's.
    #[tokio::test]
    async fn a_cluster_journal_refuses_every_record() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(dir.path()).unwrap();
        let (handle, writer) = log.start_writer(1).unwrap();
        let journal = Journal::Cluster(handle.clone());
        assert!(journal.append(record(1)).durable().await.is_err());
        assert!(journal.barrier().durable().await.is_err());
        assert_eq!(handle.barrier().durable().await.unwrap(), 0);
        assert_eq!(journal.durable_seq(), 0);
        assert!(journal.is_healthy());
        let _ = handle.shutdown().await;
        writer.join().unwrap();
    }
}
