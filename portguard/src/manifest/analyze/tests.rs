use super::*;
use crate::{manifest::Manifests, policy::parse_policy_str};

fn units(yaml: &str) -> Manifests {
    let mut m = Manifests::default();
    for doc in crate::policy::yaml::parse_stream(yaml).unwrap() {
        super::super::kube::read("k.yaml", &doc, "default", &mut m);
    }
    m
}

fn deployment(name: &str, labels: &str, containers: &str) -> String {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  template:\n    metadata: {{labels: {labels}}}\n    spec:\n      containers: {containers}\n---\n"
    )
}

#[test]
fn the_most_specific_policy_judges_each_container() {
    let plan = parse_policy_str(
        "policies:\n  - {name: pod, pods: {namespace: shop, labels: {app: api}}, bind: [{ports: [3000]}]}\n  - {name: side, pods: {namespace: shop, labels: {app: api}, container: envoy}, bind: [{ports: [8443]}, {ports: [9901], address: loopback}]}\n  - {name: audit, mode: audit, pods: {namespace: shop, labels: {app: batch}}, bind: [{ports: [1]}]}\n",
    )
    .unwrap();
    let m = units(
        &(deployment(
            "api",
            "{app: api}",
            "[{name: api, ports: [{containerPort: 3000}, {containerPort: 8443}]}, {name: envoy, ports: [{containerPort: 8443}, {containerPort: 3000}, {containerPort: 9901}]}]",
        ) + &deployment(
            "batch",
            "{app: batch}",
            "[{name: b, ports: [{containerPort: 2}]}]",
        ) + &deployment(
            "free",
            "{app: free}",
            "[{name: f, ports: [{containerPort: 2}]}]",
        )),
    );
    let a = analyze(&plan, "p.yaml", &m);
    let got: Vec<_> = a
        .findings
        .iter()
        .map(|f| (f.check, f.loc.line, f.severity))
        .collect();
    // api's 8443 (pod policy), envoy's 3000 (container policy) and 9901
    // (loopback only), batch's 2 (audit: a warning); `free` is ungoverned.
    let lines: Vec<usize> = m
        .units
        .iter()
        .flat_map(|u| &u.ports)
        .map(|d| d.loc.line)
        .collect();
    assert_eq!(
        got,
        [
            (Check::PortNotAllowed, lines[1], Severity::Error),
            (Check::PortNotAllowed, lines[3], Severity::Error),
            (Check::PortNotAllowed, lines[4], Severity::Error),
            (Check::PortNotAllowed, lines[5], Severity::Warning),
        ],
        "{:#?}",
        a.findings
    );
    assert!(
        a.findings[2].message.contains("only on loopback"),
        "{}",
        a.findings[2].message
    );
    assert!(
        a.findings[1].message.contains("policy `side`"),
        "{}",
        a.findings[1].message
    );
    // `free` is the fourth container.
    assert_eq!((a.governed, m.units.len()), (3, 4));
}

#[test]
fn host_ports_conflict_across_workloads_and_protocols_matter() {
    let plan = parse_policy_str("policies: []\n").unwrap_or_default();
    let m = units(
        &(deployment(
            "a",
            "{app: a}",
            "[{name: a, ports: [{containerPort: 80, hostPort: 8080}, {containerPort: 53, hostPort: 53, protocol: UDP}]}]",
        ) + &deployment(
            "b",
            "{app: b}",
            "[{name: b, ports: [{containerPort: 81, hostPort: 8080}, {containerPort: 53, hostPort: 53}, {containerPort: 9, hostPort: 8081, hostIP: 10.0.0.1}]}]",
        ) + &deployment(
            "c",
            "{app: c}",
            "[{name: c, ports: [{containerPort: 9, hostPort: 8081, hostIP: 10.0.0.2}]}]",
        )),
    );
    let a = analyze(&plan, "p.yaml", &m);
    // 8080/tcp of a and b, each side annotated; 53 differs in protocol,
    // 8081 in host address.
    assert_eq!(a.findings.len(), 2, "{:#?}", a.findings);
    let (fa, fb) = (&a.findings[0], &a.findings[1]);
    let (ha, hb) = (
        m.units[0].ports[0].host.as_ref().unwrap(),
        m.units[1].ports[0].host.as_ref().unwrap(),
    );
    assert_eq!(
        (fa.check, &fa.loc, &fa.related[0].0),
        (Check::HostPortConflict, &ha.loc, &hb.loc)
    );
    assert_eq!(
        (fb.check, &fb.loc, &fb.related[0].0),
        (Check::HostPortConflict, &hb.loc, &ha.loc)
    );
    assert!(
        fb.message
            .contains("also claimed by container `a` of Deployment shop/a"),
        "{}",
        fb.message
    );
}

