//! Kubernetes-native reports: decisions summarised as `PolicyReport`
//! objects (`wgpolicyk8s.io/v1alpha2`, the API Kyverno writes and
//! policy-reporter reads; docs/policy-reports.md).
//!
//! This module owns the pure part: the object model (plain serde data),
//! the [`Tally`] that counts decisions per workload and policy over a
//! window, and [`Tally::reports`], which renders one report per
//! (namespace, node). Both readers feed it: `portguard report
//! --policy-report` with the JSON lines of an event log
//! ([`Decision::of_json`]), the agent with the records it has just
//! written ([`Decision::of_record`]). [`client`] is the only part that
//! talks to an API server (kube-rs, server-side apply).
//!
//! What becomes a result: `deny` and `cut_off` (the kernel refused, or the
//! agent ended the socket) are `fail`; `audit` (enforce mode would have
//! refused) is `warn`. One result per (pod, container, policy, rule,
//! result) in the window, with the decisions' count, ports and times in its
//! `properties`. Decisions without a Kubernetes namespace (host services,
//! pods the runtime did not name) have no namespaced report to go to and
//! are only counted ([`Tally::unplaced`]).
//!
//! Must not import aya, or anything of the agent.

pub mod client;

use std::{
    collections::{BTreeMap, BTreeSet},
    time::SystemTime,
};

use serde::Serialize;
use serde_json::Value;

use crate::events::{EventRecord, Verdict};

/// `apiVersion` of the reports.
pub const API_VERSION: &str = "wgpolicyk8s.io/v1alpha2";
/// The API group and version, apart.
pub const GROUP: &str = "wgpolicyk8s.io";
pub const VERSION: &str = "v1alpha2";
/// `kind` and its plural (the resource in the URL).
pub const KIND: &str = "PolicyReport";
pub const PLURAL: &str = "policyreports";
/// The results' `source` and the server-side-apply field manager.
pub const SOURCE: &str = "portguard";
/// Most results one report holds (the most frequent are kept): an object
/// must stay well under etcd's 1.5 MiB limit (a result is about 600 bytes).
pub const MAX_RESULTS: usize = 1000;
/// Most distinct (protocol, port) pairs a result lists in `ports`.
const MAX_PORTS: usize = 10;
/// Most distinct result keys a window counts (memory stays bounded under
/// pod churn); decisions beyond are counted in [`Tally::overflow`].
pub const MAX_KEYS: usize = 65536;

/// A `PolicyReport` object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyReport {
    pub api_version: &'static str,
    pub kind: &'static str,
    pub metadata: Metadata,
    pub summary: Summary,
    pub results: Vec<ReportResult>,
}

/// The report's `metadata` (only what portguard sets).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Metadata {
    pub name: String,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
}

/// `summary`: how many results of each kind the report holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    pub pass: u64,
    pub fail: u64,
    pub warn: u64,
    pub error: u64,
    pub skip: u64,
}

/// One entry of `results`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ReportResult {
    pub source: &'static str,
    pub policy: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    pub result: &'static str,
    pub scored: bool,
    pub category: &'static str,
    pub message: String,
    pub resources: Vec<ObjectRef>,
    pub properties: BTreeMap<String, String>,
    pub timestamp: Timestamp,
}

/// A result's subject: the pod.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectRef {
    pub api_version: &'static str,
    pub kind: &'static str,
    pub namespace: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
}

/// `timestamp`: when the result's last decision happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Timestamp {
    pub seconds: i64,
    pub nanos: i32,
}

/// The `result` of a verdict: `fail` for decisions that were enforced,
/// `warn` for audits; `None` for the rest (`preexisting`, `reported`).
pub const fn result_of(verdict: &str) -> Option<&'static str> {
    match verdict.as_bytes() {
        b"deny" | b"cut_off" => Some("fail"),
        b"audit" => Some("warn"),
        _ => None,
    }
}

/// One decision line (or aggregate), as a report needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub host: String,
    pub namespace: Option<String>,
    pub pod: Option<String>,
    pub pod_uid: Option<String>,
    pub container: Option<String>,
    pub policy: String,
    pub rule: Option<String>,
    pub result: &'static str,
    pub protocol: String,
    pub port: u16,
    pub count: u64,
    /// RFC 3339, as in the event.
    pub first_seen: String,
    pub last_seen: String,
}

