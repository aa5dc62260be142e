//! Which keyed runs a claim takes, computed once for both backends.
//!
//! A run with a concurrency key (`runs.concurrency_key`, rendered at trigger
//! time) may only be claimed while fewer than its limit of runs with the
//! same key are running. The backend reads, for each key that has claimable
//! runs, how many of that key's runs are running and the key's first due
//! candidates in claim order (PostgreSQL: under a per-key transaction lock
//! taken before the count, so two claimers cannot both take the last slot);
//! [`pick`] decides which to claim and which were newly found held, and the
//! backend persists that. Unkeyed runs never come here: they keep the plain
//! claim (`plan::claim`), whose index excludes keyed runs.

use docket_core::{EventKind, RunId, Timestamp};
use serde_json::json;

use super::end::{EventWrite, Fill};

/// A recursive CTE `k(key)` (for a `WITH RECURSIVE`): the keys that have
/// claimable runs, by a skip scan of `runs_keyed_claim` (one index probe
/// per key, however many runs a key holds back); its last row is NULL.
pub fn claimable_keys_cte() -> String {
    let c = super::claim::CLAIMABLE_SQL;
    format!(
        "k(key) AS (
            SELECT (SELECT MIN(concurrency_key) FROM runs
                    WHERE status IN ({c}) AND concurrency_key IS NOT NULL)
            UNION ALL
            SELECT (SELECT MIN(concurrency_key) FROM runs
                    WHERE status IN ({c}) AND concurrency_key IS NOT NULL
                      AND concurrency_key > k.key)
            FROM k WHERE k.key IS NOT NULL
         )"
    )
}

/// `Store::next_due` as SQL for both backends (an idle worker must not
/// wake for runs it could not claim; it is woken when a slot frees
/// instead), `{jobs}` being the
/// backend's "job is one of the worker's jobs" test (`IN (?1, …)`,
/// `= ANY($1)`): the earliest `run_after` of a claimable run that is not
/// paused and not held back by its key. Index-driven, whatever the
/// backlog:
/// - unkeyed runs: the first entry of `runs_due` in due order that is one
///   of the jobs and not paused (usually the very first);
/// - keyed runs: the keys with claimable runs by a skip scan of
///   `runs_keyed_claim` (one probe per key), each key's room as a claim
///   sees it (running runs against the limit of its first run in claim
///   order, as `pick` does), and the earliest run of the keys with room.
///   A backlog held behind a full key costs one probe per key, not a read
///   of every held run.
pub fn next_due_sql(jobs: &str) -> String {
    let c = super::claim::CLAIMABLE_SQL;
    let not_paused = crate::retention::NOT_PAUSED;
    let keys = claimable_keys_cte();
    format!(
        "WITH RECURSIVE {keys},
         room(key) AS (
            SELECT k.key FROM k WHERE k.key IS NOT NULL
              AND (SELECT COUNT(*) FROM runs x
                   WHERE x.status = 'running' AND x.concurrency_key = k.key)
                < (SELECT COALESCE(f.concurrency_limit, 1) FROM runs f
                   WHERE f.status IN ({c}) AND f.concurrency_key = k.key
                   ORDER BY f.priority DESC, f.run_after, f.id LIMIT 1)
         )
         SELECT MIN(t) FROM (
            SELECT (SELECT run_after FROM runs
                    WHERE status IN ({c}) AND concurrency_key IS NULL
                      AND job {jobs} AND {not_paused}
                    ORDER BY run_after LIMIT 1) AS t
            UNION ALL
            SELECT MIN(run_after) AS t FROM runs
            WHERE status IN ({c}) AND concurrency_key IN (SELECT key FROM room)
              AND job {jobs} AND {not_paused}
         ) due"
    )
}

/// `Store::concurrency_usage` as SQL over `runs`, with the placeholders
/// `{now}`, `{tenant}` (NULL: every tenant) and `{limit}` named for each
/// backend's syntax; the statuses come from the state machine.
pub fn usage_sql(now: &str, tenant: &str, limit: &str) -> String {
    let c = super::claim::CLAIMABLE_SQL;
    format!(
        "SELECT concurrency_key, MAX(concurrency_limit) AS lim,
                SUM(CASE WHEN status = 'running' THEN 1 ELSE 0 END) AS running,
                SUM(CASE WHEN status IN ({c}) AND run_after <= {now} THEN 1 ELSE 0 END) AS due,
                SUM(CASE WHEN status IN ({c}) THEN 1 ELSE 0 END) AS waiting
         FROM runs
         WHERE concurrency_key IS NOT NULL AND status IN ({c}, 'running')
           AND ({tenant} IS NULL OR tenant = {tenant})
         GROUP BY concurrency_key
         ORDER BY concurrency_key
         LIMIT {limit}"
    )
}

/// One due, claimable run of a key, as read by the backend.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    /// The run.
    pub id: RunId,
    /// Its priority (higher first).
    pub priority: i32,
    /// When it became claimable.
    pub run_after: Timestamp,
    /// The limit stored on the run.
    pub limit: u32,
    /// Already found held in this episode (`runs.held_at` set).
    pub held: bool,
}

/// A key's state at the claim: its running count and its first due
/// candidates in claim order (at most the claim's limit of them).
#[derive(Clone, Debug, PartialEq)]
pub struct KeyState {
    /// The key.
    pub key: String,
    /// Runs with this key that are `running` now.
    pub running: u32,
    /// Due candidates, in claim order (priority DESC, run_after, id).
    pub candidates: Vec<Candidate>,
}

