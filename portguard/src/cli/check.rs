//! `portguard check`: validate a policy file without loading anything, and
//! hold deployment manifests against its port plan ([`crate::manifest`]).
//! Reports every error, plus warnings (a cgroup that does not exist yet, a
//! policy on the root cgroup). Reading /proc/mounts and stat()ing cgroup
//! directories is all it does beyond reading the files: no cluster, no
//! network.

use std::path::Path;

use crate::{
    manifest::{
        self, Check, Finding, Loc, Origin, Severity,
        analyze::analyze,
        report::{Report, Summary},
    },
    policy::{Diagnostic, PolicyError, PolicyFile, parse_policy_file},
    workload::cgroupfs::Hierarchy,
};

/// Outcome of a check.
#[derive(Debug)]
pub struct CheckReport {
    pub file: Option<PolicyFile>,
    pub errors: Vec<Diagnostic>,
    pub warnings: Vec<Diagnostic>,
}

impl CheckReport {
    pub fn ok(&self) -> bool {
        self.errors.is_empty()
    }
}

/// What `portguard check` looks at.
pub struct PlanCheck<'a> {
    pub policy: &'a Path,
    /// `--manifests` paths (files or directories); empty: the policy only.
    pub manifests: &'a [PathBuf],
    /// Namespace of Kubernetes objects that name none.
    pub namespace: &'a str,
    pub hierarchy: Option<&'a Hierarchy>,
}

/// Check the policy file and, with manifests, hold them against its port
/// plan. `Err` only when the policy file or a manifest path cannot be read.
pub fn check_plan(c: &PlanCheck<'_>) -> anyhow::Result<Report> {
    let report = check(c.policy, c.hierarchy)?;
    let file = c.policy.display().to_string();
    let to_finding = |d: &Diagnostic, kind: Check, severity: Severity| Finding {
        check: kind,
        severity,
        loc: Loc {
            file: file.clone(),
            line: d.line,
            column: d.column,
        },
        message: if d.field.is_empty() {
            d.message.clone()
        } else {
            format!("{}: {}", d.field, d.message)
        },
        related: Vec::new(),
    };
    let mut out = Report {
        summary: Summary {
            policy_file: file.clone(),
            policies: report.file.as_ref().map_or(0, |f| f.policies.len()),
            policy_valid: report.ok(),
            manifests_checked: !c.manifests.is_empty(),
            ..Summary::default()
        },
        findings: Vec::new(),
        cgroups_checked: c.hierarchy.is_some(),
    };
    out.findings.extend(
        report
            .errors
            .iter()
            .map(|d| to_finding(d, Check::PolicyInvalid, Severity::Error)),
    );
    out.findings.extend(
        report
            .warnings
            .iter()
            .map(|d| to_finding(d, Check::PolicyWarning, Severity::Warning)),
    );
    if c.manifests.is_empty() {
        return Ok(out);
    }
    let m = manifest::load(c.manifests, c.namespace)?;
    let s = &mut out.summary;
    s.files = m.files;
    s.services = m.services.len();
    let count = |o: Origin| m.units.iter().filter(|u| u.origin == o).count();
    s.containers = count(Origin::Kubernetes);
    s.compose_services = count(Origin::Compose);
    s.dockerfiles = count(Origin::Dockerfile);
    out.findings.extend(m.findings.iter().cloned());
    // Without a valid plan there is nothing to hold the manifests against;
    // problems reading them are still reported.
    if let Some(plan) = &report.file {
        let a = analyze(plan, &file, &m);
        out.summary.governed_containers = a.governed;
        out.summary.keep_net_raw = a.keep_net_raw;
        out.findings.extend(a.findings);
    }
    Ok(out)
}

