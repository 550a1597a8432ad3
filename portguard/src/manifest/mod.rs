//! What deployment files declare about ports: Kubernetes manifests
//! (workloads and Services), docker-compose files and Dockerfiles, read into
//! one model with the file and line of every value, for `portguard check
//! --manifests` to hold against the port plan ([`analyze`]).
//!
//! Pure like the policy layer: it reads files and never touches the kernel,
//! a cluster or the network.

pub mod analyze;
pub mod compose;
pub mod dockerfile;
pub mod kube;
pub mod report;

use std::{
    collections::BTreeMap,
    fmt,
    path::{Path, PathBuf},
};

use crate::policy::yaml::{Kind, Node};

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
    pub loc: Loc,
    /// Host ports collide only within one scope: the cluster, or one compose
    /// file (a project).
    pub scope: String,
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
}

impl Check {
    pub const ALL: [Self; 10] = [
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
        }
    }

    /// One line for `--help`, README and SARIF rule descriptions.
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
        }
    }

    /// Severity unless the finding says otherwise.
    pub const fn default_severity(self) -> Severity {
        match self {
            Self::PolicyWarning | Self::ManifestUnresolved | Self::ServiceSelectsNothing => {
                Severity::Warning
            }
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

/// What a file holds, judged by its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FileKind {
    Yaml,
    Dockerfile,
}

fn file_kind(path: &Path) -> Option<FileKind> {
    let name = path.file_name()?.to_str()?;
    let lower = name.to_ascii_lowercase();
    if lower == "dockerfile"
        || lower == "containerfile"
        || lower.starts_with("dockerfile.")
        || lower.ends_with(".dockerfile")
    {
        return Some(FileKind::Dockerfile);
    }
    match path.extension()?.to_str()? {
        "yaml" | "yml" | "json" => Some(FileKind::Yaml),
        _ => None,
    }
}

/// Files under `path` worth reading, sorted; hidden directories skipped and
/// symlinked directories not followed (no loops).
fn walk(path: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(path)?
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .map(|e| e.path())
        .collect();
    entries.sort();
    for p in entries {
        let hidden = p
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'));
        let meta = std::fs::symlink_metadata(&p)?;
        if meta.is_dir() {
            if !hidden {
                walk(&p, out)?;
            }
        } else if file_kind(&p).is_some() && !hidden {
            out.push(p);
        }
    }
    Ok(())
}

/// Largest manifest file read (a manifest is text written by people).
pub const MAX_FILE_BYTES: u64 = 8 << 20;

/// Read every manifest under `paths` (files, or directories walked for
/// `*.yaml`, `*.yml`, `*.json`, `Dockerfile*`, `*.Dockerfile` and
/// `Containerfile`). Kubernetes objects without a namespace are placed in
/// `namespace`. Problems become findings; `Err` only for a path that does not
/// exist.
pub fn load(paths: &[PathBuf], namespace: &str) -> anyhow::Result<Manifests> {
    let mut files: Vec<(PathBuf, bool)> = Vec::new();
    for p in paths {
        let meta = std::fs::metadata(p)
            .map_err(|e| anyhow::anyhow!("--manifests {}: {e}", p.display()))?;
        if meta.is_dir() {
            let mut found = Vec::new();
            walk(p, &mut found).map_err(|e| anyhow::anyhow!("--manifests {}: {e}", p.display()))?;
            files.extend(found.into_iter().map(|f| (f, false)));
        } else {
            files.push((p.clone(), true));
        }
    }
    let mut m = Manifests::default();
    let mut read: std::collections::HashSet<PathBuf> = std::collections::HashSet::new();
    let mut queue: std::collections::VecDeque<(PathBuf, Option<String>, bool)> =
        files.into_iter().map(|(p, e)| (p, None, e)).collect();
    while let Some((path, shown, explicit)) = queue.pop_front() {
        // Each file once, however it was reached.
        if !read.insert(std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone())) {
            continue;
        }
        let shown = shown.unwrap_or_else(|| path.display().to_string());
        let text = match read_limited(&path) {
            Ok(t) => t,
            Err(e) => {
                m.findings.push(Finding::new(
                    Check::ManifestInvalid,
                    Loc {
                        file: shown,
                        line: 1,
                        column: 1,
                    },
                    format!("cannot read: {e}"),
                ));
                continue;
            }
        };
        m.files += 1;
        let before = m.units.len() + m.services.len();
        read_into(&path, &shown, &text, namespace, &mut m);
        if explicit && m.units.len() + m.services.len() == before {
            let mut f = Finding::new(
                Check::ManifestUnresolved,
                Loc {
                    file: shown,
                    line: 1,
                    column: 1,
                },
                "no Kubernetes workload or Service, compose service or EXPOSE found in this file",
            );
            f.severity = Severity::Warning;
            m.findings.push(f);
        }
        // The Dockerfiles compose services build are part of the service.
        for (p, shown) in std::mem::take(&mut m.built) {
            if p.is_file() {
                queue.push_back((p, Some(shown), false));
            }
        }
    }
    Ok(m)
}

