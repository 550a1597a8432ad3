//! Reports of events the kernel had to drop: a `lost` line (with the
//! policies the losses were of) when the ring buffer was full, a
//! `suppressed` line per policy whose event budget held events back, and at
//! start the events lost while no agent was reading.
//!
//! With thousands of policies, reading every policy's counters takes tens
//! of milliseconds: the serve loop has it done on a thread of its own
//! ([`LostReading::read`]) and writes the report when it is in
//! ([`report_read`]), so signals and everything else are served meanwhile.

use std::time::{Duration, Instant};

use log::warn;
use rustc_hash::FxHashMap;

use crate::{
    events::{self, EventWriter, LostRecord},
    kernel::{Counters, MapError},
    observe::snapshot::{KernelReading, Snapshot},
};

use super::*;

/// What the agent has reported of the kernel's drop counters: events lost
/// (every policy together), and per policy (by name and slot, counted since
/// the policy took its slot) events suppressed and lost.
pub(super) struct DropsSeen {
    pub(super) lost: u64,
    /// Slot -> policy name -> (suppressed, lost).
    by_policy: FxHashMap<u32, FxHashMap<String, (u64, u64)>>,
}

impl DropsSeen {
    pub(super) fn new(lost: u64) -> Self {
        Self {
            lost,
            by_policy: FxHashMap::default(),
        }
    }

    /// What was reported of policy `name` in `slot`, as the base for
    /// counts `supp` and `lost` (a policy that took its slot anew counts
    /// from zero again).
    fn before(&self, name: &str, slot: u32, supp: u64, lost: u64) -> (u64, u64) {
        let (s0, l0) = self
            .by_policy
            .get(&slot)
            .and_then(|m| m.get(name))
            .copied()
            .unwrap_or_default();
        (
            if supp < s0 { 0 } else { s0 },
            if lost < l0 { 0 } else { l0 },
        )
    }

    fn set(&mut self, name: &str, slot: u32, seen: (u64, u64)) {
        let m = self.by_policy.entry(slot).or_default();
        match m.get_mut(name) {
            Some(v) => *v = seen,
            None => {
                m.insert(name.to_owned(), seen);
            }
        }
    }
}

/// The kernel counters a loss report needs.
pub(super) struct LostReading {
    /// Per policy: name, slot, events suppressed and lost since it took its
    /// slot.
    policies: Result<Vec<(String, u32, u64, u64)>, MapError>,
    /// Read after `policies` (only when those could be read).
    totals: Option<Result<Counters, MapError>>,
}

impl LostReading {
    /// Read them (blocking; the counters take no lock, the facts' lock is
    /// held only to copy each policy's name, slot and baseline).
    pub(super) fn read(shared: &Snapshot) -> Self {
        let slots: Vec<(String, u32, crate::kernel::Decisions)> = shared.read(|f| {
            f.policies
                .iter()
                .map(|p| (p.name.clone(), p.slot, p.baseline))
                .collect()
        });
        let by_policy = KernelReading::by_policy(
            &shared.counters,
            slots.iter().map(|(_, slot, baseline)| (*slot, *baseline)),
        );
        let policies = by_policy.map(|by_policy| {
            slots
                .into_iter()
                .zip(by_policy)
                .map(|((name, slot, _), d)| {
                    (
                        name,
                        slot,
                        d[portguard_common::POLICY_EVENTS_SUPPRESSED as usize],
                        d[portguard_common::POLICY_EVENTS_LOST as usize],
                    )
                })
                .collect()
        });
        let totals = policies.is_ok().then(|| shared.counters.totals());
        Self { policies, totals }
    }
}

/// Report what the kernel dropped since the last report: a `lost` line
/// (with the policies the losses were of), and a `suppressed` line per
/// policy whose event budget held events back.
pub(super) fn report_lost(agent: &Agent, writer: &mut EventWriter, seen: &mut DropsSeen) {
    report_read(agent, writer, seen, LostReading::read(&agent.shared));
}

