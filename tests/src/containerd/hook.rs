//! An OCI `createRuntime` hook for the private containerd, installed the
//! way containerd 1.6/1.7 documents it: a complete default OCI spec (what
//! `ctr oci spec` prints, the same default the CRI plugin builds itself)
//! with `hooks.createRuntime` added, named by the runc runtime's
//! `base_runtime_spec`. The CRI plugin then starts every container's spec
//! from that file, but not a pod sandbox's (pause): those always start
//! from the built-in default ([`super::Containerd::hook_sandboxes`] hooks
//! them through the runc wrapper instead).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

/// One OCI hook (runtime-spec `config.md`, "POSIX-platform Hooks").
#[derive(Clone, Debug)]
pub struct Hook {
    /// Absolute path of the program runc executes.
    pub path: PathBuf,
    /// Its full argv, argv[0] included (OCI `args`).
    pub args: Vec<String>,
    /// OCI `timeout` in seconds: runc kills the hook past it and fails the
    /// create. None: no timeout.
    pub timeout_s: Option<u32>,
}

impl Hook {
    /// `portguard hook oci --socket SOCKET EXTRA...` run from `bin`.
    pub fn portguard(bin: &Path, socket: &Path, extra: &[&str]) -> Self {
        let mut args: Vec<String> = ["portguard", "hook", "oci", "--socket"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        args.push(socket.display().to_string());
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        Self {
            path: bin.to_owned(),
            args,
            timeout_s: Some(10),
        }
    }
}

/// containerd's default OCI spec (`ctr oci spec`).
fn default_spec() -> serde_json::Value {
    let out = Command::new("ctr")
        .args(["oci", "spec"])
        .output()
        .expect("running ctr oci spec");
    assert!(
        out.status.success(),
        "ctr oci spec: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("ctr oci spec prints JSON")
}

/// An OCI spec's `hooks` with `hook` as its only `createRuntime` hook.
pub(super) fn hooks_json(h: &Hook) -> serde_json::Value {
    let mut entry = serde_json::json!({
        "path": h.path.display().to_string(),
        "args": h.args,
        "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
    });
    if let Some(t) = h.timeout_s {
        entry["timeout"] = t.into();
    }
    serde_json::json!({ "createRuntime": [entry] })
}

/// Write the base runtime spec for `hook` to `path`: the default spec with
/// `hooks.createRuntime = [hook]`, or without hooks for None.
pub(super) fn write_base_spec(path: &Path, hook: Option<&Hook>) {
    let mut spec = default_spec();
    if let Some(h) = hook {
        spec["hooks"] = hooks_json(h);
    }
    std::fs::write(path, serde_json::to_vec_pretty(&spec).unwrap()).expect("writing base spec");
}
