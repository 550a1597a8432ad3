//! Report section 1: per-syscall overhead of an allowed bind and connect,
//! per setup, in pairs with the no-program baseline, against Landlock too.

use std::{fmt::Write as _, path::Path};

use crate::{
    ANOMALIES, Opts,
    fixture::{Fixture, Setup, start_agent},
    floor::Floor,
    profile::{Perf, Scope},
    runner::{ProgramCost, one_run, pgbench_loop, program_breakdown, program_ns_per_op, reps_of},
    stats::{median, min, percentile},
    storm::PROFILE_HZ,
};

fn measure_once(cg: &Path, setup: Setup, op: &str, iters: u64, reps: usize) -> Vec<f64> {
    let landlock: &[&str] = if setup == Setup::Landlock {
        &["--landlock-bind", "8080"]
    } else {
        &[]
    };
    let v = pgbench_loop(cg, op, 8080, (iters, iters / 5, reps), landlock);
    let n = v["anomalies"].as_u64().unwrap_or(0);
    if n > 0 {
        let mut a = ANOMALIES.lock().unwrap();
        a.push((format!("{} ({op})", setup.label()), n));
    }
    reps_of(&v)
}

pub(crate) fn overhead(
    fx: &Fixture,
    opts: &Opts,
    report: &mut String,
    verdicts: &mut Vec<(String, bool, String)>,
) {
    // This VM's speed drifts by tens of percent over seconds, so every
    // figure is taken as a pair: the setup, then the baseline right after.
    // The agent runs as deployed: its decision programs on the setup's
    // attach point only, so the baseline process, outside it, runs none of
    // them while the agent stays up (section 1b measures what that process
    // pays against one that runs no program at all).
    let (rounds, pairs) = if opts.quick { (1, 3) } else { (4, 6) };
    let (iters, reps) = if opts.quick { (10_000, 3) } else { (20_000, 5) };
    let n = Setup::ALL.len();
    let mut bind: Vec<Vec<f64>> = vec![Vec::new(); n];
    let mut connect: Vec<Vec<f64>> = vec![Vec::new(); n];
    let mut bind_ratio: Vec<Vec<f64>> = vec![Vec::new(); n];
    let mut connect_ratio: Vec<Vec<f64>> = vec![Vec::new(); n];
    let mut prog_bind: Vec<Vec<f64>> = vec![Vec::new(); n];
    let mut prog_connect: Vec<Vec<f64>> = vec![Vec::new(); n];
    let base_cg = fx.cgroup(Setup::Baseline);
    let b = Setup::Baseline as usize;
    // portguard (1 policy) / Landlock, and the dispatch floor / Landlock,
    // measured back to back.
    let mut vs_landlock: Vec<f64> = Vec::new();
    let mut floor_vs_landlock: Vec<f64> = Vec::new();
    // portguard (1 policy) / the dispatch floor, back to back: bind, connect.
    let mut vs_floor: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let floor_cg = fx.cgroup(Setup::Floor);
    // The 1-policy setup's programs, one by one (bpf_stats), per operation,
    // and the floor's empty programs, by hook: one run per round each.
    let mut breakdown: Vec<(&str, Vec<ProgramCost>)> = Vec::new();
    let mut floor_breakdown: Vec<(&str, Vec<ProgramCost>)> = Vec::new();
    for round in 0..rounds {
        for (i, s) in Setup::ALL.iter().copied().enumerate() {
            if s == Setup::Baseline {
                continue;
            }
            eprintln!(
                "bench: overhead round {}/{rounds}: {}",
                round + 1,
                s.label()
            );
            let cg = fx.cgroup(s);
            let agent = s.agent().then(|| start_agent(&fx.policy(s), &[]));
            // The floor's empty programs, on its own cgroup, also while the
            // 1-policy agent runs: the two are compared back to back.
            let floor =
                matches!(s, Setup::OnePolicy | Setup::Floor).then(|| Floor::attach(&floor_cg));
            for pair in 0..pairs {
                if s == Setup::OnePolicy {
                    // portguard, Landlock and the floor back to back, in
                    // turned order every other time (no side gains from
                    // going first).
                    let one =
                        |cg: &Path, s: Setup, op: &str| min(&measure_once(cg, s, op, iters, reps));
                    let (p, l, f) = if pair % 2 == 0 {
                        let p = one(&cg, s, "bind");
                        let l = one(&base_cg, Setup::Landlock, "bind");
                        (p, l, one(&floor_cg, Setup::Floor, "bind"))
                    } else {
                        let f = one(&floor_cg, Setup::Floor, "bind");
                        let l = one(&base_cg, Setup::Landlock, "bind");
                        (one(&cg, s, "bind"), l, f)
                    };
                    vs_landlock.push(p / l);
                    floor_vs_landlock.push(f / l);
                    vs_floor[0].push(p / f);
                    let (pc, fc) = if pair % 2 == 0 {
                        let pc = one(&cg, s, "connect");
                        (pc, one(&floor_cg, Setup::Floor, "connect"))
                    } else {
                        let fc = one(&floor_cg, Setup::Floor, "connect");
                        (one(&cg, s, "connect"), fc)
                    };
                    vs_floor[1].push(pc / fc);
                }
                // The setup, then its baseline right after.
                let pair = |op: &str| {
                    let setup = min(&measure_once(&cg, s, op, iters, reps));
                    let base = min(&measure_once(&base_cg, Setup::Baseline, op, iters, reps));
                    (setup, base)
                };
                let (sb, bb) = pair("bind");
                bind[i].push(sb);
                bind[b].push(bb);
                bind_ratio[i].push(sb / bb);
                if s != Setup::Landlock {
                    let (sc, bc) = pair("connect");
                    connect[i].push(sc);
                    connect[b].push(bc);
                    connect_ratio[i].push(sc / bc);
                }
            }
            if let Some(a) = &agent {
                prog_bind[i].push(program_ns_per_op(a, &cg, "bind", iters));
                prog_connect[i].push(program_ns_per_op(a, &cg, "connect", iters));
                if s == Setup::OnePolicy {
                    for op in ["bind", "connect"] {
                        breakdown.push((op, program_breakdown(&cg, op, iters)));
                    }
                }
            }
            if s == Setup::Floor
                && let Some(f) = &floor
            {
                for (op, into) in [
                    ("bind", &mut prog_bind[i]),
                    ("connect", &mut prog_connect[i]),
                ] {
                    let costs = f.breakdown(&cg, op, iters);
                    into.push(costs.iter().map(|c| c.1).sum());
                    floor_breakdown.push((op, costs));
                }
            }
            drop(agent);
            drop(floor);
        }
    }
    let med = |v: &[f64]| median(&mut v.to_vec());
    let fmt_prog = |v: &[f64]| {
        if v.is_empty() {
            "-".to_owned()
        } else {
            format!("{:.0}", med(v))
        }
    };
    let total_pairs = rounds * pairs;
    let _ = writeln!(
        report,
        "## 1. Per-syscall overhead (allowed operations)\n\n\
         `bind` = socket(TCP) + bind(127.0.0.1:8080) + close; `connect` = socket(UDP) + \
         connect(127.0.0.1:8080) + close (UDP, so no handshake or accept queue adds noise; \
         Landlock restricts TCP only, so it has no connect figure).\n\n\
         This VM's speed drifts by tens of percent within seconds, so each figure is measured \
         in pairs: the setup, then immediately the baseline: a process in a cgroup no policy \
         governs, outside every attach point, so it runs no decision program while the agent \
         (as deployed) stays up; section 1b compares it with a process that runs no portguard \
         program at all. {total_pairs} pairs \
         per setup over {rounds} rounds; each measurement is the fastest of {reps} runs of \
         {iters} operations (noise only adds time). ns/op is the median of the measurements; \
         the ratio is the median of the per-pair ratios (setup / its baseline). \
         \"programs\" = the kernel programs' own run time per operation \
         (kernel.bpf_stats_enabled, separate runs; stats collection adds a little overhead of \
         its own).\n\n\
         | setup | bind ns/op | ratio | programs ns/op | connect ns/op | ratio | programs ns/op |\n\
         |---|---:|---:|---:|---:|---:|---:|"
    );
    for (i, s) in Setup::ALL.iter().enumerate() {
        let br = if i == b {
            "1.000".to_owned()
        } else {
            format!("{:.3}", med(&bind_ratio[i]))
        };
        let (c, cr) = if connect[i].is_empty() {
            ("-".to_owned(), "-".to_owned())
        } else if i == b {
            (format!("{:.0}", med(&connect[i])), "1.000".to_owned())
        } else {
            (
                format!("{:.0}", med(&connect[i])),
                format!("{:.3}", med(&connect_ratio[i])),
            )
        };
        let _ = writeln!(
            report,
            "| {} | {:.0} | {br} | {} | {c} | {cr} | {} |",
            s.label(),
            med(&bind[i]),
            fmt_prog(&prog_bind[i]),
            fmt_prog(&prog_connect[i])
        );
    }
    let (one, scale, ll) = (
        Setup::OnePolicy as usize,
        Setup::Scale10k as usize,
        Setup::Landlock as usize,
    );
    for (op, r) in [("bind", &bind_ratio), ("connect", &connect_ratio)] {
        let (r10k, r1) = (med(&r[scale]), med(&r[one]));
        verdicts.push((
            format!("{op} with 10,000 governed cgroups <= 1.05x the 1-policy figure"),
            r10k / r1 <= 1.05,
            format!("{:.3}x ({r10k:.3} / {r1:.3} over the baseline)", r10k / r1),
        ));
        verdicts.push((
            format!("{op} with 10,000 governed cgroups <= 1.10x the no-program baseline"),
            r10k <= 1.10,
            format!("{r10k:.3}x"),
        ));
    }
    let (r1, rl) = (med(&bind_ratio[one]), med(&bind_ratio[ll]));
    let direct = med(&vs_landlock);
    // The same figures for the empty programs on the same hooks (the
    // dispatch floor, `floor`), beside each: what no program can go under.
    let fl = Setup::Floor as usize;
    let (rf, floor_direct) = (med(&bind_ratio[fl]), med(&floor_vs_landlock));
    let (fb, fc) = (med(&prog_bind[fl]), med(&prog_connect[fl]));
    verdicts.push((
        "governed allowed bind <= 1.02x baseline (1 policy)".into(),
        r1 <= 1.02,
        format!("{r1:.3}x (empty programs on the same hooks: {rf:.3}x)"),
    ));
    let (pb, pc) = (med(&prog_bind[one]), med(&prog_connect[one]));
    verdicts.push((
        "programs' own time per allowed bind <= 120 ns (1 policy, bpf_stats)".into(),
        pb <= 120.0,
        format!("{pb:.0} ns (empty programs on the same hooks: {fb:.0} ns)"),
    ));
    verdicts.push((
        "programs' own time per allowed connect <= 100 ns (1 policy, bpf_stats)".into(),
        pc <= 100.0,
        format!("{pc:.0} ns (empty programs on the same hooks: {fc:.0} ns)"),
    ));
    verdicts.push((
        "allowed bind, portguard / Landlock <= 0.99".into(),
        direct <= 0.99,
        format!(
            "portguard / Landlock = {direct:.3} (median of {} back-to-back pairs); \
             vs baseline: portguard {r1:.3}x, Landlock {rl:.3}x; empty programs on the same \
             hooks / Landlock = {floor_direct:.3}",
            vs_landlock.len()
        ),
    ));
    // Where the time of an allowed bind goes: every CPU sampled while the
    // 1-policy setup binds in a loop.
    let agent = start_agent(&fx.policy(Setup::OnePolicy), &[]);
    let record = Perf::record(Scope::AllCpus, PROFILE_HZ);
    let n = if opts.quick { 100_000 } else { 400_000 };
    one_run(&fx.cgroup(Setup::OnePolicy), "bind", n);
    let profile = record.record_table(
        &format!("Both CPUs while the 1-policy setup makes {n} allowed binds"),
        25,
        &[(agent.pid(), "the agent")],
    );
    drop(agent);
    design(
        report,
        &median_costs(&breakdown),
        &median_costs(&floor_breakdown),
    );
    let _ = writeln!(report, "\n{profile}");
    let _ = writeln!(
        report,
        "\nportguard (1 policy) against Landlock directly, back to back (in turned order every \
         other time): median ratio {direct:.3} over {} pairs (below 1: portguard faster).",
        vs_landlock.len()
    );
    let rfc = med(&connect_ratio[fl]);
    // portguard / the empty programs, back to back: the median and the
    // middle half of the pairs (this VM's noise, against the difference).
    let spread = |v: &[f64]| {
        let (lo, mid, hi) = (
            percentile(&mut v.to_vec(), 0.25),
            med(v),
            percentile(&mut v.to_vec(), 0.75),
        );
        format!("{mid:.3} (middle half of the pairs {lo:.3} to {hi:.3})")
    };
    let _ = writeln!(
        report,
        "\n**The dispatch floor.** Empty programs (`r0 = 1; exit`) on the hooks an allowed \
         bind runs (`sock_create`, `bind4`, `post_bind4`) and an allowed connect runs \
         (`sock_create`, `connect4`), attached to a cgroup of their own (the last row of the \
         table), cost {rf:.3}x the baseline per bind and {rfc:.3}x per connect: that is what \
         the kernel charges for running a program at all on those hooks, which no program can \
         make cheaper. Back to back ({} triples, in turned order every other time): the empty \
         programs / Landlock = {floor_direct:.3}, portguard / Landlock = {direct:.3}; \
         portguard / the empty programs = {} per bind and {} per connect: portguard's own \
         work, beyond the dispatch, is that ratio less one (below one: within this VM's \
         noise). Under bpf_stats, which resolves it better, the empty programs show {fb:.0} ns \
         per bind and {fc:.0} ns per connect (the stats' own clock reads around each run) \
         against portguard's {pb:.0} and {pc:.0} ns: its own work is about {:.0} ns per bind \
         and {:.0} ns per connect.",
        floor_vs_landlock.len(),
        spread(&vs_floor[0]),
        spread(&vs_floor[1]),
        pb - fb,
        pc - fc,
    );
    report.push('\n');
}

