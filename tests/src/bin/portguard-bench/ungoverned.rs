//! Report section 1b: what a process no policy governs pays, with the
//! programs attached as deployed (the decision programs on the attach
//! points, the host-wide ones on the cgroup2 root), against a process that
//! runs no portguard program at all.

use std::fmt::Write as _;

use crate::{
    Opts,
    fixture::{Fixture, Setup, start_agent},
    runner::{pgbench_loop, program_breakdown, reps_of},
    stats::{median, min},
};

fn measure(cg: &std::path::Path, op: &str, iters: u64, reps: usize) -> f64 {
    min(&reps_of(&pgbench_loop(
        cg,
        op,
        8080,
        (iters, iters / 5, reps),
        &[],
    )))
}

pub(crate) fn ungoverned(
    fx: &Fixture,
    opts: &Opts,
    report: &mut String,
    verdicts: &mut Vec<(String, bool, String)>,
) {
    let (pairs, iters, reps) = if opts.quick {
        (3, 10_000, 3)
    } else {
        (24, 20_000, 7)
    };
    let plain = fx.cgroup(Setup::Baseline);
    let policy = fx.policy(Setup::OnePolicy);
    // Both halves of a pair run with an agent that has just started (the
    // same start-up work, the same presence on CPU 0): as deployed, or with
    // everything on the governed setup's subtree (--attach-cgroup), which
    // the measured process is outside of: it then runs no portguard program
    // at all. The halves alternate in order to cancel drift.
    let half = |deployed: bool| {
        let extra: Vec<String> = if deployed {
            Vec::new()
        } else {
            vec!["--attach-cgroup".into(), fx.attach_point(Setup::OnePolicy)]
        };
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let agent = start_agent(&policy, &extra);
        // Its start-up work (inventory, first rescan) done.
        std::thread::sleep(std::time::Duration::from_millis(500));
        let v = (
            measure(&plain, "bind", iters, reps),
            measure(&plain, "connect", iters, reps),
        );
        drop(agent);
        v
    };
    let (mut dep, mut base) = (Vec::new(), Vec::new());
    let (mut bind_ratio, mut connect_ratio) = (Vec::new(), Vec::new());
    for i in 0..pairs {
        eprintln!("bench: ungoverned process, pair {}/{pairs}", i + 1);
        let (d, b) = if i % 2 == 0 {
            let d = half(true);
            (d, half(false))
        } else {
            let b = half(false);
            (half(true), b)
        };
        bind_ratio.push(d.0 / b.0);
        connect_ratio.push(d.1 / b.1);
        dep.push(d);
        base.push(b);
    }
    // Which programs ran for the ungoverned process, as deployed.
    let agent = start_agent(&policy, &[]);
    let ran: Vec<crate::runner::ProgramCost> = ["bind", "connect"]
        .iter()
        .flat_map(|op| program_breakdown(&plain, op, iters))
        .collect();
    drop(agent);
    let med = |v: &[f64]| median(&mut v.to_vec());
    let (rb, rc) = (med(&bind_ratio), med(&connect_ratio));
    verdicts.push((
        "ungoverned process, programs as deployed: socket + bind + close <= 1.005x a process \
         that runs no program"
            .into(),
        rb <= 1.005,
        format!("{rb:.3}x (median of {pairs} pairs)"),
    ));
    verdicts.push((
        "ungoverned process, programs as deployed: socket + connect + close <= 1.005x a process \
         that runs no program"
            .into(),
        rc <= 1.005,
        format!("{rc:.3}x (median of {pairs} pairs)"),
    ));
    let runs = if ran.is_empty() {
        "none: no portguard program ran for it (bpf_stats)".to_owned()
    } else {
        ran.iter()
            .map(|(n, ns, c)| format!("{n}: {c:.2} runs, {ns:.0} ns per operation"))
            .collect::<Vec<_>>()
            .join("; ")
    };
    let col = |v: &[(f64, f64)], bind: bool| {
        med(&v
            .iter()
            .map(|x| if bind { x.0 } else { x.1 })
            .collect::<Vec<_>>())
    };
    let _ = writeln!(
        report,
        "## 1b. A process no policy governs\n\n\
         The agent runs as deployed (no `--attach-cgroup`): the decision programs on the attach \
         points only (the parent of each governed cgroup: here the benchmark's own cgroup), the \
         fence keeper and the listen checks on the cgroup2 root. The process runs in a top-level \
         cgroup outside every attach point. Baseline: the same process while an agent with \
         everything on the governed setup's subtree runs (it runs no portguard program). \
         {pairs} pairs, halves alternating, each half with a freshly started agent; each figure \
         the fastest of {reps} runs of {iters} operations.\n\n\
         | operation | as deployed (ns/op) | baseline (ns/op) | ratio (median of pairs) |\n\
         |---|---:|---:|---:|\n\
         | socket + bind + close | {:.0} | {:.0} | {rb:.3} |\n\
         | socket + connect + close (UDP) | {:.0} | {:.0} | {rc:.3} |\n\n\
         Programs that ran for the ungoverned process, as deployed: {runs}.\n",
        col(&dep, true),
        col(&base, true),
        col(&dep, false),
        col(&base, false),
    );
}
