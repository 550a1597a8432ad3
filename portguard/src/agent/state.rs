//! The agent's state ([`Agent`]) and what changes it: applying what
//! `resolving` found each policy governs to the kernel maps (whole or not
//! at all) and the built-in stand-in policies. Publishing what is enforced
//! to the status snapshot is `facts`.

use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
    time::Instant,
};

use anyhow::Context as _;
use log::{error, info, warn};

use crate::{
    apply::{Applier, ApplyReport, Capacity, ResolvedCgroup, Target},
    events::{self, PolicyNames},
    kernel::Loaded,
    observe::health::Health,
    policy::{CompiledPolicy, ParsedPolicy},
    workload::cgroupfs::{Hierarchy, ResolveCache},
    workload::cri,
    workload::resolve::{Governed, Resolution, TreeIndex},
};

use super::*;

pub(super) struct Agent {
    pub(super) policy_path: PathBuf,
    pub(super) attach_cgroup: String,
    /// `--decision-programs root`: the decision programs run on
    /// `attach_cgroup` whatever is governed.
    pub(super) decide_everywhere: bool,
    pub(super) hierarchy: Hierarchy,
    pub(super) applier: Applier,
    pub(super) loaded: Loaded,
    pub(super) policies: Vec<CompiledPolicy>,
    pub(super) resolved: Resolution,
    /// Cgroups a hook's quick answer governed (`govern_now`), by policy
    /// index: in the live generation, not in `resolved`, until the next
    /// apply plans them (or not) and empties this.
    pub(super) provisional: Vec<(usize, Governed)>,
    pub(super) names: PolicyNames,
    pub(super) name_map_full: bool,
    pub(super) quiesce_warned: bool,
    pub(super) fail_closed: bool,
    /// The kernel's lost-event count already reported (at start: by the
    /// previous agent, when the counters were adopted).
    pub(super) lost_seen: u64,
    /// cgroup path -> (id, level) as last seen; replaced by each rescan's
    /// survey (and emptied by a fresh resolve on the loop), a hook's paths
    /// forgotten when it asks, so a reload only stat()s paths it has not
    /// seen.
    pub(super) resolve_cache: ResolveCache,
    /// `resolve_cache`'s change count when the last `resolve` ended, if that
    /// resolve read nothing else (only `cgroup:` selectors). `apply` is
    /// given what the last `resolve` returned (or `None` here).
    pub(super) last_resolve: Option<u64>,
    /// Resolves that walked the tree and stat()ed afresh on the loop: a
    /// survey begun before one is older than what the loop holds.
    pub(super) fresh_resolves: u64,
    /// The same for `resolved`: while it equals `resolve_cache.changes()`,
    /// resolving policies with the same selectors gives `resolved` again
    /// (see `Agent::resolution_holds`).
    pub(super) resolved_with: Option<u64>,
    /// Each policy's id, in `policies` order.
    pub(super) policy_ids: Vec<u32>,
    /// Cgroup path -> writable by a user other than root (delegated);
    /// replaced and emptied with `resolve_cache`.
    pub(super) writable_cache: HashMap<String, bool>,
    /// `--max-delegated-cgroups`.
    pub(super) max_delegated: usize,
    /// Delegated subtrees held by the built-in `portguard:fail-closed:unfit`
    /// policy (`--fail-closed` and cgroups over the bounds), as applied.
    pub(super) unfit_hold: Vec<Governed>,
    /// The hold the last `resolve` computed, applied by `apply`.
    pub(super) next_unfit_hold: Vec<Governed>,
    /// Delegated subtrees already logged (policy, subtree, reason), each once.
    pub(super) left_out_logged: HashSet<String>,
    /// What the last `resolve` left out, published by `apply`.
    pub(super) next_left_out: crate::observe::snapshot::LeftOut,
    /// The policies a rescan could not apply, replaced by the
    /// `--fail-closed` stand-ins; each rescan tries them again.
    pub(super) refused: Option<Vec<CompiledPolicy>>,
    /// Where pods, containers and units are (for `pods:`/`unit:` policies).
    pub(super) tree: Option<TreeIndex>,
    /// The CRI runtime's last answer (kept when it stops answering).
    pub(super) cri: Option<cri::Snapshot>,
    /// Whether the runtime answers now (quarantine holds while it does not).
    pub(super) cri_health: CriHealth,
    /// Ties already logged (each once).
    pub(super) ties_logged: HashSet<String>,
    /// Pod cgroups the runtime cannot identify yet (their sandbox is being
    /// created), governed by the built-in `portguard:identifying` policy.
    pub(super) quarantine: Vec<Governed>,
    /// When each unidentified pod cgroup was first seen (uid -> time).
    pub(super) unidentified_since: HashMap<String, Instant>,
    /// The quarantine the last `resolve` computed, applied by `apply`.
    pub(super) next_quarantine: Vec<Governed>,
    /// When inotify last reported a cgroup directory change (for timing).
    pub(super) last_cgroup_event: Option<Instant>,
    /// The policy file as last applied (for incremental reloads).
    pub(super) parsed: Option<ParsedPolicy>,
    /// The last reload re-parsed one entry; confirm with a full parse.
    pub(super) verify_pending: bool,
    /// The governed set changed: list pre-existing sockets again.
    pub(super) inventory_pending: bool,
    /// Sockets (network namespace, cookie) the inventory reported that
    /// still break their policy (not reported again).
    pub(super) inventory_reported: HashSet<(u64, u64)>,
    /// Cookies of the sockets `cut_off` events named since the last
    /// inventory pass: theirs to report and end, not the inventory's.
    pub(super) cut_off_cookies: HashSet<u64>,
    /// What /healthz and /readyz report.
    pub(super) health: std::sync::Arc<Health>,
    /// The host name events carry.
    pub(super) host: String,
    /// Flood control for event lines.
    pub(super) aggregator: events::aggregate::Aggregator,
    /// `--policy-reports`: decisions counted for this window's reports.
    pub(super) reports: Option<reports::Reports>,
    /// Map capacities (for occupancy).
    pub(super) capacity: Capacity,
    /// What /metrics and `status` report besides the kernel counters.
    pub(super) shared: std::sync::Arc<crate::observe::snapshot::Snapshot>,
    /// Owner of each policy record slot and the slot's counters when it
    /// took it (a slot freed by a removed policy keeps its kernel counts).
    pub(super) slot_owners: HashMap<u32, (String, crate::kernel::Decisions)>,
    /// Cut-off sockets neither fenced nor destroyed.
    pub(super) unended: Vec<Unended>,
    /// The packet guard's link on the cgroup2 root, while `unended` is not
    /// empty (see [`portguard_common::GUARD_PROGRAM`]).
    pub(super) packet_guard: Option<crate::kernel::ProgLink>,
    /// Fence failures already acted on (the kernel counter).
    pub(super) fence_failures_seen: u64,
    /// [`COUNTER_MARK_FAILED`](portguard_common::COUNTER_MARK_FAILED) as
    /// last read.
    pub(super) mark_failures_seen: u64,
    /// A fence failure keeps the packet guard attached for this run.
    pub(super) guard_held: bool,
    /// The status socket's directory, shared with the runtime hooks.
    pub(super) hook_dir: Option<PathBuf>,
    /// The selection last written there (pod uids, namespace patterns).
    pub(super) selection_published: Option<(Vec<String>, Vec<String>)>,
    /// While set, an apply leaves its bookkeeping in `unsettled` for
    /// [`Agent::settle`] (a hook's request: answered first).
    pub(super) settle_later: bool,
    /// What the last apply left to do ([`Agent::settle`]).
    pub(super) unsettled: Option<Unsettled>,
    /// Bumped whenever what [`Agent::cgroup_watch_dirs`] depends on may
    /// have changed (an apply, the tree index, a hook's paths): see
    /// `Watcher::refresh`.
    pub(super) watch_inputs: u64,
    /// Bumped whenever `policies` is replaced or one of them changes (a
    /// reload, an apply of other policies): the same number, the same
    /// policies (`Surveys` compares it before 10,000 selectors).
    pub(super) policies_version: u64,
}

