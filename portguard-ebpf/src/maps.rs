//! Every map the kernel programs use, in one place. Sizes here are
//! placeholders: the agent sets each map's `max_entries` before load
//! (see portguard/src/loader.rs). Names are the `MAP_*` constants of
//! portguard-common.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::SkStorage,
    macros::{btf_map, map},
    maps::{Array, HashMap, PerCpuArray, RingBuf},
};
use portguard_common::{
    AgentStamp, CgroupKey, CgroupValue, EventBudget, PolicyName, PolicyRecord, PortChunk,
    PortChunkKey, SocketState, State,
};

/// Live generation and per-generation walk bounds.
#[map(name = "PORTGUARD_STATE")]
pub static PORTGUARD_STATE: Array<State> = Array::with_max_entries(1, 0);

/// (cgroup id, generation) -> policy index. Not preallocated: memory follows
/// the number of governed cgroups, not the configured maximum.
#[map(name = "PORTGUARD_CGROUPS")]
pub static PORTGUARD_CGROUPS: HashMap<CgroupKey, CgroupValue> =
    HashMap::with_max_entries(1, BPF_F_NO_PREALLOC);

/// Policy records, both generations.
#[map(name = "PORTGUARD_POLICIES")]
pub static PORTGUARD_POLICIES: Array<PolicyRecord> = Array::with_max_entries(1, 0);

/// (set id, chunk) -> 512-port bitmap slice. Shared by every policy (and
/// both generations) holding the same set.
#[map(name = "PORTGUARD_PORTSETS")]
pub static PORTGUARD_PORTSETS: HashMap<PortChunkKey, PortChunk> =
    HashMap::with_max_entries(1, BPF_F_NO_PREALLOC);

/// Denial/audit events for the agent.
#[map(name = "PORTGUARD_EVENTS")]
pub static PORTGUARD_EVENTS: RingBuf = RingBuf::with_byte_size(4096, 0);

/// Per-CPU decision counters by hook and kind, then lost events (see
/// `portguard_common::hook_counter`).
#[map(name = "PORTGUARD_COUNTERS")]
pub static PORTGUARD_COUNTERS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(portguard_common::COUNTERS, 0);

/// Per-CPU decision counters by policy slot and kind (see
/// `portguard_common::policy_counter`); sized by the agent.
#[map(name = "PORTGUARD_POLICY_COUNTERS")]
pub static PORTGUARD_POLICY_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// The per-policy event budget (one entry, written by the agent before
/// attach; see `portguard_common::EventBudget`).
#[map(name = "PORTGUARD_EVENT_BUDGET")]
pub static PORTGUARD_EVENT_BUDGET: Array<EventBudget> = Array::with_max_entries(1, 0);

/// Each policy slot's token bucket on each CPU (its theoretical arrival
/// time, boot ns); sized by the agent. Touched only when an event would be
/// written.
#[map(name = "PORTGUARD_EVENT_BUCKETS")]
pub static PORTGUARD_EVENT_BUCKETS: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Per-socket state carried from bind6 to post_bind6 (dual-stack flag).
#[btf_map]
pub static PORTGUARD_SOCKETS: SkStorage<SocketState> = SkStorage::new();

/// The version stamp of the pinned state (userspace only; see
/// `portguard_common::AgentStamp`).
#[map(name = "PORTGUARD_AGENT")]
pub static PORTGUARD_AGENT: Array<AgentStamp> = Array::with_max_entries(1, 0);

/// Policy id -> name, so events queued before an agent restart can still be
/// named (userspace only; sized by the agent).
#[map(name = "PORTGUARD_NAMES")]
pub static PORTGUARD_NAMES: HashMap<u32, PolicyName> =
    HashMap::with_max_entries(1, BPF_F_NO_PREALLOC);
