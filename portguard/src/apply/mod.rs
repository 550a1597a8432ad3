//! Writes compiled policies into the kernel maps, whole or not at all.
//!
//! [`Applier`] mirrors what the kernel maps hold and turns a new policy set
//! into map writes through the narrow [`RuleSink`] trait, so the update logic
//! (generations, set sharing, capacity checks, partial failures) is unit-tested
//! with [`fake::FakeMaps`] and no kernel. The aya-backed sink is
//! `kernel::KernelMaps`.
//!
//! An apply:
//! 1. plans every record, set and cgroup entry and checks capacity before
//!    writing anything (a full map is an error naming the flag to raise;
//!    `plan`): from every target ([`Applier::apply`]), or, when one policy's
//!    rules or mode changed alone, from the live generation with that
//!    policy's record replaced ([`Applier::apply_one`]);
//! 2. waits until no program can still be running on the generation about
//!    to be reused: an RCU grace period (cgroup programs run inside an RCU
//!    read-side section, so after one no program that read the old
//!    `generation` is still running, however long it was preempted), started
//!    on a thread of its own at the previous flip
//!    ([`RuleSink::reader_barrier`]) or waited for here
//!    ([`RuleSink::wait_for_readers`]); only where the sink has no such
//!    barrier (`membarrier` refused under nohz_full, or a no-op with one
//!    CPU online), time alone, at least
//!    [`GRACE`] since that flip;
//! 3. brings the dead generation from what it holds (the policy before the
//!    live one) to the new policy, writing only the difference: cgroup entries
//!    and records that are already right are left alone, so a reload that
//!    changes one policy costs a handful of map writes whatever the number of
//!    governed cgroups (each policy keeps its record slot across reloads);
//! 4. writes new port sets first (content-addressed: a set already in the
//!    kernel is reused, whichever policy or generation it came from) and
//!    frees sets neither generation uses any more;
//! 5. flips `State::generation` with one map update.
//!
//! A failure in steps 3-4 leaves the live generation untouched (enforcement
//! continues on the old policy) and is tracked, so the next apply cleans up.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use portguard_common::{
    CHUNKS_PER_SET, CgroupKey, CgroupValue, EMPTY_SET, PolicyRecord, PortChunk, PortChunkKey, State,
};

use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};

use crate::policy::{CompiledPolicy, PortSet};

mod capacity;
mod plan;
mod sink;
pub use capacity::Capacity;
use plan::Plan;
pub use sink::{RuleSink, SinkError};

/// Minimum time between a flip and the next rewrite of the generation it
/// retired, where no RCU grace period can be waited for (the sink's barrier
/// failed). BPF programs run in microseconds; this is a wide margin for a
/// preempted one. With the barrier, the grace period is the guarantee and
/// no time is added to it.
pub const GRACE: Duration = Duration::from_millis(50);

/// A cgroup a policy applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResolvedCgroup {
    pub id: u64,
    /// Depth below the cgroup2 root (the root is level 0).
    pub level: u32,
}

/// One policy to apply and where.
#[derive(Clone, Debug)]
pub struct Target<'a> {
    /// Stable id reported in events.
    pub policy_id: u32,
    pub policy: &'a CompiledPolicy,
    /// Empty when the policy's cgroup does not exist (yet).
    /// Borrowed where the caller holds them (thousands of targets: no
    /// allocation each).
    pub cgroups: std::borrow::Cow<'a, [ResolvedCgroup]>,
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(
        "policy needs {needed} {what} but the kernel maps hold at most {max}; \
         restart the agent with a larger {flag}"
    )]
    Capacity {
        what: &'static str,
        needed: usize,
        max: u32,
        flag: &'static str,
    },
    #[error("cgroup id {cgroup_id} is claimed by both policy id {first} and {second}")]
    DuplicateCgroup {
        cgroup_id: u64,
        first: u32,
        second: u32,
    },
    #[error("cgroup id {cgroup_id} is {level} levels deep; the kernel walks at most {max}")]
    TooDeep {
        cgroup_id: u64,
        level: u32,
        max: u32,
    },
    #[error("writing the new policy generation failed (the previous policy stays in force): {0}")]
    Sink(#[from] SinkError),
    #[error(
        "attaching the decision programs where the new policy governs failed (the previous \
         policy stays in force): {0}"
    )]
    Attach(String),
}

