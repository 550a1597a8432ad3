//! The policy file parser: fields, errors, selectors and their ties; the
//! incremental reparse in [`reparse`].

mod reparse;

use super::*;
use crate::policy::{
    AddressSel, FamilySel, Mode, PodSelector, PortSpec, ProtocolSel, Selector, SocketKind,
};

fn ok(text: &str) -> PolicyFile {
    parse_policy_str(text).unwrap_or_else(|d| panic!("unexpected errors: {d:#?}"))
}

fn errs(text: &str) -> Vec<Diagnostic> {
    parse_policy_str(text).expect_err("expected errors")
}

#[test]
fn named_ranges_are_usable_in_rules_and_reserved() {
    let f = ok(
        "ranges: {app: \"3000-3999\", db: \"4000-4999\", admin: 9000}\nreserved: [db]\npolicies:\n  - {name: a, cgroup: /a, bind: [{ports: [app, admin, 8080]}]}\n",
    );
    let ports = &f.policies[0].bind.as_ref().unwrap()[0].ports;
    assert_eq!(
        ports,
        &[
            PortSpec::Range(3000, 3999),
            PortSpec::Port(9000),
            PortSpec::Port(8080)
        ]
    );
    assert!(f.reserved.contains(4000) && f.reserved.contains(4999) && !f.reserved.contains(3999));
    assert_eq!(f.ranges.get("app"), Some(&(3000, 3999)));
    // Order of the top-level keys does not matter.
    let g = ok("policies:\n  - {name: a, cgroup: /a, bind: [{ports: [app]}]}\nranges: {app: 7}\n");
    assert_eq!(
        g.policies[0].bind.as_ref().unwrap()[0].ports,
        [PortSpec::Port(7)]
    );
    let d = errs(
        "ranges: {app: \"4000-3000\", 9lives: 1, ephemeral: 2, ok: 5}\npolicies:\n  - {name: a, cgroup: /a, bind: [{ports: [web]}]}\n",
    );
    assert_eq!(d.len(), 4, "{d:#?}");
    assert!(
        d.iter()
            .any(|x| x.field == "ranges.app" && x.message.contains("inverted"))
    );
    assert!(d.iter().any(|x| x.field == "ranges.9lives"));
    assert!(d.iter().any(|x| x.field == "ranges.ephemeral"));
    assert!(
        d.iter()
            .any(|x| x.message.contains("unknown range name `web` (defined: ok)"))
    );
}

#[test]
fn an_entry_reparsed_alone_resolves_named_ranges() {
    let a = "ranges: {app: \"3000-3999\", db: 5432}\npolicies:\n  - name: a\n    cgroup: /a\n    bind: [{ports: [app]}]\n  - name: b\n    cgroup: /b\n    bind: [{ports: [8080]}]\n";
    let b = a.replace("ports: [8080]", "ports: [db, app]");
    let prev = parse_policy_text(a.to_owned()).unwrap();
    let (re, how) = reparse_policy_text(&prev, b.clone()).unwrap();
    assert_eq!(how, Reparse::Entry { index: 1 });
    assert_eq!(re.file, parse_policy_text(b).unwrap().file);
    assert_eq!(
        re.file.policies[1].bind.as_ref().unwrap()[0].ports,
        [PortSpec::Port(5432), PortSpec::Range(3000, 3999)]
    );
}

#[test]
fn reserved_ports_and_the_infrastructure_list() {
    let f = ok("reserved: [infrastructure, 7000, \"8000-8009\"]\npolicies: []\n");
    for p in [
        22, 2379, 2380, 6443, 9100, 10250, 10255, 10256, 10257, 10259, 7000, 8005,
    ] {
        assert!(f.reserved.contains(p), "{p}");
    }
    for p in [21, 2378, 2381, 10258, 7001, 8010] {
        assert!(!f.reserved.contains(p), "{p}");
    }
    // Overriding the built-in list: just do not name it.
    let f = ok("reserved: [7000]\npolicies: []\n");
    assert!(f.reserved.contains(7000) && !f.reserved.contains(22));
    assert!(ok("policies: []\n").reserved.is_empty());
    let d = errs("reserved: [ephemeral, 0, kubelet]\npolicies: []\n");
    assert_eq!(d.len(), 3, "{d:#?}");
    assert!(d.iter().all(|x| x.field.starts_with("reserved[")), "{d:#?}");
    assert!(
        errs("reserved: 22\npolicies: []\n")[0]
            .message
            .contains("infrastructure")
    );
}

