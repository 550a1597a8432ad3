//! Fairness between policies: one workload's flood of denials cannot make
//! another policy's denial vanish. The kernel keeps an event budget per
//! policy (`--event-rate`, `--event-burst`) and the last quarter of the
//! ring buffer for first denials; every decision the budget held back is
//! counted under its policy, and for every policy written + suppressed +
//! lost = decisions, exactly.
//!
//! Ports 46100-46199 and 46321-46322 are this file's alone.

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use portguard_tests::{Agent, Cgroup, Probe, pgbench_bin, require_root};
use serde_json::{Value, json};

const FLOOD_PORT: u16 = 46100;
const FLOOD_PORTS: u16 = 100;
const QUIET_PORT: u16 = 46321;
const AUDIT_PORT: u16 = 46322;

/// A flood of denied binds over `FLOOD_PORTS` ports from `cg` for `secs`.
fn flood(cg: &Cgroup, secs: f64) -> Child {
    Command::new(pgbench_bin())
        .args(["--cgroup", &cg.fs.display().to_string()])
        .args(["storm", "--port", &FLOOD_PORT.to_string()])
        .args(["--ports", &FLOOD_PORTS.to_string()])
        .args(["--seconds", &secs.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// The agent's status document (`portguard status --json`).
fn status(agent: &Agent) -> Value {
    let sock = agent.status_socket();
    let (code, out, err) =
        portguard_tests::portguard(&["status", "--json", "--socket", sock.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).unwrap()
}

/// (deny + audit decisions, suppressed, lost) of `policy` in a status document.
fn accounting(doc: &Value, policy: &str) -> (u64, u64, u64) {
    let p = doc["policies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == policy)
        .unwrap_or_else(|| panic!("no policy {policy}: {doc}"));
    let n = |v: &Value| v.as_u64().unwrap();
    (
        n(&p["decisions"]["deny"]) + n(&p["decisions"]["audit"]),
        n(&p["events"]["suppressed"]),
        n(&p["events"]["lost"]),
    )
}

/// Two processes flood denied binds over 100 ports under one policy while
/// the agent is stopped (SIGSTOP: the ring buffer is not read, as when the
/// agent falls behind), and in the middle of it an enforce-mode and an
/// audit-mode tenant each make one denial. Both are in the event log with
/// their pid and port; the flooding policy's written + suppressed + lost
/// equals its decisions, and its suppressed and lost counts are reported
/// under its name.
#[test]
fn a_flood_cannot_hide_another_policys_denial() {
    require_root!();
    let noisy = Cgroup::new("fairflood");
    let quiet = Cgroup::new("fairquiet");
    let watched = Cgroup::new("fairaudit");
    let mut agent = Agent::start_with(
        &format!(
            "policies:\n  - {{name: noisy, cgroup: {}, bind: []}}\n  - {{name: quiet, cgroup: {}, bind: [{{ports: [8080]}}]}}\n  - {{name: watched, cgroup: {}, mode: audit, bind: []}}\n",
            noisy.rel, quiet.rel, watched.rel
        ),
        &[
            "--event-rate",
            "100",
            "--event-burst",
            "50",
            "--ring-buffer-size",
            "16384",
            "--aggregate-window",
            "1s",
        ],
    );
    agent.signal(libc::SIGSTOP);
    let floods = [flood(&noisy, 3.0), flood(&noisy, 3.0)];
    std::thread::sleep(Duration::from_millis(1500));
    let q = Probe::in_cgroup(&quiet).run(&["bind", "tcp", "127.0.0.1", &QUIET_PORT.to_string()]);
    q.assert_eperm();
    let a = Probe::in_cgroup(&watched).run(&["bind", "tcp", "127.0.0.1", &AUDIT_PORT.to_string()]);
    a.assert_ok();
    let mut denials = 0;
    for f in floods {
        let out = f.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "pgbench: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        denials += v["denials"].as_u64().unwrap();
    }
    agent.signal(libc::SIGCONT);

    let e = agent.wait_event(&[("port", json!(QUIET_PORT))]);
    assert_eq!(e["policy"], "quiet", "{e}");
    assert_eq!(e["verdict"], "deny", "{e}");
    assert_eq!(e["pid"], q.pid, "{e}");
    let e = agent.wait_event(&[("port", json!(AUDIT_PORT))]);
    assert_eq!(e["policy"], "watched", "{e}");
    assert_eq!(e["verdict"], "audit", "{e}");
    assert_eq!(e["pid"], a.pid, "{e}");

    // The kernel's accounting, exact once the floods are over.
    let doc = status(&agent);
    let (decided, suppressed, lost) = accounting(&doc, "noisy");
    assert_eq!(decided, denials, "every flooded bind was a counted denial");
    assert!(suppressed > 0, "the budget held the flood back: {doc}");
    for p in ["quiet", "watched"] {
        assert_eq!(accounting(&doc, p), (1, 0, 0), "{p}: {doc}");
    }
    // Let the last aggregates close and the reports come, then stop.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(agent.stop().success(), "{}", agent.stderr());
    let events = agent.events();
    let errors = portguard_tests::schema_errors(&events);
    assert!(errors.is_empty(), "{}", errors.join("\n"));
    let written: u64 = events
        .iter()
        .filter(|e| e["policy"] == "noisy" && e["verdict"] == "deny")
        .map(|e| e["count"].as_u64().unwrap())
        .sum();
    let suppressed_reported: u64 = events
        .iter()
        .filter(|e| e["policy"] == "noisy")
        .filter_map(|e| e["suppressed"].as_u64())
        .sum();
    let lost_reported: u64 = events
        .iter()
        .filter_map(|e| e["policies"].as_array())
        .flatten()
        .filter(|p| p["policy"] == "noisy")
        .map(|p| p["lost"].as_u64().unwrap())
        .sum();
    eprintln!(
        "{denials} flooded denials: {written} written, {suppressed} suppressed, {lost} lost \
         (reported: {suppressed_reported} suppressed, {lost_reported} lost)"
    );
    assert_eq!(
        written + suppressed + lost,
        decided,
        "written + suppressed + lost = decisions"
    );
    assert_eq!(suppressed_reported, suppressed, "suppressed lines add up");
    assert_eq!(lost_reported, lost, "the lost lines name the policy");
    let last_suppressed = events
        .iter()
        .rfind(|e| e["policy"] == "noisy" && e.get("suppressed").is_some())
        .unwrap();
    assert_eq!(last_suppressed["suppressed_total"], suppressed);
}

/// The budget refills: a policy that floods, pauses, and is then denied
/// again gets its next denial written at once, while the agent runs.
#[test]
fn the_budget_refills_after_a_flood() {
    require_root!();
    let cg = Cgroup::new("fairrefill");
    let agent = Agent::start_with(
        &format!(
            "policies:\n  - {{name: refill, cgroup: {}, bind: []}}\n",
            cg.rel
        ),
        &["--event-rate", "10", "--event-burst", "5"],
    );
    let out = flood(&cg, 0.5).wait_with_output().unwrap();
    assert!(out.status.success());
    // 5 at once, then one every 100 ms: a second later the bucket is full.
    std::thread::sleep(Duration::from_millis(1000));
    let t = Instant::now();
    let r = Probe::in_cgroup(&cg).run(&["bind", "tcp", "127.0.0.1", &QUIET_PORT.to_string()]);
    r.assert_eperm();
    let e = agent.wait_event(&[("port", json!(QUIET_PORT)), ("pid", json!(r.pid))]);
    assert_eq!(e["policy"], "refill");
    eprintln!("written {:?} after the flood", t.elapsed());
    let doc = status(&agent);
    let (decided, suppressed, lost) = accounting(&doc, "refill");
    assert!(suppressed > 0 && decided > suppressed + lost, "{doc}");
}

/// A tenant cannot use its own flood to keep a listener it made from being
/// ended: the event of a cut-off socket, which the agent must act on, is
/// never held back by the budget. (Without the BPF LSM, as on the CI host;
/// with it, the listen() is denied and there is nothing to end.)
#[test]
fn a_flood_does_not_hide_a_cut_off_listener_from_the_agent() {
    require_root!();
    let noisy = Cgroup::new("fairlisten");
    let agent = Agent::start_with(
        &format!(
            "policies:\n  - {{name: noisy, cgroup: {}, bind: []}}\n",
            noisy.rel
        ),
        &["--event-rate", "100", "--event-burst", "50"],
    );
    if agent.listen_denied() {
        eprintln!("skipping the cut-off part: the BPF LSM denies listen() here");
        return;
    }
    let floods = [flood(&noisy, 3.0), flood(&noisy, 3.0)];
    std::thread::sleep(Duration::from_millis(1500));
    // Mid-flood, both CPUs' buckets of this policy are empty.
    let r = Probe::in_cgroup(&noisy)
        .serve()
        .run(&["listen-unbound", "tcp", "4"]);
    for f in floods {
        let _ = f.wait_with_output();
    }
    let e = agent.wait_event(&[("pid", json!(r.pid)), ("verdict", json!("cut_off"))]);
    assert_eq!(e["action"], "destroyed", "{e}");
    let (_, suppressed, _) = accounting(&status(&agent), "noisy");
    assert!(suppressed > 0, "the flood was held back by the budget");
}
