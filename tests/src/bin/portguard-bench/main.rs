//! portguard-bench: the benchmark behind `cargo xtask bench`.
//!
//! Every figure comes from this one run, on this machine, and is compared
//! with a baseline measured in the same run. Tight loops run in `pgbench`
//! (compiled, pinned to CPU 1, in its own network namespace, inside a real
//! cgroup); the agent is pinned to CPU 0.
//!
//! Sections (one module each):
//! 1. per-syscall overhead of an allowed bind and connect, per setup, over
//!    interleaved rounds (this VM is noisy: setups alternate round by round
//!    and medians are compared), plus the kernel programs' own run time per
//!    operation from `kernel.bpf_stats_enabled` (`overhead`), against the
//!    dispatch floor: empty programs on the same hooks (`floor`);
//! 2. the packet path: a TCP request/response loop on a governed socket and
//!    on an ungoverned one, with the programs on the cgroup2 root (`packet`);
//! 3. the denied path and a denial storm with every event written (events
//!    written, lost, agent CPU, where the agent's time goes) (`storm`);
//!    3b. a storm with two tenants as deployed: every denial of the quiet
//!    one delivered, per-policy suppressed and lost, decisions per second
//!    accounted exactly and where the time goes (`tenants`); both account
//!    per policy (`ledger`) and profile with perf (`profile`);
//! 4. policy application at scale (start-up apply, single-policy reload,
//!    kernel map memory, agent RSS) (`apply`);
//! 5. the runtime hook's "govern this cgroup now" request on the status
//!    socket (a governed cgroup, a restarted unit's new one) against a
//!    status request, and the `portguard hook unit` process against
//!    `/bin/true` (`hook`).
//!
//! Writes a Markdown report (default docs/benchmarks.md) and prints it.
//! `--only overhead,packet,storm,scale,hook` runs some sections (`storm`:
//! 3 and 3b) and writes to target/bench-<sections>.md unless `--out` says
//! otherwise: a partial run never replaces the full report.

mod apply;
mod fixture;
mod floor;
mod hook;
mod ledger;
mod overhead;
mod packet;
mod profile;
mod runner;
mod spawn;
mod stats;
mod storm;
mod tenants;
mod ungoverned;

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use apply::scale;
use fixture::Fixture;
use hook::hook_latency;
use overhead::overhead;
use packet::packet_path;
use storm::denied_and_storm;
use tenants::two_tenant_storm;
use ungoverned::ungoverned;

/// Allowed operations that failed with EADDRINUSE and were retried, per
/// setup (see pgbench).
static ANOMALIES: std::sync::Mutex<Vec<(String, u64)>> = std::sync::Mutex::new(Vec::new());

struct Opts {
    quick: bool,
    out: PathBuf,
    /// `--only`: the sections to run (None: all).
    only: Option<Vec<String>>,
}

/// Sections `--only` names, in report order.
const SECTIONS: [&str; 6] = ["overhead", "ungoverned", "packet", "storm", "scale", "hook"];

impl Opts {
    fn runs(&self, section: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|o| o.iter().any(|s| s == section))
    }
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
        out: PathBuf::new(),
        only: None,
    };
    let mut out = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => opts.quick = true,
            "--out" => out = Some(PathBuf::from(args.next().expect("--out FILE"))),
            "--only" => {
                let list = args.next().expect("--only SECTION[,SECTION...]");
                let only: Vec<String> = list.split(',').map(str::to_owned).collect();
                for s in &only {
                    assert!(
                        SECTIONS.contains(&s.as_str()),
                        "--only: unknown section {s} (sections: {})",
                        SECTIONS.join(", ")
                    );
                }
                opts.only = Some(only);
            }
            other => panic!("unknown argument {other}"),
        }
    }
    opts.out = out.unwrap_or_else(|| match &opts.only {
        None => PathBuf::from("docs/benchmarks.md"),
        Some(only) => PathBuf::from(format!("target/bench-{}.md", only.join("-"))),
    });
    assert!(portguard_tests::is_root(), "the benchmark must run as root");
    let started = Instant::now();
    let fx = Fixture::new();
    let mut body = String::new();
    let mut verdicts = Vec::new();
    if opts.runs("overhead") {
        overhead(&fx, &opts, &mut body, &mut verdicts);
    }
    if opts.runs("ungoverned") {
        ungoverned(&fx, &opts, &mut body, &mut verdicts);
    }
    if opts.runs("packet") {
        packet_path(&fx, &opts, &mut body, &mut verdicts);
    }
    if opts.runs("storm") {
        denied_and_storm(&fx, &opts, &mut body, &mut verdicts);
        two_tenant_storm(&fx, &opts, &mut body, &mut verdicts);
    }
    if opts.runs("scale") {
        scale(&fx, &opts, &mut body, &mut verdicts);
    }
    if opts.runs("hook") {
        hook_latency(&fx, &opts, &mut body, &mut verdicts);
    }
    drop(fx);

    let date = humantime_date();
    let mut report = format!(
        "# portguard benchmarks\n\n\
         Generated by `cargo xtask bench{}{}` on {date}.\n\n\
         - Machine: {}\n\
         - Run time: {:.0} s{}{}\n\
         - Method: compiled loops (`pgbench`) pinned to CPU 1 in a real cgroup and their own \
         network namespace; the agent (release build) pinned to CPU 0. All figures and their \
         baselines come from this run.\n\n\
         ## Targets\n\n| target | result | measured |\n|---|---|---|\n",
        if opts.quick { " --quick" } else { "" },
        opts.only
            .as_ref()
            .map_or(String::new(), |o| format!(" --only {}", o.join(","))),
        machine(),
        started.elapsed().as_secs_f64(),
        if opts.quick {
            " (quick mode: fewer rounds, shorter storm; use the full run for decisions)"
        } else {
            ""
        },
        if opts.only.is_some() {
            " (only these sections: the other sections' targets were not measured)"
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
            // One entry per setup and operation, in the order first met:
            // the same pair is measured many times.
            let mut per: Vec<(&str, u64, u64)> = Vec::new();
            for (s, n) in &anomalies {
                match per.iter_mut().find(|(k, _, _)| k == s) {
                    Some((_, total, runs)) => {
                        *total += n;
                        *runs += 1;
                    }
                    None => per.push((s, *n, 1)),
                }
            }
            per.iter()
                .map(|(s, n, runs)| match runs {
                    1 => format!("{s}: {n}"),
                    _ => format!("{s}: {n} in {runs} measurements"),
                })
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