const ISSUE_EXAMPLE: &str = r#"
policies:
  - name: web                     # unique
    cgroup: /portguard-demo/web   # path under the cgroup2 mount
    mode: enforce
    bind:
      - ports: [8080, "9000-9099"]
        protocol: tcp
        family: any
        address: loopback
    connect:
      - ports: [5432]
"#;

#[test]
fn parses_the_documented_example() {
    let f = ok(ISSUE_EXAMPLE);
    assert_eq!(f.policies.len(), 1);
    let p = &f.policies[0];
    assert_eq!(p.name, "web");
    assert_eq!(p.selector, Selector::Cgroup("/portguard-demo/web".into()));
    assert_eq!(p.mode, Mode::Enforce);
    let bind = p.bind.as_ref().unwrap();
    assert_eq!(
        bind[0].ports,
        vec![PortSpec::Port(8080), PortSpec::Range(9000, 9099)]
    );
    assert_eq!(bind[0].protocol, ProtocolSel::Tcp);
    assert_eq!(bind[0].address, AddressSel::Loopback);
    let connect = p.connect.as_ref().unwrap();
    assert_eq!(connect[0].ports, vec![PortSpec::Port(5432)]);
    assert_eq!(connect[0].protocol, ProtocolSel::Any);
    assert_eq!(connect[0].family, FamilySel::Any);
    assert_eq!(connect[0].address, AddressSel::Any);
}

#[test]
fn absent_and_empty_directions_differ() {
    let f = ok("policies:\n  - name: a\n    cgroup: /a\n    bind: []\n");
    assert_eq!(f.policies[0].bind, Some(vec![]));
    assert_eq!(f.policies[0].connect, None);
}

#[test]
fn null_direction_is_an_error_not_a_guess() {
    let d = errs("policies:\n  - name: a\n    cgroup: /a\n    bind:\n");
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].field, "policies[0].bind");
    assert!(d[0].message.contains("`[]`"), "{}", d[0].message);
}

#[test]
fn mode_defaults_to_enforce_and_audit_parses() {
    let f = ok("policies:\n  - {name: a, cgroup: /a, mode: audit}\n  - {name: b, cgroup: /b}\n");
    assert_eq!(f.policies[0].mode, Mode::Audit);
    assert_eq!(f.policies[1].mode, Mode::Enforce);
}

#[test]
fn every_error_is_listed_with_line_and_field() {
    let text = r#"policies:
  - name: a
    cgroup: /a
    colour: blue
    bind:
      - ports: [0, 70000, "9100-9000", "http", ephemeral]
        protocol: sctp
  - name: a
    cgroup: /a/
  - name: c
    cgroup: relative/path
    mode: strict
    connect:
      - ports: [ephemeral]
        addres: loopback
"#;
    let d = errs(text);
    let find = |field: &str| {
        d.iter()
            .find(|x| x.field == field)
            .unwrap_or_else(|| panic!("no diagnostic for {field}: {d:#?}"))
    };
    let unknown = find("policies[0].colour");
    assert_eq!((unknown.line, unknown.column), (4, 5));
    assert!(unknown.message.contains("unknown key `colour`"));
    assert!(
        find("policies[0].bind[0].ports[0]")
            .message
            .contains("ephemeral")
    );
    assert!(
        find("policies[0].bind[0].ports[1]")
            .message
            .contains("out of range")
    );
    assert!(
        find("policies[0].bind[0].ports[2]")
            .message
            .contains("inverted")
    );
    assert!(
        find("policies[0].bind[0].ports[3]")
            .message
            .contains("not a port")
    );
    let proto = find("policies[0].bind[0].protocol");
    assert_eq!(proto.line, 7);
    assert!(proto.message.contains("unknown value `sctp`"));
    assert!(find("policies[2].cgroup").message.contains("absolute"));
    // The second `a` duplicates both the name and the cgroup of the first,
    // even though the first has errors of its own.
    assert!(
        find("policies[1].name")
            .message
            .contains("duplicate policy name `a`")
    );
    assert!(
        find("policies[1].cgroup")
            .message
            .contains("already has policy `a`")
    );
    assert!(find("policies[2].mode").message.contains("enforce, audit"));
    assert!(
        find("policies[2].connect[0].ports[0]")
            .message
            .contains("bind rules only")
    );
    assert!(
        find("policies[2].connect[0].addres")
            .message
            .contains("unknown key")
    );
    // ephemeral in a bind rule is fine: no diagnostic for ports[4].
    assert!(!d.iter().any(|x| x.field == "policies[0].bind[0].ports[4]"));
    // Sorted by position.
    assert!(
        d.windows(2)
            .all(|w| (w[0].line, w[0].column) <= (w[1].line, w[1].column))
    );
}

