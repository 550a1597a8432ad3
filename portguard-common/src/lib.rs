//! The ABI shared by portguard's kernel programs and its userspace agent.
//!
//! Everything here is plain `#[repr(C)]` data made of fixed-width integers (no
//! `bool`, no implicit padding), with its size pinned by a `const` assertion, so
//! both sides agree on layout by construction. This crate must stay `no_std` and
//! must not depend on aya except behind the `user` feature.
//!
//! # How the kernel decides (read this before changing anything below)
//!
//! Maps, all sized by userspace before load:
//!
//! - [`MAP_STATE`] (array, 1 entry): [`State`]. `generation` (0 or 1) says which
//!   half of the double-buffered policy tables is live. A reload writes the whole
//!   new policy into the *other* half, then flips `generation` with one map
//!   update, so a concurrent `bind()` sees the old policy or the new one, never a
//!   mix. The dead half is only rewritten at the next reload.
//! - [`MAP_CGROUPS`] (hash): [`CgroupKey`] `{cgroup_id, generation}` ->
//!   [`CgroupValue`]. Only cgroups that carry a policy themselves are present.
//!   A cgroup is governed by its nearest ancestor-or-self present here. The
//!   kernel walks the caller's cgroup ancestry from the generation's
//!   `State::min_level` down to its `State::max_level` (at most
//!   [`MAX_CGROUP_DEPTH`] levels) and keeps the deepest hit. No hit: the cgroup is ungoverned and everything is allowed.
//! - [`MAP_POLICIES`] (array): [`PolicyRecord`], indexed by
//!   `CgroupValue::policy_index` (userspace puts generation-0 records in the
//!   lower half and generation-1 records in the upper half).
//! - [`MAP_PORTSETS`] (hash): [`PortChunkKey`] `{set_id, chunk}` ->
//!   [`PortChunk`]: a 512-port slice of a 65,536-bit port set. Absent chunk = all
//!   512 ports of that slice are outside the set. Set id [`EMPTY_SET`] (0) never
//!   has chunks, so it is the empty set: a zero-filled record allows nothing.
//!   Sets are content-addressed by userspace: identical sets (across policies and
//!   across generations) share one id and one copy of their chunks.
//!
//! A decision is therefore a bounded number of map lookups (one per cgroup
//! level plus one policy record plus one or two chunk lookups), whatever the
//! number of policies, cgroups, rules, ports or ranges.
//!
//! # Port sets
//!
//! Ports are in host byte order. Bit `p` of a set means port `p` is allowed.
//! Bit 0 is never a real port: it means "ephemeral", i.e. a `bind()` to port 0
//! may keep whatever port the kernel chose (policy keyword `ephemeral`).
//! A record holds [`SET_SLOTS`] set ids, one per (direction, protocol, family,
//! address class); see [`set_slot`]. The loopback-class set of a family is
//! always a superset of the any-address set (userspace unions them), so the
//! kernel picks exactly one set per check.
//!
//! Examples (policy YAML -> bits):
//! - `bind: [{ports: [8080]}]`: bit 8080 set in all eight bind sets.
//! - `bind: [{ports: [53], protocol: udp, family: ipv4, address: loopback}]`:
//!   bit 53 set only in the (bind, udp, ipv4, loopback) set.
//! - `bind: []`: `bind_restricted = 1` and every bind set is [`EMPTY_SET`]:
//!   every bind, including port 0, is denied.
//! - no `bind:` key: `bind_restricted = 0`: binds are not checked at all.
#![no_std]

/// Map names. Userspace looks maps up only through these.
pub const MAP_STATE: &str = "PORTGUARD_STATE";
pub const MAP_CGROUPS: &str = "PORTGUARD_CGROUPS";
pub const MAP_POLICIES: &str = "PORTGUARD_POLICIES";
pub const MAP_PORTSETS: &str = "PORTGUARD_PORTSETS";
pub const MAP_EVENTS: &str = "PORTGUARD_EVENTS";
pub const MAP_COUNTERS: &str = "PORTGUARD_COUNTERS";
pub const MAP_POLICY_COUNTERS: &str = "PORTGUARD_POLICY_COUNTERS";
pub const MAP_SOCKETS: &str = "PORTGUARD_SOCKETS";
/// The per-policy event budget ([`EventBudget`], one entry, written by the
/// agent at load) and each policy slot's per-CPU bucket (a `u64` per slot).
pub const MAP_EVENT_BUDGET: &str = "PORTGUARD_EVENT_BUDGET";
pub const MAP_EVENT_BUCKETS: &str = "PORTGUARD_EVENT_BUCKETS";
/// Userspace-only maps, pinned with the rest so a restarted or upgraded
/// agent knows what it adopts: the version stamp ([`AgentStamp`]) and the
/// policy names events refer to ([`PolicyName`]).
pub const MAP_AGENT: &str = "PORTGUARD_AGENT";
pub const MAP_NAMES: &str = "PORTGUARD_NAMES";

/// Every map, in the order `portguard uninstall` lists them.
pub const MAPS: [&str; 12] = [
    MAP_STATE,
    MAP_CGROUPS,
    MAP_POLICIES,
    MAP_PORTSETS,
    MAP_EVENTS,
    MAP_COUNTERS,
    MAP_POLICY_COUNTERS,
    MAP_SOCKETS,
    MAP_EVENT_BUDGET,
    MAP_EVENT_BUCKETS,
    MAP_AGENT,
    MAP_NAMES,
];

mod cache;
pub use cache::*;

/// Version of every map's key and value layout. Bump it whenever a map
/// type in this file changes meaning or size: an agent that finds pinned
/// maps with another layout version rebuilds them instead of reusing them.
/// 4: per-policy counters gained the suppressed and lost kinds
/// ([`POLICY_KINDS`] per slot), and the event budget maps appeared.
/// 5: [`PolicyRecord`] carries small sets inline ([`PolicyRecord::inline`]).
/// 6: [`State::epoch`] (was padding): an agent that does not raise it must
/// not adopt state the cached programs read.
pub const LAYOUT_VERSION: u32 = 6;
/// [`AgentStamp::magic`].
pub const STAMP_MAGIC: u64 = u64::from_le_bytes(*b"PGSTAMP1");

/// [`MAP_AGENT`] value (one entry): what the pinned state was made by.
/// Only userspace reads and writes it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AgentStamp {
    pub magic: u64,
    /// [`LAYOUT_VERSION`] of the agent that created the maps.
    pub layout: u32,
    /// pid of the agent that wrote the stamp last.
    pub pid: u32,
    /// SHA-256 of the kernel object the attached programs came from.
    pub object_sha256: [u8; 32],
    /// Kernel lost-event count the agent had reported when it wrote this.
    pub lost_reported: u64,
    /// Wall-clock time of that write (ms since the Unix epoch): the agent was
    /// alive then. A successor reports events lost since.
    pub alive_unix_ms: u64,
}
const _: () = assert!(size_of::<AgentStamp>() == 64);

/// Longest policy name the kernel-side name map holds.
pub const POLICY_NAME_MAX: usize = 248;

