use super::*;
use crate::policy::parse_policy_str;

const FILE: &str = "\
reserved: [22]
policies:
  - name: web
    cgroup: /web
    bind:
      - {ports: [8080], protocol: tcp}
      - {ports: [9090], address: loopback}
      - {ports: [7000], family: ipv6}
      - {ports: [22]}
    connect:
      - {ports: [5432], protocol: tcp}
  - name: quiet
    cgroup: /quiet
    mode: audit
    bind: []
  - name: open
    unit: open.service
";

fn file() -> PolicyFile {
    parse_policy_str(FILE).unwrap()
}

fn q(op: &str, proto: &str, at: &str) -> Query {
    Query::parse(op, proto, at).unwrap()
}

fn judged(name: &str, query: &Query) -> Judgement {
    judge(&file(), name, query).unwrap()
}

#[test]
fn an_allowed_bind_names_its_rule_and_line() {
    let j = judged("web", &q("bind", "tcp", "0.0.0.0:8080"));
    assert_eq!(j.verdict, Verdict::Allow);
    assert_eq!(
        (j.rule.as_str(), j.rule_lines.as_slice()),
        ("bind[0]", &[6][..])
    );
    assert_eq!(j.fix, None);
    // Unrestricted connects to anything but the list: here restricted.
    let c = judged("web", &q("connect", "tcp", "10.0.0.5:5432"));
    assert_eq!((c.verdict, c.rule.as_str()), (Verdict::Allow, "connect[0]"));
    // No `bind:` at all: unrestricted.
    let o = judged("open", &q("bind", "udp", "0.0.0.0:5353"));
    assert_eq!((o.verdict, o.rule.as_str()), (Verdict::Allow, "bind"));
}

#[test]
fn a_denial_names_the_part_that_decided_and_the_rule_to_add() {
    let j = judged("web", &q("bind", "tcp", "0.0.0.0:8081"));
    assert_eq!((j.verdict, j.rule.as_str()), (Verdict::Deny, "bind"));
    assert_eq!(
        j.fix,
        Some(Fix::AddRule {
            policy: "web".into(),
            direction: "bind",
            rule: "{ports: [8081], protocol: tcp, family: ipv4}".into(),
            after_line: 9,
            list_empty: false,
        })
    );
    // Loopback only: the rule that matched, and a rule for any address.
    let lo = judged("web", &q("bind", "udp", "10.1.2.3:9090"));
    assert_eq!(
        (lo.rule.as_str(), lo.rule_lines.as_slice()),
        ("bind[1].address", &[7][..])
    );
    let Some(Fix::AddRule { rule, .. }) = lo.fix else {
        panic!("{lo:?}")
    };
    assert_eq!(rule, "{ports: [9090], protocol: udp, family: ipv4}");
    // On loopback the same port is allowed.
    assert_eq!(
        judged("web", &q("bind", "udp", "127.0.0.1:9090")).verdict,
        Verdict::Allow
    );
    // A connect to loopback: the suggested rule stays on loopback.
    let c = judged("web", &q("connect", "udp", "127.0.0.1:53"));
    assert_eq!(c.rule, "connect");
    let Some(Fix::AddRule {
        rule, direction, ..
    }) = c.fix
    else {
        panic!("{c:?}")
    };
    assert_eq!(
        (direction, rule.as_str()),
        (
            "connect",
            "{ports: [53], protocol: udp, family: ipv4, address: loopback}"
        )
    );
}

#[test]
fn dual_stack_needs_ipv4_too() {
    let v6 = Query {
        v6only: true,
        ..q("bind", "tcp", "[::]:7000")
    };
    assert_eq!(judged("web", &v6).verdict, Verdict::Allow);
    let dual = judged("web", &q("bind", "tcp", "[::]:7000"));
    assert!(dual.dual_stack);
    assert_eq!(
        (dual.verdict, dual.rule.as_str()),
        (Verdict::Deny, "bind.dual_stack")
    );
    let Some(Fix::AddRule { rule, .. }) = dual.fix else {
        panic!("{dual:?}")
    };
    assert_eq!(rule, "{ports: [7000], protocol: tcp, family: ipv4}");
    // 8080 (any family) covers both at once.
    let both = judged("web", &q("bind", "tcp", "[::]:8080"));
    assert_eq!(
        (both.verdict, both.rule.as_str()),
        (Verdict::Allow, "bind[0]")
    );
}

