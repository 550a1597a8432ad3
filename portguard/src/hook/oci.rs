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

/// The most state a hook reads from standard input (annotations a pod's
/// spec controls can make it large).
pub const MAX_STATE_BYTES: usize = 16 << 20;

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

    /// Who the container is, from the annotations `runtime` sets
    /// (containerd: `io.kubernetes.cri.*`; CRI-O: `io.kubernetes.pod.*`,
    /// `io.kubernetes.container.name` and `io.kubernetes.cri-o.*`). Only
    /// that runtime's keys are read: CRI-O copies a pod's own annotations
    /// into the spec too, so a tenant could write containerd's keys there.
    /// Annotations only name; the agent decides from its own view which
    /// policy applies.
    pub fn workload(&self, runtime: Runtime) -> Workload {
        let runtime = match runtime {
            Runtime::Auto
                if self
                    .annotations
                    .contains_key("io.kubernetes.cri-o.ContainerType") =>
            {
                Runtime::Crio
            }
            Runtime::Auto => Runtime::Containerd,
            r => r,
        };
        let key = |containerd: &'static str, crio: &'static str| match runtime {
            Runtime::Crio => crio,
            _ => containerd,
        };
        let get = |containerd, crio| self.annotation(&[key(containerd, crio)]).map(str::to_owned);
        Workload {
            sandbox: get(
                "io.kubernetes.cri.container-type",
                "io.kubernetes.cri-o.ContainerType",
            )
            .is_some_and(|t| t == "sandbox"),
            pod_namespace: get(
                "io.kubernetes.cri.sandbox-namespace",
                "io.kubernetes.pod.namespace",
            ),
            pod_name: get("io.kubernetes.cri.sandbox-name", "io.kubernetes.pod.name"),
            pod_uid: get("io.kubernetes.cri.sandbox-uid", "io.kubernetes.pod.uid"),
            container_name: get(
                "io.kubernetes.cri.container-name",
                "io.kubernetes.container.name",
            ),
            sandbox_id: get(
                "io.kubernetes.cri.sandbox-id",
                "io.kubernetes.cri-o.SandboxID",
            ),
        }
    }
}

/// Whose annotations a state carries.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Runtime {
    /// CRI-O's if the state has its `io.kubernetes.cri-o.ContainerType`,
    /// else containerd's.
    #[default]
    Auto,
    Containerd,
    Crio,
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
    /// The pod's sandbox container id.
    pub sandbox_id: Option<String>,
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
        let w = s.workload(Runtime::Auto);
        assert!(w.sandbox && w.in_pod());
        assert_eq!(w.pod_namespace.as_deref(), Some("shop"));
        assert_eq!(w.pod_uid.as_deref(), Some("0f6c"));
        assert_eq!(w.describe().as_deref(), Some("shop/web-0 (sandbox)"));
    }

    /// What containerd 1.6.20 and runc 1.1.5 wrote on a hook's standard
    /// input (captured by `oci_hook::containerd_facts`).
    #[test]
    fn the_states_containerd_hands_a_hook_name_the_pod_and_container() {
        let c = State::parse(include_str!(
            "../../../tests/fixtures/oci/containerd-1.6-container-state.json"
        ))
        .unwrap();
        let w = c.workload(Runtime::Auto);
        assert!(!w.sandbox && w.in_pod(), "{w:?}");
        assert_eq!(w.container_name.as_deref(), Some("web"));
        assert!(w.pod_uid.is_some() && w.pod_namespace.is_some() && c.pid > 0);
        let s = State::parse(include_str!(
            "../../../tests/fixtures/oci/containerd-1.6-sandbox-state.json"
        ))
        .unwrap();
        let w = s.workload(Runtime::Auto);
        assert!(
            w.sandbox && w.in_pod() && w.container_name.is_none(),
            "{w:?}"
        );
    }

    #[test]
    fn a_crio_container_state_names_its_pod_and_container() {
        let s = State::parse(
            r#"{"id":"9a","pid":7,"annotations":{"io.kubernetes.cri-o.ContainerType":"container",
            "io.kubernetes.pod.namespace":"ops","io.kubernetes.pod.name":"db",
            "io.kubernetes.pod.uid":"u1","io.kubernetes.container.name":"postgres"}}"#,
        )
        .unwrap();
        let w = s.workload(Runtime::Auto);
        assert!(!w.sandbox && w.in_pod());
        assert_eq!(w.describe().as_deref(), Some("ops/db/postgres"));
    }

    #[test]
    fn only_the_runtimes_own_keys_are_read() {
        // CRI-O copies a pod's annotations into the spec: containerd's keys
        // there are the tenant's, not the runtime's.
        let s = State::parse(
            r#"{"id":"9a","pid":7,"annotations":{"io.kubernetes.cri-o.ContainerType":"container",
            "io.kubernetes.pod.namespace":"ops","io.kubernetes.cri.sandbox-namespace":"portguard-system"}}"#,
        )
        .unwrap();
        for r in [Runtime::Auto, Runtime::Crio] {
            assert_eq!(s.workload(r).pod_namespace.as_deref(), Some("ops"));
        }
        assert_eq!(
            s.workload(Runtime::Containerd).pod_namespace.as_deref(),
            Some("portguard-system")
        );
    }

    #[test]
    fn a_plain_container_is_in_no_pod() {
        let w = State::parse(r#"{"id":"c1","pid":9}"#)
            .unwrap()
            .workload(Runtime::Auto);
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