struct SetEntry {
    content: Arc<PortSet>,
    chunks: Vec<u32>,
}

/// What an apply did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplyReport {
    pub generation: u32,
    pub policies: usize,
    pub cgroups: usize,
    pub sets_written: usize,
    pub sets_deleted: usize,
    /// Distinct port sets and chunks live after the apply (both generations).
    pub sets_total: usize,
    pub chunks_total: usize,
    /// Map writes of policy records and cgroup entries this apply needed.
    pub records_written: usize,
    pub cgroups_written: usize,
}

/// Userspace mirror of the kernel maps.
pub struct Applier {
    caps: Capacity,
    state: State,
    /// Cgroup entries present in the kernel, per generation.
    gen_cgroups: [HashMap<CgroupKey, CgroupValue>; 2],
    /// Records present in the kernel, per generation, by slot.
    gen_records: [HashMap<u32, PolicyRecord>; 2],
    /// Set ids referenced by each generation's live records.
    gen_sets: [HashSet<u32>; 2],
    sets: HashMap<u32, SetEntry>,
    by_content: HashMap<Arc<PortSet>, u32>,
    next_set_id: u32,
    /// Record slot of each policy id; stable while the policy exists.
    slots: HashMap<u32, u32>,
    /// The record last committed for each policy id, with what it was made
    /// from ([`plan::Made`]).
    remembered: HashMap<u32, plan::Made>,
    last_flip: Option<Instant>,
    /// An RCU grace period has passed since `last_flip`.
    readers_quiesced: bool,
    /// The sink's reader barrier, started at `last_flip` on a thread of its
    /// own ([`RuleSink::reader_barrier`]); its answer is collected by the
    /// next apply.
    barrier: Option<std::thread::JoinHandle<bool>>,
    /// The sink could not wait for readers (reported once by the agent).
    pub quiesce_unavailable: bool,
    /// Applies that waited out [`GRACE`] for want of a reader barrier.
    pub grace_waits: u64,
}

impl Applier {
    /// A mirror of freshly created (all-zero) maps: generation 0 live, empty.
    pub fn new(caps: Capacity) -> Self {
        Self {
            caps,
            state: State::default(),
            gen_cgroups: Default::default(),
            gen_records: Default::default(),
            gen_sets: Default::default(),
            sets: HashMap::default(),
            by_content: HashMap::default(),
            next_set_id: EMPTY_SET + 1,
            slots: HashMap::default(),
            remembered: HashMap::default(),
            last_flip: None,
            readers_quiesced: false,
            barrier: None,
            quiesce_unavailable: false,
            grace_waits: 0,
        }
    }

    /// A mirror of maps another agent filled (pinned state adopted after a
    /// restart): the live generation, the cgroup entries and records of both
    /// generations, and the port sets, as read back from the kernel. Only
    /// records some cgroup entry points at are mirrored (no program can
    /// reach the others), so the next apply rewrites whatever it needs and
    /// frees the sets neither generation uses. The grace period starts now:
    /// the previous agent may have flipped an instant ago.
    pub fn from_kernel(
        caps: Capacity,
        state: State,
        cgroups: impl IntoIterator<Item = (CgroupKey, CgroupValue)>,
        record_at: impl Fn(u32) -> Option<PolicyRecord>,
        chunks: impl IntoIterator<Item = (PortChunkKey, PortChunk)>,
    ) -> Self {
        let mut a = Self::new(caps);
        a.state = state;
        for (key, value) in cgroups {
            let g = (key.generation & 1) as usize;
            a.gen_cgroups[g].insert(key, value);
            let index = value.policy_index;
            let slot = index % caps.policies.max(1);
            if index / caps.policies.max(1) != g as u32 || a.gen_records[g].contains_key(&slot) {
                continue;
            }
            if let Some(rec) = record_at(index) {
                for &set in &rec.sets {
                    if set != EMPTY_SET {
                        a.gen_sets[g].insert(set);
                    }
                }
                a.gen_records[g].insert(slot, rec);
            }
        }
        let live = (a.state.generation & 1) as usize;
        for (slot, rec) in &a.gen_records[live] {
            a.slots.insert(rec.policy_id, *slot);
        }
        let mut by_set: HashMap<u32, Vec<(u32, PortChunk)>> = HashMap::default();
        for (key, chunk) in chunks {
            by_set
                .entry(key.set_id)
                .or_default()
                .push((key.chunk, chunk));
        }
        for (id, mut chunks) in by_set {
            chunks.sort_unstable_by_key(|(c, _)| *c);
            let content = Arc::new(PortSet::from_chunks(&chunks));
            a.next_set_id = a.next_set_id.max(id + 1);
            // Two ids with one content (cannot happen through `apply`): keep
            // one for sharing; the other is freed once unused.
            a.by_content.entry(Arc::clone(&content)).or_insert(id);
            a.sets.insert(
                id,
                SetEntry {
                    content,
                    chunks: chunks.iter().map(|(c, _)| *c).collect(),
                },
            );
        }
        a.last_flip = Some(Instant::now());
        a
    }

