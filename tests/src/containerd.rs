//! A private containerd with its CRI plugin, for end-to-end tests with real
//! pods: its own root, state, socket and CNI bridge under a temp directory,
//! images built here from busybox-static (no registry is reachable), and a
//! kubelet-like cgroup layout (`kubepods/besteffort/pod<uid>`, cgroupfs
//! driver). Dropping it removes every pod, container, shim, cgroup and the
//! bridge it created.

use std::{
    collections::HashMap,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use portguard::workload::cri::api::{
    ContainerConfig, ContainerMetadata, CreateContainerRequest, ExecSyncRequest, ImageSpec,
    LinuxPodSandboxConfig, LinuxSandboxSecurityContext, NamespaceMode, NamespaceOption,
    PodSandboxConfig, PodSandboxMetadata, RemovePodSandboxRequest, RunPodSandboxRequest,
    StartContainerRequest, StopPodSandboxRequest, runtime_service_client::RuntimeServiceClient,
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
fn runc_with_cgroupns(dir: &Path) -> PathBuf {
    let path = dir.join("runc-cgroupns");
    std::fs::write(
        &path,
        r#"#!/bin/sh
bundle=
create=
prev=
for a in "$@"; do
  case "$prev" in --bundle|-b) bundle=$a ;; esac
  [ "$a" = create ] && create=1
  prev=$a
done
if [ -n "$create" ] && [ -n "$bundle" ]; then
  /usr/bin/jq '.linux.namespaces |= (if any(.[]; .type == "cgroup") then . else . + [{"type": "cgroup"}] end)' \
    "$bundle/config.json" > "$bundle/config.json.pg" && mv "$bundle/config.json.pg" "$bundle/config.json" || exit 1
fi
exec runc "$@"
"#,
    )
    .unwrap();
    std::fs::set_permissions(
        &path,
        <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o755),
    )
    .unwrap();
    path
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
}

impl Containerd {
    /// Start containerd and import the images. Panics if it cannot.
    pub fn start(pgprobe: &Path) -> Self {
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
        let mut client = self.client();
        let id = self
            .rt
            .block_on(client.run_pod_sandbox(RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: String::new(),
            }))
            .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", self.log()))
            .into_inner()
            .pod_sandbox_id;
        self.pods.push(id.clone());
        self.sandboxes.insert(id.clone(), config);
        self.cgroups.push(
            portguard::workload::cgroupfs::cgroup2_mount()
                .unwrap()
                .join(&parent),
        );
        (id, uid, format!("/{parent}"))
    }

    /// Create and start a test container (busybox and pgprobe, sleeping)
    /// named `name` in a pod. Returns its id.
    pub fn run_container(&mut self, sandbox: &str, name: &str) -> String {
        self.run_container_cmd(sandbox, name, &["/bin/sleep", "3600"])
    }

    /// [`Containerd::run_container`] running `command` (e.g. `/pgprobe hold
    /// ...`).
    pub fn run_container_cmd(&mut self, sandbox: &str, name: &str, command: &[&str]) -> String {
        let config = ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: name.into(),
                attempt: 0,
            }),
            image: Some(ImageSpec {
                image: BUSYBOX.into(),
                ..Default::default()
            }),
            command: command.iter().map(|c| (*c).to_owned()).collect(),
            log_path: format!("{name}.log"),
            ..Default::default()
        };
        self.start_container(sandbox, config)
    }

    /// Create and start a container from `config` in a pod. Returns its id.
    pub fn start_container(&mut self, sandbox: &str, config: ContainerConfig) -> String {
        let sandbox_config = self
            .sandboxes
            .get(sandbox)
            .cloned()
            .unwrap_or_else(|| panic!("no sandbox {sandbox} from this fixture"));
        let mut client = self.client();
        let id = self
            .rt
            .block_on(client.create_container(CreateContainerRequest {
                pod_sandbox_id: sandbox.into(),
                config: Some(config),
                sandbox_config: Some(sandbox_config),
            }))
            .unwrap_or_else(|e| panic!("CreateContainer: {e}\n{}", self.log()))
            .into_inner()
            .container_id;
        self.rt
            .block_on(client.start_container(StartContainerRequest {
                container_id: id.clone(),
            }))
            .unwrap_or_else(|e| panic!("StartContainer: {e}\n{}", self.log()));
        id
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

    /// The log file of container `name` in sandbox `sandbox`, in the CRI
    /// format (`TIME STREAM TAG LINE`), as `kubectl logs` reads it.
    pub fn container_log(&self, sandbox: &str, name: &str) -> String {
        let dir = &self.sandboxes[sandbox].log_directory;
        std::fs::read_to_string(Path::new(dir).join(format!("{name}.log"))).unwrap_or_default()
    }

    /// Run `pgprobe ARGS` inside a container; returns its JSON result.
    pub fn probe(&self, container: &str, args: &[&str]) -> serde_json::Value {
        let mut client = self.client();
        let mut cmd = vec!["/pgprobe".to_owned()];
        cmd.extend(args.iter().map(|s| (*s).to_owned()));
        let r = self
            .rt
            .block_on(client.exec_sync(ExecSyncRequest {
                container_id: container.into(),
                cmd,
                timeout: 20,
            }))
            .unwrap_or_else(|e| panic!("ExecSync: {e}\n{}", self.log()))
            .into_inner();
        let out = String::from_utf8_lossy(&r.stdout);
        serde_json::from_str(out.lines().last().unwrap_or_default()).unwrap_or_else(|e| {
            panic!(
                "bad pgprobe output {out:?} (stderr {:?}, exit {}): {e}",
                String::from_utf8_lossy(&r.stderr),
                r.exit_code
            )
        })
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
