//! What an OCI runtime hands a hook: the container's state on standard
//! input (id, pid, bundle, annotations), and who the container is according
//! to the annotations containerd's and CRI-O's CRI put there.

use std::collections::BTreeMap;

use serde::Deserialize;

/// The OCI runtime state (runtime-spec `state`), as runc passes it to
/// hooks.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
pub struct State {
    #[serde(default, rename = "ociVersion")]
    pub oci_version: String,
    pub id: String,
    #[serde(default)]
    pub status: String,
    /// The container's init process (in the runtime's PID namespace); at
    /// `createRuntime` it already sits in the container's cgroup.
    #[serde(default)]
    pub pid: u32,
    #[serde(default)]
    pub bundle: String,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

/// The most state a hook reads from standard input.
pub const MAX_STATE_BYTES: usize = 1 << 20;

impl State {
    /// Parse the state an OCI runtime wrote to the hook's standard input.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let s: Self = serde_json::from_str(text).map_err(|e| {
            anyhow::anyhow!("the OCI state on standard input is not valid: {e} (is this running as an OCI hook?)")
        })?;
        if s.id.is_empty() {
            anyhow::bail!("the OCI state on standard input has an empty `id`");
        }
        if s.pid == 0 {
            anyhow::bail!(
                "the OCI state of container {} has no `pid`: run `portguard hook oci` as a \
                 `createRuntime` (or `prestart`) hook, when the container's process exists",
                s.id
            );
        }
        Ok(s)
    }

    fn annotation(&self, keys: &[&str]) -> Option<&str> {
        keys.iter()
            .find_map(|k| self.annotations.get(*k))
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    /// Who the container is, from the CRI's annotations (containerd:
    /// `io.kubernetes.cri.*`; CRI-O: `io.kubernetes.pod.*` and
    /// `io.kubernetes.cri-o.*`). Annotations only name; the agent decides
    /// from its own view which policy applies.
    pub fn workload(&self) -> Workload {
        Workload {
            sandbox: self
                .annotation(&[
                    "io.kubernetes.cri.container-type",
                    "io.kubernetes.cri-o.ContainerType",
                ])
                .is_some_and(|t| t == "sandbox"),
            pod_namespace: self
                .annotation(&[
                    "io.kubernetes.cri.sandbox-namespace",
                    "io.kubernetes.pod.namespace",
                ])
                .map(str::to_owned),
            pod_name: self
                .annotation(&["io.kubernetes.cri.sandbox-name", "io.kubernetes.pod.name"])
                .map(str::to_owned),
            pod_uid: self
                .annotation(&["io.kubernetes.cri.sandbox-uid", "io.kubernetes.pod.uid"])
                .map(str::to_owned),
            container_name: self
                .annotation(&[
                    "io.kubernetes.cri.container-name",
                    "io.kubernetes.container.name",
                ])
                .map(str::to_owned),
        }
    }
}

/// Who a container is, as its annotations say.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Workload {
    /// A pod's sandbox (pause) container.
    pub sandbox: bool,
    pub pod_namespace: Option<String>,
    pub pod_name: Option<String>,
    pub pod_uid: Option<String>,
    pub container_name: Option<String>,
}

impl Workload {
    /// A Kubernetes pod's container (or sandbox).
    pub fn in_pod(&self) -> bool {
        self.pod_namespace.is_some() || self.pod_uid.is_some()
    }

    /// `namespace/name[/container]`, for messages.
    pub fn describe(&self) -> Option<String> {
        let ns = self.pod_namespace.as_deref()?;
        let name = self.pod_name.as_deref().unwrap_or("?");
        Some(match (&self.container_name, self.sandbox) {
            (_, true) => format!("{ns}/{name} (sandbox)"),
            (Some(c), false) => format!("{ns}/{name}/{c}"),
            (None, false) => format!("{ns}/{name}"),
        })
    }
}

/// The cgroup2 path of process `pid` (the `0::` line of
/// `/proc/PID/cgroup`), relative to the reader's cgroup namespace.
pub fn cgroup_of_pid(pid: u32) -> anyhow::Result<String> {
    let file = format!("/proc/{pid}/cgroup");
    let text = std::fs::read_to_string(&file)
        .map_err(|e| anyhow::anyhow!("reading {file}: {e} (did the process exit?)"))?;
    cgroup2_line(&text)
        .map(str::to_owned)
        .ok_or_else(|| anyhow::anyhow!("{file} has no cgroup v2 (`0::`) line"))
}

/// The path on the `0::` line of a /proc/PID/cgroup text.
pub fn cgroup2_line(text: &str) -> Option<&str> {
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim_end())
        .filter(|p| p.starts_with('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SANDBOX: &str = r#"{"ociVersion":"1.0.2-dev","id":"5e1c","status":"creating","pid":4242,
        "bundle":"/run/containerd/io.containerd.runtime.v2.task/k8s.io/5e1c",
        "annotations":{"io.kubernetes.cri.container-type":"sandbox",
        "io.kubernetes.cri.sandbox-id":"5e1c","io.kubernetes.cri.sandbox-name":"web-0",
        "io.kubernetes.cri.sandbox-namespace":"shop","io.kubernetes.cri.sandbox-uid":"0f6c"}}"#;

    #[test]
    fn a_containerd_sandbox_state_names_its_pod() {
        let s = State::parse(SANDBOX).unwrap();
        assert_eq!((s.id.as_str(), s.pid), ("5e1c", 4242));
        let w = s.workload();
        assert!(w.sandbox && w.in_pod());
        assert_eq!(w.pod_namespace.as_deref(), Some("shop"));
        assert_eq!(w.pod_uid.as_deref(), Some("0f6c"));
        assert_eq!(w.describe().as_deref(), Some("shop/web-0 (sandbox)"));
    }

    #[test]
    fn a_crio_container_state_names_its_pod_and_container() {
        let s = State::parse(
            r#"{"id":"9a","pid":7,"annotations":{"io.kubernetes.cri-o.ContainerType":"container",
            "io.kubernetes.pod.namespace":"ops","io.kubernetes.pod.name":"db",
            "io.kubernetes.pod.uid":"u1","io.kubernetes.container.name":"postgres"}}"#,
        )
        .unwrap();
        let w = s.workload();
        assert!(!w.sandbox && w.in_pod());
        assert_eq!(w.describe().as_deref(), Some("ops/db/postgres"));
    }

    #[test]
    fn a_plain_container_is_in_no_pod() {
        let w = State::parse(r#"{"id":"c1","pid":9}"#).unwrap().workload();
        assert!(!w.in_pod() && !w.sandbox && w.describe().is_none());
    }

    #[test]
    fn a_state_without_id_or_pid_is_refused_with_a_reason() {
        let e = State::parse(r#"{"id":"c1"}"#).unwrap_err().to_string();
        assert!(e.contains("createRuntime"), "{e}");
        let e = State::parse(r#"{"id":"","pid":3}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("empty `id`"), "{e}");
        let e = State::parse("not json").unwrap_err().to_string();
        assert!(e.contains("not valid"), "{e}");
    }

    #[test]
    fn the_cgroup2_line_is_found_among_v1_lines() {
        let text =
            "12:pids:/kubepods/x\n1:name=systemd:/kubepods/x\n0::/kubepods/besteffort/pod1/c\n";
        assert_eq!(cgroup2_line(text), Some("/kubepods/besteffort/pod1/c"));
        assert_eq!(cgroup2_line("3:cpu:/a\n"), None);
    }
}