/// `dir/rel` as a user would write it (`./` and `x/..` folded), for showing.
fn shown_join(dir: &str, rel: &Path) -> String {
    let mut parts: Vec<String> = Vec::new();
    let joined = Path::new(dir).join(rel);
    for c in joined.components() {
        match c {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir
                if parts.last().is_some_and(|p| p != ".." && p != "/") =>
            {
                parts.pop();
            }
            std::path::Component::RootDir => parts.push("/".to_owned()),
            c => parts.push(c.as_os_str().to_string_lossy().into_owned()),
        }
    }
    let s = parts.join("/");
    s.strip_prefix("//").map(|r| format!("/{r}")).unwrap_or(s)
}

/// Read one file's text, as what its name says it is (a Dockerfile, else
/// YAML), showing it as `shown`.
fn read_into(path: &Path, shown: &str, text: &str, namespace: &str, m: &mut Manifests) {
    match file_kind(path).unwrap_or(FileKind::Yaml) {
        FileKind::Dockerfile => dockerfile::read(path, shown, text, m),
        FileKind::Yaml => read_yaml(path, shown, text, namespace, m),
    }
}

/// [`load`] for one text already in memory (tests and fuzzing): `path`
/// decides the kind and anchors relative `build:` paths.
pub fn read_text(path: &Path, text: &str, namespace: &str) -> Manifests {
    let mut m = Manifests::default();
    read_into(path, &path.display().to_string(), text, namespace, &mut m);
    m.built.clear();
    m
}

fn read_limited(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)?
        .take(MAX_FILE_BYTES + 1)
        .read_to_string(&mut text)?;
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(std::io::Error::other(format!(
            "larger than {} MiB",
            MAX_FILE_BYTES >> 20
        )));
    }
    Ok(text)
}

fn read_yaml(path: &Path, shown: &str, text: &str, namespace: &str, m: &mut Manifests) {
    let docs = match crate::policy::yaml::parse_stream(text) {
        Ok(d) => d,
        Err(e) => {
            m.findings.push(Finding::new(
                Check::ManifestInvalid,
                Loc {
                    file: shown.to_owned(),
                    line: e.pos.line,
                    column: e.pos.column,
                },
                format!("YAML: {}", e.message),
            ));
            return;
        }
    };
    for doc in &docs {
        if get(doc, "kind").is_some() && get(doc, "apiVersion").is_some() {
            kube::read(shown, doc, namespace, m);
        } else if get(doc, "services").is_some_and(|s| matches!(s.kind, Kind::Map(_))) {
            compose::read(path, shown, doc, m);
        }
    }
}

// Small accessors over the YAML tree.

/// Value of `key` in a mapping.
fn get<'n>(node: &'n Node, key: &str) -> Option<&'n Node> {
    match &node.kind {
        Kind::Map(entries) => entries
            .iter()
            .find(|(k, _)| text(k) == Some(key))
            .map(|(_, v)| v),
        _ => None,
    }
}

/// Follow a path of keys.
fn path<'n>(node: &'n Node, keys: &[&str]) -> Option<&'n Node> {
    keys.iter().try_fold(node, |n, k| get(n, k))
}

