//! Membership changes through the admin API (docs/REPLICATION.md, step 7):
//! `POST /v1/admin/cluster/learners` adds a node as a learner and waits until it has
//! caught up, `DELETE /v1/admin/cluster/learners/{id}` removes a learner, `PUT
//! /v1/admin/cluster/voters` sets the voters by joint consensus. They run on the leader
//! only (the router redirects them like any application request).
//!
//! The requests are checked here against the membership the leader knows, before the
//! engine is asked: a fault is `MembershipError::Invalid` (422) naming the field, a
//! request the cluster's state refuses `Conflict` (409). What the engine answers is mapped
//! here to the same errors, so that none of its types leaves `src/cluster/`.

use std::collections::BTreeSet;
use std::time::Duration;

use openraft::async_runtime::WatchReceiver;
use openraft::error::{ChangeMembershipError, ClientWriteError, RaftError};

use super::log_store::seq_of;
use super::node::ClusterNode;
use super::types::{StockdNode, Tc};
use super::{Member, NodeId, Status};

/// How long `POST /v1/admin/cluster/learners` waits for the new learner to hold every
/// entry up to the one that added it; past it, the answer is 503 (the learner stays a
/// member, and the same request again waits again).
pub const CATCH_UP_WAIT: Duration = Duration::from_secs(60);

/// How long a membership entry (or the two of a joint change) may take to commit before
/// the answer is 503 with its outcome unknown.
pub const CHANGE_DEADLINE: Duration = Duration::from_secs(30);

/// Why a membership change was not made (or not confirmed).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MembershipError {
    /// The request names what cannot be (422 `validation_failed`, naming `field`).
    #[error("{detail}")]
    Invalid { field: &'static str, detail: String },
    /// The cluster's state refuses the change now (409): a voter added as a learner, a
    /// change while another is in progress, or one the engine refuses (its reason).
    #[error("{0}")]
    Conflict(String),
    /// No answer now (503, retry): this node stopped leading, the engine stopped, or the
    /// change or the learner's catch-up did not finish in time (its outcome is then in
    /// `GET /v1/cluster`).
    #[error("{0}")]
    Unavailable(String),
}

fn invalid(field: &'static str, detail: String) -> MembershipError {
    MembershipError::Invalid { field, detail }
}

/// What adding a learner comes to, once checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LearnerPlan {
    /// A new member: the engine adds it.
    Add,
    /// A learner with these very addresses already (a retry): only its catch-up is waited
    /// for.
    Known,
}

/// Checks adding node `id` at `api` and `raft` as a learner against `members` (the
/// membership the leader knows). The addresses' form (`HOST:PORT`) is checked too.
pub fn check_learner(
    members: &[Member],
    id: NodeId,
    api: &str,
    raft: &str,
) -> Result<LearnerPlan, MembershipError> {
    if id == 0 {
        return Err(invalid("id", "id must be 1 or more".to_string()));
    }
    for (field, value) in [("api", api), ("raft", raft)] {
        if let Err(why) = super::settings::host_port(value) {
            return Err(invalid(
                field,
                format!("{field} must be HOST:PORT, not {value:?} ({why})"),
            ));
        }
    }
    if api == raft {
        return Err(invalid(
            "raft",
            format!("raft must differ from api (both are {api})"),
        ));
    }
    if let Some(m) = members.iter().find(|m| m.id == id) {
        if m.voter {
            return Err(MembershipError::Conflict(format!(
                "node {id} is already a voter of this cluster"
            )));
        }
        if m.api == api && m.raft.as_deref() == Some(raft) {
            return Ok(LearnerPlan::Known);
        }
        return Err(invalid(
            "id",
            format!(
                "node {id} is already a learner of this cluster, at api {} and raft {}",
                m.api,
                m.raft.as_deref().unwrap_or("-")
            ),
        ));
    }
    for m in members {
        for (field, value) in [("api", api), ("raft", raft)] {
            if m.api == value || m.raft.as_deref() == Some(value) {
                return Err(invalid(
                    field,
                    format!("{field} {value} is already node {}'s address", m.id),
                ));
            }
        }
    }
    Ok(LearnerPlan::Add)
}

