// The kernel programs, shared by both builds of the object: included
// by main.rs (`portguard`, the walk on every decision) and cached.rs
// (`portguard-cached`, with the per-cgroup policy cache). See main.rs.

mod decide;
mod maps;
mod sockets;

use core::{ffi::c_void, ptr::read_volatile};

use aya_ebpf::{
    helpers::generated::{bpf_probe_read_kernel, bpf_sk_storage_get},
    macros::{cgroup_sock, cgroup_sock_addr},
    programs::{SockAddrContext, SockContext},
};
use decide::{ALLOW, DENY, Query, decide};
use portguard_common::{
    AddrClass, AddrRole, Direction, EVENT_F_DUAL_STACK, EVENT_F_V4_MAPPED, Family, Hook,
    SOCK_PREFIX_BYTES, SocketState, V6ONLY_UNKNOWN, classify_v4, classify_v6,
};

use crate::maps::PORTGUARD_SOCKETS;

// Context fields are read one at a time with volatile loads: the verifier only
// accepts 4-byte loads of `user_ip6[i]` and friends, and LLVM would otherwise
// merge adjacent loads into one 8-byte load ("invalid bpf_context access").
// Use inside an `unsafe` block: `$e` must be a field of the context pointer
// the kernel passed in.
macro_rules! rd {
    ($e:expr) => {
        read_volatile(core::ptr::addr_of!($e))
    };
}

/// What an IPv6 address means for policy.
pub(crate) struct V6 {
    pub(crate) family: Family,
    pub(crate) class: AddrClass,
    pub(crate) addr: [u8; 16],
    pub(crate) flags: u8,
    pub(crate) unspecified: bool,
}

#[inline(always)]
pub(crate) fn v4_bytes(ip_be: u32) -> [u8; 16] {
    classify_v4(ip_be.to_ne_bytes(), AddrRole::Local).addr
}

#[inline(always)]
const fn role(unspecified_is_loopback: bool) -> AddrRole {
    if unspecified_is_loopback {
        AddrRole::Destination
    } else {
        AddrRole::Local
    }
}

/// Classify an IPv4 address (network order) with the shared classifier
/// ([`portguard_common::classify_v4`]). For connect/sendmsg the unspecified
/// address means "this host" and counts as loopback.
#[inline(always)]
pub(crate) fn v4_class(ip_be: u32, unspecified_is_loopback: bool) -> AddrClass {
    classify_v4(ip_be.to_ne_bytes(), role(unspecified_is_loopback)).class
}

/// Classify an IPv6 address given as four network-order words, with the
/// shared classifier ([`portguard_common::classify_v6`]): an IPv4-mapped
/// address (`::ffff:a.b.c.d`) is judged as IPv4, so an IPv4 rule holds for
/// the mapped form too. For connect/sendmsg the unspecified address means
/// "this host" and counts as loopback.
#[inline(always)]
pub(crate) fn classify6(w: [u32; 4], unspecified_is_loopback: bool) -> V6 {
    let mut addr = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let b = w[i].to_ne_bytes();
        addr[i * 4] = b[0];
        addr[i * 4 + 1] = b[1];
        addr[i * 4 + 2] = b[2];
        addr[i * 4 + 3] = b[3];
        i += 1;
    }
    let v = classify_v6(addr, role(unspecified_is_loopback));
    V6 {
        family: v.family,
        class: v.class,
        addr: v.addr,
        flags: if v.v4_mapped { EVENT_F_V4_MAPPED } else { 0 },
        unspecified: v.unspecified_v6,
    }
}

#[inline(always)]
fn user_ip6(ctx: &SockAddrContext) -> [u32; 4] {
    let sa = ctx.sock_addr;
    // SAFETY: reading fields of the context struct.
    unsafe {
        [
            rd!((*sa).user_ip6[0]),
            rd!((*sa).user_ip6[1]),
            rd!((*sa).user_ip6[2]),
            rd!((*sa).user_ip6[3]),
        ]
    }
}