impl Agent {
    /// The `--fail-closed` stand-ins are in force.
    pub(super) fn failed_closed(&self) -> bool {
        self.policies
            .iter()
            .any(|p| p.name.starts_with(FAIL_CLOSED))
    }

    /// Apply the `--fail-closed` stand-ins after `err` kept `policies` out.
    pub(super) fn apply_fail_closed(
        &mut self,
        policies: &[CompiledPolicy],
        err: &dyn std::fmt::Display,
    ) -> anyhow::Result<ApplyReport> {
        let fallback = crate::policy::builtin::fail_closed(policies);
        let mut resolved = self.resolve(&fallback, true);
        // Cgroups deeper than the kernel walks cannot be governed at all.
        for govs in &mut resolved {
            govs.retain(|g| g.level < portguard_common::MAX_CGROUP_DEPTH);
        }
        // Not what a resolve gives any more.
        self.last_resolve = None;
        let report = self
            .apply(fallback, resolved)
            .context("--fail-closed: even denying every bind does not fit")?;
        error!(
            "daemon: FAIL-CLOSED: the policy could not be applied ({err}); every bind in the {} \
             cgroups it governs is DENIED (policies `{FAIL_CLOSED}:<name>`) until a policy that \
             fits is loaded",
            report.cgroups
        );
        Ok(report)
    }