#[test]
fn duplicate_names_are_reported_once_valid_policies_are_known() {
    let d = errs("policies:\n  - {name: a, cgroup: /a}\n  - {name: a, cgroup: /b}\n");
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].line, 3);
    assert_eq!(d[0].field, "policies[1].name");
    assert!(d[0].message.contains("duplicate policy name `a`"));
    assert!(d[0].message.contains("line 2"));
}

#[test]
fn one_policy_per_cgroup() {
    let d = errs("policies:\n  - {name: a, cgroup: /x}\n  - {name: b, cgroup: /x/}\n");
    assert_eq!(d.len(), 1);
    assert!(
        d[0].message.contains("already has policy `a`"),
        "{}",
        d[0].message
    );
}

#[test]
fn missing_keys() {
    let d = errs("policies:\n  - mode: audit\n");
    assert!(d.iter().any(|x| x.message.contains("missing key `name`")));
    assert!(d.iter().any(|x| x.message.contains("missing key `cgroup`")));
    let d = errs("policies:\n  - {name: a, cgroup: /a, bind: [{protocol: tcp}]}\n");
    assert!(d[0].message.contains("missing key `ports`"));
    let d = errs("other: 1\n");
    assert!(d.iter().any(|x| x.message.contains("unknown key `other`")));
    assert!(
        d.iter()
            .any(|x| x.message.contains("missing key `policies`"))
    );
}

#[test]
fn empty_file_and_syntax_errors() {
    assert!(errs("")[0].message.contains("empty"));
    let d = errs("policies:\n  - name: [\n");
    assert!(d[0].message.starts_with("YAML syntax error"));
}

#[test]
fn allow_sockets() {
    let f = ok("policies: [{name: a, cgroup: /a, bind: [], allow_sockets: [raw, sctp, raw]}]");
    assert_eq!(
        f.policies[0].allow_sockets,
        vec![SocketKind::Raw, SocketKind::Sctp]
    );
    assert!(
        ok("policies: [{name: a, cgroup: /a}]").policies[0]
            .allow_sockets
            .is_empty()
    );
    let d = errs("policies: [{name: a, cgroup: /a, allow_sockets: [packet]}]");
    assert!(d[0].message.contains("unknown value `packet`"), "{d:?}");
    assert_eq!(d[0].field, "policies[0].allow_sockets[0]");
}

#[test]
fn delegated_is_skip_unless_a_name_selector_says_govern() {
    use crate::policy::Delegated;
    let f = ok(
        "policies: [{name: a, unit: x.service}, {name: b, unit: y.service, delegated: govern}, {name: c, pods: {}, delegated: skip}]",
    );
    let d: Vec<Delegated> = f.policies.iter().map(|p| p.delegated).collect();
    assert_eq!(d, [Delegated::Skip, Delegated::Govern, Delegated::Skip]);
    let d = errs("policies: [{name: a, cgroup: /a, delegated: govern}]");
    assert_eq!(d[0].field, "policies[0].delegated");
    assert!(d[0].message.contains("`unit:` and `pods:`"), "{d:?}");
    let d = errs("policies: [{name: a, unit: x.service, delegated: yes}]");
    assert!(d[0].message.contains("unknown value `yes`"), "{d:?}");
}

#[test]
fn empty_port_list_is_an_error() {
    let d = errs("policies:\n  - {name: a, cgroup: /a, bind: [{ports: []}]}\n");
    assert!(d[0].message.contains("empty port list"));
}

#[test]
fn quoted_and_plain_ports_and_ranges() {
    let f = ok(
        "policies:\n  - {name: a, cgroup: /a, bind: [{ports: [\"80\", 443, 1-1024, \" 5 - 6 \", \"7-7\"]}]}\n",
    );
    assert_eq!(
        f.policies[0].bind.as_ref().unwrap()[0].ports,
        vec![
            PortSpec::Port(80),
            PortSpec::Port(443),
            PortSpec::Range(1, 1024),
            PortSpec::Range(5, 6),
            PortSpec::Port(7),
        ]
    );
}

