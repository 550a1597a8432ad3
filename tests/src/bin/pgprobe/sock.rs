//! Socket helpers shared by every operation: addresses, sockets, errno and
//! its name, and printing a result line (or dying with a message).

use std::{
    io::Write as _,
    net::{IpAddr, SocketAddr},
    process::exit,
};

pub(crate) fn die(msg: &str) -> ! {
    eprintln!("pgprobe: {msg}");
    exit(2)
}

pub(crate) fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

pub(crate) fn errno_name(e: i32) -> &'static str {
    match e {
        libc::EPERM => "EPERM",
        libc::EACCES => "EACCES",
        libc::EADDRINUSE => "EADDRINUSE",
        libc::EADDRNOTAVAIL => "EADDRNOTAVAIL",
        libc::ECONNREFUSED => "ECONNREFUSED",
        libc::EINVAL => "EINVAL",
        libc::ENETUNREACH => "ENETUNREACH",
        libc::EPROTONOSUPPORT => "EPROTONOSUPPORT",
        libc::ESOCKTNOSUPPORT => "ESOCKTNOSUPPORT",
        libc::EAFNOSUPPORT => "EAFNOSUPPORT",
        _ => "other",
    }
}

/// A sockaddr for `addr:port`.
pub(crate) fn sockaddr(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: zeroed sockaddr_storage is valid; we fill the family-specific part.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is large enough and suitably aligned.
            let sin = unsafe { &mut *std::ptr::from_mut(&mut ss).cast::<libc::sockaddr_in>() };
            sin.sin_family = libc::AF_INET as u16;
            sin.sin_port = a.port().to_be();
            sin.sin_addr.s_addr = u32::from_ne_bytes(a.ip().octets());
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            // SAFETY: as above.
            let sin6 = unsafe { &mut *std::ptr::from_mut(&mut ss).cast::<libc::sockaddr_in6>() };
            sin6.sin6_family = libc::AF_INET6 as u16;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_addr.s6_addr = a.ip().octets();
            size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

pub(crate) fn parse_addr(ip: &str, port: &str) -> SocketAddr {
    let ip: IpAddr = ip
        .trim_matches(|c| c == '[' || c == ']')
        .parse()
        .unwrap_or_else(|_| die(&format!("bad address {ip}")));
    let port: u16 = port
        .parse()
        .unwrap_or_else(|_| die(&format!("bad port {port}")));
    SocketAddr::new(ip, port)
}

pub(crate) fn socket(proto: &str, addr: &SocketAddr) -> i32 {
    let family = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    let (ty, p) = match proto {
        "tcp" => (libc::SOCK_STREAM, 0),
        "mptcp" => (libc::SOCK_STREAM, 262),
        "udp" => (libc::SOCK_DGRAM, 0),
        _ => die(&format!("bad protocol {proto}")),
    };
    // SAFETY: plain syscall.
    let fd = unsafe { libc::socket(family, ty, p) };
    if fd < 0 {
        die(&format!("socket: errno {}", errno()));
    }
    fd
}

pub(crate) fn set_v6only(fd: i32, on: bool) {
    let v: libc::c_int = i32::from(on);
    // SAFETY: plain syscall with a valid int.
    unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_IPV6,
            libc::IPV6_V6ONLY,
            std::ptr::from_ref(&v).cast(),
            4,
        )
    };
}

pub(crate) fn local_port(fd: i32) -> u16 {
    // SAFETY: getsockname into a zeroed storage.
    unsafe {
        let mut ss: libc::sockaddr_storage = std::mem::zeroed();
        let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        libc::getsockname(fd, std::ptr::from_mut(&mut ss).cast(), &mut len);
        if i32::from(ss.ss_family) == libc::AF_INET {
            u16::from_be((*std::ptr::from_ref(&ss).cast::<libc::sockaddr_in>()).sin_port)
        } else {
            u16::from_be((*std::ptr::from_ref(&ss).cast::<libc::sockaddr_in6>()).sin6_port)
        }
    }
}

/// `bind(fd, addr)`; returns the syscall's result.
pub(crate) fn bind_to(fd: i32, addr: &SocketAddr) -> i32 {
    let (ss, len) = sockaddr(addr);
    // SAFETY: valid fd and sockaddr.
    unsafe { libc::bind(fd, std::ptr::from_ref(&ss).cast(), len) }
}

/// `sendto(fd, msg, addr)`; returns the syscall's result.
pub(crate) fn send_to(fd: i32, msg: &[u8], addr: &SocketAddr) -> isize {
    let (ss, len) = sockaddr(addr);
    // SAFETY: valid fd, buffer and sockaddr.
    unsafe {
        libc::sendto(
            fd,
            msg.as_ptr().cast(),
            msg.len(),
            0,
            std::ptr::from_ref(&ss).cast(),
            len,
        )
    }
}

pub(crate) fn gettid() -> i64 {
    // SAFETY: plain syscall.
    unsafe { libc::syscall(libc::SYS_gettid) }
}

/// Wait up to `ms` for `events` on `fd`.
pub(crate) fn poll_for(fd: i32, events: i16, ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut p, 1, ms) > 0 && p.revents & events != 0 }
}

pub(crate) fn emit(line: &str) {
    if line.is_empty() {
        return;
    }
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}
