//! Unit tests of the planner, against the in-memory sink ([`super::fake`]).

use portguard_common::{AddrClass, Direction, Family, Proto};

use super::{fake::*, *};
use crate::policy::{compile, parse_policy_str};

fn compiled(text: &str) -> Vec<CompiledPolicy> {
    parse_policy_str(text)
        .unwrap()
        .policies
        .iter()
        .map(compile)
        .collect()
}

const CAPS: Capacity = Capacity {
    cgroups: 64,
    policies: 16,
    chunks: 256,
};

fn targets<'a>(policies: &'a [CompiledPolicy], ids: &[(u64, u32)]) -> Vec<Target<'a>> {
    policies
        .iter()
        .zip(ids)
        .enumerate()
        .map(|(i, (p, (id, level)))| Target {
            policy_id: i as u32 + 1,
            policy: p,
            cgroups: vec![ResolvedCgroup {
                id: *id,
                level: *level,
            }]
            .into(),
        })
        .collect()
}

fn bind(m: &FakeMaps, ancestry: &[u64], port: u16) -> Verdict {
    m.decide(
        ancestry,
        Direction::Bind,
        Proto::Tcp,
        Family::Ipv4,
        AddrClass::Any,
        port,
        false,
    )
}

const TWO: &str = "policies:
  - {name: parent, cgroup: /p, bind: [{ports: [\"9000-9099\"]}]}
  - {name: child, cgroup: /p/c, bind: [{ports: [22]}], mode: audit}
  - {name: sealed, cgroup: /s, bind: []}
";

#[test]
fn nearest_ancestor_wins_and_ungoverned_is_untouched() {
    let p = compiled(TWO);
    let mut m = FakeMaps::default();
    let mut a = Applier::new(CAPS);
    a.apply(&mut m, &targets(&p, &[(10, 1), (11, 2), (20, 1)]))
        .unwrap();
    // /p/x (id 12) inherits /p.
    assert_eq!(bind(&m, &[1, 10, 12], 9000), Verdict::Allow);
    assert_eq!(bind(&m, &[1, 10, 12], 9099), Verdict::Allow);
    assert_eq!(bind(&m, &[1, 10, 12], 9100), Verdict::Deny);
    assert_eq!(bind(&m, &[1, 10, 12], 8999), Verdict::Deny);
    // /p/c has its own (audit) policy: nearest wins.
    assert_eq!(bind(&m, &[1, 10, 11], 22), Verdict::Allow);
    assert_eq!(bind(&m, &[1, 10, 11], 9000), Verdict::Audit);
    // `bind: []` denies everything, including the ephemeral pseudo-port.
    assert_eq!(bind(&m, &[1, 20], 1), Verdict::Deny);
    assert_eq!(
        m.decide(
            &[1, 20],
            Direction::Bind,
            Proto::Udp,
            Family::Ipv6,
            AddrClass::Loopback,
            40000,
            true
        ),
        Verdict::Deny
    );
    // Unrestricted connect.
    assert_eq!(
        m.decide(
            &[1, 20],
            Direction::Connect,
            Proto::Tcp,
            Family::Ipv4,
            AddrClass::Any,
            1,
            false
        ),
        Verdict::Allow
    );
    // A sibling is untouched.
    assert_eq!(bind(&m, &[1, 30], 1), Verdict::Ungoverned);
}

#[test]
fn a_mirror_read_back_from_the_kernel_continues_where_the_last_one_stopped() {
    let p = compiled(TWO);
    let mut m = FakeMaps::default();
    let mut a = Applier::new(CAPS);
    let t = targets(&p, &[(10, 1), (11, 2), (20, 1)]);
    a.apply(&mut m, &t).unwrap();
    a.unattached();
    a.apply(&mut m, &t).unwrap();
    let read_back = |m: &FakeMaps| {
        Applier::from_kernel(
            CAPS,
            m.state,
            m.cgroups.iter().map(|(k, v)| (*k, *v)),
            |i| m.policies.get(&i).copied(),
            m.chunks.iter().map(|(k, c)| (*k, *c)),
        )
    };
    // The same policy again: nothing to write but the flip.
    let mut b = read_back(&m);
    assert_eq!(b.live_generation(), a.live_generation());
    let before = m.writes;
    let r = b.apply(&mut m, &t).unwrap();
    assert_eq!(
        (r.sets_written, r.records_written, r.cgroups_written),
        (0, 0, 0)
    );
    assert_eq!(m.writes - before, 2, "only the state is written");
    assert_eq!(bind(&m, &[1, 10, 12], 9000), Verdict::Allow);
    assert_eq!(bind(&m, &[1, 10, 12], 9100), Verdict::Deny);
    // A changed policy through the adopted mirror: the new rules hold in
    // the new generation, the old sets are freed once no generation uses
    // them, and the kernel decides exactly as a fresh agent's maps would.
    let q = compiled("policies:\n  - {name: p, cgroup: /p, bind: [{ports: [7000]}]}\n");
    let tq = targets(&q, &[(10, 1)]);
    let mut c = read_back(&m);
    c.apply(&mut m, &tq).unwrap();
    assert_eq!(bind(&m, &[1, 10, 12], 7000), Verdict::Allow);
    assert_eq!(bind(&m, &[1, 10, 12], 9000), Verdict::Deny);
    assert_eq!(bind(&m, &[1, 20], 1), Verdict::Ungoverned);
    c.apply(&mut m, &tq).unwrap();
    let mut fresh = FakeMaps::default();
    let mut f = Applier::new(CAPS);
    f.apply(&mut fresh, &tq).unwrap();
    assert_eq!(m.chunks.len(), fresh.chunks.len(), "stale sets are freed");
    for port in [1, 6999, 7000, 7001, 9000] {
        assert_eq!(bind(&m, &[1, 10], port), bind(&fresh, &[1, 10], port));
    }
}

#[test]
fn identical_sets_are_shared() {
    let text = (0..10)
        .map(|i| format!("  - {{name: p{i}, cgroup: /c{i}, bind: [{{ports: [80, 443]}}]}}\n"))
        .collect::<String>();
    let p = compiled(&format!("policies:\n{text}"));
    let ids: Vec<(u64, u32)> = (0..10).map(|i| (100 + i, 1)).collect();
    let mut m = FakeMaps::default();
    let mut a = Applier::new(CAPS);
    let r = a.apply(&mut m, &targets(&p, &ids)).unwrap();
    // Ten policies, one set (ports 80 and 443 share chunk 0).
    assert_eq!(r.sets_total, 1);
    assert_eq!(m.chunks.len(), 1);
    // Reapplying the same policy writes no sets.
    let r = a.apply(&mut m, &targets(&p, &ids)).unwrap();
    assert_eq!(r.sets_written, 0);
    assert_eq!(m.chunks.len(), 1);
}

#[test]
fn reload_flips_generation_and_garbage_collects() {
    let p1 = compiled("policies: [{name: a, cgroup: /a, bind: [{ports: [1000]}]}]");
    let p2 = compiled("policies: [{name: a, cgroup: /a, bind: [{ports: [2000]}]}]");
    let p3 = compiled("policies: [{name: a, cgroup: /a, bind: [{ports: [3000]}]}]");
    let mut m = FakeMaps::default();
    let mut a = Applier::new(CAPS);
    assert_eq!(m.state.generation, 0);
    a.apply(&mut m, &targets(&p1, &[(5, 1)])).unwrap();
    assert_eq!(m.state.generation, 1);
    assert_eq!(bind(&m, &[1, 5], 1000), Verdict::Allow);
    a.apply(&mut m, &targets(&p2, &[(5, 1)])).unwrap();
    assert_eq!(m.state.generation, 0);
    assert_eq!(bind(&m, &[1, 5], 1000), Verdict::Deny);
    assert_eq!(bind(&m, &[1, 5], 2000), Verdict::Allow);
    // p1's set is still held by the dead generation until the next apply.
    assert_eq!(m.chunks.len(), 2);
    a.apply(&mut m, &targets(&p3, &[(5, 1)])).unwrap();
    assert_eq!(
        m.chunks.len(),
        2,
        "p1's set collected, p2 kept for the dead generation"
    );
    assert_eq!(m.cgroups.len(), 2, "one entry per generation");
    // Clearing every policy ungoverns everything.
    a.apply(&mut m, &[]).unwrap();
    assert_eq!(bind(&m, &[1, 5], 1), Verdict::Ungoverned);
}

#[test]
fn failed_apply_leaves_the_live_policy_and_is_cleaned_up_later() {
    let p1 = compiled("policies: [{name: a, cgroup: /a, bind: [{ports: [1000]}]}]");
    let p2 = compiled(
        "policies: [{name: a, cgroup: /a, bind: [{ports: [2000, 30000]}]}, {name: b, cgroup: /b, bind: []}]",
    );
    let mut a = Applier::new(CAPS);
    let mut m = FakeMaps::default();
    a.apply(&mut m, &targets(&p1, &[(5, 1)])).unwrap();
    // Fail at every possible write of the second apply in turn.
    for fail_at in 0..10 {
        let mut m2 = FakeMaps {
            state: m.state,
            cgroups: m.cgroups.clone(),
            policies: m.policies.clone(),
            chunks: m.chunks.clone(),
            ..FakeMaps::default()
        };
        let mut a2 = Applier::new(CAPS);
        a2.apply(&mut FakeMaps::default(), &targets(&p1, &[(5, 1)]))
            .unwrap();
        m2.fail_at = Some(fail_at);
        let before = m2.state.generation;
        if a2.apply(&mut m2, &targets(&p2, &[(5, 1), (6, 1)])).is_err() {
            assert_eq!(m2.state.generation, before, "fail_at={fail_at}");
            assert_eq!(
                bind(&m2, &[1, 5], 1000),
                Verdict::Allow,
                "old policy in force"
            );
            assert_eq!(bind(&m2, &[1, 6], 1), Verdict::Ungoverned);
            // The next apply succeeds and leaves no debris.
            a2.apply(&mut m2, &targets(&p2, &[(5, 1), (6, 1)])).unwrap();
            assert_eq!(bind(&m2, &[1, 5], 2000), Verdict::Allow);
            assert_eq!(
                bind(&m2, &[1, 5], 30000),
                Verdict::Allow,
                "set fully written"
            );
            assert_eq!(bind(&m2, &[1, 6], 1), Verdict::Deny);
            a2.apply(&mut m2, &targets(&p2, &[(5, 1), (6, 1)])).unwrap();
            assert_eq!(m2.cgroups.len(), 4);
            assert_eq!(m2.chunks.len(), 2, "only p2's two-chunk set remains");
        }
    }
}

#[test]
fn capacity_is_checked_before_any_write() {
    let p = compiled(
        "policies: [{name: a, cgroup: /a, bind: [{ports: [\"1-65535\"]}]}, {name: b, cgroup: /b, bind: [{ports: [\"1-60000\"]}]}]",
    );
    let mut m = FakeMaps::default();
    let mut a = Applier::new(Capacity {
        cgroups: 64,
        policies: 16,
        chunks: 200,
    });
    let e = a
        .apply(&mut m, &targets(&p, &[(5, 1), (6, 1)]))
        .unwrap_err();
    assert!(e.to_string().contains("--max-port-chunks"), "{e}");
    assert_eq!(m.writes, 0);
    let mut a = Applier::new(Capacity {
        cgroups: 1,
        policies: 16,
        chunks: 1000,
    });
    let e = a
        .apply(&mut m, &targets(&p, &[(5, 1), (6, 1)]))
        .unwrap_err();
    assert!(e.to_string().contains("--max-cgroups"), "{e}");
    let mut a = Applier::new(Capacity {
        cgroups: 10,
        policies: 1,
        chunks: 1000,
    });
    let e = a
        .apply(&mut m, &targets(&p, &[(5, 1), (6, 1)]))
        .unwrap_err();
    assert!(e.to_string().contains("--max-policies"), "{e}");
    assert_eq!(m.writes, 0);
}

#[test]
fn a_reload_writes_only_what_changed() {
    let text = |port: u16| {
        let body: String = (0..100)
            .map(|i| {
                let p = if i == 7 { port } else { 1000 + i };
                format!("  - {{name: p{i}, cgroup: /c{i}, bind: [{{ports: [{p}]}}]}}\n")
            })
            .collect();
        format!("policies:\n{body}")
    };
    let ids: Vec<(u64, u32)> = (0..100).map(|i| (100 + i, 1)).collect();
    let caps = Capacity {
        cgroups: 128,
        policies: 128,
        chunks: 1024,
    };
    let (a1, a2, a3) = (
        compiled(&text(5000)),
        compiled(&text(6000)),
        compiled(&text(7000)),
    );
    let mut m = FakeMaps::default();
    let mut a = Applier::new(caps);
    let r = a.apply(&mut m, &targets(&a1, &ids)).unwrap();
    assert_eq!((r.records_written, r.cgroups_written), (100, 100));
    // The second apply fills the other generation from scratch.
    a.apply(&mut m, &targets(&a2, &ids)).unwrap();
    // From then on, one changed policy costs one record (plus its set).
    let before = m.writes;
    let r = a.apply(&mut m, &targets(&a3, &ids)).unwrap();
    assert_eq!((r.records_written, r.cgroups_written), (1, 0));
    assert!(m.writes - before <= 6, "{} writes", m.writes - before);
    assert_eq!(bind(&m, &[1, 107], 7000), Verdict::Allow);
    assert_eq!(bind(&m, &[1, 107], 6000), Verdict::Deny);
    assert_eq!(bind(&m, &[1, 150], 1050), Verdict::Allow);
    // Dropping a policy and adding another reuses nothing stale.
    // Policy ids are stable per name (as the agent's registry keeps them).
    fn by_name<'a>(ps: &'a [CompiledPolicy], ids: &[(u64, u32)]) -> Vec<Target<'a>> {
        let mut t = targets(ps, ids);
        for x in &mut t {
            x.policy_id = x.policy.name[1..].parse::<u32>().unwrap() + 1;
        }
        t
    }
    let fewer: Vec<CompiledPolicy> = a3[1..].to_vec();
    let r = a.apply(&mut m, &by_name(&fewer, &ids[1..])).unwrap();
    assert_eq!(bind(&m, &[1, 100], 1), Verdict::Ungoverned);
    // Generation 0 still held p7's record from two applies ago: one write.
    assert_eq!((r.records_written, r.cgroups_written), (1, 0), "{r:?}");
    let r = a.apply(&mut m, &by_name(&fewer, &ids[1..])).unwrap();
    assert_eq!(bind(&m, &[1, 100], 1), Verdict::Ungoverned);
    assert_eq!(bind(&m, &[1, 101], 1001), Verdict::Allow);
    // Generation 1 already matches: only p0's cgroup entry is deleted.
    assert_eq!((r.records_written, r.cgroups_written), (0, 0), "{r:?}");
}

#[test]
fn walk_is_bounded_by_the_deepest_policy() {
    let p = compiled("policies: [{name: a, cgroup: /a/b/c, bind: []}]");
    let mut m = FakeMaps::default();
    let mut a = Applier::new(CAPS);
    a.apply(&mut m, &targets(&p, &[(7, 3)])).unwrap();
    assert_eq!(m.state.max_level[1], 3);
    assert_eq!(m.state.min_level[1], 3);
    assert_eq!(bind(&m, &[1, 2, 3, 7, 8, 9], 1), Verdict::Deny);
}

#[test]
fn duplicate_cgroup_ids_are_rejected() {
    let p = compiled(
        "policies: [{name: a, cgroup: /a, bind: []}, {name: b, cgroup: /b, bind: []}, \
         {name: c, cgroup: /c, bind: []}]",
    );
    let mut m = FakeMaps::default();
    let e = Applier::new(CAPS)
        .apply(&mut m, &targets(&p, &[(5, 1), (7, 1), (7, 1)]))
        .unwrap_err();
    // The error names both policies (ids 2 and 3), and nothing is written.
    assert!(
        matches!(
            e,
            ApplyError::DuplicateCgroup {
                cgroup_id: 7,
                first: 2,
                second: 3
            }
        ),
        "{e:?}"
    );
    assert!(m.cgroups.is_empty());
}

/// The grace period after a flip starts at the flip, on a thread of its
/// own; the next apply collects it instead of waiting itself.
/// A sink whose reader barrier runs on the applier's thread of its own.
#[derive(Default)]
struct BarrierMaps {
    maps: FakeMaps,
    waits: usize,
}

static BARRIERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl RuleSink for BarrierMaps {
    fn put_chunk(&mut self, key: PortChunkKey, chunk: &PortChunk) -> Result<(), SinkError> {
        self.maps.put_chunk(key, chunk)
    }
    fn del_chunk(&mut self, key: PortChunkKey) -> Result<(), SinkError> {
        self.maps.del_chunk(key)
    }
    fn put_policy(&mut self, index: u32, record: &PolicyRecord) -> Result<(), SinkError> {
        self.maps.put_policy(index, record)
    }
    fn put_cgroup(&mut self, key: CgroupKey, value: CgroupValue) -> Result<(), SinkError> {
        self.maps.put_cgroup(key, value)
    }
    fn del_cgroup(&mut self, key: CgroupKey) -> Result<(), SinkError> {
        self.maps.del_cgroup(key)
    }
    fn put_state(&mut self, state: &State) -> Result<(), SinkError> {
        self.maps.put_state(state)
    }
    fn wait_for_readers(&mut self) -> bool {
        self.waits += 1;
        true
    }
    fn reader_barrier(&self) -> Option<fn() -> bool> {
        Some(|| {
            BARRIERS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            true
        })
    }
}

#[test]
fn the_reader_barrier_starts_at_the_flip() {
    let p = compiled(TWO);
    let ids = [(10, 1), (11, 2), (20, 1)];
    let mut m = BarrierMaps::default();
    let mut a = Applier::new(CAPS);
    let before = BARRIERS.load(std::sync::atomic::Ordering::SeqCst);
    for _ in 0..3 {
        a.apply(&mut m, &targets(&p, &ids)).unwrap();
    }
    assert_eq!(m.waits, 0, "no apply waited itself");
    assert!(BARRIERS.load(std::sync::atomic::Ordering::SeqCst) >= before + 2);
    assert!(!a.quiesce_unavailable);
    // The grace period is the guarantee: no time is added to it.
    assert_eq!(
        a.grace_waits, 0,
        "an apply waited out GRACE despite the barrier"
    );
    assert_eq!(bind(&m.maps, &[1, 10], 9000), Verdict::Allow);
}

/// Small sets ride in the record (the kernel then skips the port-set
/// lookup): what a record says inline must be exactly what its chunks say,
/// for every port, and a set too large to inline must be left to the chunks.
#[test]
fn small_sets_are_inline_and_say_what_their_chunks_say() {
    let p = compiled(
        "policies:
  - {name: one, cgroup: /a, bind: [{ports: [ephemeral, 8080]}], connect: [{ports: [\"30000-30100\"]}]}
  - {name: three, cgroup: /b, bind: [{ports: [22, 80, \"9000-9099\"]}]}
  - {name: sealed, cgroup: /c, bind: []}
",
    );
    let mut m = FakeMaps::default();
    let mut a = Applier::new(CAPS);
    a.apply(&mut m, &targets(&p, &[(10, 1), (20, 1), (30, 1)]))
        .unwrap();
    let (mut inline, mut looked_up) = (Vec::new(), 0);
    for rec in m.policies.values() {
        for (slot, &set) in rec.sets.iter().enumerate() {
            let in_record = rec.inline_contains(slot, 0).is_some();
            if set == EMPTY_SET {
                assert!(!in_record, "an empty slot is never inline");
                continue;
            }
            if in_record {
                inline.push(rec.inline_count[slot]);
            } else {
                looked_up += 1;
            }
            for port in 0..=u16::MAX {
                let chunks = m.contains(set, port);
                assert_eq!(
                    rec.inline_contains(slot, port).unwrap_or(chunks),
                    chunks,
                    "policy {} slot {slot} port {port}",
                    rec.policy_id
                );
            }
        }
    }
    // [30000-30100] (one range) and [ephemeral, 8080] (two) are inline in
    // every slot they fill; [22, 80, 9000-9099] is not.
    assert!(inline.contains(&1) && inline.contains(&2), "{inline:?}");
    assert!(
        looked_up > 0,
        "the three-range set must be left to the chunks"
    );
    assert_eq!(bind(&m, &[1, 10], 8080), Verdict::Allow);
    assert_eq!(bind(&m, &[1, 10], 8081), Verdict::Deny);
    assert_eq!(bind(&m, &[1, 20], 9050), Verdict::Allow);
    assert_eq!(bind(&m, &[1, 20], 81), Verdict::Deny);
}

/// Without a reader barrier (the fake's default, as where `membarrier` is
/// refused), an apply right after a flip waits out [`GRACE`] since the
/// flip before it rewrites the retired generation.
#[test]
fn without_a_reader_barrier_the_retired_generation_waits_out_grace() {
    let p = compiled(TWO);
    let ids = [(10, 1), (11, 2), (20, 1)];
    let mut m = FakeMaps::default();
    let mut a = Applier::new(CAPS);
    a.apply(&mut m, &targets(&p, &ids)).unwrap();
    let flipped = Instant::now();
    a.apply(&mut m, &targets(&p, &ids[..2])).unwrap();
    assert!(flipped.elapsed() >= GRACE - Duration::from_millis(1));
    assert!(a.quiesce_unavailable);
    assert_eq!(a.grace_waits, 1);
    // The second apply is live: `sealed` governs cgroup 20 no more.
    assert_eq!(bind(&m, &[1, 20], 9000), Verdict::Ungoverned);
}

/// Port 0 is no port a rule names: bit 0 of a set is `ephemeral`'s
/// marker. A port-0 query (an unbound listen() the BPF LSM judges before
/// the kernel picks its port) reads the marker only with `ephemeral_ok`;
/// without it (a port-0 bind whose port post_bind cannot follow) nothing
/// allows it, `ephemeral` or not. As the kernel's `slot_allows`.
#[test]
fn port_zero_reads_the_ephemeral_marker_only_when_asked_to() {
    let p = compiled(
        "policies:
  - {name: eph, cgroup: /e, bind: [{ports: [ephemeral, 8080]}]}
  - {name: fixed, cgroup: /f, bind: [{ports: [8080]}]}
",
    );
    let mut m = FakeMaps::default();
    let mut a = Applier::new(CAPS);
    a.apply(&mut m, &targets(&p, &[(10, 1), (20, 1)])).unwrap();
    let port0 = |ancestry: &[u64], ephemeral_ok| {
        m.decide(
            ancestry,
            Direction::Bind,
            Proto::Tcp,
            Family::Ipv4,
            AddrClass::Any,
            0,
            ephemeral_ok,
        )
    };
    assert_eq!(port0(&[1, 10], true), Verdict::Allow);
    assert_eq!(port0(&[1, 10], false), Verdict::Deny);
    assert_eq!(port0(&[1, 20], true), Verdict::Deny);
    assert_eq!(port0(&[1, 20], false), Verdict::Deny);
    assert_eq!(bind(&m, &[1, 10], 8080), Verdict::Allow);
}

#[test]
fn a_cgroup_governed_in_the_live_generation_is_kept_or_removed_by_the_next_applies() {
    let p = compiled(TWO);
    let mut m = FakeMaps::default();
    let mut a = Applier::new(CAPS);
    let t = targets(&p, &[(10, 1), (11, 2), (20, 1)]);
    a.apply(&mut m, &t).unwrap();
    a.unattached();
    // /p/d (id 13) inherits /p until it is given `child` (policy id 2).
    assert_eq!(bind(&m, &[1, 10, 13], 9000), Verdict::Allow);
    let d = ResolvedCgroup { id: 13, level: 2 };
    let generation = m.state.generation;
    assert!(a.govern_live(&mut m, d, 2).unwrap());
    assert_eq!(m.state.generation, generation, "no flip");
    assert_eq!(bind(&m, &[1, 10, 13], 22), Verdict::Allow);
    assert_eq!(bind(&m, &[1, 10, 13], 9000), Verdict::Audit);
    // What one insert cannot do is left to a full apply, and nothing is
    // written: a level the programs do not walk, a policy with no record, a
    // cgroup with an entry, a full generation.
    let writes = m.writes;
    for (cg, policy) in [
        (ResolvedCgroup { id: 14, level: 3 }, 2),
        (ResolvedCgroup { id: 14, level: 0 }, 2),
        (ResolvedCgroup { id: 14, level: 2 }, 9),
        (ResolvedCgroup { id: 11, level: 2 }, 1),
        (d, 1),
    ] {
        assert!(
            !a.govern_live(&mut m, cg, policy).unwrap(),
            "{cg:?} {policy}"
        );
    }
    let mut full = Applier::new(Capacity { cgroups: 3, ..CAPS });
    let mut m2 = FakeMaps::default();
    full.apply(&mut m2, &t).unwrap();
    assert!(!full.govern_live(&mut m2, d, 2).unwrap(), "generation full");
    assert_eq!(m.writes, writes);
    // Planned by the next apply: kept in the generation it writes.
    let mut planned = t.clone();
    planned[1].cgroups.to_mut().push(d);
    a.apply(&mut m, &planned).unwrap();
    assert_eq!(bind(&m, &[1, 10, 13], 9000), Verdict::Audit);
    // Not planned: gone from both generations after two applies.
    a.apply(&mut m, &t).unwrap();
    assert_eq!(bind(&m, &[1, 10, 13], 9000), Verdict::Allow);
    a.apply(&mut m, &t).unwrap();
    assert!(
        !m.cgroups.keys().any(|k| k.cgroup_id == 13),
        "{:?}",
        m.cgroups
    );
    // A failed insert is deleted again (the kernel may hold it), and the
    // mirror forgets it once the delete succeeded: it can be tried again.
    m.fail_at = Some(0);
    assert!(a.govern_live(&mut m, d, 2).is_err());
    assert!(
        !m.cgroups.keys().any(|k| k.cgroup_id == 13),
        "{:?}",
        m.cgroups
    );
    assert!(a.govern_live(&mut m, d, 2).unwrap());
    assert_eq!(bind(&m, &[1, 10, 13], 9000), Verdict::Audit);
}

mod cache;
mod plans;
