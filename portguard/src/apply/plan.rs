//! Step 1 of an apply: the [`Plan`] of what the retired generation must
//! hold (records, cgroup entries, port sets) and the capacity checks, before
//! anything is written. [`Applier::plan`] plans from every target;
//! [`Applier::plan_one`], for a change of one policy's rules or mode alone,
//! from the live generation's mirror with that policy's record replaced, in
//! work that does not grow with the number of policies and cgroups (but a
//! few comparisons).
//!
//! No sink here: nothing is written.

use std::sync::Arc;

use portguard_common::{
    CgroupKey, CgroupValue, EMPTY_SET, MAX_CGROUP_DEPTH, MODE_AUDIT, MODE_ENFORCE, PolicyRecord,
    PortChunk, SET_SLOTS,
};
use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};

use super::{Applier, ApplyError, Target};
use crate::policy::{DirectionSets, Mode, PortSet};

/// What the retired generation is to hold, and the port sets to write first.
pub(super) struct Plan {
    /// Policies planned (targets).
    pub(super) policies: usize,
    /// Record slot of each policy id.
    pub(super) slots: HashMap<u32, u32>,
    /// Records by slot.
    pub(super) records: HashMap<u32, PolicyRecord>,
    pub(super) cgroups: HashMap<CgroupKey, CgroupValue>,
    pub(super) min_level: u32,
    pub(super) max_level: u32,
    /// Sets no generation holds yet (ids from `next_set_id` on), with their
    /// chunks.
    pub(super) new_sets: Vec<(u32, Arc<PortSet>)>,
    pub(super) planned_chunks: HashMap<u32, Vec<(u32, PortChunk)>>,
    /// Set ids the records refer to.
    pub(super) gen_set_ids: HashSet<u32>,
    /// Sets alive once the retired generation holds the plan: the live
    /// generation's and this one's.
    pub(super) keep: HashSet<u32>,
    /// Records made afresh, to remember once committed
    /// ([`Applier::remembered`]).
    pub(super) made: Vec<(u32, Made)>,
}

#[cfg(debug_assertions)]
impl Plan {
    /// Panic unless `other` plans the same writes as this plan.
    pub(super) fn assert_same(&self, other: &Plan) {
        assert_eq!(self.policies, other.policies, "planned policies");
        assert_eq!(self.slots, other.slots, "planned slots");
        assert_eq!(self.records, other.records, "planned records");
        assert_eq!(self.cgroups, other.cgroups, "planned cgroups");
        assert_eq!(
            (self.min_level, self.max_level),
            (other.min_level, other.max_level),
            "planned levels"
        );
        let ids = |p: &Plan| p.new_sets.iter().map(|(id, _)| *id).collect::<Vec<_>>();
        assert_eq!(ids(self), ids(other), "planned new sets");
        assert_eq!(self.gen_set_ids, other.gen_set_ids, "planned set ids");
        assert_eq!(self.keep, other.keep, "sets kept");
    }
}

/// A record planned for a policy, and what it was made from: the same
/// rules (the same shared `DirectionSets`, held so that no other can take
/// their place), mode, socket kinds and slot make the same record while
/// the sets it names are alive (a set id is never given to other content).
/// Plans of thousands of policies whose rules did not change (a rescan)
/// take their records from here instead of making each again.
#[derive(Clone, Debug)]
pub(super) struct Made {
    bind: Option<Arc<[PortSet; 8]>>,
    connect: Option<Arc<[PortSet; 8]>>,
    mode: Mode,
    allow_sockets: u8,
    slot: u32,
    record: PolicyRecord,
}

impl Made {
    fn new(t: &Target<'_>, slot: u32, record: PolicyRecord) -> Self {
        Self {
            bind: t.policy.bind.as_ref().map(|d| Arc::clone(&d.0)),
            connect: t.policy.connect.as_ref().map(|d| Arc::clone(&d.0)),
            mode: t.policy.mode,
            allow_sockets: t.policy.allow_sockets,
            slot,
            record,
        }
    }