#[inline(always)]
fn user_port(ctx: &SockAddrContext) -> u16 {
    // SAFETY: reading a field of the context struct. `user_port` holds the
    // port in network byte order in its low 16 bits.
    u16::from_be(unsafe { rd!((*ctx.sock_addr).user_port) } as u16)
}

#[inline(always)]
fn sa_protocol(ctx: &SockAddrContext) -> u8 {
    // SAFETY: reading a field of the context struct.
    unsafe { rd!((*ctx.sock_addr).protocol) as u8 }
}

#[inline(always)]
fn inet4(ctx: &SockAddrContext, hook: Hook, dir: Direction) -> i32 {
    let port = user_port(ctx);
    // SAFETY: reading a field of the context struct.
    let ip = unsafe { rd!((*ctx.sock_addr).user_ip4) };
    let q = Query {
        hook,
        dir,
        protocol: sa_protocol(ctx),
        family: Family::Ipv4,
        addr_class: v4_class(ip, dir == Direction::Connect),
        port,
        addr: v4_bytes(ip),
        dual_stack: false,
        ephemeral_ok: false,
        flags: 0,
        cut_off: false,
        cookie: 0,
    };
    if dir == Direction::Bind {
        // bind(port 0) is judged by post_bind4 on the port the kernel picks.
        if !mark_port0(ctx, port == 0) {
            return port0_fallback(q);
        }
        if port == 0 {
            return ALLOW;
        }
    }
    decide(&q)
}

#[inline(always)]
fn inet6_connect(ctx: &SockAddrContext, hook: Hook) -> i32 {
    let v6 = classify6(user_ip6(ctx), true);
    decide(&Query {
        hook,
        dir: Direction::Connect,
        protocol: sa_protocol(ctx),
        family: v6.family,
        addr_class: v6.class,
        port: user_port(ctx),
        addr: v6.addr,
        dual_stack: false,
        ephemeral_ok: false,
        flags: v6.flags,
        cut_off: false,
        cookie: 0,
    })
}

/// Set by the agent before load: bit offset of `skc_ipv6only` in
/// `struct sock`, from the running kernel's BTF (see portguard-common).
#[unsafe(no_mangle)]
static PORTGUARD_V6ONLY_BIT: u32 = V6ONLY_UNKNOWN;

/// Whether the socket has IPV6_V6ONLY. `bpf_getsockopt` only serves a few
/// SOL_IPV6 options (not this one), so read the `skc_ipv6only` bit of the
/// socket: copy the first bytes of `struct sock` (no arithmetic on the socket
/// pointer, which the verifier forbids) and pick the bit. Unknown: `None`.
#[inline(always)]
fn v6only(ctx: &SockAddrContext) -> Option<bool> {
    // SAFETY: reading the context's socket pointer.
    let sk = unsafe { rd!((*ctx.sock_addr).__bindgen_anon_1.sk) };
    sk_v6only(sk.cast::<c_void>())
}

/// The `skc_ipv6only` bit of a kernel socket, read without arithmetic on the
/// socket pointer. `None` when unknown.
#[inline(always)]
pub(crate) fn sk_v6only(sk: *const c_void) -> Option<bool> {
    // SAFETY: a global the loader may patch; read as a plain value.
    let bit = unsafe { read_volatile(&PORTGUARD_V6ONLY_BIT) };
    if bit >= SOCK_PREFIX_BYTES * 8 || sk.is_null() {
        return None;
    }
    let mut prefix = [0u8; SOCK_PREFIX_BYTES as usize];
    // SAFETY: the helper copies kernel memory into our stack buffer.
    let rc = unsafe {
        bpf_probe_read_kernel(prefix.as_mut_ptr().cast::<c_void>(), SOCK_PREFIX_BYTES, sk)
    };
    if rc != 0 {
        return None;
    }
    let byte = prefix[((bit / 8) & (SOCK_PREFIX_BYTES - 1)) as usize];
    Some((byte >> (bit % 8)) & 1 == 1)
}

