//! Hold what the manifests declare against the port plan.
//!
//! - Each Kubernetes container is matched to its policy by the agent's own
//!   rule ([`most_specific`]): among the `pods:` selectors matching its
//!   namespace, pod labels and container name, the most specific wins, ties
//!   going to the first in the file (`cgroup:` and `unit:` policies name
//!   host paths no manifest shows).
//! - Declarations of one service in different files are tied together: the
//!   same image repository; a compose service that builds a Dockerfile; a
//!   compose service named like a Kubernetes container; a Dockerfile whose
//!   name (its directory, or `Dockerfile.NAME`) is a container's name or its
//!   image's last path segment. A compose service or Dockerfile is held
//!   against the policies of the Kubernetes containers of its service.
//!
//! Owns [`analyze`] and the policy checks (a port not allowed, a reserved
//! port); its submodules own tying a service's files together and the ports
//! they disagree on (`across_files`), host port conflicts (`host_ports`),
//! Service targets (`service_targets`), the network capabilities of
//! governed containers (`capabilities`) and health probes on ports the
//! plan forbids or the container does not declare (`probes`).
//!
//! May import: the manifest model (`super`), the policy layer (its model,
//! compiled sets and [`most_specific`]), portguard-common's protocol and
//! address constants, and `std`.

mod across_files;
mod capabilities;
mod host_ports;
mod probes;
mod service_targets;

use std::collections::{BTreeMap, BTreeSet};

use portguard_common::{AddrClass, Family, Proto as KProto, SOCK_ALLOW_SCTP};

use self::{
    across_files::{group, mismatches},
    capabilities::capabilities,
    host_ports::host_conflicts,
    service_targets::services,
};
use super::{Check, Finding, Loc, Manifests, Origin, PortDecl, Proto, Severity, Unit};
use crate::policy::{
    CompiledPolicy, INFRASTRUCTURE_PORTS, Mode, PolicyFile, PortSet, Selector, compile_all,
    most_specific,
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

/// The policy governing a Kubernetes container, by the agent's rule.
fn governing(policies: &[CompiledPolicy], u: &Unit) -> Option<usize> {
    let selects = |p: &CompiledPolicy| match &p.selector {
        Selector::Pods(sel) => {
            sel.matches_pod(&u.workload.namespace, &u.labels)
                && sel.container.as_ref().is_none_or(|c| *c == u.container)
        }
        _ => false,
    };
    most_specific(
        policies
            .iter()
            .enumerate()
            .filter(|&(_, p)| selects(p))
            .map(|(i, p)| (i, &p.selector)),
    )
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
    /// Governed containers and compose services that keep the `NET_RAW`
    /// the runtime grants by default (`FILE:LINE:COLUMN (who)`).
    pub keep_net_raw: Vec<String>,
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

    // Governed: a Kubernetes container with a policy, or a compose service
    // of the same service as one.
    let judged: Vec<bool> = units
        .iter()
        .enumerate()
        .map(|(i, u)| match u.origin {
            Origin::Kubernetes => owner[i].is_some(),
            _ => group_judges.contains_key(&groups[i]),
        })
        .collect();
    probes::probes(plan, policy_file, &policies, units, &owner, &mut out);
    let keep_net_raw = capabilities(units, &judged, &mut out);
    host_conflicts(units, &mut out);
    services(m, &mut out);
    mismatches(units, &groups, &mut out);

    out.sort_by(|a, b| (&a.loc, a.check).cmp(&(&b.loc, b.check)));
    Analysis {
        findings: out,
        governed,
        keep_net_raw,
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

#[cfg(test)]
mod tests;