#[test]
fn reserved_ports_name_what_they_are_for() {
    let plan = parse_policy_str(
        "reserved: [infrastructure]\npolicies:\n  - {name: p, pods: {labels: {app: a}}, bind: [{ports: [10250]}]}\n",
    )
    .unwrap();
    let mut m = units(&deployment(
        "a",
        "{app: a}",
        "[{name: a, ports: [{containerPort: 10250}, {containerPort: 80, hostPort: 22}]}]",
    ));
    m.units[0].workload.namespace = "default".into();
    let a = analyze(&plan, "p.yaml", &m);
    let got: Vec<_> = a.findings.iter().map(|f| f.check).collect();
    // 10250: reserved only (not also "not allowed"); hostPort 22:
    // reserved; containerPort 80: not allowed.
    assert_eq!(
        got,
        [
            Check::ReservedPort,
            Check::PortNotAllowed,
            Check::ReservedPort
        ],
        "{:#?}",
        a.findings
    );
    assert!(a.findings[0].message.contains("the kubelet"));
    assert!(a.findings[2].message.contains("SSH"));
}

/// Write `files` under a temp dir and load them all.
fn load_files(files: &[(&str, &str)]) -> (tempfile::TempDir, Manifests) {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        let p = dir.path().join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }
    let m = crate::manifest::load(&[dir.path().to_owned()], "default").unwrap();
    (dir, m)
}

#[test]
fn one_service_across_files_and_only_real_differences_are_mismatches() {
    let k8s = deployment(
        "api",
        "{app: api}",
        "[{name: api, image: \"reg.example/shop/api:1\", ports: [{containerPort: 3000}, {containerPort: 9090}]}]",
    ) + &deployment(
        "other",
        "{app: other}",
        "[{name: worker, image: \"reg.example/shop/worker:1\", ports: [{containerPort: 5000}]}]",
    );
    let (_d, m) = load_files(&[
        ("k8s/all.yaml", &k8s),
        // Joined by build, image and name; `expose` missing: the
        // compose service declares 3000 only, not compared as missing.
        (
            "compose.yaml",
            "services:\n  api:\n    build: ./api\n    image: reg.example/shop/api:dev\n    ports: [\"8080:3000\"]\n  worker:\n    image: reg.example/shop/worker:dev\n",
        ),
        ("api/Dockerfile", "FROM x\nEXPOSE 3000 9090 7777\n"),
    ]);
    let g = group(&m.units);
    let idx = |o: Origin, c: &str| {
        m.units
            .iter()
            .position(|u| u.origin == o && u.container == c)
            .unwrap()
    };
    let api = g[idx(Origin::Kubernetes, "api")];
    assert_eq!(g[idx(Origin::Compose, "api")], api);
    assert_eq!(g[idx(Origin::Dockerfile, "api")], api);
    assert_ne!(g[idx(Origin::Kubernetes, "worker")], api);
    assert_eq!(
        g[idx(Origin::Compose, "worker")],
        g[idx(Origin::Kubernetes, "worker")]
    );
    let plan = parse_policy_str("policies: []\n").unwrap();
    let a = analyze(&plan, "p.yaml", &m);
    let got: Vec<_> = a
        .findings
        .iter()
        .map(|f| {
            (
                f.check,
                f.loc.file.rsplit('/').next().unwrap().to_owned(),
                f.loc.line,
            )
        })
        .collect();
    // Only 7777, which only the Dockerfile declares; the worker's
    // compose service declares nothing and is not compared.
    assert_eq!(
        got,
        [(Check::PortMismatch, "Dockerfile".to_owned(), 2)],
        "{:#?}",
        a.findings
    );
    assert_eq!(a.findings[0].related.len(), 2);
}