/// Validate `path`. `Err` only when the file cannot be read at all.
pub fn check(path: &Path, hierarchy: Option<&Hierarchy>) -> Result<CheckReport, PolicyError> {
    let file = match parse_policy_file(path) {
        Ok(f) => f,
        Err(PolicyError::Invalid { diagnostics, .. }) => {
            return Ok(CheckReport {
                file: None,
                errors: diagnostics,
                warnings: Vec::new(),
            });
        }
        Err(e) => return Err(e),
    };
    let mut warnings = Vec::new();
    for (i, p) in file.policies.iter().enumerate() {
        // A reserved port the policy allows: the kernel denies it anyway.
        if let Some(allowed) = crate::policy::bind_ports(p) {
            let clash = allowed.intersection(&file.reserved);
            if !clash.is_empty() {
                let list: Vec<String> = clash
                    .ranges()
                    .iter()
                    .take(8)
                    .map(|&(a, b)| {
                        if a == b {
                            a.to_string()
                        } else {
                            format!("{a}-{b}")
                        }
                    })
                    .collect();
                warnings.push(Diagnostic {
                    line: p.line,
                    column: 1,
                    field: format!("policies[{i}].bind"),
                    message: format!(
                        "policy `{}` allows reserved port(s) {}: the kernel denies them to every \
                         governed workload (see `reserved:`)",
                        p.name,
                        list.join(", ")
                    ),
                });
            }
        }
        let field = format!("policies[{i}].cgroup");
        let Some(cgroup) = p.selector.cgroup_path() else {
            continue;
        };
        if cgroup == "/" {
            warnings.push(Diagnostic {
                line: p.line,
                column: 1,
                field: field.clone(),
                message: format!(
                    "policy `{}` is on the root cgroup: it governs every process on the host that \
                     no deeper policy covers, including system services",
                    p.name
                ),
            });
        }
        if let Some(h) = hierarchy {
            match h.resolve(cgroup) {
                Ok(Some(_)) => {}
                Ok(None) => warnings.push(Diagnostic {
                    line: p.line,
                    column: 1,
                    field,
                    message: format!(
                        "cgroup {} does not exist (yet) under {}; policy `{}` will govern it as \
                         soon as it appears",
                        cgroup,
                        h.root().display(),
                        p.name
                    ),
                }),
                Err(e) => warnings.push(Diagnostic {
                    line: p.line,
                    column: 1,
                    field,
                    message: e.to_string(),
                }),
            }
        }
    }
    Ok(CheckReport {
        file: Some(file),
        errors: Vec::new(),
        warnings,
    })
}

// The verb: its arguments (the `--help` text) and what it does.

use std::{path::PathBuf, process::ExitCode};

use clap::Args;

