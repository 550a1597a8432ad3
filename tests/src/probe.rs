//! Running `pgprobe`: the [`Probe`] builder, the [`ProbeResult`] line it
//! prints, and [`Held`] (a probe that keeps its socket until dropped).

use std::{
    io::{BufRead as _, BufReader},
    process::{Child, Command, Stdio},
};

use crate::{Cgroup, probe_bin};

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

    /// `listen-unbound` calls listen() in a child running as `uid` (without
    /// `CAP_NET_RAW`) that exits at once; the probe keeps the socket.
    pub fn listen_in_child(mut self, uid: u32) -> Self {
        self.args
            .extend(["--listen-in-child".into(), uid.to_string()]);
        self
    }

    /// `listen-unbound` fills its socket's option memory before listen():
    /// no socket storage can be made for it.
    pub fn fill_optmem(mut self) -> Self {
        self.args.push("--fill-optmem".into());
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
