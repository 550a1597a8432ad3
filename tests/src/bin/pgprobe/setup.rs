//! Setup before the operation: loopback up in a new network namespace,
//! listeners made before joining the cgroup, and joining it.

use crate::sock::{die, errno, parse_addr, sockaddr, socket};

pub(crate) fn join_cgroup(dir: &str) {
    let procs = format!("{dir}/cgroup.procs");
    std::fs::write(&procs, "0").unwrap_or_else(|e| die(&format!("joining {procs}: {e}")));
}

pub(crate) fn loopback_up() {
    // SAFETY: ioctl on a throwaway socket with a zeroed, NUL-terminated ifreq.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo".iter().enumerate() {
            ifr.ifr_name[i] = *b as libc::c_char;
        }
        if libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut ifr) < 0 {
            die("SIOCGIFFLAGS lo");
        }
        ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as i16;
        if libc::ioctl(fd, libc::SIOCSIFFLAGS, &ifr) < 0 {
            die("SIOCSIFFLAGS lo");
        }
        libc::close(fd);
    }
}

pub(crate) fn listen_on(spec: &str) -> i32 {
    // tcp:ADDR:PORT, where ADDR may be [v6].
    let (proto, rest) = spec.split_once(':').unwrap_or_else(|| die("bad --listen"));
    let (ip, port) = rest.rsplit_once(':').unwrap_or_else(|| die("bad --listen"));
    let addr = parse_addr(ip, port);
    let fd = socket(proto, &addr);
    let one: libc::c_int = 1;
    let (ss, len) = sockaddr(&addr);
    // SAFETY: valid fd and sockaddr.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            std::ptr::from_ref(&one).cast(),
            4,
        );
        if libc::bind(fd, std::ptr::from_ref(&ss).cast(), len) != 0 {
            die(&format!("listener bind {spec}: errno {}", errno()));
        }
        if proto == "tcp" && libc::listen(fd, 16) != 0 {
            die(&format!("listen {spec}: errno {}", errno()));
        }
    }
    fd
}
