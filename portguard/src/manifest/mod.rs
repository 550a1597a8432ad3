//! What deployment files declare about ports: Kubernetes manifests
//! (workloads and Services), docker-compose files and Dockerfiles, read into
//! one model with the file and line of every value, for `portguard check
//! --manifests` to hold against the port plan ([`analyze`]).
//!
//! Pure like the policy layer: it reads files and never touches the kernel,
//! a cluster or the network.
//!
//! Owns the model ([`Manifests`], [`Unit`], [`PortDecl`], [`NetCaps`],
//! [`ProbeDecl`], [`Service`]) and
//! the findings vocabulary ([`Finding`], [`Check`], [`Severity`]). Its
//! submodules own finding and reading files (`load`), the readers of each
//! kind of file ([`kube`], [`compose`], [`dockerfile`]), value helpers
//! (`values`), the analysis ([`analyze`]) and report formats ([`report`]).
//!
//! May import: `std`, the policy layer ([`crate::policy`], including its
//! YAML tree), portguard-common's protocol constants, and pure libraries
//! (anyhow, serde, serde-sarif). Never aya, tokio, libc or the agent's
//! modules.

pub mod analyze;
pub mod compose;
pub mod dockerfile;
pub mod kube;
mod load;
pub mod report;
mod values;

use std::{collections::BTreeMap, fmt, path::PathBuf};

pub use load::{MAX_FILE_BYTES, load, read_text};
pub use values::{image_name, image_repository};

use crate::policy::yaml::Node;

/// Where a value is: the file as the user named it, 1-based line and column.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Loc {
    pub file: String,
    pub line: usize,
    pub column: usize,
}

impl Loc {
    fn at(file: &str, node: &Node) -> Self {
        Self {
            file: file.to_owned(),
            line: node.pos.line,
            column: node.pos.column,
        }
    }
}

impl fmt::Display for Loc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file, self.line, self.column)
    }
}

/// Transport protocol of a declared port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    Tcp,
    Udp,
    Sctp,
}

impl Proto {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Sctp => "sctp",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Some(Self::Tcp),
            "udp" => Some(Self::Udp),
            "sctp" => Some(Self::Sctp),
            _ => None,
        }
    }
}

/// Which kind of file a declaration came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Origin {
    Kubernetes,
    Compose,
    Dockerfile,
}

impl Origin {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Kubernetes => "Kubernetes",
            Self::Compose => "compose",
            Self::Dockerfile => "Dockerfile",
        }
    }
}

/// A port on the host itself: a Kubernetes hostPort, a port of a
/// hostNetwork pod, a compose published port or a port of a
/// `network_mode: host` service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostClaim {
    pub lo: u16,
    pub hi: u16,
    /// Host address it is bound to; `None` for every address.
    pub ip: Option<String>,
    pub loc: Loc,
    /// The claim is the container port itself (host networking), not a
    /// separate value.
    pub same_as_container: bool,
}

/// One declared port (or range) of a container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortDecl {
    /// The port the container's process binds (inclusive range).
    pub lo: u16,
    pub hi: u16,
    pub proto: Proto,
    /// Kubernetes port name (what a Service's `targetPort` may name).
    pub name: Option<String>,
    pub loc: Loc,
    pub host: Option<HostClaim>,
}

impl PortDecl {
    pub fn describe(&self) -> String {
        let p = if self.lo == self.hi {
            self.lo.to_string()
        } else {
            format!("{}-{}", self.lo, self.hi)
        };
        format!("{p}/{}", self.proto.as_str())
    }
}

/// Identity of a workload for "claimed by two workloads": Kubernetes kind,
/// namespace and name; a compose file and service; a Dockerfile.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WorkloadId {
    pub kind: String,
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for WorkloadId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind.as_str() {
            "compose service" | "Dockerfile" => write!(f, "{} {}", self.kind, self.name),
            _ => write!(f, "{} {}/{}", self.kind, self.namespace, self.name),
        }
    }
}

/// The network capabilities a container asks for beyond the runtime's
/// default set: what lets it answer on ports portguard's hooks never see.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetCaps {
    /// `NET_RAW` or `NET_ADMIN` added (`securityContext.capabilities.add`,
    /// compose `cap_add`; `ALL` adds both), with where it is written.
    pub added: Vec<(&'static str, Loc)>,
    /// `privileged: true` (every capability), where it is written.
    pub privileged: Option<Loc>,
    /// `NET_RAW` is dropped (`drop: [ALL]` or `[NET_RAW]`, compose
    /// `cap_drop`), so the runtime's default grant of it does not apply.
    pub drops_net_raw: bool,
}

