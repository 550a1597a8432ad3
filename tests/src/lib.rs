//! Fixtures for portguard's privileged integration tests.
//!
//! Every test follows the same shape:
//! 1. create real cgroups under the cgroup2 mount ([`Cgroup`], removed on drop,
//!    processes inside killed first);
//! 2. start the real agent binary on a policy naming them ([`Agent`]; it
//!    attaches to the cgroup2 root; dropped = SIGTERM, programs detached);
//! 3. run `pgprobe` inside a cgroup, in its own network namespace so that ports
//!    never collide with the host or other tests ([`Probe`]), and assert the
//!    kernel's answer (success, EPERM, ...);
//! 4. assert the JSON event the agent logged for each denial.
//!
//! Several agents may run at once (tests run in parallel): each one only
//! governs the cgroups its own policy names, so they do not interfere.
//!
//! The agent binary is taken from `$PORTGUARD_BIN`, else from the cargo
//! target directory next to this test binary; `cargo xtask integration-test`
//! builds it first.

use std::{
    io::{BufRead as _, BufReader},
    os::unix::net::UnixDatagram,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde_json::Value;

pub mod containerd;

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// The cgroup2 mount point of this host.
pub fn cgroup2_root() -> PathBuf {
    portguard::cgroupfs::cgroup2_mount().expect("these tests need a cgroup2 mount")
}

/// The capabilities the README, the DaemonSet and the systemd unit name as
/// the agent's minimum (setpriv's syntax). `deploy` tests that they suffice,
/// `manifests` that the deployment files grant exactly these.
pub const MINIMAL_CAPS: &str = "+bpf,+perfmon,+net_admin,+sys_admin,+sys_ptrace,+dac_read_search";

/// True when running as root (the tests need CAP_BPF, CAP_SYS_ADMIN, ...).
pub fn is_root() -> bool {
    // SAFETY: plain syscall.
    unsafe { libc::geteuid() == 0 }
}

/// A real cgroup, removed (with everything running in it) on drop.
#[derive(Debug)]
pub struct Cgroup {
    /// Filesystem path.
    pub fs: PathBuf,
    /// Path as a policy names it (`/a/b`).
    pub rel: String,
    created: bool,
}

impl Cgroup {
    /// A fresh top-level cgroup `/pgtest-<tag>-<pid>-<n>`.
    pub fn new(tag: &str) -> Self {
        let mut cg = Self::planned(tag);
        cg.create();
        cg.created = true;
        cg
    }

    /// The path of a fresh top-level cgroup, not created yet (for "appears
    /// later" tests). Removed on drop if it was created by then.
    pub fn planned(tag: &str) -> Self {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let rel = format!("/pgtest-{tag}-{}-{n}", std::process::id());
        Self {
            fs: cgroup2_root().join(&rel[1..]),
            rel,
            created: false,
        }
    }

    /// A cgroup at an arbitrary path (created now, removed on drop).
    pub fn existing(fs: PathBuf, rel: &str) -> Self {
        let c = Self {
            fs,
            rel: rel.to_owned(),
            created: true,
        };
        c.create();
        c
    }

    /// A child cgroup (created now). Dropping the parent also removes it.
    pub fn child(&self, name: &str) -> Self {
        let c = Self {
            fs: self.fs.join(name),
            rel: format!("{}/{name}", self.rel),
            created: true,
        };
        c.create();
        c
    }

    /// A child path, not created yet.
    pub fn planned_child(&self, name: &str) -> Self {
        Self {
            fs: self.fs.join(name),
            rel: format!("{}/{name}", self.rel),
            created: false,
        }
    }

    pub fn create(&self) {
        std::fs::create_dir_all(&self.fs)
            .unwrap_or_else(|e| panic!("creating cgroup {}: {e}", self.fs.display()));
    }

    /// The cgroup id (inode number).
    pub fn id(&self) -> u64 {
        use std::os::unix::fs::MetadataExt as _;
        std::fs::metadata(&self.fs).unwrap().ino()
    }
}

/// Kill everything in `dir`'s subtree and remove it, deepest first.
fn remove_cgroup_tree(dir: &Path) {
    if !dir.exists() {
        return;
    }
    let _ = std::fs::write(dir.join("cgroup.kill"), "1");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let populated = std::fs::read_to_string(dir.join("cgroup.events"))
            .map(|s| s.contains("populated 1"))
            .unwrap_or(false);
        if !populated || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    for _ in 0..200 {
        match std::fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    eprintln!("warning: could not remove cgroup {}", dir.display());
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Children created with `child()` are removed with their parent; a
        // planned cgroup is removed if something created it meanwhile.
        if self.created || self.fs.exists() {
            remove_cgroup_tree(&self.fs);
        }
    }
}

fn target_dir_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test-binary>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary is in target/<profile>/deps");
    profile_dir.join(name)
}

