//! What the policies govern: resolving each one's selector against the
//! cgroup tree (`workload::resolve`, over cached stat()s and delegation
//! answers), the tree index the `pods:` and `unit:` selectors need, the
//! bounds on what they may take, and what the agent adds to the
//! resolver's outcome (pods held until the runtime names them, the
//! `--attach-cgroup` scope, the ties and what was left out, reported).

use std::{
    collections::{HashMap, HashSet},
    time::Instant,
};

use log::{error, warn};

use crate::{
    policy::{CompiledPolicy, Selector},
    workload::cgroupfs::{Hierarchy, ResolveCache},
    workload::cri,
    workload::resolve::{self, Governed, Resolution, TreeIndex},
};

use super::*;

/// [`resolve::resolve`] against the cgroup filesystem: each path's id and
/// level as `caches.0` holds it, else stat()ed (an error is logged and
/// counts as absent) and kept; each delegation answer likewise from
/// `caches.1`. The loop's resolves and a survey's walk both use it.
pub(super) fn resolve_on_disk(
    hierarchy: &Hierarchy,
    policies: &[CompiledPolicy],
    tree: &TreeIndex,
    cri: Option<&cri::Snapshot>,
    (cache, writable): (&mut ResolveCache, &mut HashMap<String, bool>),
    limits: resolve::Limits,
) -> resolve::Outcome {
    let mut stat = |path: &str| -> Option<(u64, u32)> {
        cache.get_or(path, || {
            hierarchy.resolve(path).unwrap_or_else(|e| {
                warn!("daemon: {e}; treating it as absent");
                None
            })
        })
    };
    let mut delegated = |path: &str| hierarchy.delegated_subtree(path, writable);
    resolve::resolve(policies, tree, cri, &mut stat, &mut delegated, limits)
}

impl Agent {
    pub(super) fn needs_tree(policies: &[CompiledPolicy]) -> bool {
        policies
            .iter()
            .any(|p| !matches!(p.selector, Selector::Cgroup(_)))
    }

    /// Index the parts of the cgroup tree the selectors need: the kubelet's
    /// pod hierarchies for `pods:`, the whole tree only for `unit:`.
    pub(super) fn scan_tree(&self, policies: &[CompiledPolicy]) -> TreeIndex {
        let (starts, depth) = Self::tree_scope(policies).unwrap_or((Vec::new(), 0));
        TreeIndex::scan(self.hierarchy.root(), &starts, depth)
    }

    /// Where [`Agent::scan_tree`] walks (starts, depth) for `policies`, or
    /// `None` when they need no index (only `cgroup:` selectors).
    pub(super) fn tree_scope(policies: &[CompiledPolicy]) -> Option<(Vec<&'static str>, usize)> {
        if !Self::needs_tree(policies) {
            return None;
        }
        if policies
            .iter()
            .any(|p| matches!(p.selector, Selector::Unit(_)))
        {
            return Some((vec!["/"], 16));
        }
        Some((crate::workload::identity::KUBEPODS_ROOTS.to_vec(), 4))
    }

    /// The bounds on what `policies` selected by name may take: per
    /// delegated subtree, and the map less the pods waiting for the runtime
    /// (they are held too).
    pub(super) fn resolve_limits(&self, policies: &[CompiledPolicy]) -> resolve::Limits {
        let waiting = match (&self.cri, &self.tree, Self::needs_cri(policies)) {
            (Some(cri), Some(tree), true) => tree.unknown_pods(cri).len(),
            _ => 0,
        };
        resolve::Limits {
            per_subtree: self.max_delegated,
            capacity: (self.capacity.cgroups as usize).saturating_sub(waiting),
        }
    }

