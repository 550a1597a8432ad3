use serde_json::{Value, json};

use super::{
    diff::{Change, Effect, Outcome, Side, replay},
    render,
};
use crate::{events::EventRecord, policy::parse_policy_str};

const CURRENT: &str = "\
policies:
  - name: web
    cgroup: /app/web
    mode: audit
    bind: [{ports: [8080], protocol: tcp}]
  - name: db
    cgroup: /app/db
    bind: [{ports: [5432]}]
  - name: gone
    cgroup: /app/gone
    connect: []
";

const CANDIDATE: &str = "\
reserved: [9000]
policies:
  - name: web
    cgroup: /app/web
    bind: [{ports: [8080, 9000], protocol: tcp}]
  - name: db
    cgroup: /app/db
    bind: [{ports: [5432, 6000]}, {ports: [7000], address: loopback}]
  - name: batch
    cgroup: /app/batch
    bind: []
";

fn side(label: &str, text: &str) -> Side {
    Side::new(label, parse_policy_str(text).unwrap())
}

/// An event line as the agent writes it.
fn line(verdict: &str, cgroup: &str, policy: &str, hook: &str, addr: &str, port: u16) -> Value {
    let connect = hook.starts_with("connect");
    json!({"schema_version": 1, "time": "2026-12-01T10:00:00.000Z", "host": "node-1",
           "verdict": verdict, "hook": hook, "policy": policy, "rule": "bind",
           "cgroup": cgroup, "cgroup_id": 7, "pid": 10, "tid": 10, "uid": 0, "gid": 0,
           "comm": "svc", "family": "ipv4", "protocol": "tcp", "address": addr, "port": port,
           "policy_cgroup": cgroup, "policy_cgroup_id": 7, "count": 1,
           "rule": if connect { "connect[]" } else { "bind" }})
}

fn log() -> Vec<Value> {
    let mut agg = line("deny", "/app/db", "db", "bind4", "0.0.0.0", 8000);
    agg["count"] = json!(5);
    agg["first_seen"] = json!("2026-12-01T09:00:00.000Z");
    agg["last_seen"] = json!("2026-12-01T11:00:00.000Z");
    vec![
        line("audit", "/app/web", "web", "bind4", "0.0.0.0", 8081),
        line("audit", "/app/web", "web", "bind4", "0.0.0.0", 8081),
        line("audit", "/app/web", "web", "bind4", "0.0.0.0", 9000),
        line("deny", "/app/db", "db", "bind4", "0.0.0.0", 6000),
        line("deny", "/app/db", "db", "bind4", "0.0.0.0", 7000),
        agg,
        line("audit", "/app/batch/worker", "old", "bind4", "0.0.0.0", 80),
        line("deny", "/app/gone", "gone", "connect4", "10.0.0.1", 443),
        json!({"schema_version": 1, "time": "t", "host": "h", "lost": 3, "lost_total": 3}),
    ]
}

fn records(lines: &[Value]) -> (Vec<EventRecord>, u64) {
    let r: Vec<EventRecord> = lines.iter().filter_map(EventRecord::from_json).collect();
    let skipped = (lines.len() - r.len()) as u64;
    (r, skipped)
}

#[test]
fn every_kind_of_change_is_found_and_rendered() {
    let (recs, skipped) = records(&log());
    let report = replay(
        &recs,
        skipped,
        &side("current.yaml", CURRENT),
        &side("candidate.yaml", CANDIDATE),
    );
    let text = render(&report);
    let want = "\
portguard replay: 12 decisions (8 event lines) from 4 workloads
  current:   current.yaml
  candidate: candidate.yaml
  note: the log names policies the current file does not have (old): was it written under another file?

/app/batch/worker
  policy: (none) -> batch (newly-governed)
  CHANGE        COUNT  HOOK   PROTO  ADDRESS:PORT  WAS    NOW          RECORDED
  newly-denied  1      bind4  tcp    0.0.0.0:80    allow  deny bind[]  audit

/app/db
  policy: db (unchanged)
  CHANGE         COUNT  HOOK   PROTO  ADDRESS:PORT  WAS        NOW                   RECORDED
  newly-allowed  1      bind4  tcp    0.0.0.0:6000  deny bind  allow                 deny
  rule-changed   1      bind4  tcp    0.0.0.0:7000  deny bind  deny bind[1].address  deny

/app/gone
  policy: gone -> (none) (no-longer-governed)
  CHANGE         COUNT  HOOK      PROTO  ADDRESS:PORT  WAS             NOW    RECORDED
  newly-allowed  1      connect4  tcp    10.0.0.1:443  deny connect[]  allow  deny

/app/web
  policy: web (unchanged)
  CHANGE        COUNT  HOOK   PROTO  ADDRESS:PORT  WAS         NOW            RECORDED
  newly-denied  2      bind4  tcp    0.0.0.0:8081  audit bind  deny bind      audit
  newly-denied  1      bind4  tcp    0.0.0.0:9000  audit bind  deny reserved  audit

summary:
  CHANGE              DECISIONS  WORKLOADS
  newly-denied        4          2
  newly-allowed       2          2
  newly-audited       0          0
  rule-changed        1          1
  no-longer-governed  1          1
  newly-governed      1          1
  policy-changed      0          0
  unknown             0          0
  unchanged           5          -
not replayed: 1 line (no decision: lost/suppressed reports, unknown hooks)
";
    assert_eq!(text, want, "\n{text}");
    assert!(report.has_any(&[Change::NewlyDenied]));
    assert!(!report.has_any(&[Change::NewlyAudited, Change::PolicyChanged]));
    // The JSON document carries the same, with times.
    let v = serde_json::to_value(&report).unwrap();
    assert_eq!(
        v["summary"]["newly-denied"],
        json!({"decisions": 4, "workloads": 2})
    );
    let web = &v["workloads"][3];
    assert_eq!(web["cgroup"], "/app/web");
    assert_eq!(web["was"], json!({"policy": "web", "at": "/app/web"}));
    assert_eq!(
        web["changes"][1]["now"],
        json!({"verdict": "deny", "policy": "web", "rule": "reserved"})
    );
    let db = &v["workloads"][1];
    assert_eq!(db["decisions"], 7);
    assert_eq!(
        db["unchanged"], 5,
        "the aggregate of 5 stays denied by `bind`"
    );
}

