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
    // And one outside Kubernetes, in a user's own subtree.
    let spoof_scope =
        format!("/user.slice/user-1000.slice/user@1000.service/x/cri-containerd-{C2}.scope");
    let paths = [
        spoof_scope.clone(),
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

#[test]
fn paths_added_to_the_index_are_indexed_like_scanned_ones() {
    let mut idx = TreeIndex::from_paths(["/system.slice", "/system.slice/a.service"]);
    let changed = idx.add_paths([
        "/system.slice",
        "/system.slice/b.service",
        "/kubepods/besteffort/pod0f6c0000-0000-4000-8000-000000000001",
        "/kubepods/besteffort/pod0f6c0000-0000-4000-8000-000000000001/aaaaaaaaaaaaaaaa",
    ]);
    let full = TreeIndex::from_paths([
        "/system.slice",
        "/system.slice/a.service",
        "/system.slice/b.service",
        "/kubepods/besteffort/pod0f6c0000-0000-4000-8000-000000000001",
        "/kubepods/besteffort/pod0f6c0000-0000-4000-8000-000000000001/aaaaaaaaaaaaaaaa",
    ]);
    assert_eq!(idx, full);
    assert!(changed, "new paths change the index");
    // Adding again changes nothing, and says so.
    assert!(!idx.add_paths(["/system.slice/b.service", "/system.slice"]));
    assert!(!idx.add_paths([
        "/kubepods/besteffort/pod0f6c0000-0000-4000-8000-000000000001/aaaaaaaaaaaaaaaa"
    ]));
    assert_eq!(idx, full);
}