#[test]
fn compose_host_ports_collide_within_a_file_only() {
    let (_d, m) = load_files(&[
        (
            "a/compose.yaml",
            "services:\n  x: {image: x, ports: [\"8080:80\"]}\n  y: {image: y, ports: [\"8080:81\", \"127.0.0.1:9000:9000\"]}\n  z: {image: z, ports: [\"127.0.0.2:9000:9000\", \"8080:80/udp\"]}\n",
        ),
        (
            "b/compose.yaml",
            "services:\n  x2: {image: q, ports: [\"8080:80\"]}\n",
        ),
    ]);
    let plan = parse_policy_str("policies: []\n").unwrap();
    let a = analyze(&plan, "p.yaml", &m);
    let got: Vec<_> = a.findings.iter().map(|f| (f.check, f.loc.line)).collect();
    assert_eq!(
        got,
        [(Check::HostPortConflict, 2), (Check::HostPortConflict, 3)],
        "{:#?}",
        a.findings
    );
    assert!(
        a.findings[0].message.contains("published port"),
        "{}",
        a.findings[0].message
    );
}

#[test]
fn service_targets_by_number_and_name() {
    let k8s = deployment(
        "api",
        "{app: api, tier: web}",
        "[{name: api, ports: [{containerPort: 3000, name: http}, {containerPort: 53, protocol: UDP}]}]",
    ) + "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: shop}\nspec:\n  selector: {app: api}\n  ports:\n    - {port: 80, targetPort: http}\n    - {port: 3000}\n    - {port: 81, targetPort: https}\n    - {port: 53, protocol: UDP}\n    - {port: 54, targetPort: 53}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: lost, namespace: other}\nspec: {selector: {app: api}, ports: [{port: 1}]}\n";
    let m = units(&k8s);
    let plan = parse_policy_str("policies: []\n").unwrap();
    let a = analyze(&plan, "p.yaml", &m);
    let got: Vec<_> = a
        .findings
        .iter()
        .map(|f| (f.check, f.severity, f.loc.line))
        .collect();
    // `https` names no port; 54 -> 53/tcp, but 53 is declared UDP; the
    // Service in another namespace selects nothing (a warning).
    assert_eq!(
        got,
        [
            (Check::TargetPortUnmatched, Severity::Error, 18),
            (Check::TargetPortUnmatched, Severity::Error, 20),
            (Check::ServiceSelectsNothing, Severity::Warning, 22),
        ],
        "{:#?}",
        a.findings
    );
}

