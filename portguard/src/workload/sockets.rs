//! Sockets no hook judged: bound before portguard governed their cgroup
//! (before the agent started, before a reload or rescan brought the cgroup
//! under a policy), or whose cut-off event was lost. The agent lists them
//! at start, after every change of what is governed, and every
//! `--inventory-interval`; each one that breaks its policy is reported
//! (verdict `preexisting`) and, under an enforcing policy, ended.
//!
//! How: the kernel says which cgroup made each socket (sock_diag's
//! `INET_DIAG_CGROUP_ID`, Linux 5.7+), the cgroup the fence and the packet
//! path go by (the bind and listen hooks go by the calling task's): no
//! `/proc/<pid>/cgroup` path, which reads `/../..` from a pod's own cgroup
//! namespace. A socket made in a governed cgroup and bound by a process
//! elsewhere is therefore judged by its maker's policy here. Sockets live in network namespaces, so a
//! thread enters every namespace found on the host ([`scan_proc`]: those of
//! every process and thread, `/run/netns`, and namespace files held open)
//! and dumps its TCP listeners and bound UDP sockets. A socket no process
//! holds (only in flight in SCM_RIGHTS, or registered with io_uring) is
//! still listed there; which process holds the others comes from the
//! `socket:[inode]` links in `/proc/<pid>/fd`. What is judged: TCP
//! listeners, and unconnected UDP sockets with a local port (a UDP socket a
//! client autobound by sending is skipped when its port is in the host's
//! ephemeral range, not its namespace's, which the workload may set). A
//! policy's `ephemeral` allows any port in the host's ephemeral range, as
//! it does at listen time.
//!
//! Not reached: a network namespace that no process uses, no bind mount
//! names and no open file holds (one kept alive only by its sockets).

use std::{
    collections::HashMap,
    fs, io,
    net::IpAddr,
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
};

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    constants::{AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP},
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags, nlas::Nla},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_SOCK_DIAG};
use portguard_common::FENCE_IFINDEX;

/// One socket as sock_diag reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiagSocket {
    pub inode: u32,
    pub protocol: u8,
    pub local: IpAddr,
    pub port: u16,
    pub v6only: bool,
    /// UDP with a connected peer (a client), or any TCP listener: false.
    pub connected: bool,
    /// The socket's cookie (what events name it by).
    pub cookie: u64,
    /// The interface it is bound to (`SO_BINDTODEVICE`), 0 for none;
    /// [`FENCE_IFINDEX`] for a fenced socket.
    pub interface: u32,
    /// The cgroup that created it (`INET_DIAG_CGROUP_ID`; 0 if the kernel
    /// did not say).
    pub cgroup_id: u64,
}

/// sock_diag's attribute carrying a socket's cgroup id (linux/inet_diag.h).
const INET_DIAG_CGROUP_ID: u16 = 21;

/// The cgroup id attribute of a sock_diag answer.
fn cgroup_id_of(nlas: &[Nla]) -> u64 {
    use netlink_packet_core::Nla as _;
    nlas.iter()
        .find_map(|n| match n {
            Nla::Other(a) if a.kind() == INET_DIAG_CGROUP_ID && a.value_len() == 8 => {
                let mut b = [0u8; 8];
                a.emit_value(&mut b);
                Some(u64::from_ne_bytes(b))
            }
            _ => None,
        })
        .unwrap_or(0)
}

/// A namespace's sockets plus its ephemeral port range.
#[derive(Clone, Debug, Default)]
pub struct NetnsSockets {
    pub sockets: Vec<DiagSocket>,
    pub ephemeral: (u16, u16),
}

