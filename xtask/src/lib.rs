//! Helpers shared by `cargo xtask` and the integration tests.

pub mod docs;
pub mod fuzz;
pub mod oci;
pub mod shape;
