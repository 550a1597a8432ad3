//! The workload `why` asks about, as a cgroup: from a pid
//! (`/proc/PID/cgroup`), a cgroup path, a pod (the CRI runtime and the
//! kubelet's cgroup layout) or a unit (the cgroup tree).

use std::path::Path;

use super::{Lookup, WhyArgs};
use crate::workload::{cgroupfs::Hierarchy, cri, identity::KUBEPODS_ROOTS, resolve::TreeIndex};

/// The workload's cgroup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// Path under the cgroup2 mount.
    pub cgroup: String,
    pub cgroup_id: u64,
    /// How the user named it (`pid 42`, `pod shop/web-0`, ...).
    pub named: String,
}

/// Resolve the target the arguments name.
pub fn resolve(a: &WhyArgs, h: &Hierarchy) -> Result<Target, Lookup> {
    let (cgroup, named) = if let Some(pid) = a.pid {
        (cgroup_of_pid(pid)?, format!("pid {pid}"))
    } else if let Some(c) = &a.cgroup {
        let c = crate::policy::normalize_cgroup(c).map_err(|e| format!("--cgroup {c}: {e}"))?;
        (c.clone(), format!("cgroup {c}"))
    } else if let Some(pod) = &a.pod {
        let cgroup = pod_cgroup(pod, a.container.as_deref(), h, &a.cri_socket)?;
        let named = match &a.container {
            Some(c) => format!("pod {pod}, container {c}"),
            None => format!("pod {pod}"),
        };
        (cgroup, named)
    } else if let Some(unit) = &a.unit {
        (unit_cgroup(unit, h)?, format!("unit {unit}"))
    } else {
        return Err("give one of --pid, --cgroup, --pod, --unit".into());
    };
    let (cgroup_id, _) = h
        .resolve(&cgroup)
        .map_err(|e| format!("{e}"))?
        .ok_or_else(|| {
            format!(
                "cgroup {cgroup} does not exist under {}",
                h.root().display()
            )
        })?;
    Ok(Target {
        cgroup,
        cgroup_id,
        named,
    })
}

/// The cgroup2 path of process `pid` (`0::/path` in /proc/PID/cgroup).
fn cgroup_of_pid(pid: u32) -> Result<String, Lookup> {
    let file = format!("/proc/{pid}/cgroup");
    let text = std::fs::read_to_string(&file).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            format!("unknown pid {pid}: no such process")
        } else {
            format!("pid {pid}: reading {file}: {e}")
        }
    })?;
    let path = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or_else(|| format!("pid {pid}: {file} names no cgroup2 cgroup"))?;
    if path.starts_with("/..") {
        return Err(format!(
            "pid {pid} is in cgroup {path}, outside this process's cgroup namespace: run `why` \
             in the host's cgroup namespace, or give --cgroup"
        )
        .into());
    }
    Ok(path.trim_end_matches(" (deleted)").to_owned())
}

/// The runtime's pods and containers (bounded: a runtime that hangs does
/// not hang `why`).
pub fn cri_snapshot(socket: &Path) -> Result<cri::Snapshot, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting a runtime: {e}"))?;
    rt.block_on(async {
        let fut = async {
            let mut client = cri::connect(socket).await.map_err(|e| e.to_string())?;
            cri::snapshot(&mut client, socket)
                .await
                .map_err(|e| e.to_string())
        };
        tokio::time::timeout(std::time::Duration::from_secs(10), fut)
            .await
            .map_err(|_| format!("the CRI runtime at {} did not answer", socket.display()))?
    })
}

/// The cgroup of pod `NAMESPACE/NAME` (or of its container `container`).
fn pod_cgroup(
    pod: &str,
    container: Option<&str>,
    h: &Hierarchy,
    socket: &Path,
) -> Result<String, Lookup> {
    let (ns, name) = pod
        .split_once('/')
        .ok_or_else(|| format!("--pod {pod}: expected NAMESPACE/NAME"))?;
    let snap = cri_snapshot(socket)?;
    // A pod recreated under the same name: the ready sandbox is the one.
    let mut pods: Vec<&cri::Pod> = snap
        .pods
        .iter()
        .filter(|p| p.namespace == ns && p.name == name)
        .collect();
    pods.sort_by_key(|p| !p.ready);
    let p = pods.first().ok_or_else(|| {
        format!(
            "the CRI runtime at {} lists no pod {ns}/{name}",
            socket.display()
        )
    })?;
    let tree = TreeIndex::scan(h.root(), &KUBEPODS_ROOTS, 4);
    match container {
        None => tree.pods.get(&p.uid).cloned().ok_or_else(|| {
            format!(
                "pod {ns}/{name} (uid {}) has no cgroup under {}",
                p.uid,
                h.root().display()
            )
            .into()
        }),
        Some(c) => {
            let ctr = snap
                .containers
                .iter()
                .find(|x| x.sandbox_id == p.sandbox_id && x.name == c)
                .ok_or_else(|| format!("pod {ns}/{name} has no container {c}"))?;
            tree.containers.get(&ctr.id).cloned().ok_or_else(|| {
                format!(
                    "container {c} ({}) of pod {ns}/{name} has no cgroup under {}",
                    ctr.id,
                    h.root().display()
                )
                .into()
            })
        }
    }
}

/// The cgroup of systemd unit `unit`.
fn unit_cgroup(unit: &str, h: &Hierarchy) -> Result<String, Lookup> {
    let tree = TreeIndex::scan(h.root(), &["/"], 16);
    let paths = tree.units.get(unit).cloned().unwrap_or_default();
    match paths.as_slice() {
        [] => Err(format!("no cgroup of unit {unit} under {}", h.root().display()).into()),
        [one] => Ok(one.clone()),
        many => Err(format!(
            "unit {unit} has several cgroups ({}): give --cgroup",
            many.join(", ")
        )
        .into()),
    }
}