fn dump_family(family: u8, protocol: u8, states: StateFlags) -> io::Result<Vec<DiagSocket>> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut hdr = NetlinkHeader::default();
    hdr.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let mut packet = NetlinkMessage::new(
        hdr,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol,
            extensions: ExtensionFlags::empty(),
            states,
            socket_id: if family == AF_INET {
                SocketId::new_v4()
            } else {
                SocketId::new_v6()
            },
        })
        .into(),
    );
    packet.finalize();
    let mut buf = vec![0; packet.buffer_len()];
    packet.serialize(&mut buf);
    socket.send(&buf, 0)?;
    let mut out = Vec::new();
    let mut rx = vec![0u8; 1 << 16];
    loop {
        let n = socket.recv(&mut &mut rx[..], 0)?;
        if n == 0 {
            return Ok(out);
        }
        let mut off = 0;
        while off < n {
            let msg = <NetlinkMessage<SockDiagMessage>>::deserialize(&rx[off..n])
                .map_err(io::Error::other)?;
            let len = msg.header.length as usize;
            match msg.payload {
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                    let h = &r.header;
                    let v6only = r.nlas.iter().any(|n| matches!(n, Nla::SkV6Only(true)));
                    let peer = h.socket_id.destination_port != 0;
                    out.push(DiagSocket {
                        inode: h.inode,
                        protocol,
                        local: h.socket_id.source_address,
                        port: h.socket_id.source_port,
                        v6only,
                        connected: protocol == IPPROTO_UDP && peer,
                        cookie: u64::from_ne_bytes(h.socket_id.cookie),
                        interface: h.socket_id.interface_id,
                        cgroup_id: cgroup_id_of(&r.nlas),
                    });
                }
                NetlinkPayload::Done(_) => return Ok(out),
                NetlinkPayload::Error(e) => return Err(io::Error::other(format!("{e:?}"))),
                _ => {}
            }
            if len == 0 {
                break;
            }
            off += len;
        }
    }
}

/// Linux's default `ip_local_port_range`.
pub const DEFAULT_EPHEMERAL: (u16, u16) = (32768, 60999);

/// `net.ipv4.ip_local_port_range` of the calling thread's network namespace.
fn ephemeral_range() -> io::Result<(u16, u16)> {
    let s = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")?;
    let mut it = s.split_whitespace().map(str::parse::<u16>);
    match (it.next(), it.next()) {
        (Some(Ok(lo)), Some(Ok(hi))) if lo <= hi => Ok((lo, hi)),
        _ => Err(io::Error::other(format!(
            "unreadable ip_local_port_range {:?}",
            s.trim()
        ))),
    }
}

/// The host's ephemeral port range: `ip_local_port_range` of the initial
/// network namespace (pid 1's), which no workload can change. That is what
/// `ephemeral` means: a workload owning its network namespace may narrow its
/// own range onto any port. Read from a thread that enters pid 1's network
/// namespace (the DaemonSet shares the host's pids, not its network); where
/// that cannot be entered, the agent's own namespace's, with the reason.
pub fn host_ephemeral_range() -> ((u16, u16), Option<String>) {
    let own = |why: String| match ephemeral_range() {
        Ok(r) => (r, Some(why)),
        Err(e) => (
            DEFAULT_EPHEMERAL,
            Some(format!("{why}; own namespace: {e}")),
        ),
    };
    match in_netns(Path::new("/proc/1/ns/net"), ephemeral_range) {
        Ok(range) => (range, None),
        Err(e) => own(format!("reading pid 1's network namespace: {e}")),
    }
}

/// Run `f` on a short-lived thread inside the network namespace at `ns` (a
/// `/proc/<pid>/ns/net` path): sock_diag and `/proc/sys/net` answer for the
/// namespace of the thread that asks.
fn in_netns<T: Send>(ns: &Path, f: impl FnOnce() -> io::Result<T> + Send) -> io::Result<T> {
    in_netns_file(&open_netns(ns)?, f)
}

/// Open a network namespace file without ever blocking: a path under
/// `/proc/<pid>/fd` belongs to that process, which may have swapped the
/// namespace for a FIFO with no writer since it was listed (`O_NONBLOCK`
/// makes such an open return at once; `setns` then refuses anything that
/// is not a network namespace).
pub fn open_netns(ns: &Path) -> io::Result<fs::File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(ns)
}

