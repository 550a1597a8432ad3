//! portguard: a host-level port binding enforcer.
//!
//! Layering (dependencies point one way):
//! `cli`/`daemon` -> `loader`/`events`/`rules_map` -> `policy` -> portguard-common.
//! The `policy` and `manifest` modules are pure and never import aya.

pub mod aggregate;
pub mod bpfsys;
pub mod caps;
pub mod cgroupfs;
pub mod check;
pub mod cli;
pub mod cri;
pub mod daemon;
pub mod events;
pub mod health;
pub mod identity;
pub mod inventory;
pub mod kernel_btf;
pub mod learn;
pub mod loader;
pub mod manifest;
pub mod metrics;
pub mod pins;
pub mod policy;
pub mod query;
pub mod resolve;
pub mod rules_map;
pub mod status;
