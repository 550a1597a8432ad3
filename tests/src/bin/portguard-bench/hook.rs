//! Report section 5: the runtime hook's "govern this cgroup now" request
//! (issue 17), and what `portguard hook unit` adds to a unit's start.
//!
//! One `unit:` policy selects `pgbench-hook-<pid>.service`, laid out as
//! systemd lays a unit out (`<slice>/<unit>` under the fixture's root); in
//! turn 0, 1,000 and 10,000 other cgroups (section 4's) are governed too,
//! then none with section 4's 10,000 cgroups gone from the host (the agent
//! scans the whole tree for `unit:` policies). Per setting, one agent, and
//! rounds that each time:
//! 1. a govern request for the unit's new cgroup (removed and made again,
//!    as systemd does on a restart: same path, new id), right after the
//!    previous round's: on the full path the agent first waits for the RCU
//!    grace period (`membarrier`) its previous flip started (a quick
//!    answer, `agent::govern_now`, makes no flip);
//! 2. after [`SETTLE`], the same for another new cgroup: a unit that
//!    restarts alone;
//! 3. that request again (the idempotent case: already governed);
//! 4. a `{"request":"status"}` on the same socket: the baseline (answered
//!    by the socket's task, without the agent's loop).
//!
//! Every govern answer must say `ok`, the unit's policy and the cgroup's
//! id, or the run panics. Then the hook as systemd runs it: the agent
//! binary's `portguard hook unit`, started in the unit's (new) cgroup
//! (`clone3(CLONE_INTO_CGROUP)`, see `spawn::run_in`), against `/bin/true`
//! spawned the same way, in alternating order.
//! The client side (this thread and what it spawns) is pinned to CPU 1,
//! the agent to CPU 0. Rows with 10,000 cgroups on the host take about a
//! second a round: rounds are time-boxed (at least [`Rounds::min`]).

use std::{
    fmt::Write as _,
    io::{Read as _, Write as _},
    os::unix::{fs::MetadataExt as _, net::UnixStream},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use portguard::hook::protocol::{Govern, HookKind, Reply, Request};
use portguard_tests::{Agent, Cgroup, agent_bin, cgroup2_root};

use crate::{
    Opts,
    fixture::{Fixture, make_children, scale_policy, start_agent},
    spawn::run_in,
    stats::{median, percentile},
};

/// The unit's policy.
const POLICY: &str = "pgbench-hook";

/// The unit's cgroup, `<slice>/<unit>` under the fixture's root. The slice
/// is the drop guard: dropping it removes both, whatever runs in them
/// killed first, also when the benchmark panics.
struct UnitCgroup {
    _slice: Cgroup,
    name: String,
    fs: PathBuf,
    rel: String,
}

impl UnitCgroup {
    fn new(fx: &Fixture) -> Self {
        let pid = std::process::id();
        let slice = fx.root.child(&format!("pgbench-hook-{pid}.slice"));
        let name = format!("pgbench-hook-{pid}.service");
        let unit = Self {
            fs: slice.fs.join(&name),
            rel: format!("{}/{name}", slice.rel),
            _slice: slice,
            name,
        };
        std::fs::create_dir(&unit.fs).expect("mkdir the unit's cgroup");
        unit
    }

    fn id(&self) -> u64 {
        std::fs::metadata(&self.fs)
            .expect("the unit's cgroup")
            .ino()
    }

    /// Remove the unit's cgroup and make it again, as systemd does when a
    /// unit restarts: same path, new id.
    fn restart(&self) {
        // A child that just exited may still be leaving the cgroup.
        let mut tries = 0;
        loop {
            match std::fs::remove_dir(&self.fs) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && tries < 1000 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(e) => panic!("rmdir {}: {e}", self.fs.display()),
            }
        }
        std::fs::create_dir(&self.fs).expect("mkdir the unit's cgroup");
    }

    /// The request line `portguard hook unit` sends for the cgroup as it is
    /// now.
    fn govern_line(&self, id: u64) -> Vec<u8> {
        let mut line = serde_json::to_vec(&Request::Govern(Govern {
            cgroup_id: id,
            cgroup: self.rel.clone(),
            hook: HookKind::Unit,
            container_id: None,
            sandbox: false,
            container_name: None,
            sandbox_id: None,
            unit: Some(self.name.clone()),
        }))
        .expect("serialising a request");
        line.push(b'\n');
        line
    }
}

