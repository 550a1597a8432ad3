//! PolicyReports from a real agent's event log: pods run by a private
//! containerd (so the events carry the namespace, pod and container the
//! runtime names), real denials and audits, then `portguard report
//! --policy-report --log <the agent's log>`; the objects are compared
//! whole and validated against the PolicyReport CRD's schema
//! (tests/fixtures/policyreport-v1alpha2.schema.json). The same agent runs
//! with `--policy-reports=10s` against a stand-in API server
//! ([`FakeApiServer`]: no API server can run here) through a kubeconfig:
//! its server-side applies must have the right path, query and content
//! type, be valid, count the same decisions as the log, and clear each
//! namespace once it is quiet.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use portguard_tests::{
    Agent, ApiRequest, Cgroup, FakeApiServer, Probe,
    containerd::{Containerd, unavailable},
    json_schema_errors, portguard, probe_bin, require_root,
};
use serde_json::{Value, json};

/// The PolicyReport schema, transcribed from the published CRD.
fn schema_path() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/policyreport-v1alpha2.schema.json")
}

#[expect(
    clippy::too_many_arguments,
    reason = "one expected result, field by field"
)]
fn result(
    ns: &str,
    pod: &str,
    uid: &str,
    policy: &str,
    rule: &Value,
    result: &str,
    message: &str,
    count: u64,
    ports: &str,
    times: (&Value, &Value),
    host: &str,
) -> Value {
    let secs = |t: &Value| {
        let t = humantime::parse_rfc3339_weak(t.as_str().unwrap()).unwrap();
        let d = t.duration_since(std::time::UNIX_EPOCH).unwrap();
        json!({"seconds": d.as_secs(), "nanos": d.subsec_nanos()})
    };
    json!({
        "source": "portguard", "policy": policy, "rule": rule, "result": result,
        "scored": true, "category": "Port policy", "message": message,
        "resources": [{"apiVersion": "v1", "kind": "Pod", "namespace": ns,
                       "name": pod, "uid": uid}],
        "properties": {"container": "server", "count": count.to_string(), "ports": ports,
                       "firstSeen": times.0, "lastSeen": times.1, "node": host},
        "timestamp": secs(times.1),
    })
}

fn report(ns: &str, name: &str, host: &str, fail: u64, warn: u64, results: Vec<Value>) -> Value {
    json!({
        "apiVersion": "wgpolicyk8s.io/v1alpha2",
        "kind": "PolicyReport",
        "metadata": {
            "name": name, "namespace": ns,
            "labels": {"app.kubernetes.io/managed-by": "portguard", "portguard.dev/node": host},
            "annotations": {"portguard.dev/window-start": "2000-01-01T00:00:00Z",
                            "portguard.dev/window-end": "2100-01-01T00:00:00Z"},
        },
        "summary": {"pass": 0, "fail": fail, "warn": warn, "error": 0, "skip": 0},
        "results": results,
    })
}