/// The agent binary under test.
pub fn agent_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("PORTGUARD_BIN") {
        return PathBuf::from(p);
    }
    let p = target_dir_binary("portguard");
    assert!(
        p.exists(),
        "agent binary {} not found: build it first (cargo build -p portguard), or run \
         `cargo xtask integration-test`, or set PORTGUARD_BIN",
        p.display()
    );
    p
}

/// The probe binary (built by cargo next to the integration test binary).
/// The storm/benchmark loop binary (`pgbench`).
pub fn pgbench_bin() -> PathBuf {
    let p = target_dir_binary("pgbench");
    assert!(
        p.exists(),
        "{} not found: build the tests crate's binaries",
        p.display()
    );
    p
}

pub fn probe_bin() -> PathBuf {
    let p = target_dir_binary("pgprobe");
    assert!(
        p.exists(),
        "{} not found: build the tests crate's binaries",
        p.display()
    );
    p
}

/// Parent of every test agent's `--pin-dir` (on bpffs).
pub const TEST_PIN_ROOT: &str = "/sys/fs/bpf/portguard-tests";

/// A running agent. Its programs, links and maps are pinned in a directory
/// of its own ([`Agent::pin_dir`]); dropping it sends SIGTERM, waits, and
/// runs `portguard uninstall` on that directory, so nothing stays attached.
pub struct Agent {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    /// `--pin-dir` (None: `--pin-dir none`).
    pub pin_dir: Option<PathBuf>,
    pub policy: PathBuf,
    pub log: PathBuf,
    stderr: PathBuf,
    notify: UnixDatagram,
}

/// Default timeout for the agent to become ready or answer a reload.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Default timeout for an expected event to be logged.
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(10);

impl Agent {
    /// Start the agent on `policy` (YAML text) and wait until it enforces.
    pub fn start(policy: &str) -> Self {
        Self::start_with(policy, &[])
    }

    /// Like [`Agent::start`] with extra `portguard run` arguments.
    pub fn start_with(policy: &str, extra: &[&str]) -> Self {
        Self::try_start(policy, extra).unwrap_or_else(|e| panic!("agent failed to start:\n{e}"))
    }

    /// Start and wait for READY=1; on failure return the agent's stderr.
    pub fn try_start(policy: &str, extra: &[&str]) -> Result<Self, String> {
        let dir = tempfile::tempdir().expect("tempdir");
        let policy_path = dir.path().join("policy.yaml");
        std::fs::write(&policy_path, policy).expect("writing policy");
        Self::try_start_in(dir, policy_path, extra, &[])
    }

    /// Like [`Agent::start_with`], with the agent's capabilities limited to
    /// `caps` (setpriv's syntax: `+bpf,+net_admin`), as a Kubernetes
    /// `securityContext.capabilities` list would.
    pub fn start_with_caps(policy: &str, extra: &[&str], caps: &str) -> Result<Self, String> {
        let dir = tempfile::tempdir().expect("tempdir");
        let policy_path = dir.path().join("policy.yaml");
        std::fs::write(&policy_path, policy).expect("writing policy");
        let wrapper = [
            "setpriv".to_owned(),
            "--bounding-set".to_owned(),
            format!("-all,{caps}"),
            "--inh-caps".to_owned(),
            "-all".to_owned(),
            "--".to_owned(),
        ];
        Self::try_start_in(dir, policy_path, extra, &wrapper)
    }