#[test]
fn range_edges() {
    assert!(errs("policies: [{name: a, cgroup: /a, bind: [{ports: [\"1-65536\"]}]}]").len() == 1);
    assert!(errs("policies: [{name: a, cgroup: /a, bind: [{ports: [\"0-10\"]}]}]").len() == 1);
    assert!(errs("policies: [{name: a, cgroup: /a, bind: [{ports: [-1]}]}]").len() == 1);
    assert!(errs("policies: [{name: a, cgroup: /a, bind: [{ports: [1.5]}]}]").len() == 1);
    ok("policies: [{name: a, cgroup: /a, bind: [{ports: [\"1-65535\", 65535, 1]}]}]");
}

#[test]
fn cgroup_paths_are_normalised_and_checked() {
    assert_eq!(normalize_cgroup("/a/b/").unwrap(), "/a/b");
    assert_eq!(normalize_cgroup("/").unwrap(), "/");
    assert!(normalize_cgroup("a/b").is_err());
    assert!(normalize_cgroup("/a//b").is_err());
    assert!(normalize_cgroup("/a/../b").is_err());
    let deep = "/x".repeat(31);
    assert!(normalize_cgroup(&deep).is_ok());
    let too_deep = "/x".repeat(32);
    assert!(normalize_cgroup(&too_deep).unwrap_err().contains("levels"));
}

#[test]
fn pod_and_unit_selectors_parse() {
    let f = ok("policies:
  - name: web
    pods: {namespace: 'team-*', labels: {app: web, tier: front}, container: server}
    bind: []
  - name: every
    pods: {}
    bind: []
  - {name: nginx, unit: nginx.service, bind: []}
");
    let Selector::Pods(p) = &f.policies[0].selector else {
        panic!("{:?}", f.policies[0].selector)
    };
    assert_eq!(p.namespace.as_deref(), Some("team-*"));
    assert_eq!(p.labels.len(), 2);
    assert_eq!(p.container.as_deref(), Some("server"));
    assert_eq!(
        f.policies[1].selector,
        Selector::Pods(PodSelector::default())
    );
    assert_eq!(
        f.policies[2].selector,
        Selector::Unit("nginx.service".into())
    );
}

#[test]
fn selector_errors_name_the_field() {
    let d = errs("policies:\n  - {name: a, cgroup: /a, unit: a.service, bind: []}\n");
    assert!(
        d[0].message
            .contains("exactly one of `cgroup`, `pods` or `unit`"),
        "{d:?}"
    );
    let d = errs("policies:\n  - {name: a, unit: nginx, bind: []}\n");
    assert_eq!(d[0].field, "policies[0].unit");
    assert!(d[0].message.contains("invalid unit name `nginx`"), "{d:?}");
    let d = errs("policies:\n  - {name: a, pods: {namespace: '[x'}, bind: []}\n");
    assert_eq!(d[0].field, "policies[0].pods.namespace");
    let d = errs("policies:\n  - {name: a, pods: {labels: [app]}, bind: []}\n");
    assert_eq!(d[0].field, "policies[0].pods.labels");
    let d = errs("policies:\n  - {name: a, pods: {nmespace: x}, bind: []}\n");
    assert!(d[0].message.contains("nmespace"), "{d:?}");
}

#[test]
fn identical_and_equally_specific_overlapping_selectors_are_ties() {
    // Identical.
    let d = errs(
        "policies:\n  - {name: a, unit: x.service, bind: []}\n  - {name: b, unit: x.service, bind: []}\n",
    );
    assert!(d[0].message.contains("selects the same as `a`"), "{d:?}");
    // Different labels, equally specific, both may match one pod.
    let d = errs(
        "policies:\n  - {name: a, pods: {labels: {app: web}}, bind: []}\n  - {name: b, pods: {labels: {tier: front}}, bind: []}\n",
    );
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].line, 3);
    assert!(d[0].message.contains("equally specific"), "{d:?}");
    assert!(d[0].message.contains("`a` (line 2"), "{d:?}");
    // Two namespace globs that could overlap.
    assert!(!errs(
        "policies:\n  - {name: a, pods: {namespace: 'team-*'}, bind: []}\n  - {name: b, pods: {namespace: '*-a'}, bind: []}\n",
    )
    .is_empty());
    // Exclusive: one label key with different values, different exact
    // namespaces, a glob that cannot match the other namespace, or
    // different containers.
    for text in [
        "policies:\n  - {name: a, pods: {labels: {app: web}}, bind: []}\n  - {name: b, pods: {labels: {app: db}}, bind: []}\n",
        "policies:\n  - {name: a, pods: {namespace: x}, bind: []}\n  - {name: b, pods: {namespace: y}, bind: []}\n",
        "policies:\n  - {name: a, pods: {namespace: 'team-*'}, bind: []}\n  - {name: b, pods: {namespace: 'ops-*'}, bind: []}\n",
        "policies:\n  - {name: a, pods: {container: x}, bind: []}\n  - {name: b, pods: {container: y}, bind: []}\n",
        // Different specificity: the more specific one wins, no tie.
        "policies:\n  - {name: a, pods: {labels: {app: web}}, bind: []}\n  - {name: b, pods: {namespace: x}, bind: []}\n",
        "policies:\n  - {name: a, unit: x.service, bind: []}\n  - {name: b, unit: y.service, bind: []}\n",
    ] {
        ok(text);
    }
}

