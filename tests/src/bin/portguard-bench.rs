//! portguard-bench: the benchmark behind `cargo xtask bench`.
//!
//! Every figure comes from this one run, on this machine, and is compared
//! with a baseline measured in the same run. Tight loops run in `pgbench`
//! (compiled, pinned to CPU 1, in its own network namespace, inside a real
//! cgroup); the agent is pinned to CPU 0.
//!
//! Sections:
//! 1. per-syscall overhead of an allowed bind and connect, per setup, over
//!    interleaved rounds (this VM is noisy: setups alternate round by round
//!    and medians are compared), plus the kernel programs' own run time per
//!    operation from `kernel.bpf_stats_enabled`;
//! 2. the denied path and a denial storm (events written, lost, agent CPU);
//! 3. policy application at scale (start-up apply, single-policy reload,
//!    kernel map memory, agent RSS).
//!
//! Writes a Markdown report (default docs/benchmarks.md) and prints it.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use portguard_tests::{Agent, Cgroup};
use serde_json::Value;

/// Allowed operations that failed with EADDRINUSE and were retried, per
/// setup (see pgbench).
static ANOMALIES: std::sync::Mutex<Vec<(String, u64)>> = std::sync::Mutex::new(Vec::new());

struct Opts {
    quick: bool,
    out: PathBuf,
}

fn pgbench_bin() -> PathBuf {
    std::env::current_exe()
        .expect("current_exe")
        .parent()
        .expect("bin dir")
        .join("pgbench")
}

fn pgbench(cg: &Path, args: &[&str]) -> Value {
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

fn pin(pid: i32, cpu: usize) {
    // SAFETY: a zeroed cpu_set_t with one CPU, applied to a child we own.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(pid, size_of::<libc::cpu_set_t>(), &set);
    }
}

fn start_agent(policy: &str, extra: &[&str]) -> Agent {
    let mut args = vec!["--rescan-interval", "1h"];
    args.extend_from_slice(extra);
    let a = Agent::start_with(policy, &args);
    pin(a.pid(), 0);
    a
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

/// Sum of `key:` values over the agent's fdinfo entries that have `kind:`.
fn fdinfo_sum(pid: i32, kind: &str, key: &str) -> u64 {
    let mut total = 0;
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return 0;
    };
    for e in dir.flatten() {
        let Ok(text) = std::fs::read_to_string(e.path()) else {
            continue;
        };
        if !text.lines().any(|l| l.starts_with(kind)) {
            continue;
        }
        for l in text.lines() {
            if let Some(v) = l.strip_prefix(key) {
                total += v.trim().parse::<u64>().unwrap_or(0);
            }
        }
    }
    total
}

fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn cpu_ticks(pid: i32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the ")" of comm: state is field 3; utime 14, stime 15.
    let rest = s.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

fn clk_tck() -> f64 {
    // SAFETY: plain sysconf.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as f64 }
}

/// A number following `marker` in the agent's log, e.g. "in 12.3 ms".
fn logged_ms(log: &str, line_marker: &str) -> Option<f64> {
    let line = log.lines().rev().find(|l| l.contains(line_marker))?;
    let (_, tail) = line.rsplit_once(" in ")?;
    tail.trim().strip_suffix(" ms")?.parse().ok()
}

fn policy_line(name: &str, cgroup: &str, ports: &str) -> String {
    format!(
        "  - {{name: {name}, cgroup: {cgroup}, bind: [{{ports: [{ports}]}}], connect: [{{ports: [{ports}]}}]}}\n"
    )
}

/// `n` policies on `parent/c{i}`, `distinct` different port sets among them.
fn scale_policy(parent: &Cgroup, n: usize, distinct: usize) -> String {
    let mut s = String::from("policies:\n");
    for i in 0..n {
        let extra = 20000 + (i % distinct.max(1));
        s.push_str(&policy_line(
            &format!("p{i}"),
            &format!("{}/c{i}", parent.rel),
            &format!("8080, {extra}"),
        ));
    }
    s
}

fn make_children(parent: &Cgroup, n: usize) {
    for i in 0..n {
        let p = parent.fs.join(format!("c{i}"));
        if !p.exists() {
            std::fs::create_dir(&p).expect("mkdir cgroup");
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Setup {
    Baseline = 0,
    OnePolicy,
    Scale10k,
    Ranges1000,
    Ancestor5,
    Landlock,
}

impl Setup {
    const ALL: [Self; 6] = [
        Self::Baseline,
        Self::OnePolicy,
        Self::Scale10k,
        Self::Ranges1000,
        Self::Ancestor5,
        Self::Landlock,
    ];
    fn label(self) -> &'static str {
        match self {
            Self::Baseline => "no program attached (baseline)",
            Self::OnePolicy => "portguard, 1 policy",
            Self::Scale10k => "portguard, 10,000 governed cgroups / 1,000 distinct policies",
            Self::Ranges1000 => "portguard, 1 policy with 1,000 disjoint port ranges",
            Self::Ancestor5 => "portguard, policy found on the 5th ancestor",
            Self::Landlock => "Landlock (TCP bind restricted to the same port)",
        }
    }
    fn agent(self) -> bool {
        !matches!(self, Self::Baseline | Self::Landlock)
    }
}

struct Fixture {
    root: Cgroup,
    plain: Cgroup,
    one: Cgroup,
    scale: Cgroup,
    ranges: Cgroup,
    anc: Cgroup,
    anc_leaf: Cgroup,
}

impl Fixture {
    fn new() -> Self {
        let root = Cgroup::new("bench");
        let plain = root.child("plain");
        let one = root.child("one");
        let scale = root.child("scale");
        make_children(&scale, 10_000);
        let ranges = root.child("ranges");
        let anc = root.child("anc");
        let anc_leaf = anc.child("l1/l2/l3/l4/l5");
        Self {
            root,
            plain,
            one,
            scale,
            ranges,
            anc,
            anc_leaf,
        }
    }

    fn policy(&self, s: Setup) -> String {
        match s {
            Setup::OnePolicy => format!("policies:\n{}", policy_line("one", &self.one.rel, "8080")),
            Setup::Scale10k => scale_policy(&self.scale, 10_000, 1000),
            Setup::Ranges1000 => {
                let ranges: Vec<String> = (0..1000)
                    .map(|i| format!("\"{}-{}\"", 10000 + 4 * i, 10001 + 4 * i))
                    .collect();
                format!(
                    "policies:\n{}",
                    policy_line(
                        "ranges",
                        &self.ranges.rel,
                        &format!("8080, {}", ranges.join(", "))
                    )
                )
            }
            Setup::Ancestor5 => format!("policies:\n{}", policy_line("anc", &self.anc.rel, "8080")),
            Setup::Baseline | Setup::Landlock => unreachable!(),
        }
    }

    /// Where the agent attaches its programs for a setup.
    fn attach_point(&self, s: Setup) -> String {
        match s {
            Setup::OnePolicy => self.one.rel.clone(),
            Setup::Scale10k => self.scale.rel.clone(),
            Setup::Ranges1000 => self.ranges.rel.clone(),
            Setup::Ancestor5 => self.anc.rel.clone(),
            Setup::Baseline | Setup::Landlock => unreachable!(),
        }
    }

    /// Where pgbench runs for a setup.
    fn cgroup(&self, s: Setup) -> PathBuf {
        match s {
            Setup::Baseline | Setup::Landlock => self.plain.fs.clone(),
            Setup::OnePolicy => self.one.fs.clone(),
            Setup::Scale10k => self.scale.fs.join("c0"),
            Setup::Ranges1000 => self.ranges.fs.clone(),
            Setup::Ancestor5 => self.anc_leaf.fs.clone(),
        }
    }
}

fn measure_once(cg: &Path, setup: Setup, op: &str, iters: u64, reps: usize) -> Vec<f64> {
    let mut args = vec![
        op.to_owned(),
        "--port".into(),
        "8080".into(),
        "--iters".into(),
        iters.to_string(),
        "--warmup".into(),
        (iters / 5).to_string(),
        "--reps".into(),
        reps.to_string(),
    ];
    if setup == Setup::Landlock {
        args.extend(["--landlock-bind".into(), "8080".into()]);
    }
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let v = pgbench(cg, &argv);
    let n = v["anomalies"].as_u64().unwrap_or(0);
    if n > 0 {
        let mut a = ANOMALIES.lock().unwrap();
        a.push((format!("{} ({op})", setup.label()), n));
    }
    reps_of(&v)
}

/// pgbench's per-repetition ns/op.
fn reps_of(v: &Value) -> Vec<f64> {
    v["reps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

/// The agent's programs' own run time (ns, kernel.bpf_stats_enabled) while
/// `run` runs.
fn program_ns(agent: &Agent, run: impl FnOnce()) -> u64 {
    let pid = agent.pid();
    std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "1").expect("enabling bpf_stats");
    let t0 = fdinfo_sum(pid, "prog_type:", "run_time_ns:");
    run();
    let t1 = fdinfo_sum(pid, "prog_type:", "run_time_ns:");
    let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "0");
    t1 - t0
}

/// Kernel program time per operation: bpf_stats over one extra run.
fn program_ns_per_op(agent: &Agent, cg: &Path, op: &str, iters: u64) -> f64 {
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

fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

fn overhead(
    fx: &Fixture,
    opts: &Opts,
    report: &mut String,
    verdicts: &mut Vec<(String, bool, String)>,
) {
    // This VM's speed drifts by tens of percent over seconds, so every
    // figure is taken as a pair: the setup, then the baseline right after.
    // The agent attaches its programs to the setup's subtree only
    // (--attach-cgroup), so the baseline process, outside it, runs no
    // program at all while the agent stays up.
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
    // portguard (1 policy) / Landlock, measured back to back.
    let mut vs_landlock: Vec<f64> = Vec::new();
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
            let agent = s
                .agent()
                .then(|| start_agent(&fx.policy(s), &["--attach-cgroup", &fx.attach_point(s)]));
            for _ in 0..pairs {
                if s == Setup::OnePolicy {
                    let p = min(&measure_once(&cg, s, "bind", iters, reps));
                    let l = min(&measure_once(
                        &base_cg,
                        Setup::Landlock,
                        "bind",
                        iters,
                        reps,
                    ));
                    vs_landlock.push(p / l);
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
            }
            drop(agent);
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
         in pairs: the setup, then immediately the no-program baseline (the agent attaches its \
         programs to the setup's cgroup subtree with `--attach-cgroup`, so the baseline \
         process, outside it, runs no program while the agent stays up). {total_pairs} pairs \
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
    verdicts.push((
        "allowed bind not slower than Landlock".into(),
        direct <= 1.0,
        format!(
            "portguard / Landlock = {direct:.3} (median of {} back-to-back pairs); \
             vs baseline: portguard {r1:.3}x, Landlock {rl:.3}x",
            vs_landlock.len()
        ),
    ));
    let _ = writeln!(
        report,
        "\nWhat an allowed explicit bind costs in portguard: three programs run. `sock_create` \
         (at `socket()`) reads the socket's family, type and protocol and returns at once for \
         TCP and UDP; it exists to deny raw/SCTP/L2TP sockets, whose own bind escapes every bind \
         hook, a bypass Landlock does not address. `bind4` reads the live generation (array), \
         then for each cgroup level from the shallowest to the deepest governed level one \
         `bpf_get_current_ancestor_cgroup_id` and one hash lookup, then the policy record \
         (array), one port-set chunk lookup (hash) and a per-CPU counter; `post_bind4` only \
         looks up the socket's storage (it judges port-0 binds, which bind4 flags). None of this \
         depends on the number of policies, cgroups or ranges, which is why the 1-policy, \
         10,000-cgroup and 1,000-range rows agree within noise. Landlock checks one rule tree \
         inside its LSM hook, without program dispatch; the three dispatches are why portguard \
         lands within a few percent of Landlock rather than below it."
    );
    let _ = writeln!(
        report,
        "\nportguard (1 policy) against Landlock directly, in back-to-back pairs: median \
         ratio {direct:.3} over {} pairs (below 1: portguard faster).",
        vs_landlock.len()
    );
    report.push('\n');
}

/// pgbench `rr` in `cg`: ns per request/response transaction, per rep.
fn measure_rr(cg: &Path, iters: u64, reps: usize) -> Vec<f64> {
    let (iters, warmup, reps) = (iters.to_string(), (iters / 5).to_string(), reps.to_string());
    let v = pgbench(
        cg,
        &[
            "rr", "--port", "8080", "--iters", &iters, "--warmup", &warmup, "--reps", &reps,
        ],
    );
    reps_of(&v)
}

/// What cutting off sockets costs on the packet path: a TCP
/// request/response loop over loopback (netperf's TCP_RR), on a governed
/// socket and on an ungoverned one with the programs attached at the
/// cgroup2 root as deployed, each in pairs with the no-program baseline.
/// Cut-off sockets are fenced in the kernel's socket lookup, so no program
/// runs per packet; this proves it.
fn packet_path(
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
    eprintln!("bench: packet path, ungoverned socket, programs on the root");
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
        "request/response on an ungoverned socket, programs on the root <= 1.01x baseline".into(),
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
         | ungoverned (programs on the cgroup2 root, as deployed; baseline: the same agent \
         with its programs on another subtree) | {:.0} | {:.0} | {u:.3} |\n\n\
         Programs' own run time on the governed socket: {prog_ns:.0} ns per transaction \
         (kernel.bpf_stats_enabled, one extra run; a transaction delivers two data packets, and \
         their ACKs ride on them).\n",
        med(&gov),
        med(&gov_base),
        med(&ung),
        med(&ung_base),
    );
}

fn denied_and_storm(
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

fn scale(
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

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .next()
                .map(|l| l.split_whitespace().nth(1).unwrap_or("0").to_owned())
        })
        .and_then(|k| k.parse::<u64>().ok())
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{cpu}, {cores} cores, {:.0} GiB RAM; kernel {}",
        mem as f64 / 1024.0 / 1024.0,
        kernel.trim()
    )
}

fn main() {
    let mut opts = Opts {
        quick: false,
        out: PathBuf::from("docs/benchmarks.md"),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => opts.quick = true,
            "--out" => opts.out = PathBuf::from(args.next().expect("--out FILE")),
            other => panic!("unknown argument {other}"),
        }
    }
    assert!(portguard_tests::is_root(), "the benchmark must run as root");
    let started = Instant::now();
    let fx = Fixture::new();
    let mut body = String::new();
    let mut verdicts = Vec::new();
    overhead(&fx, &opts, &mut body, &mut verdicts);
    packet_path(&fx, &opts, &mut body, &mut verdicts);
    denied_and_storm(&fx, &opts, &mut body, &mut verdicts);
    scale(&fx, &opts, &mut body, &mut verdicts);
    drop(fx);

    let date = humantime_date();
    let mut report = format!(
        "# portguard benchmarks\n\n\
         Generated by `cargo xtask bench{}` on {date}.\n\n\
         - Machine: {}\n\
         - Run time: {:.0} s{}\n\
         - Method: compiled loops (`pgbench`) pinned to CPU 1 in a real cgroup and their own \
         network namespace; the agent (release build) pinned to CPU 0. All figures and their \
         baselines come from this run.\n\n\
         ## Targets\n\n| target | result | measured |\n|---|---|---|\n",
        if opts.quick { " --quick" } else { "" },
        machine(),
        started.elapsed().as_secs_f64(),
        if opts.quick {
            " (quick mode: fewer rounds, shorter storm; use the full run for decisions)"
        } else {
            ""
        },
    );
    for (what, pass, measured) in &verdicts {
        let _ = writeln!(
            report,
            "| {what} | {} | {measured} |",
            if *pass { "PASS" } else { "MISS" }
        );
    }
    report.push('\n');
    report.push_str(&body);
    let anomalies = ANOMALIES.lock().unwrap().clone();
    let _ = writeln!(
        report,
        "## Anomalies\n\nAllowed binds that failed with EADDRINUSE in a fresh network namespace \
         and were retried (pgbench counts them; none is a policy decision): {}\n",
        if anomalies.is_empty() {
            "none in this run.".to_owned()
        } else {
            anomalies
                .iter()
                .map(|(s, n)| format!("{s}: {n}"))
                .collect::<Vec<_>>()
                .join("; ")
        }
    );
    let notes = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench-notes.md");
    if let Ok(n) = std::fs::read_to_string(&notes) {
        report.push_str(&n);
    }
    if let Some(dir) = opts.out.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    std::fs::write(&opts.out, &report).expect("writing the report");
    println!("{report}");
    eprintln!("bench: wrote {}", opts.out.display());
}

fn humantime_date() -> String {
    let out = Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok();
    out.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}
