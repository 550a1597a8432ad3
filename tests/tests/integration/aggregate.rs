//! Flood control: a storm of identical denials becomes a few aggregate
//! lines whose counts add up exactly (with the kernel's lost count) to the
//! denied syscalls, and a distinct denial in the middle of it still gets its
//! own line.

use std::{process::Command, time::Duration};

use portguard_tests::{Agent, Cgroup, pgbench_bin, require_root};
use serde_json::Value;

#[test]
fn a_storm_is_aggregated_and_counts_add_up_exactly() {
    require_root!();
    let cg = Cgroup::new("aggstorm");
    // A 1 s window so the storm spans a few of them, and a ring buffer that
    // holds the whole storm (the integration tests run a debug build of the
    // agent, slower than the storm; losses are covered by `events`).
    let mut agent = Agent::start_with(
        &format!(
            "policies:\n  - {{name: storm, cgroup: {}, bind: [{{ports: [8080]}}]}}\n",
            cg.rel
        ),
        &["--aggregate-window", "1s", "--ring-buffer-size", "16777216"],
    );
    const N: u64 = 100_000;
    let out = Command::new(pgbench_bin())
        .args(["--cgroup", &cg.fs.display().to_string()])
        .args(["storm", "--port", "9999", "--count", &N.to_string()])
        .args(["--distinct-at", "50000", "--distinct-port", "7777"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pgbench: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["denials"], N, "every storm bind was denied");
    // Let a window close while the agent runs, then stop it: it writes what
    // is pending and a final loss report.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(agent.stop().success());

    let events = agent.events();
    let storm: Vec<&Value> = events.iter().filter(|e| e["port"] == 9999).collect();
    let counted: u64 = storm.iter().map(|e| e["count"].as_u64().unwrap()).sum();
    let lost = events
        .iter()
        .filter_map(|e| e["lost_total"].as_u64())
        .max()
        .unwrap_or(0);
    let distinct: Vec<&Value> = events.iter().filter(|e| e["port"] == 7777).collect();
    eprintln!(
        "{N} denials + 1 distinct: {} storm lines (counts {counted}), {} distinct, {lost} lost in the kernel",
        storm.len(),
        distinct.len()
    );
    assert_eq!(
        counted + distinct.len() as u64 + lost,
        N + 1,
        "counts plus kernel losses are the denials"
    );
    assert!(
        storm.len() <= 10,
        "a 100,000-denial storm is a handful of lines, not {}",
        storm.len()
    );
    assert_eq!(storm[0]["count"], 1, "the first denial is written at once");
    assert!(storm[0].get("first_seen").is_none());
    let agg: Vec<&&Value> = storm.iter().filter(|e| e["count"] != 1).collect();
    assert!(!agg.is_empty());
    for e in &agg {
        assert!(e["first_seen"].as_str().unwrap() <= e["last_seen"].as_str().unwrap());
        assert_eq!(e["policy"], "storm");
        assert_eq!(e["rule"], "bind");
        assert_eq!(e["cgroup"], cg.rel);
    }
    // The distinct denial, in the middle of the storm, on its own line.
    assert_eq!(lost, 0, "the ring buffer holds the whole storm");
    assert_eq!(distinct.len(), 1, "{distinct:?}");
    assert_eq!(distinct[0]["count"], 1);
    assert!(distinct[0].get("first_seen").is_none());
}

/// Under a storm that refills the ring buffer as fast as the agent drains
/// it, lines keep reaching the log while the storm lasts (the agent works
/// in bounded batches instead of draining forever before writing), and the
/// accounting still adds up.
#[test]
fn lines_keep_flowing_during_a_storm() {
    require_root!();
    let cg = Cgroup::new("flowstorm");
    let mut agent = Agent::start_with(
        &format!(
            "policies:\n  - {{name: flow, cgroup: {}, bind: []}}\n",
            cg.rel
        ),
        &["--aggregate-window", "0", "--log-max-size", "0"],
    );
    let storm = Command::new(pgbench_bin())
        .args(["--cgroup", &cg.fs.display().to_string()])
        .args(["storm", "--port", "9999", "--seconds", "4"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let mid_storm = std::fs::metadata(&agent.log).map_or(0, |m| m.len());
    let out = storm.wait_with_output().unwrap();
    assert!(out.status.success());
    assert!(
        mid_storm > 0,
        "nothing was written during the first 2 s of the storm"
    );
    let denials = serde_json::from_slice::<Value>(&out.stdout).unwrap()["denials"]
        .as_u64()
        .unwrap();
    let st = agent.stop();
    assert!(st.success(), "{st}\n{}", agent.stderr());
    let events = agent.events();
    let written: u64 = events.iter().filter_map(|e| e["count"].as_u64()).sum();
    let lost = events
        .iter()
        .filter_map(|e| e["lost_total"].as_u64())
        .max()
        .unwrap_or(0);
    eprintln!("{denials} denials: {written} written, {lost} lost; {mid_storm} bytes after 2 s");
    assert_eq!(written + lost, denials);
}
