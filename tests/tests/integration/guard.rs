//! No governed socket serves on a port outside its policy, with or without
//! the BPF LSM (issue 14). Where listen() cannot be denied (this CI host's
//! kernel refuses BTF-attached programs), the listener is cut off: the
//! kernel program fences it (binds it to an interface index no interface
//! has, so no packet reaches it) and the agent destroys it. Where the fence
//! cannot be set and the kernel will not destroy the socket, the agent
//! attaches the packet guard until the socket is gone.
//! Each test tries the way around as a tenant would and asserts both what a
//! client gets and the event.

use std::{
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use portguard_tests::{Agent, Cgroup, Probe, ProbeResult, require_root};
use serde_json::{Value, json};

/// The one event the probe's listen (or send) made, asserted to be alone.
fn only_event(agent: &Agent, r: &ProbeResult, hook: &str) -> Value {
    let e = agent.wait_event(&[("pid", json!(r.pid)), ("hook", json!(hook))]);
    let all = agent.events_matching(&[("pid", json!(r.pid))], Duration::from_millis(300));
    assert_eq!(all.len(), 1, "one event per cut-off socket: {all:#?}");
    e
}

/// What a cut-off listener must look like to a client and in the log:
/// `action` is what the agent did to it (`destroyed`; the kernel refuses to
/// destroy the TCP subflow an MPTCP listener listens through: `fenced`).
/// A fenced or destroyed listener refuses the client (a reset), from the
/// first SYN on.
#[track_caller]
fn assert_cut_off(agent: &Agent, denied: bool, r: &ProbeResult, port: Option<u16>, action: &str) {
    if denied {
        // The BPF LSM refused listen() itself.
        r.assert_eperm();
        let e = only_event(agent, r, "listen");
        assert_eq!(e["verdict"], "deny");
        return;
    }
    r.assert_ok();
    assert_eq!(
        r.served,
        Some(false),
        "a client was served by a listener the policy does not allow: {r:?}"
    );
    let e = only_event(agent, r, "listen");
    assert_eq!(e["verdict"], "cut_off", "{e}");
    assert_eq!(e["port"], port.unwrap_or(r.port), "{e}");
    assert_eq!(e["protocol"], "tcp");
    assert_eq!(
        e["action"],
        action,
        "what the agent did to the socket: {e}\n{}",
        agent.stderr()
    );
    if action == "destroyed" || action == "fenced" {
        // Ended, not starved: the client was refused, not left hanging.
        assert_eq!(r.client.as_deref(), Some("ECONNREFUSED"), "{r:?}");
    }
}

/// A test cgroup (`tag`) governed by one policy, `policy`, whose rules are
/// `rules` (flow-mapping entries after its selector), and the agent
/// enforcing it.
fn governed(tag: &str, policy: &str, rules: &str) -> (Cgroup, Agent) {
    let cg = Cgroup::new(tag);
    let agent = Agent::start(&format!(
        "policies:\n  - {{name: {policy}, cgroup: {}, {rules}}}\n",
        cg.rel
    ));
    (cg, agent)
}

/// A test cgroup governed by the policy `svc` (binds to 8080 only), and the
/// agent enforcing it.
fn svc_8080(name: &str) -> (Cgroup, Agent) {
    governed(name, "svc", "bind: [{ports: [8080]}]")
}

/// [`svc_8080`] where listen() is cut off rather than denied; `None`, with
/// the reason printed, where the BPF LSM denies listen() itself and no
/// socket is ever fenced.
fn fencing_host(name: &str) -> Option<(Cgroup, Agent)> {
    let (cg, agent) = svc_8080(name);
    if agent.listen_denied() {
        eprintln!("skipped: the BPF LSM denies listen() itself here; no socket is ever fenced");
        return None;
    }
    Some((cg, agent))
}

/// A counter from /metrics.
fn metric(agent: &Agent, name: &str) -> u64 {
    let url = format!("http://127.0.0.1:{}/metrics", agent.metrics_port());
    let body = ureq::get(&url)
        .call()
        .expect("GET /metrics")
        .body_mut()
        .read_to_string()
        .unwrap();
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {body}"))
}

/// An unbound listen(): the kernel autobinds a port no bind hook sees. TCP
/// and MPTCP (Go's default), IPv4, IPv6-only and dual-stack `[::]`: no
/// client is ever served (each is refused from the first SYN), and one
/// event names the port. The MPTCP listener, which the kernel will not let
/// the agent destroy, stays fenced; the packet guard is never needed.
#[test]
fn an_unbound_listener_outside_the_policy_serves_no_one() {
    require_root!();
    let (cg, agent) = svc_8080("guard-unbound");
    let denied = agent.listen_denied();
    let p = Probe::in_cgroup(&cg).serve();
    for proto in ["tcp", "mptcp"] {
        for variant in [&["4"][..], &["6"], &["6", "v6only"]] {
            let mut op = vec!["listen-unbound", proto];
            op.extend_from_slice(variant);
            let r = p.run(&op);
            let action = if proto == "mptcp" {
                "fenced"
            } else {
                "destroyed"
            };
            assert_cut_off(&agent, denied, &r, None, action);
            if !denied {
                let e = agent.wait_event(&[("pid", json!(r.pid))]);
                assert_eq!(e["autobind"], true, "{op:?}: {e}");
                assert_eq!(
                    e["dual_stack"].as_bool().unwrap_or(false),
                    variant == ["6"],
                    "{op:?}: {e}"
                );
            }
        }
    }
    if !denied {
        assert_eq!(metric(&agent, "portguard_fence_failures_total"), 0);
        assert_eq!(
            metric(&agent, "portguard_guard_dropped_packets_total"),
            0,
            "the fence alone kept every client out"
        );
    }
}

/// A tenant undoes the fence as it would bind any socket to a device
/// (`SO_BINDTODEVICE ""`, `SO_BINDTOIFINDEX 0`): both are refused (EPERM),
/// each with an event, and the listener still serves no one. TCP and MPTCP
/// (which the agent cannot destroy: the fence refuses its clients).
#[test]
fn a_tenant_cannot_take_the_fence_down() {
    require_root!();
    let Some((cg, agent)) = fencing_host("guard-unfence") else {
        return;
    };
    for proto in ["tcp", "mptcp"] {
        let r = Probe::in_cgroup(&cg)
            .unfence()
            .serve()
            .run(&["listen-unbound", proto, "4"]);
        r.assert_ok();
        assert_eq!(
            r.unfence.as_deref(),
            Some(&["EPERM".to_owned(), "EPERM".to_owned()][..]),
            "{proto}: {r:?}"
        );
        assert_eq!(r.served, Some(false), "{proto}: {r:?}");
        assert_eq!(r.client.as_deref(), Some("ECONNREFUSED"), "{proto}: {r:?}");
        let listen = agent.wait_event(&[("pid", json!(r.pid)), ("hook", json!("listen"))]);
        assert_eq!(listen["verdict"], "cut_off");
        let refused = agent.events_matching(
            &[("pid", json!(r.pid)), ("hook", json!("setsockopt"))],
            Duration::from_secs(2),
        );
        assert_eq!(
            refused.len(),
            2,
            "one event per refused attempt: {refused:#?}"
        );
        for e in &refused {
            assert_eq!(e["verdict"], "deny", "{e}");
            assert_eq!(e["port"], r.port, "{e}");
            assert_eq!(e["policy"], "svc", "{e}");
        }
    }
}

/// The fence cannot be set on a socket a process without `CAP_NET_RAW`
/// bound to a device itself (here: `lo`, as an unprivileged user) before
/// listen(): the kernel refuses to rebind it. The agent ends it instead, on
/// the event: a TCP listener is destroyed; an MPTCP listener, which the
/// kernel will not destroy, gets the packet guard, attached to the root; a
/// fence failure keeps it attached for the rest of the agent's run. What a
/// client gets once the agent has acted: refused (TCP) or nothing (MPTCP:
/// its SYNs are dropped).
/// Between listen() and the agent's action (milliseconds), such a listener
/// is reachable through its device: docs/enforcement.md.
#[test]
fn a_socket_that_cannot_be_fenced_is_ended_by_the_agent() {
    require_root!();
    let Some((cg, agent)) = fencing_host("guard-nofence") else {
        return;
    };
    for (proto, action, client) in [
        ("tcp", "destroyed", "ECONNREFUSED"),
        ("mptcp", "dropped", "timeout"),
    ] {
        let r = Probe::in_cgroup(&cg)
            .uid(65534)
            .bind_device("lo")
            .serve_after(1000)
            .run(&["listen-unbound", proto, "4"]);
        r.assert_ok();
        let e = only_event(&agent, &r, "listen");
        assert_eq!(e["verdict"], "cut_off", "{e}");
        assert_eq!(e["action"], action, "{proto}: {e}\n{}", agent.stderr());
        assert_eq!(r.served, Some(false), "{proto}: {r:?}");
        assert_eq!(r.client.as_deref(), Some(client), "{proto}: {r:?}");
    }
    assert_eq!(metric(&agent, "portguard_fence_failures_total"), 2);
    assert!(
        metric(&agent, "portguard_guard_dropped_packets_total") > 0,
        "the MPTCP client's SYNs were dropped"
    );
    // A fence failure keeps the guard for the rest of the run: a socket
    // that could not be fenced may outlive its event (next test).
    assert!(
        agent
            .stderr()
            .contains("the packet guard stays attached for the rest of this run"),
        "{}",
        agent.stderr()
    );
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        !agent.stderr().contains("packet guard detached"),
        "{}",
        agent.stderr()
    );
}

