//! Plans made from the live generation instead of from every target:
//! `apply_one` for one policy's changed rules, and records taken from the
//! last apply for policies whose rules did not change.

use super::*;

/// `apply_one` of one changed policy does what `apply` of every target
/// does: the same report and the same kernel maps, change after change
/// (new sets, sets shared with other policies, sets freed, mode changes,
/// the sets of both generations).
#[test]
fn apply_one_does_what_apply_of_every_target_does() {
    // p0 and p5 share their sets at first (the same ports).
    let text = |p0: &str, mode: &str| {
        let body: String = (0..10)
            .map(|i| match i {
                0 => format!("  - {{name: p0, cgroup: /c0, mode: {mode}, bind: [{{ports: [{p0}]}}], connect: []}}\n"),
                5 => "  - {name: p5, cgroup: /c5, bind: [{ports: [5000]}], connect: []}\n".to_owned(),
                _ => format!("  - {{name: p{i}, cgroup: /c{i}, bind: [{{ports: [{}]}}]}}\n", 1000 + i),
            })
            .collect();
        format!("policies:\n{body}")
    };
    let ids: Vec<(u64, u32)> = (0..10).map(|i| (100 + i, 1 + (i % 3) as u32)).collect();
    let start = compiled(&text("5000", "enforce"));
    let (mut full_maps, mut one_maps) = (FakeMaps::default(), FakeMaps::default());
    let (mut full, mut one) = (Applier::new(CAPS), Applier::new(CAPS));
    for _ in 0..2 {
        full.apply(&mut full_maps, &targets(&start, &ids)).unwrap();
        one.apply(&mut one_maps, &targets(&start, &ids)).unwrap();
    }
    let changes = [
        ("6000", "enforce"),
        ("7000", "enforce"),
        ("1001", "enforce"),
        ("1001", "audit"),
        ("5000", "audit"),
        ("5000", "enforce"),
        ("\"9000-9999\", 22", "enforce"),
        ("7000", "enforce"),
    ];
    for (ports, mode) in changes {
        let changed = compiled(&text(ports, mode));
        let all = targets(&changed, &ids);
        let expected = full.apply(&mut full_maps, &all).unwrap();
        let got = one.apply_one(&mut one_maps, &all[0]).unwrap().unwrap();
        assert_eq!(got, expected, "after {ports} {mode}");
        assert_eq!(one_maps.state, full_maps.state);
        assert_eq!(one_maps.cgroups, full_maps.cgroups);
        assert_eq!(one_maps.policies, full_maps.policies);
        assert_eq!(one_maps.chunks, full_maps.chunks);
        assert_eq!(one_maps.writes, full_maps.writes);
        assert_eq!(one.chunks_in_use(), full.chunks_in_use());
        // And the kernel decides by the change.
        assert_eq!(
            bind(&one_maps, &[1, 100], 7000),
            bind(&full_maps, &[1, 100], 7000)
        );
    }
}

/// `apply_one` declines what the live generation does not show: a policy
/// it does not hold, or other cgroups than it governs.
#[test]
fn apply_one_declines_a_policy_with_other_cgroups() {
    let p = compiled(TWO);
    let ids = [(10, 1), (11, 2), (20, 1)];
    let mut m = FakeMaps::default();
    let mut a = Applier::new(CAPS);
    a.apply(&mut m, &targets(&p, &ids)).unwrap();
    let writes = m.writes;
    let mut t = targets(&p, &ids);
    t[0].cgroups
        .to_mut()
        .push(ResolvedCgroup { id: 12, level: 1 });
    assert!(a.apply_one(&mut m, &t[0]).is_none());
    t[1].cgroups.to_mut().clear();
    assert!(a.apply_one(&mut m, &t[1]).is_none());
    let mut t = targets(&p, &ids);
    t[2].policy_id = 99;
    assert!(a.apply_one(&mut m, &t[2]).is_none());
    assert_eq!(m.writes, writes, "nothing written");
}

