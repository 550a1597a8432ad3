//! What the deployment files rely on: the probe endpoints, the agent running
//! on the host's cgroup tree mounted somewhere else (as in a DaemonSet pod,
//! whose own /sys/fs/cgroup is its cgroup namespace), and refusing a cgroup2
//! view that hides part of the tree.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    path::{Path, PathBuf},
    process::Command,
};

use portguard_tests::{Agent, Cgroup, MINIMAL_CAPS, Probe, agent_bin, cgroup2_root, require_root};
use serde_json::json;

/// GET `path` from `port` on loopback: (status code, body).
fn get(port: u16, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connecting to the health port");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let code = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {resp:?}"));
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
    (code, body)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn health_endpoints_answer_the_probes() {
    require_root!();
    let cg = Cgroup::new("health");
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut agent = Agent::start_with(
        &format!(
            "policies:\n  - {{name: h, cgroup: {}, bind: [{{ports: [8080]}}]}}\n",
            cg.rel
        ),
        &["--health-listen", &addr],
    );
    let (code, body) = get(port, "/readyz");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("enforcing 1 policies"), "{body}");
    let (code, body) = get(port, "/healthz");
    assert_eq!(code, 200, "{body}");
    assert!(body.starts_with("ok: main loop turned"), "{body}");
    assert_eq!(get(port, "/metrics").0, 404);
    // After a reload the status follows.
    agent.reload(&format!(
        "policies:\n  - {{name: h, cgroup: {}, bind: []}}\n  - {{name: i, cgroup: {}/x, bind: []}}\n",
        cg.rel, cg.rel
    ));
    let (code, body) = get(port, "/readyz");
    assert_eq!(code, 200);
    assert!(body.contains("2 policies"), "{body}");
    // Enforcement is on while the probes answer.
    Probe::in_cgroup(&cg)
        .run(&["bind", "tcp", "127.0.0.1", "8080"])
        .assert_eperm();

    // A taken address costs the probes, loudly, not enforcement: a second
    // agent on the same address enforces without them.
    let second = Agent::start_with(
        &format!("policies:\n  - {{name: a, cgroup: {}, bind: []}}\n", cg.rel),
        &["--health-listen", &addr],
    );
    let err = second.stderr();
    assert!(
        err.contains(&format!("--health-listen {addr}: cannot listen"))
            && err.contains("enforcing WITHOUT /healthz and /readyz"),
        "{err}"
    );
}

/// Run the agent expecting it to fail at start; (exit code, stdout, stderr).
fn run_briefly(extra: &[&str], cg: &Cgroup) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("p.yaml");
    std::fs::write(
        &policy,
        format!("policies:\n  - {{name: a, cgroup: {}, bind: []}}\n", cg.rel),
    )
    .unwrap();
    let out = Command::new(agent_bin())
        .args([
            "run",
            "--no-watch",
            "--pin-dir",
            "none",
            "--policy",
            policy.to_str().unwrap(),
        ])
        .args(extra)
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A bind mount, unmounted (lazily) on drop.
struct BindMount {
    target: PathBuf,
    _dir: tempfile::TempDir,
}

impl BindMount {
    fn new(source: &Path) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("host-cgroup");
        std::fs::create_dir(&target).unwrap();
        let st = Command::new("mount")
            .arg("--bind")
            .arg(source)
            .arg(&target)
            .status()
            .unwrap();
        assert!(st.success(), "mount --bind {} failed", source.display());
        Self { target, _dir: dir }
    }
}

impl Drop for BindMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.target).status();
    }
}