/// One request as a hook makes it: connect, write one line, shut down the
/// write side, read the answer to its end. The answer and the round trip.
fn ask(socket: &Path, line: &[u8]) -> (Vec<u8>, f64) {
    let t0 = Instant::now();
    let mut s = UnixStream::connect(socket)
        .unwrap_or_else(|e| panic!("connecting to {}: {e}", socket.display()));
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("set_read_timeout");
    s.write_all(line).expect("sending the request");
    s.shutdown(std::net::Shutdown::Write).expect("shutdown");
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).expect("reading the answer");
    (answer, t0.elapsed().as_secs_f64() * 1e6)
}

/// A govern answer that says the unit's cgroup `id` is governed by the
/// unit's policy; panics otherwise (a benchmark of failures is worthless).
fn check(answer: &[u8], id: u64, agent: &Agent) -> Reply {
    let r: Reply = serde_json::from_slice(answer)
        .unwrap_or_else(|e| panic!("govern answer {:?}: {e}", String::from_utf8_lossy(answer)));
    if !r.ok || r.policy.as_deref() != Some(POLICY) || r.cgroup_id != id {
        panic!(
            "govern request for cgroup id {id}: expected ok with policy {POLICY}, got {:?}\n\
             --- agent stderr ---\n{}",
            String::from_utf8_lossy(answer),
            agent.stderr()
        );
    }
    r
}

/// This thread pinned to one CPU (what it spawns inherits it); the former
/// affinity back on drop.
struct Pinned(libc::cpu_set_t);

impl Pinned {
    fn to(cpu: usize) -> Self {
        // SAFETY: cpu_set_t is plain data; pid 0 is the calling thread.
        unsafe {
            let mut was: libc::cpu_set_t = std::mem::zeroed();
            libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut was);
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
            Self(was)
        }
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        // SAFETY: restoring the set read in `to`.
        unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &self.0) };
    }
}

/// Cgroup directories on the host, as far down as the agent's tree scan
/// for `unit:` policies looks (16 levels).
fn host_cgroups() -> usize {
    fn count(dir: &Path, depth: usize) -> usize {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return 0;
        };
        entries
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| {
                1 + if depth + 1 < 16 {
                    count(&e.path(), depth + 1)
                } else {
                    0
                }
            })
            .sum()
    }
    count(&cgroup2_root(), 0)
}

/// One setting's measurements: round trips in µs, processes in ms.
#[derive(Default)]
struct Row {
    label: String,
    others: usize,
    host: usize,
    status: Vec<f64>,
    status_bytes: usize,
    /// Status answers the agent cut short (left out of `status`).
    status_cut: usize,
    governed: Vec<f64>,
    /// A restarted unit's new cgroup, the agent's maps untouched for
    /// [`SETTLE`].
    fresh: Vec<f64>,
    /// The agent's own time for those (the answers' `micros`).
    fresh_agent: Vec<f64>,
    /// A new cgroup right after the agent governed another one.
    back_to_back: Vec<f64>,
    hook: Vec<f64>,
    truth: Vec<f64>,
    /// Per start, the hook's time less `/bin/true`'s.
    added: Vec<f64>,
}

/// How many rounds: up to `max`, and past `min` only while within
/// `budget` (a round takes seconds with 10,000 cgroups on the host).
struct Rounds {
    min: usize,
    max: usize,
    budget: Duration,
}

impl Rounds {
    fn more(&self, done: usize, since: Instant) -> bool {
        done < self.min || (done < self.max && since.elapsed() < self.budget)
    }
}

/// The 1 s that `portguard hook unit --timeout` waits by default: a round
/// trip slower than this fails (or lets through) the start.
const HOOK_TIMEOUT_US: f64 = 1e6;

/// A pause between rounds: the agent rewrites a generation of its maps only
/// after an RCU grace period since it last flipped them (`membarrier`,
/// started at the flip on a thread of its own; `portguard::apply::GRACE`,
/// 50 ms, only where that is refused). A unit that restarts alone finds it
/// over; starts in quick succession may wait for it.
const SETTLE: Duration = Duration::from_millis(60);