/// Record on the socket that post_bind has to judge this bind: a bind to
/// port 0 (the kernel picks the port after bind4/bind6 ran). Storage is only
/// created for port 0.
/// Returns false if the flag could not be stored.
#[inline(always)]
fn mark_port0(ctx: &SockAddrContext, port0: bool) -> bool {
    if port0 {
        let mut init = SocketState {
            port0_pending: 1,
            ..SocketState::default()
        };
        // SAFETY: the helper only dereferences the context's own socket.
        let p = unsafe { PORTGUARD_SOCKETS.get_or_insert_ptr_mut(ctx, Some(&mut init)) };
        if p.is_null() {
            return false;
        }
        // SAFETY: non-null pointer to this socket's storage.
        unsafe {
            (*p).port0_pending = 1;
        }
    }
    // An explicit port leaves storage alone: if a flag is left over from an
    // earlier port-0 bind on this socket that failed before post_bind ran,
    // post_bind only re-judges the (already allowed) port. Not touching
    // storage here keeps the common bind path free of a helper call.
    true
}

/// A bind to port 0 whose flag could not be stored (no memory for socket
/// storage; a tenant can fill its socket's option memory on purpose):
/// post_bind would not judge it, and the port the kernel will pick is
/// unknown here (the tenant's namespace may have narrowed its range onto
/// any port). Denied wherever binds are restricted, `ephemeral` or not.
#[inline(always)]
fn port0_fallback(q: Query) -> i32 {
    decide(&Query {
        ephemeral_ok: false,
        ..q
    })
}

#[cgroup_sock_addr(bind4)]
pub fn portguard_bind4(ctx: SockAddrContext) -> i32 {
    inet4(&ctx, Hook::Bind4, Direction::Bind)
}

#[cgroup_sock_addr(bind6)]
pub fn portguard_bind6(ctx: SockAddrContext) -> i32 {
    let v6 = classify6(user_ip6(&ctx), false);
    // `[::]` is dual-stack unless the socket has IPV6_V6ONLY (assumed
    // dual-stack, the wider exposure, when that cannot be read).
    let dual = v6.unspecified && v6only(&ctx) != Some(true);
    let port = user_port(&ctx);
    let q = Query {
        hook: Hook::Bind6,
        dir: Direction::Bind,
        protocol: sa_protocol(&ctx),
        family: v6.family,
        addr_class: v6.class,
        port,
        addr: v6.addr,
        dual_stack: dual,
        ephemeral_ok: false,
        flags: v6.flags | if dual { EVENT_F_DUAL_STACK } else { 0 },
        cut_off: false,
        cookie: 0,
    };
    // bind(port 0) is judged by post_bind6 on the port the kernel picks.
    if !mark_port0(&ctx, port == 0) {
        return port0_fallback(q);
    }
    if port == 0 {
        return ALLOW;
    }
    let verdict = decide(&q);
    if v6.unspecified {
        mark_judged(&ctx, verdict == ALLOW, dual, port);
    }
    verdict
}

/// [`SocketState::dual_stack`]: bind6 judged the port as dual-stack.
const JUDGED_DUAL: u32 = 1 << 16;

