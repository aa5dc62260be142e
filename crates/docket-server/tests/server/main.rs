//! Tests against a real server on a loopback port.

mod api;
mod children;
mod cmd;
mod common;
mod connections;
mod debounce;
mod deep_json;
mod events;
mod hardening;
mod limits;
mod node;
mod schedules;

mod retention;
mod schemathesis;
mod signals;
mod tenants;
mod worker_protocol;