/// A plan takes the record it committed last for a policy whose rules
/// (the same compiled sets), mode and slot did not change (a rescan of
/// thousands of policies), instead of making it again: the kernel maps
/// must be exactly those of an applier that remembers nothing, change after
/// change (other cgroups; rules recompiled; a policy gone and back, its
/// set freed and made again under a new id; a mode change).
#[test]
fn records_taken_from_the_last_apply_are_those_made_afresh() {
    let text = |a: &str, mode: &str| {
        format!(
            "policies: [{{name: a, cgroup: /a, bind: [{{ports: [{a}]}}]}}, \
             {{name: b, cgroup: /b, mode: {mode}, bind: [{{ports: [8080, 9000-9099]}}], \
             connect: [{{ports: [53]}}]}}]"
        )
    };
    let first = compiled(&text("8080", "enforce"));
    let changed = compiled(&text("8081", "enforce"));
    let audit = compiled(&text("8081", "audit"));
    // The same compiled rules (shared sets) with another mode, or other
    // socket kinds allowed.
    let mut mode_only = changed.clone();
    mode_only[1].mode = crate::policy::Mode::Audit;
    let mut kinds_only = changed.clone();
    kinds_only[0].allow_sockets ^= 1;
    let mut remembering = (Applier::new(CAPS), FakeMaps::default());
    let mut forgetful = (Applier::new(CAPS), FakeMaps::default());
    // Each step, and how many records its plan makes afresh.
    let steps: Vec<(Vec<Target<'_>>, usize)> = vec![
        (targets(&first, &[(10, 1), (20, 1)]), 2),
        (targets(&first, &[(11, 1), (20, 1)]), 0),
        (targets(&first, &[(11, 1), (21, 1)]), 0),
        (targets(&changed, &[(11, 1), (21, 1)]), 2),
        (targets(&changed[..1], &[(11, 1)]), 0),
        (targets(&changed[..1], &[(12, 1)]), 0),
        (targets(&changed, &[(12, 1), (22, 1)]), 1),
        (targets(&audit, &[(12, 1), (22, 1)]), 2),
        (targets(&audit, &[(13, 1), (22, 1)]), 0),
        (targets(&changed, &[(13, 1), (22, 1)]), 2),
        (targets(&mode_only, &[(13, 1), (22, 1)]), 1),
        (targets(&kinds_only, &[(13, 1), (22, 1)]), 2),
    ];
    for (i, (step, made)) in steps.iter().enumerate() {
        let plan = remembering.0.plan(step).unwrap();
        assert_eq!(plan.made.len(), *made, "step {i}: records made afresh");
        forgetful.0.remembered.clear();
        let r1 = remembering.0.apply(&mut remembering.1, step).unwrap();
        let r2 = forgetful.0.apply(&mut forgetful.1, step).unwrap();
        assert_eq!(r1, r2, "step {i}");
        assert_eq!(remembering.1.state, forgetful.1.state, "step {i}");
        assert_eq!(remembering.1.policies, forgetful.1.policies, "step {i}");
        assert_eq!(remembering.1.cgroups, forgetful.1.cgroups, "step {i}");
        assert_eq!(remembering.1.chunks, forgetful.1.chunks, "step {i}");
    }
    assert_eq!(remembering.0.remembered.len(), 2);
}

