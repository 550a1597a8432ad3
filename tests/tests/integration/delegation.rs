//! A cgroup's *name* is not proof of who it is: a user a subtree was
//! delegated to (systemd's `user@UID.service`, `Delegate=yes`) can create a
//! cgroup with any name in it. `unit:` and `pods:` policies, which select by
//! name, skip such subtrees unless they say `delegated: govern`; those that
//! opt in are bounded per subtree, served after root's subtrees, and held
//! fail-closed when over the bound.

use std::{
    os::unix::process::CommandExt as _,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use portguard_tests::{Agent, Cgroup, Probe, cgroup2_root, portguard, require_root};
use serde_json::{Value, json};

const NOBODY: u32 = 65534;

/// Delegate `cg` to uid 65534 the way systemd does (`Delegate=yes`): the
/// directory and its `cgroup.procs`, `cgroup.subtree_control` and
/// `cgroup.threads` belong to the user.
fn delegate(cg: &Cgroup) {
    std::os::unix::fs::chown(&cg.fs, Some(NOBODY), Some(NOBODY)).unwrap();
    for f in ["cgroup.procs", "cgroup.subtree_control", "cgroup.threads"] {
        std::os::unix::fs::chown(cg.fs.join(f), Some(NOBODY), Some(NOBODY)).unwrap();
    }
}

/// `mkdir -p` as uid 65534, as the user who owns the subtree would.
fn mkdir_as_nobody(dir: &Path) {
    let out = Command::new("mkdir")
        .arg("-p")
        .arg(dir)
        .uid(NOBODY)
        .gid(NOBODY)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "uid {NOBODY} could not mkdir {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn status(agent: &Agent) -> Value {
    let (code, out, err) = portguard(&[
        "status",
        "--json",
        "--socket",
        agent.status_socket().to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).unwrap()
}

#[test]
fn a_unit_name_made_in_a_delegated_subtree_does_not_earn_the_units_policy() {
    require_root!();
    let pid = std::process::id();
    let slice_name = format!("pgdeleg-{pid}.slice");
    let slice = Cgroup::existing(cgroup2_root().join(&slice_name), &format!("/{slice_name}"));
    let unit = format!("pgdeleg-nginx-{pid}.service");
    // The real unit, made by root (systemd).
    let real = slice.child(&unit);
    // A user's manager, delegated; the user names a cgroup after the unit.
    let home = slice.child(&format!("user@{NOBODY}.service"));
    delegate(&home);
    mkdir_as_nobody(&home.fs.join("app.slice").join(&unit));
    let claimed = Cgroup::existing(
        home.fs.join("app.slice").join(&unit),
        &format!("{}/app.slice/{unit}", home.rel),
    );
    let policy = |delegated: &str| {
        format!(
            "policies:\n  - {{name: users, cgroup: {}, bind: []}}\n  - {{name: nginx, unit: {unit}, bind: [{{ports: [8088]}}]{delegated}}}\n",
            slice.rel
        )
    };
    let agent = Agent::start(&policy(""));
    // The real unit has its policy.
    Probe::in_cgroup(&real)
        .run(&["bind", "tcp", "127.0.0.1", "8088"])
        .assert_ok();
    // The claimed one keeps the stricter policy above it.
    let r = Probe::in_cgroup(&claimed).run(&["bind", "tcp", "127.0.0.1", "8088"]);
    r.assert_eperm();
    let e = agent.wait_event(&[("pid", json!(r.pid)), ("port", json!(8088))]);
    assert_eq!(e["policy"], "users", "{e}");
    assert_eq!(e["policy_cgroup"], slice.rel.as_str());
    assert!(
        agent.stderr().contains(&format!(
            "selects 1 cgroups in {}, a subtree a user other than root may write",
            home.rel
        )),
        "the skip is logged:\n{}",
        agent.stderr()
    );
    let doc = status(&agent);
    assert_eq!(doc["delegated"]["skipped"], 1, "{doc}");
    let metrics = agent.metrics_text();
    assert!(
        metrics.contains("portguard_delegated_cgroups_left_out{reason=\"skipped\"} 1"),
        "{metrics}"
    );
    drop(agent);

    // `delegated: govern` opts in.
    let agent = Agent::start(&policy(", delegated: govern"));
    let r = Probe::in_cgroup(&claimed).run(&["bind", "tcp", "127.0.0.1", "8088"]);
    r.assert_ok();
    assert_eq!(status(&agent)["delegated"]["skipped"], 0);
}

/// One user makes many cgroups named after an opted-in unit, after the agent
/// started: at most --max-delegated-cgroups of them are governed, the real
/// unit (root's) keeps its place in a small map, and under --fail-closed the
/// subtree with cgroups over the bound is held (every bind denied).
#[test]
fn a_flood_of_delegated_names_is_bounded_and_held_fail_closed_on_rescan() {
    require_root!();
    let pid = std::process::id();
    let slice_name = format!("pgflood-{pid}.slice");
    let slice = Cgroup::existing(cgroup2_root().join(&slice_name), &format!("/{slice_name}"));
    let unit = format!("pgflood-web-{pid}.service");
    let home = slice.child(&format!("user@{NOBODY}.service"));
    delegate(&home);
    let agent = Agent::start_with(
        &format!(
            "policies:\n  - {{name: users, cgroup: {}, bind: [{{ports: [8089]}}]}}\n  - {{name: web, unit: {unit}, delegated: govern, bind: [{{ports: [8088]}}]}}\n",
            slice.rel
        ),
        &[
            "--max-delegated-cgroups",
            "2",
            "--max-cgroups",
            "6",
            "--fail-closed",
            "--rescan-interval",
            "1s",
        ],
    );
    // After the agent started: the user's flood, then root's real unit.
    let flood: Vec<Cgroup> = (0..12)
        .map(|i| {
            let fs = home.fs.join(format!("s{i:02}")).join(&unit);
            mkdir_as_nobody(&fs);
            Cgroup::existing(fs, &format!("{}/s{i:02}/{unit}", home.rel))
        })
        .collect();
    let real = slice.child(&unit);
    let started = Instant::now();
    let doc = loop {
        let doc = status(&agent);
        if doc["delegated"]["unfit"] == 10 && doc["governed_cgroups"] == 5 {
            break doc;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no rescan bounded the flood:\n{doc}\n{}",
            agent.stderr()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(
        doc["delegated"]["held_subtrees"],
        json!([home.rel]),
        "{doc}"
    );
    // Root's unit governed despite the flood (the map holds 6).
    Probe::in_cgroup(&real)
        .run(&["bind", "tcp", "127.0.0.1", "8088"])
        .assert_ok();
    // The first two (in order) have the unit's policy.
    for cg in &flood[..2] {
        Probe::in_cgroup(cg)
            .run(&["bind", "tcp", "127.0.0.1", "8088"])
            .assert_ok();
    }
    // The rest: held. Not even the slice's port is open to them.
    let r = Probe::in_cgroup(&flood[7]).run(&["bind", "tcp", "127.0.0.1", "8089"]);
    r.assert_eperm();
    let e = agent.wait_event(&[("pid", json!(r.pid)), ("port", json!(8089))]);
    assert_eq!(e["policy"], "portguard:fail-closed:unfit", "{e}");
    assert_eq!(e["policy_cgroup"], home.rel.as_str());
    assert!(
        agent
            .stderr()
            .contains("that do not fit (--max-delegated-cgroups 2 per subtree"),
        "{}",
        agent.stderr()
    );
    let metrics = agent.metrics_text();
    assert!(
        metrics.contains("portguard_delegated_cgroups_left_out{reason=\"unfit\"} 10"),
        "{metrics}"
    );
}
