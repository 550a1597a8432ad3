//! The one decision every hook funnels into: find the governing policy of the
//! calling task's cgroup, test the port against one (or, for a dual-stack
//! bind, two) port sets, count, and report a denial on the ring buffer
//! within its policy's event budget (suppressed and lost events counted per
//! policy: see `portguard_common::EventBudget`).
//!
//! Return values are only ever [`ALLOW`] (1) or [`DENY`] (0). A bind hook
//! returning anything else (3) would make the kernel skip its
//! CAP_NET_BIND_SERVICE check, and no hook here ever writes the address.

use aya_ebpf::helpers::{
    bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
    generated::{bpf_get_current_ancestor_cgroup_id, bpf_ktime_get_boot_ns},
};
use portguard_common::{
    AddrClass, BPF_RB_AVAIL_DATA, COUNTER_EVENTS_LOST, CgroupKey, DECISION_ALLOW, DECISION_AUDIT,
    DECISION_DENY, Direction, EMPTY_SET, EVENT_F_AUTOBIND, Event, EventOutcome, Family, Hook,
    MAX_CGROUP_DEPTH, MODE_AUDIT, POLICY_EVENTS_LOST, POLICY_EVENTS_SUPPRESSED, PORTS_PER_CHUNK,
    PolicyRecord, PortChunkKey, Proto, VERDICT_AUDIT, VERDICT_CUT_OFF, VERDICT_DENY, hook_counter,
    cache_word, cache_word_governing, cache_word_is_current, in_ephemeral_range, policy_counter,
    set_slot,
};

use crate::{
    cache,
    maps::{
    PORTGUARD_CGROUPS, PORTGUARD_COUNTERS, PORTGUARD_EVENT_BUCKETS, PORTGUARD_EVENT_BUDGET,
    PORTGUARD_EVENTS, PORTGUARD_POLICIES, PORTGUARD_POLICY_COUNTERS, PORTGUARD_PORTSETS,
    PORTGUARD_STATE,
    },
};
use portguard_common::State;

pub const ALLOW: i32 = 1;
pub const DENY: i32 = 0;

/// One operation to judge, as extracted by a hook.
#[derive(Clone, Copy)]
pub struct Query {
    pub hook: Hook,
    pub dir: Direction,
    /// Raw IP protocol of the socket.
    pub protocol: u8,
    pub family: Family,
    pub addr_class: AddrClass,
    /// Host byte order.
    pub port: u16,
    /// Network-order address bytes (IPv4 in the first four).
    pub addr: [u8; 16],
    /// Dual-stack `[::]` bind: the port must also be allowed for IPv4 on any
    /// address.
    pub dual_stack: bool,
    /// The kernel chose this port for the socket (a bind to port 0, an
    /// autobind): the policy's "ephemeral" bit (port 0) also allows it, if
    /// it lies in the host's ephemeral range. Never set for a port someone
    /// asked for.
    pub ephemeral_ok: bool,
    /// `EVENT_F_*` bits for the event.
    pub flags: u8,
    /// The hook cannot make the call fail (it runs after the fact): a
    /// violation in enforce mode cuts the socket off instead (the caller
    /// marks it on [`DENY`]), reported with [`VERDICT_CUT_OFF`].
    pub cut_off: bool,
    /// The socket's cookie, for the agent to act on a cut-off socket.
    pub cookie: u64,
}

struct Governing {
    /// Level of the governing cgroup in the caller's ancestry.
    level: u32,
    /// Its id, as the walk found it; 0 on a cache hit (then
    /// [`Governing::cgroup_id`] asks for it, for an event only).
    id: u64,
    record: *const PolicyRecord,
    /// The host's ephemeral range (`State::ephemeral`).
    ephemeral: u32,
}

impl Governing {
    /// Id of the governing cgroup (for events). After a cache hit, a helper
    /// call: the caller's ancestor at `level`, read now.
    #[inline(always)]
    fn cgroup_id(&self) -> u64 {
        if self.id != 0 {
            return self.id;
        }
        // SAFETY: plain helper call.
        unsafe { bpf_get_current_ancestor_cgroup_id(self.level as i32) }
    }
}

/// The host's ephemeral port range, packed (`State::ephemeral`).
#[inline(always)]
pub fn host_ephemeral() -> u32 {
    match PORTGUARD_STATE.get(0) {
        // SAFETY: `s` points into a live array element.
        Some(s) => unsafe { core::ptr::read_volatile(&s.ephemeral) },
        None => 0,
    }
}

