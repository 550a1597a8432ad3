//! Connect and unconnected-UDP send enforcement.

use portguard_tests::{Agent, Cgroup, Probe, require_root};
use serde_json::json;

fn start(cg: &Cgroup, connect: &str) -> Agent {
    Agent::start(&format!(
        "policies:\n  - name: client\n    cgroup: {}\n    connect: {connect}\n",
        cg.rel
    ))
}

#[test]
fn tcp_connect_ipv4_and_ipv6() {
    require_root!();
    let cg = Cgroup::new("connect");
    let agent = start(&cg, "[{ports: [5432]}]");
    let p = Probe::in_cgroup(&cg)
        .listen("tcp:127.0.0.1:5432")
        .listen("tcp:127.0.0.1:5433")
        .listen("tcp:[::1]:5432")
        .listen("tcp:[::1]:5433");
    p.run(&["connect", "tcp", "127.0.0.1", "5432"]).assert_ok();
    p.run(&["connect", "tcp", "::1", "5432"]).assert_ok();
    let r = p.run(&["connect", "tcp", "127.0.0.1", "5433"]);
    r.assert_eperm();
    let e = agent.wait_event(&[("pid", json!(r.pid))]);
    assert_eq!(e["hook"], "connect4");
    assert_eq!(e["verdict"], "deny");
    assert_eq!(e["address"], "127.0.0.1");
    assert_eq!(e["port"], 5433);
    assert_eq!(e["protocol"], "tcp");
    let r = p.run(&["connect", "tcp", "::1", "5433"]);
    r.assert_eperm();
    let e = agent.wait_event(&[("pid", json!(r.pid))]);
    assert_eq!(e["hook"], "connect6");
    assert_eq!(e["family"], "ipv6");
    // The IPv4-mapped form reaches the same IPv4 listener: judged as IPv4.
    let r = p.run(&["connect", "tcp", "::ffff:127.0.0.1", "5433"]);
    r.assert_eperm();
    let e = agent.wait_event(&[("pid", json!(r.pid))]);
    assert_eq!(e["hook"], "connect6");
    assert_eq!(e["family"], "ipv4");
    assert_eq!(e["v4_mapped"], true);
    p.run(&["connect", "tcp", "::ffff:127.0.0.1", "5432"])
        .assert_ok();
    // Binds are not restricted by a connect-only policy.
    p.run(&["bind", "tcp", "0.0.0.0", "7777"]).assert_ok();
}

#[test]
fn udp_connect_and_unconnected_sendto() {
    require_root!();
    let cg = Cgroup::new("udp");
    let agent = start(&cg, "[{ports: [53], protocol: udp}]");
    let p = Probe::in_cgroup(&cg);
    p.run(&["connect", "udp", "127.0.0.1", "53"]).assert_ok();
    p.run(&["sendto", "127.0.0.1", "53"]).assert_ok();
    p.run(&["sendto", "::1", "53"]).assert_ok();
    let r = p.run(&["connect", "udp", "127.0.0.1", "54"]);
    r.assert_eperm();
    assert_eq!(
        agent.wait_event(&[("pid", json!(r.pid))])["hook"],
        "connect4"
    );
    let r = p.run(&["sendto", "127.0.0.1", "54"]);
    r.assert_eperm();
    let e = agent.wait_event(&[("pid", json!(r.pid))]);
    assert_eq!(e["hook"], "sendmsg4");
    assert_eq!(e["protocol"], "udp");
    assert_eq!(e["port"], 54);
    let r = p.run(&["sendto", "::1", "54"]);
    r.assert_eperm();
    assert_eq!(
        agent.wait_event(&[("pid", json!(r.pid))])["hook"],
        "sendmsg6"
    );
    // The rule is UDP only.
    let listener = Probe::in_cgroup(&cg).listen("tcp:127.0.0.1:53");
    listener
        .run(&["connect", "tcp", "127.0.0.1", "53"])
        .assert_eperm();
}

#[test]
fn loopback_only_destinations() {
    require_root!();
    let cg = Cgroup::new("dest");
    let agent = start(&cg, "[{ports: [53], address: loopback}]");
    let p = Probe::in_cgroup(&cg);
    p.run(&["connect", "udp", "127.0.0.1", "53"]).assert_ok();
    p.run(&["connect", "udp", "::1", "53"]).assert_ok();
    // Off-host destination: denied before routing is even considered
    // (EPERM, not ENETUNREACH).
    let r = p.run(&["connect", "udp", "192.0.2.1", "53"]);
    r.assert_eperm();
    assert_eq!(
        agent.wait_event(&[("pid", json!(r.pid))])["address"],
        "192.0.2.1"
    );
    p.run(&["sendto", "2001:db8::1", "53"]).assert_eperm();
    agent.wait_event(&[
        ("hook", json!("sendmsg6")),
        ("address", json!("2001:db8::1")),
    ]);
}

#[test]
fn empty_connect_list_denies_every_destination() {
    require_root!();
    let cg = Cgroup::new("noconnect");
    let agent = start(&cg, "[]");
    let p = Probe::in_cgroup(&cg).listen("tcp:127.0.0.1:5000");
    p.run(&["connect", "tcp", "127.0.0.1", "5000"])
        .assert_eperm();
    p.run(&["sendto", "127.0.0.1", "5000"]).assert_eperm();
    let r = p.run(&["connect", "udp", "::1", "5000"]);
    r.assert_eperm();
    agent.wait_event(&[("pid", json!(r.pid)), ("hook", json!("connect6"))]);
    p.run(&["bind", "tcp", "127.0.0.1", "5001"]).assert_ok();
}
