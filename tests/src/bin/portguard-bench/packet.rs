//! Report section 2: the packet path, a TCP request/response loop on a
//! governed and on an ungoverned socket.

use std::{fmt::Write as _, path::Path};

use crate::{
    Opts,
    fixture::{Fixture, Setup, start_agent},
    runner::{pgbench_loop, program_ns, reps_of},
    stats::{median, min},
};

/// pgbench `rr` in `cg`: ns per request/response transaction, per rep.
fn measure_rr(cg: &Path, iters: u64, reps: usize) -> Vec<f64> {
    reps_of(&pgbench_loop(cg, "rr", 8080, (iters, iters / 5, reps), &[]))
}

/// What cutting off sockets costs on the packet path: a TCP
/// request/response loop over loopback (netperf's TCP_RR), on a governed
/// socket and on an ungoverned one with the programs attached at the
/// cgroup2 root as deployed, each in pairs with the no-program baseline.
/// Cut-off sockets are fenced in the kernel's socket lookup, so no program
/// runs per packet; this proves it.
pub(crate) fn packet_path(
    fx: &Fixture,
    opts: &Opts,
    report: &mut String,
    verdicts: &mut Vec<(String, bool, String)>,
) {
    let (pairs, iters, reps) = if opts.quick {
        (3, 5_000, 3)
    } else {
        (12, 20_000, 5)
    };
    let med = |v: &[f64]| median(&mut v.to_vec());
    let (one, plain) = (fx.cgroup(Setup::OnePolicy), fx.cgroup(Setup::Baseline));
    // Governed: the programs on the setup's subtree; the baseline process,
    // outside it, runs none.
    eprintln!("bench: packet path, governed socket");
    let agent = start_agent(
        &fx.policy(Setup::OnePolicy),
        &["--attach-cgroup", &fx.attach_point(Setup::OnePolicy)],
    );
    let (mut gov, mut gov_base, mut gov_ratio) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..pairs {
        let g = min(&measure_rr(&one, iters, reps));
        let b = min(&measure_rr(&plain, iters, reps));
        gov.push(g);
        gov_base.push(b);
        gov_ratio.push(g / b);
    }
    // warm-up (iters / 5) plus the timed run, two receiving sockets each.
    let prog_ns = program_ns(&agent, || {
        measure_rr(&one, iters, 1);
    }) as f64
        / (iters + iters / 5) as f64;
    drop(agent);
    // Ungoverned: the programs at the root, as deployed, against the same
    // agent with its programs on the governed setup's subtree only (which
    // the loop is outside of). An agent has just started in both halves of
    // a pair (its start-up work and its presence on CPU 0 are the same), so
    // the ratio is what the programs on the root cost an ungoverned
    // socket; the halves alternate in order to cancel drift.
    eprintln!("bench: packet path, ungoverned socket, programs as deployed");
    let (mut ung, mut ung_base, mut ung_ratio) = (Vec::new(), Vec::new(), Vec::new());
    let root_half = || {
        let agent = start_agent(&fx.policy(Setup::OnePolicy), &[]);
        let v = min(&measure_rr(&plain, iters, reps));
        drop(agent);
        v
    };
    let subtree_half = || {
        let agent = start_agent(
            &fx.policy(Setup::OnePolicy),
            &["--attach-cgroup", &fx.attach_point(Setup::OnePolicy)],
        );
        let v = min(&measure_rr(&plain, iters, reps));
        drop(agent);
        v
    };
    for i in 0..pairs {
        let (u, b) = if i % 2 == 0 {
            let u = root_half();
            (u, subtree_half())
        } else {
            let b = subtree_half();
            (root_half(), b)
        };
        ung.push(u);
        ung_base.push(b);
        ung_ratio.push(u / b);
    }
    let (g, u) = (med(&gov_ratio), med(&ung_ratio));
    verdicts.push((
        "request/response on a governed socket <= 1.05x baseline".into(),
        g <= 1.05,
        format!("{g:.3}x"),
    ));
    verdicts.push((
        "request/response on an ungoverned socket, programs as deployed <= 1.01x baseline".into(),
        u <= 1.01,
        format!("{u:.3}x"),
    ));
    let _ = writeln!(
        report,
        "## 2. The packet path (per packet)\n\n\
         A TCP request/response loop over loopback (netperf's TCP_RR: 1 byte each way, \
         `TCP_NODELAY`, one connection, an echo thread), {pairs} pairs of the setup and the \
         no-program baseline right after; each measurement is the fastest of {reps} runs of \
         {iters} transactions. A socket on a port its policy does not allow is cut off by \
         fencing it (bound to an interface index no interface has, so the kernel's own socket \
         lookup never matches it): no portguard program runs per packet. `sock_ops` runs at \
         connection events only (none in this loop's steady state), the `setsockopt` keeper \
         only on `setsockopt()`. The packet guard (`cgroup_skb/ingress`, one socket-storage \
         lookup per packet) is attached to the root only while a cut-off socket exists that \
         is neither fenced nor destroyable (an MPTCP listener bound to a device by a process \
         without `CAP_NET_RAW`); it is not attached here.\n\n\
         | socket | ns/transaction | baseline ns | ratio (median of pairs) |\n|---|---:|---:|---:|\n\
         | governed (programs on its subtree) | {:.0} | {:.0} | {g:.3} |\n\
         | ungoverned (programs as deployed: decision programs on the attach points, listen \
         checks on the cgroup2 root; baseline: the same agent with everything on another \
         subtree) | {:.0} | {:.0} | {u:.3} |\n\n\
         Programs' own run time on the governed socket: {prog_ns:.0} ns per transaction \
         (kernel.bpf_stats_enabled, one extra run; a transaction delivers two data packets, and \
         their ACKs ride on them).\n",
        med(&gov),
        med(&gov_base),
        med(&ung),
        med(&ung_base),
    );
}
