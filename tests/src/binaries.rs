//! Where the binaries under test are: the agent (`$PORTGUARD_BIN` or the
//! cargo target directory) and the tests crate's own `pgbench` and `pgprobe`.

use std::{
    io::BufReader,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
};

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

/// The probe binary (built by cargo next to the integration test binary).
pub fn probe_bin() -> PathBuf {
    let p = target_dir_binary("pgprobe");
    assert!(
        p.exists(),
        "{} not found: build the tests crate's binaries",
        p.display()
    );
    p
}

/// `pgprobe batch` started in `cgroup` (its directory), in a network
/// namespace of its own: one long-lived process that makes every call it is
/// sent on standard input and answers each with a JSON line.
pub fn probe_batch(cgroup: &Path) -> (Child, ChildStdin, BufReader<ChildStdout>) {
    let mut child = Command::new(probe_bin())
        .arg("--netns")
        .arg("--cgroup")
        .arg(cgroup)
        .arg("batch")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawning pgprobe batch");
    let stdin = child.stdin.take().expect("stdin");
    let stdout = BufReader::new(child.stdout.take().expect("stdout"));
    (child, stdin, stdout)
}
