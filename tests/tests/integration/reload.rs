//! Reloads: applied whole while a workload keeps trying, rejected whole when
//! invalid, triggered by SIGHUP or by a change of the file.

use std::time::Duration;

use portguard_tests::{Agent, Cgroup, ConfigMapVolume, Loop, Probe, require_root};
use serde_json::json;

fn policy(cg: &Cgroup, bind: &str) -> String {
    format!(
        "policies:\n  - name: svc\n    cgroup: {}\n    bind: {bind}\n",
        cg.rel
    )
}

#[test]
fn reload_tightens_then_loosens_under_a_running_workload() {
    require_root!();
    let cg = Cgroup::new("reload");
    let mut agent = Agent::start(&policy(&cg, "[{ports: [8080]}]"));
    let l = Loop::start(
        &Probe::in_cgroup(&cg),
        &["bind", "tcp", "127.0.0.1", "8080"],
        10,
    );
    l.wait_more(5);
    assert!(l.outcomes_since(0).iter().all(|ok| *ok), "allowed before");

    let status = agent.reload(&policy(&cg, "[{ports: [9090]}]"));
    assert!(status.contains("enforcing 1 policies"), "{status}");
    // Every attempt that starts after the reload is acknowledged is denied.
    let mark = l.count() + 1;
    l.wait_more(10);
    let after_tighten = l.outcomes_since(mark);
    assert!(after_tighten.iter().all(|ok| !ok), "{after_tighten:?}");

    agent.reload(&policy(&cg, "[{ports: [8080, 9090]}]"));
    let mark2 = l.count() + 1;
    l.wait_more(10);
    let after_loosen = l.outcomes_since(mark2);
    assert!(after_loosen.iter().all(|ok| *ok), "{after_loosen:?}");

    // Across the whole run the answer changed exactly twice: allow -> deny
    // -> allow. No flapping, no window with a half-applied policy.
    let all = l.outcomes_since(0);
    let flips = all.windows(2).filter(|w| w[0] != w[1]).count();
    assert_eq!(flips, 2, "{all:?}");
}