impl NetCaps {
    /// Read `add`, `drop` and `privileged` nodes (either spelling,
    /// `NET_RAW` or `CAP_NET_RAW`, any case).
    pub fn read(
        file: &str,
        add: Option<&Node>,
        drop: Option<&Node>,
        privileged: Option<&Node>,
    ) -> Self {
        let name = |n: &Node| {
            values::text(n).map(|s| {
                let s = s.trim().to_ascii_uppercase();
                s.strip_prefix("CAP_").map(str::to_owned).unwrap_or(s)
            })
        };
        let mut caps = Self::default();
        for n in values::items(add) {
            match name(n).as_deref() {
                Some("ALL") => {
                    caps.added.push(("NET_RAW", Loc::at(file, n)));
                    caps.added.push(("NET_ADMIN", Loc::at(file, n)));
                }
                Some("NET_RAW") => caps.added.push(("NET_RAW", Loc::at(file, n))),
                Some("NET_ADMIN") => caps.added.push(("NET_ADMIN", Loc::at(file, n))),
                _ => {}
            }
        }
        caps.drops_net_raw = values::items(drop)
            .iter()
            .any(|n| matches!(name(n).as_deref(), Some("ALL" | "NET_RAW")));
        caps.privileged = privileged
            .filter(|n| values::truthy(n))
            .map(|n| Loc::at(file, n));
        caps
    }
}

/// One container: a container of a Kubernetes pod template, a compose
/// service, or the image a Dockerfile builds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unit {
    pub origin: Origin,
    pub workload: WorkloadId,
    /// Container name; the compose service name; for a Dockerfile, the name
    /// of its directory (or NAME of `Dockerfile.NAME` / `NAME.Dockerfile`).
    pub container: String,
    /// Pod labels (Kubernetes).
    pub labels: BTreeMap<String, String>,
    pub image: Option<String>,
    /// The Dockerfile this unit is built from (compose `build:`), or is
    /// (a Dockerfile unit); canonical when the file exists.
    pub dockerfile: Option<PathBuf>,
    pub host_network: bool,
    pub ports: Vec<PortDecl>,
    /// Capabilities beyond the runtime's default set (Kubernetes, compose).
    pub net: NetCaps,
    pub loc: Loc,
    /// Host ports collide only within one scope: the cluster, or one compose
    /// file (a project).
    pub scope: String,
    /// Health probes the kubelet sends to a port of the container
    /// (Kubernetes).
    pub probes: Vec<ProbeDecl>,
}

/// A Kubernetes liveness, readiness or startup probe on a port: the kubelet
/// connects to the pod's IP there (`httpGet`, `tcpSocket`, `grpc`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeDecl {
    /// `livenessProbe`, `readinessProbe` or `startupProbe`.
    pub kind: &'static str,
    /// `httpGet`, `tcpSocket` or `grpc`.
    pub handler: &'static str,
    /// The port, by number or by the name of a container port.
    pub port: Target,
    /// Where the port is written (the probe's own line for the finding).
    pub loc: Loc,
    /// `httpGet.host` / `tcpSocket.host`: the kubelet connects there
    /// instead of the pod's IP.
    pub host: Option<String>,
}

impl Unit {
    /// "container api of Deployment shop/api", "compose service api", ...
    pub fn describe(&self) -> String {
        match self.origin {
            Origin::Kubernetes => format!("container `{}` of {}", self.container, self.workload),
            _ => self.workload.to_string(),
        }
    }
}

/// What a Service's port forwards to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Number(u16),
    Name(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    pub port: u16,
    pub target: Target,
    pub proto: Proto,
    /// Where the target is written (`targetPort`, else `port`).
    pub loc: Loc,
}

/// A Kubernetes Service with a pod selector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    pub selector: BTreeMap<String, String>,
    pub ports: Vec<ServicePort>,
    pub loc: Loc,
}

/// Everything read from the manifests, plus problems reading them.
#[derive(Clone, Debug, Default)]
pub struct Manifests {
    pub units: Vec<Unit>,
    pub services: Vec<Service>,
    pub findings: Vec<Finding>,
    /// Files read.
    pub files: usize,
    /// Dockerfiles compose services build (path to read, path to show), read
    /// after the files named when not among them.
    built: Vec<(PathBuf, String)>,
}

impl Manifests {
    /// A `manifest-invalid` finding at `node`.
    fn invalid(&mut self, file: &str, node: &Node, msg: String) {
        self.findings.push(Finding::new(
            Check::ManifestInvalid,
            Loc::at(file, node),
            msg,
        ));
    }
}

