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

use portguard::cri::api::{
    ContainerConfig, ContainerMetadata, CreateContainerRequest, ExecSyncRequest, ImageSpec,
    LinuxPodSandboxConfig, PodSandboxConfig, PodSandboxMetadata, RemovePodSandboxRequest,
    RunPodSandboxRequest, StartContainerRequest, StopPodSandboxRequest,
    runtime_service_client::RuntimeServiceClient,
};
use sha2::{Digest as _, Sha256};
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

fn sha(data: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(data))
}

/// An OCI image archive holding busybox (with its applet links), `pgprobe`
/// and the shared libraries it needs; the default command sleeps.
fn build_image(name: &str, out: &Path, pgprobe: &Path) {
    let mut layer = tar::Builder::new(Vec::new());
    let mut add_file = |path: &str, src: &Path, mode: u32| {
        let data = std::fs::read(src).unwrap_or_else(|e| panic!("reading {}: {e}", src.display()));
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        h.set_cksum();
        layer.append_data(&mut h, path, data.as_slice()).unwrap();
    };
    add_file("bin/busybox", Path::new("/bin/busybox"), 0o755);
    add_file("pgprobe", pgprobe, 0o755);
    for lib in [
        "/lib/x86_64-linux-gnu/libc.so.6",
        "/lib/x86_64-linux-gnu/libgcc_s.so.1",
        "/lib64/ld-linux-x86-64.so.2",
    ] {
        add_file(lib.trim_start_matches('/'), Path::new(lib), 0o755);
    }
    for applet in ["sh", "sleep", "cat", "echo", "true"] {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        h.set_mode(0o777);
        layer
            .append_link(&mut h, format!("bin/{applet}"), "busybox")
            .unwrap();
    }
    let layer = layer.into_inner().unwrap();
    let layer_digest = sha(&layer);
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": ["/bin/sleep", "3600"], "Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    }))
    .unwrap();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(&config), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": layer.len()}],
    }))
    .unwrap();
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": sha(&manifest), "size": manifest.len(),
            "annotations": {"io.containerd.image.name": name, "org.opencontainers.image.ref.name": name.rsplit(':').next().unwrap()},
        }],
    }))
    .unwrap();
    let mut archive = tar::Builder::new(std::fs::File::create(out).unwrap());
    let mut add = |path: String, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        archive.append_data(&mut h, path, data).unwrap();
    };
    add("oci-layout".into(), br#"{"imageLayoutVersion":"1.0.0"}"#);
    add("index.json".into(), &index);
    for blob in [&layer, &config, &manifest] {
        add(
            format!("blobs/sha256/{}", &sha(blob)["sha256:".len()..]),
            blob,
        );
    }
    archive.finish().unwrap();
}

/// A running private containerd.
pub struct Containerd {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    child: Option<Child>,
    bridge: String,
    cni_net: String,
    pods: Vec<String>,
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
"#,
            root = d.join("root").display(),
            state = d.join("state").display(),
            sock = socket.display(),
            cni = d.join("cni").display(),
        );
        std::fs::write(d.join("config.toml"), config).unwrap();
        let log = std::fs::File::create(d.join("containerd.log")).unwrap();
        let child = Command::new("containerd")
            .args(["--config", &d.join("config.toml").display().to_string()])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting containerd");
        let c = Self {
            socket,
            child: Some(child),
            bridge,
            cni_net,
            pods: Vec::new(),
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
            let out = Command::new("ctr")
                .args(["--address", &c.socket.display().to_string(), "-n", "k8s.io"])
                .args(["images", "import", &path.display().to_string()])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "ctr import {name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        c
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    fn client(&self) -> RuntimeServiceClient<Channel> {
        self.rt
            .block_on(portguard::cri::connect(&self.socket))
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
            linux: Some(LinuxPodSandboxConfig {
                cgroup_parent: parent.clone(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut client = self.client();
        let id = self
            .rt
            .block_on(client.run_pod_sandbox(RunPodSandboxRequest {
                config: Some(config),
                runtime_handler: String::new(),
            }))
            .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", self.log()))
            .into_inner()
            .pod_sandbox_id;
        self.pods.push(id.clone());
        self.cgroups
            .push(portguard::cgroupfs::cgroup2_mount().unwrap().join(&parent));
        (id, uid, format!("/{parent}"))
    }

    /// Create and start a container in a pod. Returns its id.
    pub fn run_container(
        &mut self,
        sandbox: &str,
        pod_uid: &str,
        namespace: &str,
        pod: &str,
        name: &str,
    ) -> String {
        let mut client = self.client();
        let sandbox_config = PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: pod.into(),
                uid: pod_uid.into(),
                namespace: namespace.into(),
                attempt: 0,
            }),
            log_directory: self
                .dir
                .path()
                .join("logs")
                .join(pod_uid)
                .display()
                .to_string(),
            linux: Some(LinuxPodSandboxConfig {
                cgroup_parent: format!("kubepods/besteffort/pod{pod_uid}"),
                ..Default::default()
            }),
            ..Default::default()
        };
        let config = ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: name.into(),
                attempt: 0,
            }),
            image: Some(ImageSpec {
                image: BUSYBOX.into(),
                ..Default::default()
            }),
            command: vec!["/bin/sleep".into(), "3600".into()],
            log_path: format!("{name}.log"),
            ..Default::default()
        };
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
            let mut client = self.rt.block_on(portguard::cri::connect(&self.socket)).ok();
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
            crate::remove_cgroup_tree(cg);
        }
        let root = portguard::cgroupfs::cgroup2_mount().unwrap();
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
