//! The event record users read: one JSON line per decision (schema:
//! docs/events.md, docs/event.schema.json), with who the caller is and what
//! the kernel judged ([`EventRecord::judged`], for the rule explanation).

use portguard_common::{Hook, VERDICT_AUDIT, VERDICT_CUT_OFF, VERDICT_DENY, VERDICT_REPORTED};
use serde::{Deserialize, Deserializer, Serialize};

/// Version of the event schema (docs/events.md, docs/event.schema.json).
/// Raised only when a field changes meaning; new fields do not raise it.
pub const SCHEMA_VERSION: u32 = 1;

/// The `verdict` field: what was decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Enforce mode: the caller got `EPERM`.
    Deny,
    /// Audit mode: allowed, but enforce mode would have denied it.
    Audit,
    /// Written by agents before the fence where `cut_off` is now.
    Reported,
    /// A `listen()` the host cannot deny: the socket was cut off.
    CutOff,
    /// A socket bound before its cgroup was governed (the inventory).
    Preexisting,
    /// A verdict code this agent does not know (a newer kernel object).
    #[serde(other)]
    Unknown,
}

impl Verdict {
    /// The kernel's verdict code ([`Event::verdict`]).
    pub const fn of_kernel(v: u8) -> Self {
        match v {
            VERDICT_DENY => Self::Deny,
            VERDICT_AUDIT => Self::Audit,
            VERDICT_REPORTED => Self::Reported,
            VERDICT_CUT_OFF => Self::CutOff,
            _ => Self::Unknown,
        }
    }
}

/// The `hook` field: where it was decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventHook {
    /// A kernel program.
    Kernel(Hook),
    /// The agent's inventory of sockets bound before they were governed.
    Inventory,
    /// A hook code this agent does not know.
    Unknown,
}

impl EventHook {
    /// The kernel's hook code ([`Event::hook`]).
    pub const fn of_kernel(v: u8) -> Self {
        match Hook::from_u8(v) {
            Some(h) => Self::Kernel(h),
            None => Self::Unknown,
        }
    }

    /// The JSON value.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Kernel(h) => h.name(),
            Self::Inventory => "inventory",
            Self::Unknown => "unknown",
        }
    }

    /// Which kind of operation the hook judges.
    pub const fn dir(self) -> crate::policy::explain::Dir {
        use crate::policy::explain::Dir;
        match self {
            Self::Kernel(Hook::SockCreate) => Dir::Socket,
            Self::Kernel(Hook::Connect4 | Hook::Connect6 | Hook::Sendmsg4 | Hook::Sendmsg6) => {
                Dir::Connect
            }
            _ => Dir::Bind,
        }
    }

    /// A hook that judges the port the kernel chose for a bind to port 0.
    pub const fn judges_chosen_port(self) -> bool {
        matches!(self, Self::Kernel(Hook::PostBind4 | Hook::PostBind6))
    }
}

impl Serialize for EventHook {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl EventHook {
    /// The hook a JSON value names; [`EventHook::Unknown`] for a name this
    /// agent does not know.
    pub fn of_name(name: &str) -> Self {
        if name == "inventory" {
            return Self::Inventory;
        }
        (1..=u8::MAX)
            .map_while(Hook::from_u8)
            .find(|h| h.name() == name)
            .map_or(Self::Unknown, Self::Kernel)
    }
}

impl<'de> Deserialize<'de> for EventHook {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = std::borrow::Cow::<str>::deserialize(d)?;
        Ok(Self::of_name(&name))
    }
}

/// A `&'static str` field of a record: one of a fixed vocabulary. Spelt
/// as an alias so that serde's derive reads it with `deserialize_with`
/// (below) instead of borrowing it from the input, which would need input
/// that lives forever.
pub type Word = &'static str;

/// Reading event lines back (`portguard events --format`): a field whose
/// values are a fixed vocabulary, as the `&'static str` this agent writes;
/// `other` for a value it does not know (a newer agent's).
fn one_of<'de, D: Deserializer<'de>>(
    d: D,
    known: &[&'static str],
    other: &'static str,
) -> Result<&'static str, D::Error> {
    let s = std::borrow::Cow::<str>::deserialize(d)?;
    Ok(known.iter().find(|k| **k == s).copied().unwrap_or(other))
}

