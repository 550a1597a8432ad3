//! Report section 3b: a denial storm with two tenants. One policy's
//! workload floods denied binds over 100 ports from two processes; another
//! policy's workload makes an occasional denial (a distinct port every
//! 100 ms). With the kernel's per-policy event budget at its defaults,
//! every one of the quiet tenant's denials must reach the log, and each
//! policy's written + suppressed + lost must equal its decisions. The
//! issue's storm target is judged here (decisions per second accounted
//! exactly, the agent's CPU), with where the time goes (`perf`, every CPU).

use std::{
    fmt::Write as _,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{
    Opts,
    fixture::{Fixture, start_agent},
    ledger::{Ledger, LogTally, settle},
    profile::{Perf, Scope},
    runner::{pgbench, pgbench_bin},
    stats::{CpuWindow, grouped, threads},
    storm::{PROFILE_HZ, profile_secs},
};

/// First port of the flood (100 ports) and of the quiet tenant's denials.
const FLOOD_PORT: u16 = 47100;
const QUIET_PORT: u16 = 47300;

/// The goal for a denial storm: decisions accounted exactly, per
/// policy, with the agent on at most one core.
const TARGET_RATE: f64 = 1_500_000.0;

/// Two flooding processes over 100 ports for `secs`, in `cg`.
fn floods(cg: &std::path::Path, secs: f64) -> Vec<std::process::Child> {
    (0..2)
        .map(|_| {
            Command::new(pgbench_bin())
                .args(["--cgroup", &cg.display().to_string()])
                .args(["storm", "--port", &FLOOD_PORT.to_string(), "--ports", "100"])
                .args(["--seconds", &secs.to_string()])
                .stdout(Stdio::piped())
                .spawn()
                .expect("pgbench storm")
        })
        .collect()
}

/// Wait for the floods: (denials, longest run in seconds).
fn wait_floods(floods: Vec<std::process::Child>) -> (u64, f64) {
    let mut denials = 0;
    let mut secs = 0f64;
    for f in floods {
        let out = f.wait_with_output().expect("pgbench storm");
        assert!(out.status.success(), "pgbench storm failed");
        let v: Value = serde_json::from_slice(&out.stdout).expect("pgbench output");
        denials += v["denials"].as_u64().unwrap();
        secs = secs.max(v["seconds"].as_f64().unwrap());
    }
    (denials, secs)
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
    let pid = agent.pid();
    let mut log = LogTally::new(&agent);
    let stat = Perf::stat(Scope::Pid(pid));
    let cpu = CpuWindow::start(pid);
    let flooding = floods(&noisy.fs, secs);
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
    let (denials, storm_secs) = wait_floods(flooding);
    let agent_cpu = cpu.percent();
    let agent_threads = threads(pid);
    let stat = stat.stat_table("The agent during the storm");
    // Let the agent drain and report (suppressed and lost lines come every
    // --lost-report-interval).
    let ledgers = settle(
        &agent,
        &mut log,
        &["noisy", "quiet"],
        Duration::from_secs(1),
    );
    let (noisy_l, quiet_l) = (&ledgers[0], &ledgers[1]);
    let delivered = quiet_ports
        .iter()
        .filter(|port| log.ports.contains(&("quiet".to_owned(), **port)))
        .count();
    let all_delivered = delivered == quiet_ports.len();
    let accounted = ledgers.iter().all(Ledger::exact);
    // Every denial the processes made is a decision the kernel counted.
    let all_counted = noisy_l.decisions == denials && quiet_l.decisions == quiet_ports.len() as u64;
    let decisions: u64 = ledgers.iter().map(|l| l.decisions).sum();
    let decision_rate = decisions as f64 / storm_secs;
    let rate = (noisy_l.written + quiet_l.written) as f64 / storm_secs;
    // Where the time goes: the same flood again, shorter, every CPU
    // sampled (perf's sampling slows the floods a little; the figures
    // above are from the storm without it).
    let record = Perf::record(Scope::AllCpus, PROFILE_HZ);
    let profiled = floods(&noisy.fs, profile_secs(opts));
    let (profiled_denials, profiled_secs) = wait_floods(profiled);
    let profile = record.record_table(
        &format!(
            "Both CPUs in a flood of its own ({} decisions/s while sampled)",
            grouped(profiled_denials as f64 / profiled_secs)
        ),
        12,
        &[(pid, "the agent")],
    );
    drop(agent);
    let _ = writeln!(
        report,
        "## 3b. Denial storm, two tenants\n\n\
         One policy floods denied binds over 100 ports from two processes (not pinned: with \
         the agent, they share both CPUs); another makes a denial every 100 ms. Kernel event \
         budget at its defaults (100 events/s, burst 200, per policy and CPU); the agent's \
         own flood control off (every event the budget lets through is a line of its own). \
         Decisions are the kernel's per-policy counts; \"written\" is the sum of the log's \
         lines (`count`), suppressed and lost the policy's kernel counters. The storm target \
         (at least {} decisions/s, each accounted exactly under its policy, the agent on at \
         most one core) is judged on this storm: the deployed configuration, and a workload \
         that uses both CPUs.\n\n\
         | measurement | value |\n|---|---:|\n\
         | storm duration (s) | {storm_secs:.1} |\n\
         | decisions per second, both tenants (kernel) | {} |\n\
         | flooding tenant: denials made / decisions counted | {denials} / {} |\n\
         | flooding tenant: events written | {} |\n\
         | flooding tenant: suppressed (kernel, per policy) | {} |\n\
         | flooding tenant: lost (kernel, per policy) | {} |\n\
         | quiet tenant: denials / decisions / delivered | {} / {} / {delivered} |\n\
         | quiet tenant: suppressed / lost | {} / {} |\n\
         | events written per second (both) | {rate:.0} |\n\
         | written + suppressed + lost = decisions, per policy | {} |\n\
         | agent CPU during the storm (% of one core) | {agent_cpu:.1} |\n\
         | agent threads | {agent_threads} |\n\n\
         {stat}\n{profile}",
        grouped(TARGET_RATE),
        grouped(decision_rate),
        noisy_l.decisions,
        noisy_l.written,
        noisy_l.suppressed,
        noisy_l.lost,
        quiet_ports.len(),
        quiet_l.decisions,
        quiet_l.suppressed,
        quiet_l.lost,
        if accounted { "yes" } else { "NO" },
    );
    let ledger_text = ledgers
        .iter()
        .map(Ledger::summary)
        .collect::<Vec<_>>()
        .join("; ");
    verdicts.push((
        "two-tenant storm: every denial of the quiet tenant delivered".into(),
        all_delivered,
        format!("{delivered} of {} delivered", quiet_ports.len()),
    ));
    verdicts.push((
        "two-tenant storm: written + suppressed + lost = decisions, per policy".into(),
        accounted,
        ledger_text.clone(),
    ));
    verdicts.push((
        "denial storm: >= 1,500,000 decisions/s accounted exactly per policy, agent <= 1 core"
            .into(),
        decision_rate >= TARGET_RATE && accounted && all_counted && agent_cpu <= 100.0,
        format!(
            "{} decisions/s over {storm_secs:.1} s (two tenants, default event budget); {ledger_text}; \
             every denial made counted: {}; agent {agent_cpu:.1} % of one core",
            grouped(decision_rate),
            if all_counted { "yes" } else { "NO" },
        ),
    ));
}
