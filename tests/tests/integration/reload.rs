//! Reloads: applied whole while a workload keeps trying, rejected whole when
//! invalid, triggered by SIGHUP or by a change of the file.

use std::time::Duration;

use portguard_tests::{Agent, Cgroup, ConfigMapVolume, Loop, Probe, require_root};

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
