//! `batch`: a long-lived executor for the differential tests
//! (`portguard_tests::difftest`). It reads one operation per line on stdin,
//! runs each in a fresh thread (so every operation has a thread id of its
//! own, which its event names), and answers one line per operation on
//! stdout, in order. The process stays in the cgroup and network namespace
//! it was started in, so no operation pays for a cgroup migration.
//!
//! Request (JSON): `{"op":"bind"|"connect"|"sendto"|"listen"|"raw","proto":"tcp"|"udp"|
//! "udplite"|"mptcp"|"raw","addr":"::ffff:127.0.0.1","port":8080,"v6only":false}`.
//! Answer: `{"ok":true,"errno":0,"port":P,"tid":T}`: `port` is the socket's
//! local port after the operation (what a bind to port 0 got). `raw`
//! creates a raw ICMP socket of the address's family (`sock_create`);
//! `listen` listens on the unbound socket (the address only picks the
//! family; the kernel autobinds the port).

use std::{
    io::{BufRead as _, Write as _},
    net::{IpAddr, SocketAddr},
};

use crate::sock::{bind_to, die, errno, gettid, local_port, send_to, set_v6only, sockaddr};

#[derive(serde::Deserialize)]
struct Request {
    op: String,
    proto: String,
    addr: IpAddr,
    port: u16,
    #[serde(default)]
    v6only: bool,
}

/// Run the loop until stdin closes.
pub(crate) fn batch() -> ! {
    let stdin = std::io::stdin();
    let mut out = std::io::stdout().lock();
    for line in stdin.lock().lines() {
        let line = line.unwrap_or_else(|e| die(&format!("reading stdin: {e}")));
        if line.trim().is_empty() {
            continue;
        }
        let req: Request = serde_json::from_str(&line)
            .unwrap_or_else(|e| die(&format!("bad request {line:?}: {e}")));
        let answer = std::thread::spawn(move || run(&req))
            .join()
            .unwrap_or_else(|_| die("operation thread panicked"));
        let _ = writeln!(out, "{answer}");
        let _ = out.flush();
    }
    std::process::exit(0)
}

fn run(req: &Request) -> String {
    let addr = SocketAddr::new(req.addr, req.port);
    let family = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    if req.op == "raw" {
        let proto = if addr.is_ipv4() {
            libc::IPPROTO_ICMP
        } else {
            libc::IPPROTO_ICMPV6
        };
        // SAFETY: plain syscalls.
        let fd = unsafe { libc::socket(family, libc::SOCK_RAW, proto) };
        let e = if fd < 0 { errno() } else { 0 };
        if fd >= 0 {
            // SAFETY: closing our own fd.
            unsafe { libc::close(fd) };
        }
        return format!(
            r#"{{"ok":{},"errno":{e},"port":0,"tid":{}}}"#,
            fd >= 0,
            gettid()
        );
    }
    let (ty, proto) = match req.proto.as_str() {
        "tcp" => (libc::SOCK_STREAM, 0),
        "mptcp" => (libc::SOCK_STREAM, 262),
        "udp" => (libc::SOCK_DGRAM, 0),
        "udplite" => (libc::SOCK_DGRAM, libc::IPPROTO_UDPLITE),
        other => die(&format!("bad protocol {other}")),
    };
    // SAFETY: plain syscall.
    let fd = unsafe { libc::socket(family, ty, proto) };
    if fd < 0 {
        // Refused at creation (sock_create).
        return format!(
            r#"{{"ok":false,"errno":{},"port":0,"tid":{}}}"#,
            errno(),
            gettid()
        );
    }
    if addr.is_ipv6() {
        set_v6only(fd, req.v6only);
    }
    let rc = match req.op.as_str() {
        "bind" => bind_to(fd, &addr),
        "connect" => {
            // Never wait for a handshake: loopback answers at once, and
            // anything else is unreachable in a namespace with only `lo`.
            // SAFETY: fcntl on our own socket.
            unsafe { libc::fcntl(fd, libc::F_SETFL, libc::O_NONBLOCK) };
            let (ss, len) = sockaddr(&addr);
            // SAFETY: valid fd and sockaddr.
            unsafe { libc::connect(fd, std::ptr::from_ref(&ss).cast(), len) }
        }
        "sendto" => send_to(fd, b"portguard", &addr).min(0) as i32,
        // listen() on the unbound socket: the kernel autobinds a port.
        // SAFETY: listen on our own socket.
        "listen" => unsafe { libc::listen(fd, 8) },
        other => die(&format!("bad operation {other}")),
    };
    let e = if rc == 0 { 0 } else { errno() };
    let port = local_port(fd);
    // SAFETY: closing our own fd.
    unsafe { libc::close(fd) };
    format!(
        r#"{{"ok":{},"errno":{e},"port":{port},"tid":{}}}"#,
        rc == 0,
        gettid()
    )
}
