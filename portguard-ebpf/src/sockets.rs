//! Paths to a port that the bind hooks never see:
//!
//! - `cgroup/sock_create`: sockets with their own bind (raw IP, SCTP,
//!   L2TP/IP) cannot be created in a restricted cgroup unless allowed, and
//!   sockets of a protocol portguard does not know (SMC over IPPROTO_SMC,
//!   DCCP, anything newer) cannot be created there at all: an allow-list
//!   ([`portguard_common::classify_socket`]).
//! - BPF LSM (`lsm_cgroup`) `socket_listen`: `listen()` on an unbound TCP
//!   socket makes the kernel pick a port without any bind hook; it is judged
//!   as the "ephemeral" pseudo-port. A socket bound by someone else (passed
//!   in over a unix socket, or bound before the caller moved cgroups) is
//!   judged again on its bound address and port: the caller's policy decides.
//! - `socket_accept`: the same check on the listening socket, so a governed
//!   process cannot serve connections on a port its policy does not allow
//!   whoever created, bound or listened on the socket.
//! - Without the BPF LSM (many distributions; this CI host): `sock_ops`
//!   judges each new listener right after `listen()`, in the listening
//!   task's context, and cuts off one on a port its policy does not allow:
//!   it is fenced ([`fence`]: bound to an interface index no interface has,
//!   so the kernel's socket lookup never finds it again; a client gets a
//!   reset), marked in socket storage ([`GUARD_CUT`]), and the agent
//!   destroys it (sock_diag `SOCK_DESTROY`).
//! - The fence is kept by [`portguard_setsockopt`]: the process cannot bind
//!   a fenced socket back to a real device.
//! - UDP autobind: a send on an unbound UDP socket takes a port from the
//!   sender's network namespace's range, which a workload owning its netns
//!   can narrow onto any port. [`judge_send_port`] judges a kernel-chosen
//!   port outside the host's range as a bind: denied sends cut the socket off.
//! - Where neither the fence nor `SOCK_DESTROY` can end a cut-off socket, the
//!   agent attaches the packet guard ([`portguard_ingress`]) until it is
//!   gone: it drops every packet addressed to a socket marked [`GUARD_CUT`].
//!
//! "The kernel chose this port" is read from the socket itself: a bind()
//! that named its port sets `SOCK_BINDPORT_LOCK` in `sk_userlocks`; a bind
//! to port 0 and an autobind never do. `ephemeral` allows only such ports,
//! and only inside the host's (initial netns) ephemeral range.
//!
//! The LSM hooks receive kernel `struct socket` pointers. Fields are read
//! with `bpf_probe_read_kernel` at offsets the agent takes from the running
//! kernel's BTF (`PORTGUARD_SOCK_OFFSETS`); the socket pointer itself is only
//! ever copied from, never offset (the verifier forbids arithmetic on it).

use core::{ffi::c_void, ptr::read_volatile};

use aya_ebpf::{
    bindings::{BPF_SK_STORAGE_GET_F_CREATE, BPF_SOCK_OPS_TCP_LISTEN_CB, bpf_sock},
    helpers::generated::{
        bpf_get_socket_cookie, bpf_probe_read_kernel, bpf_setsockopt, bpf_sk_fullsock,
        bpf_sk_storage_get,
    },
    macros::{cgroup_skb, cgroup_sock, cgroup_sockopt, lsm_cgroup, sock_ops},
    programs::{
        LsmContext, SkBuffContext, SockAddrContext, SockContext, SockOpsContext, SockoptContext,
    },
};
use portguard_common::{
    AddrClass, COUNTER_FENCE_FAILED, COUNTER_GUARD_DROPS, COUNTER_MARK_FAILED, Direction,
    EVENT_F_AUTOBIND, EVENT_F_DUAL_STACK, FENCE_IFINDEX, Family, GUARD_CUT, Hook, IPPROTO_TCP,
    IPPROTO_UDP, IPPROTO_UDPLITE, SO_BINDTODEVICE, SO_BINDTOIFINDEX, SOCK_BINDPORT_LOCK,
    SOCK_KIND_OTHER, SOL_SOCKET, SockOffsets, SocketClass, SocketState, USERLOCKS_UNKNOWN,
    classify_socket, in_ephemeral_range,
};

