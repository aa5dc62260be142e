//! What spawning, joining and the fan-in write, computed once for both
//! backends (see [`crate::children`] for the protocol).

use super::end::{EventWrite, Fill};
use crate::children::{ChildPolicy, JoinState};
use docket_core::{EventKind, RunId, RunStatus, Timestamp};
use serde_json::{json, Value};

/// The final statuses as SQL literals (a child in one of them is not
/// waited for). Checked against [`RunStatus::is_terminal`] by a test.
pub const FINAL_SQL: &str = "'completed', 'failed', 'cancelled'";

/// The `SET` list of the fan-in update of a parent row: `n` (SQL) of its
/// waited-for children just became final at `now` (SQL); `t` qualifies the
/// parent's columns where they are read (`""` or `"p."`). Every
/// expression reads the row's values before the update (both SQL
/// dialects), and nothing depends on a `WHERE` beyond the parent's id, so
/// on PostgreSQL a row a concurrent join just changed is re-read, not
/// skipped. The parent becomes due at `now` when its count reaches zero
/// while it waits (`postponed`) or is about to (`running`: its
/// `AwaitingChildren` end keeps this `run_after`).
pub fn fan_in_set(t: &str, n: &str, now: &str) -> String {
    format!(
        "join_waiting = CASE WHEN {t}join_waiting > {n} THEN {t}join_waiting - {n} ELSE 0 END,
         run_after = CASE WHEN {t}join_waiting > 0 AND {t}join_waiting <= {n}
                               AND {t}status IN ('running', 'postponed')
                          THEN {now} ELSE {t}run_after END"
    )
}

/// The parent's step that records a child: `spawn:NAME`.
pub fn step_name(name: &str) -> String {
    format!("spawn:{name}")
}

/// The step's stored result: the child's id and job.
pub fn step_result(child: RunId, job: &str, policy: ChildPolicy) -> Value {
    json!({ "run_id": child, "job": job, "policy": policy })
}

/// The child recorded by a `spawn:` step's result, if it holds one.
pub fn step_child(result: Option<&Value>) -> Option<RunId> {
    result
        .and_then(|r| r.get("run_id"))
        .and_then(|v| serde_json::from_value(v.clone()).ok())
}

/// The `child_spawned` event on the parent.
pub fn spawned_on_parent(step: &str, child: RunId, job: &str, policy: ChildPolicy) -> EventWrite {
    EventWrite {
        kind: EventKind::ChildSpawned,
        data: json!({ "step": step, "child": child, "job": job, "policy": policy }),
        fill: Fill::None,
    }
}

/// The `child_spawned` event on the child: its link to the parent.
pub fn spawned_on_child(step: &str, parent: RunId, policy: ChildPolicy) -> EventWrite {
    EventWrite {
        kind: EventKind::ChildSpawned,
        data: json!({ "parent": parent, "step": step, "policy": policy }),
        fill: Fill::None,
    }
}

/// What a join writes on the parent: its count and, when any child is
/// open, a `run_after` of "never" (the last child's end sets it to its
/// time). `None` keeps the stored `run_after`: nothing to wait for.
pub fn join_run_after(state: JoinState) -> Option<Timestamp> {
    (state.waiting > 0).then_some(Timestamp::MAX)
}

/// The `cancelled_with_parent` event on a child a parent's cancel reached.
pub fn cancelled_with_parent(parent: RunId, child_status: RunStatus) -> EventWrite {
    EventWrite {
        kind: EventKind::CancelledWithParent,
        data: json!({ "parent": parent, "from": child_status }),
        fill: Fill::None,
    }
}

/// The comment a cascaded cancel records on each child (the actor is the
/// parent's canceller).
pub fn cascade_comment(parent: RunId, comment: Option<&str>) -> String {
    match comment {
        Some(c) => format!("cancelled with its parent {parent}: {c}"),
        None => format!("cancelled with its parent {parent}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn final_sql_lists_exactly_the_terminal_statuses() {
        let all = [
            RunStatus::Pending,
            RunStatus::Running,
            RunStatus::Postponed,
            RunStatus::NeedsInput,
            RunStatus::Completed,
            RunStatus::Failed,
            RunStatus::Cancelled,
        ];
        for s in all {
            assert_eq!(
                FINAL_SQL.contains(&format!("'{}'", s.as_str())),
                s.is_terminal(),
                "{s:?}"
            );
        }
    }

    #[test]
    fn a_spawn_step_reads_back_its_child() {
        let id = RunId::new();
        let r = step_result(id, "echo", ChildPolicy::Abandon);
        assert_eq!(step_child(Some(&r)), Some(id));
        assert_eq!(r["policy"], json!("abandon"));
        assert_eq!(step_child(Some(&json!({"x": 1}))), None);
        assert_eq!(step_child(None), None);
        assert_eq!(step_name("a"), "spawn:a");
    }

    #[test]
    fn a_join_with_open_children_waits_forever_until_the_last_one_ends() {
        assert_eq!(
            join_run_after(JoinState { waiting: 3, of: 5 }),
            Some(Timestamp::MAX)
        );
        assert_eq!(join_run_after(JoinState { waiting: 0, of: 5 }), None);
        let set = fan_in_set("p.", "?2", "?3");
        assert!(set.contains("p.join_waiting - ?2") && set.contains("THEN ?3"));
    }
}