/// `governing` picks, for every container of the manifests, the policy
/// the agent ends up enforcing on it: the agent's resolver run on the
/// same pods, then the kernel's rule (the container's own cgroup's
/// policy, else its pod cgroup's).
#[test]
fn the_policy_chosen_is_the_one_the_agent_enforces() {
    use std::collections::HashMap;

    use crate::{
        workload::cri::{Container, Pod, Snapshot},
        workload::resolve::{TreeIndex, resolve},
    };
    let plan = parse_policy_str(
        "policies:\n  - {name: all, pods: {}, bind: []}\n  - {name: shop, pods: {namespace: shop}, bind: []}\n  - {name: glob, pods: {namespace: \"sh*\", labels: {app: api}}, bind: []}\n  - {name: api, pods: {namespace: shop, labels: {app: api}}, bind: []}\n  - {name: two-labels, pods: {labels: {app: api, tier: web}}, bind: []}\n  - {name: envoy, pods: {labels: {app: api}, container: envoy}, bind: []}\n  - {name: envoy-shop, pods: {namespace: shop, container: envoy}, bind: []}\n  - {name: db, pods: {namespace: data, labels: {app: db}}, bind: []}\n",
    )
    .unwrap();
    let policies = compile_all(&plan.policies);
    let m = units(
        &(deployment(
            "api",
            "{app: api, tier: web}",
            "[{name: api}, {name: envoy}]",
        ) + &deployment(
            "api2",
            "{app: api}",
            "[{name: api}, {name: envoy}, {name: log}]",
        ) + &deployment("other", "{app: other}", "[{name: envoy}, {name: x}]")
            + "apiVersion: v1\nkind: Pod\nmetadata: {name: db, namespace: data, labels: {app: db}}\nspec: {containers: [{name: pg}, {name: envoy}]}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: free, namespace: kube-system}\nspec: {containers: [{name: c}]}\n"),
    );
    // The pods and containers as the CRI runtime and the cgroup tree
    // would show them.
    let mut pods: Vec<Pod> = Vec::new();
    let mut containers = Vec::new();
    let mut paths = vec!["/kubepods".to_owned()];
    let mut cgroup_of = Vec::new();
    for (n, u) in m.units.iter().enumerate() {
        let key = format!("{}/{}", u.workload.namespace, u.workload.name);
        let p = match pods.iter().position(|p| p.name == key) {
            Some(p) => p,
            None => {
                let uid = format!("{:08x}-0000-0000-0000-000000000000", pods.len() + 1);
                paths.push(format!("/kubepods/pod{uid}"));
                pods.push(Pod {
                    sandbox_id: format!("sb-{uid}"),
                    uid,
                    name: key,
                    namespace: u.workload.namespace.clone(),
                    labels: u.labels.clone(),
                    ready: true,
                });
                pods.len() - 1
            }
        };
        let id = format!("{:064x}", n + 1);
        let pod_path = format!("/kubepods/pod{}", pods[p].uid);
        paths.push(format!("{pod_path}/{id}"));
        cgroup_of.push((pod_path.clone(), format!("{pod_path}/{id}")));
        containers.push(Container {
            id,
            sandbox_id: pods[p].sandbox_id.clone(),
            name: u.container.clone(),
        });
    }
    let tree = TreeIndex::from_paths(paths.iter().map(String::as_str));
    let cri = Snapshot { pods, containers };
    let mut ids: HashMap<String, u64> = HashMap::new();
    let mut stat = |p: &str| {
        let next = ids.len() as u64 + 1;
        Some((
            *ids.entry(p.to_owned()).or_insert(next),
            p.matches('/').count() as u32,
        ))
    };
    let resolution = resolve(
        &policies,
        &tree,
        Some(&cri),
        &mut stat,
        &mut |_| None,
        crate::workload::resolve::Limits::UNBOUNDED,
    )
    .resolution;
    let owner_of = |path: &str| {
        resolution
            .iter()
            .position(|g| g.iter().any(|g| g.path == path))
    };
    let mut seen = BTreeSet::new();
    for (u, (pod_path, container_path)) in m.units.iter().zip(&cgroup_of) {
        let agent = owner_of(container_path).or_else(|| owner_of(pod_path));
        let ours = governing(&policies, u);
        assert_eq!(
            ours.map(|i| &policies[i].name),
            agent.map(|i| &policies[i].name),
            "{}",
            u.describe()
        );
        seen.insert(ours.map(|i| policies[i].name.clone()));
    }
    // The cases are not all one answer.
    assert!(seen.len() >= 5, "{seen:?}");
}

