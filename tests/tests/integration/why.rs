//! `portguard why`: a real agent, real cgroups and real processes. The
//! agent answers the status socket's `explain` request from its kernel
//! maps; `why` judges allowed, denied (with the exact text, the suggested
//! rule and the history), audit, reserved and ungoverned workloads, and
//! judges offline by `--policy` where no agent answers.

use portguard_tests::{Agent, Cgroup, Probe, portguard, require_root};
use serde_json::{Value, json};

fn policy(web: &Cgroup, quiet: &Cgroup) -> String {
    format!(
        "reserved: [2222]\npolicies:\n  - name: web\n    cgroup: {}\n    bind:\n      - {{ports: [8080], protocol: tcp}}\n      - {{ports: [9090], address: loopback}}\n  - name: quiet\n    cgroup: {}\n    mode: audit\n    bind: []\n",
        web.rel, quiet.rel
    )
}

#[test]
fn why_explains_what_the_running_agent_decides() {
    require_root!();
    let web = Cgroup::new("whyweb");
    let quiet = Cgroup::new("whyquiet");
    let free = Cgroup::new("whyfree");
    let agent = Agent::start(&policy(&web, &quiet));
    let sock = agent.status_socket().display().to_string();
    let file = agent.policy.display().to_string();
    // A workload that lives on, and a denial the operator saw.
    let (held, _web_proc) = Probe::in_cgroup(&web).hold(&["hold", "tcp", "127.0.0.1", "8080"]);
    held.assert_ok();
    let pid = held.pid.to_string();
    Probe::in_cgroup(&web)
        .run(&["bind", "tcp", "0.0.0.0", "8081"])
        .assert_eperm();
    let event = agent.wait_event(&[("port", json!(8081)), ("verdict", json!("deny"))]);

    // Denied: the exact answer, with the rule to add and the history.
    let (code, out, err) = portguard(&[
        "why",
        "--socket",
        &sock,
        "--pid",
        &pid,
        "bind",
        "tcp",
        "0.0.0.0:8081",
    ]);
    assert_eq!(code, 1, "{out}{err}");
    let expected = format!(
        "bind tcp 0.0.0.0:8081 by pid {pid} (cgroup {rel})\n\
         verdict: DENIED\n\
         policy:  `web` (enforce), {file} line 3; governs {rel}\n  \
         chosen: selects the cgroup itself (cgroup {rel})\n\
         rule:    no `bind:` rule of `web` allows tcp port 8081 for IPv4 (`bind`)\n\
         fix:     add to the `bind:` list of `web`, after {file} line 7:\n      \
         - {{ports: [8081], protocol: tcp, family: ipv4}}\n\
         history: last events on port 8081:\n  \
         {time} deny bind4 tcp 0.0.0.0:8081 pid {epid} (pgprobe) rule bind\n",
        rel = web.rel,
        time = event["time"].as_str().unwrap(),
        epid = event["pid"],
    );
    assert_eq!(out, expected);

    // Allowed: the rule and its line.
    let (code, out, err) = portguard(&[
        "why",
        "--socket",
        &sock,
        "--pid",
        &pid,
        "bind",
        "tcp",
        "0.0.0.0:8080",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("verdict: ALLOWED\n"), "{out}");
    assert!(
        out.contains("rule:    allowed by bind[0] (line 6: - {ports: [8080], protocol: tcp})\n"),
        "{out}"
    );
    assert!(!out.contains("fix:"), "{out}");

    // Loopback only, as JSON: what the kernel says, the rule that nearly
    // allowed it, and a fix for any address.
    let (code, out, err) = portguard(&[
        "why",
        "--socket",
        &sock,
        "--pid",
        &pid,
        "--json",
        "bind",
        "udp",
        "10.0.0.1:9090",
    ]);
    assert_eq!(code, 1, "{out}{err}");
    let doc: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(doc["verdict"], "deny");
    assert_eq!(doc["source"], "agent");
    assert_eq!(doc["rule"], "bind[1].address");
    assert_eq!(doc["rule_lines"], json!([7]));
    assert_eq!(
        doc["fix"]["rule"],
        "{ports: [9090], protocol: udp, family: ipv4}"
    );
    assert_eq!(doc["target"]["cgroup_id"], json!(web.id()));

    // Reserved: denied whatever the policy says, and no rule can help.
    let (code, out, _) = portguard(&[
        "why",
        "--socket",
        &sock,
        "--pid",
        &pid,
        "bind",
        "tcp",
        "0.0.0.0:2222",
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!(
            "reserved: port 2222 is reserved ({file} line 1): the kernel denies it"
        )),
        "{out}"
    );
    assert!(
        out.contains("fix:     none: port 2222 is in the file's `reserved:` ports"),
        "{out}"
    );

    // Audit: allowed (exit 0), with what enforce mode would do.
    let (held, _quiet_proc) = Probe::in_cgroup(&quiet).hold(&["hold", "tcp", "127.0.0.1", "8080"]);
    held.assert_ok();
    let (code, out, err) = portguard(&[
        "why",
        "--socket",
        &sock,
        "--pid",
        &held.pid.to_string(),
        "bind",
        "tcp",
        "0.0.0.0:80",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("verdict: AUDIT: allowed"), "{out}");
    assert!(
        out.contains("`bind: []` in `quiet`: every bind is denied"),
        "{out}"
    );

    // Ungoverned, and an unknown pid: lookup errors (2), said plainly.
    let (held, _free_proc) = Probe::in_cgroup(&free).hold(&["hold", "tcp", "127.0.0.1", "8080"]);
    held.assert_ok();
    let (code, out, err) = portguard(&[
        "why",
        "--socket",
        &sock,
        "--pid",
        &held.pid.to_string(),
        "bind",
        "tcp",
        "0.0.0.0:80",
    ]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        err.contains(&format!("cgroup {} is not governed", free.rel)),
        "{err}"
    );
    let (code, _, err) = portguard(&[
        "why",
        "--socket",
        &sock,
        "--pid",
        "999999999",
        "bind",
        "tcp",
        "0.0.0.0:80",
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("unknown pid 999999999"), "{err}");
}

#[test]
fn why_judges_offline_by_a_policy_file_where_no_agent_answers() {
    require_root!();
    let web = Cgroup::new("whyoff");
    let quiet = Cgroup::new("whyoffq");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.yaml");
    std::fs::write(&file, policy(&web, &quiet)).unwrap();
    let file = file.display().to_string();
    let nobody = dir.path().join("none.sock").display().to_string();
    let (code, out, err) = portguard(&[
        "why",
        "--socket",
        &nobody,
        "--policy",
        &file,
        "--cgroup",
        &web.rel,
        "bind",
        "tcp",
        "0.0.0.0:8081",
    ]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains(&format!(
            "policy:  `web` (enforce), {file} line 3; governs {} (offline: no agent asked)",
            web.rel
        )),
        "{out}"
    );
    assert!(
        out.contains("      - {ports: [8081], protocol: tcp, family: ipv4}\n"),
        "{out}"
    );
    // A child cgroup is governed by its parent's policy.
    let child = web.child("worker");
    let (code, out, _) = portguard(&[
        "why",
        "--socket",
        &nobody,
        "--policy",
        &file,
        "--cgroup",
        &child.rel,
        "--json",
        "bind",
        "tcp",
        "0.0.0.0:8080",
    ]);
    assert_eq!(code, 0, "{out}");
    let doc: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(doc["policy_cgroup"], json!(web.rel));
    let reason = doc["candidates"][0]["reason"].as_str().unwrap();
    assert!(reason.contains("nearest governed ancestor"), "{reason}");
    // Without --policy, no agent is an error that says what to do.
    let (code, _, err) = portguard(&[
        "why",
        "--socket",
        &nobody,
        "--cgroup",
        &web.rel,
        "bind",
        "tcp",
        "0.0.0.0:8081",
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("no agent answers at"), "{err}");
    assert!(err.contains("give --policy FILE"), "{err}");
}
