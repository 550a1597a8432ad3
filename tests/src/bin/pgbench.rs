//! pgbench: the tight loops `cargo xtask bench` times, run inside a cgroup.
//!
//! ```text
//! pgbench [--cgroup DIR] [--landlock-bind PORT] [--cpu N] OP [--port P]
//!         [--iters N] [--warmup N] [--reps R] [--seconds S] [--ports N]
//! OP: bind     socket(TCP) + bind(127.0.0.1:P) + close, must succeed
//!     connect  socket(UDP) + connect(127.0.0.1:P) + close, must succeed
//!     denied   socket(TCP) + bind(127.0.0.1:P) + close, must fail with EPERM
//!     rr       TCP request/response over loopback (netperf's TCP_RR): a
//!              listener on 127.0.0.1:P, one connection, a thread echoing;
//!              one transaction = 1 byte written and 1 byte read back. Every
//!              packet passes the receive path (and the packet guard).
//!     storm    bind(127.0.0.1:P) on one socket for S seconds (or exactly
//!              --count N times), as fast as possible; every call must fail
//!              with EPERM. With --distinct-at K --distinct-port Q, one
//!              bind to port Q (also denied) after the K-th denial. With
//!              --ports N, cycles over ports P..P+N-1 (a scan, not a
//!              hammer: N distinct kinds of denial for the aggregator).
//! ```
//! It runs in its own network namespace (loopback up), joins `--cgroup`,
//! optionally restricts itself with Landlock (TCP bind allowed only on
//! `--landlock-bind`), then prints one JSON line: per-repetition ns/op and the
//! median, or, for `storm`, the number of denials and the elapsed time.

use std::{process::exit, time::Instant};

fn die(msg: &str) -> ! {
    eprintln!("pgbench: {msg}");
    exit(2)
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn loopback_up() {
    // SAFETY: ioctls on a throwaway socket with a zeroed ifreq naming "lo".
    unsafe {
        if libc::unshare(libc::CLONE_NEWNET) != 0 {
            die("unshare(CLONE_NEWNET)");
        }
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo".iter().enumerate() {
            ifr.ifr_name[i] = *b as libc::c_char;
        }
        if libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut ifr) < 0 {
            die("SIOCGIFFLAGS");
        }
        ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as i16;
        if libc::ioctl(fd, libc::SIOCSIFFLAGS, &ifr) < 0 {
            die("SIOCSIFFLAGS");
        }
        libc::close(fd);
    }
}

fn addr(port: u16) -> libc::sockaddr_in {
    // SAFETY: a zeroed sockaddr_in is valid.
    let mut sin: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    sin.sin_family = libc::AF_INET as u16;
    sin.sin_port = port.to_be();
    sin.sin_addr.s_addr = u32::from_ne_bytes([127, 0, 0, 1]);
    sin
}

const SIN_LEN: libc::socklen_t = size_of::<libc::sockaddr_in>() as libc::socklen_t;

/// One iteration of `op`; returns the errno of the checked call (0 = ok).
#[inline(always)]
fn once(op: &str, sin: &libc::sockaddr_in) -> i32 {
    let p = std::ptr::from_ref(sin).cast::<libc::sockaddr>();
    // SAFETY: plain syscalls on a socket we own and close.
    unsafe {
        match op {
            "bind" | "denied" => {
                let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
                let rc = libc::bind(fd, p, SIN_LEN);
                let e = if rc == 0 { 0 } else { errno() };
                libc::close(fd);
                e
            }
            "connect" => {
                let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
                let rc = libc::connect(fd, p, SIN_LEN);
                let e = if rc == 0 { 0 } else { errno() };
                libc::close(fd);
                e
            }
            _ => die("unknown op"),
        }
    }
}