#[test]
fn the_host_cgroup_tree_can_be_mounted_anywhere() {
    require_root!();
    let cg = Cgroup::new("cgroot");
    let mount = BindMount::new(&cgroup2_root());
    let root = mount.target.to_str().unwrap();
    let agent = Agent::start_with(
        &format!(
            "policies:\n  - {{name: elsewhere, cgroup: {}, bind: [{{ports: [8080]}}]}}\n",
            cg.rel
        ),
        &["--cgroup-root", root],
    );
    assert!(
        agent
            .stderr()
            .contains(&format!("cgroup2 mounted at {root}")),
        "{}",
        agent.stderr()
    );
    let r = Probe::in_cgroup(&cg)
        .fork()
        .run(&["bind", "tcp", "::", "9090"]);
    r.assert_eperm();
    let e = agent.wait_event(&[("pid", json!(r.pid))]);
    assert_eq!(
        e["cgroup"], cg.rel,
        "paths are relative to the hierarchy root"
    );
    assert_eq!(e["policy"], "elsewhere");
}

#[test]
fn a_partial_view_of_the_cgroup_tree_is_refused() {
    require_root!();
    let cg = Cgroup::new("partial");
    // A child cgroup stands for what a container sees at /sys/fs/cgroup in
    // its own cgroup namespace: a subtree that looks like a root.
    let child = cg.child("ns-root");
    let mount = BindMount::new(&child.fs);
    for root in [mount.target.to_str().unwrap(), child.fs.to_str().unwrap()] {
        let (code, _, err) = run_briefly(&["--cgroup-root", root], &cg);
        assert_eq!(code, 1, "{err}");
        assert!(err.contains(root), "names the path: {err}");
        assert!(err.contains("shows a subtree"), "{err}");
        assert!(!err.contains("attached"), "{err}");
    }
    let tmp = tempfile::tempdir().unwrap();
    let (code, _, err) = run_briefly(&["--cgroup-root", tmp.path().to_str().unwrap()], &cg);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("is not a cgroup2 mount"), "{err}");
}

#[test]
fn the_documented_capabilities_are_enough() {
    require_root!();
    let cg = Cgroup::new("caps");
    // A socket bound before the agent starts, by another user, in its own
    // network namespace: listing it needs setns (CAP_SYS_ADMIN) into a
    // namespace reached through a process of another user (CAP_SYS_PTRACE).
    let (held, _h) = Probe::in_cgroup(&cg)
        .uid(65534)
        .hold(&["hold", "tcp", "0.0.0.0", "9999"]);
    held.assert_ok();
    let agent = Agent::start_with_caps(
        &format!(
            "policies:\n  - {{name: caps, cgroup: {}, bind: [{{ports: [8080]}}]}}\n",
            cg.rel
        ),
        &[],
        MINIMAL_CAPS,
    )
    .unwrap_or_else(|e| panic!("the agent needs more than {MINIMAL_CAPS}:\n{e}"));
    let e = agent.wait_event(&[("pid", json!(held.pid)), ("verdict", json!("preexisting"))]);
    assert_eq!(e["uid"], 65534);
    // A cgroup created after the agent started: its path comes from the
    // cgroup id (open_by_handle_at: CAP_DAC_READ_SEARCH).
    let late = cg.child("late");
    let r = Probe::in_cgroup(&late).run(&["bind", "udp", "::", "9090"]);
    r.assert_eperm();
    let e = agent.wait_event(&[("pid", json!(r.pid))]);
    assert_eq!(e["cgroup"], late.rel);
    assert!(
        !agent.stderr().contains("without CAP_"),
        "no capability warning: {}",
        agent.stderr()
    );
}

#[test]
fn too_few_capabilities_fail_with_a_clear_error() {
    require_root!();
    let cg = Cgroup::new("fewcaps");
    let err = match Agent::start_with_caps(
        &format!(
            "policies:\n  - {{name: few, cgroup: {}, bind: []}}\n",
            cg.rel
        ),
        &[],
        "+bpf,+net_admin",
    ) {
        Ok(_) => panic!("the agent started without CAP_PERFMON/CAP_SYS_ADMIN"),
        Err(e) => e,
    };
    assert!(err.contains("exited"), "{err}");
    assert!(err.contains("CAP_PERFMON"), "names what is missing: {err}");
    // Nothing stays attached: a bind in the cgroup is not judged.
    Probe::in_cgroup(&cg)
        .run(&["bind", "tcp", "127.0.0.1", "8080"])
        .assert_ok();
}