/// A scalar's text (not null).
fn text(node: &Node) -> Option<&str> {
    match &node.kind {
        Kind::Scalar { text, .. } if !node.is_null() => Some(text),
        _ => None,
    }
}

fn items(node: Option<&Node>) -> &[Node] {
    match node.map(|n| &n.kind) {
        Some(Kind::Seq(items)) => items,
        _ => &[],
    }
}

fn entries(node: Option<&Node>) -> &[(Node, Node)] {
    match node.map(|n| &n.kind) {
        Some(Kind::Map(e)) => e,
        _ => &[],
    }
}

/// A string-to-string mapping (labels, selectors); non-scalar values skipped.
fn string_map(node: Option<&Node>) -> BTreeMap<String, String> {
    entries(node)
        .iter()
        .filter_map(|(k, v)| Some((text(k)?.to_owned(), text(v).unwrap_or("").to_owned())))
        .collect()
}

/// A port number 1..=65535.
fn port_number(s: &str) -> Result<u16, String> {
    match s.trim().parse::<u32>() {
        Ok(n @ 1..=65535) => Ok(n as u16),
        Ok(n) => Err(format!("port {n} is out of range (1-65535)")),
        Err(_) => Err(format!("`{s}` is not a port number")),
    }
}

/// `a` or `a-b`.
fn port_range(s: &str) -> Result<(u16, u16), String> {
    match s.split_once('-') {
        Some((a, b)) => {
            let (a, b) = (port_number(a)?, port_number(b)?);
            if a > b {
                return Err(format!("range `{s}` is backwards"));
            }
            Ok((a, b))
        }
        None => port_number(s).map(|p| (p, p)),
    }
}

/// An image reference without tag or digest: `registry/path/name`. Docker
/// Hub's short names are expanded, so `postgres` and
/// `docker.io/library/postgres` are the same image.
pub fn image_repository(image: &str) -> String {
    let no_digest = image.split('@').next().unwrap_or(image);
    // A tag follows the last ':' after the last '/' (a registry port does not).
    let slash = no_digest.rfind('/').map_or(0, |i| i + 1);
    let repo = match no_digest[slash..].rfind(':') {
        Some(i) => &no_digest[..slash + i],
        None => no_digest,
    };
    let first = repo.split('/').next().unwrap_or("");
    let has_registry =
        repo.contains('/') && (first.contains('.') || first.contains(':') || first == "localhost");
    match (has_registry, repo.contains('/')) {
        (true, _) => repo.to_owned(),
        (false, true) => format!("docker.io/{repo}"),
        (false, false) => format!("docker.io/library/{repo}"),
    }
}

/// Last path segment of an image repository (`api` of `reg/shop/api:1`).
pub fn image_name(image: &str) -> String {
    let repo = image_repository(image);
    repo.rsplit('/').next().unwrap_or(&repo).to_owned()
}

