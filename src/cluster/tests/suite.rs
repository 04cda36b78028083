//! The engine's storage conformance suite (`openraft::testing::log::Suite`) against
//! `ClusterLog` and `StockSm`, each case over a fresh log and snapshot directory.
//!
//! `Suite::test_all` runs every case in one call and stops at the first failure; the
//! cases are public, so they are run here one by one, by name, every one of them. Most
//! pass as they are. The rest (`NEED_A_HOLE`) cannot apply, for one reason each, which
//! is stockd's on purpose: they set up a log, or a state machine, whose first entry is
//! not index 0 although nothing before it was purged or installed from a snapshot (a
//! hole at the front), as the engine's in-memory test store allows. The engine itself
//! never does that: its first entry is index 0 (written by `initialize`), and it reaches
//! a later index only after a purge (the log) or a snapshot install (the state machine).
//! stockd refuses both holes: `ClusterLog::append` refuses entries that do not continue
//! the log (the log never holds a hole), and `fold::apply_entry` refuses an entry that
//! does not follow the last one folded (a state is the fold of a prefix of the log). So
//! those cases are run too, and must fail with exactly one of those two refusals: a
//! different failure, or a pass, fails this test.

use std::io;

use openraft::testing::log::{StoreBuilder, Suite};
use openraft::type_config::TypeConfigExt;
use openraft::StorageError;

use crate::cluster::log_store::ClusterLog;
use crate::cluster::state_machine::StockSm;
use crate::cluster::types::Tc;
use crate::storage::log::Log;

/// A fresh log and snapshot directory per case, removed when the case is done.
struct Fresh;

struct Dirs {
    _dir: tempfile::TempDir,
}

impl StoreBuilder<Tc, ClusterLog, StockSm, Dirs> for Fresh {
    async fn build(&self) -> Result<(Dirs, ClusterLog, StockSm), StorageError<Tc>> {
        let fail = |e: &dyn std::fmt::Display| StorageError::read(Tc::err_from_string(e));
        let dir = tempfile::tempdir().map_err(|e| fail(&e))?;
        let log = Log::open(&dir.path().join("log")).map_err(|e| fail(&e))?;
        let (log, _writer) = ClusterLog::open(log).map_err(|e| fail(&e))?;
        let sm = StockSm::new(&dir.path().join("snapshots"));
        Ok((Dirs { _dir: dir }, log, sm))
    }
}

type S = Suite<Tc, ClusterLog, StockSm, Fresh, Dirs>;

/// Runs the suite's case `name` on a fresh store.
macro_rules! cases {
    ($($case:ident),* $(,)?) => {
        /// Every case of the suite's `test_store`, in its order.
        const ALL: &[&str] = &[$(stringify!($case)),*];

        async fn run(name: &str) -> io::Result<()> {
            let (_dirs, store, sm) = Fresh.build().await.map_err(io::Error::other)?;
            match name {
                $(stringify!($case) => S::$case(store, sm).await,)*
                _ => unreachable!("no case {name}"),
            }
        }
    };
}

cases!(
    last_membership_in_log_initial,
    last_membership_in_log,
    last_membership_in_log_multi_step,
    get_membership_initial,
    get_membership_from_log_and_empty_sm,
    get_membership_from_empty_log_and_sm,
    get_membership_from_log_le_sm_last_applied,
    get_membership_from_log_gt_sm_last_applied_1,
    get_membership_from_log_gt_sm_last_applied_2,
    get_initial_state_without_init,
    get_initial_state_membership_from_empty_log_and_sm,
    get_initial_state_membership_from_sm_inlog_is_smaller,
    get_initial_state_membership_from_log_insm_is_smaller,
    get_initial_state_with_state,
    get_initial_state_last_log_gt_sm,
    get_initial_state_last_log_lt_sm,
    get_initial_state_inverted_log_order,
    get_initial_state_conflict_at_same_index,
    get_initial_state_log_ids,
    get_initial_state_re_apply_committed,
    save_vote,
    get_log_entries,
    limited_get_log_entries,
    leader_bounded_stream,
    entries_stream,
    try_get_log_entry,
    log_reader_reads_new_entries,
    initial_logs,
    get_log_state,
    get_log_id,
    last_id_in_log,
    last_applied_state,
    purge_logs_upto_0,
    purge_logs_upto_5,
    purge_logs_upto_20,
    delete_logs_after_11,
    delete_logs_after_5,
    delete_logs_after_0,
    delete_logs_after_none,
    append_to_log,
    snapshot_meta,
    snapshot_meta_optional,
    apply_single,
    apply_multiple,
);