/// [`MAP_NAMES`] value: the name of a policy id (key: `policy_id`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicyName {
    pub len: u32,
    pub _pad: u32,
    pub bytes: [u8; POLICY_NAME_MAX],
}
const _: () = assert!(size_of::<PolicyName>() == 256);

/// Name of the kernel programs' global holding the bit offset of
/// `skc_ipv6only` in `struct sock` (from the running kernel's BTF), or
/// [`V6ONLY_UNKNOWN`]. bind6 reads the bit to tell a dual-stack `[::]` bind
/// from an IPv6-only one (bpf_getsockopt cannot read IPV6_V6ONLY).
pub const GLOBAL_V6ONLY_BIT: &str = "PORTGUARD_V6ONLY_BIT";
/// The offset is unknown: every bind to `[::]` is judged as dual-stack.
pub const V6ONLY_UNKNOWN: u32 = u32::MAX;
/// bind6 copies this many leading bytes of `struct sock`; the bit must lie
/// inside them.
pub const SOCK_PREFIX_BYTES: u32 = 32;

/// Name of the kernel programs' global holding [`SockOffsets`] for the
/// running kernel (from its BTF), used by the LSM hooks to read sockets.
pub const GLOBAL_SOCK_OFFSETS: &str = "PORTGUARD_SOCK_OFFSETS";

/// Byte offsets of the socket fields the LSM hooks read, from the running
/// kernel's BTF. `valid == 0`: unknown (the LSM programs are not loaded).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockOffsets {
    pub valid: u32,
    /// `struct socket`: `sk`.
    pub socket_sk: u32,
    /// `struct sock_common` (first member of `struct sock`): `skc_family` (u16).
    pub skc_family: u32,
    /// `skc_num` (u16, local port, host order).
    pub skc_num: u32,
    /// `skc_rcv_saddr` (u32, local IPv4 address, network order).
    pub skc_rcv_saddr: u32,
    /// `skc_v6_rcv_saddr` (16 bytes).
    pub skc_v6_rcv_saddr: u32,
    /// `struct sock`: `sk_protocol` (u16).
    pub sk_protocol: u32,
    /// Bit offset of `skc_ipv6only`.
    pub ipv6only_bit: u32,
}
const _: () = assert!(size_of::<SockOffsets>() == 32);

/// Name of the cached object's global holding [`CacheOffsets`] (from the
/// running kernel's BTF).
pub const GLOBAL_CACHE_OFFSETS: &str = "PORTGUARD_CACHE_OFFSETS";

/// Byte offsets the cached programs follow from the current task to its
/// cgroup (`task->cgroups->dfl_cgrp`) and from a cgroup to its id, level
/// and parent (BTF-typed loads the verifier checks against the kernel's
/// BTF), from the running kernel's BTF. 0 in `task_cgroups`: unknown (then
/// the agent does not load the cached object).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheOffsets {
    /// `struct task_struct`: `cgroups` (`struct css_set *`).
    pub task_cgroups: u32,
    /// `struct css_set`: `dfl_cgrp` (`struct cgroup *`).
    pub css_set_dfl_cgrp: u32,
    /// `struct cgroup`: `level` (int).
    pub cgroup_level: u32,
    /// `struct cgroup`: `kn` (`struct kernfs_node *`).
    pub cgroup_kn: u32,
    /// `struct kernfs_node`: `id` (u64, the cgroup id).
    pub kernfs_node_id: u32,
    /// `struct cgroup`: `self.parent` (`struct cgroup_subsys_state *`).
    pub cgroup_parent_css: u32,
    /// `struct cgroup_subsys_state`: `cgroup` (`struct cgroup *`).
    pub css_cgroup: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<CacheOffsets>() == 32);

/// cgroup programs (the Rust function names in portguard-ebpf) and the
/// [`Hook`] each one reports. The packet guard is [`GUARD_PROGRAM`].
pub const PROGRAMS: [(&str, Hook); 9] = [
    ("portguard_bind4", Hook::Bind4),
    ("portguard_bind6", Hook::Bind6),
    ("portguard_post_bind4", Hook::PostBind4),
    ("portguard_post_bind6", Hook::PostBind6),
    ("portguard_connect4", Hook::Connect4),
    ("portguard_connect6", Hook::Connect6),
    ("portguard_sendmsg4", Hook::Sendmsg4),
    ("portguard_sendmsg6", Hook::Sendmsg6),
    ("portguard_sock_create", Hook::SockCreate),
];

/// Fallback for `listen()` checks where the BPF LSM is unusable: a
/// `sock_ops` program that judges every new TCP listener right after
/// `listen()` (`BPF_SOCK_OPS_TCP_LISTEN_CB`). It cannot make listen() fail;
/// a listener on a port its policy does not allow is cut off: fenced
/// ([`FENCE_IFINDEX`]) and reported with [`VERDICT_CUT_OFF`].
pub const SOCK_OPS_PROGRAM: &str = "portguard_sock_ops";

/// The fence's keeper (`cgroup/setsockopt`, attached on the cgroup2 root
/// like the rest, so it runs for every socket whoever created it): refuses
/// `SO_BINDTODEVICE` and `SO_BINDTOIFINDEX` on a fenced socket, so its
/// process cannot bind it back to a real device. Any other option costs one
/// comparison.
pub const FENCE_PROGRAM: &str = "portguard_setsockopt";

/// The packet guard (`cgroup_skb/ingress`): drops every packet addressed to
/// a socket marked [`GUARD_CUT`]. Not attached in normal operation (it
/// would cost every packet on the host): the agent attaches it to the
/// cgroup2 root only while a cut-off socket exists that neither the fence
/// nor `SOCK_DESTROY` could end, and detaches it when that socket is gone.
pub const GUARD_PROGRAM: &str = "portguard_ingress";

/// The fence: the interface index a cut-off socket is bound to
/// (`SO_BINDTOIFINDEX`, set by the kernel program that cut it off). No
/// interface has it, so the kernel's socket lookup never matches the
/// socket again: a SYN to a fenced listener gets a reset, a datagram to a
/// fenced UDP socket an ICMP port unreachable. It costs nothing per packet,
/// holds for every socket whichever cgroup created it, and outlives the
/// agent. Interface indexes are allocated from 1 upwards.
pub const FENCE_IFINDEX: i32 = i32::MAX;
/// `SOL_SOCKET`, `SO_BINDTODEVICE` and `SO_BINDTOIFINDEX` (asm-generic).
pub const SOL_SOCKET: i32 = 1;
pub const SO_BINDTODEVICE: i32 = 25;
pub const SO_BINDTOIFINDEX: i32 = 62;

/// BPF LSM programs (cgroup-scoped, `lsm_cgroup`): the kernel LSM hook each
/// attaches to and the [`Hook`] it reports. They need the BPF LSM to be
/// active and kernel BTF; without them, `listen()`/`accept()` are not checked.
pub const LSM_PROGRAMS: [(&str, &str, Hook); 2] = [
    ("portguard_listen", "socket_listen", Hook::Listen),
    ("portguard_accept", "socket_accept", Hook::Accept),
];

/// Deepest cgroup level the kernel walks (the cgroup2 root is level 0).
/// Userspace refuses policies on cgroups deeper than this, so a policy can
/// never silently fail to match.
pub const MAX_CGROUP_DEPTH: u32 = 32;