use crate::{
    classify6,
    decide::{ALLOW, DENY, Query, count, decide, decide_socket_kind, host_ephemeral, refuse},
    maps::PORTGUARD_SOCKETS,
    sk_v6only, v4_bytes, v4_class,
};

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
/// MPTCP sockets listen through their TCP subflows; judge them as TCP.
const IPPROTO_MPTCP: u16 = 262;
/// `TCP_LISTEN` (`bpf_sock::state`).
const TCP_LISTEN: u32 = 10;

/// Set by the agent before load: byte offset of `sk_userlocks` in `struct
/// sock`, from the running kernel's BTF (see portguard-common).
#[unsafe(no_mangle)]
static PORTGUARD_USERLOCKS_OFFSET: u32 = USERLOCKS_UNKNOWN;

/// The address of a kernel socket as a plain number. The verifier forbids
/// arithmetic on socket pointers, so the pointer is copied through the
/// stack by the helper, which yields a scalar.
#[inline(always)]
fn sk_address(sk: *const c_void) -> Option<u64> {
    let mut addr = 0u64;
    // SAFETY: copies our own stack slot holding the pointer.
    let rc = unsafe {
        bpf_probe_read_kernel(
            core::ptr::from_mut(&mut addr).cast::<c_void>(),
            8,
            core::ptr::from_ref(&sk).cast::<c_void>(),
        )
    };
    (rc == 0 && addr != 0).then_some(addr)
}

/// Whether the kernel chose the socket's port (a bind to port 0 or an
/// autobind), rather than a bind() that named it. Unknown: false (the port
/// counts as asked for, so `ephemeral` cannot allow it).
#[inline(always)]
pub(crate) fn kernel_chose_port(sk: *const c_void) -> bool {
    sk_address(sk).is_some_and(kernel_chose_port_at)
}

/// [`kernel_chose_port`] for a socket known by its address.
#[inline(always)]
fn kernel_chose_port_at(addr: u64) -> bool {
    // SAFETY: a global the loader may patch; read as a plain value.
    let off = unsafe { read_volatile(&PORTGUARD_USERLOCKS_OFFSET) };
    if off == USERLOCKS_UNKNOWN || off >= 4096 {
        return false;
    }
    kread::<u8>(addr + u64::from(off), SOCK_BINDPORT_LOCK)
        .is_some_and(|locks| locks & SOCK_BINDPORT_LOCK == 0)
}

/// Mark `sk` cut off: the packet guard drops what is addressed to it.
/// Returns false if the mark could not be stored (no memory).
#[inline(always)]
fn cut_off(sk: *mut bpf_sock) -> bool {
    let mut init = SocketState {
        guard: GUARD_CUT,
        ..SocketState::default()
    };
    // SAFETY: the helper only dereferences the socket it is given, which
    // the kernel passed to this program.
    let st = unsafe {
        bpf_sk_storage_get(
            core::ptr::from_ref(&PORTGUARD_SOCKETS)
                .cast_mut()
                .cast::<c_void>(),
            sk.cast::<c_void>(),
            core::ptr::from_mut(&mut init).cast::<c_void>(),
            BPF_SK_STORAGE_GET_F_CREATE.into(),
        )
    }
    .cast::<SocketState>();
    if st.is_null() {
        // Counted: the agent then looks for the socket itself should the
        // task its event names be gone (the fence may have failed too).
        count(COUNTER_MARK_FAILED);
        return false;
    }
    // SAFETY: non-null pointer to this socket's storage.
    unsafe { (*st).guard = GUARD_CUT };
    true
}

