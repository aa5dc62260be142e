//! Token buckets: the arithmetic of rate limits, as pure functions.
//!
//! A bucket holds up to `burst` tokens and gains `per_second` tokens a
//! second. A run (or an HTTP request) takes one token. When none is left,
//! the taker does not fail and does not poll: it *reserves* the next token,
//! which drives the bucket below zero, and is told the instant that token is
//! due ([`take`] answers [`Take::Reserved`]). So several takers queue up in
//! the bucket itself, each with its own due time, and the tokens granted and
//! reserved together never exceed `burst + per_second · t` in any window of
//! length `t`, give or take the millisecond a due time is rounded up to (the
//! property test `never_more_than_burst_plus_rate` checks it). This is the token bucket written as GCRA (the "generic cell rate
//! algorithm"), with an exact integer state.
//!
//! Tokens are counted in nano-tokens ([`TOKEN`] per token) and time in
//! milliseconds, so the refill of `per_second` tokens a second is an
//! integer number of nano-tokens per millisecond and nothing is rounded
//! except the rate itself (to 0.000001 tokens a second) and a due time (up to
//! the next millisecond).
//!
//! Time is a parameter: a bucket is refilled only forwards, so a caller
//! whose clock runs behind the bucket's last refill neither loses nor gains
//! tokens.

use crate::Timestamp;
use serde::{Deserialize, Serialize};

/// Nano-tokens per token.
pub const TOKEN: i64 = 1_000_000_000;

/// The highest rate accepted, in tokens a second.
pub const MAX_PER_SECOND: f64 = 1_000_000.0;

/// The largest burst accepted.
pub const MAX_BURST: u32 = 1_000_000;

/// A rate limit: `per_second` tokens a second, at most `burst` at once.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct RateLimit {
    /// Tokens gained per second (> 0).
    pub per_second: f64,
    /// The bucket's capacity: how many takes may happen at once (≥ 1).
    pub burst: u32,
}

/// A rate limit that cannot be used, naming the field at fault.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct InvalidRateLimit {
    /// `per_second` or `burst`.
    pub field: &'static str,
    /// What is wrong with it.
    pub problem: String,
}

impl RateLimit {
    /// A checked rate limit: `per_second` must be a number from 0.000001 to
    /// [`MAX_PER_SECOND`], `burst` from 1 to [`MAX_BURST`].
    pub fn new(per_second: f64, burst: u32) -> Result<RateLimit, InvalidRateLimit> {
        let limit = RateLimit { per_second, burst };
        limit.validate()?;
        Ok(limit)
    }

    /// Checks the numbers (for values built or deserialized directly).
    pub fn validate(&self) -> Result<(), InvalidRateLimit> {
        if !self.per_second.is_finite() || self.per_second <= 0.0 {
            return Err(InvalidRateLimit {
                field: "per_second",
                problem: format!("must be a positive number, got {}", self.per_second),
            });
        }
        if self.per_second > MAX_PER_SECOND {
            return Err(InvalidRateLimit {
                field: "per_second",
                problem: format!("must be at most {MAX_PER_SECOND}, got {}", self.per_second),
            });
        }
        if self.per_ms() < 1 {
            return Err(InvalidRateLimit {
                field: "per_second",
                problem: format!("must be at least 0.000001, got {}", self.per_second),
            });
        }
        if self.burst == 0 || self.burst > MAX_BURST {
            return Err(InvalidRateLimit {
                field: "burst",
                problem: format!("must be from 1 to {MAX_BURST}, got {}", self.burst),
            });
        }
        Ok(())
    }

    /// Nano-tokens gained per millisecond.
    pub fn per_ms(&self) -> i64 {
        // per_second · TOKEN / 1000; bounded by MAX_PER_SECOND · 1e6 = 1e12.
        (self.per_second * 1_000_000.0).round() as i64
    }

    /// The capacity in nano-tokens.
    pub fn capacity(&self) -> i64 {
        i64::from(self.burst) * TOKEN
    }
}