fn de_family<'de, D: Deserializer<'de>>(d: D) -> Result<&'static str, D::Error> {
    one_of(d, &["ipv4", "ipv6"], "ipv4")
}

fn de_socket<'de, D: Deserializer<'de>>(d: D) -> Result<Option<&'static str>, D::Error> {
    one_of(d, &["raw", "sctp", "l2tp", "other"], "other").map(Some)
}

fn de_action<'de, D: Deserializer<'de>>(d: D) -> Result<Option<&'static str>, D::Error> {
    one_of(
        d,
        &["destroyed", "fenced", "closed", "dropped", "failed"],
        "unknown",
    )
    .map(Some)
}

fn de_identity_source<'de, D: Deserializer<'de>>(d: D) -> Result<Option<&'static str>, D::Error> {
    one_of(d, &["cri", "cgroup-path"], "unknown").map(Some)
}

fn one() -> u64 {
    1
}

/// The `family` field: the family an address was judged as.
pub const fn family_name(f: portguard_common::Family) -> &'static str {
    match f {
        portguard_common::Family::Ipv4 => "ipv4",
        portguard_common::Family::Ipv6 => "ipv6",
    }
}

/// A denial (or audit) as users see it. Read back (`Deserialize`) by
/// `portguard events`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRecord {
    #[serde(default)]
    pub schema_version: u32,
    pub time: String,
    /// The node or host the agent runs on.
    #[serde(default)]
    pub host: String,
    pub verdict: Verdict,
    pub hook: EventHook,
    #[serde(default)]
    pub policy: Option<String>,
    /// Which part of the policy decided (see `policy::explain`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    #[serde(default)]
    pub cgroup: Option<String>,
    #[serde(default)]
    pub cgroup_id: u64,
    #[serde(default)]
    pub pid: u32,
    #[serde(default)]
    pub tid: u32,
    #[serde(default)]
    pub uid: u32,
    #[serde(default)]
    pub gid: u32,
    #[serde(default)]
    pub comm: String,
    #[serde(deserialize_with = "de_family")]
    pub family: Word,
    #[serde(default)]
    pub protocol: String,
    #[serde(default)]
    pub address: String,
    #[serde(default)]
    pub port: u16,
    #[serde(default)]
    pub policy_cgroup: Option<String>,
    #[serde(default)]
    pub policy_cgroup_id: u64,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub v4_mapped: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dual_stack: bool,
    /// `listen()` on an unbound socket (port 0: the kernel would pick it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub autobind: bool,
    /// `sock_create` events: the socket kind (`raw`, `sctp`, `l2tp`).
    #[serde(
        default,
        deserialize_with = "de_socket",
        skip_serializing_if = "Option::is_none"
    )]
    pub socket: Option<Word>,
    /// `preexisting` events: the socket's inode (as in /proc/<pid>/fd).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket_inode: Option<u64>,
    /// `cut_off` events (and a UDP send denied for its autobound port), and
    /// `preexisting` ones under an enforcing policy (where `failed` means
    /// the kernel would not destroy it): what was done to the socket: `destroyed` (the agent ended it with
    /// sock_diag SOCK_DESTROY; fenced until then), `fenced` (the kernel
    /// would not destroy it, an MPTCP listener; the fence keeps every
    /// packet from it), `closed` (its process had closed it already),
    /// `dropped` (neither fenced nor destroyable: the packet guard drops
    /// every packet addressed to it until it is gone) or `failed` (the
    /// packet guard could not be attached either; the agent's log says why).
    #[serde(
        default,
        deserialize_with = "de_action",
        skip_serializing_if = "Option::is_none"
    )]
    pub action: Option<Word>,
    /// Who the caller is: pod, container or unit, when known.
    #[serde(flatten)]
    pub identity: WorkloadIdentity,
    /// How many identical decisions this line stands for (1, or the size
    /// of an aggregate; see `aggregate`).
    #[serde(default = "one")]
    pub count: u64,
    /// Aggregates only: when the first and the last of them happened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_seen: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<String>,
    /// Aggregates only: the distinct processes among its decisions, in the
    /// order they first appeared, at most [`AGGREGATE_PIDS`] (`pid` is the
    /// first of them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pids: Vec<u32>,
    /// Aggregates only: how many distinct processes made its decisions
    /// (counted up to [`AGGREGATE_PID_COUNT_MAX`]; that value means "that
    /// many or more").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid_count: Option<u32>,
}

