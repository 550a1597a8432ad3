//! Raw ring-buffer records -> typed [`EventRecord`]s -> one JSON object per
//! line. Consumers never see raw bytes.
//!
//! Event fields (a contract with users; add fields, never rename):
//! `time`, `verdict` (`deny` | `audit`), `hook`, `policy`, `cgroup`,
//! `cgroup_id`, `pid`, `tid`, `uid`, `comm`, `family`, `protocol`, `address`,
//! `port`; plus `gid`, `policy_cgroup` (the cgroup whose policy decided, the
//! caller's own or an ancestor's), `policy_cgroup_id`, and `v4_mapped` /
//! `dual_stack` when they apply. Lost events are reported as
//! `{"time":..., "lost": N, "lost_total": M}`.
//!
//! `--format ocsf` / `ecs` write each line as an OCSF event ([`ocsf`]) or
//! an ECS document ([`ecs`]) instead (docs/ocsf.md); the default JSON line
//! stays as above.

pub mod aggregate;
mod decode;
pub mod ecs;
mod format;
pub mod ocsf;
mod record;
mod writer;

pub use decode::*;
pub use format::*;
pub use record::*;
pub use writer::*;

#[cfg(test)]
mod tests;