/// Set id of the empty port set. Never has chunks.
pub const EMPTY_SET: u32 = 0;

/// Ports per [`PortChunk`].
pub const PORTS_PER_CHUNK: u32 = 512;
/// Chunks per full 65,536-port set.
pub const CHUNKS_PER_SET: u32 = 65536 / PORTS_PER_CHUNK;

/// Number of port-set ids in a [`PolicyRecord`].
pub const SET_SLOTS: usize = 16;

/// Ranges a [`PolicyRecord`] holds inline per slot: a set of at most this
/// many ranges (`[8080]`, `[ephemeral, 8080]`, `["30000-30100"]`) is
/// judged from the record itself, without a [`MAP_PORTSETS`] lookup.
pub const INLINE_RANGES: usize = 2;

/// Direction of a check. `Connect` covers `connect()` and unconnected UDP
/// `sendmsg()`/`sendto()`; the port and address are the destination's.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Bind = 0,
    Connect = 1,
}

/// Protocol classes a rule can name. Anything else (SCTP, raw, ...) never
/// matches a rule, so in a restricted direction it is denied.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Tcp = 0,
    Udp = 1,
}

impl Proto {
    /// The protocol a rule names for a socket's raw IP protocol: TCP (an
    /// MPTCP socket binds and connects through TCP subflows) or UDP; `None`
    /// for any other (UDP-Lite, ...), which no rule can name. The kernel's
    /// decision and the userspace model both use this.
    #[inline(always)]
    pub const fn from_ip_protocol(protocol: u8) -> Option<Self> {
        match protocol {
            IPPROTO_TCP => Some(Self::Tcp),
            IPPROTO_UDP => Some(Self::Udp),
            _ => None,
        }
    }
}

/// Address families a rule can name. An IPv4-mapped IPv6 address
/// (`::ffff:a.b.c.d`) is judged as [`Family::Ipv4`].
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Ipv4 = 0,
    Ipv6 = 1,
}

/// Address classes. `Loopback` is 127.0.0.0/8, `::1` and `::ffff:127.0.0.0/104`;
/// for a destination, also the unspecified address (see [`AddrRole`]).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddrClass {
    Any = 0,
    Loopback = 1,
}

/// Which end of a socket an address names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddrRole {
    /// The local address a socket binds or listens on. `0.0.0.0` and `::`
    /// are every address, not loopback.
    Local,
    /// A destination (`connect()`, `sendmsg()`): the kernel sends to the
    /// unspecified address as to this host, so it counts as loopback.
    Destination,
}

/// What an address means for policy. The one classifier: the kernel
/// programs judge with it, and the agent's rule explanations and `learn`
/// read events with it, so they can never disagree with a decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AddrView {
    /// The family it is judged as: an IPv4-mapped IPv6 address is IPv4, so
    /// an IPv4 rule holds for the mapped form too.
    pub family: Family,
    pub class: AddrClass,
    /// Network-order address bytes as judged (IPv4 in the first four).
    pub addr: [u8; 16],
    /// It was IPv4-mapped IPv6 (`::ffff:a.b.c.d`).
    pub v4_mapped: bool,
    /// The IPv6 unspecified address `::` (dual-stack unless `IPV6_V6ONLY`).
    pub unspecified_v6: bool,
}

/// Classify an IPv4 address given as its four network-order bytes.
#[inline(always)]
pub const fn classify_v4(o: [u8; 4], role: AddrRole) -> AddrView {
    let unspecified = o[0] == 0 && o[1] == 0 && o[2] == 0 && o[3] == 0;
    let loopback = o[0] == 127 || (unspecified && matches!(role, AddrRole::Destination));
    AddrView {
        family: Family::Ipv4,
        class: if loopback {
            AddrClass::Loopback
        } else {
            AddrClass::Any
        },
        addr: [o[0], o[1], o[2], o[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        v4_mapped: false,
        unspecified_v6: false,
    }
}

/// Classify an IPv6 address given as its sixteen network-order bytes. An
/// IPv4-mapped address is classified as the IPv4 address it maps.
#[inline(always)]
pub const fn classify_v6(o: [u8; 16], role: AddrRole) -> AddrView {
    let zero10 = o[0] == 0
        && o[1] == 0
        && o[2] == 0
        && o[3] == 0
        && o[4] == 0
        && o[5] == 0
        && o[6] == 0
        && o[7] == 0
        && o[8] == 0
        && o[9] == 0;
    if zero10 && o[10] == 0xff && o[11] == 0xff {
        let mut v = classify_v4([o[12], o[13], o[14], o[15]], role);
        v.v4_mapped = true;
        return v;
    }
    let zero15 = zero10 && o[10] == 0 && o[11] == 0 && o[12] == 0 && o[13] == 0 && o[14] == 0;
    let unspecified = zero15 && o[15] == 0;
    let loopback = zero15 && o[15] == 1;
    AddrView {
        family: Family::Ipv6,
        class: if loopback || (unspecified && matches!(role, AddrRole::Destination)) {
            AddrClass::Loopback
        } else {
            AddrClass::Any
        },
        addr: o,
        v4_mapped: false,
        unspecified_v6: unspecified,
    }
}

/// [`classify_v4`] or [`classify_v6`] for a `core::net` address.
pub const fn classify_ip(addr: core::net::IpAddr, role: AddrRole) -> AddrView {
    match addr {
        core::net::IpAddr::V4(a) => classify_v4(a.octets(), role),
        core::net::IpAddr::V6(a) => classify_v6(a.octets(), role),
    }
}

/// Index into [`PolicyRecord::sets`] for one (direction, protocol, family,
/// address class). NB: userspace's compiler and the kernel both use only this.
#[inline(always)]
pub const fn set_slot(dir: Direction, proto: Proto, family: Family, addr: AddrClass) -> usize {
    (dir as usize) * 8 + (proto as usize) * 4 + (family as usize) * 2 + (addr as usize)
}

/// [`MAP_STATE`] value.
///
/// Per-generation fields are indexed by generation. A reload first writes the
/// new generation's fields (leaving `generation` unchanged), then flips
/// `generation` in a second update that rewrites the same values, so a reader
/// that sees a torn copy still pairs a generation with that generation's bounds.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct State {
    /// Live generation: 0 or 1.
    pub generation: u32,
    /// The cache epoch: the per-cgroup policy cache of the cached programs
    /// ([`cache_word`]) holds answers stamped with the epoch and generation
    /// they were found in, and only an answer stamped with the current ones
    /// is used. The agent raises it (never to 0, never back) in the update
    /// that flips `generation`, and in an update of its own after every
    /// cgroup entry it inserts into the live generation, so no answer found
    /// before a change outlives it. 0 (an agent that predates the cache):
    /// nothing is cached.
    pub epoch: u32,
    /// Shallowest cgroup level holding a policy, per generation; the ancestor
    /// walk starts there.
    pub min_level: [u32; 2],
    /// Deepest cgroup level holding a policy, per generation; the ancestor
    /// walk stops there.
    pub max_level: [u32; 2],
    /// Number of governed cgroups, per generation. 0: the kernel allows
    /// everything without walking the ancestry.
    pub cgroups: [u32; 2],
    /// The host's ephemeral port range (`net.ipv4.ip_local_port_range` of
    /// the initial network namespace), `low << 16 | high`, written by the
    /// agent at start and whenever it changes. A port the kernel chose for a
    /// socket counts as `ephemeral` only inside it: a workload that owns its
    /// network namespace can narrow its own range onto any port it likes.
    /// 0: unknown (the kernel assumes [`DEFAULT_EPHEMERAL`]).
    pub ephemeral: u32,
    pub _pad2: u32,
}
const _: () = assert!(size_of::<State>() == 40);

/// Linux's default `ip_local_port_range`, packed as in [`State::ephemeral`].
pub const DEFAULT_EPHEMERAL: u32 = (32768 << 16) | 60999;

/// Whether `port` lies in a packed ephemeral range ([`State::ephemeral`];
/// 0 stands for [`DEFAULT_EPHEMERAL`]).
#[inline(always)]
pub const fn in_ephemeral_range(packed: u32, port: u16) -> bool {
    let packed = if packed == 0 {
        DEFAULT_EPHEMERAL
    } else {
        packed
    };
    let (lo, hi) = ((packed >> 16) as u16, packed as u16);
    port != 0 && lo <= port && port <= hi
}

/// [`MAP_CGROUPS`] key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CgroupKey {
    /// cgroup v2 id (the inode number of its directory).
    pub cgroup_id: u64,
    /// Generation this entry belongs to (0 or 1).
    pub generation: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<CgroupKey>() == 16);

