//! Health probes on ports the plan forbids. The kubelet sends liveness,
//! readiness and startup probes (`httpGet`, `tcpSocket`, `grpc`) to the
//! pod's IP, so the container must be allowed to bind the probe's port on
//! a non-loopback address: a port its policy does not allow (or allows on
//! loopback only, or the plan reserves) makes the probe fail, and the pod
//! never becomes ready or is restarted. A probe's port should also be one
//! the container declares; a port *name* it does not declare cannot be
//! resolved at all.
//!
//! Owns `probe-port-not-allowed` and `probe-port-undeclared`. Judged by
//! [`super::refusal`], the check `port-not-allowed` uses.

use super::{Check, Finding, Loc, PortDecl, Proto, Severity, Unit, refusal};
use crate::{
    manifest::Target,
    policy::{CompiledPolicy, Mode, PolicyFile},
};

/// Findings about the probes of `units` (`owner`: each unit's governing
/// policy, an index into `policies`).
pub(super) fn probes(
    plan: &PolicyFile,
    policy_file: &str,
    policies: &[CompiledPolicy],
    units: &[Unit],
    owner: &[Option<usize>],
    out: &mut Vec<Finding>,
) {
    for (i, u) in units.iter().enumerate() {
        for pr in &u.probes {
            let what = format!("The {} ({}) of {}", pr.kind, pr.handler, u.describe());
            let port = match &pr.port {
                Target::Number(n) => {
                    let declared = u
                        .ports
                        .iter()
                        .any(|d| d.proto == Proto::Tcp && d.lo <= *n && *n <= d.hi);
                    if !declared {
                        out.push(Finding::new(
                            Check::ProbePortUndeclared,
                            pr.loc.clone(),
                            format!(
                                "{what} targets port {n}, which the container does not declare \
                                 (`ports:`): declare it, so that Services, `check` and readers \
                                 see what it listens on"
                            ),
                        ));
                    }
                    *n
                }
                Target::Name(name) => {
                    match u.ports.iter().find(|d| d.name.as_deref() == Some(name)) {
                        Some(d) => d.lo,
                        None => {
                            let mut f = Finding::new(
                                Check::ProbePortUndeclared,
                                pr.loc.clone(),
                                format!(
                                    "{what} names port `{name}`, which the container does not \
                                     declare: the kubelet cannot resolve it, and the probe fails"
                                ),
                            );
                            f.severity = Severity::Error;
                            out.push(f);
                            continue;
                        }
                    }
                }
            };
            // The kubelet connects to another host than the pod: not the
            // container's bind.
            if pr.host.is_some() {
                continue;
            }
            let Some(p) = owner[i] else {
                continue;
            };
            let policy = &policies[p];
            let why = if plan.reserved.contains(port) {
                Some(format!(
                    "port {port} is in the plan's `reserved:` ports, which the kernel denies to \
                     every governed workload"
                ))
            } else {
                refusal(
                    policy,
                    &PortDecl {
                        lo: port,
                        hi: port,
                        proto: Proto::Tcp,
                        name: None,
                        loc: pr.loc.clone(),
                        host: None,
                    },
                )
            };
            let Some(why) = why else {
                continue;
            };
            let mut f = Finding::new(
                Check::ProbePortNotAllowed,
                pr.loc.clone(),
                format!(
                    "{what} connects to the pod's address on port {port}/tcp, which policy `{}` \
                     does not let the container bind there: {why}; the kubelet's probe fails",
                    policy.name
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
