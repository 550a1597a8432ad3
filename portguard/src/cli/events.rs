//! `portguard events`: read an event log (a file, or standard input such as
//! `kubectl logs -f`), filter it, and show it as a table, as JSON lines, as
//! OCSF events or ECS documents, or as a summary of the most denied
//! (workload, port) pairs. Lines that are not events (agent log lines mixed
//! in) are skipped.
//!
//! The filters and the summary are pure functions over parsed lines.

use std::{
    collections::HashMap,
    io::{BufRead as _, Write as _},
    path::PathBuf,
    process::ExitCode,
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use clap::Args;
use serde_json::{Value, json};

use crate::{
    events::{EventLine, EventRecord, Format, LostRecord, SuppressedRecord},
    hook::spool::HookFailed,
    observe::text::escape,
};

/// Read an event log and show what matters.
///
/// Reads FILE (or standard input with `-`, e.g. `kubectl logs -f ... |
/// portguard events -`), keeps the decision lines that match every filter,
/// and prints them as a table (default), as JSON lines (--json), as OCSF
/// events or ECS documents (--format ocsf|ecs: the events `portguard run
/// --format` would have written, from a log written as JSON), or, with
/// --summary, the most denied (workload, port) pairs with their counts
/// (aggregated lines count as many decisions as they stand for).
#[derive(Debug, Args)]
pub struct EventsArgs {
    /// Event log (JSON lines) to read; `-` for standard input.
    #[arg(value_name = "FILE", default_value = "-")]
    pub file: PathBuf,
    /// Keep reading as the file grows (follows rotation), like `tail -f`.
    #[arg(long, short)]
    pub follow: bool,
    /// Only decisions at or after this time: RFC 3339, or a duration ago
    /// (`1h`, `30m`).
    #[arg(long, value_name = "TIME|DURATION", value_parser = parse_when)]
    pub since: Option<SystemTime>,
    /// Only decisions at or before this time (same forms as --since).
    #[arg(long, value_name = "TIME|DURATION", value_parser = parse_when)]
    pub until: Option<SystemTime>,
    /// Only this policy.
    #[arg(long, value_name = "NAME")]
    pub policy: Option<String>,
    /// Only this Kubernetes pod (name).
    #[arg(long, value_name = "NAME")]
    pub pod: Option<String>,
    /// Only this Kubernetes namespace.
    #[arg(long, value_name = "NS")]
    pub namespace: Option<String>,
    /// Only this systemd unit.
    #[arg(long, value_name = "UNIT")]
    pub unit: Option<String>,
    /// Only this port.
    #[arg(long, value_name = "PORT")]
    pub port: Option<u16>,
    /// Only this verdict: deny, audit, cut_off, reported or preexisting.
    #[arg(long, value_name = "VERDICT", value_parser = ["deny", "audit", "cut_off", "reported", "preexisting"])]
    pub verdict: Option<String>,
    /// Show the most frequent (workload, port) pairs instead of the events.
    #[arg(long)]
    pub summary: bool,
    /// With --summary: how many pairs.
    #[arg(long, value_name = "N", default_value_t = 20)]
    pub top: usize,
    /// JSON lines instead of a table (the same as --format json).
    #[arg(long, conflicts_with = "format")]
    pub json: bool,
    /// How to print the events: `table` (default), `json` (the lines as
    /// they are), `ocsf` (one OCSF 1.3.0 event per line: decisions as
    /// Network Activity, class 4001; hook failures as Application
    /// Lifecycle, 6002) or `ecs` (Elastic Common Schema documents). The
    /// mapping is docs/ocsf.md's, as `portguard run --format` writes it.
    /// With --summary: `table` or `json` only.
    #[arg(long, value_name = "FORMAT", value_enum, default_value_t = EventsFormat::Table)]
    pub format: EventsFormat,
}

/// `portguard events --format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum EventsFormat {
    Table,
    Json,
    Ocsf,
    Ecs,
}