/// How bad a finding is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Error,
    Warning,
}

impl Severity {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Error => "error",
            Self::Warning => "warning",
        }
    }
}

/// The kinds of finding (`rule` in JSON, `ruleId` in SARIF).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Check {
    PolicyInvalid,
    PolicyWarning,
    ManifestInvalid,
    ManifestUnresolved,
    PortNotAllowed,
    HostPortConflict,
    ReservedPort,
    TargetPortUnmatched,
    ServiceSelectsNothing,
    PortMismatch,
    NetCapability,
    ProbePortNotAllowed,
    ProbePortUndeclared,
}

impl Check {
    pub const ALL: [Self; 13] = [
        Self::PolicyInvalid,
        Self::PolicyWarning,
        Self::ManifestInvalid,
        Self::ManifestUnresolved,
        Self::PortNotAllowed,
        Self::HostPortConflict,
        Self::ReservedPort,
        Self::TargetPortUnmatched,
        Self::ServiceSelectsNothing,
        Self::PortMismatch,
        Self::NetCapability,
        Self::ProbePortNotAllowed,
        Self::ProbePortUndeclared,
    ];

    pub const fn id(self) -> &'static str {
        match self {
            Self::PolicyInvalid => "policy-invalid",
            Self::PolicyWarning => "policy-warning",
            Self::ManifestInvalid => "manifest-invalid",
            Self::ManifestUnresolved => "manifest-unresolved",
            Self::PortNotAllowed => "port-not-allowed",
            Self::HostPortConflict => "host-port-conflict",
            Self::ReservedPort => "reserved-port",
            Self::TargetPortUnmatched => "target-port-unmatched",
            Self::ServiceSelectsNothing => "service-selects-nothing",
            Self::PortMismatch => "port-mismatch",
            Self::NetCapability => "net-capability",
            Self::ProbePortNotAllowed => "probe-port-not-allowed",
            Self::ProbePortUndeclared => "probe-port-undeclared",
        }
    }

    /// One line for `--help`, docs/manifests.md and SARIF rule descriptions.
    pub const fn summary(self) -> &'static str {
        match self {
            Self::PolicyInvalid => "The policy file is invalid; nothing else was checked.",
            Self::PolicyWarning => {
                "The policy file is valid but suspicious (a reserved port allowed, a missing cgroup)."
            }
            Self::ManifestInvalid => {
                "A manifest could not be read, or holds an invalid port value."
            }
            Self::ManifestUnresolved => {
                "A port value uses a variable check cannot resolve; it was not checked."
            }
            Self::PortNotAllowed => {
                "A declared port is not allowed by the policy that governs the workload."
            }
            Self::HostPortConflict => {
                "A host port (hostPort, hostNetwork, compose published port) is claimed by two workloads."
            }
            Self::ReservedPort => "A declared port is in the plan's reserved ports.",
            Self::TargetPortUnmatched => {
                "A Service's targetPort matches no containerPort of the pods it selects."
            }
            Self::ServiceSelectsNothing => {
                "A Service's selector matches no workload in the manifests checked."
            }
            Self::PortMismatch => {
                "The same service declares different ports in its Dockerfile, compose file and Kubernetes manifests."
            }
            Self::NetCapability => {
                "A governed container is given NET_RAW or NET_ADMIN (or is privileged): it can answer on ports its policy does not allow."
            }
            Self::ProbePortNotAllowed => {
                "A liveness, readiness or startup probe targets a port the container's policy does not allow on the pod's address: the kubelet's probe fails."
            }
            Self::ProbePortUndeclared => {
                "A probe targets a port the container does not declare (a warning), or names a port it does not declare (an error: the kubelet cannot resolve it)."
            }
        }
    }

    /// Severity unless the finding says otherwise.
    pub const fn default_severity(self) -> Severity {
        match self {
            Self::PolicyWarning
            | Self::ManifestUnresolved
            | Self::ServiceSelectsNothing
            | Self::NetCapability
            | Self::ProbePortUndeclared => Severity::Warning,
            _ => Severity::Error,
        }
    }
}

/// One problem, where it is, and where the other half of it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub check: Check,
    pub severity: Severity,
    pub loc: Loc,
    pub message: String,
    /// Other places involved (the first claim of a host port, the other
    /// files' declarations), with a note each.
    pub related: Vec<(Loc, String)>,
}

impl Finding {
    pub fn new(check: Check, loc: Loc, message: impl Into<String>) -> Self {
        Self {
            check,
            severity: check.default_severity(),
            loc,
            message: message.into(),
            related: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests;
