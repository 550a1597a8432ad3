//! Where the time goes: `perf stat` (software counters, and the hardware
//! ones where the machine has them) and `perf record` (sampled self time by
//! symbol) attached to one process or to every CPU while something runs,
//! summarised as Markdown tables by the run itself. Never fails the bench:
//! when perf is missing or fails, the table says why instead.

use std::{
    fmt::Write as _,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Instant,
};

use crate::stats::grouped;

/// What perf watches.
#[derive(Clone, Copy)]
pub(crate) enum Scope {
    /// One process, every thread of it.
    Pid(i32),
    /// Every CPU (every process, the kernel included).
    AllCpus,
}

impl Scope {
    fn args(self) -> Vec<String> {
        match self {
            Self::Pid(pid) => vec!["-p".into(), pid.to_string()],
            Self::AllCpus => vec!["-a".into()],
        }
    }
}

/// `perf stat` or `perf record` running until [`Perf::stop`].
pub(crate) struct Perf {
    child: Result<Child, String>,
    out: PathBuf,
    started: Instant,
    /// Kept for as long as the output is read.
    _dir: Option<tempfile::TempDir>,
}

/// `perf report`'s field separator (symbols never hold it).
const SEP: char = '\x1f';

/// Counters asked of `perf stat`, the optional ones only where this perf
/// and this machine know them (a VM often has no PMU).
const STAT_EVENTS: &[&str] = &[
    "task-clock",
    "context-switches",
    "cpu-migrations",
    "page-faults",
    "raw_syscalls:sys_enter",
    "cycles",
    "instructions",
];

fn spawn(args: &[String]) -> (Result<Child, String>, PathBuf, Option<tempfile::TempDir>) {
    let dir = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => {
            return (
                Err(format!("no temporary directory: {e}")),
                PathBuf::new(),
                None,
            );
        }
    };
    let out = dir.path().join("perf.out");
    let child = Command::new("perf")
        .args(args)
        .arg("-o")
        .arg(&out)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run perf: {e}"));
    (child, out, Some(dir))
}

