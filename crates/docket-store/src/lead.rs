//! Leadership that expires: for periodic tasks that must run on one node at
//! a time (the coming schedules and pruning).
//!
//! A task's leader holds a row `(task, holder, token, expires_at)` and
//! renews it by calling [`Store::try_lead`](crate::Store::try_lead) again
//! before it expires. A leader that stops renewing — killed, stopped
//! (SIGSTOP, a long pause), cut off from the database — loses the task when
//! its lease runs out: the next node that asks takes it over with a larger
//! [`FencingToken`]. So a hung leader can delay its task by one lease at
//! most, never halt it. (The lease reaper needs no leader at all: see
//! `Store::reap`.)
//!
//! The token is the fence: a leader that comes back after losing the task
//! must not act on it. Every write of a led task must therefore check, in
//! its own transaction, that the task's row still carries its token and
//! has not expired (`EXISTS (SELECT 1 FROM leaders WHERE task = $1 AND
//! token = $2 AND expires_at > $now)`); the leadership check alone, before
//! the write, is not enough.

/// Grows at every change of a task's leader; a write of the task made under
/// a smaller token than the row's is stale.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FencingToken(pub i64);

/// Takes the task if free or expired (token + 1), renews it for its
/// current, unexpired holder (same token), answers the token; no row when
/// another holder leads. One statement; the same text on both backends.
pub(crate) const TRY_LEAD_SQL: &str = "
INSERT INTO leaders (task, holder, token, expires_at) VALUES ($1, $2, 1, $4)
ON CONFLICT (task) DO UPDATE SET
    token = CASE WHEN leaders.holder = excluded.holder AND leaders.expires_at > $3
                 THEN leaders.token ELSE leaders.token + 1 END,
    holder = excluded.holder,
    expires_at = excluded.expires_at
WHERE leaders.expires_at <= $3 OR leaders.holder = excluded.holder
RETURNING token";

/// Ends a lead early (its holder stops): only under its own token, only
/// while unexpired, by expiring it now.
pub(crate) const RESIGN_SQL: &str =
    "UPDATE leaders SET expires_at = $3 WHERE task = $1 AND token = $2 AND expires_at > $3";
