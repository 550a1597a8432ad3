//! What a cgroup path says about its workload: a Kubernetes pod (and
//! container), a systemd unit, or a podman/runc container. Pure: paths in,
//! identities out; the CRI fills in names and labels elsewhere.
//!
//! Layouts recognised (paths relative to the cgroup2 mount):
//! - kubelet, cgroupfs driver: `/kubepods/<qos>/pod<uid>/<container-id>`, and
//!   `/kubepods/pod<uid>/<container-id>` for Guaranteed pods;
//! - kubelet, systemd driver:
//!   `/kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid_>.slice/<runtime>-<id>.scope`
//!   (`kubepods-pod<uid_>.slice` for Guaranteed; the uid's dashes are
//!   underscores), with runtime `cri-containerd`, `crio` or `docker`
//!   (`crio-conmon-<id>.scope` is CRI-O's monitor, not the container);
//! - podman: `libpod-<id>.scope` (systemd) or `/libpod_parent/libpod-<id>`
//!   (cgroupfs); Docker outside Kubernetes: `docker-<id>.scope` or
//!   `/docker/<id>`; plain runc: `runc-<id>.scope` (systemd) or `/<id>`
//!   (cgroupfs, at the top of the tree);
//! - systemd units: the deepest component ending in `.service`, `.scope`,
//!   `.socket` or `.mount` that is not one of the above.

/// What a cgroup path identifies.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CgroupIdentity {
    /// Kubernetes pod uid (with dashes), if under a kubelet pod cgroup.
    pub pod_uid: Option<String>,
    /// QoS class of the pod (`burstable`, `besteffort`, `guaranteed`).
    pub qos: Option<&'static str>,
    /// Container id (64 hex digits for containerd/CRI-O/Docker/podman).
    pub container_id: Option<String>,
    /// Runtime the container id came from (`containerd`, `crio`, `docker`,
    /// `podman`, or `runc` when only a bare id was seen).
    pub runtime: Option<&'static str>,
    /// systemd unit, outside Kubernetes and containers.
    pub unit: Option<String>,
}

fn is_container_id(s: &str) -> bool {
    s.len() >= 12 && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn is_uid(s: &str) -> bool {
    s.len() == 36 && s.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
}

/// `pod<uid>` (cgroupfs) or `kubepods[-<qos>]-pod<uid_>.slice` (systemd).
fn pod_component(c: &str) -> Option<String> {
    if let Some(uid) = c.strip_prefix("pod")
        && is_uid(uid)
    {
        return Some(uid.to_owned());
    }
    let slice = c.strip_suffix(".slice")?;
    let (_, uid) = slice.rsplit_once("-pod")?;
    let uid = uid.replace('_', "-");
    is_uid(&uid).then_some(uid)
}

fn qos_component(c: &str) -> Option<&'static str> {
    match c {
        "burstable" | "kubepods-burstable.slice" => Some("burstable"),
        "besteffort" | "kubepods-besteffort.slice" => Some("besteffort"),
        _ => None,
    }
}

/// `<runtime>-<id>.scope`, `libpod-<id>[.scope]`, or a bare id.
fn container_component(c: &str) -> Option<(String, &'static str)> {
    let scoped = c.strip_suffix(".scope");
    if let Some(s) = scoped {
        if s.starts_with("crio-conmon-") {
            return None;
        }
        for (prefix, runtime) in [
            ("cri-containerd-", "containerd"),
            ("crio-", "crio"),
            ("docker-", "docker"),
            ("libpod-", "podman"),
            ("runc-", "runc"),
        ] {
            if let Some(id) = s.strip_prefix(prefix)
                && is_container_id(id)
            {
                return Some((id.to_owned(), runtime));
            }
        }
        return None;
    }
    if let Some(id) = c.strip_prefix("libpod-")
        && is_container_id(id)
    {
        return Some((id.to_owned(), "podman"));
    }
    is_container_id(c).then(|| (c.to_owned(), "runc"))
}