    /// Whether this is what target `t` in `slot` makes.
    fn made_from(&self, t: &Target<'_>, slot: u32) -> bool {
        fn same(a: Option<&Arc<[PortSet; 8]>>, b: Option<&DirectionSets>) -> bool {
            match (a, b) {
                (None, None) => true,
                (Some(a), Some(b)) => Arc::ptr_eq(a, &b.0),
                _ => false,
            }
        }
        self.slot == slot
            && self.record.policy_id == t.policy_id
            && self.mode == t.policy.mode
            && self.allow_sockets == t.policy.allow_sockets
            && same(self.bind.as_ref(), t.policy.bind.as_ref())
            && same(self.connect.as_ref(), t.policy.connect.as_ref())
    }
}

/// Set ids for planned records: a set already in the kernel keeps its id
/// (content-addressed, whichever policy or generation it came from), a new
/// one takes the next free id.
struct SetIds<'a> {
    by_content: &'a HashMap<Arc<PortSet>, u32>,
    planned: HashMap<Arc<PortSet>, u32>,
    new_sets: Vec<(u32, Arc<PortSet>)>,
    next_id: u32,
    /// Policies compiled from identical rules share one `DirectionSets`
    /// allocation: its set ids, resolved once.
    dirs: HashMap<usize, [u32; 8]>,
    /// Every id handed out but [`EMPTY_SET`].
    used: HashSet<u32>,
}

impl SetIds<'_> {
    fn id(&mut self, set: &PortSet) -> u32 {
        if set.is_empty() {
            return EMPTY_SET;
        }
        let id = if let Some(&id) = self.by_content.get(set) {
            id
        } else if let Some(&id) = self.planned.get(set) {
            id
        } else {
            let id = self.next_id;
            self.next_id += 1;
            let content = Arc::new(set.clone());
            self.planned.insert(Arc::clone(&content), id);
            self.new_sets.push((id, content));
            id
        };
        self.used.insert(id);
        id
    }

    /// The kernel record of target `t` in slot `slot`.
    fn record(&mut self, t: &Target<'_>, slot: u32) -> PolicyRecord {
        let mut rec = PolicyRecord {
            policy_id: t.policy_id,
            mode: match t.policy.mode {
                Mode::Enforce => MODE_ENFORCE,
                Mode::Audit => MODE_AUDIT,
            },
            bind_restricted: u8::from(t.policy.bind.is_some()),
            connect_restricted: u8::from(t.policy.connect.is_some()),
            allow_sockets: t.policy.allow_sockets,
            sets: [EMPTY_SET; SET_SLOTS],
            slot,
            ..PolicyRecord::default()
        };
        let dirs: [(usize, Option<&DirectionSets>); 2] =
            [(0, t.policy.bind.as_ref()), (8, t.policy.connect.as_ref())];
        for (first, sets) in dirs {
            if let Some(sets) = sets {
                let key = Arc::as_ptr(&sets.0) as usize;
                let ids = match self.dirs.get(&key) {
                    Some(ids) => *ids,
                    None => {
                        let mut ids = [EMPTY_SET; 8];
                        for (j, set) in sets.0.iter().enumerate() {
                            ids[j] = self.id(set);
                        }
                        self.dirs.insert(key, ids);
                        ids
                    }
                };
                rec.sets[first..first + 8].copy_from_slice(&ids);
                // Small sets also inline, where the kernel reads them first.
                for (j, set) in sets.0.iter().enumerate() {
                    rec.set_inline(first + j, set.ranges());
                }
            }
        }
        rec
    }
}

/// The cgroup entries of a plan, as its targets are added, and their
/// levels.
struct Entries {
    gen_: usize,
    base: u32,
    cgroups: HashMap<CgroupKey, CgroupValue>,
    min_level: u32,
    max_level: u32,
}

impl Entries {
    fn new(gen_: usize, base: u32, expect: usize) -> Self {
        Self {
            gen_,
            base,
            // Sized for what the live generation governs (thousands of
            // entries grown one rehash at a time cost more than the inserts).
            cgroups: HashMap::with_capacity_and_hasher(expect, Default::default()),
            min_level: MAX_CGROUP_DEPTH,
            max_level: 0,
        }
    }

