//! Tests against a real server on a loopback port.

mod api;
mod cmd;
mod common;
mod events;
mod node;
mod tenants;
