//! The port plan in the policy file: named `ranges:` usable in rules, and
//! `reserved:` ports (the built-in
//! infrastructure list and the file's own) are denied by the kernel to every
//! governed workload whatever its policy allows, and `check` warns about a
//! policy that allows one. `check --manifests` holds Kubernetes manifests,
//! compose files and Dockerfiles against the plan, offline (no root, no
//! cluster, no network).

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

use portguard_tests::{Agent, Cgroup, Probe, agent_bin, require_root};
use serde_json::{Value, json};

#[test]
fn reserved_ports_are_denied_whatever_the_policy_allows() {
    require_root!();
    let api = Cgroup::new("reserved-api");
    let free = Cgroup::new("reserved-free");
    let text = format!(
        "ranges: {{app: \"3000-3099\", db: \"4000-4099\"}}\nreserved: [infrastructure, 7000, db]\npolicies:\n  - {{name: api, cgroup: {}, bind: [{{ports: [8080, app, 7000, 10250, 4001]}}]}}\n  - {{name: free, cgroup: {}, connect: [{{ports: [443]}}]}}\n",
        api.rel, free.rel
    );
    // `check` accepts the file and warns about `api`, with line and ports.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("plan.yaml");
    std::fs::write(&file, &text).unwrap();
    let out = Command::new(agent_bin())
        .arg("check")
        .arg(&file)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{report}");
    assert!(
        report.contains(
            ":4:1: warning: policies[0].bind: policy `api` allows reserved port(s) 4001, 7000, 10250"
        ),
        "{report}"
    );
    assert!(!report.contains("`free` allows"), "{report}");

    let agent = Agent::start(&text);
    let p = Probe::in_cgroup(&api);
    p.run(&["bind", "tcp", "127.0.0.1", "8080"]).assert_ok();
    // A named range (`app`) in a rule.
    p.run(&["bind", "tcp", "127.0.0.1", "3050"]).assert_ok();
    p.run(&["bind", "tcp", "127.0.0.1", "3100"]).assert_eperm();
    // A reserved named range (`db`), though the rule lists 4001.
    p.run(&["bind", "tcp", "127.0.0.1", "4001"]).assert_eperm();
    // Allowed by the policy, reserved by the plan: denied, over IPv4, IPv6,
    // TCP and UDP, and from a forked child.
    p.run(&["bind", "tcp", "127.0.0.1", "7000"]).assert_eperm();
    p.run(&["bind", "udp", "::", "10250", "v6only"])
        .assert_eperm();
    p.clone()
        .fork()
        .run(&["bind", "tcp", "0.0.0.0", "10250"])
        .assert_eperm();
    let e = agent.wait_event(&[("port", json!(7000)), ("verdict", json!("deny"))]);
    assert_eq!(e["policy"], json!("api"));
    assert_eq!(e["rule"], json!("reserved"), "{e}");
    // A policy without `bind:` may bind anything but the reserved ports.
    let q = Probe::in_cgroup(&free);
    q.run(&["bind", "tcp", "127.0.0.1", "9999"]).assert_ok();
    q.run(&["bind", "tcp", "127.0.0.1", "22"]).assert_eperm();
    q.run(&["bind", "udp", "127.0.0.1", "6443"]).assert_eperm();
    // Ungoverned processes are not affected.
    Probe::outside()
        .run(&["bind", "tcp", "127.0.0.1", "7000"])
        .assert_ok();
    let errors = portguard_tests::schema_errors(&[e]);
    assert!(errors.is_empty(), "{errors:?}");
}

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// The CI command of docs/manifests.md, run in a fixture directory.
const CHECK_PLAN: [&str; 6] = [
    "check",
    "--policy",
    "policy.yaml",
    "--manifests",
    "k8s/",
    "compose.yaml",
];

/// `portguard check --policy policy.yaml --manifests k8s/ compose.yaml
/// ARGS`, run in `dir` as a CI job would: exit code and standard output.
fn check_plan(dir: &Path, args: &[&str]) -> (i32, String) {
    let out = Command::new(agent_bin())
        .current_dir(dir)
        .args(CHECK_PLAN)
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), stdout)
}

/// (rule, file, line) of every finding the fixture plants: a `planted:
/// RULE` comment on the line, or `planted (next line): RULE` above it.
fn planted(dir: &Path) -> BTreeSet<(String, String, usize)> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeSet<(String, String, usize)>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
                continue;
            }
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            for (i, line) in std::fs::read_to_string(&p).unwrap().lines().enumerate() {
                for (marker, shift) in [("planted: ", 1), ("planted (next line): ", 2)] {
                    if let Some((_, rest)) = line.split_once(marker) {
                        let rule = rest.split_whitespace().next().unwrap().to_owned();
                        out.insert((rule, rel.clone(), i + shift));
                    }
                }
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(dir, dir, &mut out);
    out
}

fn findings(doc: &Value) -> BTreeSet<(String, String, usize)> {
    doc["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["rule"].as_str().unwrap().to_owned(),
                f["file"].as_str().unwrap().to_owned(),
                f["line"].as_u64().unwrap() as usize,
            )
        })
        .collect()
}

