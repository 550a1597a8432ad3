//! `portguard learn`: watch a workload that binds two ports and connects to
//! one, write its policy, and check that the policy, enforced, allows
//! exactly that and denies the rest.

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use portguard_tests::{Agent, Cgroup, Probe, agent_bin, require_root};

#[test]
fn learned_policy_allows_exactly_what_was_seen() {
    require_root!();
    let cg = Cgroup::new("learn");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("learned.yaml");
    let log = dir.path().join("learn.stderr");
    let mut learn = Command::new(agent_bin())
        .args([
            "learn",
            "--cgroup",
            &cg.rel,
            "--duration",
            "4s",
            "--name",
            "svc",
        ])
        .arg("--out")
        .arg(&out)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("enforcing 1 policies")
    {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "learn did not start:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The workload, while learn watches: nothing is denied.
    let p = Probe::in_cgroup(&cg);
    p.run(&["bind", "tcp", "0.0.0.0", "8080"]).assert_ok();
    p.run(&["bind", "udp", "127.0.0.1", "5353"]).assert_ok();
    let r = p.run(&["connect", "tcp", "127.0.0.1", "5432"]);
    assert_eq!(
        r.errno,
        libc::ECONNREFUSED,
        "nothing listens, but it is not denied"
    );
    let status = learn.wait().unwrap();
    let stderr = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "learn failed:\n{stderr}");
    let policy = std::fs::read_to_string(&out).unwrap();
    eprintln!("{policy}");

    // `check` accepts it.
    let check = Command::new(agent_bin())
        .arg("check")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    assert!(policy.contains(&format!("cgroup: {}", cg.rel)));
    assert!(
        policy.contains("# 8080/tcp: 1 time, first seen "),
        "{policy}"
    );
    assert!(policy.contains("# 5432/tcp: 1 time"), "{policy}");

    // Enforced, it allows exactly what was seen.
    let agent = Agent::start(&policy);
    p.run(&["bind", "tcp", "0.0.0.0", "8080"]).assert_ok();
    p.run(&["bind", "udp", "127.0.0.1", "5353"]).assert_ok();
    let r = p.run(&["connect", "tcp", "127.0.0.1", "5432"]);
    assert_eq!(
        r.errno,
        libc::ECONNREFUSED,
        "the learned connect is allowed"
    );
    // ... and denies a third port, other protocols, families and addresses.
    let third = p.run(&["bind", "tcp", "0.0.0.0", "8081"]);
    third.assert_eperm();
    p.run(&["bind", "udp", "0.0.0.0", "8080"]).assert_eperm();
    p.run(&["bind", "udp", "0.0.0.0", "5353"]).assert_eperm();
    p.run(&["bind", "tcp", "::1", "8080", "v6only"])
        .assert_eperm();
    p.run(&["connect", "tcp", "127.0.0.1", "5433"])
        .assert_eperm();
    let e = agent.wait_event(&[("pid", serde_json::json!(third.pid))]);
    assert_eq!(e["policy"], "svc");
    assert_eq!(e["rule"], "bind");
}
