//! Which cgroups a policy governs: descendants (existing or created later),
//! not siblings; the nearest policy wins; forks and threads are covered; a
//! policy cgroup created (or recreated, or made below a recreated parent)
//! after the agent started is governed.

use std::time::{Duration, Instant};

use portguard_tests::{Agent, Cgroup, Probe, require_root};
use serde_json::json;

#[test]
fn child_cgroups_inherit_and_siblings_are_untouched() {
    require_root!();
    let parent = Cgroup::new("parent");
    let existing = parent.child("existing");
    let sibling = Cgroup::new("sibling");
    let agent = Agent::start(&format!(
        "policies:\n  - {{name: parent, cgroup: {}, bind: [{{ports: [8080]}}]}}\n",
        parent.rel
    ));
    // A child that existed before the agent started.
    let p = Probe::in_cgroup(&existing);
    p.run(&["bind", "tcp", "127.0.0.1", "8080"]).assert_ok();
    let r = p.run(&["bind", "tcp", "127.0.0.1", "8081"]);
    r.assert_eperm();
    let e = agent.wait_event(&[("pid", json!(r.pid))]);
    assert_eq!(e["cgroup"], existing.rel);
    assert_eq!(e["cgroup_id"], existing.id());
    assert_eq!(e["policy_cgroup"], parent.rel);
    assert_eq!(e["policy"], "parent");

    // A grandchild created after the agent started (a container started
    // later) is covered from its first instruction: no agent involvement.
    let late = parent.child("late");
    let deeper = late.child("deeper");
    Probe::in_cgroup(&deeper)
        .run(&["bind", "udp", "::1", "9999", "v6only"])
        .assert_eperm();

    // A sibling of the governed cgroup is untouched, and nothing is logged.
    let s = Probe::in_cgroup(&sibling);
    let r = s.run(&["bind", "tcp", "0.0.0.0", "8081"]);
    r.assert_ok();
    s.run(&["bind", "udp", "::", "0"]).assert_ok();
    assert!(
        agent
            .events_matching(&[("pid", json!(r.pid))], Duration::from_millis(300))
            .is_empty()
    );
}

#[test]
fn the_nearest_policy_wins() {
    require_root!();
    let parent = Cgroup::new("nearest");
    let own = parent.child("own");
    let other = parent.child("other");
    let agent = Agent::start(&format!(
        "policies:\n  - {{name: outer, cgroup: {}, bind: [{{ports: [8080]}}]}}\n  - {{name: inner, cgroup: {}, bind: [{{ports: [9090]}}]}}\n",
        parent.rel, own.rel
    ));
    let p = Probe::in_cgroup(&own);
    p.run(&["bind", "tcp", "127.0.0.1", "9090"]).assert_ok();
    let r = p.run(&["bind", "tcp", "127.0.0.1", "8080"]);
    r.assert_eperm();
    let e = agent.wait_event(&[("pid", json!(r.pid))]);
    assert_eq!(e["policy"], "inner");
    assert_eq!(e["policy_cgroup"], own.rel);
    let p = Probe::in_cgroup(&other);
    p.run(&["bind", "tcp", "127.0.0.1", "8080"]).assert_ok();
    let r = p.run(&["bind", "tcp", "127.0.0.1", "9090"]);
    r.assert_eperm();
    assert_eq!(
        agent.wait_event(&[("pid", json!(r.pid))])["policy"],
        "outer"
    );
}

#[test]
fn forked_children_and_second_threads_are_covered() {
    require_root!();
    let cg = Cgroup::new("forks");
    let agent = Agent::start(&format!(
        "policies:\n  - {{name: f, cgroup: {}, bind: [{{ports: [8080]}}], connect: [{{ports: [5000]}}]}}\n",
        cg.rel
    ));
    let forked = Probe::in_cgroup(&cg).fork();
    let r = forked.run(&["bind", "tcp", "127.0.0.1", "8081"]);
    r.assert_eperm();
    forked
        .run(&["bind", "tcp", "127.0.0.1", "8080"])
        .assert_ok();
    let e = agent.wait_event(&[("pid", json!(r.pid)), ("port", json!(8081))]);
    assert_eq!(e["tid"], r.tid);

    let threaded = Probe::in_cgroup(&cg).thread().listen("tcp:127.0.0.1:5001");
    let r = threaded.run(&["connect", "tcp", "127.0.0.1", "5001"]);
    r.assert_eperm();
    assert_ne!(r.pid, r.tid, "the operation ran on a second thread");
    let e = agent.wait_event(&[("tid", json!(r.tid))]);
    assert_eq!(e["pid"], r.pid);
    assert_eq!(e["hook"], "connect4");
    threaded
        .run(&["bind", "udp", "::1", "8081", "v6only"])
        .assert_eperm();
}

