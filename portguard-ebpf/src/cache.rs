//! The per-cgroup policy cache of the `portguard-cached` object: what the
//! ancestor walk of `decide::governing` found for a cgroup, kept in that
//! cgroup's own storage (`BPF_MAP_TYPE_CGRP_STORAGE`, kernel 6.2+) as one
//! 64-bit word stamped with the epoch and generation it was found in
//! (`portguard_common::cache_word`). A decision whose cgroup holds a word of
//! the current epoch and generation (`State::epoch`, `State::generation`)
//! skips the walk: no `bpf_get_current_ancestor_cgroup_id` and no
//! cgroup-map lookup.
//!
//! Why a stale word is never used: the agent raises the epoch after each
//! change to what the walk reads: in the very update that flips the
//! generation, and in an update of its own after a cgroup entry it inserts
//! into the live generation. A program reads the epoch before anything the
//! walk reads. On x86-64 (the only architecture the agent loads this object
//! on) loads are not reordered with older loads and stores become visible
//! in order, so a program that read the raised epoch sees the change, and a
//! word found before it carries an older epoch. A reader of a half-written
//! state update may pair a new epoch with the old generation: the word it
//! leaves then names the old generation, and no reader of the whole update
//! takes it. Within that one update the kernel's copy (`rep movsb` on CPUs
//! with fast short string moves) promises no order, nor whole 4-byte
//! stores, so a racing read of the epoch itself could mix old and new
//! bytes into a later epoch than any yet written; a walk therefore stamps
//! its word only with an epoch it read the same before and after the walk
//! (`decide::governing`). Every read of the state after the epoch is
//! volatile, so the compiler keeps it after the epoch's.
//!
//! The cache is keyed by the task's own cgroup (`task->cgroups->dfl_cgrp`),
//! and a miss walks up from that same cgroup ([`walk`]: its level, its id,
//! its parent), so the answer stored is that cgroup's even when another
//! thread moves the task meanwhile (the `bpf_get_current_ancestor_cgroup_id`
//! walk of the plain object reads the task's cgroup anew at every level).
//! Where that walk cannot reach a governed level within its bounded steps,
//! the decision walks by level and caches nothing.

use core::ptr::{null_mut, read_volatile, write_volatile};

use aya_ebpf::{
    bindings::cgroup, btf_maps::CgrpStorage, helpers::generated::bpf_get_current_task_btf,
    macros::btf_map,
};
use portguard_common::{CacheOffsets, CgroupKey, MAX_CGROUP_DEPTH, State};

use crate::maps::PORTGUARD_CGROUPS;

/// Each cgroup's cache word; created by the first decision made in it, freed
/// with the cgroup.
#[btf_map]
static PORTGUARD_CGROUP_CACHE: CgrpStorage<u64> = CgrpStorage::new();

/// Set by the agent before load (see portguard-common).
#[unsafe(no_mangle)]
static PORTGUARD_CACHE_OFFSETS: CacheOffsets = CacheOffsets {
    task_cgroups: 0,
    css_set_dfl_cgrp: 0,
    cgroup_level: 0,
    cgroup_kn: 0,
    kernfs_node_id: 0,
    cgroup_parent_css: 0,
    css_cgroup: 0,
    _pad: 0,
};

/// A BTF-typed load of a `T` at `off` bytes into the kernel object at `p`
/// (the verifier checks the offset against the kernel's BTF and turns a
/// fault into a zero read).
#[inline(always)]
unsafe fn field<T: Copy>(p: *const u8, off: u32) -> T {
    // SAFETY: the caller's promise: `p` is a BTF-typed pointer the verifier
    // knows, and `off` a member of its type holding a `T`.
    unsafe { read_volatile(p.add(off as usize).cast::<T>()) }
}

