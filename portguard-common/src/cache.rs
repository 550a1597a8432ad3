//! The per-cgroup policy cache's word and epoch, shared by the cached
//! kernel programs (portguard-ebpf's cache.rs), the applier that raises the
//! epoch and the in-memory model of the maps (portguard's apply/fake.rs).

use crate::MAX_CGROUP_DEPTH;
#[cfg(doc)]
use crate::State;

/// The epoch after `epoch` ([`State::epoch`]): one more, skipping 0 (no
/// cache) when it wraps.
#[inline(always)]
pub const fn next_epoch(epoch: u32) -> u32 {
    match epoch.wrapping_add(1) {
        0 => 1,
        e => e,
    }
}

const CACHE_GENERATION: u64 = 1 << 31;
const CACHE_GOVERNED: u64 = 1 << 30;
const CACHE_LEVEL_SHIFT: u32 = 24;
const CACHE_LEVEL_MASK: u64 = 0x3f;
const CACHE_INDEX_MASK: u64 = (1 << 24) - 1;

/// One cgroup's entry in the per-cgroup policy cache: what the ancestor
/// walk found for it in `epoch` and `generation`, packed into one 64-bit
/// word so the kernel writes and reads it whole (two CPUs of one cgroup may
/// write it at once): the epoch in the high 32 bits, then the generation,
/// a governed flag, the level of the governing cgroup (6 bits: every level
/// a walk visits is below [`MAX_CGROUP_DEPTH`]) and the policy record index
/// (24 bits: the agent loads the cached programs only where every index
/// fits, [`CACHE_MAX_INDEXES`]). Fields are masked, not tested, so the
/// verifier need not follow a branch per field.
#[inline(always)]
pub const fn cache_word(epoch: u32, generation: u32, governing: Option<(u32, u32)>) -> u64 {
    let high = ((epoch as u64) << 32)
        | if generation & 1 == 1 {
            CACHE_GENERATION
        } else {
            0
        };
    match governing {
        None => high,
        Some((level, index)) => {
            high | CACHE_GOVERNED
                | (((level as u64) & CACHE_LEVEL_MASK) << CACHE_LEVEL_SHIFT)
                | (index as u64 & CACHE_INDEX_MASK)
        }
    }
}
const _: () = assert!(MAX_CGROUP_DEPTH as u64 <= CACHE_LEVEL_MASK + 1);

/// How many policy record indexes a cache word can hold: the cached
/// programs are loaded only where the policy map has no more entries.
pub const CACHE_MAX_INDEXES: u64 = CACHE_INDEX_MASK + 1;

/// Whether a cache word was found in `epoch` and `generation`: the only
/// words a decision may use.
#[inline(always)]
pub const fn cache_word_is_current(word: u64, epoch: u32, generation: u32) -> bool {
    (word >> 32) as u32 == epoch && ((word & CACHE_GENERATION != 0) == (generation & 1 == 1))
}

/// What a cache word says: `None` (no policy governs the cgroup) or the
/// governing cgroup's level and the policy record index.
#[inline(always)]
pub const fn cache_word_governing(word: u64) -> Option<(u32, u32)> {
    if word & CACHE_GOVERNED == 0 {
        return None;
    }
    Some((
        ((word >> CACHE_LEVEL_SHIFT) & CACHE_LEVEL_MASK) as u32,
        (word & CACHE_INDEX_MASK) as u32,
    ))
}
