//! Containers in the private containerd's pods, driven as the kubelet does
//! through the CRI: create, start (which may fail, e.g. when a runtime hook
//! refuses it), wait for the process to exit, read its log, exec `pgprobe`
//! in it, stop and remove it.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use portguard::workload::cri::api::{
    ContainerConfig, ContainerMetadata, ContainerState, ContainerStatusRequest,
    CreateContainerRequest, ExecSyncRequest, ImageSpec, RemoveContainerRequest,
    StartContainerRequest, StopContainerRequest,
};

use super::{BUSYBOX, Containerd};

/// A container of the test image named `name` (attempt `attempt`) running
/// `command`, logging to `<name>-<attempt>.log` in its pod's log directory
/// (`<name>.log` for attempt 0; see [`Containerd::container_log`]).
pub fn container_config(name: &str, attempt: u32, command: &[&str]) -> ContainerConfig {
    ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: name.into(),
            attempt,
        }),
        image: Some(ImageSpec {
            image: BUSYBOX.into(),
            ..Default::default()
        }),
        command: command.iter().map(|c| (*c).to_owned()).collect(),
        log_path: log_name(name, attempt),
        ..Default::default()
    }
}

/// The log file name [`container_config`] gives a container.
pub fn log_name(name: &str, attempt: u32) -> String {
    if attempt == 0 {
        format!("{name}.log")
    } else {
        format!("{name}-{attempt}.log")
    }
}

impl Containerd {
    /// Create and start a test container (busybox and pgprobe, sleeping)
    /// named `name` in a pod. Returns its id.
    pub fn run_container(&mut self, sandbox: &str, name: &str) -> String {
        self.run_container_cmd(sandbox, name, &["/bin/sleep", "3600"])
    }

    /// [`Containerd::run_container`] running `command` (e.g. `/pgprobe hold
    /// ...`).
    pub fn run_container_cmd(&mut self, sandbox: &str, name: &str, command: &[&str]) -> String {
        self.start_container(sandbox, container_config(name, 0, command))
    }

    /// Create and start a container from `config` in a pod. Returns its id.
    pub fn start_container(&mut self, sandbox: &str, config: ContainerConfig) -> String {
        let id = self.create_container(sandbox, config);
        self.try_start(&id)
            .unwrap_or_else(|e| panic!("StartContainer: {e}\n{}", self.log()));
        id
    }

    /// CreateContainer from `config` in a pod (not started). Returns its id.
    pub fn create_container(&self, sandbox: &str, config: ContainerConfig) -> String {
        let sandbox_config = self
            .sandboxes
            .get(sandbox)
            .cloned()
            .unwrap_or_else(|| panic!("no sandbox {sandbox} from this fixture"));
        let mut client = self.client();
        self.rt
            .block_on(client.create_container(CreateContainerRequest {
                pod_sandbox_id: sandbox.into(),
                config: Some(config),
                sandbox_config: Some(sandbox_config),
            }))
            .unwrap_or_else(|e| panic!("CreateContainer: {e}\n{}", self.log()))
            .into_inner()
            .container_id
    }

    /// StartContainer; the runtime's error if it refuses (runc's create,
    /// and so its `createRuntime` hooks, runs here).
    pub fn try_start(&self, id: &str) -> Result<(), tonic::Status> {
        let mut client = self.client();
        self.rt
            .block_on(client.start_container(StartContainerRequest {
                container_id: id.into(),
            }))
            .map(|_| ())
    }

    /// The container's state and exit code (ContainerStatus).
    pub fn container_state(&self, id: &str) -> (ContainerState, i32) {
        let mut client = self.client();
        let s = self
            .rt
            .block_on(client.container_status(ContainerStatusRequest {
                container_id: id.into(),
                verbose: false,
            }))
            .unwrap_or_else(|e| panic!("ContainerStatus {id}: {e}"))
            .into_inner()
            .status
            .unwrap_or_else(|| panic!("ContainerStatus {id}: no status"));
        (
            ContainerState::try_from(s.state).unwrap_or(ContainerState::ContainerUnknown),
            s.exit_code,
        )
    }

    /// Wait until the container's process has exited; its exit code, or
    /// None if it is still running after `timeout`.
    pub fn wait_exited(&self, id: &str, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            let (state, code) = self.container_state(id);
            if state == ContainerState::ContainerExited {
                return Some(code);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// StopContainer (SIGTERM, SIGKILL after `timeout_s`); errors ignored.
    pub fn stop_container(&self, id: &str, timeout_s: i64) {
        let mut client = self.client();
        let _ = self
            .rt
            .block_on(client.stop_container(StopContainerRequest {
                container_id: id.into(),
                timeout: timeout_s,
            }));
    }

    /// StopContainer then RemoveContainer (the kubelet's order); panics if
    /// the removal fails.
    pub fn remove_container(&self, id: &str) {
        self.stop_container(id, 0);
        let mut client = self.client();
        self.rt
            .block_on(client.remove_container(RemoveContainerRequest {
                container_id: id.into(),
            }))
            .unwrap_or_else(|e| panic!("RemoveContainer {id}: {e}\n{}", self.log()));
    }

    /// The log file of container `name` in sandbox `sandbox`, in the CRI
    /// format (`TIME STREAM TAG LINE`), as `kubectl logs` reads it.
    pub fn container_log(&self, sandbox: &str, name: &str) -> String {
        self.attempt_log(sandbox, name, 0)
    }

    /// The log of attempt `attempt` of container `name` (as named by
    /// [`container_config`]); empty if it never logged.
    pub fn attempt_log(&self, sandbox: &str, name: &str, attempt: u32) -> String {
        let dir = &self.sandboxes[sandbox].log_directory;
        std::fs::read_to_string(Path::new(dir).join(log_name(name, attempt))).unwrap_or_default()
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
