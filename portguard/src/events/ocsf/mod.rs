//! Event lines as OCSF events (`--format ocsf`; docs/ocsf.md has the
//! table). One portguard line becomes one OCSF event, borrowed from the
//! record (no copy of its strings):
//!
//! - a decision ([`EventRecord`]) is a **Network Activity** event (class
//!   4001) with the Security Control profile: a host firewall's decision on
//!   an attempt to use a port, as firewall logs are mapped. `activity_id`
//!   says what was attempted (bind/listen: Listen, connect: Open, sendmsg:
//!   Traffic), `action_id`/`disposition_id` what was decided, and
//!   `firewall_rule` which policy (and part of it) decided;
//! - a loss or suppression report ([`LostRecord`], [`SuppressedRecord`]) is
//!   an **Event Log Activity** event (class 1008): it reports on the event
//!   log (N decisions written as no line of their own), not on the network,
//!   and must not be counted as network activity;
//! - a runtime hook failure is an **Application Lifecycle** event (class
//!   6002) of portguard's hook ([`hook_failed`]).
//!
//! Every event keeps portguard's own fields that OCSF has no attribute for
//! (`verdict`, `hook`, `cgroup`, `k8s_pod`, ...) under `unmapped`, with
//! their portguard names, so nothing the JSON line says is lost.
//!
//! Here: the classes, activities and outcomes, and decisions; `objects`:
//! the OCSF objects; `reports`: the lines that are not decisions. This
//! module owns the OCSF vocabulary; it imports nothing but the records.

mod objects;
mod reports;

use portguard_common::Hook;
use serde::Serialize;

pub use self::{objects::*, reports::*};
use super::{EventHook, EventRecord, Verdict};

/// The OCSF schema version the events follow (`metadata.version`).
pub const OCSF_VERSION: &str = "1.3.0";

/// Profiles a decision uses (`metadata.profiles`).
pub const DECISION_PROFILES: &[&str] = &[
    "host",
    "container",
    "security_control",
    "linux/linux_users",
    "datetime",
];
/// Profiles the reports (lost, suppressed, hook failures) use.
pub const REPORT_PROFILES: &[&str] = &["host", "datetime"];

/// Class, category and activity of an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Classification {
    pub class_uid: u32,
    pub class_name: &'static str,
    pub category_uid: u32,
    pub category_name: &'static str,
    pub activity_id: u32,
    pub activity_name: &'static str,
    pub type_uid: u64,
    pub type_name: &'static str,
}

/// Network Activity (4001), in the Network Activity category (4).
const fn network(
    activity_id: u32,
    activity_name: &'static str,
    type_name: &'static str,
) -> Classification {
    Classification {
        class_uid: 4001,
        class_name: "Network Activity",
        category_uid: 4,
        category_name: "Network Activity",
        activity_id,
        activity_name,
        type_uid: 4001 * 100 + activity_id as u64,
        type_name,
    }
}

/// The activity a hook judges, and which way the traffic would go
/// (`connection_info.direction_id`: 1 inbound, 2 outbound, 0 unknown).
pub const fn activity(hook: EventHook) -> (Classification, u32) {
    match hook {
        // Binding a port (or finding one bound) is claiming it to receive.
        EventHook::Kernel(
            Hook::Bind4 | Hook::Bind6 | Hook::PostBind4 | Hook::PostBind6 | Hook::Listen,
        )
        | EventHook::Inventory => (network(7, "Listen", "Network Activity: Listen"), 1),
        EventHook::Kernel(Hook::Accept) => (network(1, "Open", "Network Activity: Open"), 1),
        EventHook::Kernel(Hook::Connect4 | Hook::Connect6) => {
            (network(1, "Open", "Network Activity: Open"), 2)
        }
        EventHook::Kernel(Hook::Sendmsg4 | Hook::Sendmsg6) => {
            (network(6, "Traffic", "Network Activity: Traffic"), 2)
        }
        // Creating a socket of a restricted kind, or taking a cut-off
        // socket's fence down: no OCSF activity says that.
        EventHook::Kernel(Hook::SockCreate) => {
            (network(99, "sock_create", "Network Activity: Other"), 0)
        }
        EventHook::Kernel(Hook::Setsockopt) => {
            (network(99, "setsockopt", "Network Activity: Other"), 0)
        }
        EventHook::Kernel(Hook::Ingress) => (network(99, "ingress", "Network Activity: Other"), 1),
        EventHook::Unknown => (network(0, "Unknown", "Network Activity: Unknown"), 0),
    }
}