/// Most pids an aggregate line lists.
pub const AGGREGATE_PIDS: usize = 16;
/// Distinct pids an aggregate counts at most (memory per open window stays
/// bounded: a few hundred bytes per open window).
pub const AGGREGATE_PID_COUNT_MAX: u32 = 64;

impl EventRecord {
    /// A record with only what every record has; the rest empty. The
    /// kernel's events ([`super::enrich`]) and the inventory's
    /// (`preexisting`) are built from it.
    pub fn new(verdict: Verdict, hook: EventHook, time: String, host: &str) -> Self {
        Self {
            schema_version: SCHEMA_VERSION,
            time,
            host: host.to_owned(),
            verdict,
            hook,
            policy: None,
            rule: None,
            cgroup: None,
            cgroup_id: 0,
            pid: 0,
            tid: 0,
            uid: 0,
            gid: 0,
            comm: String::new(),
            family: "ipv4",
            protocol: String::new(),
            address: String::new(),
            port: 0,
            policy_cgroup: None,
            policy_cgroup_id: 0,
            v4_mapped: false,
            dual_stack: false,
            autobind: false,
            socket: None,
            socket_inode: None,
            action: None,
            identity: WorkloadIdentity::default(),
            count: 1,
            first_seen: None,
            last_seen: None,
            pids: Vec::new(),
            pid_count: None,
        }
    }

    /// What the kernel judged, for [`crate::policy::explain::deciding_rule`].
    pub fn judged(&self) -> crate::policy::explain::Judged {
        use crate::policy::explain::{Dir, Judged};
        let dir = self.hook.dir();
        let role = if dir == Dir::Connect {
            portguard_common::AddrRole::Destination
        } else {
            portguard_common::AddrRole::Local
        };
        // The shared classifier, as the kernel program judged it.
        let loopback = self.address.parse::<std::net::IpAddr>().is_ok_and(|a| {
            portguard_common::classify_ip(a, role).class == portguard_common::AddrClass::Loopback
        });
        Judged {
            dir,
            tcp: match self.protocol.as_str() {
                "tcp" => Some(true),
                "udp" => Some(false),
                _ => None,
            },
            ipv6: self.family == "ipv6",
            loopback,
            port: self.port,
            ephemeral: self.autobind || self.hook.judges_chosen_port(),
            dual_stack: self.dual_stack,
        }
    }
}