#[test]
fn nothing_changes_against_itself() {
    let (recs, skipped) = records(&log());
    let report = replay(&recs, skipped, &side("a", CURRENT), &side("b", CURRENT));
    assert!(report.workloads.is_empty(), "{report:#?}");
    assert_eq!(report.foreign_policies.len(), 1, "`old` is not in the file");
    assert_eq!(report.unchanged, report.decisions);
    assert!(!report.has_any(&Change::ALL));
    assert!(render(&report).contains("\nno recorded decision changes\n"));
}

#[test]
fn decisions_change_by_their_effect_then_by_their_rule() {
    let o = |v: Effect, policy: Option<&str>, rule: Option<&str>| Outcome {
        verdict: v,
        policy: policy.map(str::to_owned),
        rule: rule.map(str::to_owned),
    };
    let allow = o(Effect::Allow, Some("a"), None);
    let allow_b = o(Effect::Allow, Some("b"), None);
    let audit = o(Effect::Audit, Some("a"), Some("bind"));
    let deny = o(Effect::Deny, Some("a"), Some("bind"));
    let deny_b = o(Effect::Deny, Some("b"), Some("bind"));
    let deny_addr = o(Effect::Deny, Some("a"), Some("bind[0].address"));
    let unknown = o(Effect::Unknown, None, None);
    let of = Change::of_decision;
    assert_eq!(of(&allow, &deny), Some(Change::NewlyDenied));
    assert_eq!(of(&audit, &deny), Some(Change::NewlyDenied));
    assert_eq!(of(&deny, &allow), Some(Change::NewlyAllowed));
    assert_eq!(of(&audit, &allow), Some(Change::NewlyAllowed));
    assert_eq!(of(&allow, &audit), Some(Change::NewlyAudited));
    assert_eq!(of(&deny, &audit), Some(Change::NewlyAudited));
    assert_eq!(of(&deny, &deny_addr), Some(Change::RuleChanged));
    assert_eq!(of(&deny, &deny_b), Some(Change::RuleChanged));
    assert_eq!(of(&deny, &deny), None);
    assert_eq!(
        of(&allow, &allow_b),
        None,
        "allowed by either: no decision flips"
    );
    assert_eq!(of(&unknown, &deny), Some(Change::Unknown));
    assert_eq!(of(&deny, &unknown), Some(Change::Unknown));
}

#[test]
fn records_read_back_as_the_agent_wrote_them() {
    let mut r = EventRecord::from_json(&line("deny", "/a", "p", "bind6", "::", 443)).unwrap();
    r.dual_stack = true;
    r.autobind = true;
    r.socket = Some("raw");
    r.identity.k8s_pod = Some("web-0".into());
    r.identity.identity_source = Some("cri");
    r.first_seen = Some("f".into());
    let again = EventRecord::from_json(&serde_json::to_value(&r).unwrap()).unwrap();
    assert_eq!(again, r);
    assert_eq!(r.hook.name(), "bind6");
    let inv = EventRecord::from_json(&json!({"verdict": "preexisting", "hook": "inventory"}));
    assert_eq!(inv.unwrap().hook, crate::events::EventHook::Inventory);
    assert!(EventRecord::from_json(&json!({"lost": 1})).is_none());
}

#[test]
fn pods_the_log_cannot_place_are_unknown_until_it_shows_their_labels() {
    const UID: &str = "2f0e3e8f-7b1a-4c2e-9d3a-0f6f3c1a2b4c";
    let pod = format!("/kubepods/besteffort/pod{UID}");
    let mut l = line("audit", &pod, "learned", "bind4", "0.0.0.0", 8080);
    l["k8s_pod_uid"] = json!(UID);
    l["k8s_namespace"] = json!("shop");
    let none = side("none", "policies: []\n");
    let by_label = side(
        "candidate",
        "policies:\n  - {name: web, pods: {labels: {app: web}}, bind: [{ports: [8443]}]}\n",
    );
    let (recs, _) = records(std::slice::from_ref(&l));
    let report = replay(&recs, 0, &none, &by_label);
    let w = &report.workloads[0];
    assert_eq!(w.governance, Some(Change::Unknown));
    assert!(
        w.now.unknown.as_deref().unwrap().contains("app=web"),
        "{w:#?}"
    );
    assert_eq!(w.changes[0].now.verdict, Effect::Unknown);
    assert!(render(&report).contains("labels of pod"));
    // A log written under a current file whose `pods:` policy with that
    // label governed the pod shows the label.
    let current = side(
        "current",
        "policies:\n  - {name: learned, pods: {labels: {app: web}}, mode: audit, bind: []}\n",
    );
    let report = replay(&recs, 0, &current, &by_label);
    let w = &report.workloads[0];
    assert_eq!(w.governance, Some(Change::PolicyChanged));
    assert_eq!(w.now.policy.as_deref(), Some("web"));
    assert_eq!(w.changes[0].change, Change::NewlyDenied);
}