/// Parse a cgroup path (relative to the cgroup2 mount, starting with `/`).
pub fn parse(path: &str) -> CgroupIdentity {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let mut id = CgroupIdentity::default();
    let kube = parts
        .first()
        .is_some_and(|p| *p == "kubepods" || *p == "kubepods.slice");
    if kube {
        // The kubelet's layout is fixed: `<root>/[<qos>/]<pod>/<container>`.
        // Only those positions name a pod or a container. Anything below the
        // container's cgroup is inside the container, and whoever can create
        // cgroups there (a privileged container, a delegated subtree) must
        // not be able to claim another pod or container by naming a
        // directory after it.
        let mut at = 1;
        if let Some(q) = parts.get(1).and_then(|c| qos_component(c)) {
            id.qos = Some(q);
            at = 2;
        }
        if let Some(uid) = parts.get(at).and_then(|c| pod_component(c)) {
            id.pod_uid = Some(uid);
            id.qos.get_or_insert("guaranteed");
            if let Some((cid, rt)) = parts.get(at + 1).and_then(|c| container_component(c)) {
                id.container_id = Some(cid);
                id.runtime = Some(rt);
            }
        }
        return id;
    }
    for (i, c) in parts.iter().enumerate() {
        if let Some((cid, rt)) = container_component(c) {
            // Bare ids only count under a known container parent
            // (/docker/<id>, /libpod_parent/...) or at the top (plain `runc
            // run` with the cgroupfs driver puts a container at /<id>), not
            // anywhere.
            let bare = rt == "runc" && !c.ends_with(".scope");
            let parent_ok =
                !bare || i == 0 || matches!(parts[i - 1], "docker" | "libpod_parent" | "lxc");
            if parent_ok {
                id.container_id = Some(cid);
                id.runtime = Some(if parts.get(i.wrapping_sub(1)) == Some(&"docker") {
                    "docker"
                } else {
                    rt
                });
                continue;
            }
        }
        if [".service", ".scope", ".socket", ".mount"]
            .iter()
            .any(|s| c.ends_with(s))
        {
            id.unit = Some((*c).to_owned());
        }
    }
    if id.container_id.is_some() || id.pod_uid.is_some() {
        id.unit = None;
    }
    id
}

/// The pod-level cgroup of a path that lies under a kubelet pod cgroup
/// (the path itself when it is the pod cgroup). Only the kubelet's position
/// counts (see [`parse`]).
pub fn pod_cgroup_prefix(path: &str) -> Option<String> {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    if !parts
        .first()
        .is_some_and(|p| *p == "kubepods" || *p == "kubepods.slice")
    {
        return None;
    }
    let at = if parts.get(1).is_some_and(|c| qos_component(c).is_some()) {
        2
    } else {
        1
    };
    parts.get(at).and_then(|c| pod_component(c))?;
    Some(format!("/{}", parts[..=at].join("/")))
}

/// True when `path` is a container's own cgroup (not a cgroup below it):
/// under a pod, the kubelet's position right below the pod cgroup.
pub fn is_container_cgroup(path: &str) -> bool {
    let Some((parent, last)) = path.trim_end_matches('/').rsplit_once('/') else {
        return false;
    };
    let id = parse(path);
    let Some(cid) = id.container_id else {
        return false;
    };
    if container_component(last).is_none_or(|(c, _)| c != cid) {
        return false;
    }
    id.pod_uid.is_none() || pod_cgroup_prefix(path).as_deref() == Some(parent)
}

/// The kubelet's pod hierarchies under the cgroup2 root (cgroupfs driver,
/// systemd driver): where `pods:` selectors look.
pub const KUBEPODS_ROOTS: [&str; 2] = ["/kubepods", "/kubepods.slice"];

