//! Where the decision programs run: only on the attach points (the parent
//! of each governed cgroup), never for a process outside them; a cgroup
//! created below a governed one is covered from its first instruction; a
//! governed subtree that appears later gets its point before it is
//! governed, and loses it when nothing below is governed any more (removed
//! cgroup, removed policy); a restart over pins switches each point's links
//! in place and drops the points the new policy no longer needs, with no
//! denied bind slipping through; a wrong pinned point link is replaced.

use std::{collections::HashSet, path::Path, process::Command, time::Duration};

use portguard_tests::{Agent, Cgroup, Loop, Probe, require_root};
use serde_json::{Value, json};

/// The decision programs portguard attaches on each point.
const DECISION: [&str; 9] = [
    "portguard_bind4",
    "portguard_bind6",
    "portguard_post_bind4",
    "portguard_post_bind6",
    "portguard_connect4",
    "portguard_connect6",
    "portguard_sendmsg4",
    "portguard_sendmsg6",
    "portguard_sock_create",
];

/// The programs in force in the cgroup at `fs` (bpftool's effective list:
/// attached there or on an ancestor), as (id, name).
fn effective(fs: &Path) -> Vec<(u64, String)> {
    let out = Command::new("bpftool")
        .args(["-j", "cgroup", "show"])
        .arg(fs)
        .arg("effective")
        .output()
        .expect("running bpftool (scripts/setup.sh installs it)");
    assert!(
        out.status.success(),
        "bpftool cgroup show {}: {}",
        fs.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| Some((p["id"].as_u64()?, p["name"].as_str()?.to_owned())))
        .collect()
}

/// The ids of the programs an agent pinned in `pin_dir` (its `progs/`).
/// Tests count only these, never every program of that name: another
/// agent on the host (a test running beside this one, or one a killed run
/// left pinned) may have its own programs on the root.
fn programs_of(pin_dir: &Path) -> HashSet<u64> {
    let progs = pin_dir.join("progs");
    let entries =
        std::fs::read_dir(&progs).unwrap_or_else(|e| panic!("reading {}: {e}", progs.display()));
    let ids: HashSet<u64> = entries
        .flatten()
        .filter_map(|e| {
            let out = Command::new("bpftool")
                .args(["-j", "prog", "show", "pinned"])
                .arg(e.path())
                .output()
                .ok()?;
            serde_json::from_slice::<Value>(&out.stdout).ok()?["id"].as_u64()
        })
        .collect();
    assert!(!ids.is_empty(), "no programs pinned in {}", progs.display());
    ids
}

/// How many of the decision programs of `ours` are in force at `fs`.
fn decision_programs_at(fs: &Path, ours: &HashSet<u64>) -> usize {
    let eff = effective(fs);
    DECISION
        .iter()
        .filter(|d| eff.iter().any(|(id, e)| e == *d && ours.contains(id)))
        .count()
}

/// The names of the programs of `ours` in force at `fs` (for messages).
fn ours_at(fs: &Path, ours: &HashSet<u64>) -> Vec<String> {
    effective(fs)
        .into_iter()
        .filter(|(id, _)| ours.contains(id))
        .map(|(_, n)| n)
        .collect()
}

