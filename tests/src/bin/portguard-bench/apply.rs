//! Report section 4: policy application at scale (start-up apply, ready,
//! single-policy reload, kernel map memory, agent RSS).

use std::{fmt::Write as _, time::Instant};

use crate::{
    Opts,
    fixture::{Fixture, scale_policy, start_agent},
    stats::{fdinfo_sum, logged_ms, rss_kib},
};

pub(crate) fn scale(
    fx: &Fixture,
    opts: &Opts,
    report: &mut String,
    verdicts: &mut Vec<(String, bool, String)>,
) {
    let _ = opts;
    let _ = writeln!(
        report,
        "## 4. Policy application at scale\n\n\
         One policy per cgroup (`bind` and `connect` each allowing 8080 and one port from \
         1,000 distinct values). \"start-up apply\" is resolving the cgroups and writing the \
         maps (agent log); \"ready\" is from process start to READY=1, including program load; \
         \"reload\" changes one policy and is timed from SIGHUP to READY=1 (and by the agent). \
         Kernel map memory is the sum of the maps' own `memlock` accounting (fdinfo).\n\n\
         | governed cgroups | distinct policies | start-up apply (ms) | ready (ms) | reload, 1 changed (ms, SIGHUP to READY) | reload (ms, agent) | kernel map memory (MiB) | agent RSS (MiB) |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    for n in [1usize, 1000, 10_000] {
        let distinct = n.min(1000);
        let policy = scale_policy(&fx.scale, n, distinct);
        let t0 = Instant::now();
        let mut agent = start_agent(&policy, &[]);
        let ready_ms = t0.elapsed().as_secs_f64() * 1e3;
        let apply_ms = logged_ms(&agent.stderr(), "daemon: applied").unwrap_or(f64::NAN);
        let pid = agent.pid();
        let maps = fdinfo_sum(pid, "map_type:", "memlock:");
        let rss = rss_kib(pid) * 1024;
        // Change one policy (p0's second port) and reload.
        let changed = policy.replacen("8080, 20000]", "8080, 30000]", 2);
        agent.write_policy(&changed);
        let t1 = Instant::now();
        agent.hup_and_wait();
        let reload_ms = t1.elapsed().as_secs_f64() * 1e3;
        let reload_agent = logged_ms(&agent.stderr(), "daemon: reloaded").unwrap_or(f64::NAN);
        drop(agent);
        let _ = writeln!(
            report,
            "| {n} | {distinct} | {apply_ms:.1} | {ready_ms:.0} | {reload_ms:.1} | {reload_agent:.1} | {:.2} | {:.1} |",
            mib(maps),
            mib(rss)
        );
        if n == 10_000 {
            verdicts.push((
                "10,000 cgroups: kernel map memory < 64 MiB".into(),
                mib(maps) < 64.0,
                format!("{:.2} MiB", mib(maps)),
            ));
            verdicts.push((
                "10,000 cgroups: agent RSS < 64 MiB".into(),
                mib(rss) < 64.0,
                format!("{:.1} MiB", mib(rss)),
            ));
            verdicts.push((
                "10,000 cgroups: start-up apply < 1 s".into(),
                apply_ms < 1000.0,
                format!("{apply_ms:.1} ms"),
            ));
            verdicts.push((
                "10,000 cgroups: single-policy reload < 50 ms".into(),
                reload_ms < 50.0,
                format!("{reload_ms:.1} ms from SIGHUP to READY=1"),
            ));
        }
    }
    report.push('\n');
}
