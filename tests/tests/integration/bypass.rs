//! The paths to a port that the bind hooks never see (SEMANTICS.md's
//! bypass list), each closed or reported.

use std::time::Duration;

use portguard_tests::{Agent, Cgroup, Probe, require_root};
use serde_json::json;

fn start(cg: &Cgroup, body: &str) -> Agent {
    start_with(cg, body, &[])
}

fn start_with(cg: &Cgroup, body: &str, args: &[&str]) -> Agent {
    Agent::start_with(
        &format!("policies:\n  - name: svc\n    cgroup: {}\n{body}", cg.rel),
        args,
    )
}

/// listen() on an unbound TCP socket: the kernel autobinds an ephemeral port
/// without any bind hook. Denied where the BPF LSM is usable; on hosts where
/// it is not (this CI host's kernel refuses BTF-attached programs), the
/// listener is cut off (see `guard` for what a client gets). Either way an
/// event names the port.
#[test]
fn listen_on_an_unbound_socket() {
    require_root!();
    let cg = Cgroup::new("autobind");
    let eph = Cgroup::new("autobind-eph");
    let agent = Agent::start(&format!(
        "policies:\n  - {{name: svc, cgroup: {}, bind: [{{ports: [8080]}}]}}\n  - {{name: eph, cgroup: {}, bind: [{{ports: [ephemeral], protocol: tcp}}]}}\n",
        cg.rel, eph.rel
    ));
    let denied = agent.listen_denied();
    let p = Probe::in_cgroup(&cg);
    for fam in ["4", "6"] {
        let r = p.run(&["listen-unbound", "tcp", fam]);
        if denied {
            r.assert_eperm();
        } else {
            r.assert_ok();
        }
        let e = agent.wait_event(&[("pid", json!(r.pid)), ("hook", json!("listen"))]);
        assert_eq!(e["verdict"], if denied { "deny" } else { "cut_off" });
        assert_eq!(e["protocol"], "tcp");
        assert_eq!(e["family"], if fam == "4" { "ipv4" } else { "ipv6" });
        if !denied {
            // Cut off after the fact: the event carries the port the kernel picked.
            assert_eq!(e["port"], r.port);
            assert!(r.port >= 1024);
        }
    }
    // A listener on an allowed, explicitly bound port is fine and silent.
    let r = p.run(&["listen", "tcp", "127.0.0.1", "8080"]);
    r.assert_ok();
    // `ephemeral` allows kernel-picked listening ports.
    let r2 = Probe::in_cgroup(&eph).run(&["listen-unbound", "tcp", "4"]);
    r2.assert_ok();
    for pid in [r.pid, r2.pid] {
        assert!(
            agent
                .events_matching(&[("pid", json!(pid))], Duration::from_millis(300))
                .is_empty()
        );
    }
}

/// io_uring's IORING_OP_BIND and IORING_OP_LISTEN go through the same kernel
/// paths as the syscalls, and are judged exactly like them.
#[test]
fn io_uring_bind_and_listen() {
    require_root!();
    let cg = Cgroup::new("uring");
    let agent = start(&cg, "    bind: [{ports: [8080]}]\n");
    let p = Probe::in_cgroup(&cg);
    p.run(&["uring-bind", "tcp", "127.0.0.1", "8080"])
        .assert_ok();
    let r = p.run(&["uring-bind", "tcp", "127.0.0.1", "8081"]);
    r.assert_eperm();
    assert_eq!(agent.wait_event(&[("pid", json!(r.pid))])["hook"], "bind4");
    let r = p.run(&["uring-bind", "udp", "::1", "8081"]);
    r.assert_eperm();
    assert_eq!(agent.wait_event(&[("pid", json!(r.pid))])["hook"], "bind6");
    let denied = agent.listen_denied();
    let r = p.run(&["uring-listen-unbound", "4"]);
    if denied {
        r.assert_eperm();
    } else {
        r.assert_ok();
    }
    let e = agent.wait_event(&[("pid", json!(r.pid)), ("hook", json!("listen"))]);
    assert_eq!(e["verdict"], if denied { "deny" } else { "cut_off" });
}

