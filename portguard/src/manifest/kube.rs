//! Kubernetes objects: the pod templates of Pods, Deployments, StatefulSets,
//! DaemonSets, ReplicaSets, ReplicationControllers, Jobs and CronJobs
//! (containers and init containers, which include native sidecars), and
//! Services. `List` objects are read item by item; other kinds are ignored.
//!
//! Owns the Kubernetes reader. May import the manifest model and value
//! helpers (`super`) and the policy layer's YAML tree.

use super::{
    HostClaim, Loc, Manifests, NetCaps, Origin, PortDecl, ProbeDecl, Proto, Service, ServicePort,
    Target, Unit, WorkloadId,
    values::{get, items, path, port_number, string_map, text},
};
use crate::policy::yaml::Node;

/// Host ports of pods collide across the whole cluster.
pub const CLUSTER_SCOPE: &str = "the cluster";

pub fn read(file: &str, doc: &Node, default_ns: &str, m: &mut Manifests) {
    let Some(kind) = get(doc, "kind").and_then(text) else {
        return;
    };
    if kind == "List" {
        for item in items(get(doc, "items")) {
            read(file, item, default_ns, m);
        }
        return;
    }
    let name = path(doc, &["metadata", "name"])
        .and_then(text)
        .unwrap_or("(unnamed)")
        .to_owned();
    let namespace = path(doc, &["metadata", "namespace"])
        .and_then(text)
        .unwrap_or(default_ns)
        .to_owned();
    let template: &[&str] = match kind {
        "Pod" => &[],
        "Deployment"
        | "StatefulSet"
        | "DaemonSet"
        | "ReplicaSet"
        | "ReplicationController"
        | "Job" => &["spec", "template"],
        "CronJob" => &["spec", "jobTemplate", "spec", "template"],
        "Service" => {
            service(file, doc, name, namespace, m);
            return;
        }
        _ => return,
    };
    let Some(pod) = path(doc, template) else {
        return;
    };
    let labels = string_map(path(pod, &["metadata", "labels"]));
    let Some(spec) = get(pod, "spec") else {
        return;
    };
    let host_network = get(spec, "hostNetwork").is_some_and(super::values::truthy);
    let workload = WorkloadId {
        kind: kind.to_owned(),
        namespace,
        name,
    };
    for list in ["initContainers", "containers"] {
        for c in items(get(spec, list)) {
            let container = get(c, "name").and_then(text).unwrap_or("").to_owned();
            let ports = container_ports(file, c, host_network, m);
            let probes = probes(file, c, m);
            let security = get(c, "securityContext");
            let caps = security.and_then(|s| get(s, "capabilities"));
            let net = NetCaps::read(
                file,
                caps.and_then(|c| get(c, "add")),
                caps.and_then(|c| get(c, "drop")),
                security.and_then(|s| get(s, "privileged")),
            );
            m.units.push(Unit {
                origin: Origin::Kubernetes,
                workload: workload.clone(),
                container,
                labels: labels.clone(),
                image: get(c, "image").and_then(text).map(str::to_owned),
                dockerfile: None,
                host_network,
                ports,
                net,
                loc: Loc::at(file, c),
                scope: CLUSTER_SCOPE.to_owned(),
                probes,
            });
        }
    }
}

/// The container's liveness, readiness and startup probes that target a
/// port (`exec` probes target none).
fn probes(file: &str, c: &Node, m: &mut Manifests) -> Vec<ProbeDecl> {
    let mut out = Vec::new();
    for kind in ["livenessProbe", "readinessProbe", "startupProbe"] {
        let Some(probe) = get(c, kind) else {
            continue;
        };
        for handler in ["httpGet", "tcpSocket", "grpc"] {
            let Some(h) = get(probe, handler) else {
                continue;
            };
            let Some(port) = get(h, "port") else {
                m.invalid(file, h, format!("{kind}.{handler}: no port"));
                continue;
            };
            let target = match text(port) {
                Some(s) if s.bytes().all(|b| b.is_ascii_digit()) => {
                    match number(file, port, &format!("{kind}.{handler}.port"), m) {
                        Some(n) => Target::Number(n),
                        None => continue,
                    }
                }
                Some(s) if !s.is_empty() => Target::Name(s.to_owned()),
                _ => {
                    m.invalid(
                        file,
                        port,
                        format!("{kind}.{handler}.port: expected a number or a port name"),
                    );
                    continue;
                }
            };
            out.push(ProbeDecl {
                kind,
                handler,
                port: target,
                loc: Loc::at(file, port),
                host: get(h, "host").and_then(text).map(str::to_owned),
            });
        }
    }
    out
}

