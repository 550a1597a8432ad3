//! `portguard report`: render an event log as Kubernetes objects. Today one
//! format, `--policy-report` (`crate::report`); the log is read as
//! `portguard events` reads it, with its time and namespace filters.

use std::{io::Write as _, path::PathBuf, process::ExitCode, time::SystemTime};

use clap::Args;
use serde_json::{Value, json};

use super::events::{Filter, parse_when, read_log};
use crate::report::{Decision, Tally, rfc3339};

/// Render an event log as Kubernetes PolicyReport objects.
///
/// With --policy-report, reads the event log (--log FILE, or standard input)
/// and prints one `wgpolicyk8s.io/v1alpha2` PolicyReport per namespace and
/// node, as a `v1` List (JSON) that `kubectl apply -f -` accepts: the same
/// objects `portguard run --policy-reports` writes in a cluster. Each
/// result summarises one pod's (and container's) decisions under one
/// policy and rule: `fail` for denials (deny, cut_off), `warn` for audits,
/// with the count, ports and first and last time in its properties.
/// Decisions without a Kubernetes namespace (host services, pods the
/// runtime did not name) are left out and counted on standard error.
#[derive(Debug, Args)]
pub struct ReportArgs {
    /// Render PolicyReport objects (wgpolicyk8s.io/v1alpha2; the only
    /// format so far, so required).
    #[arg(long, required = true)]
    pub policy_report: bool,
    /// Event log (JSON lines) to read; `-` for standard input.
    #[arg(long, value_name = "FILE", default_value = "-")]
    pub log: PathBuf,
    /// Only decisions at or after this time: RFC 3339, or a duration ago
    /// (`1h`, `30m`). Also the window's start (default: the first
    /// decision's time).
    #[arg(long, value_name = "TIME|DURATION", value_parser = parse_when)]
    pub since: Option<SystemTime>,
    /// Only decisions at or before this time (same forms as --since). Also
    /// the window's end (default: the last decision's time).
    #[arg(long, value_name = "TIME|DURATION", value_parser = parse_when)]
    pub until: Option<SystemTime>,
    /// Only this namespace's report.
    #[arg(long, value_name = "NS")]
    pub namespace: Option<String>,
}

/// `portguard report`.
pub fn run(a: &ReportArgs) -> anyhow::Result<ExitCode> {
    let filter = Filter {
        since: a.since,
        until: a.until,
        namespace: a.namespace.clone(),
        ..Filter::default()
    };
    let events: Vec<Value> = read_log(&a.log)?
        .into_iter()
        .filter(|e| filter.matches(e))
        .collect();
    let (tally, window) = tally(&events, a.since, a.until);
    let items = tally.reports((&window.0, &window.1));
    if tally.unplaced > 0 {
        eprintln!(
            "portguard report: {} decisions had no Kubernetes namespace (host services, pods the runtime did not name): in no PolicyReport",
            tally.unplaced
        );
    }
    if items.is_empty() {
        eprintln!("portguard report: no denials or audits in Kubernetes namespaces in the log");
    }
    let list = json!({"apiVersion": "v1", "kind": "List", "items": items});
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, &list)?;
    writeln!(out)?;
    Ok(ExitCode::SUCCESS)
}

/// The tally of `events` and its window: --since/--until, else the first
/// and last decision's times.
fn tally(
    events: &[Value],
    since: Option<SystemTime>,
    until: Option<SystemTime>,
) -> (Tally, (String, String)) {
    let mut t = Tally::default();
    let mut first: Option<String> = None;
    let mut last: Option<String> = None;
    for d in events.iter().filter_map(Decision::of_json) {
        if first.as_ref().is_none_or(|f| d.first_seen < *f) {
            first = Some(d.first_seen.clone());
        }
        if last.as_ref().is_none_or(|l| d.last_seen > *l) {
            last = Some(d.last_seen.clone());
        }
        t.add(d);
    }
    let start = since.map(rfc3339).or(first).unwrap_or_default();
    let end = until.map(rfc3339).or(last).unwrap_or_default();
    (t, (start, end))
}