/// Sockets whose protocol has its own bind never reach the bind hooks: a
/// restricted cgroup cannot create them unless `allow_sockets` says so.
#[test]
fn raw_sockets_are_denied_unless_allowed() {
    require_root!();
    let sealed = Cgroup::new("raw-sealed");
    let allowed = Cgroup::new("raw-allowed");
    let open = Cgroup::new("raw-open");
    let agent = Agent::start(&format!(
        "policies:\n  - {{name: sealed, cgroup: {}, bind: [{{ports: [8080]}}]}}\n  - {{name: allowed, cgroup: {}, bind: [{{ports: [8080]}}], allow_sockets: [raw]}}\n  - {{name: open, cgroup: {}}}\n",
        sealed.rel, allowed.rel, open.rel
    ));
    for kind in ["raw4", "raw6"] {
        let r = Probe::in_cgroup(&sealed).run(&["socket", kind]);
        r.assert_eperm();
        let e = agent.wait_event(&[("pid", json!(r.pid))]);
        assert_eq!(e["hook"], "sock_create");
        assert_eq!(e["socket"], "raw");
        assert_eq!(e["verdict"], "deny");
        assert_eq!(e["policy"], "sealed");
        Probe::in_cgroup(&allowed)
            .run(&["socket", kind])
            .assert_ok();
        // A policy that restricts neither binds nor connects has nothing to bypass.
        Probe::in_cgroup(&open).run(&["socket", kind]).assert_ok();
    }
}

/// SCTP and L2TP/IP have their own bind too. This kernel may not have them;
/// then there is nothing to bypass with and the test says so.
#[test]
fn sctp_and_l2tp_sockets_are_denied_unless_allowed() {
    require_root!();
    let sealed = Cgroup::new("sctp-sealed");
    let allowed = Cgroup::new("sctp-allowed");
    let free = Cgroup::new("sctp-free");
    let agent = Agent::start(&format!(
        "policies:\n  - {{name: sealed, cgroup: {}, connect: []}}\n  - {{name: allowed, cgroup: {}, connect: [], allow_sockets: [sctp, l2tp]}}\n",
        sealed.rel, allowed.rel
    ));
    for kind in ["sctp", "l2tp"] {
        let baseline = Probe::in_cgroup(&free).run(&["socket", kind]);
        if !baseline.ok {
            eprintln!(
                "skipping {kind}: this kernel cannot create {kind} sockets at all ({}), so they \
                 are no bypass here",
                baseline.error
            );
            continue;
        }
        let r = Probe::in_cgroup(&sealed).run(&["socket", kind]);
        r.assert_eperm();
        assert_eq!(agent.wait_event(&[("pid", json!(r.pid))])["socket"], kind);
        Probe::in_cgroup(&allowed)
            .run(&["socket", kind])
            .assert_ok();
    }
}

/// MPTCP binds through TCP subflows: the bind hooks see them as TCP.
#[test]
fn mptcp_binds_are_judged_as_tcp() {
    require_root!();
    let cg = Cgroup::new("mptcp");
    let agent = start(&cg, "    bind: [{ports: [8080], protocol: tcp}]\n");
    let p = Probe::in_cgroup(&cg);
    let ok = p.run(&["bind", "mptcp", "127.0.0.1", "8080"]);
    if !ok.ok && ok.errno == libc::EPROTONOSUPPORT {
        eprintln!("skipping: this kernel has no MPTCP");
        return;
    }
    ok.assert_ok();
    let r = p.run(&["bind", "mptcp", "127.0.0.1", "8081"]);
    r.assert_eperm();
    let e = agent.wait_event(&[("pid", json!(r.pid))]);
    assert_eq!(e["protocol"], "tcp");
    assert_eq!(e["port"], 8081);
}

/// Whose policy decides: the calling task's cgroup, in every hook. A socket
/// created outside every attach point and handed in over a unix socket
/// (SCM_RIGHTS) is judged by the receiver's policy when the receiver binds,
/// where the decision programs run for every process
/// (`--decision-programs root`).
#[test]
fn a_socket_passed_in_is_judged_by_the_receivers_policy() {
    require_root!();
    let cg = Cgroup::new("handoff");
    let agent = start_with(
        &cg,
        "    bind: [{ports: [8080]}]\n",
        &["--decision-programs", "root"],
    );
    let dir = cg.fs.display().to_string();
    let outside = Probe::outside();
    let r = outside.run(&["handoff", "bind", "tcp", "127.0.0.1", "8081", &dir]);
    r.assert_eperm();
    let e = agent.wait_event(&[("pid", json!(r.pid))]);
    assert_eq!(e["hook"], "bind4");
    assert_eq!(e["cgroup"], cg.rel);
    outside
        .run(&["handoff", "bind", "tcp", "127.0.0.1", "8080", &dir])
        .assert_ok();
}

