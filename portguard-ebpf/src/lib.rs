// This file exists so that the userspace crate can build-depend on this crate
// (cargo then rebuilds the agent when the kernel programs change). The real
// code is the `portguard` binary in main.rs.
#![no_std]