/// Replace compose-style `${VAR:-default}` / `${VAR-default}` with the
/// default and `$$` with `$`. `Err(VAR)` for a variable without a default
/// (check does not read the environment, so CI results do not depend on it).
fn interpolate(s: &str) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(r) = after.strip_prefix('$') {
            out.push('$');
            rest = r;
        } else if let Some(r) = after.strip_prefix('{') {
            let end = r.find('}').ok_or_else(|| s.to_owned())?;
            let inner = &r[..end];
            let default = inner
                .split_once(":-")
                .or_else(|| inner.split_once('-'))
                .map(|(_, d)| d);
            match default {
                Some(d) => out.push_str(d),
                None => return Err(inner.to_owned()),
            }
            rest = &r[end + 1..];
        } else {
            let name: String = after
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            return Err(name);
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 13: a manifest whose YAML error the parser placed past its
    /// last line (fuzz/corpus/manifest/issue-13-past-the-end).
    #[test]
    fn a_yaml_error_at_the_end_is_reported_on_the_last_line() {
        let text = crate::policy::yaml::tests::PAST_THE_END;
        assert_eq!(text.matches(['\r', '\n']).count(), 5, "six lines");
        let m = read_text(Path::new("k8s.yaml"), text, "shop");
        let [f] = &m.findings[..] else {
            panic!("one finding: {:?}", m.findings)
        };
        assert_eq!(f.check, Check::ManifestInvalid);
        assert_eq!((f.loc.file.as_str(), f.loc.line), ("k8s.yaml", 6), "{f:?}");
        // The corpus holds the same input, as the fuzzer read it (its first
        // byte, 0, picks the YAML reader).
        let corpus = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../fuzz/corpus/manifest/issue-13-past-the-end"
        ))
        .unwrap();
        assert_eq!(corpus.split_first(), Some((&0u8, text.as_bytes())));
    }

    #[test]
    fn image_repositories_drop_tags_and_digests_and_expand_hub_names() {
        assert_eq!(
            image_repository("postgres:16"),
            "docker.io/library/postgres"
        );
        assert_eq!(
            image_repository("docker.io/library/postgres"),
            "docker.io/library/postgres"
        );
        assert_eq!(image_repository("bitnami/redis"), "docker.io/bitnami/redis");
        assert_eq!(
            image_repository("registry.example.com:5000/shop/api:1.4@sha256:ab"),
            "registry.example.com:5000/shop/api"
        );
        assert_eq!(image_repository("localhost/api"), "localhost/api");
        assert_eq!(image_name("registry.example.com/shop/api:dev"), "api");
    }

    #[test]
    fn interpolation_uses_defaults_and_refuses_to_guess() {
        assert_eq!(interpolate("${PORT:-8080}:80").unwrap(), "8080:80");
        assert_eq!(interpolate("${PORT-9}").unwrap(), "9");
        assert_eq!(interpolate("a$$b").unwrap(), "a$b");
        assert_eq!(interpolate("${PORT}").unwrap_err(), "PORT");
        assert_eq!(interpolate("$PORT:80").unwrap_err(), "PORT");
    }

    #[test]
    fn shown_paths_read_like_the_user_wrote_them() {
        assert_eq!(
            shown_join("", Path::new("./api/Dockerfile")),
            "api/Dockerfile"
        );
        assert_eq!(
            shown_join("ci", Path::new("../api/Dockerfile")),
            "api/Dockerfile"
        );
        assert_eq!(
            shown_join("/x/y", Path::new("./Dockerfile")),
            "/x/y/Dockerfile"
        );
        assert_eq!(
            shown_join("..", Path::new("../Dockerfile")),
            "../../Dockerfile"
        );
    }

    #[test]
    fn dockerfiles_compose_builds_are_read_once() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("api")).unwrap();
        std::fs::write(dir.path().join("api/Dockerfile"), "FROM x\nEXPOSE 3000\n").unwrap();
        let compose = dir.path().join("compose.yaml");
        std::fs::write(
            &compose,
            "services:\n  api: {build: ./api, ports: [\"3000\"]}\n",
        )
        .unwrap();
        let m = load(std::slice::from_ref(&compose), "default").unwrap();
        assert_eq!(m.files, 2);
        let df = m
            .units
            .iter()
            .find(|u| u.origin == Origin::Dockerfile)
            .unwrap();
        assert_eq!(
            df.ports[0].loc.file,
            format!("{}/api/Dockerfile", dir.path().display())
        );
        // Named as well, or found in a directory: still read once.
        let m = load(&[compose, dir.path().to_owned()], "default").unwrap();
        assert_eq!(m.files, 2);
        assert_eq!(m.units.len(), 2);
    }

    #[test]
    fn files_are_recognised_by_name() {
        for (name, kind) in [
            ("Dockerfile", Some(FileKind::Dockerfile)),
            ("Dockerfile.api", Some(FileKind::Dockerfile)),
            ("api.Dockerfile", Some(FileKind::Dockerfile)),
            ("Containerfile", Some(FileKind::Dockerfile)),
            ("deploy.yaml", Some(FileKind::Yaml)),
            ("compose.yml", Some(FileKind::Yaml)),
            ("list.json", Some(FileKind::Yaml)),
            ("README.md", None),
        ] {
            assert_eq!(file_kind(Path::new(name)), kind, "{name}");
        }
    }
}
