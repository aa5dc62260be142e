//! Child runs: fan-out (`spawn_children`) and fan-in (`join_children`).
//!
//! A handler spawns children through its context; each child is created
//! in ONE transaction with the parent's step `spawn:NAME` that holds its
//! id, fenced by the parent's lease, so a replay finds the step and the
//! same child and never creates a second one (the two writes cannot
//! diverge: they commit or roll back together).
//!
//! A join is the parent's own write, fenced by its lease: it marks the
//! children it waits for that are not final (`parent_waits`), stores how
//! many they are on the parent (`join_waiting`, `join_of`) and, when any
//! is open, sets the parent's `run_after` to "never". The parent's attempt
//! then ends [`Outcome::AwaitingChildren`](crate::Outcome::AwaitingChildren)
//! (postponed, `run_after` kept): it holds no slot, no lease, and spends no
//! budget. Each marked child that becomes final (an attempt's end, a reap,
//! an operator's cancel) decrements its parent's `join_waiting` in the
//! transaction of that end — O(1) per child — and the end that brings it to
//! zero makes the parent due at its own time ([`plan::child::FAN_IN_SET`]).
//! Whichever order the join's end and the last child's end commit in, the
//! parent ends up due: the join's end keeps the `run_after` the child wrote.
//! A woken parent reads its children again (a join never trusts the counter
//! alone), so a count that reached zero early (an operator retried a failed
//! child) costs one extra replay, never a lost child.
//!
//! [`plan::child::FAN_IN_SET`]: crate::plan::child::FAN_IN_SET

use crate::{LeaseRef, NewRun, Result, Run};
use async_trait::async_trait;
use docket_core::{RunId, Timestamp};
use serde::{Deserialize, Serialize};

/// What cancelling the parent does to a child (chosen per spawn).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChildPolicy {
    /// The child is cancelled with its parent (a running child is asked to
    /// stop at its next step boundary), with a `cancelled_with_parent`
    /// event on it. The default.
    #[default]
    Cancel,
    /// The child keeps running on its own.
    Abandon,
}

impl ChildPolicy {
    /// The stored name.
    pub const fn as_str(self) -> &'static str {
        match self {
            ChildPolicy::Cancel => "cancel",
            ChildPolicy::Abandon => "abandon",
        }
    }
}

impl std::str::FromStr for ChildPolicy {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "cancel" => Ok(ChildPolicy::Cancel),
            "abandon" => Ok(ChildPolicy::Abandon),
            other => Err(format!("unknown child policy `{other}` (cancel, abandon)")),
        }
    }
}

/// One child to spawn.
#[derive(Clone, Debug, PartialEq)]
pub struct ChildSpawn {
    /// The parent's step that records the child (`spawn:NAME`), unique
    /// within the parent.
    pub step: String,
    /// The child run (its tenant and correlation id are the parent's: the
    /// engine fills them in).
    pub run: NewRun,
    /// What cancelling the parent does to it.
    pub policy: ChildPolicy,
}

/// A spawned child.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Spawned {
    /// The parent's step.
    pub step: String,
    /// The child's id.
    pub run_id: RunId,
    /// True when the step already held a child (a replay): nothing was
    /// created.
    pub existing: bool,
}

/// A join's count, stored on the parent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinState {
    /// Children the join waits for that are not final.
    pub waiting: u32,
    /// Children the join waits for in all.
    pub of: u32,
}

/// A run's place in its family, for the API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Family {
    /// The run that spawned it.
    pub parent_id: Option<RunId>,
    /// How many children it spawned.
    pub children: i64,
    /// The join it is suspended in, if it waits for children.
    pub waiting: Option<JoinState>,
}

/// The store's side of child runs; both backends implement it and pass the
/// conformance suite (`conformance::children_*`).
#[async_trait]
pub trait ChildStore: Send + Sync {
    /// Spawns children of the run the lease holds, all in ONE transaction
    /// fenced by that lease: for each, unless the parent already has the
    /// completed step `spawn:NAME`, a new run (`run_triggered` and
    /// `child_spawned` with the parent's id on it), the step holding its id
    /// and a `child_spawned` event on the parent. A step that exists
    /// answers its child with `existing = true`. A stale lease is
    /// `StoreError::StaleLease` (recorded `stale_write_refused`) and
    /// nothing is spawned.
    async fn spawn_children(
        &self,
        lease: LeaseRef,
        children: Vec<ChildSpawn>,
        now: Timestamp,
    ) -> Result<Vec<Spawned>>;

    /// Stores the parent's join of `children` (its own children only; other
    /// ids are ignored), fenced by its lease, in one transaction: marks the
    /// ones not final, stores their count and, when any is open, sets the
    /// parent's `run_after` to "never" until the last one ends. Answers the
    /// count; with `waiting > 0` the attempt then ends
    /// [`Outcome::AwaitingChildren`](crate::Outcome::AwaitingChildren).
    async fn join_children(
        &self,
        lease: LeaseRef,
        children: Vec<RunId>,
        now: Timestamp,
    ) -> Result<JoinState>;

    /// A run's children in spawn order (oldest first), after `after` (a
    /// cursor), at most `limit` (0 means 100).
    async fn children(&self, parent: RunId, after: Option<RunId>, limit: usize)
        -> Result<Vec<Run>>;

    /// A run's parent, number of children and current join (`None` for an
    /// unknown run).
    async fn family(&self, run: RunId) -> Result<Option<Family>>;

    /// How many runs wait for children now (parents suspended in a join),
    /// for a tenant or all: the metrics gauge.
    async fn count_joining(&self, tenant: Option<String>) -> Result<i64>;
}