    /// Like [`Agent::start_with`], run through `wrapper` (a command that
    /// ends by exec'ing its arguments: the agent and its arguments).
    pub fn start_wrapped(policy: &str, extra: &[&str], wrapper: &[String]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let policy_path = dir.path().join("policy.yaml");
        std::fs::write(&policy_path, policy).expect("writing policy");
        Self::try_start_in(dir, policy_path, extra, wrapper)
            .unwrap_or_else(|e| panic!("agent failed to start:\n{e}"))
    }

    /// Start on an existing policy file (e.g. a ConfigMap volume's symlink)
    /// and wait until it enforces.
    pub fn start_on_file(policy_path: &Path, extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        Self::try_start_in(dir, policy_path.to_owned(), extra, &[])
            .unwrap_or_else(|e| panic!("agent failed to start:\n{e}"))
    }

    fn try_start_in(
        dir: tempfile::TempDir,
        policy_path: PathBuf,
        extra: &[&str],
        wrapper: &[String],
    ) -> Result<Self, String> {
        let log = dir.path().join("events.jsonl");
        let stderr = dir.path().join("agent.stderr");
        let sock = dir.path().join("notify.sock");
        let notify = UnixDatagram::bind(&sock).expect("binding notify socket");
        let mut args: Vec<String> = vec![
            "run".into(),
            "--policy".into(),
            policy_path.display().to_string(),
            "--lost-report-interval".into(),
            "200ms".into(),
        ];
        if !extra.contains(&"--log") {
            args.extend(["--log".into(), log.display().to_string()]);
        }
        if !extra.contains(&"--watch") {
            args.push("--no-watch".into());
        }
        // Tests that are not about flood control see every decision as its
        // own line; the `aggregate` tests pass their own window.
        if !extra.contains(&"--aggregate-window") {
            args.extend(["--aggregate-window".into(), "0".into()]);
        }
        // Agents run side by side: each serves its metrics on a port of its
        // own (see `Agent::metrics_port`).
        if !extra.contains(&"--metrics-addr") {
            args.extend(["--metrics-addr".into(), "127.0.0.1:0".into()]);
        }
        // Every agent pins in a directory of its own (agents run side by
        // side), removed again on drop.
        let pin_dir = if let Some(i) = extra.iter().position(|a| *a == "--pin-dir") {
            extra
                .get(i + 1)
                .filter(|d| **d != "none")
                .map(PathBuf::from)
        } else {
            std::fs::create_dir_all(TEST_PIN_ROOT).expect("creating the test pin root");
            let name = dir
                .path()
                .file_name()
                .map_or_else(|| "agent".into(), |n| n.to_string_lossy().replace('.', "_"));
            let p = PathBuf::from(TEST_PIN_ROOT).join(name);
            args.extend(["--pin-dir".into(), p.display().to_string()]);
            Some(p)
        };
        if !extra.contains(&"--status-socket") {
            args.extend([
                "--status-socket".into(),
                dir.path().join("status.sock").display().to_string(),
            ]);
        }
        args.extend(
            extra
                .iter()
                .filter(|a| **a != "--watch")
                .map(|s| (*s).to_owned()),
        );
        let mut command = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(agent_bin());
                c
            }
            None => Command::new(agent_bin()),
        };
        let child = command
            .args(&args)
            .env("NOTIFY_SOCKET", &sock)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "debug".into()),
            )
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).expect("stderr file"))
            .spawn()
            .expect("spawning the agent");
        let mut agent = Self {
            child: Some(child),
            dir,
            pin_dir,
            policy: policy_path,
            log,
            stderr,
            notify,
        };
        match agent.wait_notify("READY=1", READY_TIMEOUT) {
            Ok(_) => Ok(agent),
            Err(e) => Err(format!("{e}\n--- agent stderr ---\n{}", agent.stderr())),
        }
    }

    /// How this agent checks `listen()`: true = denied (BPF LSM), false =
    /// reported after the fact (the BPF LSM is unusable on this host).
    pub fn listen_denied(&self) -> bool {
        let log = self.stderr();
        if log.contains("listen() and accept() are enforced") {
            return true;
        }
        assert!(
            log.contains("is CUT OFF instead"),
            "the agent neither denies listen() nor cuts listeners off:\n{log}"
        );
        false
    }

    /// The agent's log output so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// The agent's `portguard status` socket.
    pub fn status_socket(&self) -> PathBuf {
        self.dir.path().join("status.sock")
    }

    /// The port the agent serves /metrics on (from its log).
    pub fn metrics_port(&self) -> u16 {
        let log = self.stderr();
        log.lines()
            .find_map(|l| {
                l.split("serving /metrics on http://")
                    .nth(1)?
                    .rsplit(':')
                    .next()?
                    .trim()
                    .parse()
                    .ok()
            })
            .unwrap_or_else(|| panic!("the agent does not serve /metrics:\n{log}"))
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    /// Wait for an sd_notify datagram containing `needle`; returns it.
    fn wait_notify(&mut self, needle: &str, timeout: Duration) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        self.notify
            .set_read_timeout(Some(Duration::from_millis(200)))
            .expect("set_read_timeout");
        let mut buf = vec![0u8; 4096];
        loop {
            if let Ok(n) = self.notify.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                if msg.contains(needle) {
                    return Ok(msg);
                }
                continue;
            }
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                return Err(format!("agent exited with {status} before {needle}"));
            }
            if Instant::now() > deadline {
                return Err(format!("timed out waiting for {needle}"));
            }
        }
    }

    /// Replace the policy file and send SIGHUP; wait until the agent answers
    /// and return its STATUS line.
    pub fn reload(&mut self, policy: &str) -> String {
        self.write_policy(policy);
        self.hup_and_wait()
    }

    /// Replace the policy file atomically (rename), without signalling.
    pub fn write_policy(&self, policy: &str) {
        let tmp = self.dir.path().join("policy.yaml.new");
        std::fs::write(&tmp, policy).expect("writing policy");
        std::fs::rename(&tmp, &self.policy).expect("replacing policy");
    }

    /// Send SIGHUP and wait for RELOADING=1 then READY=1; returns READY's
    /// message (with STATUS).
    pub fn hup_and_wait(&mut self) -> String {
        // Older notifications (STATUS lines) must not fill the queue the
        // agent's RELOADING=1 and READY=1 go to.
        let _ = self.notify.set_nonblocking(true);
        let mut buf = [0u8; 4096];
        while self.notify.recv(&mut buf).is_ok() {}
        let _ = self.notify.set_nonblocking(false);
        self.signal(libc::SIGHUP);
        self.wait_notify("RELOADING=1", READY_TIMEOUT)
            .unwrap_or_else(|e| panic!("{e}\n{}", self.stderr()));
        self.wait_notify("READY=1", READY_TIMEOUT)
            .unwrap_or_else(|e| panic!("{e}\n{}", self.stderr()))
    }

    /// Wait for the next READY=1 (e.g. after a file-change reload).
    pub fn wait_ready(&mut self, timeout: Duration) -> String {
        self.wait_notify("READY=1", timeout)
            .unwrap_or_else(|e| panic!("{e}\n{}", self.stderr()))
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.pid(), sig) };
    }

    /// Every JSON line logged so far.
    pub fn events(&self) -> Vec<Value> {
        let Ok(f) = std::fs::File::open(&self.log) else {
            return Vec::new();
        };
        BufReader::new(f)
            .lines()
            .map_while(Result::ok)
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(&l).unwrap_or_else(|e| panic!("bad event line {l:?}: {e}"))
            })
            .collect()
    }

    /// Wait for an event matching every `(field, value)` pair.
    pub fn wait_event(&self, want: &[(&str, Value)]) -> Value {
        let deadline = Instant::now() + EVENT_TIMEOUT;
        loop {
            if let Some(e) = self.events().into_iter().find(|e| matches(e, want)) {
                return e;
            }
            assert!(
                Instant::now() < deadline,
                "no event matching {want:?}; events: {:#?}\n--- agent stderr ---\n{}",
                self.events(),
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Events matching `want`, after giving the agent `settle` to log them.
    pub fn events_matching(&self, want: &[(&str, Value)], settle: Duration) -> Vec<Value> {
        std::thread::sleep(settle);
        self.events()
            .into_iter()
            .filter(|e| matches(e, want))
            .collect()
    }

    /// Kill the agent with SIGKILL (no clean-up of any kind) and reap it.
    pub fn kill9(&mut self) {
        self.signal(libc::SIGKILL);
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }

    /// Stop the agent with SIGTERM and return its exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        self.signal(libc::SIGTERM);
        let mut child = self.child.take().expect("agent already stopped");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(s)) = child.try_wait() {
                return s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return child.wait().expect("wait");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.stop();
        }
        if let Some(p) = &self.pin_dir
            && p.exists()
        {
            uninstall(p);
        }
    }
}