/// [`report_lost`] from counters read already.
pub(super) fn report_read(
    agent: &Agent,
    writer: &mut EventWriter,
    seen: &mut DropsSeen,
    reading: LostReading,
) {
    // (policy, slot, suppressed since its slot was taken, lost since).
    let totals = match reading.policies {
        Ok(t) => t,
        Err(e) => {
            warn!("daemon: reading counters: {e}");
            return;
        }
    };
    let now = events::format_time(std::time::SystemTime::now());
    for (name, slot, supp, lost) in &totals {
        let (s0, l0) = seen.before(name, *slot, *supp, *lost);
        if *supp > s0 {
            let _ = writer.line(&events::SuppressedRecord {
                schema_version: events::SCHEMA_VERSION,
                time: now.clone(),
                host: agent.host.clone(),
                policy: name.clone(),
                suppressed: supp - s0,
                suppressed_total: *supp,
            });
        }
        seen.set(name, *slot, (*supp, l0));
    }
    match reading.totals {
        Some(Ok(c)) if c.events_lost > seen.lost => {
            let lost = c.events_lost - seen.lost;
            seen.lost = c.events_lost;
            warn!(
                "daemon: the kernel dropped {lost} events (ring buffer full; {} in total)",
                c.events_lost
            );
            // At most every 10 s: a supervisor's queue is small.
            static LAST: std::sync::Mutex<Option<Instant>> = std::sync::Mutex::new(None);
            if let Ok(mut last) = LAST.lock()
                && last.is_none_or(|t| t.elapsed() >= Duration::from_secs(10))
            {
                *last = Some(Instant::now());
                notify_status(&format!("{} events lost in total", c.events_lost));
            }
            // Whose they were. The per-policy counters are read a moment
            // apart from the total: a loss counted in between shows in the
            // next line's policies.
            let mut policies = Vec::new();
            for (name, slot, supp, plost) in &totals {
                let (_, l0) = seen.before(name, *slot, *supp, *plost);
                if *plost > l0 {
                    policies.push(events::PolicyLost {
                        policy: name.clone(),
                        lost: plost - l0,
                        lost_total: *plost,
                    });
                }
                seen.set(name, *slot, (*supp, *plost));
            }
            let _ = writer.line(&LostRecord {
                schema_version: events::SCHEMA_VERSION,
                host: agent.host.clone(),
                time: now,
                lost,
                lost_total: c.events_lost,
                since: None,
                until: None,
                agent_restarted: false,
                policies,
            });
            let _ = writer.flush();
        }
        Some(Ok(_)) if !totals.is_empty() => {
            let _ = writer.flush();
        }
        Some(Err(e)) => warn!("daemon: reading counters: {e}"),
        Some(Ok(_)) | None => {}
    }
}

/// Events the kernel dropped while no agent was reading: the adopted
/// counter against what the previous agent had reported, with the period.
pub(super) fn report_restart_losses(agent: &mut Agent, writer: &mut EventWriter) {
    let a = &agent.loaded.adoption;
    let Some(prev) = a.previous else {
        return;
    };
    if a.replaced.contains(&portguard_common::MAP_COUNTERS) {
        return;
    }
    let Ok(now_lost) = agent.loaded.maps.counters.events_lost() else {
        return;
    };
    agent.lost_seen = now_lost;
    if now_lost <= prev.lost_reported {
        return;
    }
    let lost = now_lost - prev.lost_reported;
    let since = std::time::UNIX_EPOCH + Duration::from_millis(prev.alive_unix_ms);
    let until = std::time::SystemTime::now();
    warn!(
        "daemon: the kernel dropped {lost} events while no agent was reading (since {})",
        events::format_time(since)
    );
    let _ = writer.line(&LostRecord {
        schema_version: events::SCHEMA_VERSION,
        host: agent.host.clone(),
        time: events::format_time(until),
        lost,
        lost_total: now_lost,
        since: Some(events::format_time(since)),
        until: Some(events::format_time(until)),
        agent_restarted: true,
        policies: Vec::new(),
    });
    let _ = writer.flush();
}