#[test]
fn check_reports_each_planted_error_at_its_file_and_line() {
    let dir = fixture("fixtures/plan-broken");
    let want = planted(&dir);
    let kinds: BTreeSet<&str> = want.iter().map(|(r, _, _)| r.as_str()).collect();
    assert_eq!(
        kinds,
        BTreeSet::from([
            "host-port-conflict",
            "port-mismatch",
            "port-not-allowed",
            "reserved-port",
            "target-port-unmatched"
        ]),
        "the fixture plants one of each kind: {want:?}"
    );
    // The files are of every kind the issue names.
    let files: BTreeSet<&str> = want.iter().map(|(_, f, _)| f.as_str()).collect();
    assert!(files.contains("api/Dockerfile") && files.contains("k8s/db.yaml"));

    // JSON: exactly the planted findings, all errors, exit 1.
    let (code, out) = check_plan(&dir, &["--format", "json"]);
    let doc: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(code, 1, "{out}");
    assert_eq!(findings(&doc), want, "{out}");
    assert_eq!(doc["errors"], json!(want.len()), "{out}");
    assert_eq!(doc["ok"], json!(false));
    let by_rule = |rule: &str| {
        doc["findings"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["rule"] == json!(rule))
            .unwrap()
            .clone()
    };
    // The sidecar is judged by its own policy, which keeps 9901 on loopback.
    let f = by_rule("port-not-allowed");
    let msg = f["message"].as_str().unwrap();
    assert!(
        msg.contains("`envoy`")
            && msg.contains("shop-api-proxy")
            && msg.contains("only on loopback"),
        "{msg}"
    );
    assert_eq!(f["related"][0]["file"], json!("policy.yaml"));
    let msg = by_rule("reserved-port")["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        msg.contains("9100") && msg.contains("node exporter"),
        "{msg}"
    );
    let msg = by_rule("port-mismatch")["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        msg.contains("9091") && msg.contains("compose declares tcp 3000, 9090"),
        "{msg}"
    );

    // Human: FILE:LINE:COLUMN: error: ... [rule], one line per finding.
    let (code, out) = check_plan(&dir, &[]);
    assert_eq!(code, 1, "{out}");
    for (rule, file, line) in &want {
        let prefix = format!("{file}:{line}:");
        assert!(
            out.lines().any(|l| l.starts_with(&prefix)
                && l.contains(": error: ")
                && l.ends_with(&format!("[{rule}]"))),
            "no `{prefix} ... error ... [{rule}]` in:\n{out}"
        );
    }
    assert!(
        out.contains(&format!("{} errors, 0 warnings", want.len())),
        "{out}"
    );

    // --warn-only: the same report, exit 0.
    let (code, out) = check_plan(&dir, &["--format", "json", "--warn-only"]);
    assert_eq!(code, 0, "{out}");
    let doc: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(findings(&doc), want);

    // SARIF: valid against the SARIF 2.1.0 schema, one result per finding,
    // relative URIs (as code scanning resolves them against the checkout).
    let (code, out) = check_plan(&dir, &["--format", "sarif"]);
    assert_eq!(code, 1, "{out}");
    let sarif: Value = serde_json::from_str(&out).unwrap();
    let errors = portguard_tests::json_schema_errors(
        &fixture("fixtures/sarif-schema-2.1.0.json"),
        std::slice::from_ref(&sarif),
    );
    assert!(errors.is_empty(), "{errors:#?}");
    assert_eq!(sarif["version"], json!("2.1.0"));
    let run = &sarif["runs"][0];
    assert_eq!(run["tool"]["driver"]["name"], json!("portguard"));
    let rules: Vec<&str> = run["tool"]["driver"]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    let got: BTreeSet<(String, String, usize)> = run["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let rule = r["ruleId"].as_str().unwrap().to_owned();
            assert_eq!(rules[r["ruleIndex"].as_u64().unwrap() as usize], rule);
            assert_eq!(r["level"], json!("error"));
            let loc = &r["locations"][0]["physicalLocation"];
            (
                rule,
                loc["artifactLocation"]["uri"].as_str().unwrap().to_owned(),
                loc["region"]["startLine"].as_u64().unwrap() as usize,
            )
        })
        .collect();
    assert_eq!(got, want);
}

#[test]
fn check_finds_nothing_in_the_clean_plan() {
    let dir = fixture("../examples/plan");
    assert!(planted(&dir).is_empty());
    let (code, out) = check_plan(&dir, &["--format", "json"]);
    assert_eq!(code, 0, "{out}");
    let doc: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(doc["findings"], json!([]), "{out}");
    // Everything was read and matched: five containers (a sidecar among
    // them) each governed by a policy, both Services, both compose services
    // and the Dockerfile compose builds.
    let s = &doc["summary"];
    assert_eq!(
        (
            &s["files"],
            &s["containers"],
            &s["governed_containers"],
            &s["services"],
            &s["compose_services"],
            &s["dockerfiles"]
        ),
        (
            &json!(5),
            &json!(5),
            &json!(5),
            &json!(2),
            &json!(2),
            &json!(1)
        ),
        "{out}"
    );
    let (code, out) = check_plan(&dir, &["--format", "sarif"]);
    assert_eq!(code, 0, "{out}");
    let sarif: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(sarif["runs"][0]["results"], json!([]));
    let (code, out) = check_plan(&dir, &[]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("manifests: ok: 5 files"), "{out}");
}

#[test]
fn check_needs_no_network_and_no_cluster() {
    require_root!();
    // In a network namespace of its own (only a down loopback), with no
    // kubeconfig and no home: the same report as anywhere else.
    let dir = fixture("fixtures/plan-broken");
    let (_, expected) = check_plan(&dir, &["--format", "json"]);
    let out = Command::new("unshare")
        .arg("--net")
        .arg("--")
        .arg(agent_bin())
        .current_dir(&dir)
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .env("HOME", "/nonexistent")
        .args(CHECK_PLAN)
        .args(["--format", "json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();
    let want: Value = serde_json::from_str(&expected).unwrap();
    assert_eq!(findings(&got), findings(&want));
    assert_eq!(findings(&got).len(), planted(&dir).len());
}
