//! What the running agent shows: the snapshot it keeps of itself
//! ([`snapshot`]), the
//! Prometheus `/metrics` ([`metrics`]), `/healthz` and `/readyz`
//! ([`health`]), and the `portguard status` socket and report ([`status`]).

pub mod health;
pub mod metrics;
pub mod snapshot;
pub mod status;
