//! A private containerd with its CRI plugin, for end-to-end tests with real
//! pods: its own root, state, socket and CNI bridge under a temp directory,
//! images built here from busybox-static (no registry is reachable), and a
//! kubelet-like cgroup layout (`kubepods/besteffort/pod<uid>`, cgroupfs
//! driver). Dropping it removes every pod, container, shim, cgroup and the
//! bridge it created. [`Containerd::start_with_hook`] installs an OCI
//! `createRuntime` hook ([`Hook`]) through `base_runtime_spec`; the
//! container lifecycle calls are in `containers`.
//!
//! Every agent with `pods:` policies watches the one shared `/kubepods`
//! tree and, as on a real node, holds each pod cgroup its runtime does not
//! list with `portguard:identifying` (every bind denied). Two tests with
//! their own runtimes and agents side by side would hold each other's pods,
//! so a test that makes pod cgroups holds [`KubepodsLock`]: a [`Containerd`]
//! holds it for its lifetime.

mod containers;
mod hook;

pub use containers::{container_config, log_name};
pub use hook::Hook;

use std::{
    collections::HashMap,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use portguard::workload::cri::api::{
    LinuxPodSandboxConfig, LinuxSandboxSecurityContext, NamespaceMode, NamespaceOption,
    PodSandboxConfig, PodSandboxMetadata, RemovePodSandboxRequest, RunPodSandboxRequest,
    StopPodSandboxRequest, runtime_service_client::RuntimeServiceClient,
};
use tonic::transport::Channel;

pub const BUSYBOX: &str = "docker.io/library/portguard-test:latest";
pub const PAUSE: &str = "registry.k8s.io/pause:3.6";

static SEQ: AtomicU32 = AtomicU32::new(0);

/// Why containerd cannot run here, if it cannot (missing binaries).
pub fn unavailable() -> Option<String> {
    for bin in ["containerd", "ctr", "runc", "containerd-shim-runc-v2"] {
        if which(bin).is_none() {
            return Some(format!(
                "{bin} is not installed (./scripts/setup.sh installs it)"
            ));
        }
    }
    for plugin in ["bridge", "host-local", "loopback"] {
        if !Path::new("/usr/lib/cni").join(plugin).exists() {
            return Some(format!("CNI plugin /usr/lib/cni/{plugin} is missing"));
        }
    }
    None
}

fn which(bin: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(bin))
        .find(|p| p.exists())
}

/// An OCI image archive holding busybox (with its applet links), `pgprobe`
/// and the shared libraries it needs; the default command sleeps.
fn build_image(name: &str, out: &Path, pgprobe: &Path) {
    let mut img = xtask::oci::Image::new(&[], &["/bin/sleep", "3600"], &["PATH=/bin"]);
    img.file("/bin/busybox", Path::new("/bin/busybox"), 0o755)
        .and_then(|i| i.file("/pgprobe", pgprobe, 0o755))
        .and_then(|i| i.glibc())
        .expect("building the test image");
    for applet in ["sh", "sleep", "cat", "echo", "true"] {
        img.symlink(&format!("/bin/{applet}"), "busybox").unwrap();
    }
    img.write(name, out).expect("writing the test image");
}

/// A `runc` that gives every container a cgroup namespace of its own, as
/// containerd does on a cgroup v2 (unified) node: the agent's pod then sees
/// its own cgroup as `/` and everyone else's as `/../..`, as on a real
/// node. This host is hybrid, where containerd would not.
///
/// While `dir`/[`SANDBOX_HOOKS`] exists, it also sets the `hooks` of every
/// pod sandbox's (pause) spec to that file's (containerd never applies
/// `base_runtime_spec` to sandboxes: see [`Containerd::hook_sandboxes`]).
fn runc_with_cgroupns(dir: &Path) -> PathBuf {
    let path = dir.join("runc-cgroupns");
    // Written aside and renamed: a shim may be running the old one (sh
    // reads its script as it goes) when `set_hook` rewrites the config.
    let tmp = dir.join("runc-cgroupns.new");
    std::fs::write(
        &tmp,
        format!(
            r#"#!/bin/sh
hooks={hooks}
bundle=
create=
prev=
for a in "$@"; do
  case "$prev" in --bundle|-b) bundle=$a ;; esac
  [ "$a" = create ] && create=1
  prev=$a
done
if [ -n "$create" ] && [ -n "$bundle" ]; then
  /usr/bin/jq '.linux.namespaces |= (if any(.[]; .type == "cgroup") then . else . + [{{"type": "cgroup"}}] end)' \
    "$bundle/config.json" > "$bundle/config.json.pg" && mv "$bundle/config.json.pg" "$bundle/config.json" || exit 1
  if [ -f "$hooks" ]; then
    /usr/bin/jq --slurpfile h "$hooks" \
      'if .annotations["io.kubernetes.cri.container-type"] == "sandbox" then .hooks = $h[0] else . end' \
      "$bundle/config.json" > "$bundle/config.json.pg" && mv "$bundle/config.json.pg" "$bundle/config.json" || exit 1
  fi
fi
exec runc "$@"
"#,
            hooks = dir.join(SANDBOX_HOOKS).display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &tmp,
        <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o755),
    )
    .unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    path
}

