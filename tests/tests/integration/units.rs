//! `unit:` selectors on a bare host: a systemd unit is governed through its
//! cgroup wherever its slice puts it, including sub-cgroups the service
//! creates; a unit started after the agent is governed as soon as its cgroup
//! appears; events name the unit.
//!
//! PID 1 on the test machines is not systemd, so the tests lay out unit
//! cgroups exactly as systemd does (`<name>.slice/<name>.service`) instead of
//! starting real units; portguard only ever sees the cgroup tree either way.

use std::time::{Duration, Instant};

use portguard_tests::{Agent, Cgroup, Probe, cgroup2_root, require_root};
use serde_json::json;

#[test]
fn units_are_governed_through_their_cgroups_and_named_in_events() {
    require_root!();
    let pid = std::process::id();
    let slice_name = format!("pgtest-{pid}.slice");
    let slice = Cgroup::existing(cgroup2_root().join(&slice_name), &format!("/{slice_name}"));
    let web_unit = format!("pgtest-web-{pid}.service");
    let late_unit = format!("pgtest-late-{pid}.service");
    let web = slice.child(&web_unit);
    // A service with Delegate=yes runs its processes in its own sub-cgroups.
    let worker = web.child("worker");
    let other = slice.child(&format!("pgtest-other-{pid}.service"));
    // No rescan during the test: only the cgroup watch can find the late unit.
    let agent = Agent::start_with(
        &format!(
            "policies:\n  - {{name: web, unit: {web_unit}, bind: [{{ports: [8080]}}]}}\n  - {{name: late, unit: {late_unit}, bind: []}}\n"
        ),
        &["--rescan-interval", "1h"],
    );

    let p = Probe::in_cgroup(&web);
    p.run(&["bind", "tcp", "127.0.0.1", "8080"]).assert_ok();
    let r = p.run(&["bind", "tcp", "127.0.0.1", "8081"]);
    r.assert_eperm();
    let e = agent.wait_event(&[("pid", json!(r.pid))]);
    assert_eq!(e["policy"], "web");
    assert_eq!(e["unit"], web_unit.as_str());
    assert_eq!(e["identity_source"], "cgroup-path");
    assert_eq!(e["cgroup"], web.rel);
    assert_eq!(e["policy_cgroup"], web.rel);
    assert!(e.get("k8s_pod").is_none(), "a unit is not a pod: {e}");

    let r = Probe::in_cgroup(&worker)
        .fork()
        .run(&["bind", "udp", "::", "9000"]);
    r.assert_eperm();
    let e = agent.wait_event(&[("pid", json!(r.pid))]);
    assert_eq!(e["cgroup"], worker.rel);
    assert_eq!(
        e["unit"],
        web_unit.as_str(),
        "the sub-cgroup belongs to the unit"
    );

    // Another unit in the same slice is untouched.
    Probe::in_cgroup(&other)
        .run(&["bind", "tcp", "127.0.0.1", "8081"])
        .assert_ok();

    // A unit started after the agent: governed once its cgroup appears.
    let late = slice.child(&late_unit);
    let created = Instant::now();
    let probe = Probe::in_cgroup(&late);
    let denied_after = loop {
        let r = probe.run(&["bind", "udp", "127.0.0.1", "0"]);
        if r.errno == libc::EPERM {
            break created.elapsed();
        }
        r.assert_ok();
        assert!(
            created.elapsed() < Duration::from_secs(3),
            "unit {late_unit} not governed 3 s after its cgroup appeared\n{}",
            agent.stderr()
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    eprintln!("late unit governed {denied_after:?} after its cgroup appeared");
    let e = agent.wait_event(&[("policy", json!("late"))]);
    assert_eq!(e["unit"], late_unit.as_str());
}
