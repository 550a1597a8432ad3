//! Shrinking a disagreement: smaller policy files and operations
//! ([`candidates`]) replayed until none still disagrees ([`shrink`]), and
//! the result as a regression test to paste ([`regression_test`]).

use super::{
    Bed, Disagreement,
    cases::{self, FileSpec, NODES, Op, render},
};

fn bind_rules(q: &mut cases::PolicySpec) -> &mut Vec<cases::RuleSpec> {
    q.bind.as_mut().expect("bind rules")
}

fn connect_rules(q: &mut cases::PolicySpec) -> &mut Vec<cases::RuleSpec> {
    q.connect.as_mut().expect("connect rules")
}

/// Smaller versions of `d`'s file and operation, simplest first.
fn candidates(d: &Disagreement) -> Vec<Disagreement> {
    let mut out = Vec::new();
    let with = |f: FileSpec, op: Op| Disagreement {
        file: f,
        op,
        problems: Vec::new(),
    };
    let f = &d.file;
    for i in 0..f.policies.len() {
        let mut g = f.clone();
        g.policies.remove(i);
        out.push(with(g, d.op.clone()));
    }
    if !f.reserved.is_empty() {
        for i in 0..f.reserved.len() {
            let mut g = f.clone();
            g.reserved.remove(i);
            out.push(with(g, d.op.clone()));
        }
    }
    // Named ranges become plain ranges, so that unused names can go.
    if !f.ranges.is_empty() {
        let mut g = f.clone();
        let ranges = g.ranges.clone();
        let unname = |item: &mut cases::PortItem| {
            if let cases::PortItem::Named(i) = *item {
                *item = cases::PortItem::Range(ranges[i].1, ranges[i].2);
            }
        };
        g.reserved.iter_mut().for_each(unname);
        for p in &mut g.policies {
            for rules in [&mut p.bind, &mut p.connect].into_iter().flatten() {
                for r in rules {
                    r.ports.iter_mut().for_each(unname);
                }
            }
        }
        g.ranges.clear();
        out.push(with(g, d.op.clone()));
    }
    for (pi, p) in f.policies.iter().enumerate() {
        let mut edit = |change: &dyn Fn(&mut cases::PolicySpec)| {
            let mut g = f.clone();
            change(&mut g.policies[pi]);
            if g != *f {
                out.push(with(g, d.op.clone()));
            }
        };
        edit(&|q| q.bind = None);
        edit(&|q| q.connect = None);
        edit(&|q| q.audit = false);
        edit(&|q| q.allow_raw = false);
        for (dir, rules) in [(0, &p.bind), (1, &p.connect)] {
            let Some(rules) = rules else { continue };
            for (ri, rule) in rules.iter().enumerate() {
                let rules_of = if dir == 0 { bind_rules } else { connect_rules };
                edit(&|q| {
                    rules_of(q).remove(ri);
                });
                for pj in 0..rule.ports.len() {
                    if rule.ports.len() > 1 {
                        edit(&|q| {
                            rules_of(q)[ri].ports.remove(pj);
                        });
                    }
                }
                edit(&|q| rules_of(q)[ri].protocol = None);
                edit(&|q| rules_of(q)[ri].family = None);
                edit(&|q| rules_of(q)[ri].address = None);
            }
        }
    }
    if d.op.v6only {
        let mut op = d.op.clone();
        op.v6only = false;
        out.push(with(f.clone(), op));
    }
    out
}

/// Greedy shrinking: keep the first smaller candidate that still
/// disagrees, until none does (or the budget of re-runs is spent).
pub(super) fn shrink(bed: &mut Bed, mut d: Disagreement) -> Disagreement {
    let mut budget = 200;
    'outer: while budget > 0 {
        for c in candidates(&d) {
            budget -= 1;
            if budget == 0 {
                break 'outer;
            }
            let model = bed.load(&render(&c.file, "{root}"), false);
            let (mut problems, stray) = bed.run_batch(&model, std::slice::from_ref(&c.op));
            let mut probs = problems.remove(0).1;
            probs.extend(stray);
            if !probs.is_empty() {
                d = Disagreement {
                    problems: probs,
                    ..c
                };
                continue 'outer;
            }
        }
        break;
    }
    d
}

/// A shrunk disagreement as a test to paste into
/// tests/tests/integration/difftest.rs.
pub(super) fn regression_test(d: &Disagreement, n: usize) -> String {
    let text = render(&d.file, "{root}");
    format!(
        "// {}\n#[test]\nfn difftest_regression_{n}() {{\n    require_root!();\n    portguard_tests::difftest::assert_case(\n        r#\"{text}\"#,\n        {:?},\n        r#\"{}\"#,\n    );\n}}\n",
        d.problems.join("; "),
        NODES[d.op.caller],
        d.op.request()
    )
}