/// The deepest governed cgroup among `cgroup` and its ancestors in
/// generation `g`, as (level, policy record index, its id): up from
/// `cgroup`, one parent per step, skipping the levels no policy is at
/// (outside `State::min_level..=max_level`); the first hit is the deepest.
/// `None`: no cgroup to start from, or not finished within
/// `MAX_CGROUP_DEPTH + 1` steps (a cgroup that far below the deepest
/// governed level: a tenant can make one in its own subtree): the caller
/// walks by level instead and caches nothing.
#[inline(always)]
pub fn walk(
    cgroup: *mut cgroup,
    state: &State,
    g: usize,
    generation: u32,
) -> Option<Option<(u32, u32, u64)>> {
    if cgroup.is_null() {
        return None;
    }
    // SAFETY: a global the loader patches; read as a plain value.
    let off = unsafe { read_volatile(&PORTGUARD_CACHE_OFFSETS) };
    // SAFETY: `state` points into a live array element; volatile, so that
    // these reads stay after the epoch's and the generation's.
    let (min_level, max_level) = unsafe {
        (
            read_volatile(&state.min_level[g & 1]),
            read_volatile(&state.max_level[g & 1]),
        )
    };
    let mut c = cgroup.cast::<u8>().cast_const();
    let mut steps = 0;
    while steps <= MAX_CGROUP_DEPTH {
        if c.is_null() {
            // Past the root.
            return Some(None);
        }
        // SAFETY: `c` is a BTF-typed `struct cgroup *` (the task's, or a
        // parent reached below); the offsets are its members'.
        let level: u32 = unsafe { field(c, off.cgroup_level) };
        if level < min_level {
            return Some(None);
        }
        if level <= max_level {
            // SAFETY: as above; `kn` is a `struct kernfs_node *`.
            let id: u64 =
                unsafe { field(field::<*const u8>(c, off.cgroup_kn), off.kernfs_node_id) };
            let key = CgroupKey {
                cgroup_id: id,
                generation,
                _pad: 0,
            };
            // SAFETY: value is plain data; we copy it out immediately.
            if let Some(v) = unsafe { PORTGUARD_CGROUPS.get(key) } {
                return Some(Some((level, v.policy_index, id)));
            }
        }
        // SAFETY: as above; `self.parent` is a `struct cgroup_subsys_state *`
        // (null at the root), whose `cgroup` is the parent cgroup.
        c = unsafe { field(field::<*const u8>(c, off.cgroup_parent_css), off.css_cgroup) };
        steps += 1;
    }
    None
}

/// The calling task's cgroup on the cgroup2 hierarchy, as a BTF-typed
/// pointer (null where the offsets are unknown).
#[inline(always)]
pub fn current() -> *mut cgroup {
    // SAFETY: a global the loader patches; read as a plain value.
    let off = unsafe { read_volatile(&PORTGUARD_CACHE_OFFSETS) };
    if off.task_cgroups == 0 || off.css_set_dfl_cgrp == 0 {
        return null_mut();
    }
    // SAFETY: BTF-typed loads: the verifier checks each offset against the
    // kernel's BTF (task_struct.cgroups, css_set.dfl_cgrp) and turns a fault
    // into a zero read; we run inside the RCU read section that protects
    // `task->cgroups`.
    unsafe {
        let task = bpf_get_current_task_btf().cast::<u8>().cast_const();
        let css = read_volatile(task.add(off.task_cgroups as usize).cast::<*const u8>());
        read_volatile(css.add(off.css_set_dfl_cgrp as usize).cast::<*mut cgroup>())
    }
}

/// The word cached for `cgroup`, if any.
#[inline(always)]
pub fn get(cgroup: *mut cgroup) -> Option<u64> {
    if cgroup.is_null() {
        return None;
    }
    // SAFETY: the helper checks the pointer's type and creates nothing.
    let p = unsafe { PORTGUARD_CGROUP_CACHE.get_ptr_mut(cgroup) };
    if p.is_null() {
        return None;
    }
    // SAFETY: this cgroup's 8-byte storage, read whole.
    Some(unsafe { read_volatile(p) })
}

/// Cache `word` for `cgroup` (one 8-byte store: a concurrent reader sees the
/// old word or the new one). Without memory for the storage nothing is
/// cached; the next decision walks again.
#[inline(always)]
pub fn put(cgroup: *mut cgroup, word: u64) {
    if cgroup.is_null() {
        return;
    }
    let mut init = word;
    // SAFETY: the helper checks the pointer's type; `init` is copied.
    let p = unsafe { PORTGUARD_CGROUP_CACHE.get_or_insert_ptr_mut(cgroup, Some(&mut init)) };
    if !p.is_null() {
        // SAFETY: this cgroup's 8-byte storage, written whole.
        unsafe { write_volatile(p, word) };
    }
}