/// [`MAP_CGROUPS`] value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CgroupValue {
    /// Absolute index into [`MAP_POLICIES`].
    pub policy_index: u32,
}
const _: () = assert!(size_of::<CgroupValue>() == 4);

/// [`PolicyRecord::allow_sockets`]: raw IP sockets (`SOCK_RAW`).
pub const SOCK_ALLOW_RAW: u8 = 1;
/// SCTP sockets (own bind: `sctp_bind`).
pub const SOCK_ALLOW_SCTP: u8 = 2;
/// L2TP/IP sockets (own bind: `l2tp_ip_bind`).
pub const SOCK_ALLOW_L2TP: u8 = 4;

/// [`Event::sock_kind`] values for `sock_create` events.
pub const SOCK_KIND_RAW: u8 = 1;
pub const SOCK_KIND_SCTP: u8 = 2;
pub const SOCK_KIND_L2TP: u8 = 3;
/// An IPv4/IPv6 socket of a protocol portguard does not know (SMC, DCCP, a
/// protocol added after this was written): it may take ports without any
/// hook portguard sees, so a restricted cgroup cannot create it.
pub const SOCK_KIND_OTHER: u8 = 4;

pub const SOCK_STREAM: u32 = 1;
pub const SOCK_DGRAM: u32 = 2;
pub const SOCK_RAW: u32 = 3;
pub const IPPROTO_ICMP: u32 = 1;
pub const IPPROTO_ICMPV6: u32 = 58;
pub const IPPROTO_UDPLITE: u32 = 136;
pub const IPPROTO_MPTCP: u32 = 262;

/// What a restricted cgroup may create, by (type, protocol) of an IPv4 or
/// IPv6 socket. An allow-list: what is not known is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SocketClass {
    /// TCP, MPTCP, UDP (whose binds, listens, connects and sends the port
    /// hooks judge) and ICMP echo ("ping") sockets (which have no port).
    Judged,
    /// UDP-Lite: its binds and unconnected sends are judged, but its
    /// `connect()` runs no connect hook (the kernel's `udplite_prot` has no
    /// `pre_connect`, which is where cgroup/connect4/6 run), and a connected
    /// socket's sends run no sendmsg hook either. Refused (as
    /// [`SOCK_KIND_OTHER`]) where connects are restricted; found by the
    /// differential tests (`difftest_udplite_connect_is_judged`).
    ConnectUnjudged,
    /// A kind with its own bind that the port hooks never see, allowed only
    /// by the policy's `allow_sockets` bit: (`SOCK_KIND_*`, `SOCK_ALLOW_*`).
    OwnBind(u8, u8),
    /// Anything else ([`SOCK_KIND_OTHER`]): refused in a restricted cgroup.
    Unknown,
}

/// Classify an IPv4/IPv6 socket by its type (without `SOCK_NONBLOCK` and
/// `SOCK_CLOEXEC`, as the kernel stores it) and protocol (0 is the type's
/// default: TCP for streams, UDP for datagrams).
#[inline(always)]
pub const fn classify_socket(ty: u32, protocol: u32) -> SocketClass {
    match (ty, protocol) {
        (SOCK_RAW, _) => SocketClass::OwnBind(SOCK_KIND_RAW, SOCK_ALLOW_RAW),
        (SOCK_STREAM | SOCK_SEQPACKET, p) if p == IPPROTO_SCTP as u32 => {
            SocketClass::OwnBind(SOCK_KIND_SCTP, SOCK_ALLOW_SCTP)
        }
        (SOCK_DGRAM, p) if p == IPPROTO_L2TP as u32 => {
            SocketClass::OwnBind(SOCK_KIND_L2TP, SOCK_ALLOW_L2TP)
        }
        (SOCK_STREAM, 0 | IPPROTO_MPTCP) => SocketClass::Judged,
        (SOCK_STREAM, p) if p == IPPROTO_TCP as u32 => SocketClass::Judged,
        (SOCK_DGRAM, IPPROTO_UDPLITE) => SocketClass::ConnectUnjudged,
        (SOCK_DGRAM, 0 | IPPROTO_ICMP | IPPROTO_ICMPV6) => SocketClass::Judged,
        (SOCK_DGRAM, p) if p == IPPROTO_UDP as u32 => SocketClass::Judged,
        _ => SocketClass::Unknown,
    }
}
pub const SOCK_SEQPACKET: u32 = 5;

pub const IPPROTO_SCTP: u8 = 132;
pub const IPPROTO_L2TP: u8 = 115;

/// Policy modes.
pub const MODE_ENFORCE: u8 = 0;
/// Allow, but report what would have been denied (verdict `audit`).
pub const MODE_AUDIT: u8 = 1;

/// [`MAP_POLICIES`] value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyRecord {
    /// Stable id of the policy for this agent's lifetime; events carry it and
    /// userspace maps it back to the policy name.
    pub policy_id: u32,
    /// [`MODE_ENFORCE`] or [`MODE_AUDIT`].
    pub mode: u8,
    /// 1: binds are checked against the bind sets; 0: binds are unrestricted.
    pub bind_restricted: u8,
    /// 1: connects/sends are checked against the connect sets; 0: unrestricted.
    pub connect_restricted: u8,
    /// `SOCK_ALLOW_*` bits: socket kinds with their own bind (which the bind
    /// hooks never see) that this policy lets its cgroups create. Only
    /// consulted when binds or connects are restricted.
    pub allow_sockets: u8,
    /// Port-set ids, indexed by [`set_slot`].
    pub sets: [u32; SET_SLOTS],
    /// The record's slot (stable while the policy exists): its row in
    /// [`MAP_POLICY_COUNTERS`].
    pub slot: u32,
    /// Per slot: how many of its set's ranges `inline` holds, which are
    /// then all of them (1..=[`INLINE_RANGES`]); 0: the set is looked up
    /// in [`MAP_PORTSETS`] (a larger set, or no set).
    pub inline_count: [u8; SET_SLOTS],
    /// Per slot, its set's ranges as `lo, hi` pairs (inclusive, host
    /// order), when `inline_count` says so; zero otherwise.
    pub inline: [[u16; 2 * INLINE_RANGES]; SET_SLOTS],
}
const _: () = assert!(size_of::<PolicyRecord>() == 76 + SET_SLOTS * (1 + 4 * INLINE_RANGES));

