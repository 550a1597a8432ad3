//! From the kernel's raw [`Event`] to an [`EventRecord`]: validation
//! ([`decode`]), clock conversion, names of policies and cgroups
//! ([`enrich`]).

use std::{
    collections::HashMap,
    net::{Ipv4Addr, Ipv6Addr},
    time::{Duration, SystemTime},
};

use portguard_common::{
    EVENT_F_AUTOBIND, EVENT_F_DUAL_STACK, EVENT_F_V4_MAPPED, Event, Family, Hook, IPPROTO_TCP,
    IPPROTO_UDP, SOCK_KIND_L2TP, SOCK_KIND_OTHER, SOCK_KIND_RAW, SOCK_KIND_SCTP,
};

use super::*;
use crate::workload::cgroupfs::Hierarchy;

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("event record is {len} bytes, expected {expected}")]
    Size { len: usize, expected: usize },
    #[error("event record has unknown hook {hook}")]
    Hook { hook: u8 },
}

/// Decode one ring-buffer record.
pub fn decode(bytes: &[u8]) -> Result<Event, DecodeError> {
    let expected = size_of::<Event>();
    if bytes.len() < expected {
        return Err(DecodeError::Size {
            len: bytes.len(),
            expected,
        });
    }
    // SAFETY: length checked; Event is plain data valid for any bit pattern.
    let ev = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<Event>()) };
    if Hook::from_u8(ev.hook).is_none() {
        return Err(DecodeError::Hook { hook: ev.hook });
    }
    Ok(ev)
}

/// CLOCK_BOOTTIME now, in ns.
pub(super) fn boottime_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime with a valid out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Wall-clock time of a `bpf_ktime_get_boot_ns()` stamp.
pub fn wall_time(boot_ns: u64) -> SystemTime {
    let now_boot = boottime_ns();
    let now = SystemTime::now();
    if boot_ns <= now_boot {
        now - Duration::from_nanos(now_boot - boot_ns)
    } else {
        now + Duration::from_nanos(boot_ns - now_boot)
    }
}

pub fn format_time(t: SystemTime) -> String {
    humantime::format_rfc3339_nanos(t).to_string()
}

/// `a.b.c.d`, as `Ipv4Addr`'s `Display` writes it, without the formatting
/// machinery (a storm formats hundreds of thousands a second).
pub(super) fn ipv4_text(octets: [u8; 4]) -> String {
    let mut s = String::with_capacity(15);
    for (i, b) in octets.into_iter().enumerate() {
        if i > 0 {
            s.push('.');
        }
        if b >= 100 {
            s.push(char::from(b'0' + b / 100));
        }
        if b >= 10 {
            s.push(char::from(b'0' + b / 10 % 10));
        }
        s.push(char::from(b'0' + b % 10));
    }
    s
}

/// The `protocol` field for an IP protocol number.
pub fn protocol_name(p: u8) -> String {
    match p {
        IPPROTO_TCP => "tcp".to_owned(),
        IPPROTO_UDP => "udp".to_owned(),
        1 => "icmp".to_owned(),
        58 => "icmpv6".to_owned(),
        255 => "raw".to_owned(),
        other => other.to_string(),
    }
}

pub(super) fn comm(raw: &[u8; 16]) -> String {
    let end = raw.iter().position(|b| *b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

/// Policy ids and names, both ways: the one registry. Events carry a
/// policy's id; ids are small, stable for as long as the pinned maps live,
/// and numbered on from a previous agent's ([`PolicyNames::seed`]).
#[derive(Clone, Debug, Default)]
pub struct PolicyNames {
    names: HashMap<u32, String>,
    ids: HashMap<String, u32>,
    next: u32,
}

impl PolicyNames {
    /// Name an id (what events decode against), without numbering.
    pub fn insert(&mut self, id: u32, name: &str) {
        self.names.insert(id, name.to_owned());
    }

    /// Continue a previous agent's numbering: ids in pinned maps and in
    /// events still queued keep their names.
    pub fn seed(&mut self, id: u32, name: &str) {
        self.ids.entry(name.to_owned()).or_insert(id);
        self.next = self.next.max(id);
        self.insert(id, name);
    }

    /// The id of `name`, numbering it if it has none yet; `true` when it is
    /// new (its name must then be recorded where the kernel side keeps it).
    pub fn id(&mut self, name: &str) -> (u32, bool) {
        if let Some(&id) = self.ids.get(name) {
            return (id, false);
        }
        self.next += 1;
        self.ids.insert(name.to_owned(), self.next);
        self.insert(self.next, name);
        (self.next, true)
    }

    /// The id of `name`, if it has one.
    pub fn id_of(&self, name: &str) -> Option<u32> {
        self.ids.get(name).copied()
    }

    pub fn get(&self, id: u32) -> Option<&str> {
        self.names.get(&id).map(String::as_str)
    }
}

/// Turn a raw event into the user-facing record.
pub fn enrich(ev: &Event, names: &PolicyNames, cgroups: &mut Hierarchy, host: &str) -> EventRecord {
    let v4_mapped = ev.flags & EVENT_F_V4_MAPPED != 0;
    let family = family_name(if ev.family == Family::Ipv4 as u8 {
        Family::Ipv4
    } else {
        Family::Ipv6
    });
    let address = if ev.family == Family::Ipv4 as u8 {
        let octets = [ev.addr[0], ev.addr[1], ev.addr[2], ev.addr[3]];
        if v4_mapped {
            // Show the address as the program passed it.
            Ipv4Addr::from(octets).to_ipv6_mapped().to_string()
        } else {
            ipv4_text(octets)
        }
    } else {
        Ipv6Addr::from(ev.addr).to_string()
    };
    EventRecord {
        policy: names.get(ev.policy_id).map(str::to_owned),
        cgroup: cgroups.path_of(ev.cgroup_id),
        cgroup_id: ev.cgroup_id,
        pid: (ev.pid_tgid >> 32) as u32,
        tid: ev.pid_tgid as u32,
        uid: ev.uid_gid as u32,
        gid: (ev.uid_gid >> 32) as u32,
        comm: comm(&ev.comm),
        family,
        protocol: protocol_name(ev.protocol),
        address,
        port: ev.port,
        policy_cgroup: cgroups.path_of(ev.policy_cgroup_id),
        policy_cgroup_id: ev.policy_cgroup_id,
        v4_mapped,
        dual_stack: ev.flags & EVENT_F_DUAL_STACK != 0,
        autobind: ev.flags & EVENT_F_AUTOBIND != 0,
        socket: match ev.sock_kind {
            SOCK_KIND_RAW => Some("raw"),
            SOCK_KIND_SCTP => Some("sctp"),
            SOCK_KIND_L2TP => Some("l2tp"),
            SOCK_KIND_OTHER => Some("other"),
            _ => None,
        },
        ..EventRecord::new(
            Verdict::of_kernel(ev.verdict),
            EventHook::of_kernel(ev.hook),
            format_time(wall_time(ev.boot_ns)),
            host,
        )
    }
}

/// The host name events carry: `$PORTGUARD_HOST_NAME`, else `$NODE_NAME`
/// (a DaemonSet sets it from `spec.nodeName`; a pod's own host name is the
/// pod's), else the kernel's host name.
pub fn host_name() -> String {
    for var in ["PORTGUARD_HOST_NAME", "NODE_NAME"] {
        if let Ok(v) = std::env::var(var)
            && !v.is_empty()
        {
            return v;
        }
    }
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}