/// An unfenceable listener (bound to `lo` by a process without
/// `CAP_NET_RAW`) made by `probe`, whose listen() is called by a child that
/// exits at once while the probe keeps the socket (and serves on it, as
/// `probe` says). The agent is held (SIGSTOP) until the child has listened
/// and exited, so the task its event names is gone when it looks: the race
/// the attacker wins when the agent is slow, made certain.
fn orphaned_listener(agent: &Agent, probe: Probe) -> ProbeResult {
    let agent_pid = agent.pid();
    // SAFETY: signalling the agent process this test started.
    unsafe { libc::kill(agent_pid, libc::SIGSTOP) };
    std::thread::scope(|scope| {
        let probe = scope.spawn(|| {
            probe
                .bind_device("lo")
                .listen_in_child(65534)
                .run(&["listen-unbound", "tcp", "4"])
        });
        std::thread::sleep(Duration::from_millis(500));
        // SAFETY: as above.
        unsafe { libc::kill(agent_pid, libc::SIGCONT) };
        probe.join().unwrap()
    })
}

/// The same unfenceable listener, but listen() is called by a child that
/// exits at once, while its parent keeps the socket and serves on it: by
/// the time the agent reads the event, the task it names is gone and the
/// socket cannot be looked up in its namespace (`action: closed`). The
/// fence failure alone brought the packet guard, so the parent's clients
/// still get nothing.
#[test]
fn an_unfenceable_listener_that_outlives_its_task_is_starved() {
    require_root!();
    let Some((cg, agent)) = fencing_host("guard-orphan") else {
        return;
    };
    let r = orphaned_listener(&agent, Probe::in_cgroup(&cg).serve_after(1500));
    let e = agent.wait_event(&[("port", json!(r.port)), ("hook", json!("listen"))]);
    assert_eq!(e["verdict"], "cut_off", "{e}");
    assert_eq!(e["action"], "closed", "{e}");
    assert_ne!(e["pid"], json!(r.pid), "the child listened: {e}");
    assert_eq!(r.served, Some(false), "{r:?}\n{}", agent.stderr());
    assert_eq!(r.client.as_deref(), Some("timeout"), "{r:?}");
    assert_eq!(metric(&agent, "portguard_fence_failures_total"), 1);
    assert!(metric(&agent, "portguard_guard_dropped_packets_total") > 0);
}