const WARMUP: usize = 5;

/// The govern and status requests, round after round (see the module
/// docs).
fn requests(agent: &Agent, unit: &UnitCgroup, rounds: &Rounds, row: &mut Row) {
    let socket = agent.status_socket();
    let status_line = b"{\"request\":\"status\"}\n";
    let t0 = Instant::now();
    let mut i = 0;
    while i < WARMUP || rounds.more(row.fresh.len(), t0) {
        // Right after the last round's new cgroup was governed.
        unit.restart();
        let id = unit.id();
        let (a, back_to_back) = ask(&socket, &unit.govern_line(id));
        check(&a, id, agent);
        std::thread::sleep(SETTLE);
        unit.restart();
        let id = unit.id();
        let line = unit.govern_line(id);
        let (a, fresh) = ask(&socket, &line);
        let reply = check(&a, id, agent);
        let (a, governed) = ask(&socket, &line);
        check(&a, id, agent);
        let (a, status) = ask(&socket, status_line);
        if i == 0 {
            let doc: serde_json::Value = serde_json::from_slice(&a).expect("status document");
            assert_eq!(
                doc["policies"].as_array().map(Vec::len),
                Some(row.others + 1),
                "the status document lists every policy"
            );
        }
        if i >= WARMUP {
            row.back_to_back.push(back_to_back);
            row.fresh.push(fresh);
            row.fresh_agent.push(reply.micros as f64);
            row.governed.push(governed);
            // The agent stops writing after 5 s and closes: a document
            // cut short is a failed request, not a fast one.
            if a.ends_with(b"}\n") {
                row.status.push(status);
                row.status_bytes = a.len();
            } else {
                row.status_cut += 1;
            }
        }
        i += 1;
    }
}

/// The hook as systemd runs it, against `/bin/true`: each start in a new
/// cgroup, [`SETTLE`] after the last; the two take turns going first.
fn hook_processes(agent: &Agent, unit: &UnitCgroup, runs: &Rounds, row: &mut Row) {
    let socket = agent.status_socket();
    let hook = || {
        let mut c = Command::new(agent_bin());
        c.args(["hook", "unit", "--socket"])
            .arg(&socket)
            .args(["--timeout", "5s", "--on-failure", "closed"])
            .arg(&unit.name);
        c
    };
    let t0 = Instant::now();
    let mut i = 0;
    while i < 2 || runs.more(row.hook.len(), t0) {
        std::thread::sleep(SETTLE);
        unit.restart();
        let (h, t) = if i % 2 == 0 {
            let h = run_in(&unit.fs, hook());
            (h, run_in(&unit.fs, Command::new("/bin/true")))
        } else {
            let t = run_in(&unit.fs, Command::new("/bin/true"));
            (run_in(&unit.fs, hook()), t)
        };
        // The hook exits 0 only on an `ok` answer; that the answer named
        // the unit's policy is checked here (untimed).
        let id = unit.id();
        check(&ask(&socket, &unit.govern_line(id)).0, id, agent);
        if i >= 2 {
            row.hook.push(h);
            row.truth.push(t);
            row.added.push(h - t);
        }
        i += 1;
    }
}

fn measure(fx: &Fixture, unit: &UnitCgroup, others: usize, label: &str, opts: &Opts) -> Row {
    eprintln!("bench: runtime hook, other governed cgroups: {label}");
    let mut policy = if others == 0 {
        String::from("policies:\n")
    } else {
        scale_policy(&fx.scale, others, others.min(1000))
    };
    let _ = writeln!(
        policy,
        "  - {{name: {POLICY}, unit: {}, bind: [{{ports: [9000]}}]}}",
        unit.name
    );
    // The agent's default loss check (the fixture's 200 ms would read
    // 10,000 policies' counters five times a second on the agent's one
    // thread, in the way of every request).
    let agent = start_agent(&policy, &["--lost-report-interval", "1s"]);
    let s = Duration::from_secs;
    let (rounds, runs) = if opts.quick {
        (
            Rounds {
                min: 15,
                max: 200,
                budget: s(15),
            },
            Rounds {
                min: 8,
                max: 40,
                budget: s(8),
            },
        )
    } else {
        (
            Rounds {
                min: 30,
                max: 1000,
                budget: s(30),
            },
            Rounds {
                min: 20,
                max: 100,
                budget: s(20),
            },
        )
    };
    let mut row = Row {
        label: label.to_owned(),
        others,
        host: host_cgroups(),
        ..Row::default()
    };
    let _pin = Pinned::to(1);
    requests(&agent, unit, &rounds, &mut row);
    hook_processes(&agent, unit, &runs, &mut row);
    drop(agent);
    row
}

