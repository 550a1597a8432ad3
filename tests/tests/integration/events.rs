//! The event stream: lost events are counted by the kernel and reported.

use std::time::{Duration, Instant};

use portguard_tests::{Agent, Cgroup, Probe, require_root};
use serde_json::json;

/// With the agent stopped (SIGSTOP) and a one-page ring buffer, a burst of
/// denials overflows the buffer. Every denial must be accounted for: either
/// delivered as an event or counted as lost and reported in a `lost` line.
#[test]
fn events_that_do_not_fit_are_counted_and_reported() {
    require_root!();
    let cg = Cgroup::new("storm");
    let agent = Agent::start_with(
        &format!(
            "policies:\n  - {{name: storm, cgroup: {}, bind: []}}\n",
            cg.rel
        ),
        &["--ring-buffer-size", "4096"],
    );
    agent.signal(libc::SIGSTOP);
    const N: usize = 500;
    let child = Probe::in_cgroup(&cg).spawn_loop(&["bind", "tcp", "127.0.0.1", "8080"], N, 0);
    let out = child.wait_with_output().unwrap();
    let denied = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(r#""error":"EPERM""#))
        .count();
    assert_eq!(
        denied, N,
        "every bind was denied while the agent was stopped"
    );
    agent.signal(libc::SIGCONT);

    let deadline = Instant::now() + Duration::from_secs(10);
    let (delivered, lost_total) = loop {
        let events = agent.events();
        let delivered = events
            .iter()
            .filter(|e| e.get("verdict") == Some(&json!("deny")))
            .count();
        let lost_lines: Vec<_> = events.iter().filter(|e| e.get("lost").is_some()).collect();
        let lost_total = lost_lines
            .last()
            .map_or(0, |e| e["lost_total"].as_u64().unwrap());
        let summed: u64 = lost_lines.iter().map(|e| e["lost"].as_u64().unwrap()).sum();
        assert_eq!(summed, lost_total, "lost deltas add up to the total");
        if delivered + lost_total as usize == N {
            break (delivered, lost_total);
        }
        assert!(
            Instant::now() < deadline,
            "delivered {delivered} + lost {lost_total} != {N}\n{}",
            agent.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(lost_total > 0, "a 4 KiB ring cannot hold {N} events");
    assert!(
        delivered > 0,
        "the queued events were delivered after SIGCONT"
    );
    let lost = agent
        .events()
        .into_iter()
        .find(|e| e.get("lost").is_some())
        .unwrap();
    assert!(lost["time"].is_string());
    assert!(
        agent.stderr().contains("the kernel dropped"),
        "{}",
        agent.stderr()
    );
}

/// SIGTERM detaches every program: the cgroup is unrestricted afterwards
/// (persisting enforcement across agent restarts is the reliability issue).
#[test]
fn stopping_the_agent_detaches_enforcement() {
    require_root!();
    let cg = Cgroup::new("detach");
    let mut agent = Agent::start(&format!(
        "policies:\n  - {{name: d, cgroup: {}, bind: []}}\n",
        cg.rel
    ));
    let p = Probe::in_cgroup(&cg);
    p.run(&["bind", "tcp", "127.0.0.1", "8080"]).assert_eperm();
    let status = agent.stop();
    assert!(status.success(), "clean exit on SIGTERM: {status}");
    assert!(agent.stderr().contains("detaching programs"));
    p.run(&["bind", "tcp", "127.0.0.1", "8080"]).assert_ok();
}