#[test]
fn policy_reports_summarise_a_real_agents_denials_and_audits() {
    require_root!();
    if let Some(why) = unavailable() {
        panic!("the PolicyReport test needs containerd here: {why}");
    }
    let mut ctrd = Containerd::start(&probe_bin());
    let (web_sb, web_uid, _) = ctrd.run_pod("payments", "web-0", &[("app", "web")]);
    let web = ctrd.run_container(&web_sb, "server");
    let (canary_sb, canary_uid, _) = ctrd.run_pod("payments", "canary-0", &[("app", "canary")]);
    let canary = ctrd.run_container(&canary_sb, "server");
    let (cart_sb, cart_uid, _) = ctrd.run_pod("shop", "cart-0", &[("app", "cart")]);
    let cart = ctrd.run_container(&cart_sb, "server");
    // A host cgroup: its decisions have no namespace to be reported in.
    let host_cg = Cgroup::new("preports");
    // The agent writes its reports every 10 s to a stand-in API server.
    let api = FakeApiServer::start();
    let agent = Agent::start_wrapped(
        &format!(
            "policies:\n\
             - {{name: web, pods: {{namespace: payments, labels: {{app: web}}}}, bind: [{{ports: [8080]}}]}}\n\
             - {{name: canary, pods: {{namespace: payments, labels: {{app: canary}}}}, mode: audit, bind: [{{ports: [8080]}}]}}\n\
             - {{name: cart, pods: {{namespace: shop, labels: {{app: cart}}}}, bind: [{{ports: [8080]}}]}}\n\
             - {{name: host, cgroup: {}, bind: [{{ports: [8080]}}]}}\n",
            host_cg.rel
        ),
        // Every decision its own line: the counts below are the probes'.
        &[
            "--cri-socket",
            &ctrd.socket.display().to_string(),
            "--aggregate-window",
            "0",
            "--policy-reports=10s",
        ],
        &[
            "env".to_owned(),
            format!("KUBECONFIG={}", api.kubeconfig.path().display()),
        ],
    );

    // web-0: two denials on one port, one on another.
    for (proto, port) in [("tcp", "8081"), ("tcp", "8081"), ("udp", "9999")] {
        let r = ctrd.probe(&web, &["bind", proto, "127.0.0.1", port]);
        assert_eq!(r["error"], "EPERM", "{r}");
    }
    // canary-0 (audit): allowed, reported.
    let r = ctrd.probe(&canary, &["bind", "tcp", "127.0.0.1", "8082"]);
    assert_eq!(r["ok"], true, "{r}");
    // cart-0, in another namespace.
    let r = ctrd.probe(&cart, &["bind", "tcp", "127.0.0.1", "8083"]);
    assert_eq!(r["error"], "EPERM", "{r}");
    // The host cgroup.
    Probe::in_cgroup(&host_cg)
        .run(&["bind", "tcp", "127.0.0.1", "8084"])
        .assert_eperm();

    // The log has them all (wait for each before reading the log).
    let mut web_events = Vec::new();
    while web_events.len() < 3 {
        agent.wait_event(&[("k8s_pod", json!("web-0")), ("port", json!(9999))]);
        web_events = agent
            .events()
            .into_iter()
            .filter(|e| e["k8s_pod"] == "web-0")
            .collect();
    }
    assert_eq!(web_events.len(), 3, "{web_events:#?}");
    let canary_e = agent.wait_event(&[("k8s_pod", json!("canary-0")), ("port", json!(8082))]);
    assert_eq!(canary_e["verdict"], "audit");
    let cart_e = agent.wait_event(&[("k8s_pod", json!("cart-0")), ("port", json!(8083))]);
    agent.wait_event(&[("policy", json!("host")), ("port", json!(8084))]);
    let host = web_events[0]["host"].as_str().unwrap().to_owned();
    let name = portguard::report::report_name(&host);

    let log = agent.log.display().to_string();
    let (code, out, err) = portguard(&[
        "report",
        "--policy-report",
        "--log",
        &log,
        "--since",
        "2000-01-01T00:00:00Z",
        "--until",
        "2100-01-01T00:00:00Z",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("1 decisions had no Kubernetes namespace"),
        "the host cgroup's denial is counted apart: {err}"
    );
    let list: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(list["apiVersion"], "v1");
    assert_eq!(list["kind"], "List");
    let items = list["items"].as_array().unwrap();

    // Each bind denial is judged by the same part of its policy.
    let web_rule = &web_events[0]["rule"];
    let (web_tcp, web_udp): (Vec<&Value>, Vec<&Value>) =
        web_events.iter().partition(|e| e["protocol"] == "tcp");
    assert!(web_events.iter().all(|e| e["rule"] == *web_rule));
    assert_eq!((web_tcp.len(), web_udp.len()), (2, 1));
    let web_times = (&web_events[0]["time"], &web_events[2]["time"]);
    let expected = vec![
        report(
            "payments",
            &name,
            &host,
            1,
            1,
            vec![
                result(
                    "payments",
                    "canary-0",
                    &canary_uid,
                    "canary",
                    &canary_e["rule"],
                    "warn",
                    &format!(
                        "Container server would be denied (audit) 1 time by policy canary (rule {}): tcp/8082",
                        canary_e["rule"].as_str().unwrap()
                    ),
                    1,
                    "tcp/8082",
                    (&canary_e["time"], &canary_e["time"]),
                    &host,
                ),
                result(
                    "payments",
                    "web-0",
                    &web_uid,
                    "web",
                    web_rule,
                    "fail",
                    &format!(
                        "Container server denied 3 times by policy web (rule {}): tcp/8081,udp/9999",
                        web_rule.as_str().unwrap()
                    ),
                    3,
                    "tcp/8081,udp/9999",
                    web_times,
                    &host,
                ),
            ],
        ),
        report(
            "shop",
            &name,
            &host,
            1,
            0,
            vec![result(
                "shop",
                "cart-0",
                &cart_uid,
                "cart",
                &cart_e["rule"],
                "fail",
                &format!(
                    "Container server denied 1 time by policy cart (rule {}): tcp/8083",
                    cart_e["rule"].as_str().unwrap()
                ),
                1,
                "tcp/8083",
                (&cart_e["time"], &cart_e["time"]),
                &host,
            )],
        ),
    ];
    assert_eq!(*items, expected, "{out}");

    // Valid against the CRD's schema (unknown fields, which the API server
    // would prune, are errors too).
    let errors = json_schema_errors(&schema_path(), items);
    assert!(errors.is_empty(), "{errors:#?}");

    // The agent's own reports, written each window by server-side apply:
    // wherever the windows fell, they count the same decisions, and a
    // namespace quiet for a window is cleared with an empty report.
    let want = totals(items.iter());
    let deadline = Instant::now() + Duration::from_secs(90);
    let requests = loop {
        let requests = api.requests();
        let mut last: BTreeMap<&str, &ApiRequest> = BTreeMap::new();
        for r in &requests {
            last.insert(r.body["metadata"]["namespace"].as_str().unwrap_or("?"), r);
        }
        let cleared = ["payments", "shop"].iter().all(|ns| {
            last.get(ns)
                .is_some_and(|r| r.body["results"].as_array().is_some_and(Vec::is_empty))
        });
        if cleared && totals(requests.iter().map(|r| &r.body)) == want {
            break requests;
        }
        assert!(
            Instant::now() < deadline,
            "the agent's reports: {requests:#?}\n--- agent stderr ---\n{}",
            agent.stderr()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    for r in &requests {
        let ns = r.body["metadata"]["namespace"].as_str().unwrap();
        assert_eq!(r.method, "PATCH");
        assert_eq!(
            r.target,
            format!(
                "/apis/wgpolicyk8s.io/v1alpha2/namespaces/{ns}/policyreports/{name}?&force=true&fieldManager=portguard"
            )
        );
        assert_eq!(r.content_type, "application/apply-patch+yaml");
        assert_eq!(r.body["metadata"]["name"], name.as_str());
    }
    let bodies: Vec<Value> = requests.iter().map(|r| r.body.clone()).collect();
    let errors = json_schema_errors(&schema_path(), &bodies);
    assert!(errors.is_empty(), "{errors:#?}");
}

/// Decisions per (namespace, pod, policy, result) in reports.
fn totals<'a>(
    reports: impl Iterator<Item = &'a Value>,
) -> BTreeMap<(String, String, String, String), u64> {
    let mut t = BTreeMap::new();
    for r in reports {
        for res in r["results"].as_array().into_iter().flatten() {
            let key = (
                r["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or("?")
                    .to_owned(),
                res["resources"][0]["name"]
                    .as_str()
                    .unwrap_or("?")
                    .to_owned(),
                res["policy"].as_str().unwrap_or("?").to_owned(),
                res["result"].as_str().unwrap_or("?").to_owned(),
            );
            *t.entry(key).or_default() += res["properties"]["count"]
                .as_str()
                .and_then(|c| c.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    t
}

#[test]
fn the_policy_report_schema_catches_what_the_api_server_would_refuse_or_prune() {
    // The schema itself is the test's judge: it must refuse a bad result,
    // a summary that is not a count, and an unknown field.
    let good = json!({
        "apiVersion": "wgpolicyk8s.io/v1alpha2", "kind": "PolicyReport",
        "metadata": {"name": "portguard-n", "namespace": "ns"},
        "summary": {"pass": 0, "fail": 1, "warn": 0, "error": 0, "skip": 0},
        "results": [{"policy": "p", "result": "fail", "source": "portguard",
                     "timestamp": {"seconds": 1, "nanos": 0}}],
    });
    assert_eq!(
        json_schema_errors(&schema_path(), std::slice::from_ref(&good)),
        Vec::<String>::new()
    );
    let mut bad_result = good.clone();
    bad_result["results"][0]["result"] = json!("deny");
    let mut bad_summary = good.clone();
    bad_summary["summary"]["fail"] = json!("1");
    let mut unknown = good.clone();
    unknown["results"][0]["count"] = json!(3);
    let mut no_policy = good.clone();
    no_policy["results"][0]
        .as_object_mut()
        .unwrap()
        .remove("policy");
    let mut no_nanos = good;
    no_nanos["results"][0]["timestamp"] = json!({"seconds": 1});
    for bad in [bad_result, bad_summary, unknown, no_policy, no_nanos] {
        assert_eq!(
            json_schema_errors(&schema_path(), std::slice::from_ref(&bad)).len(),
            1,
            "{bad}"
        );
    }
}