/// Fence a cut-off socket: bind it to [`FENCE_IFINDEX`], an interface index
/// no interface has, so the kernel's socket lookup (for a SYN, a datagram)
/// never matches it again. `ctx` is the program's context (`bpf_setsockopt`
/// acts on its socket, which the caller holds locked). The kernel refuses
/// (and the failure is counted) when a process without `CAP_NET_RAW` had
/// bound the socket to a device itself; the agent then ends the socket.
#[inline(always)]
fn fence(ctx: *mut c_void) -> bool {
    let mut ifindex = FENCE_IFINDEX;
    // SAFETY: the helper copies four bytes from our stack slot.
    let rc = unsafe {
        bpf_setsockopt(
            ctx,
            SOL_SOCKET,
            SO_BINDTOIFINDEX,
            core::ptr::from_mut(&mut ifindex).cast::<c_void>(),
            4,
        )
    };
    if rc != 0 {
        count(COUNTER_FENCE_FAILED);
    }
    rc == 0
}

/// Set by the agent before load (see portguard-common).
#[unsafe(no_mangle)]
static PORTGUARD_SOCK_OFFSETS: SockOffsets = SockOffsets {
    valid: 0,
    socket_sk: 0,
    skc_family: 0,
    skc_num: 0,
    skc_rcv_saddr: 0,
    skc_v6_rcv_saddr: 0,
    sk_protocol: 0,
    ipv6only_bit: 0,
};

#[cgroup_sock(sock_create)]
pub fn portguard_sock_create(ctx: SockContext) -> i32 {
    let sk = ctx.sock;
    // SAFETY: reading fields of the context struct.
    let (family, ty, protocol) = unsafe {
        (
            read_volatile(core::ptr::addr_of!((*sk).family)),
            read_volatile(core::ptr::addr_of!((*sk).type_)),
            read_volatile(core::ptr::addr_of!((*sk).protocol)),
        )
    };
    if family != u32::from(AF_INET) && family != u32::from(AF_INET6) {
        return ALLOW;
    }
    let (kind, bit, connect_only) = match classify_socket(ty, protocol) {
        SocketClass::Judged => return ALLOW,
        SocketClass::OwnBind(kind, bit) => (kind, bit, false),
        // No allow_sockets bit can allow these.
        SocketClass::ConnectUnjudged => (SOCK_KIND_OTHER, 0, true),
        SocketClass::Unknown => (SOCK_KIND_OTHER, 0, false),
    };
    decide_socket_kind(
        &kind_query(Hook::SockCreate, protocol, family == u32::from(AF_INET)),
        kind,
        bit,
        connect_only,
    )
}

/// The query for judging a socket's kind (no address or port).
#[inline(always)]
fn kind_query(hook: Hook, protocol: u32, v4: bool) -> Query {
    Query {
        hook,
        dir: Direction::Bind,
        protocol: protocol as u8,
        family: if v4 { Family::Ipv4 } else { Family::Ipv6 },
        addr_class: AddrClass::Any,
        port: 0,
        addr: [0; 16],
        dual_stack: false,
        ephemeral_ok: false,
        flags: 0,
        cut_off: false,
        cookie: 0,
    }
}

/// Copy a `T` from kernel address `addr`.
#[inline(always)]
fn kread<T: Copy>(addr: u64, zero: T) -> Option<T> {
    let mut v = zero;
    // SAFETY: the helper copies kernel memory into our stack value and
    // reports failure instead of faulting.
    let rc = unsafe {
        bpf_probe_read_kernel(
            core::ptr::from_mut(&mut v).cast::<c_void>(),
            size_of::<T>() as u32,
            addr as *const c_void,
        )
    };
    (rc == 0).then_some(v)
}

/// The bound local address of a listening socket, IPv4.
#[inline(always)]
fn set_local_v4(q: &mut Query, ip: u32) {
    q.addr_class = v4_class(ip, false);
    q.addr = v4_bytes(ip);
}

