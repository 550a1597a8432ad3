//! `v6only-race`: binds racing a second thread that clears IPV6_V6ONLY on
//! the socket being bound (and, with `bind=P`, then binds it dual-stack to
//! `[::]:P` itself).

use std::{
    net::{IpAddr, Ipv6Addr, SocketAddr},
    sync::atomic::{AtomicBool, Ordering},
};

use crate::sock::{errno, gettid, local_port, set_v6only, sockaddr, socket};

/// `v6only-race PORT N [bind=P]`: see the module docs. `dual` counts binds
/// to PORT that succeeded with the socket dual-stack.
/// `leftover0`: each socket first tries bind([2001:db8::dead]:0), which
/// fails (no such address here) after the bind hook flagged it as a port-0
/// bind.
pub(crate) fn v6only_race(port: u16, n: u32, also: Option<u16>, leftover0: bool) -> String {
    use std::sync::atomic::AtomicI32;
    static CURRENT: AtomicI32 = AtomicI32::new(-1);
    static DONE: AtomicBool = AtomicBool::new(false);
    let flipper = std::thread::spawn(move || {
        let zero: libc::c_int = 0;
        let other = also.map(|p| sockaddr(&SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), p)));
        while !DONE.load(Ordering::Relaxed) {
            let fd = CURRENT.load(Ordering::Relaxed);
            if fd >= 0 {
                // SAFETY: setsockopt on a fd that is either ours or closed
                // (EBADF, harmless); the main thread reuses numbers only for
                // its own sockets.
                unsafe {
                    libc::setsockopt(
                        fd,
                        libc::IPPROTO_IPV6,
                        libc::IPV6_V6ONLY,
                        std::ptr::from_ref(&zero).cast(),
                        4,
                    );
                    if let Some((ss, len)) = &other {
                        libc::bind(fd, std::ptr::from_ref(ss).cast(), *len);
                    }
                }
            }
        }
    });
    let addr = SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port);
    let (mut bound, mut dual, mut eperm) = (0u32, 0u32, 0u32);
    for _ in 0..n {
        let fd = socket("tcp", &addr);
        set_v6only(fd, true);
        if leftover0 {
            let away = SocketAddr::new(
                IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0xdead)),
                0,
            );
            let (ss, len) = sockaddr(&away);
            // SAFETY: valid fd and sockaddr; expected to fail.
            if unsafe { libc::bind(fd, std::ptr::from_ref(&ss).cast(), len) } == 0 {
                crate::sock::die("v6only-race: a bind to 2001:db8::dead succeeded");
            }
        }
        CURRENT.store(fd, Ordering::Relaxed);
        let (ss, len) = sockaddr(&addr);
        // SAFETY: valid fd and sockaddr.
        let rc = unsafe { libc::bind(fd, std::ptr::from_ref(&ss).cast(), len) };
        if rc == 0 {
            bound += 1;
            let mut v: libc::c_int = 1;
            let mut l = 4 as libc::socklen_t;
            // SAFETY: getsockopt into a local int.
            unsafe {
                libc::getsockopt(
                    fd,
                    libc::IPPROTO_IPV6,
                    libc::IPV6_V6ONLY,
                    std::ptr::from_mut(&mut v).cast(),
                    &mut l,
                );
            }
            // Bound to PORT (not to the second thread's port).
            if v == 0 && local_port(fd) == port {
                dual += 1;
            }
        } else if errno() == libc::EPERM {
            eperm += 1;
        }
        CURRENT.store(-1, Ordering::Relaxed);
        // SAFETY: closing our own fd.
        unsafe { libc::close(fd) };
    }
    DONE.store(true, Ordering::Relaxed);
    let _ = flipper.join();
    // SAFETY: plain syscalls.
    let (pid, tid) = (unsafe { libc::getpid() }, gettid());
    format!(
        r#"{{"op":"v6only-race","ok":true,"tries":{n},"bound":{bound},"dual":{dual},"eperm":{eperm},"pid":{pid},"tid":{tid}}}"#
    )
}
