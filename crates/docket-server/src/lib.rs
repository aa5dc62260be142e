//! Docket's HTTP server: the REST API over runs and jobs, the seed's
//! command endpoint (`/api/core/cmd`, `/api/bpm/cmd`), server-sent events,
//! bearer tokens and tenants, Prometheus metrics and the OpenAPI document.
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use docket_server::{Server, ServerConfig};
//! let docket = docket::Docket::open("sqlite://docket.db").await?;
//! let server = Server::start(docket, ServerConfig::default()).await?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:7878").await?;
//! server
//!     .serve(listener, async {
//!         let _ = tokio::signal::ctrl_c().await;
//!     })
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! Every `/api` route and `/metrics` need `Authorization: Bearer <token>`
//! (see [`auth`]); `/healthz` and `/api/openapi.json` do not. A token
//! reaches only its tenant: another tenant's run answers 404.

pub mod auth;
pub mod bulk;
pub mod cmd;
pub mod connections;
pub mod dashboard;
pub mod dto;
pub mod error;
pub mod events;
pub mod extract;
pub mod limits;
pub mod metrics;
pub mod openapi;
pub mod retention;
pub mod runs;
pub mod signals;
pub mod worker_api;

pub mod schedules;

pub use auth::{AuthMode, Caller};
pub use events::HubConfig;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use docket::Docket;
use docket_store::DynStore;
use error::ApiError;
use std::future::Future;
use std::sync::{Arc, OnceLock};
use tokio::net::TcpListener;
use tokio::sync::watch;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// How the server behaves.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Tokens (default) or none (development, loopback only).
    pub auth: AuthMode,
    /// Largest request body; larger ones answer 413 `content_too_large`.
    pub max_body_bytes: usize,
    /// Largest run input (also set on the engine).
    pub max_input_bytes: usize,
    /// How the event hub tails the store.
    pub hub: HubConfig,
    /// The HTTP jobs of a `docket.toml`, already installed on the engine:
    /// their connections and circuit breakers show in `/api/connections`,
    /// `/api/breakers` and `/metrics`. `None`: no connections.
    pub http: Option<docket::http::HttpJobs>,
    /// This process also runs a worker (so the HTTP jobs' circuit breakers
    /// here are live). `false` for `docket serve --role api`: the breakers
    /// are then not reported, since they would only ever read "closed".
    pub runs_jobs: bool,
    /// Where the dashboard links a run's trace: a URL with `{trace_id}`,
    /// e.g. `http://localhost:16686/trace/{trace_id}` (Jaeger) or a Tempo
    /// explore URL. `None`: the trace id is shown without a link.
    pub trace_url: Option<String>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            auth: AuthMode::Tokens,
            max_body_bytes: 2 * 1024 * 1024,
            max_input_bytes: docket::DEFAULT_MAX_INPUT_BYTES,
            hub: HubConfig::default(),
            http: None,
            runs_jobs: true,
            trace_url: None,
        }
    }
}

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    /// The engine.
    pub docket: Docket,
    /// How requests are authenticated.
    pub auth: AuthMode,
    /// The configuration.
    pub config: Arc<ServerConfig>,
    /// The event tail.
    pub hub: Arc<events::EventHub>,
    /// Counters and histograms.
    pub metrics: Arc<metrics::Metrics>,
    /// Turns true when the server shuts down (ends SSE streams and long
    /// polls).
    pub stop: watch::Receiver<bool>,
    openapi: Arc<OnceLock<String>>,
    /// The address [`Server::serve`] listens on: in the insecure mode a
    /// `Host` must name it or a loopback name with its port.
    bound: Arc<OnceLock<std::net::SocketAddr>>,
}

impl AppState {
    /// The store.
    pub fn store(&self) -> &DynStore {
        self.docket.store()
    }
}

/// Errors starting or running the server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The store could not be read at start.
    #[error(transparent)]
    Store(#[from] docket_store::StoreError),
    /// Binding or serving failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// Authentication off on an address other people can reach.
    #[error("refusing to serve without authentication on {0}: --insecure-dev-no-auth is only allowed on a loopback address (127.0.0.1, ::1)")]
    InsecureNotLoopback(std::net::SocketAddr),
}

