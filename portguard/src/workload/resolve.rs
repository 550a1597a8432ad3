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

use std::{collections::HashMap, path::Path};

use crate::{
    policy::{CompiledPolicy, Selector, most_specific},
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
                idx.containers.entry(cid).or_insert_with(|| path.to_owned());
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

/// Resolve every policy. Returns the resolution and messages about ties.
pub fn resolve(
    policies: &[CompiledPolicy],
    tree: &TreeIndex,
    cri: Option<&Snapshot>,
    stat: &mut dyn FnMut(&str) -> Option<(u64, u32)>,
) -> (Resolution, Vec<String>) {
    // cgroup id -> (policy index, specificity)
    let mut owner: HashMap<u64, (usize, u32)> = HashMap::new();
    let mut found: Vec<Vec<Governed>> = vec![Vec::new(); policies.len()];
    let mut ties = Vec::new();
    for (i, p) in policies.iter().enumerate() {
        let spec = p.selector.specificity();
        for path in candidates(p, tree, cri) {
            let Some((id, level)) = stat(&path) else {
                continue;
            };
            match owner.get(&id).copied() {
                // The rule every reader of the plan shares (`check
                // --manifests` too): most specific wins, first in the file
                // breaks ties.
                Some((j, s))
                    if most_specific([(j, &policies[j].selector), (i, &p.selector)]) == Some(j) =>
                {
                    if s == spec {
                        ties.push(format!(
                            "cgroup {path} is selected by policies `{}` and `{}` equally; `{}` (first in the file) applies",
                            policies[j].name, p.name, policies[j].name
                        ));
                    }
                    continue;
                }
                Some((j, _)) => found[j].retain(|g| g.id != id),
                None => {}
            }
            owner.insert(id, (i, spec));
            found[i].push(Governed { path, id, level });
        }
    }
    (found, ties)
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
        let (r, ties) = resolve(&policies, &tree, Some(&cri), &mut stat);
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
        let (r, ties) = resolve(&policies, &tree, Some(&cri), &mut stat);
        assert_eq!(r[0].len(), 1);
        assert!(r[1].is_empty());
        assert_eq!(ties.len(), 1);
        assert!(ties[0].contains("`one` and `two`"), "{ties:?}");
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
        let (r, _) = resolve(&policies, &tree, None, &mut stat);
        assert!(r[0].is_empty());
    }
}
