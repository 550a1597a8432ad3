//! Which cgroups each policy governs right now.
//!
//! Pure over its inputs: an index of the cgroup tree (where pods, containers
//! and units are), the CRI runtime's last snapshot, and a `stat` function
//! that gives a cgroup path's id and depth. The agent feeds it real ones;
//! unit tests feed it fakes.
//!
//! - `cgroup:` governs that path (when it exists).
//! - `unit:` governs every cgroup directory named after the unit.
//! - `pods:` governs the pod-level cgroup of every matching pod, so
//!   containers created later inherit the policy from their first
//!   instruction; with `container:` it governs that container's cgroup only.
//!
//! When several policies select the same cgroup, the most specific selector
//! wins ([`Selector::specificity`]); equally specific ones are a tie, reported
//! and settled by file order.
//!
//! Names can be claimed: whoever can write a cgroup directory (a user a
//! subtree was delegated to) can create `nginx.service` below it. A policy
//! selected by name (`unit:`, `pods:`) therefore never governs a cgroup
//! inside such a *delegated subtree* unless it says `delegated: govern`;
//! and those it does govern are bounded per subtree
//! ([`Limits::per_subtree`]) and served after every cgroup in root's
//! subtrees, so that one user's thousand directories cannot take the map
//! space ([`Limits::capacity`]) everyone else needs.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    path::Path,
};

use crate::{
    policy::{CompiledPolicy, Delegated, Selector, most_specific},
    workload::cri::Snapshot,
    workload::identity,
};

/// One cgroup a policy governs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Governed {
    /// Path under the cgroup2 mount.
    pub path: String,
    pub id: u64,
    /// Depth below the cgroup2 root.
    pub level: u32,
}

/// Per policy (same order as the policies), the cgroups it governs.
pub type Resolution = Vec<Vec<Governed>>;

/// Bounds on what policies selected by name may take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Cgroups governed inside one delegated subtree (over all policies).
    pub per_subtree: usize,
    /// Cgroups governed in all (the kernel map's size). Cgroups in root's
    /// subtrees are never left out for this bound (the apply fails
    /// instead); delegated ones are, once the others are counted.
    pub capacity: usize,
}

impl Limits {
    pub const UNBOUNDED: Self = Self {
        per_subtree: usize::MAX,
        capacity: usize::MAX,
    };
}

/// A cgroup a policy selected by name and does not govern.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeftOut {
    pub policy: usize,
    pub path: String,
    /// The delegated subtree it lies in.
    pub subtree: String,
}

/// What [`resolve`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    pub resolution: Resolution,
    /// Equally specific selectors on one cgroup (settled by file order).
    pub ties: Vec<String>,
    /// In a delegated subtree; the policy did not opt in.
    pub skipped: Vec<LeftOut>,
    /// In a delegated subtree, opted in, but over [`Limits`].
    pub unfit: Vec<LeftOut>,
}

/// Where pods, containers and units sit in the cgroup tree.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TreeIndex {
    /// Pod uid -> pod-level cgroup path.
    pub pods: HashMap<String, String>,
    /// Container id -> container cgroup path.
    pub containers: HashMap<String, String>,
    /// Unit name -> its cgroup paths.
    pub units: HashMap<String, Vec<String>>,
    /// systemd slices outside Kubernetes (where units start).
    pub slices: Vec<String>,
}

