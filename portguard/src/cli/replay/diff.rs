//! The comparison behind `portguard replay`: each recorded decision judged
//! under the current policy file and under the candidate, by the agent's
//! own verdict code, and the differences grouped per workload.
//!
//! - Who governs a recorded cgroup: [`crate::workload::recorded::governing`].
//! - Whether the policy allows the operation: [`CompiledPolicy::allows`],
//!   over the sets the agent compiles (`compile_all`, then
//!   `apply_reserved`, as `agent/start.rs` does).
//! - Which rule denies it: [`rule_in_file`], the agent's `rule` field.
//!
//! Pure: parsed files and typed records in, a [`Report`] out.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::{
    events::{EventHook, EventRecord, Verdict},
    policy::{
        CompiledPolicy, Mode, PolicyFile, Selector, SocketKind, apply_reserved,
        compile::socket_bits,
        compile_all,
        explain::{Dir, rule_in_file},
    },
    workload::{
        identity,
        recorded::{Governance, Known, governing},
    },
};

/// One side of the comparison: a policy file as the agent would enforce it.
pub struct Side {
    /// How the output names it (the file's path, or `none`).
    pub label: String,
    pub file: PolicyFile,
    compiled: Vec<CompiledPolicy>,
}

impl Side {
    pub fn new(label: impl Into<String>, file: PolicyFile) -> Self {
        let mut compiled = compile_all(&file.policies);
        apply_reserved(&mut compiled, &file.reserved);
        Self {
            label: label.into(),
            file,
            compiled,
        }
    }

    fn selectors(&self) -> Vec<&Selector> {
        self.file.policies.iter().map(|p| &p.selector).collect()
    }
}

/// What happens to an operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Effect {
    Allow,
    /// Allowed and reported (an `audit` policy would deny it).
    Audit,
    Deny,
    /// The log does not say who governs the workload.
    Unknown,
}

impl Effect {
    pub const fn name(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Audit => "audit",
            Self::Deny => "deny",
            Self::Unknown => "unknown",
        }
    }
}

/// An operation's fate under one policy file.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Outcome {
    pub verdict: Effect,
    /// The governing policy (none: ungoverned or unknown).
    pub policy: Option<String>,
    /// What denies it (the event's `rule`); `None` when allowed.
    pub rule: Option<String>,
}

impl Outcome {
    /// `allow`, `deny bind[0].address`, `audit connect`, `unknown`.
    pub fn short(&self) -> String {
        match &self.rule {
            Some(r) => format!("{} {r}", self.verdict.name()),
            None => self.verdict.name().to_owned(),
        }
    }
}

/// What changes. Decisions: the first four and `unknown`; workloads: the
/// next three and `unknown`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Change {
    /// Denied under the candidate; allowed or only audited now.
    NewlyDenied,
    /// Allowed (no rule against it) under the candidate; denied or audited now.
    NewlyAllowed,
    /// Audited (allowed, reported) under the candidate; allowed or denied now.
    NewlyAudited,
    /// Denied (or audited) under both, by another rule or policy.
    RuleChanged,
    /// A workload governed now that the candidate governs by no policy.
    NoLongerGoverned,
    /// A workload no policy governs now that the candidate governs.
    NewlyGoverned,
    /// A workload governed by another policy under the candidate.
    PolicyChanged,
    /// The log does not say enough to judge (see `why`).
    Unknown,
}

impl Change {
    pub const ALL: [Self; 8] = [
        Self::NewlyDenied,
        Self::NewlyAllowed,
        Self::NewlyAudited,
        Self::RuleChanged,
        Self::NoLongerGoverned,
        Self::NewlyGoverned,
        Self::PolicyChanged,
        Self::Unknown,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::NewlyDenied => "newly-denied",
            Self::NewlyAllowed => "newly-allowed",
            Self::NewlyAudited => "newly-audited",
            Self::RuleChanged => "rule-changed",
            Self::NoLongerGoverned => "no-longer-governed",
            Self::NewlyGoverned => "newly-governed",
            Self::PolicyChanged => "policy-changed",
            Self::Unknown => "unknown",
        }
    }

    /// How a decision changes, if it does.
    pub fn of_decision(was: &Outcome, now: &Outcome) -> Option<Self> {
        use Effect::{Allow, Audit, Deny, Unknown};
        match (was.verdict, now.verdict) {
            (Unknown, _) | (_, Unknown) => Some(Self::Unknown),
            (a, b) if a == b => (a != Allow
                && (&was.policy, &was.rule) != (&now.policy, &now.rule))
                .then_some(Self::RuleChanged),
            (_, Deny) => Some(Self::NewlyDenied),
            (_, Allow) => Some(Self::NewlyAllowed),
            (_, Audit) => Some(Self::NewlyAudited),
        }
    }
}