#[test]
fn policies_must_be_a_list() {
    let d = errs("policies:\n");
    assert!(d[0].message.contains("`policies: []`"));
    ok("policies: []\n");
}

/// A key given twice, once quoted or escaped, is one key given twice: an
/// error naming it, never the later one silently winning (which loosened
/// `bind: [8080]` to every port).
#[test]
fn a_key_repeated_in_another_quoting_is_a_duplicate() {
    // (text, line and column of the second `bind`)
    let cases = [
        (
            "policies:\n  - {name: a, cgroup: /x, bind: [{ports: [8080]}], \"bind\": [{ports: [\"1-65535\"]}]}\n",
            (2, 52),
        ),
        (
            "policies:\n  - name: a\n    cgroup: /x\n    'bind': [{ports: [8080]}]\n    bind: [{ports: [\"1-65535\"]}]\n",
            (5, 5),
        ),
        (
            "policies:\n  - name: a\n    cgroup: /x\n    bind: [{ports: [8080]}]\n    \"bi\\x6ed\": [{ports: [\"1-65535\"]}]\n",
            (5, 5),
        ),
        (
            "policies:\n  - name: a\n    cgroup: /x\n    bind: [{ports: [8080]}]\n    \"bi\\u006ed\": [{ports: [\"1-65535\"]}]\n",
            (5, 5),
        ),
        // Inside a rule and a label selector too.
        (
            "policies:\n  - name: a\n    cgroup: /x\n    bind:\n      - ports: [8080]\n        \"ports\": [\"1-65535\"]\n",
            (6, 9),
        ),
        (
            "policies:\n  - name: a\n    pods: {labels: {app: web, \"app\": db}}\n    bind: []\n",
            (3, 31),
        ),
    ];
    for (text, (line, column)) in cases {
        let d = errs(text);
        assert_eq!(d.len(), 1, "{text}: {d:#?}");
        assert_eq!((d[0].line, d[0].column), (line, column), "{text}: {d:#?}");
        let key = if text.contains("labels") {
            "app"
        } else if text.contains("\"ports\"") {
            "ports"
        } else {
            "bind"
        };
        assert!(
            d[0].message
                .starts_with("YAML syntax error: duplicate key `")
                && d[0]
                    .message
                    .contains(&format!("duplicate key `{key}` (first given on line ")),
            "{text}: {}",
            d[0].message
        );
    }
    // The same policies without the repeated key parse.
    let f = ok(
        "policies:\n  - {name: a, cgroup: /x, \"bind\": [{'ports': [8080]}], \"connect\": []}\n",
    );
    assert_eq!(
        f.policies[0].bind.as_ref().unwrap()[0].ports,
        vec![PortSpec::Port(8080)]
    );
    assert_eq!(f.policies[0].connect, Some(vec![]));
}

/// The built-in policies' names are reserved: a policy of the file named
/// like one would share its id (and, named like a `--fail-closed`
/// stand-in, be taken for one: reported, never enforced on old sockets).
#[test]
fn names_of_the_built_in_policies_are_reserved() {
    for name in [
        "portguard:identifying",
        "portguard:fail-closed:unfit",
        "portguard:fail-closed:web",
        "portguard:",
    ] {
        let d = errs(&format!(
            "policies:\n  - {{name: \"{name}\", cgroup: /a, bind: []}}\n"
        ));
        assert_eq!(d.len(), 1, "{name}: {d:#?}");
        assert_eq!(d[0].line, 2, "{name}");
        assert!(
            d[0].message
                .contains(&format!("invalid policy name `{name}`"))
                && d[0].message.contains("reserved"),
            "{name}: {}",
            d[0].message
        );
    }
    // Not the prefix: allowed as before.
    ok("policies:\n  - {name: \"web:portguard:x\", cgroup: /a, bind: []}\n");
}
