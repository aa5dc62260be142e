//! The retry policy and the ONE function that decides every retry.

use crate::{stable_hash, ErrorClass, RunId, TerminalReason, Timestamp};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A named, explicit retry policy.
///
/// `delay = min(base · multiplier^(attempt−1), max) + jitter`, where jitter is
/// `stable_hash(run id, attempt) mod jitter_ms`: deterministic, so tests can
/// assert it exactly, and spread, so runs that failed together do not retry
/// together.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RetryPolicy {
    /// The name stored with every decision (`retry_policy`).
    pub name: String,
    /// Delay before the second attempt, in milliseconds.
    pub base_delay_ms: u64,
    /// Growth factor per attempt (≥ 1).
    pub multiplier: f64,
    /// Cap on the computed delay (jitter is added on top).
    pub max_delay_ms: u64,
    /// Attempts allowed in all, the first included (≥ 1).
    pub max_attempts: u32,
    /// Width of the jitter window in milliseconds; 0 disables jitter.
    pub jitter_ms: u64,
    /// Per-class changes to the above.
    pub overrides: BTreeMap<ErrorClass, ClassOverride>,
}

/// Changes to a policy for one error class.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClassOverride {
    /// Retry this class or not, overriding [`ErrorClass::is_retryable`].
    pub retry: Option<bool>,
    /// Replaces [`RetryPolicy::base_delay_ms`].
    pub base_delay_ms: Option<u64>,
    /// Replaces [`RetryPolicy::multiplier`].
    pub multiplier: Option<f64>,
    /// Replaces [`RetryPolicy::max_delay_ms`].
    pub max_delay_ms: Option<u64>,
    /// Replaces [`RetryPolicy::max_attempts`].
    pub max_attempts: Option<u32>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            name: "default".into(),
            base_delay_ms: 1_000,
            multiplier: 2.0,
            max_delay_ms: 5 * 60 * 1_000,
            max_attempts: 5,
            jitter_ms: 1_000,
            overrides: BTreeMap::new(),
        }
    }
}

/// A policy that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("retry policy `{policy}`: {problem}")]
pub struct InvalidPolicy {
    /// The policy's name.
    pub policy: String,
    /// What is wrong.
    pub problem: String,
}

impl RetryPolicy {
    /// A policy that never retries.
    pub fn no_retry() -> Self {
        RetryPolicy {
            name: "no_retry".into(),
            max_attempts: 1,
            ..Self::default()
        }
    }

    /// Checks the numbers make sense.
    pub fn validate(&self) -> Result<(), InvalidPolicy> {
        let bad = |problem: String| InvalidPolicy {
            policy: self.name.clone(),
            problem,
        };
        if self.max_attempts == 0 {
            return Err(bad("max_attempts must be at least 1".into()));
        }
        if !(self.multiplier.is_finite() && self.multiplier >= 1.0) {
            return Err(bad(format!(
                "multiplier must be ≥ 1, got {}",
                self.multiplier
            )));
        }
        if self.max_delay_ms < self.base_delay_ms {
            return Err(bad(format!(
                "max_delay_ms ({}) is below base_delay_ms ({})",
                self.max_delay_ms, self.base_delay_ms
            )));
        }
        for (what, v) in [
            ("base_delay_ms", self.base_delay_ms),
            ("max_delay_ms", self.max_delay_ms),
            ("jitter_ms", self.jitter_ms),
        ] {
            if v > MAX_DELAY_MS {
                return Err(bad(format!(
                    "{what} ({v}) is over {MAX_DELAY_MS} ms (100 years): a retry time must stay within 9999-12-31"
                )));
            }
        }
        for (class, o) in &self.overrides {
            for (what, v) in [
                ("base_delay_ms", o.base_delay_ms),
                ("max_delay_ms", o.max_delay_ms),
            ] {
                if v.is_some_and(|v| v > MAX_DELAY_MS) {
                    return Err(bad(format!(
                        "override for {class}: {what} is over {MAX_DELAY_MS} ms (100 years)"
                    )));
                }
            }
            if o.max_attempts == Some(0) {
                return Err(bad(format!(
                    "override for {class}: max_attempts must be at least 1"
                )));
            }
            if let Some(m) = o.multiplier {
                if !(m.is_finite() && m >= 1.0) {
                    return Err(bad(format!("override for {class}: multiplier must be ≥ 1")));
                }
            }
        }
        Ok(())
    }

