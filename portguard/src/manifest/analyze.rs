//! Hold what the manifests declare against the port plan.
//!
//! - Each Kubernetes container is matched to its policy by the agent's own
//!   rule: among the `pods:` selectors matching its namespace, pod labels and
//!   container name, the most specific wins, ties going to the first in the
//!   file (`cgroup:` and `unit:` policies name host paths no manifest shows).
//! - Declarations of one service in different files are tied together: the
//!   same image repository; a compose service that builds a Dockerfile; a
//!   compose service named like a Kubernetes container; a Dockerfile whose
//!   name (its directory, or `Dockerfile.NAME`) is a container's name or its
//!   image's last path segment. A compose service or Dockerfile is held
//!   against the policies of the Kubernetes containers of its service.

use std::collections::{BTreeMap, BTreeSet};

use portguard_common::{AddrClass, Family, Proto as KProto, SOCK_ALLOW_SCTP};

use super::{
    Check, Finding, HostClaim, Loc, Manifests, Origin, PortDecl, Proto, Severity, Target, Unit,
    image_name, image_repository,
};
use crate::policy::{
    CompiledPolicy, INFRASTRUCTURE_PORTS, Mode, PolicyFile, PortSet, Selector, compile_all,
};

/// What each infrastructure port is, for messages.
fn infrastructure_name(port: u16) -> Option<&'static str> {
    Some(match port {
        22 => "SSH",
        2379 | 2380 => "etcd",
        6443 => "the Kubernetes API server",
        9100 => "the node exporter",
        10250 => "the kubelet",
        10255 => "the kubelet's read-only port",
        10256 => "kube-proxy's health check",
        10257 => "the controller manager",
        10259 => "the scheduler",
        _ => return None,
    })
}

/// `8080`, `3000-3999` or `22 (SSH)`, up to eight, for messages.
pub fn describe_set(set: &PortSet) -> String {
    let mut parts: Vec<String> = set
        .ranges()
        .iter()
        .take(8)
        .map(|&(a, b)| {
            if a == PortSet::EPHEMERAL && b == PortSet::EPHEMERAL {
                "ephemeral".to_owned()
            } else if a == b {
                a.to_string()
            } else {
                format!("{a}-{b}")
            }
        })
        .collect();
    if set.ranges().len() > 8 {
        parts.push("…".to_owned());
    }
    if parts.is_empty() {
        "nothing".to_owned()
    } else {
        parts.join(", ")
    }
}

fn range_set(lo: u16, hi: u16) -> PortSet {
    PortSet::from_ranges([(lo, hi)])
}

/// Union-find over unit indexes.
struct Groups(Vec<usize>);

impl Groups {
    fn find(&mut self, i: usize) -> usize {
        let mut r = i;
        while self.0[r] != r {
            r = self.0[r];
        }
        let mut j = i;
        while self.0[j] != r {
            let next = self.0[j];
            self.0[j] = r;
            j = next;
        }
        r
    }

    fn join(&mut self, a: usize, b: usize) {
        let (ra, rb) = (self.find(a), self.find(b));
        if ra != rb {
            self.0[ra.max(rb)] = ra.min(rb);
        }
    }
}