impl PolicyRecord {
    /// Put the set in `slot` inline when it has at most [`INLINE_RANGES`]
    /// ranges (`ranges`: sorted, inclusive); otherwise leave the slot to
    /// [`MAP_PORTSETS`]. The set id in `sets[slot]` stays either way.
    pub fn set_inline(&mut self, slot: usize, ranges: &[(u16, u16)]) {
        let (Some(count), Some(inline)) =
            (self.inline_count.get_mut(slot), self.inline.get_mut(slot))
        else {
            return;
        };
        *inline = [0; 2 * INLINE_RANGES];
        if ranges.is_empty() || ranges.len() > INLINE_RANGES {
            *count = 0;
            return;
        }
        for (i, &(lo, hi)) in ranges.iter().enumerate() {
            inline[2 * i] = lo;
            inline[2 * i + 1] = hi;
        }
        *count = ranges.len() as u8;
    }

    /// Whether the set in `slot` holds `port`, answered from the record:
    /// `None` when the slot is not inline (ask [`MAP_PORTSETS`]). Port 0
    /// is the "ephemeral" pseudo-port, as in the chunks.
    #[inline(always)]
    pub fn inline_contains(&self, slot: usize, port: u16) -> Option<bool> {
        let n = *self.inline_count.get(slot)?;
        if n == 0 {
            return None;
        }
        let r = self.inline.get(slot)?;
        // Unrolled for the verifier: [`INLINE_RANGES`] is 2.
        Some((r[0] <= port && port <= r[1]) || (n > 1 && r[2] <= port && port <= r[3]))
    }
}
const _: () = assert!(INLINE_RANGES == 2);

/// [`MAP_PORTSETS`] key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PortChunkKey {
    pub set_id: u32,
    /// `port / PORTS_PER_CHUNK`.
    pub chunk: u32,
}
const _: () = assert!(size_of::<PortChunkKey>() == 8);

/// [`MAP_PORTSETS`] value: bit `p % 512` of word `(p % 512) / 64`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PortChunk {
    pub bits: [u64; 8],
}
const _: () = assert!(size_of::<PortChunk>() == 64);

impl PortChunk {
    #[inline(always)]
    pub const fn contains(&self, port: u16) -> bool {
        let bit = (port as u32) % PORTS_PER_CHUNK;
        (self.bits[(bit / 64) as usize] >> (bit % 64)) & 1 == 1
    }
}

/// [`MAP_SOCKETS`] (socket-local storage) value. bind4/bind6 create it
/// for a bind to port 0, which post_bind4/post_bind6 must judge on the port
/// the kernel picks; post_bind allows every other bind at the cost of one
/// storage lookup (bind4/bind6 already judged the explicit port). The
/// listen reporter and the UDP send hooks create it for a socket they cut
/// off ([`GUARD_CUT`]), which the packet guard reads where it is attached.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketState {
    /// 1: the last bind() on this socket asked for port 0; post_bind judges it.
    pub port0_pending: u32,
    /// The port of the last `[::]` bind (explicit port) of this socket that
    /// bind6 judged as dual-stack and allowed, so post_bind6 need not judge
    /// it again; 0: none. (Unused in layout 2, whose programs never wrote
    /// it: 0 in storage they made. Programs before the port was kept wrote
    /// 1.)
    pub dual_stack: u32,
    /// [`GUARD_OPEN`] or [`GUARD_CUT`]: what the packet guard does with
    /// traffic addressed to this socket.
    pub guard: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<SocketState>() == 16);

/// [`SocketState::guard`]: traffic to the socket flows.
pub const GUARD_OPEN: u32 = 0;
/// The socket took a port its governing policy does not allow, at a hook
/// that cannot deny (listen() without the BPF LSM, a UDP autobind): it is
/// fenced ([`FENCE_IFINDEX`]) and the agent destroys it; where neither
/// holds, the packet guard (`cgroup_skb/ingress`) drops what is addressed
/// to it.
pub const GUARD_CUT: u32 = 1;

/// Name of the kernel programs' global holding the byte offset of
/// `sk_userlocks` in `struct sock` (from the running kernel's BTF), or
/// [`USERLOCKS_UNKNOWN`]. Its `SOCK_BINDPORT_LOCK` bit is set by a bind()
/// that named its port, never by a bind to port 0 or an autobind: it tells a
/// port the kernel chose (which `ephemeral` may allow) from one someone
/// asked for.
pub const GLOBAL_USERLOCKS: &str = "PORTGUARD_USERLOCKS_OFFSET";
/// Unknown offset: every bound port counts as asked for (the stricter
/// reading: `ephemeral` allows only what post_bind judged).
pub const USERLOCKS_UNKNOWN: u32 = u32::MAX;
/// `SOCK_BINDPORT_LOCK` (include/net/sock.h).
pub const SOCK_BINDPORT_LOCK: u8 = 8;

/// Which hook produced an event. NB: the agent's `hook` event field and the
/// hook table of docs/events.md use [`Hook::name`]; keep them in step.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Hook {
    Bind4 = 1,
    Bind6 = 2,
    PostBind4 = 3,
    PostBind6 = 4,
    Connect4 = 5,
    Connect6 = 6,
    Sendmsg4 = 7,
    Sendmsg6 = 8,
    Listen = 9,
    Accept = 10,
    SockCreate = 11,
    /// The packet guard ([`GUARD_PROGRAM`]). It makes no decision of its
    /// own and writes no event: it drops traffic to sockets a hook cut off
    /// (counted at [`COUNTER_GUARD_DROPS`]).
    Ingress = 12,
    /// The fence's keeper ([`FENCE_PROGRAM`]): a refused attempt to bind a
    /// fenced socket back to a device.
    Setsockopt = 13,
}

impl Hook {
    pub const fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Bind4,
            2 => Self::Bind6,
            3 => Self::PostBind4,
            4 => Self::PostBind6,
            5 => Self::Connect4,
            6 => Self::Connect6,
            7 => Self::Sendmsg4,
            8 => Self::Sendmsg6,
            9 => Self::Listen,
            10 => Self::Accept,
            11 => Self::SockCreate,
            12 => Self::Ingress,
            13 => Self::Setsockopt,
            _ => return None,
        })
    }

    pub const fn name(self) -> &'static str {
        match self {
            Self::Bind4 => "bind4",
            Self::Bind6 => "bind6",
            Self::PostBind4 => "post_bind4",
            Self::PostBind6 => "post_bind6",
            Self::Connect4 => "connect4",
            Self::Connect6 => "connect6",
            Self::Sendmsg4 => "sendmsg4",
            Self::Sendmsg6 => "sendmsg6",
            Self::Listen => "listen",
            Self::Accept => "accept",
            Self::SockCreate => "sock_create",
            Self::Ingress => "ingress",
            Self::Setsockopt => "setsockopt",
        }
    }
}

