use serde_json::json;

use super::*;

const WINDOW: (&str, &str) = ("2026-11-22T00:00:00Z", "2026-11-22T01:00:00Z");

fn ev(verdict: &str, ns: &str, pod: &str, port: u16, time: &str, count: u64) -> Value {
    json!({"schema_version": 1, "time": time, "host": "node1", "verdict": verdict,
           "hook": "bind4", "policy": "web", "rule": "bind", "k8s_namespace": ns,
           "k8s_pod": pod, "k8s_pod_uid": format!("uid-{pod}"), "container_name": "server",
           "protocol": "tcp", "address": "0.0.0.0", "port": port, "count": count})
}

fn tally(events: &[Value]) -> Tally {
    let mut t = Tally::default();
    for e in events {
        if let Some(d) = Decision::of_json(e) {
            t.add(d);
        }
    }
    t
}

#[test]
fn denials_and_audits_become_fail_and_warn_results_per_pod_and_policy() {
    let mut aggregate = ev("deny", "payments", "web-0", 8081, "2026-11-22T00:10:00Z", 5);
    aggregate["first_seen"] = json!("2026-11-22T00:09:00Z");
    aggregate["last_seen"] = json!("2026-11-22T00:12:00Z");
    let t = tally(&[
        ev("deny", "payments", "web-0", 8081, "2026-11-22T00:10:00Z", 1),
        aggregate,
        ev("deny", "payments", "web-0", 9090, "2026-11-22T00:11:00Z", 1),
        ev(
            "audit",
            "payments",
            "web-0",
            7000,
            "2026-11-22T00:20:00Z",
            2,
        ),
        ev("deny", "shop", "cart-0", 8081, "2026-11-22T00:30:00Z", 1),
        // Not decisions a report holds.
        ev(
            "preexisting",
            "payments",
            "web-0",
            8081,
            "2026-11-22T00:30:00Z",
            1,
        ),
        json!({"lost": 3, "time": "2026-11-22T00:30:00Z"}),
    ]);
    let reports = t.reports(WINDOW);
    assert_eq!(reports.len(), 2);
    let payments = serde_json::to_value(&reports[0]).unwrap();
    assert_eq!(
        payments,
        json!({
            "apiVersion": "wgpolicyk8s.io/v1alpha2",
            "kind": "PolicyReport",
            "metadata": {
                "name": "portguard-node1",
                "namespace": "payments",
                "labels": {"app.kubernetes.io/managed-by": "portguard",
                           "portguard.dev/node": "node1"},
                "annotations": {"portguard.dev/window-start": "2026-11-22T00:00:00Z",
                                "portguard.dev/window-end": "2026-11-22T01:00:00Z"},
            },
            "summary": {"pass": 0, "fail": 1, "warn": 1, "error": 0, "skip": 0},
            "results": [
                {
                    "source": "portguard", "policy": "web", "rule": "bind", "result": "fail",
                    "scored": true, "category": "Port policy",
                    "message": "Container server denied 7 times by policy web (rule bind): tcp/8081,tcp/9090",
                    "resources": [{"apiVersion": "v1", "kind": "Pod", "namespace": "payments",
                                   "name": "web-0", "uid": "uid-web-0"}],
                    "properties": {"container": "server", "count": "7",
                                   "firstSeen": "2026-11-22T00:09:00Z",
                                   "lastSeen": "2026-11-22T00:12:00Z",
                                   "node": "node1", "ports": "tcp/8081,tcp/9090"},
                    "timestamp": {"seconds": 1_795_306_320_i64, "nanos": 0},
                },
                {
                    "source": "portguard", "policy": "web", "rule": "bind", "result": "warn",
                    "scored": true, "category": "Port policy",
                    "message": "Container server would be denied (audit) 2 times by policy web (rule bind): tcp/7000",
                    "resources": [{"apiVersion": "v1", "kind": "Pod", "namespace": "payments",
                                   "name": "web-0", "uid": "uid-web-0"}],
                    "properties": {"container": "server", "count": "2",
                                   "firstSeen": "2026-11-22T00:20:00Z",
                                   "lastSeen": "2026-11-22T00:20:00Z",
                                   "node": "node1", "ports": "tcp/7000"},
                    "timestamp": {"seconds": 1_795_306_800_i64, "nanos": 0},
                },
            ],
        })
    );
    assert_eq!(reports[1].metadata.namespace, "shop");
    assert_eq!(reports[1].summary.fail, 1);
    assert_eq!(t.unplaced, 0);
}