/// The cases that set up a hole at the front of the log or of the state machine (see the
/// module's comment), with the refusal each must fail with.
const NEED_A_HOLE: &[(&str, Refusal)] = &[
    // The state machine's first entry is index 1 (or 2, 3), the log's index 1.
    ("last_membership_in_log", Refusal::Fold),
    ("last_membership_in_log_multi_step", Refusal::Log),
    ("get_membership_from_log_and_empty_sm", Refusal::Log),
    ("get_membership_from_empty_log_and_sm", Refusal::Fold),
    ("get_membership_from_log_le_sm_last_applied", Refusal::Fold),
    (
        "get_membership_from_log_gt_sm_last_applied_1",
        Refusal::Fold,
    ),
    (
        "get_membership_from_log_gt_sm_last_applied_2",
        Refusal::Fold,
    ),
    (
        "get_initial_state_membership_from_empty_log_and_sm",
        Refusal::Fold,
    ),
    (
        "get_initial_state_membership_from_sm_inlog_is_smaller",
        Refusal::Fold,
    ),
    (
        "get_initial_state_membership_from_log_insm_is_smaller",
        Refusal::Fold,
    ),
    ("get_initial_state_with_state", Refusal::Fold),
    ("get_initial_state_last_log_gt_sm", Refusal::Fold),
    ("get_initial_state_last_log_lt_sm", Refusal::Log),
    ("get_initial_state_inverted_log_order", Refusal::Log),
    ("get_initial_state_conflict_at_same_index", Refusal::Log),
    ("get_initial_state_re_apply_committed", Refusal::Log),
    ("last_id_in_log", Refusal::Fold),
    ("last_applied_state", Refusal::Fold),
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Refusal {
    /// `ClusterLog::append`: entries that do not continue the log.
    Log,
    /// `fold::apply_entry`: an entry that does not follow the last one folded.
    Fold,
}

impl Refusal {
    fn matches(self, err: &io::Error) -> bool {
        let text = err.to_string();
        match self {
            Refusal::Log => text.contains("do not continue the log"),
            Refusal::Fold => text.contains("does not follow the last entry folded"),
        }
    }
}

/// Every case of the suite that applies passes.
#[tokio::test]
async fn the_engines_storage_suite_passes() {
    for name in ALL {
        if NEED_A_HOLE.iter().any(|(hole, _)| hole == name) {
            continue;
        }
        if let Err(err) = run(name).await {
            panic!("suite case {name}: {err}");
        }
    }
}

/// Each case that needs a hole at the front fails with exactly the refusal named for it,
/// and every name listed is a case of the suite.
#[tokio::test]
async fn the_suites_cases_with_a_hole_at_the_front_are_refused_as_such() {
    for (name, refusal) in NEED_A_HOLE {
        assert!(ALL.contains(name), "{name} is no case of the suite");
        match run(name).await {
            Ok(()) => panic!("suite case {name} passed: it no longer needs a hole"),
            Err(err) => assert!(
                refusal.matches(&err),
                "suite case {name} failed otherwise than by {refusal:?}: {err}"
            ),
        }
    }
}

/// The suite's snapshot transfer, built on one state machine and installed on another,
/// with the state machine's first entry at index 0 rather than the suite's 2 (a hole,
/// which `fold::apply_entry` refuses: see the module's comment). Otherwise the suite's own
/// `transfer_snapshot`, step by step.
#[tokio::test]
async fn a_snapshot_built_on_one_state_machine_installs_on_another() {
    use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
    use openraft::Membership;

    use crate::cluster::types::{LogId, RaftStoredMembership, StockdNode};

    let (_dirs_l, _log_l, mut sm_l) = Fresh.build().await.unwrap();
    let (_dirs_f, _log_f, mut sm_f) = Fresh.build().await.unwrap();
    assert!(sm_l.get_current_snapshot().await.unwrap().is_none());
    assert!(sm_f.get_current_snapshot().await.unwrap().is_none());
    let membership = Membership::<u64, StockdNode>::new_with_defaults(vec![[1, 2, 3].into()], []);
    let entries = [
        openraft::Entry {
            log_id: LogId::new_term_index(1, 0),
            payload: openraft::EntryPayload::Blank,
        },
        openraft::Entry {
            log_id: LogId::new_term_index(1, 1),
            payload: openraft::EntryPayload::Membership(membership.clone()),
        },
        openraft::Entry {
            log_id: LogId::new_term_index(3, 2),
            payload: openraft::EntryPayload::Blank,
        },
    ];
    let stream = futures_util::stream::iter(entries.into_iter().map(|e| Ok((e, None))));
    sm_l.apply(stream).await.unwrap();
    let applied = (
        Some(LogId::new_term_index(3, 2)),
        RaftStoredMembership::new(Some(LogId::new_term_index(1, 1)), membership),
    );

    let built = sm_l
        .try_create_snapshot_builder(true)
        .await
        .unwrap()
        .build_snapshot()
        .await
        .unwrap();
    assert_eq!(built.meta.last_log_id, applied.0);
    assert_eq!(built.meta.last_membership, applied.1);
    let current = sm_l.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(current.meta, built.meta);

    sm_f.install_snapshot(&current.meta, current.snapshot)
        .await
        .unwrap();
    let installed = sm_f.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(installed.meta, built.meta);
    assert_eq!(sm_f.applied_state().await.unwrap(), applied);
    assert_eq!(sm_f.state().digest(), sm_l.state().digest());
}