/// Checks the voters asked for against `members`: at least one, each named once, each a
/// member already (a new node is added as a learner first). Returns them as a set.
pub fn check_voters(
    members: &[Member],
    voters: &[NodeId],
) -> Result<BTreeSet<NodeId>, MembershipError> {
    if voters.is_empty() {
        return Err(invalid(
            "voters",
            "voters must name at least one node".to_string(),
        ));
    }
    let mut set = BTreeSet::new();
    for id in voters {
        if !set.insert(*id) {
            return Err(invalid("voters", format!("node {id} is named twice")));
        }
        if !members.iter().any(|m| m.id == *id) {
            return Err(invalid(
                "voters",
                format!(
                    "node {id} is not a member of this cluster: add it as a learner first \
                     (POST /v1/admin/cluster/learners)"
                ),
            ));
        }
    }
    Ok(set)
}

/// Checks removing learner `id`: a member that is no voter.
pub fn check_learner_removal(members: &[Member], id: NodeId) -> Result<(), MembershipError> {
    match members.iter().find(|m| m.id == id) {
        None => Err(MembershipError::Conflict(format!(
            "node {id} is not a member of this cluster (removed already?)"
        ))),
        Some(m) if m.voter => Err(MembershipError::Conflict(format!(
            "node {id} is a voter: leave it out of the voters instead \
             (PUT /v1/admin/cluster/voters), which removes it"
        ))),
        Some(_) => Ok(()),
    }
}

/// The engine's refusal of a membership change, as stockd's error.
fn refused(err: RaftError<Tc, ClientWriteError<Tc>>) -> MembershipError {
    match err {
        RaftError::APIError(ClientWriteError::ForwardToLeader(to)) => {
            MembershipError::Unavailable(format!(
                "this node no longer leads (the leader is {}); retry on the leader",
                to.leader_id
                    .map_or_else(|| "not known yet".to_string(), |id| format!("node {id}"))
            ))
        }
        RaftError::APIError(ClientWriteError::LogEntryDiscarded(_)) => {
            MembershipError::Unavailable(
                "this node stopped leading before the change committed; whether it did \
                 commit is not known: GET /v1/cluster on the leader shows the membership"
                    .to_string(),
            )
        }
        RaftError::APIError(ClientWriteError::ChangeMembershipError(
            err @ (ChangeMembershipError::EmptyMembership(_)
            | ChangeMembershipError::LearnerNotFound(_)),
        )) => invalid("voters", format!("the cluster refuses the change: {err}")),
        RaftError::APIError(ClientWriteError::ChangeMembershipError(err)) => {
            MembershipError::Conflict(format!("the cluster refuses the change now: {err}"))
        }
        RaftError::APIError(err @ ClientWriteError::PreconditionFailed(_)) => {
            MembershipError::Conflict(format!("the cluster refuses the change now: {err}"))
        }
        RaftError::Fatal(err) => {
            MembershipError::Unavailable(format!("this node's Raft engine stopped: {err}"))
        }
    }
}

impl ClusterNode {
    /// The members as the engine's metrics show them (the effective membership: on the
    /// leader, the newest it appended).
    fn members(&self) -> Vec<Member> {
        self.status().members
    }

    /// `POST /v1/admin/cluster/learners`: adds node `id` as a learner (its entry
    /// committed), then waits until it holds every entry up to that one, at most
    /// `CATCH_UP_WAIT`. A learner already known with the same addresses is only waited
    /// for. Returns the status after it.
    pub async fn add_learner(
        &self,
        id: NodeId,
        api: String,
        raft: String,
    ) -> Result<Status, MembershipError> {
        self.add_learner_within(id, api, raft, CATCH_UP_WAIT).await
    }

    /// `add_learner`, waiting at most `wait` for the catch-up.
    pub async fn add_learner_within(
        &self,
        id: NodeId,
        api: String,
        raft: String,
        wait: Duration,
    ) -> Result<Status, MembershipError> {
        let _one = self.one_change()?;
        let plan = check_learner(&self.members(), id, &api, &raft)?;
        let added_at = match plan {
            LearnerPlan::Add => {
                let node = StockdNode {
                    api: api.clone(),
                    raft: raft.clone(),
                };
                let added =
                    tokio::time::timeout(CHANGE_DEADLINE, self.raft().add_learner(id, node, false))
                        .await
                        .map_err(|_| not_in_time("adding the learner"))?
                        .map_err(refused)?;
                tracing::info!(node = id, %api, %raft, "added a learner");
                seq_of(added.log_id.index)
            }
            LearnerPlan::Known => {
                let m = self.raft().metrics();
                let m = m.borrow_watched();
                m.membership_config
                    .log_id()
                    .as_ref()
                    .map_or(0, |l| seq_of(l.index))
            }
        };
        self.caught_up(id, added_at, wait).await?;
        Ok(self.status())
    }

