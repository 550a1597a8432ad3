//! The inventory finds the sockets no hook judged by the cgroup the kernel
//! says made them, in every network namespace on the host: also when the
//! agent runs in a cgroup namespace of its own (as in the DaemonSet's pod,
//! where `/proc/<pid>/cgroup` reads `/../..`), when the socket's process
//! moved to another network namespace, and when no process holds the socket
//! at all (only in flight in SCM_RIGHTS). What breaks an enforcing policy is
//! ended, not only reported; and a pass runs every --inventory-interval. A
//! listener a hook cut off while a pass ran is reported once, by its hook;
//! one whose cut-off event was lost is ended by the next pass.

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

/// A listener a hook cuts off while an inventory pass lists the host's
/// sockets is its hook's to report and end: one `cut_off` event, never a
/// second `preexisting` one from the inventory (which used to find it alive,
/// its event still queued behind the pass, and end it first: two events,
/// the hook's with `action: closed`). A workload makes 200 autobound
/// listeners outside its policy back to back, each kept 30 ms, while the
/// agent runs an inventory pass every 500 ms (the least gap between two).
#[test]
fn a_listener_cut_off_during_a_pass_is_reported_once() {
    require_root!();
    let cg = Cgroup::new("inventory-race");
    let agent = Agent::start_with(
        &format!(
            "policies:\n  - {{name: svc, cgroup: {}, bind: [{{ports: [8080]}}]}}\n",
            cg.rel
        ),
        &["--inventory-interval", "10ms"],
    );
    if agent.listen_denied() {
        eprintln!("skipped: the BPF LSM denies listen() itself here; nothing is ever cut off");
        return;
    }
    let passes = |a: &Agent| a.stderr().matches("daemon: inventory: ").count();
    let before = passes(&agent);
    let out = Probe::in_cgroup(&cg)
        .serve_after(30)
        .spawn_loop(&["listen-unbound", "tcp", "4"], 200, 0)
        .wait_with_output()
        .expect("running the listen loop");
    let during = passes(&agent) - before;
    std::thread::sleep(Duration::from_millis(500));
    let listens = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("\"ok\":true"))
        .count();
    let events = agent.events();
    let cut_off = events
        .iter()
        .filter(|e| e["verdict"] == "cut_off" && e["hook"] == "listen")
        .count();
    let twice: Vec<_> = events
        .iter()
        .filter(|e| e["verdict"] == "preexisting")
        .collect();
    eprintln!(
        "{listens} cut-off listeners, {cut_off} cut_off events, {during} inventory passes, {} reported again",
        twice.len()
    );
    assert!(during >= 4, "only {during} inventory passes ran meanwhile");
    assert_eq!(listens, 200, "every listen() succeeds (and is cut off)");
    assert!(
        twice.is_empty(),
        "the inventory reported cut-off listeners again: {twice:?}"
    );
    assert_eq!(cut_off, listens, "one cut_off event per listener");
    assert!(
        events
            .iter()
            .filter(|e| e["verdict"] == "cut_off")
            .all(|e| e["action"] == "destroyed"),
        "every cut-off listener is destroyed by the agent"
    );
}

/// The other side of [`a_listener_cut_off_during_a_pass_is_reported_once`]:
/// a listener whose `cut_off` event the kernel could not queue (the ring was
/// full) is the inventory's. It stays fenced (serves no one) until the next
/// pass, which reports it (`preexisting`, from the inventory) and ends it.
/// The agent is stopped while a denial loop fills its 4 KiB ring and the
/// listener is made; it resumes with the listener's event lost.
#[test]
fn a_listener_whose_cut_off_event_was_lost_is_ended_by_the_next_pass() {
    require_root!();
    let cg = Cgroup::new("inventory-lost");
    let agent = Agent::start_with(
        &format!(
            "policies:\n  - {{name: svc, cgroup: {}, bind: [{{ports: [8080]}}]}}\n",
            cg.rel
        ),
        &[
            "--ring-buffer-size",
            "4096",
            "--inventory-interval",
            "1s",
            "--lost-report-interval",
            "1s",
        ],
    );
    if agent.listen_denied() {
        eprintln!("skipped: the BPF LSM denies listen() itself here; nothing is ever cut off");
        return;
    }
    let stopped = agent.stop_until_dropped();
    let fill = Probe::in_cgroup(&cg)
        .spawn_loop(&["bind", "tcp", "127.0.0.1", "8081"], 300, 0)
        .wait_with_output()
        .expect("running the denial loop");
    assert_eq!(
        String::from_utf8_lossy(&fill.stdout)
            .matches("\"errno\":1,")
            .count(),
        300,
        "every bind of the loop is denied"
    );
    let p = Probe::in_cgroup(&cg).serve_after(4000);
    let listener = std::thread::spawn(move || p.run(&["listen-unbound", "tcp", "4"]));
    std::thread::sleep(Duration::from_millis(500));
    drop(stopped);
    let r = listener.join().expect("the listener's probe");
    r.assert_ok();
    let events = agent.events();
    assert!(
        events
            .iter()
            .any(|e| e["lost"].as_u64().is_some_and(|n| n > 0)),
        "the ring overflowed while the agent was stopped: {events:?}"
    );
    let mine: Vec<_> = events.iter().filter(|e| e["pid"] == json!(r.pid)).collect();
    assert!(
        !mine.iter().any(|e| e["verdict"] == "cut_off"),
        "the listener's cut_off event was lost: {mine:?}"
    );
    let found = agent.wait_event(&[("pid", json!(r.pid)), ("verdict", json!("preexisting"))]);
    assert_eq!(found["hook"], "inventory", "{found}");
    assert_eq!(found["action"], "destroyed", "{found}");
    assert_eq!(found["port"], json!(r.port), "{found}");
    assert_eq!(
        r.served,
        Some(false),
        "the cut-off listener served a client: {r:?}"
    );
}