/// Record on the socket the `[::]` bind (explicit port) bind6 allowed: its
/// port, and whether it was judged dual-stack ([`JUDGED_DUAL`]). post_bind6
/// then knows the bind it sees is that one (the same port): not a port-0
/// bind, whatever flag an earlier port-0 bind of the socket that failed
/// after bind6 (an address not on the host) left, so `ephemeral` cannot
/// allow it; and, judged dual-stack, not to be judged a second time (in
/// audit mode that wrote a second event for one bind; found by the
/// differential tests, `difftest_audit_dual_stack_bind_reports_once`).
/// post_bind6 still judges a bind bind6 saw as IPV6_V6ONLY but that ended
/// up dual-stack (the flag flipped in between). Only an allowed bind is
/// recorded, by port: two threads binding one socket at once must not lend
/// one bind's judgement to the other. Storage is created only for a
/// dual-stack bind (otherwise only an existing record is rewritten); when
/// it cannot be, post_bind6 judges again (the safe side: a second event).
/// (Programs before this wrote 1 for "judged dual-stack": read as port 1,
/// a mixed upgrade judges again, the safe side.)
#[inline(always)]
fn mark_judged(ctx: &SockAddrContext, allowed: bool, dual: bool, port: u16) {
    let p = if allowed && dual {
        let mut init = SocketState::default();
        // SAFETY: the helper only dereferences the context's own socket.
        unsafe { PORTGUARD_SOCKETS.get_or_insert_ptr_mut(ctx, Some(&mut init)) }
    } else {
        // SAFETY: as above; never creates storage.
        unsafe { PORTGUARD_SOCKETS.get_ptr_mut(ctx) }
    };
    if !p.is_null() {
        let v = match (allowed, dual) {
            (false, _) => 0,
            (true, false) => u32::from(port),
            (true, true) => u32::from(port) | JUDGED_DUAL,
        };
        // SAFETY: non-null pointer to this socket's storage.
        unsafe { (*p).dual_stack = v };
    }
}

/// The socket's port-0 flag and bind6's record ([`mark_judged`]), both
/// cleared: one storage lookup.
#[inline(always)]
fn take_bind_flags(sk: *mut aya_ebpf::bindings::bpf_sock) -> (bool, u32) {
    let st = sock_state(sk);
    if st.is_null() {
        return (false, 0);
    }
    // SAFETY: non-null pointer to this socket's storage.
    unsafe {
        let flags = ((*st).port0_pending != 0, (*st).dual_stack);
        (*st).port0_pending = 0;
        (*st).dual_stack = 0;
        flags
    }
}

// connect() and a UDP send judge the socket's own port first, when the
// kernel chose it outside the host's range ([`sockets::judge_send_port`]):
// a UDP send that fails before the sendmsg hook (no destination, port 0,
// MSG_OOB, an oversized datagram) has already autobound the socket, and a
// send to a denied destination must not leave the socket its port either.
// A denied port cuts the socket off, whatever the destination.

#[cgroup_sock_addr(connect4)]
pub fn portguard_connect4(ctx: SockAddrContext) -> i32 {
    if sockets::judge_send_port(&ctx, Hook::Connect4) == DENY {
        return DENY;
    }
    inet4(&ctx, Hook::Connect4, Direction::Connect)
}