#[test]
fn an_invalid_reload_keeps_the_previous_policy() {
    require_root!();
    let cg = Cgroup::new("badreload");
    let mut agent = Agent::start(&policy(&cg, "[{ports: [8080]}]"));
    let status = agent.reload(&policy(&cg, r#"[{ports: [8080, "9100-9000"]}]"#));
    assert!(status.contains("reload failed"), "{status}");
    let err = agent.stderr();
    assert!(err.contains("previous policy stays in force"), "{err}");
    assert!(err.contains("inverted range"), "{err}");
    assert!(
        err.contains("policy.yaml:4:"),
        "error names file and line: {err}"
    );
    let p = Probe::in_cgroup(&cg);
    p.run(&["bind", "tcp", "127.0.0.1", "8080"]).assert_ok();
    p.run(&["bind", "tcp", "127.0.0.1", "9050"]).assert_eperm();
    // And a following valid reload still works.
    agent.reload(&policy(&cg, r#"[{ports: ["9000-9100"]}]"#));
    p.run(&["bind", "tcp", "127.0.0.1", "9050"]).assert_ok();
    p.run(&["bind", "tcp", "127.0.0.1", "8080"]).assert_eperm();
}

#[test]
fn a_reload_that_does_not_fit_the_maps_is_rejected_whole() {
    require_root!();
    let a = Cgroup::new("fit-a");
    let b = Cgroup::new("fit-b");
    let mut agent = Agent::start_with(
        &format!(
            "policies:\n  - {{name: a, cgroup: {}, bind: [{{ports: [8080]}}]}}\n",
            a.rel
        ),
        &["--max-cgroups", "1"],
    );
    let status = agent.reload(&format!(
        "policies:\n  - {{name: a, cgroup: {}, bind: [{{ports: [9090]}}]}}\n  - {{name: b, cgroup: {}, bind: []}}\n",
        a.rel, b.rel
    ));
    assert!(status.contains("reload failed"), "{status}");
    assert!(
        agent.stderr().contains("--max-cgroups"),
        "{}",
        agent.stderr()
    );
    // Nothing of the new policy applied: `a` keeps 8080, `b` stays ungoverned.
    let p = Probe::in_cgroup(&a);
    p.run(&["bind", "tcp", "127.0.0.1", "8080"]).assert_ok();
    p.run(&["bind", "tcp", "127.0.0.1", "9090"]).assert_eperm();
    Probe::in_cgroup(&b)
        .run(&["bind", "tcp", "127.0.0.1", "1234"])
        .assert_ok();
}

/// `--fail-closed`: a policy whose port sets do not fit the maps is not
/// left half-applied nor silently replaced by the previous one: every bind
/// in the cgroups it governs is denied, by a named stand-in policy, at start
/// and on reload, until a policy that fits is loaded.
#[test]
fn fail_closed_denies_binds_where_a_policy_could_not_be_applied() {
    require_root!();
    let cg = Cgroup::new("failclosed");
    // 2,000 scattered ports need 4 chunks per set; 1 chunk fits 8080 only.
    let wide = (0..2000)
        .map(|i| (10000 + i * 20).to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let fits = policy(&cg, "[{ports: [8080]}]");
    let too_big = policy(&cg, &format!("[{{ports: [8080, {wide}]}}]"));
    let flags = ["--max-port-chunks", "1", "--fail-closed"];
    let p = Probe::in_cgroup(&cg);

    // On reload: 8080 was allowed; now nothing is.
    let mut agent = Agent::start_with(&fits, &flags);
    p.run(&["bind", "tcp", "127.0.0.1", "8080"]).assert_ok();
    let (held, _h) = p.hold(&["hold", "tcp", "127.0.0.1", "8080"]);
    held.assert_ok();
    let status = agent.reload(&too_big);
    assert!(status.contains("FAIL-CLOSED"), "{status}");
    assert!(
        agent.stderr().contains("--max-port-chunks"),
        "{}",
        agent.stderr()
    );
    let r = p.run(&["bind", "tcp", "127.0.0.1", "8080"]);
    r.assert_eperm();
    let e = agent.wait_event(&[("port", json!(8080)), ("verdict", json!("deny"))]);
    assert_eq!(e["policy"], json!("portguard:fail-closed:svc"), "{e}");
    // The listener the real policy allowed is reported, not ended: the
    // stand-in cannot say what the policy that did not fit allows.
    let e = agent.wait_event(&[("pid", json!(held.pid)), ("verdict", json!("preexisting"))]);
    assert_eq!(e["policy"], json!("portguard:fail-closed:svc"), "{e}");
    assert!(e.get("action").is_none(), "{e}");
    // A policy that fits ends it.
    let status = agent.reload(&fits);
    assert!(status.contains("enforcing 1 policies"), "{status}");
    p.run(&["bind", "tcp", "127.0.0.1", "8080"]).assert_ok();
    drop(agent);

    // At start: runs (instead of exiting) and denies.
    let agent = Agent::start_with(&too_big, &flags);
    assert!(agent.stderr().contains("FAIL-CLOSED"), "{}", agent.stderr());
    p.run(&["bind", "tcp", "127.0.0.1", "8080"]).assert_eperm();
    drop(agent);
    // Without the flag the agent refuses to start on it, naming the flag.
    let err = match Agent::try_start(&too_big, &["--max-port-chunks", "1"]) {
        Ok(_) => panic!("started on a policy that does not fit"),
        Err(e) => e,
    };
    assert!(err.contains("--max-port-chunks"), "{err}");
}

#[test]
fn a_changed_policy_file_is_reloaded() {
    require_root!();
    let cg = Cgroup::new("watch");
    let mut agent = Agent::start_with(&policy(&cg, "[{ports: [8080]}]"), &["--watch"]);
    let p = Probe::in_cgroup(&cg);
    p.run(&["bind", "tcp", "127.0.0.1", "9090"]).assert_eperm();
    // Replace the file the way editors and config managers do (rename).
    let tmp = agent.dir.path().join("new.yaml");
    std::fs::write(&tmp, policy(&cg, "[{ports: [9090]}]")).unwrap();
    std::fs::rename(&tmp, &agent.policy).unwrap();
    agent.wait_ready(Duration::from_secs(10));
    p.run(&["bind", "tcp", "127.0.0.1", "9090"]).assert_ok();
    p.run(&["bind", "tcp", "127.0.0.1", "8080"]).assert_eperm();
    assert!(agent.stderr().contains("reloaded"), "{}", agent.stderr());
}

#[test]
fn a_configmap_update_is_reloaded() {
    require_root!();
    let cg = Cgroup::new("configmap");
    let mut volume = ConfigMapVolume::new(&policy(&cg, "[{ports: [8080]}]"));
    let mut agent = Agent::start_on_file(&volume.policy_path(), &["--watch"]);
    let p = Probe::in_cgroup(&cg);
    p.run(&["bind", "tcp", "127.0.0.1", "9090"]).assert_eperm();
    volume.update(&policy(&cg, "[{ports: [9090]}]"));
    agent.wait_ready(Duration::from_secs(10));
    p.run(&["bind", "tcp", "127.0.0.1", "9090"]).assert_ok();
    p.run(&["bind", "tcp", "127.0.0.1", "8080"]).assert_eperm();
    // A second update works too (the watch survives the swap).
    volume.update(&policy(&cg, "[{ports: [7070]}]"));
    agent.wait_ready(Duration::from_secs(10));
    p.run(&["bind", "tcp", "127.0.0.1", "7070"]).assert_ok();
    p.run(&["bind", "tcp", "127.0.0.1", "9090"]).assert_eperm();
}

/// 1,000 reloads while one process binds an allowed port and another a
/// denied one, back to back: every reload writes a new port set and flips
/// the generation, yet no allowed bind is ever denied and no denied bind is
/// ever allowed (a bind sees the old or the new policy whole, never a mix,
/// an empty map or a half-written bitmap).
#[test]
fn a_thousand_reloads_under_load_never_change_an_answer() {
    require_root!();
    let cg = Cgroup::new("reload1000");
    // Each version allows 8080 and one other port, different every time.
    let version = |i: u32| policy(&cg, &format!("[{{ports: [8080, {}]}}]", 20000 + i));
    let mut agent = Agent::start(&version(0));
    let p = Probe::in_cgroup(&cg);
    let allowed = Loop::counting(&p, &["bind", "tcp", "127.0.0.1", "8080"], 0);
    let denied = Loop::counting(&p, &["bind", "udp", "127.0.0.1", "8081"], 0);
    allowed.wait_more(50);
    denied.wait_more(50);
    let started = std::time::Instant::now();
    for i in 1..=1000 {
        let status = agent.reload(&version(i));
        assert!(
            status.contains("enforcing 1 policies"),
            "reload {i}: {status}"
        );
    }
    let took = started.elapsed();
    // The last version is in force (the reloads really happened).
    p.run(&["bind", "tcp", "127.0.0.1", "21000"]).assert_ok();
    p.run(&["bind", "tcp", "127.0.0.1", "20999"]).assert_eperm();
    let a = allowed.finish_tally();
    let d = denied.finish_tally();
    eprintln!("1000 reloads in {took:?}: allowed port {a:?}; denied port {d:?}");
    assert!(
        a.total() > 1000 && d.total() > 1000,
        "the loops kept running"
    );
    if a.eperm > 0 {
        let log = std::fs::read_to_string(&agent.log).unwrap_or_default();
        let denials: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("\"port\":8080,"))
            .take(10)
            .collect();
        panic!(
            "{} allowed binds denied during reloads; events: {denials:#?}",
            a.eperm
        );
    }
    assert_eq!(d.ok, 0, "denied binds allowed during reloads");
    assert_eq!(d.other, 0, "{:?}", d.other_samples);
    // A TCP bind back to back now and then meets EADDRINUSE (the previous
    // socket of the loop not yet gone): not a policy decision, but rare.
    assert!(
        a.other * 1000 < a.total(),
        "allowed binds failing otherwise: {:?}",
        a.other_samples
    );
}
