//! `portguard replay` on a log a real agent wrote: real binds, connects and
//! a socket held from before the agent started, recorded under a policy
//! file with an audit-mode policy (so what it allows is recorded too), an
//! enforcing one, and one on a child cgroup's parent; then a candidate file
//! that flips known decisions, with the exact table and JSON expected.

use portguard_tests::{Agent, Cgroup, Probe, agent_bin, require_root};
use serde_json::{Value, json};

/// Replace the test's cgroup paths and files with fixed names.
fn fixed(text: &str, names: &[(&str, &str)]) -> String {
    names
        .iter()
        .fold(text.to_owned(), |t, (from, to)| t.replace(from, to))
}

/// The JSON report without what differs between runs (times).
fn without_times(mut v: Value) -> Value {
    for w in v["workloads"].as_array_mut().unwrap() {
        for c in w["changes"].as_array_mut().unwrap() {
            let c = c.as_object_mut().unwrap();
            assert!(c.remove("first_seen").unwrap().is_string());
            assert!(c.remove("last_seen").unwrap().is_string());
        }
    }
    v
}

#[test]
fn replay_shows_what_a_candidate_flips_in_a_real_agents_log() {
    require_root!();
    let web = Cgroup::new("replay-web");
    let worker = web.child("worker");
    let db = Cgroup::new("replay-db");
    let batch = Cgroup::new("replay-batch");
    // Bound before the agent starts: only the inventory sees it.
    let (held, _held) = Probe::in_cgroup(&batch).hold(&["hold", "tcp", "0.0.0.0", "29000"]);
    held.assert_ok();
    let current = format!(
        "policies:
  - name: web
    cgroup: {web}
    mode: audit
    bind: []
    connect: []
  - name: db
    cgroup: {db}
    bind: [{{ports: [5432], protocol: tcp}}]
    connect: []
  - name: batch
    cgroup: {batch}
    mode: audit
    bind: []
",
        web = web.rel,
        db = db.rel,
        batch = batch.rel
    );
    let agent = Agent::start(&current);
    agent.wait_event(&[("verdict", json!("preexisting")), ("port", json!(29000))]);

    // web: audit mode, nothing denied, every bind and connect recorded.
    let p = Probe::in_cgroup(&web);
    p.run(&["bind", "tcp", "0.0.0.0", "8080"]).assert_ok();
    p.run(&["bind", "tcp", "0.0.0.0", "8081"]).assert_ok();
    p.run(&["bind", "tcp", "0.0.0.0", "8081"]).assert_ok();
    p.run(&["bind", "udp", "127.0.0.1", "5353"]).assert_ok();
    let r = p.run(&["connect", "tcp", "127.0.0.1", "5432"]);
    assert_eq!(r.errno, libc::ECONNREFUSED, "audited, not denied");
    // web/worker: governed by web (its parent).
    Probe::in_cgroup(&worker)
        .run(&["bind", "tcp", "0.0.0.0", "8080"])
        .assert_ok();
    // db: enforced.
    let d = Probe::in_cgroup(&db);
    d.run(&["bind", "tcp", "0.0.0.0", "6000"]).assert_eperm();
    d.run(&["bind", "tcp", "0.0.0.0", "7000"]).assert_eperm();
    d.run(&["connect", "tcp", "127.0.0.1", "443"])
        .assert_eperm();
    let last = agent.wait_event(&[("hook", json!("connect4")), ("port", json!(443))]);
    assert_eq!(last["verdict"], "deny");
    for (cg, n) in [(&web, 5), (&worker, 1), (&db, 3)] {
        let lines = agent.events_matching(&[("cgroup", json!(cg.rel))], std::time::Duration::ZERO);
        assert_eq!(lines.len(), n, "{} recorded {lines:#?}", cg.rel);
    }

    let dir = tempfile::tempdir().unwrap();
    let candidate = dir.path().join("candidate.yaml");
    std::fs::write(
        &candidate,
        format!(
            "reserved: [8081]
policies:
  - name: web
    cgroup: {web}
    bind: [{{ports: [8080, 8081], protocol: tcp}}, {{ports: [5353], protocol: udp, address: loopback}}]
    connect: [{{ports: [5432], address: loopback}}]
  - name: worker
    cgroup: {web}/worker
    bind: []
  - name: db
    cgroup: {db}
    bind: [{{ports: [5432, 6000], protocol: tcp}}, {{ports: [7000], address: loopback}}]
    connect: []
",
            web = web.rel,
            db = db.rel
        ),
    )
    .unwrap();
    let names = [
        (web.rel.as_str(), "/WEB"),
        (db.rel.as_str(), "/DB"),
        (batch.rel.as_str(), "/BATCH"),
    ];
    let run = |extra: &[&str]| {
        let out = std::process::Command::new(agent_bin())
            .arg("replay")
            .arg("--current")
            .arg(&agent.policy)
            .arg("--policy")
            .arg(&candidate)
            .args(extra)
            .arg(&agent.log)
            .output()
            .unwrap();
        let text = fixed(&String::from_utf8_lossy(&out.stdout), &names)
            .replace(&agent.policy.display().to_string(), "current.yaml")
            .replace(&candidate.display().to_string(), "candidate.yaml");
        (
            out.status.code(),
            text,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    let (code, table, stderr) = run(&[]);
    eprintln!("{table}");
    assert_eq!(code, Some(0), "no --fail-on: {stderr}");
    let want = "\
portguard replay: 10 decisions (10 event lines) from 4 workloads
  current:   current.yaml
  candidate: candidate.yaml

/BATCH
  policy: batch -> (none) (no-longer-governed)
  CHANGE         COUNT  HOOK       PROTO  ADDRESS:PORT   WAS           NOW    RECORDED
  newly-allowed  1      inventory  tcp    0.0.0.0:29000  audit bind[]  allow  preexisting

/DB
  policy: db (unchanged)
  CHANGE         COUNT  HOOK   PROTO  ADDRESS:PORT  WAS        NOW                   RECORDED
  newly-allowed  1      bind4  tcp    0.0.0.0:6000  deny bind  allow                 deny
  rule-changed   1      bind4  tcp    0.0.0.0:7000  deny bind  deny bind[1].address  deny

/WEB
  policy: web (unchanged)
  CHANGE         COUNT  HOOK      PROTO  ADDRESS:PORT    WAS              NOW            RECORDED
  newly-denied   2      bind4     tcp    0.0.0.0:8081    audit bind[]     deny reserved  audit
  newly-allowed  1      bind4     tcp    0.0.0.0:8080    audit bind[]     allow          audit
  newly-allowed  1      bind4     udp    127.0.0.1:5353  audit bind[]     allow          audit
  newly-allowed  1      connect4  tcp    127.0.0.1:5432  audit connect[]  allow          audit

/WEB/worker
  policy: web -> worker (policy-changed)
  CHANGE        COUNT  HOOK   PROTO  ADDRESS:PORT  WAS           NOW          RECORDED
  newly-denied  1      bind4  tcp    0.0.0.0:8080  audit bind[]  deny bind[]  audit

summary:
  CHANGE              DECISIONS  WORKLOADS
  newly-denied        3          2
  newly-allowed       5          3
  newly-audited       0          0
  rule-changed        1          1
  no-longer-governed  1          1
  newly-governed      0          0
  policy-changed      1          1
  unknown             0          0
  unchanged           1          -
";
    assert_eq!(table, want, "\n{table}");

    let (code, text, stderr) = run(&["--json", "--fail-on", "newly-denied"]);
    assert_eq!(code, Some(1), "newly-denied found: {stderr}");
    let got = without_times(serde_json::from_str(&text).unwrap());
    eprintln!("{}", serde_json::to_string_pretty(&got).unwrap());
    let want = json!({
        "candidate": "candidate.yaml",
        "current": "current.yaml",
        "decisions": 10,
        "lines": 10,
        "skipped": 0,
        "summary": {
            "newly-allowed": {
                "decisions": 5,
                "workloads": 3
            },
            "newly-audited": {
                "decisions": 0,
                "workloads": 0
            },
            "newly-denied": {
                "decisions": 3,
                "workloads": 2
            },
            "newly-governed": {
                "decisions": 0,
                "workloads": 0
            },
            "no-longer-governed": {
                "decisions": 1,
                "workloads": 1
            },
            "policy-changed": {
                "decisions": 1,
                "workloads": 1
            },
            "rule-changed": {
                "decisions": 1,
                "workloads": 1
            },
            "unknown": {
                "decisions": 0,
                "workloads": 0
            }
        },
        "unchanged": 1,
        "workloads": [
            {
                "cgroup": "/BATCH",
                "changes": [
                    {
                        "address": "0.0.0.0",
                        "change": "newly-allowed",
                        "count": 1,
                        "family": "ipv4",
                        "hook": "inventory",
                        "now": {
                            "policy": null,
                            "rule": null,
                            "verdict": "allow"
                        },
                        "port": 29000,
                        "protocol": "tcp",
                        "recorded": [
                            "preexisting"
                        ],
                        "was": {
                            "policy": "batch",
                            "rule": "bind[]",
                            "verdict": "audit"
                        }
                    }
                ],
                "decisions": 1,
                "governance": "no-longer-governed",
                "now": {
                    "policy": null
                },
                "unchanged": 0,
                "was": {
                    "at": "/BATCH",
                    "policy": "batch"
                },
                "workload": "/BATCH"
            },
            {
                "cgroup": "/DB",
                "changes": [
                    {
                        "address": "0.0.0.0",
                        "change": "newly-allowed",
                        "count": 1,
                        "family": "ipv4",
                        "hook": "bind4",
                        "now": {
                            "policy": "db",
                            "rule": null,
                            "verdict": "allow"
                        },
                        "port": 6000,
                        "protocol": "tcp",
                        "recorded": [
                            "deny"
                        ],
                        "was": {
                            "policy": "db",
                            "rule": "bind",
                            "verdict": "deny"
                        }
                    },
                    {
                        "address": "0.0.0.0",
                        "change": "rule-changed",
                        "count": 1,
                        "family": "ipv4",
                        "hook": "bind4",
                        "now": {
                            "policy": "db",
                            "rule": "bind[1].address",
                            "verdict": "deny"
                        },
                        "port": 7000,
                        "protocol": "tcp",
                        "recorded": [
                            "deny"
                        ],
                        "was": {
                            "policy": "db",
                            "rule": "bind",
                            "verdict": "deny"
                        }
                    }
                ],
                "decisions": 3,
                "now": {
                    "at": "/DB",
                    "policy": "db"
                },
                "unchanged": 1,
                "was": {
                    "at": "/DB",
                    "policy": "db"
                },
                "workload": "/DB"
            },
            {
                "cgroup": "/WEB",
                "changes": [
                    {
                        "address": "0.0.0.0",
                        "change": "newly-denied",
                        "count": 2,
                        "family": "ipv4",
                        "hook": "bind4",
                        "now": {
                            "policy": "web",
                            "rule": "reserved",
                            "verdict": "deny"
                        },
                        "port": 8081,
                        "protocol": "tcp",
                        "recorded": [
                            "audit"
                        ],
                        "was": {
                            "policy": "web",
                            "rule": "bind[]",
                            "verdict": "audit"
                        }
                    },
                    {
                        "address": "0.0.0.0",
                        "change": "newly-allowed",
                        "count": 1,
                        "family": "ipv4",
                        "hook": "bind4",
                        "now": {
                            "policy": "web",
                            "rule": null,
                            "verdict": "allow"
                        },
                        "port": 8080,
                        "protocol": "tcp",
                        "recorded": [
                            "audit"
                        ],
                        "was": {
                            "policy": "web",
                            "rule": "bind[]",
                            "verdict": "audit"
                        }
                    },
                    {
                        "address": "127.0.0.1",
                        "change": "newly-allowed",
                        "count": 1,
                        "family": "ipv4",
                        "hook": "bind4",
                        "now": {
                            "policy": "web",
                            "rule": null,
                            "verdict": "allow"
                        },
                        "port": 5353,
                        "protocol": "udp",
                        "recorded": [
                            "audit"
                        ],
                        "was": {
                            "policy": "web",
                            "rule": "bind[]",
                            "verdict": "audit"
                        }
                    },
                    {
                        "address": "127.0.0.1",
                        "change": "newly-allowed",
                        "count": 1,
                        "family": "ipv4",
                        "hook": "connect4",
                        "now": {
                            "policy": "web",
                            "rule": null,
                            "verdict": "allow"
                        },
                        "port": 5432,
                        "protocol": "tcp",
                        "recorded": [
                            "audit"
                        ],
                        "was": {
                            "policy": "web",
                            "rule": "connect[]",
                            "verdict": "audit"
                        }
                    }
                ],
                "decisions": 5,
                "now": {
                    "at": "/WEB",
                    "policy": "web"
                },
                "unchanged": 0,
                "was": {
                    "at": "/WEB",
                    "policy": "web"
                },
                "workload": "/WEB"
            },
            {
                "cgroup": "/WEB/worker",
                "changes": [
                    {
                        "address": "0.0.0.0",
                        "change": "newly-denied",
                        "count": 1,
                        "family": "ipv4",
                        "hook": "bind4",
                        "now": {
                            "policy": "worker",
                            "rule": "bind[]",
                            "verdict": "deny"
                        },
                        "port": 8080,
                        "protocol": "tcp",
                        "recorded": [
                            "audit"
                        ],
                        "was": {
                            "policy": "web",
                            "rule": "bind[]",
                            "verdict": "audit"
                        }
                    }
                ],
                "decisions": 1,
                "governance": "policy-changed",
                "now": {
                    "at": "/WEB/worker",
                    "policy": "worker"
                },
                "unchanged": 0,
                "was": {
                    "at": "/WEB",
                    "policy": "web"
                },
                "workload": "/WEB/worker"
            }
        ],
        "workloads_seen": 4
    });
    assert_eq!(got, want);

    // The exit status names only the categories asked for.
    let (code, _, _) = run(&["--fail-on", "newly-audited,unknown"]);
    assert_eq!(code, Some(0));
    let (code, _, _) = run(&["--fail-on", "any"]);
    assert_eq!(code, Some(1));
    // Trouble is 2, and says what.
    let out = std::process::Command::new(agent_bin())
        .args([
            "replay",
            "--current",
            "none",
            "--policy",
            "/nonexistent.yaml",
        ])
        .arg(&agent.log)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("/nonexistent.yaml"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