/// The directories new pod cgroups appear in: each pod hierarchy and its
/// QoS levels (Guaranteed pods sit directly under the hierarchy).
pub const KUBEPODS_PARENTS: [&str; 6] = [
    "/kubepods",
    "/kubepods/besteffort",
    "/kubepods/burstable",
    "/kubepods.slice",
    "/kubepods.slice/kubepods-besteffort.slice",
    "/kubepods.slice/kubepods-burstable.slice",
];
#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "2f0e3e8f-7b1a-4c2e-9d3a-0f6f3c1a2b4c";
    const CID: &str = "9b2a45c9e4f4f0d3b1a0f6c2e8d7a1b3c4d5e6f708192a3b4c5d6e7f80912a3b";

    #[test]
    fn kubelet_cgroupfs_driver() {
        let p = format!("/kubepods/besteffort/pod{UID}/{CID}");
        let id = parse(&p);
        assert_eq!(id.pod_uid.as_deref(), Some(UID));
        assert_eq!(id.qos, Some("besteffort"));
        assert_eq!(id.container_id.as_deref(), Some(CID));
        assert_eq!(id.runtime, Some("runc"));
        assert_eq!(id.unit, None);
        // Guaranteed pods sit directly under kubepods.
        let id = parse(&format!("/kubepods/pod{UID}/{CID}"));
        assert_eq!(id.qos, Some("guaranteed"));
        assert_eq!(id.container_id.as_deref(), Some(CID));
        // The pod cgroup itself.
        let id = parse(&format!("/kubepods/burstable/pod{UID}"));
        assert_eq!(id.pod_uid.as_deref(), Some(UID));
        assert_eq!(id.container_id, None);
        assert_eq!(
            pod_cgroup_prefix(&format!("/kubepods/burstable/pod{UID}/{CID}")).as_deref(),
            Some(format!("/kubepods/burstable/pod{UID}").as_str())
        );
    }

    #[test]
    fn kubelet_systemd_driver_with_each_runtime() {
        let u = UID.replace('-', "_");
        for (scope, runtime) in [
            (format!("cri-containerd-{CID}.scope"), "containerd"),
            (format!("crio-{CID}.scope"), "crio"),
            (format!("docker-{CID}.scope"), "docker"),
        ] {
            let p = format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/{scope}"
            );
            let id = parse(&p);
            assert_eq!(id.pod_uid.as_deref(), Some(UID), "{p}");
            assert_eq!(id.qos, Some("burstable"));
            assert_eq!(id.container_id.as_deref(), Some(CID), "{p}");
            assert_eq!(id.runtime, Some(runtime));
            assert_eq!(id.unit, None, "a container scope is not a unit");
        }
        let id = parse(&format!(
            "/kubepods.slice/kubepods-pod{u}.slice/cri-containerd-{CID}.scope"
        ));
        assert_eq!(id.qos, Some("guaranteed"));
        assert_eq!(id.pod_uid.as_deref(), Some(UID));
        // CRI-O's conmon scope is not the container.
        let id = parse(&format!(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice/crio-conmon-{CID}.scope"
        ));
        assert_eq!(id.pod_uid.as_deref(), Some(UID));
        assert_eq!(id.container_id, None);
    }

    #[test]
    fn only_the_kubelets_positions_name_a_pod_or_a_container() {
        const OTHER: &str = "33333333-3333-3333-3333-333333333333";
        let pod = format!("/kubepods/besteffort/pod{UID}");
        let ctr = format!("{pod}/{CID}");
        // A cgroup made inside the container, named after another pod and
        // another container, is still the first container's.
        let nested = format!("{ctr}/pod{OTHER}/{}", "c".repeat(64));
        let id = parse(&nested);
        assert_eq!(id.pod_uid.as_deref(), Some(UID));
        assert_eq!(id.container_id.as_deref(), Some(CID));
        assert_eq!(pod_cgroup_prefix(&nested), Some(pod.clone()));
        assert!(is_container_cgroup(&ctr));
        assert!(!is_container_cgroup(&nested));
        assert!(!is_container_cgroup(&format!("{ctr}/{CID}")));
        assert!(!is_container_cgroup(&pod));
        // A pod component below the kubelet's pod level is no pod.
        let deep = format!("/kubepods/besteffort/x/pod{UID}");
        assert_eq!(parse(&deep).pod_uid, None);
        assert_eq!(pod_cgroup_prefix(&deep), None);
        // Outside Kubernetes: the scope itself, not a directory below it.
        let scope = format!("/system.slice/docker-{CID}.scope");
        assert!(is_container_cgroup(&scope));
        assert!(!is_container_cgroup(&format!("{scope}/sub")));
    }

    #[test]
    fn podman_docker_and_units() {
        let id = parse(&format!("/machine.slice/libpod-{CID}.scope"));
        assert_eq!(
            (id.container_id.as_deref(), id.runtime),
            (Some(CID), Some("podman"))
        );
        let id = parse(&format!(
            "/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{CID}.scope/container"
        ));
        assert_eq!(id.runtime, Some("podman"));
        assert_eq!(id.unit, None);
        let id = parse(&format!("/libpod_parent/libpod-{CID}"));
        assert_eq!(id.runtime, Some("podman"));
        let id = parse(&format!("/system.slice/docker-{CID}.scope"));
        assert_eq!(id.runtime, Some("docker"));
        let id = parse(&format!("/docker/{CID}"));
        assert_eq!(
            (id.container_id.as_deref(), id.runtime),
            (Some(CID), Some("docker"))
        );
        // Plain runc: systemd driver (`system.slice:runc:<id>`) and
        // cgroupfs driver (`/<id>`).
        let id = parse(&format!("/system.slice/runc-{CID}.scope"));
        assert_eq!(
            (id.container_id.as_deref(), id.runtime, id.unit),
            (Some(CID), Some("runc"), None)
        );
        let id = parse(&format!("/{CID}"));
        assert_eq!(
            (id.container_id.as_deref(), id.runtime),
            (Some(CID), Some("runc"))
        );
        let id = parse("/system.slice/nginx.service");
        assert_eq!(id.unit.as_deref(), Some("nginx.service"));
        assert_eq!(id.container_id, None);
        let id = parse("/user.slice/user-1000.slice/session-3.scope");
        assert_eq!(id.unit.as_deref(), Some("session-3.scope"));
        // A hex-looking directory elsewhere is not a container.
        assert_eq!(
            parse(&format!("/portguard-demo/{CID}")),
            CgroupIdentity::default()
        );
        assert_eq!(parse("/"), CgroupIdentity::default());
    }
}
