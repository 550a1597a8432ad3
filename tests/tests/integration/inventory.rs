//! The inventory finds the sockets no hook judged by the cgroup the kernel
//! says made them, in every network namespace on the host: also when the
//! agent runs in a cgroup namespace of its own (as in the DaemonSet's pod,
//! where `/proc/<pid>/cgroup` reads `/../..`), when the socket's process
//! moved to another network namespace, and when no process holds the socket
//! at all (only in flight in SCM_RIGHTS). What breaks an enforcing policy is
//! ended, not only reported; and a pass runs every --inventory-interval.

use std::{
    net::TcpStream,
    time::{Duration, Instant},
};

use portguard_tests::{Agent, Cgroup, Probe, cgroup2_root, require_root};
use serde_json::json;

/// `portguard run`, started from inside `home` in a new cgroup namespace
/// rooted there (what a pod's container gets on a cgroup v2 node).
fn in_own_cgroup_namespace(home: &Cgroup) -> Vec<String> {
    vec![
        "sh".into(),
        "-c".into(),
        format!(
            "echo $$ > {}/cgroup.procs && exec unshare --cgroup \"$@\"",
            home.fs.display()
        ),
        "sh".into(),
    ]
}

#[test]
fn the_inventory_finds_sockets_by_their_cgroup_from_the_agents_own_cgroup_namespace() {
    require_root!();
    let cg = Cgroup::new("inventory");
    // Made before the agent starts, so no hook judged them.
    let (plain, _h1) = Probe::in_cgroup(&cg).hold(&["hold", "tcp", "0.0.0.0", "28081"]);
    // Made in the test's network namespace; then its process moved to a
    // network namespace of its own (the socket stays where it was made).
    let (moved, _h2) = Probe::in_cgroup(&cg).host_netns().hold(&[
        "hold",
        "tcp",
        "127.0.0.1",
        "28082",
        "unshare-net",
    ]);
    // Held by no process: in flight in SCM_RIGHTS only.
    let (flight, _h3) =
        Probe::in_cgroup(&cg).hold(&["hold", "udp", "0.0.0.0", "28083", "in-flight"]);
    for r in [&plain, &moved, &flight] {
        r.assert_ok();
    }
    assert!(TcpStream::connect("127.0.0.1:28082").is_ok());
    let home = Cgroup::new("inventory-agent");
    let agent = Agent::start_wrapped(
        &format!(
            "policies:\n  - {{name: inv, cgroup: {}, bind: [{{ports: [8080]}}]}}\n",
            cg.rel
        ),
        &[],
        &in_own_cgroup_namespace(&home),
    );
    // The agent really is in a cgroup namespace of its own: from inside
    // it, the agent's own cgroup is the root.
    assert_ne!(
        std::fs::read_link(format!("/proc/{}/ns/cgroup", agent.pid())).unwrap(),
        std::fs::read_link("/proc/self/ns/cgroup").unwrap()
    );
    let seen = std::process::Command::new("nsenter")
        .arg(format!("--cgroup=/proc/{}/ns/cgroup", agent.pid()))
        .args(["cat", &format!("/proc/{}/cgroup", plain.pid)])
        .output()
        .unwrap();
    let seen = String::from_utf8_lossy(&seen.stdout);
    assert!(
        seen.lines().any(|l| l.starts_with("0::/..")),
        "from the agent's namespace a workload's cgroup reads /..: {seen}"
    );

    let e = agent.wait_event(&[("port", json!(28081)), ("verdict", json!("preexisting"))]);
    assert_eq!(e["pid"], plain.pid, "{e}");
    assert_eq!(e["comm"], "pgprobe");
    assert_eq!(
        e["cgroup"], cg.rel,
        "the path comes from the kernel's id: {e}"
    );
    assert_eq!(e["policy"], "inv");
    assert_eq!(e["hook"], "inventory");
    assert_eq!(e["action"], "destroyed", "{e}");

    let e = agent.wait_event(&[("port", json!(28082)), ("verdict", json!("preexisting"))]);
    assert_eq!(e["pid"], moved.pid, "{e}");
    assert_eq!(e["action"], "destroyed", "{e}");
    assert!(
        TcpStream::connect("127.0.0.1:28082").is_err(),
        "the listener in the test's namespace is gone"
    );

    let e = agent.wait_event(&[("port", json!(28083)), ("verdict", json!("preexisting"))]);
    assert_eq!(e["pid"], 0, "no process holds it: {e}");
    assert_eq!(e["protocol"], "udp");
    assert_eq!(e["cgroup"], cg.rel);
    assert_eq!(e["action"], "destroyed", "{e}");
    // Each once.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        agent
            .events()
            .iter()
            .filter(|e| e["verdict"] == "preexisting")
            .count(),
        3
    );
    drop(agent);
}

/// A unit cgroup made where no watch sees it, after the agent started, with
/// a listener bound before any rescan governed it: the next periodic pass
/// (rescan, then inventory) finds it and ends it.
#[test]
fn a_periodic_pass_finds_what_was_bound_after_start() {
    require_root!();
    let pid = std::process::id();
    let slice_name = format!("pginv-{pid}.slice");
    let slice = Cgroup::existing(cgroup2_root().join(&slice_name), &format!("/{slice_name}"));
    // Not a slice: nothing watches what appears in it.
    let sub = slice.child("sub");
    let unit = format!("pginv-late-{pid}.service");
    let agent = Agent::start_with(
        &format!("policies:\n  - {{name: late, unit: {unit}, bind: [{{ports: [8080]}}]}}\n"),
        &["--rescan-interval", "1h", "--inventory-interval", "1s"],
    );
    let late = sub.child(&unit);
    let (held, _h) =
        Probe::in_cgroup(&late)
            .host_netns()
            .hold(&["hold", "tcp", "127.0.0.1", "28084"]);
    held.assert_ok();
    let started = Instant::now();
    let e = agent.wait_event(&[("port", json!(28084)), ("verdict", json!("preexisting"))]);
    eprintln!("found {:?} after the bind", started.elapsed());
    assert_eq!(e["pid"], held.pid);
    assert_eq!(e["policy"], "late");
    assert_eq!(e["unit"], unit.as_str());
    assert_eq!(e["action"], "destroyed", "{e}");
    assert!(TcpStream::connect("127.0.0.1:28084").is_err());
}
