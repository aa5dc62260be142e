//! Error classes and terminal reasons.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// What kind of failure an attempt met. The class, not the message, decides
/// whether the policy retries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorClass {
    /// The worker stopped waiting. Proves nothing about the remote side.
    Timeout,
    /// Connection refused or reset, DNS failure, socket hang-up.
    Network,
    /// HTTP 429 or a provider's quota; may carry a reset time.
    RateLimited,
    /// HTTP 502 / 503 / 504 or an overloaded dependency.
    Unavailable,
    /// The attempt's lease ran out before it reported back.
    LeaseExpired,
    /// The input cannot be processed (HTTP 400 / 422, schema failure).
    InvalidInput,
    /// The payload exceeds a limit.
    ContentTooLarge,
    /// A connection the job needs is disabled or its credentials expired.
    ConnectionUnresolved,
    /// HTTP 401 / 403.
    Unauthorized,
    /// HTTP 404.
    NotFound,
    /// Any other failure that retrying will not fix.
    Permanent,
    /// The side effect was already done: complete, do not retry.
    Duplicate,
}

impl ErrorClass {
    /// Every class, in declaration order.
    pub const ALL: [ErrorClass; 12] = [
        ErrorClass::Timeout,
        ErrorClass::Network,
        ErrorClass::RateLimited,
        ErrorClass::Unavailable,
        ErrorClass::LeaseExpired,
        ErrorClass::InvalidInput,
        ErrorClass::ContentTooLarge,
        ErrorClass::ConnectionUnresolved,
        ErrorClass::Unauthorized,
        ErrorClass::NotFound,
        ErrorClass::Permanent,
        ErrorClass::Duplicate,
    ];

    /// The snake_case name stored in the database and shown in the API.
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Timeout => "timeout",
            ErrorClass::Network => "network",
            ErrorClass::RateLimited => "rate_limited",
            ErrorClass::Unavailable => "unavailable",
            ErrorClass::LeaseExpired => "lease_expired",
            ErrorClass::InvalidInput => "invalid_input",
            ErrorClass::ContentTooLarge => "content_too_large",
            ErrorClass::ConnectionUnresolved => "connection_unresolved",
            ErrorClass::Unauthorized => "unauthorized",
            ErrorClass::NotFound => "not_found",
            ErrorClass::Permanent => "permanent",
            ErrorClass::Duplicate => "duplicate",
        }
    }

    /// Whether the default policy retries this class.
    pub const fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorClass::Timeout
                | ErrorClass::Network
                | ErrorClass::RateLimited
                | ErrorClass::Unavailable
                | ErrorClass::LeaseExpired
        )
    }

    /// The terminal reason recorded when a failure of this class ends a run
    /// without retrying. `None` for `duplicate`, which completes the run.
    pub const fn terminal_reason(self) -> Option<TerminalReason> {
        match self {
            ErrorClass::InvalidInput => Some(TerminalReason::InvalidInput),
            ErrorClass::ContentTooLarge => Some(TerminalReason::ContentTooLarge),
            ErrorClass::ConnectionUnresolved => Some(TerminalReason::ConnectionUnresolved),
            ErrorClass::Duplicate => None,
            _ => Some(TerminalReason::PermanentError),
        }
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An unknown error class name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown error class `{0}`; expected one of timeout, network, rate_limited, unavailable, lease_expired, invalid_input, content_too_large, connection_unresolved, unauthorized, not_found, permanent, duplicate")]
pub struct UnknownErrorClass(pub String);

impl FromStr for ErrorClass {
    type Err = UnknownErrorClass;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ErrorClass::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| UnknownErrorClass(s.to_string()))
    }
}

/// Why a run ended `failed`. Each names something an operator can act on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TerminalReason {
    /// The input failed validation: fix it and start a new run.
    InvalidInput,
    /// The payload exceeds a limit: split the work into smaller batches.
    ContentTooLarge,
    /// A connection was disabled or expired: re-authorize it, then retry.
    ConnectionUnresolved,
    /// A transient error persisted through every allowed attempt.
    MaxRetriesExhausted,
    /// A failure retrying cannot fix (401, 404, a permanent error).
    PermanentError,
    /// The handler ended without completing, postponing or asking for input.
    Unresolved,
    /// An operator rejected a needs-input request and the job ends on that.
    Rejected,
}

impl TerminalReason {
    /// Every reason.
    pub const ALL: [TerminalReason; 7] = [
        TerminalReason::InvalidInput,
        TerminalReason::ContentTooLarge,
        TerminalReason::ConnectionUnresolved,
        TerminalReason::MaxRetriesExhausted,
        TerminalReason::PermanentError,
        TerminalReason::Unresolved,
        TerminalReason::Rejected,
    ];

    /// The snake_case name stored in the database.
    pub const fn as_str(self) -> &'static str {
        match self {
            TerminalReason::InvalidInput => "invalid_input",
            TerminalReason::ContentTooLarge => "content_too_large",
            TerminalReason::ConnectionUnresolved => "connection_unresolved",
            TerminalReason::MaxRetriesExhausted => "max_retries_exhausted",
            TerminalReason::PermanentError => "permanent_error",
            TerminalReason::Unresolved => "unresolved",
            TerminalReason::Rejected => "rejected",
        }
    }

    /// What an operator should do about it.
    pub const fn advice(self) -> &'static str {
        match self {
            TerminalReason::InvalidInput => "fix the input data and start a new run",
            TerminalReason::ContentTooLarge => "split the work into smaller batches",
            TerminalReason::ConnectionUnresolved => {
                "re-authorize or enable the connection, then retry the run"
            }
            TerminalReason::MaxRetriesExhausted => {
                "check whether the external service is down; retry the run once it recovers"
            }
            TerminalReason::PermanentError => {
                "fix the cause named in the error, then retry or retrigger"
            }
            TerminalReason::Unresolved => "make the handler complete, postpone or ask for input",
            TerminalReason::Rejected => {
                "an operator rejected the request; retrigger if that was a mistake"
            }
        }
    }
}

impl fmt::Display for TerminalReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TerminalReason {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TerminalReason::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("unknown terminal reason `{s}`"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for c in ErrorClass::ALL {
            assert_eq!(c.as_str().parse::<ErrorClass>().unwrap(), c);
            assert_eq!(serde_json::to_value(c).unwrap(), c.as_str());
        }
        for r in TerminalReason::ALL {
            assert_eq!(r.as_str().parse::<TerminalReason>().unwrap(), r);
        }
        let err = "boom".parse::<ErrorClass>().unwrap_err();
        assert!(err.to_string().contains("`boom`"));
    }

    #[test]
    fn classes_split_as_designed() {
        let retryable: Vec<_> = ErrorClass::ALL
            .into_iter()
            .filter(|c| c.is_retryable())
            .collect();
        assert_eq!(
            retryable,
            [
                ErrorClass::Timeout,
                ErrorClass::Network,
                ErrorClass::RateLimited,
                ErrorClass::Unavailable,
                ErrorClass::LeaseExpired
            ]
        );
        assert_eq!(
            ErrorClass::NotFound.terminal_reason(),
            Some(TerminalReason::PermanentError)
        );
        assert_eq!(ErrorClass::Duplicate.terminal_reason(), None);
    }
}
