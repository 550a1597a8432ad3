//! The quick answer to a hook's "govern this cgroup now"
//! ([`crate::hook::protocol::Govern`]) for a cgroup that a policy selects by
//! its own path or unit name: a unit's cgroup made again by a restart, a
//! `cgroup:` policy's directory made again. One insert into the live
//! generation of the kernel's cgroup map
//! ([`crate::apply::Applier::govern_live`]) governs it, and the answer is
//! read back from the kernel maps, without first re-resolving every policy
//! and planning every governed cgroup (tens of milliseconds with 10,000 of
//! them). A full resolve and apply follow, from a survey
//! (`survey::Surveys::follow_up`: the one in flight, else a new one; the
//! loop serves the next hook meanwhile): they plan the new cgroup like any
//! other, so what it holds is kept or replaced as they decide, whole. Until
//! then the removed cgroup's entry stays in the maps, for an id no cgroup
//! has any more.
//!
//! Anything one insert cannot settle the same way the full rescan would is
//! left to it ([`Agent::govern_now`] answers `None`): a pod's cgroup (the
//! runtime must be asked), a cgroup no policy names itself (what governs it
//! is an ancestor's, which the rescan may change too), a unit in a
//! delegated subtree, a unit hook run from a cgroup that is not its
//! unit's, a cgroup outside `--attach-cgroup` or below no attach point
//! this agent's programs run on, a rescan that failed closed (the real
//! policies refused, `--fail-closed` stand-ins in force), and whatever
//! `govern_live` declines. Until that apply, the cgroup is held in
//! `Agent::provisional`, not among the resolved ones, so the apply always
//! follows and settles its facts.

use log::{debug, warn};

use crate::{
    apply::ResolvedCgroup,
    hook::protocol::{Govern, HookKind, Reply},
    policy::{Selector, most_specific},
    workload::{
        cgroupfs::ancestors,
        identity,
        resolve::{Governed, TreeIndex},
    },
};

use super::*;

impl Agent {
    /// Govern the cgroup at `path` (the request's, as this agent sees it)
    /// now, by the policy the full resolution gives it, and answer from
    /// the kernel maps; `None` (and nothing written) where the full rescan
    /// must answer (see the module's doc).
    pub(super) fn govern_now(&mut self, req: &Govern, path: &str) -> Option<Reply> {
        match self.try_govern_now(req, path) {
            Ok(reply) => Some(reply),
            Err(why) => {
                debug!("daemon: {path}: no quick answer ({why}); the full rescan answers");
                None
            }
        }
    }

    fn try_govern_now(&mut self, req: &Govern, path: &str) -> Result<Reply, &'static str> {
        if self.refused.is_some()
            || self.policy_ids.len() != self.policies.len()
            || !crate::policy::builtin::within(path, &self.attach_cgroup)
        {
            return Err(
                "fail-closed stand-ins, policies being applied, or outside --attach-cgroup",
            );
        }
        let who = identity::parse(path);
        if who.pod_uid.is_some() || who.container_id.is_some() {
            return Err("a pod's cgroup");
        }
        // The policies naming this cgroup itself, as the resolver finds
        // them (its tree index gives a path's unit the same way), and the
        // one it places there: the most specific, the first of equals.
        let unit = TreeIndex::from_paths([path]).units.into_keys().next();
        // A unit's hook vouches for the unit it starts: from a cgroup that
        // is not that unit's (the hook's process moved below it, in a
        // delegated unit), the full rescan governs the unit too first.
        if req.hook == HookKind::Unit && req.unit.is_some() && req.unit != unit {
            return Err("the hook runs outside the cgroup of the unit it names");
        }
        let named = self
            .policies
            .iter()
            .enumerate()
            .filter(|(_, p)| match &p.selector {
                Selector::Cgroup(c) => c == path,
                Selector::Unit(u) => unit.as_deref() == Some(u.as_str()),
                Selector::Pods(_) => false,
            })
            .map(|(i, p)| (i, &p.selector));
        let winner = most_specific(named).ok_or("no policy names it")?;
        // A name can be claimed in a delegated subtree: the resolver's
        // rules for those (opt-in, per-subtree bounds) are the rescan's.
        if !matches!(self.policies[winner].selector, Selector::Cgroup(_))
            && self
                .hierarchy
                .delegated_subtree(path, &mut self.writable_cache)
                .is_some()
        {
            return Err("in a delegated subtree");
        }
        let (id, level) = self.hierarchy.resolve(path).ok().flatten().ok_or("gone")?;
        if id != req.cgroup_id {
            return Err("made again since the request");
        }
        // The programs must already run for it: on its cgroup or an
        // ancestor's, as that cgroup is now (a point left on a removed
        // directory of the same path runs for nothing here).
        let ids: Vec<u64> = std::iter::once(id)
            .chain(
                ancestors(path)
                    .skip(1)
                    .filter_map(|a| self.hierarchy.resolve(a).ok().flatten())
                    .map(|(id, _)| id),
            )
            .collect();
        if !self.loaded.runs_on_any(&ids) {
            return Err("the decision programs do not run on it or an ancestor yet");
        }
        let cgroup = ResolvedCgroup { id, level };
        match self
            .applier
            .govern_live(&mut self.loaded.maps, cgroup, self.policy_ids[winner])
        {
            Ok(true) => {}
            Ok(false) => return Err("the live generation cannot take it as one insert"),
            Err(e) => {
                warn!("daemon: governing {path} at once failed ({e}); the full path answers");
                return Err("the insert failed");
            }
        }
        debug!(
            "daemon: {path} (cgroup id {id}) governed by `{}` at once; the full apply follows",
            self.policies[winner].name
        );
        // What the live generation now holds, until the next apply.
        self.provisional.push((
            winner,
            Governed {
                path: path.to_owned(),
                id,
                level,
            },
        ));
        self.hierarchy.remember(id, path);
        self.inventory_pending = true;
        // Read back from the kernel maps; a disagreement is the hook's
        // answer, as on the full path.
        Ok(self.answer_inner(req, path))
    }
}