/// Validate a policy file, and check deployment manifests against its port
/// plan, without loading anything into the kernel.
///
/// Prints every policy error as FILE:LINE:COLUMN: error: FIELD: MESSAGE, and
/// warnings (for example a cgroup that does not exist yet, which is governed
/// as soon as it appears, or a policy that allows a reserved port).
///
/// With --manifests, reads Kubernetes YAML (Pods, Deployments, StatefulSets,
/// DaemonSets, ReplicaSets, Jobs, CronJobs and Services), docker-compose
/// files and Dockerfiles (files, or directories searched for *.yaml, *.yml,
/// *.json, Dockerfile*, *.Dockerfile, Containerfile), matches each container
/// to its policy by the agent's `pods:` selectors, and reports, each with
/// file and line:
///
///   port-not-allowed       a declared port the governing policy does not
///                          allow (or allows on loopback only)
///   host-port-conflict     a hostPort, hostNetwork or published port
///                          claimed by two workloads
///   reserved-port          a declared port in the plan's `reserved:` ports
///   target-port-unmatched  a Service targetPort no selected container
///                          declares
///   port-mismatch          one service, different ports in its Dockerfile,
///                          compose file and Kubernetes manifests
///   net-capability         (warning) a governed container adds NET_RAW or
///                          NET_ADMIN, or is privileged: it can answer on
///                          ports around portguard (drop them)
///   probe-port-not-allowed a liveness, readiness or startup probe (httpGet,
///                          tcpSocket, grpc) on a port the container's
///                          policy does not allow on the pod's address
///                          (loopback only counts as not allowed): the
///                          kubelet's probe fails
///   probe-port-undeclared  (warning) a probe on a port the container does
///                          not declare; an error for a port name it does
///                          not declare (the kubelet cannot resolve it)
///
/// plus manifest-invalid, manifest-unresolved (a ${VAR} without a default)
/// and service-selects-nothing; and a note counting the governed containers
/// that keep the NET_RAW containerd and Docker grant by default. No cluster
/// or network is needed.
///
/// Exits 0 when there is no error (warnings allowed), 1 otherwise; with
/// --warn-only, manifest findings never fail the run (an invalid policy file
/// still does).
#[derive(Debug, Args)]
#[command(verbatim_doc_comment)]
pub struct CheckArgs {
    /// Policy file (YAML) to validate; or give it with --policy.
    #[arg(
        value_name = "FILE",
        required_unless_present = "policy",
        conflicts_with = "policy"
    )]
    pub file: Option<PathBuf>,
    /// Policy file (YAML): the port plan to hold the manifests against.
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,
    /// Kubernetes manifests, compose files, Dockerfiles, or directories of
    /// them.
    #[arg(long, value_name = "PATH", num_args = 1..)]
    pub manifests: Vec<PathBuf>,
    /// Namespace of Kubernetes objects whose metadata names none (as
    /// `kubectl apply -n`).
    #[arg(long, value_name = "NS", default_value = "default")]
    pub namespace: String,
    /// Output: `human` (FILE:LINE:COLUMN lines), `json`, or `sarif` (SARIF
    /// 2.1.0, for GitHub code scanning and other code-scanning UIs).
    #[arg(long, value_enum, default_value_t = CheckFormat::Human)]
    pub format: CheckFormat,
    /// Report manifest findings but exit 0 (a first rollout). An invalid
    /// policy file still exits 1.
    #[arg(long)]
    pub warn_only: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum CheckFormat {
    Human,
    Json,
    Sarif,
}

/// Carry out the verb.
pub fn execute(a: CheckArgs) -> anyhow::Result<ExitCode> {
    let hierarchy = Hierarchy::discover().ok();
    let policy =
        a.policy.as_ref().or(a.file.as_ref()).ok_or_else(|| {
            anyhow::anyhow!("check: give the policy file (FILE or --policy FILE)")
        })?;
    let report = check_plan(&PlanCheck {
        policy,
        manifests: &a.manifests,
        namespace: &a.namespace,
        hierarchy: hierarchy.as_ref(),
    })?;
    use crate::manifest::report;
    print!(
        "{}",
        match a.format {
            CheckFormat::Human => report::human(&report),
            CheckFormat::Json => report::json(&report),
            CheckFormat::Sarif => report::sarif(&report),
        }
    );
    let failed = !report.summary.policy_valid || (report.errors() > 0 && !a.warn_only);
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    #[test]
    fn warns_about_missing_cgroups_and_root() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("present")).unwrap();
        let policy = dir.path().join("p.yaml");
        std::fs::write(
            &policy,
            "policies:\n  - {name: a, cgroup: /present, bind: []}\n  - {name: b, cgroup: /absent, bind: []}\n  - {name: c, cgroup: /, connect: []}\n",
        )
        .unwrap();
        let h = Hierarchy::new(dir.path().to_owned());
        let r = check(&policy, Some(&h)).unwrap();
        assert!(r.ok());
        assert_eq!(r.warnings.len(), 2, "{:#?}", r.warnings);
        assert_eq!(r.warnings[0].line, 3);
        assert!(r.warnings[0].message.contains("/absent does not exist"));
        assert!(r.warnings[1].message.contains("root cgroup"));
    }

    #[test]
    fn errors_are_returned_not_thrown() {
        let dir = tempfile::tempdir().unwrap();
        let policy = dir.path().join("p.yaml");
        std::fs::write(&policy, "policies:\n  - {name: a}\n").unwrap();
        let r = check(&policy, None).unwrap();
        assert!(!r.ok());
        assert!(check(&PathBuf::from("/nonexistent/p.yaml"), None).is_err());
    }
}