/// The orphaned, unfenceable listener above, with its option memory filled
/// first so that the kernel program cannot mark it for the packet guard
/// either: the agent, finding the task its event names gone, cannot know
/// the socket is, and has the socket inventory look for it at once (within
/// its 500 ms gap), which ends it.
#[test]
fn an_orphaned_listener_that_cannot_be_marked_is_found_and_ended() {
    require_root!();
    let Some((cg, agent)) = fencing_host("guard-orphan-nomark") else {
        return;
    };
    let r = orphaned_listener(
        &agent,
        Probe::in_cgroup(&cg).fill_optmem().serve_after(3000),
    );
    let e = agent.wait_event(&[("port", json!(r.port)), ("hook", json!("listen"))]);
    assert_eq!(e["action"], "closed", "{e}");
    assert_eq!(
        r.served,
        Some(false),
        "a client was served by an orphaned listener the policy does not allow: {r:?}\n{}",
        agent.stderr()
    );
    let e = agent.wait_event(&[("port", json!(r.port)), ("hook", json!("inventory"))]);
    assert_eq!(e["action"], "destroyed", "{e}");
}

/// `ephemeral` means "a port the kernel chose", inside the host's range: an
/// unbound listener is served; an explicitly bound one outside the policy
/// is not, and neither is a socket bound by an ungoverned process and handed
/// in (SCM_RIGHTS), even on a port inside the ephemeral range.
#[test]
fn ephemeral_never_allows_a_port_someone_asked_for() {
    require_root!();
    let (cg, agent) = governed(
        "guard-eph",
        "eph",
        "bind: [{ports: [ephemeral, 8080], protocol: tcp}]",
    );
    let denied = agent.listen_denied();
    let p = Probe::in_cgroup(&cg).serve();
    // The kernel's own choice: served, silent.
    let r = p.run(&["listen-unbound", "tcp", "4"]);
    r.assert_ok();
    assert_eq!(r.served, Some(true), "{r:?}");
    assert!((32768..=60999).contains(&r.port), "{r:?}");
    // Handed in, bound by someone else: outside and inside the host's range.
    let dir = cg.fs.display().to_string();
    for port in ["2222", "40000"] {
        let r =
            Probe::outside()
                .serve()
                .run(&["handoff", "listen", "tcp", "127.0.0.1", port, &dir]);
        assert_cut_off(&agent, denied, &r, Some(port.parse().unwrap()), "destroyed");
    }
    // The policy's own port, handed in, serves.
    let r = Probe::outside()
        .serve()
        .run(&["handoff", "listen", "tcp", "127.0.0.1", "8080", &dir]);
    r.assert_ok();
    assert_eq!(r.served, Some(true), "{r:?}");
    assert!(
        agent
            .events_matching(&[("port", json!(8080))], Duration::from_millis(300))
            .is_empty()
    );
}

