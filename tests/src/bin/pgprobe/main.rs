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
//!      batch                       read operations as JSON lines on stdin and
//!                                  answer one line each (see `batch.rs`)
//!      handoff bind|listen tcp ADDR PORT CGROUP
//!                                  this process (outside CGROUP) creates the
//!                                  socket (and, for `listen`, binds PORT); a
//!                                  child in CGROUP receives it over a unix
//!                                  socket (SCM_RIGHTS) and binds / listens
//!      premove tcp|udp ADDR PORT CGROUP  create the socket, then move into
//!                                  CGROUP, then bind
//!      hold tcp|udp ADDR PORT      bind (and listen, for TCP), print the
//!                                  result, then keep the socket until killed
//!                                  (`join=CGROUP`: make the socket, then
//!                                  move into CGROUP, then bind)
//!      autobind-udp ADDR PORT FROM [nodest]
//!                                  unconnected UDP sendto from an unbound
//!                                  socket (the kernel autobinds it), then a
//!                                  second socket, bound to loopback port
//!                                  FROM, sends to the port it got:
//!                                  `"received"` says whether it arrived.
//!                                  `nodest`: the first send has no
//!                                  destination (it fails, EDESTADDRREQ,
//!                                  after the autobind and before any
//!                                  hook); the socket then connects to
//!                                  ADDR:FROM (the result is the connect's)
//!      ping-connect                an ICMP ping socket (allowed in the
//!                                  probe's namespace) binds 127.0.0.1:0,
//!                                  then connects to 127.0.0.1
//!      bind0-full-optmem ADDR      a TCP socket whose option memory is
//!                                  filled (TCP MD5 keys) so that no socket
//!                                  storage can be made for it, then
//!                                  bind(ADDR:0)
//!      v6only-race PORT N [bind=P] N times: an IPv6 TCP socket with
//!                                  IPV6_V6ONLY binds [::]:PORT while a second
//!                                  thread clears IPV6_V6ONLY on it (and with
//!                                  bind=P binds it to [::]:P); prints how
//!                                  many binds to PORT succeeded dual-stack.
//!                                  `leftover0`: each socket first fails a
//!                                  port-0 bind to an address not here
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
//! `--listen-in-child UID`: `listen-unbound` calls listen() in a forked
//! child running as UID (so without `CAP_NET_RAW`), which exits at once;
//! this process keeps the socket and goes on (`--serve`) with it.
//! `--bind-device DEV`: `listen-unbound` binds its socket to DEV
//! (`SO_BINDTODEVICE`) before listen(); with `--uid`, as a process without
//! `CAP_NET_RAW`, which then cannot change it.
//! `--fill-optmem`: `listen-unbound` fills its socket's option memory
//! (TCP MD5 keys) before listen(), so that no socket storage can be made
//! for it (a kernel program cannot mark it).
//! `--unfence`: after an operation that left a TCP listener, and before
//! `--serve`, try to bind it back to no device (`SO_BINDTODEVICE ""`, then
//! `SO_BINDTOIFINDEX 0`), as a tenant would to undo portguard's fence. Adds
//! `"unfence":["<errno name or ok>","<...>"]`.
//! `--serve`: after an operation that left a TCP listener, try to be served
//! on it as a client would: connect to its port over loopback (IPv4 and,
//! for an IPv6 socket, IPv6 too), and accept within 1.5 s. Adds
//! `"served":true|false` and `"client":"ok"|"ECONNREFUSED"|"timeout"|..`.

mod batch;
mod handoff;
mod ops;
mod race;
mod serve;
mod setup;
mod sock;

use std::sync::atomic::{AtomicBool, Ordering};

use ops::run_op;
use setup::{join_cgroup, listen_on, loopback_up};
use sock::{die, emit, errno};

/// `--serve`: see the module docs.
static SERVE: AtomicBool = AtomicBool::new(false);
/// `--serve-after-ms`: see the module docs.
static SERVE_AFTER_MS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
/// `--unfence`: see the module docs.
static UNFENCE: AtomicBool = AtomicBool::new(false);
/// `--bind-device`: see the module docs.
static BIND_DEVICE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
/// `--listen-in-child`: see the module docs.
static LISTEN_IN_CHILD: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
/// `--fill-optmem`: see the module docs.
static FILL_OPTMEM: AtomicBool = AtomicBool::new(false);

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
            "--listen-in-child" => {
                let _ = LISTEN_IN_CHILD.set(val().parse().unwrap_or_else(|_| die("bad uid")));
            }
            "--bind-device" => {
                let _ = BIND_DEVICE.set(val());
            }
            "--fill-optmem" => FILL_OPTMEM.store(true, Ordering::Relaxed),
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
    if op.first().is_some_and(|o| o == "batch") {
        batch::batch();
    }
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
