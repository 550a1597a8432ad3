//! portguard's kernel programs with the per-cgroup policy cache: the same
//! programs as main.rs (the `portguard` object), built as the
//! `portguard-cached` object, whose `decide::governing` first reads the
//! answer cached in the calling task's cgroup (see cache.rs).
#![no_std]
#![no_main]

include!("programs.rs");

#[path = "cache.rs"]
mod cache;
