//! The kernel side, and the only module that imports aya: loading the
//! object and patching its globals from the running kernel's BTF
//! ([`btf`]), attaching (the host-wide programs on the root, the decision
//! programs on each attach point; new links or pinned ones adopted across
//! restarts, [`pins`]), the maps the planner writes through ([`RuleSink`]), the
//! counters, the programs' own run statistics (`--program-stats`,
//! [`ProgramStats`]), the offline view of pinned state, raw `bpf(2)` calls
//! aya does not offer ([`bpfsys`]) and the capability preflight ([`caps`]).

mod attach;
pub mod bpfsys;
pub mod btf;
mod cache;
pub mod caps;
mod counters;
mod loader;
mod lsm;
mod maps;
pub mod pins;
mod points;
mod programs;
mod stats;
mod view;

/// The event ring buffer, as the agent drains it.
pub type EventRing = aya::maps::RingBuf<aya::maps::MapData>;
/// A kernel map operation's error.
pub type MapError = aya::maps::MapError;

pub use attach::*;
pub use counters::*;
pub use loader::*;
pub use lsm::*;
pub use maps::*;
pub use points::Point;
pub use stats::*;
pub use view::*;
