//! The port plan in the policy file: named `ranges:` usable in rules, and
//! `reserved:` ports (the built-in
//! infrastructure list and the file's own) are denied by the kernel to every
//! governed workload whatever its policy allows, and `check` warns about a
//! policy that allows one.

use std::process::Command;

use portguard_tests::{Agent, Cgroup, Probe, agent_bin, require_root};
use serde_json::json;

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