/// What a keyed claim does.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct KeyedPick {
    /// The runs to claim, in claim order.
    pub claim: Vec<RunId>,
    /// Runs newly found held back by their key (not yet marked), with the
    /// `run_held` event each gets.
    pub held: Vec<(RunId, EventWrite)>,
}

/// Claim order: priority descending, then `run_after`, then id.
fn order(c: &Candidate) -> (i32, Timestamp, RunId) {
    (-c.priority, c.run_after, c.id)
}

/// Picks at most `limit` runs across `keys`, never more per key than its
/// room (the first candidate's limit minus the key's running runs), in
/// claim order across keys. A candidate left out while its key is full once
/// this claim's runs of it run (not merely because the claim's `limit` ran
/// out) is held; it gets a `run_held` event once per episode (when it is
/// not marked held yet), counting this claim's runs of the key as running.
pub fn pick(keys: &[KeyState], limit: usize) -> KeyedPick {
    let mut eligible: Vec<(&Candidate, usize)> = Vec::new();
    for (ki, k) in keys.iter().enumerate() {
        let Some(first) = k.candidates.first() else {
            continue;
        };
        let room = first.limit.saturating_sub(k.running) as usize;
        eligible.extend(k.candidates.iter().take(room).map(|c| (c, ki)));
    }
    eligible.sort_by_key(|(c, _)| order(c));
    eligible.truncate(limit);
    let mut out = KeyedPick {
        claim: eligible.iter().map(|(c, _)| c.id).collect(),
        held: Vec::new(),
    };
    for (ki, k) in keys.iter().enumerate() {
        let Some(first) = k.candidates.first() else {
            continue;
        };
        let claimed = eligible.iter().filter(|(_, i)| *i == ki).count() as u32;
        let running = k.running.saturating_add(claimed);
        if running < first.limit {
            continue;
        }
        for c in &k.candidates {
            if !c.held && !out.claim.contains(&c.id) {
                out.held
                    .push((c.id, held_event(&k.key, running, first.limit)));
            }
        }
    }
    out
}

/// The `run_held` event: why the run waits, in words and as fields.
pub fn held_event(key: &str, running: u32, limit: u32) -> EventWrite {
    EventWrite {
        kind: EventKind::RunHeld,
        data: json!({
            "reason": "concurrency_key",
            "concurrency_key": key,
            "running": running,
            "limit": limit,
            "message": format!("held by concurrency key {key}: {running} of {limit} running"),
        }),
        fill: Fill::None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use docket_core::{RunStatus, Transition};

    fn id(n: u128) -> RunId {
        RunId(uuid::Uuid::from_u128(n))
    }

    fn cand(n: u128, priority: i32, at: i64, limit: u32, held: bool) -> Candidate {
        Candidate {
            id: id(n),
            priority,
            run_after: Timestamp(at),
            limit,
            held,
        }
    }

    #[test]
    fn a_key_gets_no_more_than_its_room_and_the_rest_is_held_once() {
        let keys = vec![KeyState {
            key: "acme/42".into(),
            running: 1,
            candidates: vec![
                cand(1, 0, 1, 2, false),
                cand(2, 0, 2, 2, false),
                cand(3, 0, 3, 2, true),
            ],
        }];
        let p = pick(&keys, 10);
        assert_eq!(p.claim, vec![id(1)]);
        // Run 3 was already marked held in this episode: no second event.
        assert_eq!(p.held.len(), 1);
        assert_eq!(p.held[0].0, id(2));
        assert_eq!(p.held[0].1.kind, EventKind::RunHeld);
        // The one running and the one this claim takes.
        assert_eq!(
            p.held[0].1.data["message"],
            json!("held by concurrency key acme/42: 2 of 2 running")
        );
        // A claim cut short by its own limit holds nothing: the key has room.
        let p = pick(&keys, 0);
        assert!(p.claim.is_empty());
        assert!(p.held.is_empty());
    }

    #[test]
    fn keys_are_merged_in_claim_order_and_the_claim_limit_holds_nothing() {
        let keys = vec![
            KeyState {
                key: "a".into(),
                running: 0,
                candidates: vec![cand(1, 0, 5, 3, false), cand(2, 0, 6, 3, false)],
            },
            KeyState {
                key: "b".into(),
                running: 0,
                candidates: vec![cand(3, 1, 9, 1, false), cand(4, 0, 1, 1, false)],
            },
        ];
        let p = pick(&keys, 2);
        // b's run 3 has the higher priority; then a's run 1 (run_after 5)
        // beats a's run 2; b's run 4 is held by b's limit of 1.
        assert_eq!(p.claim, vec![id(3), id(1)]);
        let held: Vec<RunId> = p.held.iter().map(|h| h.0).collect();
        assert_eq!(
            held,
            vec![id(4)],
            "run 2 was left by the claim's limit, not held"
        );
    }

    #[test]
    fn a_full_key_claims_nothing() {
        let keys = vec![KeyState {
            key: "k".into(),
            running: 2,
            candidates: vec![cand(1, 0, 1, 2, false)],
        }];
        let p = pick(&keys, 5);
        assert!(p.claim.is_empty());
        assert_eq!(p.held.len(), 1);
    }

    /// The running count needs no counter kept by the transitions that
    /// leave `running`: it is counted under the key's lock at each claim,
    /// and the claim is the only transition that ENTERS `running`, so a
    /// count taken under the lock can only overstate (an end committing
    /// meanwhile), never understate, what is running.
    #[test]
    fn only_the_claim_enters_running() {
        for from in RunStatus::ALL {
            for t in Transition::ALL {
                if from != RunStatus::Running && from.apply(t) == Ok(RunStatus::Running) {
                    assert_eq!(t, Transition::Claim, "{from:?} --{t:?}--> running");
                }
            }
        }
    }
}