#[test]
fn a_reserved_port_cannot_be_allowed() {
    let j = judged("web", &q("bind", "tcp", "0.0.0.0:22"));
    assert!(j.reserved);
    assert_eq!((j.verdict, j.rule.as_str()), (Verdict::Deny, "reserved"));
    assert!(
        matches!(&j.fix, Some(Fix::Impossible { reason }) if reason.contains("reserved")),
        "{j:?}"
    );
    // Reserved binds only: a connect to 22 is the connect list's business.
    let c = judged("web", &q("connect", "tcp", "10.0.0.1:22"));
    assert!(!c.reserved);
    // Even a policy without `bind:` loses reserved ports.
    let o = judged("open", &q("bind", "tcp", "0.0.0.0:22"));
    assert_eq!((o.verdict, o.rule.as_str()), (Verdict::Deny, "reserved"));
}

#[test]
fn audit_mode_allows_and_says_what_enforce_would_do() {
    let j = judged("quiet", &q("bind", "tcp", "0.0.0.0:80"));
    assert!(!j.allowed);
    assert_eq!((j.verdict, j.rule.as_str()), (Verdict::Audit, "bind[]"));
    assert!(matches!(
        j.fix,
        Some(Fix::AddRule {
            list_empty: true,
            after_line: 12,
            ..
        })
    ));
}

#[test]
fn port_zero_and_listen_are_judged_as_binds() {
    let j = judged("web", &q("listen", "tcp", "0.0.0.0:0"));
    assert_eq!(j.verdict, Verdict::Deny);
    let Some(Fix::AddRule { rule, .. }) = j.fix else {
        panic!("{j:?}")
    };
    assert_eq!(rule, "{ports: [ephemeral], protocol: tcp, family: ipv4}");
    assert_eq!(
        judged("web", &q("listen", "tcp", "127.0.0.1:8080")).verdict,
        Verdict::Allow
    );
    assert!(Query::parse("listen", "udp", "0.0.0.0:53").is_err());
    assert!(Query::parse("connect", "tcp", "10.0.0.1:0").is_err());
    assert!(Query::parse("bind", "sctp", "0.0.0.0:1").is_err());
    assert!(Query::parse("bind", "tcp", "0.0.0.0").is_err());
    assert!(Query::parse("accept", "tcp", "0.0.0.0:1").is_err());
}

#[test]
fn built_in_stand_ins_and_unknown_policies() {
    let j = judge(
        &file(),
        "portguard:identifying",
        &q("bind", "tcp", "0.0.0.0:80"),
    )
    .unwrap();
    assert!(j.builtin);
    assert_eq!(j.verdict, Verdict::Deny);
    assert!(matches!(j.fix, Some(Fix::Impossible { .. })));
    let fc = judge(
        &file(),
        "portguard:fail-closed:web",
        &q("connect", "tcp", "10.0.0.1:443"),
    )
    .unwrap();
    assert_eq!(
        fc.verdict,
        Verdict::Allow,
        "fail-closed leaves connects alone"
    );
    assert!(judge(&file(), "nope", &q("bind", "tcp", "0.0.0.0:80")).is_err());
}

/// A small deterministic generator (no dependency for a few numbers).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