/// Write `dir`/config.toml (and, with a hook, the base runtime spec that
/// installs it).
fn write_config(d: &Path, socket: &Path, hook: Option<&Hook>) {
    let base_spec = match hook {
        Some(h) => {
            hook::write_base_spec(&d.join(BASE_SPEC), Some(h));
            format!("base_runtime_spec = \"{}\"", d.join(BASE_SPEC).display())
        }
        None => String::new(),
    };
    let config = format!(
        r#"version = 2
root = "{root}"
state = "{state}"
[grpc]
  address = "{sock}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE}"
  restrict_oom_score_adj = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{cni}"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      {base_spec}
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "{runc}"
"#,
        runc = runc_with_cgroupns(d).display(),
        root = d.join("root").display(),
        state = d.join("state").display(),
        sock = socket.display(),
        cni = d.join("cni").display(),
    );
    std::fs::write(d.join("config.toml"), config).unwrap();
}

/// containerd on `dir`'s config, its log appended to `dir`/containerd.log.
fn spawn_containerd(dir: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("containerd.log"))
        .unwrap();
    Command::new("containerd")
        .args(["--config", &dir.join("config.toml").display().to_string()])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("starting containerd")
}

/// A running private containerd.
pub struct Containerd {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    child: Option<Child>,
    bridge: String,
    cni_net: String,
    pods: Vec<String>,
    /// Each sandbox's config (CreateContainer repeats it).
    sandboxes: HashMap<String, PodSandboxConfig>,
    cgroups: Vec<PathBuf>,
    rt: tokio::runtime::Runtime,
    /// Declared last: released after `Drop` removed the pods.
    _kubepods: KubepodsLock,
}

/// Where [`KubepodsLock`] is taken.
const KUBEPODS_LOCK: &str = "/run/portguard-kubepods-tests.lock";

/// The shared `/kubepods` tree, exclusively this test's (a file lock, so a
/// second run on the host waits too) until dropped. See the module's doc.
pub struct KubepodsLock {
    _file: std::fs::File,
}

impl KubepodsLock {
    /// Wait for the tree: another test's pods and agent go first.
    pub fn take() -> Self {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(KUBEPODS_LOCK)
            .unwrap_or_else(|e| panic!("opening {KUBEPODS_LOCK}: {e}"));
        file.lock()
            .unwrap_or_else(|e| panic!("locking {KUBEPODS_LOCK}: {e}"));
        Self { _file: file }
    }
}

/// The base runtime spec file's name in the instance's directory.
const BASE_SPEC: &str = "base-spec.json";
/// The file of hooks the runc wrapper gives pod sandboxes, if it exists.
const SANDBOX_HOOKS: &str = "sandbox-hooks.json";

impl Containerd {
    /// Start containerd and import the images. Panics if it cannot.
    pub fn start(pgprobe: &Path) -> Self {
        Self::start_with_hook(pgprobe, None)
    }

