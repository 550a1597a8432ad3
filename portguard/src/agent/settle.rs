//! What an apply leaves until after a hook's answer: its bookkeeping
//! ([`Unsettled`]), done by [`Agent::settle`] before the loop serves
//! anything else.

use std::collections::HashMap;

use crate::{
    apply::ApplyReport,
    policy::CompiledPolicy,
    workload::resolve::{Governed, Resolution},
};

use super::*;

/// What an apply leaves to do once the kernel maps hold its answer: the
/// log lines on what each policy governs now, the cgroups' paths for events,
/// the facts `status` and /metrics publish. With thousands of policies
/// that is several milliseconds, which a hook's request need not wait for
/// ([`Agent::settle`]). (The selection the hooks read when the agent is
/// gone is written by the apply itself, never behind an answer.)
pub(super) struct Unsettled {
    pub(super) report: ApplyReport,
    /// The policies and what they governed before the apply (`None`: the
    /// policies were those in force, applied again: a rescan).
    pub(super) before: (Option<Vec<CompiledPolicy>>, Resolution),
}

impl Agent {
    /// Do what the last apply left to do, if anything ([`Unsettled`]).
    /// Before anything reads the facts or event paths: the
    /// loop settles before it serves anything else.
    pub(super) fn settle(&mut self) {
        if let Some(u) = self.unsettled.take() {
            self.settle_with(u);
        }
    }

    pub(super) fn settle_with(&mut self, Unsettled { report, before }: Unsettled) {
        self.watch_inputs += 1;
        // Per-policy lines for small policy sets; large ones get the summary.
        let level = if self.policies.len() <= 50 {
            log::Level::Info
        } else {
            log::Level::Debug
        };
        // By position while the policies are the same (a rescan), else by
        // name.
        let (old, resolved_before) = &before;
        let same = old.as_ref().is_none_or(|old| {
            old.len() == self.policies.len()
                && old
                    .iter()
                    .zip(&self.policies)
                    .all(|(a, b)| a.name == b.name)
        });
        let by_name: HashMap<&str, &Vec<Governed>> = match old {
            Some(old) if !same => old
                .iter()
                .zip(resolved_before)
                .map(|(q, r)| (q.name.as_str(), r))
                .collect(),
            _ => HashMap::new(),
        };
        // Policies as they were (by position): nothing to log or remember,
        // and their published facts stand (their cgroups' identities come
        // from their paths alone when no `pods:` policy asks the runtime).
        let stable_identities = !Self::needs_cri(&self.policies) && self.cri.is_none();
        let mut unchanged = vec![false; self.policies.len()];
        for (i, (p, r)) in self.policies.iter().zip(&self.resolved).enumerate() {
            if same
                && resolved_before.get(i) == Some(r)
                && old
                    .as_ref()
                    .is_none_or(|old| old[i].mode == p.mode && old[i].selector == p.selector)
            {
                unchanged[i] = stable_identities;
                continue;
            }
            let before = if same {
                resolved_before.get(i)
            } else {
                by_name.get(p.name.as_str()).copied()
            };
            for g in r {
                self.hierarchy.remember(g.id, &g.path);
                if before.is_none_or(|b| !b.iter().any(|x| x.id == g.id)) {
                    log::log!(
                        level,
                        "daemon: policy `{}` ({}) governs cgroup {} (id {})",
                        p.name,
                        p.mode.as_str(),
                        g.path,
                        g.id
                    );
                }
            }
            match (r.is_empty(), before) {
                (true, Some(b)) if !b.is_empty() => log::log!(
                    if level == log::Level::Info {
                        log::Level::Warn
                    } else {
                        level
                    },
                    "daemon: policy `{}` ({}) governs no cgroup any more; it applies again when one appears",
                    p.name,
                    p.selector.describe()
                ),
                (true, None) => log::log!(
                    level,
                    "daemon: policy `{}`: {} does not exist yet; it will be governed as soon as it appears",
                    p.name,
                    p.selector.describe()
                ),
                _ => {}
            }
        }
        let ids = std::mem::take(&mut self.policy_ids);
        self.publish_facts(&report, &ids, &unchanged);
        self.policy_ids = ids;
        drop(by_name);
        free_later(before);
    }
}