impl TreeIndex {
    /// Index a list of cgroup paths.
    pub fn from_paths<'a>(paths: impl IntoIterator<Item = &'a str>) -> Self {
        let mut idx = Self::default();
        for path in paths {
            let id = identity::parse(path);
            if path.ends_with(".slice") && !path.starts_with("/kubepods") {
                idx.slices.push(path.to_owned());
            }
            if let Some(cid) = id.container_id {
                // Only the container's own cgroup, never a directory below
                // it named like another container.
                // A Kubernetes container's cgroup (under its pod) wins over
                // a directory elsewhere named like it.
                if identity::is_container_cgroup(path) {
                    if id.pod_uid.is_some() {
                        idx.containers.insert(cid, path.to_owned());
                    } else {
                        idx.containers.entry(cid).or_insert_with(|| path.to_owned());
                    }
                }
            } else if let Some(uid) = id.pod_uid {
                if identity::pod_cgroup_prefix(path).as_deref() == Some(path) {
                    idx.pods.insert(uid, path.to_owned());
                }
            } else if let Some(unit) = id.unit
                && path.ends_with(&unit)
            {
                idx.units.entry(unit).or_default().push(path.to_owned());
            }
        }
        idx
    }

    /// Add cgroup paths to the index (as [`TreeIndex::from_paths`] would
    /// index them), without walking the tree: a hook's cgroup and its
    /// ancestors, known to exist now. Whether the index changed.
    pub fn add_paths<'a>(&mut self, paths: impl IntoIterator<Item = &'a str>) -> bool {
        let more = Self::from_paths(paths);
        let mut changed = false;
        for (uid, path) in more.pods {
            if self.pods.get(&uid) != Some(&path) {
                self.pods.insert(uid, path);
                changed = true;
            }
        }
        for (cid, path) in more.containers {
            if identity::parse(&path).pod_uid.is_some() {
                if self.containers.get(&cid) != Some(&path) {
                    self.containers.insert(cid, path);
                    changed = true;
                }
            } else if let std::collections::hash_map::Entry::Vacant(e) = self.containers.entry(cid)
            {
                e.insert(path);
                changed = true;
            }
        }
        for (unit, paths) in more.units {
            let known = self.units.entry(unit).or_default();
            for p in paths {
                if !known.contains(&p) {
                    known.push(p);
                    changed = true;
                }
            }
        }
        for s in more.slices {
            if !self.slices.contains(&s) {
                self.slices.push(s);
                changed = true;
            }
        }
        changed
    }

    /// Walk the cgroup2 tree mounted at `root`, from each of `starts` (paths
    /// under the mount, e.g. `/kubepods`), up to `max_depth` levels below it.
    pub fn scan(root: &Path, starts: &[&str], max_depth: usize) -> Self {
        let mut paths = Vec::new();
        let mut stack: Vec<(std::path::PathBuf, usize)> = starts
            .iter()
            .map(|s| (root.join(s.trim_start_matches('/')), 0usize))
            .filter(|(p, _)| p.is_dir())
            .collect();
        for (p, _) in &stack {
            if let Ok(rel) = p.strip_prefix(root)
                && !rel.as_os_str().is_empty()
            {
                paths.push(format!("/{}", rel.display()));
            }
        }
        while let Some((dir, depth)) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                if !e.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                let p = e.path();
                if let Ok(rel) = p.strip_prefix(root) {
                    paths.push(format!("/{}", rel.display()));
                }
                if depth + 1 < max_depth {
                    stack.push((p, depth + 1));
                }
            }
        }
        Self::from_paths(paths.iter().map(String::as_str))
    }

    /// Pod uids whose cgroup exists but which the snapshot does not list yet
    /// (a sandbox being created): worth asking the runtime again soon.
    pub fn unknown_pods(&self, cri: &Snapshot) -> Vec<String> {
        self.pods
            .keys()
            .filter(|uid| cri.pod_by_uid(uid).is_none())
            .cloned()
            .collect()
    }
}

/// Candidate cgroup paths of one policy: what its selector names, whether
/// or not the policy governs them in the end (`portguard why` lists them).
pub fn candidates(p: &CompiledPolicy, tree: &TreeIndex, cri: Option<&Snapshot>) -> Vec<String> {
    match &p.selector {
        Selector::Cgroup(path) => vec![path.clone()],
        Selector::Unit(u) => tree.units.get(u).cloned().unwrap_or_default(),
        Selector::Pods(sel) => {
            let Some(cri) = cri else {
                return Vec::new();
            };
            let mut out = Vec::new();
            for pod in cri
                .pods
                .iter()
                .filter(|pod| sel.matches_pod(&pod.namespace, &pod.labels))
            {
                match &sel.container {
                    None => out.extend(tree.pods.get(&pod.uid).cloned()),
                    // Only a container cgroup right below this pod's own.
                    Some(name) => out.extend(
                        cri.containers
                            .iter()
                            .filter(|c| c.sandbox_id == pod.sandbox_id && &c.name == name)
                            .filter_map(|c| tree.containers.get(&c.id).cloned())
                            .filter(|path| {
                                identity::pod_cgroup_prefix(path).as_ref()
                                    == tree.pods.get(&pod.uid)
                            }),
                    ),
                }
            }
            out.sort();
            out.dedup();
            out
        }
    }
}

