//! `portguard check` output: human lines (`FILE:LINE:COLUMN: error: ...`),
//! a JSON document, or SARIF 2.1.0 for code-scanning UIs.
//!
//! Owns the output formats. May import the findings vocabulary (`super`),
//! serde and serde-sarif; it reads no files.

use serde::Serialize;
use serde_sarif::sarif;

use super::{Check, Finding, Loc, Severity};

/// What was checked, for the summary.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Summary {
    pub policy_file: String,
    /// Policies in the file (0 when it is invalid).
    pub policies: usize,
    pub policy_valid: bool,
    /// `--manifests` given.
    pub manifests_checked: bool,
    pub files: usize,
    /// Kubernetes containers, and those a policy governs.
    pub containers: usize,
    pub governed_containers: usize,
    pub compose_services: usize,
    pub dockerfiles: usize,
    pub services: usize,
    /// Governed containers and compose services that keep the `NET_RAW`
    /// capability containerd and Docker grant by default
    /// (`FILE:LINE:COLUMN (who)`); a note, not a finding.
    pub keep_net_raw: Vec<String>,
}

#[derive(Clone, Debug, Default)]
pub struct Report {
    pub summary: Summary,
    pub findings: Vec<Finding>,
    /// A cgroup2 mount was found, so `cgroup:` paths were checked.
    pub cgroups_checked: bool,
}

impl Report {
    pub fn errors(&self) -> usize {
        self.count(Severity::Error)
    }

    pub fn warnings(&self) -> usize {
        self.count(Severity::Warning)
    }

    fn count(&self, s: Severity) -> usize {
        self.findings.iter().filter(|f| f.severity == s).count()
    }

    fn policy_counts(&self) -> (usize, usize) {
        let policy = |s| {
            self.findings
                .iter()
                .filter(|f| {
                    f.severity == s
                        && matches!(f.check, Check::PolicyInvalid | Check::PolicyWarning)
                })
                .count()
        };
        (policy(Severity::Error), policy(Severity::Warning))
    }
}

/// Human-readable lines, one per finding and one per related place.
pub fn human(r: &Report) -> String {
    let mut s = String::new();
    for f in &r.findings {
        s.push_str(&format!(
            "{}: {}: {} [{}]\n",
            f.loc,
            f.severity.as_str(),
            f.message,
            f.check.id()
        ));
        for (loc, note) in &f.related {
            s.push_str(&format!("    {loc}: note: {note}\n"));
        }
    }
    let sm = &r.summary;
    let p = &sm.policy_file;
    if !r.cgroups_checked {
        s.push_str(&format!(
            "{p}: note: no cgroup2 mount found; cgroup paths were not checked\n"
        ));
    }
    let (pe, pw) = r.policy_counts();
    s.push_str(&format!(
        "{p}: {}: {} policies, {pe} errors, {pw} warnings\n",
        if sm.policy_valid { "ok" } else { "invalid" },
        sm.policies
    ));
    if sm.manifests_checked {
        let (e, w) = (r.errors() - pe, r.warnings() - pw);
        s.push_str(&format!(
            "manifests: {}: {} files, {} Kubernetes containers ({} governed by a policy), {} \
             Services, {} compose services, {} Dockerfiles; {e} errors, {w} warnings\n",
            if e == 0 { "ok" } else { "failed" },
            sm.files,
            sm.containers,
            sm.governed_containers,
            sm.services,
            sm.compose_services,
            sm.dockerfiles,
        ));
        if let Some(first) = sm.keep_net_raw.first() {
            s.push_str(&format!(
                "manifests: note: {} governed containers keep NET_RAW, which containerd and \
                 Docker grant unless it is dropped: with it, an AF_PACKET socket can answer UDP \
                 on any port around portguard. Add `securityContext.capabilities.drop: [ALL]` \
                 (compose `cap_drop: [ALL]`), or enforce the Pod Security `restricted` profile. \
                 First: {first}\n",
                sm.keep_net_raw.len()
            ));
        }
    }
    s
}

#[derive(Serialize)]
struct JsonLoc<'a> {
    file: &'a str,
    line: usize,
    column: usize,
}

impl<'a> From<&'a Loc> for JsonLoc<'a> {
    fn from(l: &'a Loc) -> Self {
        Self {
            file: &l.file,
            line: l.line,
            column: l.column,
        }
    }
}

#[derive(Serialize)]
struct JsonRelated<'a> {
    #[serde(flatten)]
    loc: JsonLoc<'a>,
    message: &'a str,
}

