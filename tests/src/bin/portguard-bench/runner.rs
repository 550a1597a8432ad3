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

/// Kernel program time per operation: bpf_stats over one extra run.
pub(crate) fn program_ns_per_op(agent: &Agent, cg: &Path, op: &str, iters: u64) -> f64 {
    let args = [
        op,
        "--port",
        "8080",
        "--iters",
        &iters.to_string(),
        "--warmup",
        "0",
        "--reps",
        "1",
    ];
    program_ns(agent, || {
        pgbench(cg, &args);
    }) as f64
        / iters as f64
}