    pub const fn capacity(&self) -> Capacity {
        self.caps
    }

    pub const fn live_generation(&self) -> u32 {
        self.state.generation
    }

    /// Promise that no program is attached yet, so the next apply need not
    /// wait for a grace period. Used at start-up to fill both generations
    /// before attaching, which keeps even the first reload incremental.
    pub fn unattached(&mut self) {
        self.last_flip = None;
        self.barrier = None;
    }

    /// Publish the host's ephemeral port range (`State::ephemeral`, packed
    /// `low << 16 | high`) if it changed: one state write, the generation
    /// unchanged. Returns whether it wrote.
    pub fn set_ephemeral<S: RuleSink>(
        &mut self,
        sink: &mut S,
        (low, high): (u16, u16),
    ) -> Result<bool, SinkError> {
        let packed = (u32::from(low) << 16) | u32::from(high);
        if self.state.ephemeral == packed {
            return Ok(false);
        }
        let mut state = self.state;
        state.ephemeral = packed;
        sink.put_state(&state)?;
        self.state = state;
        Ok(true)
    }

    pub fn chunks_in_use(&self) -> usize {
        self.sets.values().map(|s| s.chunks.len()).sum()
    }

    /// The record slot of a policy id, while the policy exists.
    pub fn slot_of(&self, policy_id: u32) -> Option<u32> {
        self.slots.get(&policy_id).copied()
    }

