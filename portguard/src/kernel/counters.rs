//! The kernel's decision counters (per-CPU arrays), summed at read time.

use aya::maps::{MapData, MapError, PerCpuArray};
use portguard_common::{
    COUNTER_EVENTS_LOST, COUNTER_FENCE_FAILED, COUNTER_GUARD_DROPS, DECISION_ALLOW, DECISION_AUDIT,
    DECISION_DENY, DECISION_REPORTED, DECISIONS, HOOKS, Hook, hook_counter, policy_counter,
};

use super::*;

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