/// A workload that owns its network namespace narrows
/// `net.ipv4.ip_local_port_range` onto a port its policy does not allow,
/// then sends from an unbound UDP socket: the autobind takes that port. The
/// send is denied and the socket gets nothing on the port (it is fenced: a
/// datagram from an allowed port in the same namespace finds no socket),
/// and the agent destroys it. A
/// client in a namespace with the default range keeps working: its send
/// goes out and the datagram sent back to its port arrives.
#[test]
fn a_udp_autobind_inside_a_narrowed_range_is_denied() {
    require_root!();
    let (cg, agent) = svc_8080("guard-udp");
    for dest in ["127.0.0.1", "::1"] {
        let r =
            Probe::in_cgroup(&cg)
                .port_range(8081, 8081)
                .run(&["autobind-udp", dest, "9", "8080"]);
        r.assert_eperm();
        assert_eq!(r.received, Some(false), "{r:?}");
        let hook = if dest == "::1" {
            "sendmsg6"
        } else {
            "sendmsg4"
        };
        let e = only_event(&agent, &r, hook);
        // The probe reads the socket's port after the send; the agent may
        // have destroyed the socket (port released) by then. Either the
        // probe saw the narrowed range's port (and the socket fenced:
        // nothing received), or the agent had already ended it.
        assert!(
            r.port == 8081 || (r.port == 0 && e["action"] == "destroyed"),
            "the autobind took the narrowed range: {r:?}\n{e}"
        );
        assert_eq!(e["verdict"], "deny");
        assert_eq!(e["port"], 8081);
        assert_eq!(e["protocol"], "udp");
        assert_eq!(e["autobind"], true);
        // The probe may have closed it first.
        assert!(
            e["action"] == "destroyed" || e["action"] == "closed",
            "{e}\n{}",
            agent.stderr()
        );
    }
    // The host's range: a client's send and its reply work, silently.
    let r = Probe::in_cgroup(&cg).run(&["autobind-udp", "127.0.0.1", "9", "8080"]);
    r.assert_ok();
    assert_eq!(r.received, Some(true), "{r:?}");
    assert!(
        agent
            .events_matching(&[("pid", json!(r.pid))], Duration::from_millis(300))
            .is_empty()
    );
}