    fn resolved(&self, class: ErrorClass) -> Resolved {
        let o = self.overrides.get(&class).cloned().unwrap_or_default();
        Resolved {
            retry: o.retry.unwrap_or(class.is_retryable()),
            base: o.base_delay_ms.unwrap_or(self.base_delay_ms),
            multiplier: o.multiplier.unwrap_or(self.multiplier),
            max: o.max_delay_ms.unwrap_or(self.max_delay_ms),
            max_attempts: o.max_attempts.unwrap_or(self.max_attempts),
        }
    }

    /// The backoff part of the delay after failed attempt `attempt` (1-based),
    /// without jitter: `min(base · multiplier^(attempt−1), max)`.
    pub fn backoff_ms(&self, class: ErrorClass, attempt: u32) -> u64 {
        self.resolved(class).backoff(attempt)
    }

    /// The deterministic jitter for (run, attempt): `hash mod jitter_ms`.
    pub fn jitter_for(&self, run_id: RunId, attempt: u32) -> u64 {
        if self.jitter_ms == 0 {
            return 0;
        }
        stable_hash(&[run_id.0.as_bytes(), &attempt.to_le_bytes()]) % self.jitter_ms
    }

    /// Decides what happens after a failed attempt. This is the only place a
    /// retry is chosen.
    pub fn decide(&self, f: &FailureInput) -> Decision {
        if f.class == ErrorClass::Duplicate {
            return Decision::CompleteDuplicate;
        }
        let r = self.resolved(f.class);
        if !r.retry {
            let reason = f
                .class
                .terminal_reason()
                .unwrap_or(TerminalReason::PermanentError);
            return Decision::Stop {
                reason,
                detail: format!("{} is not retryable under policy `{}`", f.class, self.name),
            };
        }
        if f.attempt >= r.max_attempts {
            return Decision::Stop {
                reason: TerminalReason::MaxRetriesExhausted,
                detail: format!(
                    "{} on attempt {} of {} allowed by policy `{}`",
                    f.class, f.attempt, r.max_attempts, self.name
                ),
            };
        }
        let backoff = r.backoff(f.attempt);
        let jitter = self.jitter_for(f.run_id, f.attempt);
        let computed = backoff.saturating_add(jitter);
        let computed_at = f.now.plus_millis(computed as i64);
        let (at, reason) = match f.retry_after {
            Some(reset) if reset > computed_at => (reset, RetryReason::RetryAfter),
            _ => (computed_at, RetryReason::Backoff),
        };
        Decision::Retry {
            at,
            delay_ms: at.millis_since(f.now).max(0) as u64,
            backoff_ms: backoff,
            jitter_ms: jitter,
            reason,
            policy: self.name.clone(),
            next_attempt: f.attempt + 1,
        }
    }
}

struct Resolved {
    retry: bool,
    base: u64,
    multiplier: f64,
    max: u64,
    max_attempts: u32,
}

impl Resolved {
    fn backoff(&self, attempt: u32) -> u64 {
        let exp = attempt.saturating_sub(1).min(1_000) as i32;
        let raw = self.base as f64 * self.multiplier.powi(exp);
        if !raw.is_finite() || raw >= self.max as f64 {
            self.max
        } else {
            raw as u64
        }
    }
}

/// What the policy is told about a failure.
#[derive(Clone, Debug, PartialEq)]
pub struct FailureInput {
    /// The failure's class.
    pub class: ErrorClass,
    /// The attempt that failed (1-based).
    pub attempt: u32,
    /// The run, for deterministic jitter.
    pub run_id: RunId,
    /// When the failure was recorded (from the injected clock).
    pub now: Timestamp,
    /// A known reset time (Retry-After), if the failure carried one.
    pub retry_after: Option<Timestamp>,
}

/// The longest delay a policy may choose, 100 years (the API's bound for
/// `delay_ms` too): every time Docket computes stays RFC 3339-renderable.
pub const MAX_DELAY_MS: u64 = 3_155_760_000_000;

/// Why a retry waits as long as it does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RetryReason {
    /// The policy's exponential backoff plus jitter.
    Backoff,
    /// A provider's reset time, later than the computed backoff.
    RetryAfter,
    /// A circuit breaker is open until its reset time (no attempt consumed).
    CircuitOpen,
    /// Another attempt holds the action's idempotency key with a live lease:
    /// its request may be in flight, so this run waits for its outcome
    /// instead of sending (no attempt consumed).
    ActionInFlight,
    /// A rate limit's bucket had no token: the run waits for the token it
    /// reserved (no attempt consumed).
    RateLimited,
}