/// Wait until a bind of `port` in `cg` is denied; returns how long it took.
fn wait_governed(cg: &Cgroup, port: &str) -> Duration {
    let start = Instant::now();
    loop {
        let r = Probe::in_cgroup(cg).run(&["bind", "tcp", "127.0.0.1", port]);
        if !r.ok {
            r.assert_eperm();
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "cgroup {} never became governed",
            cg.rel
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_policy_cgroup_created_later_is_governed_when_it_appears() {
    require_root!();
    let parent = Cgroup::new("appears");
    let svc = parent.planned_child("svc");
    // A long rescan interval: only inotify can make this fast.
    let agent = Agent::start_with(
        &format!(
            "policies:\n  - {{name: later, cgroup: {}, bind: [{{ports: [8080]}}]}}\n",
            svc.rel
        ),
        &["--rescan-interval", "1h"],
    );
    assert!(
        agent.stderr().contains("does not exist yet"),
        "{}",
        agent.stderr()
    );
    svc.create();
    let took = wait_governed(&svc, "8081");
    eprintln!("cgroup governed {took:?} after it was created");
    assert!(took < Duration::from_secs(2), "took {took:?}");
    let first_id = svc.id();
    agent.wait_event(&[("cgroup_id", json!(first_id))]);

    // A service restart removes and recreates its cgroup (a new id): still governed.
    std::fs::remove_dir(&svc.fs).unwrap();
    svc.create();
    assert_ne!(svc.id(), first_id);
    let took = wait_governed(&svc, "8082");
    eprintln!("recreated cgroup governed {took:?} after it was created");
    agent.wait_event(&[("cgroup_id", json!(svc.id())), ("port", json!(8082))]);
}

/// An agent with a policy on `x`, which does not exist yet, and a rescan
/// interval long enough that only inotify can make it governed in time.
fn agent_for_planned(x: &Cgroup) -> Agent {
    let agent = Agent::start_with(
        &format!(
            "policies:\n  - {{name: below, cgroup: {}, bind: [{{ports: [8080]}}]}}\n",
            x.rel
        ),
        &["--rescan-interval", "1h"],
    );
    assert!(
        agent.stderr().contains("does not exist yet"),
        "{}",
        agent.stderr()
    );
    agent
}

/// `cgroup: /P/svc/x` watches `/P/svc` for `x`. A restart of `svc` removes
/// and makes it again, and cgroupfs tells a watch on the removed directory
/// nothing: only its parent hears of it. Without that, `x` made in the new
/// `svc` waited for `--rescan-interval`, ungoverned.
#[test]
fn a_policy_cgroup_below_a_recreated_parent_is_governed_when_it_appears() {
    require_root!();
    let parent = Cgroup::new("reparent");
    let svc = parent.child("svc");
    let x = svc.planned_child("x");
    let agent = agent_for_planned(&x);
    // `svc` restarted twice: the second time proves the first re-watch
    // holds the same way.
    for round in 0..2 {
        std::fs::remove_dir(&svc.fs).unwrap();
        svc.create();
        // Long enough for the rescan that `svc`'s own events ask for to be
        // over: only a watch on the new `svc` can tell of `x`.
        std::thread::sleep(Duration::from_millis(300));
        x.create();
        let took = wait_governed(&x, "8081");
        eprintln!(
            "round {round}: cgroup below a recreated parent governed {took:?} after it was made"
        );
        assert!(took < Duration::from_secs(2), "took {took:?}");
        agent.wait_event(&[("cgroup_id", json!(x.id())), ("port", json!(8081))]);
        std::fs::remove_dir(&x.fs).unwrap();
    }
}

/// The same, with the parent's parent removed and made again too, all
/// before the agent reads an event (held with SIGSTOP): the watch it kept
/// on that grandparent is on a dead inode, and only adding it again shows
/// it.
#[test]
fn a_policy_cgroup_below_two_recreated_levels_is_governed_when_it_appears() {
    require_root!();
    let top = Cgroup::new("regrand");
    let svc = top.child("svc");
    let x = svc.planned_child("x");
    let agent = agent_for_planned(&x);
    let pid = agent.pid();
    // SAFETY: signalling the agent process this test started.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    std::fs::remove_dir(&svc.fs).unwrap();
    std::fs::remove_dir(&top.fs).unwrap();
    top.create();
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    std::thread::sleep(Duration::from_millis(300));
    svc.create();
    std::thread::sleep(Duration::from_millis(300));
    x.create();
    let took = wait_governed(&x, "8081");
    eprintln!("cgroup below two recreated levels governed {took:?} after it was made");
    assert!(took < Duration::from_secs(2), "took {took:?}");
    agent.wait_event(&[("cgroup_id", json!(x.id())), ("port", json!(8081))]);
}

/// A reload that puts a `cgroup:` policy below a parent no policy named
/// before, in place of another (as many policies as before): that parent
/// is watched from the reload on (the watcher keeps the `cgroup:`
/// selectors' parents while the selectors are the same, and must see that
/// they are not), so the cgroup is governed when it appears, not at the
/// next `--rescan-interval`.
#[test]
fn a_cgroup_added_by_a_reload_below_a_new_parent_is_governed_when_it_appears() {
    require_root!();
    let first = Cgroup::new("watchfirst");
    let a = first.planned_child("a");
    let x = first.planned_child("x");
    let second = Cgroup::new("watchsecond");
    let b = second.planned_child("b");
    let line = |name: &str, cg: &Cgroup| {
        format!(
            "  - {{name: {name}, cgroup: {}, bind: [{{ports: [8080]}}]}}\n",
            cg.rel
        )
    };
    let mut agent = Agent::start_with(
        &format!("policies:\n{}{}", line("a", &a), line("x", &x)),
        &["--rescan-interval", "1h"],
    );
    // Another cgroup change first, so the watcher computes what it watches
    // again with the first policy set in force.
    a.create();
    wait_governed(&a, "8081");
    agent.reload(&format!("policies:\n{}{}", line("a", &a), line("b", &b)));
    std::thread::sleep(Duration::from_millis(300));
    b.create();
    let took = wait_governed(&b, "8081");
    eprintln!("cgroup under a parent a reload named governed {took:?} after it was made");
    assert!(took < Duration::from_secs(2), "took {took:?}");
    agent.wait_event(&[("cgroup_id", json!(b.id())), ("port", json!(8081))]);
}

#[test]
fn programs_can_be_attached_to_a_subtree_only() {
    require_root!();
    let scope = Cgroup::new("scope");
    let inside = scope.child("svc");
    let outside = Cgroup::new("outside");
    let agent = Agent::start_with(
        &format!(
            "policies:\n  - {{name: svc, cgroup: {}, bind: [{{ports: [8080]}}]}}\n",
            inside.rel
        ),
        &["--attach-cgroup", &scope.rel],
    );
    assert!(
        agent
            .stderr()
            .contains(&format!(" programs attached to {} ", scope.fs.display())),
        "{}",
        agent.stderr()
    );
    let r = Probe::in_cgroup(&inside).run(&["bind", "tcp", "127.0.0.1", "8081"]);
    r.assert_eperm();
    agent.wait_event(&[("pid", json!(r.pid))]);
    drop(agent);
    // A policy outside the attach point could never be enforced: refused.
    let err = match Agent::try_start(
        &format!(
            "policies:\n  - {{name: out, cgroup: {}, bind: []}}\n",
            outside.rel
        ),
        &["--attach-cgroup", &scope.rel],
    ) {
        Ok(_) => panic!("the agent accepted a policy outside its attach point"),
        Err(e) => e,
    };
    assert!(
        err.contains("could not be enforced") && err.contains("`out`"),
        "{err}"
    );
}

/// An attacker who can make cgroups where the agent watches (a delegated
/// subtree, a runtime it controls) floods inotify's queue, and meanwhile
/// removes and makes again the directory the agent watches for a policy's
/// cgroup: the events that said so are lost (the kernel queues one
/// overflow event instead), and the agent's watch is left on the removed
/// directory, deaf. On the overflow the agent must watch every directory
/// anew, or the cgroup the policy names, made there later, waits for
/// `--rescan-interval` (1 h here). The flood is made while the agent is
/// stopped (SIGSTOP), so it cannot drain the queue meanwhile.
#[test]
fn after_an_inotify_overflow_a_watched_directory_made_again_is_watched_anew() {
    require_root!();
    let parent = Cgroup::new("overflow");
    let mid = parent.child("mid");
    let svc = mid.planned_child("svc");
    let agent = Agent::start_with(
        &format!(
            "policies:\n  - {{name: svc, cgroup: {}, bind: [{{ports: [8080]}}]}}\n",
            svc.rel
        ),
        &["--rescan-interval", "1h"],
    );
    let limit: usize = std::fs::read_to_string("/proc/sys/fs/inotify/max_queued_events")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(16384);
    {
        let _stopped = agent.stop_until_dropped();
        // Two events (create, delete) each: more than the queue holds.
        for i in 0..limit / 2 + 64 {
            let junk = mid.fs.join(format!("junk{i}"));
            std::fs::create_dir(&junk).expect("making a cgroup");
            std::fs::remove_dir(&junk).expect("removing it");
        }
        std::fs::remove_dir(&mid.fs).expect("removing the watched directory");
        std::fs::create_dir(&mid.fs).expect("making it again");
    }
    // The backlog read, and the rescan it asks for done.
    std::thread::sleep(Duration::from_millis(1000));
    assert!(
        agent.stderr().contains("inotify queue overflowed"),
        "{}",
        agent.stderr()
    );
    svc.create();
    let took = wait_governed(&svc, "8081");
    eprintln!("cgroup made after an inotify overflow governed {took:?} after it was made");
    assert!(took < Duration::from_secs(2), "took {took:?}");
    agent.wait_event(&[("cgroup_id", json!(svc.id())), ("port", json!(8081))]);
}
