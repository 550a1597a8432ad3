//! Fuzz what `portguard check --manifests` does with a file from a pull
//! request: the YAML stream parser, the Kubernetes and compose readers, the
//! Dockerfile reader, and the analysis against a port plan.
//!
//! Input: the first byte picks how the rest is read (even: a YAML manifest,
//! odd: a Dockerfile). Properties checked, besides "no panic, no hang":
//! every finding points at a line the input has (never past its last), and
//! every port range read is well formed.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use portguard::{
    manifest::{analyze::analyze, read_text},
    policy::parse_policy_str,
};

const PLAN: &str = "ranges: {app: \"3000-3999\"}\nreserved: [infrastructure, 7000]\npolicies:\n  - {name: api, pods: {namespace: shop, labels: {app: api}, container: api}, bind: [{ports: [app]}, {ports: [9901], address: loopback}]}\n  - {name: pods, pods: {namespace: \"s*\"}, bind: [{ports: [8080], protocol: udp}], allow_sockets: [sctp]}\n  - {name: audit, mode: audit, pods: {labels: {app: db}}, bind: []}\n";

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
    for u in &m.units {
        for d in &u.ports {
            assert!(d.lo >= 1 && d.lo <= d.hi, "{d:?}");
            if let Some(h) = &d.host {
                assert!(h.lo >= 1 && h.lo <= h.hi, "{h:?}");
            }
        }
    }
});
