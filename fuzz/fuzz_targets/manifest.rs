//! Fuzz what `portguard check --manifests` does with a file from a pull
//! request: the YAML stream parser, the Kubernetes and compose readers, the
//! Dockerfile reader, and the analysis against a port plan.
//!
//! Input: the first byte picks how the rest is read (even: a YAML manifest,
//! odd: a Dockerfile). Properties checked, besides "no panic, no hang":
//! every finding points at a line the input has (never past its last),
//! every port range read is well formed, and the probe checks
//! (`probe-port-not-allowed`, `probe-port-undeclared`) point at a probe's
//! own port, only a Kubernetes container has probes, and a probe is called
//! not allowed only in a container some policy governs.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use portguard::{
    manifest::{Check, Origin, Target, analyze::analyze, read_text},
    policy::parse_policy_str,
};

const PLAN: &str = "ranges: {app: \"3000-3999\"}\nreserved: [infrastructure, 7000]\npolicies:\n  - {name: api, pods: {namespace: shop, labels: {app: api}, container: api}, bind: [{ports: [app]}, {ports: [9901], address: loopback}]}\n  - {name: pods, pods: {namespace: \"s*\"}, bind: [{ports: [8080], protocol: udp}], allow_sockets: [sctp]}\n  - {name: audit, mode: audit, pods: {labels: {app: db}}, bind: []}\n";

/// A 1-based line of an input of `lines` lines.
fn f_line_ok(line: usize, lines: usize) -> bool {
    (1..=lines).contains(&line)
}

fuzz_target!(|data: &[u8]| {
    let Some((&kind, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    let name = if kind % 2 == 0 {
        "k8s.yaml"
    } else {
        "Dockerfile"
    };
    let m = read_text(Path::new(name), &text, "shop");
    let plan = parse_policy_str(PLAN).expect("the plan parses");
    let a = analyze(&plan, "policy.yaml", &m);
    // The lines the file has, as an editor shows them: YAML ends a line at
    // CR, LF or CRLF, a Dockerfile at LF (or CRLF). An empty file has one.
    let lines = if kind % 2 == 0 {
        let breaks = text.replace("\r\n", "\n").matches(['\r', '\n']).count();
        breaks + usize::from(!text.ends_with(['\r', '\n']))
    } else {
        text.lines().count()
    }
    .max(1);
    for f in m.findings.iter().chain(&a.findings) {
        if f.loc.file == name {
            assert!(
                (1..=lines).contains(&f.loc.line) && f.loc.column >= 1,
                "{f:?} is outside the {lines}-line input"
            );
        }
        assert!(!f.message.is_empty());
    }
    for f in &a.findings {
        if matches!(
            f.check,
            Check::ProbePortNotAllowed | Check::ProbePortUndeclared
        ) {
            let probe = m
                .units
                .iter()
                .flat_map(|u| u.probes.iter().map(move |p| (u, p)))
                .find(|(_, p)| p.loc == f.loc);
            let Some((u, p)) = probe else {
                panic!("{f:?} is at no probe");
            };
            if f.check == Check::ProbePortNotAllowed {
                assert!(p.host.is_none(), "{f:?}: the kubelet connects elsewhere");
                assert!(
                    f.related
                        .iter()
                        .any(|(_, note)| note.starts_with("policy `")),
                    "{f:?} names no governing policy ({})",
                    u.describe()
                );
            }
            if let Target::Name(name) = &p.port
                && f.check == Check::ProbePortUndeclared
            {
                assert!(
                    u.ports
                        .iter()
                        .all(|d| d.name.as_deref() != Some(name.as_str())),
                    "{f:?}: `{name}` is declared"
                );
            }
        }
    }
    for u in &m.units {
        assert!(
            u.probes.is_empty() || u.origin == Origin::Kubernetes,
            "{u:?}"
        );
        for p in &u.probes {
            assert!(
                f_line_ok(p.loc.line, lines),
                "{p:?} is outside the {lines}-line input"
            );
            if let Target::Number(n) = p.port {
                assert!(n >= 1, "{p:?}");
            }
        }
        for d in &u.ports {
            assert!(d.lo >= 1 && d.lo <= d.hi, "{d:?}");
            if let Some(h) = &d.host {
                assert!(h.lo >= 1 && h.lo <= h.hi, "{h:?}");
            }
        }
    }
});