/// The OpenAPI document's fixed parts; the paths come from the routes.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Docket API",
        description = "Durable jobs that can explain every retry. Every /api route and /metrics take `Authorization: Bearer <token>`; a token reaches only its tenant's runs, jobs and events.",
    ),
    modifiers(&BearerScheme),
    tags(
        (name = "runs", description = "Trigger, list, inspect and wait for runs"),
        (name = "operator", description = "Operator commands on runs"),
        (name = "commands", description = "The seed's command envelope"),
        (name = "events", description = "Server-sent events"),
        (name = "jobs", description = "Registered jobs"),
        (name = "connections", description = "Connections and circuit breakers of the HTTP jobs in docket.toml"),
        (name = "schedules", description = "Schedules: cron or interval in a time zone, one run per slot"),
        (name = "ops", description = "Health, metrics and this document"),
        (name = "worker", description = "The worker protocol v1 (docs/WORKER_PROTOCOL.md): remote workers claim, heartbeat and report with worker tokens; GET /api/workers lists them for operators"),
    )
)]
struct ApiDoc;

struct BearerScheme;

impl utoipa::Modify for BearerScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

/// This document (OpenAPI 3.1, generated from the code).
#[utoipa::path(
    get, path = "/api/openapi.json", tag = "ops",
    responses((status = 200, description = "The OpenAPI document", content_type = "application/json"))
)]
async fn openapi_json(State(state): State<AppState>) -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        state.openapi.get().cloned().unwrap_or_default(),
    )
        .into_response()
}

async fn no_route(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "no_route",
        format!("no route {} {}", req.method(), req.uri().path()),
    )
}

async fn wrong_method(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{} is not allowed on {}", req.method(), req.uri().path()),
    )
}

/// Longest request target (path and query) answered normally; a longer one
/// is 414 in the envelope. (hyper itself refuses targets over 64 KiB with a
/// bare 414 before any of this code runs.)
pub const MAX_TARGET_BYTES: usize = 8 * 1024;
/// Most header bytes (names and values) answered normally; more is 431 in
/// the envelope. (hyper refuses a head over its ~400 KiB buffer, or over 100
/// headers, with a bare 431 before any of this code runs.)
pub const MAX_HEADER_BYTES: usize = 16 * 1024;

/// Checks every request before routing: its size (414, 431, and 413 at
/// once when `Content-Length` is over the body limit, instead of reading
/// until the limit), and in the insecure mode where it comes from.
async fn guard(State(state): State<AppState>, req: Request, next: Next) -> Response {
    match check_request(&state, &req) {
        Ok(()) => next.run(req).await,
        Err(e) => {
            // The seed's command endpoint answers in its own envelope.
            let mut res = if matches!(req.uri().path(), "/api/core/cmd" | "/api/bpm/cmd") {
                e.into_envelope()
            } else {
                e.into_response()
            };
            if req.headers().contains_key(header::CONTENT_LENGTH)
                || req.headers().contains_key(header::TRANSFER_ENCODING)
            {
                // The unread body would otherwise be drained first.
                res.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            res
        }
    }
}

fn check_request(state: &AppState, req: &Request) -> Result<(), ApiError> {
    let target = req.uri().path_and_query().map_or(0, |p| p.as_str().len());
    if target > MAX_TARGET_BYTES {
        return Err(ApiError::new(
            StatusCode::URI_TOO_LONG,
            "uri_too_long",
            format!(
                "the request's path and query are {target} bytes, the limit is {MAX_TARGET_BYTES}"
            ),
        ));
    }
    let head: usize = req
        .headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len())
        .sum();
    if head > MAX_HEADER_BYTES {
        return Err(ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers_too_large",
            format!("the request's headers are {head} bytes, the limit is {MAX_HEADER_BYTES}"),
        ));
    }
    if let Some(len) = req.headers().get(header::CONTENT_LENGTH) {
        let limit = state.config.max_body_bytes;
        let len = len.to_str().ok().and_then(|v| v.trim().parse::<u64>().ok());
        match len {
            Some(n) if n > limit as u64 => {
                return Err(ApiError::too_large(format!(
                "the request body is {n} bytes (Content-Length), over the limit of {limit} bytes"
            )))
            }
            None => {
                return Err(ApiError::bad_param(
                    "Content-Length",
                    "Content-Length is not a number of bytes",
                ))
            }
            _ => {}
        }
    }
    if state.auth == AuthMode::InsecureNoAuth {
        check_same_origin(state, req)?;
    }
    Ok(())
}

/// `host[:port]` split; `[::1]:80` keeps its brackets.
fn split_host(authority: &str) -> (String, Option<u16>) {
    let authority = authority.trim().to_ascii_lowercase();
    let (host, port) = match authority.rfind(':') {
        Some(i) if !authority[i..].contains(']') => {
            (authority[..i].to_string(), authority[i + 1..].parse().ok())
        }
        _ => (authority.clone(), None),
    };
    (host, port)
}

