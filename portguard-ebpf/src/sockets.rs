//! Paths to a port that the bind hooks never see:
//!
//! - `cgroup/sock_create`: sockets with their own bind (raw IP, SCTP,
//!   L2TP/IP) cannot be created in a restricted cgroup unless allowed.
//! - BPF LSM (`lsm_cgroup`) `socket_listen`: `listen()` on an unbound TCP
//!   socket makes the kernel pick a port without any bind hook; it is judged
//!   as the "ephemeral" pseudo-port. A socket bound by someone else (passed
//!   in over a unix socket, or bound before the caller moved cgroups) is
//!   judged again on its bound address and port: the caller's policy decides.
//! - `socket_accept`: the same check on the listening socket, so a governed
//!   process cannot serve connections on a port its policy does not allow
//!   whoever created, bound or listened on the socket.
//!
//! The LSM hooks receive kernel `struct socket` pointers. Fields are read
//! with `bpf_probe_read_kernel` at offsets the agent takes from the running
//! kernel's BTF (`PORTGUARD_SOCK_OFFSETS`); the socket pointer itself is only
//! ever copied from, never offset (the verifier forbids arithmetic on it).

use core::{ffi::c_void, ptr::read_volatile};

use aya_ebpf::{
    bindings::BPF_SOCK_OPS_TCP_LISTEN_CB,
    helpers::generated::bpf_probe_read_kernel,
    macros::{cgroup_sock, lsm_cgroup, sock_ops},
    programs::{LsmContext, SockContext, SockOpsContext},
};
use portguard_common::{
    AddrClass, Direction, EVENT_F_AUTOBIND, EVENT_F_DUAL_STACK, Family, Hook, IPPROTO_L2TP,
    IPPROTO_SCTP, IPPROTO_TCP, SOCK_ALLOW_L2TP, SOCK_ALLOW_RAW, SOCK_ALLOW_SCTP, SOCK_KIND_L2TP,
    SOCK_KIND_RAW, SOCK_KIND_SCTP, SockOffsets,
};

use crate::{
    classify6,
    decide::{ALLOW, Query, decide, decide_socket_kind},
    sk_v6only, v4_bytes, v4_class,
};

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const SOCK_DGRAM: u32 = 2;
const SOCK_RAW: u32 = 3;
/// MPTCP sockets listen through their TCP subflows; judge them as TCP.
const IPPROTO_MPTCP: u16 = 262;

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
    let (kind, bit) = if ty == SOCK_RAW {
        (SOCK_KIND_RAW, SOCK_ALLOW_RAW)
    } else if protocol == u32::from(IPPROTO_SCTP) {
        (SOCK_KIND_SCTP, SOCK_ALLOW_SCTP)
    } else if protocol == u32::from(IPPROTO_L2TP) && ty == SOCK_DGRAM {
        (SOCK_KIND_L2TP, SOCK_ALLOW_L2TP)
    } else {
        return ALLOW;
    };
    decide_socket_kind(
        &Query {
            hook: Hook::SockCreate,
            dir: Direction::Bind,
            protocol: protocol as u8,
            family: if family == u32::from(AF_INET) {
                Family::Ipv4
            } else {
                Family::Ipv6
            },
            addr_class: AddrClass::Any,
            port: 0,
            addr: [0; 16],
            dual_stack: false,
            ephemeral_ok: false,
            flags: 0,
            report_only: false,
        },
        kind,
        bit,
    )
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
#[inline(always)]
fn set_local_v6(q: &mut Query, w: [u32; 4], v6only: bool) {
    let v6 = classify6(w, false);
    q.family = v6.family;
    q.addr_class = v6.class;
    q.addr = v6.addr;
    q.flags = v6.flags;
    q.dual_stack = v6.unspecified && !v6only;
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
    let Some(protocol) = kread::<u16>(sk + u64::from(off.sk_protocol), 0) else {
        return ALLOW;
    };
    if protocol != u16::from(IPPROTO_TCP) && protocol != IPPROTO_MPTCP {
        return ALLOW;
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
        // A bound port may have been picked by the kernel (bind to port 0):
        // a policy allowing `ephemeral` accepts any bound port here.
        ephemeral_ok: true,
        flags: 0,
        report_only: false,
    };
    if port == 0 {
        // Unbound: listen() autobinds to the wildcard address on a port the
        // kernel picks. Only `ephemeral` allows that.
        q.ephemeral_ok = false;
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
/// listening task's context), against the caller's bind policy. It cannot
/// deny; a violation is reported (verdict `reported`). The port is the one
/// bound, whether chosen by the caller or by the kernel's autobind.
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
    let port = port as u16;
    let mut q = Query {
        hook: Hook::Listen,
        dir: Direction::Bind,
        protocol: IPPROTO_TCP,
        family: Family::Ipv4,
        addr_class: AddrClass::Any,
        port,
        addr: [0; 16],
        dual_stack: false,
        // The policy's `ephemeral` allows any kernel-chosen listening port.
        ephemeral_ok: true,
        flags: 0,
        report_only: true,
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
        if q.dual_stack {
            q.flags |= EVENT_F_DUAL_STACK;
        }
    } else {
        return 1;
    }
    decide(&q);
    1
}
