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
                if identity::is_container_cgroup(path) {
                    idx.containers.entry(cid).or_insert_with(|| path.to_owned());
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

/// Candidate cgroup paths of one policy.
fn candidates(p: &CompiledPolicy, tree: &TreeIndex, cri: Option<&Snapshot>) -> Vec<String> {
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
                    Some(name) => out.extend(
                        cri.containers
                            .iter()
                            .filter(|c| c.sandbox_id == pod.sandbox_id && &c.name == name)
                            .filter_map(|c| tree.containers.get(&c.id).cloned()),
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
        owner: HashMap::new(),
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
    owner: HashMap<u64, (usize, u32)>,
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
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::{
        policy::{compile_all, parse_policy_str},
        workload::cri::{Container, Pod},
    };

    const U1: &str = "11111111-1111-1111-1111-111111111111";
    const U2: &str = "22222222-2222-2222-2222-222222222222";
    const C1: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const C2: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    fn fixture() -> (TreeIndex, Snapshot) {
        let paths = [
            "/kubepods".to_owned(),
            "/kubepods/besteffort".to_owned(),
            format!("/kubepods/besteffort/pod{U1}"),
            format!("/kubepods/besteffort/pod{U1}/{C1}"),
            format!("/kubepods/besteffort/pod{U1}/{C2}"),
            format!("/kubepods/burstable/pod{U2}"),
            "/system.slice".to_owned(),
            "/system.slice/nginx.service".to_owned(),
            "/user.slice/user-1000.slice".to_owned(),
            "/kubepods.slice".to_owned(),
        ];
        let tree = TreeIndex::from_paths(paths.iter().map(String::as_str));
        let pod = |uid: &str, ns: &str, app: &str| Pod {
            sandbox_id: format!("sb-{uid}"),
            uid: uid.to_owned(),
            name: format!("{app}-0"),
            namespace: ns.to_owned(),
            labels: BTreeMap::from([("app".to_owned(), app.to_owned())]),
            ready: true,
        };
        let cri = Snapshot {
            pods: vec![pod(U1, "payments", "web"), pod(U2, "team-a", "db")],
            containers: vec![
                Container {
                    id: C1.into(),
                    sandbox_id: format!("sb-{U1}"),
                    name: "server".into(),
                },
                Container {
                    id: C2.into(),
                    sandbox_id: format!("sb-{U1}"),
                    name: "sidecar".into(),
                },
            ],
        };
        (tree, cri)
    }

    fn run(text: &str) -> (Vec<Vec<String>>, Vec<String>) {
        let (tree, cri) = fixture();
        let policies = compile_all(&parse_policy_str(text).unwrap().policies);
        let mut n = 0u64;
        let mut ids: HashMap<String, u64> = HashMap::new();
        let mut stat = |p: &str| {
            let id = *ids.entry(p.to_owned()).or_insert_with(|| {
                n += 1;
                n
            });
            Some((id, p.matches('/').count() as u32))
        };
        let Outcome {
            resolution: r,
            ties,
            ..
        } = resolve(
            &policies,
            &tree,
            Some(&cri),
            &mut stat,
            &mut |_| None,
            Limits::UNBOUNDED,
        );
        (
            r.into_iter()
                .map(|g| g.into_iter().map(|g| g.path).collect())
                .collect(),
            ties,
        )
    }

    #[test]
    fn tree_index_finds_pods_containers_and_units() {
        let (tree, cri) = fixture();
        assert_eq!(tree.pods.len(), 2);
        assert_eq!(tree.containers.len(), 2);
        assert_eq!(
            tree.units["nginx.service"],
            vec!["/system.slice/nginx.service"]
        );
        // Slices where units may start; the kubelet's are not unit homes.
        assert_eq!(
            tree.slices,
            vec!["/system.slice", "/user.slice/user-1000.slice"]
        );
        assert!(tree.unknown_pods(&cri).is_empty());
        let mut fewer = cri.clone();
        fewer.pods.pop();
        assert_eq!(tree.unknown_pods(&fewer), vec![U2.to_owned()]);
    }

    #[test]
    fn pod_selectors_govern_pod_cgroups_or_containers() {
        let (r, ties) = run(
            "policies:\n  - {name: web, pods: {namespace: payments, labels: {app: web}}, bind: []}\n  - {name: teams, pods: {namespace: 'team-*'}, bind: []}\n  - {name: nomatch, pods: {labels: {app: nope}}, bind: []}\n",
        );
        assert!(ties.is_empty());
        assert_eq!(r[0], vec![format!("/kubepods/besteffort/pod{U1}")]);
        assert_eq!(r[1], vec![format!("/kubepods/burstable/pod{U2}")]);
        assert!(r[2].is_empty());
        let (r, _) = run(
            "policies:\n  - {name: srv, pods: {labels: {app: web}, container: server}, bind: []}\n",
        );
        assert_eq!(r[0], vec![format!("/kubepods/besteffort/pod{U1}/{C1}")]);
    }

    #[test]
    fn the_most_specific_selector_wins_and_ties_are_reported() {
        let (r, ties) = run(
            "policies:\n  - {name: all, pods: {}, bind: []}\n  - {name: web, pods: {labels: {app: web}}, bind: []}\n  - {name: exact, cgroup: /kubepods/burstable/pod22222222-2222-2222-2222-222222222222, bind: []}\n  - {name: unit, unit: nginx.service, bind: []}\n",
        );
        assert!(ties.is_empty(), "{ties:?}");
        assert!(r[0].is_empty(), "`all` loses both pods: {:?}", r[0]);
        assert_eq!(r[1], vec![format!("/kubepods/besteffort/pod{U1}")]);
        assert_eq!(r[2], vec![format!("/kubepods/burstable/pod{U2}")]);
        assert_eq!(r[3], vec!["/system.slice/nginx.service".to_owned()]);
        // An exact namespace outweighs one label.
        let (r, ties) = run(
            "policies:\n  - {name: a, pods: {labels: {app: web}}, bind: []}\n  - {name: b, pods: {namespace: payments}, bind: []}\n",
        );
        assert_eq!(r[1].len(), 1);
        assert!(r[0].is_empty());
        assert!(ties.is_empty());
    }

    #[test]
    fn equal_specificity_on_one_cgroup_is_a_tie_settled_by_file_order() {
        let (r, ties) = run(
            "policies:\n  - {name: one, pods: {labels: {app: web}}, bind: []}\n  - {name: two, pods: {namespace: 'pay*', labels: {}}, bind: []}\n",
        );
        // one label (+1) vs a namespace glob (+20): `two` is more specific.
        assert!(r[0].is_empty() && r[1].len() == 1, "{r:?}");
        assert!(ties.is_empty());
        // Two different one-label selectors that both match pod U1.
        let (tree, mut cri) = fixture();
        cri.pods[0].labels.insert("tier".into(), "front".into());
        // The parser rejects such a file (a tie); the agent still settles a
        // tie deterministically should one ever reach it.
        let parse = |t: &str| parse_policy_str(t).unwrap().policies;
        let mut both = parse("policies:\n  - {name: one, pods: {labels: {app: web}}, bind: []}\n");
        both.extend(parse(
            "policies:\n  - {name: two, pods: {labels: {tier: front}}, bind: []}\n",
        ));
        let policies = compile_all(&both);
        let mut stat = |p: &str| Some((p.len() as u64, 3));
        let Outcome {
            resolution: r,
            ties,
            ..
        } = resolve(
            &policies,
            &tree,
            Some(&cri),
            &mut stat,
            &mut |_| None,
            Limits::UNBOUNDED,
        );
        assert_eq!(r[0].len(), 1);
        assert!(r[1].is_empty());
        assert_eq!(ties.len(), 1);
        assert!(ties[0].contains("`one` and `two`"), "{ties:?}");
    }

    #[test]
    fn a_cgroup_named_after_another_container_does_not_take_its_place() {
        // Listed first: a directory made inside pod U1's container C1, named
        // after pod U2's container C2 and after pod U2 itself.
        let spoof = format!("/kubepods/besteffort/pod{U1}/{C1}/{C2}");
        let spoof_pod = format!("/kubepods/besteffort/pod{U1}/{C1}/pod{U2}");
        let paths = [
            spoof.clone(),
            spoof_pod.clone(),
            format!("/kubepods/besteffort/pod{U1}"),
            format!("/kubepods/besteffort/pod{U1}/{C1}"),
            format!("/kubepods/burstable/pod{U2}"),
            format!("/kubepods/burstable/pod{U2}/{C2}"),
        ];
        let tree = TreeIndex::from_paths(paths.iter().map(String::as_str));
        assert_eq!(
            tree.containers[C2],
            format!("/kubepods/burstable/pod{U2}/{C2}")
        );
        assert_eq!(
            tree.containers[C1],
            format!("/kubepods/besteffort/pod{U1}/{C1}")
        );
        assert_eq!(tree.pods[U2], format!("/kubepods/burstable/pod{U2}"));
        assert_eq!(tree.pods.len(), 2);
    }

    /// A user's delegated subtree, with cgroups named after a unit.
    fn delegated_run(text: &str, limits: Limits, extra: usize) -> Outcome {
        const HOME: &str = "/user.slice/user-1000.slice/user@1000.service";
        let mut paths = vec![
            "/system.slice/nginx.service".to_owned(),
            "/system.slice/other/nginx.service".to_owned(),
            format!("{HOME}/app.slice/nginx.service"),
        ];
        paths.extend((0..extra).map(|i| format!("{HOME}/s{i}/nginx.service")));
        paths.push("/user.slice/user-2000.slice/user@2000.service/nginx.service".to_owned());
        let tree = TreeIndex::from_paths(paths.iter().map(String::as_str));
        let policies = compile_all(&parse_policy_str(text).unwrap().policies);
        let mut ids: HashMap<String, u64> = HashMap::new();
        let mut stat = |p: &str| {
            let next = ids.len() as u64 + 1;
            Some((*ids.entry(p.to_owned()).or_insert(next), 3))
        };
        let mut delegated = |p: &str| {
            [
                "/user.slice/user-1000.slice/user@1000.service",
                "/user.slice/user-2000.slice/user@2000.service",
            ]
            .into_iter()
            .find(|h| p.starts_with(h))
            .map(str::to_owned)
        };
        resolve(&policies, &tree, None, &mut stat, &mut delegated, limits)
    }

    #[test]
    fn a_name_in_a_delegated_subtree_earns_nothing_unless_the_policy_opts_in() {
        let o = delegated_run(
            "policies:\n  - {name: nginx, unit: nginx.service, bind: [{ports: [80]}]}\n",
            Limits::UNBOUNDED,
            0,
        );
        let paths: Vec<&str> = o.resolution[0].iter().map(|g| g.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "/system.slice/nginx.service",
                "/system.slice/other/nginx.service"
            ]
        );
        assert_eq!(o.skipped.len(), 2, "{:?}", o.skipped);
        assert!(o.unfit.is_empty());
        assert_eq!(
            o.skipped[0].subtree,
            "/user.slice/user-1000.slice/user@1000.service"
        );
        // `cgroup:` names a path, not a name: it is governed wherever it is.
        let o = delegated_run(
            "policies:\n  - {name: exact, cgroup: /user.slice/user-1000.slice/user@1000.service/app.slice/nginx.service, bind: []}\n",
            Limits::UNBOUNDED,
            0,
        );
        assert_eq!(o.resolution[0].len(), 1);
        assert!(o.skipped.is_empty());
        // Opting in governs them.
        let o = delegated_run(
            "policies:\n  - {name: nginx, unit: nginx.service, delegated: govern, bind: [{ports: [80]}]}\n",
            Limits::UNBOUNDED,
            0,
        );
        assert_eq!(o.resolution[0].len(), 4);
        assert!(o.skipped.is_empty() && o.unfit.is_empty());
    }

    #[test]
    fn delegated_subtrees_are_bounded_and_served_after_roots_subtrees() {
        let text = "policies:\n  - {name: nginx, unit: nginx.service, delegated: govern, bind: [{ports: [80]}]}\n";
        // One user makes 1000 cgroups named nginx.service.
        let o = delegated_run(
            text,
            Limits {
                per_subtree: 3,
                capacity: usize::MAX,
            },
            1000,
        );
        let govern = |o: &Outcome, prefix: &str| {
            o.resolution[0]
                .iter()
                .filter(|g| g.path.starts_with(prefix))
                .count()
        };
        assert_eq!(govern(&o, "/system.slice/"), 2);
        assert_eq!(govern(&o, "/user.slice/user-1000.slice/"), 3);
        assert_eq!(govern(&o, "/user.slice/user-2000.slice/"), 1);
        assert_eq!(o.unfit.len(), 1001 - 3);
        // A map with room for 5: root's two first, then the subtrees take
        // turns (one slot each is kept back for a --fail-closed hold).
        let o = delegated_run(
            text,
            Limits {
                per_subtree: 64,
                capacity: 5,
            },
            1000,
        );
        assert_eq!(govern(&o, "/system.slice/"), 2);
        assert_eq!(govern(&o, "/user.slice/user-1000.slice/"), 1);
        assert_eq!(govern(&o, "/user.slice/user-2000.slice/"), 0);
        assert_eq!(o.unfit.len(), 1001);
        // Cgroups in root's subtrees are never left out for room: the
        // apply fails instead (and --fail-closed acts on that).
        let o = delegated_run(
            text,
            Limits {
                per_subtree: 64,
                capacity: 1,
            },
            10,
        );
        assert_eq!(govern(&o, "/system.slice/"), 2);
        assert_eq!(o.resolution[0].len(), 2);
    }

    #[test]
    fn without_a_runtime_pod_selectors_govern_nothing() {
        let (tree, _) = fixture();
        let policies = compile_all(
            &parse_policy_str("policies:\n  - {name: web, pods: {}, bind: []}\n")
                .unwrap()
                .policies,
        );
        let mut stat = |_: &str| Some((1, 1));
        let r = resolve(
            &policies,
            &tree,
            None,
            &mut stat,
            &mut |_| None,
            Limits::UNBOUNDED,
        )
        .resolution;
        assert!(r[0].is_empty());
    }
}
