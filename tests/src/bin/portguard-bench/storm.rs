//! Report section 3: the denied path and a denial storm (events written,
//! lost, agent CPU).

use std::{
    fmt::Write as _,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{
    Opts,
    fixture::{Fixture, start_agent},
    runner::pgbench,
    stats::{clk_tck, cpu_ticks},
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
    let v = pgbench(
        storm_cg,
        &[
            "denied",
            "--port",
            "9999",
            "--iters",
            &iters.to_string(),
            "--warmup",
            "2000",
            "--reps",
            "5",
        ],
    );
    let denied_ns = v["median_ns"].as_f64().unwrap();
    let v = pgbench(
        storm_cg,
        &[
            "bind",
            "--port",
            "8080",
            "--iters",
            &iters.to_string(),
            "--warmup",
            "2000",
            "--reps",
            "5",
        ],
    );
    let allowed_ns = v["median_ns"].as_f64().unwrap();
    drop(agent);

    // Storm: as many denials as one process can make, the agent writing
    // every event to its log file (flood control and log rotation off, to
    // measure the pipeline; with flood control, a storm is a handful of
    // lines).
    let secs = if opts.quick { 3.0 } else { 10.0 };
    let agent = start_agent(&policy, &["--aggregate-window", "0", "--log-max-size", "0"]);
    let pid = agent.pid();
    let cpu0 = cpu_ticks(pid);
    let t0 = Instant::now();
    let v = pgbench(
        storm_cg,
        &["storm", "--port", "9999", "--seconds", &secs.to_string()],
    );
    let denials = v["denials"].as_u64().unwrap();
    let storm_secs = v["seconds"].as_f64().unwrap();
    // Let the agent drain what is queued and report losses.
    let mut last = (0usize, 0u64);
    let mut stable_since = Instant::now();
    let (written, lost) = loop {
        std::thread::sleep(Duration::from_millis(300));
        let text = std::fs::read_to_string(&agent.log).unwrap_or_default();
        let written: usize = text
            .lines()
            .filter(|l| l.contains("\"verdict\""))
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .map(|v| v["count"].as_u64().unwrap_or(1) as usize)
            .sum();
        let lost = text
            .lines()
            .filter(|l| l.contains("\"lost_total\""))
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter_map(|v| v["lost_total"].as_u64())
            .max()
            .unwrap_or(0);
        if (written, lost) != last {
            last = (written, lost);
            stable_since = Instant::now();
        } else if stable_since.elapsed() > Duration::from_secs(1) {
            break last;
        }
    };
    let busy = t0.elapsed().as_secs_f64();
    let agent_cpu = (cpu_ticks(pid) - cpu0) as f64 / clk_tck() / storm_secs * 100.0;
    let _ = busy;
    let rate = written as f64 / storm_secs;
    let accounted = written as u64 + lost == denials;
    drop(agent);

    let _ = writeln!(
        report,
        "## 3. Denied path and denial storm\n\n\
         | measurement | value |\n|---|---:|\n\
         | allowed bind, same policy (ns/op) | {allowed_ns:.0} |\n\
         | denied bind with its event (ns/op) | {denied_ns:.0} |\n\
         | denied / allowed | {:.2}x |\n\
         | storm duration (s) | {storm_secs:.1} |\n\
         | denials made | {denials} |\n\
         | events written by the agent | {written} |\n\
         | events written per second | {rate:.0} |\n\
         | events lost, counted by the kernel and reported by the agent | {lost} |\n\
         | written + lost = denials | {} |\n\
         | agent CPU during the storm (% of one core) | {agent_cpu:.0} |\n",
        denied_ns / allowed_ns,
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
        format!("{written} written + {lost} lost vs {denials} denials"),
    ));
}
