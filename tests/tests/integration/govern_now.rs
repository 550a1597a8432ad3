//! The agent's quick answer to "govern this cgroup now" (`agent::govern_now`):
//! a cgroup that a policy names itself, below a point the decision programs
//! already run on, is governed by one insert into the live generation and
//! answered before the full rescan and apply. The tests park the agent's
//! loop right after that answer (`PORTGUARD_TEST_GOVERN_NOW_GATE`) and look
//! at what the kernel enforces then: the policy the full rescan gives the
//! cgroup, and nothing where the programs do not run yet (no quick answer
//! there: the full path answers).
//!
//! The rescan the agent's inotify watch asks for is held after its walk
//! (`PORTGUARD_TEST_SURVEY_GATE`), and the rescan timer is an hour: only the
//! hook's request governs the new cgroups.

use portguard_tests::{Agent, Probe, require_root};
use serde_json::json;

use super::hooks::{Gate, hook_unit, run_in, slice};

/// The harness's agents run with `--no-watch` unless told otherwise.
const QUIET: &[&str] = &["--rescan-interval", "1h", "--inventory-interval", "0"];

fn bind(cg: &portguard_tests::Cgroup, port: u16) -> portguard_tests::ProbeResult {
    Probe::in_cgroup(cg)
        .host_netns()
        .run(&["bind", "tcp", "127.0.0.1", &port.to_string()])
}

/// A restarted unit (its cgroup removed and made again: a new id) under a
/// slice the programs already run on is answered at once, and the kernel
/// enforces, before the full rescan, the policy that rescan gives it: the
/// `cgroup:` policy naming its path, more specific than the `unit:` policy
/// naming it (first in the file).
#[test]
fn a_restarted_unit_is_governed_at_once_by_the_policy_the_full_rescan_gives_it() {
    require_root!();
    let pid = std::process::id();
    let s = slice("now");
    let unit = format!("pgtest-now-{pid}.service");
    let rel = format!("{}/{unit}", s.rel);
    let (by_unit, by_path) = (
        42600 + (pid % 1000) as u16 * 2,
        42601 + (pid % 1000) as u16 * 2,
    );
    let gate = Gate::new("the full rescan after a quick answer");
    let surveys = Gate::new("survey");
    let cg = s.child(&unit);
    let agent = Agent::start_with_env(
        &format!(
            "policies:\n  \
             - {{name: by-unit, unit: {unit}, bind: [{{ports: [{by_unit}]}}]}}\n  \
             - {{name: by-path, cgroup: {rel}, bind: [{{ports: [{by_path}]}}]}}\n"
        ),
        QUIET,
        &[
            ("PORTGUARD_TEST_GOVERN_NOW_GATE", gate.0.path()),
            ("PORTGUARD_TEST_SURVEY_GATE", surveys.0.path()),
        ],
    );
    bind(&cg, by_unit).assert_eperm();
    // systemd's restart: the cgroup removed and made again.
    drop(cg);
    let cg = s.child(&unit);
    // The rescan the agent's inotify watch asks for is held after its walk:
    // it cannot govern the new cgroup before the hook's request does.
    surveys.wait_parked(1, &agent);
    let out = run_in(&cg, hook_unit(&agent, &unit, &["--timeout", "5s"]));
    assert!(
        out.status.success(),
        "the hook failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        agent.stderr()
    );
    // Answered at once: the loop is parked before the full rescan, and the
    // kernel already holds the new cgroup, under `by-path`.
    gate.wait_parked(1, &agent);
    bind(&cg, by_unit).assert_eperm();
    bind(&cg, by_path).assert_ok();
    gate.release(1);
    let e = agent.wait_event(&[
        ("policy", json!("by-path")),
        ("port", json!(by_unit)),
        ("cgroup_id", json!(cg.id())),
    ]);
    assert_eq!(e["verdict"], "deny", "{e}");
    // After the full apply, the same.
    bind(&cg, by_unit).assert_eperm();
    bind(&cg, by_path).assert_ok();
}

/// The slice made again too: the programs' point is on the removed slice,
/// so an insert would govern a cgroup no program runs for. No quick answer
/// then: the full path attaches the programs on the new slice, applies, and
/// answers, and the unit's first bind is denied.
#[test]
fn a_unit_below_a_recreated_slice_is_answered_only_once_the_programs_run_there() {
    require_root!();
    let pid = std::process::id();
    let unit = format!("pgtest-nowslice-{pid}.service");
    let port = 42700 + (pid % 1000) as u16 * 2;
    let gate = Gate::new("the full rescan after a quick answer");
    let surveys = Gate::new("survey");
    let s = slice("nowslice");
    let cg = s.child(&unit);
    let agent = Agent::start_with_env(
        &format!("policies:\n  - {{name: unit-only, unit: {unit}, bind: [{{ports: [9000]}}]}}\n"),
        QUIET,
        &[
            ("PORTGUARD_TEST_GOVERN_NOW_GATE", gate.0.path()),
            ("PORTGUARD_TEST_SURVEY_GATE", surveys.0.path()),
        ],
    );
    bind(&cg, port).assert_eperm();
    drop(cg);
    drop(s);
    let s = slice("nowslice");
    let cg = s.child(&unit);
    surveys.wait_parked(1, &agent);
    let out = run_in(&cg, hook_unit(&agent, &unit, &["--timeout", "5s"]));
    assert!(
        out.status.success(),
        "the hook failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        agent.stderr()
    );
    let r = bind(&cg, port);
    let quick = gate.0.path().join("parked-1").exists();
    gate.release(1);
    assert!(
        !quick && !r.ok,
        "the hook was answered at once (quick: {quick}) and the unit's first bind was {}\n{}",
        if r.ok { "allowed" } else { "denied" },
        agent.stderr()
    );
    r.assert_eperm();
    let e = agent.wait_event(&[
        ("policy", json!("unit-only")),
        ("port", json!(port)),
        ("cgroup_id", json!(cg.id())),
    ]);
    assert_eq!(e["verdict"], "deny", "{e}");
}