/// Event verdicts.
pub const VERDICT_DENY: u8 = 1;
/// Audit mode: the operation was allowed but the policy would have denied it.
pub const VERDICT_AUDIT: u8 = 2;
/// Enforce mode, but the hook cannot deny: reported only. Agents before
/// layout 2 used it for `listen()` without the BPF LSM; since then such a
/// listener is cut off ([`VERDICT_CUT_OFF`]). Kept for old event logs.
pub const VERDICT_REPORTED: u8 = 3;
/// Enforce mode, at a hook that cannot make the call fail (`listen()`
/// without the BPF LSM): the socket is cut off instead (fenced,
/// [`FENCE_IFINDEX`]).
pub const VERDICT_CUT_OFF: u8 = 4;

/// [`Event::flags`]: the address was IPv4-mapped IPv6 and was judged as IPv4.
pub const EVENT_F_V4_MAPPED: u8 = 1;
/// [`Event::flags`]: a dual-stack bind to `[::]`, judged against both families.
pub const EVENT_F_DUAL_STACK: u8 = 2;
/// [`Event::flags`]: `listen()` on an unbound socket (the kernel would pick
/// the port): judged as the "ephemeral" pseudo-port.
pub const EVENT_F_AUTOBIND: u8 = 4;

/// Ring-buffer record for a denied (or audited) operation.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// `bpf_ktime_get_boot_ns()`; userspace converts it to wall-clock time.
    pub boot_ns: u64,
    /// cgroup of the calling task.
    pub cgroup_id: u64,
    /// cgroup whose policy decided (the caller's cgroup or an ancestor).
    pub policy_cgroup_id: u64,
    /// `bpf_get_current_pid_tgid()`: tgid (pid) in the upper 32 bits, tid below.
    pub pid_tgid: u64,
    /// `bpf_get_current_uid_gid()`: gid in the upper 32 bits, uid below.
    pub uid_gid: u64,
    /// [`PolicyRecord::policy_id`].
    pub policy_id: u32,
    /// Address judged, as 16 bytes in network order. IPv4 addresses (including
    /// the IPv4 of a mapped address) are stored in the first 4 bytes.
    pub addr: [u8; 16],
    /// Port judged, host order (the chosen port for post_bind).
    pub port: u16,
    /// [`Hook`] as u8.
    pub hook: u8,
    /// [`VERDICT_DENY`] or [`VERDICT_AUDIT`].
    pub verdict: u8,
    /// [`Family`] the address was judged as.
    pub family: u8,
    /// IP protocol number of the socket (6 = TCP, 17 = UDP, ...).
    pub protocol: u8,
    /// `EVENT_F_*` bits.
    pub flags: u8,
    /// `SOCK_KIND_*` for `sock_create` events, else 0.
    pub sock_kind: u8,
    /// `bpf_get_current_comm()`.
    pub comm: [u8; 16],
    pub _reserved: u32,
    /// The socket's cookie (`bpf_get_socket_cookie`) where the hook has the
    /// socket and the agent may act on it (cut-off sockets), else 0.
    pub sock_cookie: u64,
}
const _: () = assert!(size_of::<Event>() == 96);

/// Decision kinds counted in [`MAP_COUNTERS`] and [`MAP_POLICY_COUNTERS`].
pub const DECISION_ALLOW: u32 = 0;
/// Denied in enforce mode (the call failed, or its socket was cut off).
pub const DECISION_DENY: u32 = 1;
/// Allowed in audit mode, but enforce mode would have denied it.
pub const DECISION_AUDIT: u32 = 2;
/// A violation that could only be reported (see [`VERDICT_REPORTED`]).
/// Cut-off sockets ([`VERDICT_CUT_OFF`]) count as [`DECISION_DENY`]: the
/// policy was enforced.
pub const DECISION_REPORTED: u32 = 3;
pub const DECISIONS: u32 = 4;
/// Hook values are 1..=HOOKS.
pub const HOOKS: u32 = 13;

/// [`MAP_COUNTERS`] (a per-CPU array of u64): decisions of every governed
/// operation by hook and kind, at `hook * DECISIONS + kind` (row 0 unused),
/// then the events the ring buffer could not take.
pub const fn hook_counter(hook: u32, kind: u32) -> u32 {
    hook * DECISIONS + kind
}
/// Events that could not be queued because the ring buffer was full.
pub const COUNTER_EVENTS_LOST: u32 = (HOOKS + 1) * DECISIONS;
/// Packets the packet guard dropped (addressed to a cut-off socket).
pub const COUNTER_GUARD_DROPS: u32 = COUNTER_EVENTS_LOST + 1;
/// Cut-off sockets the kernel would not fence (`bpf_setsockopt` failed: the
/// socket was bound to a device by a process without `CAP_NET_RAW`).
pub const COUNTER_FENCE_FAILED: u32 = COUNTER_GUARD_DROPS + 1;
/// Cut-off sockets the kernel could not mark for the packet guard (no
/// memory for socket storage: a tenant can fill its socket's option memory
/// on purpose).
pub const COUNTER_MARK_FAILED: u32 = COUNTER_FENCE_FAILED + 1;
pub const COUNTERS: u32 = COUNTER_MARK_FAILED + 1;

/// [`MAP_POLICY_COUNTERS`] kind: a decision of the policy that would have
/// written an event, but the policy's event budget ([`EventBudget`]) was
/// spent, so it was only counted here.
pub const POLICY_EVENTS_SUPPRESSED: u32 = DECISIONS;
/// [`MAP_POLICY_COUNTERS`] kind: an event of the policy the ring buffer had
/// no room for (also counted, for every policy together, at
/// [`COUNTER_EVENTS_LOST`]).
pub const POLICY_EVENTS_LOST: u32 = DECISIONS + 1;
/// Counters per policy slot: the `DECISION_*` kinds, then
/// [`POLICY_EVENTS_SUPPRESSED`] and [`POLICY_EVENTS_LOST`]. For every policy,
/// events written + suppressed + lost = its deny + audit + reported
/// decisions.
pub const POLICY_KINDS: u32 = DECISIONS + 2;

/// [`MAP_POLICY_COUNTERS`] (a per-CPU array of u64, [`POLICY_KINDS`] per
/// policy slot): decisions and event outcomes by policy and kind, at
/// `slot * POLICY_KINDS + kind`.
pub const fn policy_counter(slot: u32, kind: u32) -> u32 {
    slot * POLICY_KINDS + kind
}