/// Who governs a workload under one file, for the report.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Gov {
    pub policy: Option<String>,
    /// The cgroup the policy is selected at (the workload's or an ancestor).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub at: Option<String>,
    /// Why it cannot be told.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unknown: Option<String>,
}

impl Gov {
    fn of(side: &Side, g: &Governance) -> Self {
        match g {
            Governance::Ungoverned => Self::default(),
            Governance::By { policy, path } => Self {
                policy: Some(side.file.policies[*policy].name.clone()),
                at: Some(path.clone()),
                unknown: None,
            },
            Governance::Unknown { why } => Self {
                unknown: Some(why.clone()),
                ..Self::default()
            },
        }
    }

    /// `web`, `(none)`, `(unknown)`.
    pub fn short(&self) -> &str {
        match (&self.policy, &self.unknown) {
            (Some(p), _) => p,
            (None, Some(_)) => "(unknown)",
            (None, None) => "(none)",
        }
    }
}

/// Recorded decisions that change the same way, summed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Flip {
    pub change: Change,
    pub hook: EventHook,
    pub protocol: String,
    pub family: &'static str,
    pub address: String,
    pub port: u16,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub dual_stack: bool,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub autobind: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub socket: Option<&'static str>,
    /// The verdicts the log recorded for them (`audit`, `deny`, ...).
    pub recorded: BTreeSet<&'static str>,
    pub was: Outcome,
    pub now: Outcome,
    /// Decisions (aggregated lines count as many as they stand for).
    pub count: u64,
    pub first_seen: String,
    pub last_seen: String,
}

/// One workload: its governance under both files and its changed decisions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Workload {
    /// `namespace/pod/container`, the unit, or the cgroup path.
    pub workload: String,
    pub cgroup: String,
    #[serde(flatten)]
    pub identity: crate::events::WorkloadIdentity,
    pub was: Gov,
    pub now: Gov,
    /// How its governance changes, if it does.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub governance: Option<Change>,
    /// Recorded decisions, and those that do not change.
    pub decisions: u64,
    pub unchanged: u64,
    pub changes: Vec<Flip>,
}

/// Per change: how many decisions and workloads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Tally {
    pub decisions: u64,
    pub workloads: u64,
}

/// Everything `portguard replay` found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Report {
    pub current: String,
    pub candidate: String,
    /// Decision lines replayed, and the decisions they stand for.
    pub lines: u64,
    pub decisions: u64,
    /// Decisions that change in no way.
    pub unchanged: u64,
    /// Lines that are no decision replay can judge (lost/suppressed
    /// reports, unknown hooks).
    pub skipped: u64,
    /// Workloads in the log.
    pub workloads_seen: u64,
    /// Policies the log's decisions name that the current file does not
    /// have (built-ins aside): the log was written under another file?
    #[serde(skip_serializing_if = "BTreeSet::is_empty")]
    pub foreign_policies: BTreeSet<String>,
    /// Per change name.
    pub summary: BTreeMap<&'static str, Tally>,
    /// Only workloads with a change, by name.
    pub workloads: Vec<Workload>,
}

impl Report {
    /// Whether any of `changes` happened.
    pub fn has_any(&self, changes: &[Change]) -> bool {
        changes.iter().any(|c| {
            self.summary
                .get(c.name())
                .is_some_and(|t| t.decisions + t.workloads > 0)
        })
    }
}