/// A portguard line in another form (`Format::Json`: as it is); `None` for
/// a line that is no portguard line.
pub fn convert(e: &Value, format: Format) -> Option<Value> {
    use serde::Deserialize as _;
    fn out<T: EventLine>(r: &T, format: Format) -> Option<Value> {
        match format {
            Format::Json => serde_json::to_value(r).ok(),
            Format::Ocsf => serde_json::to_value(r.ocsf()).ok(),
            Format::Ecs => Some(r.ecs()),
        }
    }
    if e.get("lost").is_some() {
        out(&LostRecord::deserialize(e).ok()?, format)
    } else if e.get("suppressed").is_some() {
        out(&SuppressedRecord::deserialize(e).ok()?, format)
    } else if e["verdict"] == "hook_failed" {
        out(&HookFailed::deserialize(e).ok()?, format)
    } else if e.get("verdict").is_some() {
        out(&EventRecord::deserialize(e).ok()?, format)
    } else {
        None
    }
}

/// One event as `format` prints it (`None`: a line it cannot convert).
fn render_one(e: &Value, format: EventsFormat) -> Option<String> {
    match format {
        EventsFormat::Table => Some(table_row(e)),
        EventsFormat::Json => Some(e.to_string()),
        EventsFormat::Ocsf => convert(e, Format::Ocsf).map(|v| v.to_string()),
        EventsFormat::Ecs => convert(e, Format::Ecs).map(|v| v.to_string()),
    }
}

pub fn parse_when(s: &str) -> Result<SystemTime, String> {
    if let Ok(t) = humantime::parse_rfc3339_weak(s) {
        return Ok(t);
    }
    humantime::parse_duration(s)
        .map(|d| SystemTime::now() - d)
        .map_err(|_| format!("`{s}`: expected an RFC 3339 time or a duration such as 30m"))
}

fn time_of(v: &Value, key: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339_weak(v[key].as_str()?).ok()
}

/// The filters of `portguard events`.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub since: Option<SystemTime>,
    pub until: Option<SystemTime>,
    pub policy: Option<String>,
    pub pod: Option<String>,
    pub namespace: Option<String>,
    pub unit: Option<String>,
    pub port: Option<u16>,
    pub verdict: Option<String>,
}

impl Filter {
    /// True for a decision line matching every filter. An aggregate
    /// matches a time range its first_seen..last_seen span overlaps.
    pub fn matches(&self, e: &Value) -> bool {
        if e.get("verdict").is_none() {
            return false;
        }
        let eq = |key: &str, want: &Option<String>| {
            want.as_deref().is_none_or(|w| e[key].as_str() == Some(w))
        };
        if !(eq("policy", &self.policy)
            && eq("k8s_pod", &self.pod)
            && eq("k8s_namespace", &self.namespace)
            && eq("unit", &self.unit)
            && eq("verdict", &self.verdict))
        {
            return false;
        }
        if self
            .port
            .is_some_and(|p| e["port"].as_u64() != Some(u64::from(p)))
        {
            return false;
        }
        let first = time_of(e, "first_seen").or_else(|| time_of(e, "time"));
        let last = time_of(e, "last_seen").or(first);
        if let (Some(since), Some(last)) = (self.since, last)
            && last < since
        {
            return false;
        }
        if let (Some(until), Some(first)) = (self.until, first)
            && first > until
        {
            return false;
        }
        true
    }
}

/// Who made a decision, in a few words.
pub fn workload(e: &Value) -> String {
    if let Some(pod) = e["k8s_pod"].as_str() {
        let ns = e["k8s_namespace"].as_str().unwrap_or("?");
        return match e["container_name"].as_str() {
            Some(c) => format!("{ns}/{pod}/{c}"),
            None => format!("{ns}/{pod}"),
        };
    }
    if let Some(u) = e["unit"].as_str() {
        return u.to_owned();
    }
    e["cgroup"].as_str().unwrap_or("?").to_owned()
}

/// One row of the summary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PairCount {
    pub workload: String,
    pub port: u64,
    pub protocol: String,
    pub verdict: String,
    pub count: u64,
    pub first_seen: String,
    pub last_seen: String,
    pub policies: Vec<String>,
}