/// Nearest ancestor-or-self of the caller's cgroup with a policy in the live
/// generation. Cost: at most `max_level + 1` hash lookups, bounded by
/// MAX_CGROUP_DEPTH; independent of the number of policies. In the cached
/// object, a cgroup whose cache word carries the current epoch answers
/// without the walk (see cache.rs), and a walk leaves its answer there.
#[inline(always)]
fn governing() -> Option<Governing> {
    let state = PORTGUARD_STATE.get(0)?;
    // The epoch before anything the walk reads (cache.rs says why).
    // SAFETY: `state` points into a live array element.
    let epoch = unsafe { core::ptr::read_volatile(&state.epoch) };
    // Read the generation once; every lookup below uses the same one, so the
    // whole decision sees one consistent policy set.
    // SAFETY: `state` points into a live array element.
    let generation = unsafe { core::ptr::read_volatile(&state.generation) } & 1;
    let g = generation as usize;
    // Volatile, like every read of the state here: after the epoch and the
    // generation, whatever order the compiler would prefer.
    // SAFETY: `state` points into a live array element.
    let cgroups = unsafe { core::ptr::read_volatile(&state.cgroups[g & 1]) };
    if cgroups == 0 {
        return None;
    }
    // SAFETY: `state` points into a live array element.
    let ephemeral = unsafe { core::ptr::read_volatile(&state.ephemeral) };
    // The cached object's cgroup: the cache's key, and where its walk
    // starts (null in the plain object).
    let cgroup = cache::current();
    if epoch != 0
        && let Some(word) = cache::get(cgroup)
        && cache_word_is_current(word, epoch, generation)
    {
        let (level, index) = cache_word_governing(word)?;
        let record = PORTGUARD_POLICIES.get_ptr(index)?;
        return Some(Governing {
            level,
            id: 0,
            record,
            ephemeral,
        });
    }
    // Up from the very cgroup the answer is cached for: a task that another
    // thread moves to another cgroup meanwhile cannot leave that cgroup's
    // answer here (the helper reads the task's cgroup anew at every call).
    // Where that walk cannot finish, or in the plain object, by level.
    let found = match cache::walk(cgroup, state, g, generation) {
        Some(found) => {
            // Stamped only with an epoch read the same before and after the
            // walk (a read racing the agent's write may mix old and new
            // bytes into a later epoch: see cache.rs). A read that saw the
            // change start mid-walk caches nothing; the next decision walks
            // again.
            // SAFETY: `state` points into a live array element.
            if epoch != 0 && unsafe { core::ptr::read_volatile(&state.epoch) } == epoch {
                cache::put(
                    cgroup,
                    cache_word(epoch, generation, found.map(|(l, i, _)| (l, i))),
                );
            }
            found
        }
        None => walk(state, g, generation),
    };
    let (level, index, id) = found?;
    let record = PORTGUARD_POLICIES.get_ptr(index)?;
    Some(Governing {
        level,
        id,
        record,
        ephemeral,
    })
}

/// Always 0: see [`walk`].
#[unsafe(no_mangle)]
static PORTGUARD_UNLINK: u32 = 0;

/// The ancestor walk: the deepest governed cgroup among the caller's
/// ancestors-or-self at the levels generation `g` holds policies at, as
/// (level, policy record index, its id).
#[inline(always)]
fn walk(state: &State, g: usize, generation: u32) -> Option<(u32, u32, u64)> {
    // SAFETY: `state` points into a live array element (volatile: see
    // `governing`).
    let max_level = unsafe { core::ptr::read_volatile(&state.max_level[g & 1]) };
    let mut found_level = 0u32;
    let mut found_index = 0u32;
    let mut found_id = 0u64;
    let mut found = false;
    // Levels above the shallowest governed cgroup cannot hold a policy.
    // SAFETY: as above.
    let mut level = unsafe { core::ptr::read_volatile(&state.min_level[g & 1]) };
    while level < MAX_CGROUP_DEPTH {
        if level > max_level {
            break;
        }
        // SAFETY: plain helper call; returns 0 past the task's own level.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) };
        if id == 0 {
            break;
        }
        let key = CgroupKey {
            cgroup_id: id,
            generation,
            _pad: 0,
        };
        // SAFETY: value is plain data; we copy it out immediately.
        if let Some(v) = unsafe { PORTGUARD_CGROUPS.get(key) } {
            // Not a copy of the loop counter: the verifier links a copied
            // register to its source and would track the found level as
            // exactly as the counter, one state per level and branch
            // (bind6 then exceeded its 1M-instruction budget). An ALU
            // operation with a value LLVM cannot see through makes it a
            // value of its own.
            // SAFETY: a global nobody writes (0), read as a plain value.
            found_level = level ^ unsafe { core::ptr::read_volatile(&PORTGUARD_UNLINK) };
            found_index = v.policy_index;
            found_id = id;
            found = true;
        }
        level += 1;
    }
    found.then_some((found_level, found_index, found_id))
}