    /// Target `t`'s cgroups, governed by its record in `slot`.
    fn add(
        &mut self,
        t: &Target<'_>,
        slot: u32,
        slots: &HashMap<u32, u32>,
    ) -> Result<(), ApplyError> {
        for cg in t.cgroups.iter() {
            if cg.level >= MAX_CGROUP_DEPTH {
                return Err(ApplyError::TooDeep {
                    cgroup_id: cg.id,
                    level: cg.level,
                    max: MAX_CGROUP_DEPTH - 1,
                });
            }
            self.max_level = self.max_level.max(cg.level);
            self.min_level = self.min_level.min(cg.level);
            let key = CgroupKey {
                cgroup_id: cg.id,
                generation: self.gen_ as u32,
                _pad: 0,
            };
            let value = CgroupValue {
                policy_index: self.base + slot,
            };
            // One map for both: a second policy for a cgroup finds the
            // first one's entry (its slot names it).
            if let Some(prev) = self.cgroups.insert(key, value) {
                let first_slot = prev.policy_index - self.base;
                let first = slots
                    .iter()
                    .find_map(|(id, s)| (*s == first_slot).then_some(*id))
                    .unwrap_or(t.policy_id);
                return Err(ApplyError::DuplicateCgroup {
                    cgroup_id: cg.id,
                    first,
                    second: t.policy_id,
                });
            }
        }
        Ok(())
    }

    /// The entries and their lowest and highest levels, if they fit.
    #[allow(clippy::type_complexity)]
    fn done(self, max: u32) -> Result<(HashMap<CgroupKey, CgroupValue>, u32, u32), ApplyError> {
        if self.cgroups.len() > max as usize {
            return Err(ApplyError::Capacity {
                what: "governed cgroups",
                needed: self.cgroups.len(),
                max,
                flag: "--max-cgroups",
            });
        }
        let min_level = if self.cgroups.is_empty() {
            0
        } else {
            self.min_level
        };
        Ok((self.cgroups, min_level, self.max_level))
    }
}

impl Applier {
    /// The generation an apply writes (the retired one) and its first
    /// record index.
    pub(super) fn dead_generation(&self) -> (usize, u32) {
        let gen_ = 1 - (self.state.generation & 1) as usize;
        (gen_, gen_ as u32 * self.caps.policies)
    }