/// A directory on bpffs standing in for a node's /sys/fs/bpf (a DaemonSet's
/// hostPath): whatever an agent pins below it is uninstalled on drop.
pub struct TestBpffs {
    pub path: PathBuf,
}

impl TestBpffs {
    pub fn new(tag: &str) -> Self {
        let path = PathBuf::from(TEST_PIN_ROOT).join(format!("{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&path).expect("creating a test bpffs directory");
        Self { path }
    }
}

impl Drop for TestBpffs {
    fn drop(&mut self) {
        if let Ok(entries) = std::fs::read_dir(&self.path) {
            for e in entries.flatten() {
                uninstall(&e.path());
            }
        }
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// Run `portguard ARGS` to completion: (exit code, stdout, stderr).
pub fn portguard(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(agent_bin()).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `portguard uninstall --pin-dir DIR`; panics (outside a panic) if it fails
/// for another reason than an agent still holding the directory.
pub fn uninstall(dir: &Path) -> String {
    let out = Command::new(agent_bin())
        .args(["uninstall", "--pin-dir"])
        .arg(dir)
        .output()
        .expect("running portguard uninstall");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success()
        && !text.contains("another portguard agent is running")
        && !std::thread::panicking()
    {
        panic!(
            "portguard uninstall --pin-dir {} failed:\n{text}",
            dir.display()
        );
    }
    text
}

/// True when `e` has every `(field, value)` of `want`.
pub fn matches(e: &Value, want: &[(&str, Value)]) -> bool {
    want.iter().all(|(k, v)| e.get(*k) == Some(v))
}

/// The result line of one pgprobe operation.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct ProbeResult {
    pub op: String,
    pub ok: bool,
    #[serde(default)]
    pub errno: i32,
    #[serde(default)]
    pub error: String,
    #[serde(default)]
    pub port: u16,
    /// `rebind`: errno of the first bind (0 if it succeeded).
    #[serde(default)]
    pub first_errno: i32,
    pub pid: u32,
    pub tid: u32,
    /// With [`Probe::serve`]: whether a loopback client's connection to the
    /// listener was accepted, and what the client's connect() got.
    #[serde(default)]
    pub served: Option<bool>,
    #[serde(default)]
    pub client: Option<String>,
    /// With [`Probe::unfence`]: what `SO_BINDTODEVICE ""` and
    /// `SO_BINDTOIFINDEX 0` on the listener got ("ok" or an errno name).
    #[serde(default)]
    pub unfence: Option<Vec<String>>,
    /// `autobind-udp`: whether a datagram sent to the autobound port arrived.
    #[serde(default)]
    pub received: Option<bool>,
    /// `v6only-race`: binds that succeeded, how many of them dual-stack, and
    /// how many were refused.
    #[serde(default)]
    pub bound: u32,
    #[serde(default)]
    pub dual: u32,
    #[serde(default)]
    pub eperm: u32,
}

impl ProbeResult {
    #[track_caller]
    pub fn assert_ok(&self) -> &Self {
        assert!(self.ok, "expected success, got {self:?}");
        self
    }

    #[track_caller]
    pub fn assert_eperm(&self) -> &Self {
        assert!(
            !self.ok && self.errno == libc::EPERM,
            "expected EPERM, got {self:?}"
        );
        self
    }
}

/// Builder for a pgprobe run.
#[derive(Clone, Debug, Default)]
pub struct Probe {
    args: Vec<String>,
    no_netns: bool,
}

impl Probe {
    /// A probe that runs inside `cg`.
    pub fn in_cgroup(cg: &Cgroup) -> Self {
        Self {
            args: vec!["--cgroup".into(), cg.fs.display().to_string()],
            no_netns: false,
        }
    }

    /// Run in the test's own network namespace instead of a private one
    /// (for a listener the test itself connects to over loopback).
    pub fn host_netns(mut self) -> Self {
        self.no_netns = true;
        self
    }

    /// Set the probe's private network namespace's
    /// `net.ipv4.ip_local_port_range`, as a pod may.
    pub fn port_range(mut self, low: u16, high: u16) -> Self {
        self.args
            .extend(["--port-range".into(), low.to_string(), high.to_string()]);
        self
    }

    /// A probe that stays outside any test cgroup (for `handoff`).
    pub fn outside() -> Self {
        Self::default()
    }

    /// A UDP responder (`udp:127.0.0.1:5300`), in its own process outside
    /// the cgroup, that answers one datagram.
    pub fn echo(mut self, spec: &str) -> Self {
        self.args.extend(["--echo".into(), spec.into()]);
        self
    }

    /// A listener (`tcp:127.0.0.1:5432`, `udp:[::1]:53`) set up before the
    /// probe joins its cgroup.
    pub fn listen(mut self, spec: &str) -> Self {
        self.args.extend(["--listen".into(), spec.into()]);
        self
    }

    pub fn uid(mut self, uid: u32) -> Self {
        self.args.extend(["--uid".into(), uid.to_string()]);
        self
    }

    /// After an operation that leaves a TCP listener, try to be served on
    /// it by a loopback client (see [`ProbeResult::served`]).
    pub fn serve(mut self) -> Self {
        self.args.push("--serve".into());
        self
    }

    /// After an operation that leaves a TCP listener (and before
    /// [`Probe::serve`]), try to bind it back to no device, as a tenant
    /// would to undo the fence (see [`ProbeResult::unfence`]).
    pub fn unfence(mut self) -> Self {
        self.args.push("--unfence".into());
        self
    }

    /// Like [`Probe::serve`], after waiting `ms` (to see what a client gets
    /// once the agent has acted on the listener).
    pub fn serve_after(mut self, ms: u64) -> Self {
        self.args
            .extend(["--serve".into(), "--serve-after-ms".into(), ms.to_string()]);
        self
    }

    /// `listen-unbound` binds its socket to `dev` before listen().
    pub fn bind_device(mut self, dev: &str) -> Self {
        self.args.extend(["--bind-device".into(), dev.into()]);
        self
    }

    /// Run the operation in a forked child.
    pub fn fork(mut self) -> Self {
        self.args.push("--fork".into());
        self
    }

    /// Run the operation in a second thread.
    pub fn thread(mut self) -> Self {
        self.args.push("--thread".into());
        self
    }

    fn command(&self, op: &[&str]) -> Command {
        let mut c = Command::new(probe_bin());
        if !self.no_netns {
            c.arg("--netns");
        }
        c.args(&self.args).args(op);
        c
    }

    /// Run one operation and return its result.
    #[track_caller]
    pub fn run(&self, op: &[&str]) -> ProbeResult {
        let out = self.command(op).output().expect("running pgprobe");
        assert!(
            out.status.success(),
            "pgprobe {op:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text.lines().last().unwrap_or_default();
        serde_json::from_str(line).unwrap_or_else(|e| panic!("bad pgprobe output {text:?}: {e}"))
    }

    /// Run `hold ...`: the operation's result, and a guard that kills the
    /// process (which keeps its socket until then).
    pub fn hold(&self, op: &[&str]) -> (ProbeResult, Held) {
        let mut c = self.command(op);
        let mut child = c.stdout(Stdio::piped()).spawn().expect("spawning pgprobe");
        let out = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(out)
            .read_line(&mut line)
            .expect("reading pgprobe");
        let r = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("bad pgprobe output {line:?}: {e}"));
        (r, Held(child))
    }

    /// Start the operation repeatedly (`repeat` times, `interval_ms` apart);
    /// results stream on the child's stdout.
    pub fn spawn_loop(&self, op: &[&str], repeat: usize, interval_ms: u64) -> Child {
        let mut c = self.command(&[]);
        c.args([
            "--repeat",
            &repeat.to_string(),
            "--interval-ms",
            &interval_ms.to_string(),
        ]);
        c.args(op)
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawning pgprobe loop")
    }
}

/// A process holding a socket; killed on drop.
pub struct Held(Child);

impl Drop for Held {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Skip (return early with a message) unless running as root. CI runs as
/// root, so there these tests never skip.
#[macro_export]
macro_rules! require_root {
    () => {
        if !$crate::is_root() {
            eprintln!("skipping: needs root (CAP_BPF, CAP_SYS_ADMIN) to load and attach programs");
            return;
        }
    };
}

/// A Kubernetes ConfigMap volume, laid out and updated the way the kubelet's
/// AtomicWriter does it: `policy.yaml -> ..data/policy.yaml`,
/// `..data -> ..<timestamp>`; an update writes a new timestamped directory
/// and renames a `..data_tmp` symlink over `..data`. The file the agent was
/// given never changes itself; the swap must still reload it.
pub struct ConfigMapVolume {
    pub dir: tempfile::TempDir,
    version: u32,
}

impl ConfigMapVolume {
    /// A volume holding `policy.yaml`.
    pub fn new(policy: &str) -> Self {
        let mut v = Self {
            dir: tempfile::tempdir().unwrap(),
            version: 0,
        };
        v.update(policy);
        std::os::unix::fs::symlink("..data/policy.yaml", v.dir.path().join("policy.yaml")).unwrap();
        v
    }

    /// Replace `policy.yaml` the way the kubelet does.
    pub fn update(&mut self, policy: &str) {
        let root = self.dir.path();
        self.version += 1;
        let ts = format!(
            "..2026_11_22_00_00_0{}.{}",
            self.version,
            std::process::id()
        );
        std::fs::create_dir(root.join(&ts)).unwrap();
        std::fs::write(root.join(&ts).join("policy.yaml"), policy).unwrap();
        let old = std::fs::read_link(root.join("..data")).ok();
        std::os::unix::fs::symlink(&ts, root.join("..data_tmp")).unwrap();
        std::fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();
        if let Some(old) = old {
            std::fs::remove_dir_all(root.join(old)).unwrap();
        }
    }

    pub fn policy_path(&self) -> PathBuf {
        self.dir.path().join("policy.yaml")
    }
}

/// docs/event.schema.json.
pub fn event_schema_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/event.schema.json")
}

/// Validate event lines against the published JSON Schema (with Python's
/// `jsonschema`, which kubernetes-validate brings). Returns one message per
/// invalid line.
pub fn schema_errors(events: &[Value]) -> Vec<String> {
    json_schema_errors(&event_schema_path(), events)
}

/// Validate each of `docs` against the JSON Schema at `schema` (the draft
/// its `$schema` names). Returns one message per error.
pub fn json_schema_errors(schema: &Path, docs: &[Value]) -> Vec<String> {
    let script = r#"
import json, sys
from jsonschema.validators import validator_for
schema = json.load(open(sys.argv[1]))
cls = validator_for(schema)
cls.check_schema(schema)
v = cls(schema)
errors = []
for i, line in enumerate(json.load(sys.stdin)):
    for e in v.iter_errors(line):
        errors.append(f"line {i}: {e.message} at {list(e.absolute_path)}; context: {[c.message for c in e.context][:6]}: {json.dumps(line)[:2000]}")
print(json.dumps(errors))
"#;
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(schema)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 (run scripts/setup.sh)");
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin
            .write_all(serde_json::to_string(docs).unwrap().as_bytes())
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "schema validation failed to run: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Collects a looping probe's results as they arrive.
pub struct Loop {
    child: Child,
    /// Raw result lines, parsed when asked (parsing as they arrive would
    /// compete for the CPU with the loop and the agent). Empty in counting
    /// mode.
    lines: Arc<Mutex<Vec<String>>>,
    tally: Arc<Mutex<Tally>>,
}

/// A loop's outcomes, counted (for loops of millions of attempts).
#[derive(Clone, Debug, Default)]
pub struct Tally {
    pub ok: u64,
    /// Failed with EPERM: the policy denied it.
    pub eperm: u64,
    /// Failed otherwise (EADDRINUSE and the like: not a policy decision).
    pub other: u64,
    /// A few of the `other` lines.
    pub other_samples: Vec<String>,
}

impl Tally {
    pub fn total(&self) -> u64 {
        self.ok + self.eperm + self.other
    }
}

fn parse_result(line: &str) -> ProbeResult {
    serde_json::from_str(line).unwrap_or_else(|e| panic!("bad pgprobe line {line:?}: {e}"))
}

impl Loop {
    /// Run `op` until dropped, `interval_ms` apart (0: back to back),
    /// keeping every result.
    pub fn start(p: &Probe, op: &[&str], interval_ms: u64) -> Self {
        Self::spawn(p, op, interval_ms, true)
    }

    /// Like [`Loop::start`], only counting outcomes ([`Loop::tally`]).
    pub fn counting(p: &Probe, op: &[&str], interval_ms: u64) -> Self {
        Self::spawn(p, op, interval_ms, false)
    }

    fn spawn(p: &Probe, op: &[&str], interval_ms: u64, keep: bool) -> Self {
        let mut child = p.spawn_loop(op, 1 << 40, interval_ms);
        let out = child.stdout.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let tally = Arc::new(Mutex::new(Tally::default()));
        let (l2, t2) = (Arc::clone(&lines), Arc::clone(&tally));
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if !line.starts_with('{') {
                    continue;
                }
                {
                    let mut t = t2.lock().unwrap();
                    if line.contains("\"ok\":true") {
                        t.ok += 1;
                    } else if line.contains("\"errno\":1,") {
                        t.eperm += 1;
                    } else {
                        t.other += 1;
                        if t.other_samples.len() < 20 {
                            t.other_samples.push(line.clone());
                        }
                    }
                }
                if keep {
                    l2.lock().unwrap().push(line);
                }
            }
        });
        Self {
            child,
            lines,
            tally,
        }
    }

    /// Results so far.
    pub fn count(&self) -> usize {
        self.tally.lock().unwrap().total() as usize
    }

    /// Outcomes so far.
    pub fn tally(&self) -> Tally {
        self.tally.lock().unwrap().clone()
    }

    /// Stop the loop and return the final tally.
    pub fn finish_tally(mut self) -> Tally {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::thread::sleep(Duration::from_millis(50));
        self.tally()
    }

    /// Wait until `n` more results have arrived.
    pub fn wait_more(&self, n: usize) {
        let target = self.count() + n;
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.count() < target {
            assert!(Instant::now() < deadline, "loop probe stalled");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn outcomes_since(&self, from: usize) -> Vec<bool> {
        self.lines.lock().unwrap()[from..]
            .iter()
            .map(|l| {
                let r = parse_result(l);
                assert!(r.ok || r.errno == libc::EPERM, "unexpected result {r:?}");
                r.ok
            })
            .collect()
    }

    /// Stop the loop and return every result.
    pub fn finish(mut self) -> Vec<ProbeResult> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Let the reader thread take the last lines.
        std::thread::sleep(Duration::from_millis(50));
        let lines = std::mem::take(&mut *self.lines.lock().unwrap());
        lines.iter().map(|l| parse_result(l)).collect()
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