/// The bound local address of a listening socket, IPv6 (an IPv4-mapped
/// address is judged as IPv4; `[::]` without IPV6_V6ONLY is dual-stack).
/// The query's flags are kept; the address's own are added.
#[inline(always)]
fn set_local_v6(q: &mut Query, w: [u32; 4], v6only: bool) {
    let v6 = classify6(w, false);
    q.family = v6.family;
    q.addr_class = v6.class;
    q.addr = v6.addr;
    q.flags |= v6.flags;
    q.dual_stack = v6.unspecified && !v6only;
    if q.dual_stack {
        q.flags |= EVENT_F_DUAL_STACK;
    }
}

/// The bound local address of `sk` (as a `bpf_sock` exposes it), IPv4 or
/// IPv6.
#[inline(always)]
fn set_local_of(q: &mut Query, sk: *mut bpf_sock, family: u32) {
    if family == u32::from(AF_INET) {
        // SAFETY: reading a field of the socket the kernel passed in.
        set_local_v4(q, unsafe {
            read_volatile(core::ptr::addr_of!((*sk).src_ip4))
        });
    } else {
        // SAFETY: as above.
        let w = unsafe {
            [
                read_volatile(core::ptr::addr_of!((*sk).src_ip6[0])),
                read_volatile(core::ptr::addr_of!((*sk).src_ip6[1])),
                read_volatile(core::ptr::addr_of!((*sk).src_ip6[2])),
                read_volatile(core::ptr::addr_of!((*sk).src_ip6[3])),
            ]
        };
        set_local_v6(q, w, sk_v6only(sk.cast::<c_void>()) == Some(true));
    }
}

/// Judge a socket that is about to listen, or whose connection is about to
/// be accepted, against the caller's bind policy.
#[inline(always)]
fn judge_listening(socket: *const c_void, hook: Hook) -> i32 {
    // SAFETY: a global the loader patched; read as a plain value.
    let off = unsafe { read_volatile(&PORTGUARD_SOCK_OFFSETS) };
    if off.valid == 0 || off.socket_sk >= 56 {
        return ALLOW;
    }
    // struct socket -> sk, without arithmetic on the socket pointer: copy its
    // first bytes and pick the pointer out of the copy.
    let mut head = [0u64; 8];
    // SAFETY: copying kernel memory into a stack buffer.
    if unsafe { bpf_probe_read_kernel(head.as_mut_ptr().cast::<c_void>(), 64, socket) } != 0 {
        return ALLOW;
    }
    let sk = head[((off.socket_sk / 8) & 7) as usize];
    if sk == 0 {
        return ALLOW;
    }
    let Some(family) = kread::<u16>(sk + u64::from(off.skc_family), 0) else {
        return ALLOW;
    };
    if family != AF_INET && family != AF_INET6 {
        return ALLOW;
    }
    // Unreadable: judged as TCP (the listener portguard knows).
    let protocol = kread::<u16>(sk + u64::from(off.sk_protocol), 0).unwrap_or(6);
    if protocol != u16::from(IPPROTO_TCP) && protocol != IPPROTO_MPTCP {
        // A listener of another protocol (SCTP, SMC, DCCP, ...): only what
        // its socket kind allows (allow_sockets), and nothing unknown.
        let stream = 1;
        let (kind, bit) = match classify_socket(stream, u32::from(protocol)) {
            SocketClass::OwnBind(kind, bit) => (kind, bit),
            _ => (SOCK_KIND_OTHER, 0),
        };
        return decide_socket_kind(
            &kind_query(hook, u32::from(protocol), family == AF_INET),
            kind,
            bit,
            false,
        );
    }
    let port = kread::<u16>(sk + u64::from(off.skc_num), 0).unwrap_or(0);
    let v6only = kread::<u8>(sk + u64::from(off.ipv6only_bit / 8), 0)
        .is_some_and(|b| (b >> (off.ipv6only_bit % 8)) & 1 == 1);
    let mut q = Query {
        hook,
        dir: Direction::Bind,
        protocol: IPPROTO_TCP,
        family: Family::Ipv4,
        addr_class: AddrClass::Any,
        port,
        addr: [0; 16],
        dual_stack: false,
        // `ephemeral` allows a bound port only if the kernel chose it.
        ephemeral_ok: kernel_chose_port_at(sk),
        flags: 0,
        cut_off: false,
        cookie: 0,
    };
    if port == 0 {
        // Unbound: listen() autobinds to the wildcard address on a port the
        // kernel picks, not known yet. Only `ephemeral` allows that (port 0
        // is its bit, which a port-0 query reads only with `ephemeral_ok`).
        q.ephemeral_ok = true;
        q.flags = EVENT_F_AUTOBIND;
        if family == AF_INET6 {
            q.family = Family::Ipv6;
            q.dual_stack = !v6only;
        }
    } else if family == AF_INET {
        set_local_v4(
            &mut q,
            kread::<u32>(sk + u64::from(off.skc_rcv_saddr), 0).unwrap_or(0),
        );
    } else {
        let w = kread::<[u32; 4]>(sk + u64::from(off.skc_v6_rcv_saddr), [0; 4]).unwrap_or([0; 4]);
        set_local_v6(&mut q, w, v6only);
    }
    if q.dual_stack {
        q.flags |= EVENT_F_DUAL_STACK;
    }
    decide(&q)
}

