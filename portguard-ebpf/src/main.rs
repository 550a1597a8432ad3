//! portguard's kernel programs: one entry point per cgroup hook, each of which
//! only extracts (protocol, family, address, port) from its context and calls
//! [`decide::decide`]. All programs are attached once, on the cgroup2 root,
//! and look the caller's governing policy up by cgroup id.
//!
//! | program                | hook                 | judges                               |
//! |------------------------|----------------------|--------------------------------------|
//! | `portguard_bind4/6`    | `cgroup/bind4/6`     | explicit `bind()` to a non-zero port |
//! | `portguard_post_bind4/6` | `cgroup/post_bind4/6` | the port actually bound (port 0 binds) |
//! | `portguard_connect4/6` | `cgroup/connect4/6`  | `connect()` destination (TCP, UDP)   |
//! | `portguard_sendmsg4/6` | `cgroup/sendmsg4/6`  | unconnected UDP `sendto()` destination, and the port the kernel autobound the socket to |
//! | `portguard_sock_create` | `cgroup/sock_create` | socket kinds with their own bind, and unknown protocols |
//! | `portguard_sock_ops`   | `sockops` (listen)   | a new listener's port, where the BPF LSM is unusable: cut off (fenced) if not allowed |
//! | `portguard_setsockopt` | `cgroup/setsockopt`  | keeps the fence: no rebinding a cut-off socket to a device |
//! | `portguard_ingress`    | `cgroup_skb/ingress` | the packet guard, attached only while a cut-off socket is neither fenced nor destroyed |
//!
//! Two objects are built from this code. `portguard` (this file) finds the
//! caller's governing policy by walking its cgroup's ancestry on every
//! decision. `portguard-cached` (cached.rs) keeps the answer of that walk in
//! the cgroup's own storage (`BPF_MAP_TYPE_CGRP_STORAGE`, kernel 6.2+, and a
//! BTF-typed pointer to the task's cgroup) until the agent changes a policy;
//! the agent loads it where the kernel accepts it (see `cache`).
#![no_std]
#![no_main]

include!("programs.rs");

/// The per-cgroup policy cache, absent from this build: every decision walks.
mod cache {
    use aya_ebpf::bindings::cgroup;

    #[inline(always)]
    pub fn current() -> *mut cgroup {
        core::ptr::null_mut()
    }

    #[inline(always)]
    pub fn get(_cgroup: *mut cgroup) -> Option<u64> {
        None
    }

    #[inline(always)]
    pub fn put(_cgroup: *mut cgroup, _word: u64) {}

    #[inline(always)]
    pub fn walk(
        _cgroup: *mut cgroup,
        _state: &portguard_common::State,
        _g: usize,
        _generation: u32,
    ) -> Option<Option<(u32, u32, u64)>> {
        None
    }
}