#[inline(always)]
fn set_contains(set_id: u32, port: u16) -> bool {
    if set_id == EMPTY_SET {
        return false;
    }
    let key = PortChunkKey {
        set_id,
        chunk: (port as u32) / PORTS_PER_CHUNK,
    };
    // SAFETY: plain data, read once.
    match unsafe { PORTGUARD_PORTSETS.get(key) } {
        Some(chunk) => chunk.contains(port),
        None => false,
    }
}

/// Whether the set in `slot` allows `port`: named in it, or chosen by the
/// kernel inside the host's ephemeral range where the set has `ephemeral`.
/// Answered from the record when it holds the set inline
/// ([`PolicyRecord::inline_contains`]), else from its chunks.
#[inline(always)]
fn slot_allows(record: &PolicyRecord, slot: usize, q: &Query, ephemeral: u32) -> bool {
    let Some(&set_id) = record.sets.get(slot) else {
        return false;
    };
    // Port 0 is no port a rule can name: bit 0 of a set is its `ephemeral`
    // marker. A query for port 0 asks whether a port the kernel is yet to
    // choose is allowed (an unbound listen() under the BPF LSM), and only
    // with `ephemeral_ok`; without it (a port-0 bind post_bind cannot
    // follow) nothing allows it.
    let ephemeral_ok = if q.port == 0 {
        q.ephemeral_ok
    } else {
        q.ephemeral_ok && in_ephemeral_range(ephemeral, q.port)
    };
    if q.port == 0 && !ephemeral_ok {
        return false;
    }
    // A small set is in the record itself: no port-set lookup.
    if let Some(named) = record.inline_contains(slot, q.port) {
        return named || (ephemeral_ok && record.inline_contains(slot, 0) == Some(true));
    }
    set_contains(set_id, q.port) || (ephemeral_ok && set_contains(set_id, 0))
}

#[inline(always)]
pub fn count(index: u32) {
    if let Some(p) = PORTGUARD_COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, only this CPU writes it while we run.
        unsafe { *p += 1 };
    }
}

/// Count `kind` for the policy in `slot`.
#[inline(always)]
fn count_policy(slot: u32, kind: u32) {
    if let Some(p) = PORTGUARD_POLICY_COUNTERS.get_ptr_mut(policy_counter(slot, kind)) {
        // SAFETY: per-CPU slot, only this CPU writes it while we run.
        unsafe { *p += 1 };
    }
}

/// Count a decision by hook and kind, and by policy and kind.
#[inline(always)]
fn count_decision(q: &Query, record: &PolicyRecord, kind: u32) {
    count(hook_counter(q.hook as u32, kind));
    count_policy(record.slot, kind);
}

/// Judge the creation of a socket of a kind with its own bind (raw, SCTP,
/// L2TP/IP): denied in a cgroup whose policy restricts binds or connects,
/// unless the policy's `allow_sockets` names the kind. `connect_only`: a
/// kind whose binds are judged but whose connects are not (UDP-Lite),
/// denied only where connects are restricted.
#[inline(always)]
pub fn decide_socket_kind(q: &Query, kind: u8, allow_bit: u8, connect_only: bool) -> i32 {
    let Some(gov) = governing() else {
        return ALLOW;
    };
    // SAFETY: pointer into a live array element, plain data.
    let record = unsafe { &*gov.record };
    let restricted =
        record.connect_restricted != 0 || (!connect_only && record.bind_restricted != 0);
    if !restricted || record.allow_sockets & allow_bit != 0 {
        return ALLOW;
    }
    if record.mode == MODE_AUDIT {
        count_decision(q, record, DECISION_AUDIT);
        report_kind(q, &gov, record, VERDICT_AUDIT, kind);
        return ALLOW;
    }
    count_decision(q, record, DECISION_DENY);
    report_kind(q, &gov, record, VERDICT_DENY, kind);
    DENY
}

/// Judge `q`. Returns [`ALLOW`] or [`DENY`], nothing else.
#[inline(always)]
pub fn decide(q: &Query) -> i32 {
    // The upgrade tests' "changed kernel program": the same decisions from
    // different instructions (a helper call the compiler cannot drop).
    #[cfg(feature = "upgrade-test-variant")]
    // SAFETY: a helper without arguments or side effects.
    let _ = unsafe { aya_ebpf::helpers::generated::bpf_ktime_get_ns() };
    let Some(gov) = governing() else {
        return ALLOW;
    };
    // SAFETY: pointer into a live array element, plain data.
    let record = unsafe { &*gov.record };
    let restricted = match q.dir {
        Direction::Bind => record.bind_restricted,
        Direction::Connect => record.connect_restricted,
    };
    if restricted == 0 {
        return ALLOW;
    }
    let proto = Proto::from_ip_protocol(q.protocol);
    let allowed = match proto {
        // Protocols no rule can name are outside every allowed set.
        None => false,
        Some(proto) => {
            let slot = set_slot(q.dir, proto, q.family, q.addr_class);
            let mut ok = slot_allows(record, slot, q, gov.ephemeral);
            if ok && q.dual_stack {
                let v4 = set_slot(q.dir, proto, Family::Ipv4, AddrClass::Any);
                ok = slot_allows(record, v4, q, gov.ephemeral);
            }
            ok
        }
    };
    if allowed {
        count_decision(q, record, DECISION_ALLOW);
        return ALLOW;
    }
    if record.mode == MODE_AUDIT {
        count_decision(q, record, DECISION_AUDIT);
        report(q, &gov, record, VERDICT_AUDIT);
        return ALLOW;
    }
    count_decision(q, record, DECISION_DENY);
    report(
        q,
        &gov,
        record,
        if q.cut_off {
            VERDICT_CUT_OFF
        } else {
            VERDICT_DENY
        },
    );
    DENY
}

