//! `portguard check`: validate a policy file without loading anything.
//! Reports every error, plus warnings (a cgroup that does not exist yet, a
//! policy on the root cgroup). Reading /proc/mounts and stat()ing cgroup
//! directories is all it does beyond reading the file.

use std::path::Path;

use crate::{
    cgroupfs::Hierarchy,
    policy::{Diagnostic, PolicyError, PolicyFile, parse_policy_file},
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