/// A socket bound outside (by a process the policy does not govern) and
/// handed in: the receiver's listen() is judged on the bound port. Denied with
/// the BPF LSM, cut off without it.
#[test]
fn listening_on_a_socket_bound_elsewhere_is_judged() {
    require_root!();
    let cg = Cgroup::new("handoff-listen");
    let agent = start(&cg, "    bind: [{ports: [8080]}]\n");
    let denied = agent.listen_denied();
    let dir = cg.fs.display().to_string();
    let r = Probe::outside().run(&["handoff", "listen", "tcp", "127.0.0.1", "9999", &dir]);
    if denied {
        r.assert_eperm();
    } else {
        r.assert_ok();
    }
    let e = agent.wait_event(&[("pid", json!(r.pid))]);
    assert_eq!(e["hook"], "listen");
    assert_eq!(e["port"], 9999);
    assert_eq!(e["verdict"], if denied { "deny" } else { "cut_off" });
    // The allowed port passes silently.
    let r = Probe::outside().run(&["handoff", "listen", "tcp", "127.0.0.1", "8080", &dir]);
    r.assert_ok();
    assert!(
        agent
            .events_matching(&[("pid", json!(r.pid))], Duration::from_millis(300))
            .is_empty()
    );
}

/// A socket created before its process moved into a governed cgroup is
/// judged by the cgroup the process is in when it binds (the socket was
/// made outside every attach point: `--decision-programs root`).
#[test]
fn a_socket_created_before_moving_cgroups_follows_the_caller() {
    require_root!();
    let cg = Cgroup::new("premove");
    let agent = start_with(
        &cg,
        "    bind: [{ports: [8080]}]\n",
        &["--decision-programs", "root"],
    );
    let dir = cg.fs.display().to_string();
    let r = Probe::outside().run(&["premove", "udp", "127.0.0.1", "8081", &dir]);
    r.assert_eperm();
    assert_eq!(agent.wait_event(&[("pid", json!(r.pid))])["cgroup"], cg.rel);
    Probe::outside()
        .run(&["premove", "tcp", "::1", "8080", &dir])
        .assert_ok();
}

/// By default (the decision programs on the attach points only), a socket
/// made outside every attach point and bound by a governed process after it
/// moved in is not judged at bind: its bind succeeds. The inventory judges it
/// by its holder's cgroup: reported (`preexisting`, naming the holder's
/// cgroup and policy) and ended.
#[test]
fn a_socket_made_outside_every_point_is_found_by_its_holder() {
    require_root!();
    let cg = Cgroup::new("premove-points");
    let agent = start_with(
        &cg,
        "    bind: [{ports: [8080]}]\n",
        &["--inventory-interval", "300ms"],
    );
    let join = format!("join={}", cg.fs.display());
    let (r, _held) = Probe::outside().hold(&["hold", "udp", "127.0.0.1", "8081", &join]);
    r.assert_ok();
    let e = agent.wait_event(&[("pid", json!(r.pid)), ("verdict", json!("preexisting"))]);
    assert_eq!(e["cgroup"], cg.rel, "{e}");
    assert_eq!(e["policy"], "svc", "{e}");
    assert_eq!(e["port"], 8081, "{e}");
    assert_eq!(e["action"], "destroyed", "{e}");
}

/// connect() and unconnected sendmsg() on an unbound socket take an
/// ephemeral source port: allowed as outbound traffic (the connect policy
/// judges the destination), and replies to it arrive. A denied destination
/// takes no source port at all.
#[test]
fn implicit_source_ports_of_outbound_traffic() {
    require_root!();
    let cg = Cgroup::new("implicit");
    let agent = start(
        &cg,
        "    bind: []\n    connect: [{ports: [5300], protocol: udp}]\n",
    );
    let p = Probe::in_cgroup(&cg).echo("udp:127.0.0.1:5300");
    let r = p.run(&["sendrecv", "127.0.0.1", "5300"]);
    r.assert_ok();
    assert!(r.port >= 1024, "autobound to an ephemeral port: {r:?}");
    assert!(
        agent
            .events_matching(&[("pid", json!(r.pid))], Duration::from_millis(300))
            .is_empty(),
        "the implicit bind is not a bind event"
    );
    let r = Probe::in_cgroup(&cg).run(&["sendrecv", "127.0.0.1", "5301"]);
    r.assert_eperm();
    assert_eq!(
        agent.wait_event(&[("pid", json!(r.pid))])["hook"],
        "sendmsg4"
    );
}