/// Tie declarations of one service together (see the module docs).
fn group(units: &[Unit]) -> Vec<usize> {
    let mut g = Groups((0..units.len()).collect());
    let mut by_key: BTreeMap<(u8, String), usize> = BTreeMap::new();
    let mut link =
        |g: &mut Groups, kind: u8, key: String, i: usize| match by_key.get(&(kind, key.clone())) {
            Some(&j) => g.join(i, j),
            None => {
                by_key.insert((kind, key), i);
            }
        };
    // Keys: 0 image repository, 1 Dockerfile path, 2 name.
    for (i, u) in units.iter().enumerate() {
        if let Some(img) = &u.image {
            link(&mut g, 0, image_repository(img), i);
        }
        if let Some(df) = &u.dockerfile {
            link(&mut g, 1, df.display().to_string(), i);
        }
    }
    // Names join across origins only: two Kubernetes containers both called
    // `app` are not the same service.
    let mut names: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, u) in units.iter().enumerate() {
        let mut keys = vec![u.container.clone()];
        if u.origin == Origin::Kubernetes
            && let Some(img) = &u.image
        {
            keys.push(image_name(img));
        }
        for k in keys.into_iter().filter(|k| !k.is_empty()) {
            names.entry(k).or_default().push(i);
        }
    }
    // Linear per name: the pairwise rules, joined through one member.
    for (name, members) in &names {
        let of = |o: Origin| {
            members
                .iter()
                .copied()
                .filter(move |&i| units[i].origin == o)
        };
        let compose: Vec<usize> = of(Origin::Compose).collect();
        let dockerfiles: Vec<usize> = of(Origin::Dockerfile).collect();
        // A compose service joins the Kubernetes containers of its name.
        if let Some(&c) = compose.first() {
            for k in of(Origin::Kubernetes).filter(|&k| units[k].container == *name) {
                g.join(c, k);
            }
            compose.iter().for_each(|&o| g.join(c, o));
        }
        // A Dockerfile joins every compose service or container of its name
        // (or whose image has its name).
        if let Some(&d) = dockerfiles.first() {
            let others: Vec<usize> = of(Origin::Kubernetes).chain(of(Origin::Compose)).collect();
            if !others.is_empty() {
                for o in others.into_iter().chain(dockerfiles.iter().copied()) {
                    g.join(d, o);
                }
            }
        }
    }
    (0..units.len()).map(|i| g.find(i)).collect()
}

/// The policy governing a Kubernetes container, by the agent's rule.
fn governing(policies: &[CompiledPolicy], u: &Unit) -> Option<usize> {
    let mut best: Option<(u32, usize)> = None;
    for (i, p) in policies.iter().enumerate() {
        let Selector::Pods(sel) = &p.selector else {
            continue;
        };
        if !sel.matches_pod(&u.workload.namespace, &u.labels)
            || sel.container.as_ref().is_some_and(|c| *c != u.container)
        {
            continue;
        }
        let spec = p.selector.specificity();
        if best.is_none_or(|(s, _)| spec > s) {
            best = Some((spec, i));
        }
    }
    best.map(|(_, i)| i)
}

/// Why `policy` does not let the container bind `d`, if it does not.
fn refusal(policy: &CompiledPolicy, d: &PortDecl) -> Option<String> {
    let sets = policy.bind.as_ref()?;
    let want = range_set(d.lo, d.hi);
    let proto = match d.proto {
        Proto::Tcp => KProto::Tcp,
        Proto::Udp => KProto::Udp,
        Proto::Sctp => {
            return (policy.allow_sockets & SOCK_ALLOW_SCTP == 0).then(|| {
                "SCTP sockets are not allowed by it (`allow_sockets` lacks sctp)".to_owned()
            });
        }
    };
    let covered = |class| {
        [Family::Ipv4, Family::Ipv6]
            .iter()
            .any(|&f| want.difference(sets.get(proto, f, class)).is_empty())
    };
    if covered(AddrClass::Any) {
        return None;
    }
    if covered(AddrClass::Loopback) {
        return Some(format!(
            "it allows {} only on loopback (`address: loopback`), and a declared port is \
             reached on the pod's or host's address",
            d.describe()
        ));
    }
    let mut allowed = sets.get(proto, Family::Ipv4, AddrClass::Any).clone();
    allowed.union_with(sets.get(proto, Family::Ipv6, AddrClass::Any));
    Some(format!(
        "it allows {} binds on {}",
        d.proto.as_str(),
        describe_set(&allowed)
    ))
}

pub struct Analysis {
    pub findings: Vec<Finding>,
    /// Kubernetes containers governed by a policy.
    pub governed: usize,
}

