//! The policy model: parsing, validation and compilation of policy files.
//!
//! This layer is pure: it reads text and produces data. It never touches the
//! kernel, the filesystem beyond reading the policy file, or aya. Everything
//! here is unit-tested without root.
//!
//! Owns the model of a policy file ([`PolicyFile`], [`Policy`],
//! [`Selector`], [`Rule`], [`Diagnostic`], [`PolicyError`]); its submodules
//! own the YAML tree ([`yaml`]), parsing and validation ([`parse`]), which
//! policy applies when several select one cgroup ([`selection`]), port sets
//! ([`portset`]), compilation to the kernel's tables ([`mod@compile`]) and
//! explanations ([`explain`]) and `portguard why`'s judgement of one operation
//! ([`why`]).
//!
//! May import: `std`, `portguard_common` (the layout shared with the eBPF
//! programs), and pure libraries (saphyr-parser, glob, thiserror,
//! rustc-hash). Never aya, tokio, libc, or another module of this crate:
//! every other layer depends on this one, not the reverse.
//!
//! # Policy file grammar (the user-facing contract; keep these names)
//!
//! ```yaml
//! policies:
//!   - name: web                     # unique
//!     cgroup: /portguard-demo/web   # path under the cgroup2 mount; or instead:
//!     # pods: {namespace: payments, labels: {app: web}, container: server}
//!     # unit: nginx.service
//!     mode: enforce                 # enforce | audit   (default enforce)
//!     bind:                         # absent: binds unrestricted; [] : every bind denied
//!       - ports: [8080, "9000-9099"]
//!         protocol: tcp             # tcp | udp | any   (default any)
//!         family: any               # ipv4 | ipv6 | any (default any)
//!         address: loopback         # loopback | any    (default any)
//!     connect:                      # absent: connects unrestricted; same rule shape
//!       - ports: [5432]
//!     allow_sockets: [raw]          # raw | sctp | l2tp (default none)
//!     delegated: skip               # skip | govern (unit:/pods: only; default skip)
//! ```
//!
//! - `delegated`: a `unit:` or `pods:` policy selects cgroups by *name*, and
//!   a user who owns a delegated subtree (a cgroup directory not owned by
//!   root, or writable by group or others) can create a cgroup with any
//!   name in it. By default (`skip`) such cgroups are never governed by a
//!   policy selected by name; `govern` opts in.
//!
//! - `allow_sockets`: sockets whose protocol has its own bind (raw IP, SCTP,
//!   L2TP/IP) bypass the bind hooks, so a cgroup whose policy restricts binds
//!   or connects may not create them unless listed here.
//!
//! - `ports` items: a port `1`..`65535` (number or string), a range `"a-b"`
//!   (inclusive, `a <= b`), or `ephemeral` (bind rules only): a `bind()` to
//!   port 0 may keep whichever port the kernel picks. Without `ephemeral`, a
//!   port-0 bind is allowed only if the picked port is itself allowed.
//! - `address: loopback` (bind): the ports may be bound only on 127.0.0.0/8,
//!   `::1` or `::ffff:127.0.0.0/104`. For connect rules it restricts the
//!   destination to those addresses (and the unspecified address, which
//!   connects to this host).
//! - An IPv4 rule also covers the IPv4-mapped IPv6 form of the address. A bind
//!   to `[::]` on a dual-stack socket (no `IPV6_V6ONLY`) exposes the port on
//!   IPv4 too, so it needs the port allowed for both families.
//! - Rules of one direction are a union: an operation is allowed when any rule
//!   allows it.

pub mod builtin;
pub mod compile;
pub mod explain;
pub mod parse;
pub mod portset;
pub mod selection;
pub mod why;
pub mod yaml;

use std::{fmt, path::PathBuf};

pub use compile::{
    AddrView, CompiledPolicy, DirectionSets, apply_reserved, bind_ports, classify, compile,
    compile_all,
};
pub use parse::{
    ParsedPolicy, Reparse, Replaced, normalize_cgroup, parse_policy_file, parse_policy_str,
    parse_policy_text, read_policy_file, reparse_policy_text,
};
pub use portset::PortSet;
pub use selection::most_specific;

/// A whole policy file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyFile {
    pub policies: Vec<Policy>,
    /// `reserved:` ports no governed workload may bind, whatever its policy
    /// says (see [`compile::apply_reserved`]). Empty without the key.
    pub reserved: PortSet,
    /// `ranges:` named port ranges (`app: "3000-3999"`), usable by name in
    /// `ports:` and `reserved:` lists.
    pub ranges: std::collections::BTreeMap<String, (u16, u16)>,
}

