//! Publishing what is enforced to the status snapshot (`status`, /metrics)
//! after an apply: each policy's facts (name, record slot and its counter
//! baseline, mode, selector, cgroups with their workload identity) and map
//! use; after a reload that changed one policy's rules alone, only that
//! policy's facts.

use std::{collections::HashMap, sync::Arc};

use crate::{
    apply::{Applier, ApplyReport, Capacity},
    events,
    kernel::{CounterMaps, Decisions},
    observe::snapshot::{MapUse, PolicyFacts},
    policy::CompiledPolicy,
    workload::{cri, resolve::Governed},
};

use super::*;

impl Agent {
    /// Refresh what /metrics and `status` report after an apply. Policy
    /// `i` with `unchanged[i]` (same selector, mode and cgroups as when its
    /// facts were last published; `unchanged` may be empty) keeps the facts
    /// published for it, if they are still those of its slot.
    pub(super) fn publish_facts(&mut self, report: &ApplyReport, ids: &[u32], unchanged: &[bool]) {
        let counters = self.shared.counters.clone();
        let mut policies: Vec<Arc<PolicyFacts>> = Vec::with_capacity(self.policies.len() + 1);
        let cri = self.cri.as_ref();
        // The facts published before, in policy order (a policy without a
        // record slot has none): walked alongside.
        let old = self.shared.read(|f| f.policies.clone());
        let mut next_old = old.iter().peekable();
        let mut entries: Vec<Entry<'_>> = Vec::new();
        for (i, ((p, &id), r)) in self
            .policies
            .iter()
            .zip(ids)
            .zip(&self.resolved)
            .enumerate()
        {
            let before = next_old.next_if(|o| o.name == p.name);
            let kept = before.filter(|o| {
                unchanged.get(i).copied().unwrap_or(false)
                    && self.applier.slot_of(id) == Some(o.slot)
                    && self
                        .slot_owners
                        .get(&o.slot)
                        .is_some_and(|(name, b)| *name == p.name && *b == o.baseline)
            });
            match kept {
                Some(o) => policies.push(o.clone()),
                None => {
                    // Built below, in order: remember where.
                    policies.push(Arc::default());
                    entries.push((p, id, identities(r, cri), Some(policies.len() - 1)));
                }
            }
        }
        let identifying = crate::policy::builtin::identifying();
        if !self.quarantine.is_empty()
            && let Some(id) = self.names.id_of(IDENTIFYING)
        {
            entries.push((&identifying, id, identities(&self.quarantine, cri), None));
        }
        let unfit = crate::policy::builtin::unfit();
        if !self.unfit_hold.is_empty()
            && let Some(id) = self.names.id_of(UNFIT)
        {
            entries.push((&unfit, id, identities(&self.unfit_hold, cri), None));
        }
        for (p, id, cgroups, at) in entries {
            let facts = policy_facts(
                &self.applier,
                &mut self.slot_owners,
                &counters,
                (p, id, cgroups),
            )
            .map(Arc::new);
            match (at, facts) {
                (Some(at), Some(f)) => policies[at] = f,
                (None, Some(f)) => policies.push(f),
                // No record slot: no facts (its placeholder goes below).
                (_, None) => {}
            }
        }
        // Placeholders of policies that turned out to hold no slot.
        policies.retain(|f| !f.name.is_empty());
        let maps = map_use(self.capacity, policies.len(), report);
        let governed = report.cgroups;
        let left_out = self.next_left_out.clone();
        self.publish_points();
        self.shared.update(|f| {
            f.policies = Arc::new(policies);
            f.governed_cgroups = governed;
            f.left_out = left_out;
            f.maps = maps;
        });
    }

    /// [`Agent::publish_facts`] after an apply that changed the rules or
    /// mode of policy `index` alone (its name, slot and cgroups as before):
    /// what that gives, refreshing that policy's facts and the map use only.
    pub(super) fn publish_policy_facts(&mut self, index: usize, report: &ApplyReport) {
        let counters = self.shared.counters.clone();
        let facts = match (
            self.policies.get(index),
            self.policy_ids.get(index),
            self.resolved.get(index),
        ) {
            (Some(p), Some(&id), Some(govs)) => policy_facts(
                &self.applier,
                &mut self.slot_owners,
                &counters,
                (p, id, identities(govs, self.cri.as_ref())),
            ),
            _ => None,
        };
        let caps = self.capacity;
        let governed = report.cgroups;
        let mut published = false;
        if let Some(facts) = facts {
            self.shared.update(|f| {
                let policies = Arc::make_mut(&mut f.policies);
                if let Some(old) = policies.iter_mut().find(|o| o.name == facts.name) {
                    *old = Arc::new(facts);
                    f.governed_cgroups = governed;
                    f.maps = map_use(caps, f.policies.len(), report);
                    published = true;
                }
            });
        }
        if !published {
            // Not as expected: publish everything.
            let ids = self.policy_ids.clone();
            self.publish_facts(report, &ids, &[]);
        }
    }
}

/// A policy whose facts are built: the policy, its id, its cgroups with who
/// they are, and its place among the policies' facts (`None`: appended).
type Entry<'a> = (
    &'a CompiledPolicy,
    u32,
    Vec<(String, events::WorkloadIdentity)>,
    Option<usize>,
);

/// The cgroups a policy governs, with who they are.
fn identities(
    govs: &[Governed],
    cri: Option<&cri::Snapshot>,
) -> Vec<(String, events::WorkloadIdentity)> {
    govs.iter()
        .map(|g| (g.path.clone(), events::WorkloadIdentity::of(&g.path, cri)))
        .collect()
}

/// The facts of policy `p` (id `id`, governing `cgroups`), if it holds a
/// record slot. A slot that changed hands takes its counters now as the new
/// owner's baseline.
fn policy_facts(
    applier: &Applier,
    slot_owners: &mut HashMap<u32, (String, Decisions)>,
    counters: &CounterMaps,
    (p, id, cgroups): (
        &CompiledPolicy,
        u32,
        Vec<(String, events::WorkloadIdentity)>,
    ),
) -> Option<PolicyFacts> {
    let slot = applier.slot_of(id)?;
    let baseline = match slot_owners.get(&slot) {
        Some((name, b)) if *name == p.name => *b,
        _ => {
            let b = counters.by_slot(slot).unwrap_or_default();
            slot_owners.insert(slot, (p.name.clone(), b));
            b
        }
    };
    Some(PolicyFacts {
        name: p.name.clone(),
        slot,
        baseline,
        mode: p.mode.as_str(),
        selector: p.selector.describe(),
        cgroups,
    })
}

/// Occupancy of the policy maps.
fn map_use(caps: Capacity, policies: usize, report: &ApplyReport) -> Vec<MapUse> {
    vec![
        MapUse {
            name: "policies",
            entries: policies as u64,
            capacity: u64::from(caps.policies),
        },
        MapUse {
            name: "cgroups",
            entries: report.cgroups as u64,
            capacity: u64::from(caps.cgroups),
        },
        MapUse {
            name: "port_chunks",
            entries: report.chunks_total as u64,
            capacity: u64::from(caps.chunks),
        },
    ]
}