fn protocol(file: &str, node: Option<&Node>, m: &mut Manifests) -> Option<Proto> {
    let Some(n) = node else {
        return Some(Proto::Tcp);
    };
    match text(n).and_then(Proto::parse) {
        Some(p) => Some(p),
        None => {
            m.invalid(
                file,
                n,
                format!(
                    "protocol: expected TCP, UDP or SCTP, found {}",
                    text(n).unwrap_or(n.type_name())
                ),
            );
            None
        }
    }
}

fn number(file: &str, node: &Node, field: &str, m: &mut Manifests) -> Option<u16> {
    match text(node).map(port_number) {
        Some(Ok(p)) => Some(p),
        Some(Err(e)) => {
            m.invalid(file, node, format!("{field}: {e}"));
            None
        }
        None => {
            m.invalid(
                file,
                node,
                format!(
                    "{field}: expected a port number, found {}",
                    node.type_name()
                ),
            );
            None
        }
    }
}

/// A `ports:` entry's required `key` (`containerPort`, `port`): its node, its
/// value and the entry's protocol; `None` (reported) when either is bad.
fn port_entry<'n>(
    file: &str,
    p: &'n Node,
    key: &str,
    m: &mut Manifests,
) -> Option<(&'n Node, u16, Proto)> {
    let Some(node) = get(p, key) else {
        m.invalid(file, p, format!("ports: an entry without {key}"));
        return None;
    };
    let port = number(file, node, key, m)?;
    let proto = protocol(file, get(p, "protocol"), m)?;
    Some((node, port, proto))
}

fn container_ports(file: &str, c: &Node, host_network: bool, m: &mut Manifests) -> Vec<PortDecl> {
    let mut out = Vec::new();
    for p in items(get(c, "ports")) {
        let Some((cp_node, port, proto)) = port_entry(file, p, "containerPort", m) else {
            continue;
        };
        let loc = Loc::at(file, cp_node);
        let ip = get(p, "hostIP")
            .and_then(text)
            .filter(|ip| !matches!(*ip, "0.0.0.0" | "::" | ""))
            .map(str::to_owned);
        let host = match get(p, "hostPort") {
            Some(h) => number(file, h, "hostPort", m).map(|hp| HostClaim {
                lo: hp,
                hi: hp,
                ip,
                loc: Loc::at(file, h),
                same_as_container: host_network && hp == port,
            }),
            None if host_network => Some(HostClaim {
                lo: port,
                hi: port,
                ip,
                loc: loc.clone(),
                same_as_container: true,
            }),
            None => None,
        };
        out.push(PortDecl {
            lo: port,
            hi: port,
            proto,
            name: get(p, "name").and_then(text).map(str::to_owned),
            loc,
            host,
        });
    }
    out
}

