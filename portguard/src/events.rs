//! Raw ring-buffer records -> typed [`EventRecord`]s -> one JSON object per
//! line. Consumers never see raw bytes.
//!
//! Event fields (a contract with users; add fields, never rename):
//! `time`, `verdict` (`deny` | `audit`), `hook`, `policy`, `cgroup`,
//! `cgroup_id`, `pid`, `tid`, `uid`, `comm`, `family`, `protocol`, `address`,
//! `port`; plus `gid`, `policy_cgroup` (the cgroup whose policy decided, the
//! caller's own or an ancestor's), `policy_cgroup_id`, and `v4_mapped` /
//! `dual_stack` when they apply. Lost events are reported as
//! `{"time":..., "lost": N, "lost_total": M}`.

use std::{
    collections::HashMap,
    io::{self, Write},
    net::{Ipv4Addr, Ipv6Addr},
    time::{Duration, SystemTime},
};

use portguard_common::{
    EVENT_F_AUTOBIND, EVENT_F_DUAL_STACK, EVENT_F_V4_MAPPED, Event, Family, Hook, IPPROTO_TCP,
    IPPROTO_UDP, SOCK_KIND_L2TP, SOCK_KIND_OTHER, SOCK_KIND_RAW, SOCK_KIND_SCTP, VERDICT_AUDIT,
    VERDICT_CUT_OFF, VERDICT_DENY, VERDICT_REPORTED,
};
use serde::Serialize;
use serde_json::Value;

use crate::cgroupfs::Hierarchy;

/// Version of the event schema (docs/events.md, docs/event.schema.json).
/// Raised only when a field changes meaning; new fields do not raise it.
pub const SCHEMA_VERSION: u32 = 1;

/// A denial (or audit) as users see it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EventRecord {
    pub schema_version: u32,
    pub time: String,
    /// The node or host the agent runs on.
    pub host: String,
    pub verdict: &'static str,
    pub hook: &'static str,
    pub policy: Option<String>,
    /// Which part of the policy decided (see `policy::explain`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    pub cgroup: Option<String>,
    pub cgroup_id: u64,
    pub pid: u32,
    pub tid: u32,
    pub uid: u32,
    pub gid: u32,
    pub comm: String,
    pub family: &'static str,
    pub protocol: String,
    pub address: String,
    pub port: u16,
    pub policy_cgroup: Option<String>,
    pub policy_cgroup_id: u64,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub v4_mapped: bool,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub dual_stack: bool,
    /// `listen()` on an unbound socket (port 0: the kernel would pick it).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub autobind: bool,
    /// `sock_create` events: the socket kind (`raw`, `sctp`, `l2tp`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub socket: Option<&'static str>,
    /// `preexisting` events: the socket's inode (as in /proc/<pid>/fd).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub socket_inode: Option<u64>,
    /// `cut_off` events (and a UDP send denied for its autobound port):
    /// what was done to the socket: `destroyed` (the agent ended it with
    /// sock_diag SOCK_DESTROY; fenced until then), `fenced` (the kernel
    /// would not destroy it, an MPTCP listener; the fence keeps every
    /// packet from it), `closed` (its process had closed it already),
    /// `dropped` (neither fenced nor destroyable: the packet guard drops
    /// every packet addressed to it until it is gone) or `failed` (the
    /// packet guard could not be attached either; the agent's log says why).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action: Option<&'static str>,
    /// Who the caller is: pod, container or unit, when known.
    #[serde(flatten)]
    pub identity: WorkloadIdentity,
    /// How many identical decisions this line stands for (1, or the size
    /// of an aggregate; see `aggregate`).
    pub count: u64,
    /// Aggregates only: when the first and the last of them happened.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_seen: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<String>,
}