/// Whether `perf stat` accepts `event` here.
fn event_known(event: &str) -> bool {
    Command::new("perf")
        .args(["stat", "-x,", "-e", event, "--", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl Perf {
    /// `perf stat` on `scope`, CSV output.
    pub(crate) fn stat(scope: Scope) -> Self {
        let events: Vec<&str> = STAT_EVENTS
            .iter()
            .copied()
            .filter(|e| event_known(e))
            .collect();
        let mut args = vec!["stat".to_owned(), "-x,".to_owned()];
        if !events.is_empty() {
            args.extend(["-e".to_owned(), events.join(",")]);
        }
        args.extend(scope.args());
        Self::start(&args)
    }

    /// `perf record` on `scope`, sampling at `hz` (no call graphs: the
    /// release binaries have no frame pointers).
    pub(crate) fn record(scope: Scope, hz: u32) -> Self {
        let mut args = vec!["record".to_owned(), "-q".to_owned()];
        args.extend(["-F".to_owned(), hz.to_string()]);
        args.extend(scope.args());
        Self::start(&args)
    }

    fn start(args: &[String]) -> Self {
        let (child, out, dir) = spawn(args);
        let started = Instant::now();
        let mut p = Self {
            child,
            out,
            started,
            _dir: dir,
        };
        // perf says at once when it cannot attach (no such pid, no
        // permission, unknown event).
        std::thread::sleep(std::time::Duration::from_millis(100));
        if let Ok(c) = &mut p.child
            && let Ok(Some(status)) = c.try_wait()
        {
            let err = stderr_of(c);
            p.child = Err(format!("perf exited with {status} at start: {err}"));
        }
        p
    }

    /// Stop perf (SIGINT: it writes its output and exits); the seconds it
    /// ran, or why there is nothing to read.
    fn stop(&mut self) -> Result<f64, String> {
        let child = self.child.as_mut().map_err(|e| e.clone())?;
        let secs = self.started.elapsed().as_secs_f64();
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let status = child.wait().map_err(|e| format!("waiting for perf: {e}"))?;
        // perf stat exits with the status of what it watched; after SIGINT
        // that is not an error of its own. What it wrote says.
        if !self.out.exists() {
            return Err(format!(
                "perf wrote nothing ({status}): {}",
                stderr_of(child)
            ));
        }
        Ok(secs)
    }

    /// A `perf stat` summary: counter, total, per second.
    pub(crate) fn stat_table(mut self, title: &str) -> String {
        let secs = match self.stop() {
            Ok(s) => s,
            Err(e) => return unavailable(title, &e),
        };
        let text = std::fs::read_to_string(&self.out).unwrap_or_default();
        let mut rows = String::new();
        let mut values = std::collections::HashMap::new();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            // value,unit,event,run time,run %,metric,metric unit
            let f: Vec<&str> = line.split(',').collect();
            if f.len() < 3 {
                continue;
            }
            let (value, unit, event) = (f[0], f[1], f[2]);
            match value.parse::<f64>() {
                Ok(v) => {
                    values.insert(event.to_owned(), v);
                    let unit = if unit.is_empty() {
                        String::new()
                    } else {
                        format!(" {unit}")
                    };
                    let _ = writeln!(
                        rows,
                        "| {event} | {}{unit} | {} |",
                        grouped(v),
                        grouped(v / secs)
                    );
                }
                Err(_) => {
                    let _ = writeln!(rows, "| {event} | {} | - |", value.trim_matches(['<', '>']));
                }
            }
        }
        if rows.is_empty() {
            return unavailable(title, &format!("perf stat printed no counters: {text}"));
        }
        let mut derived = format!("over {secs:.1} s");
        if let Some(ms) = values.get("task-clock") {
            let _ = write!(derived, "; {:.2} CPUs utilised", ms / 1000.0 / secs);
        }
        if let (Some(c), Some(i)) = (values.get("cycles"), values.get("instructions"))
            && *c > 0.0
        {
            let _ = write!(derived, "; {:.2} instructions per cycle", i / c);
        }
        format!(
            "{title} (`perf stat`, {derived}):\n\n| counter | total | per second |\n|---|---:|---:|\n{rows}"
        )
    }

    /// A `perf record` summary: the `top` symbols by self time, with the
    /// command and object they ran in; the share of each process
    /// (`names`: labels for some pids, e.g. the agent, told apart from
    /// other processes of the same name) and of each object.
    pub(crate) fn record_table(mut self, title: &str, top: usize, names: &[(i32, &str)]) -> String {
        let secs = match self.stop() {
            Ok(s) => s,
            Err(e) => return unavailable(title, &e),
        };
        let (out, by_pid) = match (report(&self.out, "comm,dso,sym"), report(&self.out, "pid")) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(e), _) | (_, Err(e)) => return unavailable(title, &e),
        };
        // "# Samples: 12K of event 'cpu-clock:ppp'"
        let samples = out
            .lines()
            .find_map(|l| l.strip_prefix("# Samples: "))
            .and_then(|l| l.split_whitespace().next())
            .map(str::to_owned);
        let mut rows = String::new();
        let mut by_dso: Vec<(String, f64)> = Vec::new();
        for row in out.lines().filter_map(parse_report_line) {
            add(&mut by_dso, &row.dso, row.pct);
            if rows.lines().count() < top {
                let _ = writeln!(
                    rows,
                    "| {:.1} | {} | {} | `{}` |",
                    row.pct, row.comm, row.dso, row.sym
                );
            }
        }
        if rows.is_empty() {
            return unavailable(title, "perf recorded no samples");
        }
        // "12.34%  1234:pgbench": processes by name, the named pids apart.
        let mut by_process: Vec<(String, f64)> = Vec::new();
        for line in by_pid.lines().filter(|l| !l.starts_with('#')) {
            let mut f = line.split(SEP).map(str::trim);
            let (Some(pct), Some(process)) = (f.next(), f.next()) else {
                continue;
            };
            let Some(pct) = pct.strip_suffix('%').and_then(|p| p.parse::<f64>().ok()) else {
                continue;
            };
            let (pid, comm) = process.split_once(':').unwrap_or(("", process));
            let label = names
                .iter()
                .find(|(p, _)| pid.parse() == Ok(*p))
                .map_or(comm, |(_, name)| *name);
            add(&mut by_process, label, pct);
        }
        format!(
            "{title} (`perf record`, {secs:.1} s{}; by process: {}; by object: {}; top {top} \
             symbols by self time, `[k]` the kernel):\n\n\
             | self % | command | object | symbol |\n|---:|---|---|---|\n{rows}",
            samples.map_or(String::new(), |n| format!(", {n} samples")),
            shares(by_process),
            shares(by_dso),
        )
    }
}