/// `bpf_ringbuf_query` flag: bytes written to the ring and not yet consumed.
pub const BPF_RB_AVAIL_DATA: u64 = 0;
/// Bytes one event takes in the ring buffer: the record and its 8-byte
/// header.
pub const EVENT_RECORD_BYTES: u64 = size_of::<Event>() as u64 + 8;
/// The first this-many denials of a policy after its bucket was full (at
/// most half its burst, at least one) are "first denials": they may use the
/// ring buffer's reserve.
pub const FIRST_DENIALS: u32 = 4;

/// [`MAP_EVENT_BUDGET`] value: how many events each policy may write.
///
/// Fairness between policies: every policy slot has its own bucket (one
/// `u64` per CPU in [`MAP_EVENT_BUCKETS`]; the budget is therefore per
/// policy **per CPU**), a GCRA token bucket: `rate` events per second with
/// bursts of `burst`. The bucket holds the theoretical arrival time `tat`
/// (boot ns); an event at `now` is within budget when
/// `max(tat, now) - now <= tau_ns`, and then moves `tat` on by
/// `interval_ns`. Beyond the budget the decision is still made and counted,
/// and counted again at [`POLICY_EVENTS_SUPPRESSED`]: no event is written.
///
/// The ring buffer's last quarter is a reserve for first denials: an event
/// that is not among its policy's first [`FIRST_DENIALS`] since the bucket
/// was full is written only while the ring holds at most `room_bytes`
/// (else it is lost, counted at [`POLICY_EVENTS_LOST`]). A flood by one
/// policy is thus held to its own budget and to three quarters of the ring:
/// another policy's first denials find room even when the agent is not
/// reading.
///
/// `interval_ns == 0`: no budget (every event is written while the ring has
/// room; nothing is suppressed and there is no reserve). The bucket is only
/// touched when an event would be written, never on the allow path.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventBudget {
    /// Nanoseconds per event: `1e9 / rate` (0: unlimited).
    pub interval_ns: u64,
    /// `(burst - 1) * interval_ns`: how far `tat` may run ahead of now.
    pub tau_ns: u64,
    /// `(first - 1) * interval_ns`, `first` = min(FIRST_DENIALS,
    /// burst / 2) but at least 1: an event whose bucket lags this little is
    /// a first denial and may use the reserve.
    pub quiet_ns: u64,
    /// Other events are written only while the ring holds at most this
    /// many bytes (three quarters of it, less one record).
    pub room_bytes: u64,
}
const _: () = assert!(size_of::<EventBudget>() == 32);

impl EventBudget {
    /// The budget for `rate` events per second (0: unlimited) in bursts of
    /// `burst` (at least 1), per policy and CPU, on a ring of `ring_bytes`.
    pub const fn new(rate: u32, burst: u32, ring_bytes: u32) -> Self {
        if rate == 0 {
            return Self {
                interval_ns: 0,
                tau_ns: 0,
                quiet_ns: 0,
                room_bytes: 0,
            };
        }
        let burst = if burst == 0 { 1 } else { burst } as u64;
        let interval = 1_000_000_000 / rate as u64;
        let interval = if interval == 0 { 1 } else { interval };
        let mut first = burst / 2;
        if first > FIRST_DENIALS as u64 {
            first = FIRST_DENIALS as u64;
        }
        if first == 0 {
            first = 1;
        }
        let ring = ring_bytes as u64;
        Self {
            interval_ns: interval,
            tau_ns: (burst - 1) * interval,
            quiet_ns: (first - 1) * interval,
            room_bytes: (ring - ring / 4).saturating_sub(EVENT_RECORD_BYTES),
        }
    }

    /// What the kernel does with an event at `now` (boot ns), given the
    /// policy's bucket `tat` on this CPU and the ring's unread bytes (asked
    /// only for an event that is not a first denial); and the bucket's new
    /// value. The kernel programs and the unit tests share it.
    #[inline(always)]
    pub fn judge(
        &self,
        tat: u64,
        now: u64,
        ring_used: impl FnOnce() -> u64,
    ) -> (EventOutcome, u64) {
        if self.interval_ns == 0 {
            return (EventOutcome::Write, tat);
        }
        let t = if tat > now { tat } else { now };
        let lag = t - now;
        if lag > self.tau_ns {
            return (EventOutcome::Suppress, tat);
        }
        let next = t + self.interval_ns;
        if lag > self.quiet_ns && ring_used() > self.room_bytes {
            // Out of the shared part of the ring: the bucket's token is
            // spent all the same (the event was within budget).
            return (EventOutcome::Lost, next);
        }
        (EventOutcome::Write, next)
    }
}

/// [`EventBudget::judge`]: what becomes of an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventOutcome {
    /// Reserve room in the ring buffer and write it (lost if there is none).
    Write,
    /// Over the policy's budget: counted at [`POLICY_EVENTS_SUPPRESSED`].
    Suppress,
    /// The ring's shared part is full and this is not a first denial:
    /// counted at [`POLICY_EVENTS_LOST`] and [`COUNTER_EVENTS_LOST`].
    Lost,
}

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

#[cfg(feature = "user")]
mod user {
    // SAFETY: all of these are #[repr(C)], made only of integers, with no
    // padding (sizes asserted above), so any bit pattern is valid.
    unsafe impl aya::Pod for super::State {}
    unsafe impl aya::Pod for super::CacheOffsets {}
    unsafe impl aya::Pod for super::CgroupKey {}
    unsafe impl aya::Pod for super::CgroupValue {}
    unsafe impl aya::Pod for super::PolicyRecord {}
    unsafe impl aya::Pod for super::PortChunkKey {}
    unsafe impl aya::Pod for super::PortChunk {}
    unsafe impl aya::Pod for super::Event {}
    unsafe impl aya::Pod for super::SockOffsets {}
    unsafe impl aya::Pod for super::AgentStamp {}
    unsafe impl aya::Pod for super::PolicyName {}
    unsafe impl aya::Pod for super::EventBudget {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_words_keep_what_they_were_given() {
        for epoch in [1, 2, 0x8000_0000, u32::MAX] {
            for generation in [0, 1] {
                let none = cache_word(epoch, generation, None);
                assert!(cache_word_is_current(none, epoch, generation));
                assert!(!cache_word_is_current(none, epoch, generation ^ 1));
                assert!(!cache_word_is_current(none, next_epoch(epoch), generation));
                assert_eq!(cache_word_governing(none), None);
                for (level, index) in [(0, 0), (1, 7), (31, 4095), (63, (1 << 24) - 1)] {
                    let w = cache_word(epoch, generation, Some((level, index)));
                    assert!(cache_word_is_current(w, epoch, generation));
                    assert!(!cache_word_is_current(w, epoch, generation ^ 1));
                    assert!(!cache_word_is_current(w, epoch ^ 1, generation));
                    assert_eq!(cache_word_governing(w), Some((level, index)));
                }
            }
        }
        assert_eq!(CACHE_MAX_INDEXES, 1 << 24);
        assert_eq!(next_epoch(0), 1);
        assert_eq!(next_epoch(41), 42);
        assert_eq!(next_epoch(u32::MAX), 1);
    }