impl RetryReason {
    /// The snake_case name stored in the database.
    pub const fn as_str(self) -> &'static str {
        match self {
            RetryReason::Backoff => "backoff",
            RetryReason::RetryAfter => "retry_after",
            RetryReason::CircuitOpen => "circuit_open",
            RetryReason::ActionInFlight => "action_in_flight",
            RetryReason::RateLimited => "rate_limited",
        }
    }

    /// Whether this reason marks a deferral: nothing was sent, so the
    /// attempt is `deferred` (not a failure) and spends no budget.
    pub const fn is_deferral(self) -> bool {
        matches!(
            self,
            RetryReason::CircuitOpen | RetryReason::ActionInFlight | RetryReason::RateLimited
        )
    }

    /// Every reason.
    pub const ALL: [RetryReason; 5] = [
        RetryReason::Backoff,
        RetryReason::RetryAfter,
        RetryReason::CircuitOpen,
        RetryReason::ActionInFlight,
        RetryReason::RateLimited,
    ];
}

impl std::fmt::Display for RetryReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for RetryReason {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        RetryReason::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("unknown retry reason `{s}`"))
    }
}

/// The policy's answer.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// Try again, not before `at`.
    Retry {
        /// When the run becomes eligible again (`run_after`, `eligible_at`).
        at: Timestamp,
        /// `at − now`.
        delay_ms: u64,
        /// The exponential part of the delay.
        backoff_ms: u64,
        /// The deterministic jitter part of the delay.
        jitter_ms: u64,
        /// Why this long.
        reason: RetryReason,
        /// The policy's name.
        policy: String,
        /// The number the next attempt will carry.
        next_attempt: u32,
    },
    /// Do not retry; fail the run with `reason`.
    Stop {
        /// The terminal reason.
        reason: TerminalReason,
        /// A sentence saying why.
        detail: String,
    },
    /// The side effect was already done: complete the run.
    CompleteDuplicate,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn input(class: ErrorClass, attempt: u32) -> FailureInput {
        FailureInput {
            class,
            attempt,
            run_id: RunId(uuid::Uuid::from_u128(42)),
            now: Timestamp(1_000_000),
            retry_after: None,
        }
    }

    fn policy() -> RetryPolicy {
        RetryPolicy {
            name: "p".into(),
            base_delay_ms: 100,
            multiplier: 2.0,
            max_delay_ms: 1_000,
            max_attempts: 6,
            jitter_ms: 0,
            overrides: BTreeMap::new(),
        }
    }

    #[test]
    fn exponential_then_capped() {
        let p = policy();
        let delays: Vec<u64> = (1..=5)
            .map(|a| match p.decide(&input(ErrorClass::Timeout, a)) {
                Decision::Retry { delay_ms, .. } => delay_ms,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(delays, [100, 200, 400, 800, 1_000]);
    }

    #[test]
    fn stops_at_max_attempts_with_reason() {
        let d = policy().decide(&input(ErrorClass::Unavailable, 6));
        assert!(matches!(
            d,
            Decision::Stop {
                reason: TerminalReason::MaxRetriesExhausted,
                ..
            }
        ));
    }

    #[test]
    fn permanent_classes_stop_at_once() {
        let d = policy().decide(&input(ErrorClass::InvalidInput, 1));
        assert!(matches!(
            d,
            Decision::Stop {
                reason: TerminalReason::InvalidInput,
                ..
            }
        ));
        let d = policy().decide(&input(ErrorClass::NotFound, 1));
        assert!(matches!(
            d,
            Decision::Stop {
                reason: TerminalReason::PermanentError,
                ..
            }
        ));
        assert_eq!(
            policy().decide(&input(ErrorClass::Duplicate, 1)),
            Decision::CompleteDuplicate
        );
    }

    #[test]
    fn retry_after_wins_only_when_later() {
        let p = policy();
        let mut f = input(ErrorClass::RateLimited, 1);
        f.retry_after = Some(f.now.plus_millis(5_000));
        match p.decide(&f) {
            Decision::Retry {
                delay_ms, reason, ..
            } => {
                assert_eq!(delay_ms, 5_000);
                assert_eq!(reason, RetryReason::RetryAfter);
            }
            other => panic!("{other:?}"),
        }
        f.retry_after = Some(f.now.plus_millis(10));
        match p.decide(&f) {
            Decision::Retry {
                delay_ms, reason, ..
            } => {
                assert_eq!(delay_ms, 100);
                assert_eq!(reason, RetryReason::Backoff);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn overrides_apply_per_class() {
        let mut p = policy();
        p.overrides.insert(
            ErrorClass::RateLimited,
            ClassOverride {
                base_delay_ms: Some(700),
                max_attempts: Some(2),
                ..Default::default()
            },
        );
        p.overrides.insert(
            ErrorClass::NotFound,
            ClassOverride {
                retry: Some(true),
                ..Default::default()
            },
        );
        assert!(matches!(
            p.decide(&input(ErrorClass::RateLimited, 1)),
            Decision::Retry { delay_ms: 700, .. }
        ));
        assert!(matches!(
            p.decide(&input(ErrorClass::RateLimited, 2)),
            Decision::Stop { .. }
        ));
        assert!(matches!(
            p.decide(&input(ErrorClass::NotFound, 1)),
            Decision::Retry { .. }
        ));
    }

    #[test]
    fn jitter_is_pinned() {
        // The exact value is part of the contract: tests and dashboards may
        // depend on it, so a change of hash must be deliberate.
        let p = RetryPolicy {
            jitter_ms: 1_000,
            ..policy()
        };
        let run = RunId(uuid::Uuid::from_u128(42));
        let j1 = p.jitter_for(run, 1);
        assert_eq!(j1, p.jitter_for(run, 1));
        assert!(j1 < 1_000);
        assert_ne!(
            (1..=8).map(|a| p.jitter_for(run, a)).collect::<Vec<_>>(),
            vec![j1; 8],
            "jitter must vary with the attempt"
        );
    }

    #[test]
    fn validation_names_the_problem() {
        let p = RetryPolicy {
            max_attempts: 0,
            ..policy()
        };
        assert_eq!(
            p.validate().unwrap_err().to_string(),
            "retry policy `p`: max_attempts must be at least 1"
        );
        let p = RetryPolicy {
            multiplier: 0.5,
            ..policy()
        };
        assert!(p.validate().unwrap_err().to_string().contains("multiplier"));
        assert!(policy().validate().is_ok());
    }

    fn any_policy() -> impl Strategy<Value = RetryPolicy> {
        (
            0u64..10_000,
            1.0f64..4.0,
            0u64..100_000,
            1u32..20,
            0u64..5_000,
        )
            .prop_map(|(base, mult, extra, max_attempts, jitter)| RetryPolicy {
                name: "prop".into(),
                base_delay_ms: base,
                multiplier: mult,
                max_delay_ms: base + extra,
                max_attempts,
                jitter_ms: jitter,
                overrides: BTreeMap::new(),
            })
    }

    proptest! {
        #[test]
        fn backoff_is_non_decreasing_up_to_the_cap(p in any_policy(), class in proptest::sample::select(ErrorClass::ALL.to_vec())) {
            let mut last = 0;
            for a in 1..=40 {
                let b = p.backoff_ms(class, a);
                prop_assert!(b >= last, "attempt {a}: {b} < {last}");
                prop_assert!(b <= p.max_delay_ms);
                last = b;
            }
        }

        #[test]
        fn jitter_stays_in_its_window_and_is_stable(p in any_policy(), id in any::<u128>(), attempt in 1u32..100) {
            let run = RunId(uuid::Uuid::from_u128(id));
            let j = p.jitter_for(run, attempt);
            prop_assert_eq!(j, p.jitter_for(run, attempt));
            if p.jitter_ms == 0 { prop_assert_eq!(j, 0); } else { prop_assert!(j < p.jitter_ms); }
        }

        #[test]
        fn never_more_attempts_than_the_maximum(p in any_policy(), id in any::<u128>(), now in 0i64..1_000_000_000) {
            let run = RunId(uuid::Uuid::from_u128(id));
            let mut attempt = 1;
            loop {
                let d = p.decide(&FailureInput { class: ErrorClass::Timeout, attempt, run_id: run, now: Timestamp(now), retry_after: None });
                match d {
                    Decision::Retry { at, delay_ms, next_attempt, .. } => {
                        prop_assert_eq!(next_attempt, attempt + 1);
                        prop_assert_eq!(at, Timestamp(now).plus_millis(delay_ms as i64));
                        prop_assert!(delay_ms >= p.backoff_ms(ErrorClass::Timeout, attempt));
                        prop_assert!(delay_ms < p.backoff_ms(ErrorClass::Timeout, attempt) + p.jitter_ms.max(1));
                        attempt = next_attempt;
                    }
                    Decision::Stop { reason, .. } => {
                        prop_assert_eq!(reason, TerminalReason::MaxRetriesExhausted);
                        break;
                    }
                    Decision::CompleteDuplicate => prop_assert!(false),
                }
                prop_assert!(attempt <= p.max_attempts);
            }
            prop_assert_eq!(attempt, p.max_attempts);
        }
    }
}
