//! The kernel's decision counters (per-CPU arrays), summed at read time.

use std::os::fd::AsFd as _;

use aya::maps::{IterableMap as _, MapData, MapError, PerCpuArray};
use portguard_common::{
    COUNTER_EVENTS_LOST, COUNTER_FENCE_FAILED, COUNTER_GUARD_DROPS, COUNTER_MARK_FAILED,
    DECISION_ALLOW, DECISION_AUDIT, DECISION_DENY, DECISION_REPORTED, DECISIONS, HOOKS, Hook,
    POLICY_KINDS, hook_counter, policy_counter,
};

use super::*;

// `first_slots` reads the policy counters in this order.
const _: () = assert!(policy_counter(3, 2) == 3 * POLICY_KINDS + 2);

/// The kernel counters, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub allowed: u64,
    pub denied: u64,
    pub audited: u64,
    pub reported: u64,
    pub events_lost: u64,
}

/// The kernel's counter maps. Shared (read-only) between the agent and the
/// metrics and status endpoints; reads take no lock.
pub struct CounterMaps {
    pub(super) hooks: PerCpuArray<MapData, u64>,
    pub(super) policies: PerCpuArray<MapData, u64>,
}

impl CounterMaps {
    pub(super) fn sum(map: &PerCpuArray<MapData, u64>, i: u32) -> Result<u64, MapError> {
        Ok(map.get(&i, 0)?.iter().copied().sum())
    }

    /// Decisions by hook (every hook, in `Hook` order).
    pub fn by_hook(&self) -> Result<Vec<(Hook, Decisions)>, MapError> {
        (1..=HOOKS as u8)
            .filter_map(Hook::from_u8)
            .map(|h| {
                let mut d = Decisions::default();
                for (k, v) in d.iter_mut().enumerate().take(DECISIONS as usize) {
                    *v = Self::sum(&self.hooks, hook_counter(h as u32, k as u32))?;
                }
                Ok((h, d))
            })
            .collect()
    }

    /// Decisions of the policy in record slot `slot`, then its events
    /// suppressed and lost (since the slot was created; see the agent's
    /// baselines for slots that changed hands).
    pub fn by_slot(&self, slot: u32) -> Result<Decisions, MapError> {
        let mut d = Decisions::default();
        for (k, v) in d.iter_mut().enumerate() {
            *v = Self::sum(&self.policies, policy_counter(slot, k as u32))?;
        }
        Ok(d)
    }

    /// [`CounterMaps::by_slot`] of every record slot below `slots`, read
    /// with `BPF_MAP_LOOKUP_BATCH` (a status or metrics request, or the
    /// loss report, with 10,000 policies is then one read, not 60,000; a
    /// read holds at most about 1 MiB, so a host with many possible CPUs
    /// takes several); slot by slot where the kernel cannot read in batches.
    pub fn first_slots(&self, slots: u32) -> Result<Vec<Decisions>, MapError> {
        let kinds = POLICY_KINDS as usize;
        let one_by_one = || (0..slots).map(|slot| self.by_slot(slot)).collect();
        let Ok(cpus) = aya::util::nr_cpus() else {
            return one_by_one();
        };
        let mut out = vec![Decisions::default(); slots as usize];
        out.truncate(self.policies.len() as usize / kinds);
        let entries = out.len() * kinds;
        // One u64 per possible CPU for each entry.
        let entry_bytes = cpus * 8;
        let per_read = ((1 << 20) / entry_bytes).max(1);
        let mut values = vec![0u8; per_read.min(entries) * entry_bytes];
        let fd = self.policies.map().fd().as_fd();
        let mut first = 0;
        while first < entries {
            let n = per_read.min(entries - first);
            let buf = &mut values[..n * entry_bytes];
            match bpfsys::array_lookup_batch(fd, first as u32, buf, entry_bytes) {
                Ok(read) if read == n => {}
                _ => return one_by_one(),
            }
            for (i, value) in buf.chunks_exact(entry_bytes).enumerate() {
                let entry = first + i;
                out[entry / kinds][entry % kinds] = value
                    .chunks_exact(8)
                    .map(|b| u64::from_ne_bytes(b.try_into().unwrap_or([0; 8])))
                    .sum();
            }
            first += n;
        }
        Ok(out)
    }

    pub fn events_lost(&self) -> Result<u64, MapError> {
        Self::sum(&self.hooks, COUNTER_EVENTS_LOST)
    }

    /// Packets the packet guard dropped.
    pub fn guard_drops(&self) -> Result<u64, MapError> {
        Self::sum(&self.hooks, COUNTER_GUARD_DROPS)
    }

    /// Cut-off sockets the kernel would not fence.
    pub fn fence_failures(&self) -> Result<u64, MapError> {
        Self::sum(&self.hooks, COUNTER_FENCE_FAILED)
    }

    /// Cut-off sockets the kernel could not mark for the packet guard.
    pub fn mark_failures(&self) -> Result<u64, MapError> {
        Self::sum(&self.hooks, COUNTER_MARK_FAILED)
    }

    /// Totals over every hook.
    pub fn totals(&self) -> Result<Counters, MapError> {
        let mut c = Counters {
            events_lost: self.events_lost()?,
            ..Counters::default()
        };
        for (_, d) in self.by_hook()? {
            c.allowed += d[DECISION_ALLOW as usize];
            c.denied += d[DECISION_DENY as usize];
            c.audited += d[DECISION_AUDIT as usize];
            c.reported += d[DECISION_REPORTED as usize];
        }
        Ok(c)
    }
}