/// What the log says about pods and containers: namespaces and container
/// names from the identity fields; labels a `pods:` policy of the current
/// file needed to govern the pod it is recorded as governing (the log was
/// written under that file).
pub fn known_of(records: &[EventRecord], current: &PolicyFile) -> Known {
    let mut k = Known::default();
    for r in records {
        let id = &r.identity;
        let uid = id
            .k8s_pod_uid
            .clone()
            .or_else(|| r.cgroup.as_deref().and_then(|c| identity::parse(c).pod_uid));
        if let (Some(uid), Some(ns)) = (&uid, &id.k8s_namespace) {
            k.namespaces.insert(uid.clone(), ns.clone());
        }
        if let (Some(cid), Some(name)) = (&id.container_id, &id.container_name) {
            k.containers.insert(cid.clone(), name.clone());
        }
        let governed_pod = r
            .policy_cgroup
            .as_deref()
            .and_then(|c| identity::parse(c).pod_uid);
        if let (Some(uid), Some(name)) =
            (uid.filter(|u| governed_pod.as_ref() == Some(u)), &r.policy)
            && let Some(Selector::Pods(sel)) = current
                .policies
                .iter()
                .find(|p| &p.name == name)
                .map(|p| &p.selector)
        {
            k.labels
                .entry(uid)
                .or_default()
                .extend(sel.labels.iter().map(|(a, b)| (a.clone(), b.clone())));
        }
    }
    k
}

/// A record replay can judge: a decision of a known hook.
fn judgeable(r: &EventRecord) -> bool {
    !matches!(r.verdict, Verdict::Unknown)
        && !matches!(
            r.hook,
            EventHook::Unknown | EventHook::Kernel(portguard_common::Hook::Ingress)
        )
}

/// The fate of `r` under `side`, governed as `g`.
pub fn judge(side: &Side, g: &Governance, r: &EventRecord) -> Outcome {
    let i = match g {
        Governance::Ungoverned => {
            return Outcome {
                verdict: Effect::Allow,
                policy: None,
                rule: None,
            };
        }
        Governance::Unknown { .. } => {
            return Outcome {
                verdict: Effect::Unknown,
                policy: None,
                rule: None,
            };
        }
        Governance::By { policy, .. } => *policy,
    };
    let (policy, compiled) = (&side.file.policies[i], &side.compiled[i]);
    let j = r.judged();
    // The inventory judges a socket's port with `ephemeral` allowing it
    // (agent/inventory.rs); a hook only a port the kernel chose.
    let allowed_as = if r.hook == EventHook::Inventory {
        crate::policy::explain::Judged {
            ephemeral: true,
            ..j
        }
    } else {
        j
    };
    let socket = [SocketKind::Raw, SocketKind::Sctp, SocketKind::L2tp]
        .into_iter()
        .find(|k| Some(k.as_str()) == r.socket)
        .map_or(0, |k| socket_bits(&[k]));
    if compiled.allows(&allowed_as, socket) {
        return Outcome {
            verdict: Effect::Allow,
            policy: Some(policy.name.clone()),
            rule: None,
        };
    }
    Outcome {
        verdict: if policy.mode == Mode::Audit {
            Effect::Audit
        } else {
            Effect::Deny
        },
        policy: Some(policy.name.clone()),
        rule: rule_in_file(&side.file, &policy.name, &j, j.dir == Dir::Bind),
    }
}

fn gov_change(was: &Gov, now: &Gov) -> Option<Change> {
    if was.unknown.is_some() || now.unknown.is_some() {
        return Some(Change::Unknown);
    }
    match (&was.policy, &now.policy) {
        (Some(_), None) => Some(Change::NoLongerGoverned),
        (None, Some(_)) => Some(Change::NewlyGoverned),
        (Some(a), Some(b)) if a != b => Some(Change::PolicyChanged),
        _ => None,
    }
}

/// The key decisions are grouped by within a workload.
type FlipKey = (
    Change,
    &'static str,
    String,
    &'static str,
    String,
    u16,
    bool,
    bool,
    Option<&'static str>,
    Outcome,
    Outcome,
);

/// A workload being replayed: its report, who governs it now and under the
/// candidate, and its changed decisions by key.
type Entry = (Workload, Governance, Governance, BTreeMap<FlipKey, Flip>);

