//! `portguard run --program-stats`: the kernel's run statistics of the
//! agent's own programs move with real binds, on every attach point of a
//! program, in /metrics and in `status`; without the flag they are absent.
//! And the Grafana dashboard (deploy/grafana/portguard.json) asks only for
//! metrics a live agent exports: each PromQL expression is parsed and each
//! metric name it selects is looked up in a real scrape.

use std::collections::BTreeSet;

use portguard_tests::{Agent, Cgroup, Probe, portguard, require_root};
use promql_parser::parser::{self, Expr};
use serde_json::Value;

use crate::metrics::{scrape, value};

const RUNS: &str = r#"portguard_program_runs_total{program="bind4"}"#;
const SECONDS: &str = r#"portguard_program_run_seconds_total{program="bind4"}"#;

/// A policy allowing port 8080 to each cgroup of `cgroups` (named p0, p1...).
fn policy(cgroups: &[&Cgroup]) -> String {
    let mut s = "policies:\n".to_owned();
    for (i, c) in cgroups.iter().enumerate() {
        s += &format!(
            "  - {{name: p{i}, cgroup: {}, bind: [{{ports: [8080]}}]}}\n",
            c.rel
        );
    }
    s
}

/// `n` binds in `cg`: every other one denied.
fn binds(cg: &Cgroup, n: usize) {
    let p = Probe::in_cgroup(cg);
    for i in 0..n {
        if i % 2 == 0 {
            p.run(&["bind", "tcp", "127.0.0.1", "9999"]).assert_eperm();
        } else {
            p.run(&["bind", "tcp", "127.0.0.1", "8080"]).assert_ok();
        }
    }
}

fn status_json(agent: &Agent) -> Value {
    let sock = agent.status_socket().display().to_string();
    let (code, out, err) = portguard(&["status", "--socket", &sock, "--json"]);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).unwrap()
}

fn status_text(agent: &Agent) -> String {
    let sock = agent.status_socket().display().to_string();
    let (code, out, err) = portguard(&["status", "--socket", &sock]);
    assert_eq!(code, 0, "{err}");
    out
}

#[test]
fn program_stats_move_with_real_binds_on_every_attach_point() {
    require_root!();
    // Two governed cgroups under two parents: the decision programs have
    // two attach points, one program each.
    let a = Cgroup::new("pstats-a");
    let b = Cgroup::new("pstats-b");
    let (a1, b1) = (a.child("w"), b.child("w"));
    let agent = Agent::start_with(&policy(&[&a1, &b1]), &["--program-stats"]);
    let doc = status_json(&agent);
    assert_eq!(
        doc["attach_points"].as_array().map(Vec::len),
        Some(2),
        "{doc:#}"
    );

    let m0 = scrape(&agent);
    for program in ["bind4", "bind6", "post_bind4", "connect4", "sock_create"] {
        let k = format!(r#"portguard_program_runs_total{{program="{program}"}}"#);
        assert!(m0.iter().any(|(n, _)| *n == k), "no {k} in {m0:#?}");
    }
    binds(&a1, 4);
    let m1 = scrape(&agent);
    assert!(
        value(&m1, RUNS) - value(&m0, RUNS) >= 4.0,
        "{} -> {}",
        value(&m0, RUNS),
        value(&m1, RUNS)
    );
    assert!(value(&m1, SECONDS) > value(&m0, SECONDS));
    // The other attach point's runs land in the same program's counters.
    binds(&b1, 6);
    let m2 = scrape(&agent);
    assert!(
        value(&m2, RUNS) - value(&m1, RUNS) >= 6.0,
        "{} -> {}",
        value(&m1, RUNS),
        value(&m2, RUNS)
    );
    assert!(value(&m2, SECONDS) > value(&m1, SECONDS));

    // status: the same numbers, with the mean cost of a run.
    let doc = status_json(&agent);
    let stats = &doc["program_stats"];
    let bind4 = stats["programs"]
        .as_array()
        .and_then(|a| a.iter().find(|p| p["program"] == "bind4"))
        .unwrap_or_else(|| panic!("{stats:#}"));
    let runs = bind4["runs"].as_u64().unwrap();
    let ns = bind4["run_ns"].as_u64().unwrap();
    assert!(runs as f64 >= value(&m2, RUNS), "{bind4}");
    assert!(ns > 0 && bind4["id"].as_u64().unwrap() > 0, "{bind4}");
    let mean = bind4["ns_per_run"].as_f64().unwrap();
    assert!((mean - ns as f64 / runs as f64).abs() < 1e-6, "{bind4}");
    assert!(stats["runs"].as_u64().unwrap() >= runs, "{stats:#}");
    let text = status_text(&agent);
    assert!(text.contains("program cost (--program-stats): "), "{text}");
    assert!(
        text.lines().any(|l| l.starts_with("bind4 ")
            && [" ns", " us", " ms"]
                .iter()
                .any(|u| l.trim_end().ends_with(u))),
        "{text}"
    );
}

#[test]
fn program_stats_are_absent_without_the_flag() {
    require_root!();
    let a = Cgroup::new("pstats-off");
    let agent = Agent::start(&policy(&[&a]));
    binds(&a, 2);
    let m = scrape(&agent);
    let program: Vec<_> = m
        .iter()
        .filter(|(k, _)| k.starts_with("portguard_program_"))
        .collect();
    assert!(program.is_empty(), "{program:#?}");
    assert!(!agent.metrics_text().contains("portguard_program_"));
    let doc = status_json(&agent);
    assert!(doc["program_stats"].is_null(), "{doc:#}");
    assert!(!status_text(&agent).contains("program cost"));
}

/// Every PromQL expression of the dashboard: panel targets and the
/// templating queries (Grafana's `label_values(EXPR, label)`), with the
/// dashboard variables given values PromQL accepts.
fn dashboard_queries() -> Vec<String> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/grafana/portguard.json"
    );
    let dash: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut out = Vec::new();
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push(t["expr"].as_str().unwrap().to_owned());
        }
    }
    for v in dash["templating"]["list"].as_array().unwrap() {
        let Some(q) = v["query"]["query"].as_str() else {
            continue;
        };
        let inner = q
            .strip_prefix("label_values(")
            .and_then(|r| r.strip_suffix(')'))
            .and_then(|r| r.rsplit_once(','))
            .map(|(e, _label)| e.trim().to_owned())
            .unwrap_or_else(|| panic!("unexpected variable query {q}"));
        out.push(inner);
    }
    out.into_iter()
        .map(|q| {
            q.replace("$__rate_interval", "5m")
                .replace("$__range", "1h")
                .replace("$instance", ".*")
                .replace("$policy", ".*")
        })
        .collect()
}