    /// Keep a policy id's name in the kernel too, so an agent that adopts
    /// the pinned state can name events queued before it started.
    pub(super) fn record_name(&mut self, id: u32, name: &str) {
        if let Err(e) = self.loaded.maps.put_name(id, name)
            && !self.name_map_full
        {
            self.name_map_full = true;
            warn!(
                "daemon: cannot record policy name `{name}` in the kernel ({e}); events queued \
                 across an agent restart may carry a policy id without its name"
            );
        }
    }

    /// The id of policy `name`, its name recorded in the kernel when new.
    fn id_recorded(&mut self, name: &str) -> u32 {
        let (id, new) = self.names.id(name);
        if new {
            self.record_name(id, name);
        }
        id
    }

    /// Apply `policies` with `resolved` cgroups; on success they become current.
    pub(super) fn apply(
        &mut self,
        policies: Vec<CompiledPolicy>,
        resolved: Resolution,
    ) -> Result<ApplyReport, crate::apply::ApplyError> {
        self.apply_or_return(policies, resolved, None, false)
            .map_err(|(e, _)| e)
    }

    /// [`Agent::apply`] of the policies in force with `resolved` (a
    /// rescan): no copy of thousands of policies.
    pub(super) fn apply_again(
        &mut self,
        resolved: Resolution,
    ) -> Result<ApplyReport, crate::apply::ApplyError> {
        // Settled against the policies in force, before they are taken out.
        self.settle();
        let policies = std::mem::take(&mut self.policies);
        // Their ids, as the apply that put them in force recorded them.
        let ids = (self.policy_ids.len() == policies.len()).then(|| self.policy_ids.clone());
        self.apply_or_return(policies, resolved, ids, true)
            .map_err(|(e, policies)| {
                self.policies = policies;
                e
            })
    }