/// `perf report` of `data`, sorted by `keys`, fields separated by [`SEP`].
fn report(data: &std::path::Path, keys: &str) -> Result<String, String> {
    let out = Command::new("perf")
        .args(["report", "--stdio", "--no-children", "--sort", keys])
        .args(["-t", &SEP.to_string(), "-i"])
        .arg(data)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run perf report: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "perf report failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Drop for Perf {
    fn drop(&mut self) {
        if let Ok(c) = &mut self.child
            && let Ok(None) = c.try_wait()
        {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGINT) };
            let _ = c.wait();
        }
    }
}

/// Add `pct` to `key`'s share.
fn add(shares: &mut Vec<(String, f64)>, key: &str, pct: f64) {
    match shares.iter_mut().find(|(k, _)| k == key) {
        Some((_, p)) => *p += pct,
        None => shares.push((key.to_owned(), pct)),
    }
}

/// The largest shares: `portguard 71 %, [k] 25 %`.
fn shares(mut v: Vec<(String, f64)>) -> String {
    v.sort_by(|a, b| b.1.total_cmp(&a.1));
    v.iter()
        .take(4)
        .map(|(k, p)| format!("{k} {p:.0} %"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn stderr_of(c: &mut Child) -> String {
    use std::io::Read as _;
    let mut s = String::new();
    if let Some(e) = c.stderr.as_mut() {
        let _ = e.read_to_string(&mut s);
    }
    s.lines().last().unwrap_or("").trim().to_owned()
}

fn unavailable(title: &str, why: &str) -> String {
    format!(
        "{title}: not measured ({}).\n",
        why.trim().replace('|', "/")
    )
}

struct ReportRow {
    pct: f64,
    comm: String,
    dso: String,
    sym: String,
}

/// Fields separated by [`SEP`]: `12.34%`, command, object, `[.] symbol`
/// (`[k]` for the kernel's).
fn parse_report_line(line: &str) -> Option<ReportRow> {
    if line.starts_with('#') {
        return None;
    }
    let mut f = line.split(SEP).map(str::trim);
    let pct: f64 = f.next()?.strip_suffix('%')?.parse().ok()?;
    let comm = f.next()?.to_owned();
    let dso = f.next()?.to_owned();
    let (kind, sym) = f.next()?.split_once(' ')?;
    let sym = strip_hash(sym.trim());
    let sym = if sym.len() > 90 {
        format!("{}…", &sym[..sym.floor_char_boundary(89)])
    } else {
        sym
    };
    Some(ReportRow {
        pct,
        comm,
        dso: if kind == "[k]" { "[k]".to_owned() } else { dso },
        sym: sym.replace('`', "'"),
    })
}

/// `core::fmt::write::h0123456789abcdef` -> `core::fmt::write`.
fn strip_hash(sym: &str) -> String {
    match sym.rsplit_once("::h") {
        Some((head, hash)) if hash.len() == 16 && hash.chars().all(|c| c.is_ascii_hexdigit()) => {
            head.to_owned()
        }
        _ => sym.to_owned(),
    }
}
