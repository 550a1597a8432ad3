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

use portguard_tests::{Agent, Cgroup, Probe, require_root};
use serde_json::json;

use super::hooks::{Gate, governs, hook_unit, run_in, slice};

/// The harness's agents run with `--no-watch` unless told otherwise.
const QUIET: &[&str] = &["--rescan-interval", "1h", "--inventory-interval", "0"];

/// An agent on `policy`, with the quick answer's gate (parks the loop
/// right after it) and the survey gate (parks each survey after its walk).
fn gated_agent(policy: &str) -> (Agent, Gate, Gate) {
    let gate = Gate::new("the full rescan after a quick answer");
    let surveys = Gate::new("survey");
    let agent = Agent::start_with_env(
        policy,
        QUIET,
        &[
            ("PORTGUARD_TEST_GOVERN_NOW_GATE", gate.0.path()),
            ("PORTGUARD_TEST_SURVEY_GATE", surveys.0.path()),
        ],
    );
    (agent, gate, surveys)
}

/// `portguard hook unit <unit>` run in `cg`, which must succeed.
fn hook_ok(agent: &Agent, cg: &Cgroup, unit: &str) {
    let out = run_in(cg, hook_unit(agent, unit, &["--timeout", "5s"]));
    assert!(
        out.status.success(),
        "the hook failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        agent.stderr()
    );
}

fn bind(cg: &Cgroup, port: u16) -> portguard_tests::ProbeResult {
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
    let cg = s.child(&unit);
    let (agent, gate, surveys) = gated_agent(&format!(
        "policies:\n  \
         - {{name: by-unit, unit: {unit}, bind: [{{ports: [{by_unit}]}}]}}\n  \
         - {{name: by-path, cgroup: {rel}, bind: [{{ports: [{by_path}]}}]}}\n"
    ));
    bind(&cg, by_unit).assert_eperm();
    // systemd's restart: the cgroup removed and made again.
    drop(cg);
    let cg = s.child(&unit);
    // The rescan the agent's inotify watch asks for is held after its walk:
    // it cannot govern the new cgroup before the hook's request does.
    surveys.wait_parked(1, &agent);
    hook_ok(&agent, &cg, &unit);
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
    // The survey held since the restart resolves and applies in full (it
    // takes the hook's paths): the same policy, now from both generations.
    surveys.release(1);
    surveys.wait_installed(1, &agent);
    bind(&cg, by_unit).assert_eperm();
    bind(&cg, by_path).assert_ok();
    let denied = agent.events_matching(
        &[
            ("policy", json!("by-path")),
            ("port", json!(by_unit)),
            ("cgroup_id", json!(cg.id())),
        ],
        std::time::Duration::from_millis(500),
    );
    assert_eq!(denied.len(), 2, "{denied:?}");
    // The removed cgroup's entry is gone: `by-path` governs one cgroup.
    let now = governs(&agent, "by-path");
    assert_eq!(now.as_array().map(Vec::len), Some(1), "{now}");
    assert_eq!(now[0]["path"], rel.as_str(), "{now}");
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
    let s = slice("nowslice");
    let cg = s.child(&unit);
    let (agent, gate, surveys) = gated_agent(&format!(
        "policies:\n  - {{name: unit-only, unit: {unit}, bind: [{{ports: [9000]}}]}}\n"
    ));
    bind(&cg, port).assert_eperm();
    drop(cg);
    drop(s);
    let s = slice("nowslice");
    let cg = s.child(&unit);
    surveys.wait_parked(1, &agent);
    hook_ok(&agent, &cg, &unit);
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

/// The unit stopped, and the agent's rescan saw it go (its policy governs
/// no cgroup), before it starts again: the quick answer's cgroup is then
/// exactly what the next full resolve finds. That resolve still applies
/// (the quick answer is provisional until an apply plans it), so `status`
/// shows the unit governed again, not the stop.
#[test]
fn a_unit_started_after_its_stop_was_seen_is_shown_governed_after_the_quick_answer() {
    require_root!();
    let pid = std::process::id();
    let unit = format!("pgtest-nowagain-{pid}.service");
    let s = slice("nowagain");
    // Governed too: the programs stay on the slice while the unit is down.
    let keep = s.child("keep");
    let cg = s.child(&unit);
    let (agent, gate, surveys) = gated_agent(&format!(
        "policies:\n  \
         - {{name: again, unit: {unit}, bind: [{{ports: [9000]}}]}}\n  \
         - {{name: keep, cgroup: {}, bind: [{{ports: [9000]}}]}}\n",
        keep.rel
    ));
    assert_eq!(governs(&agent, "again")[0]["path"], cg.rel.as_str());
    // Stopped: the rescan that follows sees it gone.
    let rel = cg.rel.clone();
    drop(cg);
    surveys.wait_parked(1, &agent);
    surveys.release(1);
    surveys.wait_installed(1, &agent);
    assert_eq!(governs(&agent, "again").as_array().map(Vec::len), Some(0));
    // Started again: answered at once while the next rescan is held.
    let cg = s.child(&unit);
    surveys.wait_parked(2, &agent);
    hook_ok(&agent, &cg, &unit);
    gate.wait_parked(1, &agent);
    gate.release(1);
    surveys.release(2);
    surveys.wait_installed(2, &agent);
    let now = governs(&agent, "again");
    assert_eq!(now.as_array().map(Vec::len), Some(1), "{now}");
    assert_eq!(now[0]["path"], rel.as_str(), "{now}");
}

/// A unit's hook run from a cgroup below its unit's (a delegated unit's
/// tenant can move the hook's process there) vouches for the unit it
/// names: no quick answer for that cgroup alone; the full path governs the
/// unit's restarted cgroup too before answering.
#[test]
fn a_unit_hook_run_below_its_unit_answers_for_the_unit() {
    require_root!();
    let pid = std::process::id();
    let unit = format!("pgtest-nowbelow-{pid}.service");
    let port = 42800 + (pid % 1000) as u16 * 2;
    let s = slice("nowbelow");
    let cg = s.child(&unit);
    let worker = cg.child("worker");
    let (agent, gate, surveys) = gated_agent(&format!(
        "policies:\n  \
         - {{name: the-unit, unit: {unit}, bind: [{{ports: [9000]}}]}}\n  \
         - {{name: the-worker, cgroup: {}, bind: [{{ports: [9000]}}]}}\n",
        worker.rel
    ));
    bind(&cg, port).assert_eperm();
    drop(worker);
    drop(cg);
    let cg = s.child(&unit);
    let worker = cg.child("worker");
    surveys.wait_parked(1, &agent);
    hook_ok(&agent, &worker, &unit);
    let r = bind(&cg, port);
    let quick = gate.0.path().join("parked-1").exists();
    gate.release(1);
    assert!(
        !quick && !r.ok,
        "the hook in {} was answered at once (quick: {quick}) and the unit's own bind was {}\n{}",
        worker.rel,
        if r.ok { "allowed" } else { "denied" },
        agent.stderr()
    );
    r.assert_eperm();
}
