//! Bind enforcement: what the kernel answers, and what the agent logs.

use portguard_tests::{Agent, Cgroup, Probe, require_root};
use serde_json::json;

fn policy(cg: &Cgroup, bind: &str) -> String {
    format!(
        "policies:\n  - name: svc\n    cgroup: {}\n    bind: {bind}\n",
        cg.rel
    )
}

#[test]
fn tcp_and_udp_ipv4_with_range_edges() {
    require_root!();
    let cg = Cgroup::new("bind4");
    let agent = Agent::start(&policy(
        &cg,
        r#"[{ports: [8080, "9000-9099"], protocol: tcp}]"#,
    ));
    let p = Probe::in_cgroup(&cg);
    p.run(&["bind", "tcp", "127.0.0.1", "8080"]).assert_ok();
    p.run(&["bind", "tcp", "0.0.0.0", "9000"]).assert_ok();
    p.run(&["bind", "tcp", "0.0.0.0", "9099"]).assert_ok();
    let below = p.run(&["bind", "tcp", "0.0.0.0", "8999"]);
    below.assert_eperm();
    let above = p.run(&["bind", "tcp", "0.0.0.0", "9100"]);
    above.assert_eperm();
    // The rule is TCP-only: UDP on an allowed port is denied.
    let udp = p.run(&["bind", "udp", "127.0.0.1", "8080"]);
    udp.assert_eperm();

    let e = agent.wait_event(&[("port", json!(9100)), ("hook", json!("bind4"))]);
    assert_eq!(e["verdict"], "deny");
    assert_eq!(e["policy"], "svc");
    assert_eq!(e["cgroup"], cg.rel);
    assert_eq!(e["cgroup_id"], cg.id());
    assert_eq!(e["pid"], above.pid);
    assert_eq!(e["tid"], above.tid);
    assert_eq!(e["uid"], 0);
    assert_eq!(e["comm"], "pgprobe");
    assert_eq!(e["family"], "ipv4");
    assert_eq!(e["protocol"], "tcp");
    assert_eq!(e["address"], "0.0.0.0");
    agent.wait_event(&[("port", json!(8999)), ("pid", json!(below.pid))]);
    let u = agent.wait_event(&[("port", json!(8080)), ("protocol", json!("udp"))]);
    assert_eq!(u["pid"], udp.pid);
    // Allowed binds are not logged.
    assert!(
        agent
            .events_matching(
                &[("port", json!(9000))],
                std::time::Duration::from_millis(200)
            )
            .is_empty()
    );
}

#[test]
fn ipv6_and_family_restricted_rules() {
    require_root!();
    let cg = Cgroup::new("bind6");
    let agent = Agent::start(&policy(
        &cg,
        "[{ports: [8080]}, {ports: [7000], family: ipv4}, {ports: [7001], family: ipv6}]",
    ));
    let p = Probe::in_cgroup(&cg);
    p.run(&["bind", "tcp", "::1", "8080"]).assert_ok();
    p.run(&["bind", "udp", "::", "8080", "v6only"]).assert_ok();
    let r = p.run(&["bind", "tcp", "::1", "8081"]);
    r.assert_eperm();
    let e = agent.wait_event(&[("port", json!(8081))]);
    assert_eq!(e["hook"], "bind6");
    assert_eq!(e["family"], "ipv6");
    assert_eq!(e["address"], "::1");
    assert_eq!(e["pid"], r.pid);
    // An IPv4-only rule does not allow the port on IPv6, and vice versa.
    p.run(&["bind", "tcp", "127.0.0.1", "7000"]).assert_ok();
    p.run(&["bind", "tcp", "::1", "7000", "v6only"])
        .assert_eperm();
    p.run(&["bind", "tcp", "::1", "7001", "v6only"]).assert_ok();
    p.run(&["bind", "tcp", "127.0.0.1", "7001"]).assert_eperm();
    agent.wait_event(&[("port", json!(7000)), ("hook", json!("bind6"))]);
    agent.wait_event(&[("port", json!(7001)), ("hook", json!("bind4"))]);
}

#[test]
fn ipv4_mapped_ipv6_is_judged_as_ipv4() {
    require_root!();
    let cg = Cgroup::new("mapped");
    let agent = Agent::start(&policy(
        &cg,
        "[{ports: [7000], family: ipv4, address: loopback}, {ports: [7001], family: ipv6}]",
    ));
    let p = Probe::in_cgroup(&cg);
    // The IPv4 loopback rule holds for the mapped form of 127.0.0.1 ...
    p.run(&["bind", "tcp", "::ffff:127.0.0.1", "7000"])
        .assert_ok();
    // ... but the mapped unspecified address is not loopback.
    let r = p.run(&["bind", "tcp", "::ffff:0.0.0.0", "7000"]);
    r.assert_eperm();
    let e = agent.wait_event(&[("port", json!(7000)), ("pid", json!(r.pid))]);
    assert_eq!(e["hook"], "bind6");
    assert_eq!(e["family"], "ipv4");
    assert_eq!(e["address"], "::ffff:0.0.0.0");
    assert_eq!(e["v4_mapped"], true);
    // An IPv6-only rule does not allow the port through the mapped IPv4 form.
    p.run(&["bind", "tcp", "::1", "7001", "v6only"]).assert_ok();
    let r = p.run(&["bind", "udp", "::ffff:127.0.0.1", "7001"]);
    r.assert_eperm();
    let e = agent.wait_event(&[("port", json!(7001)), ("pid", json!(r.pid))]);
    assert_eq!(e["family"], "ipv4");
    assert_eq!(e["protocol"], "udp");
}