/// The most frequent (workload, port) pairs among `events`, biggest first.
pub fn summarize(events: &[Value], top: usize) -> Vec<PairCount> {
    let mut by: HashMap<(String, u64, String, String), PairCount> = HashMap::new();
    for e in events {
        let key = (
            workload(e),
            e["port"].as_u64().unwrap_or(0),
            e["protocol"].as_str().unwrap_or("?").to_owned(),
            e["verdict"].as_str().unwrap_or("?").to_owned(),
        );
        let first = e["first_seen"]
            .as_str()
            .or_else(|| e["time"].as_str())
            .unwrap_or_default()
            .to_owned();
        let last = e["last_seen"]
            .as_str()
            .or_else(|| e["time"].as_str())
            .unwrap_or_default()
            .to_owned();
        let p = by.entry(key.clone()).or_insert_with(|| PairCount {
            workload: key.0,
            port: key.1,
            protocol: key.2,
            verdict: key.3,
            count: 0,
            first_seen: first.clone(),
            last_seen: last.clone(),
            policies: Vec::new(),
        });
        p.count += e["count"].as_u64().unwrap_or(1);
        if first < p.first_seen {
            p.first_seen = first;
        }
        if last > p.last_seen {
            p.last_seen = last;
        }
        if let Some(pol) = e["policy"].as_str()
            && !p.policies.iter().any(|x| x == pol)
        {
            p.policies.push(pol.to_owned());
        }
    }
    let mut out: Vec<PairCount> = by.into_values().collect();
    out.sort_by(|a, b| {
        b.count
            .cmp(&a.count)
            .then_with(|| a.workload.cmp(&b.workload))
            .then(a.port.cmp(&b.port))
    });
    out.truncate(top);
    out
}

/// One row of the table; every string is escaped (cgroup and unit names are
/// the tenants' choice, and a tab would break the columns).
fn table_row(e: &Value) -> String {
    let s = |k: &str| escape(e[k].as_str().unwrap_or("-")).into_owned();
    let addr = s("address");
    let addr = if addr.contains(':') {
        format!("[{addr}]")
    } else {
        addr
    };
    format!(
        "{}\t{}\t{}\t{}\t{}\t{}:{}\t{}\t{}",
        e["first_seen"]
            .as_str()
            .map_or_else(|| s("time"), |t| escape(t).into_owned()),
        s("verdict"),
        s("policy"),
        escape(&workload(e)),
        s("protocol"),
        addr,
        e["port"].as_u64().unwrap_or(0),
        e["count"].as_u64().unwrap_or(1),
        s("rule"),
    )
}

const HEADER: &str = "TIME\tVERDICT\tPOLICY\tWORKLOAD\tPROTO\tADDRESS:PORT\tCOUNT\tRULE";

/// Render events as a table.
pub fn render_table(events: &[Value]) -> String {
    let mut w = tabwriter::TabWriter::new(Vec::new()).padding(2);
    let _ = writeln!(w, "{HEADER}");
    for e in events {
        let _ = writeln!(w, "{}", table_row(e));
    }
    String::from_utf8_lossy(&w.into_inner().unwrap_or_default()).into_owned()
}

/// Render a summary as a table.
pub fn render_summary(rows: &[PairCount]) -> String {
    let mut w = tabwriter::TabWriter::new(Vec::new()).padding(2);
    let _ = writeln!(
        w,
        "COUNT\tVERDICT\tWORKLOAD\tPORT\tPOLICY\tFIRST SEEN\tLAST SEEN"
    );
    for r in rows {
        let _ = writeln!(
            w,
            "{}\t{}\t{}\t{}/{}\t{}\t{}\t{}",
            r.count,
            escape(&r.verdict),
            escape(&r.workload),
            r.port,
            escape(&r.protocol),
            escape(&r.policies.join(",")),
            escape(&r.first_seen),
            escape(&r.last_seen)
        );
    }
    String::from_utf8_lossy(&w.into_inner().unwrap_or_default()).into_owned()
}

fn summary_json(r: &PairCount) -> Value {
    json!({
        "workload": r.workload, "port": r.port, "protocol": r.protocol,
        "verdict": r.verdict, "count": r.count, "policies": r.policies,
        "first_seen": r.first_seen, "last_seen": r.last_seen,
    })
}

