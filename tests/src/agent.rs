//! The agent under test: [`Agent`] (a running `portguard run`, stopped and
//! uninstalled on drop), [`TestBpffs`], one-shot `portguard` commands, and
//! matching the JSON events the agent logs.

use std::{
    io::{BufRead as _, BufReader},
    os::unix::net::UnixDatagram,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::agent_bin;

/// An agent stopped by [`Agent::stop_until_dropped`]; resumed on drop.
pub struct Stopped(i32);

impl Drop for Stopped {
    fn drop(&mut self) {
        // SAFETY: resuming the test's own agent.
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}

/// The capabilities docs/deployment.md, the DaemonSet and the systemd unit name as
/// the agent's minimum (setpriv's syntax). `deploy` tests that they suffice,
/// `manifests` that the deployment files grant exactly these.
pub const MINIMAL_CAPS: &str = "+bpf,+perfmon,+net_admin,+sys_admin,+sys_ptrace,+dac_read_search";

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
        Self::try_start_with_env(policy, extra, &[])
    }

    /// Like [`Agent::start_with`], with extra environment variables for the
    /// agent alone (agents of other tests run side by side).
    pub fn start_with_env(policy: &str, extra: &[&str], env: &[(&str, &Path)]) -> Self {
        Self::try_start_with_env(policy, extra, env)
            .unwrap_or_else(|e| panic!("agent failed to start:\n{e}"))
    }

    /// Like [`Agent::try_start`], with extra environment variables for the
    /// agent alone: on failure, the agent's stderr.
    pub fn try_start_with_env(
        policy: &str,
        extra: &[&str],
        env: &[(&str, &Path)],
    ) -> Result<Self, String> {
        let dir = tempfile::tempdir().expect("tempdir");
        let policy_path = dir.path().join("policy.yaml");
        std::fs::write(&policy_path, policy).expect("writing policy");
        Self::try_start_in(dir, policy_path, extra, &[], env)
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
        Self::try_start_in(dir, policy_path, extra, &wrapper, &[])
    }

    /// Like [`Agent::start_with`], run through `wrapper` (a command that
    /// ends by exec'ing its arguments: the agent and its arguments).
    pub fn start_wrapped(policy: &str, extra: &[&str], wrapper: &[String]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let policy_path = dir.path().join("policy.yaml");
        std::fs::write(&policy_path, policy).expect("writing policy");
        Self::try_start_in(dir, policy_path, extra, wrapper, &[])
            .unwrap_or_else(|e| panic!("agent failed to start:\n{e}"))
    }

    /// Start on an existing policy file (e.g. a ConfigMap volume's symlink)
    /// and wait until it enforces.
    pub fn start_on_file(policy_path: &Path, extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        Self::try_start_in(dir, policy_path.to_owned(), extra, &[], &[])
            .unwrap_or_else(|e| panic!("agent failed to start:\n{e}"))
    }

    fn try_start_in(
        dir: tempfile::TempDir,
        policy_path: PathBuf,
        extra: &[&str],
        wrapper: &[String],
        env: &[(&str, &Path)],
    ) -> Result<Self, String> {
        let log = dir.path().join("events.jsonl");
        let stderr = dir.path().join("agent.stderr");
        let sock = dir.path().join("notify.sock");
        let notify = UnixDatagram::bind(&sock).expect("binding notify socket");
        let mut args: Vec<String> = vec![
            "run".into(),
            "--policy".into(),
            policy_path.display().to_string(),
        ];
        // Losses are reported within a test's patience; a benchmark may
        // pass the agent's own default (1s): with 10,000 policies each
        // check reads every policy's counters.
        if !extra.contains(&"--lost-report-interval") {
            args.extend(["--lost-report-interval".into(), "200ms".into()]);
        }
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
        // Likewise, tests that are not about the kernel's per-policy event
        // budget see every decision's event (or its loss); the `fairness`
        // tests pass their own --event-rate.
        if !extra.contains(&"--event-rate") {
            args.extend(["--event-rate".into(), "0".into()]);
        }
        // Agents run side by side: each serves its metrics on a port of its
        // own (see `Agent::metrics_port`).
        if !extra.contains(&"--metrics-addr") {
            args.extend(["--metrics-addr".into(), "127.0.0.1:0".into()]);
        }
        // Every agent pins in a directory of its own (agents run side by
        // side), removed again on drop.
        let named_pin_dir = extra.contains(&"--pin-dir");
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
            .envs(env.iter().copied())
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
            Err(e) => {
                // A pin directory the caller named is the caller's to look
                // at (what a start that failed and exited left there) and
                // to clean up. An agent still running (no READY in time)
                // may hold links there: uninstalled as before.
                let exited = agent
                    .child
                    .as_mut()
                    .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))));
                if named_pin_dir && exited {
                    agent.pin_dir = None;
                }
                Err(format!("{e}\n--- agent stderr ---\n{}", agent.stderr()))
            }
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

    /// The text of the agent's /metrics.
    pub fn metrics_text(&self) -> String {
        let url = format!("http://127.0.0.1:{}/metrics", self.metrics_port());
        ureq::get(&url)
            .call()
            .expect("GET /metrics")
            .body_mut()
            .read_to_string()
            .unwrap()
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

    /// Stop the agent (SIGSTOP) until the guard is dropped (SIGCONT), so a
    /// failing test never leaves it stopped.
    pub fn stop_until_dropped(&self) -> Stopped {
        self.signal(libc::SIGSTOP);
        Stopped(self.pid())
    }

    /// Send one request line on the agent's status socket (as a hook or
    /// `portguard status` does) and parse its one JSON answer.
    pub fn ask(&self, line: &str) -> Value {
        use std::io::{Read as _, Write as _};
        let mut s = std::os::unix::net::UnixStream::connect(self.status_socket()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(line.as_bytes()).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("answer {text:?}: {e}"))
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