#[lsm_cgroup(hook = "socket_listen")]
pub fn portguard_listen(ctx: LsmContext) -> i32 {
    let socket: *const c_void = ctx.arg(0);
    judge_listening(socket, Hook::Listen)
}

#[lsm_cgroup(hook = "socket_accept")]
pub fn portguard_accept(ctx: LsmContext) -> i32 {
    let socket: *const c_void = ctx.arg(0);
    judge_listening(socket, Hook::Accept)
}

/// Where the BPF LSM is unusable: judge each new TCP listener right after
/// `listen()` made it one (`BPF_SOCK_OPS_TCP_LISTEN_CB`, called in the
/// listening task's context, under the socket lock), against the caller's
/// bind policy. It cannot make listen() fail: a listener on a port the
/// policy does not allow is cut off (verdict `cut_off`): the packet guard
/// drops every packet addressed to it from now on, and the agent destroys
/// it. The port is the one bound, whether chosen by the caller or by the
/// kernel's autobind; `ephemeral` allows it only if the kernel chose it.
#[sock_ops]
pub fn portguard_sock_ops(ctx: SockOpsContext) -> u32 {
    if ctx.op() != BPF_SOCK_OPS_TCP_LISTEN_CB {
        return 1;
    }
    let ops = ctx.ops;
    // SAFETY: reading fields of the context struct, one 4-byte load each.
    let (family, port, ip4, sk) = unsafe {
        (
            read_volatile(core::ptr::addr_of!((*ops).family)),
            read_volatile(core::ptr::addr_of!((*ops).local_port)),
            read_volatile(core::ptr::addr_of!((*ops).local_ip4)),
            read_volatile(core::ptr::addr_of!((*ops).__bindgen_anon_2.sk)),
        )
    };
    if sk.is_null() {
        return 1;
    }
    let port = port as u16;
    let kernel_chose = kernel_chose_port(sk.cast::<c_void>());
    let mut q = Query {
        hook: Hook::Listen,
        dir: Direction::Bind,
        protocol: IPPROTO_TCP,
        family: Family::Ipv4,
        addr_class: AddrClass::Any,
        port,
        addr: [0; 16],
        dual_stack: false,
        ephemeral_ok: kernel_chose,
        flags: if kernel_chose { EVENT_F_AUTOBIND } else { 0 },
        cut_off: true,
        // SAFETY: the helper reads the context's socket.
        cookie: unsafe { bpf_get_socket_cookie(ops.cast::<c_void>()) },
    };
    if family == u32::from(AF_INET) {
        set_local_v4(&mut q, ip4);
    } else if family == u32::from(AF_INET6) {
        // SAFETY: as above.
        let w = unsafe {
            [
                read_volatile(core::ptr::addr_of!((*ops).local_ip6[0])),
                read_volatile(core::ptr::addr_of!((*ops).local_ip6[1])),
                read_volatile(core::ptr::addr_of!((*ops).local_ip6[2])),
                read_volatile(core::ptr::addr_of!((*ops).local_ip6[3])),
            ]
        };
        set_local_v6(&mut q, w, sk_v6only(sk.cast::<c_void>()) == Some(true));
    } else {
        return 1;
    }
    if decide(&q) == DENY {
        // If the fence or the mark fails, the agent still ends the socket
        // on the event.
        fence(ops.cast::<c_void>());
        cut_off(sk);
    }
    1
}

