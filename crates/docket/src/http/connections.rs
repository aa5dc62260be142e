//! Connections: a named base URL, credentials read from the environment or
//! a secrets file at request time (never stored in the database, never
//! logged, never put in an event), a circuit breaker, and a state
//! (`enabled` / `disabled` / `expired`) kept in the store per tenant.

use super::breaker::{BreakerConfig, BreakerState};
use docket_store::{ConnectionState, ConnectionStatus};
use reqwest::header::{HeaderName, HeaderValue, AUTHORIZATION};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Where a credential comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum SecretSource {
    /// An environment variable, by name.
    Env(String),
    /// A key of a flat TOML or JSON map in a file (`.json` → JSON, else
    /// TOML).
    File { path: PathBuf, key: String },
}

impl SecretSource {
    fn describe(&self) -> String {
        match self {
            SecretSource::Env(v) => format!("environment variable {v}"),
            SecretSource::File { path, key } => {
                format!("key `{key}` of secrets file {}", path.display())
            }
        }
    }

    /// The secret, or why it is not there (never the value itself).
    fn resolve(&self) -> Result<String, String> {
        let v = match self {
            SecretSource::Env(var) => {
                std::env::var(var).map_err(|_| format!("{} is not set", self.describe()))?
            }
            SecretSource::File { path, key } => read_secrets(path)?
                .remove(key)
                .ok_or_else(|| format!("{} is missing", self.describe()))?,
        };
        if v.trim().is_empty() {
            return Err(format!("{} is empty", self.describe()));
        }
        Ok(v.trim().to_string())
    }
}

fn read_secrets(path: &Path) -> Result<BTreeMap<String, String>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read secrets file {}: {e}", path.display()))?;
    let json = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"));
    // Parse errors may quote the file's text: never repeat them.
    let parsed: Result<BTreeMap<String, String>, ()> = if json {
        serde_json::from_str(&text).map_err(|_| ())
    } else {
        toml::from_str(&text).map_err(|_| ())
    };
    parsed.map_err(|_| {
        format!(
            "secrets file {} is not a flat {} map of strings",
            path.display(),
            if json { "JSON" } else { "TOML" }
        )
    })
}

/// How a connection authenticates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Auth {
    /// No credentials.
    None,
    /// `Authorization: Bearer <secret>`.
    Bearer(SecretSource),
    /// `<header>: <secret>`.
    Header {
        name: HeaderName,
        source: SecretSource,
    },
}

/// A credential ready to send; `secret` is kept to redact it from evidence.
pub(crate) struct Credential {
    pub(crate) header: HeaderName,
    pub(crate) value: HeaderValue,
    pub(crate) secret: String,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential")
            .field("header", &self.header)
            .finish_non_exhaustive()
    }
}

/// A connection as configured.
#[derive(Clone, Debug)]
pub(crate) struct ConnectionDef {
    pub(crate) name: String,
    pub(crate) base_url: String,
    pub(crate) auth: Auth,
    pub(crate) breaker: BreakerConfig,
    /// The connection's rate limit, taken before each request is sent.
    pub(crate) rate: Option<crate::rate::RateSpec>,
}

impl ConnectionDef {
    /// The credential to send, read now (so a rotated secret is picked up
    /// without a restart), or why it cannot be had.
    pub(crate) fn credential(&self) -> Result<Option<Credential>, String> {
        let (header, source, bearer) = match &self.auth {
            Auth::None => return Ok(None),
            Auth::Bearer(s) => (AUTHORIZATION, s, true),
            Auth::Header { name, source } => (name.clone(), source, false),
        };
        let secret = source.resolve()?;
        let raw = if bearer {
            format!("Bearer {secret}")
        } else {
            secret.clone()
        };
        let mut value = HeaderValue::from_str(&raw)
            .map_err(|_| format!("{} is not a valid header value", source.describe()))?;
        value.set_sensitive(true);
        Ok(Some(Credential {
            header,
            value,
            secret,
        }))
    }

    /// `base_url` joined with `path` (one slash between them).
    pub(crate) fn join(&self, path: &str) -> String {
        if path.is_empty() {
            return self.base_url.clone();
        }
        format!(
            "{}/{}",
            self.base_url.trim_end_matches('/'),
            path.trim_start_matches('/')
        )
    }

    fn auth_kind(&self) -> (&'static str, Option<String>) {
        match &self.auth {
            Auth::None => ("none", None),
            Auth::Bearer(s) => ("bearer", Some(s.describe())),
            Auth::Header { name, source } => (
                "header",
                Some(format!("header {} from {}", name, source.describe())),
            ),
        }
    }