/// Sockets bound before the agent started (or before a reload made the
/// policy stricter) were never judged by a hook: the agent lists the sockets
/// of every governed process, in their own network namespaces, and reports
/// each one that breaks its policy with verdict "preexisting".
/// `ephemeral` allows a port the kernel chose inside the host's ephemeral
/// range. The inventory cannot tell who chose a port it finds, so it grants
/// `ephemeral` only inside that range: sockets on 2222/2223, bound before
/// the agent governed their cgroup (a start window, a hand-over), are
/// reported and ended under a policy that lists `ephemeral`; one inside the
/// range is left alone.
#[test]
fn ephemeral_does_not_excuse_a_preexisting_socket_outside_the_range() {
    require_root!();
    let cg = Cgroup::new("preexisting-eph");
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap();
    let low: u16 = range.split_whitespace().next().unwrap().parse().unwrap();
    let inside = (low + 4321).to_string();
    let p = Probe::in_cgroup(&cg);
    let (bad_tcp, _h1) = p.hold(&["hold", "tcp", "0.0.0.0", "2222"]);
    let (bad_udp, _h2) = p.hold(&["hold", "udp", "0.0.0.0", "2223"]);
    let (in_range, _h3) = p.hold(&["hold", "tcp", "127.0.0.1", &inside]);
    for r in [&bad_tcp, &bad_udp, &in_range] {
        r.assert_ok();
    }
    let agent = start(&cg, "    bind: [{ports: [8080, ephemeral]}]\n");
    for (r, port, proto) in [(&bad_tcp, 2222, "tcp"), (&bad_udp, 2223, "udp")] {
        let e = agent.wait_event(&[
            ("pid", json!(r.pid)),
            ("port", json!(port)),
            ("verdict", json!("preexisting")),
        ]);
        assert_eq!(e["protocol"], proto, "{e}");
        assert_eq!(e["action"], "destroyed", "{e}");
    }
    assert!(
        agent
            .events_matching(&[("pid", json!(in_range.pid))], Duration::from_millis(300))
            .is_empty(),
        "a socket inside the host's ephemeral range is `ephemeral`'s"
    );
}

#[test]
fn sockets_bound_before_the_agent_started_are_reported() {
    require_root!();
    let cg = Cgroup::new("preexisting");
    let p = Probe::in_cgroup(&cg);
    // No agent yet: these binds are not judged by anyone.
    let (bad_tcp, _h1) = p.hold(&["hold", "tcp", "0.0.0.0", "9999"]);
    let (bad_udp, _h2) = p.hold(&["hold", "udp", "::", "5353", "v6only"]);
    let (good, _h3) = p.hold(&["hold", "tcp", "127.0.0.1", "8080"]);
    for r in [&bad_tcp, &bad_udp, &good] {
        r.assert_ok();
    }
    let mut agent = start(&cg, "    bind: [{ports: [8080]}]\n");
    let e = agent.wait_event(&[
        ("pid", json!(bad_tcp.pid)),
        ("verdict", json!("preexisting")),
    ]);
    assert_eq!(e["port"], 9999);
    assert_eq!(e["protocol"], "tcp");
    assert_eq!(e["address"], "0.0.0.0");
    assert_eq!(e["hook"], "inventory");
    assert_eq!(e["policy"], "svc");
    assert_eq!(e["cgroup"], cg.rel);
    assert_eq!(e["comm"], "pgprobe");
    assert!(e["socket_inode"].as_u64().is_some_and(|i| i > 0));
    let e = agent.wait_event(&[
        ("pid", json!(bad_udp.pid)),
        ("verdict", json!("preexisting")),
    ]);
    assert_eq!(e["port"], 5353);
    assert_eq!(e["protocol"], "udp");
    assert_eq!(e["family"], "ipv6");
    assert!(
        agent
            .events_matching(&[("pid", json!(good.pid))], Duration::from_millis(300))
            .is_empty(),
        "an allowed socket is not reported"
    );
    // A reload that no longer allows 8080 reports the held listener.
    agent.reload(&format!(
        "policies:\n  - name: svc\n    cgroup: {}\n    bind: [{{ports: [7000]}}]\n",
        cg.rel
    ));
    let e = agent.wait_event(&[("pid", json!(good.pid)), ("verdict", json!("preexisting"))]);
    assert_eq!(e["port"], 8080);
}
