//! What taking a rate limit's token writes ([`LimitStore::rate_take`](crate::LimitStore::rate_take)).
//!
//! The bucket's arithmetic is `docket_core::rate`. This adds reservations:
//! a taker that finds no token reserves the next one (the bucket goes into
//! debt) and a row `(key, holder, due_at)` remembers it, so that when the
//! holder (a run) comes back at its due time it goes ahead on the token it
//! already paid for instead of taking, and perhaps reserving, another. So a
//! run is deferred at most once per limit, however long the queue.
//!
//! A reservation is honoured until `due_at + grace` (one bucket's worth of
//! time, `burst / per_second`). A holder that comes back later than that
//! (its workers were down) takes a fresh token: otherwise every run that
//! reserved during an outage would send at once when it ends.
//!
//! A token whose holder is not back for it is not wasted, though: from
//! half its grace after its due time, a taker that finds the bucket empty
//! takes it over ([`take_over`]) and sends on it, and the late holder's
//! reservation moves to the slot that taker would have reserved. Holders
//! are late when the claims are busy elsewhere: runs due at once sort
//! before the runs whose tokens come due while they are worked through,
//! and each of them must take (and be deferred) first; measured across 3
//! processes, 300 runs due at once left the tokens of their first ~1.2 s
//! unused (docs/RATE_LIMITS.md, "Accuracy").

use docket_core::rate::{self, Bucket, RateLimit, Take};
use docket_core::Timestamp;

/// Reservations older than this (past their due time) are deleted by the
/// next reservation of the same key: their holders were cancelled or
/// deleted and will not come back for them.
pub const RESERVATION_GC_MS: i64 = 3_600_000;

/// The answer of a take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RateTake {
    /// Go ahead now.
    Granted,
    /// A token is reserved for this holder at `until`: come back then.
    Deferred {
        /// When the reserved token is due.
        until: Timestamp,
    },
}

/// What a take writes, computed from the rows read under the bucket's lock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RatePlan {
    /// The bucket to store (`None`: unchanged).
    pub bucket: Option<Bucket>,
    /// Delete the holder's reservation.
    pub delete_reservation: bool,
    /// Insert a reservation for the holder, due at this instant.
    pub reserve: Option<Timestamp>,
    /// Delete the key's reservations due before this instant.
    pub gc_before: Option<Timestamp>,
    /// The answer.
    pub answer: RateTake,
}

/// How long after its due time a reservation is still honoured.
pub fn grace_ms(limit: &RateLimit) -> i64 {
    let per_ms = limit.per_ms().max(1);
    (limit.capacity() + per_ms - 1) / per_ms
}

/// The due times of the reservations a take planned as `plan` may take
/// over at `now`, inclusive, or `None` when it reserves nothing (it goes
/// ahead, or waits for its own token): due at least half the grace ago
/// (the holder had that long to come back; on time it is back within
/// milliseconds) and at most the grace ago (older tokens are never sent:
/// sending them would add to the burst a late holder may send, see
/// docs/RATE_LIMITS.md).
pub fn takeover_window(
    plan: &RatePlan,
    limit: &RateLimit,
    now: Timestamp,
) -> Option<(Timestamp, Timestamp)> {
    let grace = grace_ms(limit);
    plan.reserve
        .map(|_| (now.plus_millis(-grace), now.plus_millis(-(grace / 2))))
}

/// Another holder's reservation that is due and not yet used, read by the
/// backend under the bucket's lock: the earliest due within
/// [`takeover_window`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LateReservation {
    /// Its holder.
    pub holder: String,
    /// Its due time.
    pub due: Timestamp,
}

/// The read of [`LateReservation`], with the placeholders `{key}`,
/// `{from}` and `{to}` (the [`takeover_window`]) and `{holder}` (the taker,
/// whose own reservation is not another's) in the backend's syntax: the
/// earliest due in the window (index `rate_reservations_due`). Columns:
/// holder, due time.
pub fn late_sql(key: &str, from: &str, to: &str, holder: &str) -> String {
    format!(
        "SELECT holder, due_at FROM rate_reservations
         WHERE key = {key} AND due_at >= {from} AND due_at <= {to} AND holder <> {holder}
         ORDER BY due_at LIMIT 1"
    )
}

/// A reservation a taker took over ([`take_over`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TakeOver {
    /// The late holder: its reservation now falls due at `due`.
    pub holder: String,
    /// The slot the taker had reserved for itself.
    pub due: Timestamp,
}

/// Whether a taker that [`take`] has just reserved a new token for sends
/// on `late` instead (another holder's token, due and not used): then the
/// taker is granted and reserves nothing, and the late holder's
/// reservation moves to the slot the taker had reserved (so the bucket
/// changes as `plan` says, and every token is sent at most once, at most
/// the grace after its due time). Otherwise `plan` stands.
pub fn take_over(plan: RatePlan, late: Option<LateReservation>) -> (RatePlan, Option<TakeOver>) {
    match (plan.reserve, late) {
        (Some(due), Some(late)) => (
            RatePlan {
                reserve: None,
                answer: RateTake::Granted,
                ..plan
            },
            Some(TakeOver {
                holder: late.holder,
                due,
            }),
        ),
        (_, _) => (plan, None),
    }
}