/// A UDP send that fails before the sendmsg hook runs (here: no
/// destination, EDESTADDRREQ; also port 0, MSG_OOB, an oversized
/// datagram) has already autobound the socket to a port of the narrowed
/// range, and no program saw it. The connect() that follows judges that
/// port as a bind: denied, the socket is cut off, and the peer it connected
/// to reaches nothing on the port.
#[test]
fn a_udp_autobind_by_a_send_that_fails_before_its_hook_is_judged_at_connect() {
    require_root!();
    let (cg, agent) = svc_8080("guard-udp-nodest");
    for dest in ["127.0.0.1", "::1"] {
        let r = Probe::in_cgroup(&cg).port_range(8081, 8081).run(&[
            "autobind-udp",
            dest,
            "9",
            "8080",
            "nodest",
        ]);
        r.assert_eperm();
        assert_eq!(r.received, Some(false), "{r:?}");
        let hook = if dest == "::1" {
            "connect6"
        } else {
            "connect4"
        };
        let e = only_event(&agent, &r, hook);
        assert_eq!(e["verdict"], "deny");
        assert_eq!(e["port"], 8081);
        assert_eq!(e["protocol"], "udp");
        assert_eq!(e["autobind"], true);
    }
}

/// A send to a denied destination from a socket the kernel autobinds in a
/// narrowed range: the send is denied either way, and the socket's port is
/// judged too (first): it must not be left holding a port outside the
/// policy, receiving on it.
#[test]
fn a_udp_autobind_on_a_send_to_a_denied_destination_keeps_no_port() {
    require_root!();
    // The probe's second socket sends from 8080 to the first one's port
    // (8081): allowed, so that only the first socket's state decides.
    let (cg, agent) = governed(
        "guard-udp-denied-dest",
        "svc",
        "bind: [{ports: [8080]}], connect: [{ports: [53, 8081]}]",
    );
    for dest in ["127.0.0.1", "::1"] {
        let r =
            Probe::in_cgroup(&cg)
                .port_range(8081, 8081)
                .run(&["autobind-udp", dest, "9", "8080"]);
        r.assert_eperm();
        assert_eq!(
            r.received,
            Some(false),
            "the socket kept its port after a denied send: {r:?}"
        );
        let hook = if dest == "::1" {
            "sendmsg6"
        } else {
            "sendmsg4"
        };
        let e = only_event(&agent, &r, hook);
        assert_eq!(e["verdict"], "deny");
        assert_eq!(e["port"], 8081, "{e}");
        assert_eq!(e["autobind"], true, "{e}");
    }
}

/// A bind to port 0 is judged by post_bind on the port the kernel picks,
/// through a flag in socket storage. A tenant can leave no room for that
/// storage (its socket's option memory filled with TCP MD5 keys), and then
/// pick where the kernel's choice falls (its namespace's range narrowed to
/// 8081): the bind is denied in bind4/bind6 then, even under a policy that
/// lists `ephemeral`.
#[test]
fn a_port_zero_bind_that_cannot_be_flagged_is_denied() {
    require_root!();
    let (cg, agent) = governed("guard-optmem", "svc", "bind: [{ports: [8080, ephemeral]}]");
    for (addr, hook) in [("127.0.0.1", "bind4"), ("::1", "bind6")] {
        let r = Probe::in_cgroup(&cg)
            .port_range(8081, 8081)
            .run(&["bind0-full-optmem", addr]);
        r.assert_eperm();
        let e = agent.wait_event(&[("pid", json!(r.pid)), ("hook", json!(hook))]);
        assert_eq!(e["verdict"], "deny", "{e}");
    }
    // With room for storage, the same bind is judged on the port picked:
    // 8081, not allowed.
    let r = Probe::in_cgroup(&cg)
        .port_range(8081, 8081)
        .run(&["bind", "tcp", "127.0.0.1", "0"]);
    r.assert_eperm();
    let e = agent.wait_event(&[("pid", json!(r.pid)), ("hook", json!("post_bind4"))]);
    assert_eq!(e["port"], 8081, "{e}");
}

/// A port-0 bind that fails after bind6 (an address not on the host) leaves
/// the socket's port-0 flag set; the next bind, to an explicit `[::]` port
/// inside the host's ephemeral range that the policy allows for IPv6 only,
/// races a thread clearing IPV6_V6ONLY. post_bind6 must not take that port
/// for one the kernel chose, which `ephemeral` in the IPv4 rules would let
/// be dual-stack.
#[test]
fn a_failed_port_zero_bind_lends_ephemeral_to_no_explicit_port() {
    require_root!();
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap();
    let low: u16 = range.split_whitespace().next().unwrap().parse().unwrap();
    let port = (low + 4343).to_string();
    let (cg, agent) = governed(
        "guard-leftover0",
        "v6",
        &format!("bind: [{{ports: [{port}], family: ipv6}}, {{ports: [ephemeral]}}]"),
    );
    let r = Probe::in_cgroup(&cg).run(&["v6only-race", &port, "100000", "leftover0"]);
    eprintln!("{r:?}");
    assert_eq!(r.dual, 0, "dual-stack sockets on an IPv6-only port: {r:?}");
    assert!(
        r.bound > 0 && r.eperm > 0,
        "the flipper never won or never lost: {r:?}"
    );
    agent.wait_event(&[("pid", json!(r.pid)), ("dual_stack", json!(true))]);
}