    /// [`Containerd::start`], with `hook` as every container's (the pod
    /// sandboxes' too) OCI `createRuntime` hook, through the runc runtime's
    /// `base_runtime_spec`.
    pub fn start_with_hook(pgprobe: &Path, hook: Option<Hook>) -> Self {
        let kubepods = KubepodsLock::take();
        let n = SEQ.fetch_add(1, Ordering::SeqCst);
        let dir = tempfile::Builder::new()
            .prefix("pgctrd")
            .tempdir_in("/var/tmp")
            .expect("tempdir");
        let d = dir.path();
        let socket = d.join("containerd.sock");
        let bridge = format!("pgt{}", std::process::id() % 10000 * 10 + n % 10);
        let cni_net = format!("pgtest-{}-{n}", std::process::id());
        let subnet = format!("10.{}.{}.0/24", 200 + n % 50, std::process::id() % 250);
        std::fs::create_dir_all(d.join("cni")).unwrap();
        std::fs::write(
            d.join("cni/10-portguard-test.conflist"),
            serde_json::to_vec(&serde_json::json!({
                "cniVersion": "0.4.0", "name": cni_net,
                "plugins": [
                    {"type": "bridge", "bridge": bridge, "isGateway": false, "ipMasq": false,
                     "ipam": {"type": "host-local", "ranges": [[{"subnet": subnet}]],
                              "dataDir": d.join("cni-ipam").display().to_string()}},
                    {"type": "loopback"}
                ]
            }))
            .unwrap(),
        )
        .unwrap();
        write_config(d, &socket, hook.as_ref());
        let child = spawn_containerd(d);
        let c = Self {
            socket,
            child: Some(child),
            bridge,
            cni_net,
            pods: Vec::new(),
            sandboxes: HashMap::new(),
            cgroups: Vec::new(),
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
            dir,
            _kubepods: kubepods,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !c.socket.exists() {
            assert!(
                Instant::now() < deadline,
                "containerd did not start:\n{}",
                c.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        for (name, file) in [(BUSYBOX, "image.tar"), (PAUSE, "pause.tar")] {
            let path = c.dir.path().join(file);
            build_image(name, &path, pgprobe);
            c.import(&path);
        }
        c
    }

    /// Kill containerd (SIGKILL), leaving its pods running (their shims
    /// outlive it, as on a node whose runtime crashed). Its CRI socket stops
    /// answering until [`Containerd::restart`].
    pub fn kill_daemon(&mut self) {
        let mut child = self.child.take().expect("containerd is not running");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Start containerd again on the same state (it adopts the running
    /// shims) and wait until its CRI answers.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "containerd is running");
        self.child = Some(spawn_containerd(self.dir.path()));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let answered = self.rt.block_on(async {
                let mut c = portguard::workload::cri::connect(&self.socket).await.ok()?;
                c.list_pod_sandbox(portguard::workload::cri::api::ListPodSandboxRequest {
                    filter: None,
                })
                .await
                .ok()
            });
            if answered.is_some() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "containerd did not come back:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Restart containerd (SIGKILL, then on the same state: the running
    /// pods stay) with `hook` as the `createRuntime` hook of the containers
    /// created from now on (None: the built-in default spec, no hook).
    pub fn set_hook(&mut self, hook: Option<Hook>) {
        self.kill_daemon();
        write_config(self.dir.path(), &self.socket, hook.as_ref());
        self.restart();
    }

    /// Give the pod sandboxes (pause containers) run from now on `hook` as
    /// their `createRuntime` hook (None: no hooks), through the runc
    /// wrapper: containerd itself builds a sandbox's spec from its built-in
    /// default, never from `base_runtime_spec` (containerd 1.6 to 2.x:
    /// `sandboxContainerSpec` calls `runtimeSpec(id, "", ...)`), so a base
    /// spec hook never runs for them.
    pub fn hook_sandboxes(&self, hook: Option<&Hook>) {
        let path = self.dir.path().join(SANDBOX_HOOKS);
        match hook {
            Some(h) => std::fs::write(&path, hook::hooks_json(h).to_string()).unwrap(),
            None => {
                let _ = std::fs::remove_file(&path);
            }
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    fn client(&self) -> RuntimeServiceClient<Channel> {
        self.rt
            .block_on(portguard::workload::cri::connect(&self.socket))
            .expect("CRI connect")
    }

    /// Run a pod sandbox like the kubelet (cgroupfs driver, BestEffort).
    /// Returns (sandbox id, pod uid, pod cgroup path under the mount).
    pub fn run_pod(
        &mut self,
        namespace: &str,
        name: &str,
        labels: &[(&str, &str)],
    ) -> (String, String, String) {
        self.run_pod_with(namespace, name, labels, false)
    }

    /// [`Containerd::run_pod`], in the node's PID namespace if `host_pid`
    /// (a pod spec's `hostPID: true`).
    pub fn run_pod_with(
        &mut self,
        namespace: &str,
        name: &str,
        labels: &[(&str, &str)],
        host_pid: bool,
    ) -> (String, String, String) {
        self.run_pod_annotated(namespace, name, labels, &[], host_pid)
    }

    /// [`Containerd::run_pod_with`], with pod annotations (which the
    /// runtime returns in every ListPodSandbox answer).
    pub fn run_pod_annotated(
        &mut self,
        namespace: &str,
        name: &str,
        labels: &[(&str, &str)],
        annotations: &[(&str, &str)],
        host_pid: bool,
    ) -> (String, String, String) {
        self.try_run_pod(namespace, name, labels, annotations, host_pid)
            .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", self.log()))
    }

    /// [`Containerd::run_pod_annotated`]; the runtime's error if it refuses
    /// (runc's create of the sandbox container, and so its `createRuntime`
    /// hooks, runs inside RunPodSandbox).
    pub fn try_run_pod(
        &mut self,
        namespace: &str,
        name: &str,
        labels: &[(&str, &str)],
        annotations: &[(&str, &str)],
        host_pid: bool,
    ) -> Result<(String, String, String), tonic::Status> {
        let n = SEQ.fetch_add(1, Ordering::SeqCst);
        let uid = format!(
            "{:08x}-0000-4000-8000-{:012x}",
            std::process::id(),
            u64::from(n) * 7919 + 1
        );
        let parent = format!("kubepods/besteffort/pod{uid}");
        let config = PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: name.into(),
                uid: uid.clone(),
                namespace: namespace.into(),
                attempt: 0,
            }),
            hostname: name.into(),
            log_directory: self
                .dir
                .path()
                .join("logs")
                .join(&uid)
                .display()
                .to_string(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<HashMap<_, _>>(),
            annotations: annotations
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<HashMap<_, _>>(),
            linux: Some(LinuxPodSandboxConfig {
                cgroup_parent: parent.clone(),
                security_context: host_pid.then(|| LinuxSandboxSecurityContext {
                    namespace_options: Some(NamespaceOption {
                        pid: NamespaceMode::Node.into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        // The pod cgroup may exist even if the sandbox fails.
        self.cgroups.push(
            portguard::workload::cgroupfs::cgroup2_mount()
                .unwrap()
                .join(&parent),
        );
        let mut client = self.client();
        let id = self
            .rt
            .block_on(client.run_pod_sandbox(RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: String::new(),
            }))?
            .into_inner()
            .pod_sandbox_id;
        self.pods.push(id.clone());
        self.sandboxes.insert(id.clone(), config);
        Ok((id, uid, format!("/{parent}")))
    }

    /// Import an OCI image archive into the CRI's image store.
    pub fn import(&self, archive: &Path) {
        let out = Command::new("ctr")
            .args([
                "--address",
                &self.socket.display().to_string(),
                "-n",
                "k8s.io",
            ])
            .args(["images", "import", &archive.display().to_string()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ctr import {}: {}",
            archive.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if self.child.is_some() {
            let mut client = self
                .rt
                .block_on(portguard::workload::cri::connect(&self.socket))
                .ok();
            for id in std::mem::take(&mut self.pods) {
                if let Some(c) = client.as_mut() {
                    let _ = self.rt.block_on(c.stop_pod_sandbox(StopPodSandboxRequest {
                        pod_sandbox_id: id.clone(),
                    }));
                    let _ = self.rt.block_on(
                        c.remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id: id }),
                    );
                }
            }
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Shims of this instance outlive containerd: find them by our dir.
        let dir = self.dir.path().display().to_string();
        if let Ok(procs) = std::fs::read_dir("/proc") {
            for p in procs.flatten() {
                let cmdline = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
                let cmdline = String::from_utf8_lossy(&cmdline);
                if cmdline.contains("containerd-shim")
                    && cmdline.contains(&dir)
                    && let Ok(pid) = p.file_name().to_string_lossy().parse::<i32>()
                {
                    // SAFETY: killing a leftover shim of this test instance.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        for cg in &self.cgroups {
            crate::cgroups::remove_cgroup_tree(cg);
        }
        let root = portguard::workload::cgroupfs::cgroup2_mount().unwrap();
        for d in ["kubepods/besteffort", "kubepods"] {
            let _ = std::fs::remove_dir(root.join(d));
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(format!("/var/lib/cni/networks/{}", self.cni_net));
        // Overlay mounts under our root, if containerd left any.
        if let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") {
            for m in mounts.lines().filter_map(|l| l.split_whitespace().nth(1)) {
                if m.starts_with(&dir) {
                    let _ = Command::new("umount").args(["-l", m]).status();
                }
            }
        }
        let _ = std::io::stderr().flush();
    }
}