    #[test]
    fn sockets_are_allow_listed_and_the_unknown_is_refused() {
        use SocketClass::*;
        // What the port hooks judge.
        for (ty, p) in [
            (SOCK_STREAM, 0),
            (SOCK_STREAM, 6),
            (SOCK_STREAM, IPPROTO_MPTCP),
            (SOCK_DGRAM, 0),
            (SOCK_DGRAM, 17),
            (SOCK_DGRAM, IPPROTO_ICMP),
            (SOCK_DGRAM, IPPROTO_ICMPV6),
        ] {
            assert_eq!(classify_socket(ty, p), Judged, "{ty}/{p}");
        }
        // UDP-Lite's connect() runs no connect hook.
        assert_eq!(
            classify_socket(SOCK_DGRAM, IPPROTO_UDPLITE),
            ConnectUnjudged
        );
        // Own binds, behind allow_sockets.
        assert_eq!(
            classify_socket(SOCK_RAW, 255),
            OwnBind(SOCK_KIND_RAW, SOCK_ALLOW_RAW)
        );
        for ty in [SOCK_STREAM, SOCK_SEQPACKET] {
            assert_eq!(
                classify_socket(ty, 132),
                OwnBind(SOCK_KIND_SCTP, SOCK_ALLOW_SCTP)
            );
        }
        assert_eq!(
            classify_socket(SOCK_DGRAM, 115),
            OwnBind(SOCK_KIND_L2TP, SOCK_ALLOW_L2TP)
        );
        // SMC over IPPROTO_SMC (256) autobinds a TCP port inside the kernel;
        // DCCP (type 6, protocol 33) has its own listen; anything new is
        // unknown: all refused.
        for (ty, p) in [
            (SOCK_STREAM, 256),
            (6, 33),
            (SOCK_DGRAM, 33),
            (SOCK_STREAM, 17),
            (SOCK_DGRAM, 6),
            (SOCK_SEQPACKET, 0),
            (10, 0),
            (SOCK_STREAM, 263),
        ] {
            assert_eq!(classify_socket(ty, p), Unknown, "{ty}/{p}");
        }
    }

    /// The kernel's report path for one event, on a ring nobody reads
    /// (the agent stopped): judge, then reserve. Returns the outcome and
    /// updates the bucket and the ring's fill.
    fn emit(b: &EventBudget, tat: &mut u64, now: u64, ring: &mut u64, size: u64) -> EventOutcome {
        let used = *ring;
        let (outcome, next) = b.judge(*tat, now, || used);
        *tat = next;
        if outcome != EventOutcome::Write {
            return outcome;
        }
        if *ring + EVENT_RECORD_BYTES > size {
            return EventOutcome::Lost;
        }
        *ring += EVENT_RECORD_BYTES;
        EventOutcome::Write
    }

    /// (written, suppressed, lost) of a flooding policy A, and the outcome of
    /// policy B's single denial made in the middle of the flood.
    fn flood(budget: EventBudget, ring_size: u64) -> ([u64; 3], EventOutcome) {
        let (mut tat_a, mut tat_b, mut ring) = (0u64, 0u64, 0u64);
        let mut a = [0u64; 3];
        let mut b = None;
        const N: u64 = 200_000;
        for i in 0..N {
            // One denial every 2 us (500,000 a second), 0.4 s in all.
            let now = 1_000_000_000 + i * 2_000;
            let o = emit(&budget, &mut tat_a, now, &mut ring, ring_size);
            a[o as usize] += 1;
            if i == N / 2 {
                b = Some(emit(&budget, &mut tat_b, now + 1, &mut ring, ring_size));
            }
        }
        assert_eq!(a.iter().sum::<u64>(), N, "written + suppressed + lost");
        (a, b.unwrap())
    }

    #[test]
    fn a_flood_keeps_to_its_budget_and_another_policys_first_denial_is_written() {
        let ring = 16384;
        let (a, b) = flood(EventBudget::new(100, 50, ring as u32), ring);
        // 50 at once, then 100 a second for 0.4 s (the 40th comes due just
        // after the last denial); nothing more.
        assert_eq!(a[EventOutcome::Write as usize], 50 + 39, "{a:?}");
        assert_eq!(a[EventOutcome::Suppress as usize], 200_000 - 89, "{a:?}");
        assert_eq!(a[EventOutcome::Lost as usize], 0, "{a:?}");
        assert_eq!(b, EventOutcome::Write);

        // A ring too small for A's budget: A's events beyond the first
        // ones stop at three quarters of it (lost), and B's first denial
        // still finds the reserve.
        let ring = 4096;
        let (a, b) = flood(EventBudget::new(1000, 200, ring as u32), ring);
        assert!(a[EventOutcome::Lost as usize] > 0, "{a:?}");
        assert!(
            a[EventOutcome::Write as usize] * EVENT_RECORD_BYTES <= ring * 3 / 4,
            "{a:?}"
        );
        assert_eq!(b, EventOutcome::Write);

        // Without a budget (rate 0), the flood fills the ring and B's
        // denial is lost: what the budget is for.
        let (a, b) = flood(EventBudget::new(0, 0, ring as u32), ring);
        assert_eq!(a[EventOutcome::Suppress as usize], 0);
        assert_eq!(b, EventOutcome::Lost);
    }

    #[test]
    fn the_budget_refills_and_a_quiet_policy_gets_its_first_denials_again() {
        let b = EventBudget::new(10, 4, 1 << 20);
        assert_eq!(b.interval_ns, 100_000_000);
        assert_eq!(b.tau_ns, 300_000_000);
        assert_eq!(b.quiet_ns, 100_000_000, "first min(4, 4/2) = 2");
        let mut tat = 0;
        let t = 5_000_000_000u64;
        let full = || 1u64 << 40; // a full ring: only first denials pass
        use EventOutcome::*;
        let mut out = [Write; 6];
        for o in &mut out {
            let (x, next) = b.judge(tat, t, full);
            tat = next;
            *o = x;
        }
        assert_eq!(out, [Write, Write, Lost, Lost, Suppress, Suppress]);
        // A second later the bucket is full again.
        assert_eq!(b.judge(tat, t + 1_000_000_000, full).0, Write);
        // Burst 1: one event per interval, each a first denial.
        let one = EventBudget::new(10, 1, 4096);
        assert_eq!((one.tau_ns, one.quiet_ns), (0, 0));
        let (o, tat) = one.judge(0, t, full);
        assert_eq!(o, Write);
        assert_eq!(one.judge(tat, t + 1, full).0, Suppress);
        assert_eq!(one.judge(tat, t + 100_000_000, full).0, Write);
    }

    #[test]
    fn ephemeral_means_the_hosts_range() {
        assert!(in_ephemeral_range(0, 32768));
        assert!(in_ephemeral_range(0, 60999));
        assert!(!in_ephemeral_range(0, 61000));
        assert!(!in_ephemeral_range(0, 8081));
        let narrow = (40000 << 16) | 40010;
        assert!(in_ephemeral_range(narrow, 40000));
        assert!(in_ephemeral_range(narrow, 40010));
        assert!(!in_ephemeral_range(narrow, 39999));
        assert!(!in_ephemeral_range(narrow, 40011));
        assert!(
            !in_ephemeral_range((1 << 16) | 10, 0),
            "port 0 is never a port"
        );
    }
}