impl EventRecord {
    /// The record an event line stands for, read back from its JSON (`None`
    /// for a line that is no decision: a `lost` or `suppressed` report, an
    /// agent log line). Fields a line lacks keep [`EventRecord::new`]'s
    /// values; names this agent does not know read as `unknown`.
    pub fn from_json(v: &serde_json::Value) -> Option<Self> {
        let s = |k: &str| v.get(k).and_then(serde_json::Value::as_str);
        let owned = |k: &str| s(k).map(str::to_owned);
        let n = |k: &str| v.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
        let flag = |k: &str| v.get(k).and_then(serde_json::Value::as_bool) == Some(true);
        let verdict = match s("verdict")? {
            "deny" => Verdict::Deny,
            "audit" => Verdict::Audit,
            "reported" => Verdict::Reported,
            "cut_off" => Verdict::CutOff,
            "preexisting" => Verdict::Preexisting,
            _ => Verdict::Unknown,
        };
        let hook = match s("hook") {
            Some("inventory") => EventHook::Inventory,
            Some(name) => (0..=u8::MAX)
                .find_map(|c| Hook::from_u8(c).filter(|h| h.name() == name))
                .map_or(EventHook::Unknown, EventHook::Kernel),
            None => EventHook::Unknown,
        };
        let time = owned("time").unwrap_or_default();
        let mut r = Self::new(verdict, hook, time, s("host").unwrap_or_default());
        r.policy = owned("policy");
        r.rule = owned("rule");
        r.cgroup = owned("cgroup");
        r.cgroup_id = n("cgroup_id");
        r.pid = u32::try_from(n("pid")).unwrap_or(0);
        r.comm = owned("comm").unwrap_or_default();
        r.family = if s("family") == Some("ipv6") {
            "ipv6"
        } else {
            "ipv4"
        };
        r.protocol = owned("protocol").unwrap_or_default();
        r.address = owned("address").unwrap_or_default();
        r.port = u16::try_from(n("port")).unwrap_or(0);
        r.policy_cgroup = owned("policy_cgroup");
        r.policy_cgroup_id = n("policy_cgroup_id");
        r.v4_mapped = flag("v4_mapped");
        r.dual_stack = flag("dual_stack");
        r.autobind = flag("autobind");
        r.socket = s("socket").map(|k| match k {
            "raw" => "raw",
            "sctp" => "sctp",
            "l2tp" => "l2tp",
            _ => "unknown",
        });
        r.identity = WorkloadIdentity {
            k8s_namespace: owned("k8s_namespace"),
            k8s_pod: owned("k8s_pod"),
            k8s_pod_uid: owned("k8s_pod_uid"),
            container_name: owned("container_name"),
            container_id: owned("container_id"),
            unit: owned("unit"),
            identity_source: s("identity_source").map(|k| match k {
                "cri" => "cri",
                _ => "cgroup-path",
            }),
        };
        r.count = v
            .get("count")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(1);
        r.first_seen = owned("first_seen");
        r.last_seen = owned("last_seen");
        Some(r)
    }
}

/// Kubernetes or systemd identity of the caller's cgroup. Fields are left
/// out when unknown.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
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
    #[serde(
        deserialize_with = "de_identity_source",
        skip_serializing_if = "Option::is_none"
    )]
    pub identity_source: Option<Word>,
}

impl WorkloadIdentity {
    /// What the cgroup path says, completed by the runtime's snapshot.
    pub fn of(path: &str, cri: Option<&crate::workload::cri::Snapshot>) -> Self {
        let id = crate::workload::identity::parse(path);
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
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LostRecord {
    #[serde(default)]
    pub schema_version: u32,
    pub time: String,
    #[serde(default)]
    pub host: String,
    /// Events lost since the previous report.
    pub lost: u64,
    /// Events lost since the programs were installed (the kernel counter
    /// survives agent restarts when the state is pinned).
    pub lost_total: u64,
    /// The period the loss happened in: since the previous report (or the
    /// last time the previous agent was known alive) until this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<String>,
    /// The loss happened while no agent was reading (reported by the agent
    /// that adopted the pinned state).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub agent_restarted: bool,
    /// Whose events were lost: the policies with losses since the previous
    /// report (absent when none is known, e.g. while no agent ran).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<PolicyLost>,
}

/// One policy's part of a [`LostRecord`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyLost {
    pub policy: String,
    /// Its events lost since the previous report.
    pub lost: u64,
    /// Since the policy took its counters (the agent started, or the
    /// policy was created).
    pub lost_total: u64,
}

/// A report of decisions a policy's kernel event budget (`--event-rate`,
/// `--event-burst`) held back: enforced and counted, but written as no
/// event of their own.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SuppressedRecord {
    #[serde(default)]
    pub schema_version: u32,
    pub time: String,
    #[serde(default)]
    pub host: String,
    /// The policy that made the decisions.
    pub policy: String,
    /// Since the previous report.
    pub suppressed: u64,
    /// Since the policy took its counters (the agent started, or the
    /// policy was created).
    pub suppressed_total: u64,
}