    pub(crate) fn info(
        &self,
        tenant: &str,
        state: Option<ConnectionState>,
        breaker: BreakerState,
        jobs: Vec<String>,
    ) -> ConnectionInfo {
        let (auth, credential_source) = self.auth_kind();
        let credential_problem = self.credential().err();
        ConnectionInfo {
            name: self.name.clone(),
            tenant: tenant.to_string(),
            base_url: self.base_url.clone(),
            auth: auth.to_string(),
            credential_source,
            credential_available: credential_problem.is_none(),
            credential_problem,
            status: state
                .as_ref()
                .map(|s| s.status)
                .unwrap_or(ConnectionStatus::Enabled),
            changed_at: state.as_ref().map(|s| s.updated_at),
            changed_by: state.as_ref().map(|s| s.updated_by.clone()),
            comment: state.and_then(|s| s.comment),
            breaker,
            jobs,
        }
    }
}

/// What the API and the CLI show about a connection of a tenant — never a
/// credential, only where it comes from and whether it can be read.
#[derive(Clone, Debug, Serialize)]
pub struct ConnectionInfo {
    /// Its name in `docket.toml`.
    pub name: String,
    /// The tenant whose state is shown.
    pub tenant: String,
    /// Its base URL.
    pub base_url: String,
    /// `none`, `bearer` or `header`.
    pub auth: String,
    /// Where the credential is read from (an environment variable's or a
    /// secrets file key's name; never the value).
    pub credential_source: Option<String>,
    /// Whether the credential can be read now.
    pub credential_available: bool,
    /// Why it cannot, if so.
    pub credential_problem: Option<String>,
    /// `enabled`, `disabled` or `expired` for this tenant.
    pub status: ConnectionStatus,
    /// When an operator last changed the status.
    pub changed_at: Option<docket_core::Timestamp>,
    /// Who did.
    pub changed_by: Option<String>,
    /// Their comment.
    pub comment: Option<String>,
    /// Its circuit breaker (per process).
    pub breaker: BreakerState,
    /// The jobs that use it.
    pub jobs: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def(auth: Auth) -> ConnectionDef {
        ConnectionDef {
            name: "crm".into(),
            base_url: "http://127.0.0.1:1/api/".into(),
            auth,
            breaker: BreakerConfig::default(),
            rate: None,
        }
    }

    #[test]
    fn join_puts_one_slash() {
        let d = def(Auth::None);
        assert_eq!(d.join("/emails?x=1"), "http://127.0.0.1:1/api/emails?x=1");
        assert_eq!(d.join("emails"), "http://127.0.0.1:1/api/emails");
        assert_eq!(d.join(""), "http://127.0.0.1:1/api/");
    }

    #[test]
    fn secrets_file_toml_and_json_and_no_values_in_errors() {
        let dir = std::env::temp_dir().join(format!("docket-secrets-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let toml_path = dir.join("s.toml");
        std::fs::write(&toml_path, "crm = \"tok-123456\"\n").unwrap();
        let json_path = dir.join("s.json");
        std::fs::write(&json_path, r#"{"billing": "key-abcdef"}"#).unwrap();
        let bad_path = dir.join("bad.toml");
        std::fs::write(&bad_path, "crm = \"hunter2-secret\" oops").unwrap();

        let c = def(Auth::Bearer(SecretSource::File {
            path: toml_path.clone(),
            key: "crm".into(),
        }))
        .credential()
        .unwrap()
        .unwrap();
        assert_eq!(c.header, AUTHORIZATION);
        assert_eq!(c.value.to_str().unwrap(), "Bearer tok-123456");
        assert!(c.value.is_sensitive());
        assert!(!format!("{c:?}").contains("tok-123456"));

        let c = def(Auth::Header {
            name: HeaderName::from_static("x-api-key"),
            source: SecretSource::File {
                path: json_path,
                key: "billing".into(),
            },
        })
        .credential()
        .unwrap()
        .unwrap();
        assert_eq!(c.value.to_str().unwrap(), "key-abcdef");

        let e = def(Auth::Bearer(SecretSource::File {
            path: bad_path,
            key: "crm".into(),
        }))
        .credential()
        .unwrap_err();
        assert!(!e.contains("hunter2"), "{e}");
        let e = def(Auth::Bearer(SecretSource::File {
            path: toml_path,
            key: "other".into(),
        }))
        .credential()
        .unwrap_err();
        assert!(e.contains("`other`") && e.contains("missing"), "{e}");
        let e = def(Auth::Bearer(SecretSource::Env(
            "DOCKET_TEST_SURELY_UNSET_VAR".into(),
        )))
        .credential()
        .unwrap_err();
        assert!(e.contains("DOCKET_TEST_SURELY_UNSET_VAR is not set"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