/// [`in_netns`] for a namespace already open.
fn in_netns_file<T: Send>(
    file: &fs::File,
    f: impl FnOnce() -> io::Result<T> + Send,
) -> io::Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on this (scoped, short-lived) thread only.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                let e = io::Error::last_os_error();
                return Err(io::Error::new(e.kind(), format!("entering it: {e}")));
            }
            f()
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("network namespace thread panicked")))
    })
}

/// What [`end`] left of a cut-off socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    /// Destroyed: its process's next call on it fails.
    Destroyed,
    /// The kernel would not destroy it (the TCP subflow an MPTCP listener
    /// listens through), but it is fenced: nothing reaches it.
    Fenced,
}

/// The cut-off socket `cookie` on local `port`, in the network namespace
/// open as `ns`, as sock_diag lists it now; `None` once it is gone.
pub fn find(
    ns: &fs::File,
    family: u8,
    protocol: u8,
    port: u16,
    cookie: u64,
) -> io::Result<Option<DiagSocket>> {
    in_netns_file(ns, || find_here(family, protocol, port, cookie))
}

fn find_here(family: u8, protocol: u8, port: u16, cookie: u64) -> io::Result<Option<DiagSocket>> {
    let states = if protocol == IPPROTO_UDP {
        StateFlags::all()
    } else {
        StateFlags::LISTEN
    };
    Ok(dump_family(family, protocol, states)?
        .into_iter()
        .find(|s| s.cookie == cookie && s.port == port))
}

/// End one cut-off socket with sock_diag `SOCK_DESTROY` (what `ss -K`
/// does): a listener stops listening (connections waiting in its queue are
/// reset), the process's next call on it fails. Done from a thread inside
/// the network namespace open as `ns`. The socket is listed first and found
/// by its cookie (so no other socket is ever hit), which also gives the
/// interface it is bound to: the kernel looks a socket up for destruction
/// as it does for a packet, so a fenced socket is only found under
/// [`FENCE_IFINDEX`]. The kernel refuses (EINVAL) to destroy the TCP subflow
/// an MPTCP listener listens through: [`Ended::Fenced`] if the fence holds
/// it, else that error.
pub fn end(ns: &fs::File, family: u8, protocol: u8, port: u16, cookie: u64) -> io::Result<Ended> {
    in_netns_file(ns, || {
        let s = find_here(family, protocol, port, cookie)?.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("no socket with cookie {cookie} on port {port}"),
            )
        })?;
        match destroy_here(family, protocol, s.local, port, cookie, s.interface) {
            Ok(()) => Ok(Ended::Destroyed),
            Err(_) if s.interface == FENCE_IFINDEX as u32 => Ok(Ended::Fenced),
            Err(e) => Err(io::Error::new(e.kind(), format!("SOCK_DESTROY: {e}"))),
        }
    })
}

fn destroy_here(
    family: u8,
    protocol: u8,
    local: IpAddr,
    port: u16,
    cookie: u64,
    interface: u32,
) -> io::Result<()> {
    use netlink_packet_core::NLM_F_ACK;
    use netlink_packet_sock_diag::SockDiagDestroy;
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut id = if family == AF_INET {
        SocketId::new_v4()
    } else {
        SocketId::new_v6()
    };
    id.source_address = local;
    id.source_port = port;
    id.cookie = cookie.to_ne_bytes();
    id.interface_id = interface;
    let mut hdr = NetlinkHeader::default();
    hdr.flags = NLM_F_REQUEST | NLM_F_ACK;
    let mut packet = NetlinkMessage::new(
        hdr,
        NetlinkPayload::InnerMessage(SockDiagDestroy::new(SockDiagMessage::InetRequest(
            InetRequest {
                family,
                protocol,
                extensions: ExtensionFlags::empty(),
                states: StateFlags::all(),
                socket_id: id,
            },
        ))),
    );
    packet.finalize();
    let mut buf = vec![0; packet.buffer_len()];
    packet.serialize(&mut buf);
    socket.send(&buf, 0)?;
    let mut rx = vec![0u8; 8192];
    let n = socket.recv(&mut &mut rx[..], 0)?;
    let msg = <NetlinkMessage<SockDiagMessage>>::deserialize(&rx[..n]).map_err(io::Error::other)?;
    match msg.payload {
        NetlinkPayload::Error(e) => match e.code {
            None => Ok(()),
            Some(code) => Err(io::Error::from_raw_os_error(-code.get())),
        },
        other => Err(io::Error::other(format!(
            "unexpected sock_diag answer {other:?}"
        ))),
    }
}