#[test]
fn loopback_only_ports() {
    require_root!();
    let cg = Cgroup::new("loopback");
    let agent = Agent::start(&policy(&cg, "[{ports: [6000], address: loopback}]"));
    let p = Probe::in_cgroup(&cg);
    p.run(&["bind", "tcp", "127.0.0.1", "6000"]).assert_ok();
    p.run(&["bind", "tcp", "127.0.0.2", "6000"]).assert_ok();
    p.run(&["bind", "udp", "127.0.0.1", "6000"]).assert_ok();
    p.run(&["bind", "tcp", "::1", "6000", "v6only"]).assert_ok();
    let any4 = p.run(&["bind", "tcp", "0.0.0.0", "6000"]);
    any4.assert_eperm();
    p.run(&["bind", "tcp", "::", "6000", "v6only"])
        .assert_eperm();
    p.run(&["bind", "tcp", "::", "6000"]).assert_eperm();
    // Judged before the kernel's own address checks: a non-local address is
    // EPERM here, not EADDRNOTAVAIL.
    p.run(&["bind", "tcp", "192.0.2.1", "6000"]).assert_eperm();
    let e = agent.wait_event(&[("pid", json!(any4.pid))]);
    assert_eq!(e["address"], "0.0.0.0");
    agent.wait_event(&[("address", json!("::")), ("port", json!(6000))]);
    agent.wait_event(&[("address", json!("192.0.2.1"))]);
}

#[test]
fn dual_stack_bind_needs_both_families() {
    require_root!();
    let cg = Cgroup::new("dual");
    let both = cg.child("both");
    let agent = Agent::start(&format!(
        "policies:\n  - {{name: v6, cgroup: {}, bind: [{{ports: [6100], family: ipv6}}]}}\n  - {{name: both, cgroup: {}, bind: [{{ports: [6100]}}]}}\n",
        cg.rel, both.rel
    ));
    let p = Probe::in_cgroup(&cg);
    // [::] without IPV6_V6ONLY also listens on IPv4, which the rule does not allow.
    let r = p.run(&["bind", "tcp", "::", "6100"]);
    r.assert_eperm();
    p.run(&["bind", "tcp", "::", "6100", "v6only"]).assert_ok();
    let e = agent.wait_event(&[("pid", json!(r.pid))]);
    assert_eq!(e["hook"], "bind6");
    assert_eq!(e["dual_stack"], true);
    assert_eq!(e["address"], "::");
    // Allowed for both families: the dual-stack bind passes.
    Probe::in_cgroup(&both)
        .run(&["bind", "tcp", "::", "6100"])
        .assert_ok();
}

#[test]
fn port_zero_is_judged_on_the_chosen_port() {
    require_root!();
    let low = Cgroup::new("port0-low");
    let eph = Cgroup::new("port0-eph");
    let high = Cgroup::new("port0-high");
    let agent = Agent::start(&format!(
        "policies:\n  - {{name: low, cgroup: {}, bind: [{{ports: [\"1-1023\"]}}]}}\n  - {{name: eph, cgroup: {}, bind: [{{ports: [ephemeral], protocol: tcp}}]}}\n  - {{name: high, cgroup: {}, bind: [{{ports: [\"1024-65535\"]}}]}}\n",
        low.rel, eph.rel, high.rel
    ));
    // The kernel picks an ephemeral port (>= 1024), which `low` does not allow.
    let p = Probe::in_cgroup(&low);
    let r4 = p.run(&["bind", "tcp", "127.0.0.1", "0"]);
    r4.assert_eperm();
    let r6 = p.run(&["bind", "udp", "::1", "0", "v6only"]);
    r6.assert_eperm();
    let e = agent.wait_event(&[("pid", json!(r4.pid))]);
    assert_eq!(e["hook"], "post_bind4");
    let chosen = e["port"].as_u64().unwrap();
    assert!(
        chosen >= 1024,
        "the event carries the chosen port, got {chosen}"
    );
    let e = agent.wait_event(&[("pid", json!(r6.pid))]);
    assert_eq!(e["hook"], "post_bind6");
    assert_eq!(e["protocol"], "udp");
    assert!(e["port"].as_u64().unwrap() >= 1024);

    // `ephemeral` allows port 0 (TCP only here) but not an explicit port.
    let p = Probe::in_cgroup(&eph);
    let ok = p.run(&["bind", "tcp", "127.0.0.1", "0"]);
    ok.assert_ok();
    assert!(ok.port >= 1024);
    p.run(&["bind", "tcp", "::", "0"]).assert_ok();
    p.run(&["bind", "udp", "127.0.0.1", "0"]).assert_eperm();
    p.run(&["bind", "tcp", "127.0.0.1", &ok.port.to_string()])
        .assert_eperm();

    // A range covering every ephemeral port allows port 0 by its chosen port.
    let p = Probe::in_cgroup(&high);
    p.run(&["bind", "tcp", "127.0.0.1", "0"]).assert_ok();
    p.run(&["bind", "udp", "::", "0"]).assert_ok();
}

