//! What happens after an operation that left a TCP listener: `--unfence`
//! (try to bind it back to no device) and `--serve` (try to be served on it
//! as a loopback client).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::atomic::Ordering,
};

use crate::{
    SERVE_AFTER_MS,
    sock::{errno, errno_name, poll_for, sockaddr, socket},
};

/// `--unfence`: try to bind `fd` back to no device, both ways.
pub(crate) fn unfence(fd: i32) -> String {
    let zero: libc::c_int = 0;
    // SAFETY: setsockopt on our own socket with valid buffers.
    let results = unsafe {
        [
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_BINDTODEVICE,
                c"".as_ptr().cast(),
                0,
            ),
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_BINDTOIFINDEX,
                std::ptr::from_ref(&zero).cast(),
                4,
            ),
        ]
        .map(|rc| if rc == 0 { "ok" } else { errno_name(errno()) })
    };
    format!(r#","unfence":["{}","{}"]"#, results[0], results[1])
}

/// Try to be served on listener `fd`: see `--serve`.
pub(crate) fn serve_check(fd: i32) -> (bool, String) {
    std::thread::sleep(std::time::Duration::from_millis(
        SERVE_AFTER_MS.load(Ordering::Relaxed),
    ));
    // SAFETY: getsockname into a zeroed sockaddr_storage.
    let (family, port, bound) = unsafe {
        let mut ss: libc::sockaddr_storage = std::mem::zeroed();
        let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        libc::getsockname(fd, std::ptr::from_mut(&mut ss).cast(), &mut len);
        if i32::from(ss.ss_family) == libc::AF_INET {
            let sin = &*std::ptr::from_ref(&ss).cast::<libc::sockaddr_in>();
            let ip = Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes());
            (libc::AF_INET, u16::from_be(sin.sin_port), IpAddr::V4(ip))
        } else {
            let sin6 = &*std::ptr::from_ref(&ss).cast::<libc::sockaddr_in6>();
            let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            (libc::AF_INET6, u16::from_be(sin6.sin6_port), IpAddr::V6(ip))
        }
    };
    let mut targets = Vec::new();
    match bound {
        IpAddr::V4(ip) if ip.is_unspecified() => targets.push(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        IpAddr::V6(ip) if ip.is_unspecified() => {
            targets.push(IpAddr::V6(Ipv6Addr::LOCALHOST));
            targets.push(IpAddr::V4(Ipv4Addr::LOCALHOST));
        }
        ip => targets.push(ip),
    }
    let _ = family;
    let mut client = String::from("none");
    let mut clients = Vec::new();
    for t in targets {
        let addr = SocketAddr::new(t, port);
        let c = socket("tcp", &addr);
        // SAFETY: plain syscalls on our own sockets.
        unsafe {
            libc::fcntl(c, libc::F_SETFL, libc::O_NONBLOCK);
            let (ss, len) = sockaddr(&addr);
            let rc = libc::connect(c, std::ptr::from_ref(&ss).cast(), len);
            let e = errno();
            client = if rc == 0 {
                "ok".into()
            } else if e != libc::EINPROGRESS {
                errno_name(e).into()
            } else if !poll_for(c, libc::POLLOUT, 1500) {
                "timeout".into()
            } else {
                let mut err: libc::c_int = 0;
                let mut l = 4 as libc::socklen_t;
                libc::getsockopt(
                    c,
                    libc::SOL_SOCKET,
                    libc::SO_ERROR,
                    std::ptr::from_mut(&mut err).cast(),
                    &mut l,
                );
                if err == 0 {
                    "ok".into()
                } else {
                    errno_name(err).into()
                }
            };
        }
        clients.push(c);
        if client == "ok" {
            break;
        }
    }
    // SAFETY: plain syscalls on our own sockets.
    let served = unsafe {
        libc::fcntl(fd, libc::F_SETFL, libc::O_NONBLOCK);
        poll_for(fd, libc::POLLIN, 1500) && {
            let a = libc::accept(fd, std::ptr::null_mut(), std::ptr::null_mut());
            if a >= 0 {
                libc::close(a);
            }
            a >= 0
        }
    };
    for c in clients {
        // SAFETY: closing our own fds.
        unsafe { libc::close(c) };
    }
    (served, client)
}