/// A ping socket's "port" is an ICMP ident the kernel picks (1, 2, ...),
/// which no bind hook judges: connect() judging a kernel-chosen source port
/// must leave it alone (ping sockets connect through connect4/6).
#[test]
fn a_ping_socket_connects_under_a_bind_policy() {
    require_root!();
    let (cg, agent) = svc_8080("guard-ping");
    let r = Probe::in_cgroup(&cg).run(&["ping-connect"]);
    r.assert_ok();
    assert!(
        agent
            .events_matching(&[("pid", json!(r.pid))], Duration::from_millis(300))
            .is_empty(),
        "a ping socket's connect was reported"
    );
}

/// bind6 judges the IPV6_V6ONLY it sees, but the kernel drops the socket
/// lock before the bind itself: a second thread clears the flag in between
/// and would turn a checked IPv6-only bind into a dual-stack one. post_bind6
/// reads the flag where the bind is final.
#[test]
fn clearing_v6only_during_bind_never_yields_a_dual_stack_socket() {
    require_root!();
    let (cg, agent) = governed(
        "guard-v6only",
        "v6",
        "bind: [{ports: [8443], family: ipv6}]",
    );
    let r = Probe::in_cgroup(&cg).run(&["v6only-race", "8443", "100000"]);
    assert_eq!(r.dual, 0, "dual-stack sockets on an IPv6-only port: {r:?}");
    // The race is real: both outcomes happened.
    assert!(
        r.bound > 0 && r.eperm > 0,
        "the flipper never won or never lost: {r:?}"
    );
    let e = agent.wait_event(&[("pid", json!(r.pid)), ("dual_stack", json!(true))]);
    assert_eq!(e["verdict"], "deny");
}

/// The same race with the second thread binding the socket too, dual-stack,
/// to an allowed port (P = 8080) or to the IPv6-only port itself (its bind
/// is denied): neither bind's judgement may stand in for the other's when
/// the first thread's bind ends up dual-stack.
#[test]
fn a_second_bind_racing_on_the_same_socket_lends_no_judgement() {
    require_root!();
    let (cg, agent) = governed(
        "guard-v6only-2",
        "v6",
        "bind: [{ports: [8443], family: ipv6}, {ports: [8080]}]",
    );
    for other in ["8080", "8443"] {
        let r =
            Probe::in_cgroup(&cg).run(&["v6only-race", "8443", "100000", &format!("bind={other}")]);
        eprintln!("second bind to {other}: {r:?}");
        assert_eq!(r.dual, 0, "dual-stack sockets on an IPv6-only port: {r:?}");
        assert!(r.bound > 0, "no bind to 8443 ever succeeded: {r:?}");
    }
    agent.wait_event(&[("dual_stack", json!(true)), ("port", json!(8443))]);
}

/// An allowed listener serves, before and after a reload; a client of the
/// host connecting to it is answered.
#[test]
fn an_allowed_listener_keeps_serving_through_a_reload() {
    require_root!();
    let cg = Cgroup::new("guard-reload");
    let policy = |extra: &str| {
        format!(
            "policies:\n  - {{name: svc, cgroup: {}, bind: [{{ports: [18081{extra}]}}]}}\n",
            cg.rel
        )
    };
    let mut agent = Agent::start(&policy(""));
    let (r, _held) =
        Probe::in_cgroup(&cg)
            .host_netns()
            .hold(&["hold", "tcp", "127.0.0.1", "18081"]);
    r.assert_ok();
    let connect = || {
        TcpStream::connect_timeout(
            &SocketAddr::from(([127, 0, 0, 1], 18081)),
            Duration::from_secs(2),
        )
    };
    connect().expect("served before the reload");
    agent.reload(&policy(", 18082"));
    connect().expect("served after the reload");
    assert!(
        agent
            .events_matching(&[("pid", json!(r.pid))], Duration::from_millis(300))
            .is_empty()
    );
}
