//! `portguard replay`: what a candidate policy file would change, judged
//! on decisions a real agent recorded (a what-if before a rollout). The
//! comparison is [`diff`]; this file holds the arguments (`--help`), the
//! reading, the two renderings and the exit status.

pub mod diff;

use std::{fmt::Write as _, io::Write as _, path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use clap::Args;

use self::diff::{Change, Flip, Report, Side, Workload};
use crate::{
    events::EventRecord,
    observe::text::escape,
    policy::{PolicyFile, parse_policy_file},
};

/// Where the agent's deployments keep the policy file (deploy/systemd,
/// deploy/kubernetes): what `--current` defaults to.
pub const DEFAULT_CURRENT: &str = "/etc/portguard/policy.yaml";

/// What-if: replay a recorded event log against a candidate policy.
///
/// Reads an event log written by `portguard run` or `portguard learn`
/// (LOG, or standard input with `-`: `kubectl logs ds/portguard |
/// portguard replay --policy new.yaml -`) and judges every recorded
/// decision (deny, audit, cut_off and the inventory's preexisting lines)
/// twice, with the agent's own verdict code: under the policy file in force
/// now (--current) and under the candidate (--policy). It prints, per
/// workload (a cgroup, named by its pod, container or unit when the log
/// says), the decisions that would change and how:
///
///   newly-denied   the candidate denies it; now it is allowed or only audited
///   newly-allowed  the candidate lets it through with no rule against it
///   newly-audited  the candidate allows it but reports it (an audit policy)
///   rule-changed   denied (or audited) under both, by another rule or policy
///
/// and the workloads whose governance changes: no-longer-governed,
/// newly-governed, policy-changed. `unknown` marks what the log cannot
/// tell: a `pods:` selector needing a namespace, a container name or labels
/// the log does not record (labels never are; a label is known only where
/// the current file's `pods:` policy with that label is recorded governing
/// the pod).
///
/// A log holds only what the agent wrote: denials and audits, so the
/// allowed traffic it saw appears only where a policy was in audit mode
/// (`portguard learn` records everything). Decisions never recorded cannot
/// flip here.
///
/// Exit status: 0 when none of the --fail-on changes is found, 1 when one
/// is, 2 when the log or a policy file cannot be read.
#[derive(Debug, Args)]
#[command(verbatim_doc_comment)]
pub struct ReplayArgs {
    /// Event log (JSON lines) to replay; `-` for standard input. Lines that
    /// are not events are skipped.
    #[arg(value_name = "LOG", default_value = "-")]
    pub log: PathBuf,
    /// The candidate policy file (YAML): what would change if it replaced
    /// the current one.
    #[arg(long, short, value_name = "FILE")]
    pub policy: PathBuf,
    /// The policy file enforced when the log was written (usually the one
    /// enforced now), or `none` when nothing was enforced (a first rollout
    /// after `portguard learn`).
    #[arg(long, value_name = "FILE|none", default_value = DEFAULT_CURRENT)]
    pub current: PathBuf,
    /// One JSON document instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Exit with status 1 when any of these changes is found
    /// (comma-separated; `any`: every change).
    #[arg(long, value_name = "CHANGE,...", value_delimiter = ',', value_parser = fail_on_names())]
    pub fail_on: Vec<String>,
}

fn fail_on_names() -> clap::builder::PossibleValuesParser {
    let mut names: Vec<&'static str> = Change::ALL.iter().map(|c| c.name()).collect();
    names.push("any");
    clap::builder::PossibleValuesParser::new(names)
}

fn read_policy(path: &std::path::Path, what: &str) -> anyhow::Result<Side> {
    if path.as_os_str() == "none" {
        return Ok(Side::new("none", PolicyFile::default()));
    }
    let file = parse_policy_file(path).with_context(|| format!("{what} policy"))?;
    Ok(Side::new(path.display().to_string(), file))
}

/// Read, judge and print; the exit status.
fn replay(a: &ReplayArgs) -> anyhow::Result<ExitCode> {
    let current = read_policy(&a.current, "--current")?;
    let candidate = read_policy(&a.policy, "--policy")?;
    let lines = super::events::read_log(&a.log)?;
    let mut records = Vec::with_capacity(lines.len());
    let mut skipped = 0;
    for l in &lines {
        match EventRecord::from_json(l) {
            Some(r) => records.push(r),
            None => skipped += 1,
        }
    }
    let report = diff::replay(&records, skipped, &current, &candidate);
    let mut out = std::io::stdout().lock();
    if a.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
    } else {
        write!(out, "{}", render(&report))?;
    }
    let fail_on: Vec<Change> = if a.fail_on.iter().any(|f| f == "any") {
        Change::ALL.to_vec()
    } else {
        Change::ALL
            .into_iter()
            .filter(|c| a.fail_on.iter().any(|f| f == c.name()))
            .collect()
    };
    Ok(if report.has_any(&fail_on) {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// `portguard replay`. Errors exit with status 2 (1 means "found").
pub fn execute(a: &ReplayArgs) -> anyhow::Result<ExitCode> {
    match replay(a) {
        Ok(code) => Ok(code),
        Err(e) => {
            log::error!("{e:#}");
            Ok(ExitCode::from(2))
        }
    }
}

/// Rows as aligned columns (two spaces apart), each line indented.
fn table(rows: &[String], indent: &str) -> String {
    let mut w = tabwriter::TabWriter::new(Vec::new()).padding(2);
    for r in rows {
        let _ = writeln!(w, "{r}");
    }
    let text = String::from_utf8_lossy(&w.into_inner().unwrap_or_default()).into_owned();
    text.lines()
        .map(|l| format!("{indent}{}\n", l.trim_end()))
        .collect()
}

fn address(f: &Flip) -> String {
    if let Some(kind) = f.socket {
        return format!("({kind} socket)");
    }
    let a = escape(&f.address);
    let mut s = if a.contains(':') {
        format!("[{a}]:{}", f.port)
    } else {
        format!("{a}:{}", f.port)
    };
    if f.dual_stack {
        s.push_str(" dual-stack");
    }
    if f.autobind {
        s.push_str(" autobind");
    }
    s
}

fn governance_line(w: &Workload) -> String {
    let (was, now) = (escape(w.was.short()), escape(w.now.short()));
    let mut s = match w.governance {
        None => format!("policy: {now} (unchanged)"),
        Some(c) => format!("policy: {was} -> {now} ({})", c.name()),
    };
    for why in [&w.was.unknown, &w.now.unknown].into_iter().flatten() {
        let _ = write!(s, "; {}", escape(why));
    }
    s
}

/// The human rendering: a header, one block per changed workload, and a
/// summary table.
pub fn render(r: &Report) -> String {
    let mut out = format!(
        "portguard replay: {} decisions ({} event lines) from {} workloads\n  current:   {}\n  candidate: {}\n",
        r.decisions,
        r.lines,
        r.workloads_seen,
        escape(&r.current),
        escape(&r.candidate)
    );
    if !r.foreign_policies.is_empty() {
        let names: Vec<String> = r
            .foreign_policies
            .iter()
            .map(|p| escape(p).into_owned())
            .collect();
        let _ = writeln!(
            out,
            "  note: the log names policies the current file does not have ({}): was it \
             written under another file?",
            names.join(", ")
        );
    }
    for w in &r.workloads {
        let _ = write!(out, "\n{}", escape(&w.workload));
        if w.workload != w.cgroup {
            let _ = write!(out, " (cgroup {})", escape(&w.cgroup));
        }
        let _ = writeln!(out, "\n  {}", governance_line(w));
        if w.changes.is_empty() {
            continue;
        }
        let mut rows =
            vec!["CHANGE\tCOUNT\tHOOK\tPROTO\tADDRESS:PORT\tWAS\tNOW\tRECORDED".to_owned()];
        for f in &w.changes {
            let recorded: Vec<&str> = f.recorded.iter().copied().collect();
            rows.push(format!(
                "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
                f.change.name(),
                f.count,
                f.hook.name(),
                escape(if f.protocol.is_empty() {
                    "-"
                } else {
                    &f.protocol
                }),
                address(f),
                escape(&f.was.short()),
                escape(&f.now.short()),
                recorded.join(",")
            ));
        }
        out.push_str(&table(&rows, "  "));
    }
    if r.workloads.is_empty() {
        out.push_str("\nno recorded decision changes\n");
    }
    let mut rows = vec!["CHANGE\tDECISIONS\tWORKLOADS".to_owned()];
    for (name, t) in Change::ALL.iter().map(|c| {
        (
            c.name(),
            r.summary.get(c.name()).copied().unwrap_or_default(),
        )
    }) {
        rows.push(format!("{name}\t{}\t{}", t.decisions, t.workloads));
    }
    rows.push(format!("unchanged\t{}\t-", r.unchanged));
    out.push_str("\nsummary:\n");
    out.push_str(&table(&rows, "  "));
    if r.skipped > 0 {
        let _ = writeln!(
            out,
            "not replayed: {} line{} (no decision: lost/suppressed reports, unknown hooks)",
            r.skipped,
            if r.skipped == 1 { "" } else { "s" }
        );
    }
    out
}

#[cfg(test)]
mod tests;
