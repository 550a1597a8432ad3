//! `check --manifests` and Kubernetes health probes: a liveness, readiness
//! or startup probe (`httpGet`, `tcpSocket`, `grpc`; port by number or by
//! name) on a port the container's policy does not allow on the pod's
//! address (`probe-port-not-allowed`), or one it does not declare
//! (`probe-port-undeclared`; an error for an unknown name). Each finding
//! is planted in tests/fixtures/plan-probes as `planted: RULE...` on its
//! line, and must come out at that line in JSON, text and SARIF. Offline:
//! no root, no cluster, no network.

use std::{collections::BTreeSet, path::Path, process::Command};

use portguard_tests::agent_bin;
use serde_json::{Value, json};

fn fixture() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/plan-probes")
}

fn check(args: &[&str]) -> (i32, String) {
    let out = Command::new(agent_bin())
        .current_dir(fixture())
        .args(["check", "--policy", "policy.yaml", "--manifests", "k8s/"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// (rule, line) of every planted finding: each word after `planted:` that
/// names a rule (words in parentheses are notes).
fn planted() -> BTreeSet<(String, usize)> {
    let text = std::fs::read_to_string(fixture().join("k8s/probes.yaml")).unwrap();
    let mut out = BTreeSet::new();
    for (i, line) in text.lines().enumerate() {
        if let Some((_, rest)) = line.split_once("planted: ") {
            let rest = rest.split('(').next().unwrap();
            for rule in rest.split_whitespace() {
                out.insert((rule.to_owned(), i + 1));
            }
        }
    }
    out
}

#[test]
fn probes_on_forbidden_or_undeclared_ports_are_found_on_their_own_lines() {
    let want = planted();
    assert_eq!(want.len(), 11, "{want:?}");
    let (code, out) = check(&["--format", "json"]);
    assert_eq!(code, 1, "{out}");
    let doc: Value = serde_json::from_str(&out).unwrap();
    let got: BTreeSet<(String, usize)> = doc["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            assert_eq!(f["file"], json!("k8s/probes.yaml"), "{f}");
            (
                f["rule"].as_str().unwrap().to_owned(),
                f["line"].as_u64().unwrap() as usize,
            )
        })
        .collect();
    assert_eq!(got, want, "{out}");
    let find = |rule: &str, line: usize| {
        doc["findings"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["rule"] == json!(rule) && f["line"] == json!(line))
            .unwrap()
            .clone()
    };
    // Loopback only is not allowed: the kubelet connects to the pod's IP.
    let admin = find("probe-port-not-allowed", 21);
    assert_eq!(admin["severity"], json!("error"));
    let msg = admin["message"].as_str().unwrap();
    assert!(
        msg.contains("readinessProbe (httpGet)")
            && msg.contains("9901/tcp")
            && msg.contains("only on loopback"),
        "{msg}"
    );
    assert_eq!(admin["related"][0]["file"], json!("policy.yaml"));
    // A number not declared: a warning; a name not declared: an error.
    assert_eq!(
        find("probe-port-undeclared", 30)["severity"],
        json!("warning")
    );
    let status = find("probe-port-undeclared", 33);
    assert_eq!(status["severity"], json!("error"));
    assert!(
        status["message"]
            .as_str()
            .unwrap()
            .contains("cannot resolve"),
        "{status}"
    );
    assert!(
        find("probe-port-not-allowed", 58)["message"]
            .as_str()
            .unwrap()
            .contains("reserved"),
        "reserved ports are denied whatever the policy says"
    );

    // Text: FILE:LINE:COLUMN: SEVERITY: ... [rule], on the probe's line.
    let (code, text) = check(&[]);
    assert_eq!(code, 1, "{text}");
    for (rule, line) in &want {
        let prefix = format!("k8s/probes.yaml:{line}:");
        assert!(
            text.lines()
                .any(|l| l.starts_with(&prefix) && l.ends_with(&format!("[{rule}]"))),
            "no `{prefix} ... [{rule}]` in:\n{text}"
        );
    }

    // SARIF: both rules described, each result at its line.
    let (_, sarif) = check(&["--format", "sarif"]);
    let sarif: Value = serde_json::from_str(&sarif).unwrap();
    let run = &sarif["runs"][0];
    let rules: Vec<&str> = run["tool"]["driver"]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert!(rules.contains(&"probe-port-not-allowed") && rules.contains(&"probe-port-undeclared"));
    let results: BTreeSet<(String, usize)> = run["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["ruleId"].as_str().unwrap().to_owned(),
                r["locations"][0]["physicalLocation"]["region"]["startLine"]
                    .as_u64()
                    .unwrap() as usize,
            )
        })
        .collect();
    assert_eq!(results, want);
}