/// A bucket's stored state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bucket {
    /// Nano-tokens left at `refilled_at`; negative when tokens are reserved
    /// ahead (each reservation is one [`TOKEN`] of debt).
    pub tokens: i64,
    /// When `tokens` was last brought up to date.
    pub refilled_at: Timestamp,
}

/// What a take did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Take {
    /// A token was taken: go ahead now.
    Granted,
    /// No token was left: the next one is reserved for this taker and is
    /// due at this instant (go ahead then, without taking another).
    Reserved(Timestamp),
}

/// The bucket brought up to `now`: a bucket never used is full; otherwise it
/// gains `per_ms` nano-tokens for each millisecond since its last refill, up
/// to its capacity. A `now` before the last refill (another process's clock
/// ahead of ours) adds nothing and keeps the later instant.
pub fn refill(bucket: Option<Bucket>, limit: &RateLimit, now: Timestamp) -> Bucket {
    let Some(b) = bucket else {
        return Bucket {
            tokens: limit.capacity(),
            refilled_at: now,
        };
    };
    if now <= b.refilled_at {
        // A lower limit than the stored bucket was filled under caps it.
        return Bucket {
            tokens: b.tokens.min(limit.capacity()),
            refilled_at: b.refilled_at,
        };
    }
    let gained = now
        .millis_since(b.refilled_at)
        .saturating_mul(limit.per_ms());
    Bucket {
        tokens: b.tokens.saturating_add(gained).min(limit.capacity()),
        refilled_at: now,
    }
}

/// Takes one token at `now`, or reserves the next one: the new bucket and
/// what happened. A reserved token's due time is the first millisecond at
/// which the bucket, refilled, would hold it.
pub fn take(bucket: Option<Bucket>, limit: &RateLimit, now: Timestamp) -> (Bucket, Take) {
    let mut b = refill(bucket, limit, now);
    b.tokens = b.tokens.saturating_sub(TOKEN);
    if b.tokens >= 0 {
        return (b, Take::Granted);
    }
    let per_ms = limit.per_ms().max(1);
    let wait = (-b.tokens + per_ms - 1) / per_ms;
    (b, Take::Reserved(b.refilled_at.plus_millis(wait)))
}