#[test]
fn decisions_without_a_namespace_are_counted_apart() {
    let mut host = ev("deny", "x", "p", 80, "2026-11-22T00:10:00Z", 3);
    host.as_object_mut().unwrap().remove("k8s_namespace");
    let t = tally(&[host]);
    assert!(t.is_empty());
    assert_eq!(t.unplaced, 3);
}

#[test]
fn each_node_writes_its_own_report() {
    let mut other = ev("deny", "payments", "web-1", 8081, "2026-11-22T00:10:00Z", 1);
    other["host"] = json!("Node_2.example");
    let t = tally(&[
        ev("deny", "payments", "web-0", 8081, "2026-11-22T00:10:00Z", 1),
        other,
    ]);
    let names: Vec<String> = t
        .reports(WINDOW)
        .iter()
        .map(|r| format!("{}/{}", r.metadata.namespace, r.metadata.name))
        .collect();
    assert_eq!(
        names,
        [
            "payments/portguard-node-2.example",
            "payments/portguard-node1"
        ]
    );
    assert_eq!(report_name(""), "portguard");
    assert_eq!(report_name("-.-"), "portguard");
    assert!(report_name(&"n".repeat(300)).len() <= 253);
}

#[test]
fn a_report_keeps_the_most_frequent_results_and_says_how_many_it_left_out() {
    let events: Vec<Value> = (0..MAX_RESULTS + 3)
        .map(|i| {
            // Pod i made i+1 decisions.
            ev(
                "deny",
                "payments",
                &format!("web-{i:05}"),
                8081,
                "2026-11-22T00:10:00Z",
                i as u64 + 1,
            )
        })
        .collect();
    let r = &tally(&events).reports(WINDOW)[0];
    assert_eq!(r.results.len(), MAX_RESULTS);
    assert_eq!(r.summary.fail, MAX_RESULTS as u64);
    assert_eq!(r.metadata.annotations["portguard.dev/results-omitted"], "3");
    // The three least frequent (pods 0, 1, 2) were left out.
    assert_eq!(r.results[0].resources[0].name.as_deref(), Some("web-00003"));
}

#[test]
fn a_result_lists_its_most_frequent_ports() {
    let events: Vec<Value> = (0..12u16)
        .map(|i| {
            ev(
                "deny",
                "payments",
                "web-0",
                9000 + i,
                "2026-11-22T00:10:00Z",
                u64::from(i) + 1,
            )
        })
        .collect();
    let r = &tally(&events).reports(WINDOW)[0].results[0];
    assert_eq!(
        r.properties["ports"],
        "tcp/9011,tcp/9010,tcp/9009,tcp/9008,tcp/9007,tcp/9006,tcp/9005,tcp/9004,tcp/9003,tcp/9002,+2 more"
    );
    assert_eq!(r.properties["count"], "78");
}

#[test]
fn an_empty_report_clears_a_quiet_namespace() {
    let r = empty_report("payments", "node1", WINDOW);
    assert!(r.results.is_empty());
    assert_eq!(r.summary, Summary::default());
    assert_eq!(r.metadata.name, "portguard-node1");
}

#[test]
fn the_agents_records_count_as_their_json_lines_do() {
    let mut rec = EventRecord::new(
        Verdict::Deny,
        crate::events::EventHook::Kernel(portguard_common::Hook::Bind4),
        "2026-11-22T00:10:00Z".into(),
        "node1",
    );
    rec.policy = Some("web".into());
    rec.rule = Some("bind".into());
    rec.protocol = "tcp".into();
    rec.port = 8081;
    rec.identity.k8s_namespace = Some("payments".into());
    rec.identity.k8s_pod = Some("web-0".into());
    rec.identity.k8s_pod_uid = Some("uid-web-0".into());
    rec.identity.container_name = Some("server".into());
    let line = serde_json::to_value(&rec).unwrap();
    assert_eq!(Decision::of_record(&rec), Decision::of_json(&line));
    assert!(Decision::of_record(&rec).is_some());
    rec.verdict = Verdict::Preexisting;
    assert_eq!(Decision::of_record(&rec), None);
}

#[test]
fn the_tally_stops_opening_results_at_its_bound() {
    let mut t = Tally::default();
    for i in 0..MAX_KEYS + 2 {
        t.add(Decision::of_json(&ev("deny", "ns", &format!("p{i}"), 1, "t", 1)).unwrap());
    }
    assert_eq!(t.overflow, 2);
    // An open result still counts.
    t.add(Decision::of_json(&ev("deny", "ns", "p0", 1, "t", 1)).unwrap());
    assert_eq!(t.overflow, 2);
}