/// Judge every record under both sides.
pub fn replay(records: &[EventRecord], skipped: u64, current: &Side, candidate: &Side) -> Report {
    let known = known_of(records, &current.file);
    let (was_sel, now_sel) = (current.selectors(), candidate.selectors());
    let mut report = Report {
        current: current.label.clone(),
        candidate: candidate.label.clone(),
        lines: 0,
        decisions: 0,
        unchanged: 0,
        skipped,
        workloads_seen: 0,
        foreign_policies: records
            .iter()
            .filter_map(|r| r.policy.as_deref())
            .filter(|p| {
                !p.starts_with("portguard:") && !current.file.policies.iter().any(|q| q.name == *p)
            })
            .map(str::to_owned)
            .collect(),
        summary: Change::ALL
            .iter()
            .map(|c| (c.name(), Tally::default()))
            .collect(),
        workloads: Vec::new(),
    };
    // cgroup -> (workload, its governance now and under the candidate,
    // flips by key)
    let mut by_cgroup: BTreeMap<String, Entry> = BTreeMap::new();
    for r in records {
        if !judgeable(r) {
            report.skipped += 1;
            continue;
        }
        report.lines += 1;
        report.decisions += r.count;
        let cgroup = r.cgroup.clone().unwrap_or_default();
        let (w, was_g, now_g, flips) = by_cgroup.entry(cgroup.clone()).or_insert_with(|| {
            let govern = |sel: &[&Selector]| {
                if cgroup.is_empty() {
                    Governance::Unknown {
                        why: "the cgroup's path was not recorded".into(),
                    }
                } else {
                    governing(sel, &cgroup, &known)
                }
            };
            let (was_g, now_g) = (govern(&was_sel), govern(&now_sel));
            let (was, now) = (Gov::of(current, &was_g), Gov::of(candidate, &now_g));
            let line = serde_json::to_value(r).unwrap_or_default();
            let w = Workload {
                workload: super::super::events::workload(&line),
                cgroup: cgroup.clone(),
                identity: r.identity.clone(),
                governance: gov_change(&was, &now),
                was,
                now,
                decisions: 0,
                unchanged: 0,
                changes: Vec::new(),
            };
            (w, was_g, now_g, BTreeMap::new())
        });
        let was = judge(current, was_g, r);
        let now = judge(candidate, now_g, r);
        w.decisions += r.count;
        let Some(change) = Change::of_decision(&was, &now) else {
            w.unchanged += r.count;
            report.unchanged += r.count;
            continue;
        };
        let key: FlipKey = (
            change,
            r.hook.name(),
            r.protocol.clone(),
            r.family,
            r.address.clone(),
            r.port,
            r.dual_stack,
            r.autobind,
            r.socket,
            was.clone(),
            now.clone(),
        );
        let first = r.first_seen.clone().unwrap_or_else(|| r.time.clone());
        let last = r.last_seen.clone().unwrap_or_else(|| r.time.clone());
        let f = flips.entry(key).or_insert_with(|| Flip {
            change,
            hook: r.hook,
            protocol: r.protocol.clone(),
            family: r.family,
            address: r.address.clone(),
            port: r.port,
            dual_stack: r.dual_stack,
            autobind: r.autobind,
            socket: r.socket,
            recorded: BTreeSet::new(),
            was,
            now,
            count: 0,
            first_seen: first.clone(),
            last_seen: last.clone(),
        });
        f.recorded.insert(verdict_name(r.verdict));
        f.count += r.count;
        if first < f.first_seen {
            f.first_seen = first;
        }
        if last > f.last_seen {
            f.last_seen = last;
        }
    }
    report.workloads_seen = by_cgroup.len() as u64;
    for (_, (mut w, _, _, flips)) in by_cgroup {
        w.changes = flips.into_values().collect();
        let mut seen = BTreeSet::new();
        for f in &w.changes {
            let t = report.summary.entry(f.change.name()).or_default();
            t.decisions += f.count;
            if seen.insert(f.change) {
                t.workloads += 1;
            }
        }
        if let Some(g) = w.governance {
            let t = report.summary.entry(g.name()).or_default();
            if seen.insert(g) {
                t.workloads += 1;
            }
            // Unknown decisions are already counted.
            if g != Change::Unknown {
                t.decisions += w.decisions;
            }
        }
        if w.governance.is_some() || !w.changes.is_empty() {
            report.workloads.push(w);
        }
    }
    report
        .workloads
        .sort_by(|a, b| (&a.workload, &a.cgroup).cmp(&(&b.workload, &b.cgroup)));
    report
}

const fn verdict_name(v: Verdict) -> &'static str {
    match v {
        Verdict::Deny => "deny",
        Verdict::Audit => "audit",
        Verdict::Reported => "reported",
        Verdict::CutOff => "cut_off",
        Verdict::Preexisting => "preexisting",
        Verdict::Unknown => "unknown",
    }
}