/// TCP listeners and UDP sockets of the current network namespace.
pub fn dump_current() -> io::Result<NetnsSockets> {
    Ok(NetnsSockets {
        sockets: listeners_here()?,
        // Client sockets are told apart by the host's range, not the one
        // the namespace's owner set.
        ephemeral: host_ephemeral_range().0,
    })
}

/// [`dump_current`] inside the network namespace at `ns` (a
/// `/proc/<pid>/ns/net` path), from a thread that enters it.
pub fn dump_netns(ns: &Path) -> io::Result<NetnsSockets> {
    in_netns(ns, dump_current)
}

/// TCP listeners and UDP sockets (with a local port) of the network
/// namespace open as `ns`, from a thread that enters it.
pub fn dump_in(ns: &fs::File) -> io::Result<Vec<DiagSocket>> {
    in_netns_file(ns, listeners_here)
}

/// TCP listeners and UDP sockets with a local port, of the calling
/// thread's network namespace.
fn listeners_here() -> io::Result<Vec<DiagSocket>> {
    let mut sockets = Vec::new();
    for family in [AF_INET, AF_INET6] {
        sockets.extend(dump_family(family, IPPROTO_TCP, StateFlags::LISTEN)?);
        sockets.extend(dump_family(family, IPPROTO_UDP, StateFlags::all())?);
    }
    sockets.retain(|s| s.port != 0);
    Ok(sockets)
}

/// A process that holds a socket, with what identifies it in an event.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    pub comm: String,
}

/// What one pass over `/proc` found.
#[derive(Debug, Default)]
pub struct ProcScan {
    /// Every network namespace reachable (inode -> a path that opens it).
    pub netns: std::collections::BTreeMap<u64, PathBuf>,
    /// Socket inode -> the first process (lowest pid) holding it.
    pub holders: HashMap<u64, Holder>,
}

fn socket_inode(link: &Path) -> Option<u64> {
    link.to_str()?
        .strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

fn ids(pid: u32) -> (u32, u32) {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("Uid:"), field("Gid:"))
}