#[cgroup_sock_addr(connect6)]
pub fn portguard_connect6(ctx: SockAddrContext) -> i32 {
    if sockets::judge_send_port(&ctx, Hook::Connect6) == DENY {
        return DENY;
    }
    inet6_connect(&ctx, Hook::Connect6)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn portguard_sendmsg4(ctx: SockAddrContext) -> i32 {
    if sockets::judge_send_port(&ctx, Hook::Sendmsg4) == DENY {
        return DENY;
    }
    inet4(&ctx, Hook::Sendmsg4, Direction::Connect)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn portguard_sendmsg6(ctx: SockAddrContext) -> i32 {
    if sockets::judge_send_port(&ctx, Hook::Sendmsg6) == DENY {
        return DENY;
    }
    inet6_connect(&ctx, Hook::Sendmsg6)
}

/// The socket storage of a full socket (a cgroup/sock program's context,
/// or the packet guard's `bpf_sk_fullsock`), without creating it.
#[inline(always)]
pub(crate) fn sock_state(sk: *mut aya_ebpf::bindings::bpf_sock) -> *mut SocketState {
    // SAFETY: cgroup/sock programs pass their context (the socket) as the
    // storage owner; the map pointer is the map definition's address.
    unsafe {
        bpf_sk_storage_get(
            core::ptr::from_ref(&PORTGUARD_SOCKETS)
                .cast_mut()
                .cast::<c_void>(),
            sk.cast::<c_void>(),
            core::ptr::null_mut(),
            0,
        )
    }
    .cast::<SocketState>()
}

/// If this bind asked for port 0 (flagged by bind4/bind6), clear the flag and
/// return true; otherwise bind4/bind6 already judged the port: false.
#[inline(always)]
fn take_port0(sk: *mut aya_ebpf::bindings::bpf_sock) -> bool {
    let st = sock_state(sk);
    if st.is_null() {
        return false;
    }
    // SAFETY: non-null pointer to this socket's storage.
    unsafe {
        if (*st).port0_pending == 0 {
            return false;
        }
        (*st).port0_pending = 0;
        true
    }
}

/// post_bind runs after the port is chosen, for every inet bind() that got
/// that far. Only binds to port 0 (flagged by bind4) are judged here, on the
/// port the kernel picked; the "ephemeral" bit allows any picked port.
#[cgroup_sock(post_bind4)]
pub fn portguard_post_bind4(ctx: SockContext) -> i32 {
    let sk = ctx.sock;
    // SAFETY: reading fields of the context struct. `src_port` is host order.
    let port = unsafe { rd!((*sk).src_port) } as u16;
    if port == 0 || !take_port0(sk) {
        // port 0 here: IP_BIND_ADDRESS_NO_PORT, the port is picked at
        // connect() time as an outbound source port.
        return ALLOW;
    }
    // SAFETY: reading fields of the context struct.
    let (ip, protocol) = unsafe { (rd!((*sk).src_ip4), rd!((*sk).protocol) as u8) };
    decide(&Query {
        hook: Hook::PostBind4,
        dir: Direction::Bind,
        protocol,
        family: Family::Ipv4,
        addr_class: v4_class(ip, false),
        port,
        addr: v4_bytes(ip),
        dual_stack: false,
        // The kernel chose this port (a bind to port 0).
        ephemeral_ok: true,
        flags: 0,
        cut_off: false,
        cookie: 0,
    })
}

/// post_bind6 judges binds to port 0 on the port the kernel picked, and
/// every bind to `[::]` whose socket ends up dual-stack: bind6 judged the
/// `IPV6_V6ONLY` it saw, but the kernel drops the socket lock between bind6
/// and the bind itself, so another thread can clear the flag in between.
/// Here the bind is final (the lock is held, and the flag cannot change once
/// the socket is bound), so the flag is read from the socket.
#[cgroup_sock(post_bind6)]
pub fn portguard_post_bind6(ctx: SockContext) -> i32 {
    let sk = ctx.sock;
    // SAFETY: reading a field of the context struct.
    let port = unsafe { rd!((*sk).src_port) } as u16;
    if port == 0 {
        return ALLOW;
    }
    let (flagged, judged) = take_bind_flags(sk);
    // The explicit bind bind6 allowed, or a port-0 bind (whose chosen port
    // could only equal an allowed explicit one by chance: judged as it).
    let explicit = judged & 0xffff == u32::from(port);
    let port0 = flagged && !explicit;
    // SAFETY: reading fields of the context struct.
    let w = unsafe {
        [
            rd!((*sk).src_ip6[0]),
            rd!((*sk).src_ip6[1]),
            rd!((*sk).src_ip6[2]),
            rd!((*sk).src_ip6[3]),
        ]
    };
    let v6 = classify6(w, false);
    // The socket's own flag, now final (unknown: dual-stack, the wider
    // exposure).
    let dual = v6.unspecified && sk_v6only(sk.cast::<c_void>()) != Some(true);
    if !port0 && (!dual || (explicit && judged & JUDGED_DUAL != 0)) {
        // An explicit port bind6 judged, on a socket that is what bind6 saw.
        return ALLOW;
    }
    // SAFETY: reading a field of the context struct.
    let protocol = unsafe { rd!((*sk).protocol) } as u8;
    decide(&Query {
        hook: Hook::PostBind6,
        dir: Direction::Bind,
        protocol,
        family: v6.family,
        addr_class: v6.class,
        port,
        addr: v6.addr,
        dual_stack: dual,
        // Only a port-0 bind's port was chosen by the kernel.
        ephemeral_ok: port0,
        flags: v6.flags | if dual { EVENT_F_DUAL_STACK } else { 0 },
        cut_off: false,
        cookie: 0,
    })
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