/// The metric names `e` selects.
fn metric_names(e: &Expr, names: &mut BTreeSet<String>) {
    match e {
        Expr::VectorSelector(vs) => {
            let name = vs
                .name
                .clone()
                .unwrap_or_else(|| panic!("selector without a name: {vs:?}"));
            names.insert(name);
        }
        Expr::MatrixSelector(ms) => metric_names(&Expr::VectorSelector(ms.vs.clone()), names),
        Expr::Aggregate(a) => {
            metric_names(&a.expr, names);
            if let Some(p) = &a.param {
                metric_names(p, names);
            }
        }
        Expr::Unary(u) => metric_names(&u.expr, names),
        Expr::Binary(b) => {
            metric_names(&b.lhs, names);
            metric_names(&b.rhs, names);
        }
        Expr::Paren(p) => metric_names(&p.expr, names),
        Expr::Subquery(s) => metric_names(&s.expr, names),
        Expr::Call(c) => {
            for a in &c.args.args {
                metric_names(a, names);
            }
        }
        Expr::NumberLiteral(_) | Expr::StringLiteral(_) | Expr::Extension(_) => {}
    }
}

#[test]
fn program_stats_dashboard_asks_only_for_exported_metrics() {
    require_root!();
    let mut used = BTreeSet::new();
    for q in dashboard_queries() {
        let e = parser::parse(&q).unwrap_or_else(|err| panic!("{q}: {err}"));
        let mut names = BTreeSet::new();
        metric_names(&e, &mut names);
        assert!(!names.is_empty(), "no metric in {q}");
        used.extend(names);
    }
    assert!(used.contains("portguard_program_runs_total"), "{used:?}");
    assert!(used.len() >= 20, "{used:?}");

    let a = Cgroup::new("pstats-dash");
    let agent = Agent::start_with(&policy(&[&a]), &["--program-stats"]);
    binds(&a, 2);
    // Exported: a sample's name, or a family the scrape declares without
    // a series yet (`# TYPE portguard_runtime_hook_failures counter` before
    // any failure; OpenMetrics names a counter's samples NAME_total).
    let text = agent.metrics_text();
    let mut exported: BTreeSet<String> = scrape(&agent)
        .into_iter()
        .map(|(k, _)| k.split('{').next().unwrap().to_owned())
        .collect();
    for l in text.lines() {
        if let Some(decl) = l.strip_prefix("# TYPE ")
            && let Some((name, kind)) = decl.split_once(' ')
        {
            exported.insert(match kind {
                "counter" => format!("{name}_total"),
                _ => name.to_owned(),
            });
        }
    }
    let missing: Vec<_> = used.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "the dashboard asks for metrics the agent does not export: {missing:?}\nexported: {exported:#?}"
    );
}