/// A UDP send (or a connect()) from a socket whose port the kernel chose
/// outside the host's ephemeral range: the sender's network namespace has
/// its own range (a pod may set `net.ipv4.ip_local_port_range`), so the
/// autobind may have taken any port, on this send or on an earlier one
/// that failed before its hook ran. Judge that port as a bind; a denied one
/// fails the call and cuts the socket off, so it cannot receive on the port
/// either. A socket with no port yet (a fresh TCP connect) costs a read; a
/// client port inside the host's range, or a port someone bound explicitly
/// (which bind4/bind6 judged), one array lookup more.
#[inline(always)]
pub fn judge_send_port(ctx: &SockAddrContext, hook: Hook) -> i32 {
    // SAFETY: reading the context's socket pointer.
    let sk = unsafe { read_volatile(core::ptr::addr_of!((*ctx.sock_addr).__bindgen_anon_1.sk)) };
    if sk.is_null() {
        return ALLOW;
    }
    // SAFETY: reading fields of the socket the context points at.
    let (port, family, protocol) = unsafe {
        (
            read_volatile(core::ptr::addr_of!((*sk).src_port)) as u16,
            read_volatile(core::ptr::addr_of!((*sk).family)),
            read_volatile(core::ptr::addr_of!((*sk).protocol)) as u8,
        )
    };
    // UDP and UDP-Lite autobind; a TCP socket has a port here only if a
    // bind gave it one (judged there); a ping socket's is an ICMP ident,
    // which no bind hook judges either (ping and raw sockets bind
    // themselves, past the cgroup hook).
    let datagram = protocol == IPPROTO_UDP || u32::from(protocol) == IPPROTO_UDPLITE;
    if port == 0
        || !datagram
        || in_ephemeral_range(host_ephemeral(), port)
        || !kernel_chose_port(sk.cast::<c_void>())
    {
        return ALLOW;
    }
    let mut q = Query {
        hook,
        dir: Direction::Bind,
        protocol,
        family: Family::Ipv4,
        addr_class: AddrClass::Any,
        port,
        addr: [0; 16],
        dual_stack: false,
        // Outside the host's range: `ephemeral` cannot allow it anyway.
        ephemeral_ok: false,
        flags: EVENT_F_AUTOBIND,
        cut_off: false,
        // SAFETY: the helper reads the context's socket.
        cookie: unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast::<c_void>()) },
    };
    set_local_of(&mut q, sk, family);
    if decide(&q) == DENY {
        fence(ctx.sock_addr.cast::<c_void>());
        cut_off(sk);
        return DENY;
    }
    ALLOW
}