/// Count and report a refused attempt to undo a cut-off (the fence's
/// keeper). The refusal holds whoever asks; the event is written when the
/// caller is governed (its policy names who it was).
#[inline(always)]
pub fn refuse(q: &Query) {
    count(hook_counter(q.hook as u32, DECISION_DENY));
    let Some(gov) = governing() else {
        return;
    };
    // SAFETY: pointer into a live array element, plain data.
    let record = unsafe { &*gov.record };
    count_policy(record.slot, DECISION_DENY);
    report(q, &gov, record, VERDICT_DENY);
}

#[inline(always)]
fn report(q: &Query, gov: &Governing, record: &PolicyRecord, verdict: u8) {
    report_kind(q, gov, record, verdict, 0);
}

/// An event the ring buffer had no room for: counted for every policy and
/// for this one.
#[inline(always)]
fn count_lost(slot: u32) {
    count(COUNTER_EVENTS_LOST);
    count_policy(slot, POLICY_EVENTS_LOST);
}

/// Queue an event, within the policy's event budget: beyond it, count it
/// as suppressed; when the ring buffer has no room for it, count the loss.
/// Every call ends in exactly one of written, suppressed or lost.
#[inline(always)]
fn report_kind(q: &Query, gov: &Governing, record: &PolicyRecord, verdict: u8, sock_kind: u8) {
    // SAFETY: helper call with no preconditions.
    let boot_ns = unsafe { bpf_ktime_get_boot_ns() };
    // An event the agent must act on (a cut-off socket to destroy, a UDP
    // socket whose denied autobind kept its port) is never held back by the
    // budget: a tenant's flood of denials must not keep its own cut-off
    // listener from being ended. It can still be lost to a full ring
    // (counted; the fence holds, and the inventory finds it later).
    let must_act = q.cookie != 0
        && (verdict == VERDICT_CUT_OFF
            || (verdict == VERDICT_DENY && q.flags & EVENT_F_AUTOBIND != 0));
    // The policy's bucket on this CPU: per-CPU, so no other program
    // touches it while this one runs, and no count can be lost to a race.
    if !must_act
        && let Some(budget) = PORTGUARD_EVENT_BUDGET.get(0)
        && let Some(tat) = PORTGUARD_EVENT_BUCKETS.get_ptr_mut(record.slot)
    {
        // SAFETY: per-CPU slot, only this CPU touches it while we run.
        let (outcome, next) = budget.judge(unsafe { *tat }, boot_ns, || {
            PORTGUARD_EVENTS.query(BPF_RB_AVAIL_DATA)
        });
        // SAFETY: as above.
        unsafe { *tat = next };
        match outcome {
            EventOutcome::Write => {}
            EventOutcome::Suppress => {
                count_policy(record.slot, POLICY_EVENTS_SUPPRESSED);
                return;
            }
            EventOutcome::Lost => {
                count_lost(record.slot);
                return;
            }
        }
    }
    let Some(mut entry) = PORTGUARD_EVENTS.reserve::<Event>(0) else {
        count_lost(record.slot);
        return;
    };
    // SAFETY: helper call with no preconditions.
    let cgroup_id = unsafe { aya_ebpf::helpers::generated::bpf_get_current_cgroup_id() };
    entry.write(Event {
        boot_ns,
        cgroup_id,
        policy_cgroup_id: gov.cgroup_id(),
        pid_tgid: bpf_get_current_pid_tgid(),
        uid_gid: bpf_get_current_uid_gid(),
        policy_id: record.policy_id,
        addr: q.addr,
        port: q.port,
        hook: q.hook as u8,
        verdict,
        family: q.family as u8,
        protocol: q.protocol,
        flags: q.flags,
        sock_kind,
        comm: bpf_get_current_comm().unwrap_or([0u8; 16]),
        _reserved: 0,
        sock_cookie: q.cookie,
    });
    entry.submit(0);
}