impl EventRecord {
    /// What the kernel judged, for [`crate::policy::explain::deciding_rule`].
    pub fn judged(&self) -> crate::policy::explain::Judged {
        use crate::policy::explain::{Dir, Judged};
        let loopback = self
            .address
            .parse::<std::net::IpAddr>()
            .is_ok_and(|a| match a {
                std::net::IpAddr::V4(v4) => v4.is_loopback(),
                std::net::IpAddr::V6(v6) => {
                    v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
                }
            });
        Judged {
            dir: match self.hook {
                "sock_create" => Dir::Socket,
                "connect4" | "connect6" | "sendmsg4" | "sendmsg6" => Dir::Connect,
                _ => Dir::Bind,
            },
            tcp: match self.protocol.as_str() {
                "tcp" => Some(true),
                "udp" => Some(false),
                _ => None,
            },
            ipv6: self.family == "ipv6",
            loopback,
            port: self.port,
            ephemeral: self.autobind || self.hook.starts_with("post_bind"),
            dual_stack: self.dual_stack,
        }
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

/// Kubernetes or systemd identity of the caller's cgroup. Fields are left
/// out when unknown.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct WorkloadIdentity {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub k8s_namespace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub k8s_pod: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub k8s_pod_uid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    /// `cri` when names came from the CRI runtime; `cgroup-path` when only
    /// the cgroup path was available (pod uid, container id, unit).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity_source: Option<&'static str>,
}

impl WorkloadIdentity {
    /// What the cgroup path says, completed by the runtime's snapshot.
    pub fn of(path: &str, cri: Option<&crate::cri::Snapshot>) -> Self {
        let id = crate::identity::parse(path);
        if id.pod_uid.is_none() && id.container_id.is_none() && id.unit.is_none() {
            return Self::default();
        }
        let pod = id
            .pod_uid
            .as_deref()
            .and_then(|uid| cri.and_then(|c| c.pod_by_uid(uid)));
        let container = id
            .container_id
            .as_deref()
            .and_then(|cid| cri.and_then(|c| c.container(cid)));
        Self {
            k8s_namespace: pod.map(|p| p.namespace.clone()),
            k8s_pod: pod.map(|p| p.name.clone()),
            k8s_pod_uid: id.pod_uid.clone(),
            container_name: container.map(|c| c.name.clone()),
            container_id: id.container_id.clone(),
            unit: id.unit.clone(),
            identity_source: Some(if pod.is_some() || container.is_some() {
                "cri"
            } else {
                "cgroup-path"
            }),
        }
    }
}

/// A report of events the kernel could not queue.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LostRecord {
    pub schema_version: u32,
    pub time: String,
    pub host: String,
    /// Events lost since the previous report.
    pub lost: u64,
    /// Events lost since the programs were installed (the kernel counter
    /// survives agent restarts when the state is pinned).
    pub lost_total: u64,
    /// The period the loss happened in: since the previous report (or the
    /// last time the previous agent was known alive) until this one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub until: Option<String>,
    /// The loss happened while no agent was reading (reported by the agent
    /// that adopted the pinned state).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub agent_restarted: bool,
}

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
fn boottime_ns() -> u64 {
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

fn protocol_name(p: u8) -> String {
    match p {
        IPPROTO_TCP => "tcp".to_owned(),
        IPPROTO_UDP => "udp".to_owned(),
        1 => "icmp".to_owned(),
        58 => "icmpv6".to_owned(),
        255 => "raw".to_owned(),
        other => other.to_string(),
    }
}

fn comm(raw: &[u8; 16]) -> String {
    let end = raw.iter().position(|b| *b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

/// What the agent knows about policy ids.
#[derive(Clone, Debug, Default)]
pub struct PolicyNames {
    names: HashMap<u32, String>,
}

impl PolicyNames {
    pub fn insert(&mut self, id: u32, name: &str) {
        self.names.insert(id, name.to_owned());
    }
    pub fn get(&self, id: u32) -> Option<&str> {
        self.names.get(&id).map(String::as_str)
    }
}

/// Turn a raw event into the user-facing record.
pub fn enrich(ev: &Event, names: &PolicyNames, cgroups: &mut Hierarchy, host: &str) -> EventRecord {
    let hook = Hook::from_u8(ev.hook).map_or("unknown", Hook::name);
    let v4_mapped = ev.flags & EVENT_F_V4_MAPPED != 0;
    let family = if ev.family == Family::Ipv4 as u8 {
        "ipv4"
    } else {
        "ipv6"
    };
    let address = if ev.family == Family::Ipv4 as u8 {
        let v4 = Ipv4Addr::new(ev.addr[0], ev.addr[1], ev.addr[2], ev.addr[3]);
        if v4_mapped {
            // Show the address as the program passed it.
            v4.to_ipv6_mapped().to_string()
        } else {
            v4.to_string()
        }
    } else {
        Ipv6Addr::from(ev.addr).to_string()
    };
    EventRecord {
        schema_version: SCHEMA_VERSION,
        time: format_time(wall_time(ev.boot_ns)),
        host: host.to_owned(),
        verdict: match ev.verdict {
            VERDICT_DENY => "deny",
            VERDICT_AUDIT => "audit",
            VERDICT_REPORTED => "reported",
            VERDICT_CUT_OFF => "cut_off",
            _ => "unknown",
        },
        hook,
        policy: names.get(ev.policy_id).map(str::to_owned),
        rule: None,
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
        socket_inode: None,
        action: None,
        identity: WorkloadIdentity::default(),
        count: 1,
        first_seen: None,
        last_seen: None,
    }
}

/// Size-based rotation of an event log file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rotation {
    /// Rotate once the file reaches this many bytes (0: never).
    pub max_bytes: u64,
    /// Rotated files kept (`FILE.1` newest .. `FILE.N`).
    pub keep: u32,
}

enum Sink {
    Stream(Box<dyn Write + Send>),
    File {
        path: std::path::PathBuf,
        out: io::BufWriter<std::fs::File>,
        size: u64,
        rotation: Rotation,
    },
    /// systemd's journal, natively: one entry per line, the JSON as
    /// MESSAGE, and each top-level field as PORTGUARD_<FIELD>.
    Journald,
}

/// Where event lines go: stdout, an append-only file (rotated by size), or
/// the journal. Exactly one line (or journal entry) per record.
pub struct EventWriter {
    sink: Sink,
    /// Lines that could not be written since the last successful write.
    pub failed: u64,
}

fn open_log(path: &std::path::Path) -> io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

/// `FILE.n`.
fn rotated(path: &std::path::Path, n: u32) -> std::path::PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(format!(".{n}"));
    p.into()
}

/// journald field name for a JSON key: `k8s_pod` -> `PORTGUARD_K8S_POD`.
pub fn journal_field(key: &str) -> String {
    format!("PORTGUARD_{}", key.to_ascii_uppercase())
}

impl EventWriter {
    pub fn stdout() -> Self {
        Self {
            sink: Sink::Stream(Box::new(io::BufWriter::new(io::stdout()))),
            failed: 0,
        }
    }

    pub fn file(path: &std::path::Path, rotation: Rotation) -> io::Result<Self> {
        let f = open_log(path)?;
        let size = f.metadata()?.len();
        Ok(Self {
            sink: Sink::File {
                path: path.to_owned(),
                out: io::BufWriter::new(f),
                size,
                rotation,
            },
            failed: 0,
        })
    }

    pub fn journald() -> Self {
        Self {
            sink: Sink::Journald,
            failed: 0,
        }
    }

    /// True when systemd connected standard output to the journal (so
    /// native journal entries are the better way to write there).
    pub fn stdout_is_journal() -> bool {
        use libsystemd::logging::JournalStream;
        JournalStream::from_env()
            .is_ok_and(|env| JournalStream::from_fd(io::stdout()).is_ok_and(|o| o == env))
    }

    #[cfg(test)]
    pub fn memory(buf: std::sync::Arc<std::sync::Mutex<Vec<u8>>>) -> Self {
        struct Shared(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl Write for Shared {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        Self {
            sink: Sink::Stream(Box::new(Shared(buf))),
            failed: 0,
        }
    }

    /// Write one JSON line. Errors are counted and returned.
    pub fn line<T: Serialize>(&mut self, record: &T) -> io::Result<()> {
        let res = self.write_line(record);
        if res.is_err() {
            self.failed += 1;
        }
        res
    }

    fn write_line<T: Serialize>(&mut self, record: &T) -> io::Result<()> {
        let mut text = serde_json::to_vec(record).map_err(io::Error::other)?;
        match &mut self.sink {
            Sink::Stream(out) => {
                text.push(b'\n');
                out.write_all(&text)
            }
            Sink::File {
                path,
                out,
                size,
                rotation,
            } => {
                text.push(b'\n');
                out.write_all(&text)?;
                *size += text.len() as u64;
                if rotation.max_bytes > 0 && *size >= rotation.max_bytes {
                    out.flush()?;
                    for n in (1..rotation.keep).rev() {
                        let from = rotated(path, n);
                        if from.exists() {
                            std::fs::rename(&from, rotated(path, n + 1))?;
                        }
                    }
                    if rotation.keep > 0 {
                        std::fs::rename(&*path, rotated(path, 1))?;
                    } else {
                        std::fs::remove_file(&*path)?;
                    }
                    *out = io::BufWriter::new(open_log(path)?);
                    *size = 0;
                }
                Ok(())
            }
            Sink::Journald => {
                use libsystemd::logging::{Priority, journal_send};
                let value = serde_json::to_value(record).map_err(io::Error::other)?;
                let msg = String::from_utf8_lossy(&text).into_owned();
                let priority = match value["verdict"].as_str() {
                    Some("deny") | None => Priority::Warning,
                    Some(_) => Priority::Notice,
                };
                let mut vars: Vec<(String, String)> =
                    vec![("SYSLOG_IDENTIFIER".into(), "portguard".into())];
                if let Some(obj) = value.as_object() {
                    for (k, v) in obj {
                        let v = match v {
                            Value::String(s) => s.clone(),
                            Value::Null => continue,
                            other => other.to_string(),
                        };
                        vars.push((journal_field(k), v));
                    }
                }
                journal_send(priority, &msg, vars.into_iter()).map_err(io::Error::other)
            }
        }
    }

    pub fn flush(&mut self) -> io::Result<()> {
        match &mut self.sink {
            Sink::Stream(out) => out.flush(),
            Sink::File { out, .. } => out.flush(),
            Sink::Journald => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use portguard_common::{EVENT_F_V4_MAPPED, IPPROTO_UDP};

    use super::*;

    fn raw() -> Event {
        let mut comm = [0u8; 16];
        comm[..2].copy_from_slice(b"nc");
        Event {
            boot_ns: boottime_ns(),
            cgroup_id: 42,
            policy_cgroup_id: 41,
            pid_tgid: (100u64 << 32) | 101,
            uid_gid: (5u64 << 32) | 1000,
            policy_id: 7,
            addr: [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            port: 8080,
            hook: Hook::Bind6 as u8,
            verdict: VERDICT_DENY,
            family: Family::Ipv4 as u8,
            protocol: IPPROTO_UDP,
            flags: EVENT_F_V4_MAPPED,
            sock_kind: 0,
            comm,
            _reserved: 0,
            sock_cookie: 0,
        }
    }

    #[test]
    fn decodes_and_enriches_with_the_contract_fields() {
        let ev = raw();
        // SAFETY: viewing a plain-data struct as bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts(std::ptr::from_ref(&ev).cast::<u8>(), size_of::<Event>())
        };
        let ev = decode(bytes).unwrap();
        let mut names = PolicyNames::default();
        names.insert(7, "web");
        let mut h = Hierarchy::new(PathBuf::from("/nonexistent"));
        h.remember(42, "/demo/web/child");
        h.remember(41, "/demo/web");
        let r = enrich(&ev, &names, &mut h, "node-1");
        let v: Value = serde_json::to_value(&r).unwrap();
        for key in [
            "time",
            "verdict",
            "hook",
            "policy",
            "cgroup",
            "cgroup_id",
            "pid",
            "tid",
            "uid",
            "comm",
            "family",
            "protocol",
            "address",
            "port",
        ] {
            assert!(v.get(key).is_some(), "missing {key}: {v}");
        }
        assert_eq!(v["schema_version"], SCHEMA_VERSION);
        assert_eq!(v["host"], "node-1");
        assert_eq!(v["count"], 1);
        assert!(v.get("first_seen").is_none());
        assert_eq!(v["verdict"], "deny");
        assert_eq!(v["hook"], "bind6");
        assert_eq!(v["policy"], "web");
        assert_eq!(v["cgroup"], "/demo/web/child");
        assert_eq!(v["policy_cgroup"], "/demo/web");
        assert_eq!(v["pid"], 100);
        assert_eq!(v["tid"], 101);
        assert_eq!(v["uid"], 1000);
        assert_eq!(v["gid"], 5);
        assert_eq!(v["comm"], "nc");
        assert_eq!(v["family"], "ipv4");
        assert_eq!(v["protocol"], "udp");
        assert_eq!(v["address"], "::ffff:127.0.0.1");
        assert_eq!(v["port"], 8080);
        assert_eq!(v["v4_mapped"], true);
        assert!(v.get("dual_stack").is_none());
        // Time is now-ish.
        let t = humantime::parse_rfc3339(v["time"].as_str().unwrap()).unwrap();
        let age = SystemTime::now().duration_since(t).unwrap_or_default();
        assert!(age < Duration::from_secs(5), "{age:?}");
    }

    #[test]
    fn short_or_corrupt_records_are_rejected() {
        assert!(matches!(decode(&[0u8; 10]), Err(DecodeError::Size { .. })));
        let mut ev = raw();
        ev.hook = 99;
        // SAFETY: viewing a plain-data struct as bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts(std::ptr::from_ref(&ev).cast::<u8>(), size_of::<Event>())
        };
        assert!(matches!(decode(bytes), Err(DecodeError::Hook { hook: 99 })));
    }

    #[test]
    fn the_log_file_rotates_by_size_and_keeps_n_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let mut w = EventWriter::file(
            &path,
            Rotation {
                max_bytes: 200,
                keep: 2,
            },
        )
        .unwrap();
        let rec = |i: u64| LostRecord {
            schema_version: 1,
            time: "t".into(),
            host: "h".into(),
            lost: i,
            lost_total: i,
            since: None,
            until: None,
            agent_restarted: false,
        };
        // Each line is about 65 bytes: 4 lines per file before rotating.
        for i in 1..=20 {
            w.line(&rec(i)).unwrap();
        }
        w.flush().unwrap();
        let read = |p: &std::path::Path| std::fs::read_to_string(p).unwrap_or_default();
        let current = read(&path);
        let one = read(&rotated(&path, 1));
        let two = read(&rotated(&path, 2));
        assert!(
            !rotated(&path, 3).exists(),
            "only two rotated files are kept"
        );
        for text in [&one, &two] {
            assert!(text.len() >= 200 && text.len() < 200 + 80, "{text}");
            for l in text.lines() {
                serde_json::from_str::<Value>(l).expect("whole lines only");
            }
        }
        // The newest lines are in the current file, the ones before in .1.
        assert!(
            current.lines().last().unwrap().contains(r#""lost":20"#),
            "{current}"
        );
        let first_of_one: Value = serde_json::from_str(one.lines().next().unwrap()).unwrap();
        let last_of_two: Value = serde_json::from_str(two.lines().last().unwrap()).unwrap();
        assert_eq!(
            first_of_one["lost"].as_u64().unwrap(),
            last_of_two["lost"].as_u64().unwrap() + 1
        );
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn journal_field_names() {
        assert_eq!(journal_field("k8s_pod"), "PORTGUARD_K8S_POD");
        assert_eq!(journal_field("verdict"), "PORTGUARD_VERDICT");
    }

    #[test]
    fn writer_emits_one_line_per_record() {
        let buf = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut w = EventWriter::memory(buf.clone());
        w.line(&LostRecord {
            schema_version: 1,
            time: "t".into(),
            host: "h".into(),
            lost: 3,
            lost_total: 5,
            since: None,
            until: None,
            agent_restarted: false,
        })
        .unwrap();
        w.line(&LostRecord {
            schema_version: 1,
            time: "u".into(),
            host: "h".into(),
            lost: 1,
            lost_total: 6,
            since: None,
            until: None,
            agent_restarted: false,
        })
        .unwrap();
        let text = String::from_utf8(buf.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(
            lines[0],
            r#"{"schema_version":1,"time":"t","host":"h","lost":3,"lost_total":5}"#
        );
    }
}