    /// Replace the live policy set with `targets`, atomically.
    pub fn apply<S: RuleSink>(
        &mut self,
        sink: &mut S,
        targets: &[Target<'_>],
    ) -> Result<ApplyReport, ApplyError> {
        let plan = self.plan(targets)?;
        self.commit(sink, plan)
    }

    /// [`Applier::apply`] of `targets` whose policies are, id for id, the
    /// ones the live generation holds (the same rules, mode and socket
    /// kinds: the policies in force applied again over other cgroups, as a
    /// rescan does; the caller's word). The same writes and report, planned
    /// from the live generation's records instead of from every target's
    /// policy ([`Applier::plan_cgroups`]); when the targets are not the live
    /// policy set, as [`Applier::apply`]. Debug builds plan both ways and
    /// check that they agree.
    pub fn apply_again<S: RuleSink>(
        &mut self,
        sink: &mut S,
        targets: &[Target<'_>],
    ) -> Result<ApplyReport, ApplyError> {
        let plan = match self.plan_cgroups(targets) {
            Some(plan) => {
                let plan = plan?;
                #[cfg(debug_assertions)]
                match self.plan(targets) {
                    Ok(full) => full.assert_same(&plan),
                    Err(e) => panic!("planned from the live generation, but not in full: {e}"),
                }
                plan
            }
            None => self.plan(targets)?,
        };
        self.commit(sink, plan)
    }

    /// [`Applier::apply`] of the targets last applied with `target` in place
    /// of the one with its policy id, when only its policy's rules or mode
    /// changed (the same cgroups): the same writes and report, planned from
    /// the live generation instead of from every target
    /// ([`Applier::plan_one`]). `None`: the live generation does not show
    /// that policy with those cgroups; nothing was done.
    pub fn apply_one<S: RuleSink>(
        &mut self,
        sink: &mut S,
        target: &Target<'_>,
    ) -> Option<Result<ApplyReport, ApplyError>> {
        let plan = match self.plan_one(target)? {
            Ok(plan) => plan,
            Err(e) => return Some(Err(e)),
        };
        Some(self.commit(sink, plan))
    }

    /// Let policy `policy_id` govern one more cgroup in the **live**
    /// generation, now: one cgroup-map insert, no flip, no wait. For a
    /// cgroup that just appeared (a hook's "govern this cgroup now"), ahead
    /// of the full apply that follows and plans it like any other: the
    /// mirror holds the entry, so that apply keeps or removes it as it
    /// resolves.
    ///
    /// Programs see the entry from the insert on (a hash-map insert is
    /// atomic for readers). `Ok(false)`, nothing written, where one insert
    /// cannot do it: the policy has no record in the live generation, the
    /// cgroup has an entry there already, the generation governs nothing
    /// (programs stop at `State::cgroups == 0`) or is full, or the cgroup's
    /// level is outside the levels the programs walk for it
    /// (`State::min_level..=max_level`; changing those is a state write,
    /// which only a flip may make).
    pub fn govern_live<S: RuleSink>(
        &mut self,
        sink: &mut S,
        cgroup: ResolvedCgroup,
        policy_id: u32,
    ) -> Result<bool, SinkError> {
        let live = (self.state.generation & 1) as usize;
        let Some(&slot) = self.slots.get(&policy_id) else {
            return Ok(false);
        };
        let key = CgroupKey {
            cgroup_id: cgroup.id,
            generation: live as u32,
            _pad: 0,
        };
        let entries = &self.gen_cgroups[live];
        if !self.gen_records[live].contains_key(&slot)
            || entries.contains_key(&key)
            || self.state.cgroups[live] == 0
            || entries.len() >= self.caps.cgroups as usize
            || !(self.state.min_level[live]..=self.state.max_level[live]).contains(&cgroup.level)
        {
            return Ok(false);
        }
        let value = CgroupValue {
            policy_index: live as u32 * self.caps.policies + slot,
        };
        // Mirrored before the write: should it fail, the kernel may hold it
        // (the mirror says so until a delete succeeds); the apply that next
        // rewrites this generation removes it unless it is planned.
        self.gen_cgroups[live].insert(key, value);
        if let Err(e) = sink.put_cgroup(key, value) {
            if sink.del_cgroup(key).is_ok() {
                self.gen_cgroups[live].remove(&key);
            }
            return Err(e);
        }
        // Cached answers go stale here (State::epoch), or the insert is undone.
        let mut state = self.state;
        state.epoch = portguard_common::next_epoch(state.epoch);
        if let Err(e) = sink.put_state(&state) {
            if sink.del_cgroup(key).is_ok() {
                self.gen_cgroups[live].remove(&key);
            }
            return Err(e);
        }
        self.state = state;
        Ok(true)
    }

    /// Steps 2 to 4: wait for the readers of the retired generation, bring
    /// it to `plan`, flip.
    fn commit<S: RuleSink>(&mut self, sink: &mut S, plan: Plan) -> Result<ApplyReport, ApplyError> {
        let Plan {
            policies,
            slots,
            records,
            cgroups,
            min_level,
            max_level,
            new_sets,
            planned_chunks,
            gen_set_ids,
            keep,
            made,
        } = plan;
        let (gen_, base) = self.dead_generation();

        // 2. Grace period since the last flip: every program that could have
        // read the retired generation has finished.
        if let Some(t) = self.last_flip
            && !self.readers_quiesced
        {
            // Started at the flip (usually over by now), or here.
            let quiesced = match self.barrier.take() {
                Some(started) => started.join().unwrap_or(false),
                None => sink.wait_for_readers(),
            };
            if !quiesced {
                // No RCU barrier here: GRACE alone (a program preempted
                // for longer could still see the generation change).
                self.quiesce_unavailable = true;
                let since = t.elapsed();
                if since < GRACE {
                    self.grace_waits += 1;
                    std::thread::sleep(GRACE - since);
                }
            }
            self.readers_quiesced = true;
        }

        // 3. Bring the dead generation to the plan, writing only differences.
        // Stale cgroup entries go first (frees map capacity).
        let stale: Vec<CgroupKey> = self.gen_cgroups[gen_]
            .keys()
            .filter(|k| !cgroups.contains_key(k))
            .copied()
            .collect();
        for key in stale {
            sink.del_cgroup(key)?;
            self.gen_cgroups[gen_].remove(&key);
        }
        // From here the dead generation's records may point at any set in
        // `keep`; sets outside it are referenced by nothing that can go live.
        self.gen_sets[gen_] = gen_set_ids;
        let mut sets_deleted = 0;
        let doomed: Vec<u32> = self
            .sets
            .keys()
            .filter(|id| !keep.contains(id))
            .copied()
            .collect();
        for id in doomed {
            self.delete_set(sink, id)?;
            sets_deleted += 1;
        }
        // New sets, before any record refers to them. Tracked as soon as their
        // first chunk may exist, so a failure is cleaned up by the next apply.
        let sets_written = new_sets.len();
        for (id, content) in new_sets {
            let chunks = planned_chunks.get(&id).cloned().unwrap_or_default();
            self.sets.insert(
                id,
                SetEntry {
                    content: Arc::clone(&content),
                    chunks: chunks.iter().map(|(c, _)| *c).collect(),
                },
            );
            self.next_set_id = self.next_set_id.max(id + 1);
            for (c, chunk) in &chunks {
                sink.put_chunk(
                    PortChunkKey {
                        set_id: id,
                        chunk: *c,
                    },
                    chunk,
                )?;
            }
            // Only a completely written set may be shared by later applies.
            self.by_content.insert(content, id);
        }
        let mut records_written = 0;
        for (slot, rec) in &records {
            if self.gen_records[gen_].get(slot) != Some(rec) {
                // Forget first: if the write fails the kernel value is unknown.
                self.gen_records[gen_].remove(slot);
                sink.put_policy(base + slot, rec)?;
                self.gen_records[gen_].insert(*slot, *rec);
                records_written += 1;
            }
        }
        let mut cgroups_written = 0;
        for (key, value) in &cgroups {
            if self.gen_cgroups[gen_].get(key) != Some(value) {
                self.gen_cgroups[gen_].remove(key);
                sink.put_cgroup(*key, *value)?;
                self.gen_cgroups[gen_].insert(*key, *value);
                cgroups_written += 1;
            }
        }

        // 4. Publish: bounds for the new generation first, then the flip.
        let mut state = self.state;
        state.min_level[gen_] = min_level;
        state.max_level[gen_] = max_level;
        state.cgroups[gen_] = cgroups.len() as u32;
        sink.put_state(&state)?;
        state.generation = gen_ as u32;
        // The same update raises the cache epoch: answers cached before the
        // flip go stale with it (a word names its generation too).
        state.epoch = portguard_common::next_epoch(state.epoch);
        sink.put_state(&state)?;
        self.state = state;
        self.last_flip = Some(Instant::now());
        self.readers_quiesced = false;
        // Programs that read the retired generation started before this
        // point: a barrier from here on waits for every one of them.
        // (A thread that cannot be started leaves the wait to the next apply.)
        self.barrier = sink.reader_barrier().and_then(|barrier| {
            std::thread::Builder::new()
                .name("reader-barrier".into())
                .spawn(barrier)
                .ok()
        });
        self.slots = slots;
        self.remembered.extend(made);
        if self.remembered.len() > self.slots.len() {
            let slots = &self.slots;
            self.remembered.retain(|id, _| slots.contains_key(id));
        }

        Ok(ApplyReport {
            generation: gen_ as u32,
            policies,
            cgroups: cgroups.len(),
            sets_written,
            sets_deleted,
            sets_total: self.sets.len(),
            chunks_total: self.chunks_in_use(),
            records_written,
            cgroups_written,
        })
    }

    fn delete_set<S: RuleSink>(&mut self, sink: &mut S, id: u32) -> Result<(), SinkError> {
        let Some(entry) = self.sets.get_mut(&id) else {
            return Ok(());
        };
        while let Some(&c) = entry.chunks.last() {
            sink.del_chunk(PortChunkKey {
                set_id: id,
                chunk: c,
            })?;
            entry.chunks.pop();
        }
        if let Some(entry) = self.sets.remove(&id)
            && self.by_content.get(&entry.content) == Some(&id)
        {
            self.by_content.remove(&entry.content);
        }
        Ok(())
    }
}

const _: () = assert!(CHUNKS_PER_SET == 128);

#[cfg(test)]
pub mod fake;

#[cfg(test)]
mod tests;
