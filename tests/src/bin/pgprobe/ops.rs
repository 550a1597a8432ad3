//! The operations: [`run_op`] runs one and returns its JSON result line
//! (`bind`, `connect`, `listen`, io_uring's `uring-*`, `hold`, ...), handing
//! `handoff` and `v6only-race` to their own modules; plus `autobind-udp`.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::atomic::Ordering,
};

use crate::{
    BIND_DEVICE, FILL_OPTMEM, LISTEN_IN_CHILD, SERVE, UNFENCE,
    handoff::handoff,
    race::v6only_race,
    serve::{serve_check, unfence},
    setup::join_cgroup,
    sock::{
        bind_to, die, emit, errno, errno_name, gettid, local_port, parse_addr, poll_for, send_to,
        set_v6only, sockaddr, socket,
    },
};

/// Run one operation; returns the JSON result line.
pub(crate) fn run_op(op: &[String]) -> String {
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
            if FILL_OPTMEM.load(Ordering::Relaxed) {
                fill_optmem(fd, addr.is_ipv6());
            }
            if let Some(&uid) = LISTEN_IN_CHILD.get() {
                // SAFETY: the child only calls setgid/setuid/listen/_exit.
                unsafe {
                    let child = libc::fork();
                    if child == 0 {
                        let ok = libc::setgid(uid) == 0
                            && libc::setuid(uid) == 0
                            && libc::listen(fd, 8) == 0;
                        libc::_exit(i32::from(!ok));
                    }
                    let mut status = 0;
                    libc::waitpid(child, &mut status, 0);
                    let ok = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
                    (
                        fd,
                        if ok { 0 } else { -1 },
                        if ok { 0 } else { libc::EPERM },
                    )
                }
            } else {
                // SAFETY: listen on our own socket.
                let rc = unsafe { libc::listen(fd, 8) };
                (fd, rc, errno())
            }
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
        "ping-connect" => {
            // Ping sockets for root in this (the probe's own) namespace.
            std::fs::write("/proc/sys/net/ipv4/ping_group_range", "0 0")
                .unwrap_or_else(|e| die(&format!("ping_group_range: {e}")));
            let addr = parse_addr("127.0.0.1", "0");
            // SAFETY: plain syscall.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, libc::IPPROTO_ICMP) };
            if fd < 0 {
                die(&format!("ping socket: errno {}", errno()));
            }
            // The kernel picks an ICMP ident (from 1 up, outside the host's
            // ephemeral range): no bind hook runs for ping sockets.
            if bind_to(fd, &addr) != 0 {
                die(&format!("ping-connect: bind: errno {}", errno()));
            }
            let (ss, len) = sockaddr(&addr);
            // SAFETY: valid fd and sockaddr.
            let rc = unsafe { libc::connect(fd, std::ptr::from_ref(&ss).cast(), len) };
            (fd, rc, errno())
        }
        "bind0-full-optmem" => {
            let addr = parse_addr(get(1), "0");
            let fd = socket("tcp", &addr);
            if addr.is_ipv6() {
                set_v6only(fd, true);
            }
            fill_optmem(fd, addr.is_ipv6());
            let rc = bind_to(fd, &addr);
            (fd, rc, errno())
        }
        "autobind-udp" => {
            return autobind_udp(
                &parse_addr(get(1), get(2)),
                get(3).parse().unwrap_or_else(|_| die("bad FROM port")),
                op.get(4).is_some_and(|m| m == "nodest"),
            );
        }
        "v6only-race" => {
            return v6only_race(
                get(1).parse().unwrap_or_else(|_| die("bad port")),
                get(2).parse().unwrap_or_else(|_| die("bad count")),
                op.iter()
                    .skip(3)
                    .find_map(|w| w.strip_prefix("bind="))
                    .map(|p| p.parse().unwrap_or_else(|_| die("bad bind= port"))),
                op.iter().skip(3).any(|w| w == "leftover0"),
            );
        }
        "hold" => {
            let addr = parse_addr(get(2), get(3));
            let fd = socket(get(1), &addr);
            if addr.is_ipv6() {
                set_v6only(fd, op.get(4).is_some_and(|s| s == "v6only"));
            }
            // `join=CGROUP`: the socket is made here, then this process
            // moves into CGROUP and binds it there.
            if let Some(cg) = op.iter().skip(4).find_map(|w| w.strip_prefix("join=")) {
                join_cgroup(cg);
            }
            let (ss, len) = sockaddr(&addr);
            // SAFETY: valid fd and sockaddr; listen on our own socket.
            let mut rc = unsafe { libc::bind(fd, std::ptr::from_ref(&ss).cast(), len) };
            if rc == 0 && get(1) == "tcp" {
                // SAFETY: as above.
                rc = unsafe { libc::listen(fd, 8) };
            }
            let e = errno();
            let port = local_port(fd);
            // Where the socket is kept after it is made: in this process's
            // fd table (default); only in flight, sent over a socketpair and
            // never received (`in-flight`); and/or with this process moved to
            // a new network namespace (`unshare-net`).
            let mut keep = Vec::new();
            for word in op.iter().skip(4) {
                match word.as_str() {
                    "v6only" => {}
                    w if w.starts_with("join=") => {}
                    "in-flight" => keep.push(in_flight(fd)),
                    "unshare-net" => {
                        // SAFETY: plain syscall.
                        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                            die(&format!("unshare(CLONE_NEWNET): errno {}", errno()));
                        }
                    }
                    other => die(&format!("unknown hold option {other}")),
                }
            }
            // SAFETY: plain syscalls.
            let (pid, tid) = (unsafe { libc::getpid() }, gettid());
            emit(&format!(
                r#"{{"op":"hold","ok":{},"errno":{e},"port":{port},"pid":{pid},"tid":{tid}}}"#,
                rc == 0,
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
fn autobind_udp(dest: &SocketAddr, from: u16, nodest: bool) -> String {
    let fd = socket("udp", dest);
    let (rc, e) = if nodest {
        // SAFETY: valid fd and buffer; no destination on an unconnected
        // socket: the kernel autobinds, then fails the send.
        let rc = unsafe { libc::send(fd, b"portguard".as_ptr().cast(), 9, 0) };
        if rc >= 0 || errno() != libc::EDESTADDRREQ {
            die(&format!(
                "autobind-udp: a send without destination gave {rc}, errno {}",
                errno()
            ));
        }
        // Then talk to one peer: the sender below.
        let (ss, len) = sockaddr(&SocketAddr::new(dest.ip(), from));
        // SAFETY: valid fd and sockaddr.
        let rc = unsafe { libc::connect(fd, std::ptr::from_ref(&ss).cast(), len) };
        (rc as isize, errno())
    } else {
        let rc = send_to(fd, b"portguard", dest);
        (rc, errno())
    };
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

/// `struct tcp_md5sig` (linux/tcp.h).
#[repr(C)]
struct TcpMd5Sig {
    addr: libc::sockaddr_storage,
    flags: u8,
    prefixlen: u8,
    keylen: u16,
    ifindex: i32,
    key: [u8; 80],
}

/// Fill the socket's option memory (`optmem_max`) with TCP MD5 keys, one per
/// peer address, until the kernel refuses one: what the socket may still
/// allocate (socket storage among it) is then too little. Dies if no key
/// could be added at all.
fn fill_optmem(fd: i32, v6: bool) {
    let mut keys = 0u32;
    for i in 1..100_000u32 {
        let peer = if v6 {
            let mut o = [0u8; 16];
            o[..4].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8]);
            o[12..].copy_from_slice(&i.to_be_bytes());
            SocketAddr::new(IpAddr::V6(Ipv6Addr::from(o)), 0)
        } else {
            let b = i.to_be_bytes();
            SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, b[1], b[2], b[3])), 0)
        };
        let (ss, _) = sockaddr(&peer);
        let mut sig = TcpMd5Sig {
            addr: ss,
            flags: 0,
            prefixlen: 0,
            keylen: 8,
            ifindex: 0,
            key: [0; 80],
        };
        sig.key[..8].copy_from_slice(b"portgrd!");
        // SAFETY: valid fd and option buffer of the size given.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::IPPROTO_TCP,
                libc::TCP_MD5SIG,
                std::ptr::from_ref(&sig).cast(),
                size_of::<TcpMd5Sig>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            break;
        }
        keys += 1;
    }
    if keys == 0 {
        die(&format!(
            "bind0-full-optmem: no TCP_MD5SIG key could be added: errno {}",
            errno()
        ));
    }
    eprintln!("pgprobe: {keys} TCP_MD5SIG keys fill the socket's option memory");
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

/// Send `fd` over a new socketpair and never receive it; close `fd`. The
/// socket then lives only in flight (the pair's end is returned, to keep).
fn in_flight(fd: i32) -> i32 {
    let mut pair = [0i32; 2];
    // SAFETY: socketpair into a local array.
    if unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_DGRAM, 0, pair.as_mut_ptr()) } != 0 {
        die(&format!("socketpair: errno {}", errno()));
    }
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // SAFETY: CMSG_SPACE of one int.
    let space = unsafe { libc::CMSG_SPACE(size_of::<i32>() as u32) } as usize;
    let mut control = vec![0u8; space];
    // SAFETY: a zeroed msghdr filled below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space;
    // SAFETY: the control buffer holds one cmsg with one int.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<i32>() as u32) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<i32>(), fd);
    }
    // SAFETY: a valid message on our own socket.
    if unsafe { libc::sendmsg(pair[0], &raw const msg, 0) } != 1 {
        die(&format!("sendmsg(SCM_RIGHTS): errno {}", errno()));
    }
    // SAFETY: closing our own fds: the socket lives on in flight.
    unsafe {
        libc::close(fd);
        libc::close(pair[0]);
    }
    pair[1]
}
