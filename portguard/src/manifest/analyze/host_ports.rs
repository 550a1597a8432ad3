//! Host ports claimed twice: a hostPort, a port of a hostNetwork pod, a
//! compose published port or a port of a `network_mode: host` service,
//! claimed by two workloads of one scope (the cluster, or one compose file).
//!
//! Owns the `host-port-conflict` check. May import the manifest model, the
//! analysis's message helpers (`super`) and port sets.

use super::describe_set;
use crate::{
    manifest::{Check, Finding, HostClaim, Origin, PortDecl, Unit},
    policy::PortSet,
};

/// Claims on one host port (same protocol, overlapping addresses) by
/// different workloads in one scope. Each claim gets a finding naming the
/// others, so whichever file changed, its line is annotated.
pub(super) fn host_conflicts(units: &[Unit], out: &mut Vec<Finding>) {
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