/// Every finding about `m` under `plan`, in file and line order.
pub fn analyze(plan: &PolicyFile, policy_file: &str, m: &Manifests) -> Analysis {
    let policies = compile_all(&plan.policies);
    let mut out: Vec<Finding> = Vec::new();
    let units = &m.units;
    let groups = group(units);
    let owner: Vec<Option<usize>> = units
        .iter()
        .map(|u| match u.origin {
            Origin::Kubernetes => governing(&policies, u),
            _ => None,
        })
        .collect();
    let governed = owner.iter().flatten().count();
    // Per service, the policies of its Kubernetes containers (each with the
    // first container it governs): what judges its compose services and
    // Dockerfiles.
    let mut group_judges: BTreeMap<usize, Vec<(usize, Option<usize>)>> = BTreeMap::new();
    for (j, p) in owner.iter().enumerate() {
        if let Some(p) = *p {
            let judges = group_judges.entry(groups[j]).or_default();
            if judges.iter().all(|&(q, _)| q != p) {
                judges.push((p, Some(j)));
            }
        }
    }

    // A declared port in the reserved set; else one a governing policy
    // does not allow.
    for (i, u) in units.iter().enumerate() {
        let judges: Vec<(usize, Option<usize>)> = match u.origin {
            Origin::Kubernetes => owner[i].map(|p| (p, None)).into_iter().collect(),
            _ => group_judges.get(&groups[i]).cloned().unwrap_or_default(),
        };
        for d in &u.ports {
            let clash = range_set(d.lo, d.hi).intersection(&plan.reserved);
            if !clash.is_empty() {
                out.push(reserved(
                    &clash,
                    &d.loc,
                    &format!("{} declares {}", capitalize(&u.describe()), d.describe()),
                    true,
                ));
            }
            if let Some(h) = d.host.as_ref().filter(|h| !h.same_as_container) {
                let clash = range_set(h.lo, h.hi).intersection(&plan.reserved);
                if !clash.is_empty() {
                    out.push(reserved(
                        &clash,
                        &h.loc,
                        &format!(
                            "{} takes host port {}/{}",
                            capitalize(&u.describe()),
                            describe_set(&range_set(h.lo, h.hi)),
                            d.proto.as_str()
                        ),
                        false,
                    ));
                }
            }
            if !clash.is_empty() {
                continue;
            }
            for &(p, via) in &judges {
                let policy = &policies[p];
                let Some(why) = refusal(policy, d) else {
                    continue;
                };
                let whose = match via {
                    None => String::new(),
                    Some(j) => format!(
                        ", which governs the same service in Kubernetes ({})",
                        units[j].describe()
                    ),
                };
                let mut f = Finding::new(
                    Check::PortNotAllowed,
                    d.loc.clone(),
                    format!(
                        "{} declares {}, which policy `{}`{whose} does not allow: {why}",
                        capitalize(&u.describe()),
                        d.describe(),
                        policy.name,
                    ),
                );
                if policy.mode == Mode::Audit {
                    f.severity = Severity::Warning;
                    f.message
                        .push_str(" (the policy is in audit mode: reported, not denied)");
                }
                f.related.push((
                    Loc {
                        file: policy_file.to_owned(),
                        line: plan.policies[p].line,
                        column: 1,
                    },
                    format!("policy `{}`", policy.name),
                ));
                out.push(f);
            }
        }
    }

    host_conflicts(units, &mut out);
    services(m, &mut out);
    mismatches(units, &groups, &mut out);

    out.sort_by(|a, b| (&a.loc, a.check).cmp(&(&b.loc, b.check)));
    Analysis {
        findings: out,
        governed,
    }
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_uppercase().chain(c).collect())
        .unwrap_or_default()
}

fn reserved(clash: &PortSet, loc: &Loc, what: &str, bound_inside: bool) -> Finding {
    let names: BTreeSet<&str> = INFRASTRUCTURE_PORTS
        .iter()
        .flat_map(|&(x, y)| x..=y)
        .filter(|&p| clash.contains(p))
        .filter_map(infrastructure_name)
        .collect();
    let why = if names.is_empty() {
        String::new()
    } else {
        format!(" ({})", names.into_iter().collect::<Vec<_>>().join(", "))
    };
    Finding::new(
        Check::ReservedPort,
        loc.clone(),
        format!(
            "{what}, which the plan reserves (`reserved:`): {}{why}{}",
            describe_set(clash),
            if bound_inside {
                "; the kernel denies reserved ports to every governed workload"
            } else {
                ""
            }
        ),
    )
}

