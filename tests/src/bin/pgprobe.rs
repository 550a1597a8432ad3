//! pgprobe: performs socket operations from inside a cgroup and prints one
//! JSON line per operation, so tests can assert the kernel's answer.
//!
//! ```text
//! pgprobe [--netns] [--listen tcp|udp:ADDR:PORT]... [--cgroup DIR] [--uid N]
//!         [--fork | --thread] [--repeat N --interval-ms MS] [--serve] OP ARGS...
//! OP:  bind tcp|udp ADDR PORT [v6only]
//!      connect tcp|udp ADDR PORT
//!      sendto ADDR PORT            (unconnected UDP)
//!      rebind tcp|udp ADDR PORT1 PORT2   bind PORT1; if that fails, bind PORT2
//!                                  on the same socket (reports both)
//!      listen tcp|mptcp ADDR PORT  bind, then listen
//!      listen-unbound tcp|mptcp 4|6 [v6only]  listen without bind (kernel
//!                                  autobind; IPv6 is dual-stack unless v6only)
//!      uring-bind tcp|udp ADDR PORT     bind through io_uring (IORING_OP_BIND)
//!      uring-listen-unbound 4|6          listen through io_uring (IORING_OP_LISTEN)
//!      socket raw4|raw6|sctp|l2tp        create a socket
//!      sendrecv ADDR PORT          unconnected UDP sendto, then wait for a reply
//!      handoff bind|listen tcp ADDR PORT CGROUP
//!                                  this process (outside CGROUP) creates the
//!                                  socket (and, for `listen`, binds PORT); a
//!                                  child in CGROUP receives it over a unix
//!                                  socket (SCM_RIGHTS) and binds / listens
//!      premove tcp|udp ADDR PORT CGROUP  create the socket, then move into
//!                                  CGROUP, then bind
//!      hold tcp|udp ADDR PORT      bind (and listen, for TCP), print the
//!                                  result, then keep the socket until killed
//!      autobind-udp ADDR PORT FROM  unconnected UDP sendto from an unbound
//!                                  socket (the kernel autobinds it), then a
//!                                  second socket, bound to loopback port
//!                                  FROM, sends to the port it got:
//!                                  `"received"` says whether it arrived
//!      v6only-race PORT N          N times: an IPv6 TCP socket with
//!                                  IPV6_V6ONLY binds [::]:PORT while a second
//!                                  thread clears IPV6_V6ONLY on it; prints
//!                                  how many binds succeeded dual-stack
//! `--port-range LO HI` (with --netns): set the new namespace's
//! net.ipv4.ip_local_port_range, as a pod may.
//! ```
//! Setup order: new network namespace with loopback up (--netns), listeners
//! (created before joining the cgroup, so they are not governed), join the
//! cgroup (--cgroup), drop to uid (--uid), then run OP in this process, a
//! forked child (--fork) or a second thread (--thread).
//! Output: `{"op":..,"ok":true,"port":P,"pid":..,"tid":..}` or
//! `{"op":..,"ok":false,"errno":E,"error":"..",..}`.
//! `--serve-after-ms MS`: wait MS before the `--serve` check (to see what a
//! client gets once the agent has acted on the listener).
//! `--bind-device DEV`: `listen-unbound` binds its socket to DEV
//! (`SO_BINDTODEVICE`) before listen(); with `--uid`, as a process without
//! `CAP_NET_RAW`, which then cannot change it.
//! `--unfence`: after an operation that left a TCP listener, and before
//! `--serve`, try to bind it back to no device (`SO_BINDTODEVICE ""`, then
//! `SO_BINDTOIFINDEX 0`), as a tenant would to undo portguard's fence. Adds
//! `"unfence":["<errno name or ok>","<...>"]`.
//! `--serve`: after an operation that left a TCP listener, try to be served
//! on it as a client would: connect to its port over loopback (IPv4 and,
//! for an IPv6 socket, IPv6 too), and accept within 1.5 s. Adds
//! `"served":true|false` and `"client":"ok"|"ECONNREFUSED"|"timeout"|..`.

use std::{
    io::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    process::exit,
    sync::atomic::{AtomicBool, Ordering},
};