/// The built-in infrastructure ports `reserved: [infrastructure]` stands
/// for: SSH, etcd client and peer, the Kubernetes API server, the kubelet
/// (and its read-only port), kube-proxy's health port, the controller
/// manager, the scheduler and the Prometheus node exporter.
pub const INFRASTRUCTURE_PORTS: &[(u16, u16)] = &[
    (22, 22),
    (2379, 2380),
    (6443, 6443),
    (9100, 9100),
    (10250, 10250),
    (10255, 10257),
    (10259, 10259),
];

/// Which cgroups a policy governs: exactly one kind per policy.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Selector {
    /// A cgroup path: normalised absolute path under the cgroup2 mount.
    Cgroup(String),
    /// Kubernetes pods on this node (resolved through the CRI runtime).
    Pods(PodSelector),
    /// A systemd unit (its cgroup, wherever it is in the hierarchy).
    Unit(String),
}

/// `pods:` selector. Empty fields match everything.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct PodSelector {
    /// Exact namespace or a glob (`team-*`).
    pub namespace: Option<String>,
    /// Every label must match exactly.
    pub labels: std::collections::BTreeMap<String, String>,
    /// Only this container of each matching pod (else the whole pod).
    pub container: Option<String>,
}

impl PodSelector {
    pub fn matches_pod(
        &self,
        namespace: &str,
        labels: &std::collections::BTreeMap<String, String>,
    ) -> bool {
        let ns_ok = self
            .namespace
            .as_deref()
            .is_none_or(|pat| glob::Pattern::new(pat).is_ok_and(|g| g.matches(namespace)));
        ns_ok && self.labels.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

impl PodSelector {
    /// False only when no pod (or container) can match both selectors: a
    /// label both require with different values, namespaces that cannot be
    /// the same, or different container names.
    pub fn may_overlap(&self, other: &Self) -> bool {
        let is_glob = |n: &str| n.contains(['*', '?', '[']);
        let ns_disjoint = match (self.namespace.as_deref(), other.namespace.as_deref()) {
            (Some(a), Some(b)) => match (is_glob(a), is_glob(b)) {
                (false, false) => a != b,
                (true, false) => !glob::Pattern::new(a).is_ok_and(|g| g.matches(b)),
                (false, true) => !glob::Pattern::new(b).is_ok_and(|g| g.matches(a)),
                // Two patterns are disjoint when their literal prefixes (or
                // suffixes) differ: `team-*` and `ops-*` never meet.
                (true, true) => {
                    let wild = |c: char| matches!(c, '*' | '?' | '[' | ']');
                    let prefix = |n: &'_ str| n[..n.find(wild).unwrap_or(n.len())].to_owned();
                    let suffix = |n: &'_ str| n[n.rfind(wild).map_or(0, |i| i + 1)..].to_owned();
                    let (pa, pb, sa, sb) = (prefix(a), prefix(b), suffix(a), suffix(b));
                    !(pa.starts_with(&pb) || pb.starts_with(&pa))
                        || !(sa.ends_with(&sb) || sb.ends_with(&sa))
                }
            },
            _ => false,
        };
        let labels_disjoint = self
            .labels
            .iter()
            .any(|(k, v)| other.labels.get(k).is_some_and(|w| w != v));
        let containers_disjoint = matches!(
            (&self.container, &other.container),
            (Some(a), Some(b)) if a != b
        );
        !(ns_disjoint || labels_disjoint || containers_disjoint)
    }
}

impl Selector {
    /// When two policies would be equally specific for one cgroup they could
    /// both select, that is a tie: which policy applies must not depend on
    /// file order. Distinct `cgroup:` paths and distinct units never tie.
    pub fn may_tie(&self, other: &Self) -> bool {
        if self.specificity() != other.specificity() {
            return false;
        }
        match (self, other) {
            (Self::Pods(a), Self::Pods(b)) => a.may_overlap(b),
            (a, b) => a == b,
        }
    }

    /// The cgroup path of a `cgroup:` selector.
    pub fn cgroup_path(&self) -> Option<&str> {
        match self {
            Self::Cgroup(p) => Some(p),
            _ => None,
        }
    }

    /// Higher wins when several policies select the same cgroup: an explicit
    /// cgroup path, then a unit, then pod selectors, the more constrained the
    /// higher (a container name, an exact namespace over a glob, each label).
    /// [`most_specific`] applies the rule, ties included.
    pub fn specificity(&self) -> u32 {
        match self {
            Self::Cgroup(_) => 1000,
            Self::Unit(_) => 900,
            Self::Pods(p) => {
                let ns = match p.namespace.as_deref() {
                    None => 0,
                    Some(n) if n.contains(['*', '?', '[']) => 20,
                    Some(_) => 40,
                };
                100 + if p.container.is_some() { 400 } else { 0 } + ns + p.labels.len() as u32
            }
        }
    }

    /// Human description for messages.
    pub fn describe(&self) -> String {
        match self {
            Self::Cgroup(p) => format!("cgroup {p}"),
            Self::Unit(u) => format!("unit {u}"),
            Self::Pods(p) => {
                let mut parts = Vec::new();
                if let Some(n) = &p.namespace {
                    parts.push(format!("namespace {n}"));
                }
                for (k, v) in &p.labels {
                    parts.push(format!("{k}={v}"));
                }
                if let Some(c) = &p.container {
                    parts.push(format!("container {c}"));
                }
                if parts.is_empty() {
                    "every pod".to_owned()
                } else {
                    format!("pods with {}", parts.join(", "))
                }
            }
        }
    }
}

/// One `policies:` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub name: String,
    /// Which cgroups the policy governs.
    pub selector: Selector,
    pub mode: Mode,
    /// `None`: binds unrestricted. `Some([])`: every bind denied.
    pub bind: Option<Vec<Rule>>,
    /// `None`: connects unrestricted. `Some([])`: every connect denied.
    pub connect: Option<Vec<Rule>>,
    /// Socket kinds with their own bind this policy lets its cgroups create
    /// (denied otherwise when binds or connects are restricted).
    pub allow_sockets: Vec<SocketKind>,
    /// Whether a `unit:` or `pods:` selector may govern cgroups inside a
    /// subtree a non-root user can write (`delegated:`).
    pub delegated: Delegated,
    /// Line of the policy's entry in the file.
    pub line: usize,
}

/// `delegated:`: whether a policy selected by name (`unit:`, `pods:`) may
/// govern a cgroup inside a subtree whose directory is not owned by root
/// (e.g. systemd's `user@UID.service`, delegated to that user). Such a user
/// can create a cgroup with any name there; by default the name does not
/// earn it the named policy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Delegated {
    /// The policy never applies inside a delegated subtree (the cgroup
    /// keeps whatever governs its ancestors).
    #[default]
    Skip,
    /// The policy applies there too (bounded per subtree by the agent's
    /// `--max-delegated-cgroups`).
    Govern,
}

