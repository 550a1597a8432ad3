//! Report section 3: the denied path and a denial storm with every event
//! written (events written, lost, per-policy accounting, agent CPU), and
//! where the agent's time goes in such a storm (`perf`).

use std::{fmt::Write as _, time::Duration};

use crate::{
    Opts,
    fixture::{Fixture, start_agent},
    ledger::{LogTally, settle},
    profile::{Perf, Scope},
    runner::{pgbench, pgbench_loop},
    stats::{CpuWindow, grouped},
};

pub(crate) fn denied_and_storm(
    fx: &Fixture,
    opts: &Opts,
    report: &mut String,
    verdicts: &mut Vec<(String, bool, String)>,
) {
    let storm = fx.root.child("storm");
    let storm_cg = storm.fs.as_path();
    let policy = format!(
        "policies:\n  - {{name: storm, cgroup: {}, bind: [{{ports: [8080]}}]}}\n",
        storm.rel
    );
    // Denied path, with its event, agent writing to a file.
    let agent = start_agent(&policy, &[]);
    let iters = if opts.quick { 10_000 } else { 20_000 };
    let v = pgbench_loop(storm_cg, "denied", 9999, (iters, 2000, 5), &[]);
    let denied_ns = v["median_ns"].as_f64().unwrap();
    let v = pgbench_loop(storm_cg, "bind", 8080, (iters, 2000, 5), &[]);
    let allowed_ns = v["median_ns"].as_f64().unwrap();
    drop(agent);

    // Storm: as many denials as one process can make, the agent writing
    // every event to its log file (flood control, the kernel's event budget
    // and log rotation off, to measure the pipeline; as deployed, a storm
    // is a handful of lines: section 3b). perf stat counts the agent's
    // software events meanwhile (next to nothing of its own cost).
    let secs = if opts.quick { 3.0 } else { 10.0 };
    let agent = start_agent(&policy, &["--aggregate-window", "0", "--log-max-size", "0"]);
    let pid = agent.pid();
    let mut log = LogTally::new(&agent);
    let stat = Perf::stat(Scope::Pid(pid));
    let cpu = CpuWindow::start(pid);
    let v = pgbench(
        storm_cg,
        &["storm", "--port", "9999", "--seconds", &secs.to_string()],
    );
    let agent_cpu = cpu.percent();
    let stat = stat.stat_table("The agent during the storm");
    let denials = v["denials"].as_u64().unwrap();
    let storm_secs = v["seconds"].as_f64().unwrap();
    // Let the agent drain what is queued and report losses.
    let ledger = settle(&agent, &mut log, &["storm"], Duration::from_secs(1))
        .pop()
        .unwrap();
    // The storm and the drain after it (then idle: a loss report every
    // 200 ms costs next to nothing).
    let cpu_per_event = cpu.seconds() * 1e6 / ledger.written.max(1) as f64;
    let written = ledger.written;
    let rate = written as f64 / storm_secs;
    // Every denial pgbench made is a decision the kernel counted, and each
    // is written or counted as lost, in the policy's counters and in the
    // agent's lost-event lines (which count every policy together).
    let accounted = ledger.exact() && ledger.decisions == denials && log.lost_total == ledger.lost;
    // Where the agent's time goes: a shorter storm of its own, sampled
    // (perf's sampling costs the agent a little; the figures above are
    // from the storm without it).
    let record = Perf::record(Scope::Pid(pid), PROFILE_HZ);
    pgbench(
        storm_cg,
        &[
            "storm",
            "--port",
            "9999",
            "--seconds",
            &profile_secs(opts).to_string(),
        ],
    );
    let profile = record.record_table("The agent in a storm of its own", 12, &[]);
    drop(agent);

    let _ = writeln!(
        report,
        "## 3. Denied path and denial storm\n\n\
         One process (pinned to CPU 1) makes denied binds on one socket as fast as it can, \
         for {secs:.0} s. The agent writes every event (its flood control, the kernel's \
         per-policy event budget and log rotation off): the event pipeline's own throughput; \
         what the ring buffer cannot take is lost and counted. \"decisions\" are the \
         kernel's count for the policy; \"written\" the sum of the log's lines (`count`). \
         One process on one CPU, paying for an event per denial, cannot make the storm \
         target's rate; that target is judged in 3b, as deployed.\n\n\
         | measurement | value |\n|---|---:|\n\
         | allowed bind, same policy (ns/op) | {allowed_ns:.0} |\n\
         | denied bind with its event (ns/op) | {denied_ns:.0} |\n\
         | denied / allowed | {:.2}x |\n\
         | storm duration (s) | {storm_secs:.1} |\n\
         | denials made (pgbench) | {denials} |\n\
         | decisions counted by the kernel | {} |\n\
         | decisions per second | {} |\n\
         | events written by the agent | {written} |\n\
         | events written per second | {rate:.0} |\n\
         | events lost, counted by the kernel (policy's counter / agent's lost lines) | {} / {} |\n\
         | written + suppressed (none: no budget) + lost = decisions = denials | {} |\n\
         | agent CPU during the storm (% of one core) | {agent_cpu:.0} |\n\
         | agent CPU per event written, storm and drain (µs) | {cpu_per_event:.2} |\n\n\
         {stat}\n{profile}",
        denied_ns / allowed_ns,
        ledger.decisions,
        grouped(ledger.decisions as f64 / storm_secs),
        ledger.lost,
        log.lost_total,
        if accounted { "yes" } else { "NO" }
    );
    verdicts.push((
        "denial storm: >= 200,000 events/s written".into(),
        rate >= 200_000.0,
        format!("{rate:.0} events/s"),
    ));
    verdicts.push((
        "denial storm: every lost event counted".into(),
        accounted,
        format!(
            "{}; pgbench made {denials}; lost lines say {}",
            ledger.summary(),
            log.lost_total
        ),
    ));
}

/// perf record's sampling rate (an odd one, not in step with timers).
pub(crate) const PROFILE_HZ: u32 = 999;

/// How long the profiled storms run.
pub(crate) fn profile_secs(opts: &Opts) -> f64 {
    if opts.quick { 2.0 } else { 5.0 }
}