/// `portguard events`.
pub fn run(a: &EventsArgs) -> anyhow::Result<ExitCode> {
    let filter = Filter {
        since: a.since,
        until: a.until,
        policy: a.policy.clone(),
        pod: a.pod.clone(),
        namespace: a.namespace.clone(),
        unit: a.unit.clone(),
        port: a.port,
        verdict: a.verdict.clone(),
    };
    let format = if a.json { EventsFormat::Json } else { a.format };
    if a.summary && matches!(format, EventsFormat::Ocsf | EventsFormat::Ecs) {
        anyhow::bail!(
            "--summary prints a table or JSON (--format table|json); OCSF and ECS are for the events themselves"
        );
    }
    let stdin = a.file.as_os_str() == "-";
    let mut out = std::io::stdout().lock();
    if a.follow && !a.summary {
        if format == EventsFormat::Table {
            writeln!(out, "{}", HEADER.replace('\t', "  "))?;
        }
        let mut emit = |e: Value| -> std::io::Result<()> {
            if filter.matches(&e)
                && let Some(line) = render_one(&e, format)
            {
                let line = if format == EventsFormat::Table {
                    line.replace('\t', "  ")
                } else {
                    line
                };
                writeln!(out, "{line}")?;
                out.flush()?;
            }
            Ok(())
        };
        return if stdin {
            for line in std::io::stdin().lock().lines() {
                if let Ok(e) = serde_json::from_str(&line?) {
                    emit(e)?;
                }
            }
            Ok(ExitCode::SUCCESS)
        } else {
            follow_file(&a.file, &mut emit)
        };
    }
    let mut events = read_log(&a.file)?;
    events.retain(|e| filter.matches(e));
    if a.summary {
        let rows = summarize(&events, a.top);
        if format == EventsFormat::Json {
            for r in &rows {
                writeln!(out, "{}", summary_json(r))?;
            }
        } else {
            write!(out, "{}", render_summary(&rows))?;
        }
    } else if format == EventsFormat::Table {
        write!(out, "{}", render_table(&events))?;
    } else {
        for line in events.iter().filter_map(|e| render_one(e, format)) {
            writeln!(out, "{line}")?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Every JSON line of an event log (`-`: standard input), in order. Lines
/// that are not JSON (agent log lines mixed in, a torn last line) are
/// skipped; `portguard events`, `learn` and `replay` read logs with this.
pub fn read_log(file: &std::path::Path) -> anyhow::Result<Vec<Value>> {
    let text = if file.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).context("reading standard input")?
    } else {
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?
    };
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

/// Print lines appended to `path` forever, reopening it when it is rotated
/// (replaced or truncated).
fn follow_file(
    path: &std::path::Path,
    emit: &mut dyn FnMut(Value) -> std::io::Result<()>,
) -> anyhow::Result<ExitCode> {
    use std::{
        io::{Seek as _, SeekFrom},
        os::unix::fs::MetadataExt as _,
    };
    let open = || std::fs::File::open(path).with_context(|| format!("opening {}", path.display()));
    let mut file = std::io::BufReader::new(open()?);
    let mut ino = file.get_ref().metadata()?.ino();
    let mut pos = 0u64;
    let mut line = String::new();
    loop {
        line.clear();
        let n = file.read_line(&mut line)?;
        if n > 0 && line.ends_with('\n') {
            pos += n as u64;
            if let Ok(e) = serde_json::from_str(&line) {
                emit(e)?;
            }
            continue;
        }
        // A partial line: read it again once it is complete.
        if n > 0 {
            file.seek(SeekFrom::Start(pos))?;
        }
        std::thread::sleep(Duration::from_millis(250));
        if let Ok(m) = std::fs::metadata(path)
            && (m.ino() != ino || m.len() < pos)
        {
            file = std::io::BufReader::new(open()?);
            ino = m.ino();
            pos = 0;
        }
    }
}

#[cfg(test)]
#[path = "events_tests.rs"]
mod tests;
