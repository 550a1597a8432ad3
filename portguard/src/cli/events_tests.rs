//! Unit tests of `portguard events`: filters, summary, tables, and the
//! conversion of lines to OCSF and ECS.

use super::*;

fn ev(verdict: &str, pod: &str, port: u16, time: &str, count: u64) -> Value {
    json!({"schema_version": 1, "time": time, "verdict": verdict, "policy": "web",
           "k8s_namespace": "payments", "k8s_pod": pod, "container_name": "server",
           "protocol": "tcp", "address": "0.0.0.0", "port": port, "count": count,
           "rule": "bind"})
}

#[test]
fn filters_by_every_field_and_time() {
    let t = |s: &str| humantime::parse_rfc3339_weak(s).unwrap();
    let e = ev("deny", "web-0", 8081, "2026-11-22T01:00:00Z", 1);
    assert!(Filter::default().matches(&e));
    assert!(!Filter::default().matches(&json!({"lost": 3})));
    let f = |f: Filter| f.matches(&e);
    assert!(f(Filter {
        port: Some(8081),
        ..Default::default()
    }));
    assert!(!f(Filter {
        port: Some(80),
        ..Default::default()
    }));
    assert!(f(Filter {
        pod: Some("web-0".into()),
        ..Default::default()
    }));
    assert!(!f(Filter {
        namespace: Some("x".into()),
        ..Default::default()
    }));
    assert!(!f(Filter {
        verdict: Some("audit".into()),
        ..Default::default()
    }));
    assert!(!f(Filter {
        policy: Some("db".into()),
        ..Default::default()
    }));
    assert!(!f(Filter {
        unit: Some("nginx.service".into()),
        ..Default::default()
    }));
    assert!(f(Filter {
        since: Some(t("2026-11-22T00:59:00Z")),
        ..Default::default()
    }));
    assert!(!f(Filter {
        since: Some(t("2026-11-22T01:01:00Z")),
        ..Default::default()
    }));
    assert!(!f(Filter {
        until: Some(t("2026-11-22T00:59:00Z")),
        ..Default::default()
    }));
    // An aggregate spanning 01:00..01:10 overlaps a 01:05.. window.
    let mut agg = ev("deny", "web-0", 8081, "2026-11-22T01:00:00Z", 50);
    agg["first_seen"] = json!("2026-11-22T01:00:00Z");
    agg["last_seen"] = json!("2026-11-22T01:10:00Z");
    assert!(
        Filter {
            since: Some(t("2026-11-22T01:05:00Z")),
            ..Default::default()
        }
        .matches(&agg)
    );
}

#[test]
fn summary_sums_counts_per_workload_and_port() {
    let events = [
        ev("deny", "web-0", 8081, "2026-11-22T01:00:00Z", 1),
        ev("deny", "web-0", 8081, "2026-11-22T01:00:10Z", 99),
        ev("deny", "web-1", 8081, "2026-11-22T01:00:05Z", 7),
        ev("deny", "web-0", 9090, "2026-11-22T01:00:01Z", 1),
    ];
    let rows = summarize(&events, 2);
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].workload, "payments/web-0/server");
    assert_eq!((rows[0].port, rows[0].count), (8081, 100));
    assert_eq!(rows[0].first_seen, "2026-11-22T01:00:00Z");
    assert_eq!(rows[0].last_seen, "2026-11-22T01:00:10Z");
    assert_eq!(
        (rows[1].workload.as_str(), rows[1].count),
        ("payments/web-1/server", 7)
    );
    let text = render_summary(&rows);
    assert!(text.lines().nth(1).unwrap().starts_with("100  "), "{text}");
    let table = render_table(&events);
    assert!(table.contains("0.0.0.0:8081"), "{table}");
    assert_eq!(table.lines().count(), 5);
}