/// bpftool's view of the link pinned at `pin` (`Null` when none is).
fn pinned_link(pin: &Path) -> Value {
    let out = Command::new("bpftool")
        .args(["-j", "link", "show", "pinned"])
        .arg(pin)
        .output()
        .expect("running bpftool");
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

fn status(agent: &Agent) -> Value {
    agent.ask(r#"{"request":"status"}"#)
}

fn points(agent: &Agent) -> Value {
    status(agent)["attach_points"].clone()
}

fn policy(cgs: &[&Cgroup]) -> String {
    let mut s = String::from("policies:\n");
    for (i, cg) in cgs.iter().enumerate() {
        s.push_str(&format!(
            "  - {{name: p{i}, cgroup: {}, bind: [{{ports: [8080]}}]}}\n",
            cg.rel
        ));
    }
    s
}

/// Poll `cond` for up to 10 s.
fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A governed cgroup runs every decision program (attached on its parent);
/// a process in an ungoverned top-level cgroup and the root itself run none
/// of them: only the host-wide fence keeper and listen checks. A cgroup
/// made below the governed one later is covered from its first
/// instruction, before the agent could notice it.
#[test]
fn decision_programs_run_only_where_a_policy_governs() {
    require_root!();
    let top = Cgroup::new("points");
    let gov = top.child("app");
    let free = Cgroup::new("points-free");
    let agent = Agent::start(&policy(&[&gov]));
    let ours = programs_of(agent.pin_dir.as_ref().unwrap());
    assert_eq!(points(&agent), json!([top.rel]));
    assert_eq!(
        decision_programs_at(&gov.fs, &ours),
        DECISION.len(),
        "{:?}",
        ours_at(&gov.fs, &ours)
    );
    assert_eq!(
        decision_programs_at(&free.fs, &ours),
        0,
        "{:?}",
        ours_at(&free.fs, &ours)
    );
    let root = free.fs.parent().unwrap();
    assert_eq!(
        decision_programs_at(root, &ours),
        0,
        "{:?}",
        ours_at(root, &ours)
    );
    assert!(
        ours_at(&free.fs, &ours)
            .iter()
            .any(|e| e == "portguard_setsockopt"),
        "the fence keeper stays host-wide: {:?}",
        ours_at(&free.fs, &ours)
    );

    let r = Probe::in_cgroup(&gov).run(&["bind", "tcp", "127.0.0.1", "8081"]);
    r.assert_eperm();
    assert_eq!(
        agent.wait_event(&[("pid", json!(r.pid))])["cgroup"],
        gov.rel
    );
    // Ungoverned: allowed, and no program of portguard judged it.
    let r = Probe::in_cgroup(&free).run(&["bind", "tcp", "127.0.0.1", "8081"]);
    r.assert_ok();

    // A child made now: its first bind is judged by its parent's policy
    // (the agent is stopped, so it cannot have noticed the new cgroup).
    let stopped = agent.stop_until_dropped();
    let late = gov.child("late");
    assert_eq!(decision_programs_at(&late.fs, &ours), DECISION.len());
    Probe::in_cgroup(&late)
        .run(&["bind", "udp", "::ffff:127.0.0.1", "8081"])
        .assert_eperm();
    drop(stopped);
}

/// A policy whose cgroup appears after start gets its attach point before
/// the cgroup is governed, and loses it once the cgroup is gone; a reload
/// that drops a policy detaches its point (and its pins), and the cgroup is
/// free again.
#[test]
fn points_follow_governed_subtrees_that_appear_and_go() {
    require_root!();
    let kept = Cgroup::new("points-kept");
    let later = Cgroup::planned("points-later");
    let app_rel = format!("{}/app", later.rel);
    let mut agent = Agent::start_with(
        &format!(
            "{}  - {{name: later, cgroup: {app_rel}, bind: [{{ports: [8080]}}]}}\n",
            policy(&[&kept])
        ),
        &["--rescan-interval", "1h"],
    );
    let pins = agent.pin_dir.clone().unwrap();
    let ours = programs_of(&pins);
    assert_eq!(points(&agent), json!([kept.rel]));

    later.create();
    let app = later.child("app");
    eventually("the new cgroup is governed", || {
        !Probe::in_cgroup(&app)
            .run(&["bind", "tcp", "127.0.0.1", "8081"])
            .ok
    });
    let r = Probe::in_cgroup(&app).run(&["bind", "tcp", "127.0.0.1", "8081"]);
    r.assert_eperm();
    agent.wait_event(&[("pid", json!(r.pid))]);
    let mut both = vec![kept.rel.clone(), later.rel.clone()];
    both.sort();
    assert_eq!(points(&agent), json!(both));
    let pin = pins
        .join("links")
        .join(format!("cg{}-portguard_bind4", later.id()));
    assert!(pin.exists(), "the new point is pinned");

    // The governed cgroup goes: its point goes with it.
    drop(app);
    eventually("the point of a removed cgroup is released", || {
        points(&agent) == json!([kept.rel])
    });
    assert!(!pin.exists(), "its pins are removed");
    // The kernel frees a link whose last pin went after an RCU grace period
    // (bpffs inodes) and on a workqueue: detached soon, not at once.
    eventually("the removed point's programs are detached", || {
        decision_programs_at(&later.fs, &ours) == 0
    });

    // A reload without `kept`'s policy detaches its point.
    agent.reload(&format!(
        "policies:\n  - {{name: later, cgroup: {app_rel}, bind: [{{ports: [8080]}}]}}\n"
    ));
    assert_eq!(points(&agent), json!([]));
    eventually("the dropped policy's point is detached", || {
        decision_programs_at(&kept.fs, &ours) == 0
    });
    assert!(
        !pins
            .join("links")
            .join(format!("cg{}-portguard_bind4", kept.id()))
            .exists()
    );
    Probe::in_cgroup(&kept)
        .run(&["bind", "tcp", "127.0.0.1", "8081"])
        .assert_ok();
}

/// A restart over the pins (after SIGKILL, with a policy file that dropped
/// one cgroup meanwhile): the kept point's links are the same links, switched
/// to the new agent's programs in place, while a denied-bind loop runs
/// throughout and never gets through; the dropped point is detached and its
/// pins removed.
#[test]
fn a_restart_over_pins_keeps_each_point_and_drops_stale_ones() {
    require_root!();
    let a_cg = Cgroup::new("points-restart-a");
    let b_cg = Cgroup::new("points-restart-b");
    let mut first = Agent::start(&policy(&[&a_cg, &b_cg]));
    let dir = first.pin_dir.clone().unwrap();
    let link = |cg: &Cgroup| {
        dir.join("links")
            .join(format!("cg{}-portguard_bind4", cg.id()))
    };
    let link_id = |cg: &Cgroup| pinned_link(&link(cg))["id"].clone();
    let mut ours = programs_of(&dir);
    assert_eq!(decision_programs_at(&b_cg.fs, &ours), DECISION.len());
    let before = link_id(&a_cg);
    assert!(before.is_u64(), "pinned link of the point {}", a_cg.rel);
    assert!(link(&b_cg).exists());

    let p = Probe::in_cgroup(&a_cg);
    let denied = Loop::counting(&p, &["bind", "tcp", "127.0.0.1", "8081"], 0);
    denied.wait_more(100);
    first.kill9();
    denied.wait_more(100);
    let second = Agent::start_with(&policy(&[&a_cg]), &["--pin-dir", dir.to_str().unwrap()]);
    ours.extend(programs_of(&dir));
    let log = second.stderr();
    assert!(
        log.contains("switched to this agent in place"),
        "the kept point is adopted:\n{log}"
    );
    denied.wait_more(200);
    let d = denied.finish_tally();
    eprintln!("restart: denied port {d:?}");
    assert_eq!(d.ok, 0, "denied binds got through during the restart");
    assert_eq!(link_id(&a_cg), before, "the same link, switched in place");
    assert_eq!(points(&second), json!([a_cg.rel]));
    assert!(!link(&b_cg).exists(), "the stale point's pins are removed");
    eventually("the stale point is detached", || {
        decision_programs_at(&b_cg.fs, &ours) == 0
    });
    Probe::in_cgroup(&b_cg)
        .run(&["bind", "tcp", "127.0.0.1", "8081"])
        .assert_ok();
}

/// A point's pinned link that is not what its name says (here: the other
/// point's link, pinned under this point's name while no agent ran, so this
/// point lost its own bind4) is found by the kernel's link info, not by the
/// pin's existence, and replaced: the point judges binds again, and the
/// other point keeps its link.
#[test]
fn a_wrong_pinned_point_link_is_replaced() {
    require_root!();
    let a_cg = Cgroup::new("points-repair-a");
    let b_cg = Cgroup::new("points-repair-b");
    let mut first = Agent::start(&policy(&[&a_cg, &b_cg]));
    let dir = first.pin_dir.clone().unwrap();
    let link = |cg: &Cgroup| {
        dir.join("links")
            .join(format!("cg{}-portguard_bind4", cg.id()))
    };
    let a_link = pinned_link(&link(&a_cg));
    assert_eq!(a_link["cgroup_id"], json!(a_cg.id()));
    first.kill9();
    // b's own bind4 link goes with its pin; a's link is pinned in its place.
    std::fs::remove_file(link(&b_cg)).unwrap();
    let st = Command::new("bpftool")
        .args(["link", "pin", "id", &a_link["id"].to_string()])
        .arg(link(&b_cg))
        .status()
        .unwrap();
    assert!(st.success(), "bpftool link pin");
    let r = Probe::in_cgroup(&b_cg).run(&["bind", "tcp", "127.0.0.1", "8081"]);
    r.assert_ok();

    let second = Agent::start_with(
        &policy(&[&a_cg, &b_cg]),
        &["--pin-dir", dir.to_str().unwrap()],
    );
    let log = second.stderr();
    assert!(log.contains("is not a link of portguard_bind4"), "{log}");
    assert_eq!(pinned_link(&link(&b_cg))["cgroup_id"], json!(b_cg.id()));
    assert_eq!(
        pinned_link(&link(&a_cg))["id"],
        a_link["id"],
        "a keeps its link"
    );
    let r = Probe::in_cgroup(&b_cg).run(&["bind", "tcp", "127.0.0.1", "8081"]);
    r.assert_eperm();
    assert_eq!(second.wait_event(&[("pid", json!(r.pid))])["hook"], "bind4");
    Probe::in_cgroup(&a_cg)
        .run(&["bind", "tcp", "127.0.0.1", "8081"])
        .assert_eperm();
}

/// A point removed while it is being attached (pods and units churn) is
/// skipped, never a failed apply: 300 times, a governed cgroup is made under
/// a new parent (a new point) and both are removed 4-8 ms later, 2-8 ms
/// apart, while the agent rescans on every change; no apply fails, and a stable governed
/// cgroup keeps denying throughout.
#[test]
fn a_point_removed_while_it_is_attached_never_fails_an_apply() {
    require_root!();
    let top = Cgroup::new("points-churn");
    let stable = Cgroup::new("points-churn-stable");
    let agent = Agent::start(&format!(
        "{}  - {{name: churn, cgroup: {}/r/gov, bind: [{{ports: [8080]}}]}}\n",
        policy(&[&stable]),
        top.rel
    ));
    let (r, gov) = (top.fs.join("r"), top.fs.join("r/gov"));
    for i in 0..300u64 {
        std::fs::create_dir(&r).unwrap();
        std::fs::create_dir(&gov).unwrap();
        std::thread::sleep(Duration::from_millis(4 + i % 5));
        std::fs::remove_dir(&gov).unwrap();
        std::fs::remove_dir(&r).unwrap();
        // Room for the agent's rescan to begin while the next one lives.
        std::thread::sleep(Duration::from_millis(2 + i % 7));
    }
    std::thread::sleep(Duration::from_millis(200));
    let log = agent.stderr();
    assert!(
        !log.contains("applying cgroup changes failed"),
        "an apply failed:\n{log}"
    );
    Probe::in_cgroup(&stable)
        .run(&["bind", "tcp", "127.0.0.1", "8081"])
        .assert_eperm();
    eprintln!(
        "points skipped as removed while attached: {}",
        log.matches("went away while the decision programs were attached")
            .count()
    );
}