/// `apply_again` of the policies in force over other cgroups (a rescan)
/// does what `apply` of every target does: the same report and kernel
/// maps, after cgroups come, go and move between policies, after a
/// policy's rules changed by `apply_one` (its record differs between the
/// generations), and after a policy left (its slot's record stays in the
/// map). It plans from the live generation only when the targets are the
/// live policy set, and its errors are `apply`'s.
#[test]
fn apply_again_of_the_policies_in_force_does_what_apply_does() {
    let text = |p0: &str| {
        let body: String = (0..4)
            .map(|i| {
                let ports = if i == 0 {
                    p0.to_owned()
                } else {
                    format!("{}", 1000 + i)
                };
                format!("  - {{name: p{i}, cgroup: /c{i}, bind: [{{ports: [{ports}]}}]}}\n")
            })
            .collect();
        format!("policies:\n{body}")
    };
    let first = compiled(&text("5000"));
    let changed = compiled(&text("6000"));
    fn at<'a>(policies: &'a [CompiledPolicy], cgroups: &[&[u64]]) -> Vec<Target<'a>> {
        policies
            .iter()
            .zip(cgroups)
            .enumerate()
            .map(|(i, (p, ids))| Target {
                policy_id: i as u32 + 1,
                policy: p,
                cgroups: ids
                    .iter()
                    .map(|id| ResolvedCgroup {
                        id: *id,
                        level: 1 + (*id % 3) as u32,
                    })
                    .collect::<Vec<_>>()
                    .into(),
            })
            .collect()
    }
    let (mut again, mut full) = (
        (Applier::new(CAPS), FakeMaps::default()),
        (Applier::new(CAPS), FakeMaps::default()),
    );
    let check = |again: &(Applier, FakeMaps), full: &(Applier, FakeMaps), step: &str| {
        assert_eq!(again.1.state, full.1.state, "{step}");
        assert_eq!(again.1.policies, full.1.policies, "{step}");
        assert_eq!(again.1.cgroups, full.1.cgroups, "{step}");
        assert_eq!(again.1.chunks, full.1.chunks, "{step}");
        assert_eq!(again.1.writes, full.1.writes, "{step}");
    };
    // (step, the policies in force, each one's cgroups, planned from the
    // live generation)
    let start = at(&first, &[&[10], &[20], &[30], &[40]]);
    for t in [&start, &start] {
        assert_eq!(
            again.0.apply(&mut again.1, t).unwrap(),
            full.0.apply(&mut full.1, t).unwrap()
        );
    }
    type Step<'a> = (&'a str, &'a [CompiledPolicy], Vec<&'a [u64]>, bool);
    let steps: Vec<Step<'_>> = vec![
        (
            "a cgroup's id changes",
            &first,
            vec![&[11], &[20], &[30], &[40]],
            true,
        ),
        (
            "cgroups come",
            &first,
            vec![&[11, 12], &[20, 21], &[30], &[40]],
            true,
        ),
        (
            "a cgroup moves",
            &first,
            vec![&[11, 12, 21], &[20], &[30], &[40]],
            true,
        ),
        (
            "a policy governs none",
            &first,
            vec![&[11], &[], &[30], &[40]],
            true,
        ),
        (
            "and again one",
            &first,
            vec![&[11], &[22], &[30], &[40]],
            true,
        ),
        (
            "after apply_one",
            &changed,
            vec![&[11], &[22], &[30], &[40]],
            true,
        ),
        (
            "once more",
            &changed,
            vec![&[13], &[22], &[30], &[40]],
            true,
        ),
        (
            "a policy left",
            &changed[..3],
            vec![&[13], &[22], &[30]],
            false,
        ),
        ("without it", &changed[..3], vec![&[14], &[22], &[31]], true),
        (
            "it is back",
            &changed,
            vec![&[14], &[22], &[31], &[41]],
            false,
        ),
        (
            "and stays",
            &changed,
            vec![&[15], &[22], &[31], &[41]],
            true,
        ),
    ];
    for (step, policies, cgroups, from_live) in &steps {
        let targets = at(policies, cgroups);
        if *step == "after apply_one" {
            let one = again
                .0
                .apply_one(&mut again.1, &targets[0])
                .unwrap()
                .unwrap();
            assert_eq!(one, full.0.apply(&mut full.1, &targets).unwrap(), "{step}");
            check(&again, &full, step);
        }
        assert_eq!(
            again.0.plan_cgroups(&targets).is_some(),
            *from_live,
            "{step}: planned from the live generation"
        );
        let r1 = again.0.apply_again(&mut again.1, &targets).unwrap();
        let r2 = full.0.apply(&mut full.1, &targets).unwrap();
        assert_eq!(r1, r2, "{step}");
        check(&again, &full, step);
        // And the kernel decides by it.
        for (c, port) in [(15, 6000), (15, 5000), (22, 1001), (31, 1002), (41, 1003)] {
            assert_eq!(bind(&again.1, &[1, c], port), bind(&full.1, &[1, c], port));
        }
    }
    // A cgroup two policies claim: refused as by `apply`, nothing written.
    let writes = again.1.writes;
    let twice = at(&changed, &[&[15], &[15], &[31], &[41]]);
    assert!(again.0.plan_cgroups(&twice).is_some());
    let e = again.0.apply_again(&mut again.1, &twice).unwrap_err();
    assert_eq!(
        e.to_string(),
        full.0.apply(&mut full.1, &twice).unwrap_err().to_string()
    );
    assert_eq!(again.1.writes, writes, "nothing written");
}

/// Targets that are as many as the live policies, each id with a live
/// slot, but two with one id (one live policy left out, another twice):
/// not the live policy set, so planned from every target.
#[test]
fn apply_again_of_two_targets_with_one_id_plans_in_full() {
    let policies = compiled(
        "policies: [{name: a, cgroup: /a, bind: [{ports: [80]}]}, \
         {name: b, cgroup: /b, bind: []}]",
    );
    let mut applier = Applier::new(CAPS);
    let mut maps = FakeMaps::default();
    applier
        .apply(&mut maps, &targets(&policies, &[(10, 1), (20, 1)]))
        .unwrap();
    let mut twice = targets(&policies, &[(11, 1), (20, 1)]);
    twice[1].policy_id = twice[0].policy_id;
    assert!(applier.plan_cgroups(&twice).is_none());
    // As `apply` plans them (the last record written for the id wins).
    let mut full = (Applier::new(CAPS), FakeMaps::default());
    full.0
        .apply(&mut full.1, &targets(&policies, &[(10, 1), (20, 1)]))
        .unwrap();
    assert_eq!(
        applier.apply_again(&mut maps, &twice).unwrap(),
        full.0.apply(&mut full.1, &twice).unwrap()
    );
    assert_eq!(maps.policies, full.1.policies);
    assert_eq!(maps.cgroups, full.1.cgroups);
}
