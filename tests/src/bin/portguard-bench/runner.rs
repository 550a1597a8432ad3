//! Running `pgbench` (pinned to CPU 1, in a cgroup) and reading its
//! figures, and the kernel programs' own run time while something runs.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use portguard_tests::Agent;
use serde_json::Value;

use crate::stats::fdinfo_sum;

pub(crate) fn pgbench_bin() -> PathBuf {
    std::env::current_exe()
        .expect("current_exe")
        .parent()
        .expect("bin dir")
        .join("pgbench")
}

pub(crate) fn pgbench(cg: &Path, args: &[&str]) -> Value {
    let out = Command::new(pgbench_bin())
        .args(["--cgroup", &cg.display().to_string(), "--cpu", "1"])
        .args(args)
        .output()
        .expect("running pgbench");
    assert!(
        out.status.success(),
        "pgbench {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("pgbench output")
}

/// pgbench's timed loop in `cg`: `op` on `port`, `reps` repetitions of
/// `iters` operations each after `warmup` untimed ones, then `extra`.
pub(crate) fn pgbench_loop(
    cg: &Path,
    op: &str,
    port: u16,
    (iters, warmup, reps): (u64, u64, usize),
    extra: &[&str],
) -> Value {
    let (port, iters, warmup, reps) = (
        port.to_string(),
        iters.to_string(),
        warmup.to_string(),
        reps.to_string(),
    );
    let mut args = vec![
        op, "--port", &port, "--iters", &iters, "--warmup", &warmup, "--reps", &reps,
    ];
    args.extend_from_slice(extra);
    pgbench(cg, &args)
}

/// pgbench's per-repetition ns/op.
pub(crate) fn reps_of(v: &Value) -> Vec<f64> {
    v["reps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

/// The agent's programs' own run time (ns, kernel.bpf_stats_enabled) while
/// `run` runs.
pub(crate) fn program_ns(agent: &Agent, run: impl FnOnce()) -> u64 {
    let pid = agent.pid();
    std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "1").expect("enabling bpf_stats");
    let t0 = fdinfo_sum(pid, "prog_type:", "run_time_ns:");
    run();
    let t1 = fdinfo_sum(pid, "prog_type:", "run_time_ns:");
    let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "0");
    t1 - t0
}

/// One run of `iters` operations `op` in `cg`, without warm-up: what the
/// bpf_stats figures are taken over.
pub(crate) fn one_run(cg: &Path, op: &str, iters: u64) {
    pgbench_loop(cg, op, 8080, (iters, 0, 1), &[]);
}

/// Kernel program time per operation: bpf_stats over one extra run.
pub(crate) fn program_ns_per_op(agent: &Agent, cg: &Path, op: &str, iters: u64) -> f64 {
    program_ns(agent, || one_run(cg, op, iters)) as f64 / iters as f64
}

/// A program's name, its own ns per operation and its runs per operation.
pub(crate) type ProgramCost = (String, f64, f64);

/// Each portguard program's own run time (ns) and runs per operation while
/// one extra run of `op` goes in `cg` (kernel.bpf_stats_enabled; bpftool's
/// per-program counters), for the programs that ran. Sorted by name.
pub(crate) fn program_breakdown(cg: &Path, op: &str, iters: u64) -> Vec<ProgramCost> {
    let snapshot = || -> std::collections::BTreeMap<u64, (String, u64, u64)> {
        let out = Command::new("bpftool")
            .args(["-j", "prog", "show"])
            .output()
            .expect("running bpftool");
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        v.as_array()
            .into_iter()
            .flatten()
            .filter(|p| {
                p["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("portguard_"))
            })
            .map(|p| {
                (
                    p["id"].as_u64().unwrap_or(0),
                    (
                        p["name"].as_str().unwrap_or("").to_owned(),
                        p["run_time_ns"].as_u64().unwrap_or(0),
                        p["run_cnt"].as_u64().unwrap_or(0),
                    ),
                )
            })
            .collect()
    };
    std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "1").expect("enabling bpf_stats");
    let before = snapshot();
    one_run(cg, op, iters);
    let after = snapshot();
    let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "0");
    let mut by_name: std::collections::BTreeMap<String, (u64, u64)> = Default::default();
    for (id, (name, ns, cnt)) in after {
        let (ns0, cnt0) = before.get(&id).map_or((0, 0), |b| (b.1, b.2));
        if cnt > cnt0 {
            let e = by_name.entry(name).or_default();
            e.0 += ns - ns0;
            e.1 += cnt - cnt0;
        }
    }
    by_name
        .into_iter()
        .map(|(n, (ns, cnt))| (n, ns as f64 / iters as f64, cnt as f64 / iters as f64))
        .collect()
}
