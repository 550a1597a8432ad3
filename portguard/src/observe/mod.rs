//! What the running agent shows: the snapshot it keeps of itself
//! ([`snapshot`]), the
//! Prometheus `/metrics` ([`metrics`]), what the kernel programs cost
//! (`--program-stats`, [`cost`]), `/healthz` and `/readyz`
//! ([`health`]), the `portguard status` report ([`status`]), the status
//! socket that answers it and the hooks' govern requests ([`socket`]), and
//! the escaping that makes untrusted names safe in every human-readable
//! output, log lines included ([`text`]).

pub mod cost;
pub mod health;
pub mod metrics;
pub mod snapshot;
pub mod socket;
pub mod status;
pub mod text;