/// Claims on one host port (same protocol, overlapping addresses) by
/// different workloads in one scope. Each claim gets a finding naming the
/// others, so whichever file changed, its line is annotated.
fn host_conflicts(units: &[Unit], out: &mut Vec<Finding>) {
    let claims: Vec<(&Unit, &PortDecl, &HostClaim)> = units
        .iter()
        .flat_map(|u| {
            u.ports
                .iter()
                .filter_map(move |d| d.host.as_ref().map(|h| (u, d, h)))
        })
        .collect();
    let how = |u: &Unit, h: &HostClaim| {
        if h.same_as_container {
            "host network"
        } else if u.origin == Origin::Compose {
            "published port"
        } else {
            "hostPort"
        }
    };
    for &(uj, dj, hj) in &claims {
        let others: Vec<_> = claims
            .iter()
            .filter(|&&(ui, di, hi)| {
                let same_addr = match (&hi.ip, &hj.ip) {
                    (Some(a), Some(b)) => a == b,
                    _ => true,
                };
                ui.scope == uj.scope
                    && ui.workload != uj.workload
                    && di.proto == dj.proto
                    && same_addr
                    && hi.lo <= hj.hi
                    && hj.lo <= hi.hi
            })
            .collect();
        if others.is_empty() {
            continue;
        }
        let mut overlap = PortSet::default();
        for &&(_, _, hi) in &others {
            overlap.insert_range(hi.lo.max(hj.lo), hi.hi.min(hj.hi));
        }
        let names: Vec<String> = others
            .iter()
            .map(|&&(ui, _, hi)| format!("{} ({}, {})", ui.describe(), how(ui, hi), hi.loc))
            .collect();
        let mut f = Finding::new(
            Check::HostPortConflict,
            hj.loc.clone(),
            format!(
                "host port {}/{} ({}) of {} is also claimed by {} in {}",
                describe_set(&overlap),
                dj.proto.as_str(),
                how(uj, hj),
                uj.describe(),
                names.join(", "),
                uj.scope
            ),
        );
        for &&(ui, _, hi) in &others {
            f.related
                .push((hi.loc.clone(), format!("also claimed by {}", ui.describe())));
        }
        out.push(f);
    }
}

/// Each Service port must reach a declared container port of a selected pod.
fn services(m: &Manifests, out: &mut Vec<Finding>) {
    for s in &m.services {
        let selected: Vec<&Unit> = m
            .units
            .iter()
            .filter(|u| {
                u.origin == Origin::Kubernetes
                    && u.workload.namespace == s.namespace
                    && s.selector.iter().all(|(k, v)| u.labels.get(k) == Some(v))
            })
            .collect();
        if selected.is_empty() {
            out.push(Finding::new(
                Check::ServiceSelectsNothing,
                s.loc.clone(),
                format!(
                    "Service {}/{} selects {} but no workload in these manifests has those pod \
                     labels; its targetPorts were not checked",
                    s.namespace,
                    s.name,
                    s.selector
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(",")
                ),
            ));
            continue;
        }
        for sp in &s.ports {
            let matches = |d: &PortDecl| {
                d.proto == sp.proto
                    && match &sp.target {
                        Target::Number(n) => d.lo <= *n && *n <= d.hi,
                        Target::Name(n) => d.name.as_deref() == Some(n),
                    }
            };
            if selected.iter().any(|u| u.ports.iter().any(matches)) {
                continue;
            }
            let target = match &sp.target {
                Target::Number(n) => n.to_string(),
                Target::Name(n) => format!("`{n}`"),
            };
            let declared: Vec<String> = selected
                .iter()
                .flat_map(|u| &u.ports)
                .map(|d| match &d.name {
                    Some(n) => format!("{} ({n})", d.describe()),
                    None => d.describe(),
                })
                .collect();
            let mut f = Finding::new(
                Check::TargetPortUnmatched,
                sp.loc.clone(),
                format!(
                    "Service {}/{} port {} targets {}/{}, which no container of the pods it \
                     selects declares (they declare {})",
                    s.namespace,
                    s.name,
                    sp.port,
                    target,
                    sp.proto.as_str(),
                    if declared.is_empty() {
                        "no ports".to_owned()
                    } else {
                        declared.join(", ")
                    }
                ),
            );
            for u in selected.iter().take(4) {
                f.related
                    .push((u.loc.clone(), format!("selected: {}", u.describe())));
            }
            out.push(f);
        }
    }
}