    /// [`Agent::apply`], which hands the policies back when it fails;
    /// `ids`: the policies' ids when they are known (else looked up, and
    /// recorded when new); `again`: `policies` are the ones in force, taken
    /// out by [`Agent::apply_again`].
    fn apply_or_return(
        &mut self,
        policies: Vec<CompiledPolicy>,
        resolved: Resolution,
        ids: Option<Vec<u32>>,
        again: bool,
    ) -> Result<ApplyReport, (crate::apply::ApplyError, Vec<CompiledPolicy>)> {
        // The previous apply's bookkeeping first: it logs against the
        // policies as that apply left them.
        self.settle();
        let ids: Vec<u32> = match ids {
            Some(ids) => ids,
            None => policies.iter().map(|p| self.id_recorded(&p.name)).collect(),
        };
        let identifying = crate::policy::builtin::identifying();
        let quarantine = std::mem::take(&mut self.next_quarantine);
        // Every policy's cgroups in one allocation, each target a slice.
        let all: Vec<ResolvedCgroup> = resolved_cgroups(resolved.iter().flatten());
        let mut at = 0;
        let mut targets: Vec<Target<'_>> = policies
            .iter()
            .zip(&resolved)
            .zip(&ids)
            .map(|((p, r), id)| {
                at += r.len();
                Target {
                    policy_id: *id,
                    policy: p,
                    cgroups: std::borrow::Cow::Borrowed(&all[at - r.len()..at]),
                }
            })
            .collect();
        if !quarantine.is_empty() {
            targets.push(Target {
                policy_id: self.id_recorded(IDENTIFYING),
                policy: &identifying,
                cgroups: resolved_cgroups(&quarantine).into(),
            });
        }
        let unfit = crate::policy::builtin::unfit();
        let hold = std::mem::take(&mut self.next_unfit_hold);
        if !hold.is_empty() {
            // A subtree root already held as an unidentified pod stays so.
            let held: Vec<&Governed> = hold
                .iter()
                .filter(|g| !quarantine.iter().any(|q| q.id == g.id))
                .collect();
            targets.push(Target {
                policy_id: self.id_recorded(UNFIT),
                policy: &unfit,
                cgroups: resolved_cgroups(held).into(),
            });
        }
        // The decision programs run on every attach point before the maps
        // govern anything below it, and leave the points nothing is
        // governed below only after.
        let points = self.attach_points_of(&resolved, &quarantine, &hold);
        let report = match self
            .loaded
            .attach_points(&points)
            .map_err(|e| crate::apply::ApplyError::Attach(e.to_string()))
            .and_then(|keep| {
                let maps = &mut self.loaded.maps;
                // The policies in force again: only their cgroups changed.
                let report = if again {
                    self.applier.apply_again(maps, &targets)?
                } else {
                    self.applier.apply(maps, &targets)?
                };
                Ok((report, keep))
            }) {
            Ok((r, keep)) => {
                self.loaded.release_points(&keep);
                r
            }
            Err(e) => {
                self.next_quarantine = quarantine;
                self.next_unfit_hold = hold;
                drop(targets);
                return Err((e, policies));
            }
        };
        for g in &hold {
            if !self.unfit_hold.iter().any(|h| h.id == g.id) {
                self.hierarchy.remember(g.id, &g.path);
            }
        }
        self.unfit_hold = hold;
        self.warn_quiesce();
        for g in &quarantine {
            if !self.quarantine.iter().any(|q| q.id == g.id) {
                let age = self.last_cgroup_event.map(|t| t.elapsed());
                info!(
                    "daemon: pod cgroup {} held by `{IDENTIFYING}` until the runtime lists its pod \
                     ({} after the cgroup change was noticed)",
                    g.path,
                    age.map_or("?".to_owned(), |a| format!(
                        "{:.1} ms",
                        a.as_secs_f64() * 1e3
                    ))
                );
            }
            self.hierarchy.remember(g.id, &g.path);
        }
        for g in &self.quarantine {
            if !quarantine.iter().any(|q| q.id == g.id) {
                let age = self.last_cgroup_event.map(|t| t.elapsed());
                info!(
                    "daemon: pod cgroup {} identified by the runtime; released from \
                     `{IDENTIFYING}` to its policy, if any ({} after the last cgroup change)",
                    g.path,
                    age.map_or("?".to_owned(), |a| format!(
                        "{:.1} ms",
                        a.as_secs_f64() * 1e3
                    ))
                );
            }
        }
        self.quarantine = quarantine;
        let replaced = std::mem::replace(&mut self.policies, policies);
        if !again {
            self.policies_version += 1;
        }
        let before = (
            // Applied again: the policies are the ones that were in force
            // (their place was left empty while they were out).
            (!again).then_some(replaced),
            std::mem::replace(&mut self.resolved, resolved),
        );
        self.resolved_with = self.last_resolve;
        // Planned (or not) by this apply, and gone from the live generation.
        self.provisional.clear();
        self.inventory_pending = true;
        self.policy_ids = ids;
        // Not left for later: hooks that find the agent gone read it
        // (`--on-failure auto`), so it is never behind an answer given.
        self.publish_selection();
        let unsettled = Unsettled {
            report: report.clone(),
            before,
        };
        if self.settle_later {
            self.unsettled = Some(unsettled);
        } else {
            self.settle_with(unsettled);
        }
        Ok(report)
    }

    /// Say once that the applier could not wait for an RCU grace period.
    pub(super) fn warn_quiesce(&mut self) {
        if self.applier.quiesce_unavailable && !self.quiesce_warned {
            self.quiesce_warned = true;
            warn!(
                "daemon: membarrier(MEMBARRIER_CMD_GLOBAL) gives no RCU grace period here \
                 (nohz_full refuses it; with one CPU online it does not wait): reloads wait a \
                 fixed {} ms for running programs instead",
                crate::apply::GRACE.as_millis()
            );
        }
    }
}

/// What the applier needs of governed cgroups.
pub(super) fn resolved_cgroups<'a>(
    govs: impl IntoIterator<Item = &'a Governed>,
) -> Vec<ResolvedCgroup> {
    govs.into_iter()
        .map(|g| ResolvedCgroup {
            id: g.id,
            level: g.level,
        })
        .collect()
}
