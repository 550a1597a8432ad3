//! The per-cgroup policy cache of the cached programs, as [`FakeMaps`]
//! models it: the applier's epoch makes every answer found before a change
//! stale, so no decision after the change uses one.

use super::*;

/// `policy` (an index into `TWO`'s policies) governing `cgroups`.
fn target<'a>(p: &'a [CompiledPolicy], policy: usize, cgroups: &[(u64, u32)]) -> Target<'a> {
    Target {
        policy_id: policy as u32 + 1,
        policy: &p[policy],
        cgroups: cgroups
            .iter()
            .map(|&(id, level)| ResolvedCgroup { id, level })
            .collect::<Vec<_>>()
            .into(),
    }
}

/// The cached verdict of each probe, checked against the walk's.
fn verdicts(m: &mut FakeMaps, probes: &[(&[u64], u16)]) -> Vec<Verdict> {
    probes
        .iter()
        .map(|&(ancestry, port)| {
            let cached = bind(m, ancestry, port);
            m.no_cache = true;
            let walked = bind(m, ancestry, port);
            m.no_cache = false;
            assert_eq!(cached, walked, "{ancestry:?} port {port}");
            cached
        })
        .collect()
}

/// Cgroups decide (their answers cached), then the policies move between
/// them: by an apply to the other generation, by an apply back to the first
/// generation (whose words' generation bit matches again), and by an insert
/// into the live generation (no flip). After each change every cgroup gets
/// the new answer, and the epoch has grown (never 0).
#[test]
fn no_cached_answer_outlives_the_change_it_was_found_before() {
    use Verdict::*;
    let p = compiled(TWO);
    let mut m = FakeMaps::default();
    let mut a = Applier::new(CAPS);
    // /p/d (13) below /p, /q (30) beside it.
    let probes: [(&[u64], u16); 4] = [
        (&[1, 10, 13], 9000),
        (&[1, 30], 9000),
        (&[1, 10, 11], 22),
        (&[1, 20], 22),
    ];
    let mut epochs = vec![m.state.epoch];
    let mut step = |m: &mut FakeMaps, expected: [Verdict; 4]| {
        epochs.push(m.state.epoch);
        assert!(
            epochs.windows(2).all(|w| w[1] != 0 && w[1] != w[0]),
            "epochs {epochs:?}"
        );
        // Twice: the first round caches (or uses the cache), the second
        // reads what the first left.
        for _ in 0..2 {
            assert_eq!(verdicts(m, &probes), expected);
        }
    };
    a.apply(
        &mut m,
        &[
            target(&p, 0, &[(10, 1)]),
            target(&p, 1, &[(11, 2)]),
            target(&p, 2, &[(20, 1)]),
        ],
    )
    .unwrap();
    a.unattached();
    step(&mut m, [Allow, Ungoverned, Allow, Deny]);
    // The other generation: /p/d sealed, /q given `child`.
    a.apply(
        &mut m,
        &[
            target(&p, 0, &[(10, 1)]),
            target(&p, 1, &[(11, 2), (30, 1)]),
            target(&p, 2, &[(20, 1), (13, 2)]),
        ],
    )
    .unwrap();
    step(&mut m, [Deny, Audit, Allow, Deny]);
    // Back to the first generation, with yet other answers: /s ungoverned,
    // /p/c sealed, /q given `parent`.
    a.apply(
        &mut m,
        &[
            target(&p, 0, &[(10, 1), (30, 1)]),
            target(&p, 2, &[(11, 2)]),
        ],
    )
    .unwrap();
    step(&mut m, [Allow, Allow, Deny, Ungoverned]);
    // No flip: /p/d given `sealed` in the live generation.
    let generation = m.state.generation;
    assert!(
        a.govern_live(&mut m, ResolvedCgroup { id: 13, level: 2 }, 3)
            .unwrap()
    );
    assert_eq!(m.state.generation, generation);
    step(&mut m, [Deny, Allow, Deny, Ungoverned]);
}