#[test]
fn probes_on_ports_the_plan_forbids_or_the_container_does_not_declare() {
    let plan = parse_policy_str(
        "reserved: [10250]\npolicies:\n  - {name: web, pods: {namespace: shop, labels: {app: web}}, bind: [{ports: [8080, 9555, 10250]}, {ports: [9901], address: loopback}]}\n  - {name: quiet, mode: audit, pods: {namespace: shop, labels: {app: quiet}}, bind: []}\n",
    )
    .unwrap();
    let probe =
        |kind: &str, handler: &str, port: &str| format!("{kind}: {{{handler}: {{port: {port}}}}}");
    let m = units(
        &(deployment(
            "web",
            "{app: web}",
            &format!(
                "[{{name: w, ports: [{{containerPort: 8080, name: http}}, {{containerPort: 9901, name: admin}}, {{containerPort: 9555}}], {}, {}, {}}}, {{name: x, ports: [{{containerPort: 8080}}], {}, {}, {}}}]",
                probe("livenessProbe", "httpGet", "http"),
                probe("readinessProbe", "tcpSocket", "admin"),
                probe("startupProbe", "grpc", "9555"),
                probe("livenessProbe", "httpGet", "health"),
                probe("readinessProbe", "tcpSocket", "7000"),
                probe("startupProbe", "grpc", "10250"),
            ),
        ) + &deployment(
            "quiet",
            "{app: quiet}",
            &format!(
                "[{{name: q, ports: [{{containerPort: 80}}], {}}}]",
                probe("readinessProbe", "httpGet", "80")
            ),
        ) + &deployment(
            "free",
            "{app: free}",
            &format!(
                "[{{name: f, {}}}]",
                probe("livenessProbe", "tcpSocket", "1")
            ),
        )),
    );
    assert!(m.findings.is_empty(), "{:?}", m.findings);
    let a = analyze(&plan, "p.yaml", &m);
    let got: Vec<(Check, Severity, String)> = a
        .findings
        .iter()
        .filter(|f| {
            matches!(
                f.check,
                Check::ProbePortNotAllowed | Check::ProbePortUndeclared
            )
        })
        .map(|f| (f.check, f.severity, f.message.clone()))
        .collect();
    let has = |check: Check, severity: Severity, words: &[&str]| {
        assert!(
            got.iter().any(|(c, s, msg)| *c == check
                && *s == severity
                && words.iter().all(|w| msg.contains(w))),
            "no {check:?} {severity:?} with {words:?} in {got:#?}"
        );
    };
    // Named port on loopback only: not allowed on the pod's address.
    has(
        Check::ProbePortNotAllowed,
        Severity::Error,
        &["readinessProbe (tcpSocket)", "9901/tcp", "only on loopback"],
    );
    // A name the container does not declare: an error.
    has(
        Check::ProbePortUndeclared,
        Severity::Error,
        &["livenessProbe (httpGet)", "`health`", "cannot resolve"],
    );
    // A number not declared: a warning, and not allowed either.
    has(
        Check::ProbePortUndeclared,
        Severity::Warning,
        &["tcpSocket", "port 7000"],
    );
    has(
        Check::ProbePortNotAllowed,
        Severity::Error,
        &["port 7000/tcp", "policy `web`"],
    );
    // Reserved, over gRPC: denied whatever the policy lists.
    has(
        Check::ProbePortNotAllowed,
        Severity::Error,
        &["startupProbe (grpc)", "10250", "reserved"],
    );
    // Audit mode: a warning.
    has(
        Check::ProbePortNotAllowed,
        Severity::Warning,
        &["policy `quiet`", "audit mode"],
    );
    // Allowed and declared (http -> 8080, grpc 9555): nothing; 10250 is
    // also undeclared; ungoverned `free`: only that its port is undeclared.
    assert_eq!(got.len(), 8, "{got:#?}");
    let undeclared_free = got
        .iter()
        .filter(|(_, _, m)| m.contains("container `f`"))
        .count();
    assert_eq!(undeclared_free, 1, "{got:#?}");
    // Each on the probe's own port line.
    for f in a
        .findings
        .iter()
        .filter(|f| f.check == Check::ProbePortNotAllowed)
    {
        let p = m
            .units
            .iter()
            .flat_map(|u| &u.probes)
            .find(|p| p.loc == f.loc);
        assert!(p.is_some(), "{f:?} is not at a probe");
    }
}