    /// Waits until this leader's replication to `id` has matched `seq`, at most `wait`.
    async fn caught_up(&self, id: NodeId, seq: u64, wait: Duration) -> Result<(), MembershipError> {
        let mut metrics = self.raft().metrics();
        let check = |m: &openraft::RaftMetrics<Tc>| -> Result<bool, MembershipError> {
            if m.running_state.is_err() {
                return Err(MembershipError::Unavailable(
                    "this node's Raft engine stopped".to_string(),
                ));
            }
            let Some(replication) = &m.replication else {
                return Err(MembershipError::Unavailable(format!(
                    "this node stopped leading while node {id} caught up; it is a learner \
                     of the cluster: GET /v1/cluster on the leader shows how far it is"
                )));
            };
            Ok(replication
                .get(&id)
                .and_then(|matched| matched.as_ref())
                .is_some_and(|l| seq_of(l.index) >= seq))
        };
        let waited = tokio::time::timeout(wait, async {
            loop {
                if check(&metrics.borrow_watched())? {
                    return Ok(());
                }
                if metrics.changed().await.is_err() {
                    return Err(MembershipError::Unavailable(
                        "this node's Raft engine stopped".to_string(),
                    ));
                }
            }
        })
        .await;
        match waited {
            Ok(done) => done,
            Err(_) => Err(MembershipError::Unavailable(format!(
                "node {id} is a learner of the cluster but has not caught up within {wait:?} \
                 (is it running, its Raft listener at the address given?); the same request \
                 again waits again"
            ))),
        }
    }

    /// `PUT /v1/admin/cluster/voters`: makes `voters` the voters, by joint consensus; a
    /// voter left out is removed from the cluster (learners stay learners). Returns once
    /// the final membership is committed, with the status after it. When it leaves this
    /// node (the leader) out, the engine hands the leadership to another voter shortly
    /// after the answer, and this node is no member any more.
    pub async fn change_voters(&self, voters: &[NodeId]) -> Result<Status, MembershipError> {
        let _one = self.one_change()?;
        let voters = check_voters(&self.members(), voters)?;
        let before: BTreeSet<NodeId> = self
            .members()
            .iter()
            .filter(|m| m.voter)
            .map(|m| m.id)
            .collect();
        tokio::time::timeout(
            CHANGE_DEADLINE,
            self.raft().change_membership(voters.clone(), false),
        )
        .await
        .map_err(|_| not_in_time("changing the voters"))?
        .map_err(refused)?;
        tracing::info!(before = ?before, after = ?voters, "changed the voters");
        Ok(self.status())
    }

    /// `DELETE /v1/admin/cluster/learners/{id}`: removes learner `id` from the cluster
    /// (the leader stops sending it the log). Returns the status once the change is
    /// committed.
    pub async fn remove_learner(&self, id: NodeId) -> Result<Status, MembershipError> {
        let _one = self.one_change()?;
        check_learner_removal(&self.members(), id)?;
        let change = openraft::ChangeMembers::RemoveNodes(BTreeSet::from([id]));
        tokio::time::timeout(
            CHANGE_DEADLINE,
            self.raft().change_membership(change, false),
        )
        .await
        .map_err(|_| not_in_time("removing the learner"))?
        .map_err(refused)?;
        tracing::info!(node = id, "removed a learner");
        Ok(self.status())
    }

    /// One membership change at a time on this node: a second one while the first runs is
    /// a conflict.
    fn one_change(&self) -> Result<tokio::sync::MutexGuard<'_, ()>, MembershipError> {
        self.changing().try_lock().map_err(|_| {
            MembershipError::Conflict(
                "another membership change is in progress on this node; retry once it \
                 ends"
                    .to_string(),
            )
        })
    }
}