#[test]
fn workloads_are_named_by_pod_unit_or_cgroup() {
    assert_eq!(
        workload(&json!({"unit": "nginx.service", "cgroup": "/x"})),
        "nginx.service"
    );
    assert_eq!(workload(&json!({"cgroup": "/x"})), "/x");
    assert_eq!(
        workload(&json!({"k8s_namespace": "a", "k8s_pod": "p"})),
        "a/p"
    );
}

#[test]
fn hostile_names_are_escaped_in_tables() {
    let hostile = json!({"time": "t", "verdict": "deny", "policy": "p",
        "cgroup": "/tenants/a\u{1b}[2J\nb\tc\u{85}", "unit": null,
        "protocol": "tcp", "address": "127.0.0.1", "port": 8, "count": 1, "rule": "bind"});
    let table = render_table(std::slice::from_ref(&hostile));
    let summary = render_summary(&summarize(std::slice::from_ref(&hostile), 10));
    // The tab in the name does not make a column of its own.
    assert_eq!(table_row(&hostile).split('\t').count(), 8);
    for text in [&table, &summary] {
        assert!(
            !text
                .chars()
                .any(|c| c == '\x1b' || c == '\u{85}' || c == '\t'),
            "{text:?}"
        );
        assert!(
            text.contains(r"/tenants/a\x1b[2J\nb\tc\u{0085}"),
            "{text:?}"
        );
    }
    // One header and one row: the newline forged no line.
    assert_eq!(table.lines().count(), 2, "{table:?}");
    assert_eq!(summary.lines().count(), 2, "{summary:?}");
}

/// `--format ocsf|ecs` converts the lines of a JSON log: a decision,
/// a hook failure, a loss report; other lines are not converted.
#[test]
fn json_lines_convert_to_ocsf_and_ecs() {
    let line = json!({"schema_version":1,"time":"2026-11-22T02:41:07.093321594Z","host":"node-7",
        "verdict":"deny","hook":"bind4","policy":"payments-web","rule":"bind[1].address",
        "cgroup":"/kubepods/besteffort/pod2f0e/9b2a","cgroup_id":73321,"pid":48213,"tid":48213,
        "uid":0,"gid":0,"comm":"server","family":"ipv4","protocol":"tcp","address":"0.0.0.0",
        "port":9090,"policy_cgroup":"/kubepods/besteffort/pod2f0e","policy_cgroup_id":73318,
        "k8s_namespace":"payments","k8s_pod":"web-0","container_name":"server",
        "container_id":"9b2a","identity_source":"cri","count":1});
    let o = convert(&line, Format::Ocsf).unwrap();
    assert_eq!(
        (&o["class_uid"], &o["activity_id"]),
        (&json!(4001), &json!(7))
    );
    assert_eq!(o["firewall_rule"]["name"], "payments-web");
    assert_eq!(o["unmapped"]["k8s_pod"], "web-0");
    assert_eq!(o["actor"]["process"]["container"]["name"], "server");
    let e = convert(&line, Format::Ecs).unwrap();
    assert_eq!(e["portguard"], line);
    assert_eq!(e["orchestrator"]["resource"]["name"], "web-0");
    assert_eq!(convert(&line, Format::Json).unwrap(), line);
    let hook = json!({"schema_version":1,"time":"2026-12-01T17:08:32.947453286Z","host":"node-7",
        "verdict":"hook_failed","hook":"oci","action":"allowed_start","reason":"timeout",
        "on_failure":"open","cgroup":"/x","cgroup_id":7,"container_id":"9b2a"});
    assert_eq!(convert(&hook, Format::Ocsf).unwrap()["class_uid"], 6002);
    let lost = json!({"schema_version":1,"time":"2026-11-22T02:41:08.000114Z","host":"node-7",
        "lost":412,"lost_total":412});
    assert_eq!(convert(&lost, Format::Ocsf).unwrap()["count"], 412);
    assert!(convert(&json!({"msg": "agent log line"}), Format::Ocsf).is_none());
    assert_eq!(
        render_one(&line, EventsFormat::Ocsf).map(|l| l.contains("\"class_uid\":4001")),
        Some(true)
    );
}
