//! Connection states: whether an operator disabled a named connection or
//! marked its credentials expired.
//!
//! A connection (a base URL and credentials, declared in `docket.toml`) is
//! usable unless its state says otherwise: no row means `enabled`. Only the
//! state is stored — credentials never are. Every change writes an audit row
//! (who, when, from which status to which, with the comment) in the same
//! transaction as the change, so the state and its history cannot disagree.
//! Stored in the database, the state survives restarts and is shared by
//! every process using the store.

use crate::Result;
use async_trait::async_trait;
use docket_core::Timestamp;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Whether a connection may be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnectionStatus {
    /// Usable (the state of a connection that was never changed).
    Enabled,
    /// Switched off by an operator: runs that need it fail
    /// `connection_unresolved` before any request.
    Disabled,
    /// Its credentials were marked expired: runs that need it fail
    /// `connection_unresolved` until it is re-authorized (enabled).
    Expired,
}

impl ConnectionStatus {
    /// Every status.
    pub const ALL: [ConnectionStatus; 3] = [
        ConnectionStatus::Enabled,
        ConnectionStatus::Disabled,
        ConnectionStatus::Expired,
    ];

    /// The snake_case name stored in the database.
    pub const fn as_str(self) -> &'static str {
        match self {
            ConnectionStatus::Enabled => "enabled",
            ConnectionStatus::Disabled => "disabled",
            ConnectionStatus::Expired => "expired",
        }
    }

    /// True when runs may use the connection.
    pub const fn is_usable(self) -> bool {
        matches!(self, ConnectionStatus::Enabled)
    }
}

impl fmt::Display for ConnectionStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ConnectionStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ConnectionStatus::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| {
                format!("unknown connection status `{s}`; expected enabled, disabled or expired")
            })
    }
}

/// The stored state of one connection of one tenant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionState {
    /// The tenant the connection belongs to.
    pub tenant: String,
    /// The connection's name (as in `docket.toml`).
    pub name: String,
    /// Its status.
    pub status: ConnectionStatus,
    /// When it was last changed.
    pub updated_at: Timestamp,
    /// Who changed it last.
    pub updated_by: String,
    /// Their comment.
    pub comment: Option<String>,
}

/// A change of a connection's status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectionChange {
    /// The tenant.
    pub tenant: String,
    /// The connection's name.
    pub name: String,
    /// The new status.
    pub status: ConnectionStatus,
    /// Who makes the change (stored on the state and the audit row).
    pub actor: String,
    /// Why (stored on the state and the audit row).
    pub comment: Option<String>,
    /// When (from the injected clock).
    pub now: Timestamp,
}

/// One audited change of a connection's status.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionAudit {
    /// Its id, increasing with time.
    pub id: i64,
    /// The tenant.
    pub tenant: String,
    /// The connection's name.
    pub name: String,
    /// The status before the change (`enabled` for a connection never
    /// changed before).
    pub from_status: ConnectionStatus,
    /// The status after it.
    pub to_status: ConnectionStatus,
    /// Who made it.
    pub actor: String,
    /// Their comment.
    pub comment: Option<String>,
    /// When.
    pub at: Timestamp,
}

/// Storage of connection states and their audit trail. A supertrait of
/// [`Store`](crate::Store), so every backend implements it and a `DynStore`
/// offers it.
#[async_trait]
pub trait ConnectionStore: Send + Sync {
    /// The stored state of a connection; `None` when it was never changed
    /// (which means `enabled`).
    async fn connection_state(
        &self,
        tenant: String,
        name: String,
    ) -> Result<Option<ConnectionState>>;

    /// Stored states of one tenant or of all, by (tenant, name).
    async fn list_connection_states(&self, tenant: Option<String>) -> Result<Vec<ConnectionState>>;

    /// Sets a connection's status and writes its audit row, in one
    /// transaction. A change to the status it already has is stored and
    /// audited too (e.g. a re-authorization recorded as `enabled` again).
    /// Returns the new state.
    async fn set_connection_status(&self, change: ConnectionChange) -> Result<ConnectionState>;

    /// The audit trail of a connection, oldest first.
    async fn connection_audit(&self, tenant: String, name: String) -> Result<Vec<ConnectionAudit>>;
}