/// Whether `authority` (a `Host` value, or an `Origin`'s host and port)
/// names this server: a loopback name or the bound address, with the bound
/// port (or none, when that port is 80).
fn is_own_authority(state: &AppState, authority: &str) -> bool {
    let (host, port) = split_host(authority);
    let bound = state.bound.get();
    let mut names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "[::1]".to_string(),
    ];
    if let Some(b) = bound {
        names.push(match b.ip() {
            std::net::IpAddr::V4(ip) => ip.to_string(),
            std::net::IpAddr::V6(ip) => format!("[{ip}]"),
        });
    }
    let port_ok = match (bound, port) {
        (Some(b), Some(p)) => p == b.port(),
        (Some(b), None) => b.port() == 80,
        // Served through `Server::router` by the embedder: the port is not
        // known here.
        (None, _) => true,
    };
    names.contains(&host) && port_ok
}

/// The insecure mode has no token to stop another web site: a page the
/// developer visits can send requests to loopback. So a foreign `Host`
/// (DNS rebinding: the page's own name resolving to 127.0.0.1) is refused
/// on every route, and a write (any method but GET, HEAD, OPTIONS) is
/// refused when its `Origin` is not this server or its body is not
/// `application/json` (a form or `text/plain` needs no CORS preflight).
fn check_same_origin(state: &AppState, req: &Request) -> Result<(), ApiError> {
    let forbidden = |field: &str, message: String| {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", message).field(field)
    };
    let host = req
        .headers()
        .get(header::HOST)
        .map(|h| h.to_str().unwrap_or("").to_string())
        .or_else(|| req.uri().authority().map(|a| a.to_string()));
    if let Some(host) = host {
        if !is_own_authority(state, &host) {
            return Err(forbidden(
                "Host",
                format!("Host `{host}` is not this server: without authentication (--insecure-dev-no-auth) only localhost, 127.0.0.1, [::1] and the bound address are answered"),
            ));
        }
    }
    if matches!(
        req.method(),
        &Method::GET | &Method::HEAD | &Method::OPTIONS
    ) {
        return Ok(());
    }
    if let Some(origin) = req.headers().get(header::ORIGIN) {
        let o = origin.to_str().unwrap_or("");
        let own = o
            .strip_prefix("http://")
            .is_some_and(|a| !a.contains('/') && is_own_authority(state, a));
        if !own {
            return Err(forbidden(
                "Origin",
                format!("a write from origin `{o}` is refused: without authentication (--insecure-dev-no-auth) only pages of this server may write"),
            ));
        }
    }
    let has_body = req.headers().contains_key(header::TRANSFER_ENCODING)
        || req
            .headers()
            .get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0");
    if has_body {
        let ct = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let essence = ct.split(';').next().unwrap_or("").trim();
        if !essence.eq_ignore_ascii_case("application/json") {
            return Err(forbidden(
                "Content-Type",
                format!("a write with Content-Type `{ct}` is refused: without authentication (--insecure-dev-no-auth) a body must be sent as application/json"),
            ));
        }
    }
    Ok(())
}

async fn log_requests(req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let start = std::time::Instant::now();
    let res = next.run(req).await;
    tracing::info!(
        target: "docket_server::http",
        %method,
        path,
        status = res.status().as_u16(),
        ms = start.elapsed().as_secs_f64() * 1000.0,
        "request"
    );
    res
}

/// The routes and the OpenAPI document built from them.
fn routes() -> (axum::Router<AppState>, utoipa::openapi::OpenApi) {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(runs::trigger, runs::list))
        .routes(routes!(runs::trigger_batch))
        .routes(routes!(runs::show))
        .routes(routes!(runs::cancel))
        .routes(routes!(runs::retry))
        .routes(routes!(runs::retrigger))
        .routes(routes!(runs::skip))
        .routes(routes!(runs::postpone))
        .routes(routes!(runs::approve))
        .routes(routes!(runs::reject))
        .routes(routes!(runs::wait))
        .routes(routes!(runs::jobs))
        .routes(routes!(signals::send))
        .routes(routes!(signals::list))
        .routes(routes!(signals::send_keyed))
        .routes(routes!(bulk::bulk))
        .routes(routes!(retention::pause))
        .routes(routes!(retention::resume))
        .routes(routes!(retention::delete))
        .routes(routes!(dashboard::api::forensics))
        .routes(routes!(connections::job_forensics))
        .routes(routes!(connections::list))
        .routes(routes!(connections::show))
        .routes(routes!(connections::enable))
        .routes(routes!(connections::disable))
        .routes(routes!(connections::expire))
        .routes(routes!(connections::breakers))
        .routes(routes!(connections::limits))
        .routes(routes!(schedules::list, schedules::put))
        .routes(routes!(schedules::show, schedules::delete))
        .routes(routes!(schedules::pause))
        .routes(routes!(schedules::resume))
        .routes(routes!(schedules::trigger))
        .routes(routes!(schedules::backfill))
        .routes(routes!(events::events))
        .routes(routes!(cmd::core_cmd))
        .routes(routes!(cmd::bpm_cmd))
        .routes(routes!(runs::healthz))
        .routes(routes!(runs::metrics))
        .routes(routes!(openapi_json))
        .routes(routes!(worker_api::claim))
        .routes(routes!(worker_api::heartbeat))
        .routes(routes!(worker_api::end))
        .routes(routes!(worker_api::step_get))
        .routes(routes!(worker_api::step_complete))
        .routes(routes!(worker_api::step_fail))
        .routes(routes!(worker_api::action_begin))
        .routes(routes!(worker_api::action_commit))
        .routes(routes!(worker_api::action_fail))
        .routes(routes!(worker_api::action_reconciled))
        .routes(routes!(worker_api::progress))
        .routes(routes!(worker_api::log))
        .routes(routes!(worker_api::workers))
        .routes(routes!(limits::limits))
        .split_for_parts()
}