fn service(file: &str, doc: &Node, name: String, namespace: String, m: &mut Manifests) {
    let Some(spec) = get(doc, "spec") else {
        return;
    };
    if get(spec, "type").and_then(text) == Some("ExternalName") {
        return;
    }
    let selector = string_map(get(spec, "selector"));
    let mut ports = Vec::new();
    for p in items(get(spec, "ports")) {
        let Some((port_node, port, proto)) = port_entry(file, p, "port", m) else {
            continue;
        };
        let (target, loc) = match get(p, "targetPort") {
            None => (Target::Number(port), Loc::at(file, port_node)),
            Some(t) => {
                let Some(s) = text(t) else {
                    m.invalid(
                        file,
                        t,
                        "targetPort: expected a number or a port name".to_owned(),
                    );
                    continue;
                };
                if s.bytes().all(|b| b.is_ascii_digit()) {
                    let Some(n) = number(file, t, "targetPort", m) else {
                        continue;
                    };
                    (Target::Number(n), Loc::at(file, t))
                } else {
                    (Target::Name(s.to_owned()), Loc::at(file, t))
                }
            }
        };
        ports.push(ServicePort {
            port,
            target,
            proto,
            loc,
        });
    }
    // A Service without a selector has hand-made endpoints: nothing to match.
    if selector.is_empty() {
        return;
    }
    m.services.push(Service {
        namespace,
        name,
        selector,
        ports,
        loc: Loc::at(file, doc),
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Manifests {
        let mut m = Manifests::default();
        for doc in crate::policy::yaml::parse_stream(text).unwrap() {
            read("k.yaml", &doc, "default", &mut m);
        }
        m
    }

    #[test]
    fn workloads_containers_sidecars_and_host_ports() {
        let m = load(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: api, namespace: shop}\nspec:\n  template:\n    metadata: {labels: {app: api}}\n    spec:\n      initContainers:\n        - name: proxy\n          restartPolicy: Always\n          ports: [{containerPort: 8443, name: https}]\n      containers:\n        - name: api\n          image: reg/api:1\n          ports:\n            - containerPort: 3000\n              hostPort: 80\n            - {containerPort: \"53\", protocol: UDP}\n---\napiVersion: apps/v1\nkind: DaemonSet\nmetadata: {name: agent}\nspec:\n  template:\n    spec:\n      hostNetwork: true\n      containers: [{name: a, ports: [{containerPort: 9200}]}]\n",
        );
        assert!(m.findings.is_empty(), "{:?}", m.findings);
        assert_eq!(m.units.len(), 3);
        let proxy = &m.units[0];
        assert_eq!(proxy.container, "proxy");
        assert_eq!(proxy.ports[0].name.as_deref(), Some("https"));
        let api = &m.units[1];
        assert_eq!(api.workload.namespace, "shop");
        assert_eq!(api.labels["app"], "api");
        assert_eq!(api.ports[0].loc.line, 16);
        let host = api.ports[0].host.as_ref().unwrap();
        assert_eq!(
            (host.lo, host.loc.line, host.same_as_container),
            (80, 17, false)
        );
        assert_eq!(api.ports[1].proto, Proto::Udp);
        let agent = &m.units[2];
        assert_eq!(agent.workload.namespace, "default");
        let h = agent.ports[0].host.as_ref().unwrap();
        assert!(h.same_as_container && h.lo == 9200);
    }

    #[test]
    fn services_and_bad_values() {
        let m = load(
            "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec:\n  selector: {app: api}\n  ports:\n    - {port: 80, targetPort: http}\n    - {port: 9090}\n    - {port: 70000}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: ext}\nspec: {ports: [{port: 80}]}\n",
        );
        assert_eq!(m.services.len(), 1);
        let s = &m.services[0];
        assert_eq!(s.ports[0].target, Target::Name("http".into()));
        assert_eq!(s.ports[1].target, Target::Number(9090));
        assert_eq!(m.findings.len(), 1);
        assert_eq!(m.findings[0].loc.line, 9);
        assert!(m.findings[0].message.contains("70000"), "{:?}", m.findings);
    }

    /// Read as Kubernetes' YAML reader (YAML 1.1) reads them: `hostNetwork:
    /// True` or `yes` is host networking; `<<: *base` merges the anchored
    /// mapping (written keys win); a port with a leading zero is refused
    /// (YAML 1.1 reads `026` as octal 22, YAML 1.2 as 26).
    #[test]
    fn yaml_1_1_booleans_merge_keys_and_ambiguous_numbers() {
        for spelling in ["True", "yes", "on", "TRUE"] {
            let m = load(&format!(
                "apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {{name: a}}\nspec:\n  template:\n    spec:\n      hostNetwork: {spelling}\n      containers: [{{name: a, ports: [{{containerPort: 22}}]}}]\n"
            ));
            let h = m.units[0].ports[0].host.as_ref();
            assert!(
                h.is_some_and(|h| h.lo == 22),
                "hostNetwork: {spelling}: {:?}",
                m.units
            );
        }
        let m = load(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: a}\nspec:\n  template:\n    spec:\n      containers:\n        - &base {name: a, image: x, ports: [{containerPort: 22, hostPort: 22}]}\n        - <<: *base\n          name: b\n",
        );
        assert_eq!(m.units.len(), 2, "{:?}", m.units);
        assert_eq!(m.units[1].container, "b");
        assert_eq!(m.units[1].ports[0].host.as_ref().map(|h| h.lo), Some(22));
        let m = load(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: a}\nspec:\n  template:\n    spec:\n      containers: [{name: a, ports: [{containerPort: 026}, {containerPort: 0x50}]}]\n",
        );
        assert_eq!(m.findings.len(), 2, "{:?}", m.findings);
        assert!(m.findings[0].message.contains("`026`"), "{:?}", m.findings);
    }
}