/// `--serve`: see the module docs.
static SERVE: AtomicBool = AtomicBool::new(false);
/// `--serve-after-ms`: see the module docs.
static SERVE_AFTER_MS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
/// `--unfence`: see the module docs.
static UNFENCE: AtomicBool = AtomicBool::new(false);
/// `--bind-device`: see the module docs.
static BIND_DEVICE: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// `--unfence`: try to bind `fd` back to no device, both ways.
fn unfence(fd: i32) -> String {
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

/// Wait up to `ms` for `events` on `fd`.
fn poll_for(fd: i32, events: i16, ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut p, 1, ms) > 0 && p.revents & events != 0 }
}

/// Try to be served on listener `fd`: see `--serve`.
fn serve_check(fd: i32) -> (bool, String) {
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

fn die(msg: &str) -> ! {
    eprintln!("pgprobe: {msg}");
    exit(2)
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn errno_name(e: i32) -> &'static str {
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
fn sockaddr(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
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

fn parse_addr(ip: &str, port: &str) -> SocketAddr {
    let ip: IpAddr = ip
        .trim_matches(|c| c == '[' || c == ']')
        .parse()
        .unwrap_or_else(|_| die(&format!("bad address {ip}")));
    let port: u16 = port
        .parse()
        .unwrap_or_else(|_| die(&format!("bad port {port}")));
    SocketAddr::new(ip, port)
}

fn socket(proto: &str, addr: &SocketAddr) -> i32 {
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

fn set_v6only(fd: i32, on: bool) {
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

fn local_port(fd: i32) -> u16 {
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
fn bind_to(fd: i32, addr: &SocketAddr) -> i32 {
    let (ss, len) = sockaddr(addr);
    // SAFETY: valid fd and sockaddr.
    unsafe { libc::bind(fd, std::ptr::from_ref(&ss).cast(), len) }
}

/// `sendto(fd, msg, addr)`; returns the syscall's result.
fn send_to(fd: i32, msg: &[u8], addr: &SocketAddr) -> isize {
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

fn gettid() -> i64 {
    // SAFETY: plain syscall.
    unsafe { libc::syscall(libc::SYS_gettid) }
}

/// Run one operation; returns the JSON result line.
fn run_op(op: &[String]) -> String {
    let get = |i: usize| -> &str {
        op.get(i)
            .map(String::as_str)
            .unwrap_or_else(|| die("missing operation argument"))
    };
    let kind = get(0);
    let mut first_errno = 0;
    let (fd, rc, e) = match kind {
        "rebind" => {
            let a1 = parse_addr(get(2), get(3));
            let a2 = parse_addr(get(2), get(4));
            let fd = socket(get(1), &a1);
            if a1.is_ipv6() {
                set_v6only(fd, true);
            }
            let rc = bind_to(fd, &a1);
            if rc == 0 {
                (fd, rc, 0)
            } else {
                first_errno = errno();
                let rc = bind_to(fd, &a2);
                (fd, rc, errno())
            }
        }
        "bind" => {
            let addr = parse_addr(get(2), get(3));
            let fd = socket(get(1), &addr);
            if addr.is_ipv6() {
                set_v6only(fd, op.get(4).is_some_and(|s| s == "v6only"));
            }
            let rc = bind_to(fd, &addr);
            (fd, rc, errno())
        }
        "connect" => {
            let addr = parse_addr(get(2), get(3));
            let fd = socket(get(1), &addr);
            let (ss, len) = sockaddr(&addr);
            // SAFETY: valid fd and sockaddr.
            let rc = unsafe { libc::connect(fd, std::ptr::from_ref(&ss).cast(), len) };
            (fd, rc, errno())
        }
        "sendto" => {
            let addr = parse_addr(get(1), get(2));
            let fd = socket("udp", &addr);
            let rc = send_to(fd, b"portguard", &addr) as i32;
            (fd, rc.min(0), errno())
        }
        "listen" => {
            let addr = parse_addr(get(2), get(3));
            let fd = socket(get(1), &addr);
            if addr.is_ipv6() {
                set_v6only(fd, true);
            }
            let mut rc = bind_to(fd, &addr);
            if rc == 0 {
                // SAFETY: listen on our own socket.
                rc = unsafe { libc::listen(fd, 8) };
            }
            (fd, rc, errno())
        }
        "listen-unbound" => {
            let addr = parse_addr(if get(2) == "6" { "::" } else { "0.0.0.0" }, "0");
            let fd = socket(get(1), &addr);
            if addr.is_ipv6() {
                set_v6only(fd, op.get(3).is_some_and(|s| s == "v6only"));
            }
            if let Some(dev) = BIND_DEVICE.get() {
                // SAFETY: setsockopt on our own socket with a valid buffer.
                let rc = unsafe {
                    libc::setsockopt(
                        fd,
                        libc::SOL_SOCKET,
                        libc::SO_BINDTODEVICE,
                        dev.as_ptr().cast(),
                        dev.len() as libc::socklen_t,
                    )
                };
                if rc != 0 {
                    die(&format!("SO_BINDTODEVICE {dev}: errno {}", errno()));
                }
            }
            // SAFETY: listen on our own socket.
            let rc = unsafe { libc::listen(fd, 8) };
            (fd, rc, errno())
        }
        "uring-bind" => {
            let addr = parse_addr(get(2), get(3));
            let fd = socket(get(1), &addr);
            if addr.is_ipv6() {
                set_v6only(fd, true);
            }
            let (ss, len) = sockaddr(&addr);
            let e = uring(
                io_uring::opcode::Bind::new(
                    io_uring::types::Fd(fd),
                    std::ptr::from_ref(&ss).cast(),
                    len,
                )
                .build(),
            );
            (fd, if e == 0 { 0 } else { -1 }, e)
        }
        "uring-listen-unbound" => {
            let addr = parse_addr(if get(1) == "6" { "::" } else { "0.0.0.0" }, "0");
            let fd = socket("tcp", &addr);
            let e = uring(io_uring::opcode::Listen::new(io_uring::types::Fd(fd), 8).build());
            (fd, if e == 0 { 0 } else { -1 }, e)
        }
        "socket" => {
            let (family, ty, proto) = match get(1) {
                "raw4" => (libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP),
                "raw6" => (libc::AF_INET6, libc::SOCK_RAW, libc::IPPROTO_ICMPV6),
                "sctp" => (libc::AF_INET, libc::SOCK_STREAM, 132),
                "l2tp" => (libc::AF_INET, libc::SOCK_DGRAM, 115),
                other => die(&format!("unknown socket kind {other}")),
            };
            // SAFETY: plain syscall.
            let fd = unsafe { libc::socket(family, ty, proto) };
            (fd, fd.min(0), errno())
        }
        "sendrecv" => {
            let addr = parse_addr(get(1), get(2));
            let fd = socket("udp", &addr);
            let rc = send_to(fd, b"ping", &addr) as i32;
            if rc < 0 {
                (fd, -1, errno())
            } else {
                let tv = libc::timeval {
                    tv_sec: 3,
                    tv_usec: 0,
                };
                let mut buf = [0u8; 64];
                // SAFETY: plain syscalls on our own socket.
                let n = unsafe {
                    libc::setsockopt(
                        fd,
                        libc::SOL_SOCKET,
                        libc::SO_RCVTIMEO,
                        std::ptr::from_ref(&tv).cast(),
                        size_of::<libc::timeval>() as u32,
                    );
                    libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0)
                };
                (fd, if n > 0 { 0 } else { -1 }, errno())
            }
        }
        "premove" => {
            let addr = parse_addr(get(2), get(3));
            let fd = socket(get(1), &addr);
            join_cgroup(get(4));
            let rc = bind_to(fd, &addr);
            (fd, rc, errno())
        }
        "handoff" => return handoff(op),
        "autobind-udp" => {
            return autobind_udp(
                &parse_addr(get(1), get(2)),
                get(3).parse().unwrap_or_else(|_| die("bad FROM port")),
            );
        }
        "v6only-race" => {
            return v6only_race(
                get(1).parse().unwrap_or_else(|_| die("bad port")),
                get(2).parse().unwrap_or_else(|_| die("bad count")),
            );
        }
        "hold" => {
            let addr = parse_addr(get(2), get(3));
            let fd = socket(get(1), &addr);
            if addr.is_ipv6() {
                set_v6only(fd, op.get(4).is_some_and(|s| s == "v6only"));
            }
            let (ss, len) = sockaddr(&addr);
            // SAFETY: valid fd and sockaddr; listen on our own socket.
            let mut rc = unsafe { libc::bind(fd, std::ptr::from_ref(&ss).cast(), len) };
            if rc == 0 && get(1) == "tcp" {
                // SAFETY: as above.
                rc = unsafe { libc::listen(fd, 8) };
            }
            let e = errno();
            // SAFETY: plain syscalls.
            let (pid, tid) = (unsafe { libc::getpid() }, gettid());
            emit(&format!(
                r#"{{"op":"hold","ok":{},"errno":{e},"port":{},"pid":{pid},"tid":{tid}}}"#,
                rc == 0,
                local_port(fd)
            ));
            loop {
                // SAFETY: waiting for a signal.
                unsafe { libc::pause() };
            }
        }
        other => die(&format!("unknown operation {other}")),
    };
    // SAFETY: plain syscalls.
    let (pid, tid) = (unsafe { libc::getpid() }, gettid());
    let line = if rc == 0 {
        let unfenced = if UNFENCE.load(Ordering::Relaxed) {
            unfence(fd)
        } else {
            String::new()
        };
        let served = if SERVE.load(Ordering::Relaxed) {
            let (served, client) = serve_check(fd);
            format!(r#","served":{served},"client":"{client}""#)
        } else {
            String::new()
        };
        format!(
            r#"{{"op":"{kind}","ok":true,"port":{},"first_errno":{first_errno},"pid":{pid},"tid":{tid}{unfenced}{served}}}"#,
            local_port(fd)
        )
    } else {
        format!(
            r#"{{"op":"{kind}","ok":false,"errno":{e},"error":"{}","first_errno":{first_errno},"pid":{pid},"tid":{tid}}}"#,
            errno_name(e)
        )
    };
    // SAFETY: closing our own fd.
    unsafe { libc::close(fd) };
    line
}

/// `autobind-udp ADDR PORT`: see the module docs.
fn autobind_udp(dest: &SocketAddr, from: u16) -> String {
    let fd = socket("udp", dest);
    let rc = send_to(fd, b"portguard", dest);
    let e = errno();
    let port = local_port(fd);
    let mut received = false;
    if port != 0 {
        let me = SocketAddr::new(
            if dest.is_ipv4() {
                IpAddr::V4(Ipv4Addr::LOCALHOST)
            } else {
                IpAddr::V6(Ipv6Addr::LOCALHOST)
            },
            port,
        );
        let other = socket("udp", &me);
        // Bound explicitly: in a namespace whose range was narrowed to the
        // one port the first socket took, an autobind would find none.
        let (ss, len) = sockaddr(&SocketAddr::new(me.ip(), from));
        // SAFETY: valid fd and sockaddr.
        if unsafe { libc::bind(other, std::ptr::from_ref(&ss).cast(), len) } != 0 {
            die(&format!(
                "autobind-udp: binding the sender to {from}: errno {}",
                errno()
            ));
        }
        if send_to(other, b"hello", &me) < 0 {
            die(&format!(
                "autobind-udp: the second send failed: errno {}",
                errno()
            ));
        }
        let mut buf = [0u8; 16];
        // SAFETY: plain syscalls on our own sockets.
        unsafe {
            received = poll_for(fd, libc::POLLIN, 1000)
                && libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) > 0;
            libc::close(other);
        }
    }
    // SAFETY: plain syscalls.
    let (pid, tid) = (unsafe { libc::getpid() }, gettid());
    // SAFETY: closing our own fd.
    unsafe { libc::close(fd) };
    format!(
        r#"{{"op":"autobind-udp","ok":{},"errno":{},"error":"{}","port":{port},"received":{received},"pid":{pid},"tid":{tid}}}"#,
        rc >= 0,
        if rc >= 0 { 0 } else { e },
        if rc >= 0 { "" } else { errno_name(e) },
    )
}

/// `v6only-race PORT N`: see the module docs.
fn v6only_race(port: u16, n: u32) -> String {
    use std::sync::atomic::AtomicI32;
    static CURRENT: AtomicI32 = AtomicI32::new(-1);
    static DONE: AtomicBool = AtomicBool::new(false);
    let flipper = std::thread::spawn(|| {
        let zero: libc::c_int = 0;
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
                }
            }
        }
    });
    let addr = SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port);
    let (mut bound, mut dual, mut eperm) = (0u32, 0u32, 0u32);
    for _ in 0..n {
        let fd = socket("tcp", &addr);
        set_v6only(fd, true);
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
            if v == 0 {
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

fn join_cgroup(dir: &str) {
    let procs = format!("{dir}/cgroup.procs");
    std::fs::write(&procs, "0").unwrap_or_else(|e| die(&format!("joining {procs}: {e}")));
}

/// Submit one io_uring operation and return its errno (0 on success).
fn uring(entry: io_uring::squeue::Entry) -> i32 {
    let mut ring = io_uring::IoUring::new(4).unwrap_or_else(|e| die(&format!("io_uring: {e}")));
    // SAFETY: the entry's pointers outlive the submission (we wait for it).
    unsafe {
        ring.submission()
            .push(&entry)
            .unwrap_or_else(|_| die("io_uring queue full"));
    }
    ring.submit_and_wait(1)
        .unwrap_or_else(|e| die(&format!("io_uring submit: {e}")));
    let cqe = ring
        .completion()
        .next()
        .unwrap_or_else(|| die("no completion"));
    if cqe.result() == -libc::EINVAL {
        die("io_uring: operation not supported by this kernel");
    }
    (-cqe.result()).max(0)
}

/// `handoff bind|listen tcp ADDR PORT CGROUP`: see the module docs.
fn handoff(op: &[String]) -> String {
    let arg = |i: usize| {
        op.get(i)
            .map(String::as_str)
            .unwrap_or_else(|| die("handoff args"))
    };
    let (action, proto, cgroup) = (arg(1), arg(2), arg(5));
    let addr = parse_addr(arg(3), arg(4));
    let mut sv = [0i32; 2];
    // SAFETY: plain syscalls; the child only uses async-signal-safe calls
    // plus our own helpers before printing and exiting.
    unsafe {
        if libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, sv.as_mut_ptr()) != 0 {
            die("socketpair");
        }
        let pid = libc::fork();
        if pid == 0 {
            libc::close(sv[0]);
            join_cgroup(cgroup);
            // Receive the socket.
            let mut byte = [0u8; 1];
            let mut iov = libc::iovec {
                iov_base: byte.as_mut_ptr().cast(),
                iov_len: 1,
            };
            let mut cbuf = [0u8; 64];
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = cbuf.as_mut_ptr().cast();
            msg.msg_controllen = cbuf.len();
            if libc::recvmsg(sv[1], &mut msg, 0) < 0 {
                die("recvmsg");
            }
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            if cmsg.is_null() {
                die("no SCM_RIGHTS");
            }
            let fd = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<i32>());
            let (rc, e) = if action == "bind" {
                let (ss, len) = sockaddr(&addr);
                let rc = libc::bind(fd, std::ptr::from_ref(&ss).cast(), len);
                (rc, errno())
            } else {
                let rc = libc::listen(fd, 8);
                (rc, errno())
            };
            let (pid, tid) = (libc::getpid(), gettid());
            let line = if rc == 0 {
                let served = if action == "listen" && SERVE.load(Ordering::Relaxed) {
                    let (served, client) = serve_check(fd);
                    format!(r#","served":{served},"client":"{client}""#)
                } else {
                    String::new()
                };
                format!(
                    r#"{{"op":"handoff","ok":true,"port":{},"pid":{pid},"tid":{tid}{served}}}"#,
                    local_port(fd)
                )
            } else {
                format!(
                    r#"{{"op":"handoff","ok":false,"errno":{e},"error":"{}","pid":{pid},"tid":{tid}}}"#,
                    errno_name(e)
                )
            };
            emit(&line);
            libc::_exit(0);
        }
        libc::close(sv[1]);
        let fd = socket(proto, &addr);
        if action == "listen" {
            let (ss, len) = sockaddr(&addr);
            if libc::bind(fd, std::ptr::from_ref(&ss).cast(), len) != 0 {
                die(&format!(
                    "handoff: the sender's bind failed: errno {}",
                    errno()
                ));
            }
        }
        // Send it with SCM_RIGHTS.
        let mut byte = [b'x'];
        let mut iov = libc::iovec {
            iov_base: byte.as_mut_ptr().cast(),
            iov_len: 1,
        };
        let mut cbuf = [0u8; 64];
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = libc::CMSG_SPACE(size_of::<i32>() as u32) as usize;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<i32>() as u32) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<i32>(), fd);
        if libc::sendmsg(sv[0], &msg, 0) < 0 {
            die("sendmsg");
        }
        let mut status = 0;
        libc::waitpid(pid, &mut status, 0);
    }
    String::new()
}

fn emit(line: &str) {
    if line.is_empty() {
        return;
    }
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn loopback_up() {
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

fn listen_on(spec: &str) -> i32 {
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

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut cgroup = None;
    let mut uid = None;
    let mut mode = "self";
    let mut repeat = 1usize;
    let mut interval_ms = 0u64;
    let mut listeners = Vec::new();
    let mut echoes: Vec<String> = Vec::new();
    let mut netns = false;
    let mut port_range: Option<String> = None;
    while let Some(a) = args.first().cloned() {
        if !a.starts_with("--") {
            break;
        }
        args.remove(0);
        let mut val = || {
            if args.is_empty() {
                die(&format!("{a} needs a value"));
            }
            args.remove(0)
        };
        match a.as_str() {
            "--netns" => netns = true,
            "--port-range" => port_range = Some(format!("{} {}", val(), val())),
            "--cgroup" => cgroup = Some(val()),
            "--uid" => uid = Some(val().parse::<u32>().unwrap_or_else(|_| die("bad --uid"))),
            "--listen" => listeners.push(val()),
            "--echo" => echoes.push(val()),
            "--fork" => mode = "fork",
            "--serve" => SERVE.store(true, Ordering::Relaxed),
            "--unfence" => UNFENCE.store(true, Ordering::Relaxed),
            "--serve-after-ms" => SERVE_AFTER_MS.store(
                val()
                    .parse()
                    .unwrap_or_else(|_| die("bad --serve-after-ms")),
                Ordering::Relaxed,
            ),
            "--bind-device" => {
                let _ = BIND_DEVICE.set(val());
            }
            "--thread" => mode = "thread",
            "--repeat" => repeat = val().parse().unwrap_or_else(|_| die("bad --repeat")),
            "--interval-ms" => {
                interval_ms = val().parse().unwrap_or_else(|_| die("bad --interval-ms"));
            }
            other => die(&format!("unknown option {other}")),
        }
    }
    if netns {
        // SAFETY: plain syscall.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            die(&format!("unshare(CLONE_NEWNET): errno {}", errno()));
        }
        loopback_up();
        if let Some(r) = &port_range {
            std::fs::write("/proc/sys/net/ipv4/ip_local_port_range", r)
                .unwrap_or_else(|e| die(&format!("ip_local_port_range {r}: {e}")));
        }
    }
    let _listeners: Vec<i32> = listeners.iter().map(|s| listen_on(s)).collect();
    for spec in &echoes {
        // A UDP responder in its own process, outside the cgroup: answers one
        // datagram, then exits.
        let fd = listen_on(spec);
        // SAFETY: the child only does recvfrom/sendto/_exit.
        unsafe {
            if libc::fork() == 0 {
                let mut buf = [0u8; 64];
                let mut from: libc::sockaddr_storage = std::mem::zeroed();
                let mut flen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
                let n = libc::recvfrom(
                    fd,
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                    std::ptr::from_mut(&mut from).cast(),
                    &mut flen,
                );
                if n > 0 {
                    libc::sendto(
                        fd,
                        buf.as_ptr().cast(),
                        n as usize,
                        0,
                        std::ptr::from_ref(&from).cast(),
                        flen,
                    );
                }
                libc::_exit(0);
            }
            libc::close(fd);
        }
    }
    if let Some(dir) = &cgroup {
        join_cgroup(dir);
    }
    if let Some(uid) = uid {
        // SAFETY: plain syscalls.
        if unsafe { libc::setgid(uid) } != 0 || unsafe { libc::setuid(uid) } != 0 {
            die(&format!("setuid({uid}): errno {}", errno()));
        }
    }
    let op = args;
    for i in 0..repeat {
        if i > 0 && interval_ms > 0 {
            std::thread::sleep(std::time::Duration::from_millis(interval_ms));
        }
        match mode {
            "self" => emit(&run_op(&op)),
            "thread" => {
                let op = op.clone();
                let line = std::thread::spawn(move || run_op(&op))
                    .join()
                    .unwrap_or_else(|_| die("thread panicked"));
                emit(&line);
            }
            "fork" => {
                // SAFETY: the child only runs run_op and _exit; single-threaded here.
                let pid = unsafe { libc::fork() };
                if pid < 0 {
                    die("fork failed");
                }
                if pid == 0 {
                    emit(&run_op(&op));
                    // SAFETY: terminating the child without running parent destructors.
                    unsafe { libc::_exit(0) };
                }
                let mut status = 0;
                // SAFETY: waiting for our own child.
                unsafe { libc::waitpid(pid, &mut status, 0) };
            }
            _ => unreachable!(),
        }
    }
}