/// The OpenAPI document of every route, completed (see [`openapi`]), with
/// `job` open to any name (a running server lists its registered jobs).
pub fn openapi() -> utoipa::openapi::OpenApi {
    let doc = routes().1;
    serde_json::to_value(&doc)
        .ok()
        .and_then(|mut v| {
            openapi::complete(&mut v, &[]);
            serde_json::from_value(v).ok()
        })
        .unwrap_or(doc)
}

/// A server: the router plus its event tail. Build with [`Server::start`],
/// then [`Server::serve`] or use [`Server::router`] directly.
pub struct Server {
    state: AppState,
    stop_tx: watch::Sender<bool>,
}

impl Server {
    /// Prepares a server over an engine: starts the event tail after the
    /// store's latest event and sets the engine's input limit.
    pub async fn start(docket: Docket, config: ServerConfig) -> Result<Server, ServeError> {
        docket.set_max_input_bytes(config.max_input_bytes);
        let (stop_tx, stop) = watch::channel(false);
        let metrics = Arc::new(metrics::Metrics::default());
        let after = docket.store().last_event_id().await?.unwrap_or(0);
        let m = metrics.clone();
        let hub = events::EventHub::start(
            docket.store().clone(),
            after,
            config.hub.clone(),
            stop.clone(),
            move |e| m.observe(e),
        );
        Ok(Server {
            state: AppState {
                docket,
                auth: config.auth,
                config: Arc::new(config),
                hub,
                metrics,
                stop,
                openapi: Arc::new(OnceLock::new()),
                bound: Arc::new(OnceLock::new()),
            },
            stop_tx,
        })
    }

    /// The shared state.
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// The HTTP router.
    pub fn router(&self) -> Router {
        let (router, doc) = routes();
        let mut doc = serde_json::to_value(&doc).unwrap_or_default();
        openapi::complete(&mut doc, &self.state.docket.job_names());
        let _ = self
            .state
            .openapi
            .set(serde_json::to_string_pretty(&doc).unwrap_or_default());
        router
            .merge(dashboard::router())
            .fallback(no_route)
            .method_not_allowed_fallback(wrong_method)
            .layer(DefaultBodyLimit::max(self.state.config.max_body_bytes))
            .layer(axum::middleware::from_fn_with_state(
                self.state.clone(),
                guard,
            ))
            .layer(axum::middleware::from_fn(log_requests))
            .with_state(self.state.clone())
    }

    /// Serves on `listener` until `shutdown` resolves, then stops taking
    /// connections, ends event streams and long polls, and returns once
    /// in-flight requests are answered. Without authentication, refuses
    /// any address but loopback.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        let addr = listener.local_addr()?;
        let _ = self.state.bound.set(addr);
        if self.state.auth == AuthMode::InsecureNoAuth {
            if !addr.ip().is_loopback() {
                return Err(ServeError::InsecureNotLoopback(addr));
            }
            for _ in 0..3 {
                tracing::warn!(%addr, "AUTHENTICATION IS OFF (--insecure-dev-no-auth): anyone who can reach {addr} can read and change every tenant's runs; for development only");
            }
        }
        tracing::info!(%addr, auth = ?self.state.auth, backend = self.state.store().backend(), "docket API listening");
        let router = self.router();
        let stop_tx = self.stop_tx;
        axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                shutdown.await;
                tracing::info!("shutting down the API: ending event streams and long polls");
                let _ = stop_tx.send(true);
            })
            .await?;
        Ok(())
    }

    /// Stops the event tail, SSE streams and long polls (when serving
    /// through [`Server::router`] yourself).
    pub fn stop(&self) {
        let _ = self.stop_tx.send(true);
    }
}