impl Decision {
    /// From an event line; `None` for lines that are no reportable decision.
    pub fn of_json(e: &Value) -> Option<Self> {
        let result = result_of(e["verdict"].as_str()?)?;
        let s = |k: &str| e[k].as_str().map(str::to_owned);
        let time = e["time"].as_str().unwrap_or_default();
        Some(Self {
            host: s("host").unwrap_or_default(),
            namespace: s("k8s_namespace"),
            pod: s("k8s_pod"),
            pod_uid: s("k8s_pod_uid"),
            container: s("container_name"),
            policy: s("policy").unwrap_or_default(),
            rule: s("rule"),
            result,
            protocol: s("protocol").unwrap_or_default(),
            port: e["port"]
                .as_u64()
                .and_then(|p| u16::try_from(p).ok())
                .unwrap_or(0),
            count: e["count"].as_u64().unwrap_or(1),
            first_seen: e["first_seen"].as_str().unwrap_or(time).to_owned(),
            last_seen: e["last_seen"].as_str().unwrap_or(time).to_owned(),
        })
    }

    /// From a record the agent has written (its `rule` already named).
    pub fn of_record(r: &EventRecord) -> Option<Self> {
        let result = match r.verdict {
            Verdict::Deny | Verdict::CutOff => "fail",
            Verdict::Audit => "warn",
            _ => return None,
        };
        let id = &r.identity;
        Some(Self {
            host: r.host.clone(),
            namespace: id.k8s_namespace.clone(),
            pod: id.k8s_pod.clone(),
            pod_uid: id.k8s_pod_uid.clone(),
            container: id.container_name.clone(),
            policy: r.policy.clone().unwrap_or_default(),
            rule: r.rule.clone(),
            result,
            protocol: r.protocol.clone(),
            port: r.port,
            count: r.count,
            first_seen: r.first_seen.clone().unwrap_or_else(|| r.time.clone()),
            last_seen: r.last_seen.clone().unwrap_or_else(|| r.time.clone()),
        })
    }
}

/// Which report a result goes to: (namespace, node).
type ReportKey = (String, String);
/// Which result a decision counts in: (pod, pod uid, container, policy,
/// rule, result).
type ResultKey = (
    Option<String>,
    Option<String>,
    Option<String>,
    String,
    Option<String>,
    &'static str,
);

#[derive(Clone, Debug, Default)]
struct Counted {
    count: u64,
    first_seen: String,
    last_seen: String,
    /// (protocol, port) -> decisions.
    ports: BTreeMap<(String, u16), u64>,
}

/// Decisions counted per report and result over a window. Adding one is a
/// map lookup; rendering happens once per window.
#[derive(Clone, Debug, Default)]
pub struct Tally {
    by: BTreeMap<ReportKey, BTreeMap<ResultKey, Counted>>,
    keys: usize,
    /// Decisions that had no Kubernetes namespace.
    pub unplaced: u64,
    /// Decisions not counted because [`MAX_KEYS`] results were open.
    pub overflow: u64,
}

impl Tally {
    /// Count one decision.
    pub fn add(&mut self, d: Decision) {
        let Some(ns) = d.namespace else {
            self.unplaced += d.count;
            return;
        };
        let key: ResultKey = (d.pod, d.pod_uid, d.container, d.policy, d.rule, d.result);
        let at = (ns, d.host);
        if !self.by.get(&at).is_some_and(|r| r.contains_key(&key)) {
            if self.keys >= MAX_KEYS {
                self.overflow += d.count;
                return;
            }
            self.keys += 1;
        }
        let c = self
            .by
            .entry(at)
            .or_default()
            .entry(key)
            .or_insert_with(|| Counted {
                first_seen: d.first_seen.clone(),
                last_seen: d.last_seen.clone(),
                ..Counted::default()
            });
        c.count += d.count;
        // RFC 3339 in UTC with a fixed precision sorts as text.
        if d.first_seen < c.first_seen {
            c.first_seen = d.first_seen;
        }
        if d.last_seen > c.last_seen {
            c.last_seen = d.last_seen;
        }
        *c.ports.entry((d.protocol, d.port)).or_default() += d.count;
    }

    /// True when nothing was counted.
    pub fn is_empty(&self) -> bool {
        self.by.is_empty()
    }

    /// The namespaces and nodes with results.
    pub fn report_keys(&self) -> BTreeSet<(String, String)> {
        self.by.keys().cloned().collect()
    }

    /// One report per (namespace, node), in that order, for the window
    /// `window` (RFC 3339 start and end, written as annotations).
    pub fn reports(&self, window: (&str, &str)) -> Vec<PolicyReport> {
        self.by
            .iter()
            .map(|((ns, host), results)| render(ns, host, results, window))
            .collect()
    }
}

/// The report's name: `portguard-<node>` (each node's agent owns its own
/// report in each namespace, so agents never overwrite each other), made a
/// valid object name.
pub fn report_name(host: &str) -> String {
    let mut name = String::from("portguard");
    let host: String = host
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let host = host.trim_matches(|c| c == '-' || c == '.');
    if !host.is_empty() {
        name.push('-');
        name.push_str(host);
    }
    name.truncate(253);
    name.trim_end_matches(['-', '.']).to_owned()
}