#[derive(Serialize)]
struct JsonFinding<'a> {
    rule: &'static str,
    severity: &'static str,
    #[serde(flatten)]
    loc: JsonLoc<'a>,
    message: &'a str,
    related: Vec<JsonRelated<'a>>,
}

#[derive(Serialize)]
struct JsonReport<'a> {
    ok: bool,
    errors: usize,
    warnings: usize,
    summary: &'a Summary,
    findings: Vec<JsonFinding<'a>>,
}

/// One JSON document: `ok`, counts, summary and `findings` (each with
/// `rule`, `severity`, `file`, `line`, `column`, `message`, `related`).
pub fn json(r: &Report) -> String {
    let doc = JsonReport {
        ok: r.errors() == 0,
        errors: r.errors(),
        warnings: r.warnings(),
        summary: &r.summary,
        findings: r
            .findings
            .iter()
            .map(|f| JsonFinding {
                rule: f.check.id(),
                severity: f.severity.as_str(),
                loc: (&f.loc).into(),
                message: &f.message,
                related: f
                    .related
                    .iter()
                    .map(|(l, m)| JsonRelated {
                        loc: l.into(),
                        message: m,
                    })
                    .collect(),
            })
            .collect(),
    };
    serde_json::to_string_pretty(&doc).unwrap_or_default() + "\n"
}

fn level(s: Severity) -> sarif::ResultLevel {
    match s {
        Severity::Error => sarif::ResultLevel::Error,
        Severity::Warning => sarif::ResultLevel::Warning,
    }
}

/// A SARIF URI for a path as the user named it: relative paths stay
/// relative (to the checkout, as code-scanning expects), `./` dropped.
fn uri(file: &str) -> String {
    let f = file.strip_prefix("./").unwrap_or(file);
    if f.starts_with('/') {
        format!("file://{f}")
    } else {
        f.to_owned()
    }
}

fn location(loc: &Loc, message: Option<&str>) -> sarif::Location {
    let physical = sarif::PhysicalLocation::builder()
        .artifact_location(
            sarif::ArtifactLocation::builder()
                .uri(uri(&loc.file))
                .build(),
        )
        .region(
            sarif::Region::builder()
                .start_line(loc.line as i64)
                .start_column(loc.column as i64)
                .build(),
        )
        .build();
    match message {
        Some(m) => sarif::Location::builder()
            .physical_location(physical)
            .message(m)
            .build(),
        None => sarif::Location::builder()
            .physical_location(physical)
            .build(),
    }
}

/// SARIF 2.1.0: one run, every check as a rule, every finding as a result.
pub fn sarif(r: &Report) -> String {
    let rules: Vec<sarif::ReportingDescriptor> = Check::ALL
        .iter()
        .map(|c| {
            sarif::ReportingDescriptor::builder()
                .id(c.id())
                .name(c.id())
                .short_description(&c.summary().to_owned())
                .default_configuration(
                    sarif::ReportingConfiguration::builder()
                        .level(serde_json::json!(c.default_severity().as_str()))
                        .build(),
                )
                .build()
        })
        .collect();
    let results: Vec<sarif::Result> = r
        .findings
        .iter()
        .map(|f| {
            let index = Check::ALL.iter().position(|c| *c == f.check).unwrap_or(0);
            let b = sarif::Result::builder()
                .rule_id(f.check.id())
                .rule_index(index as i64)
                .level(level(f.severity))
                .message(&f.message)
                .locations(vec![location(&f.loc, None)]);
            if f.related.is_empty() {
                b.build()
            } else {
                b.related_locations(
                    f.related
                        .iter()
                        .map(|(l, m)| location(l, Some(m)))
                        .collect::<Vec<_>>(),
                )
                .build()
            }
        })
        .collect();
    let driver = sarif::ToolComponent::builder()
        .name("portguard")
        .version(env!("CARGO_PKG_VERSION"))
        .information_uri("https://github.com/portguard/portguard")
        .rules(rules)
        .build();
    let run = sarif::Run::builder()
        .tool(sarif::Tool::builder().driver(driver).build())
        .results(results)
        .build();
    let doc = sarif::Sarif::builder()
        .schema("https://json.schemastore.org/sarif-2.1.0.json")
        .version(serde_json::json!("2.1.0"))
        .runs(vec![run])
        .build();
    serde_json::to_string_pretty(&doc).unwrap_or_default() + "\n"
}