/// Every network namespace on the host and who holds each socket: the
/// namespaces of every process and of each of its threads (a thread may
/// `unshare` its own), namespace files a process holds open, and those
/// `ip netns` names in `/run/netns`.
pub fn scan_proc() -> ProcScan {
    let mut out = ProcScan::default();
    let add_ns = |out: &mut ProcScan, path: PathBuf| {
        if let Ok(m) = fs::metadata(&path) {
            out.netns.entry(m.ino()).or_insert(path);
        }
    };
    if let Ok(dir) = fs::read_dir("/run/netns") {
        for e in dir.flatten() {
            add_ns(&mut out, e.path());
        }
    }
    let Ok(proc) = fs::read_dir("/proc") else {
        return out;
    };
    let mut pids: Vec<u32> = proc
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    for pid in pids {
        add_ns(&mut out, PathBuf::from(format!("/proc/{pid}/ns/net")));
        if let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) {
            for t in tasks.flatten() {
                if t.file_name().to_str() != Some(&pid.to_string()) {
                    add_ns(&mut out, t.path().join("ns/net"));
                }
            }
        }
        let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        let mut holder = None;
        for e in fds.flatten() {
            let Ok(link) = fs::read_link(e.path()) else {
                continue;
            };
            if let Some(inode) = socket_inode(&link) {
                let h = holder.get_or_insert_with(|| {
                    let (uid, gid) = ids(pid);
                    Holder {
                        pid,
                        uid,
                        gid,
                        comm: fs::read_to_string(format!("/proc/{pid}/comm"))
                            .unwrap_or_default()
                            .trim()
                            .to_owned(),
                    }
                });
                out.holders.entry(inode).or_insert_with(|| h.clone());
            } else if link.to_str().is_some_and(|l| l.starts_with("net:[")) {
                add_ns(&mut out, e.path());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cookie_of(fd: i32) -> u64 {
        let mut cookie = 0u64;
        let mut len = 8 as libc::socklen_t;
        // SAFETY: getsockopt into a local u64.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_COOKIE,
                std::ptr::from_mut(&mut cookie).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0);
        cookie
    }

    /// SOCK_DESTROY needs CAP_NET_ADMIN: run as root (CI is), skipped
    /// otherwise. Ends a listener of this process found by port and cookie,
    /// also one bound to a device (the kernel looks it up under that
    /// device's index, which the listing gives); a wrong cookie ends
    /// nothing.
    #[test]
    fn ends_a_listener_by_port_and_cookie() {
        if !crate::kernel::caps::Caps::effective().is_ok_and(|c| c.0 & (1 << 12) != 0) {
            eprintln!("skipping: SOCK_DESTROY needs CAP_NET_ADMIN");
            return;
        }
        let ns = fs::File::open("/proc/thread-self/ns/net").unwrap();
        for device in [0, 1] {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            if device != 0 {
                // SAFETY: setsockopt on our own socket from a local int.
                let rc = unsafe {
                    libc::setsockopt(
                        l.as_raw_fd(),
                        libc::SOL_SOCKET,
                        libc::SO_BINDTOIFINDEX,
                        std::ptr::from_ref(&device).cast(),
                        4,
                    )
                };
                assert_eq!(rc, 0);
            }
            let port = l.local_addr().unwrap().port();
            let cookie = cookie_of(l.as_raw_fd());
            let e = end(&ns, AF_INET, IPPROTO_TCP, port, cookie ^ 1).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
            let found = find(&ns, AF_INET, IPPROTO_TCP, port, cookie)
                .unwrap()
                .unwrap();
            assert_eq!(found.interface, device as u32);
            assert_eq!(
                end(&ns, AF_INET, IPPROTO_TCP, port, cookie).unwrap(),
                Ended::Destroyed
            );
            // The listener is gone: accept() fails at once.
            l.set_nonblocking(true).unwrap();
            let e = l.accept().unwrap_err();
            assert_ne!(e.kind(), io::ErrorKind::WouldBlock, "{e}");
            assert_eq!(find(&ns, AF_INET, IPPROTO_TCP, port, cookie).unwrap(), None);
        }
    }

    /// Needs no privilege: sock_diag dumps of one's own namespace work for
    /// any user. Finds a listener this test opens.
    #[test]
    fn finds_a_listener_of_this_process() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let s = dump_current().unwrap();
        let found = s
            .sockets
            .iter()
            .find(|d| d.port == port && d.protocol == IPPROTO_TCP)
            .expect("listener listed");
        assert_eq!(found.local, "127.0.0.1".parse::<IpAddr>().unwrap());
        assert!(found.inode != 0);
        assert_eq!(found.cookie, cookie_of(l.as_raw_fd()));
        assert_eq!(found.interface, 0);
        let scan = scan_proc();
        let holder = &scan.holders[&u64::from(found.inode)];
        assert_eq!(holder.pid, std::process::id());
        let own_ns = fs::metadata("/proc/self/ns/net").unwrap().ino();
        assert!(scan.netns.contains_key(&own_ns));
        // The kernel names the cgroup that made it: this process's.
        if let Ok(root) = crate::workload::cgroupfs::cgroup2_mount() {
            let own = fs::read_to_string("/proc/self/cgroup").unwrap();
            let rel = own.lines().find_map(|l| l.strip_prefix("0::")).unwrap();
            let id = fs::metadata(root.join(rel.trim_start_matches('/')))
                .unwrap()
                .ino();
            assert_eq!(found.cgroup_id, id);
        }
        assert!(s.ephemeral.0 > 0 && s.ephemeral.0 < s.ephemeral.1);
    }
}