/// Whole tokens left at `now` (0 when tokens are reserved ahead), and when
/// the next token is due if none is left: what operators see.
pub fn status(bucket: Option<Bucket>, limit: &RateLimit, now: Timestamp) -> (u64, Timestamp) {
    let b = refill(bucket, limit, now);
    if b.tokens >= TOKEN {
        return ((b.tokens / TOKEN) as u64, now);
    }
    let per_ms = limit.per_ms().max(1);
    let wait = (TOKEN - b.tokens + per_ms - 1) / per_ms;
    (0, b.refilled_at.plus_millis(wait))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const T0: Timestamp = Timestamp(1_000_000);

    fn limit(per_second: f64, burst: u32) -> RateLimit {
        RateLimit::new(per_second, burst).unwrap()
    }

    #[test]
    fn bad_limits_name_the_field() {
        for (r, b, field) in [
            (0.0, 5, "per_second"),
            (-1.0, 5, "per_second"),
            (f64::NAN, 5, "per_second"),
            (1e-9, 5, "per_second"),
            (2e6, 5, "per_second"),
            (20.0, 0, "burst"),
        ] {
            assert_eq!(RateLimit::new(r, b).unwrap_err().field, field, "{r} {b}");
        }
        assert!(RateLimit::new(0.5, 1).is_ok());
    }

    #[test]
    fn a_burst_then_one_token_every_interval() {
        let l = limit(20.0, 5);
        let mut b = None;
        let mut answers = Vec::new();
        for _ in 0..8 {
            let (nb, t) = take(b, &l, T0);
            b = Some(nb);
            answers.push(t);
        }
        assert_eq!(answers[..5], [Take::Granted; 5]);
        assert_eq!(
            answers[5..],
            [
                Take::Reserved(T0.plus_millis(50)),
                Take::Reserved(T0.plus_millis(100)),
                Take::Reserved(T0.plus_millis(150)),
            ]
        );
        // At 150 ms the three reserved tokens are paid for, none is left.
        assert_eq!(
            take(b, &l, T0.plus_millis(150)).1,
            Take::Reserved(T0.plus_millis(200))
        );
        assert_eq!(status(b, &l, T0.plus_millis(150)), (0, T0.plus_millis(200)));
        // A full second later the bucket is full again, not fuller.
        assert_eq!(status(b, &l, T0.plus_millis(10_000)).0, 5);
    }

    #[test]
    fn a_clock_behind_the_bucket_gains_nothing() {
        let l = limit(10.0, 1);
        let (b, _) = take(None, &l, T0);
        let (b2, t) = take(Some(b), &l, T0.plus_millis(-500));
        assert_eq!(t, Take::Reserved(T0.plus_millis(100)));
        assert_eq!(b2.refilled_at, T0);
    }

    #[test]
    fn slow_rates_round_due_times_up() {
        let l = limit(3.0, 1);
        let (b, _) = take(None, &l, T0);
        // 1/3 s = 333.33 ms: the token is whole at 334 ms, not 333.
        assert_eq!(take(Some(b), &l, T0).1, Take::Reserved(T0.plus_millis(334)));
    }

    proptest! {
        /// However takers arrive, the instants at which they may go ahead
        /// (now, or their reserved due time) never exceed burst + rate · t in
        /// any window of t milliseconds (t + 1 ms: due times are whole
        /// milliseconds, rounded up); and a reserved due time is the
        /// earliest such instant (one millisecond earlier the token was not
        /// there).
        #[test]
        fn never_more_than_burst_plus_rate(
            per_second in 0.5f64..200.0,
            burst in 1u32..10,
            gaps in proptest::collection::vec(0i64..200, 1..120),
        ) {
            let l = limit(per_second, burst);
            let mut b = None;
            let mut now = T0;
            let mut go = Vec::new();
            for g in gaps {
                now = now.plus_millis(g);
                let before = b;
                let (nb, t) = take(b, &l, now);
                b = Some(nb);
                match t {
                    Take::Granted => go.push(now),
                    Take::Reserved(due) => {
                        prop_assert!(due > now);
                        // The token was not whole a millisecond earlier.
                        let early = refill(before, &l, due.plus_millis(-1));
                        prop_assert!(early.tokens < TOKEN || early.refilled_at > due.plus_millis(-1));
                        go.push(due);
                    }
                }
            }
            go.sort();
            for i in 0..go.len() {
                for j in i..go.len() {
                    let span = go[j].millis_since(go[i]);
                    // Due times are rounded up to the millisecond, so two of
                    // them can be up to 1 ms closer than the exact instants.
                    let allowed = i64::from(burst) + ((span + 1) * l.per_ms()) / TOKEN;
                    prop_assert!((j - i + 1) as i64 <= allowed,
                        "{} takes within {} ms, allowed {}", j - i + 1, span, allowed);
                }
            }
        }

        /// A bucket never holds more than its capacity, and a taker that
        /// waits long enough always gets a token at once.
        #[test]
        fn capacity_holds_and_waiting_pays(
            per_second in 0.5f64..200.0,
            burst in 1u32..10,
            takes in 0usize..30,
        ) {
            let l = limit(per_second, burst);
            let mut b = None;
            let mut last = Take::Granted;
            for _ in 0..takes {
                let (nb, t) = take(b, &l, T0);
                b = Some(nb);
                last = t;
            }
            prop_assert!(refill(b, &l, T0.plus_millis(1 << 40)).tokens <= l.capacity());
            let at = match last { Take::Reserved(due) => due, Take::Granted => T0 };
            // After the last reservation's due time plus one token's interval,
            // a new take is granted.
            let interval = (TOKEN + l.per_ms() - 1) / l.per_ms();
            prop_assert_eq!(take(b, &l, at.plus_millis(interval)).1, Take::Granted);
        }
    }
}