    fn set_ids(&self) -> SetIds<'_> {
        SetIds {
            by_content: &self.by_content,
            planned: HashMap::default(),
            new_sets: Vec::new(),
            next_id: self.next_set_id,
            dirs: HashMap::default(),
            used: HashSet::default(),
        }
    }

    /// Slots for `targets`: kept for policies that already have one, the
    /// lowest free ones for new policies.
    fn assign_slots(&self, targets: &[Target<'_>]) -> HashMap<u32, u32> {
        let mut out = HashMap::with_capacity_and_hasher(targets.len(), Default::default());
        let mut used = HashSet::default();
        for t in targets {
            if let Some(&s) = self.slots.get(&t.policy_id) {
                out.insert(t.policy_id, s);
                used.insert(s);
            }
        }
        let mut next = 0u32;
        for t in targets {
            if out.contains_key(&t.policy_id) {
                continue;
            }
            while used.contains(&next) {
                next += 1;
            }
            out.insert(t.policy_id, next);
            used.insert(next);
        }
        out
    }

    /// Plan `targets` as the whole policy set.
    pub(super) fn plan(&self, targets: &[Target<'_>]) -> Result<Plan, ApplyError> {
        let (gen_, base) = self.dead_generation();
        if targets.len() > self.caps.policies as usize {
            return Err(ApplyError::Capacity {
                what: "policies",
                needed: targets.len(),
                max: self.caps.policies,
                flag: "--max-policies",
            });
        }
        let slots = self.assign_slots(targets);
        let mut sets = self.set_ids();
        let mut records: HashMap<u32, PolicyRecord> =
            HashMap::with_capacity_and_hasher(targets.len(), Default::default());
        let expect = self.gen_cgroups[1 - gen_].len().max(targets.len());
        let mut entries = Entries::new(gen_, base, expect);
        let mut made = Vec::new();
        for t in targets {
            let slot = slots[&t.policy_id];
            if slot >= self.caps.policies {
                return Err(ApplyError::Capacity {
                    what: "policy slots",
                    needed: slot as usize + 1,
                    max: self.caps.policies,
                    flag: "--max-policies",
                });
            }
            let remembered = self.remembered.get(&t.policy_id).filter(|m| {
                m.made_from(t, slot)
                    && m.record
                        .sets
                        .iter()
                        .all(|id| *id == EMPTY_SET || self.sets.contains_key(id))
            });
            let record = match remembered {
                Some(m) => {
                    sets.used
                        .extend(m.record.sets.iter().copied().filter(|id| *id != EMPTY_SET));
                    m.record
                }
                None => {
                    let record = sets.record(t, slot);
                    made.push((t.policy_id, Made::new(t, slot, record)));
                    record
                }
            };
            records.insert(slot, record);
            entries.add(t, slot, &slots)?;
        }
        let (cgroups, min_level, max_level) = entries.done(self.caps.cgroups)?;
        let SetIds { new_sets, used, .. } = sets;
        self.with_sets(Plan {
            policies: targets.len(),
            slots,
            records,
            cgroups,
            min_level,
            max_level,
            new_sets,
            planned_chunks: HashMap::default(),
            gen_set_ids: used,
            keep: HashSet::default(),
            made,
        })
    }

    /// [`Applier::plan`] of `targets` whose policies are, id for id, those
    /// the live generation holds records for (the same rules, mode and
    /// socket kinds, on the caller's word: a rescan applying the policies in
    /// force again), so that only the cgroups they govern may differ. The
    /// records, their slots and sets are the live generation's, copied
    /// whole, instead of each target's looked up: work that grows with the
    /// cgroups only. `None` when the targets are not the live policy set
    /// (a policy with no live record, or a live one with no target);
    /// [`Applier::plan`] applies then.
    pub(super) fn plan_cgroups(&self, targets: &[Target<'_>]) -> Option<Result<Plan, ApplyError>> {
        let live = (self.state.generation & 1) as usize;
        if targets.len() != self.slots.len() {
            return None;
        }
        let (gen_, base) = self.dead_generation();
        let expect = self.gen_cgroups[live].len().max(targets.len());
        let mut entries = Entries::new(gen_, base, expect);
        // One target per live slot: two with one id (a policy of the file
        // named like a built-in) would leave a live policy out.
        let mut seen = vec![false; self.caps.policies as usize];
        for t in targets {
            let slot = *self.slots.get(&t.policy_id)?;
            if std::mem::replace(seen.get_mut(slot as usize)?, true) {
                return None;
            }
            if let Err(e) = entries.add(t, slot, &self.slots) {
                return Some(Err(e));
            }
        }
        let records = self.live_records()?;
        let (cgroups, min_level, max_level) = match entries.done(self.caps.cgroups) {
            Ok(done) => done,
            Err(e) => return Some(Err(e)),
        };
        Some(self.with_sets(Plan {
            policies: targets.len(),
            slots: self.slots.clone(),
            records,
            cgroups,
            min_level,
            max_level,
            new_sets: Vec::new(),
            planned_chunks: HashMap::default(),
            gen_set_ids: self.gen_sets[live].clone(),
            keep: HashSet::default(),
            made: Vec::new(),
        }))
    }

    /// Plan the policy set last applied with `target` in place of the policy
    /// of the same id: its rules or mode may differ, its cgroups must not.
    /// `None` when that does not hold as far as the live generation shows
    /// (no such policy, other cgroups); [`Applier::plan`] applies then.
    pub(super) fn plan_one(&self, target: &Target<'_>) -> Option<Result<Plan, ApplyError>> {
        let live = (self.state.generation & 1) as usize;
        let live_base = live as u32 * self.caps.policies;
        let (gen_, base) = self.dead_generation();
        let slot = *self.slots.get(&target.policy_id)?;
        let old = *self.gen_records[live].get(&slot)?;
        let governs = |cgroup_id| {
            self.gen_cgroups[live].get(&CgroupKey {
                cgroup_id,
                generation: live as u32,
                _pad: 0,
            }) == Some(&CgroupValue {
                policy_index: live_base + slot,
            })
        };
        let mine = self.gen_cgroups[live]
            .values()
            .filter(|v| v.policy_index == live_base + slot)
            .count();
        if mine != target.cgroups.len() || !target.cgroups.iter().all(|c| governs(c.id)) {
            return None;
        }
        // The live generation's records and cgroup entries, in the retired
        // generation's index space.
        let mut records = self.live_records()?;
        let mut sets = self.set_ids();
        let rec = sets.record(target, slot);
        records.insert(slot, rec);
        let cgroups: HashMap<CgroupKey, CgroupValue> = self.gen_cgroups[live]
            .iter()
            .map(|(k, v)| {
                let key = CgroupKey {
                    generation: gen_ as u32,
                    ..*k
                };
                let value = CgroupValue {
                    policy_index: v.policy_index - live_base + base,
                };
                (key, value)
            })
            .collect();
        // Its sets replace the old record's, unless another record uses them.
        let SetIds { new_sets, used, .. } = sets;
        let mut gen_set_ids = self.gen_sets[live].clone();
        gen_set_ids.extend(used);
        let mut dropped: Vec<u32> = old
            .sets
            .into_iter()
            .filter(|s| *s != EMPTY_SET && !rec.sets.contains(s))
            .collect();
        dropped.sort_unstable();
        dropped.dedup();
        for set in dropped {
            if !records.values().any(|r| r.sets.contains(&set)) {
                gen_set_ids.remove(&set);
            }
        }
        Some(self.with_sets(Plan {
            policies: self.slots.len(),
            slots: self.slots.clone(),
            records,
            cgroups,
            min_level: self.state.min_level[live],
            max_level: self.state.max_level[live],
            new_sets,
            planned_chunks: HashMap::default(),
            gen_set_ids,
            keep: HashSet::default(),
            made: vec![(target.policy_id, Made::new(target, slot, rec))],
        }))
    }

    /// The live generation's records of the live policies, by slot
    /// (`None` if one is missing). Every live slot has its record there,
    /// beside records of slots since freed, if any: then copied one by one.
    fn live_records(&self) -> Option<HashMap<u32, PolicyRecord>> {
        let live = &self.gen_records[(self.state.generation & 1) as usize];
        if live.len() == self.slots.len() {
            return Some(live.clone());
        }
        let mut records = HashMap::with_capacity_and_hasher(self.slots.len(), Default::default());
        for s in self.slots.values() {
            records.insert(*s, *live.get(s)?);
        }
        Some(records)
    }

    /// Complete `plan` with the sets to keep and the chunks of the new ones,
    /// and check that they fit.
    fn with_sets(&self, mut plan: Plan) -> Result<Plan, ApplyError> {
        let live = (self.state.generation & 1) as usize;
        plan.keep = self.gen_sets[live]
            .union(&plan.gen_set_ids)
            .copied()
            .collect();
        plan.planned_chunks = plan
            .new_sets
            .iter()
            .map(|(id, content)| (*id, content.chunks()))
            .collect();
        let chunks_needed: usize = plan
            .keep
            .iter()
            .map(|id| {
                self.sets.get(id).map_or_else(
                    || plan.planned_chunks.get(id).map_or(0, Vec::len),
                    |s| s.chunks.len(),
                )
            })
            .sum();
        if chunks_needed > self.caps.chunks as usize {
            return Err(ApplyError::Capacity {
                what: "port-set chunks (512 ports each)",
                needed: chunks_needed,
                max: self.caps.chunks,
                flag: "--max-port-chunks",
            });
        }
        Ok(plan)
    }
}