/// A port one kind of file declares for a service and no other kind does.
fn mismatches(units: &[Unit], groups: &[usize], out: &mut Vec<Finding>) {
    let mut members: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (i, g) in groups.iter().enumerate() {
        members.entry(*g).or_default().push(i);
    }
    for ids in members.values() {
        // Ports per origin (only origins that declare any).
        let mut by_origin: BTreeMap<Origin, BTreeMap<Proto, PortSet>> = BTreeMap::new();
        let mut first: BTreeMap<Origin, (Loc, String)> = BTreeMap::new();
        for &i in ids {
            let u = &units[i];
            for d in &u.ports {
                by_origin
                    .entry(u.origin)
                    .or_default()
                    .entry(d.proto)
                    .or_default()
                    .insert_range(d.lo, d.hi);
            }
            if !u.ports.is_empty() {
                first
                    .entry(u.origin)
                    .or_insert_with(|| (u.ports[0].loc.clone(), u.describe()));
            }
        }
        if by_origin.len() < 2 {
            continue;
        }
        // What each kind of file declares, for messages.
        let declared: BTreeMap<Origin, String> = by_origin
            .iter()
            .map(|(o, sets)| {
                let all: Vec<String> = sets
                    .iter()
                    .map(|(p, s)| format!("{} {}", p.as_str(), describe_set(s)))
                    .collect();
                (*o, all.join(", "))
            })
            .collect();
        for &i in ids {
            let u = &units[i];
            let others: Vec<Origin> = by_origin
                .keys()
                .copied()
                .filter(|o| *o != u.origin)
                .collect();
            for d in &u.ports {
                let mut elsewhere = PortSet::default();
                for o in &others {
                    if let Some(s) = by_origin[o].get(&d.proto) {
                        elsewhere.union_with(s);
                    }
                }
                if !range_set(d.lo, d.hi).intersection(&elsewhere).is_empty() {
                    continue;
                }
                let mut f = Finding::new(
                    Check::PortMismatch,
                    d.loc.clone(),
                    format!(
                        "{} declares {}, which the same service's other files do not: {}",
                        capitalize(&u.describe()),
                        d.describe(),
                        others
                            .iter()
                            .map(|o| format!("{} declares {}", o.as_str(), declared[o]))
                            .collect::<Vec<_>>()
                            .join("; ")
                    ),
                );
                for o in &others {
                    if let Some((loc, who)) = first.get(o) {
                        f.related
                            .push((loc.clone(), format!("{}: {who}", o.as_str())));
                    }
                }
                out.push(f);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{manifest::Manifests, policy::parse_policy_str};

    fn units(yaml: &str) -> Manifests {
        let mut m = Manifests::default();
        for doc in crate::policy::yaml::parse_stream(yaml).unwrap() {
            super::super::kube::read("k.yaml", &doc, "default", &mut m);
        }
        m
    }

    fn deployment(name: &str, labels: &str, containers: &str) -> String {
        format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  template:\n    metadata: {{labels: {labels}}}\n    spec:\n      containers: {containers}\n---\n"
        )
    }

    #[test]
    fn the_most_specific_policy_judges_each_container() {
        let plan = parse_policy_str(
            "policies:\n  - {name: pod, pods: {namespace: shop, labels: {app: api}}, bind: [{ports: [3000]}]}\n  - {name: side, pods: {namespace: shop, labels: {app: api}, container: envoy}, bind: [{ports: [8443]}, {ports: [9901], address: loopback}]}\n  - {name: audit, mode: audit, pods: {namespace: shop, labels: {app: batch}}, bind: [{ports: [1]}]}\n",
        )
        .unwrap();
        let m = units(
            &(deployment(
                "api",
                "{app: api}",
                "[{name: api, ports: [{containerPort: 3000}, {containerPort: 8443}]}, {name: envoy, ports: [{containerPort: 8443}, {containerPort: 3000}, {containerPort: 9901}]}]",
            ) + &deployment(
                "batch",
                "{app: batch}",
                "[{name: b, ports: [{containerPort: 2}]}]",
            ) + &deployment(
                "free",
                "{app: free}",
                "[{name: f, ports: [{containerPort: 2}]}]",
            )),
        );
        let a = analyze(&plan, "p.yaml", &m);
        let got: Vec<_> = a
            .findings
            .iter()
            .map(|f| (f.check, f.loc.line, f.severity))
            .collect();
        // api's 8443 (pod policy), envoy's 3000 (container policy) and 9901
        // (loopback only), batch's 2 (audit: a warning); `free` is ungoverned.
        let lines: Vec<usize> = m
            .units
            .iter()
            .flat_map(|u| &u.ports)
            .map(|d| d.loc.line)
            .collect();
        assert_eq!(
            got,
            [
                (Check::PortNotAllowed, lines[1], Severity::Error),
                (Check::PortNotAllowed, lines[3], Severity::Error),
                (Check::PortNotAllowed, lines[4], Severity::Error),
                (Check::PortNotAllowed, lines[5], Severity::Warning),
            ],
            "{:#?}",
            a.findings
        );
        assert!(
            a.findings[2].message.contains("only on loopback"),
            "{}",
            a.findings[2].message
        );
        assert!(
            a.findings[1].message.contains("policy `side`"),
            "{}",
            a.findings[1].message
        );
        // `free` is the fourth container.
        assert_eq!((a.governed, m.units.len()), (3, 4));
    }

    #[test]
    fn host_ports_conflict_across_workloads_and_protocols_matter() {
        let plan = parse_policy_str("policies: []\n").unwrap_or_default();
        let m = units(
            &(deployment(
                "a",
                "{app: a}",
                "[{name: a, ports: [{containerPort: 80, hostPort: 8080}, {containerPort: 53, hostPort: 53, protocol: UDP}]}]",
            ) + &deployment(
                "b",
                "{app: b}",
                "[{name: b, ports: [{containerPort: 81, hostPort: 8080}, {containerPort: 53, hostPort: 53}, {containerPort: 9, hostPort: 8081, hostIP: 10.0.0.1}]}]",
            ) + &deployment(
                "c",
                "{app: c}",
                "[{name: c, ports: [{containerPort: 9, hostPort: 8081, hostIP: 10.0.0.2}]}]",
            )),
        );
        let a = analyze(&plan, "p.yaml", &m);
        // 8080/tcp of a and b, each side annotated; 53 differs in protocol,
        // 8081 in host address.
        assert_eq!(a.findings.len(), 2, "{:#?}", a.findings);
        let (fa, fb) = (&a.findings[0], &a.findings[1]);
        let (ha, hb) = (
            m.units[0].ports[0].host.as_ref().unwrap(),
            m.units[1].ports[0].host.as_ref().unwrap(),
        );
        assert_eq!(
            (fa.check, &fa.loc, &fa.related[0].0),
            (Check::HostPortConflict, &ha.loc, &hb.loc)
        );
        assert_eq!(
            (fb.check, &fb.loc, &fb.related[0].0),
            (Check::HostPortConflict, &hb.loc, &ha.loc)
        );
        assert!(
            fb.message
                .contains("also claimed by container `a` of Deployment shop/a"),
            "{}",
            fb.message
        );
    }

    #[test]
    fn reserved_ports_name_what_they_are_for() {
        let plan = parse_policy_str(
            "reserved: [infrastructure]\npolicies:\n  - {name: p, pods: {labels: {app: a}}, bind: [{ports: [10250]}]}\n",
        )
        .unwrap();
        let mut m = units(&deployment(
            "a",
            "{app: a}",
            "[{name: a, ports: [{containerPort: 10250}, {containerPort: 80, hostPort: 22}]}]",
        ));
        m.units[0].workload.namespace = "default".into();
        let a = analyze(&plan, "p.yaml", &m);
        let got: Vec<_> = a.findings.iter().map(|f| f.check).collect();
        // 10250: reserved only (not also "not allowed"); hostPort 22:
        // reserved; containerPort 80: not allowed.
        assert_eq!(
            got,
            [
                Check::ReservedPort,
                Check::PortNotAllowed,
                Check::ReservedPort
            ],
            "{:#?}",
            a.findings
        );
        assert!(a.findings[0].message.contains("the kubelet"));
        assert!(a.findings[2].message.contains("SSH"));
    }

    /// Write `files` under a temp dir and load them all.
    fn load_files(files: &[(&str, &str)]) -> (tempfile::TempDir, Manifests) {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            let p = dir.path().join(name);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }
        let m = crate::manifest::load(&[dir.path().to_owned()], "default").unwrap();
        (dir, m)
    }

    #[test]
    fn one_service_across_files_and_only_real_differences_are_mismatches() {
        let k8s = deployment(
            "api",
            "{app: api}",
            "[{name: api, image: \"reg.example/shop/api:1\", ports: [{containerPort: 3000}, {containerPort: 9090}]}]",
        ) + &deployment(
            "other",
            "{app: other}",
            "[{name: worker, image: \"reg.example/shop/worker:1\", ports: [{containerPort: 5000}]}]",
        );
        let (_d, m) = load_files(&[
            ("k8s/all.yaml", &k8s),
            // Joined by build, image and name; `expose` missing: the
            // compose service declares 3000 only, not compared as missing.
            (
                "compose.yaml",
                "services:\n  api:\n    build: ./api\n    image: reg.example/shop/api:dev\n    ports: [\"8080:3000\"]\n  worker:\n    image: reg.example/shop/worker:dev\n",
            ),
            ("api/Dockerfile", "FROM x\nEXPOSE 3000 9090 7777\n"),
        ]);
        let g = group(&m.units);
        let idx = |o: Origin, c: &str| {
            m.units
                .iter()
                .position(|u| u.origin == o && u.container == c)
                .unwrap()
        };
        let api = g[idx(Origin::Kubernetes, "api")];
        assert_eq!(g[idx(Origin::Compose, "api")], api);
        assert_eq!(g[idx(Origin::Dockerfile, "api")], api);
        assert_ne!(g[idx(Origin::Kubernetes, "worker")], api);
        assert_eq!(
            g[idx(Origin::Compose, "worker")],
            g[idx(Origin::Kubernetes, "worker")]
        );
        let plan = parse_policy_str("policies: []\n").unwrap();
        let a = analyze(&plan, "p.yaml", &m);
        let got: Vec<_> = a
            .findings
            .iter()
            .map(|f| {
                (
                    f.check,
                    f.loc.file.rsplit('/').next().unwrap().to_owned(),
                    f.loc.line,
                )
            })
            .collect();
        // Only 7777, which only the Dockerfile declares; the worker's
        // compose service declares nothing and is not compared.
        assert_eq!(
            got,
            [(Check::PortMismatch, "Dockerfile".to_owned(), 2)],
            "{:#?}",
            a.findings
        );
        assert_eq!(a.findings[0].related.len(), 2);
    }

    #[test]
    fn compose_host_ports_collide_within_a_file_only() {
        let (_d, m) = load_files(&[
            (
                "a/compose.yaml",
                "services:\n  x: {image: x, ports: [\"8080:80\"]}\n  y: {image: y, ports: [\"8080:81\", \"127.0.0.1:9000:9000\"]}\n  z: {image: z, ports: [\"127.0.0.2:9000:9000\", \"8080:80/udp\"]}\n",
            ),
            (
                "b/compose.yaml",
                "services:\n  x2: {image: q, ports: [\"8080:80\"]}\n",
            ),
        ]);
        let plan = parse_policy_str("policies: []\n").unwrap();
        let a = analyze(&plan, "p.yaml", &m);
        let got: Vec<_> = a.findings.iter().map(|f| (f.check, f.loc.line)).collect();
        assert_eq!(
            got,
            [(Check::HostPortConflict, 2), (Check::HostPortConflict, 3)],
            "{:#?}",
            a.findings
        );
        assert!(
            a.findings[0].message.contains("published port"),
            "{}",
            a.findings[0].message
        );
    }

    #[test]
    fn service_targets_by_number_and_name() {
        let k8s = deployment(
            "api",
            "{app: api, tier: web}",
            "[{name: api, ports: [{containerPort: 3000, name: http}, {containerPort: 53, protocol: UDP}]}]",
        ) + "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: shop}\nspec:\n  selector: {app: api}\n  ports:\n    - {port: 80, targetPort: http}\n    - {port: 3000}\n    - {port: 81, targetPort: https}\n    - {port: 53, protocol: UDP}\n    - {port: 54, targetPort: 53}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: lost, namespace: other}\nspec: {selector: {app: api}, ports: [{port: 1}]}\n";
        let m = units(&k8s);
        let plan = parse_policy_str("policies: []\n").unwrap();
        let a = analyze(&plan, "p.yaml", &m);
        let got: Vec<_> = a
            .findings
            .iter()
            .map(|f| (f.check, f.severity, f.loc.line))
            .collect();
        // `https` names no port; 54 -> 53/tcp, but 53 is declared UDP; the
        // Service in another namespace selects nothing (a warning).
        assert_eq!(
            got,
            [
                (Check::TargetPortUnmatched, Severity::Error, 18),
                (Check::TargetPortUnmatched, Severity::Error, 20),
                (Check::ServiceSelectsNothing, Severity::Warning, 22),
            ],
            "{:#?}",
            a.findings
        );
    }

    /// `governing` picks, for every container of the manifests, the policy
    /// the agent ends up enforcing on it: the agent's resolver run on the
    /// same pods, then the kernel's rule (the container's own cgroup's
    /// policy, else its pod cgroup's).
    #[test]
    fn the_policy_chosen_is_the_one_the_agent_enforces() {
        use std::collections::HashMap;

        use crate::{
            cri::{Container, Pod, Snapshot},
            resolve::{TreeIndex, resolve},
        };
        let plan = parse_policy_str(
            "policies:\n  - {name: all, pods: {}, bind: []}\n  - {name: shop, pods: {namespace: shop}, bind: []}\n  - {name: glob, pods: {namespace: \"sh*\", labels: {app: api}}, bind: []}\n  - {name: api, pods: {namespace: shop, labels: {app: api}}, bind: []}\n  - {name: two-labels, pods: {labels: {app: api, tier: web}}, bind: []}\n  - {name: envoy, pods: {labels: {app: api}, container: envoy}, bind: []}\n  - {name: envoy-shop, pods: {namespace: shop, container: envoy}, bind: []}\n  - {name: db, pods: {namespace: data, labels: {app: db}}, bind: []}\n",
        )
        .unwrap();
        let policies = compile_all(&plan.policies);
        let m = units(
            &(deployment(
                "api",
                "{app: api, tier: web}",
                "[{name: api}, {name: envoy}]",
            ) + &deployment(
                "api2",
                "{app: api}",
                "[{name: api}, {name: envoy}, {name: log}]",
            ) + &deployment("other", "{app: other}", "[{name: envoy}, {name: x}]")
                + "apiVersion: v1\nkind: Pod\nmetadata: {name: db, namespace: data, labels: {app: db}}\nspec: {containers: [{name: pg}, {name: envoy}]}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: free, namespace: kube-system}\nspec: {containers: [{name: c}]}\n"),
        );
        // The pods and containers as the CRI runtime and the cgroup tree
        // would show them.
        let mut pods: Vec<Pod> = Vec::new();
        let mut containers = Vec::new();
        let mut paths = vec!["/kubepods".to_owned()];
        let mut cgroup_of = Vec::new();
        for (n, u) in m.units.iter().enumerate() {
            let key = format!("{}/{}", u.workload.namespace, u.workload.name);
            let p = match pods.iter().position(|p| p.name == key) {
                Some(p) => p,
                None => {
                    let uid = format!("{:08x}-0000-0000-0000-000000000000", pods.len() + 1);
                    paths.push(format!("/kubepods/pod{uid}"));
                    pods.push(Pod {
                        sandbox_id: format!("sb-{uid}"),
                        uid,
                        name: key,
                        namespace: u.workload.namespace.clone(),
                        labels: u.labels.clone(),
                        ready: true,
                    });
                    pods.len() - 1
                }
            };
            let id = format!("{:064x}", n + 1);
            let pod_path = format!("/kubepods/pod{}", pods[p].uid);
            paths.push(format!("{pod_path}/{id}"));
            cgroup_of.push((pod_path.clone(), format!("{pod_path}/{id}")));
            containers.push(Container {
                id,
                sandbox_id: pods[p].sandbox_id.clone(),
                name: u.container.clone(),
            });
        }
        let tree = TreeIndex::from_paths(paths.iter().map(String::as_str));
        let cri = Snapshot { pods, containers };
        let mut ids: HashMap<String, u64> = HashMap::new();
        let mut stat = |p: &str| {
            let next = ids.len() as u64 + 1;
            Some((
                *ids.entry(p.to_owned()).or_insert(next),
                p.matches('/').count() as u32,
            ))
        };
        let (resolution, _) = resolve(&policies, &tree, Some(&cri), &mut stat);
        let owner_of = |path: &str| {
            resolution
                .iter()
                .position(|g| g.iter().any(|g| g.path == path))
        };
        let mut seen = BTreeSet::new();
        for (u, (pod_path, container_path)) in m.units.iter().zip(&cgroup_of) {
            let agent = owner_of(container_path).or_else(|| owner_of(pod_path));
            let ours = governing(&policies, u);
            assert_eq!(
                ours.map(|i| &policies[i].name),
                agent.map(|i| &policies[i].name),
                "{}",
                u.describe()
            );
            seen.insert(ours.map(|i| policies[i].name.clone()));
        }
        // The cases are not all one answer.
        assert!(seen.len() >= 5, "{seen:?}");
    }
}
