//! Report section 3b: a denial storm with two tenants. One policy's
//! workload floods denied binds over 100 ports from two processes; another
//! policy's workload makes an occasional denial (a distinct port every
//! 100 ms). With the kernel's per-policy event budget at its defaults,
//! every one of the quiet tenant's denials must reach the log, and each
//! policy's written + suppressed + lost must equal its decisions.

use std::{
    fmt::Write as _,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{
    Opts,
    fixture::{Fixture, start_agent},
    runner::{pgbench, pgbench_bin},
};

/// First port of the flood (100 ports) and of the quiet tenant's denials.
const FLOOD_PORT: u16 = 47100;
const QUIET_PORT: u16 = 47300;

/// (deny + audit decisions, suppressed, lost) of `policy`, from `portguard
/// status --json`.
fn accounting(agent: &portguard_tests::Agent, policy: &str) -> (u64, u64, u64) {
    let sock = agent.status_socket();
    let (code, out, err) =
        portguard_tests::portguard(&["status", "--json", "--socket", sock.to_str().unwrap()]);
    assert_eq!(code, 0, "portguard status: {err}");
    let doc: Value = serde_json::from_str(&out).expect("status JSON");
    let p = doc["policies"]
        .as_array()
        .and_then(|a| a.iter().find(|p| p["name"] == policy))
        .unwrap_or_else(|| panic!("no policy {policy} in {doc}"));
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    (
        n(&p["decisions"]["deny"]) + n(&p["decisions"]["audit"]),
        n(&p["events"]["suppressed"]),
        n(&p["events"]["lost"]),
    )
}

pub(crate) fn two_tenant_storm(
    fx: &Fixture,
    opts: &Opts,
    report: &mut String,
    verdicts: &mut Vec<(String, bool, String)>,
) {
    let noisy = fx.root.child("noisy");
    let quiet = fx.root.child("quiet");
    let policy = format!(
        "policies:\n  - {{name: noisy, cgroup: {}, bind: []}}\n  - {{name: quiet, cgroup: {}, bind: [{{ports: [8080]}}]}}\n",
        noisy.rel, quiet.rel
    );
    // The shipped defaults, named (the test fixture turns the budget off
    // unless --event-rate is given).
    let agent = start_agent(
        &policy,
        &[
            "--event-rate",
            "100",
            "--event-burst",
            "200",
            "--log-max-size",
            "0",
        ],
    );
    let secs = if opts.quick { 3.0 } else { 10.0 };
    let floods: Vec<_> = (0..2)
        .map(|_| {
            Command::new(pgbench_bin())
                .args(["--cgroup", &noisy.fs.display().to_string()])
                .args(["storm", "--port", &FLOOD_PORT.to_string(), "--ports", "100"])
                .args(["--seconds", &secs.to_string()])
                .stdout(Stdio::piped())
                .spawn()
                .expect("pgbench storm")
        })
        .collect();
    let t0 = Instant::now();
    let mut quiet_ports = Vec::new();
    while t0.elapsed().as_secs_f64() < secs - 0.2 {
        let port = QUIET_PORT + quiet_ports.len() as u16;
        // One denied bind (pgbench checks it failed with EPERM).
        pgbench(
            &quiet.fs,
            &[
                "denied",
                "--port",
                &port.to_string(),
                "--iters",
                "1",
                "--warmup",
                "0",
                "--reps",
                "1",
            ],
        );
        quiet_ports.push(port);
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut denials = 0;
    let mut storm_secs = 0f64;
    for f in floods {
        let out = f.wait_with_output().expect("pgbench storm");
        assert!(out.status.success(), "pgbench storm failed");
        let v: Value = serde_json::from_slice(&out.stdout).expect("pgbench output");
        denials += v["denials"].as_u64().unwrap();
        storm_secs = storm_secs.max(v["seconds"].as_f64().unwrap());
    }
    // Let the agent drain and report (suppressed and lost lines come every
    // --lost-report-interval).
    let mut last = usize::MAX;
    let lines = loop {
        std::thread::sleep(Duration::from_millis(500));
        let text = std::fs::read_to_string(&agent.log).unwrap_or_default();
        let lines: Vec<Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        if lines.len() == last {
            break lines;
        }
        last = lines.len();
    };
    let noisy_acc = accounting(&agent, "noisy");
    let quiet_acc = accounting(&agent, "quiet");
    drop(agent);
    let written = |policy: &str| -> u64 {
        lines
            .iter()
            .filter(|e| e["policy"] == policy && e.get("verdict").is_some())
            .map(|e| e["count"].as_u64().unwrap_or(1))
            .sum()
    };
    let (noisy_written, quiet_written) = (written("noisy"), written("quiet"));
    let delivered = quiet_ports
        .iter()
        .filter(|port| {
            lines
                .iter()
                .any(|e| e["policy"] == "quiet" && e["port"] == u64::from(**port))
        })
        .count();
    let all_delivered = delivered == quiet_ports.len();
    let exact =
        |(decided, supp, lost): (u64, u64, u64), written: u64| written + supp + lost == decided;
    let accounted = exact(noisy_acc, noisy_written) && exact(quiet_acc, quiet_written);
    let rate = (noisy_written + quiet_written) as f64 / storm_secs;
    let _ = writeln!(
        report,
        "## 3b. Denial storm, two tenants\n\n\
         One policy floods denied binds over 100 ports from two processes; another makes a \
         denial every 100 ms. Kernel event budget at its defaults (100 events/s, burst 200, \
         per policy and CPU).\n\n\
         | measurement | value |\n|---|---:|\n\
         | storm duration (s) | {storm_secs:.1} |\n\
         | flooding tenant: denials | {denials} |\n\
         | flooding tenant: events written | {noisy_written} |\n\
         | flooding tenant: suppressed (kernel, per policy) | {} |\n\
         | flooding tenant: lost (kernel, per policy) | {} |\n\
         | quiet tenant: denials / delivered | {} / {delivered} |\n\
         | quiet tenant: suppressed / lost | {} / {} |\n\
         | events written per second (both) | {rate:.0} |\n\
         | written + suppressed + lost = decisions, per policy | {} |\n",
        noisy_acc.1,
        noisy_acc.2,
        quiet_ports.len(),
        quiet_acc.1,
        quiet_acc.2,
        if accounted { "yes" } else { "NO" },
    );
    verdicts.push((
        "two-tenant storm: every denial of the quiet tenant delivered".into(),
        all_delivered,
        format!("{delivered} of {} delivered", quiet_ports.len()),
    ));
    verdicts.push((
        "two-tenant storm: written + suppressed + lost = decisions, per policy".into(),
        accounted,
        format!(
            "noisy {noisy_written} + {} + {} vs {}; quiet {quiet_written} + {} + {} vs {}",
            noisy_acc.1, noisy_acc.2, noisy_acc.0, quiet_acc.1, quiet_acc.2, quiet_acc.0
        ),
    ));
}