    /// Pod cgroups to hold in quarantine: unknown to the runtime, governed
    /// by no policy, unidentified for less than [`IDENTIFY_TIMEOUT`] of the
    /// runtime answering. Only once the runtime has answered (a wrong
    /// --cri-socket must not block every pod); while it then stops
    /// answering, the timeout does not run: a new pod stays held until the
    /// runtime can name it, instead of being released ungoverned.
    pub(super) fn compute_quarantine(&mut self, resolved: &Resolution) -> Vec<Governed> {
        let (Some(tree), Some(cri)) = (&self.tree, &self.cri) else {
            self.unidentified_since.clear();
            return Vec::new();
        };
        let runtime_down = self.cri_health.failing_since.is_some();
        let unknown = tree.unknown_pods(cri);
        self.unidentified_since
            .retain(|uid, _| unknown.contains(uid));
        let governed: HashSet<u64> = resolved.iter().flatten().map(|g| g.id).collect();
        let mut out = Vec::new();
        for uid in unknown {
            let since = self
                .unidentified_since
                .entry(uid.clone())
                .or_insert_with(Instant::now);
            if runtime_down {
                *since = Instant::now();
            }
            if since.elapsed() > IDENTIFY_TIMEOUT {
                continue;
            }
            let Some(path) = tree.pods.get(&uid) else {
                continue;
            };
            if let Ok(Some((id, level))) = self.hierarchy.resolve(path)
                && !governed.contains(&id)
            {
                out.push(Governed {
                    path: path.clone(),
                    id,
                    level,
                });
            }
        }
        out
    }

    pub(super) fn needs_cri(policies: &[CompiledPolicy]) -> bool {
        policies
            .iter()
            .any(|p| matches!(p.selector, Selector::Pods(_)))
    }

    /// Resolve each policy's cgroups. `fresh`: stat every path and re-index
    /// the tree (rescans); otherwise reuse what is known (reloads).
    pub(super) fn resolve(&mut self, policies: &[CompiledPolicy], fresh: bool) -> Resolution {
        if fresh {
            self.resolve_cache.clear();
            self.fresh_resolves += 1;
        }
        if Self::needs_tree(policies) && (fresh || self.tree.is_none()) {
            self.tree = Some(self.scan_tree(policies));
            self.watch_inputs += 1;
        }
        let limits = self.resolve_limits(policies);
        if fresh {
            self.writable_cache.clear();
        }
        let empty = TreeIndex::default();
        let outcome = resolve_on_disk(
            &self.hierarchy,
            policies,
            self.tree.as_ref().unwrap_or(&empty),
            self.cri.as_ref(),
            (&mut self.resolve_cache, &mut self.writable_cache),
            limits,
        );
        self.finish_resolve(policies, outcome)
    }

    /// What [`Agent::resolve`] does with the resolver's outcome: report
    /// ties and what was left out, hold unidentified pods, keep to
    /// `--attach-cgroup`. Also for an outcome a survey's thread resolved
    /// from what the loop holds now (`Surveys::install`).
    pub(super) fn finish_resolve(
        &mut self,
        policies: &[CompiledPolicy],
        outcome: resolve::Outcome,
    ) -> Resolution {
        let mut resolved = outcome.resolution;
        for t in outcome.ties {
            if self.ties_logged.insert(t.clone()) {
                error!("daemon: {t}");
            }
        }
        self.left_out(policies, &outcome.skipped, &outcome.unfit, &resolved);
        self.next_quarantine = if Self::needs_cri(policies) {
            self.compute_quarantine(&resolved)
        } else {
            Vec::new()
        };
        // Pod and unit selectors may find cgroups outside --attach-cgroup,
        // where the programs do not run: say so and leave them out. (Every
        // cgroup is within the root: 10,000 policies' cgroups not visited.)
        if self.attach_cgroup != "/" {
            for (p, govs) in policies.iter().zip(&mut resolved) {
                govs.retain(|g| {
                    let ok = crate::policy::builtin::within(&g.path, &self.attach_cgroup);
                    if !ok {
                        warn!(
                            "daemon: policy `{}` selects {}, outside --attach-cgroup {}: not enforced there",
                            p.name, g.path, self.attach_cgroup
                        );
                    }
                    ok
                });
            }
        }
        self.last_resolve = (!Self::needs_tree(policies)).then(|| self.resolve_cache.changes());
        resolved
    }
}