/// An established loopback TCP connection to a listener on `sin`, with a
/// thread echoing every byte: (client fd, echo thread).
fn rr_pair(sin: &libc::sockaddr_in) -> (i32, std::thread::JoinHandle<()>) {
    let p = std::ptr::from_ref(sin).cast::<libc::sockaddr>();
    let one: libc::c_int = 1;
    // SAFETY: plain syscalls on sockets we own.
    unsafe {
        let l = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        if libc::bind(l, p, SIN_LEN) != 0 || libc::listen(l, 1) != 0 {
            die(&format!("rr: listener: errno {}", errno()));
        }
        let c = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        if libc::connect(c, p, SIN_LEN) != 0 {
            die(&format!("rr: connect: errno {}", errno()));
        }
        let s = libc::accept(l, std::ptr::null_mut(), std::ptr::null_mut());
        if s < 0 {
            die(&format!("rr: accept: errno {}", errno()));
        }
        libc::close(l);
        for fd in [c, s] {
            libc::setsockopt(
                fd,
                libc::IPPROTO_TCP,
                libc::TCP_NODELAY,
                std::ptr::from_ref(&one).cast(),
                4,
            );
        }
        let echo = std::thread::spawn(move || {
            let mut b = [0u8; 1];
            // SAFETY: our own connected socket; ends when the client closes.
            while libc::read(s, b.as_mut_ptr().cast(), 1) == 1 {
                libc::write(s, b.as_ptr().cast(), 1);
            }
            libc::close(s);
        });
        (c, echo)
    }
}

/// Times `iters` request/response transactions on `c`.
fn timed_rr(c: i32, iters: u64) -> f64 {
    let mut b = [7u8; 1];
    let start = Instant::now();
    for _ in 0..iters {
        // SAFETY: our own connected socket.
        unsafe {
            if libc::write(c, b.as_ptr().cast(), 1) != 1
                || libc::read(c, b.as_mut_ptr().cast(), 1) != 1
            {
                die(&format!("rr: transaction failed: errno {}", errno()));
            }
        }
    }
    start.elapsed().as_nanos() as f64 / iters as f64
}

/// Times `iters` operations. An allowed bind that fails with EADDRINUSE is
/// retried and counted in `anomalies` (a rare kernel-side occurrence, seen
/// about once in ten million binds on this VM with or without programs);
/// any other unexpected answer aborts.
fn timed(op: &str, sin: &libc::sockaddr_in, iters: u64, want: i32, anomalies: &mut u64) -> f64 {
    let start = Instant::now();
    let mut done = 0;
    while done < iters {
        let e = once(op, sin);
        if e != want {
            if want == 0 && e == libc::EADDRINUSE && *anomalies < 100 {
                *anomalies += 1;
                continue;
            }
            die(&format!("{op}: expected errno {want}, got {e}"));
        }
        done += 1;
    }
    start.elapsed().as_nanos() as f64 / iters as f64
}