/// An empty report for (namespace, node): what a namespace's report says
/// once a window passed without decisions there.
pub fn empty_report(ns: &str, host: &str, window: (&str, &str)) -> PolicyReport {
    render(ns, host, &BTreeMap::new(), window)
}

fn render(
    ns: &str,
    host: &str,
    results: &BTreeMap<ResultKey, Counted>,
    window: (&str, &str),
) -> PolicyReport {
    // The most frequent first when there are too many; the kept ones in
    // key order (pod, container, policy, rule, result).
    let mut kept: Vec<(&ResultKey, &Counted)> = results.iter().collect();
    let omitted = kept.len().saturating_sub(MAX_RESULTS);
    if omitted > 0 {
        kept.sort_by(|a, b| b.1.count.cmp(&a.1.count).then(a.0.cmp(b.0)));
        kept.truncate(MAX_RESULTS);
        kept.sort_by(|a, b| a.0.cmp(b.0));
    }
    let mut summary = Summary::default();
    let results: Vec<ReportResult> = kept
        .into_iter()
        .map(|(key, c)| {
            match key.5 {
                "fail" => summary.fail += 1,
                _ => summary.warn += 1,
            }
            result(ns, host, key, c)
        })
        .collect();
    let mut annotations = BTreeMap::from([
        ("portguard.dev/window-start".to_owned(), window.0.to_owned()),
        ("portguard.dev/window-end".to_owned(), window.1.to_owned()),
    ]);
    if omitted > 0 {
        annotations.insert(
            "portguard.dev/results-omitted".to_owned(),
            omitted.to_string(),
        );
    }
    PolicyReport {
        api_version: API_VERSION,
        kind: KIND,
        metadata: Metadata {
            name: report_name(host),
            namespace: ns.to_owned(),
            labels: BTreeMap::from([
                ("app.kubernetes.io/managed-by".to_owned(), SOURCE.to_owned()),
                ("portguard.dev/node".to_owned(), label_value(host)),
            ]),
            annotations,
        },
        summary,
        results,
    }
}

/// A label value (63 characters of `[A-Za-z0-9._-]`, alphanumeric ends).
fn label_value(s: &str) -> String {
    let v: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '-'
            }
        })
        .take(63)
        .collect();
    v.trim_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_owned()
}

fn result(ns: &str, host: &str, key: &ResultKey, c: &Counted) -> ReportResult {
    let (pod, uid, container, policy, rule, result) = key;
    let mut ports: Vec<(&(String, u16), &u64)> = c.ports.iter().collect();
    ports.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    let more = ports.len().saturating_sub(MAX_PORTS);
    ports.truncate(MAX_PORTS);
    let mut port_list: Vec<String> = ports
        .iter()
        .map(|((proto, port), _)| format!("{proto}/{port}"))
        .collect();
    if more > 0 {
        port_list.push(format!("+{more} more"));
    }
    let ports_text = port_list.join(",");
    let what = if *result == "fail" {
        "denied"
    } else {
        "would be denied (audit)"
    };
    let times = if c.count == 1 { "time" } else { "times" };
    let message = format!(
        "{} {what} {} {times} by policy {policy}{}: {ports_text}",
        container
            .as_deref()
            .map_or_else(|| "The pod".to_owned(), |name| format!("Container {name}")),
        c.count,
        rule.as_deref()
            .map(|r| format!(" (rule {r})"))
            .unwrap_or_default(),
    );
    let mut properties = BTreeMap::from([
        ("count".to_owned(), c.count.to_string()),
        ("ports".to_owned(), ports_text),
        ("firstSeen".to_owned(), c.first_seen.clone()),
        ("lastSeen".to_owned(), c.last_seen.clone()),
        ("node".to_owned(), host.to_owned()),
    ]);
    if let Some(name) = container {
        properties.insert("container".to_owned(), name.clone());
    }
    ReportResult {
        source: SOURCE,
        policy: policy.clone(),
        rule: rule.clone(),
        result,
        scored: true,
        category: "Port policy",
        message,
        resources: vec![ObjectRef {
            api_version: "v1",
            kind: "Pod",
            namespace: ns.to_owned(),
            name: pod.clone(),
            uid: uid.clone(),
        }],
        properties,
        timestamp: timestamp(&c.last_seen),
    }
}

/// An RFC 3339 time as seconds and nanoseconds since the epoch (zero when
/// unreadable).
fn timestamp(t: &str) -> Timestamp {
    let d = humantime::parse_rfc3339_weak(t)
        .ok()
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .unwrap_or_default();
    Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// A time as RFC 3339 (seconds), for the window annotations.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

#[cfg(test)]
mod tests;
