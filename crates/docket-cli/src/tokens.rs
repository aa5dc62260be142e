//! `docket token create | list | revoke`: straight on the database (they
//! bootstrap authentication, so they cannot need a token themselves).

use crate::client::table;
use crate::serve::db_url;
use docket_store::{StoreError, TokenScope};

fn parse_scope(s: &str) -> Result<TokenScope, String> {
    s.parse()
}

/// `docket token …`.
#[derive(clap::Subcommand, Debug)]
pub enum TokenCmd {
    /// Create a token. The secret is printed once (on stdout) and stored
    /// only as a SHA-256 hash.
    Create {
        /// The tenant it reaches.
        #[arg(long)]
        tenant: String,
        /// Its name, recorded as the actor of operator actions.
        #[arg(long)]
        name: String,
        /// `operator` (the API: trigger, read, operate; the default) or
        /// `worker` (only the worker protocol, /api/worker/v1, for this
        /// tenant's runs; see docs/WORKER_PROTOCOL.md).
        #[arg(long, default_value = "operator", value_parser = parse_scope)]
        scope: TokenScope,
        #[command(flatten)]
        db: DbArg,
    },
    /// List tokens (never their secrets).
    List {
        /// Only this tenant's.
        #[arg(long)]
        tenant: Option<String>,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        db: DbArg,
    },
    /// Revoke a token by id, or by tenant and name.
    Revoke {
        /// The token's id (`tok_…`, see `docket token list`).
        id: Option<String>,
        /// With --name: the tenant of the token to revoke.
        #[arg(long, requires = "name", conflicts_with = "id")]
        tenant: Option<String>,
        /// With --tenant: the name of the token to revoke.
        #[arg(long, requires = "tenant")]
        name: Option<String>,
        #[command(flatten)]
        db: DbArg,
    },
}

/// The database the token commands work on.
#[derive(clap::Args, Debug)]
pub struct DbArg {
    /// A SQLite file path, `sqlite://PATH` or `postgres://…`.
    #[arg(long, env = "DOCKET_DB", default_value = "docket.db")]
    pub db: String,
}

/// Opens the database. Only `create` may bring a new SQLite file into
/// being (a first token before the first start), and says so: a mistyped
/// path must not look like an empty token list.
async fn open(db: &DbArg, create: bool) -> Result<docket_store::DynStore, String> {
    let url = db_url(&db.db);
    if let Some(path) = url.strip_prefix("sqlite://") {
        if !std::path::Path::new(path).exists() {
            if !create {
                return Err(format!(
                    "no database at {path}: pass the --db the server uses (or DOCKET_DB)"
                ));
            }
            eprintln!("note: no database at {path}: creating it (the server must use this --db)");
        }
    }
    docket_store::open(&url)
        .await
        .map_err(|e| format!("cannot open {}: {e}", crate::serve::redact(&db.db)))
}

fn now() -> docket::Timestamp {
    docket::Clock::now(&docket::SystemClock)
}

/// Runs a token command.
pub async fn run(cmd: TokenCmd) -> Result<(), String> {
    match cmd {
        TokenCmd::Create {
            tenant,
            name,
            scope,
            db,
        } => {
            let t = docket_server::auth::issue_scoped_token(&tenant, &name, scope, now())?;
            let store = open(&db, true).await?;
            let rec = store.create_token(t.record).await.map_err(|e| match e {
                StoreError::Conflict(m) => format!("{m}; revoke it first or choose another name"),
                e => e.to_string(),
            })?;
            eprintln!(
                "created {} token {} for tenant `{}`, named `{}`. It is shown only now; store it safely:",
                rec.scope, rec.id, rec.tenant, rec.name
            );
            outln!("{}", t.secret);
            Ok(())
        }
        TokenCmd::List { tenant, json, db } => {
            let store = open(&db, false).await?;
            let tokens = store.list_tokens(tenant).await.map_err(|e| e.to_string())?;
            if json {
                outln!(
                    "{}",
                    serde_json::to_string_pretty(&tokens).map_err(|e| e.to_string())?
                );
                return Ok(());
            }
            let rows: Vec<Vec<String>> = tokens
                .iter()
                .map(|t| {
                    vec![
                        t.id.clone(),
                        t.tenant.clone(),
                        t.name.clone(),
                        t.scope.to_string(),
                        t.created_at.to_rfc3339(),
                        t.revoked_at
                            .map(|r| format!("revoked {r}"))
                            .unwrap_or_else(|| "active".into()),
                    ]
                })
                .collect();
            table(
                &["id", "tenant", "name", "scope", "created", "state"],
                &rows,
            );
            Ok(())
        }
        TokenCmd::Revoke {
            id,
            tenant,
            name,
            db,
        } => {
            let store = open(&db, false).await?;
            let id = match (id, tenant, name) {
                (Some(id), _, _) => id,
                (None, Some(tenant), Some(name)) => store
                    .list_tokens(Some(tenant.clone()))
                    .await
                    .map_err(|e| e.to_string())?
                    .into_iter()
                    .find(|t| t.name == name && t.revoked_at.is_none())
                    .map(|t| t.id)
                    .ok_or_else(|| {
                        format!("tenant `{tenant}` has no active token named `{name}`")
                    })?,
                _ => return Err("give a token id, or --tenant and --name".into()),
            };
            match store
                .revoke_token(id.clone(), now())
                .await
                .map_err(|e| e.to_string())?
            {
                Some(t) => {
                    outln!(
                        "revoked {} (tenant `{}`, name `{}`)",
                        t.id,
                        t.tenant,
                        t.name
                    );
                    Ok(())
                }
                None => Err(format!("no active token with id `{id}`")),
            }
        }
    }
}