fn landlock_bind_only(port: u16) {
    use landlock::{
        ABI, Access as _, AccessNet, NetPort, Ruleset, RulesetAttr as _, RulesetCreatedAttr as _,
        RulesetStatus,
    };
    let status = Ruleset::default()
        .handle_access(AccessNet::BindTcp)
        .and_then(|r| r.create())
        .and_then(|r| r.add_rule(NetPort::new(port, AccessNet::BindTcp)))
        .and_then(|r| r.restrict_self())
        .unwrap_or_else(|e| die(&format!("landlock: {e}")));
    if status.ruleset != RulesetStatus::FullyEnforced {
        die(&format!(
            "landlock not fully enforced ({:?}); needs ABI {:?}+",
            status.ruleset,
            ABI::V4
        ));
    }
    let _ = AccessNet::from_all(ABI::V4);
}

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut cgroup = None;
    let mut landlock = None;
    let mut port = 8080u16;
    let mut iters = 100_000u64;
    let mut warmup = 20_000u64;
    let mut reps = 7usize;
    let mut seconds = 10.0f64;
    let mut count: Option<u64> = None;
    let mut ports = 1u16;
    let mut distinct: Option<(u64, u16)> = None;
    let mut op = None;
    let mut cpu: Option<usize> = None;
    while !args.is_empty() {
        let a = args.remove(0);
        let mut val = || {
            if args.is_empty() {
                die(&format!("{a} needs a value"));
            }
            args.remove(0)
        };
        match a.as_str() {
            "--cgroup" => cgroup = Some(val()),
            "--cpu" => cpu = Some(val().parse().unwrap_or_else(|_| die("bad --cpu"))),
            "--landlock-bind" => landlock = Some(val().parse().unwrap_or_else(|_| die("port"))),
            "--port" => port = val().parse().unwrap_or_else(|_| die("bad --port")),
            "--iters" => iters = val().parse().unwrap_or_else(|_| die("bad --iters")),
            "--warmup" => warmup = val().parse().unwrap_or_else(|_| die("bad --warmup")),
            "--reps" => reps = val().parse().unwrap_or_else(|_| die("bad --reps")),
            "--seconds" => seconds = val().parse().unwrap_or_else(|_| die("bad --seconds")),
            "--ports" => ports = val().parse().unwrap_or_else(|_| die("bad --ports")),
            "--count" => count = Some(val().parse().unwrap_or_else(|_| die("bad --count"))),
            "--distinct-at" => {
                let k = val().parse().unwrap_or_else(|_| die("bad --distinct-at"));
                distinct = Some((k, distinct.map_or(0, |d: (u64, u16)| d.1)));
            }
            "--distinct-port" => {
                let q = val().parse().unwrap_or_else(|_| die("bad --distinct-port"));
                distinct = Some((distinct.map_or(0, |d: (u64, u16)| d.0), q));
            }
            s if !s.starts_with("--") && op.is_none() => op = Some(s.to_owned()),
            other => die(&format!("unknown argument {other}")),
        }
    }
    let op = op.unwrap_or_else(|| die("missing OP"));
    if let Some(cpu) = cpu {
        // SAFETY: a zeroed cpu_set_t with one CPU set, applied to ourselves.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
                die(&format!("sched_setaffinity({cpu})"));
            }
        }
    }
    loopback_up();
    if let Some(dir) = &cgroup {
        std::fs::write(format!("{dir}/cgroup.procs"), "0")
            .unwrap_or_else(|e| die(&format!("joining {dir}: {e}")));
    }
    if let Some(p) = landlock {
        landlock_bind_only(p);
    }
    let sin = addr(port);
    if op == "storm" {
        // SAFETY: one socket, repeatedly denied, closed at the end.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        let all: Vec<libc::sockaddr_in> = (0..ports.max(1))
            .map(|i| addr(port.wrapping_add(i)))
            .collect();
        let mut next = 0usize;
        let mut p = || {
            let a = std::ptr::from_ref(&all[next]).cast::<libc::sockaddr>();
            next = (next + 1) % all.len();
            a
        };
        let start = Instant::now();
        let mut n = 0u64;
        let deny = |p: *const libc::sockaddr| {
            // SAFETY: bind on our own socket.
            if unsafe { libc::bind(fd, p, SIN_LEN) } == 0 || errno() != libc::EPERM {
                die("storm: a bind was not denied with EPERM");
            }
        };
        let other = distinct.map(|(k, q)| (k, addr(q)));
        match count {
            Some(total) => {
                while n < total {
                    deny(p());
                    n += 1;
                    if let Some((k, sin)) = &other
                        && n == *k
                    {
                        deny(std::ptr::from_ref(sin).cast::<libc::sockaddr>());
                    }
                }
            }
            None => {
                while start.elapsed().as_secs_f64() < seconds {
                    for _ in 0..1000 {
                        deny(p());
                    }
                    n += 1000;
                }
            }
        }
        let elapsed = start.elapsed().as_secs_f64();
        // SAFETY: closing our own socket.
        unsafe { libc::close(fd) };
        println!(r#"{{"op":"storm","denials":{n},"seconds":{elapsed}}}"#);
        return;
    }
    let want = if op == "denied" { libc::EPERM } else { 0 };
    let mut anomalies = 0;
    let mut samples: Vec<f64> = if op == "rr" {
        let (c, echo) = rr_pair(&sin);
        timed_rr(c, warmup);
        let s = (0..reps).map(|_| timed_rr(c, iters)).collect();
        // SAFETY: closing our own socket ends the echo thread.
        unsafe { libc::close(c) };
        let _ = echo.join();
        s
    } else {
        timed(&op, &sin, warmup, want, &mut anomalies);
        (0..reps)
            .map(|_| timed(&op, &sin, iters, want, &mut anomalies))
            .collect()
    };
    let list = samples
        .iter()
        .map(|s| format!("{s:.1}"))
        .collect::<Vec<_>>()
        .join(",");
    samples.sort_by(f64::total_cmp);
    let median = samples[samples.len() / 2];
    println!(
        r#"{{"op":"{op}","iters":{iters},"reps":[{list}],"median_ns":{median:.1},"anomalies":{anomalies}}}"#
    );
}