/// Resolve every policy. `delegated(path)` names the delegated subtree a
/// cgroup lies in, if any (see [`crate::workload::cgroupfs::Hierarchy::delegated_subtree`]).
pub fn resolve(
    policies: &[CompiledPolicy],
    tree: &TreeIndex,
    cri: Option<&Snapshot>,
    stat: &mut dyn FnMut(&str) -> Option<(u64, u32)>,
    delegated: &mut dyn FnMut(&str) -> Option<String>,
    limits: Limits,
) -> Outcome {
    let mut placer = Placer {
        policies,
        owner: rustc_hash::FxHashMap::with_capacity_and_hasher(policies.len(), Default::default()),
        found: vec![Vec::new(); policies.len()],
        ties: Vec::new(),
    };
    let mut out = Outcome::default();
    // Subtree -> (policy, path) candidates.
    let mut waiting: BTreeMap<String, Vec<(usize, String)>> = BTreeMap::new();
    for (i, p) in policies.iter().enumerate() {
        let by_name = !matches!(p.selector, Selector::Cgroup(_));
        for path in candidates(p, tree, cri) {
            if by_name && let Some(subtree) = delegated(&path) {
                if p.delegated == Delegated::Govern {
                    waiting.entry(subtree).or_default().push((i, path));
                } else {
                    out.skipped.push(LeftOut {
                        policy: i,
                        path,
                        subtree,
                    });
                }
                continue;
            }
            placer.place(i, path, stat);
        }
    }
    // Delegated subtrees take turns, one cgroup each, until each reaches
    // its bound or the map is full.
    let mut taken: HashMap<&str, HashSet<u64>> = HashMap::new();
    // Within a subtree, in path order (not the order directories were
    // listed in): the same tree gives the same answer.
    for queue in waiting.values_mut() {
        queue.sort_by(|a, b| (&a.1, a.0).cmp(&(&b.1, b.0)));
    }
    let mut queues: Vec<(&str, std::collections::VecDeque<(usize, String)>)> = waiting
        .iter()
        .map(|(s, v)| (s.as_str(), v.iter().cloned().collect()))
        .collect();
    while queues.iter().any(|(_, q)| !q.is_empty()) {
        for (subtree, queue) in &mut queues {
            let Some((i, path)) = queue.pop_front() else {
                continue;
            };
            let here = taken.entry(subtree).or_default();
            // One entry per delegated subtree stays free: what holds the
            // subtree should its cgroups not fit (`--fail-closed`).
            let room = limits.capacity.saturating_sub(waiting.len());
            if here.len() >= limits.per_subtree || placer.owner.len() >= room {
                out.unfit.push(LeftOut {
                    policy: i,
                    path,
                    subtree: (*subtree).to_owned(),
                });
                continue;
            }
            if let Some(id) = placer.place(i, path, stat) {
                here.insert(id);
            }
        }
    }
    out.resolution = placer.found;
    out.ties = placer.ties;
    out
}

/// Places candidates, most specific selector first.
struct Placer<'a> {
    policies: &'a [CompiledPolicy],
    /// cgroup id -> (policy index, specificity)
    owner: rustc_hash::FxHashMap<u64, (usize, u32)>,
    found: Resolution,
    ties: Vec<String>,
}

impl Placer<'_> {
    /// Let policy `i` govern `path` unless a more specific one does; the
    /// cgroup's id when `i` governs it now.
    fn place(
        &mut self,
        i: usize,
        path: String,
        stat: &mut dyn FnMut(&str) -> Option<(u64, u32)>,
    ) -> Option<u64> {
        let policies = self.policies;
        let p = &policies[i];
        let spec = p.selector.specificity();
        let (id, level) = stat(&path)?;
        match self.owner.get(&id).copied() {
            // The rule every reader of the plan shares (`check
            // --manifests` too): most specific wins, first in the file
            // breaks ties.
            Some((j, s))
                if most_specific([(j, &policies[j].selector), (i, &p.selector)]) == Some(j) =>
            {
                if s == spec {
                    self.ties.push(format!(
                        "cgroup {path} is selected by policies `{}` and `{}` equally; `{}` (first in the file) applies",
                        policies[j].name, p.name, policies[j].name
                    ));
                }
                return None;
            }
            Some((j, _)) => self.found[j].retain(|g| g.id != id),
            None => {}
        }
        self.owner.insert(id, (i, spec));
        self.found[i].push(Governed { path, id, level });
        Some(id)
    }
}

#[cfg(test)]
mod tests;