impl Delegated {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Skip => "skip",
            Self::Govern => "govern",
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    #[default]
    Enforce,
    /// Allow, but report what enforce mode would deny.
    Audit,
}

impl Mode {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Enforce => "enforce",
            Self::Audit => "audit",
        }
    }
}

/// Sockets whose protocol has its own bind, which the bind hooks never see.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SocketKind {
    /// `SOCK_RAW` IPv4/IPv6 sockets.
    Raw,
    /// SCTP sockets.
    Sctp,
    /// L2TP/IP sockets.
    L2tp,
}

impl SocketKind {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Raw => "raw",
            Self::Sctp => "sctp",
            Self::L2tp => "l2tp",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub ports: Vec<PortSpec>,
    pub protocol: ProtocolSel,
    pub family: FamilySel,
    pub address: AddressSel,
    pub line: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PortSpec {
    Port(u16),
    /// Inclusive.
    Range(u16, u16),
    /// The port the kernel picks for a bind to port 0.
    Ephemeral,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ProtocolSel {
    Tcp,
    Udp,
    #[default]
    Any,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum FamilySel {
    Ipv4,
    Ipv6,
    #[default]
    Any,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum AddressSel {
    Loopback,
    #[default]
    Any,
}

/// One problem found in a policy file, with where it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    pub line: usize,
    pub column: usize,
    /// Path of the offending field, e.g. `policies[0].bind[1].ports[2]`.
    pub field: String,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}:{}: {}", self.line, self.column, self.message)
        } else {
            write!(
                f,
                "{}:{}: {}: {}",
                self.line, self.column, self.field, self.message
            )
        }
    }
}

/// A policy file that could not be used. Lists every problem found.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read policy file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", format_invalid(path, diagnostics))]
    Invalid {
        path: PathBuf,
        diagnostics: Vec<Diagnostic>,
    },
}

fn format_invalid(path: &std::path::Path, diagnostics: &[Diagnostic]) -> String {
    let n = diagnostics.len();
    let mut s = format!(
        "invalid policy file {} ({n} error{}):",
        path.display(),
        if n == 1 { "" } else { "s" }
    );
    for d in diagnostics {
        s.push_str(&format!("\n  {}:{d}", path.display()));
    }
    s
}

impl PolicyError {
    /// The individual problems (empty for read errors).
    pub fn diagnostics(&self) -> &[Diagnostic] {
        match self {
            Self::Read { .. } => &[],
            Self::Invalid { diagnostics, .. } => diagnostics,
        }
    }
}