fn not_in_time(what: &str) -> MembershipError {
    MembershipError::Unavailable(format!(
        "{what} did not commit within {CHANGE_DEADLINE:?} (no quorum?); whether it will is not \
         known: GET /v1/cluster on the leader shows the membership"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: NodeId, voter: bool) -> Member {
        Member {
            id,
            api: format!("127.0.0.1:80{id:02}"),
            raft: Some(format!("127.0.0.1:90{id:02}")),
            voter,
        }
    }

    fn three_and_a_learner() -> Vec<Member> {
        vec![
            member(1, true),
            member(2, true),
            member(3, true),
            member(4, false),
        ]
    }

    fn field(err: MembershipError) -> &'static str {
        match err {
            MembershipError::Invalid { field, .. } => field,
            other => panic!("not a validation error: {other:?}"),
        }
    }

    #[test]
    fn a_learner_is_checked_against_the_membership() {
        let m = three_and_a_learner();
        let add = |id, api: &str, raft: &str| check_learner(&m, id, api, raft);
        assert_eq!(
            add(5, "127.0.0.1:8005", "127.0.0.1:9005"),
            Ok(LearnerPlan::Add)
        );
        assert_eq!(
            add(5, "n5.example:8080", "n5.example:9090"),
            Ok(LearnerPlan::Add)
        );
        // A retry of a learner already added, with its addresses: only waited for.
        assert_eq!(
            add(4, "127.0.0.1:8004", "127.0.0.1:9004"),
            Ok(LearnerPlan::Known)
        );
        assert_eq!(field(add(0, "a:1", "b:2").unwrap_err()), "id");
        assert_eq!(
            field(add(4, "127.0.0.1:8044", "127.0.0.1:9044").unwrap_err()),
            "id"
        );
        for bad in [
            "",
            "host",
            ":80",
            "host:0",
            "host:65536",
            "host:x",
            "a b:80",
            "h/x:1",
        ] {
            assert_eq!(field(add(5, bad, "b:2").unwrap_err()), "api", "{bad:?}");
            assert_eq!(field(add(5, "a:1", bad).unwrap_err()), "raft", "{bad:?}");
        }
        assert_eq!(field(add(5, "a:1", "a:1").unwrap_err()), "raft");
        // Another member's address, API or Raft, either way round.
        assert_eq!(
            field(add(5, "127.0.0.1:8002", "127.0.0.1:9005").unwrap_err()),
            "api"
        );
        assert_eq!(
            field(add(5, "127.0.0.1:9002", "127.0.0.1:9005").unwrap_err()),
            "api"
        );
        assert_eq!(
            field(add(5, "127.0.0.1:8005", "127.0.0.1:9004").unwrap_err()),
            "raft"
        );
        // A voter is no learner to add.
        let err = add(2, "127.0.0.1:8002", "127.0.0.1:9002").unwrap_err();
        assert!(
            matches!(&err, MembershipError::Conflict(d) if d.contains("already a voter")),
            "{err:?}"
        );
    }

    #[test]
    fn voters_must_be_members_named_once() {
        let m = three_and_a_learner();
        assert_eq!(
            check_voters(&m, &[1, 2, 3, 4]),
            Ok(BTreeSet::from([1, 2, 3, 4]))
        );
        assert_eq!(check_voters(&m, &[4]), Ok(BTreeSet::from([4])));
        for bad in [&[][..], &[1, 2, 5][..], &[1, 1, 2][..], &[0][..]] {
            let err = check_voters(&m, bad).unwrap_err();
            assert_eq!(field(err.clone()), "voters", "{bad:?}");
        }
        let err = check_voters(&m, &[1, 5]).unwrap_err();
        assert!(
            err.to_string().contains("add it as a learner first"),
            "{err}"
        );
    }

    #[test]
    fn only_a_learner_is_removed_as_one() {
        let m = three_and_a_learner();
        assert_eq!(check_learner_removal(&m, 4), Ok(()));
        for (id, says) in [(2, "is a voter"), (5, "not a member")] {
            let err = check_learner_removal(&m, id).unwrap_err();
            assert!(
                matches!(&err, MembershipError::Conflict(d) if d.contains(says)),
                "{id}: {err:?}"
            );
        }
    }
}