fn p(v: &[f64], q: f64) -> f64 {
    percentile(&mut v.to_vec(), q)
}

pub(crate) fn hook_latency(
    fx: &Fixture,
    opts: &Opts,
    report: &mut String,
    verdicts: &mut Vec<(String, bool, String)>,
) {
    let unit = UnitCgroup::new(fx);
    let mut rows = Vec::new();
    for n in [0usize, 1000, 10_000] {
        rows.push(measure(fx, &unit, n, &format!("{n}"), opts));
    }
    // The same without section 4's 10,000 cgroups on the host: what the
    // agent's scan of the whole tree costs, apart from what it governs.
    for i in 0..10_000 {
        let _ = std::fs::remove_dir(fx.scale.fs.join(format!("c{i}")));
    }
    rows.push(measure(
        fx,
        &unit,
        0,
        "0, without section 4's 10,000 cgroups",
        opts,
    ));
    make_children(&fx.scale, 10_000);
    drop(unit);

    let _ = writeln!(
        report,
        "## 5. Runtime hook: govern request latency\n\n\
         A `unit:` policy selecting one unit (`<slice>/<unit>` under the benchmark's cgroup), \
         plus other cgroups governed by `cgroup:` policies (section 4's); the last row has \
         none of section 4's cgroups on the host. \"host cgroups\" counts the cgroup \
         directories the agent's tree scan walks. A govern request adds the hook's cgroup and \
         its ancestors to the agent's index; a cgroup a policy names itself, below a point the \
         decision programs already run on (here the unit's slice), is \
         governed by one insert into the live generation of the kernel maps and answered at \
         once (the agent's own time, below), and the full resolve and apply follow from a \
         survey; otherwise the agent re-resolves from what it knows and applies before \
         answering. The same cgroup changes also make the agent walk the whole tree \
         (16 levels, for `unit:` policies: its inotify rescan) on a thread of its own at nice \
         10 (a survey: the loop goes on serving requests), then install what it found and \
         apply it on the loop (planned from the live generation's records: only the \
         cgroups changed), and list sockets again (its inventory, after a change of what is \
         governed: listed on a blocking thread, judged on the loop); a request that arrives \
         while the loop installs a survey or judges sockets waits for it, hence round trips \
         above the agent's own time.\n\n\
         A round sends on the agent's status socket: a govern request for the unit's new \
         cgroup (removed and made again, as systemd does on a restart: a new id) right after \
         the previous round's (\"right after another\": on the full path the agent first waits \
         for the RCU grace period, `membarrier(MEMBARRIER_CMD_GLOBAL)`, that its last flip of \
         its maps started; a quick answer makes no flip); then, {} ms later, the \
         same for another new cgroup (\"new cgroup\": a unit restarting alone), the same \
         request again \
         (\"governed\": idempotent) and a status request (the baseline: built off the agent's \
         loop, on tokio's blocking pool, but its document lists every policy with its \
         kernel counters, so it grows with them). The agent watches the slice (inotify), but a \
         request sent at once reaches it first: every govern answer was checked to say ok, the \
         unit's policy and the new cgroup's id. Round trips are client-side (connect, one \
         line, read to the end); \"agent's own time\" is the answer's `micros` (from the \
         loop taking the request to answering). {} rounds per row, fewer when the row's \
         time box ends (after {WARMUP} warm-up rounds).\n\n\
         \"hook process\" is `portguard hook unit --timeout 5s` spawned into the unit's new \
         cgroup (started there by `clone3(CLONE_INTO_CGROUP)`, as systemd 255 and later \
         start `ExecStartPre=`) until it exits, against `/bin/true` spawned the same way, \
         alternating which goes first, {} ms after the last start; \"hook adds\" is, per \
         start, the hook's time less `/bin/true`'s (up to {} starts). Not joined after the \
         fork, through `cgroup.procs`, as older systemd does: on this VM that migration waits \
         for an RCU grace period (10-25 ms) unless another came shortly before, so it fell on \
         whichever of a pair went first, and the difference measured it instead of the hook \
         (with it, the hook \"added\" 20.9-24.2 ms at p99, and 20.8-25.7 ms with no other \
         governed cgroup). Unlike the requests above, the hook's request leaves a few ms after the \
         mkdir, when the agent has begun the survey its inotify watch schedules 5 ms after a \
         change. Client pinned to CPU 1; the agent to CPU 0, \
         with its default `--lost-report-interval 1s`.\n\n\
         | other governed cgroups | host cgroups | rounds / hook runs | status (µs, p50 / p99; answer size) | govern, governed (µs, p50 / p99 / max) | govern, new cgroup (µs, p50 / p99 / max) | agent's own time, new cgroup (µs, p50) | govern, new cgroup right after another (µs, p50 / p99) | govern / status (p50: governed, new) | govern round trips over 1 s (the hook's default --timeout) | hook process (ms, p50 / p99) | /bin/true (ms, p50 / p99) | hook adds, per start (ms, p50 / p99) |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        SETTLE.as_millis(),
        if opts.quick {
            "Up to 200"
        } else {
            "Up to 1,000"
        },
        SETTLE.as_millis(),
        if opts.quick { 40 } else { 100 },
    );
    for r in &rows {
        row_line(report, r);
    }
    report.push('\n');

    let big = rows
        .iter()
        .find(|r| r.others == 10_000)
        .expect("the 10,000 row");
    let f99 = p(&big.fresh, 0.99) / 1e3;
    verdicts.push((
        "govern request for a new cgroup, p99 < 10 ms with 10,000 governed cgroups".into(),
        f99 < 10.0,
        format!(
            "{f99:.1} ms (p50 {:.1} ms; {} rounds; {} host cgroups)",
            p(&big.fresh, 0.5) / 1e3,
            big.fresh.len(),
            big.host
        ),
    ));
    let added99 = p(&big.added, 0.99);
    verdicts.push((
        "`portguard hook unit` adds < 20 ms to a start (p99), with 10,000 governed cgroups".into(),
        added99 < 20.0,
        format!(
            "{added99:.1} ms (per start, the hook less `/bin/true`; p50 {:.1} ms; {} starts)",
            p(&big.added, 0.5),
            big.added.len()
        ),
    ));
}