/// post_bind judges a socket only when its last bind() asked for port 0
/// (bind4/bind6 flag it). A socket whose port-0 bind was denied can be bound
/// to an allowed explicit port, and a socket whose explicit bind was denied
/// is judged again on a later port-0 bind.
#[test]
fn rebinding_a_socket_is_judged_each_time() {
    require_root!();
    let fixed = Cgroup::new("rebind-fixed");
    let eph = Cgroup::new("rebind-eph");
    let agent = Agent::start(&format!(
        "policies:\n  - {{name: fixed, cgroup: {}, bind: [{{ports: [8080]}}]}}\n  - {{name: eph, cgroup: {}, bind: [{{ports: [ephemeral]}}]}}\n",
        fixed.rel, eph.rel
    ));
    let p = Probe::in_cgroup(&fixed);
    for addr in ["127.0.0.1", "::1"] {
        // Port 0 denied (the picked port is not 8080), then 8080 allowed.
        let r = p.run(&["rebind", "tcp", addr, "0", "8080"]);
        assert_eq!(r.first_errno, libc::EPERM, "{r:?}");
        r.assert_ok();
        assert_eq!(r.port, 8080);
        // Port 0 denied, then a denied explicit port: denied by bind4/6.
        let r = p.run(&["rebind", "udp", addr, "0", "8081"]);
        assert_eq!(r.first_errno, libc::EPERM, "{r:?}");
        r.assert_eperm();
    }
    agent.wait_event(&[("port", json!(8081)), ("hook", json!("bind6"))]);
    let p = Probe::in_cgroup(&eph);
    for addr in ["127.0.0.1", "::1"] {
        // Explicit port denied, then port 0 allowed by `ephemeral`.
        let r = p.run(&["rebind", "tcp", addr, "8080", "0"]);
        assert_eq!(r.first_errno, libc::EPERM, "{r:?}");
        r.assert_ok();
        assert!(r.port >= 1024, "{r:?}");
    }
}

#[test]
fn empty_bind_list_denies_every_bind() {
    require_root!();
    let cg = Cgroup::new("sealed");
    let agent = Agent::start(&policy(&cg, "[]"));
    let p = Probe::in_cgroup(&cg).listen("tcp:127.0.0.1:5000");
    for op in [
        ["bind", "tcp", "127.0.0.1", "8080"],
        ["bind", "udp", "127.0.0.1", "8080"],
        ["bind", "tcp", "::1", "8080"],
        ["bind", "tcp", "127.0.0.1", "0"],
        ["bind", "udp", "::", "0"],
        ["bind", "tcp", "0.0.0.0", "65535"],
        ["bind", "tcp", "0.0.0.0", "1"],
    ] {
        let r = p.run(&op);
        assert!(!r.ok && r.errno == libc::EPERM, "{op:?}: {r:?}");
        agent.wait_event(&[("pid", json!(r.pid)), ("verdict", json!("deny"))]);
    }
    // Connects are not restricted by this policy.
    p.run(&["connect", "tcp", "127.0.0.1", "5000"]).assert_ok();
}

/// A hook that returned anything but 0/1 would let an allowed low port skip
/// the kernel's CAP_NET_BIND_SERVICE check (kernel selftest bind_perm). An
/// unprivileged process must still get EACCES for port 80, even though the
/// policy allows it.
#[test]
fn allowed_bind_keeps_the_privileged_port_check() {
    require_root!();
    let cg = Cgroup::new("bindperm");
    let _agent = Agent::start(&policy(&cg, "[{ports: [80, 8080]}]"));
    let nobody = Probe::in_cgroup(&cg).uid(65534);
    let r = nobody.run(&["bind", "tcp", "127.0.0.1", "80"]);
    assert!(
        !r.ok && r.errno == libc::EACCES,
        "an unprivileged bind to port 80 must fail with EACCES, got {r:?}"
    );
    nobody
        .run(&["bind", "tcp", "127.0.0.1", "8080"])
        .assert_ok();
    nobody
        .run(&["bind", "tcp", "127.0.0.1", "8081"])
        .assert_eperm();
    Probe::in_cgroup(&cg)
        .run(&["bind", "tcp", "127.0.0.1", "80"])
        .assert_ok();
}