/// Whatever the rules, the verdict is the compiled sets', a denial's fix
/// (when offered) allows it, and an allowed operation names rules that do.
#[test]
fn verdicts_fixes_and_named_rules_agree_with_the_compiled_sets() {
    let mut rng = Lcg(0x5eed);
    let ports = [53u16, 80, 443, 8080, 9000];
    let addrs = [
        "0.0.0.0",
        "127.0.0.1",
        "10.0.0.1",
        "::",
        "::1",
        "fd00::1",
        "::ffff:127.0.0.1",
    ];
    for round in 0..300 {
        let mut rules = String::new();
        for _ in 0..rng.next(4) {
            let p = ports[rng.next(ports.len() as u64) as usize];
            let proto = ["tcp", "udp", "any"][rng.next(3) as usize];
            let fam = ["ipv4", "ipv6", "any"][rng.next(3) as usize];
            let addr = ["loopback", "any"][rng.next(2) as usize];
            rules += &format!(
                "      - {{ports: [{p}], protocol: {proto}, family: {fam}, address: {addr}}}\n"
            );
        }
        let dir = ["bind", "connect"][rng.next(2) as usize];
        let text = if rules.is_empty() {
            format!("reserved: [443]\npolicies:\n  - name: p\n    cgroup: /p\n    {dir}: []\n")
        } else {
            format!("reserved: [443]\npolicies:\n  - name: p\n    cgroup: /p\n    {dir}:\n{rules}")
        };
        let f = parse_policy_str(&text).unwrap();
        for _ in 0..10 {
            let op = ["bind", "connect", "listen"][rng.next(3) as usize];
            let proto = if op == "listen" {
                "tcp"
            } else {
                ["tcp", "udp"][rng.next(2) as usize]
            };
            let ip: IpAddr = addrs[rng.next(addrs.len() as u64) as usize]
                .parse()
                .unwrap();
            let port = ports[rng.next(ports.len() as u64) as usize];
            let query = Query {
                v6only: rng.next(2) == 0,
                ..Query::parse(op, proto, &std::net::SocketAddr::new(ip, port).to_string()).unwrap()
            };
            let j = judge(&f, "p", &query).unwrap();
            assert_eq!(
                j.allowed,
                query.allowed_by(&compiled(&f.policies[0], &f)),
                "round {round}: {text}\n{query:?}"
            );
            if j.allowed {
                let restricted = match query.op {
                    Op::Connect => f.policies[0].connect.is_some(),
                    _ => f.policies[0].bind.is_some(),
                };
                assert_eq!(
                    restricted,
                    j.rule.contains('['),
                    "round {round}: {text}\n{query:?} {j:?}"
                );
            }
            match &j.fix {
                Some(Fix::AddRule { rule, .. }) => {
                    let mut with = f.clone();
                    let r = parse_policy_str(&format!(
                        "policies:\n  - {{name: x, cgroup: /x, bind: [{rule}]}}\n"
                    ))
                    .unwrap()
                    .policies[0]
                        .bind
                        .clone()
                        .unwrap();
                    let list = match query.op {
                        Op::Connect => with.policies[0].connect.get_or_insert_with(Vec::new),
                        _ => with.policies[0].bind.get_or_insert_with(Vec::new),
                    };
                    list.extend(r);
                    assert!(
                        query.allowed_by(&compiled(&with.policies[0], &with)),
                        "round {round}: the fix {rule} does not allow {query:?}\n{text}"
                    );
                }
                Some(Fix::Impossible { .. }) => {
                    assert!(j.reserved, "round {round}: {text}\n{query:?} {j:?}");
                }
                None => assert!(j.allowed),
            }
        }
    }
}

#[test]
fn precedence_says_why_each_candidate_lost() {
    let f = parse_policy_str(
        "policies:\n  - {name: ns, pods: {namespace: shop}, bind: []}\n  - {name: app, pods: {namespace: shop, labels: {app: web}}, bind: []}\n  - {name: slice, cgroup: /kubepods, bind: []}\n",
    )
    .unwrap();
    let chain: Vec<String> = ["/kubepods/pod1/c1", "/kubepods/pod1", "/kubepods", "/"]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    let c = |index: usize, cgroup: &str| Candidate {
        index,
        cgroup: cgroup.to_owned(),
    };
    let ranked = precedence(
        &f.policies,
        &chain,
        &[
            c(0, "/kubepods/pod1"),
            c(1, "/kubepods/pod1"),
            c(2, "/kubepods"),
        ],
        Some((1, "/kubepods/pod1")),
    );
    let by = |name: &str| ranked.iter().find(|r| r.policy == name).unwrap();
    assert_eq!(ranked[0].policy, "app");
    assert_eq!(ranked[0].outcome, "chosen");
    assert!(
        ranked[0].reason.contains("nearest governed ancestor"),
        "{ranked:?}"
    );
    assert_eq!(by("ns").outcome, "less-specific");
    assert!(by("ns").reason.contains("140 < 141"), "{ranked:?}");
    assert_eq!(by("slice").outcome, "farther");
    // Nothing governs: every candidate is named as not governing.
    let none = precedence(&f.policies, &chain, &[c(2, "/kubepods")], None);
    assert_eq!(none[0].outcome, "not-governing");
}
