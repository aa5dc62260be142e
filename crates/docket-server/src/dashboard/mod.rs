//! The dashboard: server-rendered HTML shells, one small plain-JavaScript
//! file and server-rendered SVG charts, all compiled into the binary
//! (`include_str!`), so `cargo build` alone produces everything and the
//! pages need no external network.
//!
//! Pages (no token needed: they hold no data):
//! - `/` — runs list: filters by status, job and text, the "Needs
//!   attention" quick filter with its count, cursor pages, live updates
//!   over `/api/events`; row selection or "all matching the filter" and a
//!   bulk action bar (`POST /api/runs/bulk`: the dry run's count first,
//!   then page by page with the cursor, per-run results); a "paused" badge
//!   on a paused job's runs;
//! - `/runs/{id}` — one run: input, variables, output, the timeline of
//!   every attempt, step, ledger entry, retry decision, operator action and
//!   event, the forensic verdicts, the retry picture and the operator
//!   actions that apply (delete for a final run);
//! - `/overview` — each job's queue (due, lag, running, scheduled,
//!   throughput; `GET /api/jobs`) and state with pause/resume buttons;
//!   runs by status per job, failures and retries by error class over the
//!   last hour or day, disabled connections;
//! - `/schedules` — schedules: rule, zone, state, next fire times (in the
//!   zone and UTC), the last slot's run; one schedule's next runs and its
//!   recent slots (with their runs and skip reasons) and changes; pause and
//!   resume buttons;
//! - `/signin` — the operator pastes a token, kept in `sessionStorage`.
//!
//! Under `--insecure-dev-no-auth` the pages carry `data-auth="none"`: the
//! script then asks for no token and shows no sign-in form (the API needs
//! none; `/signin` sends the browser on to its page).
//!
//! The script calls the JSON API with `Authorization: Bearer <token>`; the
//! API confines every answer to the token's tenant. The extra JSON and SVG
//! endpoints the pages need are in [`api`] (see [`router`]).

pub mod api;
pub mod svg;

use crate::{AppState, AuthMode};
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

const LAYOUT: &str = include_str!("layout.html");
const RUNS: &str = include_str!("runs.html");
const RUN: &str = include_str!("run.html");
const OVERVIEW: &str = include_str!("overview.html");
const SCHEDULES: &str = include_str!("schedules.html");
const SIGNIN: &str = include_str!("signin.html");
const APP_JS: &str = include_str!("app.js");
const STYLE_CSS: &str = include_str!("style.css");
const FAVICON: &str = include_str!("favicon.svg");

/// The content security policy of every page: only this server's own
/// scripts, styles and connections; no inline script, no frames.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// The dashboard's routes: the pages, their assets and the JSON/SVG
/// endpoints they use (`/api/dashboard/*`, `/api/stats`,
/// `/api/runs/{id}/chart.svg`; `/api/runs/{id}/forensics` is part of the
/// documented API). Merge it into the server's router at `/`.
pub fn router() -> Router<AppState> {
    Router::new()
        .route(
            "/",
            get(|State(s): State<AppState>| async move { page(&s, "Runs", "runs", RUNS) }),
        )
        .route(
            "/runs/{id}",
            get(|State(s): State<AppState>| async move { page(&s, "Run", "run", RUN) }),
        )
        .route(
            "/overview",
            get(|State(s): State<AppState>| async move {
                page(&s, "Overview", "overview", OVERVIEW)
            }),
        )
        .route(
            "/schedules",
            get(|State(s): State<AppState>| async move {
                page(&s, "Schedules", "schedules", SCHEDULES)
            }),
        )
        .route(
            "/signin",
            get(|State(s): State<AppState>| async move { page(&s, "Sign in", "signin", SIGNIN) }),
        )
        .route(
            "/assets/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/assets/style.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE_CSS) }),
        )
        .route(
            "/assets/favicon.svg",
            get(|| async { asset("image/svg+xml", FAVICON) }),
        )
        .merge(api::router())
}

/// Renders a page: the layout around the page's skeleton. `auth` is
/// `token` (the script asks for a token) or `none` (the server runs without
/// authentication: no sign-in).
pub fn render(title: &str, page: &str, body: &str, auth: &str) -> String {
    LAYOUT
        .replace("{{title}}", title)
        .replace("{{page}}", page)
        .replace("{{auth}}", auth)
        .replace("{{body}}", body)
}

fn security_headers(res: &mut Response) {
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
}

fn page(state: &AppState, title: &str, name: &str, body: &str) -> Response {
    let auth = match state.auth {
        AuthMode::Tokens => "token",
        AuthMode::InsecureNoAuth => "none",
    };
    let mut res = (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        render(title, name, body, auth),
    )
        .into_response();
    security_headers(&mut res);
    res
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut res = (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response();
    security_headers(&mut res);
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_fill_the_layout_and_load_only_local_assets() {
        for (name, body) in [
            ("runs", RUNS),
            ("run", RUN),
            ("overview", OVERVIEW),
            ("signin", SIGNIN),
        ] {
            let html = render("T", name, body, "token");
            assert!(!html.contains("{{"), "{name}: unfilled placeholder");
            assert!(html.contains(&format!("data-page=\"{name}\"")));
            assert!(html.contains("/assets/app.js"));
            for bad in ["http://", "https://", "<script>", "style=\""] {
                assert!(!html.contains(bad), "{name}: `{bad}` in the page");
            }
        }
        for bad in ["http://", "https://", "innerHTML", "eval("] {
            assert!(!APP_JS.contains(bad), "app.js uses `{bad}`");
        }
        assert!(!STYLE_CSS.contains("@import"));
    }
}