/// Keep the fence: refuse `SO_BINDTODEVICE` and `SO_BINDTOIFINDEX` on a
/// fenced socket (EPERM), whoever asks, and report the attempt. An MPTCP
/// listener is fenced through its TCP subflow, which this hook never sees
/// (the MPTCP socket passes the option down itself): a device change on an
/// MPTCP listener is judged as its listen() was, on its port, and refused
/// where that port is not allowed. Runs for every `setsockopt()` on the
/// host (cgroup sockopt programs are selected by the socket's cgroup, and a
/// fenced socket may have been created anywhere); any other option costs
/// two comparisons.
#[cgroup_sockopt(setsockopt)]
pub fn portguard_setsockopt(ctx: SockoptContext) -> i32 {
    let so = ctx.sockopt;
    // SAFETY: reading fields of the context struct.
    let (level, optname) = unsafe {
        (
            read_volatile(core::ptr::addr_of!((*so).level)),
            read_volatile(core::ptr::addr_of!((*so).optname)),
        )
    };
    if level != SOL_SOCKET || (optname != SO_BINDTODEVICE && optname != SO_BINDTOIFINDEX) {
        return 1;
    }
    // SAFETY: as above.
    let sk = unsafe { read_volatile(core::ptr::addr_of!((*so).__bindgen_anon_1.sk)) };
    if sk.is_null() {
        return 1;
    }
    // SAFETY: reading fields of the socket the context points at.
    let (dev, port, family, protocol, state) = unsafe {
        (
            read_volatile(core::ptr::addr_of!((*sk).bound_dev_if)),
            read_volatile(core::ptr::addr_of!((*sk).src_port)) as u16,
            read_volatile(core::ptr::addr_of!((*sk).family)),
            read_volatile(core::ptr::addr_of!((*sk).protocol)),
            read_volatile(core::ptr::addr_of!((*sk).state)),
        )
    };
    let fenced = dev == FENCE_IFINDEX as u32;
    let mptcp_listener = protocol == u32::from(IPPROTO_MPTCP) && state == TCP_LISTEN;
    if !fenced && !mptcp_listener {
        return 1;
    }
    let kernel_chose = mptcp_listener && kernel_chose_port(sk.cast::<c_void>());
    let mut q = Query {
        hook: Hook::Setsockopt,
        dir: Direction::Bind,
        // Judged as the listener it is (MPTCP listens through TCP).
        protocol: if mptcp_listener {
            IPPROTO_TCP
        } else {
            protocol as u8
        },
        family: Family::Ipv4,
        addr_class: AddrClass::Any,
        port,
        addr: [0; 16],
        dual_stack: false,
        ephemeral_ok: kernel_chose,
        flags: if kernel_chose { EVENT_F_AUTOBIND } else { 0 },
        cut_off: false,
        cookie: 0,
    };
    set_local_of(&mut q, sk, family);
    if fenced {
        refuse(&q);
        return 0;
    }
    decide(&q)
}

/// The packet guard: drop every packet addressed to a socket marked cut
/// off. cgroup_skb ingress runs from `sk_filter` for the receiving socket:
/// for a TCP SYN that is the listener, for UDP the bound socket. A socket
/// without storage (almost all of them) costs the lookup's miss. Attached
/// by the agent only while a cut-off socket is neither fenced nor
/// destroyed.
#[cgroup_skb(ingress)]
pub fn portguard_ingress(ctx: SkBuffContext) -> i32 {
    let skb = ctx.skb.skb;
    // SAFETY: reading a field of the context struct.
    let sk = unsafe { read_volatile(core::ptr::addr_of!((*skb).__bindgen_anon_2.sk)) };
    if sk.is_null() {
        return 1;
    }
    // SAFETY: a helper call on the packet's socket.
    let full = unsafe { bpf_sk_fullsock(sk) };
    if full.is_null() {
        return 1;
    }
    let st = crate::sock_state(full);
    // SAFETY: non-null pointer to the socket's storage.
    if !st.is_null() && unsafe { read_volatile(&(*st).guard) } == GUARD_CUT {
        count(COUNTER_GUARD_DROPS);
        return 0;
    }
    1
}
