//! Kubernetes Services against the pods they select: a Service whose
//! selector matches no workload, and a Service port whose target no
//! selected container declares.
//!
//! Owns the `target-port-unmatched` and `service-selects-nothing` checks.
//! May import the manifest model only.

use crate::manifest::{Check, Finding, Manifests, Origin, PortDecl, Target, Unit};

/// Each Service port must reach a declared container port of a selected pod.
pub(super) fn services(m: &Manifests, out: &mut Vec<Finding>) {
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