/// The take of one token by `holder` at `now`, given the stored bucket (if
/// any) and the holder's reservation (if any), both read under the bucket's
/// lock.
pub fn take(
    bucket: Option<Bucket>,
    reservation: Option<Timestamp>,
    limit: &RateLimit,
    now: Timestamp,
) -> RatePlan {
    match reservation {
        Some(due) if due > now => {
            return RatePlan {
                bucket: None,
                delete_reservation: false,
                reserve: None,
                gc_before: None,
                answer: RateTake::Deferred { until: due },
            }
        }
        Some(due) if now.millis_since(due) <= grace_ms(limit) => {
            return RatePlan {
                bucket: None,
                delete_reservation: true,
                reserve: None,
                gc_before: None,
                answer: RateTake::Granted,
            }
        }
        _ => {}
    }
    let stale = reservation.is_some();
    let (b, t) = rate::take(bucket, limit, now);
    match t {
        Take::Granted => RatePlan {
            bucket: Some(b),
            delete_reservation: stale,
            reserve: None,
            gc_before: None,
            answer: RateTake::Granted,
        },
        Take::Reserved(due) => RatePlan {
            bucket: Some(b),
            delete_reservation: stale,
            reserve: Some(due),
            gc_before: Some(now.plus_millis(-RESERVATION_GC_MS)),
            answer: RateTake::Deferred { until: due },
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: Timestamp = Timestamp(1_000_000);

    #[test]
    fn a_reservation_is_used_once_at_its_time() {
        let l = RateLimit::new(10.0, 1).unwrap();
        let first = take(None, None, &l, T0);
        assert_eq!(first.answer, RateTake::Granted);
        let second = take(first.bucket, None, &l, T0);
        let due = T0.plus_millis(100);
        assert_eq!(second.answer, RateTake::Deferred { until: due });
        assert_eq!(second.reserve, Some(due));
        // Too early: still deferred, nothing written.
        let early = take(second.bucket, Some(due), &l, T0.plus_millis(50));
        assert_eq!(
            (early.answer, early.bucket, early.delete_reservation),
            (RateTake::Deferred { until: due }, None, false)
        );
        // At its time: granted on the reserved token, the bucket untouched.
        let on_time = take(second.bucket, Some(due), &l, due.plus_millis(30));
        assert_eq!(
            (on_time.answer, on_time.bucket, on_time.delete_reservation),
            (RateTake::Granted, None, true)
        );
    }

    /// A token whose holder is late is sent by the next taker that finds
    /// the bucket empty, from half the grace after its due time to the
    /// grace; the late holder gets the slot that taker reserved.
    #[test]
    fn a_late_holders_token_goes_to_the_next_taker() {
        let l = RateLimit::new(20.0, 5).unwrap();
        assert_eq!(grace_ms(&l), 250);
        let now = T0.plus_millis(1_000);
        // The bucket is 10 tokens in debt: a new taker reserves 550 ms on.
        let b = Bucket {
            tokens: -10 * docket_core::rate::TOKEN,
            refilled_at: now,
        };
        let fresh = take(Some(b), None, &l, now);
        let slot = now.plus_millis(550);
        assert_eq!(fresh.answer, RateTake::Deferred { until: slot });
        assert_eq!(
            takeover_window(&fresh, &l, now),
            Some((T0.plus_millis(750), T0.plus_millis(875)))
        );
        let late = LateReservation {
            holder: "late".into(),
            due: T0.plus_millis(800),
        };
        let (p, moved) = take_over(fresh.clone(), Some(late));
        assert_eq!(p.answer, RateTake::Granted);
        assert_eq!(
            (p.reserve, p.bucket),
            (None, fresh.bucket),
            "one slot taken, as before"
        );
        assert_eq!(
            moved,
            Some(TakeOver {
                holder: "late".into(),
                due: slot
            })
        );
        // No late token: the reservation stands.
        assert_eq!(take_over(fresh.clone(), None), (fresh, None));
        // A grant, or a holder told to come back, takes nothing over.
        let granted = take(None, None, &l, now);
        assert_eq!(takeover_window(&granted, &l, now), None, "nothing to read");
        let late = LateReservation {
            holder: "late".into(),
            due: T0.plus_millis(800),
        };
        assert_eq!(take_over(granted.clone(), Some(late)).1, None);
    }

    #[test]
    fn a_reservation_past_its_grace_takes_afresh() {
        let l = RateLimit::new(10.0, 2).unwrap();
        assert_eq!(grace_ms(&l), 200);
        let b = Bucket {
            tokens: -docket_core::rate::TOKEN,
            refilled_at: T0,
        };
        let late = take(Some(b), Some(T0.plus_millis(100)), &l, T0.plus_millis(301));
        // 301 ms refilled 3.01 tokens on a debt of 1: granted, reservation gone.
        assert_eq!(late.answer, RateTake::Granted);
        assert!(late.delete_reservation && late.bucket.is_some());
    }
}