/// Per operation and program, the median over the rounds' runs of its ns
/// and runs per operation (a program missing from a round counts as none).
fn median_costs<'a>(rounds: &[(&'a str, Vec<ProgramCost>)]) -> Vec<(&'a str, Vec<ProgramCost>)> {
    let mut out: Vec<(&str, Vec<ProgramCost>)> = Vec::new();
    for (op, _) in rounds {
        if out.iter().any(|(o, _)| o == op) {
            continue;
        }
        let runs: Vec<&Vec<ProgramCost>> = rounds
            .iter()
            .filter(|(o, _)| o == op)
            .map(|(_, p)| p)
            .collect();
        let mut names: Vec<&String> = runs.iter().flat_map(|p| p.iter().map(|c| &c.0)).collect();
        names.sort();
        names.dedup();
        let costs = names
            .into_iter()
            .map(|name| {
                let pick = |f: fn(&ProgramCost) -> f64| {
                    let mut v: Vec<f64> = runs
                        .iter()
                        .map(|p| p.iter().find(|c| &c.0 == name).map_or(0.0, f))
                        .collect();
                    median(&mut v)
                };
                (name.clone(), pick(|c| c.1), pick(|c| c.2))
            })
            .collect();
        out.push((op, costs));
    }
    out
}

/// The design paragraph: what each allowed operation runs, with each
/// program's own time from bpf_stats (the 1-policy setup).
fn design(
    report: &mut String,
    breakdown: &[(&str, Vec<ProgramCost>)],
    floor: &[(&str, Vec<ProgramCost>)],
) {
    let _ = writeln!(
        report,
        "\n### Design: what an allowed operation runs\n\n\
         A process runs portguard's decision programs only when its socket was made under an \
         attach point (the parent of a governed cgroup); everywhere else it runs none (section \
         1b). Under an attach point, an allowed explicit `bind()` runs `sock_create` at \
         `socket()` (family, type and protocol; it returns at once for TCP and UDP, and exists \
         to deny raw/SCTP/L2TP sockets, whose own bind escapes every bind hook, which Landlock \
         does not address), `bind4` (the live generation and the cache epoch from an array; \
         the calling task's cgroup (`bpf_get_current_task_btf`, two BTF-typed loads) and its \
         cache word (`bpf_cgrp_storage_get`): while the word carries the current epoch it \
         names the governing policy, else, as on kernels without the cache, for each cgroup \
         level from the shallowest to the deepest governed level one \
         `bpf_get_current_ancestor_cgroup_id` and one hash lookup, and the answer is cached; \
         the policy record, an \
         array, which holds a port set of up to two ranges inline (`[8080]`, `[ephemeral, \
         8080]`), so the port is tested without a further lookup; only a larger set costs one \
         port-set chunk, a hash lookup; two per-CPU counters) and `post_bind4` \
         (one socket-storage lookup: it judges port-0 binds, which bind4 flags). An allowed \
         `connect()` runs `sock_create` and `connect4` (the same decision). None of this \
         depends on the number of policies, cgroups or ranges. Each program's own time per \
         operation (bpf_stats, the median of one extra run per round; it includes the two clock \
         reads bpf_stats adds around each run, which is why a program that returns at once still shows tens of \
         ns; \"empty program\" is the dispatch floor's program on the same hook, measured the \
         same way, and \"above it\" the difference: portguard's own work):\n\n\
         | operation | program | runs per operation | ns per operation | empty program, same hook | above it |\n\
         |---|---|---:|---:|---:|---:|"
    );
    for (op, progs) in breakdown {
        let empty = floor.iter().find(|(o, _)| o == op).map(|(_, p)| p);
        for (name, ns, runs) in progs {
            let hook = name.strip_prefix("portguard_").unwrap_or(name);
            match empty.and_then(|p| p.iter().find(|(h, _, _)| h == hook)) {
                Some((_, e, _)) => {
                    let _ = writeln!(
                        report,
                        "| {op} | `{name}` | {runs:.2} | {ns:.0} | {e:.0} | {:.0} |",
                        ns - e
                    );
                }
                None => {
                    let _ = writeln!(report, "| {op} | `{name}` | {runs:.2} | {ns:.0} | - | - |");
                }
            }
        }
    }
}
