//! /metrics, scraped with a real HTTP client: the kernel's decision
//! counters move by exactly the decisions made, per policy, hook and
//! verdict; reloads, governed cgroups and map occupancy follow the agent;
//! a policy that takes over a removed policy's slot starts from zero.

use portguard_tests::{Agent, Cgroup, Probe, require_root};

/// Scrape /metrics; (metric line without value, value) pairs.
pub(crate) fn scrape(agent: &Agent) -> Vec<(String, f64)> {
    let url = format!("http://127.0.0.1:{}/metrics", agent.metrics_port());
    let mut resp = ureq::get(&url).call().expect("GET /metrics");
    assert_eq!(resp.status(), 200);
    let ctype = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(ctype.starts_with("application/openmetrics-text"), "{ctype}");
    let body = resp.body_mut().read_to_string().unwrap();
    assert!(body.ends_with("# EOF\n"), "{body}");
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_owned(), v.parse().ok()?))
        })
        .collect()
}

pub(crate) fn value(m: &[(String, f64)], key: &str) -> f64 {
    m.iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| *v)
        .unwrap_or_else(|| panic!("no {key} in {m:#?}"))
}

#[test]
fn metrics_follow_real_decisions() {
    require_root!();
    let web = Cgroup::new("mweb");
    let trial = Cgroup::new("mtrial");
    let policy = |extra: &str| {
        format!(
            "policies:\n  - {{name: web, cgroup: {}, bind: [{{ports: [8080]}}]}}\n  - {{name: trial, cgroup: {}, mode: audit, bind: []}}\n{extra}",
            web.rel, trial.rel
        )
    };
    let mut agent = Agent::start(&policy(""));
    let before = scrape(&agent);
    let deny = r#"portguard_decisions_total{policy="web",verdict="deny"}"#;
    let allow = r#"portguard_decisions_total{policy="web",verdict="allow"}"#;
    let audit = r#"portguard_decisions_total{policy="trial",verdict="audit"}"#;
    let hook_deny = r#"portguard_hook_decisions_total{hook="bind4",verdict="deny"}"#;
    assert_eq!(value(&before, deny), 0.0);
    assert_eq!(value(&before, "portguard_policies"), 2.0);
    assert_eq!(value(&before, "portguard_governed_cgroups"), 2.0);
    assert_eq!(
        value(&before, r#"portguard_map_entries{map="policies"}"#),
        2.0
    );
    assert_eq!(
        value(&before, r#"portguard_map_capacity{map="cgroups"}"#),
        16384.0
    );

    // 7 denied, 3 allowed, 2 audited: from several processes and threads.
    let p = Probe::in_cgroup(&web);
    for i in 0..7 {
        let p = if i % 2 == 0 {
            p.clone()
        } else {
            p.clone().thread()
        };
        p.run(&["bind", "tcp", "127.0.0.1", "9999"]).assert_eperm();
    }
    for _ in 0..3 {
        p.run(&["bind", "tcp", "127.0.0.1", "8080"]).assert_ok();
    }
    for _ in 0..2 {
        Probe::in_cgroup(&trial)
            .run(&["bind", "tcp", "127.0.0.1", "7000"])
            .assert_ok();
    }
    let after = scrape(&agent);
    let delta = |k: &str| value(&after, k) - value(&before, k);
    assert_eq!(delta(deny), 7.0);
    assert_eq!(delta(allow), 3.0);
    assert_eq!(delta(audit), 2.0);
    assert_eq!(delta(hook_deny), 7.0);
    assert!(value(&after, "portguard_events_written_total") >= 9.0);

    // Reloads: one applied, one rejected.
    agent.reload(&policy(
        "  - {name: extra, cgroup: /pgtest-none-at-all, bind: []}\n",
    ));
    agent.reload("policies: [oops\n");
    let m = scrape(&agent);
    assert_eq!(
        value(&m, r#"portguard_policy_reloads_total{result="ok"}"#),
        1.0
    );
    assert_eq!(
        value(&m, r#"portguard_policy_reloads_total{result="failed"}"#),
        1.0
    );
    assert_eq!(value(&m, "portguard_policies"), 3.0);

    // `web` removed, `web2` added on the same cgroup: it takes the freed
    // record slot, but its counters start at zero.
    agent.reload(&format!(
        "policies:\n  - {{name: web2, cgroup: {}, bind: [{{ports: [8080]}}]}}\n  - {{name: trial, cgroup: {}, mode: audit, bind: []}}\n",
        web.rel, trial.rel
    ));
    let m = scrape(&agent);
    assert!(!m.iter().any(|(k, _)| k.contains(r#"policy="web""#)));
    assert_eq!(
        value(
            &m,
            r#"portguard_decisions_total{policy="web2",verdict="deny"}"#
        ),
        0.0
    );
    p.run(&["bind", "tcp", "127.0.0.1", "9999"]).assert_eperm();
    let m = scrape(&agent);
    assert_eq!(
        value(
            &m,
            r#"portguard_decisions_total{policy="web2",verdict="deny"}"#
        ),
        1.0
    );
}