fn row_line(report: &mut String, r: &Row) {
    let (s50, g50, f50) = (p(&r.status, 0.5), p(&r.governed, 0.5), p(&r.fresh, 0.5));
    let slow = r
        .fresh
        .iter()
        .chain(&r.governed)
        .chain(&r.back_to_back)
        .filter(|us| **us > HOOK_TIMEOUT_US)
        .count();
    let cut = if r.status_cut > 0 {
        format!(", {} cut short", r.status_cut)
    } else {
        String::new()
    };
    let _ = writeln!(
        report,
        "| {} | {} | {} / {} | {s50:.0} / {:.0} ({:.1} KiB{cut}) | {g50:.0} / {:.0} / {:.0} | \
         {f50:.0} / {:.0} / {:.0} | {:.0} | {:.0} / {:.0} | {:.2}x, {:.2}x | {slow} of {} | \
         {:.1} / {:.1} | {:.1} / {:.1} | {:.1} / {:.1} |",
        r.label,
        r.host,
        r.fresh.len(),
        r.hook.len(),
        p(&r.status, 0.99),
        r.status_bytes as f64 / 1024.0,
        p(&r.governed, 0.99),
        p(&r.governed, 1.0),
        p(&r.fresh, 0.99),
        p(&r.fresh, 1.0),
        median(&mut r.fresh_agent.clone()),
        p(&r.back_to_back, 0.5),
        p(&r.back_to_back, 0.99),
        g50 / s50,
        f50 / s50,
        r.fresh.len() + r.governed.len() + r.back_to_back.len(),
        p(&r.hook, 0.5),
        p(&r.hook, 0.99),
        p(&r.truth, 0.5),
        p(&r.truth, 0.99),
        p(&r.added, 0.5),
        p(&r.added, 0.99),
    );
}