/// What was decided, in the Security Control profile's terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Outcome {
    pub action_id: u32,
    pub action: &'static str,
    pub disposition_id: u32,
    pub disposition: &'static str,
    /// Whether the attempted operation itself succeeded (`deny`: it failed
    /// with EPERM; a cut-off `listen()` returned 0, then lost its socket).
    pub status_id: u32,
    pub status: &'static str,
    pub severity_id: u32,
    pub severity: &'static str,
}

const DENIED: (u32, &str) = (2, "Denied");
const ALLOWED: (u32, &str) = (1, "Allowed");
const BLOCKED: (u32, &str) = (2, "Blocked");
const SUCCESS: (u32, &str) = (1, "Success");
const FAILURE: (u32, &str) = (2, "Failure");
const LOW: (u32, &str) = (2, "Low");
const MEDIUM: (u32, &str) = (3, "Medium");
const HIGH: (u32, &str) = (4, "High");

const fn outcome_of(
    action: (u32, &'static str),
    disposition: (u32, &'static str),
    status: (u32, &'static str),
    severity: (u32, &'static str),
) -> Outcome {
    Outcome {
        action_id: action.0,
        action: action.1,
        disposition_id: disposition.0,
        disposition: disposition.1,
        status_id: status.0,
        status: status.1,
        severity_id: severity.0,
        severity: severity.1,
    }
}

/// The outcome of a decision: its verdict and, for sockets portguard had
/// to end, what was done to the socket (`action`).
pub fn outcome(verdict: Verdict, action: Option<&str>) -> Outcome {
    // Nothing could end a socket that breaks an enforcing policy: the
    // control failed, and traffic still reaches it.
    const ERROR: (u32, &str) = (27, "Error");
    match (verdict, action) {
        (Verdict::Deny, _) => outcome_of(DENIED, BLOCKED, FAILURE, MEDIUM),
        // Allowed; enforce mode would have denied it.
        (Verdict::Audit, _) => outcome_of(ALLOWED, (15, "Detected"), SUCCESS, LOW),
        (Verdict::CutOff | Verdict::Reported | Verdict::Preexisting, Some("failed")) => {
            outcome_of(DENIED, ERROR, SUCCESS, HIGH)
        }
        (Verdict::CutOff | Verdict::Reported, _) | (Verdict::Preexisting, Some(_)) => {
            outcome_of(DENIED, BLOCKED, SUCCESS, MEDIUM)
        }
        // Found under an audit-mode policy: left alone.
        (Verdict::Preexisting, None) => outcome_of(ALLOWED, (15, "Detected"), SUCCESS, LOW),
        (Verdict::Unknown, _) => outcome_of(
            (0, "Unknown"),
            (0, "Unknown"),
            (0, "Unknown"),
            (0, "Unknown"),
        ),
    }
}

/// portguard's fields OCSF has no attribute for, by their portguard names.
#[derive(Serialize)]
pub struct Unmapped<'a> {
    pub schema_version: u32,
    pub verdict: Verdict,
    pub hook: EventHook,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<&'a str>,
    pub cgroup_id: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy_cgroup: Option<&'a str>,
    pub policy_cgroup_id: u64,
    pub family: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub k8s_namespace: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub k8s_pod: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub k8s_pod_uid: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unit: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity_source: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub socket: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub socket_inode: Option<u64>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub v4_mapped: bool,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub dual_stack: bool,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub autobind: bool,
    #[serde(skip_serializing_if = "<[u32]>::is_empty")]
    pub pids: &'a [u32],
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid_count: Option<u32>,
}

/// A decision as an OCSF Network Activity event.
#[derive(Serialize)]
pub struct NetworkActivity<'a> {
    #[serde(flatten)]
    pub class: Classification,
    pub time: i64,
    pub time_dt: &'a str,
    #[serde(flatten)]
    pub outcome: Outcome,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_code: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_detail: Option<&'a str>,
    pub message: String,
    pub count: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start_time: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start_time_dt: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub end_time: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub end_time_dt: Option<&'a str>,
    pub metadata: Metadata<'a>,
    pub device: Device<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actor: Option<Actor<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub src_endpoint: Option<Endpoint<'a>>,
    pub dst_endpoint: Endpoint<'a>,
    pub connection_info: ConnectionInfo<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub firewall_rule: Option<FirewallRule<'a>>,
    pub unmapped: Unmapped<'a>,
}

/// Milliseconds since the epoch (OCSF's `timestamp_t`) of an RFC 3339
/// time; 0 if it does not parse (portguard writes none such).
pub fn millis(rfc3339: &str) -> i64 {
    humantime::parse_rfc3339_weak(rfc3339)
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A pod uid as OCSF's `uuid_t` wants it; `None` for anything else (a
/// cgroup path's uid keeps the kubelet's spelling).
fn uuid(s: &str) -> Option<&str> {
    let b = s.as_bytes();
    let ok = b.len() == 36
        && b.iter().enumerate().all(|(i, c)| {
            if matches!(i, 8 | 13 | 18 | 23) {
                *c == b'-'
            } else {
                c.is_ascii_hexdigit()
            }
        });
    ok.then_some(s)
}

/// IANA protocol number of a `protocol` field.
fn protocol_num(p: &str) -> Option<u8> {
    match p {
        "tcp" => Some(6),
        "udp" => Some(17),
        "icmp" => Some(1),
        "icmpv6" => Some(58),
        _ => p.parse().ok(),
    }
}

/// Who the caller is, in a few words, for `message`.
fn workload(r: &EventRecord) -> Option<String> {
    let id = &r.identity;
    if let Some(pod) = &id.k8s_pod {
        let ns = id.k8s_namespace.as_deref().unwrap_or("?");
        return Some(match &id.container_name {
            Some(c) => format!("{ns}/{pod}/{c}"),
            None => format!("{ns}/{pod}"),
        });
    }
    id.unit.clone().or_else(|| r.cgroup.clone())
}

/// `message`: the decision in one sentence.
pub fn message(r: &EventRecord) -> String {
    use std::fmt::Write as _;
    let verb = match r.verdict {
        Verdict::Deny => "denied",
        Verdict::Audit => "audit (would deny)",
        Verdict::CutOff | Verdict::Reported => "cut off",
        Verdict::Preexisting => "found pre-existing",
        Verdict::Unknown => "decided",
    };
    let mut m = format!("portguard {verb}: {}", r.hook.name());
    if let Some(s) = r.socket {
        let _ = write!(m, " {s} socket");
    } else if r.address.contains(':') {
        let _ = write!(m, " {} [{}]:{}", r.protocol, r.address, r.port);
    } else if !r.address.is_empty() {
        let _ = write!(m, " {} {}:{}", r.protocol, r.address, r.port);
    }
    if !r.comm.is_empty() || r.pid != 0 {
        let _ = write!(m, " by {} (pid {})", r.comm, r.pid);
    }
    if let Some(w) = workload(r) {
        let _ = write!(m, " in {w}");
    }
    if let Some(p) = &r.policy {
        let _ = write!(m, "; policy {p}");
        if let Some(rule) = &r.rule {
            let _ = write!(m, ", rule {rule}");
        }
    }
    if r.count > 1 {
        let _ = write!(m, "; {} times", r.count);
    }
    if let Some(a) = r.action {
        let _ = write!(m, "; socket {a}");
    }
    m
}

impl EventRecord {
    /// This decision as an OCSF Network Activity event.
    pub fn ocsf(&self) -> NetworkActivity<'_> {
        let (class, direction_id) = activity(self.hook);
        let id = &self.identity;
        let container =
            (id.container_id.is_some() || id.container_name.is_some()).then(|| Container {
                uid: id.container_id.as_deref(),
                name: id.container_name.as_deref(),
                pod_uuid: id.k8s_pod_uid.as_deref().and_then(uuid),
                orchestrator: (id.k8s_pod_uid.is_some() || id.k8s_pod.is_some())
                    .then_some("Kubernetes"),
            });
        let ip = (!self.address.is_empty() && self.address.parse::<std::net::IpAddr>().is_ok())
            .then_some(self.address.as_str());
        let remote = direction_id == 2;
        // The caller's own end: the bound address (bind, listen, a
        // pre-existing socket), or this host (connect, sendmsg; a socket
        // created or set, which has no address).
        let local = Endpoint {
            ip: if remote { None } else { ip },
            port: (!remote && ip.is_some()).then_some(self.port),
            hostname: Some(self.host.as_str()),
            container,
        };
        // OCSF 1.3 requires `dst_endpoint`: where the connection goes, or
        // the caller's own end when there is no other.
        let (src_endpoint, dst_endpoint) = match ip {
            Some(ip) if remote => (
                Some(local),
                Endpoint {
                    ip: Some(ip),
                    port: Some(self.port),
                    hostname: None,
                    container: None,
                },
            ),
            _ => (None, local),
        };
        let loopback = ip.is_some() && self.judged().loopback;
        let outcome = outcome(self.verdict, self.action);
        let aggregate = self.first_seen.is_some();
        let v6 = self.family == "ipv6";
        NetworkActivity {
            class,
            time: millis(&self.time),
            time_dt: &self.time,
            outcome,
            status_code: (self.verdict == Verdict::Deny).then_some("EPERM"),
            status_detail: self.action,
            message: message(self),
            count: self.count,
            start_time: aggregate.then(|| self.first_seen.as_deref().map_or(0, millis)),
            start_time_dt: self.first_seen.as_deref(),
            end_time: aggregate.then(|| self.last_seen.as_deref().map_or(0, millis)),
            end_time_dt: self.last_seen.as_deref(),
            metadata: Metadata::new(DECISION_PROFILES, &self.time),
            device: Device::of(&self.host),
            // pid 0: no process holds the socket (preexisting, in flight).
            actor: (self.pid != 0).then(|| Actor {
                process: Process {
                    pid: self.pid,
                    tid: self.tid,
                    name: &self.comm,
                    user: User {
                        uid: self.uid.to_string(),
                    },
                    group: Group {
                        uid: self.gid.to_string(),
                    },
                    container,
                },
                user: User {
                    uid: self.uid.to_string(),
                },
            }),
            src_endpoint,
            dst_endpoint,
            connection_info: ConnectionInfo {
                protocol_name: (!self.protocol.is_empty()).then_some(self.protocol.as_str()),
                protocol_num: protocol_num(&self.protocol),
                protocol_ver_id: if v6 { 6 } else { 4 },
                protocol_ver: if v6 {
                    "Internet Protocol version 6 (IPv6)"
                } else {
                    "Internet Protocol version 4 (IPv4)"
                },
                direction_id,
                direction: match direction_id {
                    1 => "Inbound",
                    2 => "Outbound",
                    _ => "Unknown",
                },
                boundary_id: loopback.then_some(1),
                boundary: loopback.then_some("Localhost"),
            },
            firewall_rule: self.policy.as_deref().map(|name| FirewallRule {
                name,
                kind: "portguard policy",
                condition: self.rule.as_deref(),
            }),
            unmapped: Unmapped {
                schema_version: self.schema_version,
                verdict: self.verdict,
                hook: self.hook,
                policy: self.policy.as_deref(),
                rule: self.rule.as_deref(),
                cgroup: self.cgroup.as_deref(),
                cgroup_id: self.cgroup_id,
                policy_cgroup: self.policy_cgroup.as_deref(),
                policy_cgroup_id: self.policy_cgroup_id,
                family: self.family,
                k8s_namespace: id.k8s_namespace.as_deref(),
                k8s_pod: id.k8s_pod.as_deref(),
                k8s_pod_uid: id.k8s_pod_uid.as_deref(),
                unit: id.unit.as_deref(),
                identity_source: id.identity_source,
                action: self.action,
                socket: self.socket,
                socket_inode: self.socket_inode,
                v4_mapped: self.v4_mapped,
                dual_stack: self.dual_stack,
                autobind: self.autobind,
                pids: &self.pids,
                pid_count: self.pid_count,
            },
        }
    }
}

#[cfg(test)]
mod tests;
