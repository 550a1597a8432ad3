//! Audit mode: nothing is denied, everything enforce mode would deny is logged.

use portguard_tests::{Agent, Cgroup, Probe, require_root};
use serde_json::json;

#[test]
fn audit_mode_allows_and_reports() {
    require_root!();
    let cg = Cgroup::new("audit");
    let enforced = Cgroup::new("enforced");
    let agent = Agent::start(&format!(
        "policies:\n  - {{name: trial, cgroup: {}, mode: audit, bind: [{{ports: [8080]}}], connect: []}}\n  - {{name: real, cgroup: {}, bind: [{{ports: [8080]}}]}}\n",
        cg.rel, enforced.rel
    ));
    let p = Probe::in_cgroup(&cg).listen("tcp:127.0.0.1:5000");
    // The probe's own listener on 5000 is outside the policy too: the
    // agent's start-up inventory may report it (`preexisting`, same pid)
    // after READY=1. Each wait names the operation it is about.
    let r = p.run(&["bind", "tcp", "0.0.0.0", "9000"]);
    r.assert_ok();
    let e = agent.wait_event(&[("pid", json!(r.pid)), ("port", json!(9000))]);
    assert_eq!(e["verdict"], "audit");
    assert_eq!(e["policy"], "trial");
    assert_eq!(e["port"], 9000);
    let r = p.run(&["connect", "tcp", "127.0.0.1", "5000"]);
    r.assert_ok();
    let e = agent.wait_event(&[("pid", json!(r.pid)), ("hook", json!("connect4"))]);
    assert_eq!(e["verdict"], "audit");
    assert_eq!(e["hook"], "connect4");
    // Port 0 in audit mode: allowed, reported by post_bind with the chosen port.
    let r = p.run(&["bind", "udp", "127.0.0.1", "0"]);
    r.assert_ok();
    let e = agent.wait_event(&[("pid", json!(r.pid)), ("port", json!(r.port))]);
    assert_eq!(e["hook"], "post_bind4");
    assert_eq!(e["port"], r.port);
    // What the policy allows is not reported.
    let r = p.run(&["bind", "tcp", "0.0.0.0", "8080"]);
    r.assert_ok();
    assert!(
        agent
            .events_matching(
                &[("pid", json!(r.pid)), ("port", json!(8080))],
                std::time::Duration::from_millis(300)
            )
            .is_empty()
    );
    // The same rules in enforce mode deny.
    let r = Probe::in_cgroup(&enforced).run(&["bind", "tcp", "0.0.0.0", "9000"]);
    r.assert_eperm();
    assert_eq!(
        agent.wait_event(&[("pid", json!(r.pid))])["verdict"],
        "deny"
    );
}
